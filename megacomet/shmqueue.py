"""Shared memory that every worker sees: routing table, message store, inboxes.

The supervisor creates one anonymous MAP_SHARED mapping before it forks, so
the region outlives any worker and a restarted worker finds it as it was.

Layout, and the rule that makes it safe without locks:

* ``N`` partitions.  Every id has a home worker, ``home = key % N`` where
  ``key = id_key(id)``.  Partition ``w`` holds the table slots and the
  message log of the ids whose home is ``w``, and **only worker w writes
  to it**.  A worker killed at any instant leaves at most its own partition
  half-written; its successor (same index) calls ``Partition.repair``.
  Other workers may read an id's last seq and epoch (``peek``) as a hint that
  the owner's answer can correct, and its subscriber count (``subscribers``,
  ``info``): the sum the home keeps of what every worker reports of its holders.
* ``N * N`` single-producer single-consumer byte rings, ``ring(src, dst)``.
  The producer alone writes ``tail``, the consumer alone writes ``head``.
  A record becomes visible only when ``tail`` moves past it, so a producer
  killed mid-record leaves nothing; a consumer killed mid-batch re-reads
  from its last stored ``head`` (at-least-once, in a window of one record).
* One stats block per worker: counters and pid the worker writes (the
  supervisor zeroes the pid when the worker dies), so any worker can answer
  ``/stats`` and ``/health``.

Keys are CPython's ``hash()`` of the id bytes: SipHash keyed once per
supervisor run, shared by every forked worker (and by restarted ones), never
recomputed across processes that did not fork from the same supervisor.  Two
different ids with the same 64-bit key would share a slot; with a random key
the chance over a million ids is about 3e-8, which we accept for not paying
for the id bytes in every slot.

Every id has an epoch, stamped when its slot is created: an id forgotten
(nothing buffered, nobody registered) and created again starts its seqs at
1 in a new epoch, so a cursor is a (seq, epoch) pair.

This module never blocks, never takes a lock, never allocates per message
beyond the bytes it returns, and never writes a partition it does not own.
Memory ordering relies on x86-64 (TSO): a store of ``tail`` is seen after
the stores of the record it publishes (``cli`` refuses to start elsewhere).
"""

import mmap
import struct
import time

MAX_WORKERS = 64
DEFAULT_MAX_IDS = 1_000_000      # --max-ids
# What Partition.store says of a message it did not cache (cluster mode).
STALE, REPEAT, GAP = "stale", "repeat", "gap"
EMPTY = 0          # key of a free slot; also the log's wrap marker

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
# A log record: key, absolute offset of the id's previous record, seq,
# timestamp (ms, wraps every 49 days), data length; then the data.
_REC = struct.Struct("<qqIII")
REC_HEADER = _REC.size
_RING_LEN = _U32
_RING_WRAP = 0xFFFFFFFF
_RING_REWIND = 4096       # an empty ring whose tail is at least this far in starts again at 0
_RING_KEEP = 8192         # what a rewinding ring keeps resident; it gives back the pages past it

# Per-worker stats block (all u64).  The first fields say who runs the worker: pid (the
# supervisor zeroes it when the worker dies), when it started, when its loop last turned
# (ms; the supervisor replaces a worker that stops turning), how often it was restarted
# (written by the supervisor).  The counters follow, in the order /stats lists them.
PROCESS_FIELDS = ("pid", "started_ms", "heartbeat_ms", "restarts")
COUNTER_FIELDS = ("connections", "subscribers", "accepted", "received", "published", "refused",
                  "delivered", "slow_closed", "expired", "dropped", "rss_bytes", "ip_refused",
                  "redis_round_trips", "redis_commands", "redis_reconnects",
                  "redis_resubscribes", "redis_gaps_filled", "redis_unavailable", "redis_down")
# Their places in StatsBlock.counters(), where the worker counts in place: /stats is always
# current, and nothing is copied per loop turn.  (A field without a name here fails import.)
# IP_REFUSED: client connections refused by --max-conns-per-ip.
# REDIS_*: cluster mode (``cluster``, ``redislink``): writes to Redis, commands in them, links
# lost, channels joined again, gaps read from a stream, publishes Redis did not confirm, and
# 1 while this worker cannot reach Redis (/health).
(CONNECTIONS, SUBSCRIBERS, ACCEPTED, RECEIVED, PUBLISHED, REFUSED, DELIVERED, SLOW_CLOSED,
 EXPIRED, DROPPED, RSS_BYTES, IP_REFUSED, REDIS_ROUND_TRIPS, REDIS_COMMANDS, REDIS_RECONNECTS,
 REDIS_RESUBSCRIBES, REDIS_GAPS_FILLED, REDIS_UNAVAILABLE, REDIS_DOWN) = range(len(COUNTER_FIELDS))
STAT_FIELDS = PROCESS_FIELDS + COUNTER_FIELDS
_STAT_BLOCK = 256                  # bytes per worker: room for 32 fields (16 were full)
assert len(STAT_FIELDS) * 8 <= _STAT_BLOCK, "the stats block is full: raise _STAT_BLOCK"
# Partition header (u64 each).  "dirty" is the slot whose fields are being
# rewritten and "journal" the index move in progress (src << 32 | dst), or
# NO_SLOT: with the free list, which repair() rebuilds, that is everything a
# crash can leave half-done in a partition.  "bump" is the first never-used
# slot, "free" the first free one plus 1 (0: none), linked through heads[].
# "pending" is where the record of the publish in progress goes (or NO_SLOT).  "epoch" is
# the newest epoch this partition gave an id (see Partition._new_epoch).
(_H_WRITE, _H_TAIL, _H_IDS, _H_MESSAGES, _H_DIRTY, _H_JOURNAL, _H_BUMP, _H_FREE, _H_PENDING,
 _H_EPOCH) = range(10)
_PART_HEADER = 128
NO_SLOT = 0xFFFFFFFFFFFFFFFF
_HEADER = 64
_CACHE_LINE = 64


def id_key(ident: bytes) -> int:
    """The 64-bit key of an id; never EMPTY."""
    return hash(ident) or 1


def _align(n, a):
    return (n + a - 1) // a * a


class TableFull(Exception):
    """The home partition has no room for one more id."""


def partition_slots(workers, max_ids):
    """(id slots of each partition, how many of them ids that only subscribers created may
    fill) for --max-ids over that many workers."""
    # Ids spread over partitions by hash: leave room for the unevenness.
    per_part = max_ids / workers
    slots = int(per_part + 4 * per_part ** 0.5) + 16
    # The rest is kept for publishers, so that polls on made-up ids cannot lock publishing out.
    return slots, slots - max(1, slots // 4)


def max_ids_for(subscribed_ids, workers, step=10_000):
    """The smallest --max-ids (a multiple of step) whose table lets subscribers alone create
    that many ids over that many workers, with room for the ids' uneven spread by hash."""
    per_part = subscribed_ids / workers
    need = per_part + 4 * per_part ** 0.5
    max_ids = max(step, -(-subscribed_ids // step) * step)
    while partition_slots(workers, max_ids)[1] < need:
        max_ids += step
    return max_ids


class Layout:
    """Where everything lives in the region, computed the same way in every process."""

    # key, mask, cmask, head, epoch, last, first, compat, subscribers
    SLOT_BYTES = 8 + 8 + 8 + 8 + 8 + 4 + 4 + 4 + 4
    INDEX_LOAD = 0.7                        # index entries per index cell, at most

    def __init__(self, workers, max_ids, log_bytes, ring_bytes):
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 1..{MAX_WORKERS}")
        self.workers = workers
        self.slots, self.subscriber_slots = partition_slots(workers, max_ids)
        self.index_cells = int(self.slots / self.INDEX_LOAD) + 1
        self.log_size = max(4096, _align(log_bytes // workers, 8))
        self.ring_size = max(4096, 1 << (max(ring_bytes, 4096) - 1).bit_length())
        off = _HEADER + _STAT_BLOCK * workers
        self.part_offsets = []
        for _ in range(workers):
            off = _align(off, 4096)
            self.part_offsets.append(off)
            off += (_PART_HEADER + _align(self.index_cells * 4, 8) + self.slots * self.SLOT_BYTES
                    + self.log_size)
        self.ring_offsets = {}
        for src in range(workers):
            for dst in range(workers):
                off = _align(off, 4096)
                self.ring_offsets[src, dst] = off
                off += 2 * _CACHE_LINE + self.ring_size
        self.total = _align(off, mmap.PAGESIZE)


class SharedRegion:
    """The mapping and its views; create it before fork, use it after."""

    def __init__(self, workers, max_ids, log_bytes, ring_bytes, ttl_ms, max_queued):
        self.layout = Layout(workers, max_ids, log_bytes, ring_bytes)
        self.ttl_ms = ttl_ms
        self.max_queued = max_queued
        self.mm = mmap.mmap(-1, self.layout.total, flags=mmap.MAP_SHARED)
        self.view = memoryview(self.mm)
        for w in range(workers):
            header = self._part_header(w)
            header[_H_DIRTY] = header[_H_JOURNAL] = header[_H_PENDING] = NO_SLOT

    @property
    def workers(self):
        return self.layout.workers

    def stats(self, w):
        base = _HEADER + _STAT_BLOCK * w
        return StatsBlock(self.view[base:base + _STAT_BLOCK].cast("Q"))

    def partition(self, w):
        return Partition(self, w)

    def ring(self, src, dst):
        return Ring(self.view, self.layout.ring_offsets[src, dst], self.layout.ring_size,
                    self.mm)

    def home(self, key):
        return key % self.layout.workers

    def totals(self):
        """Region-wide figures for /stats: read without locks, so approximate under load."""
        ids = messages = used = 0
        for w in range(self.workers):
            header = self._part_header(w)
            ids += header[_H_IDS]
            messages += header[_H_MESSAGES]
            used += header[_H_WRITE] - header[_H_TAIL]
        lay = self.layout
        return {"ids_used": ids, "ids_capacity": lay.slots * lay.workers,
                "messages": messages, "bytes_used": used,
                "bytes_capacity": lay.log_size * lay.workers,
                "region_bytes": lay.total}

    def _part_header(self, w):
        base = self.layout.part_offsets[w]
        return self.view[base:base + _PART_HEADER].cast("Q")


class StatsBlock:
    """One worker's counters in the region, by name."""

    __slots__ = ("_words",)
    _INDEX = {name: i for i, name in enumerate(STAT_FIELDS)}

    def __init__(self, words):
        self._words = words

    def get(self, name):
        return self._words[self._INDEX[name]]

    def set(self, name, value):
        self._words[self._INDEX[name]] = value

    def counters(self):
        """The counters themselves, indexed by CONNECTIONS, SUBSCRIBERS, ...: its worker
        writes them in place (aligned u64 words: a reader sees each old or new, never torn)."""
        return self._words[len(PROCESS_FIELDS):len(STAT_FIELDS)]

    def as_dict(self):
        return dict(zip(STAT_FIELDS, self._words[:len(STAT_FIELDS)]))


class Ring:
    """A single-producer, single-consumer ring of length-prefixed byte records.

    Positions are absolute u64 byte counts; the physical place is pos mod size.
    A record never straddles the end: a wrap marker sends the reader to 0.

    Every page of the shared region a ring ever touched would stay resident (in the PSS of
    every worker), and with W workers there are W * W rings: 4 096 of 256 KiB at 64. So an
    empty ring starts again at 0, and when it does after a burst took it further, its
    producer gives the pages past _RING_KEEP back to the kernel (``mm``: the region's mmap).
    """

    __slots__ = ("_pos", "_data", "size", "_mask", "_mm", "_start", "_high")

    def __init__(self, view, offset, size, mm=None):
        self._pos = view[offset:offset + 2 * _CACHE_LINE].cast("Q")   # [0]=head, [8]=tail
        self._data = view[offset + 2 * _CACHE_LINE:offset + 2 * _CACHE_LINE + size]
        self.size = size
        self._mask = size - 1
        self._mm = mm
        self._start = offset + 2 * _CACHE_LINE      # of the data, in mm
        self._high = 0       # producer: the furthest byte written since pages were given back

    def push(self, payload) -> bool:
        """Append one record; False when it does not fit now (back-pressure)."""
        need = 4 + len(payload)
        need += -need % 4
        if need > self.size // 2:     # else an empty ring might never fit it (padding to the end)
            raise ValueError("ring record of %d bytes over half the ring" % need)
        tail = self._pos[8]
        phys = tail & self._mask
        room_to_end = self.size - phys
        if room_to_end < need:
            pad = room_to_end
        elif phys >= _RING_REWIND and phys >= need and tail == self._pos[0]:
            # Empty, and this far in: start again at 0, so that a ring drained as it goes
            # keeps to its first pages instead of walking (and keeping resident) all of them.
            # Until the consumer reads the wrap marker, the room is the phys bytes before it:
            # a record that would not fit there goes where it is, as before.
            pad = room_to_end
            if self._high > _RING_KEEP:
                self._give_back(phys)
        else:
            pad = 0
        if tail + pad + need - self._pos[0] > self.size:
            return False
        data = self._data
        if pad:
            _RING_LEN.pack_into(data, phys, _RING_WRAP)
            tail += pad
            phys = 0
        _RING_LEN.pack_into(data, phys, len(payload))
        data[phys + 4:phys + 4 + len(payload)] = payload
        if phys + need > self._high:
            self._high = phys + need
        self._pos[8] = tail + need          # publish: the record is visible from here on
        return True

    def _give_back(self, marker):
        """The ring is empty and about to start again at 0: free the pages past _RING_KEEP
        that the last burst touched, but the one the wrap marker at ``marker`` goes on.
        The consumer reads nothing there until the producer writes it again (a freed page
        reads as zeros, and is written before the tail moves past it)."""
        page = mmap.PAGESIZE
        first = (self._start + _RING_KEEP + page - 1) // page * page
        end = (self._start + self._high + page - 1) // page * page
        kept = (self._start + marker) // page * page
        self._high = 0
        try:
            for lo, hi in ((first, min(kept, end)), (max(first, kept + page), end)):
                if hi > lo:
                    self._mm.madvise(mmap.MADV_REMOVE, lo, hi - lo)
        except (AttributeError, OSError, ValueError):
            self._mm = None      # no mmap, or a kernel without MADV_REMOVE: keep the pages

    def pop(self):
        """The next record's bytes, or None; the caller must ``commit`` after handling it."""
        head = self._pos[0]
        if head == self._pos[8]:
            return None
        phys = head & self._mask
        n = _RING_LEN.unpack_from(self._data, phys)[0]
        if n == _RING_WRAP:
            head += self.size - phys
            self._pos[0] = head
            if head == self._pos[8]:
                return None
            phys = 0
            n = _RING_LEN.unpack_from(self._data, 0)[0]
        return bytes(self._data[phys + 4:phys + 4 + n])

    def commit(self, payload_len):
        """Mark the record just popped as handled (stores head)."""
        need = 4 + payload_len
        self._pos[0] = self._pos[0] + need + (-need % 4)

    def pending_bytes(self):
        return self._pos[8] - self._pos[0]


class Partition:
    """The id table and message log of one home worker.

    Only worker ``w`` may call the methods that write (all but ``find``).
    Slots are dense: allocated from the front (or a free list), one array
    per field, so a table holding few ids touches few pages.  A separate
    index of u32 cells (slot + 1, 0 empty) finds a key's slot by open
    addressing with linear probing and backward-shift deletion.  The log is
    a circular FIFO of records in publish order: the oldest live record is
    at ``tail``, so expiry and making room are both "advance the tail", O(1)
    per record over its lifetime.  An id's messages are the chain from its
    newest record back through ``prev``.
    """

    def __init__(self, region, w):
        lay = region.layout
        view = region.view
        base = lay.part_offsets[w]
        self.header = view[base:base + _PART_HEADER].cast("Q")
        off = base + _PART_HEADER
        self.cells = lay.index_cells
        self.index = view[off:off + self.cells * 4].cast("I")
        off += _align(self.cells * 4, 8)
        n = self.nslots = lay.slots
        arrays = []
        for fmt, width in (("q", 8), ("Q", 8), ("Q", 8), ("Q", 8), ("Q", 8), ("I", 4), ("I", 4),
                           ("I", 4), ("I", 4)):
            arrays.append(view[off:off + n * width].cast(fmt))
            off += n * width
        (self.keys, self.masks, self.cmasks, self.heads, self.epochs,
         self.lasts, self.firsts, self.compats, self.counts) = arrays
        # The slot of the last publish (routing reads its subscriber count for the ACK): an
        # attribute, so that publish()'s answer keeps its shape, and an int, the cheapest store.
        self.published_slot = 0
        self.log = view[off:off + lay.log_size]
        self.log_size = lay.log_size
        self.workers = lay.workers
        self.ttl_ms = region.ttl_ms
        self.max_queued = region.max_queued
        self.expired = 0      # counted by this process since it started
        self.dropped = 0
        self.sub_limit = lay.subscriber_slots
        self.local_epochs = True   # False in cluster mode: Redis gives ids their epochs

    # -- the table ---------------------------------------------------------

    def _cell_of(self, key):
        return (key // self.workers) % self.cells

    def _probe(self, key):
        """(slot, cell): the key's slot and index cell, or (-1, the empty cell ending its probe)."""
        index, keys, cells = self.index, self.keys, self.cells
        c = (key // self.workers) % cells
        while True:
            entry = index[c]
            if entry == 0:
                return -1, c
            if keys[entry - 1] == key:
                return entry - 1, c
            c += 1
            if c == cells:
                c = 0

    def find(self, key):
        """The slot holding key, or -1."""
        return self._probe(key)[0]

    def _find_or_add(self, key, limit=None):
        """The key's slot, added if new; TableFull if the table holds ``limit`` ids (or is full)."""
        slot, cell = self._probe(key)
        if slot >= 0:
            return slot
        header = self.header
        if limit is not None and header[_H_IDS] >= limit:
            raise TableFull("id table full for new subscriptions")
        free = header[_H_FREE]
        if free:
            slot = free - 1
            header[_H_FREE] = self.heads[slot]
        elif header[_H_BUMP] < self.nslots:
            slot = header[_H_BUMP]
            header[_H_BUMP] = slot + 1
        else:
            raise TableFull("id table full")
        header[_H_DIRTY] = slot
        self.masks[slot] = self.cmasks[slot] = self.heads[slot] = 0
        self.lasts[slot] = self.compats[slot] = self.counts[slot] = 0
        self.firsts[slot] = 1
        # (In cluster mode an id's epoch comes from Redis: 0 until ``store`` or ``adopt``.)
        self.epochs[slot] = self._new_epoch() if self.local_epochs else 0
        self.keys[slot] = key
        self.index[cell] = slot + 1           # the id exists from here on
        header[_H_DIRTY] = NO_SLOT
        header[_H_IDS] += 1
        return slot

    def _new_epoch(self):
        """The epoch of an id created now: its seqs start again at 1, and a cursor counted in
        any earlier life of the id must not be taken for one of this life.  About the time in
        ms (so a full restart, which begins the partitions anew, does not give one out twice),
        and above every epoch this partition gave before (an id forgotten and created again
        within one ms gets a new one too).  Never 0, which means "no epoch"."""
        epoch = max(int(time.time() * 1000), self.header[_H_EPOCH] + 1)
        self.header[_H_EPOCH] = epoch
        return epoch

    def _delete(self, slot):
        """Forget the id in ``slot``: take it out of the index, put the slot on the free list.

        Each index move is journaled in one 8-byte store, so ``repair`` can
        redo a move a crash interrupted and finish the shift; a slot a crash
        leaves neither indexed nor free is found by repair's rebuild.
        """
        _, hole = self._probe(self.keys[slot])
        header = self.header
        header[_H_JOURNAL] = hole << 32 | hole
        self._shift_into(hole)
        self.keys[slot] = EMPTY
        self.heads[slot] = header[_H_FREE]
        header[_H_FREE] = slot + 1
        header[_H_IDS] -= 1

    def _shift_into(self, hole):
        index, keys, cells = self.index, self.keys, self.cells
        header = self.header
        c = hole
        while True:
            c += 1
            if c == cells:
                c = 0
            entry = index[c]
            if entry == 0:
                break
            ideal = self._cell_of(keys[entry - 1])
            # The entry at c may fill the hole unless its ideal cell lies
            # cyclically in (hole, c]: then it would sit before its start.
            if (hole < c and (ideal <= hole or ideal > c)) or \
               (hole > c and ideal <= hole and ideal > c):
                header[_H_JOURNAL] = c << 32 | hole
                index[hole] = entry
                hole = c
        index[hole] = 0
        header[_H_JOURNAL] = NO_SLOT

    def _maybe_forget(self, slot):
        if (self.lasts[slot] < self.firsts[slot] and not self.masks[slot] and not self.cmasks[slot]
                and not self.counts[slot]):
            self._delete(slot)

    def used_slots(self):
        keys = self.keys
        return [s for s in range(self.header[_H_BUMP]) if keys[s] != EMPTY]

    # -- the log -----------------------------------------------------------

    def _record_at(self, pos):
        """The header at ``pos``; a wrap marker (key EMPTY) when too close to the end for one."""
        phys = pos % self.log_size
        if self.log_size - phys < REC_HEADER:
            return EMPTY, 0, 0, 0, 0
        return _REC.unpack_from(self.log, phys)

    def _drop_tail(self, now_ms):
        """Advance the tail past one record; count it if it was still live."""
        header = self.header
        tail = header[_H_TAIL]
        key, _prev, seq, stamp, length = self._record_at(tail)
        if key == EMPTY:                  # wrap marker
            header[_H_TAIL] = tail + self.log_size - tail % self.log_size
            return
        i = self.find(key)
        if i >= 0 and self.firsts[i] <= seq <= self.lasts[i]:
            self.firsts[i] = seq + 1
            header[_H_MESSAGES] -= 1
            if (now_ms - stamp) & 0xFFFFFFFF >= self.ttl_ms:
                self.expired += 1
            else:
                self.dropped += 1
            need = REC_HEADER + length
            header[_H_TAIL] = tail + need + (-need % 8)
            self._maybe_forget(i)
            return
        need = REC_HEADER + length
        header[_H_TAIL] = tail + need + (-need % 8)

    def _reserve(self, need, now_ms):
        """The absolute position where a record of ``need`` bytes goes, after making room."""
        header = self.header
        size = self.log_size
        pos = header[_H_WRITE]
        phys = pos % size
        if size - phys < need:            # never straddle the end: pad to the start
            while header[_H_TAIL] < pos + (size - phys) - size:
                self._drop_tail(now_ms)
            _U64.pack_into(self.log, phys, EMPTY)   # positions are 8-aligned: it fits
            pos += size - phys
            header[_H_WRITE] = pos
        while header[_H_TAIL] < pos + need - size:
            self._drop_tail(now_ms)
        return pos

    def expire(self, now_ms):
        """Drop the records older than the TTL; returns how many live ones expired."""
        header = self.header
        before = self.expired
        ttl = self.ttl_ms
        while header[_H_TAIL] < header[_H_WRITE]:
            key, _prev, _seq, stamp, _len = self._record_at(header[_H_TAIL])
            if key != EMPTY and (now_ms - stamp) & 0xFFFFFFFF < ttl:
                break
            self._drop_tail(now_ms)
        return self.expired - before

    def _walk(self, i, lowest, now_ms):
        """Yield (seq, phys, length) of slot i's live records, newest first, down to ``lowest``."""
        key = self.keys[i]
        expect = self.lasts[i]
        lowest = max(lowest, self.firsts[i])
        pos = self.heads[i]
        tail = self.header[_H_TAIL]
        size = self.log_size
        ttl = self.ttl_ms
        while expect >= lowest and pos >= tail:
            phys = pos % size
            rkey, prev, seq, stamp, length = _REC.unpack_from(self.log, phys)
            if rkey != key or seq != expect or (now_ms - stamp) & 0xFFFFFFFF >= ttl:
                return
            yield seq, phys + REC_HEADER, length
            pos = prev
            expect -= 1

    # -- what the home worker does ------------------------------------------

    def publish(self, key, data, now_ms, stale=None):
        """Store one message; returns (seq, workers to deliver to, workers whose compat polls
        take it, the id's epoch).

        Workers are bitmasks.  The compat cursor moves to the message for the
        compat polls held now, but not for workers ``stale(mask)`` says died
        since they registered; if none of them could be answered after all,
        their workers give it back (``compat_untake``).

        Raises TableFull when the id is new and the table has no room.
        """
        pos, need, i = self._reserve_slot(key, data, now_ms)
        return self._append(pos, need, i, key, self.lasts[i] + 1, data, now_ms, stale)

    def store(self, key, epoch, seq, data, now_ms, stale=None):
        """Cluster mode: cache message ``seq`` of the id's life ``epoch``, numbered by Redis.

        Returns what ``publish`` does when it is the next of the id's current life (or the
        first of a newer life: the cache starts again), STALE for one of an older life,
        REPEAT for one already cached or counted, GAP when messages between are missing
        (nothing is stored: the caller fetches them first).  Raises TableFull as publish.
        """
        pos, need, i = self._reserve_slot(key, data, now_ms)
        if epoch != self.epochs[i]:
            if epoch < self.epochs[i]:
                return STALE
            self._restart(i, epoch)
        last = self.lasts[i]
        if seq <= last:
            return REPEAT
        if seq != last + 1:
            return GAP
        return self._append(pos, need, i, key, seq, data, now_ms, stale)

    def adopt(self, key, epoch, last, now_ms):
        """Cluster mode: the id's life and last seq as Redis has them, after its messages
        (``store``) were cached.  A cache of another life, or ahead of Redis (it lost what
        it held), starts again; messages Redis no longer holds are counted, not cached."""
        i = self._find_or_add(key, self.sub_limit)
        if epoch != self.epochs[i] or self.lasts[i] > last:
            self._restart(i, epoch)
        if last > self.lasts[i]:
            header = self.header
            header[_H_DIRTY] = i
            header[_H_MESSAGES] -= max(0, self.lasts[i] - self.firsts[i] + 1)
            self.lasts[i] = last
            self.firsts[i] = last + 1
            header[_H_DIRTY] = NO_SLOT
        return i

    def keep(self, key):
        """Cluster mode: the id's slot now, before Redis tells its epoch (0 until then), so
        that the subscriber counts reported meanwhile have a place.  TableFull as subscribe."""
        return self._find_or_add(key, self.sub_limit)

    def _restart(self, i, epoch):
        """Slot i begins the id's life ``epoch``: nothing of it is cached."""
        header = self.header
        header[_H_DIRTY] = i
        header[_H_MESSAGES] -= max(0, self.lasts[i] - self.firsts[i] + 1)
        self.lasts[i] = self.compats[i] = 0     # emptied before the epoch changes: see repair()
        self.firsts[i] = 1
        self.epochs[i] = epoch
        header[_H_DIRTY] = NO_SLOT

    def _reserve_slot(self, key, data, now_ms):
        """Room in the log for a record of data, then key's slot: (position, size, slot)."""
        need = REC_HEADER + len(data)
        need += -need % 8
        if need > self.log_size // 2:
            raise ValueError("message larger than half a partition's log")
        pos = self._reserve(need, now_ms)     # may forget slots: find ours after it
        return pos, need, self._find_or_add(key)

    def _append(self, pos, need, i, key, seq, data, now_ms, stale):
        header = self.header
        header[_H_PENDING] = pos               # with dirty: repair() finishes or forgets this
        header[_H_DIRTY] = i
        phys = pos % self.log_size
        _REC.pack_into(self.log, phys, key, self.heads[i], seq, now_ms & 0xFFFFFFFF, len(data))
        self.log[phys + REC_HEADER:phys + REC_HEADER + len(data)] = data
        header[_H_WRITE] = pos + need          # the record exists from here on
        self.heads[i] = pos                    # head before last: see repair()
        self.lasts[i] = seq
        overflow = seq - self.firsts[i] + 1 - self.max_queued
        if overflow > 0:
            self.firsts[i] += overflow
            self.dropped += overflow
            header[_H_MESSAGES] -= overflow
        header[_H_MESSAGES] += 1
        self.published_slot = i
        cmask = compat = self.cmasks[i]
        targets = self.masks[i] | cmask
        if cmask:
            if stale is not None:
                compat &= ~stale(cmask)
            if compat:                         # held compat polls consume it
                self.compats[i] = seq
            self.cmasks[i] = 0                 # told once: they register again if they miss it
        header[_H_DIRTY] = header[_H_PENDING] = NO_SLOT
        return seq, targets, compat, self.epochs[i]

    def subscribe(self, key, bit, since, now_ms, epoch=0):
        """Register worker bit for key; returns (last seq, the id's epoch, reset,
        [(seq, data)] with seq > the cursor).

        The cursor is ``since`` counted in ``epoch`` (0: whichever the id has).  It is
        *reset* to 0 when that epoch is not the id's (an earlier life of the id, or another
        run of the server) or when since is beyond the id's last seq: then everything
        buffered is returned.
        """
        i = self._find_or_add(key, self.sub_limit)
        self.masks[i] |= bit
        last = self.lasts[i]
        reset = since > last or (epoch != 0 and epoch != self.epochs[i])
        if reset:
            since = 0
        log = self.log
        found = [(seq, bytes(log[p:p + n])) for seq, p, n in self._walk(i, since + 1, now_ms)]
        found.reverse()
        return last, self.epochs[i], reset, found

    def unsubscribe(self, key, bit, compat_only=False):
        i = self.find(key)
        if i >= 0:
            if not compat_only:
                self.masks[i] &= ~bit
            self.cmasks[i] &= ~bit
            self._maybe_forget(i)

    def compat_take(self, key, bit, now_ms, consume=True):
        """The oldest message compat readers have not had, advancing the cursor; or None.

        With None, worker bit is registered to receive the next message.  With
        ``consume`` false (a HEAD request) nothing changes: a look, not a read.
        """
        i = self._find_or_add(key, self.sub_limit) if consume else self.find(key)
        if i < 0:
            return None
        oldest = None
        for oldest in self._walk(i, self.compats[i] + 1, now_ms):
            pass
        if oldest is None:
            if consume:
                self.cmasks[i] |= bit
            return None
        seq, p, n = oldest
        if consume:
            self.compats[i] = seq
        return seq, bytes(self.log[p:p + n])

    def message(self, key, seq, now_ms):
        """Message ``seq`` of key if it is still buffered (and live), else None."""
        i = self.find(key)
        if i < 0:
            return None
        for found, p, n in self._walk(i, seq, now_ms):
            if found == seq:
                return bytes(self.log[p:p + n])
        return None

    def compat_waiters(self, key):
        """The workers whose compat polls wait for key's next message (cleared: woken now)."""
        i = self.find(key)
        if i < 0:
            return 0
        waiting = self.cmasks[i]
        self.cmasks[i] = 0
        return waiting

    def compat_untake(self, key, seq):
        """Give back message ``seq``, taken for compat polls that had left (or died) meanwhile.

        Only if nothing was taken after it.  Returns the workers whose compat
        polls wait meanwhile (cleared: they should poll again), or 0.
        """
        i = self.find(key)
        if i < 0 or self.compats[i] != seq:
            return 0
        self.compats[i] = seq - 1
        waiting = self.cmasks[i]
        self.cmasks[i] = 0
        return waiting

    def last_seq(self, key):
        i = self.find(key)
        return self.lasts[i] if i >= 0 else 0

    def peek(self, key):
        """Any worker may call this: (key's last seq, its epoch), or None when not found.

        It only reads, while the owner may be writing: a probe can miss a key
        being moved, and a slot can change hands under the reader, so callers
        must treat the answer as a hint that the owner may correct.
        """
        i = self.find(key)
        if i < 0:
            return None
        found = self.lasts[i], self.epochs[i]
        return found if self.keys[i] == key else None

    def subscribers(self, key):
        """Any worker may call this: key's subscriber count (0 when not found), a hint as
        ``peek`` is.  The count is the sum of what each worker last reported (``routing``)."""
        i = self.find(key)
        if i < 0:
            return 0
        count = self.counts[i]
        return count if self.keys[i] == key else 0

    def info(self, key):
        """Any worker may call this: (last seq, messages buffered, subscribers, epoch) of key,
        or None when not found; a hint as ``peek`` is.  Buffered counts what the log holds
        for it, expired or not yet dropped (the home expires at each tick)."""
        i = self.find(key)
        if i < 0:
            return None
        last, first = self.lasts[i], self.firsts[i]
        found = last, max(0, last - first + 1), self.counts[i], self.epochs[i]
        return found if self.keys[i] == key else None

    def add_subscribers(self, key, delta):
        """The home adds ``delta`` to key's subscriber count (never below 0); False, and
        nothing done, when key has no slot (nobody subscribed there: a count for it is
        dropped).  A slot is kept while its count is above 0; at 0 it may be forgotten."""
        i = self.find(key)
        if i < 0:
            return False
        count = self.counts[i] + delta
        self.counts[i] = count if count > 0 else 0
        if count <= 0:
            self._maybe_forget(i)
        return True

    def reset_counts(self):
        """A restarted home's first step: the counts its predecessor summed are zeroed (what
        each worker reported died with it; they report again), and slots they alone kept
        are forgotten."""
        counts = self.counts
        for slot in self.used_slots():
            if counts[slot]:
                counts[slot] = 0
                self._maybe_forget(slot)      # slots never move: safe while iterating

    def clear_worker(self, bit):
        """Forget that worker ``bit`` holds anything: it was restarted."""
        masks, cmasks = self.masks, self.cmasks
        for slot in self.used_slots():
            if (masks[slot] | cmasks[slot]) & bit:
                masks[slot] &= ~bit
                cmasks[slot] &= ~bit
                self._maybe_forget(slot)      # slots never move: safe while iterating

    def repair(self):
        """Finish whatever a killed predecessor left half-done; rebuild the free list and counts."""
        header = self.header
        journal = header[_H_JOURNAL]
        if journal != NO_SLOT:
            src, dst = journal >> 32, journal & 0xFFFFFFFF
            if src != dst and self.index[src]:   # src empty: the move and its shift were done
                self.index[dst] = self.index[src]
            self._shift_into(src)
        indexed = {entry - 1 for entry in self.index if entry}
        dirty = header[_H_DIRTY]
        if dirty in indexed:
            self._repair_slot(dirty)
        header[_H_DIRTY] = header[_H_PENDING] = NO_SLOT
        keys, heads, lasts, firsts = self.keys, self.heads, self.lasts, self.firsts
        free = messages = 0
        idle = []
        for slot in range(header[_H_BUMP] - 1, -1, -1):
            if slot in indexed:
                messages += max(0, lasts[slot] - firsts[slot] + 1)
                if (lasts[slot] < firsts[slot] and not self.masks[slot] and not self.cmasks[slot]
                        and not self.counts[slot]):
                    idle.append(slot)         # a crash came between emptying and forgetting
            else:                             # free, or lost by a crash mid-insert/delete
                keys[slot] = EMPTY
                heads[slot] = free
                free = slot + 1
        header[_H_FREE] = free
        header[_H_IDS] = len(indexed)
        header[_H_MESSAGES] = messages
        for slot in idle:
            self._delete(slot)

    def _repair_slot(self, i):
        """Slot i was being written: complete a publish whose record made it into the log."""
        header = self.header
        pos = header[_H_PENDING]
        if pos != NO_SLOT and header[_H_TAIL] <= pos < header[_H_WRITE]:
            key, _prev, seq, _stamp, _len = self._record_at(pos)
            if key == self.keys[i] and seq == self.lasts[i] + 1:
                self.heads[i] = pos
                self.lasts[i] = seq
        last = self.lasts[i]
        self.firsts[i] = max(min(self.firsts[i], last + 1), last + 1 - self.max_queued)
        self.compats[i] = min(self.compats[i], last)

"""Who holds which id, and what an id's home does with the records about it.

Every id has a home worker (``id_key(id) % N``).  The home side stores
PUBs in its partition, registers SUB/CPOLL senders, and sends DELIVERs to
the workers registered for the id; acknowledgements go back once per loop
turn.  The holder side keeps ``held`` (id -> the fds held for it) and hands
each DELIVER to the protocol of each holder.  Records a worker sends itself
go through its local FIFO, never a direct call, so that a SUB's MSGS reply
always precedes the DELIVERs of messages published after it.

Subscriber counts (``GET /presence``): each holder tells each home, once per tick, how
the number of connections it holds changed for its ids (COUNT: only ids whose number
changed since the last tick; a fall waits one tick more, so a long-poll that comes back
within a tick or two changes nothing).  The home adds the changes to the ids' counters in
its partition, which any worker reads.  The home keeps nothing per id in its own memory:
whenever a worker restarts (its RESET), and when the home itself starts again, the home
zeroes its counters and asks every worker for all it holds of its ids (RECOUNT); until a
worker's answer comes, its changes (already in the answer) are dropped.

It never touches a socket: answering is the protocols' job.
"""

import os

from . import shmqueue
from .records import (ACK_REFUSED_MAX, CGIVE, COUNT, COUNT_FINAL, COUNT_FULL, COUNT_HEADER,
                      CPOLL, DELIVER, DELIVER_COMPAT, MSG_HEADER, MSGS, MSGS_FINAL, MSGS_HEADER,
                      MSGS_REFUSED, MSGS_RESET, PUB, RECOUNT, RESET, RESET_RECORD, SUB,
                      SUB_QUIET, UNSUB, UNSUB_ALL, UNSUB_COMPAT)
from . import records
from .shmqueue import PUBLISHED, RECEIVED, REFUSED, SUBSCRIBERS
from .worker import HELD, PENDING, READING


class Router:
    """One per worker: the home side of its partition and the registry of its holders."""

    def __init__(self, w, client_proto):
        self.w = w
        self.client_proto = client_proto    # what a held connection reads again when let go
        limit = len(w.state)
        self.held_id = [b""] * limit        # fd -> the id it is held for (a tuple: several)
        self.compat = bytearray(limit)      # fd -> 1 if held as a compat poll
        self.held = {}           # id -> fd, or set of fds (pending and held)
        self.compat_held = {}    # id -> how many of its holders are compat polls
        self.lingering = set()   # ids whose last holder left; UNSUB at the next tick
        self.sub_lingering = set()   # those of them whose last holder was a /sub poll
        self.acks = {}           # (src, fd, serial) -> [stored, last seq, refused lines]
        self.compat_sent = {}    # (key, seq) -> [workers yet to answer, when]: see on_cgive
        self.given_back = {}     # key -> seqs given back after later ones were taken: see on_cgive
        # Each worker's restart count as of its last RESET we handled (see stale_workers).
        self.generation = [w.region.stats(i).get("restarts") for i in range(w.region.workers)]
        self.partial = {}        # (fd, id) -> messages of a MSGS reply still arriving in parts
        # Per protocol byte of a holder: deliver(fd, id, seq, epoch, flags, data, cache) ->
        # whether it answered a compat poll.  backlog(fd, id, last, epoch, flags, messages):
        # a SUB's whole answer (``subscriptions``).
        self.deliver_to = {}
        self.deliver_many = None   # Subscriptions.deliver_many (set by server.assemble)
        self.backlog = None
        self.cluster = None      # cluster.ClusterNode in cluster mode: publishes go to Redis
        # Holder side of the subscriber counts: id -> connections held here for it as its
        # home knows it, for the ids whose number changed since the last tick (``changed``),
        # and for those whose fall waits a tick (``falling``): see report_counts.
        self.changed = {}
        self.falling = {}
        # Home side: the recount in progress (its generation, never reused: an answer to an
        # earlier one, even a predecessor's, is told apart) and the workers yet to answer it.
        self.count_generation = int.from_bytes(os.urandom(4), "little")
        self.recounting = set()

    def handlers(self):
        return {PUB: self.on_pub, SUB: self.on_sub, CPOLL: self.on_cpoll, UNSUB: self.on_unsub,
                RESET: self.on_reset, CGIVE: self.on_cgive, DELIVER: self.on_deliver,
                MSGS: self.on_msgs, COUNT: self.on_count, RECOUNT: self.on_recount}

    def start(self):
        """A predecessor ran: forget what it held, in our own partition before any record is
        handled (a PUB in a ring must not meet its registrations), in the others by a RESET
        that precedes anything we send them."""
        w = self.w
        if not w.stats.get("started_ms"):
            return
        w.part.clear_worker(1 << w.index)
        self.recount()                            # the counts' sources died with it
        for dst in range(w.region.workers):
            if dst != w.index:
                w.send(dst, RESET_RECORD)

    def tick(self):
        w = self.w
        if self.compat_sent:                      # some worker answered a poll: no word comes
            stale = w.now - w.cfg.queue_ttl
            for key in [k for k, sent in self.compat_sent.items() if sent[1] < stale]:
                del self.compat_sent[key]
        for key in list(self.given_back):         # what nobody came for expires as usual
            seqs = [seq for seq in self.given_back[key]
                    if w.part.message(key, seq, w.now_ms()) is not None]
            if seqs:
                self.given_back[key] = seqs
            else:
                del self.given_back[key]
        if self.changed or self.falling:
            self.report_counts()
        if self.lingering:
            for ident in self.lingering:
                if ident not in self.held:
                    w.send_home(ident, records.unsub(UNSUB_ALL, ident))
            self.lingering.clear()
            self.sub_lingering.clear()

    # -- publishing --------------------------------------------------------------

    def publish(self, ident, data, fd=0, serial=0, line=0, idempotency=b""):
        """Send a message to its home; with a serial, the home ACKs it back to (fd, serial).
        In cluster mode, to Redis instead (``cluster.publish``); idempotency keys only
        matter there (one box never stores a message twice: it has no retries to absorb)."""
        w = self.w
        if self.cluster is not None:
            self.cluster.publish(ident, data, fd, serial, line, idempotency)
            return
        w.counters[RECEIVED] += 1
        w.send_home(ident, records.pub(fd if serial else 0, serial, line, ident, data))

    # -- home side -----------------------------------------------------------------

    def on_pub(self, src, record):
        w = self.w
        fd, serial, line, ident, data = records.read_pub(record)
        try:
            seq, targets, compat, epoch = w.part.publish(shmqueue.id_key(ident), data, w.now_ms(),
                                                         self.stale_workers)
        except shmqueue.TableFull:
            seq = targets = compat = 0
            w.counters[REFUSED] += 1
            w.log("publish: id table full, message for %s refused" % ident.decode())
        else:
            w.counters[PUBLISHED] += 1
        if serial:                                 # acknowledged in bulk by flush_acks
            tally = self.acks.get((src, fd, serial))
            if tally is None:
                tally = self.acks[src, fd, serial] = [0, 0, [], 0]
            if seq:
                tally[0] += 1
                tally[1] = seq
                if not line:                       # a single publish: its id's subscribers
                    part = w.part                  # as it was stored (not for batches)
                    tally[3] = part.counts[part.published_slot]
            else:
                tally[2].append(line)
        if targets:
            self.fan_out(ident, data, seq, targets, compat, epoch)

    def fan_out(self, ident, data, seq, targets, compat, epoch):
        """DELIVER message seq to the workers registered for it (just stored by this home)."""
        w = self.w
        if compat:                                 # the cursor moved: given back if nobody reads it
            self.compat_sent[shmqueue.id_key(ident), seq] = [bin(compat).count("1"), w.now]
        plain = records.deliver(seq, epoch, 0, ident, data)
        dst = 0
        while targets:
            if targets & 1:
                w.send(dst, records.deliver(seq, epoch, DELIVER_COMPAT, ident, data)
                       if compat >> dst & 1 else plain)
            targets >>= 1
            dst += 1

    def flush_acks(self):
        """One ACK per publishing request and loop turn, not one per message."""
        if not self.acks:
            return
        for (src, fd, serial), (stored, last, refused, subscribers) in self.acks.items():
            for start in range(0, max(len(refused), 1), ACK_REFUSED_MAX):
                self.w.send(src, records.ack(fd, serial, stored, last,
                                             refused[start:start + ACK_REFUSED_MAX], subscribers))
                stored = subscribers = 0
        self.acks.clear()

    def on_sub(self, src, record):
        w = self.w
        fd, serial, since, epoch, flags, ident = records.read_sub(record)
        try:
            last, epoch, reset, messages = w.part.subscribe(shmqueue.id_key(ident), 1 << src,
                                                            since, w.now_ms(), epoch)
        except shmqueue.TableFull:
            w.send(src, records.msgs_header(fd, serial, 0, 0, MSGS_FINAL | MSGS_REFUSED, ident))
            return
        if flags & SUB_QUIET and not messages and not reset:
            return                                # the poll is held already: no news, no answer
        self.answer_sub(src, fd, serial, ident, last, epoch, reset, messages)

    def answer_sub(self, src, fd, serial, ident, last, epoch, reset, messages):
        """Send a SUB's answer, split so that no record outgrows a ring."""
        w = self.w
        reset = MSGS_RESET if reset else 0
        limit = w.outbox[src].size // 4
        parts = [records.msgs_header(fd, serial, last, epoch, reset, ident)]
        size = MSGS_HEADER + len(ident)
        for seq, data in messages:
            if size + MSG_HEADER + len(data) > limit:
                w.send(src, b"".join(parts))
                parts = [records.msgs_header(fd, serial, last, epoch, reset, ident)]
                size = MSGS_HEADER + len(ident)
            parts.append(records.msg_header(seq, len(data)))
            parts.append(data)
            size += MSG_HEADER + len(data)
        parts[0] = records.msgs_header(fd, serial, last, epoch, reset | MSGS_FINAL, ident)
        w.send(src, b"".join(parts))

    def on_cpoll(self, src, record):
        w = self.w
        fd, serial, peek, ident = records.read_cpoll(record)
        key = shmqueue.id_key(ident)
        found = None
        if not peek and key in self.given_back:   # given back after later ones: oldest first
            found = self._take_given_back(key)
        if found is None:
            try:
                found = w.part.compat_take(key, 1 << src, w.now_ms(), consume=not peek)
            except shmqueue.TableFull:
                found = None
        seq, data = found if found else (0, b"")
        w.send(src, records.cmsg(fd, serial, seq, not peek, ident, data))

    def _take_given_back(self, key):
        seqs = self.given_back[key]
        while seqs:
            seq = seqs.pop(0)
            data = self.w.part.message(key, seq, self.w.now_ms())
            if data is not None:                  # else expired meanwhile
                break
        else:
            data = None
        if not seqs:
            del self.given_back[key]
        return None if data is None else (seq, data)

    def on_cgive(self, src, record):
        """A worker could not hand message seq to a compat poll (it had left, or the worker
        died and was restarted).  Once every worker the message went to has said so (one
        that did answer a poll says nothing), it is given back: the compat cursor moves back
        if nothing was taken after it, else the message waits in ``given_back`` and the next
        compat poll gets it first.  Either way, whoever waits is woken."""
        seq, ident = records.read_cgive(record)
        key = shmqueue.id_key(ident)
        sent = self.compat_sent.get((key, seq))
        if sent is not None:
            sent[0] -= 1
            if sent[0]:
                return
            del self.compat_sent[key, seq]
        part = self.w.part
        i = part.find(key)
        if i < 0 or part.compats[i] < seq:
            return                                # forgotten, or never taken: nothing to give
        if part.compats[i] == seq:
            waiting = part.compat_untake(key, seq)
        else:
            pending = self.given_back.setdefault(key, [])
            if seq not in pending:
                pending.append(seq)
                pending.sort()
            waiting = part.compat_waiters(key)
        for dst in workers_in(waiting):
            self.w.send(dst, records.cwake(ident))

    def on_unsub(self, src, record):
        which, ident = records.read_unsub(record)
        self.w.part.unsubscribe(shmqueue.id_key(ident), 1 << src, compat_only=which == UNSUB_COMPAT)

    def on_reset(self, src, record):
        self.w.part.clear_worker(1 << src)
        self.generation[src] = self.w.region.stats(src).get("restarts")
        self.recount()                            # what its predecessor held is in the counts

    # -- home side: subscriber counts -------------------------------------------------------

    def recount(self):
        """Zero this partition's subscriber counts and ask every worker (this one too) for
        all it holds of its ids: the counts summed what workers reported, and a worker that
        restarted (or this home's predecessor) took its share with it."""
        w = self.w
        w.part.reset_counts()
        self.count_generation = (self.count_generation + 1) & 0xFFFFFFFF
        self.recounting = set(range(w.region.workers))
        request = records.recount(self.count_generation)
        for dst in range(w.region.workers):
            w.send(dst, request)

    def on_count(self, src, record):
        """A worker's changes of holders for some of our ids, or its answer to a recount."""
        flags, generation, entries = records.read_count(record)
        if flags & COUNT_FULL:
            if generation != self.count_generation or src not in self.recounting:
                return                            # an answer to an earlier recount
        elif src in self.recounting:
            return                                # its answer to the recount will count them
        add = self.w.part.add_subscribers
        for ident, change in entries:
            add(shmqueue.id_key(ident), change)   # (an id the partition does not know: dropped)
        if flags & COUNT_FINAL:
            self.recounting.discard(src)

    def stale_workers(self, mask):
        """Of the workers in mask, those that died (or were restarted) since we last heard
        their RESET: their registrations are stale, and no compat message is taken for them."""
        stale = 0
        stats = self.w.region.stats
        for w in workers_in(mask):
            block = stats(w)
            if not block.get("pid") or block.get("restarts") != self.generation[w]:
                stale |= 1 << w
        return stale

    # -- holder side -----------------------------------------------------------------

    def hold(self, fd, idents, proto, timeout, compat=False, state=PENDING):
        """fd waits for the messages of ``idents``, answered as protocol ``proto``; it is
        PENDING (its home's answer is awaited) unless ``state`` says HELD.

        ``idents`` is one id (bytes), or a tuple of several for a multiplexed
        subscription: the common case keeps no tuple per held connection.
        """
        w = self.w
        w.new_serial(fd)
        w.proto[fd] = proto
        w.set_state(fd, state)
        self.held_id[fd] = idents
        self.compat[fd] = compat
        fd = w.fd_int[fd]
        held, changed = self.held, self.changed
        for ident in (idents,) if type(idents) is bytes else idents:
            entry = held.get(ident)
            if entry is None:
                held[ident] = fd
                if ident not in changed:          # its count as of the last report
                    changed[ident] = 0
            elif type(entry) is set:
                if ident not in changed:
                    changed[ident] = len(entry)
                entry.add(fd)
            else:
                held[ident] = {entry, fd}
                if ident not in changed:
                    changed[ident] = 1
        if compat:
            self.compat_held[idents] = self.compat_held.get(idents, 0) + 1
        w.counters[SUBSCRIBERS] += 1
        w.set_deadline(fd, timeout)

    def unhold(self, fd):
        """Take fd out of ``held``; it reads requests again (or is about to be closed)."""
        w = self.w
        idents = self.held_id[fd]
        if not idents:
            return
        compat = self.compat[fd]
        changed = self.changed
        for ident in (idents,) if type(idents) is bytes else idents:
            entry = self.held.get(ident)
            if entry == fd:
                del self.held[ident]
                if ident not in changed:          # its count as of the last report
                    changed[ident] = 1
            elif type(entry) is set and fd in entry:
                if ident not in changed:
                    changed[ident] = len(entry)
                entry.discard(fd)
                if entry:
                    continue
                del self.held[ident]
            else:
                continue
            self.lingering.add(ident)             # its last holder left
            if not compat:
                self.sub_lingering.add(ident)
        if compat:
            left = self.compat_held[idents] - 1
            if left:
                self.compat_held[idents] = left
            else:                                 # no compat poll here now: stop taking
                del self.compat_held[idents]      # messages off the compat cursor for us
                w.send_home(idents, records.unsub(UNSUB_COMPAT, idents))
        if w.counters[SUBSCRIBERS]:                # (shared: never below 0, whatever happened)
            w.counters[SUBSCRIBERS] -= 1
        w.set_state(fd, READING)
        w.proto[fd] = self.client_proto
        self.held_id[fd] = b""
        if self.partial:
            for key in [k for k in self.partial if k[0] == fd]:
                del self.partial[key]

    # -- holder side: subscriber counts ------------------------------------------------------

    def report_counts(self):
        """At the tick: tell each home how the number of connections held here changed for
        its ids since the last report (one COUNT record per home; ids whose number is what
        the home knows are left out).  A fall is reported a tick later, if it lasts: a
        long-poll answered and back within that time leaves its id's count alone."""
        changed, falling = self.changed, self.falling
        self.changed, self.falling = {}, {}
        if falling:
            changed.update(falling)               # what the home knows: before the fall
        held = self.held
        workers = self.w.region.workers
        out = {}
        for ident, known in changed.items():
            entry = held.get(ident)
            now = 0 if entry is None else 1 if type(entry) is int else len(entry)
            if now == known:
                continue
            if now < known and ident not in falling:
                self.falling[ident] = known
                continue
            home = shmqueue.id_key(ident) % workers
            entries = out.get(home)
            if entries is None:
                entries = out[home] = []
            entries.append(records.count_entry(ident, now - known))
        for home, entries in out.items():
            self._send_counts(home, entries)

    def on_recount(self, src, record):
        """Home src zeroed its counts: all we hold of its ids, from scratch (in parts)."""
        generation = records.read_recount(record)
        workers = self.w.region.workers
        key = shmqueue.id_key
        entries = [records.count_entry(ident, 1 if type(entry) is int else len(entry))
                   for ident, entry in self.held.items() if key(ident) % workers == src]
        self._send_counts(src, entries, COUNT_FULL | COUNT_FINAL, generation)
        for pending in (self.changed, self.falling):   # the home knows them as they are now
            for ident in [ident for ident in pending if key(ident) % workers == src]:
                del pending[ident]

    def _send_counts(self, home, entries, flags=0, generation=0):
        """COUNT records of ``entries`` to home, split so that none outgrows a ring; only
        the last carries COUNT_FINAL."""
        w = self.w
        limit = w.outbox[home].size // 4
        part, size = [], COUNT_HEADER
        for entry in entries:
            if part and size + len(entry) > limit:
                w.send(home, records.count_header(flags & ~COUNT_FINAL, generation)
                       + b"".join(part))
                part, size = [], COUNT_HEADER
            part.append(entry)
            size += len(entry)
        w.send(home, records.count_header(flags, generation) + b"".join(part))

    def registered(self, ident):
        """Is this worker registered at ident's home for /sub deliveries (or about to be)?
        True while a /sub poll holds ident here, or one just left (UNSUB waits for the tick)."""
        if ident in self.sub_lingering:
            return True
        entry = self.held.get(ident)
        if entry is None:
            return False
        if type(entry) is int:
            return not self.compat[entry]
        return len(entry) > self.compat_held.get(ident, 0)   # (compat polls hold one id each)

    @staticmethod
    def ids_of(idents):
        """A held_id entry as a tuple of ids."""
        return (idents,) if type(idents) is bytes else idents

    def holders(self, ident):
        entry = self.held.get(ident)
        if entry is None:
            return ()
        return (entry,) if type(entry) is int else list(entry)

    def is_waiting(self, fd, serial, *states):
        """Is the reply for (fd, serial) still wanted: the same request, in one of ``states``?"""
        w = self.w
        return fd < len(w.state) and w.serial[fd] == serial and w.state[fd] in states

    def on_msgs(self, src, record):
        """A SUB's answer: the backlog after its since, in parts if long, or a refusal."""
        fd, serial, last, epoch, flags, ident, messages = records.read_msgs(record)
        if not self.is_waiting(fd, serial, PENDING, HELD):
            return
        if (fd, ident) in self.partial:           # parts of one id's answer come in order
            messages = self.partial.pop((fd, ident)) + messages
        if not flags & MSGS_FINAL:
            self.partial[fd, ident] = messages
            return
        self.backlog(fd, ident, last, epoch, flags, messages)
        if flags & MSGS_REFUSED:                  # (after the refusal let the holder go)
            self.sub_lingering.discard(ident)     # never registered: next time, ask again

    def on_deliver(self, src, record):
        w = self.w
        seq, epoch, flags, ident, data = records.read_deliver(record)
        entry = self.held.get(ident)
        if entry is None:                              # a stale registration: heal it,
            w.send(src, records.unsub(UNSUB_ALL, ident))
            self.sub_lingering.discard(ident)          # and no longer count as registered
            if flags & DELIVER_COMPAT:                 # the compat cursor moved for nobody
                w.send(src, records.cgive(seq, ident))
            return
        state, proto, deliver_to = w.state, w.proto, self.deliver_to
        cache = {}                                     # what holders of one format can share
        compat_answered = False
        if type(entry) is set and not self.compat_held.get(ident):
            # A fan-out, no compat poll among them: the subscription core takes them at once
            # (pending ones: their own answer brings it).
            self.deliver_many([fd for fd in entry if state[fd] == HELD], ident, seq, epoch,
                              flags, data, cache)
        else:
            for fd in (entry,) if type(entry) is int else list(entry):
                if state[fd] == HELD:                  # pending: its own answer brings it
                    compat_answered |= deliver_to[proto[fd]](fd, ident, seq, epoch, flags,
                                                             data, cache)
        if flags & DELIVER_COMPAT and not compat_answered:
            w.send(src, records.cgive(seq, ident))


def workers_in(mask):
    """The worker indexes whose bits are set in mask, lowest first."""
    w = 0
    while mask:
        if mask & 1:
            yield w
        mask >>= 1
        w += 1

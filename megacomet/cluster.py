"""Cluster mode (``--redis``): several nodes act as one service through Redis.

Redis holds what makes an id's history global: its epoch, its last seq and its buffered
messages (a stream, ids ``<seq>-0``), all under keys that share the hash tag ``{id}`` and so
one cluster slot.  One server-side script per publish (``PUBLISH_SCRIPT``) creates the epoch
if missing, numbers the message, appends it, renews the TTL and publishes ``epoch:seq:data``
on the id's channel; the publisher is answered once Redis answered.

On each node the id's home worker subscribes to the id's channel while the node holds a
subscriber of it, and its partition becomes a cache of the id keyed by Redis's seqs
(``Partition.store``): the home fans out what arrives exactly as it fans out a local
publish.  A channel is joined first, then the stream read after what the cache holds
(``SYNC_SCRIPT``), then both merged by seq: no gap, no repeat.  A message whose seq skips
ahead (a pub/sub connection was lost, or Redis dropped us) makes the home read the stream
again before it goes on.  A subscription whose cursor is older than the cache reaches is
answered from the stream.

This module decides what Redis replies mean for subscriptions and publishes; it never
touches a client socket (the transports do) and never parses the Redis protocol (hiredis
does, in ``redislink``).
"""

import collections
import hashlib
import random

from . import records
from . import redislink
from . import shmqueue
from .records import CPOLL, RESET, SUB, SUB_QUIET
from .redislink import UNAVAILABLE, key_slot
from .shmqueue import PUBLISHED, RECEIVED, REFUSED

SUBSCRIBING, FETCHING, LIVE = 1, 2, 3
LINGER = 5.0                 # seconds a channel stays joined after the node's last subscriber
RESUBSCRIBE_RATE = 40000     # channels joined again per second per worker, after a loss
RESUBSCRIBE_JITTER = 0.5     # seconds: nodes that lost Redis together do not all come back at once
BUFFERED_MAX = 1024          # messages kept per id while its stream is read (then: read again)
WAITING_MAX = 4096           # requests per id waiting for its channel (older ones time out)

# KEYS: the id's meta hash, its stream, its idempotency key.  ARGV: data, max queued, TTL
# (ms), channel, 1 for SPUBLISH (cluster) or 0 for PUBLISH, idempotency key ('' none).
# Answers {epoch, seq, 1 if the idempotency key was seen (nothing stored again)}.
PUBLISH_SCRIPT = b"""
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[6] ~= '' then
  local done = redis.call('GET', KEYS[3])
  if done then
    local e, s = string.match(done, '^(%d+):(%d+)$')
    return {tonumber(e), tonumber(s), 1}
  end
end
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = string.format('%d', now)
  redis.call('HSET', KEYS[1], 'e', e)
end
local s = redis.call('HINCRBY', KEYS[1], 's', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], s .. '-0', 'd', ARGV[1], 't', now)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if ARGV[6] ~= '' then
  redis.call('SET', KEYS[3], e .. ':' .. s, 'PX', ARGV[3])
end
redis.call(ARGV[5] == '1' and 'SPUBLISH' or 'PUBLISH', ARGV[4], e .. ':' .. s .. ':' .. ARGV[1])
return {tonumber(e), s, 0}
"""

# KEYS: meta hash, stream.  ARGV: since, the epoch it counts in, TTL (ms).  Answers {epoch,
# last seq, {seq, data, seq, data, ...}} with what the stream holds after since, younger than
# the TTL; since counts as 0 in another epoch or beyond the last seq.  {0, 0, {}}: no such id.
SYNC_SCRIPT = b"""
local m = redis.call('HMGET', KEYS[1], 'e', 's')
if not m[1] then
  return {0, 0, {}}
end
local last = tonumber(m[2])
local since = tonumber(ARGV[1])
if m[1] ~= ARGV[2] or since > last then
  since = 0
end
local t = redis.call('TIME')
local oldest = t[1] * 1000 + math.floor(t[2] / 1000) - tonumber(ARGV[3])
local found = {}
for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '(' .. since .. '-0', '+')) do
  local fields = entry[2]
  if tonumber(fields[4]) >= oldest then
    found[#found + 1] = tonumber(string.match(entry[1], '^(%d+)'))
    found[#found + 1] = fields[2]
  end
end
return {tonumber(m[1]), last, found}
"""

# KEYS: meta hash.  ARGV: an epoch whose seqs a node saw numbered twice (a failover lost
# writes, and the new master numbered on from the last seq it had).  If it is still the id's
# epoch, the id gets a new one, so that clients start over instead of skipping the new
# messages (their cursors are past the reused seqs).  Answers the id's epoch (nil: no id).
RENEW_SCRIPT = b"""
local e = redis.call('HGET', KEYS[1], 'e')
if e and e == ARGV[1] then
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  if now <= tonumber(e) then
    now = tonumber(e) + 1
  end
  e = string.format('%d', now)
  redis.call('HSET', KEYS[1], 'e', e)
end
return e and tonumber(e)
"""

SCRIPTS = {name: (source, hashlib.sha1(source).hexdigest())
           for name, source in (("publish", PUBLISH_SCRIPT), ("sync", SYNC_SCRIPT),
                                ("renew", RENEW_SCRIPT))}


def meta_key(ident):
    return b"mc:{" + ident + b"}"


def stream_key(ident):
    return b"mc:{" + ident + b"}:s"


def channel_of(ident):
    return b"mc:{" + ident + b"}"


def ident_of(channel):
    return channel[4:-1]


class Sync:
    """The home's knowledge of one id's channel on this node."""

    __slots__ = ("state", "buffered", "waiting", "idle_since", "floor")

    def __init__(self):
        self.state = SUBSCRIBING
        # () until something is kept: a list or two per id held would only cost the collector.
        self.buffered = ()       # (epoch, seq, data) that came while the stream was read
        self.waiting = ()        # (handler, src, record) that wait for the channel
        self.idle_since = 0.0    # when the node's last subscriber of it left (0: it has some)
        self.floor = 0           # the oldest seq the stream held when last read


class ClusterNode:
    """One per worker in cluster mode: its Redis links, its publishes, its home's channels."""

    def __init__(self, w, router, subs, app):
        self.w = w
        self.router = router
        self.subs = subs
        self.app = app
        self.redis = None
        self.ids = {}                        # ident -> Sync: channels this home joined
        self.again = collections.deque()     # idents whose channel must be joined again
        self.again_at = 0.0
        self.again_budget = 0.0
        self.retry = []                      # idents whose stream read failed: read again
        self.idle_check_at = 0.0
        cfg = w.cfg
        self.ttl_ms = b"%d" % int(cfg.queue_ttl * 1000)
        self.max_queued = b"%d" % w.region.max_queued
        self.wait_replicas = cfg.redis_wait_replicas

    def handlers(self):
        return {SUB: self.on_sub, CPOLL: self.on_cpoll, RESET: self.on_reset}

    # -- the loop's hooks --------------------------------------------------------------------

    def start(self):
        w = self.w
        w.part.local_epochs = False
        w.counters[REDIS_DOWN] = 1                # until its links answer
        self.redis = redislink.Redis(w.cfg.redis, w, self.on_push, self.channels_lost, w.log,
                                     self.count, w.cfg.redis_timeout, w.now,
                                     self.health_changed,
                                     [("SCRIPT", "LOAD", source) for source, _ in SCRIPTS.values()])

    def health_changed(self):
        if self.redis is not None:                # (not while Redis() is being made)
            self.w.counters[REDIS_DOWN] = 0 if self.redis.healthy() else 1

    def count(self, name, n):
        counters = self.w.counters
        counters[COUNTER_OF[name]] += n

    def before_sleep(self):
        if self.again and self.w.now >= self.again_at:
            self.join_again()
        if self.redis.flush():
            self.w.busy = True                    # failures to tell: the next turn, at once

    def tick(self):
        w = self.w
        redis = self.redis
        redis.now = w.now
        redis.tick(w.now)
        self.health_changed()
        if self.retry:
            retry, self.retry = self.retry, []
            for ident in retry:
                sync = self.ids.get(ident)
                if sync is not None and sync.state == FETCHING:
                    self.fetch(ident, sync)
        if w.now >= self.idle_check_at:           # (not every tick: it reads every id)
            self.idle_check_at = w.now + LINGER / 2
            self.leave_idle()

    def leave_idle(self):
        """Leave the channels of ids this node no longer holds a subscriber of, LINGER to
        1.5 LINGER later (a long-poll that comes back within it finds the channel joined)."""
        w = self.w
        part = w.part
        now = w.now
        gone = []
        for ident, sync in self.ids.items():
            i = part.find(shmqueue.id_key(ident))
            if sync.waiting or (i >= 0 and (part.masks[i] or part.cmasks[i])):
                sync.idle_since = 0.0
            elif not sync.idle_since:
                sync.idle_since = now
            elif now - sync.idle_since >= LINGER:
                gone.append(ident)
        for ident in gone:
            del self.ids[ident]
            self.redis.unsubscribe(key_slot(ident), channel_of(ident))

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, ident, data, fd=0, serial=0, line=0, idempotency=b""):
        """Publish through Redis; with a serial, the app port hears of it (``confirm``)."""
        w = self.w
        w.counters[RECEIVED] += 1
        slot = key_slot(ident)
        idem_key = meta_key(ident) + b":i:" + idempotency if idempotency else meta_key(ident)

        def stored(reply):
            if isinstance(reply, Exception):
                self.failed(ident, fd, serial, line, reply)
            elif self.wait_replicas:
                # On the link that ran the script (its slot's master), within half the time a
                # command may take: a WAIT that outlived the link's timeout would break it.
                self.redis.call(slot, lambda n: self.replicated(ident, fd, serial, line,
                                                                reply, n),
                                "WAIT", self.wait_replicas, int(w.cfg.redis_timeout * 500))
            else:
                self.confirmed(ident, fd, serial, line, reply)

        cluster = self.redis.cluster
        sharded = redislink.SHARDED if cluster is None else b"1" if cluster else b"0"
        self.script(slot, "publish", (meta_key(ident), stream_key(ident), idem_key),
                    (data, self.max_queued, self.ttl_ms, channel_of(ident), sharded,
                     idempotency), stored)

    def replicated(self, ident, fd, serial, line, reply, replicas):
        if isinstance(replicas, Exception) or replicas < self.wait_replicas:
            self.failed(ident, fd, serial, line,
                        replicas if isinstance(replicas, Exception)
                        else Exception("stored, but seen by %d of %d replicas"
                                       % (replicas, self.wait_replicas)))
        else:
            self.confirmed(ident, fd, serial, line, reply)

    def confirmed(self, ident, fd, serial, line, reply):
        w = self.w
        w.counters[PUBLISHED] += 1
        if serial:
            key = shmqueue.id_key(ident)
            subscribers = w.homes[key % w.region.workers].subscribers(key) if not line else 0
            self.app.confirm(fd, serial, 1, reply[1], (), subscribers)

    def failed(self, ident, fd, serial, line, reply):
        w = self.w
        w.counters[REFUSED] += 1
        self.count("unavailable", 1)
        if reply is not UNAVAILABLE:
            w.log("publish: Redis refused the message for %s: %s" % (ident.decode(), reply))
        if serial:
            self.app.confirm(fd, serial, 0, 0, (), 0, unavailable=(line,))
        elif fd:
            self.app.binary_unconfirmed(fd)

    def script(self, slot, name, keys, args, callback):
        source, sha = SCRIPTS[name]

        def answered(reply):
            if type(reply) is redislink.hiredis.ReplyError and str(reply).startswith("NOSCRIPT"):
                # Redis restarted or its scripts were flushed: send the source (Redis keeps it).
                self.redis.call(slot, callback, "EVAL", source, len(keys), *keys, *args)
            else:
                callback(reply)

        self.redis.call(slot, answered, "EVALSHA", sha, len(keys), *keys, *args)

    # -- the home side: an id's channel ------------------------------------------------------

    def on_sub(self, src, record):
        fd, serial, since, epoch, flags, ident = records.read_sub(record)
        sync = self.ids.get(ident)
        if sync is None or sync.state != LIVE:
            self.wait(ident, sync, (self.on_sub, src, record))
            return
        part = self.w.part
        i = part.find(shmqueue.id_key(ident))
        if i < 0:
            self.wait(ident, sync, (self.on_sub, src, record))    # forgotten: read it again
            return
        first, last, known = part.firsts[i], part.lasts[i], part.epochs[i]
        if epoch and epoch != known:
            behind = epoch > known                # a life the cache has not seen begin yet
        else:
            behind = since > last                 # seqs the cache has not heard of yet
        older = since + 1 < first and first > sync.floor and not (epoch and epoch != known)
        if not (behind or older):
            self.router.on_sub(src, record)       # the cache holds all the stream would give
            return
        self.script(key_slot(ident), "sync", (meta_key(ident), stream_key(ident)),
                    (since, epoch, self.ttl_ms),
                    lambda reply: self.from_stream(src, record, reply))

    def from_stream(self, src, record, reply):
        """A cursor the cache cannot answer alone: older than what it holds (the stream has
        the messages before), or ahead of it (Redis numbered messages whose push has not
        reached this home yet: a cursor another node confirmed is not beyond the last seq)."""
        fd, serial, since, epoch, flags, ident = records.read_sub(record)
        part = self.w.part
        key = shmqueue.id_key(ident)
        i = part.find(key)
        sync = self.ids.get(ident)
        if (isinstance(reply, Exception) or i < 0 or sync is None or sync.state != LIVE
                or reply[0] != part.epochs[i]):
            self.wait(ident, sync, (self.on_sub, src, record))   # read it all again first
            return
        redis_epoch, redis_last, stream = reply
        if epoch == redis_epoch and since > redis_last:
            # The client saw seqs of this life that Redis no longer has: a failover lost
            # them.  A new epoch first, then its answer (it starts over).
            hold(sync, (self.on_sub, src, record))
            self.renew(ident, sync, epoch)
            return
        if since > redis_last or (epoch and epoch != redis_epoch):
            self.router.on_sub(src, record)       # beyond Redis's too: the cursor counts as 0
            return
        oldest = stream[0] if stream else redis_last + 1
        if oldest > since + 1:                    # the stream no longer has since + 1 ...
            sync.floor = max(sync.floor, oldest)
        try:
            last, epoch, _reset, cached = part.subscribe(key, 1 << src, min(since, part.lasts[i]),
                                                         self.w.now_ms(), epoch)
        except shmqueue.TableFull:
            self.router.on_sub(src, record)       # (refuses it)
            return
        found = dict(zip(stream[::2], stream[1::2]))
        for seq, data in cached:
            if seq > since:
                found.setdefault(seq, data)
        messages = sorted(found.items())
        if flags & SUB_QUIET and not messages:
            return
        self.router.answer_sub(src, fd, serial, ident, max(last, redis_last), epoch, False,
                               messages)

    def on_cpoll(self, src, record):
        ident = records.read_cpoll(record)[3]
        sync = self.ids.get(ident)
        if sync is None or sync.state != LIVE:
            self.wait(ident, sync, (self.on_cpoll, src, record))
            return
        self.router.on_cpoll(src, record)

    def on_reset(self, src, record):
        """A worker started again.  If it is the home of ids held here, it joined none of
        their channels: ask it again for each, as after a gap."""
        self.router.on_reset(src, record)
        subs = self.subs
        workers = self.w.region.workers
        for ident, held in list(self.router.held.items()):
            if shmqueue.id_key(ident) % workers != src:
                continue
            for fd in (held if type(held) is set else (held,)):
                if self.w.state[fd] and not self.router.compat[fd]:
                    subs.ask_again(fd, ident)

    def wait(self, ident, sync, request):
        """``request`` (a SUB or CPOLL) is answered once the id's channel is joined and its
        stream read: now joined if it was not, read again if it was live (the cache lost it)."""
        if sync is None:
            sync = self.ids[ident] = Sync()
            self.join(ident, sync)
            try:
                self.w.part.keep(shmqueue.id_key(ident))   # presence counts come meanwhile
            except shmqueue.TableFull:
                pass                              # (the request is refused once read)
        elif sync.state == LIVE:
            sync.state = FETCHING
            self.fetch(ident, sync)
        hold(sync, request)

    def join(self, ident, sync):
        sync.state = SUBSCRIBING
        if not self.redis.subscribe(key_slot(ident), channel_of(ident)):
            self.again.append(ident)              # no link now: when one comes back

    def join_again(self):
        """Join again, at most RESUBSCRIBE_RATE channels a second, the channels a lost link
        (or a moved slot) took."""
        now = self.w.now
        self.again_budget = min(RESUBSCRIBE_RATE,
                                self.again_budget + (now - self.again_at) * RESUBSCRIBE_RATE)
        self.again_at = now
        redis = self.redis
        while self.again and self.again_budget >= 1:
            ident = self.again.popleft()
            sync = self.ids.get(ident)
            if sync is None or sync.state != SUBSCRIBING:
                continue
            if not redis.subscribe(key_slot(ident), channel_of(ident)):
                self.again.appendleft(ident)      # still no link: try at the next tick
                self.again_at = now + 0.1
                return
            self.again_budget -= 1
            self.count("resubscribes", 1)

    def channels_lost(self, channels):
        """A subscriber link dropped (or a slot moved): those ids are read again once their
        channels are joined again; until then what arrives for them waits."""
        for channel in channels:
            ident = ident_of(channel)
            sync = self.ids.get(ident)
            if sync is not None:
                sync.state = SUBSCRIBING
                sync.buffered = ()
                self.again.append(ident)
        self.again_at = max(self.again_at, self.w.now + random.uniform(0, RESUBSCRIBE_JITTER))

    def on_push(self, kind, channel, data):
        ident = ident_of(channel)
        sync = self.ids.get(ident)
        if sync is None:
            return                                # left meanwhile
        if kind in (b"smessage", b"message"):
            try:
                epoch, seq, message = data.split(b":", 2)
                epoch, seq = int(epoch), int(seq)
            except ValueError:
                self.w.log("redis: a message on %s is not epoch:seq:data; dropped"
                           % channel.decode(errors="replace"))
                return
            if sync.state == LIVE:
                self.take(ident, sync, epoch, seq, message)
            elif len(sync.buffered) < BUFFERED_MAX:
                keep(sync, (epoch, seq, message))
            return
        if sync.state == SUBSCRIBING:             # joined: now read what came before
            sync.state = FETCHING
            self.fetch(ident, sync)

    def take(self, ident, sync, epoch, seq, message):
        """One message from the channel: cached and fanned out, or a gap to fill first."""
        w = self.w
        try:
            stored = w.part.store(shmqueue.id_key(ident), epoch, seq, message, w.now_ms(),
                                  self.router.stale_workers)
        except shmqueue.TableFull:
            w.log("redis: id table full, message for %s not cached" % ident.decode())
            return
        if type(stored) is tuple:
            self.router.fan_out(ident, message, *stored)
        elif stored is shmqueue.GAP:
            sync.state = FETCHING
            keep(sync, (epoch, seq, message))
            self.fetch(ident, sync)
        elif stored is shmqueue.REPEAT:
            cached = w.part.message(shmqueue.id_key(ident), seq, w.now_ms())
            if cached is not None and cached != message:
                self.renew(ident, sync, epoch)    # the same seq twice: Redis lost writes

    def fetch(self, ident, sync):
        """Read the stream after what the cache holds, and its last message again: if Redis
        now has another message under that seq, a failover lost writes (see ``renew``)."""
        part = self.w.part
        i = part.find(shmqueue.id_key(ident))
        since, epoch = (part.lasts[i], part.epochs[i]) if i >= 0 else (0, 0)
        self.script(key_slot(ident), "sync", (meta_key(ident), stream_key(ident)),
                    (max(since - 1, 0), epoch, self.ttl_ms),
                    lambda reply: self.fetched(ident, reply))

    def fetched(self, ident, reply):
        sync = self.ids.get(ident)
        if sync is None or sync.state != FETCHING:
            return                                # left, or its link dropped meanwhile
        if isinstance(reply, Exception):
            if reply is not UNAVAILABLE:
                self.w.log("redis: reading %s failed: %s" % (ident.decode(), reply))
            self.retry.append(ident)              # at the next tick
            return
        w = self.w
        part = w.part
        key = shmqueue.id_key(ident)
        epoch, last, stream = reply
        now_ms = w.now_ms()
        i = part.find(key)
        if i >= 0 and epoch and part.epochs[i] == epoch and (
                part.lasts[i] > last or self.numbered_again(key, stream, part.lasts[i], now_ms)):
            self.renew(ident, sync, epoch)        # Redis lost writes this node had seen
            return
        refill = sync.floor > 0                   # read again: what the channel did not bring
        try:
            if stream:
                first = stream[0]
                if i < 0 or part.epochs[i] != epoch or first > part.lasts[i] + 1:
                    part.adopt(key, epoch, first - 1, now_ms)
                filled = False
                for n in range(0, len(stream), 2):
                    stored = part.store(key, epoch, stream[n], stream[n + 1], now_ms,
                                        self.router.stale_workers)
                    if type(stored) is tuple:
                        self.router.fan_out(ident, stream[n + 1], *stored)
                        filled = True
                if filled and refill:
                    self.count("gaps_filled", 1)
            part.adopt(key, epoch, last, now_ms)
        except shmqueue.TableFull:
            # No room to cache it: the requests waiting go straight to the home, which
            # refuses them (through this module they would only wait for a room again).
            sync.state = LIVE
            waiting, sync.waiting = sync.waiting, ()
            direct = {self.on_sub: self.router.on_sub, self.on_cpoll: self.router.on_cpoll}
            for handler, src, record in waiting:
                direct.get(handler, handler)(src, record)
            return
        sync.floor = stream[0] if stream else last + 1
        sync.state = LIVE
        buffered, sync.buffered = sync.buffered, ()
        for epoch, seq, message in buffered:
            if sync.state != LIVE:                # another gap: read again, keep the rest
                keep(sync, (epoch, seq, message))
                continue
            self.take(ident, sync, epoch, seq, message)
        if sync.state == LIVE:
            waiting, sync.waiting = sync.waiting, ()
            for handler, src, record in waiting:
                handler(src, record)

    def numbered_again(self, key, stream, last, now_ms):
        """Does the stream hold, under a seq the cache has (its last, read again), another
        message than the cache?"""
        part = self.w.part
        for n in range(0, len(stream), 2):
            if stream[n] > last:
                break
            cached = part.message(key, stream[n], now_ms)
            if cached is not None and cached != stream[n + 1]:
                return True
        return False

    def renew(self, ident, sync, epoch):
        """Seqs of the id's life ``epoch`` were given twice: give the id a new epoch in Redis
        (once, whichever node asks first), then read it again under that epoch."""
        sync.state = FETCHING
        self.w.log("redis: %s lost messages (a failover?): its seqs go back in epoch %d; it "
                   "gets a new epoch and its clients start over" % (ident.decode(), epoch))
        self.script(key_slot(ident), "renew", (meta_key(ident),), (epoch,),
                    lambda reply: self.renewed(ident, reply))

    def renewed(self, ident, reply):
        sync = self.ids.get(ident)
        if sync is None or sync.state != FETCHING:
            return
        if isinstance(reply, Exception):
            self.retry.append(ident)              # (read again at the next tick)
            return
        self.fetch(ident, sync)


def hold(sync, request):
    """Keep a request until the id's channel is joined and its stream read."""
    if not sync.waiting:
        sync.waiting = []
    elif len(sync.waiting) >= WAITING_MAX:
        del sync.waiting[0]                       # its poll times out where it is held
    sync.waiting.append(request)


def keep(sync, message):
    """Buffer a message that came while the id's stream is read."""
    if not sync.buffered:
        sync.buffered = []
    sync.buffered.append(message)


COUNTER_OF = {"round_trips": shmqueue.REDIS_ROUND_TRIPS, "commands": shmqueue.REDIS_COMMANDS,
              "reconnects": shmqueue.REDIS_RECONNECTS, "resubscribes": shmqueue.REDIS_RESUBSCRIBES,
              "gaps_filled": shmqueue.REDIS_GAPS_FILLED, "unavailable": shmqueue.REDIS_UNAVAILABLE}
REDIS_DOWN = shmqueue.REDIS_DOWN

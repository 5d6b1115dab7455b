"""The subscription core: what a subscriber follows, and what it is owed.

A subscription is a connection held for one id, or for up to 16 (``/sub/a,b,c``).
For each id it has a cursor: the newest seq the client has, counted in the
id's epoch (``shmqueue``: an id forgotten and created again starts a new
epoch at seq 1).  This module alone decides what a subscription is owed:

* on open it asks each id's home for what came after the cursor (a SUB);
  the home applies the cursor rule (an epoch that is not the id's, or a
  since beyond its last seq, counts as 0: ``Partition.subscribe``) and
  answers with the backlog, the id's last seq and its epoch (a MSGS);
* a subscription of several ids hands nothing over until every one of its
  homes has answered once, so a poll answers with all that is buffered;
* afterwards each DELIVER is the next message (handed over), one already
  had (dropped), or past a gap, or of another epoch: then the id's home is
  asked again and its answer fills the gap;
* the cursor it reports is never below the since it was asked with, unless
  the home said the cursor was reset.

The transports (``longpoll``: JSON, JSONP; ``streams``: EventSource,
WebSocket) only encode what this module hands them, through five functions
of theirs: ``announce(fd)`` (the epochs are known, or changed), ``news(fd,
ident, [(seq, data)])`` and ``news_many(fd, [(ident, seq, data)])`` (the
messages owed, cursors already moved), ``deliver(fd, ident, seq, epoch,
data, cache)`` (the next message of one id, the fan-out path; ``cache`` is
shared by every holder of the message) and ``refused(fd)`` (the id table is
full).  A poll's transport answers and ends the subscription (``release``);
a stream's stays.

Per-connection state is flat arrays indexed by fd for one id (the common
case keeps no object per connection) and a small object for several.
``release`` clears every field of it, whichever way the connection ends.
It never touches a socket and never parses a request.
"""

import array

from . import records
from . import shmqueue
from .records import MSGS_REFUSED, MSGS_RESET, SUB_QUIET
from .worker import HELD, PENDING


class Cursors:
    """A subscription of several ids: per id its cursor (seq) and the epoch it counts in
    (0: not known yet), the ids whose home has not answered (``waiting``), and the news
    collected until every home has answered once (``started``)."""

    __slots__ = ("seqs", "epochs", "waiting", "news", "started")

    def __init__(self, seqs, epochs):
        self.seqs = seqs
        self.epochs = epochs
        self.waiting = set(seqs)
        self.news = []
        self.started = False


class Subscriptions:
    """One per worker: every subscription held on it, long-polls and streams alike."""

    def __init__(self, w, router):
        self.w = w
        self.router = router
        limit = len(w.state)
        # One id: the client's cursor, and the epoch it counts in (0: none given, none known).
        self.since = array.array("I", bytes(4 * limit))
        self.epoch = array.array("Q", bytes(8 * limit))
        self.fresh = bytearray(limit)       # 1 until its home's first answer (one id)
        self.many = {}           # fd -> Cursors: several ids
        self.note = {}           # fd -> what its transport keeps of the request (a JSONP callback)
        self.expires = {}        # fd -> unix time its signature expires (with --secret)
        self.transports = {}     # protocol byte -> its transport (set by server.assemble)
        self.workers = w.region.workers

    # -- opening and ending -------------------------------------------------------------

    def open(self, fd, ident, since, epoch, proto, timeout):
        """Hold fd for ``ident`` (one id, bytes; several, a tuple) from its cursors: ``since``
        and ``epoch`` are numbers for one id, {id: number} for several (epoch 0: none).

        One id: when the home's partition, read directly, shows the client up to date, it
        is held at once (and its epoch announced, if the id has one yet) and the home is
        asked quietly (it answers only with news, or a reset), or not at all if this
        worker is registered already.  The partition is only a hint: the home's answer,
        or a DELIVER after a gap, corrects a misread."""
        router = self.router
        if type(ident) is tuple:
            router.hold(fd, ident, proto, timeout)
            # Held at once: a DELIVER of an id whose home has answered must reach it (those of
            # ids still waiting are dropped here, their home's answer brings them).
            self.w.set_state(fd, HELD)
            self.many[fd] = Cursors(since, epoch)
            serial = self.w.serial[fd]
            for one in ident:
                self.w.send_home(one, records.sub(fd, serial, since[one], epoch[one], 0, one))
            return
        w = self.w
        key = shmqueue.id_key(ident)
        home = key % self.workers
        last, known = w.homes[home].peek(key) or (0, 0)
        registered = router.registered(ident)
        if since == last and epoch in (0, known):    # up to date, as far as the partition shows
            router.hold(fd, ident, proto, timeout, state=HELD)
            self.since[fd] = since
            self.epoch[fd] = known
            if known:                                # (a new id's comes with its first message)
                self.fresh[fd] = 0
                self.transports[proto].announce(fd)
            else:
                self.fresh[fd] = 1
            if registered:
                return
            flags = SUB_QUIET
        else:
            router.hold(fd, ident, proto, timeout)
            self.since[fd] = since
            self.epoch[fd] = epoch
            self.fresh[fd] = 1
            flags = 0
        w.send(home, records.sub(fd, w.serial[fd], since, epoch, flags, ident))

    def release(self, fd):
        """The subscription on fd ends (answered, refused, closed): nothing of it is left for
        the next connection on the same fd."""
        self.router.unhold(fd)
        self.since[fd] = self.epoch[fd] = self.fresh[fd] = 0
        if self.many:
            self.many.pop(fd, None)
        if self.note:
            self.note.pop(fd, None)
        if self.expires:
            self.expires.pop(fd, None)

    def ask_again(self, fd, ident):
        """A gap (or another epoch) in what came for ident: ask its home for everything after
        the cursor.  One id: the subscription waits for that answer alone (a new serial: a
        late answer to the old question misses).  Several: only that id waits."""
        w = self.w
        many = self.many.get(fd)
        if many is None:
            w.new_serial(fd)
            w.set_state(fd, PENDING)
            since, epoch = self.since[fd], self.epoch[fd]
        else:
            many.waiting.add(ident)
            since, epoch = many.seqs[ident], many.epochs[ident]
        w.send_home(ident, records.sub(fd, w.serial[fd], since, epoch, 0, ident))

    # -- what the homes send --------------------------------------------------------------

    def backlog(self, fd, ident, last, epoch, flags, messages):
        """A home's answer to this subscription's SUB (all its parts): what it buffered after
        the cursor, the id's last seq and epoch; or a refusal."""
        transport = self.transports[self.w.proto[fd]]
        if flags & MSGS_REFUSED:
            transport.refused(fd)
            return
        base = 0 if flags & MSGS_RESET else None
        many = self.many.get(fd)
        if many is not None:
            self._backlog_many(fd, many, transport, ident, last, epoch, base, messages)
            return
        if base is None:
            base = self.since[fd]
        announce = self.fresh[fd] or epoch != self.epoch[fd]
        self.fresh[fd] = 0
        # The cursor is the id's last seq: >= since unless reset (see Partition), and >= any
        # DELIVER that came first (sent before the home read this SUB: in the backlog too).
        self.since[fd] = last if flags & MSGS_RESET else max(last, self.since[fd])
        self.epoch[fd] = epoch
        if announce:
            transport.announce(fd)
        news = [(seq, data) for seq, data in messages if seq > base]
        if news and self.w.state[fd]:
            transport.news(fd, ident, news)
        if self.router.held_id[fd] and self.w.state[fd] == PENDING:
            self.w.set_state(fd, HELD)

    def _backlog_many(self, fd, many, transport, ident, last, epoch, base, messages):
        if base is None:
            base = many.seqs[ident]
        changed = many.epochs[ident] != epoch
        many.seqs[ident] = last
        many.epochs[ident] = epoch
        many.waiting.discard(ident)
        many.news += [(ident, seq, data) for seq, data in messages if seq > base]
        if not many.started:
            if many.waiting:
                return                            # every home answers once before anything
            many.started = changed = True
        if changed:
            transport.announce(fd)
        if many.news and self.w.state[fd]:
            news, many.news = many.news, []
            transport.news_many(fd, news)

    def deliver(self, fd, ident, seq, epoch, flags, data, cache):
        """A new message of ident for fd, held (routing hands each DELIVER to every holder)."""
        many = self.many.get(fd) if self.many else None
        if many is None:
            since = self.since[fd]
            known = self.epoch[fd]
            if seq == since + 1 and (epoch == known or not (known or since)):
                self.since[fd] = seq              # (no epoch known, cursor 0: seq 1 of any)
                self.epoch[fd] = epoch
                transport = self.transports[self.w.proto[fd]]
                if self.fresh[fd]:                # its epoch is known from now on
                    self.fresh[fd] = 0
                    transport.announce(fd)
                transport.deliver(fd, ident, seq, epoch, data, cache)
            elif seq > since or epoch != known:
                self.ask_again(fd, ident)
            return False
        if ident in many.waiting:
            return False                          # its home's answer brings it
        since = many.seqs[ident]
        if seq == since + 1 and epoch == many.epochs[ident]:
            many.seqs[ident] = seq
            if many.started:
                self.transports[self.w.proto[fd]].news_many(fd, [(ident, seq, data)])
            else:                                 # other homes have not answered yet
                many.news.append((ident, seq, data))
        elif seq > since or epoch != many.epochs[ident]:
            self.ask_again(fd, ident)
        return False

    def deliver_many(self, fds, ident, seq, epoch, flags, data, cache):
        """deliver() to each of fds, held polls and streams of one id (a fan-out).  Those a
        cursor of ident alone has up to date, its epoch known, take it in a batch per
        transport; the rest (a gap, another epoch, a first message, several ids) one by one
        through deliver(), which decides the same for them."""
        since, known, fresh, proto = self.since, self.epoch, self.fresh, self.w.proto
        many = self.many
        previous = seq - 1
        batches = {}
        for fd in fds:
            if since[fd] != previous or known[fd] != epoch or fresh[fd] or (many and fd in many):
                self.deliver(fd, ident, seq, epoch, flags, data, cache)
                continue
            since[fd] = seq
            batch = batches.get(proto[fd])
            if batch is None:
                batches[proto[fd]] = [fd]
            else:
                batch.append(fd)
        transports = self.transports
        for p, batch in batches.items():
            transports[p].deliver_all(batch, ident, seq, epoch, data, cache)

    # -- what a transport reads ------------------------------------------------------------

    def take_news(self, fd):
        """What a subscription of several ids collected from the homes that answered while
        others have not: a poll answered early (a timeout, a stop) must hand it over, since
        its cursors already count it."""
        many = self.many.get(fd)
        if many is None:
            return []
        news, many.news = many.news, []
        return news

    def cursors(self, fd):
        """(last, epoch) to report now: numbers for one id, {id: number} for several."""
        many = self.many.get(fd)
        if many is None:
            return self.since[fd], self.epoch[fd]
        return many.seqs, many.epochs

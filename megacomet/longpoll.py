"""Long-poll answers: hold a subscriber's request until its id has news, then answer it.

Three formats, one protocol byte each: JSON (``/sub/<id>``), JSONP (the same
with ``callback``) and the original's compat poll (``/<id>.js``: the oldest
message compat readers have not had, exactly as published, then close).
JSON and JSONP answers carry the server's ``epoch``: a client that sends it
back with its cursor is told everything buffered after a full restart,
whose seqs began again (``front.since_of``).  A held poll costs its id in
``routing``'s table and one entry in the timeout wheel: no object of its
own.  It never parses a request (``front`` does) and never decides where a
message goes (``routing`` does).
"""

import array
import json

from . import protocols
from . import records
from . import wire
from .front import epoch_of
from .httpconn import CLIENT_INBUF_LIMIT, HEAD_ONLY, KEEP_ALIVE
from .records import DELIVER_COMPAT
from .shmqueue import DELIVERED
from .worker import HELD, PENDING

JSON_TYPE = b"application/json"
JS_TYPE = b"application/javascript; charset=utf-8"


class LongPoll:
    """One per worker: the POLL_JSON, POLL_JSONP and POLL_COMPAT protocols."""

    def __init__(self, w, http, router):
        self.w = w
        self.http = http
        self.router = router
        limit = len(w.state)
        self.since = array.array("I", bytes(4 * limit))   # the newest seq the client has
        self.last = array.array("I", bytes(4 * limit))    # the id's last seq, as last heard
        self.callback = {}       # fd -> JSONP function name
        self.cursors = {}        # fd -> {id: newest seq the client has}: multiplexed polls only
        self.epoch = epoch_of(w.cfg)
        self.common = (b"Cache-Control: no-store\r\nAccess-Control-Allow-Origin: %s\r\n"
                       b"X-Content-Type-Options: nosniff\r\n" % w.cfg.cors_origin.encode())

    def handlers(self):
        return {records.CMSG: self.on_cmsg, records.CWAKE: self.on_cwake}

    # -- the protocol: what happens to a held connection ----------------------------

    def readable(self, fd):
        """Bytes from a held poll's client: requests pipelined behind it, kept for later."""
        buf = self.w.inbuf.get(fd)
        if buf is not None and len(buf) > CLIENT_INBUF_LIMIT:
            self.w.close(fd)

    def timeout(self, fd):
        self.answer_timeout(fd)

    def closed(self, fd):
        self.router.unhold(fd)
        self.callback.pop(fd, None)
        self.cursors.pop(fd, None)

    def stop(self, fd):
        if self.w.state[fd] in (PENDING, HELD):
            self.answer_timeout(fd)               # `stopping` makes it close afterwards

    # -- subscribing -------------------------------------------------------------------

    def subscribe(self, fd, ident, since, timeout, callback=None):
        """Hold fd for ident's messages newer than ``since`` (several ids: a tuple, and since
        is {id: seq}); answered at once if the home has any (``routing.subscribe``)."""
        proto = protocols.POLL_JSON if callback is None else protocols.POLL_JSONP
        if callback is not None:
            self.callback[fd] = callback
        if type(ident) is tuple:                   # several ids; since: {id: seq}
            registered = {i: self.router.registered(i) for i in ident}
            self.router.hold(fd, ident, proto, timeout)
            self.cursors[fd] = since
            self.router.subscribe_many(fd, since, registered)
            return
        registered = self.router.registered(ident)
        self.since[fd] = since
        self.router.hold(fd, ident, proto, timeout)
        # Up to date: held now, and last is since; else last is known once the home answers.
        self.last[fd] = since if self.router.subscribe(fd, ident, since, registered) else 0

    def resubscribe(self, fd):
        """Ask the home for everything after since[fd]; the poll waits for that answer."""
        w = self.w
        ident = self.router.held_id[fd]
        w.new_serial(fd)
        w.state[fd] = PENDING
        w.send_home(ident, records.sub(fd, w.serial[fd], self.since[fd], 0, ident))

    def compat_poll(self, fd, ident, peek):
        self.http.flags[fd] &= ~KEEP_ALIVE        # the original closes after each poll
        self.router.hold(fd, ident, protocols.POLL_COMPAT, self.w.cfg.poll_timeout, compat=True)
        self.take_compat(fd, peek)                # a HEAD looks: the cursor stays

    def take_compat(self, fd, peek=False):
        """Ask the home for the compat cursor's next message; the poll waits for the CMSG."""
        w = self.w
        ident = self.router.held_id[fd]
        w.new_serial(fd)
        w.state[fd] = PENDING
        w.send_home(ident, records.cpoll(fd, w.serial[fd], peek, ident))

    # -- the home's answers ------------------------------------------------------------

    def backlog(self, fd, ident, last, messages):
        """The home's answer to this poll's SUB: what it had after since (maybe nothing)."""
        cursors = self.cursors.get(fd)
        if cursors is not None:
            news = [(ident, seq, data) for seq, data in messages if seq > cursors[ident]]
            if news:
                self.answer_many(fd, news)
            else:
                cursors[ident] = last
            return
        self.last[fd] = last
        if messages:
            self.answer(fd, messages, last)
        else:
            self.since[fd] = last
            self.w.state[fd] = HELD

    def refused(self, fd):
        """The home's table had no room for the id."""
        self.router.unhold(fd)
        self.http.fail(fd, 503, "id table full", self.common)

    def on_cmsg(self, src, record):
        fd, serial, seq, taken, ident, data = records.read_cmsg(record)
        if not self.router.is_waiting(fd, serial, PENDING):
            if seq and taken:                     # taken for a poll that left: give it back
                self.w.send(src, records.cgive(seq, ident))
            return
        if seq:
            self.answer_compat(fd, data)
        elif self.http.flags[fd] & HEAD_ONLY:
            self.answer_timeout(fd)               # nothing to look at; a HEAD is not held
        else:
            self.w.state[fd] = HELD

    def on_cwake(self, src, record):
        for fd in self.router.holders(records.read_cwake(record)):
            if self.w.state[fd] == HELD and self.w.proto[fd] == protocols.POLL_COMPAT:
                self.take_compat(fd)

    # -- deliveries (routing calls these for each holder in HELD) -----------------------

    def deliver_many(self, fd, ident, seq, data):
        since = self.cursors[fd][ident]
        if seq > since + 1:
            self.router.resubscribe_one(fd, ident, since)   # a gap: the home's MSGS fills it
        elif seq > since:
            self.answer_many(fd, [(ident, seq, data)])

    def deliver_json(self, fd, ident, seq, flags, data, cache):
        if fd in self.cursors:
            self.deliver_many(fd, ident, seq, data)
            return False
        since = self.since[fd]
        if seq > since + 1:
            self.resubscribe(fd)                  # a gap: the home's MSGS fills it
        elif seq > since:
            http = self.http
            variant = http.response_flags(fd)
            response = cache.get(variant)         # one response per flags variant, for all
            if response is None:
                body = cache.get("body")
                if body is None:
                    body = cache["body"] = json_body_of(ident, [(seq, data)], seq,
                                                        epoch=self.epoch)
                response = cache[variant] = wire.response(200, body, JSON_TYPE, variant & KEEP_ALIVE,
                                                          self.common, variant & HEAD_ONLY)
            self.router.unhold(fd)
            http.send_response(fd, response, variant & KEEP_ALIVE)
            self.w.counters[DELIVERED] += 1
            http.resume(fd)
        return False

    def deliver_jsonp(self, fd, ident, seq, flags, data, cache):
        if fd in self.cursors:
            self.deliver_many(fd, ident, seq, data)
            return False
        since = self.since[fd]
        if seq > since + 1:
            self.resubscribe(fd)
        elif seq > since:
            self.answer(fd, [(seq, data)], seq)
        return False

    def deliver_compat(self, fd, ident, seq, flags, data, cache):
        if flags & DELIVER_COMPAT:
            self.answer_compat(fd, data)
            return True
        return False

    # -- answering ---------------------------------------------------------------------

    def answer(self, fd, messages, last):
        callback = self.callback.pop(fd, None)
        body = json_body_of(self.router.held_id[fd], messages, last, callback, self.epoch)
        self.router.unhold(fd)
        self.http.respond(fd, 200, body, JSON_TYPE if callback is None else JS_TYPE, self.common)
        self.w.counters[DELIVERED] += len(messages)
        self.http.resume(fd)

    def answer_many(self, fd, items):
        """A multiplexed poll's answer: each message names its id; last has every id's seq."""
        cursors = self.cursors.pop(fd)
        for ident, seq, _ in items:
            cursors[ident] = max(cursors[ident], seq)
        callback = self.callback.pop(fd, None)
        body = json_many_of(items, cursors, callback, self.epoch)
        self.router.unhold(fd)
        self.http.respond(fd, 200, body, JSON_TYPE if callback is None else JS_TYPE, self.common)
        self.w.counters[DELIVERED] += len(items)
        self.http.resume(fd)

    def answer_compat(self, fd, data):
        self.router.unhold(fd)
        self.http.respond(fd, 200, data, JS_TYPE, self.common)
        self.w.counters[DELIVERED] += 1

    def answer_timeout(self, fd):
        if self.w.proto[fd] == protocols.POLL_COMPAT:
            # An empty script, not a 204: a <script> tag fires onerror for a 204 sent with
            # nosniff (no Content-Type), and a page in the original style stops polling.
            self.router.unhold(fd)
            self.http.respond(fd, 200, b"", JS_TYPE, self.common)   # closes: nothing pipelined
        elif fd in self.cursors:
            self.answer_many(fd, [])
        else:
            self.answer(fd, [], self.last[fd])


def json_many_of(items, cursors, callback=None, epoch=None):
    """``{"messages": [{"id", "seq", "data"}], "last": {id: seq}, "epoch": E}``, maybe
    JSONP-wrapped."""
    doc = {"messages": [{"id": ident.decode(), "seq": seq, "data": data.decode("utf-8")}
                        for ident, seq, data in items],
           "last": {ident.decode(): seq for ident, seq in cursors.items()}}
    if epoch is not None:
        doc["epoch"] = epoch
    body = json.dumps(doc)
    if callback is not None:
        body = "/**/%s(%s);" % (callback, body)
    return body.encode()


def json_body_of(ident, messages, last, callback=None, epoch=None):
    """The /sub answer: ``{"id": ..., "messages": [{"seq", "data"}], "last": N, "epoch": E}``,
    maybe JSONP-wrapped."""
    items = ", ".join('{"seq": %d, "data": %s}' % (seq, json.dumps(data.decode("utf-8")))
                      for seq, data in messages)
    body = '{"id": "%s", "messages": [%s], "last": %d%s}' % (
        ident.decode(), items, last, "" if epoch is None else ', "epoch": %d' % epoch)
    if callback is not None:
        body = "/**/%s(%s);" % (callback, body)
    return body.encode()

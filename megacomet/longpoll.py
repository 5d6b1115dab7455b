"""Long-poll answers: encode what ``subscriptions`` hands a held poll, and answer it.

Three formats, one protocol byte each: JSON (``/sub/<id>``), JSONP (the same
with ``callback``) and the original's compat poll (``/<id>.js``: the oldest
message compat readers have not had, exactly as published, then close).
JSON and JSONP answers carry each id's ``last`` seq and ``epoch``, which
the client sends back as its cursor.  What a poll is owed, and when, is
``subscriptions``' to decide; the compat poll, which follows the home's
compat cursor instead of a cursor of its own, is handled here whole.  A
held poll costs its id in ``routing``'s table and one entry in the timeout
wheel: no object of its own.  It never parses a request (``front`` does)
and never decides where a message goes (``routing`` does).
"""

import json

from . import protocols
from . import records
from . import wire
from .httpconn import CLIENT_INBUF_LIMIT, HEAD_ONLY, KEEP_ALIVE
from .protocols import POLL_JSONP
from .records import DELIVER_COMPAT
from .shmqueue import DELIVERED
from .worker import HELD, PENDING

JSON_TYPE = b"application/json"
JS_TYPE = b"application/javascript; charset=utf-8"


class LongPoll:
    """One per worker: the POLL_JSON, POLL_JSONP and POLL_COMPAT protocols, and the
    transport (``subscriptions``) of the first two."""

    def __init__(self, w, http, router, subscriptions):
        self.w = w
        self.http = http
        self.router = router
        self.subs = subscriptions
        self.common = (b"Cache-Control: no-store\r\nAccess-Control-Allow-Origin: %s\r\n"
                       b"X-Content-Type-Options: nosniff\r\n" % w.cfg.cors_origin.encode("latin-1"))

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
        self.subs.release(fd)

    def stop(self, fd):
        if self.w.state[fd] in (PENDING, HELD):
            self.answer_timeout(fd)               # `stopping` makes it close afterwards

    # -- subscribing -------------------------------------------------------------------

    def subscribe(self, fd, ident, since, epoch, timeout, callback=None):
        """Hold fd for ident's messages after its cursor (``subscriptions.open``)."""
        proto = protocols.POLL_JSON if callback is None else protocols.POLL_JSONP
        self.subs.open(fd, ident, since, epoch, proto, timeout)
        if callback is not None:
            self.subs.note[fd] = callback

    def compat_poll(self, fd, ident, peek):
        self.http.flags[fd] &= ~KEEP_ALIVE        # the original closes after each poll
        self.router.hold(fd, ident, protocols.POLL_COMPAT, self.w.cfg.poll_timeout, compat=True)
        self.take_compat(fd, peek)                # a HEAD looks: the cursor stays

    def take_compat(self, fd, peek=False):
        """Ask the home for the compat cursor's next message; the poll waits for the CMSG."""
        w = self.w
        ident = self.router.held_id[fd]
        w.new_serial(fd)
        w.set_state(fd, PENDING)
        w.send_home(ident, records.cpoll(fd, w.serial[fd], peek, ident))

    # -- the transport: what ``subscriptions`` hands a poll ------------------------------

    def announce(self, fd):
        """Every answer names the epochs: nothing to send ahead of it."""

    def news(self, fd, ident, messages):
        self.answer(fd, messages)

    def news_many(self, fd, items):
        self.answer_many(fd, items)

    def deliver_all(self, fds, ident, seq, epoch, data, cache):
        for fd in fds:
            self.deliver(fd, ident, seq, epoch, data, cache)

    def deliver(self, fd, ident, seq, epoch, data, cache):
        """The next message of a poll of one id: JSON holders share one response per
        keep-alive/HEAD variant (a fan-out builds it once)."""
        http = self.http
        if self.w.proto[fd] == POLL_JSONP:
            self.answer(fd, [(seq, data)])
            return
        variant = http.response_flags(fd)
        response = cache.get(variant)
        if response is None:
            body = cache.get("body")
            if body is None:
                body = cache["body"] = json_body_of(ident, [(seq, data)], seq, epoch=epoch)
            response = cache[variant] = wire.response(200, body, JSON_TYPE, variant & KEEP_ALIVE,
                                                      self.common, variant & HEAD_ONLY)
        self.subs.release(fd)
        http.send_response(fd, response, variant & KEEP_ALIVE)
        w = self.w
        w.counters[DELIVERED] += 1
        if fd in w.inbuf:                         # requests pipelined behind it
            http.resume(fd)

    def refused(self, fd):
        """The home's table had no room for an id."""
        self.subs.release(fd)
        self.http.fail(fd, 503, "id table full", self.common)

    # -- the compat poll: the home's answers ------------------------------------------

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
            self.w.set_state(fd, HELD)

    def on_cwake(self, src, record):
        for fd in self.router.holders(records.read_cwake(record)):
            if self.w.state[fd] == HELD and self.w.proto[fd] == protocols.POLL_COMPAT:
                self.take_compat(fd)

    def deliver_compat(self, fd, ident, seq, epoch, flags, data, cache):
        if flags & DELIVER_COMPAT:
            self.answer_compat(fd, data)
            return True
        return False

    # -- answering ---------------------------------------------------------------------

    def answer(self, fd, messages):
        """A poll of one id: these messages, with its cursor (last, epoch) as it is now."""
        subs = self.subs
        last, epoch = subs.cursors(fd)
        callback = subs.note.get(fd)
        body = json_body_of(self.router.held_id[fd], messages, last, callback, epoch)
        subs.release(fd)
        self.http.respond(fd, 200, body, JSON_TYPE if callback is None else JS_TYPE, self.common)
        self.w.counters[DELIVERED] += len(messages)
        self.http.resume(fd)

    def answer_many(self, fd, items):
        """A multiplexed poll's answer: each message names its id; last and epoch have every id."""
        subs = self.subs
        seqs, epochs = subs.cursors(fd)
        callback = subs.note.get(fd)
        body = json_many_of(items, seqs, epochs, callback)
        subs.release(fd)
        self.http.respond(fd, 200, body, JSON_TYPE if callback is None else JS_TYPE, self.common)
        self.w.counters[DELIVERED] += len(items)
        self.http.resume(fd)

    def answer_compat(self, fd, data):
        self.subs.release(fd)
        self.http.respond(fd, 200, data, JS_TYPE, self.common)
        self.w.counters[DELIVERED] += 1

    def answer_timeout(self, fd):
        if self.w.proto[fd] == protocols.POLL_COMPAT:
            # An empty script, not a 204: a <script> tag fires onerror for a 204 sent with
            # nosniff (no Content-Type), and a page in the original style stops polling.
            self.subs.release(fd)
            self.http.respond(fd, 200, b"", JS_TYPE, self.common)   # closes: nothing pipelined
        elif fd in self.subs.many:
            self.answer_many(fd, self.subs.take_news(fd))
        else:
            self.answer(fd, [])


def json_many_of(items, seqs, epochs, callback=None):
    """``{"messages": [{"id", "seq", "data"}], "last": {id: seq}, "epoch": {id: E}}``, maybe
    JSONP-wrapped."""
    doc = {"messages": [{"id": ident.decode(), "seq": seq, "data": data.decode("utf-8")}
                        for ident, seq, data in items],
           "last": {ident.decode(): seq for ident, seq in seqs.items()},
           "epoch": {ident.decode(): epoch for ident, epoch in epochs.items()}}
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

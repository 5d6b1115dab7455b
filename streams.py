"""Streaming subscribers: an EventSource (SSE) connection stays open and gets every message.

``GET /sse/<id>`` (or ``/sub/<id>`` with ``Accept: text/event-stream``)
answers ``200 text/event-stream`` and keeps the connection: each message is
``id: <seq>``, one ``data:`` line per line of the message and a blank line.
It resumes after ``Last-Event-ID`` (or ``?since=``); with neither it first
sends every buffered message of the id, as the long-poll does.  A ``: ping``
comment every ``--heartbeat`` seconds keeps proxies from closing it.

A stream is held like a long-poll (``routing``) but never let go: each
DELIVER is written at once, a gap in seqs asks the home again.  A reader too
slow to take what is sent (over STREAM_OUT_LIMIT queued) is closed and
counted (``slow_closed``): it resumes from its last id and loses nothing
still buffered.  It never parses a request (``front`` does).
"""

import array
import re

import protocols
import records
import shmqueue
from records import SUB_QUIET
from worker import HELD, PENDING

STREAM_OUT_LIMIT = 1 << 20       # bytes queued for one stream before it counts as too slow
RETRY_MS = 2000                  # what EventSource waits before reconnecting
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def sse_event(seq, data):
    """One message as an event; every line break of the message starts a new data line."""
    return (b"id: %d\n" % seq + b"".join(b"data: %s\n" % line for line in _LINE_BREAK.split(data))
            + b"\n")


class Streams:
    """One per worker: the SSE protocol."""

    def __init__(self, w, router, common):
        self.w = w
        self.router = router
        self.since = array.array("I", bytes(4 * len(w.state)))   # the last seq sent
        self.head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + common +
                     b"X-Accel-Buffering: no\r\nConnection: close\r\n\r\nretry: %d\n\n" % RETRY_MS)

    def subscribe_sse(self, fd, ident, since, head_only=False):
        """Open the stream; what is buffered after ``since`` comes first, then every message."""
        w, router = self.w, self.router
        if head_only:
            w.write(fd, self.head[:self.head.index(b"\r\n\r\n") + 4])
            w.close_after_output(fd)
            return
        registered = router.registered(ident)
        router.hold(fd, ident, protocols.SSE, w.cfg.heartbeat)   # its deadline is the ping
        w.write(fd, self.head)
        if not w.state[fd]:
            return                                 # the peer is gone already
        self.since[fd] = since
        key = shmqueue.id_key(ident)
        home = key % w.region.workers
        if since == max(w.homes[home].peek_last(key), 0):
            w.state[fd] = HELD                     # up to date: only new messages will come
            if registered:
                return
            flags = SUB_QUIET
        else:
            flags = 0
        w.send(home, records.sub(fd, w.serial[fd], since, flags, ident))

    # -- the protocol ------------------------------------------------------------------

    def readable(self, fd):
        self.w.inbuf.pop(fd, None)                 # an EventSource sends nothing after its request

    def timeout(self, fd):
        self.w.write(fd, b": ping\n\n")
        if self.w.state[fd]:
            self.w.set_deadline(fd, self.w.cfg.heartbeat)

    def closed(self, fd):
        self.router.unhold(fd)

    def stop(self, fd):
        self.w.close_after_output(fd)              # it reconnects with Last-Event-ID

    # -- what the homes send -----------------------------------------------------------

    def backlog(self, fd, last, messages):
        for seq, data in messages:
            self._send(fd, seq, sse_event(seq, data))
        if self.w.state[fd]:
            self.since[fd] = last
            self.w.state[fd] = HELD

    def refused(self, fd):
        self.w.write(fd, b"event: error\ndata: id table full\n\n")
        self.w.close_after_output(fd)

    def deliver(self, fd, ident, seq, flags, data, cache):
        since = self.since[fd]
        if seq > since + 1:                        # a gap: ask the home for what is missing
            w = self.w
            w.new_serial(fd)
            w.state[fd] = PENDING
            w.send_home(ident, records.sub(fd, w.serial[fd], since, 0, ident))
        elif seq > since:
            event = cache.get("sse")
            if event is None:
                event = cache["sse"] = sse_event(seq, data)
            self._send(fd, seq, event)
        return False

    def _send(self, fd, seq, event):
        w = self.w
        w.write(fd, event)
        if not w.state[fd]:
            return
        self.since[fd] = seq
        w.counters["delivered"] += 1
        pending = w.outbuf.get(fd)
        if pending is not None and len(pending) > STREAM_OUT_LIMIT:
            w.counters["slow_closed"] += 1
            w.log("stream: a subscriber of %s reads too slowly (%d bytes queued); closed"
                  % (self.router.held_id[fd].decode(), len(pending)))
            w.close(fd)

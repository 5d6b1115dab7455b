"""Streaming subscribers: EventSource (SSE) and WebSocket connections stay open and get
every message.

``GET /sse/<id>`` (or ``/sub/<id>`` with ``Accept: text/event-stream``)
answers ``200 text/event-stream`` and keeps the connection: each message is
``id: <seq>``, one ``data:`` line per line of the message and a blank line;
the stream begins with the ``retry:`` hint and an ``epoch`` event naming
this run of the server (``front.since_of`` says what a client does with it).
It resumes after ``Last-Event-ID`` (or ``?since=``); with neither it first
sends every buffered message of the id, as the long-poll does.  A ``: ping``
comment every ``--heartbeat`` seconds keeps proxies from closing it.

A WebSocket (``GET /ws/<id>`` or ``/sub/<id>`` with ``Upgrade: websocket``)
gets each message as one text frame ``{"id": ..., "seq": N, "data": ...,
"epoch": E}`` and a ping every ``--heartbeat``; it answers pings, and closes
with the code RFC 6455 asks for on a protocol error (``wsframe`` judges the
bytes).  Data frames from clients are checked and ignored: publishing stays
on the app port.

A stream is held like a long-poll (``routing``) but never let go: each
DELIVER is written at once, a gap in seqs asks the home again.  A reader too
slow to take what is sent (over STREAM_OUT_LIMIT queued) is closed and
counted (``slow_closed``): it resumes from its last id and loses nothing
still buffered.  It never parses a request (``front`` does).
"""

import array
import json
import re

from . import protocols
from . import records
from . import wsframe
from .front import epoch_of
from .shmqueue import DELIVERED, SLOW_CLOSED
from .worker import CLOSING, HELD, PENDING

STREAM_OUT_LIMIT = 1 << 20       # bytes queued for one stream before it counts as too slow
RETRY_MS = 2000                  # what EventSource waits before reconnecting
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def sse_event(seq, data):
    """One message as an event; every line break of the message starts a new data line."""
    return (b"id: %d\n" % seq + b"".join(b"data: %s\n" % line for line in _LINE_BREAK.split(data))
            + b"\n")


def json_message(ident, seq, data, more=b""):
    return b'{"id": "%s", "seq": %d, "data": %s%s}' % (
        ident, seq, json.dumps(data.decode("utf-8")).encode(), more)


def ws_message(ident, seq, data, epoch):
    """One message as a WebSocket text frame: {"id": ..., "seq": N, "data": ..., "epoch": E}."""
    return wsframe.encode(wsframe.TEXT, json_message(ident, seq, data, b', "epoch": %d' % epoch))


class Streams:
    """One per worker: the SSE and WS protocols (held for as long as they are open)."""

    def __init__(self, w, router, common):
        self.w = w
        self.router = router
        self.since = array.array("I", bytes(4 * len(w.state)))   # the last seq sent
        self.sse_head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + common +
                         b"X-Accel-Buffering: no\r\nConnection: close\r\n\r\n")
        self.epoch = epoch = epoch_of(w.cfg)
        # A named event, without an id: EventSource's Last-Event-ID stays the last seq.
        self.sse_start = (self.sse_head + b"retry: %d\n\n" % RETRY_MS +
                          b"event: epoch\ndata: %d\n\n" % epoch)
        self.fragments = {}      # WS fd -> wsframe.Message of a fragmented message in progress
        self.cursors = {}        # fd -> {id: last seq sent}: multiplexed streams only
        self.encode = {protocols.SSE: lambda ident, seq, data: sse_event(seq, data),
                       protocols.WS: lambda ident, seq, data: ws_message(ident, seq, data, epoch)}
        self.ping = {protocols.SSE: b": ping\n\n", protocols.WS: wsframe.encode(wsframe.PING)}

    def subscribe_sse(self, fd, ident, since, head_only=False):
        """Open an EventSource stream: what is buffered after ``since``, then every message."""
        if head_only:
            self.w.write(fd, self.sse_head)
            self.w.close_after_output(fd)
            return
        self._open(fd, ident, since, protocols.SSE, self.sse_start)

    def subscribe_ws(self, fd, ident, since, key):
        """Answer the WebSocket handshake and stream as for SSE, one text frame a message."""
        self._open(fd, ident, since, protocols.WS,
                   b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
                   % wsframe.accept_key(key))
        if fd in self.w.inbuf and self.w.state[fd]:
            self.readable_ws(fd)                   # frames that came with the handshake

    def _open(self, fd, ident, since, proto, head):
        w, router = self.w, self.router
        if type(ident) is tuple:                   # several ids; since: {id: seq}
            registered = {i: router.registered(i) for i in ident}
            router.hold(fd, ident, proto, w.cfg.heartbeat)
            w.write(fd, head)
            if w.state[fd]:
                self.cursors[fd] = since
                router.subscribe_many(fd, since, registered)
            return
        registered = router.registered(ident)
        router.hold(fd, ident, proto, w.cfg.heartbeat)   # its deadline is the next ping
        w.write(fd, head)
        if not w.state[fd]:
            return                                 # the peer is gone already
        self.since[fd] = since
        router.subscribe(fd, ident, since, registered)

    # -- the protocols ------------------------------------------------------------------

    def readable_sse(self, fd):
        self.w.inbuf.pop(fd, None)                 # an EventSource sends nothing after its request

    def readable_ws(self, fd):
        """A held WebSocket still reads: pings, close frames, and data frames it ignores."""
        w = self.w
        if w.state[fd] == CLOSING:                 # our close frame is out: nothing more is said
            w.inbuf.pop(fd, None)
            return
        try:
            frames, used = wsframe.parse(w.inbuf[fd], w.cfg.max_message)
            w.consumed(fd, used)
            for fin, opcode, payload in frames:
                if opcode == wsframe.PING:
                    w.write(fd, wsframe.encode(wsframe.PONG, payload))
                elif opcode == wsframe.CLOSE:
                    wsframe.check_close_payload(payload)
                    self._close_ws(fd, wsframe.NORMAL, "bye")
                    return
                elif opcode != wsframe.PONG:
                    self._data_frame(fd, fin, opcode, payload)
                if not w.state[fd]:
                    return
        except wsframe.WsError as e:
            w.log("websocket: %s; closed with %d" % (e.reason, e.code))
            self._close_ws(fd, e.code, e.reason)
            return
        self._bound_output(fd)                     # a ping flood from a client that never reads

    def _bound_output(self, fd):
        """Close a stream whose reader lets more than STREAM_OUT_LIMIT pile up; True if so."""
        w = self.w
        pending = w.outbuf.get(fd)
        if pending is None or len(pending) <= STREAM_OUT_LIMIT:
            return False
        w.counters[SLOW_CLOSED] += 1
        w.log("stream: a subscriber of %s reads too slowly (%d bytes queued); closed"
              % (b",".join(self.router.ids_of(self.router.held_id[fd])).decode(), len(pending)))
        w.close(fd)
        return True

    def _data_frame(self, fd, fin, opcode, payload):
        message = self.fragments.get(fd)
        if opcode == wsframe.CONT:
            if message is None:
                raise wsframe.WsError(wsframe.PROTOCOL_ERROR, "continuation with nothing to continue")
        else:
            if message is not None:
                raise wsframe.WsError(wsframe.PROTOCOL_ERROR, "new message inside a fragmented one")
            message = wsframe.Message(opcode == wsframe.TEXT)
        message.add(payload, fin, self.w.cfg.max_message)
        if fin:
            self.fragments.pop(fd, None)
        else:
            self.fragments[fd] = message

    def _close_ws(self, fd, code, reason):
        self.w.inbuf.pop(fd, None)
        self.w.write(fd, wsframe.close_frame(code, reason))
        if self.w.state[fd]:
            self.w.close_after_output(fd)

    def timeout(self, fd):
        w = self.w
        if w.state[fd] not in (HELD, PENDING):
            return                                 # closing: no ping after a close frame
        w.write(fd, self.ping[w.proto[fd]])
        if w.state[fd] and not self._bound_output(fd):
            w.set_deadline(fd, w.cfg.heartbeat)

    def closed(self, fd):
        self.router.unhold(fd)
        self.fragments.pop(fd, None)
        self.cursors.pop(fd, None)

    def stop_sse(self, fd):
        self.w.close_after_output(fd)              # it reconnects with Last-Event-ID

    def stop_ws(self, fd):
        if self.w.state[fd] != CLOSING:
            self._close_ws(fd, wsframe.GOING_AWAY, "server restarting")

    # -- what the homes send -----------------------------------------------------------

    def backlog(self, fd, ident, last, messages):
        """A SUB's answer.  What was sent already (a DELIVER can overtake the answer of a
        quiet SUB) is skipped; a last below what the stream has means the server restarted
        and seqs began again: then everything counts."""
        cursors = self.cursors.get(fd)
        if cursors is not None:
            if last < cursors[ident]:
                cursors[ident] = 0
            for seq, data in messages:
                if seq > cursors[ident]:
                    self._send_many(fd, ident, seq, data, {})
                    if not self.w.state[fd]:
                        return
            cursors[ident] = max(cursors[ident], last)
            return
        if last < self.since[fd]:
            self.since[fd] = 0
        encode = self.encode[self.w.proto[fd]]
        for seq, data in messages:
            if seq > self.since[fd]:
                self._send(fd, seq, encode(ident, seq, data))
                if not self.w.state[fd]:
                    return
        self.since[fd] = max(self.since[fd], last)
        self.w.state[fd] = HELD

    def refused(self, fd):
        if self.w.proto[fd] == protocols.WS:
            self._close_ws(fd, 1013, "id table full")
        else:
            self.w.write(fd, b"event: error\ndata: id table full\n\n")
            self.w.close_after_output(fd)

    def deliver(self, fd, ident, seq, flags, data, cache):
        cursors = self.cursors.get(fd)
        if cursors is not None:
            since = cursors[ident]
            if seq > since + 1:
                self.router.resubscribe_one(fd, ident, since)
            elif seq > since:
                self._send_many(fd, ident, seq, data, cache)
            return False
        since = self.since[fd]
        if seq > since + 1:                        # a gap: ask the home for what is missing
            w = self.w
            w.new_serial(fd)
            w.state[fd] = PENDING
            w.send_home(ident, records.sub(fd, w.serial[fd], since, 0, ident))
        elif seq > since:
            proto = self.w.proto[fd]
            frame = cache.get(proto)               # built once for all holders of the id
            if frame is None:
                frame = cache[proto] = self.encode[proto](ident, seq, data)
            self._send(fd, seq, frame)
        return False

    def _send_many(self, fd, ident, seq, data, cache):
        """A message of a multiplexed stream: it names its id (and an SSE event's id is the
        whole cursor, "a:5,b:9", which is what Last-Event-ID brings back)."""
        cursors = self.cursors[fd]
        cursors[ident] = seq
        if self.w.proto[fd] == protocols.WS:
            frame = cache.get(protocols.WS)
            if frame is None:
                frame = cache[protocols.WS] = ws_message(ident, seq, data, self.epoch)
        else:
            frame = b"id: %s\ndata: %s\n\n" % (
                b",".join(b"%s:%d" % item for item in cursors.items()),
                json_message(ident, seq, data))
        self._send(fd, seq, frame)

    def _send(self, fd, seq, frame):
        w = self.w
        w.write(fd, frame)
        if not w.state[fd]:
            return
        self.since[fd] = seq
        w.counters[DELIVERED] += 1
        self._bound_output(fd)

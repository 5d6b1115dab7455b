"""Streaming subscribers: EventSource (SSE) and WebSocket connections stay open and get
every message.

``GET /sse/<id>`` (or ``/sub/<id>`` with ``Accept: text/event-stream``)
answers ``200 text/event-stream`` and keeps the connection: each message is
``id: <seq>``, one ``data:`` line per line of the message and a blank line;
the stream begins with the ``retry:`` hint and, once the id's home has
answered, an ``epoch`` event naming the id's epoch (several ids: a JSON
object of them), which the client sends back with its cursor.
It resumes after ``Last-Event-ID`` (or ``?since=``); with neither it first
sends every buffered message of the id, as the long-poll does.  A ``: ping``
comment every ``--heartbeat`` seconds keeps proxies from closing it.

A WebSocket (``GET /ws/<id>`` or ``/sub/<id>`` with ``Upgrade: websocket``)
gets each message as one text frame ``{"id": ..., "seq": N, "data": ...,
"epoch": E}`` and a ping every ``--heartbeat``; it answers pings, and closes
with the code RFC 6455 asks for on a protocol error (``wsframe`` judges the
bytes).  Data frames from clients are checked and ignored: publishing stays
on the app port.

A stream is a subscription (``subscriptions``) that is never let go: what
it is owed is written at once.  A signed stream ends when its signature
expires.  A reader too
slow to take what is sent (over STREAM_OUT_LIMIT queued) is closed and
counted (``slow_closed``): it resumes from its last id and loses nothing
still buffered.  It never parses a request (``front`` does).
"""

import json
import re
import time

from . import protocols
from . import wsframe
from .shmqueue import DELIVERED, SLOW_CLOSED
from .wsframe import CloseCode
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
    """One per worker: the SSE and WS protocols (held for as long as they are open), and
    their transport (``subscriptions``)."""

    def __init__(self, w, router, subscriptions, common):
        self.w = w
        self.router = router
        self.subs = subscriptions
        self.sse_head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + common +
                         b"X-Accel-Buffering: no\r\nConnection: close\r\n\r\n")
        self.sse_start = self.sse_head + b"retry: %d\n\n" % RETRY_MS
        self.fragments = {}      # WS fd -> wsframe.Message of a fragmented message in progress
        self.encode = {protocols.SSE: lambda ident, seq, data, epoch: sse_event(seq, data),
                       protocols.WS: ws_message}
        self.ping = {protocols.SSE: b": ping\n\n", protocols.WS: wsframe.encode(wsframe.PING)}

    def subscribe_sse(self, fd, ident, since, epoch, deadline, head_only=False):
        """Open an EventSource stream: what is buffered after the cursor, then every message."""
        if head_only:
            self.w.write(fd, self.sse_head)
            self.w.close_after_output(fd)
            return
        self._open(fd, ident, since, epoch, protocols.SSE, deadline, self.sse_start)

    def subscribe_ws(self, fd, ident, since, epoch, deadline, key):
        """Answer the WebSocket handshake and stream as for SSE, one text frame a message."""
        self._open(fd, ident, since, epoch, protocols.WS, deadline,
                   b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
                   % wsframe.accept_key(key))
        if fd in self.w.inbuf and self.w.state[fd]:
            self.readable_ws(fd)                   # frames that came with the handshake

    def _open(self, fd, ident, since, epoch, proto, deadline, head):
        # The head goes out first: an epoch event may follow at once.  Its deadline is the
        # next ping (or the signature's expiry).
        self.w.write(fd, head)
        if self.w.state[fd]:                       # (the write found the peer gone: closed)
            self.subs.open(fd, ident, since, epoch, proto, deadline)

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
                    self._close_ws(fd, CloseCode.NORMAL, "bye")
                    return
                elif opcode != wsframe.PONG:
                    self._data_frame(fd, fin, opcode, payload)
                if not w.state[fd]:
                    return
        except wsframe.WsError as e:
            w.log("websocket: %s; closed with %d" % (e.reason, e.code), fd=fd)
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
              % (b",".join(self.router.ids_of(self.router.held_id[fd])).decode(), len(pending)),
              fd=fd)
        w.close(fd)
        return True

    def _data_frame(self, fd, fin, opcode, payload):
        message = self.fragments.get(fd)
        if opcode == wsframe.CONT:
            if message is None:
                raise wsframe.WsError(CloseCode.PROTOCOL_ERROR,
                                      "continuation with nothing to continue")
        else:
            if message is not None:
                raise wsframe.WsError(CloseCode.PROTOCOL_ERROR,
                                      "new message inside a fragmented one")
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

    def _end(self, fd, code, reason):
        """End a stream with a reason its client can read: an error event, or a close frame."""
        if self.w.proto[fd] == protocols.WS:
            self._close_ws(fd, code, reason)
        else:
            self.w.write(fd, b"event: error\ndata: %s\n\n" % reason.encode())
            if self.w.state[fd]:
                self.w.close_after_output(fd)

    def timeout(self, fd):
        w = self.w
        if w.state[fd] not in (HELD, PENDING):
            return                                 # closing: no ping after a close frame
        expires = self.subs.expires.get(fd)
        if expires is not None and time.time() >= expires:
            w.log("stream: the signature of a subscriber of %s expired; closed"
                  % b",".join(self.router.ids_of(self.router.held_id[fd])).decode(), fd=fd)
            self._end(fd, CloseCode.POLICY_VIOLATION, "signature expired")
            return
        w.write(fd, self.ping[w.proto[fd]])
        if w.state[fd] and not self._bound_output(fd):
            seconds = w.cfg.heartbeat
            if expires is not None:
                seconds = max(0.0, min(seconds, expires - time.time()))
            w.set_deadline(fd, seconds)

    def closed(self, fd):
        self.subs.release(fd)
        self.fragments.pop(fd, None)

    def stop_sse(self, fd):
        self.w.close_after_output(fd)              # it reconnects with Last-Event-ID

    def stop_ws(self, fd):
        if self.w.state[fd] != CLOSING:
            self._close_ws(fd, CloseCode.GOING_AWAY, "server restarting")

    # -- the transport: what ``subscriptions`` hands a stream ----------------------------

    def announce(self, fd):
        """The epochs are known (or changed): an EventSource is told in an ``epoch`` event,
        without an id (Last-Event-ID stays the cursor); WebSocket frames each carry theirs."""
        if self.w.proto[fd] != protocols.SSE:
            return
        _, epoch = self.subs.cursors(fd)
        if type(epoch) is dict:
            epoch = json.dumps({ident.decode(): e for ident, e in epoch.items()}).encode()
        else:
            epoch = b"%d" % epoch
        self.w.write(fd, b"event: epoch\ndata: %s\n\n" % epoch)

    def news(self, fd, ident, messages):
        encode = self.encode[self.w.proto[fd]]
        epoch = self.subs.epoch[fd]
        for seq, data in messages:
            if not self._send(fd, encode(ident, seq, data, epoch)):
                return

    def news_many(self, fd, items):
        """Messages of a multiplexed stream: each names its id; an SSE event's id is the whole
        cursor as of that message ("a:5,b:9"), which is what Last-Event-ID brings back."""
        seqs, epochs = self.subs.cursors(fd)
        if self.w.proto[fd] == protocols.WS:
            for ident, seq, data in items:
                if not self._send(fd, ws_message(ident, seq, data, epochs[ident])):
                    return
            return
        cursor = dict(seqs)                        # as the client had it before these
        for ident, seq, _ in reversed(items):
            cursor[ident] = seq - 1
        for ident, seq, data in items:
            cursor[ident] = seq
            event = b"id: %s\ndata: %s\n\n" % (b",".join(b"%s:%d" % c for c in cursor.items()),
                                                json_message(ident, seq, data))
            if not self._send(fd, event):
                return

    def deliver(self, fd, ident, seq, epoch, data, cache):
        proto = self.w.proto[fd]
        frame = cache.get(proto)                   # built once for all holders of the id
        if frame is None:
            frame = cache[proto] = self.encode[proto](ident, seq, data, epoch)
        self._send(fd, frame)

    def deliver_all(self, fds, ident, seq, epoch, data, cache):
        """deliver() to each of fds, streams of one protocol (a fan-out): one frame, one
        write each, and the readers too slow for it closed as _send would."""
        proto = self.w.proto[fds[0]]
        frame = cache.get(proto)
        if frame is None:
            frame = cache[proto] = self.encode[proto](ident, seq, data, epoch)
        w = self.w
        waiting, closed = w.write_many(fds, frame)
        w.counters[DELIVERED] += len(fds) - closed
        for fd in waiting:
            self._bound_output(fd)

    def refused(self, fd):
        self._end(fd, CloseCode.TRY_AGAIN_LATER, "id table full")

    def _send(self, fd, frame):
        """Write one message; False if the stream is gone (or closed as too slow)."""
        w = self.w
        w.write(fd, frame)
        if not w.state[fd]:
            return False
        w.counters[DELIVERED] += 1
        return not self._bound_output(fd)

"""HTTP/1.1 on a worker's connections: the request loop and the answers, for both ports.

``wire`` parses (sans-IO); this module drives it for a connection: it takes
every complete request from the input buffer in turn, hands each to the
port's router, and writes answers with keep-alive, HEAD and pipelining
right.  A port supplies two functions: ``check_head(req)``, which may refuse
a request before its body is read, and ``route(fd, req, body)``.

It never reads a socket (the loop does) and never holds a request: a router
that cannot answer at once moves the connection out of READING and answers
later through ``respond``.
"""

from . import wire
from .worker import READING

KEEP_ALIVE, HEAD_ONLY = 1, 2
TEXT = b"text/plain; charset=utf-8"
JSON = b"application/json"
CLIENT_INBUF_LIMIT = 65536 + 8192   # unparsed bytes a subscriber may send ahead of our answers


class Http:
    """One per worker: per-connection request flags and the answering helpers."""

    def __init__(self, w):
        self.w = w
        self.flags = bytearray(len(w.state))   # fd -> KEEP_ALIVE | HEAD_ONLY of its request

    def serve(self, fd, check_head, route, max_body, error_headers=b"", refuse=None):
        """Parse and route every complete request in inbuf[fd], one at a time, while the
        connection reads requests and its unsent output is under the limit.

        A malformed or refused request is answered by ``refuse(fd, error)`` (by default
        at once, with ``fail``: a port whose answers may still be owed to earlier
        requests queues it behind them)."""
        w = self.w
        state, inbuf, outbuf = w.state, w.inbuf, w.outbuf
        while state[fd] == READING:
            buf = inbuf.get(fd)
            if buf is None or fd in outbuf and w.output_full(fd):
                return
            req = None
            try:
                req = wire.parse_head(buf)
                if req is None:
                    return
                # Its flags from its head on: a request refused on its head or body is answered
                # as it asked (a HEAD without a body), not as the one before it on this fd.
                self.flags[fd] = (KEEP_ALIVE if req.keep_alive else 0) | \
                    (HEAD_ONLY if req.method == b"HEAD" else 0)
                check_head(req)
                parsed = wire.parse_body(buf, req, max_body)
                if parsed is None:
                    return
                body, end = parsed
                w.consumed(fd, end)
                route(fd, req, body)
            except wire.HttpError as e:
                if req is None:
                    self.flags[fd] = 0            # a head we could not read: a plain answer
                if refuse is None:
                    self.fail(fd, e.status, e.reason, error_headers)
                else:
                    refuse(fd, e)
                return

    def resume(self, fd):
        """After an answer given outside the request loop: serve what was pipelined behind it."""
        w = self.w
        if w.state[fd] == READING and fd in w.inbuf:
            w.protocols[w.proto[fd]].readable(fd)

    def response_flags(self, fd):
        """KEEP_ALIVE | HEAD_ONLY as this answer honours them (no keep-alive while stopping)."""
        return self.flags[fd] & ~KEEP_ALIVE if self.w.stopping else self.flags[fd]

    def respond(self, fd, status, body=b"", content_type=JSON, headers=b""):
        """Answer the current request; then wait for the next one, or close."""
        self.send_response(fd, *self.answer(fd, status, body, content_type, headers))

    def answer(self, fd, status, body=b"", content_type=JSON, headers=b"", last=True):
        """(the response to the current request, keep the connection?), not sent yet.  An
        answer that is not the ``last`` one owed keeps the connection even while stopping."""
        flags = self.response_flags(fd) if last else self.flags[fd]
        keep = flags & KEEP_ALIVE
        return wire.response(status, body, content_type, keep, headers, flags & HEAD_ONLY), keep

    def send_response(self, fd, data, keep):
        w = self.w
        w.write(fd, data)
        if not w.state[fd]:
            return                                # the write found the peer gone
        if keep:
            if w.state[fd] != READING:            # (an answered subscription reads already)
                w.set_state(fd, READING)
            w.set_deadline(fd, w.cfg.header_timeout)
        else:
            w.close_after_output(fd)

    def fail(self, fd, status, reason, headers=b""):
        """Refuse the current request with one log line, and close."""
        w = self.w
        w.log("%s: %d %s" % (w.protocols[w.proto[fd]].name, status, reason), fd=fd)
        self.flags[fd] &= ~KEEP_ALIVE
        self.respond(fd, status, reason.encode() + b"\n", TEXT, headers)

"""The client port's front door: what a subscriber's HTTP request asks for, and who answers.

``GET /sub/<id>`` goes to the long-poll, ``GET /sse/<id>`` (or ``/sub/<id>``
with ``Accept: text/event-stream``) to an EventSource stream, ``GET
/ws/<id>`` (or ``/sub/<id>`` with ``Upgrade: websocket``) to a WebSocket,
``GET /<id>.js`` to the original's compat poll, ``/megacomet.js``, ``/demo``
and ``/`` serve the browser client and its demo page, ``OPTIONS`` is a CORS preflight;
anything else is refused with a status code.  Subscribers send no bodies, and may not run far ahead of
our answers.  With a secret, every subscription must be signed (``signing``).
A subscription may say which run of the server (``epoch``) its cursors come
from: those of another run count as 0 (``since_of``).
It never answers a subscription itself: ``longpoll`` and ``streams`` do.
"""

import importlib.resources
import time

from . import signing
from . import wire
from . import wsframe
from .httpconn import CLIENT_INBUF_LIMIT
from .worker import READING

MAX_IDS = 16                     # ids in one subscription (a page: a user channel and rooms)
PREFLIGHT = (b"Access-Control-Allow-Methods: GET, HEAD, OPTIONS\r\n"
             b"Access-Control-Allow-Headers: Content-Type, Cache-Control, Last-Event-ID\r\n"
             b"Access-Control-Max-Age: 86400\r\n")


class FrontDoor:
    """One per worker: the CLIENT_HTTP protocol."""

    def __init__(self, w, http, longpoll, streams):
        self.w = w
        self.http = http
        self.longpoll = longpoll
        self.streams = streams
        self.common = longpoll.common
        self.secret = w.cfg.secret
        self.epoch = epoch_of(w.cfg)
        client = static_file("megacomet.js")
        demo = static_file("demo.html")
        self.pages = {}
        if client is not None:
            self.pages[b"/megacomet.js"] = (b"application/javascript; charset=utf-8", client)
        if demo is not None:
            self.pages[b"/demo"] = self.pages[b"/"] = (b"text/html; charset=utf-8", demo)

    def readable(self, fd):
        w = self.w
        if w.state[fd] == READING:
            self.http.serve(fd, self.check_head, self.route, 0, self.common)
        buf = w.inbuf.get(fd)                     # what is left unparsed: pipelined far ahead
        if buf is not None and len(buf) > CLIENT_INBUF_LIMIT:
            w.close(fd)

    def timeout(self, fd):
        self.w.close(fd)                          # headers too slow (or idle keep-alive)

    def drained(self, fd):
        self.http.resume(fd)                      # requests parked while the output was full

    def check_head(self, req):
        """Only GET, HEAD and OPTIONS, none with a body: refused on the head."""
        if req.method not in (b"GET", b"HEAD", b"OPTIONS"):
            raise wire.HttpError(405, "method not allowed")
        if req.content_length or req.chunked:
            raise wire.HttpError(413, "subscriber requests take no body")

    def route(self, fd, req, _body):
        method, path = req.method, req.path
        if method == b"OPTIONS":
            self.http.respond(fd, 204, headers=self.common + PREFLIGHT)
            return
        if path.startswith(b"/ws/"):
            path = b"/sub/" + path[4:]
            if req.websocket_key is None:
                raise wire.HttpError(426, "a WebSocket upgrade is required here")
        if path.startswith(b"/sub/") or path.startswith(b"/sse/"):
            ident = ids_of(path[5:])
            query = wire.parse_query(req.query) if req.query else {}
            self.check_signature(ident, query)
            stream = path.startswith(b"/sse/") or (req.accept and b"text/event-stream" in req.accept)
            if stream and req.last_event_id is not None:   # a reconnecting EventSource
                query["since"] = req.last_event_id.decode("latin-1")
            since = since_of(ident, query, self.epoch)
            if req.websocket_key is not None:
                check_websocket(req)
                self.streams.subscribe_ws(fd, ident, since, req.websocket_key)
            elif stream:
                self.streams.subscribe_sse(fd, ident, since, head_only=method == b"HEAD")
            else:
                timeout = int_param(query, "timeout", self.w.cfg.poll_timeout, 1, 120)
                callback = query.get("callback")
                if callback is not None and not wire.CALLBACK_PATTERN.match(callback):
                    raise wire.HttpError(400, "callback must match [A-Za-z_$][A-Za-z0-9_$.]{0,63}")
                self.longpoll.subscribe(fd, ident, since, timeout, callback)
            return
        page = self.pages.get(path)
        if page is not None:                      # the browser client and its demo
            self.http.respond(fd, 200, page[1], page[0], self.common)
            return
        if path.endswith(b".js") and path.count(b"/") == 1 and wire.valid_id(path[1:-3]):
            ident = path[1:-3]
            if self.secret is not None:
                self.check_signature(ident, wire.parse_query(req.query) if req.query else {})
            self.longpoll.compat_poll(fd, ident, peek=method == b"HEAD")
            return
        raise wire.HttpError(404, "no such path")

    def check_signature(self, ident, query):
        """With --secret, a subscription must carry a valid, unexpired exp and sig: else 403."""
        if self.secret is None:
            return
        ids = [i.decode() for i in ((ident,) if type(ident) is bytes else ident)]
        reason = signing.refusal(self.secret, ids, query.get("exp"), query.get("sig"), time.time())
        if reason is not None:
            raise wire.HttpError(403, reason)


def ids_of(text):
    """The id of a subscription path, or a tuple of up to MAX_IDS distinct ids ("a,b,c")."""
    if b"," not in text:
        if not wire.valid_id(text):
            raise wire.HttpError(400, wire.ID_RULE)
        return text
    ids = tuple(text.split(b","))
    if len(ids) > MAX_IDS:
        raise wire.HttpError(400, "at most %d ids in one subscription" % MAX_IDS)
    if not all(wire.valid_id(i) for i in ids):
        raise wire.HttpError(400, wire.ID_RULE)
    if len(set(ids)) < len(ids):
        raise wire.HttpError(400, "an id is named twice")
    return ids


def since_of(ident, query, epoch):
    """``since``: a seq for one id; for several, ``id:seq`` pairs ("a:4,b:9"; unnamed ids: 0).

    Every since is 0 when the query's ``epoch`` is not ours: its seqs were counted by another
    run of the server (this one's started again from 1), so the client gets all that is
    buffered.  Without an epoch the since stands, as it did before epochs existed.
    """
    if type(ident) is bytes:
        since = int_param(query, "since", 0, 0, 0xFFFFFFFF)
        return 0 if other_epoch(query, epoch) else since
    cursors = dict.fromkeys(ident, 0)
    text = query.get("since")
    if text:
        for pair in text.split(","):
            name, colon, seq = pair.rpartition(":")
            name = name.encode()
            if not colon or name not in cursors:
                raise wire.HttpError(400, "since must be id:seq pairs of the subscription's ids")
            cursors[name] = int_param({"since": seq}, "since", 0, 0, 0xFFFFFFFF)
    return dict.fromkeys(ident, 0) if other_epoch(query, epoch) else cursors


def other_epoch(query, epoch):
    """Whether the query names an epoch (a server run) other than ``epoch``."""
    text = query.get("epoch")
    if text is None:
        return False
    # Digits only, as for every number (see int_param); a run's epoch is 13 of them today.
    if not (0 < len(text) <= 20 and text.isascii() and text.isdigit()):
        raise wire.HttpError(400, "epoch must be a whole number")
    return int(text) != epoch


def epoch_of(cfg):
    """This run's epoch.  Its start in ms, which is also what a supervisor from before epochs
    existed (whose Config has none) would have used: a reload into this code works there too."""
    epoch = getattr(cfg, "epoch", None)
    return int(cfg.started_at * 1000) if epoch is None else epoch


def static_file(name):
    """A file of the package's static/ (the browser client, the demo page), read through the
    package's loader: from a clone, an installed package or the .pyz alike; None if missing."""
    try:
        return importlib.resources.files(__package__).joinpath("static", name).read_bytes()
    except OSError:
        return None


def check_websocket(req):
    """An upgrade we can answer: RFC 6455's version 13 (426 otherwise) and a valid key."""
    if req.method != b"GET":
        raise wire.HttpError(400, "a WebSocket upgrade is a GET")
    if req.websocket_version != b"13":
        raise wire.HttpError(426, "only WebSocket version 13 is spoken here")
    if not wsframe.valid_key(req.websocket_key):
        raise wire.HttpError(400, "Sec-WebSocket-Key must be 16 bytes in base64")


def int_param(query, name, default, low, high):
    text = query.get(name)
    if text is None:
        return default
    # ASCII digits only: str.isdigit() also accepts "²" or "①", which int() refuses.
    if not (0 < len(text) <= 10 and text.isascii() and text.isdigit()):
        raise wire.HttpError(400, "%s must be a whole number" % name)
    return min(max(int(text), low), high)

"""The client port's front door: what a subscriber's HTTP request asks for, and who answers.

``GET /sub/<id>`` goes to the long-poll, ``GET /sse/<id>`` (or ``/sub/<id>``
with ``Accept: text/event-stream``) to an EventSource stream, ``GET
/ws/<id>`` (or ``/sub/<id>`` with ``Upgrade: websocket``) to a WebSocket,
``GET /<id>.js`` to the original's compat poll, ``/megacomet.js``, ``/demo``
and ``/`` serve the browser client and its demo page, ``OPTIONS`` is a CORS preflight;
anything else is refused with a status code.  Subscribers send no bodies, and may not run far ahead of
our answers.  With a secret, every subscription must be signed (``signing``),
and ends when its signature expires.  A subscription's cursors (``since``,
and the ``epoch`` each counts in) are read here (``cursors_of``) and judged
by each id's home (``subscriptions``).  It never answers a subscription
itself: ``longpoll`` and ``streams`` do.
"""

import importlib.resources
import time

from . import signing
from . import wire
from . import wsframe
from .httpconn import CLIENT_INBUF_LIMIT
from .worker import HELD, PENDING, READING

MAX_IDS = 16                     # ids in one subscription (a page: a user channel and rooms)
MAX_ASKED_TIMEOUT = 120          # ?timeout= may ask up to this, or up to --poll-timeout if longer
PREFLIGHT = (b"Access-Control-Allow-Methods: GET, HEAD, OPTIONS\r\n"
             b"Access-Control-Allow-Headers: Content-Type, Cache-Control, Last-Event-ID\r\n"
             b"Access-Control-Max-Age: 86400\r\n")


class FrontDoor:
    """One per worker: the CLIENT_HTTP protocol."""

    def __init__(self, w, http, subscriptions, longpoll, streams):
        self.w = w
        self.http = http
        self.subscriptions = subscriptions
        self.longpoll = longpoll
        self.streams = streams
        self.common = longpoll.common
        self.secret = w.cfg.secret
        client = static_file("megacomet.js")
        demo = static_file("demo.html")
        self.pages = {}
        if client is not None:
            self.pages[b"/megacomet.js"] = (b"application/javascript; charset=utf-8", client,
                                            self.common)
        if demo is not None:                      # the page reads what to show off its head
            self.pages[b"/demo"] = self.pages[b"/"] = (b"text/html; charset=utf-8", demo,
                                                       self.common + demo_header(w.cfg))

    def readable(self, fd):
        w = self.w
        if w.state[fd] == READING:
            self.http.serve(fd, self.check_head, self.route, 0, self.common)
        buf = w.inbuf.get(fd)                     # what is left unparsed: pipelined far ahead
        if buf is not None and len(buf) > CLIENT_INBUF_LIMIT:
            w.close(fd)

    def timeout(self, fd):
        self.w.close(fd)                          # headers too slow (or idle keep-alive)

    def closed(self, fd):
        self.subscriptions.release(fd)            # (nothing is left of an answered one)

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
            expires = self.check_signature(ident, query)
            stream = path.startswith(b"/sse/") or (req.accept and b"text/event-stream" in req.accept)
            if stream and req.last_event_id is not None:   # a reconnecting EventSource
                query["since"] = req.last_event_id.decode("latin-1")
            since, epoch = cursors_of(ident, query)
            if stream or req.websocket_key is not None:
                seconds = self.w.cfg.heartbeat        # a stream's deadline is its next ping
            else:
                longest = self.w.cfg.poll_timeout
                seconds = int_param(query, "timeout", longest, 1, max(MAX_ASKED_TIMEOUT, longest))
            if expires is not None:                   # ... or the signature's expiry
                seconds = max(0.0, min(seconds, expires - time.time()))
            if req.websocket_key is not None:
                check_websocket(req)
                self.streams.subscribe_ws(fd, ident, since, epoch, seconds, req.websocket_key)
            elif stream:
                self.streams.subscribe_sse(fd, ident, since, epoch, seconds,
                                           head_only=method == b"HEAD")
            else:
                callback = query.get("callback")
                if callback is not None and not wire.CALLBACK_PATTERN.match(callback):
                    raise wire.HttpError(400, "callback must match [A-Za-z_$][A-Za-z0-9_$.]{0,63}")
                self.longpoll.subscribe(fd, ident, since, epoch, seconds, callback)
            if expires is not None and self.w.state[fd] in (PENDING, HELD):
                self.subscriptions.expires[fd] = expires   # a signed stream ends with it
            return
        page = self.pages.get(path)
        if page is not None:                      # the browser client and its demo
            self.http.respond(fd, 200, page[1], page[0], page[2])
            return
        if path.endswith(b".js") and path.count(b"/") == 1 and wire.valid_id(path[1:-3]):
            ident = path[1:-3]
            if self.secret is not None:
                self.check_signature(ident, wire.parse_query(req.query) if req.query else {})
            self.longpoll.compat_poll(fd, ident, peek=method == b"HEAD")
            return
        raise wire.HttpError(404, "no such path")

    def check_signature(self, ident, query):
        """With --secret, a subscription must carry a valid, unexpired exp and sig (else 403):
        returns the unix time it expires (None without a secret)."""
        if self.secret is None:
            return None
        ids = [i.decode() for i in ((ident,) if type(ident) is bytes else ident)]
        reason = signing.refusal(self.secret, ids, query.get("exp"), query.get("sig"), time.time())
        if reason is not None:
            raise wire.HttpError(403, reason)
        return int(query["exp"])


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


def cursors_of(ident, query):
    """(since, epoch) of a subscription: numbers for one id (``since=4&epoch=E``); for
    several, {id: number} each, from ``id:number`` pairs (``since=a:4,b:9``, ``epoch=a:E,b:F``;
    an id left out: 0) or, for the epoch, one number for every id.  Epoch 0 is none given.
    The cursor rule itself (another epoch, or a since beyond the last seq, counts as 0) is
    the id's home's to apply: only it knows the id's epoch and last seq."""
    if type(ident) is bytes:
        return (int_param(query, "since", 0, 0, 0xFFFFFFFF),
                number(query.get("epoch", "0"), "epoch", 0xFFFFFFFFFFFFFFFF))
    return (pairs(ident, query.get("since"), "since", 0xFFFFFFFF),
            pairs(ident, query.get("epoch"), "epoch", 0xFFFFFFFFFFFFFFFF))


def pairs(ids, text, name, high):
    """{id: number} for every id of a subscription from "a:4,b:9" (a bare number: for all)."""
    values = dict.fromkeys(ids, 0)
    if text is None:
        return values
    if ":" not in text and name == "epoch":
        return dict.fromkeys(ids, number(text, name, high))
    for pair in text.split(","):
        ident, colon, value = pair.rpartition(":")
        ident = ident.encode()
        if not colon or ident not in values:
            raise wire.HttpError(400, "%s must be id:%s pairs of the subscription's ids"
                                 % (name, "seq" if name == "since" else name))
        values[ident] = number(value, name, high)
    return values


def number(text, name, high):
    """A whole number of ASCII digits (str.isdigit() also takes "²", which int() refuses)."""
    if not (0 < len(text) <= len(str(high)) and text.isascii() and text.isdigit()):
        raise wire.HttpError(400, "%s must be a whole number" % name)
    return min(int(text), high)


def static_file(name):
    """A file of the package's static/ (the browser client, the demo page), read through the
    package's loader: from a clone, an installed package or the .pyz alike; None if missing."""
    try:
        return importlib.resources.files(__package__).joinpath("static", name).read_bytes()
    except OSError:
        return None


def demo_header(cfg):
    """The demo page's facts about this server, in a header of its own (the page is served as
    the package has it): where the application publishes, as it would reach the app port
    (127.0.0.1 for 0.0.0.0), and whether that takes the token and subscribing a signature;
    never the token or the secret themselves."""
    host = cfg.app_host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    elif ":" in host:
        host = "[%s]" % host
    return b"X-MegaComet-Demo: app=%s:%d; token=%d; signed=%d\r\n" % (
        host.encode("ascii", "replace"), cfg.app_port, bool(cfg.app_token), cfg.secret is not None)


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
    return min(max(number(text, name, 0xFFFFFFFF), low), high)

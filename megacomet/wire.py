"""Sans-IO parsing and building of what crosses a socket: HTTP/1.1 and the binary publish protocol.

Everything here is a pure function of bytes: no sockets, no clock, no
process state, so it can be unit-tested and fuzzed on its own.  It must
never keep anything about a request once the request is parsed (no header
dict outlives ``parse_head``), never trust a length it has not bounded, and
report every malformed input as ``HttpError`` / ``FrameError`` rather than
any other exception.
"""

import codecs
import re
from urllib.parse import unquote_to_bytes

MAX_HEAD = 8192
# Bytes in an id, at most: the one limit every check of an id uses.  (Records between workers
# carry an id's length in one byte: it must stay under 256.)
MAX_ID_LENGTH = 128
_ID_CLASS = rb"[A-Za-z0-9_~:@-]"
ID_PATTERN = re.compile(_ID_CLASS + rb"{1,%d}\Z" % MAX_ID_LENGTH)
_ID_CHARS = re.compile(_ID_CLASS + rb"*\Z")
CALLBACK_PATTERN = re.compile(r"[A-Za-z_$][A-Za-z0-9_$.]{0,63}\Z")

REASONS = {200: "OK", 202: "Accepted", 204: "No Content", 400: "Bad Request",
           426: "Upgrade Required",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           411: "Length Required", 413: "Content Too Large", 421: "Misdirected Request",
           431: "Request Header Fields Too Large", 501: "Not Implemented",
           503: "Service Unavailable", 505: "HTTP Version Not Supported"}


ID_TEXT = "1-%d characters of A-Z a-z 0-9 _ ~ : @ -" % MAX_ID_LENGTH   # what an id is
ID_RULE = "id must be " + ID_TEXT                                   # what a 400 says


def valid_id(ident: bytes) -> bool:
    return ID_PATTERN.match(ident) is not None


class HttpError(Exception):
    """A request we answer with ``status`` and then close."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Request:
    """The parts of a request head the server acts on; the rest is dropped."""

    __slots__ = ("method", "path", "query", "keep_alive", "content_length",
                 "chunked", "authorization", "head_end", "browser", "accept", "last_event_id",
                 "websocket_key", "websocket_version", "host", "origin", "fetch_site",
                 "idempotency_key")

    def __init__(self, method, path, query, keep_alive, content_length, chunked,
                 authorization, head_end, browser=False, accept=None, last_event_id=None,
                 websocket_key=None, websocket_version=None, host=None, origin=None,
                 fetch_site=None, idempotency_key=None):
        self.method = method
        self.path = path
        self.query = query
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked
        self.authorization = authorization
        self.head_end = head_end
        self.browser = browser            # an Origin or Sec-Fetch-* header: a browser sent it
        self.accept = accept              # lower-cased
        self.last_event_id = last_event_id
        # Set only for a WebSocket upgrade (Upgrade: websocket, Connection: upgrade); the key
        # may then still be missing (b"").
        self.websocket_key = websocket_key
        self.websocket_version = websocket_version
        self.host = host                  # lower-cased; None if absent, b"" if sent twice
        # What a browser says of who asks (lower-cased; None if absent): the Origin header,
        # and Sec-Fetch-Site (same-origin, same-site, cross-site, none: the user asked).
        self.origin = origin
        self.fetch_site = fetch_site
        self.idempotency_key = idempotency_key   # as sent (case kept); cluster mode uses it


_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) HTTP/1\.([01])\Z")
# Every header line, each followed by CRLF: a token, a colon, a value free of CR, LF and NUL.
_HEADER_LINES = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n\0]*\r\n)*\Z")
# The few fields we act on, found in the lower-cased block (same offsets as the original).
_FIELDS = re.compile(rb"\n(content-length|transfer-encoding|connection|authorization|origin|"
                     rb"sec-fetch-[a-z]+|accept|last-event-id|upgrade|sec-websocket-key|"
                     rb"sec-websocket-version|host|idempotency-key):[ \t]*([^\r]*)")


def parse_head(buf, max_head=MAX_HEAD):
    """Parse the request head at the start of ``buf``.

    Returns a Request (``head_end`` is where the body starts), or None when
    the head is not complete yet.  Raises HttpError for anything malformed,
    and 431 once the head exceeds ``max_head`` bytes.
    """
    end = buf.find(b"\r\n\r\n", 0, max_head + 4)
    if end < 0:
        # Over the limit, unless what follows it may still be the blank line that ends it.
        if len(buf) > max_head and not b"\r\n\r\n".startswith(bytes(buf[max_head:max_head + 4])):
            raise HttpError(431, "request head over %d bytes" % max_head)
        return None
    head = bytes(buf[:end + 2])
    line_end = head.find(b"\r\n")
    line = _REQUEST_LINE.match(head, 0, line_end)
    if line is None:
        version = head[:line_end].rpartition(b" ")[2]
        if re.fullmatch(rb"HTTP/\d\.\d", version) and version not in (b"HTTP/1.0", b"HTTP/1.1"):
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
        raise HttpError(400, "malformed request line")
    method, target, minor = line.groups()
    if not _HEADER_LINES.match(head, line_end + 2):
        raise HttpError(400, "malformed header line")
    close = asked_keep_alive = False
    content_length = None
    chunked = False
    authorization = accept = last_event_id = websocket_key = websocket_version = host = None
    origin = fetch_site = idempotency_key = None
    browser = upgrade = connection_upgrade = False
    lower = head.lower()
    for field in _FIELDS.finditer(lower, line_end):
        name = field.group(1)
        value = field.group(2).rstrip(b" \t")
        if name == b"host":                       # (first: every request has one)
            host = value if host is None or host == value else b""   # two: none is trusted
        elif name == b"content-length":
            if not value.isdigit() or len(value) > 18 or \
                    (content_length is not None and int(value) != content_length):
                raise HttpError(400, "bad Content-Length")
            content_length = int(value)
        elif name == b"transfer-encoding":
            if value != b"chunked":
                raise HttpError(501, "only chunked transfer-encoding is supported")
            chunked = True
        elif name == b"connection":
            tokens = [t.strip() for t in value.split(b",")]
            close = close or b"close" in tokens
            asked_keep_alive = asked_keep_alive or b"keep-alive" in tokens
            connection_upgrade = connection_upgrade or b"upgrade" in tokens
        elif name == b"authorization":
            authorization = head[field.start(2):field.start(2) + len(value)]
        elif name == b"accept":
            accept = value
        elif name == b"last-event-id":
            last_event_id = value
        elif name == b"upgrade":
            upgrade = upgrade or b"websocket" in [t.strip() for t in value.split(b",")]
        elif name == b"sec-websocket-key":
            websocket_key = head[field.start(2):field.start(2) + len(value)]   # case matters
        elif name == b"sec-websocket-version":
            websocket_version = value
        elif name == b"idempotency-key":
            idempotency_key = head[field.start(2):field.start(2) + len(value)]   # case matters
        else:
            browser = True
            if name == b"origin":
                origin = value if origin is None or origin == value else b""
            elif name == b"sec-fetch-site":
                fetch_site = value if fetch_site is None or fetch_site == value else b""
    if chunked and content_length is not None:
        raise HttpError(400, "both Content-Length and Transfer-Encoding")
    # HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes unless
    # asked to keep it.  "close" wins over everything.
    keep_alive = not close and (minor == b"1" or asked_keep_alive)
    path, _, query = target.partition(b"?")
    if not (upgrade and connection_upgrade):
        websocket_key = websocket_version = None
    elif websocket_key is None:
        websocket_key = b""
    return Request(method, path, query, keep_alive, content_length, chunked,
                   authorization, end + 4, browser, accept, last_event_id,
                   websocket_key, websocket_version, host, origin, fetch_site, idempotency_key)


def parse_body(buf, req, max_body):
    """The body of ``req`` from ``buf`` as (body bytes, end offset), or None if incomplete.

    Raises HttpError(413) as soon as the body is known to exceed ``max_body``.
    """
    start = req.head_end
    if req.chunked:
        return _parse_chunked(buf, start, max_body)
    length = req.content_length or 0
    if length > max_body:
        raise HttpError(413, "body over %d bytes" % max_body)
    if len(buf) - start < length:
        return None
    return bytes(buf[start:start + length]), start + length


_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\Z")
MAX_CHUNK_LINE = 1024


def _parse_chunked(buf, pos, max_body):
    """Walk the chunk framing without copying; join the data once the last chunk is in."""
    spans = []
    total = 0
    n = len(buf)
    while True:
        line_end = buf.find(b"\r\n", pos, pos + MAX_CHUNK_LINE)
        if line_end < 0:
            if n - pos >= MAX_CHUNK_LINE:
                raise HttpError(400, "chunk size line too long")
            return None
        size_line = _CHUNK_SIZE.match(bytes(buf[pos:line_end]))
        if size_line is None:
            raise HttpError(400, "malformed chunk size")
        size = int(size_line.group(1), 16)
        total += size
        if total > max_body:
            raise HttpError(413, "body over %d bytes" % max_body)
        if size == 0:                     # then trailer lines (ignored) up to an empty line
            end = buf.find(b"\r\n\r\n", line_end, line_end + MAX_HEAD + 4)
            if end < 0:
                if n - line_end >= MAX_HEAD + 4:
                    raise HttpError(431, "chunked trailer over %d bytes" % MAX_HEAD)
                return None
            if not _HEADER_LINES.match(bytes(buf[line_end + 2:end + 2])):
                raise HttpError(400, "malformed trailer line")
            return b"".join(bytes(buf[a:b]) for a, b in spans), end + 4
        data_start = line_end + 2
        if n < data_start + size + 2:
            return None
        if buf[data_start + size:data_start + size + 2] != b"\r\n":
            raise HttpError(400, "chunk not followed by CRLF")
        spans.append((data_start, data_start + size))
        pos = data_start + size + 2


def parse_query(query):
    """``a=1&b=2`` as a dict of str; percent-decoded; the last of repeated keys wins."""
    escaped = b"%" in query or b"+" in query
    out = {}
    try:
        for pair in query.split(b"&"):
            if pair:
                name, _, value = pair.partition(b"=")
                if escaped:
                    name = unquote_to_bytes(name.replace(b"+", b" "))
                    value = unquote_to_bytes(value.replace(b"+", b" "))
                out[name.decode()] = value.decode()
    except UnicodeDecodeError:
        raise HttpError(400, "query is not UTF-8") from None
    return out


def response(status, body=b"", content_type=b"application/json", keep_alive=True,
             headers=b"", head_only=False):
    """A complete HTTP/1.1 response as bytes; ``headers`` is pre-joined extra lines."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status].encode())]
    if status != 204:
        parts.append(b"Content-Type: %s\r\nContent-Length: %d\r\n" % (content_type, len(body)))
    parts.append(headers)
    parts.append(b"\r\n" if keep_alive else b"Connection: close\r\n\r\n")
    if not head_only and status != 204:
        parts.append(body)
    return b"".join(parts)


class FrameError(Exception):
    """A binary-protocol frame we close the connection for.

    ``frames`` holds the complete, valid frames that came before it, which
    the caller should still publish: how TCP cut the stream must not decide
    their fate.
    """

    def __init__(self, reason, frames=()):
        super().__init__(reason)
        self.frames = list(frames)


FRAME_PUBLISH = 0x02
FRAME_PING = 0x01      # accepted and ignored: lets a publisher keep an idle link alive


def parse_frames(buf, max_message):
    """Complete frames at the start of ``buf``: ([(id, message)], bytes consumed).

    A publish frame is ``0x02 <id> 0x00 <message> 0x00``; ``0x01`` alone is a
    ping.  Raises FrameError for an unknown leading byte, an invalid id, a
    message over ``max_message`` bytes or one that is not UTF-8 - as soon as
    the bytes seen prove it, not when the frame ends.
    """
    frames = []
    pos = 0
    n = len(buf)
    while pos < n:
        kind = buf[pos]
        if kind == FRAME_PING:
            pos += 1
            continue
        if kind != FRAME_PUBLISH:
            raise FrameError("unknown frame byte 0x%02x" % kind, frames)
        # The id and its terminator: at most MAX_ID_LENGTH + 1 bytes after the frame byte.
        id_limit = pos + MAX_ID_LENGTH + 2
        id_end = buf.find(b"\0", pos + 1, id_limit)
        if id_end < 0:
            partial = bytes(buf[pos + 1:id_limit])
            if len(partial) > MAX_ID_LENGTH:
                raise FrameError("id over %d bytes" % MAX_ID_LENGTH, frames)
            if not _ID_CHARS.match(partial):
                raise FrameError("invalid id", frames)
            break
        ident = bytes(buf[pos + 1:id_end])
        if not valid_id(ident):
            raise FrameError("invalid id", frames)
        msg_end = buf.find(b"\0", id_end + 1, id_end + 2 + max_message)
        if msg_end < 0:
            if n - id_end - 1 > max_message:
                raise FrameError("message over %d bytes" % max_message, frames)
            try:                          # fail now if no continuation could make it UTF-8
                codecs.getincrementaldecoder("utf-8")().decode(bytes(buf[id_end + 1:]), False)
            except UnicodeDecodeError:
                raise FrameError("message is not UTF-8", frames) from None
            break
        message = bytes(buf[id_end + 1:msg_end])
        try:
            message.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("message is not UTF-8", frames) from None
        frames.append((ident, message))
        pos = msg_end + 1
    return frames, pos

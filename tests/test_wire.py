"""Unit and property (hypothesis) tests for ``wire.py``, the sans-IO parser.

No sockets or processes are involved except one socketpair that carries
``response()`` output to ``http.client``.  The properties checked:

* robustness: arbitrary bytes into ``parse_head`` / ``parse_body`` /
  ``parse_frames`` return normally or raise ``HttpError`` / ``FrameError``;
* round trips: a valid request (random method, target, headers, body; plain,
  Content-Length or chunked) parses back to the same fields at every prefix
  and however the bytes are split; random frame streams parse to the same
  frames with the right ``consumed`` at every split point;
* limits: 413 / 431 / FrameError raised as soon as the bytes seen prove
  them, and not before;
* request-smuggling guards and the keep-alive rules;
* ``response()`` output as read by ``http.client``.
"""

import codecs
import http.client
import io
import os
import socket
import sys
import threading
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacomet import wire  # noqa: E402

FUZZ = settings(max_examples=500, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROPS = settings(max_examples=120, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HEAVY = settings(max_examples=40, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_~:@-"
TOKEN_CHARS = "!#$%&'*+.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-"
SPECIAL_HEADERS = {b"content-length", b"transfer-encoding", b"connection", b"authorization"}
FIELDS = ("method", "path", "query", "keep_alive", "content_length", "chunked",
          "authorization", "head_end")


def short_id(value):
    """A readable test id for long byte parameters."""
    text = repr(value)
    return text if len(text) <= 40 else "%s...(%d bytes)" % (text[:30], len(value))


def fields(req):
    return {name: getattr(req, name) for name in FIELDS}


def http_error(fn, *args, **kw):
    """Call ``fn`` expecting HttpError; return its status."""
    with pytest.raises(wire.HttpError) as info:
        fn(*args, **kw)
    return info.value.status


def head(*lines, version=b"HTTP/1.1", method=b"POST", target=b"/"):
    return b"%s %s %s\r\n" % (method, target, version) + b"".join(l + b"\r\n" for l in lines) + b"\r\n"


CHUNKED_HEAD = head(b"Transfer-Encoding: chunked")


def chunked_body(tail, max_body=1000):
    buf = CHUNKED_HEAD + tail
    return wire.parse_body(buf, wire.parse_head(buf), max_body)


# ---------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------

ids = st.text(ID_CHARS, min_size=1, max_size=128).map(str.encode)
tokens = st.text(TOKEN_CHARS, min_size=1, max_size=12).map(str.encode)
visible = st.binary(min_size=0, max_size=30).map(
    lambda b: bytes(0x21 + c % 94 for c in b))                  # \x21-\x7e


@st.composite
def header_values(draw):
    """A field value with no CR/LF/NUL, maybe obs-text, maybe inner blanks."""
    core = draw(st.lists(st.one_of(visible, st.sampled_from([b" ", b"\t", b"\x80\xff", b"caf\xc3\xa9"])),
                         max_size=5))
    value = b"".join(core).strip(b" \t")
    pad_l = draw(st.sampled_from([b"", b" ", b"\t", b"  \t"]))
    pad_r = draw(st.sampled_from([b"", b" ", b"\t", b" \t "]))
    return value, pad_l + value + pad_r


def random_case(draw, name):
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return bytes(c ^ 0x20 if f and chr(c).isalpha() else c for c, f in zip(name, flips))


@st.composite
def requests(draw, allow_body=True):
    """(request bytes, expected fields minus head_end, body, wire body length, max_body)."""
    method = draw(st.one_of(st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT"]), tokens))
    path = b"/" + draw(visible).replace(b"?", b"")
    query = b""
    target = path
    if draw(st.booleans()):
        query = draw(visible)
        target += b"?" + query
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    keep_alive = version == b"HTTP/1.1"
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(tokens)
        assume(name.lower() not in SPECIAL_HEADERS)
        lines.append(name + b":" + draw(header_values())[1])

    authorization = None
    if draw(st.booleans()):
        authorization, raw = draw(header_values())
        lines.append(random_case(draw, b"Authorization") + b":" + raw)

    conn = draw(st.lists(st.sampled_from([b"close", b"keep-alive", b"Keep-Alive", b"CLOSE",
                                          b"upgrade", b"TE"]), max_size=3))
    if conn:
        lines.append(random_case(draw, b"Connection") + b": " + b" , ".join(conn))
        lowered = [t.lower() for t in conn]
        if b"close" in lowered:
            keep_alive = False
        elif b"keep-alive" in lowered and version == b"HTTP/1.0":
            keep_alive = True

    body = b""
    encoded = b""
    content_length = None
    chunked = False
    framing = draw(st.sampled_from(["none", "length", "chunked"])) if allow_body else "none"
    if framing == "length":
        body = draw(st.binary(max_size=80))
        content_length = len(body)
        lines.append(random_case(draw, b"Content-Length") + b": " + b"%d" % len(body))
        if draw(st.booleans()):                       # an identical repeat is allowed
            lines.append(b"content-length:%d" % len(body))
        encoded = body
    elif framing == "chunked":
        chunked = True
        lines.append(random_case(draw, b"Transfer-Encoding") + b": " + random_case(draw, b"chunked"))
        chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=5))
        body = b"".join(chunks)
        encoded = draw(chunk_encodings(chunks))
    draw(st.randoms()).shuffle(lines)
    raw = b"%s %s %s\r\n" % (method, target, version) + b"".join(l + b"\r\n" for l in lines) + b"\r\n"
    expected = dict(method=method, path=path, query=query, keep_alive=keep_alive,
                    content_length=content_length, chunked=chunked, authorization=authorization)
    max_body = len(body) + draw(st.integers(0, 10))
    return raw + encoded, expected, body, len(encoded), max_body


@st.composite
def chunk_encodings(draw, chunks):
    out = []
    for data in chunks:
        size = b"%x" % len(data)
        size = draw(st.sampled_from([size, size.upper(), b"0" + size, b"00" + size]))
        ext = draw(st.sampled_from([b"", b";a", b";name=value", b';q="x"']))
        out.append(size + ext + b"\r\n" + data + b"\r\n")
    out.append(draw(st.sampled_from([b"0", b"000"])) + draw(st.sampled_from([b"", b";end"])) + b"\r\n")
    for _ in range(draw(st.integers(0, 2))):
        out.append(draw(tokens) + b": " + draw(visible) + b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


@st.composite
def splits(draw, data):
    """``data`` cut into consecutive pieces at random points."""
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=12))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


HTTP_VOCAB = [b"GET", b"POST", b" ", b"  ", b"/", b"/sub/a?x=1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2",
              b"\r\n", b"\r\n\r\n", b"\n", b"\r", b":", b": ", b"\t", b"\x00", b"\xff",
              b"Content-Length", b"Transfer-Encoding", b"chunked", b"Connection", b"close",
              b"keep-alive", b"Authorization", b"0", b"1", b"5", b"a", b"F", b"-1", b"+1", b"0x1",
              b";", b"1_0", b"99999999999999999999", b"X-A"]
http_ish = st.lists(st.one_of(st.sampled_from(HTTP_VOCAB), st.binary(max_size=4)), max_size=60).map(b"".join)
frame_ish = st.lists(st.one_of(st.sampled_from([b"\x01", b"\x02", b"\x00", b"a", b"id", b"\xff", b"\xc3",
                                                 b"\xa9", b"\xed\xa0\x80", b"/", b"x" * 20, b"y" * 129]),
                               st.binary(max_size=3)), max_size=40).map(b"".join)


# ---------------------------------------------------------------------------
# robustness: only HttpError / FrameError ever escape
# ---------------------------------------------------------------------------

def _check_head_and_body(data, max_body):
    for buf in (data, bytearray(data)):
        try:
            req = wire.parse_head(buf)
        except wire.HttpError as e:
            assert e.status in wire.REASONS and e.status >= 400
            continue
        if req is None:
            continue
        assert 0 < req.head_end <= len(buf)
        assert isinstance(req.keep_alive, bool)
        assert req.content_length is None or req.content_length >= 0
        assert not (req.chunked and req.content_length is not None)
        try:
            parsed = wire.parse_body(buf, req, max_body)
        except wire.HttpError as e:
            assert e.status in (400, 413, 431)
            continue
        if parsed is not None:
            body, end = parsed
            assert isinstance(body, bytes) and len(body) <= max_body
            assert req.head_end <= end <= len(buf)


@FUZZ
@given(st.one_of(st.binary(max_size=300), http_ish), st.integers(0, 100))
def test_fuzz_parse_head_and_body_only_raise_http_error(data, max_body):
    _check_head_and_body(data, max_body)


@FUZZ
@given(st.one_of(st.binary(max_size=200), http_ish), st.integers(0, 100), st.booleans())
def test_fuzz_parse_body_arbitrary_body_bytes(tail, max_body, chunked):
    h = CHUNKED_HEAD if chunked else head(b"Content-Length: %d" % (len(tail) // 2))
    _check_head_and_body(h + tail, max_body)


@FUZZ
@given(st.one_of(st.binary(max_size=300), frame_ish), st.integers(0, 40))
def test_fuzz_parse_frames_only_raise_frame_error(data, max_message):
    for buf in (data, bytearray(data)):
        try:
            frames, used = wire.parse_frames(buf, max_message)
        except wire.FrameError:
            continue
        assert 0 <= used <= len(buf)
        for ident, message in frames:
            assert wire.valid_id(ident)
            assert b"\0" not in message and len(message) <= max_message
            message.decode("utf-8")
        # what was consumed parses alone to the same frames; the rest is one incomplete frame
        assert wire.parse_frames(buf[:used], max_message) == (frames, used)
        assert wire.parse_frames(buf[used:], max_message) == ([], 0)


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_parse_query_only_raises_http_error(data):
    try:
        out = wire.parse_query(data)
    except wire.HttpError as e:
        assert e.status == 400
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())


# ---------------------------------------------------------------------------
# round trips: requests
# ---------------------------------------------------------------------------

@PROPS
@given(requests())
def test_request_round_trip_every_prefix(case):
    raw, expected, body, body_len, max_body = case
    full = wire.parse_head(raw)
    assert full is not None
    head_end = full.head_end
    assert raw[head_end - 4:head_end] == b"\r\n\r\n"
    assert fields(full) == dict(expected, head_end=head_end)
    assert not hasattr(full, "__dict__")              # no header dict kept on the Request
    body_end = head_end + body_len
    assert body_end == len(raw)
    for p in range(len(raw) + 1):
        prefix = raw[:p]
        req = wire.parse_head(prefix)
        if p < head_end:
            assert req is None, p
            continue
        assert fields(req) == fields(full), p
        parsed = wire.parse_body(prefix, req, max_body)
        if p < body_end:
            assert parsed is None, p
        else:
            assert parsed == (body, body_end)


@PROPS
@given(st.data(), requests(), requests())
def test_pipelined_requests_any_split(data, first, second):
    """Feed two pipelined requests in random pieces the way worker.py does."""
    stream = first[0] + second[0]
    max_body = max(first[4], second[4])
    pieces = data.draw(splits(stream))
    buf = bytearray()
    seen = []
    for piece in pieces:
        buf += piece
        while True:
            req = wire.parse_head(buf)
            if req is None:
                break
            parsed = wire.parse_body(buf, req, max_body)
            if parsed is None:
                break
            seen.append((fields(req), parsed[0]))
            del buf[:parsed[1]]
    assert buf == b""
    assert [(f.pop("head_end"), f)[1] for f, _ in seen] == [first[1], second[1]]
    assert [b for _, b in seen] == [first[2], second[2]]


@PROPS
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8), st.data())
def test_chunked_random_chunk_sizes_decode(chunks, data):
    encoded = data.draw(chunk_encodings(chunks))
    buf = CHUNKED_HEAD + encoded + b"GET /next HTTP/1.1\r\n\r\n"
    req = wire.parse_head(buf)
    body = b"".join(chunks)
    end = len(CHUNKED_HEAD) + len(encoded)
    assert wire.parse_body(buf, req, len(body)) == (body, end)
    assert wire.parse_head(buf[end:]).path == b"/next"
    for p in range(len(CHUNKED_HEAD), end):
        assert wire.parse_body(buf[:p], req, len(body)) is None, p
    if body:
        assert http_error(wire.parse_body, buf, req, len(body) - 1) == 413


@PROPS
@given(st.sampled_from(["none", "close", "keep-alive", "Keep-Alive", "close, keep-alive",
                        "keep-alive, close", "upgrade", " CLOSE "]),
       st.sampled_from([b"HTTP/1.0", b"HTTP/1.1"]))
def test_keep_alive_property(conn, version):
    lines = [] if conn == "none" else [b"Connection: " + conn.encode()]
    req = wire.parse_head(head(*lines, version=version, method=b"GET"))
    tokens_ = [t.strip().lower() for t in conn.split(",")]
    if "close" in tokens_:
        expected = False
    elif "keep-alive" in tokens_:
        expected = True
    else:
        expected = version == b"HTTP/1.1"
    assert req.keep_alive is expected


@pytest.mark.parametrize("version,lines,expected", [
    (b"HTTP/1.1", [], True),
    (b"HTTP/1.0", [], False),
    (b"HTTP/1.1", [b"Connection: close"], False),
    (b"HTTP/1.1", [b"connection: Close"], False),
    (b"HTTP/1.1", [b"Connection: keep-alive"], True),
    (b"HTTP/1.0", [b"Connection: keep-alive"], True),
    (b"HTTP/1.0", [b"Connection: Keep-Alive"], True),
    (b"HTTP/1.0", [b"Connection: close"], False),
    (b"HTTP/1.0", [b"Connection: keep-alive, close"], False),
    (b"HTTP/1.1", [b"Connection: keep-alive", b"Connection: close"], False),
    (b"HTTP/1.1", [b"Connection: close", b"Connection: keep-alive"], False),
])
def test_keep_alive_flag(version, lines, expected):
    assert wire.parse_head(head(*lines, version=version, method=b"GET")).keep_alive is expected


def test_keep_alive_close_wins_across_repeated_headers_http10():
    req = wire.parse_head(head(b"Connection: close", b"Connection: keep-alive", version=b"HTTP/1.0"))
    assert req.keep_alive is False


def test_request_fields_basic():
    raw = (b"GET /sub/abc?since=3&callback=cb HTTP/1.1\r\nHost: x\r\n"
           b"Authorization:   Bearer t0k  \r\n\r\nGET / HTTP/1.1\r\n")
    req = wire.parse_head(raw)
    assert (req.method, req.path, req.query) == (b"GET", b"/sub/abc", b"since=3&callback=cb")
    assert req.authorization == b"Bearer t0k"
    assert req.keep_alive and not req.chunked and req.content_length is None
    assert raw[req.head_end:] == b"GET / HTTP/1.1\r\n"
    assert wire.parse_body(raw, req, 0) == (b"", req.head_end)


def test_target_with_two_question_marks_and_no_query():
    req = wire.parse_head(head(target=b"/a?b?c"))
    assert (req.path, req.query) == (b"/a", b"b?c")
    req = wire.parse_head(head(target=b"/a?"))
    assert (req.path, req.query) == (b"/a", b"")


# ---------------------------------------------------------------------------
# malformed heads and request smuggling guards
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /\r\n\r\n",
    b"GET  / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1 \r\n\r\n",
    b" GET / HTTP/1.1\r\n\r\n",
    b"GET / http/1.1\r\n\r\n",
    b"GET / HTTPS/1.1\r\n\r\n",
    b"G(T / HTTP/1.1\r\n\r\n",
    b"GET /a\x7fb HTTP/1.1\r\n\r\n",
    b"GET /\xff HTTP/1.1\r\n\r\n",
    b"GET /\tx HTTP/1.1\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET / HTTP/1.1\r\n: x\r\n\r\n",
    b"GET / HTTP/1.1\r\n Host: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\nb\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nX\xff: a\r\n\r\n",
], ids=short_id)
def test_malformed_head_400(raw):
    assert http_error(wire.parse_head, raw) == 400


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/3.0"])
def test_unsupported_version_505(version):
    assert http_error(wire.parse_head, head(version=version)) == 505


@pytest.mark.parametrize("version", [b"HTTP/", b"HTTP/x", b"HTTP/1.1/", b"HTTP/11", b"HTTP/3", b"HTTP/1.10"])
def test_garbled_version_rejected(version):
    assert http_error(wire.parse_head, head(version=version)) in (400, 505)


@pytest.mark.parametrize("lines", [
    [b"Content-Length: 5", b"Transfer-Encoding: chunked"],
    [b"Transfer-Encoding: chunked", b"Content-Length: 5"],
    [b"Transfer-Encoding: chunked", b"Content-Length: 0"],
    [b"transfer-encoding: Chunked", b"content-length: 5"],
])
def test_smuggling_both_length_and_chunked_400(lines):
    assert http_error(wire.parse_head, head(*lines)) == 400


@pytest.mark.parametrize("values", [
    [b"5", b"6"], [b"0", b"1"], [b"5", b"5", b"7"],
    [b"5, 5"], [b"5,6"], [b"+5"], [b"-5"], [b"0x5"], [b"5a"], [b""], [b"5 5"], [b"\xd9\xa5"],
    [b"1" * 19], [b"0" * 19],
], ids=short_id)
def test_smuggling_bad_or_conflicting_content_length_400(values):
    lines = [b"Content-Length: " + v for v in values]
    assert http_error(wire.parse_head, head(*lines)) == 400


def test_repeated_identical_content_length_accepted():
    raw = head(b"Content-Length: 3", b"content-length:  03 ") + b"abc"
    req = wire.parse_head(raw)
    assert req.content_length == 3
    assert wire.parse_body(raw, req, 3) == (b"abc", len(raw))


@pytest.mark.parametrize("value", [b"gzip", b"identity", b"chunked, gzip", b"gzip, chunked",
                                   b"chunked,chunked", b"xchunked", b""])
def test_smuggling_non_chunked_transfer_encoding_501(value):
    assert http_error(wire.parse_head, head(b"Transfer-Encoding: " + value)) == 501


def test_non_chunked_te_is_501_even_alongside_content_length():
    # refused either way; the body length is never guessed
    status = http_error(wire.parse_head, head(b"Content-Length: 3", b"Transfer-Encoding: gzip"))
    assert status in (400, 501)


@pytest.mark.parametrize("size", [
    b"-1", b"-0", b"+1", b"+0", b"0x1", b"0X1", b"-0x1", b"", b"g", b"1g", b"1 1", b" ", b";ext", b"\xff",
    b"_1", b"1__", b"1_0", b"0_0", b"0_1_0",          # int(text, 16) would take these
    b"1\n", b"1\r", b"1;a\nb", b"1;a\rb",             # bare LF / CR: the "funky chunks" family
    b"\x0b1", b"1\x0c", b" 1", b"\t1", b"\t0",        # blanks before the size, other whitespace
])
def test_smuggling_bad_chunk_size_400(size):
    assert http_error(chunked_body, size + b"\r\nx\r\n0\r\n\r\n") == 400


@pytest.mark.parametrize("size", [b"1 ", b"1\t", b"1 ;a", b"1;a=b;c", b'1;q="x y"', b"0001"])
def test_chunk_size_with_bws_and_extensions_accepted(size):
    assert chunked_body(size + b"\r\nx\r\n0\r\n\r\n")[0] == b"x"


def test_chunk_data_not_followed_by_crlf_400():
    assert http_error(chunked_body, b"3\r\nabcd\r\n0\r\n\r\n") == 400
    assert http_error(chunked_body, b"3\r\nabc\n\r\n0\r\n\r\n") == 400


def test_chunk_size_line_bounded():
    limit = wire.MAX_CHUNK_LINE
    assert chunked_body(b"1;" + b"e" * (limit - 4) + b"\r\nx\r\n0\r\n\r\n")[0] == b"x"
    assert chunked_body(b"1;" + b"e" * (limit - 3)) is None
    assert http_error(chunked_body, b"1;" + b"e" * (limit - 2)) == 400
    assert http_error(chunked_body, b"1;" + b"e" * (limit - 2) + b"\r\nx\r\n0\r\n\r\n") == 400


def test_chunked_with_extensions_and_trailers():
    tail = b"4;a=b\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: x\r\nX-T: y\r\n\r\nNEXT"
    body, end = chunked_body(tail)
    assert body == b"Wikipedia in\r\n\r\nchunks."
    assert (CHUNKED_HEAD + tail)[end:] == b"NEXT"


def test_chunked_on_http10_and_get_without_body():
    raw = head(b"Transfer-Encoding: chunked", version=b"HTTP/1.0") + b"1\r\nz\r\n0\r\n\r\n"
    req = wire.parse_head(raw)
    assert req.chunked and not req.keep_alive
    assert wire.parse_body(raw, req, 1) == (b"z", len(raw))
    raw = head(method=b"GET") + b"GET"
    req = wire.parse_head(raw)
    assert wire.parse_body(raw, req, 0) == (b"", req.head_end)


# ---------------------------------------------------------------------------
# limits: head 431, body 413 (as early as the bytes prove them)
# ---------------------------------------------------------------------------

def head_of(size):
    """A complete head whose text before CRLFCRLF is exactly ``size`` bytes."""
    start = b"GET / HTTP/1.1\r\nX: "
    return start + b"a" * (size - len(start)) + b"\r\n\r\n"


def test_head_limit_boundary():
    raw = head_of(wire.MAX_HEAD)
    assert wire.parse_head(raw).head_end == wire.MAX_HEAD + 4
    assert http_error(wire.parse_head, head_of(wire.MAX_HEAD + 1)) == 431
    assert http_error(wire.parse_head, head_of(3 * wire.MAX_HEAD)) == 431


def test_head_431_without_terminator():
    assert wire.parse_head(b"G" * wire.MAX_HEAD) is None
    assert http_error(wire.parse_head, b"G" * (wire.MAX_HEAD + 4)) == 431
    assert http_error(wire.parse_head, bytearray(b"GET / HTTP/1.1\r\nX: " + b"a" * wire.MAX_HEAD)) == 431
    assert http_error(wire.parse_head, b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000) == 431


@pytest.mark.parametrize("tail", [b"\r", b"\r\n", b"\r\n\r"])
def test_head_at_the_limit_waiting_for_its_terminator_is_not_431(tail):
    start = b"GET / HTTP/1.1\r\nX: "
    raw = start + b"a" * (wire.MAX_HEAD - len(start)) + tail
    assert wire.parse_head(raw) is None


@pytest.mark.parametrize("extra", [1, 2, 3])
def test_head_431_as_soon_as_the_bytes_prove_it(extra):
    assert http_error(wire.parse_head, b"G" * (wire.MAX_HEAD + extra)) == 431


def test_head_limit_parameter():
    assert wire.parse_head(b"GET / HTTP/1.1\r\n\r\n", max_head=16).head_end == 18
    assert wire.parse_head(b"GET / HTTP/1.1\r\n", max_head=16) is None
    assert http_error(wire.parse_head, b"GET / HTTP/1.1\r\nA: b\r\n\r\n", max_head=16) == 431


def test_head_limit_prefix_consistency():
    raw = head_of(wire.MAX_HEAD)
    assert wire.parse_head(raw) is not None
    for p in range(len(raw)):
        assert wire.parse_head(raw[:p]) is None, p


@PROPS
@given(st.integers(0, 200), st.integers(0, 200))
def test_content_length_413_before_the_body_arrives(length, max_body):
    raw = head(b"Content-Length: %d" % length)
    req = wire.parse_head(raw)
    if length > max_body:
        assert http_error(wire.parse_body, raw, req, max_body) == 413
    else:
        assert wire.parse_body(raw, req, max_body) == (None if length else (b"", len(raw)))
        assert wire.parse_body(raw + b"x" * length, req, max_body) == (b"x" * length, len(raw) + length)


def test_content_length_huge_413():
    raw = head(b"Content-Length: 999999999999999999")
    assert http_error(wire.parse_body, raw, wire.parse_head(raw), 65536) == 413


@PROPS
@given(st.lists(st.integers(1, 60), min_size=1, max_size=6), st.integers(0, 200))
def test_chunked_413_by_the_time_the_body_is_complete(sizes, max_body):
    stream = b"".join(b"%x\r\n" % n + b"x" * n + b"\r\n" for n in sizes) + b"0\r\n\r\n"
    buf = CHUNKED_HEAD + stream
    req = wire.parse_head(buf)
    total = sum(sizes)
    if total > max_body:
        assert http_error(wire.parse_body, buf, req, max_body) == 413
    else:
        assert wire.parse_body(buf, req, max_body) == (b"x" * total, len(buf))


@PROPS
@given(st.lists(st.integers(1, 60), min_size=1, max_size=6), st.integers(0, 200))
def test_chunked_413_as_soon_as_a_size_line_proves_it(sizes, max_body):
    """Every prefix: None until the size line that takes the total over the limit, then 413."""
    stream = b"".join(b"%x\r\n" % n + b"x" * n + b"\r\n" for n in sizes) + b"0\r\n\r\n"
    running, proof, pos = 0, None, 0
    for n in sizes:
        line = b"%x\r\n" % n
        running += n
        if running > max_body and proof is None:
            proof = pos + len(line)
        pos += len(line) + n + 2
    buf = CHUNKED_HEAD + stream
    req = wire.parse_head(buf)
    for p in range(len(stream) + 1):
        prefix = buf[:len(CHUNKED_HEAD) + p]
        if proof is not None and p >= proof:
            assert http_error(wire.parse_body, prefix, req, max_body) == 413, p
        elif p < len(stream):
            assert wire.parse_body(prefix, req, max_body) is None, p
        else:
            assert wire.parse_body(prefix, req, max_body) == (b"x" * sum(sizes), len(buf))


@pytest.mark.parametrize("tail,max_body,status", [
    (b"1\r\n", 0, 413),
    (b"ffffffff\r\n" + b"a" * 100000, 10, 413),          # no last chunk ever sent
    (b"5\r\nabcde\r\n6\r\nabcdef", 10, 413),
    (b"1;" + b"e" * 100000, 10, 400),                      # size line far over its bound
    (b"zz\r\n", 10, 400),
    (b"1\r\nxyz", 10, 400),                               # data not followed by CRLF
], ids=short_id)
def test_chunked_errors_before_the_last_chunk(tail, max_body, status):
    assert http_error(chunked_body, tail, max_body) == status


def test_chunked_single_long_trailer_431():
    tail = b"1\r\nx\r\n0\r\nX: " + b"a" * (wire.MAX_HEAD + 10)
    assert http_error(chunked_body, tail) == 431


def test_chunked_many_trailer_lines_bounded():
    tail = b"0\r\n" + b"X: y\r\n" * (2 * wire.MAX_HEAD)
    assert http_error(chunked_body, tail) in (400, 413, 431)


@pytest.mark.parametrize("trailer", [b"not a field\r\n", b"X: a\nb\r\n", b"X: a\x00\r\n", b" X: y\r\n",
                                     b"X y: z\r\n"])
def test_chunked_malformed_trailer_400(trailer):
    assert http_error(chunked_body, b"1\r\nx\r\n0\r\n" + trailer + b"\r\n") == 400


# ---------------------------------------------------------------------------
# parse_query and valid_id
# ---------------------------------------------------------------------------

def test_parse_query_basics():
    assert wire.parse_query(b"") == {}
    assert wire.parse_query(b"a=1&b=2&&a=3") == {"a": "3", "b": "2"}
    assert wire.parse_query(b"since=7&callback=jQuery_1.x&timeout=") == \
        {"since": "7", "callback": "jQuery_1.x", "timeout": ""}
    assert wire.parse_query(b"k") == {"k": ""}
    assert wire.parse_query(b"a=x%20y+z%2B%26&b=%e2%82%ac") == {"a": "x y z+&", "b": "\u20ac"}
    assert wire.parse_query(b"a=%zz%") == {"a": "%zz%"}
    assert wire.parse_query(b"a=b=c") == {"a": "b=c"}


@pytest.mark.parametrize("query", [b"a=%ff", b"%c3=1", b"a=\xff", b"a=%ed%a0%80"])
def test_parse_query_not_utf8_400(query):
    assert http_error(wire.parse_query, query) == 400


@PROPS
@given(st.lists(st.tuples(st.text(min_size=1, max_size=8), st.text(max_size=8)), max_size=6))
def test_parse_query_round_trip(pairs):
    query = "&".join(quote(k, safe="") + "=" + quote_plus(v) for k, v in pairs).encode()
    assert wire.parse_query(query) == dict(pairs)


def test_parse_query_plus_in_name_is_space():
    assert wire.parse_query(b"a+b=c+d") == {"a b": "c d"}


@PROPS
@given(st.one_of(ids, st.binary(max_size=140), st.text(ID_CHARS, min_size=120, max_size=140).map(str.encode)))
@example(b"abc\n")
@example(b"\nabc")
@example(b"a" * 128)
@example(b"a" * 129)
@example(b"")
def test_valid_id_matches_contract(ident):
    expected = 1 <= len(ident) <= 128 and all(chr(c) in ID_CHARS for c in ident)
    assert wire.valid_id(ident) is expected


@pytest.mark.parametrize("ident", [b"a/b", b"a%20", b"a.js", b"a b", b"\xc3\xa9", b"a\x00", b"a?", b"a#"])
def test_valid_id_rejects(ident):
    assert not wire.valid_id(ident)


# ---------------------------------------------------------------------------
# response(): parsed by http.client
# ---------------------------------------------------------------------------

class _KeepOpen(io.BytesIO):
    def close(self):                   # http.client closes fp after a Connection: close response
        pass


class _FakeSock:
    def __init__(self, fp):
        self.fp = fp

    def makefile(self, mode, *a, **kw):
        return self.fp


def read_responses(data, methods):
    """Parse consecutive responses from ``data``; return [(resp, body)] and what is left over."""
    fp = _KeepOpen(data)
    out = []
    for method in methods:
        resp = http.client.HTTPResponse(_FakeSock(fp), method=method)
        resp.begin()
        out.append((resp, resp.read()))
    return out, fp.read()


extra_headers = st.lists(st.tuples(tokens.filter(lambda n: n.lower() not in (
    b"content-length", b"transfer-encoding", b"connection", b"content-type")), visible),
    max_size=3).map(lambda hs: b"".join(n + b": " + v + b"\r\n" for n, v in hs))


@PROPS
@given(st.sampled_from(sorted(wire.REASONS)), st.binary(max_size=200),
       st.sampled_from([b"application/json", b"text/plain; charset=utf-8", b"application/javascript"]),
       st.booleans(), extra_headers, st.booleans())
def test_response_parsed_by_http_client(status, body, ctype, keep_alive, headers, head_only):
    raw = wire.response(status, body, ctype, keep_alive, headers, head_only)
    method = "HEAD" if head_only else "GET"
    # a second response behind the first proves the first one's framing is exact
    follow = wire.response(200, b"next", keep_alive=False)
    [(resp, got), (resp2, got2)], rest = read_responses(raw + follow, [method, "GET"])
    assert resp.status == status and resp.reason == wire.REASONS[status]
    assert resp.version == 11
    if status == 204:
        assert resp.getheader("Content-Length") is None and resp.getheader("Content-Type") is None
        assert got == b""
    else:
        assert resp.getheader("Content-Length") == str(len(body))
        assert resp.getheader("Content-Type") == ctype.decode()
        assert got == (b"" if head_only else body)
    assert resp.will_close is (not keep_alive)
    assert (resp.getheader("Connection") == "close") is (not keep_alive)
    for line in headers.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b": ")
        assert value.decode("latin-1") in resp.headers.get_all(name.decode(), [])
    assert (resp2.status, got2, rest) == (200, b"next", b"")


def test_response_204_and_head_have_no_body_bytes():
    raw = wire.response(204, b"ignored", headers=b"X-A: b\r\n")
    assert raw == b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n"
    raw = wire.response(200, b"hello", head_only=True, keep_alive=False)
    assert raw.endswith(b"Content-Length: 5\r\nConnection: close\r\n\r\n")
    raw = wire.response(200, b"hello")
    assert raw.endswith(b"\r\n\r\nhello") and raw.count(b"hello") == 1


def test_response_over_socketpair_with_http_client():
    """A real http.client connection, keep-alive, GET then HEAD then 204, over a socketpair."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    answers = [wire.response(200, b'{"x": 1}'),
               wire.response(200, b"0123456789", head_only=True),
               wire.response(204, keep_alive=False)]
    got_requests = []

    def serve():
        buf = bytearray()
        for answer in answers:
            while True:
                req = wire.parse_head(buf)
                if req is not None:
                    break
                chunk = b.recv(4096)
                if not chunk:
                    return
                buf += chunk
            got_requests.append((req.method, req.path, req.keep_alive))
            del buf[:req.head_end]
            b.sendall(answer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", timeout=5)
        conn.sock = a
        results = []
        for method, path in [("GET", "/a"), ("HEAD", "/b"), ("OPTIONS", "/c")]:
            conn.request(method, path)
            resp = conn.getresponse()
            results.append((resp.status, resp.getheader("Content-Length"), resp.read(), resp.will_close))
        assert results == [(200, "8", b'{"x": 1}', False), (200, "10", b"", False), (204, None, b"", True)]
        t.join(5)
        assert got_requests == [(b"GET", b"/a", True), (b"HEAD", b"/b", True), (b"OPTIONS", b"/c", True)]
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------
# binary frames
# ---------------------------------------------------------------------------

messages = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                   max_size=20).map(lambda s: s.encode("utf-8"))
frames_st = st.lists(st.one_of(st.just(None), st.tuples(ids, messages)), max_size=8)


def encode_frames(frames):
    return [b"\x01" if f is None else b"\x02" + f[0] + b"\0" + f[1] + b"\0" for f in frames]


def expected_at(frames, encoded, k):
    """The frames and consumed count after whole frames that fit in ``k`` bytes."""
    got, used = [], 0
    for f, e in zip(frames, encoded):
        if used + len(e) > k:
            break
        used += len(e)
        if f is not None:
            got.append(f)
    return got, used


@HEAVY
@given(frames_st, st.data())
def test_frames_every_split_point(frames, data):
    max_message = max([len(f[1]) for f in frames if f] + [0]) + data.draw(st.integers(0, 3))
    encoded = encode_frames(frames)
    stream = b"".join(encoded)
    assert wire.parse_frames(stream, max_message) == ([f for f in frames if f], len(stream))
    for k in range(len(stream) + 1):
        assert wire.parse_frames(stream[:k], max_message) == expected_at(frames, encoded, k), k
        # the connection's view: what was left over, then the rest of the stream
        got, used = wire.parse_frames(stream[:k], max_message)
        rest, used2 = wire.parse_frames(stream[used:], max_message)
        assert got + rest == [f for f in frames if f] and used + used2 == len(stream)


@PROPS
@given(frames_st, st.data())
def test_frames_fed_in_random_pieces(frames, data):
    stream = b"".join(encode_frames(frames))
    buf = bytearray()
    out = []
    for piece in data.draw(splits(stream)):
        buf += piece
        got, used = wire.parse_frames(buf, 20 * 4)
        out += got
        del buf[:used]
    assert out == [f for f in frames if f] and buf == b""


def test_frame_basics():
    assert wire.parse_frames(b"", 10) == ([], 0)
    assert wire.parse_frames(b"\x01\x01", 10) == ([], 2)
    assert wire.parse_frames(b"\x02user1\x00hello\x00\x01\x02u", 10) == ([(b"user1", b"hello")], 14)
    assert wire.parse_frames(b"\x02a\x00\x00", 0) == ([(b"a", b"")], 4)
    assert wire.parse_frames(b"\x02" + b"i" * 128 + b"\x00" + b"m" * 10 + b"\x00", 10) == \
        ([(b"i" * 128, b"m" * 10)], 141)
    assert wire.parse_frames(bytearray(b"\x02a\x00\xe2\x82\xac\x00"), 3) == ([(b"a", "\u20ac".encode())], 7)


@pytest.mark.parametrize("data", [
    b"\x00", b"\x03", b"\xff", b"G", b"\x01\x01\x7f",
    b"\x02\x00msg\x00",                       # empty id
    b"\x02a/b\x00msg\x00", b"\x02a b\x00m\x00", b"\x02a.js\x00m\x00", b"\x02\x01\x00m\x00",
    b"\x02\xc3\xa9\x00m\x00",
    b"\x02" + b"i" * 129 + b"\x00m\x00",      # id too long, terminated
    b"\x02" + b"i" * 129,                     # id too long, not terminated
    b"\x02a\x00" + b"m" * 11,                 # message too long, not terminated
    b"\x02a\x00" + b"m" * 11 + b"\x00",
    b"\x02a\x00\xff\x00", b"\x02a\x00\xc0\x80\x00", b"\x02a\x00\xed\xa0\x80\x00",
    b"\x02a\x00\xe2\x82\x00", b"\x02a\x00\xf4\x90\x80\x80\x00",
    b"\x02a\x00ok\x00\x02b\x00\xff\x00",      # error after a good frame
], ids=short_id)
def test_malformed_frames_raise(data):
    with pytest.raises(wire.FrameError):
        wire.parse_frames(data, 10)


@pytest.mark.parametrize("data", [
    b"\x02" + b"i" * 128,                     # 128 id bytes: could still be terminated
    b"\x02a\x00" + b"m" * 10,                 # max_message bytes: could still be terminated
    b"\x02a\x00\xe2\x82",                     # an incomplete UTF-8 sequence, not yet invalid
    b"\x02",
], ids=short_id)
def test_incomplete_frames_not_errors(data):
    assert wire.parse_frames(data, 10) == ([], 0)


@st.composite
def bad_tails(draw, max_message):
    """(bytes of one malformed frame, the length at which its bytes first prove it bad)."""
    kind = draw(st.sampled_from(["byte", "long_id", "long_message"]))
    if kind == "byte":
        b = draw(st.integers(0, 255).filter(lambda b: b not in (1, 2)))
        return bytes([b]) + draw(st.binary(max_size=5)), 1
    if kind == "long_id":
        ident = draw(st.text(ID_CHARS, min_size=129, max_size=160)).encode()
        return b"\x02" + ident + draw(st.sampled_from([b"", b"\x00m\x00"])), 130
    ident = draw(ids)
    size = max_message + draw(st.integers(1, 10))
    start = b"\x02" + ident + b"\x00"
    return start + b"m" * size + draw(st.sampled_from([b"", b"\x00"])), len(start) + max_message + 1


@HEAVY
@given(frames_st, st.integers(0, 30), st.data())
def test_frame_errors_raised_exactly_when_proven(frames, max_message, data):
    frames = [f for f in frames if f is None or len(f[1]) <= max_message]
    good = b"".join(encode_frames(frames))
    bad, proof = data.draw(bad_tails(max_message))
    stream = good + bad
    for k in range(len(stream) + 1):
        if k >= len(good) + proof:
            with pytest.raises(wire.FrameError) as info:
                wire.parse_frames(stream[:k], max_message)
            # the valid frames before the bad one travel with the error, to be published
            assert info.value.frames == [f for f in frames if f], k
        else:
            got, used = wire.parse_frames(stream[:k], max_message)
            assert used <= len(good)


def test_frame_error_carries_the_frames_before_it():
    with pytest.raises(wire.FrameError) as info:
        wire.parse_frames(b"\x02a\x00one\x00\x01\x02b\x00two\x00\x02c/", 10)
    assert info.value.frames == [(b"a", b"one"), (b"b", b"two")]
    with pytest.raises(wire.FrameError) as info:
        wire.parse_frames(b"\x07", 10)
    assert info.value.frames == []


def test_long_id_error_before_message_arrives():
    # 129 id bytes and no NUL: raised now, not when a message or terminator comes
    with pytest.raises(wire.FrameError):
        wire.parse_frames(b"\x02" + b"a" * 129, 65536)
    with pytest.raises(wire.FrameError):
        wire.parse_frames(b"\x01\x02x\x00y\x00\x02" + b"a" * 129, 65536)


def test_long_message_error_before_terminator():
    with pytest.raises(wire.FrameError):
        wire.parse_frames(b"\x02a\x00" + b"m" * 65537, 65536)
    assert wire.parse_frames(b"\x02a\x00" + b"m" * 65536, 65536) == ([], 0)


@pytest.mark.parametrize("data", [b"\x02a/b", b"\x02/", b"\x02ok\x01", b"\x02\xc3", b"\x01\x02a b"])
def test_invalid_id_char_raised_before_terminator(data):
    with pytest.raises(wire.FrameError):
        wire.parse_frames(data, 10)


@PROPS
@given(st.binary(max_size=128).filter(lambda b: b"\0" not in b))
def test_unterminated_id_raises_iff_a_byte_proves_it_invalid(partial):
    bad = any(chr(c) not in ID_CHARS for c in partial)
    if bad:
        with pytest.raises(wire.FrameError):
            wire.parse_frames(b"\x02" + partial, 10)
    else:
        assert wire.parse_frames(b"\x02" + partial, 10) == ([], 0)


def _utf8_proven_bad(message):
    """True when no continuation can make ``message`` UTF-8 (CPython's incremental decoder)."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(message, final=False)
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.parametrize("message", [b"\xff", b"ok\xc0", b"\xe2\x28", b"\xe0\x80", b"\xf4\x90", b"\x80",
                                     b"\xed\xa0\x80"])
def test_non_utf8_message_raised_before_terminator(message):
    assert _utf8_proven_bad(message)
    with pytest.raises(wire.FrameError):
        wire.parse_frames(b"\x02a\x00" + message, 10)


@PROPS
@given(st.lists(st.one_of(st.sampled_from([b"\xe2", b"\x82", b"\xac", b"\xc3", b"\xa9", b"\xf0", b"\x9f",
                                           b"\xff", b"a", b"\xed", b"\xa0"]), st.binary(max_size=2)),
                max_size=8).map(b"".join).filter(lambda b: b"\0" not in b))
def test_unterminated_message_raises_iff_proven_not_utf8(message):
    max_message = 64
    data = b"\x02a\x00" + message
    if _utf8_proven_bad(message):
        with pytest.raises(wire.FrameError):
            wire.parse_frames(data, max_message)
    else:
        assert wire.parse_frames(data, max_message) == ([], 0)
        # and once terminated it is accepted exactly when it is UTF-8
        try:
            message.decode("utf-8")
            valid = True
        except UnicodeDecodeError:
            valid = False
        if valid:
            assert wire.parse_frames(data + b"\0", max_message) == ([(b"a", message)], len(data) + 1)
        else:
            with pytest.raises(wire.FrameError):
                wire.parse_frames(data + b"\0", max_message)

"""Bad input on both ports, end to end: real server processes, real sockets.

The issue's "Bad input" section, one test (or more) per item.  After every
bad input the test proves that the server still serves: the worker pids in
/stats are the ones from before (no worker died and was restarted), and
publish/subscribe round trips work, both buffered and held.
"""

import json
import os
import random
import re
import resource
import socket
import struct
import threading
import time
import uuid

import pytest

from conftest import Server, is_closed, read_response, wait_for

HEADER_TIMEOUT = 1.0        # --header-timeout of the shared server
MAX_MESSAGE = 1024          # --max-message of the shared server
MAX_BODY = 65536            # --max-body of the shared server


# -- the shared server and helpers ---------------------------------------------

@pytest.fixture(scope="module")
def srv():
    """One server for the module (most tests only need one); stopped by pid at the end."""
    server = Server("--header-timeout", HEADER_TIMEOUT, "--max-message", MAX_MESSAGE,
                    "--max-body", MAX_BODY, "--poll-timeout", 30, "--max-ids", 100000,
                    "--shm-mb", 32, workers=2)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def uid(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:12])


def connect(port, timeout=5.0):
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_until_close(sock, timeout):
    """Read until EOF/reset or timeout: (bytes, closed, seconds waited)."""
    start = time.monotonic()
    deadline = start + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), False, time.monotonic() - start
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return b"".join(chunks), False, time.monotonic() - start
        except (ConnectionResetError, ConnectionAbortedError):
            return b"".join(chunks), True, time.monotonic() - start
        if not chunk:
            return b"".join(chunks), True, time.monotonic() - start
        chunks.append(chunk)


def exchange(port, data, timeout=3.0):
    """Send ``data`` on a fresh connection; return (reply bytes, closed by the server?)."""
    with connect(port) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return b"", True
        reply, closed, _ = read_until_close(sock, timeout)
        return reply, closed


def status_of(reply):
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", reply)
    return int(m.group(1)) if m else None


def open_poll(port, path):
    sock = connect(port)
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: test\r\n\r\n" % path.encode())
    return sock


def assert_serving(server, pids):
    """The same workers are alive, and buffered and held round trips work."""
    assert server.worker_pids() == pids, "a worker died and was restarted"
    # Buffered: several requests, each on its own connection, so every worker takes part.
    for i in range(6):
        ident = uid("ok%d" % i)
        seq = server.pub(ident, "hello %d" % i)
        status, _, body = server.sub(ident, since=seq - 1, timeout=3, wait=6)
        assert status == 200, body
        assert json.loads(body)["messages"] == [{"seq": seq, "data": "hello %d" % i}]
    # Held: a long-poll that is waiting when the message is published.
    for i in range(4):
        ident = uid("live%d" % i)
        with open_poll(server.client, "/sub/%s?timeout=5" % ident) as sock:
            seq = server.pub(ident, "live")
            status, _, body = read_response(sock, timeout=6)
        assert status == 200
        assert json.loads(body)["messages"] == [{"seq": seq, "data": "live"}]
    assert server.worker_pids() == pids
    assert "Traceback" not in server.stderr()


@pytest.fixture
def pids(srv):
    """The worker pids when the test starts (and a check that nothing had broken before)."""
    return srv.worker_pids()


# -- malformed requests ---------------------------------------------------------

BAD_REQUEST_LINES = [
    b"GARBAGE\r\n\r\n",
    b"GET /sub/abc\r\n\r\n",
    b"GET /sub/abc HTTP/1.1 extra\r\n\r\n",
    b"GET  /sub/abc HTTP/1.1\r\n\r\n",
    b"GET /sub/abc  HTTP/1.1\r\n\r\n",
    b"GET /sub/abc FTP/1.1\r\n\r\n",
    b"G(T /sub/abc HTTP/1.1\r\n\r\n",
    b"GET /sub/a\x7fbc HTTP/1.1\r\n\r\n",
    b"GET /sub/a\xffbc HTTP/1.1\r\n\r\n",
    b"GET /sub/a\tbc HTTP/1.1\r\n\r\n",
    b"GET\r\nHost: x\r\n\r\n",
]


@pytest.mark.parametrize("port_name", ["client", "app"])
def test_malformed_request_line_gets_400_and_close(srv, pids, port_name):
    port = getattr(srv, port_name)
    for line in BAD_REQUEST_LINES:
        reply, closed = exchange(port, line, timeout=HEADER_TIMEOUT * 0.7)
        assert status_of(reply) == 400, (line, reply)
        assert closed, ("connection left open after 400", line)
    assert_serving(srv, pids)


@pytest.mark.parametrize("version", [b"HTTP/1.1x", b"HTTP/1", b"HTTP/1.", b"HTTP/11", b"HTTP/1.1.1"])
def test_malformed_http_version_gets_400(srv, pids, version):
    reply, closed = exchange(srv.client, b"GET /sub/abc %s\r\n\r\n" % version,
                             timeout=HEADER_TIMEOUT * 0.7)
    assert status_of(reply) == 400, reply
    assert closed
    assert srv.worker_pids() == pids


BAD_HEADER_LINES = [
    b"NoColonHere\r\n",
    b"Bad Name: value\r\n",
    b": no-name\r\n",
    b" folded: value\r\n",
    b"Host: a\r\n continued-obs-fold\r\n",
    b"X(y): value\r\n",
    b"X-Nul: a\x00b\r\n",
    b"X-Cr: a\rb\r\n",
    b"Content-Length: abc\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: 1\r\nContent-Length: 2\r\n",
]


@pytest.mark.parametrize("port_name", ["client", "app"])
def test_malformed_header_line_gets_400_and_close(srv, pids, port_name):
    port = getattr(srv, port_name)
    for header in BAD_HEADER_LINES:
        request = b"GET /sub/abc HTTP/1.1\r\nHost: test\r\n" + header + b"\r\n"
        reply, closed = exchange(port, request, timeout=HEADER_TIMEOUT * 0.7)
        assert status_of(reply) == 400, (header, reply)
        assert closed, ("connection left open after 400", header)
    assert_serving(srv, pids)


@pytest.mark.parametrize("port_name", ["client", "app"])
def test_headers_over_8k_get_431_and_close(srv, pids, port_name):
    port = getattr(srv, port_name)
    control = b"OPTIONS /sub/abc HTTP/1.1\r\n" if port_name == "client" else b"GET /health HTTP/1.1\r\n"
    # A head just under the limit is fine (and keeps the connection).
    near = control + b"X-Pad: " + b"a" * 7900 + b"\r\n\r\n"
    assert len(near) < 8192
    reply, closed = exchange(port, near, timeout=0.5)
    assert status_of(reply) in (200, 204), reply[:200]
    assert not closed
    heads = [
        # one huge header, complete
        control + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n",
        # many small headers, complete
        control + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(250)) + b"\r\n",
        # never ending: no blank line at all, 9000 bytes in
        control + b"X-Big: " + b"a" * 9000,
    ]
    for head in heads:
        assert len(head) > 8192
        reply, closed = exchange(port, head, timeout=HEADER_TIMEOUT * 0.7)
        assert status_of(reply) == 431, reply[:200]
        assert closed
    assert_serving(srv, pids)


# -- slowloris --------------------------------------------------------------------

def trickle_until_closed(sock, start, pieces, interval=0.15, limit=4.0):
    """Send one piece every ``interval`` s; return seconds from ``start`` to the server's close.

    Any bytes the server sends back are returned too (a slowloris gets no answer).
    """
    got = b""
    pieces = iter(pieces)
    while time.monotonic() - start < limit:
        piece = next(pieces, b"")
        if piece:
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - start, got
        sock.settimeout(interval)
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        except (ConnectionResetError, ConnectionAbortedError):
            return time.monotonic() - start, got
        if not chunk:
            return time.monotonic() - start, got
        got += chunk
    return None, got


def run_concurrently(functions, timeout=10.0):
    results = [None] * len(functions)
    errors = []

    def run(i, f):
        try:
            results[i] = f()
        except BaseException as e:     # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, f), daemon=True) for i, f in enumerate(functions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "scenario thread did not finish"
    if errors:
        raise errors[0]
    return results


def slow_head_scenario(port, first, pieces):
    def scenario():
        sock = connect(port)
        start = time.monotonic()
        try:
            if first:
                sock.sendall(first)
            return trickle_until_closed(sock, start, pieces)
        finally:
            sock.close()
    return scenario


def test_slowloris_head_closed_after_header_timeout(srv, pids):
    """A head not complete within --header-timeout of the connection's start: closed."""
    trickle = [b"a"] * 100                     # valid header bytes, never a line end
    lines = [b"X-Slow-%d: y\r\n" % i for i in range(100)]   # complete lines, never the blank one
    scenarios = [
        slow_head_scenario(srv.client, b"GET /sub/abc HTTP/1.1\r\nX-Slow: ", trickle),
        slow_head_scenario(srv.client, b"GET /sub/abc HTTP/1.1\r\n", lines),
        slow_head_scenario(srv.client, b"GE", [b"T", b" ", b"/"] + [b"x"] * 100),
        slow_head_scenario(srv.client, b"", []),                  # connects, says nothing
        slow_head_scenario(srv.app, b"POST /pub/abc HTTP/1.1\r\nX-Slow: ", trickle),
        slow_head_scenario(srv.app, b"GET /stats HTTP/1.1\r\n", lines),
        slow_head_scenario(srv.app, b"", []),
    ]
    for elapsed, got in run_concurrently(scenarios):
        assert elapsed is not None, "slow connection never closed"
        assert 0.8 <= elapsed <= 3.0, elapsed
        assert status_of(got) in (None, 408), got
    assert_serving(srv, pids)


def keepalive_scenario(port, request, after, second=None, second_at=None):
    """Answer one request, then idle/trickle: seconds from the answer to the close."""
    def scenario():
        sock = connect(port)
        try:
            sock.sendall(request)
            status, _, _ = read_response(sock, timeout=3)
            assert status in (200, 204), status
            answered = time.monotonic()
            if second is not None:
                # A second request in time is served, and restarts the clock.
                time.sleep(second_at)
                sock.sendall(second)
                status, _, _ = read_response(sock, timeout=3)
                assert status in (200, 204), status
                answered = time.monotonic()
            if after:
                sock.sendall(after[0])
            return trickle_until_closed(sock, answered, after[1:] if after else [])
        finally:
            sock.close()
    return scenario


def test_slowloris_idle_keepalive_closed_after_header_timeout(srv, pids):
    """On keep-alive, --header-timeout runs from the end of the previous request."""
    ident = uid("ka")
    srv.pub(ident, "buffered")
    client_req = b"GET /sub/%s?since=0 HTTP/1.1\r\nHost: localhost\r\n\r\n" % ident.encode()
    options = b"OPTIONS /sub/abc HTTP/1.1\r\nHost: localhost\r\n\r\n"
    health = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
    trickle = [b"GET /sub/abc HTTP/1.1\r\nX: "] + [b"z"] * 100
    scenarios = [
        keepalive_scenario(srv.client, client_req, None),
        keepalive_scenario(srv.client, options, trickle),
        keepalive_scenario(srv.client, options, None, second=client_req, second_at=0.6),
        keepalive_scenario(srv.app, health, None),
        keepalive_scenario(srv.app, health, [b"GET /stats HTTP/1.1\r\nX: "] + [b"z"] * 100),
        keepalive_scenario(srv.app, health, None, second=health, second_at=0.6),
    ]
    # Meanwhile a long-poll longer than the header timeout is not cut by it.
    poll_ident = uid("hold")
    poll = open_poll(srv.client, "/sub/%s?timeout=2" % poll_ident)
    started = time.monotonic()
    try:
        for elapsed, got in run_concurrently(scenarios):
            assert elapsed is not None, "idle keep-alive connection never closed"
            assert 0.8 <= elapsed <= 3.0, elapsed
            assert got == b"", got
        status, _, body = read_response(poll, timeout=4)
        waited = time.monotonic() - started
    finally:
        poll.close()
    assert status == 200
    doc = json.loads(body)
    assert type(doc.pop("epoch")) is int and doc == {"id": poll_ident, "messages": [], "last": 0}
    assert 1.8 <= waited <= 3.5, waited
    assert_serving(srv, pids)


# -- bodies -------------------------------------------------------------------------

def post(port, path, body, headers=b""):
    return b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path.encode(), len(body), headers, body)


def test_body_over_limit_gets_413(srv, pids):
    ident = uid("big")
    # At the limit: accepted.
    status, _, reply = srv.request("POST", "/pub/" + ident, b"m" * MAX_MESSAGE)
    assert status == 202, reply
    assert json.loads(reply) == {"id": ident, "seq": 1, "subscribers": 0}
    # One byte over --max-message on POST /pub/<id>.
    reply, closed = exchange(srv.app, post(srv.app, "/pub/" + ident, b"m" * (MAX_MESSAGE + 1)))
    assert status_of(reply) == 413, reply
    assert closed
    # The same, chunked.
    chunked = (b"POST /pub/%s HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"300\r\n%s\r\n300\r\n%s\r\n0\r\n\r\n" % (ident.encode(), b"c" * 0x300, b"c" * 0x300))
    reply, closed = exchange(srv.app, chunked)
    assert status_of(reply) == 413, reply
    assert closed
    # A Content-Length over --max-body is refused from the head alone, before any body.
    for path in ("/pub/" + ident, "/pub"):
        head = b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (path.encode(), MAX_BODY + 1)
        reply, closed = exchange(srv.app, head, timeout=HEADER_TIMEOUT * 0.7)
        assert status_of(reply) == 413, (path, reply)
        assert closed
    head = b"POST /pub HTTP/1.1\r\nHost: localhost\r\nContent-Length: 999999999999\r\n\r\n"
    reply, closed = exchange(srv.app, head, timeout=HEADER_TIMEOUT * 0.7)
    assert status_of(reply) == 413, reply
    # A body on the client port far over any limit.
    head = b"GET /sub/%s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000000\r\n\r\n" % ident.encode()
    reply, closed = exchange(srv.client, head, timeout=HEADER_TIMEOUT * 0.7)
    assert status_of(reply) == 413, reply
    assert closed
    # Nothing over the limit was stored: only the first message.
    status, _, body = srv.sub(ident, since=0, timeout=1)
    doc = json.loads(body)
    assert [m["seq"] for m in doc["messages"]] == [1] and doc["last"] == 1
    assert_serving(srv, pids)


def test_chunked_body_over_max_body_gets_413_before_it_ends(srv, pids):
    """A chunked body known to exceed --max-body gets 413 at once, not when it ends."""
    sock = connect(srv.app)
    try:
        sock.sendall(b"POST /pub HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"1000\r\n" + b"x" * 0x1000 + b"\r\n"
        sent = 0
        try:
            while sent <= MAX_BODY + 0x1000:
                sock.sendall(chunk)
                sent += 0x1000
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply, closed, _ = read_until_close(sock, HEADER_TIMEOUT * 0.6)
    finally:
        sock.close()
    assert status_of(reply) == 413, reply[:200]
    assert closed
    assert_serving(srv, pids)


@pytest.mark.parametrize("body", [b"\xff\xfe", b"abc\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"ok\x80ok"],
                         ids=["bom-like", "truncated", "overlong", "surrogate", "stray-continuation"])
def test_non_utf8_body_gets_400(srv, pids, body):
    ident = uid("utf")
    reply, closed = exchange(srv.app, post(srv.app, "/pub/" + ident, body))
    assert status_of(reply) == 400, reply
    assert closed
    # Nothing was stored: the next valid message is the id's first.
    assert srv.pub(ident, "valid é") == 1
    assert_serving(srv, pids)


def test_non_utf8_line_in_batch_is_a_line_error(srv, pids):
    a, b = uid("ba"), uid("bb")
    body = (json.dumps({"id": a, "data": "one"}).encode() + b"\n" +
            b'{"id": "' + b.encode() + b'", "data": "\xff\xfe"}\n' +
            json.dumps({"id": a, "data": "two"}).encode())
    status, _, reply = srv.request("POST", "/pub", body)
    assert status == 202, reply
    doc = json.loads(reply)
    assert doc["published"] == 2
    assert [e["line"] for e in doc["errors"]] == [2]
    assert_serving(srv, pids)


# -- binary garbage ---------------------------------------------------------------

def garbage_payloads(rng):
    payloads = [
        b"\x00",
        b"\x00" * 10000,
        b"\xff" * 5000,
        b"\r\n\r\n",
        b"\r\n\r\n" + bytes(rng.randrange(256) for _ in range(500)),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(rng.randrange(256) for _ in range(300)),  # TLS hello
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /" + bytes(rng.randrange(256) for _ in range(300)) + b" HTTP/1.1\r\n\r\n",
        b"GET /sub/x HTTP/1.1\r\n" + bytes(rng.randrange(256) for _ in range(300)) + b"\r\n\r\n",
    ]
    for size in (1, 2, 7, 64, 1000, 8191, 8193, 40000, 200000):
        payloads.append(bytes(rng.randrange(256) for _ in range(size)))
        payloads.append(bytes(rng.randrange(256) for _ in range(size)) + b"\r\n\r\n")
    return payloads


def garbage_scenario(port, payload):
    def scenario():
        sock = connect(port)
        try:
            try:
                sock.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                return b"", True
            reply, closed, _ = read_until_close(sock, HEADER_TIMEOUT + 2.5)
            return reply, closed
        finally:
            sock.close()
    return scenario


@pytest.mark.parametrize("port_name", ["client", "app"])
def test_binary_garbage_gets_4xx_or_close_never_a_crash(srv, pids, port_name):
    port = getattr(srv, port_name)
    rng = random.Random(0x3E9A + (port_name == "app"))
    payloads = garbage_payloads(rng)
    if port_name == "app":   # also garbage behind each first byte the app port dispatches on
        payloads += [b"\x02" + p for p in payloads[:8]] + [b"\x01" * 3 + b"\x7f" + p for p in payloads[:4]]
        payloads += [b"G" + p for p in payloads[:8]]
    results = run_concurrently([garbage_scenario(port, p) for p in payloads], timeout=15)
    for payload, (reply, closed) in zip(payloads, results):
        assert closed, ("connection left open", payload[:40])
        if reply:
            status = status_of(reply)
            # 4xx; or 505 for something that names another HTTP version (the HTTP/2 preface)
            assert status is not None and (400 <= status < 500 or status == 505), \
                (payload[:40], reply[:200])
    assert_serving(srv, pids)


# -- the app port's first byte and the binary protocol -----------------------------------

@pytest.mark.parametrize("first", [b"\x00", b"\x03", b"\x04", b"\x1b", b"\x7f", b"\x80", b"\xff",
                                   b"0", b"9", b" ", b"\r", b"\n", b"{", b"[", b"/", b"@"])
def test_app_port_first_byte_neither_letter_nor_binary_closes(srv, pids, first):
    reply, closed = exchange(srv.app, first + b"GET /health HTTP/1.1\r\n\r\n",
                             timeout=HEADER_TIMEOUT * 0.6)
    assert closed, "not closed before the header timeout"
    assert reply == b""
    assert_serving(srv, pids)


def test_app_port_letters_and_binary_bytes_are_accepted(srv, pids):
    """Controls for the test above: a letter starts HTTP, 0x01 (ping) and 0x02 the binary protocol."""
    reply, closed = exchange(srv.app, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert status_of(reply) == 200 and closed
    reply, closed = exchange(srv.app, b"\x01\x01\x01", timeout=0.4)
    assert reply == b"" and not closed
    ident = uid("bin")
    reply, closed = exchange(srv.app, b"\x02%s\x00hi\x00" % ident.encode(), timeout=0.4)
    assert reply == b"" and not closed
    status, _, body = srv.sub(ident, since=0, timeout=3)
    assert json.loads(body)["messages"] == [{"seq": 1, "data": "hi"}]


def frame(ident, message):
    return b"\x02" + ident.encode() + b"\x00" + message + b"\x00"


BAD_FRAMES = {
    "id-too-long": lambda ok: b"\x02" + b"a" * 129 + b"\x00msg\x00",
    "id-too-long-unterminated": lambda ok: b"\x02" + b"a" * 400,
    "id-empty": lambda ok: b"\x02\x00msg\x00",
    "id-slash": lambda ok: frame("a/b", b"msg"),
    "id-dot": lambda ok: frame("a.b", b"msg"),
    "id-percent": lambda ok: frame("a%20b", b"msg"),
    "id-non-ascii": lambda ok: b"\x02caf\xc3\xa9\x00msg\x00",
    "message-over-limit": lambda ok: frame(ok, b"x" * (MAX_MESSAGE + 1)),
    "message-over-limit-unterminated": lambda ok: b"\x02" + ok.encode() + b"\x00" + b"x" * 5000,
    "message-not-utf8": lambda ok: frame(ok, b"caf\xe9"),
    "message-truncated-utf8": lambda ok: frame(ok, b"\xe2\x82"),
    "unknown-byte-mid-stream": lambda ok: frame(ok, b"before") + b"\x03" + frame(ok, b"after"),
    "letter-mid-stream": lambda ok: frame(ok, b"before") + b"GET /health HTTP/1.1\r\n\r\n",
    "nul-mid-stream": lambda ok: frame(ok, b"before") + b"\x00" + frame(ok, b"after"),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_malformed_binary_frame_closes_only_that_connection(srv, pids, case):
    good_id, bad_id = uid("good"), uid("bad")
    good = connect(srv.app)
    bad = connect(srv.app)
    try:
        # The good link is a binary link (a ping, then a frame split at every byte).
        good.sendall(b"\x01")
        for byte in frame(good_id, b"first"):
            good.sendall(bytes((byte,)))
        log_before = len(srv.stderr())
        payload = BAD_FRAMES[case](bad_id)
        try:
            bad.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply, closed, _ = read_until_close(bad, HEADER_TIMEOUT * 0.7)
        assert closed, "bad binary connection left open"
        assert reply == b""
        # One log line says why.
        wait_for(lambda: len(srv.stderr()) > log_before, timeout=3, message="a log line")
        new_log = srv.stderr()[log_before:]
        assert 1 <= len(new_log.strip().splitlines()) <= 3, new_log
        assert "Traceback" not in new_log
        # The good link, open all along, still works: a message at the limit, then another.
        assert not is_closed(good)
        good.sendall(frame(good_id, b"m" * MAX_MESSAGE) + frame(good_id, "dernier é".encode()))
        time.sleep(0.1)
        assert not is_closed(good)
    finally:
        good.close()
        bad.close()
    wait_for(lambda: json.loads(srv.sub(good_id, since=0, timeout=3)[2])["last"] == 3, timeout=5,
             message="the good link's three messages")
    messages = json.loads(srv.sub(good_id, since=0, timeout=3)[2])["messages"]
    assert [m["data"] for m in messages] == ["first", "m" * MAX_MESSAGE, "dernier é"]
    # What came before the bad byte on the bad link was published, nothing after it
    # (in the same segment as the bad byte: the next test varies the segmentation).
    if case.endswith("mid-stream"):
        status, _, body = srv.sub(bad_id, since=0, timeout=3)
        assert [m["data"] for m in json.loads(body)["messages"]] == ["before"]
        time.sleep(0.2)
        status, _, body = srv.sub(bad_id, since=1, timeout=1)
        assert json.loads(body)["messages"] == []
    assert_serving(srv, pids)


def test_valid_frames_before_a_malformed_one_are_published_whatever_the_segmentation(srv, pids):
    ident = uid("seg")
    with connect(srv.app) as sock:
        sock.sendall(frame(ident, b"one") + frame(ident, b"two") + b"\x03" + frame(ident, b"three"))
        reply, closed, _ = read_until_close(sock, HEADER_TIMEOUT * 0.7)
    assert closed and reply == b""
    wait_for(lambda: json.loads(srv.sub(ident, since=0, timeout=2)[2])["last"] >= 2, timeout=5,
             message="the two valid frames")
    time.sleep(0.2)
    status, _, body = srv.sub(ident, since=0, timeout=1)
    assert [m["data"] for m in json.loads(body)["messages"]] == ["one", "two"]
    assert_serving(srv, pids)


# -- clients that go away while held -------------------------------------------------

def totals(server):
    return server.stats()["totals"]


def test_client_disconnecting_while_held_frees_its_slot(srv, pids):
    n_sub, n_js = 450, 50
    base = totals(srv)
    log_before = len(srv.stderr())
    prefix = uid("gone")
    socks = []
    try:
        for i in range(n_sub):
            socks.append(open_poll(srv.client, "/sub/%s-%d?timeout=60" % (prefix, i)))
        for i in range(n_js):
            socks.append(open_poll(srv.client, "/%s-js-%d.js" % (prefix, i)))
        wait_for(lambda: totals(srv)["subscribers"] == base["subscribers"] + n_sub + n_js,
                 timeout=10, message="every poll held")
        per_worker = [w["subscribers"] for w in srv.stats()["workers"]]
        assert all(per_worker), per_worker      # every worker held some
        delivered = totals(srv)["delivered"]
        for i, sock in enumerate(socks):
            if i % 2:       # half reset, half closed cleanly
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: totals(srv)["subscribers"] == base["subscribers"], timeout=5,
             message="subscribers back to where they were")
    wait_for(lambda: totals(srv)["connections"] <= base["connections"], timeout=5,
             message="connections back to where they were")
    # Publishing to every id that lost its subscriber works, and writes to nobody.
    items = [("%s-%d" % (prefix, i), "after %d" % i) for i in range(n_sub)]
    items += [("%s-js-%d" % (prefix, i), "js %d" % i) for i in range(n_js)]
    reply = srv.pub_batch(items)
    assert reply == {"published": n_sub + n_js, "errors": []}
    time.sleep(0.6)                              # two housekeeping ticks
    assert totals(srv)["delivered"] == delivered, "something was written for a departed client"
    # The messages wait for the next readers, compat cursor included.
    status, _, body = srv.sub("%s-7" % prefix, since=0, timeout=2)
    assert json.loads(body)["messages"] == [{"seq": 1, "data": "after 7"}]
    for i in range(n_js):
        status, headers, body = srv.request("GET", "/%s-js-%d.js" % (prefix, i), port=srv.client, timeout=3)
        assert (status, body) == (200, b"js %d" % i)
    # No log storm, nothing alarming.
    new_log = srv.stderr()[log_before:]
    assert len(new_log) < 1000, new_log[:2000]
    for word in ("Traceback", "Broken pipe", "EPIPE", "Bad file descriptor", "internal error"):
        assert word not in new_log
    assert_serving(srv, pids)


def test_compat_message_published_right_after_a_compat_poll_left_is_not_lost(srv, pids):
    lost = []
    for i in range(5):
        if lost:
            break
        ident = uid("cgone%d" % i)
        sock = open_poll(srv.client, "/%s.js" % ident)
        wait_for(lambda: totals(srv)["subscribers"] >= 1, timeout=3, message="the poll held")
        time.sleep(0.05)
        sock.close()
        time.sleep(0.02)
        srv.pub(ident, "for the next reader")
        try:
            status, _, body = srv.request("GET", "/%s.js" % ident, port=srv.client, timeout=2)
        except socket.timeout:
            status, body = "no answer in 2 s", b""
        if (status, body) != (200, b"for the next reader"):
            lost.append((ident, status, body))
    assert lost == []
    assert_serving(srv, pids)


# -- accept() failing with EMFILE ------------------------------------------------------

FD_LIMIT = 80


def limit_fds():
    """Run in the server process: RLIMIT_NOFILE soft = hard = FD_LIMIT."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def low_fd_server():
    server = Server("--header-timeout", 60, "--poll-timeout", 60, "--max-ids", 10000,
                    "--shm-mb", 16, workers=2, preexec_fn=limit_fds)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_client_flood_leaves_the_app_port_its_fds(low_fd_server):
    """Subscribers alone cannot take every fd: /health and publishing still answer at once."""
    server = low_fd_server
    assert "fd limit %d" % FD_LIMIT in server.banner
    pids = server.worker_pids()
    log_before = len(server.stderr())
    ident = uid("reserve")
    extra = []
    try:
        # Far more connections than both workers have fds for; the kernel queues the rest.
        for _ in range(4 * FD_LIMIT):
            extra.append(connect(server.client))
        wait_for(lambda: reserve_lines(server.stderr()[log_before:]), timeout=5,
                 message="the workers to stop accepting subscribers")
        cpu_before = {pid: cpu_seconds(pid) for pid in pids}
        for _ in range(5):
            started = time.monotonic()
            assert _health(server) == 200
            assert server.pub(ident, "through the reserve") >= 1
            assert time.monotonic() - started < 1.0
        time.sleep(1.0)
        cpu_used = {pid: cpu_seconds(pid) - cpu_before[pid] for pid in pids}
        assert all(used < 0.5 for used in cpu_used.values()), ("busy loop at the cap", cpu_used)
        assert not emfile_lines(server.stderr()[log_before:])
    finally:
        for sock in extra:
            sock.close()
    assert server.worker_pids() == pids, "a worker died and was restarted"
    assert_serving(server, pids)                  # subscribers are accepted again
    assert len(reserve_lines(server.stderr()[log_before:])) <= 4 * len(pids)


def test_accept_emfile_pauses_logs_once_no_busy_loop_and_recovers(low_fd_server):
    server = low_fd_server
    pids = server.worker_pids()
    log_before = len(server.stderr())
    extra = []
    try:
        # The app port has no cap of its own: flooding it runs the workers out of fds.
        for _ in range(4 * FD_LIMIT):
            extra.append(connect(server.app))
        wait_for(lambda: emfile_lines(server.stderr()[log_before:]), timeout=5,
                 message="the workers to report EMFILE")
        time.sleep(0.3)
        cpu_before = {pid: cpu_seconds(pid) for pid in pids}
        time.sleep(2.0)
        cpu_used = {pid: cpu_seconds(pid) - cpu_before[pid] for pid in pids}
        for pid in pids:
            assert os.path.exists("/proc/%d" % pid), "worker %d died on EMFILE" % pid
        assert all(used < 0.5 for used in cpu_used.values()), ("busy loop while out of fds", cpu_used)
        # Logged once per worker while it lasts, not once per retry.
        lines = emfile_lines(server.stderr()[log_before:])
        assert 1 <= len(lines) <= len(pids), ("EMFILE logged %d times by %d workers in 2.3 s"
                                              % (len(lines), len(pids)), lines)
    finally:
        for sock in extra:
            sock.close()
    # Serving again once the fds are free (held polls too, on both workers).
    wait_for(lambda: _health(server) == 200, timeout=5, message="the app port to answer again")
    assert server.worker_pids() == pids, "a worker died and was restarted"
    assert_serving(server, pids)
    # Draining the queued connections may run out of fds again a few times; no storm.
    new_log = server.stderr()[log_before:]
    assert len(emfile_lines(new_log)) <= 4 * len(pids), new_log[:3000]
    assert len(new_log) < 2000, new_log[:3000]


def reserve_lines(text):
    return [line for line in text.splitlines() if "the fds left are the app port's" in line]


def emfile_lines(text):
    return [line for line in text.splitlines()
            if "too many open files" in line.lower() or "emfile" in line.lower()]


def _health(server):
    try:
        return server.request("GET", "/health", timeout=1)[0]
    except OSError:
        return None

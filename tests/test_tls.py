"""TLS on the client port (--tls-cert, --tls-key), end to end against real servers.

The test makes its own CA and server certificates with the ``openssl`` command
in a temporary directory (once per module), and the clients trust that CA:
http.client over https (long-polls, keep-alive, pipelining), an EventSource
read by hand over TLS, the ``websockets`` client over wss, many connections
at once, and Chromium (Debian's, driven by Playwright, skipped where either is
missing) handed the server certificate's key hash.  Then what must cost
nothing but the connection: plain HTTP to the TLS port, a handshake that
stalls (closed after --header-timeout), garbage for a ClientHello (one log
line).  The certificate is read again by the new workers of a reload
(SIGHUP); a plain server never loads ``ssl``.
"""

import base64
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest

from conftest import (PAGE_WAIT_MS, ROOT, is_closed, launch_chromium, playwright_or_skip,
                      read_response, wait_for)
from test_bad_input import uid

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


def openssl(*args, cwd):
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


class Pki:
    """A test CA and server certificates it signed (P-256 keys), for 127.0.0.1 and localhost."""

    def __init__(self, d):
        self.dir = str(d)
        self.ca = os.path.join(self.dir, "ca.pem")
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
                "-subj", "/CN=MegaComet test CA",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=self.dir)
        with open(os.path.join(self.dir, "ext.cnf"), "w") as f:
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                    "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")

    def server_cert(self, name):
        """(cert file, key file) of a new server certificate whose CN is ``name``."""
        cert, key = (os.path.join(self.dir, name + ext) for ext in (".pem", ".key"))
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", key, "-out", name + ".csr", "-subj", "/CN=" + name, cwd=self.dir)
        openssl("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", cert,
                cwd=self.dir)
        return cert, key

    def client_context(self):
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def cert(pki):
    return pki.server_cert("megacomet-test")


def tls_server(server_factory, cert, *flags, workers=2):
    return server_factory("--tls-cert", cert[0], "--tls-key", cert[1], *flags, workers=workers)


def https(server, pki, timeout=10):
    return http.client.HTTPSConnection("127.0.0.1", server.client, timeout=timeout,
                                       context=pki.client_context())


def tls_socket(server, pki, timeout=10):
    raw = socket.create_connection(("127.0.0.1", server.client), timeout=timeout)
    return pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1")


def get(conn, path):
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def common_name(sock):
    return dict(x[0] for x in sock.getpeercert()["subject"])["commonName"]


def tls_log_lines(server):
    return [line for line in server.stderr().splitlines() if "tls:" in line]


def no_client_connections(server):
    """Nothing open but the /stats request that asks."""
    return server.stats()["totals"]["connections"] == 1


def read_to_eof(sock, timeout=5.0):
    """Everything the server sends until it closes (an alert, say); fails if it does not."""
    sock.settimeout(timeout)
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return got
        if not chunk:
            return got
        got += chunk
    raise AssertionError("not closed in %.1f s; got %r" % (timeout, got))


# -- the transports over TLS ------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_long_poll_over_https_with_modern_defaults(server_factory, pki, cert):
    server = tls_server(server_factory, cert)
    assert "client port https://127.0.0.1:%d" % server.client in server.banner
    ident = uid("tls-poll")
    server.pub(ident, "hello")
    with tls_socket(server, pki) as sock:
        assert sock.selected_alpn_protocol() == "http/1.1"      # offered h2 first: not ours
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        assert common_name(sock) == "megacomet-test"
    conn = https(server, pki)
    try:
        status, headers, body = get(conn, "/sub/%s?since=0" % ident)
        assert status == 200 and headers["cache-control"] == "no-store"
        doc = json.loads(body)
        assert [m["data"] for m in doc["messages"]] == ["hello"] and doc["last"] == 1
        status, _, body = get(conn, "/sub/%s?since=1&timeout=1" % ident)   # held, times out
        assert status == 200 and json.loads(body)["messages"] == []
    finally:
        conn.close()
    # TLS 1.1 and older are refused.
    old = pki.client_context()
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, OSError)):
        with socket.create_connection(("127.0.0.1", server.client), timeout=5) as raw:
            old.wrap_socket(raw, server_hostname="127.0.0.1")


def test_publish_is_delivered_to_a_held_https_long_poll(server_factory, pki, cert):
    server = tls_server(server_factory, cert)
    ident = uid("tls-held")
    conn = https(server, pki)
    try:
        conn.request("GET", "/sub/%s?since=0&timeout=20" % ident)   # held: nothing buffered
        time.sleep(0.3)
        started = time.monotonic()
        server.pub(ident, "pushed")
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        assert resp.status == 200 and [m["data"] for m in doc["messages"]] == ["pushed"]
        assert time.monotonic() - started < 5
        # JSONP and the compat poll on the same connection, kept alive.
        status, headers, body = get(conn, "/sub/%s?since=0&callback=cb" % ident)
        assert status == 200 and body.startswith(b"/**/cb(")
    finally:
        conn.close()


def test_eventsource_over_https(server_factory, pki, cert):
    server = tls_server(server_factory, cert)
    ident = uid("tls-sse")
    server.pub(ident, "first")
    with tls_socket(server, pki) as sock:
        sock.sendall(b"GET /sse/%s HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n"
                     % ident.encode())
        buf = b""

        def until(marker):
            nonlocal buf
            deadline = time.monotonic() + 10
            while marker not in buf:
                assert time.monotonic() < deadline, buf
                chunk = sock.recv(65536)
                assert chunk, "stream closed: %r" % buf
                buf += chunk
            block, _, buf = buf.partition(marker)
            return block

        head = until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
        assert until(b"\n\n") == b"retry: 2000"
        events = [until(b"\n\n"), until(b"\n\n")]          # the epoch event and the backlog
        assert b"id: 1\ndata: first" in events
        server.pub(ident, "two\nlines")
        assert until(b"\n\n") == b"id: 2\ndata: two\ndata: lines"


def test_websocket_over_wss(server_factory, pki, cert):
    from websockets.sync.client import connect
    server = tls_server(server_factory, cert)
    ident = uid("tls-ws")
    server.pub(ident, "before")
    url = "wss://127.0.0.1:%d/ws/%s?since=0" % (server.client, ident)
    with connect(url, ssl=pki.client_context(), open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["data"] == "before"
        server.pub(ident, "after")
        frame = json.loads(ws.recv(timeout=10))
        assert (frame["id"], frame["seq"], frame["data"]) == (ident, 2, "after")
        assert ws.ping(b"tls").wait(10)                 # answered over TLS too
        big = "x" * 60_000                              # several TLS records
        server.pub(ident, big)
        assert json.loads(ws.recv(timeout=10))["data"] == big
    assert ws.close_code == 1000


def test_keep_alive_and_pipelining_over_tls(server_factory, pki, cert):
    server = tls_server(server_factory, cert)
    ident = uid("tls-pipe")
    server.pub(ident, "m1")
    with tls_socket(server, pki) as sock:
        request = b"GET /sub/%s?since=0 HTTP/1.1\r\nHost: test\r\n\r\n" % ident.encode()
        sock.sendall(request * 3 + b"HEAD /sub/%s?since=0 HTTP/1.1\r\nHost: test\r\n\r\n"
                     % ident.encode())
        for _ in range(3):
            status, headers, body = read_response(sock)
            assert status == 200 and json.loads(body)["messages"][0]["data"] == "m1"
        sock.settimeout(5)
        resp = http.client.HTTPResponse(sock, method="HEAD")
        resp.begin()
        assert resp.status == 200 and resp.read() == b""
        # Kept alive: one more, byte by byte (records of one byte each).
        for byte in request:
            sock.sendall(bytes([byte]))
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["last"] == 1


def test_many_tls_connections_at_once(server_factory, pki, cert):
    server = tls_server(server_factory, cert)
    ident = uid("tls-many")
    socks = []
    try:
        for _ in range(200):
            sock = tls_socket(server, pki, timeout=20)
            sock.sendall(b"GET /sub/%s?since=0&timeout=30 HTTP/1.1\r\nHost: test\r\n\r\n"
                         % ident.encode())
            socks.append(sock)
        wait_for(lambda: server.stats()["totals"]["subscribers"] >= 200, timeout=20,
                 message="200 held polls")
        server.pub(ident, "to everyone")
        for sock in socks:
            status, _, body = read_response(sock, timeout=20)
            assert status == 200 and json.loads(body)["messages"][0]["data"] == "to everyone"
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: no_client_connections(server), timeout=10, message="every connection closed")


class TlsStream:
    """An EventSource over TLS, read by hand: the head, then events."""

    def __init__(self, server, pki, ident, rcvbuf=None):
        raw = socket.socket()
        if rcvbuf:                                      # before connecting, or the window is set
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(10)
        raw.connect(("127.0.0.1", server.client))
        self.sock = pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
        self.sock.sendall(b"GET /sse/%s HTTP/1.1\r\nHost: test\r\n\r\n" % ident.encode())
        self.buf = b""
        assert self.until(b"\r\n\r\n").startswith(b"HTTP/1.1 200")

    def until(self, marker, timeout=10.0):
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            assert time.monotonic() < deadline, self.buf[-300:]
            chunk = self.sock.recv(65536)
            assert chunk, "stream closed: %r" % self.buf[-300:]
            self.buf += chunk
        block, _, self.buf = self.buf.partition(marker)
        return block

    def message(self):
        while True:
            block = self.until(b"\n\n")
            if block.startswith(b"id: "):
                return block

    def close(self):
        self.sock.close()


def test_a_tls_stream_that_does_not_read_is_closed_and_counted(server_factory, pki, cert):
    server = tls_server(server_factory, cert, "--max-message", 65536, workers=1)
    ident = uid("tls-slow")
    slow = TlsStream(server, pki, ident, rcvbuf=4096)
    fine = TlsStream(server, pki, ident)
    try:
        big = "x" * 60000
        rounds = 0
        while server.stats()["totals"]["slow_closed"] == 0 and rounds < 40:
            server.pub_batch([(ident, big)] * 8)        # its ciphertext piles up, then the bound
            for _ in range(8):
                assert fine.message().endswith(big.encode())
            rounds += 1
        wait_for(lambda: server.stats()["totals"]["slow_closed"] == 1, timeout=5,
                 message="the slow stream to be closed")
        server.pub(ident, "after")
        assert fine.message() == b"id: %d\ndata: after" % (rounds * 8 + 1)
    finally:
        slow.close()
        fine.close()


def test_an_answer_that_closes_ends_with_close_notify(server_factory, pki, cert):
    server = tls_server(server_factory, cert)
    raw = socket.create_connection(("127.0.0.1", server.client), timeout=10)
    # A ragged EOF (a close without close_notify) would raise SSLEOFError here.
    with pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1",
                                          suppress_ragged_eofs=False) as sock:
        sock.sendall(b"GET /sub/%s?since=0&timeout=1 HTTP/1.1\r\nHost: test\r\n"
                     b"Connection: close\r\n\r\n" % uid("bye").encode())
        got = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        assert got.startswith(b"HTTP/1.1 200") and b'"messages": []' in got


def test_tls_after_a_proxy_protocol_header(server_factory, pki, cert):
    server = tls_server(server_factory, cert, "--proxy-protocol")
    ident = uid("tls-proxied")
    server.pub(ident, "behind a balancer")
    raw = socket.create_connection(("127.0.0.1", server.client), timeout=10)
    raw.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 %d\r\n" % server.client)
    with pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(b"GET /sub/%s?since=0 HTTP/1.1\r\nHost: test\r\n\r\n" % ident.encode())
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["messages"][0]["data"] == "behind a balancer"
    # Without the header the handshake never starts: closed, as any connection without one.
    with socket.create_connection(("127.0.0.1", server.client), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, OSError)):
            pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1")


def test_handshakes_in_parallel_interleave_in_one_loop(server_factory, pki, cert):
    """50 clients at a time, 300 in all, on one worker: their handshakes and requests are
    interleaved in its loop, each connection's state its own."""
    from concurrent.futures import ThreadPoolExecutor
    server = tls_server(server_factory, cert, workers=1)
    ident = uid("tls-parallel")
    server.pub(ident, "for all")

    def poll(i):
        conn = https(server, pki, timeout=30)
        try:
            status, _, body = get(conn, "/sub/%s?since=0" % ident)
            return status, json.loads(body)["messages"][0]["data"]
        finally:
            conn.close()

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(poll, range(300)))
    assert answers == [(200, "for all")] * 300
    assert tls_log_lines(server) == []
    wait_for(lambda: no_client_connections(server), message="every connection closed")


# -- what must cost nothing but the connection ------------------------------------------


def worker_fds(server):
    """The fds the workers hold, read once the /stats request that names them is closed."""
    pids = server.worker_pids()
    time.sleep(0.2)
    return sum(len(os.listdir("/proc/%d/fd" % pid)) for pid in pids)


def test_plain_http_to_the_tls_port_is_closed(server_factory, pki, cert):
    server = tls_server(server_factory, cert, "--header-timeout", "20")
    fds = worker_fds(server)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.client), timeout=10) as sock:
        sock.sendall(b"GET /sub/x?since=0 HTTP/1.1\r\nHost: test\r\n\r\n")
        got = read_to_eof(sock)
    assert time.monotonic() - started < 5                  # at once, not at the header timeout
    assert not got.startswith(b"HTTP/")
    wait_for(lambda: len(tls_log_lines(server)) == 1, message="its log line")
    assert "handshake failed" in tls_log_lines(server)[0]
    conn = https(server, pki)                              # everything else goes on
    try:
        assert get(conn, "/sub/%s?since=0&timeout=1" % uid("after"))[0] == 200
    finally:
        conn.close()
    wait_for(lambda: worker_fds(server) == fds, message="no fd left behind")


@pytest.mark.parametrize("sent", ["nothing", "half a ClientHello"])
def test_a_stalled_handshake_is_closed_after_the_header_timeout(server_factory, pki, cert, sent):
    server = tls_server(server_factory, cert, "--header-timeout", "1")
    if sent == "nothing":
        prefix = b""
    else:                                     # a real ClientHello, cut short
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = pki.client_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        with pytest.raises(ssl.SSLWantReadError):
            client.do_handshake()
        hello = outgoing.read()
        prefix = hello[:len(hello) // 2]
    with socket.create_connection(("127.0.0.1", server.client), timeout=10) as sock:
        sock.sendall(prefix)
        time.sleep(0.5)
        assert not is_closed(sock)
        started = time.monotonic()
        wait_for(lambda: is_closed(sock), timeout=5, interval=0.02, message="the close")
        assert time.monotonic() - started < 2.0
    wait_for(lambda: no_client_connections(server), message="no connection left")
    assert tls_log_lines(server) == []                     # a timeout is not a failure to log


def test_garbage_instead_of_a_client_hello_costs_one_log_line(server_factory, pki, cert):
    server = tls_server(server_factory, cert, workers=1)
    fds = worker_fds(server)
    garbage = [b"\x16\x03\x01\x00\x10" + b"\xff" * 16,      # a handshake record of nonsense
               b"\x16\x03\x01\x00\x10\x01\x00\x00\x0c" + b"\xff" * 12,   # a short ClientHello
               b"\x17\x03\x03\x00\x05hello",                # application data first
               b"\x16\x03\x01\xff\xff" + b"\x00" * 40,      # a record too long
               b"SSH-2.0-OpenSSH_9.2\r\n",
               bytes(range(255, -1, -1))]
    for data in garbage:
        with socket.create_connection(("127.0.0.1", server.client), timeout=10) as sock:
            sock.sendall(data)
            read_to_eof(sock)                               # closed at once (after an alert)
    time.sleep(0.3)
    lines = tls_log_lines(server)
    assert len(lines) == len(garbage), lines               # one per connection
    assert all("handshake failed" in line for line in lines), lines
    wait_for(lambda: no_client_connections(server), message="no connection left")
    wait_for(lambda: worker_fds(server) == fds, message="no fd left behind")
    conn = https(server, pki)
    try:
        assert get(conn, "/sub/%s?since=0&timeout=1" % uid("after"))[0] == 200
    finally:
        conn.close()


def test_a_client_that_does_not_trust_us_costs_the_server_nothing(server_factory, pki, cert):
    server = tls_server(server_factory, cert, workers=1)
    stranger = ssl.create_default_context()                # does not know the test CA
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.client), timeout=10) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                stranger.wrap_socket(raw, server_hostname="127.0.0.1")
    wait_for(lambda: no_client_connections(server), message="no connection left")
    assert len(tls_log_lines(server)) <= 3
    assert server.stats()["workers"][0]["pid"]


# -- start, reload -----------------------------------------------------------------------


def run_cli(*flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "megacomet.py"), "--port", "0",
                           "--app-port", "0", "--workers", "1", *flags],
                          capture_output=True, text=True, timeout=30)


def test_tls_flags_both_or_neither_and_files_that_load(pki, cert, tmp_path):
    done = run_cli("--tls-cert", cert[0])
    assert done.returncode == 2 and "--tls-cert and --tls-key go together" in done.stderr
    done = run_cli("--tls-key", cert[1])
    assert done.returncode == 2 and "--tls-cert and --tls-key go together" in done.stderr
    done = run_cli("--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", cert[1])
    assert done.returncode == 2 and "cannot use --tls-cert" in done.stderr
    assert "No such file" in done.stderr
    other_cert, other_key = pki.server_cert("other")
    done = run_cli("--tls-cert", cert[0], "--tls-key", other_key)       # not its key
    assert done.returncode == 2 and "cannot use --tls-cert" in done.stderr
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    done = run_cli("--tls-cert", str(tmp_path / "junk.pem"), "--tls-key", cert[1])
    assert done.returncode == 2 and "cannot use --tls-cert" in done.stderr
    encrypted = str(tmp_path / "encrypted.key")
    openssl("pkey", "-in", cert[1], "-aes256", "-passout", "pass:secret", "-out", encrypted,
            cwd=str(tmp_path))
    done = run_cli("--tls-cert", cert[0], "--tls-key", encrypted)        # never prompts
    assert done.returncode == 2 and "pass phrase" in done.stderr


def test_sighup_reload_serves_the_renewed_certificate(server_factory, pki, tmp_path):
    first, renewed = pki.server_cert("first"), pki.server_cert("renewed")
    cert, key = str(tmp_path / "live.pem"), str(tmp_path / "live.key")
    shutil.copy(first[0], cert)
    shutil.copy(first[1], key)
    server = server_factory("--tls-cert", cert, "--tls-key", key, workers=2)

    def served():
        with tls_socket(server, pki) as sock:
            return common_name(sock)

    assert served() == "first"
    held = https(server, pki)                     # a poll held across the reload is answered
    held.request("GET", "/sub/%s?since=0&timeout=30" % uid("held"))
    time.sleep(0.2)
    for src, dst in ((renewed[0], cert), (renewed[1], key)):      # replaced as certbot does
        shutil.copy(src, dst + ".new")
        os.replace(dst + ".new", dst)
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_for(lambda: "reload: done" in server.stderr(), timeout=30, message="the reload")
    resp = held.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["messages"] == []
    held.close()
    assert {served() for _ in range(20)} == {"renewed"}           # every worker's

    # Files that no longer load: the reload stops at the first new worker, the old go on.
    with open(cert, "w") as f:
        f.write("broken\n")
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_for(lambda: "reload stopped" in server.stderr(), timeout=30, message="the reload's end")
    assert {served() for _ in range(20)} == {"renewed"}


def test_a_plain_server_never_loads_ssl(server):
    for pid in server.worker_pids():
        with open("/proc/%d/maps" % pid) as f:
            assert "libssl" not in f.read()


# -- Chromium over https and wss ----------------------------------------------------------


def spki_hash(cert_file):
    """base64(sha256(SubjectPublicKeyInfo)): what --ignore-certificate-errors-spki-list takes."""
    pub = subprocess.run([OPENSSL, "x509", "-in", cert_file, "-noout", "-pubkey"],
                         capture_output=True, check=True, timeout=30).stdout
    der = subprocess.run([OPENSSL, "pkey", "-pubin", "-outform", "der"], input=pub,
                         capture_output=True, check=True, timeout=30).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.fixture(scope="module")
def tls_browser(cert):
    """Chromium told to accept the test certificate by its key's hash (as a pinned key)."""
    with playwright_or_skip() as playwright:
        chromium = launch_chromium(
            playwright, "--ignore-certificate-errors-spki-list=" + spki_hash(cert[0]))
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.mark.parametrize("transport", ["websocket", "eventsource", "poll"])
def test_chromium_over_https_and_wss(server_factory, cert, tls_browser, transport):
    from test_browser import expect_shown, publish
    server = tls_server(server_factory, cert)
    ident = uid("tls-browser-" + transport)
    context = tls_browser.new_context()               # no ignore_https_errors: the key hash
    try:
        page = context.new_page()
        page.set_default_timeout(PAGE_WAIT_MS)
        sockets, requests = [], []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        page.on("request", lambda request: requests.append(request.url))
        response = page.goto("https://127.0.0.1:%d/demo?ids=%s&transport=%s"
                             % (server.client, ident, transport))
        assert response.ok
        expected = [(publish(server, ident, "over tls %d" % i), "over tls %d" % i)
                    for i in range(2)]
        expect_shown(page, transport, ident, expected)
        assert requests and all(url.startswith("https://") for url in requests), requests
        if transport == "websocket":
            assert sockets and all(url.startswith("wss://") for url in sockets), sockets
    finally:
        context.close()

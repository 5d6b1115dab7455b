"""The defects outside probes found (issue 6), each end to end against a real server.

Every test here failed on the code before its fix: one GET or one batch line
that killed a worker, a pipelined flood that froze one, bodies buffered that
nobody asked for, an fd flood that locked out the app port, a compat message
lost across a SIGKILL, a publish port open to browsers and to the network,
subscribers filling the id table.  Each then proves the worker still serves
(same pids, round trips) and that the cost of the bad input was bounded.
"""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, Server, is_closed, read_response, wait_for
from test_bad_input import assert_serving, connect, exchange, open_poll, status_of, uid

from megacomet import signing


def worker_rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for %d" % pid)


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_round_trip(server):
    started = time.monotonic()
    ident = uid("rt")
    seq = server.pub(ident, "ping", timeout=5)
    status, _, body = server.sub(ident, since=seq - 1, wait=5)
    assert status == 200 and json.loads(body)["messages"][0]["data"] == "ping"
    return time.monotonic() - started


@pytest.fixture(scope="module")
def srv():
    server = Server("--header-timeout", 2, "--max-ids", 100000, "--shm-mb", 64, workers=1)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- 1. numbers are ASCII digits ------------------------------------------------------

@pytest.mark.parametrize("query", ["since=%C2%B2", "timeout=%E2%91%A0", "since=%D9%A3",
                                   "timeout=%EF%BC%91", "since=", "since=-1", "since=1e3"])
def test_unicode_digits_in_numbers_get_400_not_a_dead_worker(srv, query):
    pids = srv.worker_pids()
    for _ in range(3):                  # repeated: once killed the worker, then the backoff grew
        status, _, body = srv.request("GET", "/sub/x?" + query, port=srv.client)
        assert status == 400, (query, status, body)
        assert b"whole number" in body
    assert_serving(srv, pids)


# -- 2. pipelined answers are bounded and never freeze the loop ---------------------------

def test_pipelined_gets_of_a_large_backlog_never_freeze_the_worker(srv):
    """64 messages of 10 KB, then 1000 pipelined GETs of all of them from a client that never
    reads: the worker stops answering that client once its output is full, serves everyone
    else at once, and its memory stays bounded."""
    pids = srv.worker_pids()
    ident = uid("big")
    srv.pub_batch([(ident, "%02d" % i + "x" * 10238) for i in range(64)])
    rss_before = worker_rss(pids[0])
    flood = connect(srv.client)
    flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        flood.sendall(b"GET /sub/%s?since=0 HTTP/1.1\r\nHost: x\r\n\r\n" % ident.encode() * 1000)
        cpu_before = cpu_seconds(pids[0])
        for _ in range(5):
            assert timed_round_trip(srv) < 1.0
        time.sleep(1.0)
        assert cpu_seconds(pids[0]) - cpu_before < 1.0, "the worker keeps working for the flood"
        assert worker_rss(pids[0]) - rss_before < 48 << 20
    finally:
        flood.close()
    assert_serving(srv, pids)


def test_pipelined_answers_all_arrive_for_a_client_that_reads(srv):
    """The same bound must not cost a reading client anything: every answer, in order."""
    ident = uid("pipe")
    srv.pub_batch([(ident, "m%d-" % i + "y" * 4000) for i in range(64)])
    with connect(srv.client, timeout=10) as sock:
        sock.sendall(b"".join(b"GET /sub/%s?since=%d HTTP/1.1\r\nHost: x\r\n\r\n"
                              % (ident.encode(), i % 64) for i in range(300)))
        stream = sock.makefile("rb")            # one buffer for every pipelined answer
        for i in range(300):
            status = int(stream.readline().split()[1])
            length = 0
            while (line := stream.readline()) != b"\r\n":
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            doc = json.loads(stream.read(length))
            assert status == 200 and doc["messages"][0]["seq"] == i % 64 + 1, i


# -- 3. no unread input is buffered that nobody asked for ----------------------------

def test_client_port_refuses_bodies_on_the_head(srv):
    pids = srv.worker_pids()
    for head in (b"GET /sub/x HTTP/1.1\r\nContent-Length: 16777216\r\n\r\n",
                 b"GET /sub/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"):
        reply, closed = exchange(srv.client, head + b"a" * 1000)
        assert status_of(reply) == 413 and closed, reply[:200]
    # Eight clients pushing 16 MiB bodies at once: answered on the head, nothing buffered.
    rss_before = worker_rss(pids[0])
    socks = [connect(srv.client) for _ in range(8)]
    try:
        for sock in socks:
            sock.sendall(b"GET /sub/x HTTP/1.1\r\nContent-Length: 16777216\r\n\r\n")
        chunk = b"b" * 65536
        for _ in range(256):                      # 16 MiB each, as far as the server reads
            for sock in socks:
                try:
                    sock.send(chunk, socket.MSG_DONTWAIT)
                except OSError:
                    pass
        assert all(status_of(sock.recv(200)) == 413 for sock in socks)
        assert worker_rss(pids[0]) - rss_before < 8 << 20
    finally:
        for sock in socks:
            sock.close()
    assert_serving(srv, pids)


def test_client_pipelining_far_ahead_of_a_held_poll_is_closed(srv):
    pids = srv.worker_pids()
    rss_before = worker_rss(pids[0])
    socks = []
    try:
        for _ in range(8):
            sock = open_poll(srv.client, "/sub/%s?timeout=30" % uid("ahead"))
            socks.append(sock)
        time.sleep(0.2)
        junk = b"GET /sub/y HTTP/1.1\r\nHost: x\r\n\r\n" * 40000      # 1.3 MB each
        for sock in socks:
            try:
                sock.sendall(junk)
            except (BrokenPipeError, ConnectionResetError):
                pass
        wait_for(lambda: all(is_closed(s) for s in socks), timeout=5,
                 message="every flooding connection to be closed")
        assert worker_rss(pids[0]) - rss_before < 16 << 20
    finally:
        for sock in socks:
            sock.close()
    assert_serving(srv, pids)


def test_app_token_is_checked_on_the_head_before_any_body(server_factory, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    server = server_factory("--app-token-file", token, workers=1)
    with connect(server.app) as sock:
        sock.sendall(b"POST /pub/x HTTP/1.1\r\nContent-Length: 16777216\r\n\r\n")
        status, _, _ = read_response(sock, timeout=3)     # answered without the 16 MiB
        assert status == 401


# -- 5. deeply nested JSON -------------------------------------------------------------

def test_deeply_nested_json_in_a_batch_is_a_line_error(srv):
    pids = srv.worker_pids()
    body = b"[" * 100000 + b"\n" + json.dumps({"id": uid("nest"), "data": "ok"}).encode()
    for payload in (body, b"{\"a\":" * 50000):
        status, _, reply = srv.request("POST", "/pub", payload)
        assert status == 202, reply[:300]
        doc = json.loads(reply)
        assert doc["errors"][0]["line"] == 1 and "nested" in doc["errors"][0]["error"], doc
    assert json.loads(srv.request("POST", "/pub", body)[2])["published"] == 1
    assert_serving(srv, pids)


# -- 6. a compat message published right after a SIGKILL -------------------------------

def worker_counts(server, field):
    return [w[field] for w in server.stats()["workers"]]


def home_of(server, ident):
    """Publish a probe to ident and see whose 'published' counter moves; take the probe back
    off the compat cursor."""
    before = worker_counts(server, "published")
    server.pub(ident, "probe")
    moved = wait_for(lambda: [i for i, (a, b) in enumerate(zip(before, worker_counts(
        server, "published"))) if b > a], timeout=5, message="the probe to be stored")
    assert len(moved) == 1
    status, _, body = server.request("GET", "/%s.js" % ident, port=server.client)
    assert (status, body) == (200, b"probe")
    return moved[0]


def settled_counts(server, field):
    """The workers' counts once two reads 0.1 s apart agree: the baseline must not be a count
    that was flushed a moment late (the probe poll of home_of, answered and gone)."""
    last = None

    def agree():
        nonlocal last
        now = worker_counts(server, field)
        same, last = now == last, now
        return now if same else None
    return wait_for(agree, timeout=5, interval=0.1, message="the %s counts to settle" % field)


def hold_compat_on(server, ident, index):
    """A compat poll for ident held by worker ``index`` (connections land where the kernel
    hashes them: retry until one lands there)."""
    for _ in range(60):
        before = settled_counts(server, "subscribers")
        sock = open_poll(server.client, "/%s.js" % ident)
        landed = wait_for(lambda: [i for i, (a, b) in enumerate(zip(before, worker_counts(
            server, "subscribers"))) if b > a], timeout=5, message="the poll to be held")
        if landed == [index]:
            time.sleep(0.1)                         # let its CPOLL register at the home
            return sock
        sock.close()
        wait_for(lambda: sum(worker_counts(server, "subscribers")) == sum(before), timeout=5,
                 message="the stray poll to go")
    raise AssertionError("no compat poll landed on worker %d" % index)


def is_dead(pid):
    """Exited (its listeners closed), reaped or not."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):    # reaped meanwhile
        return True


@pytest.mark.parametrize("holder_is_home", [True, False])
def test_compat_message_published_right_after_a_sigkill_is_not_lost(server_factory,
                                                                     holder_is_home):
    server = server_factory("--poll-timeout", 30, workers=2)
    for attempt in range(3):
        ident = uid("afterkill%d" % attempt)
        home = home_of(server, ident)
        holder = home if holder_is_home else 1 - home
        sock = hold_compat_on(server, ident, holder)
        victim = server.worker_pids()[holder]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: is_dead(victim), timeout=5, interval=0.001, message="the kill")
        server.pub(ident, "published after the kill")   # before the restart (0.05 s), answered
                                                        # once the restarted home stored it
        sock.close()
        wait_for(lambda: all(server.worker_pids()), timeout=10, message="the restart")
        status, _, body = server.request("GET", "/%s.js" % ident, port=server.client, timeout=5)
        assert (status, body) == (200, b"published after the kill"), (attempt, status, body)


# -- 7. the compat timeout is a script a browser runs -----------------------------------

def test_compat_timeout_is_an_empty_script_not_a_204(server_factory):
    server = server_factory("--poll-timeout", 1, workers=1)
    status, headers, body = server.request("GET", "/%s.js" % uid("quiet"), port=server.client)
    assert (status, body) == (200, b"")
    assert headers["Content-Type"].startswith("application/javascript")
    assert headers["X-Content-Type-Options"] == "nosniff"


# -- 8. who may publish --------------------------------------------------------------

def run_cli(*args, env=None, timeout=20):
    return subprocess.run([sys.executable, os.path.join(ROOT, "megacomet.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_public_app_host_without_a_token_is_refused(host):
    proc = run_cli("--app-host", host, "--port", 0, "--app-port", 0, "--workers", 1)
    assert proc.returncode == 2
    assert "without an app token" in proc.stderr and "--insecure-app-port" in proc.stderr


def test_public_app_host_with_insecure_flag_or_token_starts(server_factory):
    server = server_factory("--app-host", "0.0.0.0", "--insecure-app-port", workers=1)
    assert server.request("GET", "/health")[0] == 200
    server = Server("--app-host", "0.0.0.0", workers=1)
    os.environ["MEGACOMET_APP_TOKEN"] = "from-the-environment"
    try:
        server.start()
    finally:
        del os.environ["MEGACOMET_APP_TOKEN"]
    try:
        headers = {"Authorization": "Bearer from-the-environment"}
        assert server.request("POST", "/pub/x", b"m", headers=headers)[0] == 202
    finally:
        server.stop()


def test_browsers_cannot_publish(srv):
    for headers in ({"Origin": "https://evil.example", "Content-Type": "text/plain"},
                    {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        status, _, body = srv.request("POST", "/pub/" + uid("csrf"), b"forged", headers=headers)
        assert status == 403, (headers, status, body)
    assert srv.request("GET", "/stats", headers={"Origin": "http://127.0.0.1:1"})[0] == 403


def test_app_token_scheme_is_case_insensitive_and_compared_whole(server_factory, tmp_path):
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    server = server_factory("--app-token-file", token, workers=1)
    for auth, expect in (("Bearer tok-123", 202), ("bearer tok-123", 202), ("BEARER tok-123", 202),
                         ("Bearer tok-12", 401), ("Bearer tok-1234", 401), ("Basic tok-123", 401),
                         ("tok-123", 401), ("Bearer", 401)):
        status, _, _ = server.request("POST", "/pub/x", b"m", headers={"Authorization": auth})
        assert status == expect, auth
    assert server.request("POST", "/pub/x", b"m")[0] == 401
    assert server.request("GET", "/health")[0] == 200
    with open("/proc/%d/cmdline" % server.proc.pid, "rb") as f:
        assert b"tok-123" not in f.read()


# -- 9. subscribers cannot lock publishers out ---------------------------------------

def test_polls_on_new_ids_cannot_fill_the_table_for_publishers(server_factory):
    server = server_factory("--max-ids", 1000, "--poll-timeout", 60, workers=2)
    capacity = server.stats()["shm"]["ids_capacity"]
    assert capacity < 1300
    socks = []
    try:
        for i in range(1300):
            socks.append(open_poll(server.client, "/sub/%s" % uid("squat%d" % i)))
        poller = select.poll()
        for sock in socks:
            poller.register(sock, select.POLLIN)
        answered = wait_for(lambda: (lambda r: r if len(r) >= 1300 - capacity else None)(
            poller.poll(500)), timeout=20, message="the refusals")
        by_fd = {sock.fileno(): sock for sock in socks}
        assert all(status_of(by_fd[fd].recv(200)) == 503 for fd, _ in answered)
        per_partition = capacity // 2
        assert server.stats()["shm"]["ids_used"] <= 2 * (per_partition - per_partition // 4)
        for i in range(100):                    # publishers still have their share
            status, _, body = server.request("POST", "/pub/%s" % uid("fresh%d" % i), b"m")
            assert status == 202, body
    finally:
        for sock in socks:
            sock.close()


# -- 10. refusals are counted ----------------------------------------------------------

def test_refused_messages_are_counted_in_stats(server_factory):
    server = server_factory("--max-ids", 50, workers=1)
    items = [(uid("fill%d" % i), "m") for i in range(400)]
    reply = server.pub_batch(items)
    refused = len(reply["errors"])
    assert refused > 0 and reply["published"] + refused == 400
    totals = wait_for(lambda: (lambda t: t if t["refused"] == refused else None)(
        server.stats()["totals"]), timeout=5, message="the refused counter")
    assert totals["received"] == totals["published"] + totals["refused"]
    status, _, metrics = server.request("GET", "/metrics")
    assert b'megacomet_refused_total{worker="0"} %d' % refused in metrics


# -- signed subscriptions ---------------------------------------------------------------

@pytest.fixture
def signed(server_factory, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("a long random secret\n")
    server = server_factory("--secret-file", secret, "--poll-timeout", 1, workers=2)
    server.secret_file = secret
    return server


def sign_cli(server, *args):
    proc = run_cli("sign", "--secret-file", server.secret_file, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_signed_subscriptions(signed):
    ident = uid("signed")
    signed.pub(ident, "for the signed only")
    query = sign_cli(signed, ident, "--ttl", 60)
    status, _, body = signed.request("GET", "/sub/%s?since=0&%s" % (ident, query), port=signed.client)
    assert status == 200 and json.loads(body)["messages"][0]["data"] == "for the signed only"
    status, _, body = signed.request("GET", "/%s.js?%s" % (ident, query), port=signed.client)
    assert (status, body) == (200, b"for the signed only")
    exp = int(time.time()) + 60
    good_sig = signing.signature(b"a long random secret", [ident], exp)
    for path, reason in (
            ("/sub/%s" % ident, b"required"),
            ("/sub/%s?exp=%d" % (ident, exp), b"required"),
            ("/sub/%s?exp=%d&sig=%s" % (ident, exp, good_sig), None),
            ("/sub/%s?exp=%d&sig=%s" % (ident, exp + 1, good_sig), b"bad"),
            ("/sub/%s?exp=%d&sig=%s" % ("other", exp, good_sig), b"bad"),
            ("/sub/%s?exp=%d&sig=%s" % (ident, exp, good_sig.upper()), b"bad"),
            ("/sub/%s?exp=%d&sig=%s" % (ident, 1000, signing.signature(
                b"a long random secret", [ident], 1000)), b"expired"),
            ("/sub/%s?exp=%%C2%%B2&sig=%s" % (ident, good_sig), b"unix time"),
            ("/%s.js" % ident, b"required")):
        status, _, body = signed.request("GET", path, port=signed.client)
        if reason is None:
            assert status == 200, (path, status, body)
        else:
            assert status == 403 and reason in body, (path, status, body)


def test_sign_cli_signs_several_ids_sorted_and_reads_the_environment():
    now = time.time()
    proc = run_cli("sign", "b", "a", "--ttl", 100, env={"MEGACOMET_SECRET": "k"})
    assert proc.returncode == 0, proc.stderr
    fields = dict(pair.split("=") for pair in proc.stdout.strip().split("&"))
    exp = int(fields["exp"])
    assert now + 99 <= exp <= now + 102
    assert fields["sig"] == signing.signature(b"k", ["a", "b"], exp)
    import hashlib
    import hmac
    assert fields["sig"] == hmac.new(b"k", b"a,b|%d" % exp, hashlib.sha256).hexdigest()
    proc = run_cli("sign", "a", env={"MEGACOMET_SECRET": ""})
    assert proc.returncode == 2

"""Test harness: start the real server as a separate process on free loopback ports.

Every wait here has a timeout, and every server started is stopped by pid
(supervisor and workers) when its test ends, whatever happened: server_factory sends the
SIGTERM as its test ends and reaps the tree in a thread of its own while the next test
runs (a stopping worker gives late requests ~0.3 s, a third of a second per test for
nothing); the session does not end before every one of them is reaped.
"""

import http.client
import json
import os
import select
import socket
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))   # launch: how tests and tools start a server

import launch  # noqa: E402

START_TIMEOUT = 20.0


class Server:
    """One megacomet.py process tree; ``client`` and ``app`` are its ports."""

    host = "127.0.0.1"       # where its ports are reached (another address in a netns test)

    def __init__(self, *flags, workers=2, preexec_fn=None, command=None, cwd=ROOT, env=None,
                 port=0, app_port=0):
        self.preexec_fn = preexec_fn     # runs in the server process before it starts
        self.command = command or [sys.executable, os.path.join(ROOT, "megacomet.py")]
        self.cwd = cwd
        self.env = env
        # Ports 0: free ones, read off the banner; given ones start a server where one was.
        self.flags = ["--workers", str(workers), "--host", "127.0.0.1", "--port", str(port),
                      "--app-port", str(app_port), *map(str, flags)]
        self.workers = workers
        self.log_path = os.path.join("/tmp", "megacomet-test-%d-%d.log" % (os.getpid(), time.monotonic_ns()))
        self.proc = None
        self.client = self.app = None
        self.banner = ""

    def start(self):
        open(self.log_path, "wb").close()            # each start's log begins empty
        try:
            started = launch.launch(self.command, self.flags, log=self.log_path, cwd=self.cwd,
                                    env=self.env, timeout=START_TIMEOUT,
                                    preexec_fn=self.preexec_fn)
        except BaseException:                      # StartError: its tree is stopped already
            self.remove_log()
            raise
        self.proc, self.client, self.app, self.banner = (started.proc, started.client,
                                                         started.app, started.banner)
        return self

    def stderr(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def worker_pids(self):
        return [w["pid"] for w in self.stats()["workers"]]

    def stop(self):
        """SIGTERM the supervisor, then SIGKILL anything of the tree still alive."""
        if self.proc is None:
            return
        launch.stop(self.proc, grace=8)
        self.remove_log()
        self.proc = None

    def remove_log(self):
        try:
            os.unlink(self.log_path)
        except FileNotFoundError:
            pass

    # -- HTTP helpers (each request on its own connection unless given one) --

    def request(self, method, path, body=None, port=None, headers=None, timeout=10):
        conn = http.client.HTTPConnection(self.host, port or self.app, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def pub(self, ident, data, **kw):
        status, _, body = self.request("POST", "/pub/" + ident, data.encode() if isinstance(data, str) else data, **kw)
        assert status == 202, (status, body)
        return json.loads(body)["seq"]

    def pub_batch(self, items, **kw):
        body = "\n".join(json.dumps({"id": i, "data": d}) for i, d in items).encode()
        status, _, reply = self.request("POST", "/pub", body, **kw)
        assert status == 202, (status, reply)
        return json.loads(reply)

    def sub(self, ident, since=None, timeout=None, wait=15, **kw):
        path = "/sub/" + ident
        query = []
        if since is not None:
            query.append("since=%d" % since)
        if timeout is not None:
            query.append("timeout=%d" % timeout)
        if query:
            path += "?" + "&".join(query)
        status, headers, body = self.request("GET", path, port=self.client, timeout=wait, **kw)
        return status, headers, body

    def stats(self):
        return self.stats_within(10)

    def stats_within(self, timeout):
        status, _, body = self.request("GET", "/stats", timeout=timeout)
        assert status == 200
        return json.loads(body)


_stopping = []                 # threads reaping the trees server_factory let go of


def stop_in_background(server):
    """server.stop() (SIGTERM, SIGKILL after its grace, by pid) in a thread of its own."""
    thread = threading.Thread(target=server.stop, name="stop %s" % server.log_path)
    thread.start()
    _stopping.append(thread)


@pytest.fixture(scope="session", autouse=True)
def _every_server_reaped():
    yield
    for thread in _stopping:
        thread.join()


@pytest.fixture
def server_factory():
    started = []

    def make(*flags, workers=2, **kw):
        server = Server(*flags, workers=workers, **kw).start()
        started.append(server)
        return server

    yield make
    # A bug the catch-alls kept from crashing a worker is still a bug: every test that starts
    # a server fails on one (one closed connection and a log line would pass unnoticed).
    bugs = []
    for server in started:
        if server.proc is not None:
            bugs += [line for line in server.stderr().splitlines()
                     if "internal error" in line or "Traceback" in line]
        stop_in_background(server)
    assert not bugs, "the server logged internal errors:\n" + "\n".join(bugs[:5])


@pytest.fixture
def server(server_factory):
    return server_factory(workers=2)


def read_response(sock, timeout=5.0):
    """One HTTP response from a raw socket: (status, lower-cased headers, body)."""
    sock.settimeout(timeout)
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    body = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def is_closed(sock):
    """True once the peer has closed (EOF or reset); never blocks."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        return True
    except BlockingIOError:
        return False


def raw_request(port, data, timeout=5.0, read_until_close=True):
    """Send raw bytes to a port and return everything read until close or timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close:
                break
        return b"".join(chunks)


def wait_for(predicate, timeout=10.0, interval=0.05, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, message))


# -- Chromium (tests/test_browser.py, test_demo.py, test_dashboard.py, test_tls.py) ---------

CHROMIUM = "/usr/bin/chromium"
PAGE_WAIT_MS = 20000                 # the longest any one page wait may take


def launch_chromium(playwright, *args):
    """Debian's Chromium, never a browser build of Playwright's own (there is no download
    here); the machine has no network beyond loopback, so its background traffic is off.
    Skips the test when Playwright or Chromium is missing."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("chromium is not installed: apt-get install chromium")
    return playwright.chromium.launch(
        executable_path=CHROMIUM, timeout=30000,
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update",
              "--disable-sync", *args])


def playwright_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: python3 -m pip install -e '.[test]'")
    return sync_playwright()


@pytest.fixture(scope="module")
def browser():
    """One Chromium per module (its start is the slow part); each test has its own context."""
    with playwright_or_skip() as playwright:
        chromium = launch_chromium(playwright)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(PAGE_WAIT_MS)
        yield page
    finally:
        context.close()

"""deploy/nginx.conf and deploy/haproxy.cfg, run for real in front of the real server.

Each configuration is read from deploy/ and templated as little as a test
needs: its TLS listener becomes plain HTTP on a free loopback port (no
certificate here), its port-80 redirect another free port, the upstream the
server's client port, and logs and pid files go to the test's tmp dir;
everything else (timeouts, headers, buffering, keep-alive) is the file's own.
Every substitution must match exactly once, so a configuration that changes
shape fails here rather than being tested half.

Then real clients go through the proxy: a long-poll held at the server and
answered by a publish, a held poll that times out as asked, an EventSource
stream that gets a message while it stays open, a WebSocket (the
``websockets`` client) that gets one, keep-alive towards the server (many
requests, few upstream connections), the app port kept out of reach, and the
demo page's header passed on.  A held poll of 120 s, the longest a client may
ask, is too long to wait for here: the configurations' timeouts are read and
must exceed it (and the streams' ping interval) instead.

nginx and haproxy are started by the test (.ci/run installs both) and
stopped by pid; without one, its tests are skipped and say why.
"""

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid

import pytest

from conftest import ROOT, Server, is_closed, wait_for

import launch

DEPLOY = os.path.join(ROOT, "deploy")
NGINX_CONF = os.path.join(DEPLOY, "nginx.conf")
HAPROXY_CFG = os.path.join(DEPLOY, "haproxy.cfg")
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
LONGEST_POLL = 120                 # seconds: the most ?timeout= may ask (README, the API)
HEARTBEAT = 15                     # seconds between stream pings, by default
HEADER_TIMEOUT = 10                # seconds MegaComet keeps an idle keep-alive connection
START_TIMEOUT = 15.0
WAIT = 10.0                        # the longest any one read through the proxy may take


def uid(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:12])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read(path):
    with open(path) as f:
        return f.read()


def replace_once(text, old, new):
    assert text.count(old) == 1, "expected %r once in the configuration" % old
    return text.replace(old, new)


def code_lines(text):
    """The configuration without its comments."""
    return [line.split("#", 1)[0].rstrip() for line in text.splitlines()
            if line.split("#", 1)[0].strip()]


# -- what the files say, without running anything ------------------------------------------

UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def nginx_seconds(text):
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", text).groups()
    return int(number) * UNITS[unit or "s"]            # nginx: no unit is seconds


def haproxy_seconds(text):
    number, unit = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", text).groups()
    return int(number) * (0.000001 if unit == "us" else UNITS[unit or "ms"])  # haproxy: ms


def nginx_directives(name):
    return [value for line in code_lines(read(NGINX_CONF))
            for value in re.findall(r"^\s*%s\s+([^;]+);" % re.escape(name), line)]


def haproxy_timeouts():
    timeouts = {}
    for line in code_lines(read(HAPROXY_CFG)):
        found = re.match(r"\s*timeout\s+(\S+)\s+(\S+)\s*$", line)
        if found:
            timeouts[found.group(1)] = haproxy_seconds(found.group(2))
    return timeouts


def test_nginx_conf_outlasts_the_longest_poll_streams_and_keeps_upstream_connections():
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        values = nginx_directives(name)
        assert values and all(nginx_seconds(v) > LONGEST_POLL for v in values), (name, values)
    assert nginx_directives("proxy_buffering") == ["off"]
    assert nginx_directives("proxy_http_version") == ["1.1"]
    headers = nginx_directives("proxy_set_header")
    assert "Upgrade $http_upgrade" in headers and "Connection $connection_upgrade" in headers
    assert any(h.startswith("X-Forwarded-For ") for h in headers)
    text = read(NGINX_CONF)
    assert re.search(r"map \$http_upgrade \$connection_upgrade \{\s*default upgrade;\s*''\s+'';",
                     text), "Connection is 'upgrade' for WebSockets, empty (keep-alive) otherwise"
    keepalive = nginx_directives("keepalive")
    assert keepalive and int(keepalive[0]) >= 16
    # Idle upstream connections are given up before the server closes them itself.
    assert all(nginx_seconds(v) < HEADER_TIMEOUT for v in nginx_directives("keepalive_timeout"))


def test_haproxy_cfg_outlasts_the_longest_poll_and_streams():
    timeouts = haproxy_timeouts()
    for name in ("client", "server", "tunnel"):
        assert timeouts.get(name, 0) > LONGEST_POLL, (name, timeouts)
    lines = code_lines(read(HAPROXY_CFG))
    assert any(line.strip() == "option forwardfor" for line in lines)
    # The PROXY protocol is there for --proxy-protocol, but commented out: a server started
    # without that flag would refuse every connection that carries it.
    text = read(HAPROXY_CFG)
    assert re.search(r"^\s*#\s*server \S+ 127\.0\.0\.1:8000 .*send-proxy-v2", text, re.M)
    assert not any("send-proxy" in line for line in lines)
    assert "--proxy-protocol" in text


@pytest.mark.parametrize("path", [NGINX_CONF, HAPROXY_CFG])
def test_only_the_client_port_is_proxied(path):
    lines = code_lines(read(path))
    upstreams = [line for line in lines if "127.0.0.1:" in line]
    assert upstreams and all("127.0.0.1:8000" in line for line in upstreams), upstreams
    assert not any(":9000" in line for line in lines)


# -- running them ---------------------------------------------------------------------------

class Proxy:
    """A proxy process in front of ``server``: ``port`` is its front door, ``plain`` the
    redirect to https."""

    def __init__(self, name, argv, port, plain, log, server):
        self.name, self.port, self.plain, self.log, self.server = name, port, plain, log, server
        self.out = open(log, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=subprocess.STDOUT)
        try:
            wait_for(self.listening, timeout=START_TIMEOUT, message="%s to listen" % name)
        except BaseException:
            self.stop()
            raise

    def listening(self):
        if self.proc.poll() is not None:
            raise AssertionError("%s exited with %s:\n%s" % (self.name, self.proc.returncode,
                                                             self.output()))
        for port in (self.port, self.plain):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
        return True

    def output(self):
        try:
            return read(self.log)[-4000:]
        except OSError:
            return ""

    def stop(self):
        launch.stop(self.proc, grace=10)           # SIGTERM, then SIGKILL it and its workers
        self.out.close()


def start_nginx(server, tmp):
    binary = shutil.which("nginx", path=SBIN)
    if binary is None:
        pytest.skip("nginx is not installed: apt-get install nginx")
    port, plain = free_port(), free_port()
    text = read(NGINX_CONF)
    text = replace_once(text, "server 127.0.0.1:8000;", "server 127.0.0.1:%d;" % server.client)
    text = replace_once(text, "listen 443 ssl http2;", "listen 127.0.0.1:%d;" % port)
    text = replace_once(text, "listen [::]:443 ssl http2;", "")
    text = replace_once(text, "listen 80;", "listen 127.0.0.1:%d;" % plain)
    text = replace_once(text, "listen [::]:80;", "")
    text = "\n".join(line for line in text.splitlines() if not line.strip().startswith("ssl_"))
    with open(os.path.join(tmp, "megacomet.conf"), "w") as f:
        f.write(text)
    # The main context a distribution's nginx.conf gives; the file itself is http context.
    main = os.path.join(tmp, "nginx.conf")
    with open(main, "w") as f:
        f.write("pid %(t)s/nginx.pid;\nerror_log %(t)s/error.log info;\nworker_processes 1;\n"
                "events { worker_connections 1024; }\n"
                "http {\n    access_log %(t)s/access.log;\n"
                "    client_body_temp_path %(t)s/body;\n    proxy_temp_path %(t)s/proxy;\n"
                "    fastcgi_temp_path %(t)s/fastcgi;\n    uwsgi_temp_path %(t)s/uwsgi;\n"
                "    scgi_temp_path %(t)s/scgi;\n"
                "    include %(t)s/megacomet.conf;\n}\n" % {"t": tmp})
    argv = [binary, "-p", tmp + "/", "-c", main, "-e", os.path.join(tmp, "error.log"),
            "-g", "daemon off;"]
    return Proxy("nginx", argv, port, plain, os.path.join(tmp, "error.log"), server)


def start_haproxy(server, tmp):
    binary = shutil.which("haproxy", path=SBIN)
    if binary is None:
        pytest.skip("haproxy is not installed: apt-get install haproxy")
    port, plain = free_port(), free_port()
    text = read(HAPROXY_CFG)
    text = replace_once(text, "bind :443 ssl crt /etc/haproxy/certs/push.example.com.pem "
                              "alpn h2,http/1.1", "bind 127.0.0.1:%d" % port)
    text = replace_once(text, "bind :80", "bind 127.0.0.1:%d" % plain)
    text = replace_once(text, "    server megacomet 127.0.0.1:8000\n",
                        "    server megacomet 127.0.0.1:%d\n" % server.client)
    text = replace_once(text, "log /dev/log local0", "log stderr local0")
    text = replace_once(text, "maxconn 200000", "maxconn 1000")   # this machine's fd limit
    cfg = os.path.join(tmp, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(text)
    check = subprocess.run([binary, "-c", "-f", cfg], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    return Proxy("haproxy", [binary, "-db", "-f", cfg], port, plain,
                 os.path.join(tmp, "haproxy.log"), server)


@pytest.fixture(scope="module")
def backend():
    """One server for the module: its client port behind each proxy in turn."""
    server = Server(workers=2).start()
    try:
        yield server
        bugs = [line for line in server.stderr().splitlines()
                if "internal error" in line or "Traceback" in line]
        assert not bugs, "the server logged internal errors:\n" + "\n".join(bugs[:5])
    finally:
        server.stop()


@pytest.fixture(scope="module", params=["nginx", "haproxy"])
def proxy(request, backend, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp(request.param))
    started = (start_nginx if request.param == "nginx" else start_haproxy)(backend, tmp)
    try:
        yield started
    finally:
        started.stop()


def get(port, path, headers=None, timeout=WAIT, conn=None):
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {"Host": "push.example.com"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        if own:
            conn.close()


def totals(server):
    return server.stats()["totals"]


def test_a_held_long_poll_is_answered_by_a_publish(proxy):
    server, ident = proxy.server, uid("poll")
    before = totals(server)["subscribers"]
    answer = {}

    def poll():
        answer["reply"] = get(proxy.port, "/sub/%s?since=0&timeout=60" % ident, timeout=30)
    waiter = threading.Thread(target=poll, daemon=True)
    waiter.start()
    wait_for(lambda: totals(server)["subscribers"] > before, timeout=WAIT,
             message="the poll held at the server, through %s" % proxy.name)
    published = time.monotonic()
    seq = server.pub(ident, "through the proxy")
    waiter.join(timeout=WAIT)
    assert not waiter.is_alive(), "the poll was not answered through %s" % proxy.name
    status, headers, body = answer["reply"]
    assert status == 200, (status, body)
    assert time.monotonic() - published < WAIT
    reply = json.loads(body)
    assert reply["messages"] == [{"seq": seq, "data": "through the proxy"}]


def test_a_poll_is_held_as_long_as_it_asks(proxy):
    """5 s here; the configurations' timeouts are checked above to exceed 120 s."""
    started = time.monotonic()
    status, _, body = get(proxy.port, "/sub/%s?since=0&timeout=5" % uid("held"), timeout=20)
    held = time.monotonic() - started
    assert status == 200, (status, body)
    assert json.loads(body)["messages"] == []
    assert 4.5 <= held < 15, held


def test_an_eventsource_stream_gets_a_message_while_it_stays_open(proxy):
    server, ident = proxy.server, uid("sse")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT) as sock:
        sock.sendall(("GET /sse/%s HTTP/1.1\r\nHost: push.example.com\r\n"
                      "Accept: text/event-stream\r\n\r\n" % ident).encode())
        got = b""
        deadline = time.monotonic() + WAIT

        def until(marker):
            nonlocal got
            while marker not in got:
                assert time.monotonic() < deadline, "no %r through %s in %r" % (
                    marker, proxy.name, got)
                chunk = sock.recv(65536)
                assert chunk, "%s closed the stream: %r" % (proxy.name, got)
                got += chunk
        until(b"retry: ")                         # the stream's start came through at once
        head = got.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 200") and b"text/event-stream" in head, head
        seq = server.pub(ident, "streamed")
        until(b"data: streamed\n")
        assert b"id: %d\n" % seq in got
        time.sleep(0.2)
        assert not is_closed(sock), "the stream ended after one message"


def test_a_websocket_gets_a_message(proxy):
    from websockets.sync.client import connect
    server, ident = proxy.server, uid("ws")
    url = "ws://127.0.0.1:%d/ws/%s?since=0" % (proxy.port, ident)
    with connect(url, open_timeout=WAIT, close_timeout=5) as ws:
        seq = server.pub(ident, "framed")
        frame = json.loads(ws.recv(timeout=WAIT))
    assert (frame["id"], frame["seq"], frame["data"]) == (ident, seq, "framed")


def test_requests_share_upstream_keep_alive_connections(proxy):
    server, ident = proxy.server, uid("keep")
    server.pub(ident, "kept")
    before = totals(server)["accepted"]
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=WAIT)
    try:
        for _ in range(20):
            status, _, body = get(proxy.port, "/sub/%s?since=0" % ident, conn=conn)
            assert status == 200 and json.loads(body)["messages"][0]["data"] == "kept"
    finally:
        conn.close()
    # 20 requests, and the two /stats requests on the app port: without keep-alive towards
    # the server, 20 connections or more.
    assert totals(server)["accepted"] - before <= 6


def test_the_app_port_is_not_reachable_through_the_proxy(proxy):
    server, ident = proxy.server, uid("private")
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=WAIT)
    try:
        conn.request("POST", "/pub/" + ident, body=b"intruder", headers={"Host": "push.example.com"})
        resp = conn.getresponse()
        assert resp.status == 405, (resp.status, resp.read())
    finally:
        conn.close()
    for path in ("/stats", "/metrics", "/health"):
        assert get(proxy.port, path)[0] == 404
    status, _, body = get(proxy.port, "/sub/%s?since=0&timeout=1" % ident)
    assert status == 200 and json.loads(body)["messages"] == []


def test_plain_http_is_sent_to_https(proxy):
    status, headers, _ = get(proxy.plain, "/demo")
    assert status == 301, status
    assert headers["location"] == "https://push.example.com/demo"


def test_the_demo_page_and_what_it_tells_come_through(proxy):
    status, headers, body = get(proxy.port, "/demo")
    assert status == 200 and b'<script src="/megacomet.js"></script>' in body
    assert headers["x-megacomet-demo"] == "app=127.0.0.1:%d; token=0; signed=0" % proxy.server.app

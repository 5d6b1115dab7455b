"""deploy/nginx.conf and deploy/haproxy.cfg, run for real in front of the real server.

Each configuration is read from deploy/ and templated as little as a test
needs: its TLS listener on a free loopback port, either as plain HTTP or with
TLS as the file has it (a certificate made by the test with openssl, trusted
by the test's clients alone), its port-80 redirect on another free port, the
upstream the server's client port, and logs and pid files in the test's tmp
dir; everything else (timeouts, headers, buffering, keep-alive) is the file's
own.  Every substitution must match exactly once, so a configuration that
changes shape fails here rather than being tested half.

Then real clients go through each proxy, over HTTP and over TLS: a long-poll
held at the server and answered by a publish, a held poll that times out as
asked, an EventSource stream that gets a message while it stays open, a
WebSocket (the ``websockets`` client) that gets one, keep-alive towards the
server (many requests, few upstream connections), the app port kept out of
reach, the redirect to https, and the demo page's header passed on.  A held
poll of 120 s, the longest a client may ask, is too long to wait for here: the
configurations' timeouts are read and must exceed it instead.  haproxy's
commented ``send-proxy-v2`` line is run too, with a server started with
``--proxy-protocol``: the server tells clients apart by their own addresses.

nginx and haproxy are started by the test (.ci/run installs both) and
stopped by pid; without one, its tests are skipped and say why.
"""

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
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

    def __init__(self, name, argv, port, plain, log, server, tls=None):
        self.name, self.port, self.plain, self.log, self.server = name, port, plain, log, server
        self.tls = tls                             # the Certificate its front door serves
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

    def connection(self, timeout=WAIT, **kw):
        """An HTTP(S) client connection to the front door."""
        if self.tls is None:
            return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout, **kw)
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                           context=self.tls.context(), **kw)

    def socket(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
        if self.tls is None:
            return sock
        return self.tls.context().wrap_socket(sock, server_hostname="127.0.0.1")

    def url(self, path, scheme="ws"):
        return "%s%s://127.0.0.1:%d%s" % (scheme, "s" if self.tls else "", self.port, path)


def start_nginx(server, tmp, tls=None):
    """nginx with deploy/nginx.conf in front of ``server``: plain HTTP on its TLS listener,
    or with ``tls`` (a Certificate) TLS as the file has it, with that certificate."""
    binary = shutil.which("nginx", path=SBIN)
    if binary is None:
        pytest.skip("nginx is not installed: apt-get install nginx")
    port, plain = free_port(), free_port()
    text = read(NGINX_CONF)
    text = replace_once(text, "server 127.0.0.1:8000;", "server 127.0.0.1:%d;" % server.client)
    text = replace_once(text, "listen [::]:443 ssl http2;", "")
    text = replace_once(text, "listen 80;", "listen 127.0.0.1:%d;" % plain)
    text = replace_once(text, "listen [::]:80;", "")
    if tls is None:
        text = replace_once(text, "listen 443 ssl http2;", "listen 127.0.0.1:%d;" % port)
        text = "\n".join(line for line in text.splitlines() if not line.strip().startswith("ssl_"))
    else:
        text = replace_once(text, "listen 443 ssl http2;", "listen 127.0.0.1:%d ssl http2;" % port)
        text = replace_once(text, "/etc/ssl/megacomet/fullchain.pem", tls.cert)
        text = replace_once(text, "/etc/ssl/megacomet/privkey.pem", tls.key)
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
    return Proxy("nginx", argv, port, plain, os.path.join(tmp, "error.log"), server, tls)


def start_haproxy(server, tmp, tls=None, proxy_protocol=False):
    """haproxy with deploy/haproxy.cfg in front of ``server``: plain HTTP on its TLS bind, or
    with ``tls`` (a Certificate) TLS as the file has it; with ``proxy_protocol``, the file's
    commented send-proxy-v2 server line in place of the other."""
    binary = shutil.which("haproxy", path=SBIN)
    if binary is None:
        pytest.skip("haproxy is not installed: apt-get install haproxy")
    port, plain = free_port(), free_port()
    text = read(HAPROXY_CFG)
    bind = "bind :443 ssl crt /etc/haproxy/certs/push.example.com.pem alpn h2,http/1.1"
    if tls is None:
        text = replace_once(text, bind, "bind 127.0.0.1:%d" % port)
    else:
        text = replace_once(text, bind, "bind 127.0.0.1:%d ssl crt %s alpn h2,http/1.1"
                            % (port, tls.pem))
    text = replace_once(text, "bind :80", "bind 127.0.0.1:%d" % plain)
    server_line = "    server megacomet 127.0.0.1:8000\n"
    proxy_line = "    # server megacomet 127.0.0.1:8000 send-proxy-v2\n"
    if proxy_protocol:
        text = replace_once(text, server_line, "")
        server_line = proxy_line
    text = replace_once(text, server_line, server_line.replace("# ", "").replace(
        "127.0.0.1:8000", "127.0.0.1:%d" % server.client))
    text = replace_once(text, "log /dev/log local0", "log stderr local0")
    text = replace_once(text, "maxconn 200000", "maxconn 1000")   # this machine's fd limit
    cfg = os.path.join(tmp, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(text)
    check = subprocess.run([binary, "-c", "-f", cfg], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    return Proxy("haproxy", [binary, "-db", "-f", cfg], port, plain,
                 os.path.join(tmp, "haproxy.log"), server, tls)


class Certificate:
    """A self-signed certificate for push.example.com and 127.0.0.1, made by openssl for the
    test: ``cert`` and ``key`` (nginx), ``pem`` both in one file (haproxy)."""

    def __init__(self, tmp):
        binary = shutil.which("openssl")
        if binary is None:
            pytest.skip("openssl is not installed: apt-get install openssl")
        self.cert, self.key, self.pem = (os.path.join(tmp, n) for n in
                                         ("cert.pem", "key.pem", "both.pem"))
        made = subprocess.run(
            [binary, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "2", "-subj", "/CN=push.example.com",
             "-addext", "subjectAltName=DNS:push.example.com,IP:127.0.0.1",
             "-keyout", self.key, "-out", self.cert], capture_output=True, text=True, timeout=30)
        assert made.returncode == 0, made.stderr
        with open(self.pem, "w") as f:
            f.write(read(self.cert) + read(self.key))

    def context(self):
        """A client's TLS context that trusts this certificate alone."""
        return ssl.create_default_context(cafile=self.cert)


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


@pytest.fixture(scope="module", params=["nginx", "haproxy", "nginx+tls", "haproxy+tls"])
def proxy(request, backend, tmp_path_factory):
    """Each proxy in front of the server: plain HTTP, then TLS as the file has it."""
    name, _, tls = request.param.partition("+")
    tmp = str(tmp_path_factory.mktemp(name))
    cert = Certificate(tmp) if tls else None
    started = (start_nginx if name == "nginx" else start_haproxy)(backend, tmp, tls=cert)
    try:
        yield started
    finally:
        started.stop()


def get(front, path, headers=None, timeout=WAIT, conn=None):
    """GET through a Proxy's front door (or a plain port): (status, headers, body)."""
    own = conn is None
    if own:
        conn = (front.connection(timeout) if isinstance(front, Proxy) else
                http.client.HTTPConnection("127.0.0.1", front, timeout=timeout))
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
        answer["reply"] = get(proxy, "/sub/%s?since=0&timeout=60" % ident, timeout=30)
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
    status, _, body = get(proxy, "/sub/%s?since=0&timeout=5" % uid("held"), timeout=20)
    held = time.monotonic() - started
    assert status == 200, (status, body)
    assert json.loads(body)["messages"] == []
    assert 4.5 <= held < 15, held


def test_an_eventsource_stream_gets_a_message_while_it_stays_open(proxy):
    server, ident = proxy.server, uid("sse")
    with proxy.socket() as sock:
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
    url = proxy.url("/ws/%s?since=0" % ident)
    tls = {"ssl": proxy.tls.context()} if proxy.tls else {}
    with connect(url, open_timeout=WAIT, close_timeout=5, **tls) as ws:
        seq = server.pub(ident, "framed")
        frame = json.loads(ws.recv(timeout=WAIT))
    assert (frame["id"], frame["seq"], frame["data"]) == (ident, seq, "framed")


def test_requests_share_upstream_keep_alive_connections(proxy):
    server, ident = proxy.server, uid("keep")
    server.pub(ident, "kept")
    before = totals(server)["accepted"]
    conn = proxy.connection()
    try:
        for _ in range(20):
            status, _, body = get(proxy, "/sub/%s?since=0" % ident, conn=conn)
            assert status == 200 and json.loads(body)["messages"][0]["data"] == "kept"
    finally:
        conn.close()
    # 20 requests, and the two /stats requests on the app port: without keep-alive towards
    # the server, 20 connections or more.
    assert totals(server)["accepted"] - before <= 6


def test_the_app_port_is_not_reachable_through_the_proxy(proxy):
    ident = uid("private")
    conn = proxy.connection()
    try:
        conn.request("POST", "/pub/" + ident, body=b"intruder",
                     headers={"Host": "push.example.com"})
        resp = conn.getresponse()
        assert resp.status == 405, (resp.status, resp.read())
    finally:
        conn.close()
    for path in ("/stats", "/metrics", "/health"):
        assert get(proxy, path)[0] == 404
    status, _, body = get(proxy, "/sub/%s?since=0&timeout=1" % ident)
    assert status == 200 and json.loads(body)["messages"] == []


def test_plain_http_is_sent_to_https(proxy):
    status, headers, _ = get(proxy.plain, "/demo")
    assert status == 301, status
    assert headers["location"] == "https://push.example.com/demo"


def test_the_demo_page_and_what_it_tells_come_through(proxy):
    status, headers, body = get(proxy, "/demo")
    assert status == 200 and b'<script src="/megacomet.js"></script>' in body
    assert headers["x-megacomet-demo"] == "app=127.0.0.1:%d; token=0; signed=0" % proxy.server.app


# -- the client's address in the PROXY protocol (haproxy's send-proxy-v2) ---------------------

def server_has(flag):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "megacomet.py"), "--help"],
                          capture_output=True, text=True, timeout=30)
    return flag in done.stdout


def get_from(proxy, source, path, timeout=WAIT):
    """GET through the proxy from the local address ``source`` (127.0.0.2, ...)."""
    conn = proxy.connection(timeout=timeout, source_address=(source, 0))
    try:
        return get(proxy, path, conn=conn)
    finally:
        conn.close()


def held_poll(proxy, source, path):
    """A poll from ``source`` through the proxy, in a thread: (thread, {"reply": ...})."""
    answer = {}

    def poll():
        try:
            answer["reply"] = get_from(proxy, source, path, timeout=30)
        except OSError as e:
            answer["reply"] = e
    waiter = threading.Thread(target=poll, daemon=True)
    waiter.start()
    return waiter, answer


def test_haproxy_send_proxy_v2_gives_the_server_each_clients_address(tmp_path):
    """The commented server line, with a server started with --proxy-protocol: the server
    tells clients apart by their own addresses (127.0.0.2, 127.0.0.3), not haproxy's
    127.0.0.1, as --max-conns-per-ip 1 shows."""
    if not server_has("--proxy-protocol"):
        pytest.skip("this server has no --proxy-protocol yet")
    server = Server("--proxy-protocol", "--max-conns-per-ip", 1, workers=1).start()
    try:
        front = start_haproxy(server, str(tmp_path), proxy_protocol=True)
        try:
            ident = uid("real")
            waiter, answer = held_poll(front, "127.0.0.2", "/sub/%s?since=0&timeout=30" % ident)
            wait_for(lambda: totals(server)["subscribers"] >= 1, timeout=WAIT,
                     message="the first client's poll held at the server")
            # Another client: another address at the server, though both come from haproxy.
            status, _, body = get_from(front, "127.0.0.3",
                                       "/sub/%s?since=0&timeout=1" % uid("other"))
            assert status == 200, (status, body)
            # The first client again, on a second connection: its address is at its cap.
            status, _, body = get_from(front, "127.0.0.2",
                                       "/sub/%s?since=0&timeout=1" % uid("again"))
            assert status >= 500, (status, body)
            assert totals(server)["ip_refused"] >= 1
            seq = server.pub(ident, "to the first client")
            waiter.join(timeout=WAIT)
            assert not waiter.is_alive()
            status, _, body = answer["reply"]
            assert status == 200 and json.loads(body)["messages"] == [
                {"seq": seq, "data": "to the first client"}]
        finally:
            front.stop()
        assert "internal error" not in server.stderr()
    finally:
        server.stop()

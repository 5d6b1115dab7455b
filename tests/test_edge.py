"""Who is connecting, on the real server: --proxy-protocol (v1 and v2 headers from raw sockets
and from a real haproxy), --max-conns-per-ip, and the app port's Host check."""

import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time

import pytest

from conftest import read_response, wait_for
from megacomet import proxyproto

NOT_FOUND = b"GET /no-such-page HTTP/1.1\r\nHost: push.example\r\n\r\n"


def connect(port, source="127.0.0.1", timeout=5.0):
    """A client socket to 127.0.0.1:port from ``source`` (127.0.0.2 ... : another address)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def closed_without_answer(sock):
    """Does the server close this connection without a byte of answer?"""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def logged(server, text, timeout=10.0):
    return wait_for(lambda: text in server.stderr(), timeout, message="log line with %r" % text)


# -- --proxy-protocol -----------------------------------------------------------------------

@pytest.fixture
def proxied(server_factory):
    return server_factory("--proxy-protocol", workers=1)


def test_v1_header_carries_the_address_into_log_lines(proxied):
    with connect(proxied.client) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 8000\r\n")
        sock.sendall(b"NOT HTTP\r\n\r\n")
        status, _, _ = read_response(sock)
    assert status == 400
    logged(proxied, "client: 400 malformed request line (client 203.0.113.7:4242)")


def test_v2_header_carries_an_ipv6_address(proxied):
    header = proxyproto.v2_header(("2001:db8::7", 4243), ("2001:db8::1", 443))
    with connect(proxied.client) as sock:
        sock.sendall(header + NOT_FOUND)          # the request in the header's packet
        status, _, _ = read_response(sock)
    assert status == 404
    logged(proxied, "(client [2001:db8::7]:4243)")


def test_header_split_over_several_packets(proxied):
    header = proxyproto.v2_header(("198.51.100.20", 5000), ("192.0.2.1", 8000),
                                  b"\x04\x00\x03abc")
    with connect(proxied.client) as sock:
        for piece in (header[:3], header[3:14], header[14:20], header[20:]):
            sock.sendall(piece)
            time.sleep(0.05)
        sock.sendall(NOT_FOUND[:10])
        time.sleep(0.05)
        sock.sendall(NOT_FOUND[10:])
        status, _, _ = read_response(sock)
    assert status == 404
    logged(proxied, "(client 198.51.100.20:5000)")
    line = b"PROXY TCP4 198.51.100.21 192.0.2.1 5001 8000\r\n"
    with connect(proxied.client) as sock:
        for i in range(0, len(line), 7):
            sock.sendall(line[i:i + 7])
            time.sleep(0.02)
        sock.sendall(NOT_FOUND)
        assert read_response(sock)[0] == 404
    logged(proxied, "(client 198.51.100.21:5001)")


def test_a_subscription_behind_a_header_works(proxied):
    header = proxyproto.v1_header(("203.0.113.9", 1000), ("192.0.2.1", 8000))
    with connect(proxied.client) as sock:
        sock.sendall(header + b"GET /sub/edge1?since=0&timeout=5 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        proxied.pub("edge1", "hello")
        status, _, body = read_response(sock)
    assert status == 200
    assert [m["data"] for m in json.loads(body)["messages"]] == ["hello"]


def test_local_command_keeps_the_peer_address(proxied):
    with connect(proxied.client, "127.0.0.4") as sock:
        sock.sendall(proxyproto.v2_header() + NOT_FOUND)
        assert read_response(sock)[0] == 404
    logged(proxied, "(client 127.0.0.4:")


def test_no_header_is_closed_with_one_log_line(proxied):
    with connect(proxied.client) as sock:
        sock.sendall(NOT_FOUND)
        assert closed_without_answer(sock)
    logged(proxied, "no PROXY protocol header (first byte 0x47); closed (client 127.0.0.1:")
    with connect(proxied.client) as sock:
        sock.sendall(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n" + NOT_FOUND)
        assert closed_without_answer(sock)
    logged(proxied, "PROXY v1: invalid port; closed")


def test_without_the_flag_a_header_is_never_trusted(server_factory):
    server = server_factory(workers=1)
    with connect(server.client, "127.0.0.5") as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 8000\r\n" + NOT_FOUND)
        status, _, _ = read_response(sock)
    assert status == 400
    logged(server, "client: 400 malformed request line (client 127.0.0.5:")
    assert "203.0.113.7" not in server.stderr()


# -- --max-conns-per-ip ---------------------------------------------------------------------

def admitted(sock):
    sock.sendall(NOT_FOUND)
    try:
        return read_response(sock)[0] == 404
    except (ConnectionResetError, ConnectionAbortedError, OSError):
        return False


def served(sock):
    """A request answered with the connection kept open."""
    sock.sendall(b"GET /megacomet.js HTTP/1.1\r\nHost: push.example\r\n\r\n")
    status, headers, _ = read_response(sock)
    return status == 200 and headers.get("connection") != "close"


def ip_refused(server):
    return server.stats()["totals"]["ip_refused"]


def test_max_conns_per_ip_refuses_past_n_per_address(server_factory):
    server = server_factory("--max-conns-per-ip", "2", workers=1)
    held = [connect(server.client, "127.0.0.2") for _ in range(2)]
    refused = connect(server.client, "127.0.0.2")
    assert closed_without_answer(refused)
    refused.close()
    other = connect(server.client, "127.0.0.3")
    assert admitted(other)
    for sock in held:
        assert admitted(sock)                     # the two held ones are served
    assert ip_refused(server) == 1
    logged(server, "client: 127.0.0.2 already holds 2 connections on this worker "
                   "(--max-conns-per-ip); refused")
    metrics = server.request("GET", "/metrics")[2].decode()
    assert 'megacomet_ip_refused_total{worker="0"} 1' in metrics
    held.pop().close()                            # one goes: room for one more
    wait_for(lambda: admitted(connect(server.client, "127.0.0.2")), message="a place again")
    for sock in held + [other]:
        sock.close()


def test_max_conns_per_ip_counts_the_real_address_behind_a_proxy(server_factory):
    server = server_factory("--proxy-protocol", "--max-conns-per-ip", "1", workers=1)
    header = proxyproto.v1_header(("198.51.100.30", 1), ("192.0.2.1", 8000))
    first = connect(server.client)
    first.sendall(header)
    time.sleep(0.2)
    second = connect(server.client)               # the same balancer, another client: served
    second.sendall(proxyproto.v1_header(("198.51.100.31", 2), ("192.0.2.1", 8000)))
    assert admitted(second)
    third = connect(server.client)                # the first client again: refused
    third.sendall(proxyproto.v1_header(("198.51.100.30", 3), ("192.0.2.1", 8000)) + NOT_FOUND)
    assert closed_without_answer(third)
    assert ip_refused(server) == 1
    logged(server, "client: 198.51.100.30 already holds 1 connections")
    assert admitted(first)
    for sock in (first, second, third):
        sock.close()
    # Closed connections give their place back (none is left counted, refused or not).
    header = proxyproto.v2_header(("198.51.100.30", 4), ("192.0.2.1", 8000))

    def served_behind_the_proxy():
        with connect(server.client) as sock:
            sock.sendall(header)
            try:
                return served(sock)
            except OSError:                       # (refused: its place is not back yet)
                return False
    for _ in range(5):
        wait_for(served_behind_the_proxy, message="a place for 198.51.100.30")


# -- the app port's Host check --------------------------------------------------------------

def app_get(server, host, path=b"/stats", version=b"1.1"):
    with socket.create_connection(("127.0.0.1", server.app), timeout=5) as sock:
        head = b"GET %s HTTP/%s\r\n" % (path, version)
        if host is not None:
            head += b"Host: %s\r\n" % host
        sock.sendall(head + b"Connection: close\r\n\r\n")
        return read_response(sock)[0]


def test_app_port_answers_only_its_own_host_names(server_factory):
    server = server_factory("--app-server-name", "Push.Internal", workers=1)
    port = b"%d" % server.app
    assert app_get(server, b"rebound.example:" + port) == 421
    assert app_get(server, b"rebound.example") == 421
    assert app_get(server, b"127.0.0.2:" + port) == 421
    assert app_get(server, b"localhost.rebound.example:" + port, b"/metrics") == 421
    for host in (b"127.0.0.1:" + port, b"127.0.0.1", b"localhost", b"LOCALHOST:" + port,
                 b"[::1]:" + port, b"push.internal", b"push.internal:" + port):
        assert app_get(server, host) == 200, host
    assert app_get(server, None, version=b"1.0") == 200       # HTTP/1.0 without Host
    logged(server, "app: 421 Host 'rebound.example:%d' is not a name of this app port"
           % server.app)
    assert server.request("GET", "/stats")[0] == 200             # http.client's own Host


# -- a real haproxy in front ----------------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front_passes_the_client_address(server_factory, send_proxy):
    server = server_factory("--proxy-protocol", "--max-conns-per-ip", "1", workers=1)
    front = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write("global\n    maxconn 200\n"
                    "defaults\n    mode tcp\n    timeout connect 5s\n"
                    "    timeout client 60s\n    timeout server 60s\n"
                    "frontend front\n    bind 127.0.0.1:%d\n    default_backend megacomet\n"
                    "backend megacomet\n    server s1 127.0.0.1:%d %s\n"
                    % (front, server.client, send_proxy))
        proxy = subprocess.Popen(["haproxy", "-db", "-f", cfg], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
        try:
            def up():
                try:
                    socket.create_connection(("127.0.0.1", front), timeout=1).close()
                    return True
                except OSError:
                    return False
            wait_for(up, message="haproxy listening")
            with connect(front, "127.0.0.6") as sock:
                assert served(sock)                   # held open: 127.0.0.6 has 1
                with connect(front, "127.0.0.6") as again:
                    again.sendall(NOT_FOUND)
                    assert closed_without_answer(again)
                logged(server, "client: 127.0.0.6 already holds 1 connections")
                with connect(front, "127.0.0.7") as other:   # another client passes
                    local_port = other.getsockname()[1]
                    assert admitted(other)
                logged(server, "client: 404 no such path (client 127.0.0.7:%d)" % local_port)
            assert ip_refused(server) >= 1        # (haproxy may retry a server that closed)
        finally:
            proxy.terminate()
            proxy.wait(10)


# -- the PROXY header before TLS ------------------------------------------------------------

@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
def test_the_header_comes_before_the_tls_handshake(server_factory, tmp_path):
    from test_tls import Pki
    pki = Pki(tmp_path)
    cert, key = pki.server_cert("edge")
    server = server_factory("--proxy-protocol", "--tls-cert", cert, "--tls-key", key, workers=1)
    for header, client in ((proxyproto.v2_header(("203.0.113.44", 4444), ("192.0.2.1", 443)),
                            "203.0.113.44:4444"),
                           (b"PROXY TCP6 2001:db8::44 2001:db8::1 4445 443\r\n",
                            "[2001:db8::44]:4445")):
        raw = connect(server.client)
        raw.sendall(header)
        with pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(NOT_FOUND)
            assert read_response(sock)[0] == 404
        logged(server, "client: 404 no such path (client %s)" % client)
    with connect(server.client) as raw:               # a ClientHello with no header first
        with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1")
    logged(server, "no PROXY protocol header (first byte 0x16); closed")


# -- the Host check's rules, without a server -------------------------------------------

def host_rules(app_host, names=(), port=9000):
    from megacomet import appport
    from inprocess import make_config
    cfg = make_config(app_host=app_host, app_port=port, app_server_names=names)
    hosts, any_ip = appport.allowed_hosts(cfg)
    return lambda host: host in hosts or (any_ip and appport.ip_literal(host))


def test_host_rules_for_loopback_wildcard_and_named_app_hosts():
    loopback = host_rules("127.0.0.1", ("push.internal:8080",))
    assert all(map(loopback, (b"127.0.0.1", b"127.0.0.1:9000", b"localhost", b"localhost:9000",
                              b"[::1]", b"[::1]:9000", b"push.internal:8080")))
    assert not any(map(loopback, (b"127.0.0.1:9001", b"127.0.0.2", b"push.internal",
                                  b"rebound.example", b"rebound.example:9000", b"", b"[::1]x")))
    wildcard = host_rules("0.0.0.0")
    assert all(map(wildcard, (b"10.0.0.5", b"10.0.0.5:9000", b"[fd00::5]:9000", b"localhost",
                              b"127.0.0.1:9000")))
    assert not any(map(wildcard, (b"rebound.example", b"10.0.0.5.nip.io", b"fd00::5",
                                  b"[fe80::1%25eth0]", b"10.0.0.5:x")))
    ipv6 = host_rules("::1")
    assert ipv6(b"[::1]:9000") and ipv6(b"localhost") and not ipv6(b"::1")
    named = host_rules("10.0.0.5", ("push.internal",))
    assert named(b"10.0.0.5:9000") and named(b"push.internal:9000")
    assert not named(b"localhost") and not named(b"127.0.0.1")


def test_two_different_host_headers_trust_neither(server_factory):
    server = server_factory(workers=1)
    with socket.create_connection(("127.0.0.1", server.app), timeout=5) as sock:
        sock.sendall(b"GET /stats HTTP/1.1\r\nHost: localhost\r\nHost: rebound.example\r\n"
                     b"Connection: close\r\n\r\n")
        assert read_response(sock)[0] == 421


def test_the_flags_are_checked():
    from megacomet import cli
    args = cli.parse_args(["--proxy-protocol", "--max-conns-per-ip", "5",
                           "--app-server-name", "Push.Internal", "--app-server-name", "[fd00::5]:9000"])
    assert args.proxy_protocol and args.max_conns_per_ip == 5
    assert args.app_server_names == ("push.internal", "[fd00::5]:9000")
    plain = cli.parse_args([])
    assert not plain.proxy_protocol and plain.max_conns_per_ip == 0 and plain.app_server_names == ()
    for bad in (["--max-conns-per-ip", "-1"], ["--app-server-name", "a b"],
                ["--app-server-name", "evil.example/x"], ["--app-server-name", ""]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)

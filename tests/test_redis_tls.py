"""Cluster mode over TLS and with a password: rediss:// URLs against a real redis-server.

The Redis server listens on TLS only (``--port 0 --tls-port P``) with a certificate from
the test CA of test_tls.py, and asks for a password.  A node that trusts the CA and knows
the password publishes and delivers; one that does not reports itself unhealthy, answers
publishes with 503, and says why in its log, in a line or a few, not one per retry.
"""

import shutil
import signal
import subprocess
import time

import pytest

from conftest import wait_for
from redisfixtures import redislab, require_redis
from test_tls import OPENSSL, Pki

PASSWORD = "s3cret-pw"
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """(port, CA file) of a TLS-only redis-server that wants PASSWORD."""
    require_redis()
    pki = Pki(tmp_path_factory.mktemp("redis-pki"))
    cert, key = pki.server_cert("redis-test")
    port = redislab.free_port()
    workdir = str(tmp_path_factory.mktemp("redis-tls"))
    proc = subprocess.Popen(
        [shutil.which("redis-server"), "--port", "0", "--tls-port", str(port),
         "--bind", "127.0.0.1", "--tls-cert-file", cert, "--tls-key-file", key,
         "--tls-auth-clients", "no", "--requirepass", PASSWORD, "--save", "",
         "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            check = subprocess.run(
                [shutil.which("redis-cli"), "--tls", "--cacert", pki.ca, "-p", str(port),
                 "-a", PASSWORD, "--no-auth-warning", "PING"],
                capture_output=True, text=True, timeout=5)
            if check.stdout.strip() == "PONG":
                break
            assert time.monotonic() < deadline, "TLS redis-server did not start"
            time.sleep(0.1)
        yield port, pki.ca
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def test_a_node_publishes_and_delivers_through_a_tls_redis_with_a_password(server_factory,
                                                                           tls_redis):
    port, ca = tls_redis
    node = server_factory("--redis", "rediss://:%s@127.0.0.1:%d?ssl_ca_certs=%s"
                          % (PASSWORD, port, ca))
    wait_for(lambda: node.request("GET", "/health")[0] == 200, timeout=10)
    status, _, body = node.request("POST", "/pub/tls-a", b"over tls")
    assert status == 202 and b'"seq": 1' in body
    status, _, body = node.request("GET", "/sub/tls-a?since=0", port=node.client)
    assert status == 200 and b'"data": "over tls"' in body


@pytest.mark.parametrize("url, why", [
    ("rediss://:%(pw)s@127.0.0.1:%(port)d", "TLS handshake failed"),           # CA unknown
    ("rediss://:wrong@127.0.0.1:%(port)d?ssl_ca_certs=%(ca)s", "refused the connection"),
])
def test_a_node_that_cannot_speak_to_redis_is_unhealthy_and_says_why(server_factory,
                                                                     tls_redis, url, why):
    port, ca = tls_redis
    node = server_factory("--redis", url % {"pw": PASSWORD, "port": port, "ca": ca},
                          "--redis-timeout", "1")
    wait_for(lambda: node.request("GET", "/health")[0] == 503, timeout=10)
    status, headers, body = node.request("POST", "/pub/tls-b", b"lost?")
    assert status == 503 and headers.get("Retry-After") == "1", (status, headers, body)
    assert b"redis unavailable" in body
    time.sleep(2)                                 # it keeps trying, with a backoff
    lines = [line for line in node.stderr().splitlines() if why in line]
    assert 1 <= len(lines) <= 8, lines            # logged, but not once per attempt

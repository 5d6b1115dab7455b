"""The browser client (megacomet/static/megacomet.js), served by the workers and run for real.

Node (20, which has fetch but neither WebSocket nor EventSource) runs the
client unchanged: "auto" falls back to long-polling, and the client must
resume after a SIGKILLed worker with every message exactly once and in order.
Real-browser tests of the WebSocket and EventSource transports are still to
come (issue 7).
"""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import ROOT, wait_for
from test_bad_input import uid
from test_streams import pids_or_none

NODE = shutil.which("node")


def test_client_and_demo_are_served(server_factory):
    server = server_factory(workers=1)
    status, headers, body = server.request("GET", "/megacomet.js", port=server.client)
    assert status == 200 and headers["Content-Type"].startswith("application/javascript")
    assert body == open(os.path.join(ROOT, "megacomet", "static", "megacomet.js"), "rb").read()
    for path in ("/", "/demo"):
        status, headers, body = server.request("GET", path, port=server.client)
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert b'<script src="/megacomet.js"></script>' in body


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_client_resumes_across_a_killed_worker_exactly_once_in_order(server_factory):
    server = server_factory("--poll-timeout", 5, workers=2)
    a, b = uid("jsa"), uid("jsb")
    server.pub(a, "a1")                               # buffered before the client starts
    follower = subprocess.Popen(
        [NODE, os.path.join(ROOT, "tests", "js", "follow.js"), os.path.join(ROOT, "megacomet", "static", "megacomet.js"),
         "http://127.0.0.1:%d" % server.client, "%s,%s" % (a, b), "41", "40"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: server.stats()["totals"]["subscribers"] >= 1, timeout=10,
                 message="the client's poll")
        for i in range(2, 22):
            server.pub(a, "a%d" % i)
            server.pub(b, "b%d" % (i - 1))
            if i == 10:                               # mid-stream, one worker dies
                victim = server.worker_pids()[0]
                os.kill(victim, signal.SIGKILL)
                wait_for(lambda: (lambda p: p and all(p) and victim not in p)(pids_or_none(server)),
                         timeout=10, message="the restart")
            time.sleep(0.02)
        out, err = follower.communicate(timeout=40)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 0, err[-2000:]
    got = [json.loads(line) for line in out.splitlines()]
    assert {m["via"] for m in got} == {"poll"}
    assert [(m["seq"], m["data"]) for m in got if m["id"] == a] == [(i, "a%d" % i) for i in range(1, 22)]
    assert [(m["seq"], m["data"]) for m in got if m["id"] == b] == [(i, "b%d" % i) for i in range(1, 21)]

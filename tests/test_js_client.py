"""The browser client (megacomet/static/megacomet.js), served by the workers and run for real.

Node (20, which has fetch but neither WebSocket nor EventSource) runs the
client unchanged: "auto" falls back to long-polling.  Against real servers the
client must get every message exactly once and in order, per id, through a
SIGKILLed worker, a full restart of the server (every id's epoch changes, seqs
begin again at 1) and a resume from its saved cursors and epochs in which one
id's epoch changed (it was forgotten and created again) and the other's did not.
tests/js/epochs.js checks each transport's handling of per-id epochs against
fake WebSocket, EventSource and fetch.  Real-browser tests of every transport
are in test_browser.py.
"""

import json
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from conftest import ROOT, wait_for
from test_bad_input import uid
from test_streams import Stream, pids_or_none

NODE = shutil.which("node")
CLIENT = os.path.join(ROOT, "megacomet", "static", "megacomet.js")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")


class Follower:
    """tests/js/follow.js in node: the client following ids; its stdout read as it comes."""

    def __init__(self, server, ids, expect, seconds, **options):
        args = [NODE, os.path.join(ROOT, "tests", "js", "follow.js"), CLIENT,
                "http://127.0.0.1:%d" % server.client, ",".join(ids), str(expect), str(seconds)]
        if options:
            args.append(json.dumps(options))
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines = []
        self.err = []
        self.readers = [threading.Thread(target=self._read, args=(f, into), daemon=True)
                        for f, into in ((self.proc.stdout, self.lines), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, into):
        for line in stream:
            into.append(line)

    def messages(self):
        return [m for m in map(json.loads, list(self.lines)) if "seq" in m]

    def wait_messages(self, n, timeout=20):
        wait_for(lambda: len(self.messages()) >= n or self.proc.poll() is not None,
                 timeout=timeout, message="%d messages (%s)" % (n, "".join(self.err)[-500:]))
        assert len(self.messages()) >= n, "".join(self.err)[-2000:]

    def command(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout=40):
        """Wait for its exit (0: it got what it expected); (messages, its final state)."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for reader in self.readers:
                reader.join(5)
        assert self.proc.returncode == 0, "".join(self.err)[-2000:]
        state = json.loads(self.lines[-1])
        assert set(state) == {"cursors", "epochs"}, state
        return self.messages(), state


def of(messages, ident):
    return [(m["seq"], m["data"]) for m in messages if m["id"] == ident]


def epochs_of(server, *ids):
    """The ids' epochs, as the server tells them (a poll of them all, answered at once)."""
    status, _, body = server.request(
        "GET", "/sub/%s?since=%s&timeout=1" % (",".join(ids), ",".join(i + ":0" for i in ids)),
        port=server.client)
    assert status == 200, body
    return json.loads(body)["epoch"]


def test_client_and_demo_are_served(server_factory):
    server = server_factory(workers=1)
    status, headers, body = server.request("GET", "/megacomet.js", port=server.client)
    assert status == 200 and headers["Content-Type"].startswith("application/javascript")
    assert body == open(CLIENT, "rb").read()
    for path in ("/", "/demo"):
        status, headers, body = server.request("GET", path, port=server.client)
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert b'<script src="/megacomet.js"></script>' in body


@needs_node
def test_client_keeps_an_epoch_per_id_on_every_transport():
    """Fake transports: per-id epochs kept and sent back, a changed one resets that id alone."""
    done = subprocess.run([NODE, os.path.join(ROOT, "tests", "js", "epochs.js"), CLIENT],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok "), done.stdout


@needs_node
def test_client_resumes_across_a_killed_worker_exactly_once_in_order(server_factory):
    server = server_factory("--poll-timeout", 5, workers=2)
    a, b = uid("jsa"), uid("jsb")
    server.pub(a, "a1")                               # buffered before the client starts
    follower = Follower(server, [a, b], 41, 40)
    wait_for(lambda: server.stats()["totals"]["subscribers"] >= 1, timeout=10,
             message="the client's poll")
    for i in range(2, 22):
        server.pub(a, "a%d" % i)
        server.pub(b, "b%d" % (i - 1))
        if i == 10:                                   # mid-stream, one worker dies
            victim = server.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: (lambda p: p and all(p) and victim not in p)(pids_or_none(server)),
                     timeout=10, message="the restart")
        time.sleep(0.02)
    got, state = follower.finish()
    assert {m["via"] for m in got} == {"poll"}
    assert of(got, a) == [(i, "a%d" % i) for i in range(1, 22)]
    assert of(got, b) == [(i, "b%d" % i) for i in range(1, 21)]
    # A worker's restart keeps the shared memory: every id keeps its epoch.
    assert state == {"cursors": {a: 21, b: 20}, "epochs": epochs_of(server, a, b)}


@needs_node
def test_client_takes_every_id_from_seq_1_after_a_full_restart(server_factory):
    """Every id's epoch changes with a full restart: while the client is away (offline), the
    new run publishes more to each id than the client's cursor for it, so only the epochs
    tell it that these are new; it must get each id's new messages from seq 1, once."""
    server = server_factory(workers=2)
    a, b = uid("jsra"), uid("jsrb")
    for i in (1, 2, 3):
        server.pub(a, "a-old%d" % i)
    for i in (1, 2):
        server.pub(b, "b-old%d" % i)
    follower = Follower(server, [a, b], 5 + 7 + 6, 60, linger=500)
    follower.wait_messages(5)
    old = epochs_of(server, a, b)

    follower.command("offline")
    client_port, app_port = server.client, server.app
    server.stop()
    server = server_factory(workers=2, port=client_port, app_port=app_port)
    assert [server.pub(a, "a-new%d" % i) for i in range(1, 6)] == [1, 2, 3, 4, 5]
    assert [server.pub(b, "b-new%d" % i) for i in range(1, 5)] == [1, 2, 3, 4]
    assert server.stats()["totals"]["subscribers"] == 0      # the client is not back yet
    follower.command("online")
    follower.wait_messages(5 + 9, timeout=45)                # its backoff may be a few s
    for i in (6, 7):
        server.pub(a, "a-new%d" % i)
    for i in (5, 6):
        server.pub(b, "b-new%d" % i)
    got, state = follower.finish()

    assert {m["via"] for m in got} == {"poll"}
    assert of(got, a) == ([(i, "a-old%d" % i) for i in (1, 2, 3)]
                          + [(i, "a-new%d" % i) for i in range(1, 8)])
    assert of(got, b) == ([(i, "b-old%d" % i) for i in (1, 2)]
                          + [(i, "b-new%d" % i) for i in range(1, 7)])
    new = epochs_of(server, a, b)
    assert state == {"cursors": {a: 7, b: 6}, "epochs": new}
    assert all(new[i] != old[i] and new[i] and old[i] for i in (a, b)), (old, new)


@needs_node
def test_client_resumes_with_one_id_in_a_new_epoch_and_the_other_not(server_factory):
    """A page's reload, resumed with the cursors and epochs it saved (the options since and
    epoch, per id): meanwhile id a was forgotten (its messages expired, nobody followed it)
    and created again, seqs from 1 in a new epoch, while b lived on (a subscriber kept it).
    The new client must get all of a's new messages (more than its cursor) and only b's new
    one, each once."""
    server = server_factory("--queue-ttl", 2, workers=2)
    a, b = uid("jsea"), uid("jseb")
    for i in (1, 2, 3):
        server.pub(a, "a-old%d" % i)
    for i in (1, 2):
        server.pub(b, "b-old%d" % i)
    keeper = Stream(server, "/sse/%s?since=2" % b)        # b is followed throughout
    try:
        got, first = Follower(server, [a, b], 5, 20, linger=300).finish()
        assert of(got, a) == [(i, "a-old%d" % i) for i in (1, 2, 3)]
        assert of(got, b) == [(i, "b-old%d" % i) for i in (1, 2)]
        assert first["cursors"] == {a: 3, b: 2}

        # Every message expires; a, followed by nobody, is forgotten: published again, it
        # starts over at seq 1 in a new epoch.  b, followed, goes on at seq 3, its epoch kept.
        wait_for(lambda: server.stats()["totals"]["expired"] >= 5, timeout=15,
                 message="the messages' expiry")
        assert [server.pub(a, "a-new%d" % i) for i in (1, 2, 3, 4)] == [1, 2, 3, 4]
        assert server.pub(b, "b3") == 3

        got, second = Follower(server, [a, b], 5, 20, linger=500,
                               since=first["cursors"], epoch=first["epochs"]).finish()
        assert of(got, a) == [(i, "a-new%d" % i) for i in (1, 2, 3, 4)]
        assert of(got, b) == [(3, "b3")]
        assert second["cursors"] == {a: 4, b: 3}
        assert second["epochs"][b] == first["epochs"][b]
        assert second["epochs"][a] != first["epochs"][a]
        assert second["epochs"] == epochs_of(server, a, b)
    finally:
        keeper.sock.close()

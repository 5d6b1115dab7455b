"""EventSource (SSE) streams, end to end against real servers over real sockets.

A stream gets the buffered backlog, then every message as it is published,
each exactly once and in order, from whichever worker it was published on;
it resumes after Last-Event-ID (or since); it is pinged every --heartbeat;
a reader that does not read is closed and counted without hurting anyone
else; a stream whose worker is SIGKILLed resumes on reconnect losing nothing.
"""

import os
import signal
import socket
import time

from conftest import wait_for
from test_bad_input import uid


class Stream:
    """One EventSource connection read by hand: the head, then events."""

    def __init__(self, server, path, headers=(), timeout=10.0, rcvbuf=None):
        self.sock = socket.socket()
        if rcvbuf:                                     # before connecting, or the window is set
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", server.client))
        lines = ["GET %s HTTP/1.1" % path, "Host: test", *headers, "", ""]
        self.sock.sendall("\r\n".join(lines).encode())
        self.buf = b""
        head = self._until(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in
                        (line.decode().partition(":") for line in head.split(b"\r\n")[1:] if line)}

    def _until(self, marker, timeout=10.0):
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("nothing more in time; have %r" % self.buf[-300:])
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("stream closed; have %r" % self.buf[-300:])
            self.buf += chunk
        block, _, self.buf = self.buf.partition(marker)
        return block

    def event(self, timeout=10.0):
        """The next block (event or comment) as a list of (field, value)."""
        block = self._until(b"\n\n", timeout)
        return [tuple(line.decode().split(": ", 1)) if ": " in line.decode() else (line.decode(), "")
                for line in block.split(b"\n")]

    def message(self, timeout=10.0):
        """The next message: (seq, data); comments and retry: are skipped."""
        while True:
            fields = self.event(timeout)
            if fields[0][0] == "id":
                data = "\n".join(v for k, v in fields if k == "data")
                return int(fields[0][1]), data

    def close(self):
        self.sock.close()


def test_stream_sends_backlog_then_live_messages_in_order(server_factory):
    server = server_factory(workers=2)
    ident = uid("sse")
    server.pub(ident, "first")
    server.pub(ident, "two\nlines\r\nand\rthree")
    stream = Stream(server, "/sse/" + ident)
    try:
        assert stream.status == 200
        assert stream.headers["content-type"] == "text/event-stream"
        assert stream.headers["cache-control"] == "no-store"
        assert stream.headers["x-accel-buffering"] == "no"
        assert stream.event() == [("retry", "2000")]
        assert stream.message() == (1, "first")
        assert stream.message() == (2, "two\nlines\nand\nthree")
        for i in range(3, 30):                         # published on either worker
            server.pub(ident, "live %d" % i)
            assert stream.message() == (i, "live %d" % i)
    finally:
        stream.close()


def test_many_streams_on_every_worker_get_every_message_once(server_factory):
    server = server_factory(workers=2)
    ident = uid("fan")
    streams = [Stream(server, "/sub/" + ident, ["Accept: text/event-stream"]) for _ in range(20)]
    try:
        wait_for(lambda: min(w["subscribers"] for w in server.stats()["workers"]) > 0
                 and sum(w["subscribers"] for w in server.stats()["workers"]) == 20,
                 timeout=10, message="streams held on both workers")
        time.sleep(0.2)
        server.pub_batch([(ident, "m%d" % i) for i in range(50)])
        for stream in streams:
            assert [stream.message() for _ in range(50)] == [(i + 1, "m%d" % i) for i in range(50)]
    finally:
        for stream in streams:
            stream.close()


def test_stream_resumes_after_last_event_id_or_since(server_factory):
    server = server_factory(workers=2)
    ident = uid("resume")
    for i in range(5):
        server.pub(ident, "m%d" % (i + 1))
    for how in (["Last-Event-ID: 3"], []):
        path = "/sse/%s" % ident + ("" if how else "?since=3")
        stream = Stream(server, path, how)
        try:
            assert stream.message() == (4, "m4")
            assert stream.message() == (5, "m5")
        finally:
            stream.close()
    stream = Stream(server, "/sse/%s" % ident, ["Last-Event-ID: x1"])
    assert stream.status == 400
    stream.close()


def test_stream_is_pinged_and_a_disconnect_frees_it(server_factory):
    server = server_factory("--heartbeat", 0.5, workers=1)
    stream = Stream(server, "/sse/" + uid("ping"))
    stream.event()                                    # retry:
    stream.event()                                    # the epoch event
    started = time.monotonic()
    assert stream.event(timeout=3) == [("", "ping")]     # the comment ": ping"
    assert time.monotonic() - started < 1.5
    assert server.stats()["totals"]["subscribers"] == 1
    stream.close()
    wait_for(lambda: server.stats()["totals"]["subscribers"] == 0, timeout=5,
             message="the stream's slot to be freed")


def test_a_stream_that_does_not_read_is_closed_and_counted(server_factory):
    server = server_factory("--max-message", 65536, workers=1)
    ident = uid("slow")
    slow = Stream(server, "/sse/" + ident, rcvbuf=4096)
    fine = Stream(server, "/sse/" + ident)
    try:
        big = "x" * 60000
        rounds = 0
        while server.stats()["totals"]["slow_closed"] == 0 and rounds < 40:
            server.pub_batch([(ident, big)] * 8)      # up to 19 MB: the kernel's buffers fill,
            for _ in range(8):                        # then the server's bound is reached
                fine.message()
            rounds += 1
        wait_for(lambda: server.stats()["totals"]["slow_closed"] == 1, timeout=5,
                 message="the slow stream to be closed")
        assert "reads too slowly" in server.stderr()
        server.pub(ident, "after")
        assert fine.message() == (rounds * 8 + 1, "after")   # the others go on
    finally:
        slow.close()
        fine.close()


def test_a_stream_whose_worker_is_killed_resumes_losing_nothing(server_factory):
    server = server_factory(workers=2)
    ident = uid("crash")
    streams = [Stream(server, "/sse/" + ident) for _ in range(8)]
    wait_for(lambda: min(w["subscribers"] for w in server.stats()["workers"]) > 0, timeout=10,
             message="streams on both workers")
    time.sleep(0.2)
    server.pub(ident, "before")
    for stream in streams:
        assert stream.message() == (1, "before")
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: (lambda p: p and all(p) and victim not in p)(pids_or_none(server)),
             timeout=10, message="the restart")
    for i in range(2, 6):
        server.pub(ident, "during %d" % i)
    for stream in streams:
        try:
            got = [stream.message(timeout=2) for _ in range(4)]   # its worker survived
        except (AssertionError, OSError):                        # closed with its worker:
            stream.close()                                       # reconnect where it left off
            resumed = Stream(server, "/sse/" + ident, ["Last-Event-ID: 1"])
            got = [resumed.message() for _ in range(4)]
            resumed.close()
        assert got == [(i, "during %d" % i) for i in range(2, 6)]
        stream.close()


def pids_or_none(server):
    try:
        return server.worker_pids()
    except OSError:                                   # asked the worker being killed
        return None


def test_head_and_signatures_on_streams(server_factory, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("k\n")
    server = server_factory("--secret-file", secret, workers=1)
    ident = uid("signed")
    status, _, _ = server.request("GET", "/sse/" + ident, port=server.client)
    assert status == 403
    from megacomet import signing
    query = signing.query(b"k", [ident], 60, time.time())
    status, headers, body = server.request("HEAD", "/sse/%s?%s" % (ident, query), port=server.client)
    assert status == 200 and headers["Content-Type"] == "text/event-stream" and body == b""
    stream = Stream(server, "/sse/%s?%s" % (ident, query))
    try:
        server.pub(ident, "signed")
        assert stream.message() == (1, "signed")
    finally:
        stream.close()


# -- several ids on one connection ----------------------------------------------------------

def test_one_connection_follows_several_ids_on_every_transport(server_factory):
    import json
    from websockets.sync.client import connect as ws_connect
    from test_epoch import id_epoch                   # (test_epoch imports this module)
    server = server_factory(workers=2)
    a, b, c = uid("ma"), uid("mb"), uid("mc")
    server.pub(a, "a1")
    server.pub(b, "b1")
    server.pub(b, "b2")
    ids = "%s,%s,%s" % (a, b, c)
    # Long-poll: buffered messages at once, each naming its id; since takes id:seq pairs;
    # last and epoch have every id (c, created by this poll, has an epoch too).
    status, _, body = server.request("GET", "/sub/%s?since=%s:1" % (ids, b), port=server.client)
    doc = json.loads(body)
    assert status == 200 and doc["messages"], doc
    for m in doc["messages"]:
        assert (m["id"], m["seq"]) in ((a, 1), (b, 2))
    assert doc["last"] == {a: 1, b: 2, c: 0}
    epochs = doc["epoch"]
    assert sorted(epochs) == sorted([a, b, c]) and all(type(e) is int for e in epochs.values())
    assert epochs[a] == id_epoch(server, a) and epochs[b] == id_epoch(server, b)
    # ... held until any of them has news.
    with socket.create_connection(("127.0.0.1", server.client), timeout=10) as sock:
        sock.sendall(b"GET /sub/%s?since=%s:1,%s:2&timeout=10 HTTP/1.1\r\nHost: x\r\n\r\n"
                     % (ids.encode(), a.encode(), b.encode()))
        time.sleep(0.3)
        server.pub(c, "c1")
        from conftest import read_response
        status, _, body = read_response(sock, timeout=10)
        # c, with nothing buffered, may have been forgotten when the first poll ended and
        # created again (a new epoch) by this one: its epoch is the one of its seq 1 now;
        # a and b keep theirs.
        epochs[c] = id_epoch(server, c)
        assert json.loads(body) == {"messages": [{"id": c, "seq": 1, "data": "c1"}],
                                    "last": {a: 1, b: 2, c: 1}, "epoch": epochs}
    # SSE: the event's id is the whole cursor, so Last-Event-ID resumes every id.
    stream = Stream(server, "/sse/%s?since=%s:1,%s:2,%s:1" % (ids, a, b, c))
    with ws_connect("ws://127.0.0.1:%d/ws/%s?since=%s:1,%s:2,%s:1" % (server.client, ids, a, b, c)) as ws:
        try:
            # The epoch event, once every home has answered: every id's epoch, as JSON.
            assert stream.event() == [("retry", "2000")]
            fields = stream.event()
            assert fields[0] == ("event", "epoch") and json.loads(fields[1][1]) == epochs, fields
            time.sleep(0.3)
            server.pub(b, "b3")
            server.pub(a, "a2")
            fields = stream.event()
            while fields[0][0] != "id":
                fields = stream.event()
            assert fields[0] == ("id", "%s:1,%s:3,%s:1" % (a, b, c))
            assert json.loads(fields[1][1]) == {"id": b, "seq": 3, "data": "b3"}
            fields = stream.event()
            assert fields[0] == ("id", "%s:2,%s:3,%s:1" % (a, b, c))
            assert [json.loads(ws.recv(timeout=5)) for _ in range(2)] == [
                {"id": b, "seq": 3, "data": "b3", "epoch": epochs[b]},
                {"id": a, "seq": 2, "data": "a2", "epoch": epochs[a]}]
        finally:
            stream.close()
    resumed = Stream(server, "/sse/" + ids, ["Last-Event-ID: %s:1,%s:3,%s:1" % (a, b, c)])
    try:
        assert resumed.event() == [("retry", "2000")]
        fields = resumed.event()
        assert fields[0] == ("event", "epoch") and json.loads(fields[1][1]) == epochs, fields
        fields = resumed.event()
        assert fields[0] == ("id", "%s:2,%s:3,%s:1" % (a, b, c))
        assert json.loads(fields[1][1]) == {"id": a, "seq": 2, "data": "a2"}
    finally:
        resumed.close()


def test_bad_multiplexed_subscriptions_get_400(server_factory):
    server = server_factory(workers=1)
    ids17 = ",".join("id%d" % i for i in range(17))
    ids16 = ",".join("id%d" % i for i in range(16))
    for path in ("/sub/" + ids17, "/sse/" + ids17, "/sub/a,a", "/sub/a,,b", "/sub/a,b?since=c:1",
                 "/sub/a,b?since=a:x", "/sub/a,b?since=a", "/sub/a,b?since=a:%C2%B2"):
        status, _, body = server.request("GET", path, port=server.client)
        assert status == 400, (path, status, body)
    status, _, body = server.request("GET", "/sub/%s?timeout=1" % ids16, port=server.client)
    assert status == 200

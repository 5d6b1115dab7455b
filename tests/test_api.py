"""End-to-end tests of the public API (issue 2), against real server processes.

Client port: ``GET /sub/<id>`` (JSON / JSONP long-poll) and ``GET /<id>.js``
(the original's compat long-poll).  App port: ``POST /pub/<id>``, batch
``POST /pub``, the binary protocol, ``/stats``, ``/metrics``, ``/health``
and ``--app-token``.

Everything goes through real sockets on loopback.  Every read has a socket
timeout, every long-poll asks for a short ``?timeout=`` (or runs on a server
started with ``--poll-timeout 1``), every thread is joined with a timeout and
every server is stopped by the ``server_factory`` fixture.
"""

import http.client
import itertools
import json
import math
import os
import random
import re
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, Server, raw_request, wait_for
from test_epoch import id_epoch

_counter = itertools.count()


def uid(prefix="id"):
    """A fresh id, so that tests sharing a server never share an id."""
    return "%s_%d_%d" % (prefix, os.getpid(), next(_counter))


# -- raw HTTP over one socket ------------------------------------------------------


class Raw:
    """One client connection: send raw requests, read responses exactly as they come."""

    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def get(self, path, method="GET", version="HTTP/1.1", headers=()):
        lines = ["%s %s %s" % (method, path, version), "Host: 127.0.0.1"]
        lines.extend(headers)
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("no complete response in time; have %r" % self.buf[:300])
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise AssertionError("no complete response in time; have %r" % self.buf[:300]) from None
        if not chunk:
            raise EOFError("connection closed; have %r" % self.buf[:300])
        self.buf += chunk

    def response(self, timeout=10.0, head=False):
        """(status, headers with lower-case names, body) of the next response."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            self._fill(deadline)
        head_bytes, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head_bytes.decode("latin-1").split("\r\n")
        version, status, _reason = (lines[0].split(" ", 2) + [""])[:3]
        assert version == "HTTP/1.1", lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(status)
        body = b""
        if not head and status not in (204, 304):
            length = int(headers["content-length"])
            while len(self.buf) < length:
                self._fill(deadline)
            body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def readable(self, wait=0.0):
        """True if data or EOF is waiting (the server answered or closed)."""
        if self.buf:
            return True
        r, _, _ = select.select([self.sock], [], [], wait)
        return bool(r)

    def closed(self, timeout=3.0):
        """True when the server closes the connection within timeout (nothing more sent)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return False
            except ConnectionResetError:
                return True
            if not chunk:
                return not self.buf
            self.buf += chunk
        return False

    def close(self):
        self.sock.close()


def open_polls(port, path, n):
    """n connections, each holding ``GET path``."""
    conns = []
    try:
        for _ in range(n):
            conn = Raw(port)
            conn.get(path)
            conns.append(conn)
    except BaseException:
        for conn in conns:
            conn.close()
        raise
    return conns


def close_all(conns):
    for conn in conns:
        conn.close()


def wait_held(server, total, every_worker=False, timeout=10.0):
    """Until /stats shows ``total`` held polls in all (and at least one per worker)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = [w["subscribers"] for w in server.stats()["workers"]]
        if sum(counts) >= total and (not every_worker or min(counts) > 0):
            # `subscribers` counts a poll from the moment it is read, before its home
            # has registered it; give the registrations a moment so that a publish
            # right after does not race them (a compat poll that loses that race is
            # rightly not given a message the other compat readers consumed).
            time.sleep(0.2)
            return counts
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1f s waiting for %d held polls%s; per worker: %r"
                                 % (timeout, total, " on every worker" if every_worker else "", counts))
        time.sleep(0.05)


def sub_json(server, ident, since=None, timeout=None, wait=15):
    status, headers, body = server.sub(ident, since=since, timeout=timeout, wait=wait)
    assert status == 200, (status, body)
    assert headers["Content-Type"] == "application/json", headers
    return json.loads(body)


def datas(doc):
    return [m["data"] for m in doc["messages"]]


def seqs(doc):
    return [m["seq"] for m in doc["messages"]]


def frame(ident, message):
    if isinstance(ident, str):
        ident = ident.encode()
    if isinstance(message, str):
        message = message.encode()
    return b"\x02" + ident + b"\x00" + message + b"\x00"


def stat_totals(server):
    return server.stats()["totals"]


TRICKY = ['plain', 'quotes " and \\ backslash', 'new\nline\ttab', 'unicode é ü 漢字 🚀',
          '</script><script>alert("x")</script>', '{"json": [1, 2]}', 'nul \x00 byte', ' ']


# -- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 4])
def test_http_pub_round_trip_through_sub_and_compat(server_factory, workers):
    server = server_factory(workers=workers)
    ident = uid("rt")
    got = [server.pub(ident, text) for text in TRICKY]
    assert got == list(range(1, len(TRICKY) + 1))

    doc = sub_json(server, ident)
    assert doc == {"id": ident, "last": len(TRICKY), "epoch": id_epoch(server, ident),
                   "messages": [{"seq": i + 1, "data": t} for i, t in enumerate(TRICKY)]}

    # The compat API hands out the same messages, oldest first, byte for byte.
    for text in TRICKY:
        status, headers, body = server.request("GET", "/%s.js" % ident, port=server.client)
        assert status == 200
        assert body == text.encode()
        assert headers["Content-Type"] == "application/javascript; charset=utf-8"
        assert int(headers["Content-Length"]) == len(text.encode())
        assert headers["Connection"].lower() == "close"


@pytest.mark.parametrize("workers", [2, 4])
def test_held_polls_on_every_worker_receive_http_pub(server_factory, workers):
    """A /sub and a /<id>.js poll held on every worker all get one POST /pub/<id>."""
    server = server_factory(workers=workers)
    ident = uid("held")
    subs = open_polls(server.client, "/sub/%s?timeout=20" % ident, 8 * workers)
    compat = open_polls(server.client, "/%s.js" % ident, 8 * workers)
    try:
        wait_held(server, 16 * workers, every_worker=True)
        assert not any(c.readable() for c in subs + compat), "answered before any publish"
        assert server.pub(ident, "to everyone ✓") == 1
        epoch = id_epoch(server, ident)
        for conn in subs:
            status, headers, body = conn.response(timeout=10)
            assert status == 200
            assert json.loads(body) == {"id": ident, "last": 1, "epoch": epoch,
                                        "messages": [{"seq": 1, "data": "to everyone ✓"}]}
        for conn in compat:
            status, headers, body = conn.response(timeout=10)
            assert status == 200
            assert body == "to everyone ✓".encode()
            assert headers["connection"].lower() == "close"
            assert conn.closed(timeout=5)
    finally:
        close_all(subs + compat)


@pytest.mark.parametrize("workers", [2, 4])
def test_batch_pub_round_trip(server_factory, workers):
    server = server_factory(workers=workers)
    ids = [uid("batch") for _ in range(6)]
    items = [(ident, "%s #%d" % (ident, n)) for n in range(3) for ident in ids]
    reply = server.pub_batch(items)
    assert reply == {"published": len(items), "errors": []}
    for ident in ids:
        doc = sub_json(server, ident)
        assert seqs(doc) == [1, 2, 3]
        assert datas(doc) == ["%s #%d" % (ident, n) for n in range(3)]
        status, _, body = server.request("GET", "/%s.js" % ident, port=server.client)
        assert (status, body) == (200, ("%s #0" % ident).encode())


@pytest.mark.parametrize("workers", [2, 4])
def test_binary_protocol_frames_split_at_every_byte(server_factory, workers):
    server = server_factory(workers=workers)
    ident = uid("bin")
    message = "ü-€-🚀"                    # multi-byte characters get split too
    one = frame(ident, message)
    sent = []
    with socket.create_connection(("127.0.0.1", server.app), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # One frame per split point: every byte boundary of a frame is a segment boundary once.
        for k in range(1, len(one)):
            text = "%s|%d" % (message, k)
            data = frame(ident, text)
            s.sendall(data[:k])
            time.sleep(0.003)
            s.sendall(data[k:])
            sent.append(text)
        # Two frames byte by byte.
        for text in ("byte-by-byte 1", "byte-by-byte 2 ✓"):
            for b in frame(ident, text):
                s.sendall(bytes((b,)))
                time.sleep(0.001)
            sent.append(text)
        # Several frames in one segment, and a segment that ends in the middle of the next one.
        batch = [frame(ident, "burst %d" % n) for n in range(5)]
        s.sendall(b"".join(batch) + frame(ident, "tail")[:4])
        time.sleep(0.01)
        s.sendall(frame(ident, "tail")[4:])
        sent.extend(["burst %d" % n for n in range(5)] + ["tail"])

        def complete():
            doc = sub_json(server, ident, since=0, timeout=1)
            return doc if len(doc["messages"]) >= min(len(sent), 64) else None
        doc = wait_for(complete, timeout=10, message="binary frames published")
        # The connection stays open for more frames.
        r, _, _ = select.select([s], [], [], 0.1)
        assert not r, "server closed or wrote to a healthy binary connection"
    expected = sent[-64:]                 # --max-queued default keeps the newest 64
    assert datas(doc) == expected
    assert seqs(doc) == list(range(len(sent) - len(expected) + 1, len(sent) + 1))
    assert doc["last"] == len(sent)


@pytest.mark.parametrize("workers", [2, 4])
def test_binary_protocol_many_frames_reach_held_polls(server_factory, workers):
    """1000 frames on one connection over 50 ids; held polls on every worker see the first."""
    server = server_factory(workers=workers)
    ids = [uid("binmany") for _ in range(50)]
    watched = ids[0]
    polls = open_polls(server.client, "/sub/%s?timeout=20" % watched, 16 * workers)
    try:
        wait_held(server, 16 * workers, every_worker=True)
        before = stat_totals(server)["published"]
        # A frame whose final 0x00 has not arrived is not published yet.
        first = frame(watched, "first ✓")
        with socket.create_connection(("127.0.0.1", server.app), timeout=10) as s:
            s.sendall(first[:-1])
            time.sleep(0.3)
            assert not any(p.readable() for p in polls), "a frame was published before its end"
            s.sendall(first[-1:])
            for poll in polls:
                status, _, body = poll.response(timeout=10)
                assert status == 200
                assert json.loads(body)["messages"] == [{"seq": 1, "data": "first ✓"}]
            stream = b"".join(frame(ids[n % 50], "m%d" % n) for n in range(1000))
            s.sendall(stream)
            wait_for(lambda: stat_totals(server)["published"] >= before + 1001, timeout=15,
                     message="1001 binary messages published")
            r, _, _ = select.select([s], [], [], 0.05)
            assert not r
        for index in (0, 1, 17, 49):
            doc = sub_json(server, ids[index], timeout=1)
            extra = ["first ✓"] if index == 0 else []
            assert datas(doc) == extra + ["m%d" % n for n in range(index, 1000, 50)]
            assert seqs(doc) == list(range(1, len(extra) + 21))
    finally:
        close_all(polls)


# -- cross-worker delivery and fan-out ---------------------------------------------------


@pytest.mark.parametrize("workers", [2, 4])
def test_publish_reaches_subscribers_on_every_worker(server_factory, workers):
    server = server_factory(workers=workers)
    ident = uid("chan")
    n = 20 * workers
    polls = open_polls(server.client, "/sub/%s?timeout=20" % ident, n)
    try:
        counts = wait_held(server, n, every_worker=True)
        assert len(counts) == workers and all(c > 0 for c in counts), counts
        delivered = stat_totals(server)["delivered"]
        assert server.pub(ident, "hello, all %d" % n) == 1
        epoch = id_epoch(server, ident)
        for poll in polls:
            status, headers, body = poll.response(timeout=10)
            assert status == 200
            assert json.loads(body) == {"id": ident, "last": 1, "epoch": epoch,
                                        "messages": [{"seq": 1, "data": "hello, all %d" % n}]}
        wait_for(lambda: stat_totals(server)["delivered"] >= delivered + n, timeout=10,
                 message="delivered counter")
        wait_for(lambda: stat_totals(server)["subscribers"] == 0, timeout=10,
                 message="subscribers back to 0")
    finally:
        close_all(polls)


def test_one_message_to_held_polls_of_every_format(server_factory):
    """One delivery answers each held poll in its own format: JSON keep-alive, HTTP/1.0,
    Connection: close, HEAD, two JSONP callbacks, compat."""
    server = server_factory(workers=2)
    ident = uid("formats")
    kinds = {
        "json": dict(path="/sub/%s?timeout=20" % ident),
        "http10": dict(path="/sub/%s?timeout=20" % ident, version="HTTP/1.0"),
        "close": dict(path="/sub/%s?timeout=20" % ident, headers=["Connection: close"]),
        "head": dict(path="/sub/%s?timeout=20" % ident, method="HEAD"),
        "cb_a": dict(path="/sub/%s?timeout=20&callback=cbA" % ident),
        "cb_b": dict(path="/sub/%s?callback=ns.cbB&timeout=20" % ident),
        "compat": dict(path="/%s.js" % ident),
    }
    conns = []
    try:
        for kind, spec in kinds.items():
            for _ in range(8):
                conn = Raw(server.client)
                conn.get(**spec)
                conns.append((kind, conn))
        wait_held(server, len(conns), every_worker=True)
        assert server.pub(ident, "fmt ✓") == 1
        doc = {"id": ident, "messages": [{"seq": 1, "data": "fmt ✓"}], "last": 1,
               "epoch": id_epoch(server, ident)}
        for kind, conn in conns:
            status, headers, body = conn.response(head=kind == "head")
            assert status == 200, kind
            check_common_headers(headers)
            if kind == "compat":
                assert body == "fmt ✓".encode()
                assert headers["content-type"] == "application/javascript; charset=utf-8"
            elif kind.startswith("cb_"):
                name = "cbA" if kind == "cb_a" else "ns.cbB"
                assert body.startswith(b"/**/" + name.encode() + b"(") and body.endswith(b");"), body
                assert json.loads(body[len(name) + 5:-2]) == doc
                assert headers["content-type"].startswith("application/javascript")
            elif kind == "head":
                assert body == b"" and int(headers["content-length"]) > 0
                assert headers["content-type"] == "application/json"
            else:
                assert json.loads(body) == doc, kind
                assert headers["content-type"] == "application/json"
            if kind in ("http10", "close", "compat"):
                assert headers["connection"].lower() == "close", kind
                assert conn.closed(timeout=5), kind
            else:
                assert headers.get("connection", "").lower() != "close", kind
        # The keep-alive ones serve another request on the same connection (after a HEAD: no body).
        for kind, conn in conns:
            if kind in ("json", "head", "cb_a", "cb_b"):
                conn.get("/sub/%s" % ident)
                status, _, body = conn.response()
                assert status == 200 and json.loads(body) == doc, kind
    finally:
        close_all(conn for _, conn in conns)


def test_channel_fan_out_to_240_subscribers(server_factory):
    server = server_factory(workers=4)
    ident = uid("fan")
    n = 240
    polls = open_polls(server.client, "/sub/%s?timeout=30" % ident, n)
    try:
        wait_held(server, n, every_worker=True, timeout=15)
        seq = server.pub(ident, "channel message")
        assert seq == 1
        for poll in polls:
            status, _, body = poll.response(timeout=15)
            assert status == 200
            doc = json.loads(body)
            assert doc["messages"] == [{"seq": 1, "data": "channel message"}]
        # Each subscriber polls again with since=1 on the same connection: all get the next one.
        for poll in polls:
            poll.get("/sub/%s?since=1&timeout=30" % ident)
        wait_held(server, n, every_worker=True, timeout=15)
        assert server.pub(ident, "second") == 2
        for poll in polls:
            status, _, body = poll.response(timeout=15)
            assert status == 200
            assert json.loads(body)["messages"] == [{"seq": 2, "data": "second"}]
    finally:
        close_all(polls)


def test_repolling_subscribers_miss_nothing_during_a_publish_stream(server_factory):
    """Subscribers that poll again with since=last while messages stream in get every seq once, in order."""
    server = server_factory("--max-queued", "1000", workers=4)
    ident = uid("stream")
    total = 150
    results = {}

    def subscriber(k):
        conn = Raw(server.client)
        got = []
        last = 0
        try:
            deadline = time.monotonic() + 20
            while last < total and time.monotonic() < deadline:
                conn.get("/sub/%s?since=%d&timeout=5" % (ident, last))
                status, _, body = conn.response(timeout=10)
                assert status == 200
                doc = json.loads(body)
                got.extend((m["seq"], m["data"]) for m in doc["messages"])
                if doc["messages"]:
                    assert doc["last"] >= doc["messages"][-1]["seq"]
                last = doc["last"]
            results[k] = got
        except BaseException as e:
            results[k] = e
        finally:
            conn.close()

    threads = [threading.Thread(target=subscriber, args=(k,), daemon=True) for k in range(6)]
    for t in threads:
        t.start()
    wait_held(server, 6)
    conn = http.client.HTTPConnection("127.0.0.1", server.app, timeout=10)
    try:
        for n in range(1, total + 1):
            conn.request("POST", "/pub/" + ident, body=("s%d" % n).encode())
            resp = conn.getresponse()
            assert (resp.status, json.loads(resp.read())["seq"]) == (202, n)
    finally:
        conn.close()
    for t in threads:
        t.join(timeout=25)
        assert not t.is_alive()
    expected = [(n, "s%d" % n) for n in range(1, total + 1)]
    for k in range(6):
        assert results[k] == expected, results[k] if isinstance(results[k], BaseException) else \
            "subscriber %d: %d messages, first missing %r" % (
                k, len(results[k]), sorted(set(expected) - set(results[k]))[:3])


def test_app_port_keep_alive_and_chunked_publish(server_factory):
    server = server_factory(workers=2)
    ident = uid("appka")
    conn = Raw(server.app)
    try:
        for n in range(1, 4):
            conn.send(b"POST /pub/%s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\nm%d"
                      % (ident.encode(), n))
            status, _, body = conn.response()
            assert (status, json.loads(body)) == (202, {"id": ident, "seq": n, "subscribers": 0})
        conn.send(b"POST /pub/%s HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nab-\r\n4\r\ncd\xc3\xa9\r\n0\r\n\r\n" % ident.encode())
        status, _, body = conn.response()
        assert (status, json.loads(body)) == (202, {"id": ident, "seq": 4, "subscribers": 0})
        conn.send(b"POST /pub HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(json.dumps({"id": ident, "data": "b"})), json.dumps({"id": ident, "data": "b"}).encode()))
        status, _, body = conn.response()
        assert (status, json.loads(body)) == (202, {"published": 1, "errors": []})
        conn.get("/stats")
        status, _, body = conn.response()
        assert status == 200 and "workers" in json.loads(body)
    finally:
        conn.close()
    assert datas(sub_json(server, ident)) == ["m1", "m2", "m3", "ab-cdé", "b"]


# -- since / seq ------------------------------------------------------------------------


def test_since_and_seq_semantics(server_factory):
    server = server_factory(workers=2)
    ident = uid("seq")
    assert [server.pub(ident, "m%d" % n) for n in range(1, 6)] == [1, 2, 3, 4, 5]
    other = uid("seq_other")
    assert server.pub(other, "x") == 1    # seqs are per id

    assert seqs(sub_json(server, ident)) == [1, 2, 3, 4, 5]
    assert seqs(sub_json(server, ident, since=0)) == [1, 2, 3, 4, 5]
    doc = sub_json(server, ident, since=2)
    assert seqs(doc) == [3, 4, 5] and datas(doc) == ["m3", "m4", "m5"] and doc["last"] == 5
    assert seqs(sub_json(server, ident, since=4)) == [5]
    # since beyond the last seq (the server restarted): counts as 0.
    assert seqs(sub_json(server, ident, since=6)) == [1, 2, 3, 4, 5]
    assert seqs(sub_json(server, ident, since=1000000)) == [1, 2, 3, 4, 5]

    # Caught up: held, then timeout with no messages and last = the id's last seq.
    started = time.monotonic()
    doc = sub_json(server, ident, since=5, timeout=1)
    assert time.monotonic() - started >= 0.9
    epoch = id_epoch(server, ident)
    assert doc == {"id": ident, "messages": [], "last": 5, "epoch": epoch}
    # An id nobody published to, up to date: its epoch may not be known yet (0), or it is
    # the one its slot was stamped with by this poll.
    unknown = uid("never")
    asked = time.time()
    doc = sub_json(server, unknown, timeout=1)
    unknown_epoch = doc.pop("epoch")
    assert doc == {"id": unknown, "messages": [], "last": 0}
    assert unknown_epoch == 0 or unknown_epoch >= asked * 1000 - 1, unknown_epoch

    # A held poll with since=last gets exactly the next message.
    poll = Raw(server.client)
    try:
        poll.get("/sub/%s?since=5&timeout=10" % ident)
        wait_held(server, 1)
        assert not poll.readable(0.1)
        assert server.pub(ident, "m6") == 6
        status, _, body = poll.response()
        assert status == 200
        assert json.loads(body) == {"id": ident, "messages": [{"seq": 6, "data": "m6"}], "last": 6,
                                    "epoch": epoch}
    finally:
        poll.close()
    assert seqs(sub_json(server, ident, since=5)) == [6]


# -- the compat cursor ------------------------------------------------------------------


def compat_get(server, ident, timeout=10):
    status, headers, body = server.request("GET", "/%s.js" % ident, port=server.client,
                                           timeout=timeout)
    return status, headers, body


def test_compat_cursor_oldest_first_and_independent_of_sub(server_factory):
    server = server_factory("--poll-timeout", "1", workers=2)
    ident = uid("compat")
    for text in ("first", "second", "third"):
        server.pub(ident, text)
    # /sub reads nothing away from the compat cursor ...
    assert datas(sub_json(server, ident)) == ["first", "second", "third"]
    status, headers, body = compat_get(server, ident)
    assert (status, body) == (200, b"first")
    assert headers["Content-Type"] == "application/javascript; charset=utf-8"
    assert headers["Content-Length"] == "5"
    assert headers["Connection"].lower() == "close"
    assert headers["Cache-Control"] == "no-store"
    # ... and the compat cursor takes nothing away from /sub.
    assert datas(sub_json(server, ident)) == ["first", "second", "third"]
    assert compat_get(server, ident)[::2] == (200, b"second")
    assert compat_get(server, ident)[::2] == (200, b"third")
    assert datas(sub_json(server, ident, since=1)) == ["second", "third"]

    # Nothing unread: held for --poll-timeout, then an empty script (not a 204: a <script> tag
    # fires onerror for that) and close.
    conn = Raw(server.client)
    try:
        started = time.monotonic()
        conn.get("/%s.js" % ident)
        status, headers, body = conn.response(timeout=10)
        elapsed = time.monotonic() - started
        assert status == 200 and body == b""
        assert headers["content-type"].startswith("application/javascript"), headers
        assert 0.9 <= elapsed <= 5.0, elapsed
        assert headers.get("connection", "").lower() == "close"
        assert conn.closed(timeout=5)
    finally:
        conn.close()

    # The cursor goes on from where it stopped.
    server.pub(ident, "fourth")
    assert compat_get(server, ident)[::2] == (200, b"fourth")
    assert seqs(sub_json(server, ident)) == [1, 2, 3, 4]


def test_compat_answer_closes_an_http11_connection(server_factory):
    """Every .js answer closes the connection, even on HTTP/1.1 without Connection: close."""
    server = server_factory(workers=2)
    ident = uid("compat_close")
    body = 'callback({"x": "é"});'
    server.pub(ident, body)
    conn = Raw(server.client)
    try:
        conn.get("/%s.js" % ident)
        status, headers, got = conn.response()
        assert status == 200 and got == body.encode()
        assert headers["connection"].lower() == "close"
        assert conn.closed(timeout=5)
    finally:
        conn.close()


def test_held_compat_polls_all_receive_and_cursor_advances_once(server_factory):
    server = server_factory(workers=2)
    ident = uid("compat_held")
    polls = open_polls(server.client, "/%s.js" % ident, 24)
    try:
        wait_held(server, 24, every_worker=True)
        assert not any(p.readable() for p in polls)
        assert server.pub(ident, "pushed") == 1
        for poll in polls:
            status, headers, body = poll.response(timeout=10)
            assert (status, body) == (200, b"pushed")
            assert headers["content-type"] == "application/javascript; charset=utf-8"
            assert headers["connection"].lower() == "close"
    finally:
        close_all(polls)
    wait_for(lambda: stat_totals(server)["subscribers"] == 0, timeout=10, message="polls gone")
    # The cursor moved past "pushed" exactly once: the next poll has nothing and is held ...
    conn = Raw(server.client)
    try:
        conn.get("/%s.js" % ident)
        wait_held(server, 1)
        assert not conn.readable(0.3), "the compat cursor did not advance past a delivered message"
        # ... until the next message, which it gets (and nothing older).
        assert server.pub(ident, "next") == 2
        status, _, body = conn.response(timeout=10)
        assert (status, body) == (200, b"next")
    finally:
        conn.close()
    conn = Raw(server.client)
    try:
        conn.get("/%s.js" % ident)
        wait_held(server, 1)
        assert not conn.readable(0.3)
    finally:
        conn.close()
    assert datas(sub_json(server, ident)) == ["pushed", "next"]


@pytest.mark.parametrize("how", ["timeout", "disconnect"])
def test_compat_message_not_consumed_by_a_poll_that_left(server_factory, how):
    """A compat poll that timed out or hung up must not take the next message off the cursor,
    even while its worker still holds /sub polls for the id (found broken at 551466b)."""
    server = server_factory("--poll-timeout", "1", workers=2)
    ident = uid("compat_left")
    subs = open_polls(server.client, "/sub/%s?timeout=30" % ident, 24)
    try:
        wait_held(server, 24, every_worker=True)
        if how == "timeout":
            assert compat_get(server, ident)[::2] == (200, b"")
        else:
            conn = Raw(server.client)
            conn.get("/%s.js" % ident)
            wait_held(server, 25)
            conn.close()
            wait_for(lambda: stat_totals(server)["subscribers"] == 24, timeout=10,
                     message="the compat poll to go")
        time.sleep(0.6)                   # well past any housekeeping tick
        assert server.pub(ident, "unread") == 1
        # No compat reader has had "unread": the next .js poll must get it at once.
        status, _, body = compat_get(server, ident)
        assert (status, body) == (200, b"unread")
    finally:
        close_all(subs)


# -- buffering: TTL and max-queued -----------------------------------------------------------


def test_ttl_expiry_and_max_queued_overflow(server_factory):
    server = server_factory("--queue-ttl", "1", "--max-queued", "3", "--poll-timeout", "1",
                            workers=2)
    base = stat_totals(server)

    # Overflow: 5 messages, the newest 3 stay, 2 are dropped and counted.
    over = uid("overflow")
    assert [server.pub(over, "o%d" % n) for n in range(1, 6)] == [1, 2, 3, 4, 5]
    doc = sub_json(server, over)
    assert datas(doc) == ["o3", "o4", "o5"] and seqs(doc) == [3, 4, 5] and doc["last"] == 5
    assert seqs(sub_json(server, over, since=1)) == [3, 4, 5]
    assert compat_get(server, over)[::2] == (200, b"o3")     # the oldest still buffered
    wait_for(lambda: stat_totals(server)["dropped"] >= base["dropped"] + 2, timeout=10,
             message="dropped counter")
    batch = uid("overflow_batch")
    reply = server.pub_batch([(batch, "b%d" % n) for n in range(10)])
    assert reply["published"] == 10
    assert datas(sub_json(server, batch)) == ["b7", "b8", "b9"]
    wait_for(lambda: stat_totals(server)["dropped"] >= base["dropped"] + 9, timeout=10,
             message="dropped counter after the batch")
    time.sleep(0.3)
    assert stat_totals(server)["dropped"] == base["dropped"] + 9

    # TTL: messages older than --queue-ttl are gone and counted as expired.
    old = uid("ttl")
    server.pub(old, "a")
    server.pub(old, "b")
    assert datas(sub_json(server, old)) == ["a", "b"]
    time.sleep(1.6)
    doc = sub_json(server, old, timeout=1)
    assert doc["messages"] == []
    assert compat_get(server, old)[::2] == (200, b"")
    wait_for(lambda: stat_totals(server)["expired"] >= base["expired"] + 2 + 3 + 3, timeout=10,
             message="expired counter")
    wait_for(lambda: server.stats()["shm"]["messages"] == 0, timeout=10,
             message="shm messages back to 0")
    # A subscriber whose cursor predates the expiry (since=2) still gets what comes next.
    server.pub(old, "c")
    assert datas(sub_json(server, old, since=2)) == ["c"]


# -- timeouts, JSONP, headers ---------------------------------------------------------------


def timed_sub(server, query, results, key):
    started = time.monotonic()
    status, _, body = server.request("GET", "/sub/%s%s" % (uid("clamp"), query),
                                     port=server.client, timeout=15)
    results[key] = (status, time.monotonic() - started, body)


def test_timeout_clamp_and_poll_timeout(server_factory):
    short = server_factory("--poll-timeout", "1", workers=2)
    default = server_factory(workers=2)
    results = {}
    cases = {
        "default_1": (short, ""),              # --poll-timeout 1
        "zero": (short, "?timeout=0"),         # clamped up to 1
        "explicit_3": (short, "?timeout=3"),   # ?timeout= overrides --poll-timeout
        "huge": (short, "?timeout=100000"),    # clamped down to 120: still held after 4 s
        "default_30": (default, ""),           # --poll-timeout default 30: still held after 4 s
        "one": (default, "?timeout=1"),
    }
    threads = []
    for key, (srv, query) in cases.items():
        if key in ("huge", "default_30"):
            continue
        t = threading.Thread(target=timed_sub, args=(srv, query, results, key), daemon=True)
        t.start()
        threads.append(t)
    held = []
    try:
        for key in ("huge", "default_30"):
            srv, query = cases[key]
            conn = Raw(srv.client)
            conn.get("/sub/%s%s" % (uid("clamp"), query))
            held.append((key, conn))
        for t in threads:
            t.join(timeout=10)
            assert not t.is_alive()
        for key, conn in held:
            assert not conn.readable(0), "%s answered early" % key
    finally:
        close_all(conn for _, conn in held)
    # Lower bounds are exact (never answered early); upper bounds leave room for a loaded machine.
    for key, (low, high) in {"default_1": (0.9, 5.0), "zero": (0.9, 5.0),
                             "explicit_3": (2.9, 7.0), "one": (0.9, 5.0)}.items():
        status, elapsed, body = results[key]
        assert status == 200, (key, body)
        assert json.loads(body)["messages"] == []
        assert low <= elapsed <= high, (key, elapsed)


def test_jsonp_callback(server_factory):
    server = server_factory(workers=2)
    ident = uid("jsonp")
    server.pub(ident, 'he said "hi"')
    epoch = id_epoch(server, ident)
    for callback in ("fn", "jQuery_123.cb$", "$", "_a.b.c", "a" * 64):
        status, headers, body = server.request(
            "GET", "/sub/%s?callback=%s" % (ident, callback), port=server.client)
        assert status == 200, (callback, body)
        assert headers["Content-Type"].startswith("application/javascript"), headers
        assert headers["Cache-Control"] == "no-store"
        text = body.decode()
        prefix = "/**/%s(" % callback
        assert text.startswith(prefix) and text.endswith(");"), text
        assert json.loads(text[len(prefix):-2]) == {
            "id": ident, "messages": [{"seq": 1, "data": 'he said "hi"'}], "last": 1,
            "epoch": epoch}
    # On timeout too, with since and timeout in any order.
    status, headers, body = server.request(
        "GET", "/sub/%s?timeout=1&callback=cb&since=1" % ident, port=server.client)
    assert status == 200
    text = body.decode()
    assert text.startswith("/**/cb(") and text.endswith(");"), text
    assert json.loads(text[len("/**/cb("):-2]) == {"id": ident, "messages": [], "last": 1,
                                                   "epoch": epoch}
    assert headers["Content-Type"].startswith("application/javascript")
    # Invalid callbacks: 400 with a one-line reason.
    for callback in ("1abc", "a-b", "alert(1)", "a%20b", "a" * 65, "%3Cscript%3E", ""):
        status, _, body = server.request(
            "GET", "/sub/%s?callback=%s" % (ident, callback), port=server.client)
        assert status == 400, (callback, status, body)
        assert body.strip() and body.count(b"\n") <= 1, body


def test_jsonp_held_poll_gets_javascript(server_factory):
    server = server_factory(workers=2)
    ident = uid("jsonp_held")
    poll = Raw(server.client)
    try:
        poll.get("/sub/%s?callback=cb&timeout=10" % ident)
        wait_held(server, 1)
        server.pub(ident, "pushed")
        status, headers, body = poll.response()
        assert status == 200
        assert headers["content-type"].startswith("application/javascript")
        text = body.decode()
        assert text.startswith("/**/cb(") and text.endswith(");")
        assert json.loads(text[7:-2])["messages"] == [{"seq": 1, "data": "pushed"}]
    finally:
        poll.close()


def check_common_headers(headers, origin="*"):
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower["cache-control"] == "no-store", headers
    assert lower["access-control-allow-origin"] == origin, headers
    assert lower["x-content-type-options"] == "nosniff", headers


@pytest.mark.parametrize("origin", [None, "https://app.example.com"])
def test_client_headers_and_cors(server_factory, origin):
    flags = ("--cors-origin", origin) if origin else ()
    server = server_factory(*flags, workers=2)
    expect = origin or "*"
    ident = uid("hdr")
    server.pub(ident, "x")
    server.pub(ident, "y")
    for path in ("/sub/%s" % ident, "/sub/%s?since=2&timeout=1" % ident,
                 "/sub/%s?callback=f" % ident, "/%s.js" % ident):
        status, headers, _ = server.request("GET", path, port=server.client)
        assert status == 200, path
        check_common_headers(headers, expect)
    # OPTIONS: the CORS preflight.
    for path in ("/sub/%s" % ident, "/%s.js" % ident):
        status, headers, body = server.request(
            "OPTIONS", path, port=server.client,
            headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "GET"})
        assert status == 204, path
        assert body == b""
        lower = {k.lower(): v for k, v in headers.items()}
        assert lower["access-control-allow-origin"] == expect
        assert "GET" in lower.get("access-control-allow-methods", "GET")


def test_keep_alive_several_polls_on_one_connection(server_factory):
    server = server_factory(workers=2)
    ident = uid("keep")
    server.pub(ident, "one")
    epoch = id_epoch(server, ident)
    conn = Raw(server.client)
    try:
        conn.get("/sub/%s" % ident)
        status, headers, body = conn.response()
        assert status == 200 and json.loads(body)["last"] == 1
        assert headers.get("connection", "").lower() != "close"
        # A held poll on the same connection gets the next message.
        conn.get("/sub/%s?since=1&timeout=10" % ident)
        wait_held(server, 1)
        server.pub(ident, "two")
        status, _, body = conn.response()
        assert status == 200 and datas(json.loads(body)) == ["two"]
        # A timeout answer keeps the connection too.
        conn.get("/sub/%s?since=2&timeout=1" % ident)
        status, headers, body = conn.response(timeout=10)
        assert status == 200 and json.loads(body) == {"id": ident, "messages": [], "last": 2,
                                                      "epoch": epoch}
        assert headers.get("connection", "").lower() != "close"
        # HEAD: headers (with the Content-Length a GET would have) and no body; still kept alive.
        conn.get("/sub/%s" % ident, method="HEAD")
        status, headers, body = conn.response(head=True)
        assert status == 200 and body == b""
        get_body = json.dumps({"id": ident, "messages": [{"seq": 1, "data": "one"},
                                                         {"seq": 2, "data": "two"}], "last": 2,
                              "epoch": epoch})
        assert int(headers["content-length"]) == len(get_body.encode())
        conn.get("/sub/%s?since=1" % ident)
        status, _, body = conn.response()
        assert status == 200 and datas(json.loads(body)) == ["two"]
        assert not conn.readable(0.1)
        # Pipelined requests are answered in order.
        conn.send(b"GET /sub/%s?since=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /sub/%s HTTP/1.1\r\nHost: x\r\n\r\n" % (ident.encode(), ident.encode()))
        assert datas(json.loads(conn.response()[2])) == ["two"]
        assert datas(json.loads(conn.response()[2])) == ["one", "two"]
        # Connection: close closes after the answer.
        conn.get("/sub/%s" % ident, headers=["Connection: close"])
        status, headers, body = conn.response()
        assert status == 200 and datas(json.loads(body)) == ["one", "two"]
        assert headers["connection"].lower() == "close"
        assert conn.closed(timeout=5)
    finally:
        conn.close()


def test_http_1_0_closes(server_factory):
    server = server_factory(workers=2)
    ident = uid("http10")
    server.pub(ident, "old client")
    conn = Raw(server.client)
    try:
        conn.get("/sub/%s" % ident, version="HTTP/1.0")
        status, headers, body = conn.response()
        assert status == 200 and datas(json.loads(body)) == ["old client"]
        assert headers["connection"].lower() == "close"
        assert conn.closed(timeout=5)
    finally:
        conn.close()
    # A held HTTP/1.0 poll: answered at its timeout, then closed.
    conn = Raw(server.client)
    try:
        conn.get("/sub/%s?since=1&timeout=1" % ident, version="HTTP/1.0")
        status, headers, body = conn.response(timeout=10)
        assert status == 200 and json.loads(body)["messages"] == []
        assert conn.closed(timeout=5)
    finally:
        conn.close()


def test_head_request(server_factory):
    server = server_factory(workers=2)
    ident = uid("head")
    server.pub(ident, "abc")
    conn = Raw(server.client)
    try:
        conn.get("/sub/%s" % ident, method="HEAD", headers=["Connection: close"])
        status, headers, body = conn.response(head=True)
        assert status == 200
        check_common_headers(headers)
        assert headers["content-type"] == "application/json"
        assert conn.closed(timeout=5) and conn.buf == b"", "a body after a HEAD answer: %r" % conn.buf
    finally:
        conn.close()
    status, _, full = server.request("GET", "/sub/%s" % ident, port=server.client)
    assert int(headers["content-length"]) == len(full)
    # HEAD on the app port too.
    status, _, body = server.request("HEAD", "/health")
    assert status == 200 and body == b""


# -- the app port ---------------------------------------------------------------------------


def test_batch_of_10000_messages(server_factory):
    server = server_factory(workers=2)
    before = stat_totals(server)["published"]
    ids = [uid("bulk") for _ in range(500)]
    items = [(ids[n % 500], "message %d ✓" % n) for n in range(10000)]
    reply = server.pub_batch(items, timeout=60)
    assert reply == {"published": 10000, "errors": []}
    for index in (0, 1, 250, 377, 499):
        doc = sub_json(server, ids[index])
        assert doc["id"] == ids[index]
        assert seqs(doc) == list(range(1, 21))
        assert datas(doc) == ["message %d ✓" % n for n in range(index, 10000, 500)]
    wait_for(lambda: stat_totals(server)["published"] >= before + 10000, timeout=10,
             message="published counter")


def test_batch_errors_with_line_numbers(server_factory):
    server = server_factory("--max-message", "100", workers=2)
    good1, good2, good3 = uid("good"), uid("good"), uid("good")
    lines = [
        json.dumps({"id": good1, "data": "first"}),             # 1 ok
        '{"id": "x", "data": ',                                  # 2 bad JSON
        json.dumps({"data": "no id"}),                           # 3 missing id
        json.dumps({"id": good2}),                               # 4 missing data
        json.dumps({"id": "bad id", "data": "x"}),               # 5 invalid id (space)
        json.dumps({"id": "a" * 129, "data": "x"}),              # 6 id too long
        json.dumps({"id": good2, "data": 123}),                  # 7 data not a string
        json.dumps({"id": good2, "data": "x" * 101}),            # 8 over --max-message
        "",                                                      # 9 blank: skipped
        json.dumps({"id": good2, "data": "é" * 50}),             # 10 ok: exactly 100 bytes
        json.dumps({"id": "a.b", "data": "x"}),                  # 11 invalid id (dot)
        json.dumps({"id": 5, "data": "x"}),                      # 12 id not a string
        "not json at all",                                       # 13 bad JSON
        json.dumps(["id", "data"]),                              # 14 not an object
        json.dumps({"id": good3, "data": ""}),                   # 15 ok: empty message
    ]
    status, _, body = server.request("POST", "/pub", "\n".join(lines).encode())
    assert status == 202, body
    reply = json.loads(body)
    assert reply["published"] == 3, reply
    errors = reply["errors"]
    assert [e["line"] for e in errors] == [2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 14], errors
    assert all(isinstance(e["error"], str) and e["error"] for e in errors), errors
    assert datas(sub_json(server, good1)) == ["first"]
    assert datas(sub_json(server, good2)) == ["é" * 50]
    assert datas(sub_json(server, good3)) == [""]
    # A trailing newline and CRLF line ends are fine.
    ident = uid("crlf")
    body = (json.dumps({"id": ident, "data": "a"}) + "\r\n" +
            json.dumps({"id": ident, "data": "b"}) + "\n").encode()
    status, _, reply = server.request("POST", "/pub", body)
    assert status == 202 and json.loads(reply) == {"published": 2, "errors": []}
    assert datas(sub_json(server, ident)) == ["a", "b"]


def test_single_pub_limits(server_factory):
    server = server_factory("--max-message", "100", workers=2)
    ident = uid("lim")
    status, _, body = server.request("POST", "/pub/" + ident, b"x" * 100)
    assert status == 202 and json.loads(body) == {"id": ident, "seq": 1, "subscribers": 0}
    status, _, _ = server.request("POST", "/pub/" + ident, b"x" * 101)
    assert status == 413
    status, _, _ = server.request("POST", "/pub/" + ident, b"\xff\xfe not utf-8")
    assert status == 400
    for bad in ("a.b", "a%20b", "a" * 129):
        status, _, _ = server.request("POST", "/pub/" + bad, b"x")
        assert status == 400, bad
    assert seqs(sub_json(server, ident)) == [1]


def test_stats_shape(server_factory):
    server = server_factory(workers=3)
    ident = uid("stats")
    server.pub(ident, "x")
    sub_json(server, ident)

    def settled():
        doc = server.stats()
        return doc if doc["totals"]["published"] >= 1 and doc["totals"]["delivered"] >= 1 else None
    doc = wait_for(settled, timeout=10, message="stats flushed")
    counters = ("connections", "subscribers", "accepted", "published", "delivered", "expired",
                "dropped", "rss_bytes")
    assert len(doc["workers"]) == 3
    children = set(map(int, open("/proc/%d/task/%d/children" % (server.proc.pid, server.proc.pid))
                       .read().split()))
    pids = [w["pid"] for w in doc["workers"]]
    assert len(set(pids)) == 3 and set(pids) <= children, (pids, children)
    for w in doc["workers"]:
        for name in counters:
            assert isinstance(w[name], int) and w[name] >= 0, (name, w)
        assert w["rss_bytes"] > 1 << 20
    for name in counters:
        assert doc["totals"][name] == sum(w[name] for w in doc["workers"]), name
    assert doc["totals"]["accepted"] >= 3          # 1 pub, 1 sub, the /stats requests
    assert doc["totals"]["connections"] >= 1       # this very /stats request
    shm = doc["shm"]
    for name in ("ids_used", "ids_capacity", "messages", "bytes_used", "bytes_capacity"):
        assert isinstance(shm[name], int) and shm[name] >= 0, (name, shm)
    assert shm["ids_used"] >= 1 and shm["messages"] >= 1
    assert shm["ids_capacity"] >= 1000000          # default --max-ids
    assert 0 < shm["bytes_used"] <= shm["bytes_capacity"]
    assert isinstance(doc["uptime_s"], (int, float)) and doc["uptime_s"] >= 0
    time.sleep(0.3)
    assert server.stats()["uptime_s"] > doc["uptime_s"]


_METRIC_LINE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*,?\})? (\S+)( -?\d+)?$')


def test_metrics_prometheus_text(server_factory):
    server = server_factory(workers=2)
    server.pub(uid("metrics"), "x")
    wait_for(lambda: stat_totals(server)["published"] >= 1, timeout=10, message="stats flushed")
    status, headers, body = server.request("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    assert text.endswith("\n")
    samples = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* \S", line) or \
                not re.match(r"^# (HELP|TYPE)", line), line
            continue
        m = _METRIC_LINE.match(line)
        assert m, "not a Prometheus sample line: %r" % line
        value = float(m.group(3))
        assert not math.isnan(value)
        samples.setdefault(m.group(1), []).append(value)
    names = " ".join(samples)
    for word in ("connections", "subscribers", "accepted", "published", "delivered", "expired",
                 "dropped", "rss"):
        assert word in names, (word, sorted(samples))
    published = [v for name, vals in samples.items() if "published" in name for v in vals]
    assert sum(published) >= 1


def test_health(server_factory):
    server = server_factory(workers=2)
    status, _, body = server.request("GET", "/health")
    assert status == 200 and body.strip() == b"ok"


def test_app_token(server_factory):
    server = server_factory("--app-token", "s3cret-T", workers=2)
    ident = uid("tok")
    good = {"Authorization": "Bearer s3cret-T"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-T"},
                    {"Authorization": "Bearer s3cret-T2"}, {"Authorization": "Basic s3cret-T"}):
        status, _, _ = server.request("POST", "/pub/" + ident, b"no", headers=headers)
        assert status == 401, headers
        status, _, _ = server.request("POST", "/pub", json.dumps({"id": ident, "data": "no"}).encode(),
                                      headers=headers)
        assert status == 401, headers
        for path in ("/stats", "/metrics"):
            assert server.request("GET", path, headers=headers)[0] == 401, (path, headers)
    # /health needs no token.
    status, _, body = server.request("GET", "/health")
    assert status == 200 and body.strip() == b"ok"
    # With the token.
    status, _, body = server.request("POST", "/pub/" + ident, b"yes", headers=good)
    assert status == 202 and json.loads(body) == {"id": ident, "seq": 1, "subscribers": 0}
    status, _, body = server.request("POST", "/pub", json.dumps({"id": ident, "data": "yes 2"}).encode(),
                                     headers=good)
    assert status == 202 and json.loads(body)["published"] == 1
    assert server.request("GET", "/stats", headers=good)[0] == 200
    assert server.request("GET", "/metrics", headers=good)[0] == 200
    # The binary protocol is refused: the connection is closed and nothing is published.
    started = time.monotonic()
    assert raw_request(server.app, frame(ident, "binary no"), timeout=5) == b""
    assert time.monotonic() - started < 4, "the binary connection was not closed"
    time.sleep(0.2)
    assert datas(sub_json(server, ident)) == ["yes", "yes 2"]
    # The client port needs no token.
    assert server.request("GET", "/%s.js" % ident, port=server.client)[::2] == (200, b"yes")


# -- paths, methods, ids ---------------------------------------------------------------------


def test_unknown_paths_404(server_factory):
    server = server_factory(workers=2)
    for path in ("/foo", "/sub", "/subx/abc", "/a/b.js", "/abc.jsx", "/a.b.js", "/.js",
                 "/stats", "/pub/abc", "/demo/x", "/megacomet.jsx"):   # "/" is the demo page
        status, _, _ = server.request("GET", path, port=server.client)
        assert status == 404, path
    for path in ("/", "/nope", "/statsx", "/health/x"):
        status, _, _ = server.request("GET", path)
        assert status == 404, path


def test_methods_405(server_factory):
    server = server_factory(workers=2)
    ident = uid("meth")
    for method, path in (("POST", "/sub/" + ident), ("PUT", "/sub/" + ident),
                         ("DELETE", "/sub/" + ident), ("PATCH", "/%s.js" % ident),
                         ("POST", "/%s.js" % ident), ("PUT", "/pub/" + ident)):
        status, _, _ = server.request(method, path, body=b"x", port=server.client)
        assert status == 405, (method, path, status)
    # Nothing was published by any of them.
    assert sub_json(server, ident, timeout=1)["messages"] == []


def test_id_rules(server_factory):
    server = server_factory(workers=2)
    longest = "L" * 120 + uid("")[-8:].replace("_", "x")
    longest = (longest + "x" * 128)[:128]
    assert server.pub(longest, "128 ok") == 1
    assert datas(sub_json(server, longest)) == ["128 ok"]
    assert server.request("GET", "/%s.js" % longest, port=server.client)[::2] == (200, b"128 ok")
    every = "aZ09_~:@-" + uid("")
    assert server.pub(every, "all chars") == 1
    assert datas(sub_json(server, every)) == ["all chars"]
    with socket.create_connection(("127.0.0.1", server.app), timeout=5) as s:
        s.sendall(frame(every, "via binary"))
        wait_for(lambda: len(sub_json(server, every, timeout=1)["messages"]) == 2, timeout=10,
                 message="binary publish to an id of every allowed character")
    for bad in ("x" * 129, "a%20b", "a%2Fb", "%41", "a.b", "a/b", "a/", "", "a+b", "a!b"):
        status, _, body = server.request("GET", "/sub/" + bad, port=server.client)
        assert status == 400, (bad, status, body)
        assert body.strip() and body.strip().count(b"\n") == 0, body


def test_head_on_compat_poll_looks_without_moving_the_cursor(server_factory):
    server = server_factory("--poll-timeout", "5", workers=2)
    ident = "headcompat"
    status, headers, body = server.request("HEAD", "/%s.js" % ident, port=server.client, timeout=3)
    assert (status, body, headers["Content-Length"]) == (200, b"", "0")   # nothing: at once
    server.pub(ident, "ab")
    status, headers, body = server.request("HEAD", "/%s.js" % ident, port=server.client, timeout=3)
    assert status == 200 and body == b"" and headers["Content-Length"] == "2"
    status, _, body = server.request("GET", "/%s.js" % ident, port=server.client, timeout=3)
    assert (status, body) == (200, b"ab")                # the HEAD did not take it


def free_port_run(n):
    """A port p with p .. p+n-1 all free, below the ephemeral range (32768-60999)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000)
        socks = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError("no run of %d free ports" % n)


def test_compat_ports_serve_the_original_pages_port_per_worker(tmp_path):
    """--compat-ports: every worker also listens on port+1 .. port+N-1, so a page of the
    original (which picks 8000 + hash(id) % 8) reaches the server on any of them."""
    base = free_port_run(4)
    server = Server("--compat-ports", workers=4)
    server.flags[server.flags.index("--port") + 1] = str(base)
    server.start()
    try:
        assert "compat ports %d-%d" % (base + 1, base + 3) in server.banner
        ident = uid("ports")
        server.pub(ident, "on every port")
        for port in range(base, base + 4):
            status, _, body = server.request("GET", "/sub/%s?since=0" % ident, port=port)
            assert status == 200 and json.loads(body)["messages"][0]["data"] == "on every port"
    finally:
        server.stop()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "megacomet.py"), "--compat-ports",
                           "--port", "0"], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2 and "fixed --port" in proc.stderr

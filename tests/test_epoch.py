"""The server's epoch: resuming across a full restart, end to end on real servers.

Seqs live in the shared memory, which a full restart creates anew: seqs begin
again at 1.  A client whose cursor is 3 from the old run, resuming once the
new run has published 4 messages, would get only seq 4 (everything at or
below its cursor lost) if the server took its since at its word.  So every
answer names the run (long-poll JSON and JSONP: ``"epoch"``; WebSocket
frames: ``"epoch"``; an EventSource stream: an ``epoch`` event at its start),
and a subscription that sends back another run's ``epoch`` has every since
(``since=N``, ``id:seq`` pairs, ``Last-Event-ID``) taken as 0.  Here: that
repro on every transport, one id and several, with the epoch stale (all
delivered), current (since honoured) and absent (as before epochs); one epoch
on every worker, kept by a SIGHUP reload; malformed epochs refused.
"""

import json
import signal
import socket
import time
import types

import pytest

from conftest import Server, read_response, wait_for
from test_bad_input import uid
from test_streams import Stream


def epoch_event(stream):
    """The epoch an EventSource stream starts with: after the retry hint, a named event."""
    assert stream.event() == [("retry", "2000")]
    fields = stream.event()
    assert fields[0] == ("event", "epoch") and len(fields) == 2, fields
    assert fields[1][0] == "data" and fields[1][1].isdigit(), fields
    return int(fields[1][1])


def server_epoch(server):
    """The server's epoch, read off the start of a stream (of an id of its own)."""
    stream = Stream(server, "/sse/" + uid("epoch"))
    try:
        return epoch_event(stream)
    finally:
        stream.close()


def poll(server, path):
    status, _, body = server.request("GET", path, port=server.client)
    assert status == 200, (path, status, body)
    return json.loads(body)


def ws_frames(server, path, n):
    from websockets.sync.client import connect as ws_connect   # test_api imports this module
    with ws_connect("ws://127.0.0.1:%d%s" % (server.client, path)) as ws:
        return [json.loads(ws.recv(timeout=10)) for _ in range(n)]


@pytest.fixture(scope="module")
def restart():
    """Run A: old messages, read up to a cursor (3 for ``one``; 3 and 2 for ``a``, ``b``).
    Stopped; run B on the same ports, fresh memory: more new messages than the cursors."""
    one, a, b = uid("one"), uid("a"), uid("b")
    old = Server(workers=2).start()
    try:
        for i in (1, 2, 3):
            old.pub(one, "old%d" % i)
            old.pub(a, "a-old%d" % i)
        for i in (1, 2):
            old.pub(b, "b-old%d" % i)
        doc = poll(old, "/sub/%s?since=0" % one)        # the client is at seq 3 now
        assert [m["seq"] for m in doc["messages"]] == [1, 2, 3]
        old_epoch = doc["epoch"]
    finally:
        old.stop()
    new = Server(workers=2, port=old.client, app_port=old.app).start()
    try:
        assert [new.pub(one, "new%d" % i) for i in (1, 2, 3, 4)] == [1, 2, 3, 4]
        assert [new.pub(a, "a-new%d" % i) for i in (1, 2, 3, 4)] == [1, 2, 3, 4]
        assert [new.pub(b, "b-new%d" % i) for i in (1, 2, 3)] == [1, 2, 3]
        new_epoch = server_epoch(new)
        assert new_epoch != old_epoch
        yield types.SimpleNamespace(server=new, old=old_epoch, new=new_epoch, one=one, a=a, b=b)
    finally:
        new.stop()


ALL_ONE = [{"seq": i, "data": "new%d" % i} for i in (1, 2, 3, 4)]


def all_many(r):
    """Every message of a and b in run B, as {id: [(seq, data)]}."""
    return {r.a: [(i, "a-new%d" % i) for i in (1, 2, 3, 4)],
            r.b: [(i, "b-new%d" % i) for i in (1, 2, 3)]}


def by_id(messages):
    got = {}
    for m in messages:
        got.setdefault(m["id"], []).append((m["seq"], m["data"]))
    return got


# -- long-poll -------------------------------------------------------------------------------

def test_long_poll_of_one_id_resumes_across_a_restart_with_the_epoch(restart):
    r = restart
    base = "/sub/%s?since=3&timeout=1" % r.one
    # Another run's epoch: since counts as 0, everything buffered comes, with B's epoch.
    assert poll(r.server, base + "&epoch=%d" % r.old) == {
        "id": r.one, "messages": ALL_ONE, "last": 4, "epoch": r.new}
    assert poll(r.server, base + "&epoch=0")["messages"] == ALL_ONE     # any other number
    # This run's epoch: since stands.
    assert poll(r.server, base + "&epoch=%d" % r.new) == {
        "id": r.one, "messages": [{"seq": 4, "data": "new4"}], "last": 4, "epoch": r.new}
    # No epoch: as before epochs, since stands (which is what loses new1..new3 here).
    assert poll(r.server, base)["messages"] == [{"seq": 4, "data": "new4"}]
    # JSONP: the same answer, wrapped.
    status, _, body = r.server.request("GET", base + "&callback=cb&epoch=%d" % r.old,
                                       port=r.server.client)
    text = body.decode()
    assert status == 200 and text.startswith("/**/cb(") and text.endswith(");"), text
    assert json.loads(text[len("/**/cb("):-2]) == {
        "id": r.one, "messages": ALL_ONE, "last": 4, "epoch": r.new}


def follow_polls(server, ids, since, epoch):
    """Long-poll ``ids`` as a client does until a poll times out empty: each answer's messages,
    and its epoch sent back with the cursors (``last``) the answer gives."""
    got, answers = [], []
    while True:
        query = "since=%s&timeout=1" % ",".join("%s:%d" % item for item in since.items())
        if epoch is not None:
            query += "&epoch=%d" % epoch
        doc = poll(server, "/sub/%s?%s" % (",".join(ids), query))
        answers.append(doc)
        if not doc["messages"]:
            return got, answers
        got += doc["messages"]
        since, epoch = doc["last"], doc["epoch"]


def test_multiplexed_long_poll_resumes_across_a_restart_with_the_epoch(restart):
    r = restart
    cursors = {r.a: 3, r.b: 2}
    got, answers = follow_polls(r.server, [r.a, r.b], cursors, r.old)
    assert by_id(got) == all_many(r)
    assert {doc["epoch"] for doc in answers} == {r.new}
    assert answers[-1]["last"] == {r.a: 4, r.b: 3}
    # This run's epoch, or none: the cursors stand.
    for epoch in (r.new, None):
        got, answers = follow_polls(r.server, [r.a, r.b], cursors, epoch)
        assert by_id(got) == {r.a: [(4, "a-new4")], r.b: [(3, "b-new3")]}, epoch


# -- EventSource ----------------------------------------------------------------------------

def test_event_source_resumes_across_a_restart_with_the_epoch(restart):
    r = restart
    everything = [(i, "new%d" % i) for i in (1, 2, 3, 4)]
    for path, headers in (("/sse/%s?since=3&epoch=%d" % (r.one, r.old), []),
                          ("/sse/%s?epoch=%d" % (r.one, r.old), ["Last-Event-ID: 3"]),
                          ("/sub/%s?since=3&epoch=%d" % (r.one, r.old),
                           ["Accept: text/event-stream"])):
        stream = Stream(r.server, path, headers)
        try:
            assert epoch_event(stream) == r.new
            assert [stream.message() for _ in range(4)] == everything, path
        finally:
            stream.close()
    for path, headers in (("/sse/%s?since=3&epoch=%d" % (r.one, r.new), []),
                          ("/sse/%s?epoch=%d" % (r.one, r.new), ["Last-Event-ID: 3"]),
                          ("/sse/%s?since=3" % r.one, []),
                          ("/sse/%s" % r.one, ["Last-Event-ID: 3"])):
        stream = Stream(r.server, path, headers)
        try:
            assert stream.message() == (4, "new4"), (path, headers)
        finally:
            stream.close()


def multiplexed_events(stream, n):
    """n messages of a multiplexed stream: (the event's id, the message as JSON)."""
    out = []
    while len(out) < n:
        fields = stream.event()
        if fields[0][0] == "id":
            out.append((fields[0][1], json.loads(fields[1][1])))
    return out


def test_multiplexed_event_source_resumes_across_a_restart_with_the_epoch(restart):
    r = restart
    stream = Stream(r.server, "/sse/%s,%s?since=%s:3,%s:2&epoch=%d" % (r.a, r.b, r.a, r.b, r.old))
    try:
        assert epoch_event(stream) == r.new
        events = multiplexed_events(stream, 7)
        assert by_id(m for _, m in events) == all_many(r)
        assert events[-1][0] == "%s:4,%s:3" % (r.a, r.b)      # Last-Event-ID: every cursor
    finally:
        stream.close()
    stream = Stream(r.server, "/sse/%s,%s?epoch=%d" % (r.a, r.b, r.old),
                    ["Last-Event-ID: %s:3,%s:2" % (r.a, r.b)])
    try:
        assert by_id(m for _, m in multiplexed_events(stream, 7)) == all_many(r)
    finally:
        stream.close()
    for query in ("&epoch=%d" % r.new, ""):
        stream = Stream(r.server, "/sse/%s,%s?since=%s:3,%s:2%s" % (r.a, r.b, r.a, r.b, query))
        try:
            assert by_id(m for _, m in multiplexed_events(stream, 2)) == {
                r.a: [(4, "a-new4")], r.b: [(3, "b-new3")]}
        finally:
            stream.close()


# -- WebSocket ------------------------------------------------------------------------------

def test_websocket_resumes_across_a_restart_with_the_epoch(restart):
    r = restart
    for path in ("/ws/%s?since=3&epoch=%d" % (r.one, r.old),
                 "/sub/%s?epoch=%d&since=3" % (r.one, r.old)):
        assert ws_frames(r.server, path, 4) == [
            {"id": r.one, "seq": i, "data": "new%d" % i, "epoch": r.new} for i in (1, 2, 3, 4)]
    for path in ("/ws/%s?since=3&epoch=%d" % (r.one, r.new), "/ws/%s?since=3" % r.one):
        assert ws_frames(r.server, path, 1) == [
            {"id": r.one, "seq": 4, "data": "new4", "epoch": r.new}], path
    ids = "%s,%s" % (r.a, r.b)
    frames = ws_frames(r.server, "/ws/%s?since=%s:3,%s:2&epoch=%d" % (ids, r.a, r.b, r.old), 7)
    assert {f.pop("epoch") for f in frames} == {r.new}
    assert by_id(frames) == all_many(r)
    for query in ("&epoch=%d" % r.new, ""):
        frames = ws_frames(r.server, "/ws/%s?since=%s:3,%s:2%s" % (ids, r.a, r.b, query), 2)
        assert {f.pop("epoch") for f in frames} == {r.new}
        assert by_id(frames) == {r.a: [(4, "a-new4")], r.b: [(3, "b-new3")]}


# -- one epoch per run ----------------------------------------------------------------------

def epochs_on_every_worker(server):
    """The epochs streams start with, opened until every worker holds one (the kernel picks
    the worker of each connection)."""
    streams = []
    try:
        while min(w["subscribers"] for w in server.stats()["workers"]) == 0:
            assert len(streams) < 64, "every stream went to the same worker"
            streams.append(Stream(server, "/sse/" + uid("everywhere")))
        return {epoch_event(stream) for stream in streams}
    finally:
        for stream in streams:
            stream.close()


def test_one_epoch_per_run_on_every_worker_kept_by_a_reload(server_factory):
    before = time.time()
    server = server_factory(workers=2)
    after = time.time()
    (epoch,) = epochs_on_every_worker(server)
    assert before * 1000 - 1 <= epoch <= after * 1000 + 1     # the supervisor's start, in ms
    ident = uid("reloaded")
    for i in (1, 2, 3):
        server.pub(ident, "m%d" % i)
    assert poll(server, "/sub/%s?since=0" % ident)["epoch"] == epoch

    # A reload replaces every worker; the shared memory, its seqs and so the epoch stay.
    old_pids = server.worker_pids()
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload: done" in server.stderr(), timeout=30, message="the reload")
    new_pids = server.worker_pids()
    assert all(new_pids) and not set(new_pids) & set(old_pids)
    assert epochs_on_every_worker(server) == {epoch}
    assert poll(server, "/sub/%s?since=2&epoch=%d" % (ident, epoch)) == {
        "id": ident, "messages": [{"seq": 3, "data": "m3"}], "last": 3, "epoch": epoch}
    assert ws_frames(server, "/ws/%s?since=2&epoch=%d" % (ident, epoch), 1) == [
        {"id": ident, "seq": 3, "data": "m3", "epoch": epoch}]
    assert "Traceback" not in server.stderr()


# -- what is refused ------------------------------------------------------------------------

def test_an_epoch_that_is_not_a_whole_number_gets_400(server_factory):
    server = server_factory(workers=1)
    ident = uid("bad")
    server.pub(ident, "m1")
    for value in ("x", "-1", "1.5", "1e3", "%C2%B2", "", "%201", "1" * 21):
        for path in ("/sub/%s?epoch=%s", "/sse/%s?epoch=%s", "/sub/%s,other?epoch=%s"):
            status, _, body = server.request("GET", path % (ident, value), port=server.client)
            assert status == 400 and b"epoch" in body, (path, value, status, body)
        with socket.create_connection(("127.0.0.1", server.client), timeout=10) as sock:
            sock.sendall(b"GET /ws/%s?epoch=%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                         % (ident.encode(), value.encode()))
            assert read_response(sock)[0] == 400, value
    # Twenty digits is a number (of no run): everything buffered.
    assert poll(server, "/sub/%s?since=1&epoch=%s" % (ident, "9" * 20))["messages"] == [
        {"seq": 1, "data": "m1"}]

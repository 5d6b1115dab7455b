"""Every id's epoch: resuming across a full restart and a new life of an id, end to end on
real servers.

Seqs are counted per id, from 1, in the shared memory.  An id forgotten (nothing buffered,
nobody subscribed) and created again starts its seqs at 1 again, and a full restart creates
the shared memory anew, so every id starts again.  A client whose cursor is 3 from the old
life, resuming once the new one has published 4 messages, would get only seq 4 (everything
at or below its cursor lost) if the server took its since at its word.  So every id has an
epoch of its own, stamped when the id is created, and every answer names it (long-poll JSON
and JSONP: ``"epoch": E``, or ``{id: E}`` for several ids; WebSocket frames: the epoch of
the frame's id; an EventSource stream: an ``epoch`` event once the home has answered), and
a subscription that sends back an epoch that is not the id's has that id's since
(``since=N``, its ``id:seq`` pair, its part of ``Last-Event-ID``) taken as 0.

Here: that repro on every transport, one id and several (epochs as ``id:E`` pairs and as one
number for all), with the old epoch (all delivered), the current one (since honoured) and
none (since stands, as before epochs); an id forgotten and published to again; two ids with
epochs of their own; an id's epoch the same on every worker and kept by a SIGHUP reload;
malformed epochs refused.
"""

import concurrent.futures
import http.client
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
    """The epoch an EventSource stream starts with: after the retry hint, once the homes have
    answered, a named event without an id: a number for one id, {id: E} (JSON) for several."""
    assert stream.event() == [("retry", "2000")]
    fields = stream.event()
    assert fields[0] == ("event", "epoch") and len(fields) == 2, fields
    assert fields[1][0] == "data", fields
    text = fields[1][1]
    if text.isdigit():
        return int(text)
    epochs = json.loads(text)
    assert type(epochs) is dict and all(type(e) is int for e in epochs.values()), text
    return epochs


def poll(server, path):
    status, _, body = server.request("GET", path, port=server.client)
    assert status == 200, (path, status, body)
    return json.loads(body)


def id_epoch(server, ident):
    """ident's epoch, off a poll of everything it buffers (for an id that has messages: its home
    answers that poll, so the epoch is known, never 0)."""
    doc = poll(server, "/sub/%s?since=0&timeout=1" % ident)
    assert doc["id"] == ident and type(doc["epoch"]) is int and doc["epoch"] > 0, doc
    return doc["epoch"]


def ws_frames(server, path, n):
    from websockets.sync.client import connect as ws_connect   # test_api imports this module
    with ws_connect("ws://127.0.0.1:%d%s" % (server.client, path)) as ws:
        return [json.loads(ws.recv(timeout=10)) for _ in range(n)]


def sse(server, path, n, headers=()):
    """An EventSource stream's epoch event and its first n messages: (seq, data) for one id;
    for several, (the event's id: every cursor, the message as JSON)."""
    stream = Stream(server, path, list(headers))
    try:
        assert stream.status == 200, (path, stream.status)
        epoch = epoch_event(stream)
        if type(epoch) is int:
            return epoch, [stream.message() for _ in range(n)]
        return epoch, multiplexed_events(stream, n)
    finally:
        stream.close()


def multiplexed_events(stream, n):
    """n messages of a multiplexed stream: (the event's id, the message as JSON)."""
    out = []
    while len(out) < n:
        fields = stream.event()
        assert fields[0] != ("event", "epoch"), fields     # once, at the start
        if fields[0][0] == "id":
            out.append((fields[0][1], json.loads(fields[1][1])))
    return out


def by_id(messages):
    got = {}
    for m in messages:
        got.setdefault(m["id"], []).append((m["seq"], m["data"]))
    return got


def pairs(values):
    """{id: number} as a query value: "a:1,b:2"."""
    return ",".join("%s:%d" % item for item in values.items())


def q(*params):
    """A query string of the params given (an empty one is left out)."""
    return "&".join(p for p in params if p)


# -- a full restart ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def restart():
    """Run A: old messages, read up to a cursor (3 for ``one``; 3 and 2 for ``a``, ``b``); each
    id's epoch in run A.  Stopped; run B on the same ports, fresh memory: more new messages
    than the cursors; each id's epoch in run B."""
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
        old_epochs = {i: id_epoch(old, i) for i in (one, a, b)}
        assert doc["epoch"] == old_epochs[one]
    finally:
        old.stop()
    new = Server(workers=2, port=old.client, app_port=old.app).start()
    try:
        assert [new.pub(one, "new%d" % i) for i in (1, 2, 3, 4)] == [1, 2, 3, 4]
        assert [new.pub(a, "a-new%d" % i) for i in (1, 2, 3, 4)] == [1, 2, 3, 4]
        time.sleep(0.01)                 # b is created in a later ms than a: another epoch
        assert [new.pub(b, "b-new%d" % i) for i in (1, 2, 3)] == [1, 2, 3]
        new_epochs = {i: id_epoch(new, i) for i in (one, a, b)}
        for i in (one, a, b):
            assert new_epochs[i] != old_epochs[i], i
        assert new_epochs[a] != new_epochs[b]
        yield types.SimpleNamespace(server=new, old=old_epochs, new=new_epochs,
                                    one=one, a=a, b=b)
    finally:
        new.stop()


ALL_ONE = [{"seq": i, "data": "new%d" % i} for i in (1, 2, 3, 4)]
NEWEST_ONE = [{"seq": 4, "data": "new4"}]


def epochs_for_one(r):
    """(epoch query, whether since=3 counts as 0): another run's epoch or any number that is
    not the id's resets it; the id's epoch, none, and 0 (none given) leave it standing."""
    return [("epoch=%d" % r.old[r.one], True), ("epoch=1", True),
            ("epoch=%d" % r.new[r.one], False), ("", False), ("epoch=0", False)]


def expected_one(r, reset):
    return ALL_ONE if reset else NEWEST_ONE


# several ids: since a:3,b:2 (run A's cursors); the epoch query, and which ids it resets
def epochs_for_many(r):
    a, b = r.a, r.b
    return [
        ("epoch=" + pairs({a: r.old[a], b: r.old[b]}), {a, b}),    # each id's old epoch
        ("epoch=%d" % r.old[a], {a, b}),                           # one number for all: stale
        ("epoch=" + pairs({a: r.new[a], b: r.new[b]}), set()),     # the current ones
        ("", set()),                                               # none: cursors stand
        ("epoch=0", set()),                                        # 0: none given
        ("epoch=%d" % r.new[a], {b}),                              # one number: a's, not b's
        ("epoch=" + pairs({a: r.new[a], b: r.old[b]}), {b}),       # each its own
        ("epoch=" + pairs({b: r.old[b]}), {b}),                    # a left out: no epoch
    ]


def expected_many(r, reset):
    """What a subscription of a and b from a:3,b:2 gets in run B: {id: [(seq, data)]}."""
    return {r.a: [(i, "a-new%d" % i) for i in ((1, 2, 3, 4) if r.a in reset else (4,))],
            r.b: [(i, "b-new%d" % i) for i in ((1, 2, 3) if r.b in reset else (3,))]}


def count(expected):
    return sum(len(v) for v in expected.values())


# -- long-poll -------------------------------------------------------------------------------

def test_long_poll_of_one_id_resumes_across_a_restart_with_the_epoch(restart):
    r = restart
    base = "/sub/%s?since=3&timeout=1" % r.one
    for query, reset in epochs_for_one(r):
        # Always the id's epoch in run B; everything buffered when the cursor was reset.
        assert poll(r.server, q(base, query)) == {
            "id": r.one, "messages": expected_one(r, reset), "last": 4,
            "epoch": r.new[r.one]}, query
    # Up to date, with the id's epoch: held until the timeout, which names it.
    assert poll(r.server, "/sub/%s?since=4&epoch=%d&timeout=1" % (r.one, r.new[r.one])) == {
        "id": r.one, "messages": [], "last": 4, "epoch": r.new[r.one]}
    # JSONP: the same answers, wrapped.
    for query, reset in epochs_for_one(r)[:3]:
        status, _, body = r.server.request("GET", q(base, "callback=cb", query),
                                           port=r.server.client)
        text = body.decode()
        assert status == 200 and text.startswith("/**/cb(") and text.endswith(");"), text
        assert json.loads(text[len("/**/cb("):-2]) == {
            "id": r.one, "messages": expected_one(r, reset), "last": 4,
            "epoch": r.new[r.one]}, query


def follow_polls(server, ids, since, query):
    """Long-poll ``ids`` as a client does until a poll times out empty: the first poll with
    ``query`` (its epochs), each next one with the cursors (``last``) and the epochs (``epoch``,
    as id:E pairs) of the answer before.  Every answer, and all their messages."""
    got, answers = [], []
    while True:
        doc = poll(server, "/sub/%s?%s" % (",".join(ids), q("since=" + pairs(since), "timeout=1",
                                                            query)))
        answers.append(doc)
        if not doc["messages"]:
            return got, answers
        got += doc["messages"]
        since, query = doc["last"], "epoch=" + pairs(doc["epoch"])


def test_multiplexed_long_poll_resumes_across_a_restart_with_the_epochs(restart):
    r = restart
    cases = epochs_for_many(r)
    # Each client's polls end with one that times out empty (1 s): the clients, which only
    # read, poll side by side rather than one after another.
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        runs = list(pool.map(lambda case: follow_polls(r.server, [r.a, r.b], {r.a: 3, r.b: 2},
                                                       case[0]), cases))
    for (query, reset), (got, answers) in zip(cases, runs):
        assert by_id(got) == expected_many(r, reset), query
        for doc in answers:                          # every id's epoch, in every answer
            assert doc["epoch"] == {r.a: r.new[r.a], r.b: r.new[r.b]}, (query, doc)
        assert answers[-1]["last"] == {r.a: 4, r.b: 3}, query
    # The first answer has everything owed at once (every home's buffer), JSONP alike.
    status, _, body = r.server.request(
        "GET", "/sub/%s,%s?since=%s:3,%s:2&epoch=%s&callback=cb" % (
            r.a, r.b, r.a, r.b, pairs({r.a: r.old[r.a], r.b: r.old[r.b]})), port=r.server.client)
    text = body.decode()
    assert status == 200 and text.startswith("/**/cb(") and text.endswith(");"), text
    doc = json.loads(text[len("/**/cb("):-2])
    assert by_id(doc["messages"]) == expected_many(r, {r.a, r.b})
    assert doc["last"] == {r.a: 4, r.b: 3}
    assert doc["epoch"] == {r.a: r.new[r.a], r.b: r.new[r.b]}


# -- EventSource ----------------------------------------------------------------------------

def test_event_source_resumes_across_a_restart_with_the_epoch(restart):
    r = restart
    for query, reset in epochs_for_one(r):
        want = [(m["seq"], m["data"]) for m in expected_one(r, reset)]
        for path, headers in (("/sse/%s?%s" % (r.one, q("since=3", query)), []),
                              ("/sse/%s?%s" % (r.one, query), ["Last-Event-ID: 3"]),
                              ("/sub/%s?%s" % (r.one, q("since=3", query)),
                               ["Accept: text/event-stream"])):
            assert sse(r.server, path, len(want), headers) == (r.new[r.one], want), \
                (path, headers)


def test_multiplexed_event_source_resumes_across_a_restart_with_the_epochs(restart):
    r = restart
    ids = "%s,%s" % (r.a, r.b)
    everyone = {r.a: r.new[r.a], r.b: r.new[r.b]}
    for query, reset in epochs_for_many(r):
        want = expected_many(r, reset)
        for path, headers in (("/sse/%s?%s" % (ids, q("since=%s:3,%s:2" % (r.a, r.b), query)), []),
                              ("/sse/%s?%s" % (ids, query),
                               ["Last-Event-ID: %s:3,%s:2" % (r.a, r.b)])):
            epochs, events = sse(r.server, path, count(want), headers)
            assert epochs == everyone, (path, headers)
            assert by_id(m for _, m in events) == want, (path, headers)
            assert events[-1][0] == "%s:4,%s:3" % (r.a, r.b)     # Last-Event-ID: every cursor


# -- WebSocket ------------------------------------------------------------------------------

def test_websocket_resumes_across_a_restart_with_the_epoch(restart):
    r = restart
    for query, reset in epochs_for_one(r):
        want = [{"id": r.one, "seq": m["seq"], "data": m["data"], "epoch": r.new[r.one]}
                for m in expected_one(r, reset)]
        for path in ("/ws/%s?%s" % (r.one, q("since=3", query)),
                     "/sub/%s?%s" % (r.one, q(query, "since=3"))):
            assert ws_frames(r.server, path, len(want)) == want, path


def test_multiplexed_websocket_resumes_across_a_restart_with_the_epochs(restart):
    r = restart
    ids = "%s,%s" % (r.a, r.b)
    for query, reset in epochs_for_many(r):
        want = expected_many(r, reset)
        frames = ws_frames(r.server, "/ws/%s?%s" % (ids, q("since=%s:3,%s:2" % (r.a, r.b), query)),
                           count(want))
        for frame in frames:                         # each frame: the epoch of its own id
            assert frame.pop("epoch") == r.new[frame["id"]], (query, frame)
        assert by_id(frames) == want, query


# -- an id forgotten and created again; two ids --------------------------------------------

def test_an_id_forgotten_and_published_to_again_has_a_new_epoch_on_every_transport(server_factory):
    """Its messages expire (--queue-ttl 2), nobody follows it: the id is forgotten, and when it
    is published to again its seqs start at 1 in a new epoch.  A client with the old epoch
    gets the new messages from seq 1 on every transport.  Another id, followed meanwhile, is
    not forgotten: its epoch and seqs go on."""
    from websockets.sync.client import connect as ws_connect
    server = server_factory("--queue-ttl", 2, workers=2)
    ident, kept = uid("ttl"), uid("kept")
    assert [server.pub(ident, d) for d in ("a", "b")] == [1, 2]
    assert server.pub(kept, "k1") == 1
    old, kept_epoch = id_epoch(server, ident), id_epoch(server, kept)
    with ws_connect("ws://127.0.0.1:%d/ws/%s?since=1&epoch=%d"
                    % (server.client, kept, kept_epoch)) as holder:
        wait_for(lambda: server.stats()["totals"]["expired"] >= 3, timeout=15,
                 message="a, b and k1 to expire")
        assert [server.pub(ident, d) for d in ("c", "d", "e")] == [1, 2, 3]   # seqs from 1
        assert server.pub(kept, "k2") == 2                                    # followed: kept
        assert json.loads(holder.recv(timeout=10)) == {"id": kept, "seq": 2, "data": "k2",
                                                       "epoch": kept_epoch}
    new = id_epoch(server, ident)
    assert new != old
    assert id_epoch(server, kept) == kept_epoch
    everything = [(1, "c"), (2, "d"), (3, "e")]

    # Long-poll, JSON and JSONP: the old epoch (cursor 2 of the old life) gets all, with the new.
    assert poll(server, "/sub/%s?since=2&epoch=%d" % (ident, old)) == {
        "id": ident, "messages": [{"seq": s, "data": d} for s, d in everything], "last": 3,
        "epoch": new}
    status, _, body = server.request("GET", "/sub/%s?since=2&epoch=%d&callback=cb" % (ident, old),
                                     port=server.client)
    assert status == 200 and json.loads(body.decode()[len("/**/cb("):-2]) == {
        "id": ident, "messages": [{"seq": s, "data": d} for s, d in everything], "last": 3,
        "epoch": new}
    # Without an epoch the since stands (what loses c and d); with the new one too.
    assert poll(server, "/sub/%s?since=2&timeout=1" % ident)["messages"] == [{"seq": 3, "data": "e"}]
    assert poll(server, "/sub/%s?since=3&epoch=%d&timeout=1" % (ident, new)) == {
        "id": ident, "messages": [], "last": 3, "epoch": new}
    # EventSource: the epoch event names the new epoch; since or Last-Event-ID of the old life.
    for path, headers in (("/sse/%s?since=2&epoch=%d" % (ident, old), []),
                          ("/sse/%s?epoch=%d" % (ident, old), ["Last-Event-ID: 2"])):
        assert sse(server, path, 3, headers) == (new, everything), (path, headers)
    assert sse(server, "/sse/%s?since=2&epoch=%d" % (ident, new), 1) == (new, [(3, "e")])
    # WebSocket: every frame has the new epoch.
    assert ws_frames(server, "/ws/%s?since=2&epoch=%d" % (ident, old), 3) == [
        {"id": ident, "seq": s, "data": d, "epoch": new} for s, d in everything]

    # Several ids: the forgotten one from seq 1, the other from its cursor.
    ids = "%s,%s" % (ident, kept)
    query = "since=%s&epoch=%s" % (pairs({ident: 2, kept: 1}), pairs({ident: old, kept: kept_epoch}))
    want = {ident: everything, kept: [(2, "k2")]}
    doc = poll(server, "/sub/%s?%s" % (ids, query))
    assert by_id(doc["messages"]) == want
    assert doc["last"] == {ident: 3, kept: 2} and doc["epoch"] == {ident: new, kept: kept_epoch}
    epochs, events = sse(server, "/sse/%s?%s" % (ids, query), 4)
    assert epochs == {ident: new, kept: kept_epoch}
    assert by_id(m for _, m in events) == want
    frames = ws_frames(server, "/ws/%s?%s" % (ids, query), 4)
    assert [f.pop("epoch") for f in frames] == [new if f["id"] == ident else kept_epoch
                                                for f in frames]
    assert by_id(frames) == want


def test_two_ids_have_epochs_of_their_own(server_factory):
    """A stale epoch for one id of a multiplexed subscription resets that id's cursor alone."""
    server = server_factory(workers=2)
    a, b = uid("a"), uid("b")
    assert [server.pub(a, "a%d" % i) for i in (1, 2, 3)] == [1, 2, 3]
    time.sleep(0.01)                     # b is created in a later ms than a: another epoch
    assert [server.pub(b, "b%d" % i) for i in (1, 2, 3)] == [1, 2, 3]
    ea, eb = id_epoch(server, a), id_epoch(server, b)
    assert ea != eb
    ids = "%s,%s" % (a, b)
    since = "since=" + pairs({a: 2, b: 2})
    all_a = {a: [(1, "a1"), (2, "a2"), (3, "a3")], b: [(3, "b3")]}
    all_b = {a: [(3, "a3")], b: [(1, "b1"), (2, "b2"), (3, "b3")]}
    for epoch, want in (
            (pairs({a: 1, b: eb}), all_a),      # an epoch of no life of a: a's cursor alone
            (pairs({a: eb, b: eb}), all_a),     # b's epoch is not a's
            ("%d" % eb, all_a),                 # one number for all: b's
            (pairs({a: ea, b: ea}), all_b),     # and the other way round
            ("%d" % ea, all_b),
            (pairs({a: ea, b: eb}), {a: [(3, "a3")], b: [(3, "b3")]})):
        query = "%s&epoch=%s" % (since, epoch)
        doc = poll(server, "/sub/%s?%s" % (ids, query))
        assert by_id(doc["messages"]) == want, epoch
        assert doc["last"] == {a: 3, b: 3} and doc["epoch"] == {a: ea, b: eb}, (epoch, doc)
        epochs, events = sse(server, "/sse/%s?%s" % (ids, query), count(want))
        assert epochs == {a: ea, b: eb} and by_id(m for _, m in events) == want, epoch
        frames = ws_frames(server, "/ws/%s?%s" % (ids, query), count(want))
        assert [f.pop("epoch") for f in frames] == [ea if f["id"] == a else eb for f in frames]
        assert by_id(frames) == want, epoch
    # Each id's own epoch, one id at a time.
    assert poll(server, "/sub/%s?since=2&epoch=%d" % (a, ea))["messages"] == [
        {"seq": 3, "data": "a3"}]
    assert poll(server, "/sub/%s?since=2&epoch=%d" % (a, eb))["epoch"] == ea


# -- an id's epoch on every worker, across a reload --------------------------------------------

def polls_on_every_worker(server, path, n=8, tries=8):
    """Keep-alive connections, each holding a poll of ``path`` (held until its timeout), opened
    n at a time until the n of one round are held on every worker (the kernel picks each
    connection's worker).  Those connections, open, and their answers."""
    for _ in range(tries):
        conns = [http.client.HTTPConnection("127.0.0.1", server.client, timeout=15)
                 for _ in range(n)]
        try:
            for conn in conns:
                conn.request("GET", path)
            counts = wait_for(lambda: (lambda c: c if sum(c) >= n else None)(
                [w["subscribers"] for w in server.stats()["workers"]]), timeout=10,
                message="%d polls held" % n)
            answers = []
            for conn in conns:
                resp = conn.getresponse()
                assert resp.status == 200 and resp.getheader("Connection", "") != "close"
                answers.append(json.loads(resp.read()))
        except BaseException:
            for conn in conns:
                conn.close()
            raise
        if min(counts) > 0:
            return conns, answers
        for conn in conns:
            conn.close()
    raise AssertionError("every round of polls went to one worker")


def epochs_on_every_worker(server, ident, last):
    """The epochs polls of ident (which has messages m1..m<last>) answer with on every worker:
    held up to date without an epoch (what the worker reads of the id), then on the same
    connections (the same workers) everything, and since=2 with the epoch they said."""
    conns, answers = polls_on_every_worker(server, "/sub/%s?since=%d&timeout=2" % (ident, last))
    seen = set()
    everything = [{"seq": i, "data": "m%d" % i} for i in range(1, last + 1)]
    try:
        for conn, doc in zip(conns, answers):
            epoch = doc["epoch"]
            assert doc == {"id": ident, "messages": [], "last": last, "epoch": epoch}
            seen.add(epoch)
            for query, messages in (("since=0", everything),
                                    ("since=2&epoch=%d" % epoch, everything[2:]),
                                    ("since=2&epoch=1", everything)):
                conn.request("GET", "/sub/%s?%s" % (ident, query))
                resp = conn.getresponse()
                assert resp.status == 200
                assert json.loads(resp.read()) == {
                    "id": ident, "messages": messages, "last": last, "epoch": epoch}, query
    finally:
        for conn in conns:
            conn.close()
    return seen


def test_an_ids_epoch_is_the_same_on_every_worker_and_kept_by_a_reload(server_factory):
    server = server_factory(workers=2)
    ident = uid("reloaded")
    before = time.time()
    assert [server.pub(ident, "m%d" % i) for i in (1, 2, 3)] == [1, 2, 3]
    after = time.time()
    epoch = id_epoch(server, ident)
    # Stamped in ms when the first publish created the id (the first id of its partition).
    assert before * 1000 - 1 <= epoch <= after * 1000 + 1, (before, epoch, after)
    assert epochs_on_every_worker(server, ident, 3) == {epoch}

    # A reload replaces every worker; the shared memory, its seqs and so the epochs stay.
    old_pids = server.worker_pids()
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload: done" in server.stderr(), timeout=30, message="the reload")
    new_pids = server.worker_pids()
    assert all(new_pids) and not set(new_pids) & set(old_pids)
    assert epochs_on_every_worker(server, ident, 3) == {epoch}
    assert poll(server, "/sub/%s?since=2&epoch=%d" % (ident, epoch)) == {
        "id": ident, "messages": [{"seq": 3, "data": "m3"}], "last": 3, "epoch": epoch}
    assert ws_frames(server, "/ws/%s?since=2&epoch=%d" % (ident, epoch), 1) == [
        {"id": ident, "seq": 3, "data": "m3", "epoch": epoch}]
    assert sse(server, "/sse/%s?since=2&epoch=%d" % (ident, epoch), 1) == (epoch, [(3, "m3")])
    # Published to after the reload: the same epoch, seqs going on.
    assert server.pub(ident, "m4") == 4
    assert id_epoch(server, ident) == epoch
    assert "Traceback" not in server.stderr()


# -- what is refused ------------------------------------------------------------------------

def ws_upgrade_status(server, path):
    with socket.create_connection(("127.0.0.1", server.client), timeout=10) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n" % path.encode())
        status, _, body = read_response(sock)
        return status, body


def test_an_epoch_that_is_not_a_whole_number_gets_400(server_factory):
    server = server_factory(workers=1)
    ident = uid("bad")
    server.pub(ident, "m1")
    many = "%s,other" % ident
    for value in ("x", "-1", "1.5", "1e3", "%C2%B2", "%201", "1" * 21):
        paths = ["/sub/%s?epoch=%s" % (ident, value), "/sse/%s?epoch=%s" % (ident, value),
                 "/sub/%s?epoch=%s" % (many, value), "/sse/%s?epoch=%s" % (many, value)]
        for path in paths:
            status, _, body = server.request("GET", path, port=server.client)
            assert status == 400 and b"epoch" in body, (path, status, body)
        for path in ("/ws/%s?epoch=%s" % (ident, value), "/ws/%s?epoch=%s" % (many, value)):
            assert ws_upgrade_status(server, path)[0] == 400, path
    # One id: an empty epoch is no number either.
    status, _, body = server.request("GET", "/sub/%s?epoch=" % ident, port=server.client)
    assert status == 400 and b"epoch" in body, body
    # Pairs: id:number of the subscription's ids, each number whole.
    for value in ("%s:x" % ident, "zz:1", "%s:1,zz:1" % ident, "%s:" % ident, ":1",
                  "%s:-1" % ident, "%s:1.5" % ident, "%s:%s" % (ident, "1" * 21),
                  "%s:%%C2%%B2" % ident, "%s:1," % ident, "other:1:2", "%s=1" % ident):
        for path in ("/sub/%s?epoch=%s" % (many, value), "/sse/%s?epoch=%s" % (many, value)):
            status, _, body = server.request("GET", path, port=server.client)
            assert status == 400 and b"epoch" in body, (path, status, body)
        assert ws_upgrade_status(server, "/ws/%s?epoch=%s" % (many, value))[0] == 400, value
    # Twenty digits is a number (of no life of the id): everything buffered.
    assert poll(server, "/sub/%s?since=1&epoch=%s" % (ident, "9" * 20))["messages"] == [
        {"seq": 1, "data": "m1"}]
    doc = poll(server, "/sub/%s?since=%s:1&epoch=%s:%s&timeout=1" % (many, ident, ident, "9" * 20))
    assert doc["messages"] == [{"id": ident, "seq": 1, "data": "m1"}]


def test_an_empty_epoch_gets_400_with_several_ids_as_with_one(server_factory):
    """``epoch=`` is no number and no pairs: refused for one id, and for several ids before
    per-id epochs; since 3ee840d several ids take it as no epoch (200)."""
    server = server_factory(workers=1)
    ident = uid("empty")
    server.pub(ident, "m1")
    for path in ("/sub/%s?epoch=", "/sub/%s,other?epoch=", "/sse/%s,other?epoch="):
        status, _, body = server.request("GET", path % ident, port=server.client)
        assert status == 400 and b"epoch" in body, (path, status, body)
    assert ws_upgrade_status(server, "/ws/%s,other?epoch=" % ident)[0] == 400

"""Cluster mode (``--redis``), whole servers on real sockets against real redis-server processes.

Two MegaComet nodes (two megacomet.py process trees, 2 workers each) share one Redis (or a
Redis Cluster of 3 masters + 3 replicas).  What is checked, each point against both nodes:

* a publish on either node is answered 202 only once Redis stored it: one seq per id for
  the whole cluster (``mc:{id}`` hash: e, s), the stream ``mc:{id}:s`` (entries
  ``<seq>-0``, fields d and t) and its TTL; the epoch every answer names is Redis's;
* ``Idempotency-Key`` (single publishes) and ``"key"`` (batch lines): a retry on either node
  answers the same seq and stores and delivers nothing again; a batch is pipelined (few
  round trips for many commands);
* a subscriber on node B gets what node A publishes, live, in order, exactly once, on every
  transport: long-poll, JSONP, ``/<id>.js`` compat, EventSource (``Last-Event-ID``),
  WebSocket, several ids on one connection, signed subscriptions;
* a client that moves from one node to the other with its cursor gets exactly what it missed
  (from the node's cache, or from the Redis stream when the cache no longer holds it);
* the compat cursor (``/<id>.js``) is each node's own (see the test for what that means);
* pub/sub connections killed by Redis, Redis down, Redis paused, Redis flushed: 503 with
  ``Retry-After`` for publishes, ``/health`` 503 ``redis unreachable``, the redis_* counters
  in ``/stats`` and ``/metrics``, a new epoch at seq 1 after the data was lost (clients are
  told to start over), nothing confirmed lost and nothing delivered twice;
* a Redis Cluster: ids landing on each of the three masters (SPUBLISH/SSUBSCRIBE);
* the command line: ``--redis`` without hiredis, bad URLs, ``MEGACOMET_REDIS_URL`` and
  ``--redis-url-file``.

Everything a subscriber receives is checked against a small model (``Model``): per id, the
confirmed (seq, data); every subscriber's messages must be a contiguous run of it (in order,
no duplicate, no gap).

One Redis and two nodes serve the tests of this module that do not disturb them (each test
uses ids of its own); tests that stop, pause or flush Redis in ways that would disturb
others start their own.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from websockets.sync.client import connect as ws_connect

from conftest import ROOT, Server, is_closed, read_response, wait_for
from redisfixtures import redis_cluster, redis_standalone, require_redis  # noqa: F401 (fixtures)
from test_bad_input import uid
from test_streams import Stream

import redislab
from megacomet import signing

try:
    from megacomet.redislink import key_slot
except ImportError:                       # no hiredis: require_redis() skips every Redis test
    key_slot = None

MEGACOMET = os.path.join(ROOT, "megacomet.py")
WAIT = 10.0                               # the longest any one wait below may take


# -- the model ------------------------------------------------------------------------------

class Model:
    """Per id, the (seq, data) of its current life that a publisher saw confirmed."""

    def __init__(self):
        self.lives = {}
        self.lock = threading.Lock()

    def confirm(self, ident, seq, data):
        with self.lock:
            life = self.lives.setdefault(ident, {})
            assert life.get(seq, data) == data, (
                "%s: seq %d confirmed for %r and for %r" % (ident, seq, life[seq], data))
            life[seq] = data

    def new_life(self, ident):
        with self.lock:
            self.lives[ident] = {}

    def history(self, ident):
        """The id's confirmed messages, which must be exactly seqs 1..n."""
        with self.lock:
            life = dict(self.lives.get(ident, {}))
        seqs = sorted(life)
        assert seqs == list(range(1, len(seqs) + 1)), "%s: confirmed seqs %s" % (ident, seqs)
        return [(seq, life[seq]) for seq in seqs]

    def last(self, ident):
        return len(self.history(ident))

    def top(self, ident):
        """The highest seq confirmed so far (publishes may still be in flight below it)."""
        with self.lock:
            return max(self.lives.get(ident, {0: None}))

    def check(self, ident, received, after=None, through=None):
        """``received`` ([(seq, data)]) is a contiguous run of the id's history: in order, no
        duplicate, no gap, nothing unconfirmed; starting right after ``after`` and ending at
        ``through`` when they are given."""
        history = self.history(ident)
        if after is not None and through is not None and through == after:
            assert received == [], (ident, received)
            return
        assert received, "%s: nothing received (expected %s..%s)" % (ident, after, through)
        first = received[0][0]
        if after is not None:
            assert first == after + 1, "%s: begins at %d, not after %d: %s" % (
                ident, first, after, received)
        assert 1 <= first <= len(history), "%s: seq %d was never confirmed" % (ident, first)
        run = history[first - 1:first - 1 + len(received)]
        assert received == run, "%s: received %s\n  but confirmed %s" % (ident, received, run)
        if through is not None:
            assert received[-1][0] == through, "%s: ends at %d, not %d" % (
                ident, received[-1][0], through)


# -- talking to the nodes -------------------------------------------------------------------

def publish(node, ident, data, model=None, key=None):
    """POST /pub/<id> (with an Idempotency-Key if given): 202 and its seq."""
    return publish_doc(node, ident, data, model, key)["seq"]


def publish_doc(node, ident, data, model=None, key=None):
    """POST /pub/<id>: 202 and its answer, {"id", "seq", "subscribers"}."""
    headers = {"Idempotency-Key": key} if key is not None else {}
    status, _, body = node.request("POST", "/pub/" + ident, data.encode(), headers=headers)
    assert status == 202, (status, body)
    doc = json.loads(body)
    assert set(doc) == {"id", "seq", "subscribers"} and doc["id"] == ident, doc
    if model is not None:
        model.confirm(ident, doc["seq"], data)
    return doc


def batch(node, lines):
    """POST /pub with NDJSON lines (dicts); (status, answer)."""
    body = "\n".join(json.dumps(line) for line in lines).encode()
    status, headers, reply = node.request("POST", "/pub", body)
    return status, headers, json.loads(reply)


def poll(node, path, status=200):
    got, _, body = node.request("GET", path, port=node.client, timeout=WAIT + 5)
    assert got == status, (path, got, body)
    return json.loads(body) if status == 200 else body


def messages(doc):
    return [(m["seq"], m["data"]) for m in doc["messages"]]


def presence(node, ident):
    status, _, body = node.request("GET", "/presence/" + ident)
    assert status == 200, (status, body)
    return json.loads(body)["subscribers"]


def health(node):
    status, _, body = node.request("GET", "/health")
    return status, body


def totals(node):
    return node.stats()["totals"]


def log_problems(node, start=0):
    return [line for line in node.stderr()[start:].splitlines()
            if "internal error" in line or "Traceback" in line]


class Held:
    """A request sent on a raw socket whose answer is read later (a held long-poll)."""

    def __init__(self, node, path):
        self.path = path
        self.sock = socket.create_connection(("127.0.0.1", node.client), timeout=WAIT)
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: test\r\n\r\n" % path).encode())

    def answer(self, timeout=WAIT):
        try:
            status, _, body = read_response(self.sock, timeout)
        finally:
            self.sock.close()
        return status, body

    def json(self, timeout=WAIT):
        status, body = self.answer(timeout)
        assert status == 200, (self.path, status, body)
        return json.loads(body)

    def close(self):
        self.sock.close()


def sse_open(node, path, headers=()):
    stream = Stream(node, path, list(headers), timeout=WAIT)
    assert stream.status == 200, (path, stream.status)
    assert stream.event() == [("retry", "2000")]
    return stream


def sse_epoch(stream):
    """The next block of an EventSource stream, which must be its epoch event."""
    fields = stream.event(WAIT)
    assert fields[0] == ("event", "epoch"), fields
    text = fields[1][1]
    return int(text) if text.isdigit() else json.loads(text)


def sse_messages(stream, n, timeout=WAIT):
    """n messages of a stream of one id: [(seq, data)]; the epoch events met: [epoch]."""
    got, epochs = [], []
    while len(got) < n:
        fields = stream.event(timeout)
        if fields[0] == ("event", "epoch"):
            epochs.append(int(fields[1][1]))
        elif fields[0][0] == "id":
            got.append((int(fields[0][1]), "\n".join(v for k, v in fields if k == "data")))
    return got, epochs


def sse_many(stream, n):
    """n messages of a stream of several ids: [(event id, {"id", "seq", "data"})]."""
    got = []
    while len(got) < n:
        fields = stream.event(WAIT)
        if fields[0][0] == "id":
            got.append((fields[0][1], json.loads(fields[1][1])))
    return got


def ws_open(node, path):
    ws = ws_connect("ws://127.0.0.1:%d%s" % (node.client, path), open_timeout=WAIT)
    ws.__enter__()                         # (closed by the test: ws.close())
    return ws


def ws_messages(ws, n):
    return [json.loads(ws.recv(timeout=WAIT)) for _ in range(n)]


def by_id(frames):
    """{id: [(seq, data)]} of message dicts (frames, multiplexed events, poll messages)."""
    got = {}
    for m in frames:
        got.setdefault(m["id"], []).append((m["seq"], m["data"]))
    return got


def follow(nodes, ident, since, epoch, through, model):
    """Long-poll ``ident`` until seq ``through``, each poll on the next node of ``nodes``
    (a client moving around); checks every answer against the model, returns the epoch."""
    got = []
    turn = 0
    start = since
    deadline = time.monotonic() + WAIT
    while since < through:
        assert time.monotonic() < deadline, (ident, since, through, got)
        node = nodes[turn % len(nodes)]
        turn += 1
        doc = poll(node, "/sub/%s?since=%d&epoch=%d&timeout=2" % (ident, since, epoch))
        assert doc["epoch"] in (epoch, 0) or not epoch, doc
        if doc["epoch"]:
            epoch = doc["epoch"]
        news = messages(doc)
        if news:
            model.check(ident, news, after=since)
        got += news
        since = max(since, doc["last"])
    model.check(ident, got, after=start, through=max(start, through))
    return epoch


def numsub(redis, channel):
    """Subscribers of a channel on a single Redis (PUBLISH/SUBSCRIBE)."""
    return redis.command("PUBSUB", "NUMSUB", channel)[1]


def held_by(node, ident, holders, timeout=2.0):
    """Wait (at most ``timeout``, without failing) until the node counts ``holders``
    subscriptions of ident.  Only a hint that the requests arrived: a count can be lost
    (see test_presence_counts_a_subscriber_whose_home_waited_for_redis)."""
    deadline = time.monotonic() + timeout
    while presence(node, ident) < holders and time.monotonic() < deadline:
        time.sleep(0.05)


def joined(pair, ident, node, holders):
    """Wait until ``node`` holds ``holders`` subscriptions of ident and a node joined its
    channel in Redis: what the node's home caches from then on comes live from pub/sub."""
    held_by(node, ident, holders)
    wait_node(node, lambda: pair.numsub("mc:{%s}" % ident) >= 1,
              "a node subscribed to mc:{%s}" % ident)
    time.sleep(0.05)                       # its stream read: one more round trip


def wait_node(node, predicate, message):
    """wait_for, and on a timeout the node's last log lines with the error."""
    try:
        return wait_for(predicate, WAIT, message=message)
    except AssertionError as e:
        raise AssertionError("%s\n  the node's log ends with:\n%s" % (e, node.stderr()[-3000:]))


def epoch_of(node, ident):
    doc = poll(node, "/sub/%s?since=0&timeout=1" % ident)
    assert doc["epoch"] > 0, doc
    return doc["epoch"]


def sign(secret, ids, ttl=600):
    return signing.query(secret, ids, ttl, time.time())


# An id's home worker is id_key(id) % workers, and id_key is Python's hash(), seeded per process
# tree: nodes whose homes a test must know run with this seed, and homes() asks a process
# with the same seed.
HASH_SEED = "20261207"


def seeded_env():
    return dict(os.environ, PYTHONHASHSEED=HASH_SEED)


def homes(idents, workers=2):
    """{id: its home worker} on a node of ``workers`` workers started with seeded_env()."""
    code = ("import json, sys; from megacomet.shmqueue import id_key; "
            "print(json.dumps([id_key(i.encode()) %% %d for i in sys.argv[1:]]))" % workers)
    done = subprocess.run([sys.executable, "-c", code, *idents], env=seeded_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=WAIT * 2)
    assert done.returncode == 0, done.stderr
    return dict(zip(idents, json.loads(done.stdout)))


def node_flags(urls, *extra):
    flags = []
    for url in urls:
        flags += ["--redis", url]
    return flags + [str(x) for x in extra]


# -- one Redis and two nodes for the tests that share them --------------------------------

class Pair:
    """Node ``a`` and node ``b`` sharing ``redis`` (a redislab.Standalone)."""

    def __init__(self, redis, a, b):
        self.redis, self.a, self.b = redis, a, b
        self.nodes = (a, b)

    def numsub(self, channel):
        return numsub(self.redis, channel)


SHARED_FLAGS = ("--shm-mb", 2, "--poll-timeout", 5)


@pytest.fixture(scope="module")
def shared():
    require_redis()
    with redislab.Standalone() as redis:
        nodes = []
        try:
            for _ in range(2):
                nodes.append(Server(*node_flags([redis.url], *SHARED_FLAGS), workers=2,
                                    env=seeded_env()).start())
            yield Pair(redis, *nodes)
        finally:
            stopping = [threading.Thread(target=node.stop) for node in nodes]   # at once
            for thread in stopping:
                thread.start()
            for thread in stopping:
                thread.join()


@pytest.fixture
def pair(shared):
    """The shared nodes, alive; a test fails on what they logged as internal errors."""
    for node in shared.nodes:
        assert node.proc.poll() is None, "a shared node exited:\n" + node.stderr()[-3000:]
    marks = [len(node.stderr()) for node in shared.nodes]
    yield shared
    problems = [line for node, mark in zip(shared.nodes, marks)
                for line in log_problems(node, mark)]
    assert not problems, "a node logged internal errors:\n" + "\n".join(problems[:5])


# -- publishing -----------------------------------------------------------------------------

def test_a_publish_is_answered_once_redis_stored_it_with_one_seq_and_epoch_for_all(pair):
    a, b, redis = pair.a, pair.b, pair.redis
    model = Model()
    x = uid("seq")
    before = time.time() * 1000
    for n in range(1, 7):
        node = (a, b)[n % 2]
        data = "m%d" % n if n != 3 else "m3: epoch:seq:data, ünïcödé\nand a second line"
        seq = publish(node, x, data, model)
        assert seq == n                                      # one counter, whichever node
        # Answered only once Redis has it: the stream holds it the moment the 202 is read.
        entries = redis.command("XRANGE", "mc:{%s}:s" % x, "-", "+")
        assert [e[0] for e in entries] == ["%d-0" % s for s in range(1, n + 1)]
        fields = dict(zip(entries[-1][1][::2], entries[-1][1][1::2]))
        assert set(fields) == {"d", "t"} and fields["d"] == data
        assert before - 5000 <= int(fields["t"]) <= time.time() * 1000 + 5000
    meta = redis.command("HGETALL", "mc:{%s}" % x)
    meta = dict(zip(meta[::2], meta[1::2]))
    assert set(meta) == {"e", "s"} and meta["s"] == "6"
    epoch = int(meta["e"])
    assert before - 5000 <= epoch <= time.time() * 1000 + 5000   # when the id's life began
    for key in ("mc:{%s}" % x, "mc:{%s}:s" % x):             # kept for --queue-ttl (60 s)
        assert 0 < redis.command("PTTL", key) <= 60000
    for node in (a, b):
        doc = poll(node, "/sub/%s?since=0&timeout=1" % x)
        assert doc["epoch"] == epoch and doc["last"] == 6
        model.check(x, messages(doc), after=0, through=6)
        doc = poll(node, "/sub/%s?since=4&epoch=%d&timeout=1" % (x, epoch))
        model.check(x, messages(doc), after=4, through=6)


def test_an_idempotent_retry_on_either_node_stores_and_delivers_nothing_again(pair):
    a, b, redis = pair.a, pair.b, pair.redis
    model = Model()
    x = uid("idem")
    publish(a, x, "one", model)
    stream = sse_open(b, "/sse/" + x)                         # a subscriber on the other node
    try:
        assert sse_epoch(stream) > 0
        assert sse_messages(stream, 1)[0] == [(1, "one")]
        joined(pair, x, b, 1)
        seq = publish(a, x, "two", model, key="order-17")
        assert seq == 2
        for node in (a, b, a):                                # retries, on either node
            status, headers, body = node.request("POST", "/pub/" + x, b"two",
                                                 headers={"Idempotency-Key": "order-17"})
            assert status == 202 and json.loads(body)["seq"] == seq, (status, body)
        assert redis.command("XLEN", "mc:{%s}:s" % x) == 2
        assert redis.command("HGET", "mc:{%s}" % x, "s") == "2"
        assert publish(b, x, "three", model, key="order-18") == 3   # another key: stored
        assert publish(a, x, "four", model) == 4                     # no key: stored
        got, _ = sse_messages(stream, 3)
        model.check(x, got, after=1, through=4)               # "two" once, nothing repeated
    finally:
        stream.close()
    doc = poll(b, "/sub/%s?since=0&timeout=1" % x)
    model.check(x, messages(doc), after=0, through=4)
    status, _, body = a.request("POST", "/pub/" + x, b"five",
                                headers={"Idempotency-Key": "k" * 129})
    assert status == 400, (status, body)


def test_a_batch_is_pipelined_and_its_line_keys_store_each_message_once(pair):
    a, b, redis = pair.a, pair.b, pair.redis
    model = Model()
    x, y = uid("batch"), uid("batch")
    lines = [{"id": (x, y)[n % 2], "data": "b%d" % n} for n in range(200)]
    keyed = [{"id": x, "data": "k1", "key": "line-1"}, {"id": y, "data": "k2", "key": "line-2"},
             {"id": x, "data": "k3", "key": "line-3"}]
    before = totals(a)
    status, _, doc = batch(a, lines)
    after = totals(a)
    assert status == 202 and doc == {"published": 200, "errors": []}, doc
    assert after["redis_commands"] - before["redis_commands"] >= 200
    # Pipelined: many publishes per write (the links' pings count too, once a second each).
    assert after["redis_round_trips"] - before["redis_round_trips"] <= 40, (before, after)
    status, _, doc = batch(b, keyed + [{"id": x}, {"id": "bad id!", "data": "z"}])
    assert status == 202 and doc["published"] == 3, doc
    assert [e["line"] for e in doc["errors"]] == [4, 5], doc
    for node in (b, a):                                       # the same batch again
        status, _, doc = batch(node, keyed)
        assert status == 202 and doc == {"published": 3, "errors": []}, doc
    assert redis.command("HGET", "mc:{%s}" % x, "s") == "102"
    assert redis.command("HGET", "mc:{%s}" % y, "s") == "101"
    assert redis.command("XLEN", "mc:{%s}:s" % x) == 64       # capped at --max-queued
    # The batch answer names no seqs: the order within an id is the lines' order.
    for ident, sent in ((x, [l["data"] for l in lines if l["id"] == x] + ["k1", "k3"]),
                        (y, [l["data"] for l in lines if l["id"] == y] + ["k2"])):
        for seq, data in enumerate(sent, 1):
            model.confirm(ident, seq, data)
        for node in (a, b):
            doc = poll(node, "/sub/%s?since=0&timeout=1" % ident)
            # --max-queued 64: the last 64 of them, the newest last
            model.check(ident, messages(doc), through=len(sent))
            assert len(doc["messages"]) == 64


# -- subscribers on the other node --------------------------------------------------------

def test_every_transport_on_one_node_gets_what_the_other_publishes_live(pair):
    a, b = pair.a, pair.b
    model = Model()
    x, y = uid("live"), uid("live")
    publish(a, x, "x1", model)
    publish(a, y, "y1", model)
    ex, ey = epoch_of(a, x), epoch_of(a, y)
    polls = [Held(b, "/sub/%s?since=1&epoch=%d&timeout=10" % (x, ex)),
             Held(b, "/sub/%s?since=1&epoch=%d&timeout=10&callback=onPush" % (x, ex)),
             Held(b, "/sub/%s,%s?since=%s:1,%s:1&epoch=%s:%d,%s:%d&timeout=10"
                  % (x, y, x, y, x, ex, y, ey))]
    sse = sse_open(b, "/sse/" + x, ["Last-Event-ID: 1"])
    sse_mux = sse_open(b, "/sse/%s,%s" % (x, y), ["Last-Event-ID: %s:1,%s:1" % (x, y)])
    ws = ws_open(b, "/ws/%s?since=1&epoch=%d" % (x, ex))
    ws_mux = ws_open(b, "/ws/%s,%s?since=%s:1,%s:1" % (x, y, x, y))
    try:
        assert sse_epoch(sse) == ex
        assert sse_epoch(sse_mux) == {x: ex, y: ey}
        joined(pair, x, b, 7)
        joined(pair, y, b, 3)
        # A publish's "subscribers" are those of the node it was made on (none on A here).
        assert publish_doc(a, x, "x2", model)["subscribers"] == 0
        assert publish_doc(b, y, "y2", model)["subscribers"] == 3
        publish(a, x, "x3", model)
        # Long-poll, JSONP, several ids: the first answer, then polls on B until the end.
        doc = polls[0].json()
        assert doc["epoch"] == ex and doc["id"] == x
        model.check(x, messages(doc), after=1)
        follow([b], x, doc["last"], ex, 3, model)
        status, body = polls[1].answer()
        assert status == 200 and body.startswith(b"/**/onPush(") and body.endswith(b");"), body
        doc = json.loads(body[len(b"/**/onPush("):-2])
        assert doc["epoch"] == ex
        model.check(x, messages(doc), after=1)
        doc = polls[2].json()
        assert doc["epoch"] == {x: ex, y: ey}
        for ident, got in by_id(doc["messages"]).items():
            model.check(ident, got, after=1)
        # Streams: every message once, in order, live.
        got, epochs = sse_messages(sse, 2)
        assert epochs == []
        model.check(x, got, after=1, through=3)
        events = sse_many(sse_mux, 3)
        for ident, got in by_id([m for _, m in events]).items():
            model.check(ident, got, after=1, through=model.last(ident))
        assert events[-1][0] in ("%s:3,%s:2" % (x, y), "%s:2,%s:3" % (y, x))   # every cursor
        frames = ws_messages(ws, 2)
        assert all(f["epoch"] == ex and f["id"] == x for f in frames)
        model.check(x, [(f["seq"], f["data"]) for f in frames], after=1, through=3)
        frames = ws_messages(ws_mux, 3)
        assert all(f["epoch"] == {x: ex, y: ey}[f["id"]] for f in frames)
        for ident, got in by_id(frames).items():
            model.check(ident, got, after=1, through=model.last(ident))
        # And what B publishes reaches A's streams as well.
        stream_a = sse_open(a, "/sse/%s?since=3&epoch=%d" % (x, ex))
        try:
            assert sse_epoch(stream_a) == ex
            joined(pair, x, a, 1)
            publish(b, x, "x4", model)
            model.check(x, sse_messages(stream_a, 1)[0], after=3, through=4)
            model.check(x, sse_messages(sse, 1)[0], after=3, through=4)
        finally:
            stream_a.close()
    finally:
        for held in polls:
            held.close()
        for stream in (sse, sse_mux):
            stream.close()
        ws.close()
        ws_mux.close()


def test_a_client_moving_between_nodes_gets_exactly_what_it_missed(pair):
    a, b = pair.a, pair.b
    model = Model()
    x, y = uid("move"), uid("move")
    for n in range(1, 4):
        publish(a, x, "m%d" % n, model)
    doc = poll(a, "/sub/%s?since=0&timeout=1" % x)
    model.check(x, messages(doc), after=0, through=3)
    epoch = doc["epoch"]
    for n in range(4, 8):
        publish(a, x, "m%d" % n, model)
    # B never had x: what it missed comes from the Redis stream.
    doc = poll(b, "/sub/%s?since=3&epoch=%d&timeout=1" % (x, epoch))
    assert doc["epoch"] == epoch
    model.check(x, messages(doc), after=3, through=7)
    for n in range(8, 10):
        publish(b, x, "m%d" % n, model)
    # Back to A (its channel still joined: from its cache), and back and forth.
    doc = poll(a, "/sub/%s?since=7&epoch=%d&timeout=1" % (x, epoch))
    model.check(x, messages(doc), after=7, through=9)
    # EventSource: read on A, reconnect on B with Last-Event-ID.
    stream = sse_open(a, "/sse/%s?since=5&epoch=%d" % (x, epoch))
    try:
        assert sse_epoch(stream) == epoch
        model.check(x, sse_messages(stream, 4)[0], after=5, through=9)
    finally:
        stream.close()
    for n in range(10, 13):
        publish(a, x, "m%d" % n, model)
    stream = sse_open(b, "/sse/" + x, ["Last-Event-ID: 9"])
    try:
        assert sse_epoch(stream) == epoch
        model.check(x, sse_messages(stream, 3)[0], after=9, through=12)
        joined(pair, x, b, 1)
        publish(a, x, "m13", model)                       # and live after that, nothing else
        model.check(x, sse_messages(stream, 1)[0], after=12, through=13)
    finally:
        stream.close()
    # WebSocket with since, on the node it did not publish on.
    publish(b, x, "m14", model)
    with ws_open(a, "/ws/%s?since=11&epoch=%d" % (x, epoch)) as ws:
        frames = ws_messages(ws, 3)
        model.check(x, [(f["seq"], f["data"]) for f in frames], after=11, through=14)
    # Several ids, cursors as id:seq pairs; y is new to both nodes.
    for n in range(1, 4):
        publish(b, y, "y%d" % n, model)
    doc = poll(a, "/sub/%s,%s?since=%s:12,%s:1&epoch=%s:%d&timeout=1" % (x, y, x, y, x, epoch))
    got = by_id(doc["messages"])
    model.check(x, got[x], after=12, through=14)
    model.check(y, got[y], after=1, through=3)
    assert doc["last"] == {x: 14, y: 3}
    # A client that keeps moving, one poll per node, while both publish.
    for n in range(15, 25):
        publish((a, b)[n % 2], x, "m%d" % n, model)
    follow([b, a], x, 14, epoch, 24, model)


def test_a_cursor_older_than_a_nodes_cache_is_answered_from_the_stream(pair):
    """A node's cache loses an id's older messages before Redis does (here: its partition's
    2 MiB log overwritten by another id); a client with a cursor older than the cache gets
    the rest from the Redis stream, then the cache's, in order, once."""
    a, b = pair.a, pair.b
    model = Model()
    x = uid("old")
    candidates = homes([x] + [uid("fill") for _ in range(20)])
    filler = next(f for f, home in candidates.items() if f != x and home == candidates[x])
    for n in range(1, 6):
        publish(a, x, "o%d" % n, model)
    stream = sse_open(b, "/sse/" + x)                         # B caches x, and keeps it
    filler_stream = sse_open(b, "/sse/" + filler)             # ... and the filler
    try:
        assert sse_epoch(stream) > 0
        model.check(x, sse_messages(stream, 5)[0], after=0, through=5)
        joined(pair, filler, b, 1)
        big = "f" * 60000
        for n in range(3):                                    # 36 x 60 kB through B's cache
            status, _, doc = batch(a, [{"id": filler, "data": big}] * 12)
            assert status == 202 and doc["published"] == 12, doc
            got, _ = sse_messages(filler_stream, 12)          # (read: not a slow reader)
            assert [seq for seq, _ in got] == list(range(12 * n + 1, 12 * n + 13))
        epoch = epoch_of(a, x)
        status, _, info = b.request("GET", "/info/" + x)
        info = json.loads(info)
        assert info["buffered"] == 0 and info["last"] == 5, info    # B's cache: none left
        doc = poll(b, "/sub/%s?since=2&epoch=%d&timeout=1" % (x, epoch))
        model.check(x, messages(doc), after=2, through=5)
        publish(a, x, "o6", model)
        model.check(x, sse_messages(stream, 1)[0], after=5, through=6)
        doc = poll(b, "/sub/%s?since=0&epoch=%d&timeout=1" % (x, epoch))
        model.check(x, messages(doc), after=0, through=6)
    finally:
        stream.close()
        filler_stream.close()


def test_binary_protocol_publishes_reach_the_other_nodes_subscribers(pair):
    """The original's binary frames (fire-and-forget, no answer): published through Redis in
    the order sent, one seq each."""
    a, b, redis = pair.a, pair.b, pair.redis
    x = uid("binary")
    stream = sse_open(b, "/sse/" + x)
    try:
        joined(pair, x, b, 1)
        with socket.create_connection(("127.0.0.1", a.app), timeout=WAIT) as sock:
            sock.sendall(b"".join(b"\x02%s\x00bin %d\x00" % (x.encode(), n)
                                  for n in range(1, 21)) + b"\x01")
            wait_for(lambda: redis.command("HGET", "mc:{%s}" % x, "s") == "20", WAIT,
                     message="20 binary publishes stored")
        got, epochs = sse_messages(stream, 20)
        assert epochs == [int(redis.command("HGET", "mc:{%s}" % x, "e"))]
        assert got == [(n, "bin %d" % n) for n in range(1, 21)]
    finally:
        stream.close()


def test_compat_polls_keep_a_cursor_of_their_own_on_each_node(pair):
    """The original's ``/<id>.js`` gives each message to one compat reader; in cluster mode
    that cursor is kept by each node's cache: every node hands each message to one compat
    reader of its own (two nodes: each message is read twice in all, once per node)."""
    a, b = pair.a, pair.b
    model = Model()
    x = uid("compat")
    publish(a, x, "c1", model)
    publish(a, x, "c2", model)

    def compat(node):
        status, headers, body = node.request("GET", "/%s.js" % x, port=node.client, timeout=WAIT)
        assert status == 200 and headers["Content-Type"].startswith("application/javascript")
        return body.decode()

    assert [compat(b), compat(b)] == ["c1", "c2"]
    assert compat(a) == "c1"                               # A's cursor is A's own
    held = Held(b, "/%s.js" % x)                           # held: nothing new for B's readers
    held_by(b, x, 1)                                       # (the compat poll held)
    publish(a, x, "c3", model)
    status, body = held.answer()
    assert (status, body) == (200, b"c3")
    assert [compat(a), compat(a)] == ["c2", "c3"]
    # /sub is not affected by the compat readers on either node.
    model.check(x, messages(poll(b, "/sub/%s?since=0&timeout=1" % x)), after=0, through=3)


# -- Redis losing our connections, or everything ------------------------------------------

def test_pubsub_connections_killed_by_redis_are_joined_again_losing_nothing(pair):
    a, b, redis = pair.a, pair.b, pair.redis
    model = Model()
    x = uid("kill")
    publish(a, x, "k1", model)
    stream = sse_open(b, "/sse/" + x)
    ws = ws_open(b, "/ws/%s?since=1" % x)
    try:
        assert sse_epoch(stream) > 0
        joined(pair, x, b, 2)
        before = totals(b)
        killed = redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        assert killed >= 1
        for n in range(2, 12):                             # while B joins again
            publish((a, b)[n % 2], x, "k%d" % n, model)
            time.sleep(0.02)
        got, _ = sse_messages(stream, 11)
        model.check(x, got, after=0, through=11)
        frames = ws_messages(ws, 10)
        model.check(x, [(f["seq"], f["data"]) for f in frames], after=1, through=11)
        wait_for(lambda: numsub(redis, "mc:{%s}" % x) >= 1, WAIT, message="joined again")
        publish(a, x, "k12", model)
        model.check(x, sse_messages(stream, 1)[0], after=11, through=12)
        after = totals(b)
        assert after["redis_reconnects"] > before["redis_reconnects"], (before, after)
        assert after["redis_resubscribes"] > before["redis_resubscribes"], (before, after)
        for node in (a, b):
            assert health(node) == (200, b"ok\n")
    finally:
        stream.close()
        ws.close()


def test_a_subscription_during_the_channel_linger_after_its_cache_was_forgotten_gets_messages(pair):
    """An id nobody has published to yet: a poll on B times out, and B forgets the empty id
    a moment later, while B's home stays on its channel for LINGER (5 s).  A subscriber that
    comes back to B within that time must still get what A publishes next."""
    a, b = pair.a, pair.b
    model = Model()
    x = uid("linger")
    doc = poll(b, "/sub/%s?since=0&timeout=1" % x)
    assert doc["messages"] == [] and doc["last"] == 0
    time.sleep(1.0)                                        # B's counts fall, the id is forgotten
    held = Held(b, "/sub/%s?since=0&timeout=3" % x)
    stream = sse_open(b, "/sse/" + x)
    try:
        time.sleep(0.5)                                    # held (registered or not)
        publish(a, x, "hello", model)
        started = time.monotonic()
        doc = held.json()
        model.check(x, messages(doc), after=0, through=1)
        assert time.monotonic() - started < 2, "the poll was answered by its timeout only"
        got, _ = sse_messages(stream, 1, timeout=1)
        model.check(x, got, after=0, through=1)
    finally:
        held.close()
        stream.close()


def test_concurrent_publishers_on_both_nodes_and_moving_subscribers_match_the_model(pair):
    a, b = pair.a, pair.b
    model = Model()
    ids = [uid("load") for _ in range(3)]
    for ident in ids:
        publish(a, ident, "start", model)
    epochs = {ident: epoch_of(b, ident) for ident in ids}
    streams = {(ident, node): sse_open(node, "/sse/" + ident) for ident in ids for node in (a, b)}
    sockets = {ident: ws_open(b, "/ws/" + ident) for ident in ids}
    errors = []
    received = {ident: [] for ident in ids}
    replays = []                           # answers that began at or below the poll's since
    stop = threading.Event()

    def publisher(node, number):
        rng = random.Random(number)
        try:
            for n in range(30):
                ident = rng.choice(ids)
                publish(node, ident, "p%d-%d" % (number, n), model,
                        key="p%d-%d" % (number, n) if n % 3 == 0 else None)
        except Exception as e:                             # reported below
            errors.append(e)

    def mover(ident):
        since, epoch, turn = 0, epochs[ident], 0
        try:
            while not stop.is_set() or since < model.top(ident):
                node = (a, b)[turn % 2]
                turn += 1
                doc = poll(node, "/sub/%s?since=%d&epoch=%d&timeout=1" % (ident, since, epoch))
                assert doc["epoch"] == epoch, doc
                news = messages(doc)
                if news and news[0][0] <= since:
                    replays.append((ident, since, news[0][0], doc["last"]))
                received[ident] += news
                since = max(since, doc["last"])
        except Exception as e:
            errors.append(e)

    try:
        for stream in streams.values():
            assert sse_epoch(stream) > 0
        for ident in ids:
            joined(pair, ident, a, 1)
            joined(pair, ident, b, 2)
        threads = [threading.Thread(target=publisher, args=(node, n))
                   for n, node in enumerate((a, b, a, b))]
        movers = [threading.Thread(target=mover, args=(ident,)) for ident in ids]
        for t in threads + movers:
            t.start()
        for t in threads:
            t.join(WAIT * 3)
        stop.set()
        for t in movers:
            t.join(WAIT * 3)
        assert not any(t.is_alive() for t in threads + movers), "a client thread is stuck"
        assert not errors, errors
        for ident in ids:
            last = model.last(ident)
            for node in (a, b):
                got, _ = sse_messages(streams[ident, node], last)
                model.check(ident, got, after=0, through=last)
            frames = ws_messages(sockets[ident], last)
            model.check(ident, [(f["seq"], f["data"]) for f in frames], after=0, through=last)
        assert sum(model.last(ident) for ident in ids) == 3 + 4 * 30
        for ident in ids:                                  # the clients that moved
            try:
                model.check(ident, received[ident], after=0, through=model.last(ident))
            except AssertionError as e:
                raise AssertionError("%s\n  answers that began at or below their since "
                                     "(id, since, first seq, last): %s" % (e, replays))
    finally:
        stop.set()
        for stream in streams.values():
            stream.close()
        for ws in sockets.values():
            ws.close()


def test_redis_flushed_starts_ids_again_with_a_new_epoch_and_clients_start_over(pair):
    """FLUSHALL: Redis lost everything (as a restart without persistence).  The next publish
    begins a new life of the id at seq 1 with a new epoch; a client with the old epoch is
    told to start over (the answer's epoch differs, its messages are the new life's).
    (Last of the shared tests: it empties the shared Redis.)"""
    a, b, redis = pair.a, pair.b, pair.redis
    model = Model()
    x = uid("flush")
    for n in range(1, 4):
        publish(a, x, "old%d" % n, model)
    old = epoch_of(b, x)
    held = Held(b, "/sub/%s?since=3&epoch=%d&timeout=10" % (x, old))
    stream = sse_open(b, "/sse/%s?since=3&epoch=%d" % (x, old))
    ws = ws_open(b, "/ws/%s?since=3&epoch=%d" % (x, old))
    try:
        assert sse_epoch(stream) == old
        joined(pair, x, b, 3)
        assert redis.command("FLUSHALL") == "OK"
        model.new_life(x)
        assert publish(a, x, "new1", model) == 1
        new = int(redis.command("HGET", "mc:{%s}" % x, "e"))
        assert new != old
        doc = held.json()
        assert doc["epoch"] == new and doc["last"] >= 1, doc
        model.check(x, messages(doc), after=0)
        got, epochs = sse_messages(stream, 1)
        assert epochs == [new]                             # told before the new life's message
        model.check(x, got, after=0, through=1)
        frame = ws_messages(ws, 1)[0]
        assert (frame["seq"], frame["data"], frame["epoch"]) == (1, "new1", new)
        publish(b, x, "new2", model)
        for node in (a, b):
            doc = poll(node, "/sub/%s?since=3&epoch=%d&timeout=1" % (x, old))
            assert doc["epoch"] == new
            model.check(x, messages(doc), after=0, through=2)
        model.check(x, sse_messages(stream, 1)[0], after=1, through=2)
    finally:
        held.close()
        stream.close()
        ws.close()


# -- Redis down or too slow: nodes of their own ----------------------------------------------

def two_nodes(server_factory, urls, *extra):
    return [server_factory(*node_flags(urls, *extra), workers=2, env=seeded_env())
            for _ in range(2)]


def test_redis_down_gets_503_unhealthy_and_counted_then_everything_resumes(redis_standalone,
                                                                          server_factory):
    redis = redis_standalone
    a, b = two_nodes(server_factory, [redis.url], "--redis-timeout", 0.5)
    model = Model()
    x = uid("down")
    publish(a, x, "d1", model)
    publish(b, x, "d2", model)
    old = epoch_of(a, x)
    stream = sse_open(b, "/sse/" + x)
    try:
        assert sse_epoch(stream) == old
        model.check(x, sse_messages(stream, 2)[0], after=0, through=2)
        held = Held(b, "/sub/%s?since=2&epoch=%d&timeout=20" % (x, old))
        held_by(b, x, 2)
        redis.kill()
        started = time.monotonic()
        for node in (a, b):
            status, headers, body = node.request("POST", "/pub/" + x, b"lost?")
            assert status == 503 and headers["Retry-After"] == "1", (status, headers, body)
            assert b"redis unavailable" in body and b"Idempotency-Key" in body, body
        assert time.monotonic() - started < 5
        for node in (a, b):
            wait_for(lambda: health(node) == (503, b"redis unreachable\n"), WAIT,
                     message="/health says redis unreachable")
            counted = totals(node)
            assert counted["redis_down"] >= 1 and counted["redis_reconnects"] >= 1, counted
            status, _, metrics = node.request("GET", "/metrics")
            assert status == 200
            for name in ("megacomet_redis_round_trips_total", "megacomet_redis_commands_total",
                         "megacomet_redis_reconnects_total", "megacomet_redis_resubscribes_total",
                         "megacomet_redis_gaps_filled_total", "megacomet_redis_unavailable_total",
                         "megacomet_redis_down"):
                assert ("\n%s{worker=" % name).encode() in metrics, name
            assert b"\nmegacomet_redis_down{worker=\"0\"} 1\n" in metrics \
                or b"\nmegacomet_redis_down{worker=\"1\"} 1\n" in metrics
        assert totals(a)["redis_unavailable"] >= 1 and totals(b)["redis_unavailable"] >= 1
        # Subscribers stay connected meanwhile.
        time.sleep(0.5)
        assert not is_closed(stream.sock) and not is_closed(held.sock)
        # Redis comes back empty (it saved nothing): the id begins a new life.
        redis.restart()
        for node in (a, b):
            wait_for(lambda: health(node) == (200, b"ok\n"), WAIT, message="healthy again")
        model.new_life(x)
        assert publish(a, x, "n1", model) == 1
        new = int(redis.command("HGET", "mc:{%s}" % x, "e"))
        assert new != old
        got, epochs = sse_messages(stream, 1)
        assert epochs == [new]
        model.check(x, got, after=0, through=1)
        doc = held.json()
        assert doc["epoch"] == new
        model.check(x, messages(doc), after=0, through=1)
        assert totals(b)["redis_resubscribes"] >= 1
        for node in (a, b):
            assert totals(node)["redis_down"] == 0
    finally:
        stream.close()


def pipelined(port, data):
    """Send requests at once on one connection (the last one says Connection: close) and
    return every answer, parsed from all the bytes read until the server closed:
    [(status, lower-cased headers, body)]."""
    raw = b""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    answers = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep and head.startswith(b"HTTP/1.1 "), raw[:200]
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        length = int(headers["content-length"])
        answers.append((int(lines[0].split()[1]), headers, rest[:length]))
        raw = rest[length:]
    return answers


def read_until(stream, through, timeout=WAIT):
    """A stream's messages up to seq ``through``, or fewer if the node closed it (then the
    client reconnects); [(seq, data)]."""
    got = []
    try:
        while not got or got[-1][0] < through:
            got += sse_messages(stream, 1, timeout)[0]
    except AssertionError as e:
        if "stream closed" not in str(e):
            raise
    finally:
        stream.close()
    return got


def test_a_worker_or_a_whole_node_killed_its_clients_resume_losing_nothing(redis_standalone,
                                                                         server_factory):
    """SIGKILL the home worker of an id on node B while A publishes: B's streams of the id
    on its other worker get everything once, the killed worker's reconnect with
    Last-Event-ID and get the rest.  Then SIGKILL node B altogether: its clients resume on
    A, and a node started afresh answers an old cursor from the stream (same epoch: it lives
    in Redis, not in a node's memory)."""
    redis = redis_standalone
    a, b = two_nodes(server_factory, [redis.url])
    model = Model()
    x = uid("killed")
    for n in range(1, 4):
        publish(a, x, "w%d" % n, model)
    epoch = epoch_of(a, x)
    streams = [sse_open(b, "/sse/%s?since=3&epoch=%d" % (x, epoch)) for _ in range(8)]
    for stream in streams:
        assert sse_epoch(stream) == epoch
    joined(Pair(redis, a, b), x, b, 8)
    home = homes([x])[x]
    victim = b.stats()["workers"][home]["pid"]
    os.kill(victim, signal.SIGKILL)
    for n in range(4, 9):                                   # while B's home is dead or new
        publish(a, x, "w%d" % n, model)
        time.sleep(0.05)
    wait_for(lambda: b.stats()["workers"][home]["pid"] not in (victim, 0, None)
             and health(b) == (200, b"ok\n"), WAIT, message="B's worker restarted")
    for n in range(9, 11):
        publish(a, x, "w%d" % n, model)
    survivors = 0
    for stream in streams:
        got = read_until(stream, 10)
        if got:
            model.check(x, got, after=3)
        if got and got[-1][0] == 10:
            survivors += 1
            continue
        since = got[-1][0] if got else 3
        again = sse_open(b, "/sse/" + x, ["Last-Event-ID: %d" % since])
        assert sse_epoch(again) == epoch
        model.check(x, read_until(again, 10), after=since, through=10)
    assert survivors >= 1, "no stream was on B's other worker (8 streams, 2 workers)"
    # Node B killed outright (supervisor first, so that nothing restarts, then its workers).
    streams = [sse_open(b, "/sse/%s?since=10&epoch=%d" % (x, epoch)) for _ in range(3)]
    for stream in streams:
        assert sse_epoch(stream) == epoch
    joined(Pair(redis, a, b), x, b, 3)
    publish(a, x, "w11", model)
    workers = b.worker_pids()
    b.proc.kill()
    b.proc.wait(timeout=WAIT)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    publish(a, x, "w12", model)
    for stream in streams:
        got = read_until(stream, 12)
        since = got[-1][0] if got else 10
        assert since < 12                                  # B died before w12
        again = sse_open(a, "/sse/" + x, ["Last-Event-ID: %d" % since])   # on to node A
        assert sse_epoch(again) == epoch
        model.check(x, got + read_until(again, 12), after=10, through=12)
    c = server_factory(*node_flags([redis.url]), workers=2)          # a node started afresh
    doc = poll(c, "/sub/%s?since=5&epoch=%d&timeout=1" % (x, epoch))
    assert doc["epoch"] == epoch
    model.check(x, messages(doc), after=5, through=12)


def pubsub_output_queued(redis):
    """Bytes Redis holds for its pub/sub clients that their sockets did not take yet."""
    return sum(int(field[5:]) for line in redis.command("CLIENT", "LIST", "TYPE", "pubsub")
               .splitlines() for field in line.split() if field.startswith("omem="))


def test_a_cursor_confirmed_on_one_node_before_the_other_heard_of_it_is_not_reset(
        redis_standalone, server_factory):
    """A client has seq 2 from node A (confirmed there) and polls node B with since=2
    before Redis's push of seq 2 reached B's home (here made certain: the home is stopped
    while a flood on another of its channels keeps seq 2 queued in Redis, and Redis is
    paused when the home goes on).  B's cache says last 1, but Redis says 2: the cursor must
    stand, not count as beyond the last seq (a reset, which replays the buffer under the
    same epoch: duplicates)."""
    redis = redis_standalone
    a, b = two_nodes(server_factory, [redis.url])
    model = Model()
    candidates = homes([uid("ahead") for _ in range(30)])
    x = next(iter(candidates))
    h = candidates[x]
    filler = next(f for f, home in candidates.items() if f != x and home == h)
    publish(a, x, "1", model)
    epoch = epoch_of(b, x)
    pair = Pair(redis, a, b)
    stream = sse_open(b, "/sse/%s?since=1&epoch=%d" % (x, epoch))
    polls = []
    try:
        assert sse_epoch(stream) == epoch
        joined(pair, x, b, 1)
        flood = sse_open(b, "/sse/" + filler)               # B's home joins the filler's
        joined(pair, filler, b, 1)                          # channel, and stays on it 5 s
        flood.close()
        home_pid = b.stats()["workers"][h]["pid"]
        os.kill(home_pid, signal.SIGSTOP)
        try:
            for _ in range(40):                             # until the kernel's buffers
                status, _, doc = batch(a, [{"id": filler, "data": "f" * 60000}] * 16)
                assert status == 202 and doc["published"] == 16, doc
                if pubsub_output_queued(redis) > 0:         # are full and Redis keeps the rest
                    break
            assert publish(a, x, "2", model) == 2           # queued behind the flood
            assert pubsub_output_queued(redis) > 0
            redis.pause()
            try:
                polls = [Held(b, "/sub/%s?since=2&epoch=%d&timeout=8" % (x, epoch))
                         for _ in range(4)]
                time.sleep(0.1)
                os.kill(home_pid, signal.SIGCONT)
                time.sleep(0.5)                             # the home reads its SUBs
            finally:
                redis.resume()
        finally:
            os.kill(home_pid, signal.SIGCONT)
        time.sleep(0.3)
        publish(a, x, "3", model)
        for held in polls:
            model.check(x, messages(held.json()), after=2, through=3)
        model.check(x, sse_messages(stream, 2)[0], after=1, through=3)
    finally:
        stream.close()
        for held in polls:
            held.close()


def test_presence_counts_a_subscriber_whose_home_waited_for_redis(redis_standalone,
                                                                  server_factory):
    """A subscription's home must join the id's channel and read its stream before it
    registers it; meanwhile (here: Redis paused for a few ticks) the holder reports the
    subscriber to the home.  Once Redis answers, the node must count it."""
    redis = redis_standalone
    a, b = two_nodes(server_factory, [redis.url])
    x = uid("count")
    publish(a, x, "c1")
    redis.pause()
    try:
        stream = sse_open(b, "/sse/" + x)
        time.sleep(0.6)                                     # the holder's reports go out
    finally:
        redis.resume()
    try:
        assert sse_messages(stream, 1)[0] == [(1, "c1")]
        held_by(b, x, 1)
        assert presence(b, x) == 1
        assert publish_doc(b, x, "c2")["subscribers"] == 1
    finally:
        stream.close()


def test_an_id_expired_in_redis_begins_a_new_life_and_its_keys_are_forgotten(redis_standalone,
                                                                             server_factory):
    """--queue-ttl 1: once an id has not been published to for that long, Redis forgets it
    (hash, stream, idempotency keys); the next publish is seq 1 of a new epoch, a retry of an
    old Idempotency-Key is stored again, and clients with the old epoch start over."""
    redis = redis_standalone
    a, b = two_nodes(server_factory, [redis.url], "--queue-ttl", 1)
    model = Model()
    x = uid("ttl")
    publish(a, x, "e1", model, key="once")
    publish(b, x, "e2", model)
    old = epoch_of(b, x)
    stream = sse_open(b, "/sse/%s?since=2&epoch=%d" % (x, old))
    try:
        assert sse_epoch(stream) == old
        joined(Pair(redis, a, b), x, b, 1)
        assert publish(b, x, "e1", key="once") == 1                  # within the TTL: kept
        assert 0 < redis.command("PTTL", "mc:{%s}" % x) <= 1000
        wait_for(lambda: redis.command("EXISTS", "mc:{%s}" % x, "mc:{%s}:s" % x) == 0,
                 WAIT, message="the id's keys expired")
        assert redis.command("KEYS", "mc:{%s}*" % x) == []           # the key "once" too
        model.new_life(x)
        assert publish(a, x, "e1", model, key="once") == 1           # stored again: new life
        new = int(redis.command("HGET", "mc:{%s}" % x, "e"))
        assert new != old
        got, epochs = sse_messages(stream, 1)
        assert epochs == [new]
        model.check(x, got, after=0, through=1)
        doc = poll(a, "/sub/%s?since=2&epoch=%d&timeout=1" % (x, old))
        assert doc["epoch"] == new
        model.check(x, messages(doc), after=0, through=1)
    finally:
        stream.close()


def test_every_publish_while_redis_is_unreachable_gets_its_503(server_factory):
    """Nothing listens where the nodes' Redis should be: every publish is refused with 503
    and Retry-After, a batch names every line to retry, a pipelining publisher gets an answer
    per request, a binary publisher is disconnected, /health says why."""
    require_redis()
    url = "redis://127.0.0.1:%d" % redislab.free_port()
    nodes = two_nodes(server_factory, [url])
    a, b = nodes
    marks = [len(node.stderr()) for node in nodes]
    try:
        for node in nodes:
            wait_for(lambda: health(node) == (503, b"redis unreachable\n"), WAIT,
                     message="/health says redis unreachable")
        x = uid("nowhere")
        status, headers, body = a.request("POST", "/pub/" + x, b"one")
        assert status == 503 and headers["Retry-After"] == "1", (status, body)
        for lines in (1, 3):
            status, headers, doc = batch(b, [{"id": x, "data": "l%d" % n} for n in range(lines)])
            assert status == 503 and headers["Retry-After"] == "1", (status, doc)
            assert doc == {"published": 0, "errors": [
                {"line": n, "error": "redis unavailable: retry"} for n in range(1, lines + 1)]}
        # A publisher that pipelines: one answer per request, in order, then the GET behind.
        request = ("POST /pub/%s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\n\r\nz"
                   % x).encode()
        answers = pipelined(a.app, request * 100 + b"GET /health HTTP/1.1\r\n"
                            b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert [status for status, _, _ in answers] == [503] * 101
        assert all(h["retry-after"] == "1" for _, h, _ in answers[:100])
        assert answers[-1][2] == b"redis unreachable\n"
        # A binary publisher: disconnected (its protocol has no other way to say it).
        with socket.create_connection(("127.0.0.1", b.app), timeout=WAIT) as sock:
            sock.sendall(b"\x02%s\x00bin\x00" % x.encode())
            assert sock.recv(16) == b""
        for node in nodes:
            assert totals(node)["redis_unavailable"] >= 1
    finally:
        problems = [line for node, mark in zip(nodes, marks) for line in log_problems(node, mark)]
        for node in nodes:                  # (stopped here: what they logged is checked here)
            node.stop()
    assert not problems, "a node logged internal errors:\n" + "\n".join(problems[:3])


def test_health_says_redis_unreachable_from_the_first_request(server_factory):
    require_redis()
    node = server_factory(*node_flags(["redis://127.0.0.1:%d" % redislab.free_port()]), workers=2)
    status, body = health(node)
    stats = node.stats()
    if stats["uptime_s"] >= 0.2:          # (the machine was too slow to ask that early)
        pytest.skip("the node was %.3f s old when asked" % stats["uptime_s"])
    assert (status, body) == (503, b"redis unreachable\n")
    assert [w["redis_down"] for w in stats["workers"]] == [1, 1]


def test_a_publish_redis_did_not_confirm_in_time_is_stored_once_by_its_retry(redis_standalone,
                                                                           server_factory):
    """Redis hangs (SIGSTOP): the publish gets 503 after --redis-timeout, but Redis may still
    run it once it wakes.  The retry with the same Idempotency-Key (on the other node, even)
    answers the one seq it has; the subscribers get the message once."""
    redis = redis_standalone
    a, b = two_nodes(server_factory, [redis.url], "--redis-timeout", 0.5)
    model = Model()
    x = uid("pause")
    publish(a, x, "p1", model)
    stream = sse_open(b, "/sse/" + x)
    try:
        assert sse_epoch(stream) > 0
        model.check(x, sse_messages(stream, 1)[0], after=0, through=1)
        joined(Pair(redis, a, b), x, b, 1)
        redis.pause()
        try:
            started = time.monotonic()
            status, headers, body = a.request("POST", "/pub/" + x, b"p2",
                                              headers={"Idempotency-Key": "pay-2"})
            assert status == 503 and headers["Retry-After"] == "1", (status, body)
            assert time.monotonic() - started < 5
            wait_for(lambda: health(a)[0] == 503, WAIT, message="a unhealthy")
        finally:
            redis.resume()
        for node in (a, b):
            wait_for(lambda: health(node) == (200, b"ok\n"), WAIT, message="healthy again")
        seq = publish(b, x, "p2", model, key="pay-2")
        assert seq == 2
        assert publish(a, x, "p2", model, key="pay-2") == seq
        assert redis.command("XLEN", "mc:{%s}:s" % x) == 2
        publish(a, x, "p3", model)
        got, _ = sse_messages(stream, 2)
        model.check(x, got, after=1, through=3)
        model.check(x, messages(poll(a, "/sub/%s?since=0&timeout=1" % x)), after=0, through=3)
    finally:
        stream.close()


def test_redis_url_from_the_environment_and_a_file_with_signed_subscriptions(redis_standalone,
                                                                           server_factory,
                                                                           tmp_path):
    redis = redis_standalone
    secret = b"cluster-test-secret"
    (tmp_path / "secret").write_bytes(secret)
    url = redis.url + "/2"                                            # database 2 (SELECT)
    (tmp_path / "redis-url").write_text("# the shared Redis\n\n%s\n" % url)
    env = dict(os.environ, MEGACOMET_REDIS_URL=url)
    a = server_factory("--secret-file", tmp_path / "secret", env=env, workers=2)
    env = {k: v for k, v in os.environ.items() if k != "MEGACOMET_REDIS_URL"}
    b = server_factory("--redis-url-file", tmp_path / "redis-url", "--secret-file",
                       tmp_path / "secret", env=env, workers=2)
    model = Model()
    x, y = uid("signed"), uid("signed")
    publish(a, x, "s1", model)
    assert redis.cli("HGET", "mc:{%s}" % x, "s", options=["-n", "2"]) == "1"   # the env's URL
    assert redis.command("EXISTS", "mc:{%s}" % x) == 0                # (not in database 0)
    assert poll(b, "/sub/%s?since=0&timeout=1" % x, status=403)
    assert poll(b, "/sub/%s?since=0&timeout=1&exp=%d&sig=00" % (x, time.time() + 60), status=403)
    doc = poll(b, "/sub/%s?since=0&timeout=1&%s" % (x, sign(secret, [x])))
    model.check(x, messages(doc), after=0, through=1)             # B's: the file's
    held = Held(b, "/sub/%s?since=1&timeout=10&%s" % (x, sign(secret, [x])))
    stream = sse_open(b, "/sse/%s,%s?%s" % (y, x, sign(secret, [x, y])))
    try:
        joined(Pair(redis, a, b), x, b, 2)
        publish(a, x, "s2", model)
        publish(a, y, "t1", model)
        model.check(x, messages(held.json()), after=1, through=2)
        events = sse_many(stream, 3)
        got = by_id([m for _, m in events])
        model.check(x, got[x], after=0, through=2)
        model.check(y, got[y], after=0, through=1)
        status, _, body = b.request("GET", "/%s.js?%s" % (x, sign(secret, [x])), port=b.client)
        assert (status, body) == (200, b"s1")
        assert poll(b, "/%s.js" % x, status=403)
    finally:
        held.close()
        stream.close()


# -- a Redis Cluster ----------------------------------------------------------------------------

def ids_on_every_master(cluster, per_master=2, prefix="slot"):
    """Ids whose keys land on each master of the cluster, ``per_master`` each: {id: master}."""
    ranges = cluster.slot_map()
    masters = {master.port: master for _, _, master, _ in ranges}
    found = {}
    wanted = {port: per_master for port in masters}
    while any(wanted.values()):
        ident = uid(prefix)
        slot = key_slot(ident.encode())
        port = next(m.port for start, end, m, _ in ranges if start <= slot <= end)
        if wanted[port]:
            wanted[port] -= 1
            found[ident] = masters[port]
    assert len({m.port for m in found.values()}) == 3
    return found


def shard_subscribed(master, ident):
    return master.command("PUBSUB", "SHARDNUMSUB", "mc:{%s}" % ident)[1] >= 1


def spublish_calls(master):
    stats = master.info("commandstats").get("cmdstat_spublish", "calls=0")
    return int(stats.split(",")[0].split("=")[1])


def test_a_redis_cluster_delivers_across_nodes_for_ids_on_every_master(redis_cluster,
                                                                      server_factory):
    cluster = redis_cluster
    # B knows one node of the cluster, a replica (it answers CLUSTER SLOTS): recognised too.
    b = server_factory(*node_flags([cluster.replicas()[0].url]), workers=2)
    a = server_factory(*node_flags(cluster.urls), workers=2)
    model = Model()
    ids = ids_on_every_master(cluster)
    streams = {ident: sse_open(b, "/sse/" + ident) for ident in ids}
    try:
        for ident, master in ids.items():
            held_by(b, ident, 1)
            wait_node(b, lambda: shard_subscribed(master, ident),
                      "B joined mc:{%s} on its master %d" % (ident, master.port))
        time.sleep(0.3)
        spublished = {m.port: spublish_calls(m) for m in set(ids.values())}
        for n in range(1, 4):
            for ident in ids:
                publish(a, ident, "%s-%d" % (ident, n), model)
        for ident, master in ids.items():
            # The id's keys live on its slot's master (no MOVED when asked there).
            assert master.command("HGET", "mc:{%s}" % ident, "s") == "3"
            assert master.command("XLEN", "mc:{%s}:s" % ident) == 3
            got, epochs = sse_messages(streams[ident], 3)
            epoch = int(master.command("HGET", "mc:{%s}" % ident, "e"))
            assert epochs == [epoch]
            model.check(ident, got, after=0, through=3)
        for master in set(ids.values()):                   # sharded pub/sub on every master
            assert spublish_calls(master) - spublished[master.port] >= 6
        # B publishes, a client moves to A with its cursor, several ids on one poll.
        for ident in ids:
            publish(b, ident, "%s-4" % ident, model)
        for ident in ids:
            model.check(ident, sse_messages(streams[ident], 1)[0], after=3, through=4)
        first = list(ids)
        doc = poll(a, "/sub/%s?since=%s&timeout=1" % (",".join(first),
                                                      ",".join("%s:2" % i for i in first)))
        for ident, got in by_id(doc["messages"]).items():
            model.check(ident, got, after=2, through=4)
        assert set(by_id(doc["messages"])) == set(ids)
    finally:
        for stream in streams.values():
            stream.close()


def test_a_node_publishing_right_after_its_start_reaches_subscribers_of_a_redis_cluster(
        redis_cluster, server_factory):
    cluster = redis_cluster
    b = server_factory(*node_flags(cluster.urls), workers=2)
    model = Model()
    x = uid("early")
    stream = sse_open(b, "/sse/" + x)
    try:
        held_by(b, x, 1)
        master = cluster.master_for_key("mc:{%s}" % x)
        wait_for(lambda: shard_subscribed(master, x), WAIT, message="B joined")
        a = server_factory(*node_flags(cluster.urls), workers=2)
        publish(a, x, "first", model)                      # at once: before A's first tick
        try:
            got, _ = sse_messages(stream, 1, timeout=2)
        except (AssertionError, socket.timeout):
            got = []
        model.check(x, got, after=0, through=1)
    finally:
        stream.close()


# -- the command line -------------------------------------------------------------------------

def run_cli(code_or_args, env=None, timeout=20):
    """Run the command line in a process of its own (killed, with its group, if it has not
    exited within ``timeout``): (exit status, stderr)."""
    argv = ([sys.executable, "-c", code_or_args] if isinstance(code_or_args, str)
            else [sys.executable, MEGACOMET, *code_or_args])
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        raise AssertionError("%s did not exit within %d s" % (argv, timeout))
    return proc.returncode, err


LOOPBACK = ["--workers", "1", "--host", "127.0.0.1", "--port", "0", "--app-port", "0"]


def test_redis_without_hiredis_exits_2_naming_the_pip_command():
    code = ("import sys; sys.modules['hiredis'] = None; sys.argv[0] = 'megacomet'; "
            "from megacomet.cli import main; "
            "sys.exit(main(['--redis', 'redis://127.0.0.1:6379'] + %r))" % LOOPBACK)
    status, err = run_cli(code)
    assert status == 2, err
    assert "pip install 'megacomet[redis]'" in err, err
    assert "Traceback" not in err, err
    # The same from the environment; without any Redis URL hiredis is never needed.
    env = dict(os.environ, MEGACOMET_REDIS_URL="redis://127.0.0.1:6379")
    status, err = run_cli(code.replace("['--redis', 'redis://127.0.0.1:6379'] + ", ""), env=env)
    assert status == 2 and "pip install 'megacomet[redis]'" in err, err


@pytest.mark.parametrize("url, says", [
    ("http://127.0.0.1:6379", "redis://"),
    ("127.0.0.1:6379", "redis://"),
    ("redis://", "no host"),
    ("redis://127.0.0.1:6379/zero", "database number"),
    ("redis://127.0.0.1:port", "port"),
    ("redis://127.0.0.1:99999", "port"),
])
def test_a_bad_redis_url_exits_2_saying_what_is_wrong(url, says):
    if key_slot is None:
        pytest.skip("hiredis is not installed (the URL is checked after it is imported)")
    status, err = run_cli(["--redis", url, *LOOPBACK])
    assert status == 2, err
    assert says in err.lower() and "Traceback" not in err, err


def test_an_empty_or_missing_redis_url_file_exits_2(tmp_path):
    (tmp_path / "empty").write_text("# nothing here\n\n")
    status, err = run_cli(["--redis-url-file", str(tmp_path / "empty"), *LOOPBACK])
    assert status == 2 and "holds no Redis URL" in err, err
    status, err = run_cli(["--redis-url-file", str(tmp_path / "missing"), *LOOPBACK])
    assert status == 2 and "cannot read the Redis URLs" in err, err

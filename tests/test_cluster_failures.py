"""Cluster mode (``--redis``) when things fail: real redis-server processes (tools/redislab.py),
two or three MegaComet nodes, real clients, no mocks.

Each scenario follows the README's client rules (keep every answer's epoch, send it back with
the cursor, start over at 0 when the epoch changes) and publishes unique messages with an
``Idempotency-Key``, retried with the same key after a 503.  Then, for every subscriber, among
the CONFIRMED messages (202) of its id:

    lost          never delivered to it
    duplicated    delivered to it twice within one epoch
    out of order  a seq not above the one before it, within one epoch, or another seq than
                  its 202 said

must all be 0.  The scenarios (issue 16, "When things fail"):

1. Redis paused (SIGSTOP): publishes get 503 + Retry-After within about --redis-timeout,
   /health 503, held polls time out normally; after SIGCONT all is well again.
2. Redis restarted without its data (and FLUSHALL): a new epoch, clients start over.
3. ``CLIENT KILL TYPE pubsub`` while the other node publishes: channels joined again, the gap
   read from the stream.
4. ``DEBUG SLEEP 4``: 503s, /health keeps answering at once, memory bounded, then recovery.
5. A node SIGKILLed: its subscribers (long-poll and WebSocket) move to the other node.
6. A Redis Cluster (3 masters + 3 replicas) loses the master of a subscribed id: publishes
   work again after the failover; the confirmed messages lost to asynchronous replication
   are counted without ``--redis-wait-replicas``, and must be none with it.
7. A node cut off from Redis by the network (a namespace with veth pairs; skipped where
   ``ip netns`` is not permitted).
8. ``tools/chaos.py --cluster``, short.

Figures (failover time, recovery times, messages lost) are printed: ``pytest -s`` shows them.
Every wait has a timeout; every process is stopped by pid.  The scenarios with several
assertions run once in a module fixture, with a test per assertion that a server bug broke
(each found here, fixed since): /health flapping to 200 while Redis was paused, gaps filled
after a lost pub/sub link not counted, a node unhealthy after a failover while a dead seed
was down, seqs given twice after a failover that lost writes (two ways), and a client past
Redis's last seq in the id's epoch sent the buffer again in it.
"""

import collections
import http.client
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

from conftest import ROOT, Server, wait_for
from redisfixtures import redis_standalone, require_redis  # noqa: F401 (a fixture)
from test_chaos import alive

import redislab  # noqa: E402  (tools/ is on sys.path: conftest puts it there)

HOST = "127.0.0.1"
TIMEOUT = 1.0                # --redis-timeout of every node here
POLL = 2                     # ?timeout= of every long-poll
MAX_QUEUED = 5000            # --max-queued: nothing a test publishes is dropped from a buffer
SETTLE = 10.0                # seconds for the last confirmed message to reach every subscriber


def figure(name, value):
    """A measured figure: printed (pytest -s) for the report."""
    print("\nfigure: %s = %s" % (name, value if not isinstance(value, float) else "%.3f" % value))


# -- nodes ------------------------------------------------------------------------------------

def redis_flags(urls, *extra, max_queued=MAX_QUEUED):
    flags = []
    for url in ([urls] if isinstance(urls, str) else urls):
        flags += ["--redis", url]
    return [*flags, "--redis-timeout", TIMEOUT, "--max-queued", max_queued, *extra]


class Nodes:
    """MegaComet nodes started here and stopped here (by pid), for module-scoped scenarios;
    like conftest's server_factory, a node that logged an internal error fails the scenario."""

    def __init__(self):
        self.started = []

    def start(self, urls, *extra, workers=2, max_queued=MAX_QUEUED, **kw):
        node = Server(*redis_flags(urls, *extra, max_queued=max_queued), workers=workers,
                      **kw).start()
        self.started.append(node)
        return node

    def bugs(self):
        found = []
        for node in self.started:
            if node.proc is not None:
                found += [line for line in node.stderr().splitlines()
                          if "internal error" in line or "Traceback" in line]
        return found

    def stop(self):
        """Stop every node, all at once (each takes ~0.4 s to stop: not one after another)."""
        found = self.bugs()
        stopping = [threading.Thread(target=node.stop) for node in self.started]
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join()
        return found

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def kill_node(node):
    """SIGKILL a node's supervisor and every worker, by pid (no shutdown at all)."""
    pids = [node.proc.pid] + [pid for pid in node.worker_pids() if pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.proc.wait(timeout=10)
    return pids


def health(node, timeout=5.0):
    """(status, seconds to answer) of the node's /health; status None when it did not answer."""
    t = time.monotonic()
    try:
        status = node.request("GET", "/health", timeout=timeout)[0]
    except OSError:
        status = None
    return status, time.monotonic() - t


def totals(node):
    return node.stats()["totals"]


def held(node, ident):
    """Subscribers of ident the node counts now (GET /presence/<id>)."""
    status, _, body = node.request("GET", "/presence/" + ident)
    return json.loads(body)["subscribers"] if status == 200 else 0


# -- publishing ---------------------------------------------------------------------------

def post(port, ident, data, key=None, timeout=10.0, host=HOST):
    """One POST /pub/<id> on its own connection: (status or None, headers, body, seconds)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Idempotency-Key": key} if key else {}
    t = time.monotonic()
    try:
        conn.request("POST", "/pub/" + ident, data.encode(), headers)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body, time.monotonic() - t
    except (OSError, http.client.HTTPException) as e:
        return None, {}, repr(e).encode(), time.monotonic() - t
    finally:
        conn.close()


class Ledger:
    """Every publish and its outcome.  A message's data is its Idempotency-Key."""

    def __init__(self):
        self.lock = threading.Lock()
        self.confirmed = {}                         # data -> (ident, seq)
        self.order = collections.defaultdict(list)  # ident -> data, in the order confirmed
        self.attempts = []      # (monotonic, node's app port, ident, data, status, s, Retry-After)
        self.unconfirmed = set()                    # data never confirmed (gave up)

    def publish(self, nodes, ident, data, until=0.0, pause=0.1):
        """POST data to the first node (the next on a connection error); on a 503 or no answer
        retry with the same Idempotency-Key until ``until`` (monotonic).  The last status."""
        nodes = nodes if isinstance(nodes, (list, tuple)) else [nodes]
        at = 0
        while True:
            node = nodes[at % len(nodes)]
            t = time.monotonic()
            status, headers, body, took = post(node.app, ident, data, key=data,
                                               host=getattr(node, "host", HOST))
            with self.lock:
                self.attempts.append((t, node.app, ident, data, status, took,
                                      headers.get("retry-after")))
                if status == 202:
                    self.confirmed[data] = (ident, json.loads(body)["seq"])
                    self.order[ident].append(data)
                    self.unconfirmed.discard(data)
                    return status
                self.unconfirmed.add(data)
            if status not in (None, 503):
                raise AssertionError("publish %s to %s: %s %r" % (data, ident, status, body))
            if status is None:
                at += 1
            if time.monotonic() + pause > until:
                return status
            time.sleep(pause)


class Publishing(threading.Thread):
    """Publishes msg ``<prefix>.<n>`` to ids in turn, one at a time, each retried after a 503
    (same key) for up to ``retry`` seconds, until stopped."""

    def __init__(self, ledger, nodes, ids, prefix, interval=0.0, retry=15.0):
        super().__init__(daemon=True)
        self.ledger, self.nodes, self.ids, self.prefix = ledger, nodes, ids, prefix
        self.interval, self.retry = interval, retry
        self.halt = threading.Event()
        self.sent = 0

    def run(self):
        n = 0
        while not self.halt.is_set():
            n += 1
            ident = self.ids[n % len(self.ids)]
            self.ledger.publish(self.nodes, ident, "%s.%d" % (self.prefix, n),
                                until=time.monotonic() + self.retry, pause=0.05)
            self.sent = n
            if self.interval:
                self.halt.wait(self.interval)

    def stop(self):
        self.halt.set()
        self.join(self.retry + 15)
        assert not self.is_alive(), "a publisher did not stop"


# -- subscribers --------------------------------------------------------------------------

class Subscriber(threading.Thread):
    """One client of one id that keeps its cursor and epoch as the README says, on the first
    of ``nodes``; with ``move``, it goes on to the next node when its node fails it."""

    def __init__(self, ident, nodes, move=False, since=0, epoch=0):
        super().__init__(daemon=True)
        self.topic = ident
        self.nodes = list(nodes)
        self.at = 0
        self.move = move
        self.since, self.epoch = since, epoch
        self.got = []                      # (epoch, seq, data)
        self.epochs = []                   # every epoch taken, in order
        self.errors = collections.Counter()
        self.halt = threading.Event()
        self.ready = threading.Event()     # the first request was sent
        self.lock = threading.Lock()

    def take(self, epoch, messages):
        """Messages [(seq, data)] in ``epoch``: rule 3 (another epoch: the cursor is 0 first)."""
        with self.lock:
            if epoch and epoch != self.epoch:
                self.since = 0
                self.epoch = epoch
                self.epochs.append(epoch)
            for seq, data in messages:
                self.got.append((self.epoch, seq, data))
                self.since = seq

    def failed(self, why):
        if self.halt.is_set():
            return                         # (stopped: its poll was cut short on purpose)
        self.errors[why] += 1
        if self.move:
            self.at = (self.at + 1) % len(self.nodes)
        self.halt.wait(0.05)

    def datas(self):
        with self.lock:
            return collections.Counter(d for _, _, d in self.got)

    def stop(self):
        stop_all([self])

    def interrupt(self):
        """Cut short what it waits for (stop_all)."""


class Poller(Subscriber):
    """Long-polls GET /sub/<id>?since=&epoch=&timeout= on a keep-alive connection."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.answers = []   # (sent at, seconds, since sent, last, epoch, messages)
        self.conn = None

    def interrupt(self):
        conn = self.conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def run(self):
        conn = None
        while not self.halt.is_set():
            path = "/sub/%s?since=%d&timeout=%d" % (self.topic, self.since, POLL)
            if self.epoch:
                path += "&epoch=%d" % self.epoch
            since = self.since
            t = time.monotonic()
            try:
                if conn is None:
                    node = self.nodes[self.at]
                    conn = self.conn = http.client.HTTPConnection(
                        getattr(node, "host", HOST), node.client, timeout=POLL + 12)
                conn.request("GET", path)
                self.ready.set()
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException) as e:
                if conn is not None:
                    conn.close()
                conn = self.conn = None
                self.failed(type(e).__name__)
                continue
            if resp.status != 200:
                self.failed(resp.status)
                continue
            doc = json.loads(body)
            self.answers.append((t, time.monotonic() - t, since, doc["last"], doc["epoch"],
                                 len(doc["messages"])))
            self.take(doc["epoch"], [(m["seq"], m["data"]) for m in doc["messages"]])
            with self.lock:
                self.since = doc["last"] if doc["epoch"] in (0, self.epoch) else self.since
        if conn is not None:
            conn.close()


class WsSubscriber(Subscriber):
    """A WebSocket (/ws/<id>?since=&epoch=), opened again with its cursor after any close."""

    def run(self):
        from websockets.sync.client import connect
        from websockets.exceptions import WebSocketException
        while not self.halt.is_set():
            node = self.nodes[self.at]
            url = "ws://%s:%d/ws/%s?since=%d" % (getattr(node, "host", HOST), node.client,
                                                self.topic, self.since)
            if self.epoch:
                url += "&epoch=%d" % self.epoch
            try:
                with connect(url, open_timeout=5, close_timeout=1) as ws:
                    self.ready.set()
                    while not self.halt.is_set():
                        try:
                            frame = json.loads(ws.recv(timeout=0.5))
                        except TimeoutError:
                            continue
                        self.take(frame["epoch"], [(frame["seq"], frame["data"])])
            except (OSError, WebSocketException) as e:
                self.failed(type(e).__name__)


def stop_all(subscribers):
    """Stop subscribers, all at once, their held polls cut short."""
    for s in subscribers:
        s.halt.set()
        s.interrupt()
    for s in subscribers:
        s.join(POLL + 10)
        assert not s.is_alive(), "a subscriber did not stop"


def start_all(subscribers):
    """Start subscribers and wait until each one's node holds it."""
    for s in subscribers:
        s.start()
    for s in subscribers:
        assert s.ready.wait(10), "a subscriber never sent its request"
    for s in subscribers:
        node = s.nodes[s.at]
        try:
            wait_for(lambda: held(node, s.topic) >= 1, 10, message="%s held" % s.topic)
        except AssertionError as e:
            raise AssertionError("%s: %s, its answers %s, errors %s; the node's log:\n%s" % (
                e, s, getattr(s, "answers", [])[-3:], dict(s.errors),
                node.stderr()[-3000:])) from None


def settle(subscribers, ledger, timeout=SETTLE):
    """Wait until every subscriber has every confirmed message of its id; True if so."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(not missing(s, ledger) for s in subscribers):
            return True
        time.sleep(0.05)
    return False


def missing(sub, ledger):
    have = sub.datas()
    return [d for d in ledger.order[sub.topic] if not have[d]]


def verdict(sub, ledger):
    """lost / duplicated / out of order among the confirmed messages of sub's id, with
    examples; unconfirmed messages count in duplicated and out of order too (a message may
    be stored without being confirmed, never twice in one epoch)."""
    with sub.lock:
        got = list(sub.got)
    per_epoch = collections.Counter((e, d) for e, _, d in got)
    duplicated = sorted({d for (e, d), n in per_epoch.items() if n > 1})
    out_of_order = []
    last = {}
    for e, s, d in got:
        if s <= last.get(e, 0):
            out_of_order.append((e, s, d, "after seq %d" % last[e]))
        last[e] = max(last.get(e, 0), s)
        confirmed = ledger.confirmed.get(d)
        if confirmed and confirmed[1] != s and not any(
                s2 == confirmed[1] for e2, s2, d2 in got if d2 == d):
            out_of_order.append((e, s, d, "confirmed as seq %d" % confirmed[1]))
    lost = missing(sub, ledger)
    return {"lost": len(lost), "duplicated": len(duplicated), "out_of_order": len(out_of_order),
            "examples": {"lost": lost[:5], "duplicated": duplicated[:5],
                         "out_of_order": out_of_order[:5]},
            "received": len(got), "confirmed": len(ledger.order[sub.topic]),
            "errors": dict(sub.errors)}


def assert_exactly_once(subscribers, ledger):
    verdicts = {"%s %s@%d" % (type(s).__name__, s.topic, i): verdict(s, ledger)
                for i, s in enumerate(subscribers)}
    bad = {k: v for k, v in verdicts.items()
           if (v["lost"], v["duplicated"], v["out_of_order"]) != (0, 0, 0)}
    assert not bad, json.dumps(bad, indent=1)
    assert all(v["confirmed"] > 0 for v in verdicts.values()), verdicts
    return verdicts


# == 1. Redis paused ============================================================================

PAUSE = 3.5


@pytest.fixture(scope="module")
def paused():
    """Two nodes, long-polls on both; Redis SIGSTOPped for PAUSE s while both nodes publish;
    /health sampled throughout; after SIGCONT, the 503'd messages retried with their keys."""
    require_redis()
    run = {}
    with redislab.Standalone() as redis, Nodes() as nodes:
        a, b = nodes.start(redis.url), nodes.start(redis.url)
        ledger = Ledger()
        subs = [Poller(ident, [node]) for ident in ("pause-1", "pause-2") for node in (a, b)]
        start_all(subs)
        for n in range(3):
            for node in (a, b):
                for ident in ("pause-1", "pause-2"):
                    assert ledger.publish(node, ident, "%d.before.%s.%d" % (node.app, ident, n)) == 202
        run["settled_before"] = settle(subs, ledger)

        samples = []                     # (seconds since the pause, node index, status, took)
        stop_sampling = threading.Event()

        def sample():
            while not stop_sampling.is_set():
                for k, node in enumerate((a, b)):
                    status, took = health(node)
                    samples.append((time.monotonic() - run["paused_at"], k, status, took))
                stop_sampling.wait(0.1)

        redis.pause()
        run["paused_at"] = time.monotonic()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        during = []
        try:
            n = 0
            while time.monotonic() - run["paused_at"] < PAUSE - 0.5:
                n += 1
                for node in (a, b):
                    data = "%d.during.%d" % (node.app, n)
                    ledger.publish(node, "pause-1", data, until=0)   # no retry while paused
                    during.append(ledger.attempts[-1])
                time.sleep(0.3)
            time.sleep(max(0.0, run["paused_at"] + PAUSE - time.monotonic()))
        finally:
            redis.resume()
        run["resumed_at"] = time.monotonic()
        # Healthy again: the time from SIGCONT until both nodes say 200.
        healthy = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(healthy) < 2:
            for k, node in enumerate((a, b)):
                if k not in healthy and health(node)[0] == 200:
                    healthy[k] = time.monotonic() - run["resumed_at"]
            time.sleep(0.05)
        stop_sampling.set()
        sampler.join(10)
        run["healthy_after"] = healthy
        run["samples"] = samples
        run["during"] = during
        # The messages refused while paused, again with their keys: each is stored once.
        retried = {}
        for t, port, ident, data, status, took, _ in during:
            node = a if port == a.app else b
            retried[data] = ledger.publish(node, ident, data, until=time.monotonic() + 10)
        run["retried"] = retried
        for n in range(3):
            for node in (a, b):
                ledger.publish(node, "pause-2", "%d.after.%d" % (node.app, n),
                               until=time.monotonic() + 10)
        run["settled"] = settle(subs, ledger)
        stop_all(subs)
        run["subs"], run["ledger"] = subs, ledger
        run["counters"] = [totals(a), totals(b)]
        run["bugs"] = nodes.bugs()
    yield run


def test_paused_redis_publishes_get_503_with_retry_after_within_the_timeout(paused):
    during = paused["during"]
    assert during
    statuses = collections.Counter(status for _, _, _, _, status, _, _ in during)
    assert statuses == {503: len(during)}, statuses
    assert all(retry_after for *_, retry_after in during), "a 503 without Retry-After"
    slowest = max(took for _, _, _, _, _, took, _ in during)
    figure("paused: slowest 503 (s)", slowest)
    assert slowest < TIMEOUT + 1.0, slowest


def test_paused_redis_makes_health_503(paused):
    for k in (0, 1):
        first = [t for t, node, status, _ in paused["samples"] if node == k and status == 503]
        assert first and first[0] < TIMEOUT + 2.5, (k, paused["samples"][:20])
        figure("paused: /health 503 after (s), node %d" % k, first[0])
    assert max(took for *_, took in paused["samples"]) < 1.0, "/health was slow to answer"


def test_paused_redis_health_stays_503_until_resumed(paused):
    """A stopped Redis's kernel still completes connections: a link is healthy only once
    it has been answered (this flapped back to 200 at every reconnect)."""
    for k in (0, 1):
        mine = [(round(t, 2), status) for t, node, status, _ in paused["samples"]
                if node == k and t < PAUSE]
        first = next(i for i, (_, status) in enumerate(mine) if status == 503)
        flaps = [s for s in mine[first:] if s[1] != 503]
        assert not flaps, "node %d said /health %s while Redis was still paused" % (k, flaps[:5])


def test_paused_redis_recovers_and_delivers_every_confirmed_message_once(paused):
    assert paused["settled_before"]
    healthy = paused["healthy_after"]
    assert len(healthy) == 2, "a node did not say /health 200 within 15 s of SIGCONT"
    figure("paused: /health 200 after SIGCONT (s)", max(healthy.values()))
    assert max(healthy.values()) < 5.0
    assert set(paused["retried"].values()) == {202}, paused["retried"]
    # Held polls kept their connections and timed out normally, with their cursor.
    for s in paused["subs"]:
        assert not s.errors, s.errors
        quiet = [a for a in s.answers
                 if paused["paused_at"] + 0.5 <= a[0] + a[1] <= paused["resumed_at"]]
        assert quiet, ("no poll was answered during the pause",
                       [(round(t - paused["paused_at"], 2),) + a for t, *a in s.answers])
        for sent, took, since, last, epoch, n in quiet:
            assert n == 0 and last == since and POLL - 0.5 <= took <= POLL + 1.5, quiet
    assert paused["settled"], {i: missing(s, paused["ledger"]) for i, s in enumerate(paused["subs"])}
    assert_exactly_once(paused["subs"], paused["ledger"])
    assert [c["redis_reconnects"] > 0 for c in paused["counters"]] == [True, True]
    assert not paused["bugs"], paused["bugs"]


# == 2. Redis restarted without its data ====================================================

def test_redis_that_lost_its_data_starts_a_new_epoch(server_factory, redis_standalone):
    """Redis restarted without persistence, then FLUSHALL: each time every id starts a new
    epoch from seq 1; subscribers held across it start over, one that comes back with its old
    cursor and epoch gets the new epoch's messages from seq 1; nothing twice in one epoch."""
    redis = redis_standalone
    a = server_factory(*redis_flags(redis.url))
    b = server_factory(*redis_flags(redis.url))
    ledger = Ledger()
    ident = "lost"
    subs = [Poller(ident, [a]), Poller(ident, [b]), WsSubscriber(ident, [a])]
    start_all(subs)
    lates = []
    epoch = 0
    for life, loss in enumerate(("start", "restart", "flushall")):
        if loss == "restart":
            redis.restart()
        elif loss == "flushall":
            redis.command("FLUSHALL")
        t = time.monotonic()
        for n in range(4):
            assert ledger.publish([a, b][n % 2], ident, "%s.%d" % (loss, n),
                                  until=time.monotonic() + 10) == 202
        if life:
            figure("%s: first publish confirmed after (s)" % loss, time.monotonic() - t)
            # A client that moves to the other node with its old cursor (4) and epoch.
            late = Poller(ident, [b], since=4, epoch=epoch)
            start_all([late])
            lates.append((loss, late))
        assert settle(subs, ledger), {i: missing(s, ledger) for i, s in enumerate(subs)}
        epochs = {s.epoch for s in subs}
        assert len(epochs) == 1 and 0 not in epochs, epochs
        if life:
            assert epochs != {epoch}, "no new epoch after the %s" % loss
        epoch = epochs.pop()
    for loss, late in lates:
        wait_for(lambda: len(late.got) >= 4, SETTLE, message="the late client's messages")
    time.sleep(0.3)
    stop_all(subs + [late for _, late in lates])
    assert_exactly_once(subs, ledger)
    for s in subs:
        # Three epochs, each from seq 1.
        lives = collections.defaultdict(list)
        for e, seq, d in s.got:
            lives[e].append((seq, d.split(".")[0]))
        assert sorted(lives.values()) == sorted([(n + 1, loss) for n in range(4)]
                                                for loss in ("start", "restart", "flushall")), lives
        assert s.epochs == sorted(s.epochs) and len(s.epochs) == 3, s.epochs
    # A late client gets the new epoch's messages from seq 1 (the 4 it is past included).
    for loss, late in lates:
        assert [(seq, d) for _, seq, d in late.got[:4]] == [
            (n + 1, "%s.%d" % (loss, n)) for n in range(4)], (loss, late.got)


# == 3. CLIENT KILL TYPE pubsub ===============================================================

KILL_IDS = ["kill-%d" % k for k in range(4)]


@pytest.fixture(scope="module")
def pubsub_killed():
    """Subscribers on node A (and B) while two publishers on B publish to four ids; every
    pub/sub connection is killed three times, each time followed at once by three publishes
    from B, which nobody's channel can carry: a gap for every node."""
    require_redis()
    run = {}
    with redislab.Standalone() as redis, Nodes() as nodes:
        a, b = nodes.start(redis.url), nodes.start(redis.url)
        ledger = Ledger()
        subs = [Poller(ident, [node]) for ident in KILL_IDS for node in (a, b)]
        subs += [WsSubscriber(KILL_IDS[0], [a])]
        start_all(subs)
        run["before"] = [totals(a), totals(b)]
        pubs = [Publishing(ledger, [b], KILL_IDS[k::2], "p%d" % k, interval=0.005) for k in (0, 1)]
        for p in pubs:
            p.start()
        time.sleep(0.5)
        kills = []
        for n in range(3):
            kills.append(redis.command("CLIENT", "KILL", "TYPE", "pubsub"))
            for ident in KILL_IDS[:3]:
                ledger.publish(b, ident, "gap.%d.%s" % (n, ident), until=time.monotonic() + 5)
            time.sleep(0.7)
        for p in pubs:
            p.stop()
        run["kills"] = kills
        run["settled"] = settle(subs, ledger)
        stop_all(subs)
        run["after"] = [totals(a), totals(b)]
        run["subs"], run["ledger"] = subs, ledger
        run["bugs"] = nodes.bugs()
    yield run


def test_pubsub_killed_nothing_confirmed_lost_or_repeated(pubsub_killed):
    run = pubsub_killed
    assert all(k >= 2 for k in run["kills"]), run["kills"]     # both nodes' links, each time
    assert run["settled"], {i: missing(s, run["ledger"]) for i, s in enumerate(run["subs"])}
    verdicts = assert_exactly_once(run["subs"], run["ledger"])
    figure("pubsub killed: confirmed messages per subscriber",
           sorted({v["confirmed"] for v in verdicts.values()}))
    for before, after in zip(run["before"], run["after"]):
        # Each kill: every held channel joined again.
        assert after["redis_resubscribes"] - before["redis_resubscribes"] >= 3 * 2, after
    assert not run["bugs"], run["bugs"]


def test_pubsub_killed_counts_the_gaps_it_filled(pubsub_killed):
    """The stream reads that brought what a lost channel did not are counted."""
    for before, after in zip(pubsub_killed["before"], pubsub_killed["after"]):
        assert after["redis_gaps_filled"] > before["redis_gaps_filled"], after


# == 4. DEBUG SLEEP =============================================================================

def test_slow_redis_503s_then_recovers_with_bounded_memory(server_factory, redis_standalone):
    redis = redis_standalone
    a = server_factory(*redis_flags(redis.url))
    b = server_factory(*redis_flags(redis.url))
    ledger = Ledger()
    ident = "sleepy"
    subs = [Poller(ident, [a]), Poller(ident, [b]), WsSubscriber(ident, [b])]
    start_all(subs)
    rss_before = sum(w["rss_bytes"] for w in a.stats()["workers"])
    pubs = [Publishing(ledger, [a], [ident], "s%d" % k) for k in range(3)]
    for p in pubs:
        p.start()
    # And a burst no one waits on: pipelined 4 KB publishes from 4 connections, which pile
    # up on the node while Redis sleeps.
    burst_stop = threading.Event()
    burst_answers = collections.Counter()

    def burst():
        payload = b"x" * 4096
        request = (b"POST /pub/sleepy-burst HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
                   % len(payload)) + payload
        with socket.create_connection((HOST, a.app), timeout=10) as s:
            s.settimeout(10)
            buf = b""
            while not burst_stop.is_set():
                s.sendall(request * 64)
                want = 64
                while want:
                    chunk = s.recv(1 << 16)
                    if not chunk:
                        return
                    buf += chunk
                    while b"\r\n\r\n" in buf:
                        head, _, rest = buf.partition(b"\r\n\r\n")
                        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                        if len(rest) < length:
                            break
                        burst_answers[int(head[9:12])] += 1
                        buf = rest[length:]
                        want -= 1

    bursts = [threading.Thread(target=burst, daemon=True) for _ in range(4)]
    for t in bursts:
        t.start()
    time.sleep(0.5)
    sleeper = threading.Thread(target=lambda: redis.command("DEBUG", "SLEEP", "4", timeout=15),
                               daemon=True)
    t0 = time.monotonic()
    sleeper.start()
    samples = []
    rss_peak = rss_before
    while sleeper.is_alive() and time.monotonic() - t0 < 10:
        samples.append(health(a))
        rss_peak = max(rss_peak, sum(w["rss_bytes"] for w in a.stats_within(1)["workers"]))
        time.sleep(0.1)
    sleeper.join(10)
    woke = time.monotonic()
    # Publishing works again.
    recovered = None
    while time.monotonic() - woke < 10:
        if post(a.app, ident + "-probe", "probe")[0] == 202:
            recovered = time.monotonic() - woke
            break
        time.sleep(0.05)
    time.sleep(0.5)
    burst_stop.set()
    for p in pubs:
        p.stop()
    for t in bursts:
        t.join(15)
    assert settle(subs, ledger), {i: missing(s, ledger) for i, s in enumerate(subs)}
    stop_all(subs)
    figure("debug sleep: publishes work again after (s)", recovered)
    figure("debug sleep: slowest /health (s)", max(took for _, took in samples))
    figure("debug sleep: rss growth of the node (MB)", (rss_peak - rss_before) / 2 ** 20)
    figure("debug sleep: burst answers", dict(burst_answers))
    in_sleep = [(status, took) for t, _, _, _, status, took, _ in ledger.attempts
                if t0 + 0.2 < t < woke - TIMEOUT - 0.5]
    assert in_sleep and {s for s, _ in in_sleep} == {503}, in_sleep[:10]
    assert max(took for _, took in in_sleep) < TIMEOUT + 1.0, in_sleep
    assert 503 in burst_answers and 202 in burst_answers, burst_answers
    assert all(status is not None and took < 0.5 for status, took in samples), samples
    assert rss_peak - rss_before < 64 * 2 ** 20, (rss_before, rss_peak)
    assert recovered is not None and recovered < 5.0
    assert_exactly_once(subs, ledger)


# == 5. A node SIGKILLed ========================================================================

def test_killed_node_subscribers_resume_on_the_other_node(server_factory, redis_standalone):
    redis = redis_standalone
    a = server_factory(*redis_flags(redis.url))
    b = server_factory(*redis_flags(redis.url))
    ledger = Ledger()
    ids = ["moved-%d" % k for k in range(3)]
    subs = [Poller(ident, [a, b], move=True) for ident in ids]
    subs += [WsSubscriber(ident, [a, b], move=True) for ident in ids[:2]]
    stay = [Poller(ids[0], [b])]
    start_all(subs + stay)
    pub = Publishing(ledger, [b], ids, "k", interval=0.01)
    pub.start()
    time.sleep(1.0)
    killed = kill_node(a)
    t = time.monotonic()
    wait_for(lambda: all(s.at == 1 for s in subs), 10, message="every subscriber moved")
    wait_for(lambda: all(held(b, s.topic) >= 1 for s in subs), 10, message="held on b")
    moved = time.monotonic() - t
    time.sleep(1.0)
    pub.stop()
    assert settle(subs + stay, ledger), {i: missing(s, ledger) for i, s in enumerate(subs)}
    stop_all(subs + stay)
    figure("node killed: subscribers held by the other node after (s)", moved)
    assert all(s.errors for s in subs), "a subscriber did not notice its node die"
    assert not [pid for pid in killed if alive(pid)], "a killed node's process lives on"
    verdicts = assert_exactly_once(subs + stay, ledger)
    assert all(v["received"] >= 20 for v in verdicts.values()), verdicts


# == 6. A Redis Cluster loses a master ========================================================

LAG = 0.25       # seconds the doomed master takes writes its replica never sees


def slot_of(ident):
    import binascii
    return binascii.crc_hqx(ident.encode(), 0) % 16384


def ids_on(cluster, master, prefix, n):
    """n ids whose slot the given master serves."""
    ranges = [(s, e) for s, e, m, _ in cluster.slot_map() if m is master]
    found = []
    k = 0
    while len(found) < n:
        ident = "%s-%d" % (prefix, k)
        if any(s <= slot_of(ident) <= e for s, e in ranges):
            found.append(ident)
        k += 1
    return found


@pytest.fixture(scope="module")
def failover():
    """One 3 + 3 Redis Cluster; nodes A, B without --redis-wait-replicas and C, D with 1,
    publishing to ids of one master as fast as they are answered, subscribers on each node.

    On loopback a replica is never behind by more than microseconds, so the replication
    window is staged: the master's replica is paused and its replication link killed
    (``CLIENT KILL TYPE replica``), the master takes writes for LAG seconds (the plain
    nodes' publishes, confirmed; three WAIT publishes, stored and sent to subscribers but
    unconfirmed), then it is SIGKILLed and the replica resumed, which takes over after the
    node timeout.  The old master then comes back as a replica (the WAIT nodes need one to
    confirm anything).  One subscriber of each kind stops just before the kill and comes
    back on the other node with its cursor once new messages flow (a client that moved).
    Nodes E (plain) and F (WAIT) each hold the only subscriber of an id of their own, and
    are SIGSTOPped from the kill until new messages flow again: when they read the stream
    again, the new master has numbered past what they cached, the seqs given twice are
    behind their cursor, and no other node saw them come twice.
    Measured: when each node publishes again, how many confirmed messages Redis lost."""
    require_redis()
    run = {"t": [("start", time.monotonic())]}
    with redislab.Cluster(masters=3, replicas=1) as cluster, Nodes() as nodes:
        run["t"].append(("cluster", time.monotonic()))
        victim, replica = next((m, reps[0]) for _, _, m, reps in cluster.slot_map() if reps)
        plain_ids = ids_on(cluster, victim, "fo", 3)      # [2]: E's subscriber's alone
        wait_ids = ids_on(cluster, victim, "fw", 3)       # [2]: F's subscriber's alone
        # (Streams long enough to hold all a run publishes: what is missing was lost.)
        a, b = (nodes.start(cluster.urls, max_queued=100000) for _ in range(2))
        c, d = (nodes.start(cluster.urls, "--redis-wait-replicas", 1, max_queued=100000)
                for _ in range(2))
        e = nodes.start(cluster.urls, max_queued=100000, workers=1)
        f = nodes.start(cluster.urls, "--redis-wait-replicas", 1, max_queued=100000, workers=1)
        plain, waited = Ledger(), Ledger()
        subs_plain = [Poller(i, [n]) for i in plain_ids[:2] for n in (a, b)]
        subs_wait = [Poller(i, [n]) for i in wait_ids[:2] for n in (c, d)]
        sleepers = [Poller(plain_ids[2], [e]), Poller(wait_ids[2], [f])]
        # (The third on F: no node that runs through the failover holds its id.)
        movers = [Poller(plain_ids[0], [a]), Poller(wait_ids[0], [d]), Poller(wait_ids[2], [f])]
        start_all(subs_plain + subs_wait + movers + sleepers)
        stopped = []                            # E's and F's pids while they are stopped
        run["t"].append(("nodes", time.monotonic()))

        def publishers(ledger, ids, pair, tag):
            started = [Publishing(ledger, [node], [ident], "%s@%d%s" % (ident, node.app, tag),
                                  retry=0.5) for ident in ids for node in pair]
            for p in started:
                p.start()
            return started

        pubs = publishers(plain, plain_ids, (a, b), "") + publishers(waited, wait_ids, (c, d), "")
        try:
            failover_run(run, cluster, victim, replica, (a, b, c, d), (e, f), plain_ids,
                         wait_ids, plain, waited, pubs, publishers, movers, sleepers, stopped)
        finally:
            resume(stopped)
        run["t"].append(("E, F resumed", time.monotonic()))
        time.sleep(0.3)
        # The movers come back, each on the other node of its pair, with its cursor.
        moved = [Poller(m.topic, [node], since=m.since, epoch=m.epoch)
                 for m, node in zip(movers, (b, c))]
        start_all(moved)
        time.sleep(0.3)
        for p in pubs:
            p.stop()
        run["t"].append(("publishers stopped", time.monotonic()))
        run["settle_plain"] = settle(subs_plain, plain, timeout=2.0)
        run["settle_wait"] = settle(subs_wait, waited, timeout=2.0)
        run["settle_sleepers"] = (settle(sleepers[:1], plain, timeout=1.0),
                                  settle(sleepers[1:], waited, timeout=1.0))
        stop_all(subs_plain + subs_wait + moved + sleepers + [run["early"][1]])
        run["t"].append(("settled", time.monotonic()))
        # What Redis itself kept: the confirmed messages the new master's streams lack.
        kept = set()
        for ident in plain_ids + wait_ids:
            for _, fields in run["new_master"].command("XRANGE", "mc:{%s}:s" % ident, "-", "+"):
                kept.add(fields[1])
        run["redis_lost_plain"] = sorted(d for d in plain.confirmed if d not in kept)
        run["redis_lost_wait"] = sorted(d for d in waited.confirmed if d not in kept)
        run.update(subs_plain=subs_plain, subs_wait=subs_wait, plain=plain, waited=waited,
                   movers=list(zip(movers, moved)), sleepers=sleepers)
        run["bugs"] = nodes.bugs()
    yield run


def pause_node(node):
    """SIGSTOP a node's supervisor and workers; their pids, for resume()."""
    pids = [node.proc.pid] + [pid for pid in node.worker_pids() if pid]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def resume(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def failover_run(run, cluster, victim, replica, nodes, sleeping, plain_ids, wait_ids, plain,
                 waited, pubs, publishers, movers, sleeping_subs, stopped):
    """The failover fixture's middle: from the staged window until the WAIT nodes confirm
    again and E and F are to be let go (``stopped``: their pids meanwhile)."""
    a, b, c, d = nodes
    time.sleep(0.5)
    for p in pubs[len(plain_ids) * 2:]:          # the WAIT publishers pause
        p.stop()
    replica.pause()
    try:
        victim.command("CLIENT", "KILL", "TYPE", "replica")
        run["lag_at"] = time.monotonic()
        lagging = [threading.Thread(target=waited.publish, daemon=True,
                                    args=(c, ident, "lag.%s.%d" % (ident, k)))
                   for ident in (wait_ids[0], wait_ids[2]) for k in range(3)]
        for t in lagging:
            t.start()
        time.sleep(LAG)
        # The movers leave with what they had, the WAIT one with the unconfirmed three; F's
        # subscriber has its three too.
        wait_for(lambda: all(sub.datas()["lag.%s.%d" % (sub.topic, k)]
                             for sub in (movers[1], movers[2], sleeping_subs[1])
                             for k in range(3)), 3,
                 message="the unconfirmed messages delivered")
        stop_all(movers)
        cluster.kill(victim)
        killed_at = run["killed_at"] = time.monotonic()   # (a publish sent before may
        for node in sleeping:                             # have been stored)
            stopped += pause_node(node)
    finally:
        replica.resume()
    run["new_master"] = cluster.wait_failover(victim, timeout=30)
    run["lab_failover_s"] = time.monotonic() - killed_at
    for t in lagging:
        t.join(15)
    # Each plain node publishes again (its own publishers' first 202 after the kill).
    first_ok = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(first_ok) < 2:
        for node in (a, b):
            oks = [t for t, port, _, _, status, _, _ in list(plain.attempts)
                   if port == node.app and status == 202 and t > killed_at + 0.05]
            if oks and node.app not in first_ok:
                first_ok[node.app] = min(oks) - killed_at
        time.sleep(0.05)
    run["first_ok_s"] = first_ok
    run["t"].append(("failover", time.monotonic()))
    # Every node healthy again (the dead master is one of their seeds): how soon.
    healthy = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(healthy) < 4:
        for k, node in enumerate((a, b, c, d)):
            if k not in healthy and health(node)[0] == 200:
                healthy[k] = time.monotonic() - killed_at
        time.sleep(0.05)
    run["healthy_after_kill_s"] = healthy
    # The third mover comes back at once, to C, which never held its id (only F, stopped, did):
    # its cursor is past the new master's last seq, in the id's epoch.
    early = Poller(movers[2].topic, [c], since=movers[2].since, epoch=movers[2].epoch)
    start_all([early])
    run["early"] = (movers[2], early)
    # The WAIT nodes can confirm nothing while the new master has no replica.
    probe = [post(node.app, wait_ids[1], "probe@%d" % node.app)[0] for node in (c, d)]
    run["wait_probe_without_replica"] = probe
    # The old master back, as a replica of the new one: WAIT can be satisfied again.
    back_at = time.monotonic()
    victim.restart()
    cluster.wait_ok(30, synced=True)
    run["replica_back_s"] = time.monotonic() - back_at
    pubs += publishers(waited, wait_ids, (c, d), "+")
    wait_first = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and wait_first is None:
        oks = [t for t, _, _, _, status, _, _ in list(waited.attempts)
               if status == 202 and t > back_at]
        wait_first = min(oks) - back_at if oks else None
        time.sleep(0.05)
    run["wait_ok_after_replica_s"] = wait_first
    run["t"].append(("replica back", time.monotonic()))
    # Before E and F go on: more new WAIT messages than the three lost ones.
    wait_for(lambda: sum(1 for t, _, i, _, status, _, _ in list(waited.attempts)
                         if status == 202 and t > back_at and i == wait_ids[2]) > 6,
             10, message="new WAIT messages")


def confirmed_at(ledger):
    return {d: t for t, _, _, d, status, _, _ in ledger.attempts if status == 202}


def mover_missed(first, second, ledger):
    """Confirmed messages of the id that a client which moved (first, then second) never got."""
    have = first.datas() + second.datas()
    return [d for d in ledger.order[first.topic] if not have[d]]


def test_failover_publishes_work_again_and_reach_both_nodes(failover):
    run = failover
    t0 = run["t"][0][1]
    figure("failover: timeline (s)", [(what, round(t - t0, 2)) for what, t in run["t"]])
    figure("failover: lab's failover (kill -> replica serves the slots) (s)", run["lab_failover_s"])
    figure("failover: first confirmed publish per node after the kill (s)",
           sorted(run["first_ok_s"].values()))
    assert len(run["first_ok_s"]) == 2, run["first_ok_s"]
    assert max(run["first_ok_s"].values()) < run["lab_failover_s"] + 5.0
    # Messages confirmed with seqs above any the subscriber had before the kill (see the next
    # tests for those below), and not lost by Redis, reached the subscribers on both nodes.
    first_try = {}
    for t, _, _, d, _, _, _ in run["plain"].attempts:
        first_try.setdefault(d, t)
    for s in run["subs_plain"]:
        top = max(seq for _, seq, d in s.got if first_try.get(d, 0) < run["killed_at"])
        mine = [d for d in run["plain"].order[s.topic] if run["plain"].confirmed[d][1] > top
                and d not in run["redis_lost_plain"]]
        assert mine, "nothing confirmed after the failover"
        have = s.datas()
        lost = [(d, run["plain"].confirmed[d][1]) for d in mine if not have[d]]
        assert lost == [], ("confirmed after the failover, not delivered", top, lost,
                            [(q, d) for _, q, d in s.got if q > top - 5][:30],
                            [a[2:] for a in s.answers if a[0] > run["killed_at"]][:30])
    assert not run["bugs"], run["bugs"]


def test_failover_without_wait_loses_only_the_replication_window(failover):
    run = failover
    times = confirmed_at(run["plain"])
    window = [d for d, t in times.items() if run["lag_at"] <= t <= run["killed_at"]]
    figure("failover without WAIT: confirmed messages Redis lost",
           "%d of %d (%d confirmed in the staged %.1f s window)" % (
               len(run["redis_lost_plain"]), len(times), len(window), LAG))
    # Whatever was lost was confirmed in the window, when the replica saw nothing.
    assert all(run["lag_at"] - 0.05 <= times[d] <= run["killed_at"] + 0.05
               for d in run["redis_lost_plain"]), run["redis_lost_plain"][:5]
    assert run["redis_lost_plain"], "the staged window lost nothing: it did not work"


def test_failover_without_wait_loses_nothing_confirmed_after_it(failover):
    """After a failover that lost writes, the new master numbers on from the last seq it has:
    new messages get the seqs of lost ones.  The nodes see Redis give a seq twice and give
    the id a new epoch, so clients start over instead of skipping the new messages (the
    client that moved, its cursor past them) or seeing seqs go back (those held across)."""
    run = failover
    times = confirmed_at(run["plain"])
    after = {d for d, t in times.items() if t > run["killed_at"]}
    report = []
    for s in run["subs_plain"]:
        v = verdict(s, run["plain"])
        lost_after = [d for d in missing(s, run["plain"]) if d in after]
        report.append((s.topic, v["lost"], len(lost_after), v["duplicated"], v["out_of_order"]))
    first, second = run["movers"][0]
    moved_missed = [d for d in mover_missed(first, second, run["plain"]) if d in after]
    figure("failover without WAIT: per subscriber (id, lost, of those confirmed after the "
           "kill, duplicated, out of order)", report)
    figure("failover without WAIT: confirmed after the kill that the moved client missed",
           len(moved_missed))
    assert moved_missed == []
    assert all(lost_after == 0 for _, _, lost_after, _, _ in report), report


def test_failover_with_wait_redis_keeps_every_confirmed_message(failover):
    run = failover
    figure("failover with WAIT 1: confirmed messages Redis lost",
           "%d of %d" % (len(run["redis_lost_wait"]), len(run["waited"].confirmed)))
    figure("failover with WAIT 1: publishes while the new master had no replica",
           run["wait_probe_without_replica"])
    figure("failover with WAIT 1: old master back as a replica after (s)", run["replica_back_s"])
    figure("failover with WAIT 1: first confirmed publish after the replica is back (s)",
           run["wait_ok_after_replica_s"])
    assert run["redis_lost_wait"] == []
    assert run["wait_probe_without_replica"] == [503, 503]
    assert run["wait_ok_after_replica_s"] is not None and run["wait_ok_after_replica_s"] < 10
    assert len([d for d in run["waited"].unconfirmed if d.startswith("lag.")]) == 6


def test_failover_with_wait_subscribers_get_every_confirmed_message_once_in_order(failover):
    """With WAIT, the messages lost are unconfirmed ones, but subscribers were sent them (the
    script publishes before WAIT answers): their seqs come again, and the id's new epoch must
    keep every confirmed message from being skipped or seen out of order."""
    run = failover
    first, second = run["movers"][1]
    missed = mover_missed(first, second, run["waited"])
    figure("failover with WAIT 1: confirmed messages the moved client missed", len(missed))
    assert missed == []
    assert run["settle_wait"], {i: missing(s, run["waited"])[:5]
                                for i, s in enumerate(run["subs_wait"])}
    assert_exactly_once(run["subs_wait"], run["waited"])


def test_failover_a_node_that_reads_the_stream_late_still_starts_its_clients_over(failover):
    """E's and F's subscribers (their nodes stopped through the failover, nobody else
    following their ids) must not skip the confirmed messages given the seqs of lost ones
    (they did until 2dd729e: a node compared only when Redis's last seq was below its cache's)."""
    run = failover
    times = confirmed_at(run["plain"])
    e_sub, f_sub = run["sleepers"]
    lost_e = [d for d in missing(e_sub, run["plain"]) if times[d] > run["killed_at"]]
    lost_f = missing(f_sub, run["waited"])
    figure("failover: confirmed messages missed by the late node's subscriber (plain, WAIT)",
           (len(lost_e), len(lost_f)))
    assert (lost_e, lost_f) == ([], [])
    assert verdict(f_sub, run["waited"])["out_of_order"] == 0


def test_failover_a_client_past_the_last_seq_starts_over_in_a_new_epoch(failover):
    """A client whose cursor is past Redis's last seq in the id's epoch saw messages Redis
    lost: it must be told to start over (a new epoch), not sent the buffer again in the
    epoch it has, which it would take as new messages."""
    first, second = failover["early"]
    got = first.got + second.got
    twice = collections.Counter((e, d) for e, _, d in got)
    again = sorted(d for (e, d), n in twice.items() if n > 1)
    figure("failover: messages a client past the last seq got twice in one epoch", len(again))
    assert again == [], (len(again), [(e, q, d) for e, q, d in second.got[:8]])
    have = collections.Counter(d for _, _, d in got)
    assert [d for d in failover["waited"].order[first.topic] if not have[d]] == []


def test_failover_leaves_nodes_healthy(failover):
    """/health is 200 again soon after the failover, though a seed (the dead master) is down."""
    healthy = failover["healthy_after_kill_s"]
    figure("failover: /health 200 again after the kill (s)",
           sorted(round(t, 2) for t in healthy.values()))
    assert len(healthy) == 4, healthy
    assert max(healthy.values()) < failover["lab_failover_s"] + 3.0, healthy


# == 7. A node cut off from Redis by the network =============================================

def ip(*args):
    return subprocess.run(["ip", *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=10)


class NsServer(Server):
    """A node run in a network namespace (``ip netns exec`` execs it: its pid is the
    supervisor's), reached at ``host``."""

    def __init__(self, ns, host, *flags, **kw):
        super().__init__(*flags, "--host", host, "--app-host", host, "--insecure-app-port",
                         command=["ip", "netns", "exec", ns, sys.executable,
                                  os.path.join(ROOT, "megacomet.py")], **kw)
        self.host = host


@pytest.fixture
def netns():
    """A network namespace with two veth pairs to this one: one for the node's clients, one
    for its Redis link (the one the test cuts).  Removed whatever happens."""
    if not os.access("/usr/sbin/ip", os.X_OK) and not os.access("/sbin/ip", os.X_OK):
        pytest.skip("no ip command (iproute2)")
    tag = "%d" % (os.getpid() % 100000)
    name = "mcf" + tag
    done = ip("netns", "add", name)
    if done.returncode != 0:
        pytest.skip("ip netns is not permitted here: %s" % done.stderr.strip())
    links = [("mcc" + tag, "mcC" + tag), ("mcr" + tag, "mcR" + tag)]
    try:
        # Two /30s in 10.x.y.0/24, x and y from the pid, that no interface here uses.
        used = ip("-4", "-o", "addr").stdout
        rng = random.Random(os.getpid())
        for _ in range(50):
            net = "10.%d.%d." % (rng.randrange(100, 250), rng.randrange(0, 256))
            if net not in used:
                break
        addrs = {}
        for k, (here, there) in enumerate(links):
            mine, theirs = net + str(4 * k + 1), net + str(4 * k + 2)
            for args in (("link", "add", here, "type", "veth", "peer", "name", there),
                         ("link", "set", there, "netns", name),
                         ("addr", "add", mine + "/30", "dev", here),
                         ("link", "set", here, "up"),
                         ("-n", name, "addr", "add", theirs + "/30", "dev", there),
                         ("-n", name, "link", "set", there, "up")):
                done = ip(*args)
                if done.returncode != 0:
                    pytest.skip("cannot set up veth pairs: ip %s: %s"
                                % (" ".join(args), done.stderr.strip()))
            addrs[k] = (mine, theirs)
        ip("-n", name, "link", "set", "lo", "up")
        yield {"name": name, "client": addrs[0][1], "redis": addrs[1][0],
               "cut": links[1][0]}
    finally:
        ip("netns", "del", name)           # (takes the namespace's ends of the pairs along)
        for here, _ in links:
            if ip("link", "show", here).returncode == 0:
                ip("link", "del", here)


def test_node_cut_off_from_redis_is_unhealthy_then_catches_up(netns):
    require_redis()
    nodes = Nodes()
    with redislab.Standalone(args=["--bind", HOST, netns["redis"], "--protected-mode", "no"]) \
            as redis:
        try:
            cut = NsServer(netns["name"], netns["client"],
                           *redis_flags("redis://%s:%d" % (netns["redis"], redis.port))).start()
            nodes.started.append(cut)
            other = nodes.start(redis.url)
            ledger = Ledger()
            ident = "netcut"
            subs = [Poller(ident, [cut]), WsSubscriber(ident, [cut]), Poller(ident, [other])]
            start_all(subs)
            pub = Publishing(ledger, [other], [ident], "n", interval=0.02)
            pub.start()
            time.sleep(0.5)
            assert health(cut)[0] == 200
            down_at = time.monotonic()
            assert ip("link", "set", netns["cut"], "down").returncode == 0
            try:
                unhealthy = wait_for(lambda: health(cut)[0] == 503 and time.monotonic(),
                                     10, message="the cut node unhealthy") - down_at
                refused = post(cut.app, ident, "while cut", host=cut.host)
                assert health(other)[0] == 200
                time.sleep(max(0.0, down_at + POLL + 1.0 - time.monotonic()))
            finally:
                assert ip("link", "set", netns["cut"], "up").returncode == 0
            up_at = time.monotonic()
            healthy = wait_for(lambda: health(cut)[0] == 200 and time.monotonic(),
                               15, message="the cut node healthy again") - up_at
            time.sleep(0.5)
            pub.stop()
            assert settle(subs, ledger), {i: missing(s, ledger) for i, s in enumerate(subs)}
            stop_all(subs)
            figure("network cut: /health 503 after (s)", unhealthy)
            figure("network cut: /health 200 after the link is back (s)", healthy)
            assert refused[0] == 503 and "retry-after" in refused[1], refused
            during = [t for t, port, _, _, status, _, _ in ledger.attempts
                      if down_at < t < up_at and status == 202]
            assert during, "nothing was published while the node was cut off"
            assert all(not s.errors for s in subs), [dict(s.errors) for s in subs]
            assert_exactly_once(subs, ledger)
            assert totals(cut)["redis_resubscribes"] >= 1
        finally:
            bugs = nodes.stop()
    assert not bugs, bugs


# == 8. tools/chaos.py --cluster, short =======================================================

CHAOS = os.path.join(ROOT, "tools", "chaos.py")


def test_chaos_cluster_short_run_loses_nothing(tmp_path):
    """A Redis Cluster and three nodes; 40 subscribers (a third on WebSocket) that move
    between nodes with their cursors; publishers that retry 503s with their keys; a master
    SIGKILLed (back later as a replica), a node SIGKILLed (started again), every pub/sub
    link killed.  The long run: python3 tools/chaos.py --cluster (see its --help)."""
    require_redis()
    record = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, CHAOS, "--cluster", "-n", "40", "--nodes", "3",
                           "--workers", "2", "--duration", "8", "--action-every", "2.5",
                           "--actions", "master,node,pubsub", "--redis-wait-replicas", "1",
                           "--seed", "1", "--json", str(record)],
                          cwd=ROOT, capture_output=True, text=True, timeout=150)
    output = proc.stdout[-5000:] + proc.stderr[-3000:]
    assert record.exists(), output
    rec = json.loads(record.read_text())
    print("\n" + proc.stdout)
    assert (rec["lost"], rec["duplicated"], rec["out_of_order"]) == (0, 0, 0), output
    assert rec["hung"] == 0 and rec["checks"].get("seq mismatch", 0) == 0, output
    # It did what it says: every action happened and was survived, messages flowed.
    assert rec["actions_done"] == {"master": 1, "node": 1, "pubsub": 1}, output
    assert not [x for x in rec["actions"] if "error" in x or "skipped" in x], output
    assert rec["published"]["confirmed"] > 500 and rec["deliveries"] > 2000, output
    assert rec["subscriber_counts"].get("moves", 0) > 20, output
    assert proc.returncode == 0, output
    assert not [pid for pid in rec["server_pids"] if alive(pid)], "processes left behind"

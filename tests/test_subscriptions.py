"""The subscription core (megacomet/subscriptions.py) on real servers: the seams where the
five defects found by outside testing lived.

1. a multiplexed poll answers with what *every* one of its ids has buffered;
2. an answer never reports ``last`` below the ``since`` it was asked with (a poll whose
   home is stalled, or whose worker is replaced by a reload, while it waits);
3. per-connection state ends with its connection (a refused JSONP poll's callback and
   cursors must not reach the next client accepted on its fd);
4. an id's seqs count in an epoch of the id's own: an id that expired, was forgotten and
   is published to again starts a new epoch, so no cursor skips what is buffered;
5. a ``since`` above an id's last seq counts as 0 with several ids too.
"""

import concurrent.futures
import http.client
import json
import os
import signal
import socket
import threading
import time

from conftest import read_response, wait_for
from test_bad_input import uid
from test_hardening import home_of


def poll(server, path, wait=15):
    status, _, body = server.request("GET", path, port=server.client, timeout=wait)
    assert status == 200, (path, status, body)
    return json.loads(body)


def distinct_homes(server, n):
    """n ids whose homes are n different workers."""
    homes = {}
    while len(homes) < n:
        ident = uid("h")
        homes.setdefault(home_of(server, ident), ident)
    return list(homes.values())


# -- 1. several ids: one answer with everything buffered --------------------------------

def test_a_multiplexed_poll_answers_with_every_ids_buffer(server_factory):
    server = server_factory(workers=4)
    for _ in range(5):
        ids = [uid("m%d" % i) for i in range(3)]
        seqs = {i: server.pub(i, "to " + i) for i in ids}
        doc = poll(server, "/sub/%s?since=%s" % (",".join(ids), ",".join("%s:0" % i for i in ids)))
        got = {m["id"]: m for m in doc["messages"]}
        assert set(got) == set(ids), doc
        assert doc["last"] == seqs, doc
        for i in ids:
            assert got[i]["data"] == "to " + i


def test_a_multiplexed_poll_with_ids_on_every_home_waits_for_each(server_factory):
    """Ids whose homes are different workers (the first home to answer used to answer the
    poll alone); ids with news and ids without, in one poll."""
    server = server_factory(workers=4)
    ids = distinct_homes(server, 4)              # each has its probe (seq 1, taken off compat)
    extra = uid("quiet")                          # nothing buffered: last 0
    for i in ids:
        server.pub(i, "news for " + i)            # seq 2
    since = ",".join("%s:1" % i for i in ids)
    doc = poll(server, "/sub/%s,%s?since=%s" % (",".join(ids), extra, since))
    assert sorted((m["id"], m["seq"]) for m in doc["messages"]) == sorted((i, 2) for i in ids)
    assert doc["last"] == {**{i: 2 for i in ids}, extra: 0}


# -- 2. last never below since -------------------------------------------------------------

def client_on_live_worker(server):
    """A kept-alive client-port connection answered (so held by a worker that is not stopped)."""
    for _ in range(60):
        sock = socket.create_connection(("127.0.0.1", server.client), timeout=10)
        sock.sendall(b"OPTIONS /sub/x HTTP/1.1\r\nHost: t\r\n\r\n")
        try:
            status, _, _ = read_response(sock, timeout=0.5)
            assert status == 204
            sock.settimeout(10)
            return sock
        except (socket.timeout, OSError):
            sock.close()
    raise AssertionError("every connection landed on the stopped worker")


def test_a_poll_whose_home_is_stalled_answers_its_own_since(server_factory):
    server = server_factory(workers=2)
    ident = uid("stalled")
    home = home_of(server, ident)                 # seq 1
    for i in range(19):
        server.pub(ident, "m%d" % i)              # seqs 2..20
    first = poll(server, "/sub/%s?since=19" % ident)
    assert [m["seq"] for m in first["messages"]] == [20]
    epoch = first["epoch"]
    pid = server.worker_pids()[home]
    os.kill(pid, signal.SIGSTOP)
    def ask(query):
        sock = client_on_live_worker(server)
        with sock:
            sock.sendall(b"GET /sub/%s?%s HTTP/1.1\r\nHost: t\r\n\r\n"
                         % (ident.encode(), query.encode()))
            status, _, body = read_response(sock, timeout=5)
        assert status == 200
        return query, json.loads(body)

    try:
        # Four clients at once (each poll waits out its timeout: 1 s).
        queries = ("since=19&timeout=1", "since=19&epoch=%d&timeout=1" % epoch,
                   "since=20&timeout=1", "since=20&epoch=%d&timeout=1" % epoch)
        with concurrent.futures.ThreadPoolExecutor(len(queries)) as pool:
            answers = list(pool.map(ask, queries))
    finally:
        os.kill(pid, signal.SIGCONT)
    for query, doc in answers:
        since = int(query.split("since=")[1].split("&")[0])
        assert doc["messages"] == [] and doc["last"] == since, (query, doc)
        if "epoch=" in query:
            assert doc["epoch"] == epoch, (query, doc)


def test_a_poll_waiting_for_its_home_when_its_worker_stops_answers_its_own_since(server_factory):
    """What a reload does to a poll whose home has not answered yet (SIGTERM: the same
    stop as a reload's), here made to last by stalling the home."""
    server = server_factory(workers=2)
    ident = uid("stopping")
    home = home_of(server, ident)
    for i in range(19):
        server.pub(ident, "m%d" % i)              # seqs 2..20
    pids = server.worker_pids()
    os.kill(pids[home], signal.SIGSTOP)
    try:
        sock = client_on_live_worker(server)
        with sock:
            sock.sendall(b"GET /sub/%s?since=19 HTTP/1.1\r\nHost: t\r\n\r\n" % ident.encode())
            time.sleep(0.3)                       # its SUB waits in the stalled home's ring
            os.kill(pids[1 - home], signal.SIGTERM)
            status, _, body = read_response(sock, timeout=5)
    finally:
        os.kill(pids[home], signal.SIGCONT)
    doc = json.loads(body)
    assert status == 200 and doc["messages"] == [] and doc["last"] == 19, doc


class Repollers:
    """Subscribers that do what the README says: poll again with since=<last> and the epoch,
    each keeping what it received; a publisher that records what was confirmed."""

    def __init__(self, server, n):
        self.server = server
        self.ids = [uid("rl%d" % i) for i in range(n)]
        self.received = {i: [] for i in self.ids}
        self.confirmed = {i: [] for i in self.ids}
        self.errors = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.subscribe, args=(i,), daemon=True)
                        for i in self.ids]
        self.threads.append(threading.Thread(target=self.publish, daemon=True))
        for t in self.threads:
            t.start()

    def subscribe(self, ident):
        """Re-polls on a kept-alive connection, as browsers do: the next poll reaches the
        same worker, a stopping one included, right after the answer."""
        since, epoch, conn = 0, None, None
        while not self.stop.is_set():
            query = "since=%d&timeout=1" % since + ("" if epoch is None else "&epoch=%d" % epoch)
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.server.client, timeout=10)
                conn.request("GET", "/sub/%s?%s" % (ident, query))
                resp = conn.getresponse()
                status, body = resp.status, resp.read()
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                    conn = None
                time.sleep(0.05)                  # a connection reset by a closing listener
                continue
            if status != 200:
                self.errors.append((ident, status, body))
                continue
            doc = json.loads(body)
            if epoch is not None and doc["epoch"] != epoch:
                self.errors.append((ident, "epoch changed", epoch, doc))
            epoch = doc["epoch"]
            self.received[ident] += [m["data"] for m in doc["messages"]]
            since = doc["last"]
        if conn is not None:
            conn.close()

    def publish(self):
        """Batches of one message for each of 8 ids, every 10 ms: most re-polls find news."""
        n = 0
        while not self.stop.is_set():
            batch = []
            for _ in range(8):
                ident = self.ids[n % len(self.ids)]
                batch.append((ident, "%s-%d" % (ident, n)))
                n += 1
            try:
                reply = self.server.pub_batch(batch)
            except (OSError, AssertionError):
                reply = None                      # unconfirmed: may or may not arrive
            if reply and reply["published"] == len(batch):
                for ident, data in batch:
                    self.confirmed[ident].append(data)
            time.sleep(0.01)


def test_reloads_under_load_deliver_nothing_twice_and_lose_nothing(server_factory):
    server = server_factory(workers=4)
    load = Repollers(server, 24)
    try:
        for _ in range(3):
            time.sleep(1.0)
            seen = server.stderr().count("reload: done")
            os.kill(server.proc.pid, signal.SIGHUP)
            wait_for(lambda: server.stderr().count("reload: done") > seen, timeout=30,
                     message="a reload")
        time.sleep(1.0)
    finally:
        load.stop.set()
        for t in load.threads:
            t.join(timeout=15)
    assert load.errors == [], load.errors[:5]
    total = sum(len(v) for v in load.confirmed.values())
    assert total > 200, total
    for ident in load.ids:
        got = load.received[ident]
        assert len(got) == len(set(got)), (ident, "delivered twice",
                                           [d for d in set(got) if got.count(d) > 1][:5])
        # Published during the last poll: still buffered, so a poll from 0 has it.
        buffered = {m["data"] for m in poll(server, "/sub/%s?since=0&timeout=1" % ident)["messages"]}
        lost = set(load.confirmed[ident]) - set(got) - buffered
        assert not lost, (ident, "lost", lost)


# -- 3. nothing of a connection outlives it ------------------------------------------------

def test_a_refused_jsonp_poll_leaves_nothing_to_the_next_client_on_its_fd(server_factory):
    server = server_factory("--max-ids", 64, workers=1)
    mine = uid("mine")
    server.pub(mine, "for the next client")
    for i in range(90):                           # the table is full for new subscriptions
        server.pub(uid("fill%d" % i), "x")
    strangers = [uid("s%d" % i) for i in range(16)]
    for _ in range(5):
        status, _, body = server.request(
            "GET", "/sub/%s?callback=cbA&since=%s" % (",".join(strangers),
                                                     ",".join("%s:7" % s for s in strangers)),
            port=server.client)
        assert status == 503, (status, body)
        status, _, body = server.request("GET", "/sub/%s?since=0&timeout=1" % mine,
                                         port=server.client)
        assert status == 200 and not body.startswith(b"/**/"), body
        doc = json.loads(body)
        assert doc["id"] == mine and [m["data"] for m in doc["messages"]] == \
            ["for the next client"], doc
    assert "internal error" not in server.stderr()


# -- 4. an id's own epoch ------------------------------------------------------------------

def test_an_id_that_expired_and_came_back_starts_a_new_epoch(server_factory):
    server = server_factory("--queue-ttl", 2, workers=2)
    ident = uid("ttl")
    assert [server.pub(ident, d) for d in ("a", "b")] == [1, 2]
    doc = poll(server, "/sub/%s?since=0" % ident)
    assert [m["data"] for m in doc["messages"]] == ["a", "b"] and doc["last"] == 2
    old_epoch = doc["epoch"]
    time.sleep(4.0)                               # a and b expire; the id is forgotten
    for d in ("c", "d", "e"):
        server.pub(ident, d)
    doc = poll(server, "/sub/%s?since=2&epoch=%d" % (ident, old_epoch))
    assert [m["data"] for m in doc["messages"]] == ["c", "d", "e"], doc
    assert doc["epoch"] != old_epoch
    again = poll(server, "/sub/%s?since=%d&epoch=%d&timeout=1" % (ident, doc["last"],
                                                                   doc["epoch"]))
    assert again["messages"] == [] and again["epoch"] == doc["epoch"]


# -- 5. since above last, several ids ------------------------------------------------------

def test_a_since_above_last_counts_as_0_with_several_ids(server_factory):
    server = server_factory(workers=2)
    carol, dave = uid("carol"), uid("dave")
    server.pub(carol, "hi carol")
    one = poll(server, "/sub/%s?since=9&timeout=1" % carol)
    assert [m["data"] for m in one["messages"]] == ["hi carol"]
    started = time.monotonic()
    many = poll(server, "/sub/%s,%s?since=%s:9&timeout=5" % (carol, dave, carol))
    assert time.monotonic() - started < 3
    assert [(m["id"], m["data"]) for m in many["messages"]] == [(carol, "hi carol")], many
    assert many["last"] == {carol: 1, dave: 0}


# -- a signed subscription ends with its signature ----------------------------------------

def test_signed_subscriptions_end_when_their_signature_expires(server_factory, tmp_path):
    from megacomet import signing
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect as ws_connect
    from test_streams import Stream
    secret = tmp_path / "secret"
    secret.write_text("k\n")
    server = server_factory("--secret-file", secret, "--heartbeat", 30, workers=2)
    ident = uid("signed")
    query = signing.query(b"k", [ident], 2, time.time())      # expires in about 2 s
    started = time.monotonic()
    stream = Stream(server, "/sse/%s?%s" % (ident, query))
    try:
        with ws_connect("ws://127.0.0.1:%d/ws/%s?%s" % (server.client, ident, query)) as ws:
            server.pub(ident, "before")
            assert stream.message() == (1, "before")
            assert json.loads(ws.recv(timeout=5))["data"] == "before"
            doc = poll(server, "/sub/%s?since=1&timeout=60&%s" % (ident, query))
            assert doc["messages"] == [] and doc["last"] == 1   # answered at exp, not at 60 s
            try:
                ws.recv(timeout=5)
                raise AssertionError("a frame after the signature expired")
            except ConnectionClosed as closed:
                assert closed.rcvd.code == 1008 and "expired" in closed.rcvd.reason
        fields = stream.event()
        while fields and fields[0] != ("event", "error"):
            fields = stream.event()
        assert fields == [("event", "error"), ("data", "signature expired")], fields
    finally:
        stream.close()
    assert time.monotonic() - started < 10
    status, _, body = server.request("GET", "/sub/%s?%s" % (ident, query), port=server.client)
    assert status == 403 and b"expired" in body


def test_a_multiplexed_poll_whose_other_home_is_stalled_still_hands_over_what_it_has(
        server_factory):
    """One home answered with news, the other is stalled: at the timeout the poll answers
    with that news, and its last counts exactly what it hands over."""
    server = server_factory(workers=2)
    homes = {}
    while len(homes) < 2:
        ident = uid("st")
        homes.setdefault(home_of(server, ident), ident)      # each has seq 1 (the probe)
    pids = server.worker_pids()
    live, stalled = homes[0], homes[1]
    server.pub(live, "news")
    os.kill(pids[1], signal.SIGSTOP)
    try:
        sock = client_on_live_worker(server)
        with sock:
            sock.sendall(b"GET /sub/%s,%s?since=%s:1,%s:1&timeout=1 HTTP/1.1\r\nHost: t\r\n\r\n"
                         % (live.encode(), stalled.encode(), live.encode(), stalled.encode()))
            status, _, body = read_response(sock, timeout=5)
    finally:
        os.kill(pids[1], signal.SIGCONT)
    doc = json.loads(body)
    assert status == 200
    assert [(m["id"], m["data"]) for m in doc["messages"]] == [(live, "news")], doc
    assert doc["last"] == {live: 2, stalled: 1}, doc

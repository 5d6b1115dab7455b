"""Crash safety and graceful stop, end to end: real server processes, real sockets.

* SIGKILL of one worker under load (a thread publishing through the batch
  API, threads long-polling): the supervisor restarts it quickly, the other
  workers' held connections survive and still receive messages, every
  buffered message survives, and round trips work on every worker after.
* The same worker killed again and again as soon as it is back: the
  crash-loop backoff stays short, /health says 503 while it is down.
* SIGTERM to the supervisor with held long-polls: each gets the timeout
  answer, the supervisor exits 0 within 5 s, and no worker survives it.
"""

import http.client
import json
import os
import signal
import socket
import threading
import time
import uuid

import pytest

from conftest import is_closed, read_response, wait_for


def uid(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:10])


def open_poll(port, path):
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: test\r\n\r\n" % path.encode())
    return sock


def try_stats(server):
    try:
        return server.stats()
    except (OSError, http.client.HTTPException, AssertionError):
        return None


def try_health(server):
    try:
        return server.request("GET", "/health", timeout=2)[0]
    except (OSError, http.client.HTTPException):
        return None


def pid_at(server, index):
    stats = try_stats(server)
    return None if stats is None else stats["workers"][index]["pid"]


def kill_and_wait_restart(server, index, timeout=3.0):
    """SIGKILL worker ``index``; return (new pid, seconds to restart, /health statuses seen)."""
    old = pid_at(server, index)
    assert old, "worker %d is not running" % index
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    seen = set()
    while time.monotonic() - killed < timeout:
        seen.add(try_health(server))
        pid = pid_at(server, index)
        if pid and pid != old:
            return pid, time.monotonic() - killed, seen
        time.sleep(0.005)
    raise AssertionError("worker %d (pid %d) not restarted within %.1f s" % (index, old, timeout))


def process_gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def round_trip_every_worker(server, per_worker=12, within=5.0):
    """Held polls on every worker get one published message; publishes through many connections work.

    A restarted worker listens a few tenths of a second after its pid shows in /stats, so
    polls that all landed elsewhere are retried for up to ``within`` seconds.
    """
    n = server.workers
    deadline = time.monotonic() + within
    while True:
        wait_for(lambda: server.stats()["totals"]["subscribers"] == 0, timeout=5,
                 message="no poll held before the fan-out")
        ident = uid("fan")
        socks = [open_poll(server.client, "/sub/%s?timeout=30" % ident) for _ in range(per_worker * n)]
        try:
            wait_for(lambda: server.stats()["totals"]["subscribers"] == len(socks), timeout=5,
                     message="every fan-out poll held")
            per = [w["subscribers"] for w in server.stats()["workers"]]
            if not all(per) and time.monotonic() < deadline:
                continue                     # closed by the finally below; try again
            assert all(per), ("a worker holds none of %d polls" % len(socks), per)
            seq = server.pub(ident, "fan out")
            for sock in socks:
                status, _, body = read_response(sock, timeout=5)
                assert status == 200
                assert json.loads(body)["messages"] == [{"seq": seq, "data": "fan out"}]
            break
        finally:
            for sock in socks:
                sock.close()
    ids = [uid("rt") for _ in range(6 * n)]
    for i, ident in enumerate(ids):
        assert server.pub(ident, "rt %d" % i, timeout=5) == 1
    for i, ident in enumerate(ids):
        status, _, body = server.sub(ident, since=0, timeout=2, wait=5)
        assert status == 200
        assert json.loads(body)["messages"] == [{"seq": 1, "data": "rt %d" % i}]


class Load:
    """A thread publishing batches continuously and threads long-polling what it publishes."""

    IDS = 10

    def __init__(self, server, prefix, pollers=2):
        self.server = server
        self.prefix = prefix
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.events = []            # (monotonic time, who, "ok" | "error" | "hang", detail)
        self.received = {}          # id -> seqs seen by pollers
        self.acked = {}             # id -> messages the publisher got a 202 for
        self.threads = [threading.Thread(target=self._publisher, daemon=True)]
        self.threads += [threading.Thread(target=self._poller, args=(k,), daemon=True)
                         for k in range(pollers)]

    def ident(self, j):
        return "%s-%d" % (self.prefix, j)

    def _record(self, who, outcome, detail=""):
        with self.lock:
            self.events.append((time.monotonic(), who, outcome, detail))

    def _call(self, who, function):
        try:
            result = function()
        except socket.timeout:
            self._record(who, "hang")
        except (OSError, http.client.HTTPException) as e:
            self._record(who, "error", repr(e))
        else:
            self._record(who, "ok")
            return result
        time.sleep(0.01)
        return None

    def _publisher(self):
        n = 0
        while not self.stop.is_set():
            lines = []
            idents = []
            for _ in range(20):
                idents.append(self.ident(n % self.IDS))
                lines.append(json.dumps({"id": idents[-1], "data": "p%d" % n}))
                n += 1
            body = "\n".join(lines).encode()
            reply = self._call("pub", lambda: self.server.request("POST", "/pub", body, timeout=5))
            if reply is not None:
                status, _, text = reply
                doc = json.loads(text)
                if status != 202 or doc["published"] != 20:
                    self._record("pub", "error", "%d %r" % (status, text[:200]))
                else:
                    with self.lock:
                        for ident in idents:
                            self.acked[ident] = self.acked.get(ident, 0) + 1

    def _poller(self, k):
        since = {}
        j = k
        while not self.stop.is_set():
            ident = self.ident(j % self.IDS)
            j += 1
            reply = self._call("sub", lambda: self.server.sub(ident, since=since.get(ident, 0),
                                                               timeout=1, wait=5))
            if reply is not None:
                status, _, body = reply
                if status != 200:
                    self._record("sub", "error", "%d %r" % (status, body[:200]))
                    continue
                doc = json.loads(body)
                since[ident] = doc["last"]
                with self.lock:
                    self.received.setdefault(ident, set()).update(m["seq"] for m in doc["messages"])

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(10)
        assert not any(t.is_alive() for t in self.threads), "a load thread is stuck"

    def count(self, who, outcome, after=0.0):
        with self.lock:
            return sum(1 for t, w, o, _ in self.events if w == who and o == outcome and t >= after)

    def details(self, outcome):
        with self.lock:
            return [(w, d) for _, w, o, d in self.events if o == outcome]


# -- SIGKILL under load ---------------------------------------------------------------

@pytest.mark.parametrize("workers", [2, 4])
def test_sigkill_worker_under_load(server_factory, workers):
    server = server_factory("--max-ids", 100000, "--shm-mb", 32, workers=workers)
    assert try_health(server) == 200

    # Buffered before the kill: 200 messages for 200 ids (some of them at the victim's home).
    keep = [("keep-%d" % i, "kept %d" % i) for i in range(200)]
    assert server.pub_batch(keep) == {"published": 200, "errors": []}

    # Held long-polls spread over every worker; how many each worker holds.
    held = {}
    for i in range(16 * workers):
        ident = uid("held%d" % i)
        held[ident] = open_poll(server.client, "/sub/%s?timeout=120" % ident)
    try:
        wait_for(lambda: server.stats()["totals"]["subscribers"] == len(held), timeout=5,
                 message="every poll held")
        per_worker = [w["subscribers"] for w in server.stats()["workers"]]
        assert all(per_worker), per_worker
        # One worker twice in a row, then another one (never all: some polls must survive).
        victims = [0, 0] + ([workers - 1] if workers > 2 else [])
        closed_so_far = set()
        dead = set()
        with Load(server, uid("load")) as load:
            time.sleep(0.5)
            assert load.count("pub", "ok") > 0 and load.count("sub", "ok") > 0, load.events[:5]
            restarted_at = 0.0
            for round_, victim in enumerate(victims):
                if round_ != 1:                 # round 1: killed again as soon as it is back
                    time.sleep(0.5)             # under load for a while
                pid, took, _ = kill_and_wait_restart(server, victim)
                assert took <= 2.0, "restart took %.2f s" % took
                restarted_at = time.monotonic()
                # Exactly the victim's held polls are gone; every other one is still open.
                expected = 0 if victim in dead else per_worker[victim]
                dead.add(victim)

                def newly_closed():
                    return {i for i, s in held.items() if i not in closed_so_far and is_closed(s)}
                wait_for(lambda: len(newly_closed()) >= expected, timeout=3,
                         message="the victim's %d held polls to be closed" % expected)
                time.sleep(0.2)
                gone = newly_closed()
                assert len(gone) == expected, (victim, len(gone), expected, per_worker)
                closed_so_far |= gone
                wait_for(lambda: try_health(server) == 200, timeout=3, message="/health 200 again")
            time.sleep(1.0)                     # load goes on after the last restart
        print("load: %d publishes, %d polls, errors: %r" % (load.count("pub", "ok"), load.count("sub", "ok"),
                                                            load.details("error")))
        assert not load.details("hang"), ("requests that never got an answer", load.details("hang"))
        assert load.count("pub", "ok", after=restarted_at) > 0, "no publish worked after the restarts"
        assert load.count("sub", "ok", after=restarted_at) > 0, "no poll worked after the restarts"
        # Only requests caught by a kill may fail: a handful per kill.
        assert len(load.details("error")) <= 6 * len(victims), load.details("error")

        # The survivors' held polls are still held, and still receive what is published.
        survivors = {i: s for i, s in held.items() if i not in closed_so_far}
        assert len(survivors) == len(held) - sum(per_worker[v] for v in dead)
        assert survivors
        wait_for(lambda: server.stats()["totals"]["subscribers"] == len(survivors), timeout=5,
                 message="the survivors counted as held")
        reply = server.pub_batch([(i, "after the kill %s" % i) for i in survivors])
        assert reply == {"published": len(survivors), "errors": []}
        for ident, sock in survivors.items():
            status, _, body = read_response(sock, timeout=5)
            assert status == 200, (ident, status, body)
            assert json.loads(body)["messages"] == [{"seq": 1, "data": "after the kill %s" % ident}]
    finally:
        for sock in held.values():
            sock.close()

    # Every buffered message survived.
    for ident, data in keep:
        status, _, body = server.sub(ident, since=0, timeout=1, wait=5)
        assert status == 200
        assert json.loads(body)["messages"] == [{"seq": 1, "data": data}], ident

    # Every acknowledged publish of the load got its seq; the pollers saw messages.
    assert any(load.received.values())
    for j in range(Load.IDS):
        ident = load.ident(j)
        last = json.loads(server.sub(ident, since=0, timeout=1)[2])["last"]
        assert last >= load.acked.get(ident, 0), (ident, last, load.acked.get(ident))
    # Nothing deadlocked: the load's ids still take messages, and round trips on every worker.
    assert server.pub(ident, "last word") == last + 1
    round_trip_every_worker(server)
    log = server.stderr()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def test_same_worker_killed_repeatedly_restarts_quickly(server_factory):
    server = server_factory("--max-ids", 100000, "--shm-mb", 32, workers=2)
    assert server.pub("crashloop", "before") == 1
    health_seen = set()
    delays = []
    for _ in range(4):                       # killed again as soon as it is back each time
        pid, took, seen = kill_and_wait_restart(server, 1, timeout=5.0)
        delays.append(took)
        health_seen |= seen
    assert all(d <= 3.0 for d in delays), delays
    assert 503 in health_seen, ("/health never said 503 while a worker was down", health_seen)
    wait_for(lambda: try_health(server) == 200, timeout=5, message="/health 200 again")
    status, _, body = server.sub("crashloop", since=0, timeout=1)
    assert json.loads(body)["messages"] == [{"seq": 1, "data": "before"}]
    round_trip_every_worker(server)
    assert "Traceback" not in server.stderr()


# -- graceful stop ----------------------------------------------------------------------

@pytest.mark.parametrize("workers", [2, 4])
def test_sigterm_answers_held_polls_and_exits(server_factory, workers):
    server = server_factory("--max-ids", 100000, "--shm-mb", 32, workers=workers)
    busy = uid("busy")
    assert server.pub(busy, "old news") == 1
    polls = []                               # (socket, kind, id, expected last)
    for i in range(8 * workers):
        ident = uid("term%d" % i)
        polls.append((open_poll(server.client, "/sub/%s?timeout=120" % ident), "sub", ident, 0))
    for i in range(2 * workers):
        polls.append((open_poll(server.client, "/sub/%s?since=1&timeout=120" % busy), "sub", busy, 1))
    for i in range(4 * workers):
        ident = uid("termjs%d" % i)
        polls.append((open_poll(server.client, "/%s.js" % ident), "js", ident, None))
    try:
        wait_for(lambda: server.stats()["totals"]["subscribers"] == len(polls), timeout=5,
                 message="every poll held")
        per_worker = [w["subscribers"] for w in server.stats()["workers"]]
        assert all(per_worker), per_worker
        pids = server.worker_pids()
        proc = server.proc
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for sock, kind, ident, last in polls:
            status, headers, body = read_response(sock, timeout=max(0.1, 5 - (time.monotonic() - started)))
            if kind == "sub":
                assert status == 200, (ident, status, body)
                doc = json.loads(body)
                assert type(doc.pop("epoch")) is int
                assert doc == {"id": ident, "messages": [], "last": last}
            else:
                assert (status, body) == (200, b""), (ident, status, body)
        code = proc.wait(timeout=max(0.1, 5 - (time.monotonic() - started)))
        took = time.monotonic() - started
    finally:
        for sock, *_ in polls:
            sock.close()
    assert code == 0
    assert took < 5.0, took
    wait_for(lambda: all(process_gone(pid) for pid in pids), timeout=1,
             message="every worker to be gone")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.client), timeout=2).close()
    assert "Traceback" not in server.stderr()


def test_publish_whose_home_stops_answering_gets_503_unconfirmed(server_factory):
    """A batch waiting on a home that stopped (SIGSTOP: it neither dies nor answers)
    is answered 503 with what was confirmed, instead of hanging; once the home runs
    again it stores what was waiting for it, and `received` meets `published`."""
    server = server_factory("--worker-timeout", 120, workers=2)   # stopped, not replaced
    stopped = server.worker_pids()[1]
    os.kill(stopped, signal.SIGSTOP)
    try:
        reply = None
        for attempt in range(20):                 # connections that land on the stopped worker hang
            body = "\n".join(json.dumps({"id": "stop%d-%d" % (attempt, i), "data": "x"})
                             for i in range(60)).encode()
            conn = http.client.HTTPConnection(server.host, server.app, timeout=1)
            try:
                # A /health answered: a running worker holds this connection (on the stopped
                # one it would hang as the batch would, for nothing).  The batch follows on it.
                try:
                    conn.request("GET", "/health")
                    conn.getresponse().read()
                except OSError:
                    continue
                conn.sock.settimeout(6)
                started = time.monotonic()
                try:
                    conn.request("POST", "/pub", body)
                    resp = conn.getresponse()
                    reply = resp.status, json.loads(resp.read()), time.monotonic() - started
                except OSError as e:
                    raise AssertionError("the batch got no answer from a running worker in "
                                         "%.1f s: %r" % (time.monotonic() - started, e))
            finally:
                conn.close()
            break
        assert reply is not None, "every connection landed on the stopped worker"
        status, doc, took = reply
        assert status == 503, doc
        assert doc["unconfirmed"] > 0 and doc["published"] > 0, doc      # ids of both homes
        assert doc["published"] + doc["unconfirmed"] == 60 and doc["errors"] == []
        assert 2.5 <= took < 6, took
    finally:
        os.kill(stopped, signal.SIGCONT)
    wait_for(lambda: server.stats()["totals"]["received"] == server.stats()["totals"]["published"],
             timeout=5, message="the stopped home catching up")


def test_a_worker_that_stops_turning_its_loop_is_replaced(server_factory):
    """SIGSTOP stands for an endless loop or a blocking call: the worker looks alive but
    serves nobody.  /health says so meanwhile; the supervisor replaces it after
    --worker-timeout, and its clients reconnect and resume with since."""
    server = server_factory("--worker-timeout", "2", "--poll-timeout", "30", workers=2)
    ident = uid("frozen")
    seq = server.pub(ident, "before")
    pids = server.worker_pids()
    victim = pids[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        started = time.monotonic()
        wait_for(lambda: try_health(server) == 503, timeout=5, message="/health to see it")
        new = wait_for(lambda: (lambda p: p if p and p != victim else None)(pid_at(server, 0)),
                       timeout=8, message="the frozen worker's replacement")
        took = time.monotonic() - started
        assert 2.0 <= took <= 6.0, took
    finally:
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:
            pass
    wait_for(lambda: try_health(server) == 200, timeout=5, message="/health to recover")
    assert server.worker_pids()[1] == pids[1]          # the other worker was left alone
    assert server.stats()["workers"][0]["restarts"] == 1
    assert "has not turned its loop" in server.stderr()
    for _ in range(6):                                 # every worker serves; nothing was lost
        status, _, body = server.sub(ident, since=seq - 1, wait=5)
        assert status == 200 and json.loads(body)["messages"][0]["data"] == "before"

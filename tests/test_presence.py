"""What the application can ask (issue 17): GET /presence/<id>, POST /presence, GET
/info/<id>, and the publish answer's "subscribers".

First on in-process workers (tests/inprocess.py): the COUNT and RECOUNT records between
holders and homes, record by record, restarts included.  Then the whole server (2 and 4
workers): long-polls, EventSource and WebSocket subscribers spread over the workers, a
holder and a home SIGKILLed.
"""

import base64
import itertools
import json
import os
import signal
import socket
import time
from unittest import mock

import pytest

from conftest import wait_for
from inprocess import (FakeWorker, advance, deliver, feed, hang_up, http_request, ids_at,
                       open_connection, read_records_to, response, settle, workers)
from megacomet import appport, protocols, records, server as assembly, shmqueue, worker
from megacomet.records import COUNT_FINAL, COUNT_FULL

FD = 100
_app_fds = itertools.cycle(range(600, 1000))   # (fds of app connections in process)


def key(ident):
    return shmqueue.id_key(ident)


def poll(w, ident, fd=FD, query="?timeout=100"):
    """A long-poll of ident (an id, or several joined with ",") held by w on fd."""
    open_connection(w, fd)
    feed(w, fd, http_request("GET", "/sub/%s%s" % (ident.decode(), query)))


def tick(*ws):
    """Every worker's tick (250 ms later), then the records they sent, to their handlers."""
    for w in ws:
        advance(w, 0.25)
    settle(*ws)


def app_request(method, target, *headers, body=None):
    """A request to the app port, with a Host it answers (the Host check)."""
    lines = ["%s %s HTTP/1.1" % (method, target), "Host: localhost", *headers]
    if body is not None:
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def ask(w, method, target, body=None):
    """One app-port request to w: its response."""
    fd = next(_app_fds)
    open_connection(w, fd, "app")
    feed(w, fd, app_request(method, target, body=body))
    return response(w, fd, head=method == "HEAD")


def presence(w, ident):
    answer = ask(w, "GET", "/presence/" + ident.decode())
    assert answer.status == 200 and answer.json()["id"] == ident.decode()
    return answer.json()["subscribers"]


def counts_sent(w, dst):
    """The COUNT records w sent dst and that were not delivered yet: (flags, [(id, n)])."""
    return [(r[1], r[3]) for r in read_records_to(w, dst) if r[0] == "COUNT"]


def successor(old):
    """A worker that takes over old's index after old died (``Worker.run`` up to its loop):
    its partition repaired, its on_start steps run, over the same shared memory."""
    with mock.patch.object(worker, "Worker", FakeWorker):
        w = assembly.assemble(old.index, old.cfg, old.region, [-1] * old.region.workers)
    w.app = w.protocols[protocols.APP_HTTP].readable.__self__
    w.router = w.app.router
    w.now = old.now
    w.client_cap = len(w.state)
    w.wheel_at = w._tick_of(w.now)
    w.part.repair()
    assert w.stats.get("started_ms")              # a predecessor ran
    for start in w.on_start:
        start()
    return w


@pytest.fixture
def pair():
    w0, w1 = workers(2)
    w0.a, w0.b = ids_at(w0, 0, prefix="a")[0], ids_at(w0, 1, prefix="b")[0]
    return w0, w1


# -- in process: counting ---------------------------------------------------------------------

def test_each_holder_reports_its_changes_at_the_tick_once_per_connection_and_id(pair):
    w0, w1 = pair
    a, b = w0.a, w0.b
    poll(w1, a, 100)
    poll(w1, a, 101)
    poll(w1, a + b"," + b, 102)                   # several ids: counted once for each
    poll(w0, a, 103)
    settle(w0, w1)                                # the SUBs: registered at the homes
    assert presence(w1, a) == 0                   # nothing reported before the tick
    for w in (w0, w1):
        advance(w, 0.25)
    assert counts_sent(w1, 0) == [(0, [(a, 3)])]  # one record per home and tick
    assert counts_sent(w1, 1) == [(0, [(b, 1)])]
    assert counts_sent(w0, 0) == [(0, [(a, 1)])]  # (its own ids too, through its FIFO)
    settle(w0, w1)
    assert (presence(w0, a), presence(w1, a), presence(w0, b)) == (4, 4, 1)
    advance(w1, 0.25)
    assert counts_sent(w1, 0) == []               # nothing changed: nothing sent


def test_a_poll_answered_and_back_within_the_tick_changes_nothing(pair):
    w0, w1 = pair
    a = w0.a
    poll(w1, a)
    tick(w0, w1)
    assert presence(w1, a) == 1
    w0._handle(0, records.pub(0, 0, 0, a, b"news"))   # answers the poll
    deliver(w0, w1)
    assert response(w1, FD).status == 200
    feed(w1, FD, http_request("GET", "/sub/%s?since=1&timeout=100" % a.decode()))
    advance(w1, 0.25)
    assert counts_sent(w1, 0) == []
    settle(w0, w1)
    assert presence(w1, a) == 1


def test_a_fall_is_reported_a_tick_later_then_the_id_is_forgotten(pair):
    w0, w1 = pair
    a = w0.a
    poll(w1, a)
    tick(w0, w1)
    hang_up(w1, FD)
    advance(w1, 0.25)                             # it may come back: not yet
    assert [r[0] for r in read_records_to(w1, 0)] == ["UNSUB"]
    settle(w0, w1)
    assert presence(w1, a) == 1
    assert w0.part.find(key(a)) >= 0              # a count above 0 keeps the id
    advance(w1, 0.25)
    assert counts_sent(w1, 0) == [(0, [(a, -1)])]
    settle(w0, w1)
    assert presence(w1, a) == 0
    assert w0.part.find(key(a)) == -1             # nothing buffered, nobody: forgotten


def test_a_poll_that_comes_back_within_two_ticks_keeps_the_count(pair):
    w0, w1 = pair
    a = w0.a
    poll(w1, a)
    tick(w0, w1)
    hang_up(w1, FD)
    tick(w0, w1)
    poll(w1, a, 101)
    advance(w1, 0.25)
    assert counts_sent(w1, 0) == []
    settle(w0, w1)
    assert presence(w1, a) == 1


def test_a_count_for_an_id_the_home_does_not_know_is_dropped(pair):
    w0, w1 = pair
    ghost = ids_at(w0, 0, prefix="ghost")[0]
    w0._handle(1, records.count_header() + records.count_entry(ghost, 2))
    assert w0.part.find(key(ghost)) == -1 and presence(w0, ghost) == 0


def test_long_count_records_are_split_to_fit_the_ring(pair):
    w0, w1 = pair
    many = ids_at(w0, 0, count=300, prefix="x" * 100)
    for n, ident in enumerate(many):
        poll(w1, ident, 200 + n)
    settle(w0, w1)
    advance(w1, 0.25)
    sent = counts_sent(w1, 0)
    assert len(sent) > 1 and sum(len(entries) for _, entries in sent) == 300
    limit = w1.outbox[0].size // 4
    assert all(len(r) <= limit for r in w1.sent[0])
    settle(w0, w1)
    assert all(w0.part.subscribers(key(ident)) == 1 for ident in many)


# -- in process: restarts ---------------------------------------------------------------------

def test_a_recount_zeroes_the_counts_and_drops_changes_until_each_workers_answer(pair):
    w0, w1 = pair
    a = w0.a
    poll(w1, a, 100)
    poll(w1, a, 101)
    tick(w0, w1)
    assert presence(w0, a) == 2
    w0.router.recount()                           # (what a RESET from any worker starts)
    assert presence(w0, a) == 0
    generation = w0.router.count_generation
    assert read_records_to(w0, 1) == [("RECOUNT", generation)]
    poll(w1, a, 102)
    settle(w1)                                    # (w1's own records only)
    advance(w1, 0.25)                             # a change sent before w1 saw the RECOUNT ...
    assert counts_sent(w1, 0) == [(0, [(a, 1)])]
    deliver(w0, w1)                               # ... and its answer, after it
    assert counts_sent(w1, 0) == [(0, [(a, 1)]), (COUNT_FULL | COUNT_FINAL, [(a, 3)])]
    settle(w0, w1)
    assert presence(w0, a) == 3                   # not 4: the change was in the answer
    tick(w0, w1)
    assert presence(w0, a) == 3


def test_an_answer_to_an_earlier_recount_is_dropped(pair):
    w0, w1 = pair
    a = w0.a
    poll(w1, a)
    tick(w0, w1)
    w0.router.recount()
    w0.router.recount()                           # a second restart before the answers
    settle(w0, w1)                                # w1 answers both: only the second counts
    assert presence(w0, a) == 1


def test_a_restarted_holders_share_leaves_the_counts(pair):
    w0, w1 = pair
    a, b = w0.a, w0.b
    poll(w1, a, 100)
    poll(w1, a, 101)
    poll(w1, b, 102)
    poll(w0, a, 103)
    poll(w0, b, 104)
    tick(w0, w1)
    assert (presence(w0, a), presence(w0, b)) == (3, 2)
    new = successor(w1)                           # w1 was killed: its connections are gone
    settle(w0, new)
    assert (presence(w0, a), presence(new, a), presence(w0, b)) == (1, 1, 1)
    tick(w0, new)
    assert (presence(w0, a), presence(w0, b)) == (1, 1)


def test_a_restarted_home_zeroes_its_counts_and_every_worker_reports_again(pair):
    w0, w1 = pair
    a, b = w0.a, w0.b
    poll(w1, a, 100)
    poll(w1, a, 101)
    poll(w0, a, 102)
    poll(w1, b, 103)
    tick(w0, w1)
    assert (presence(w1, a), presence(w1, b)) == (3, 1)
    poll(w1, a, 104)                              # a change on its way to the dead home
    advance(w1, 0.25)
    w0.sent.clear()                               # (what the dead home had not sent is lost)
    new = successor(w0)                           # its connections (fd 102) are gone
    assert presence(w1, a) == 0                   # zeroed until the reports come
    settle(new, w1)
    assert (presence(w1, a), presence(w1, b)) == (3, 1)
    tick(new, w1)
    assert (presence(w1, a), presence(w1, b)) == (3, 1)


# -- in process: the app port -------------------------------------------------------------------

def test_a_publish_answer_says_how_many_subscribers_its_id_had(pair):
    w0, w1 = pair
    a, b = w0.a, w0.b
    fd = next(_app_fds)
    open_connection(w1, fd, "app")
    feed(w1, fd, app_request("POST", "/pub/" + a.decode(), body=b"nobody yet"))
    settle(w0, w1)
    assert response(w1, fd).json() == {"id": a.decode(), "seq": 1, "subscribers": 0}
    for n in range(3):
        poll(w0 if n else w1, a, 100 + n, "?since=1&timeout=100")
    tick(w0, w1)
    feed(w1, fd, app_request("POST", "/pub/" + a.decode(), body=b"three"))
    settle(w0, w1)
    assert response(w1, fd).json() == {"id": a.decode(), "seq": 2, "subscribers": 3}
    line = json.dumps({"id": b.decode(), "data": "x"}).encode()
    feed(w1, fd, app_request("POST", "/pub", body=line))
    settle(w0, w1)
    assert response(w1, fd).json() == {"published": 1, "errors": []}   # a batch: not said


def test_presence_of_many_ids_as_a_json_array_or_lines(pair):
    w0, w1 = pair
    a, b = w0.a, w0.b
    poll(w1, a, 100)
    poll(w0, b, 101)
    poll(w1, b, 102)
    tick(w0, w1)
    want = {a.decode(): 1, b.decode(): 2, "nobody": 0}
    answer = ask(w0, "POST", "/presence", json.dumps(list(want)).encode())
    assert (answer.status, answer.json()) == (200, want)
    answer = ask(w1, "POST", "/presence", "\r\n".join(want).encode() + b"\n\n")
    assert (answer.status, answer.json()) == (200, want)
    assert ask(w1, "POST", "/presence", b"").json() == {}


@pytest.mark.parametrize("method, target, body, status", [
    ("POST", "/presence", b'["ok", "not ok"]', 400),
    ("POST", "/presence", b"ok\nnot/ok\n", 400),
    ("POST", "/presence", b'["ok", 3]', 400),
    ("POST", "/presence", b'[1', 400),
    ("POST", "/presence", b"\n".join(b"i%d" % n for n in range(appport.PRESENCE_MAX + 1)), 413),
    ("GET", "/presence", None, 405),
    ("POST", "/presence/a", b"", 405),
    ("GET", "/presence/" + "x" * 129, None, 400),
    ("GET", "/info/a,b", None, 400),
    ("DELETE", "/info/a", None, 405),
])
def test_bad_questions_are_refused(pair, method, target, body, status):
    w0, _ = pair
    assert ask(w0, method, target, body).status == status


def test_info_says_last_seq_buffered_messages_subscribers_and_epoch(pair):
    w0, w1 = pair
    a = w0.a
    for n in range(3):
        w0._handle(0, records.pub(0, 0, 0, a, b"m%d" % n))
    poll(w1, a, 100, "?since=3&timeout=100")
    tick(w0, w1)
    epoch = w0.part.peek(key(a))[1]
    answer = ask(w1, "GET", "/info/" + a.decode())
    assert answer.json() == {"id": a.decode(), "last": 3, "buffered": 3, "subscribers": 1,
                             "epoch": epoch}
    assert ask(w1, "GET", "/info/nobody").json() == {
        "id": "nobody", "last": 0, "buffered": 0, "subscribers": 0, "epoch": 0}
    assert ask(w1, "HEAD", "/info/" + a.decode()).status == 200


def test_presence_needs_the_app_token_when_there_is_one():
    w, = workers(1, app_token="s3cret")
    assert ask(w, "GET", "/presence/a").status == 401
    fd = next(_app_fds)
    open_connection(w, fd, "app")
    feed(w, fd, app_request("GET", "/info/a", "Authorization: Bearer s3cret"))
    assert response(w, fd).status == 200


# -- the whole server ------------------------------------------------------------------------

_uids = itertools.count()


def uid(prefix="p"):
    return "%s_%d_%d" % (prefix, os.getpid(), next(_uids))


def held_poll(server, path):
    """A long-poll (GET ``path``, held: the id has nothing buffered): its socket."""
    sock = socket.create_connection(("127.0.0.1", server.client), timeout=10)
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode())
    return sock


def event_source(server, path):
    sock = socket.create_connection(("127.0.0.1", server.client), timeout=10)
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n"
                 % path.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def websocket(server, path):
    sock = socket.create_connection(("127.0.0.1", server.client), timeout=10)
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                 % (path.encode(), base64.b64encode(os.urandom(16))))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


TRANSPORTS = {"poll": lambda s, i: held_poll(s, "/sub/%s?timeout=100" % i),
              "sse": lambda s, i: event_source(s, "/sse/" + i),
              "ws": lambda s, i: websocket(s, "/ws/" + i)}


def get_json(server, path):
    status, _, body = server.request("GET", path)
    assert status == 200, (status, body)
    return json.loads(body)


def count_of(server, ident):
    return get_json(server, "/presence/" + ident)["subscribers"]


def settles_at(server, ident, expected, timeout=5.0):
    """Wait until ident's count is ``expected``: seconds it took."""
    started = time.monotonic()
    wait_for(lambda: count_of(server, ident) == expected, timeout=timeout,
             message="%s's count to be %d (it is %d)" % (ident, expected, count_of(server, ident)))
    return time.monotonic() - started


def held_by_worker(server):
    return [w["subscribers"] for w in server.stats()["workers"]]


def home_of(server, ident):
    """Which worker stores ident's messages: publish a probe, see whose counter moves."""
    before = [w["published"] for w in server.stats()["workers"]]
    server.pub(ident, "probe")
    moved = wait_for(lambda: [i for i, (x, y) in enumerate(zip(
        before, [w["published"] for w in server.stats()["workers"]])) if y > x], timeout=5,
        message="the probe to be stored")
    assert len(moved) == 1
    return moved[0]


def close_all(socks):
    for sock in socks:
        sock.close()


@pytest.mark.parametrize("workers", [2, 4])
def test_every_transport_on_every_worker_counts_and_leaving_brings_it_back_to_0(
        server_factory, workers):
    server = server_factory(workers=workers)
    ident, other = uid("room"), uid("user")
    socks = []
    try:
        for transport in ("poll", "sse", "ws"):
            socks += [TRANSPORTS[transport](server, ident) for _ in range(6)]
        socks.append(event_source(server, "/sse/%s,%s" % (ident, other)))   # one for each
        socks.append(websocket(server, "/ws/%s,%s" % (other, ident)))
        wait_for(lambda: sum(held_by_worker(server)) == 20, message="20 held")
        assert sum(1 for n in held_by_worker(server) if n) >= 2, held_by_worker(server)
        settles_at(server, ident, 20, timeout=2)
        assert count_of(server, other) == 2
        info = get_json(server, "/info/" + other)
        assert info["epoch"] > 0 and info == {"id": other, "last": 0, "buffered": 0,
                                              "subscribers": 2, "epoch": info["epoch"]}
        status, _, body = server.request("POST", "/pub/" + ident, b"hello")
        assert (status, json.loads(body)) == (202, {"id": ident, "seq": 1, "subscribers": 20})
        # The long-polls were answered; the streams stay.
        settles_at(server, ident, 14, timeout=3)
        close_all(socks[6:12])                    # EventSources leave
        took = settles_at(server, ident, 8, timeout=3)
        print("a departure seen after %.2f s" % took)
        close_all(socks)
        settles_at(server, ident, 0, timeout=3)
        assert count_of(server, other) == 0
    finally:
        close_all(socks)


def test_many_ids_in_one_post_and_info(server_factory):
    server = server_factory(workers=2)
    idents = [uid("many") for _ in range(40)]
    socks = []
    try:
        for n, ident in enumerate(idents[:20]):
            for _ in range(n % 3 + 1):
                socks.append(event_source(server, "/sse/" + ident))
        want = {ident: (n % 3 + 1 if n < 20 else 0) for n, ident in enumerate(idents)}
        wait_for(lambda: json.loads(server.request("POST", "/presence",
                                                   json.dumps(idents).encode())[2]) == want,
                 timeout=3, message="the counts of 40 ids")
        status, _, body = server.request("POST", "/presence", "\n".join(idents).encode())
        assert (status, json.loads(body)) == (200, want)
        server.pub(idents[0], "one")
        server.pub(idents[0], "two")
        info = get_json(server, "/info/" + idents[0])
        assert (info["last"], info["buffered"], info["subscribers"]) == (2, 2, 1)
        assert info["epoch"] > 0
        assert get_json(server, "/info/" + idents[30]) == {
            "id": idents[30], "last": 0, "buffered": 0, "subscribers": 0, "epoch": 0}
    finally:
        close_all(socks)


def restarted(server, index, old_pid, timeout=5.0):
    def back():
        try:
            stats = server.stats_within(1)["workers"][index]
        except OSError:                           # (a connection the dying worker had taken)
            return False
        return stats["pid"] not in (0, old_pid) and stats["responsive"]
    wait_for(back, timeout=timeout, message="worker %d restarted" % index)


def ended(sock):
    """Has the server closed this stream?  What it sent is read (and dropped) to see."""
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def open_spread(server, ident, n):
    """n EventSources of ident, until both workers hold some (connections land where the
    kernel hashes them)."""
    socks = [event_source(server, "/sse/" + ident) for _ in range(n)]
    wait_for(lambda: sum(held_by_worker(server)) == n, message="%d held" % n)
    assert all(held_by_worker(server)), held_by_worker(server)
    return socks


@pytest.mark.parametrize("victim", ["holder", "home"])
def test_a_sigkilled_worker_leaves_the_count_right_once_restarted(server_factory, victim):
    server = server_factory(workers=2)
    ident = uid(victim)
    home = home_of(server, ident)
    index = 1 - home if victim == "holder" else home
    socks = open_spread(server, ident, 16)
    try:
        settles_at(server, ident, 16, timeout=2)
        pid = server.worker_pids()[index]
        os.kill(pid, signal.SIGKILL)
        restarted(server, index, pid)
        wait_for(lambda: any(ended(sock) for sock in socks), timeout=2,
                 message="the killed worker's streams to end")
        alive = [sock for sock in socks if not ended(sock)]
        assert 0 < len(alive) < 16
        took = settles_at(server, ident, len(alive), timeout=3)
        print("%s killed: count right %.2f s after its restart" % (victim, took))
        time.sleep(0.6)                           # and it stays right
        assert count_of(server, ident) == len(alive)
        more = [event_source(server, "/sse/" + ident) for _ in range(4)]
        socks += more
        settles_at(server, ident, len(alive) + 4, timeout=2)
        close_all(socks)
        settles_at(server, ident, 0, timeout=3)
    finally:
        close_all(socks)


def test_a_reload_leaves_the_counts_right(server_factory):
    """SIGHUP replaces every worker in turn (each RESET starts a recount at every home):
    the streams it closes leave the count, new ones count."""
    server = server_factory(workers=2)
    ident = uid("reload")
    socks = open_spread(server, ident, 8)
    try:
        settles_at(server, ident, 8, timeout=2)
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_for(lambda: "reload: done" in server.stderr(), timeout=30, message="the reload")
        wait_for(lambda: all(ended(sock) for sock in socks), timeout=5,
                 message="the old workers' streams to end")
        settles_at(server, ident, 0, timeout=3)
        socks += [event_source(server, "/sse/" + ident) for _ in range(5)]
        settles_at(server, ident, 5, timeout=2)
    finally:
        close_all(socks)

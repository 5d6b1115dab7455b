"""megacomet/appport.py: publishing over HTTP and the binary protocol, and /stats.

The first part runs fake workers (tests/inprocess.py): a publish is answered once its
home's ACK arrives, in request order; a batch names the lines it refused; binary frames
become PUB records; /stats and /metrics add up the workers' counters.  The second part
is whole-server regressions of the app port: answers a publisher has not read yet must
not be lost to a reset when its last answer closes the connection.
"""

import json
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from inprocess import (advance, closed, deliver, feed, hang_up, http_request,
                       lingering, open_connection, read_records_to, reading, response,
                       responses, settle, two_workers_and_ids, workers, written)
from megacomet import appport, protocols, records, shmqueue
from megacomet.worker import BUSY, READING
from test_bad_input import uid
from test_pipelined_publish import connect_to_live_worker, post, two_homes, worker_stopped

FD = 100


@pytest.fixture
def pair():
    return two_workers_and_ids()


@pytest.fixture
def w():
    return workers(1)[0]


def pub(ident, data, *headers):
    return http_request("POST", "/pub/" + ident.decode(), *headers, body=data)


def batch(*lines):
    return http_request("POST", "/pub", body=b"\n".join(lines))


def line(ident, data):
    return json.dumps({"id": ident.decode() if type(ident) is bytes else ident,
                       "data": data}).encode()


def app(w, data, fd=FD):
    open_connection(w, fd, "app")
    feed(w, fd, data)


# -- publishing over HTTP -----------------------------------------------------------------------

def test_a_publish_is_answered_202_once_its_homes_ack_arrives(pair):
    w0, w1 = pair
    b = w0.b
    app(w0, pub(b, b"hello"))
    assert read_records_to(w0, 1) == [("PUB", FD, w0.serial[FD], 0, b, b"hello")]
    assert written(w0, FD) == b"" and w0.app.owes()
    deliver(w0, w1)
    w1.router.flush_acks()                        # the end of the home's turn
    assert read_records_to(w1, 0) == [("ACK", FD, w0.serial[FD], 1, 1, [])]
    deliver(w1, w0)
    answer = response(w0, FD)
    assert (answer.status, answer.headers["content-type"]) == (202, "application/json")
    assert answer.json() == {"id": b.decode(), "seq": 1, "subscribers": 0}
    assert not answer.closes and w0.state[FD] == READING and not w0.app.owes()
    assert w0.counters[shmqueue.RECEIVED] == 1 and w1.counters[shmqueue.PUBLISHED] == 1


def test_pipelined_publishes_are_answered_in_request_order_whatever_order_their_acks_come(pair):
    w0, w1 = pair
    a, b = w0.a, w0.b
    app(w0, pub(b, b"to b") + pub(a, b"to a 1") + pub(a, b"to a 2"))
    assert w0.state[FD] == READING                # all three on their way at once
    settle(w0)                                    # a's home is worker 0: its ACKs come first
    assert written(w0, FD) == b""                 # ... but b's answer is owed before them
    settle(w0, w1)
    got = responses(w0, FD)
    assert [r.json() for r in got] == [{"id": b.decode(), "seq": 1, "subscribers": 0},
                                       {"id": a.decode(), "seq": 1, "subscribers": 0},
                                       {"id": a.decode(), "seq": 2, "subscribers": 0}]


def test_a_request_behind_publishes_waits_for_their_answers(pair):
    w0, w1 = pair
    app(w0, pub(w0.b, b"m") + http_request("GET", "/health") + pub(w0.a, b"later"))
    assert w0.state[FD] == BUSY and not reading(w0, FD)   # nothing more is parsed meanwhile
    assert [r[0] for r in read_records_to(w0, 1)] == ["PUB"]
    assert read_records_to(w0, 0) == []
    settle(w0, w1)
    assert [r.status for r in responses(w0, FD)] == [202, 200, 202]


def test_a_publish_with_connection_close_closes_after_its_answer(w):
    app(w, pub(b"a", b"m", "Connection: close"))
    assert w.state[FD] == BUSY                    # the last request: nothing more is read
    settle(w)
    assert response(w, FD).closes and closed(w, FD)


def test_a_publish_whose_home_never_acks_is_answered_503_after_the_confirm_timeout(pair):
    w0, _ = pair
    app(w0, pub(w0.b, b"lost?") + pub(w0.b, b"lost too?"))
    advance(w0, appport.CONFIRM_TIMEOUT - 0.5)
    assert written(w0, FD) == b""
    advance(w0, 1)
    got = responses(w0, FD)
    assert [(r.status, r.body) for r in got] == [(503, appport.NOT_CONFIRMED)] * 2
    assert got[-1].closes and closed(w0, FD)
    assert "2 messages not confirmed" in w0.logged[-1][1]


def test_an_ack_for_a_publisher_that_left_is_dropped(pair):
    w0, w1 = pair
    app(w0, pub(w0.b, b"m"))
    hang_up(w0, FD)
    assert not w0.app.owes()
    app(w0, http_request("GET", "/health"))     # the next connection on the fd
    written(w0, FD)
    settle(w0, w1)
    assert written(w0, FD) == b""


def test_a_publish_the_home_has_no_room_for_is_503():
    w, = workers(1, max_ids=1)
    for n in range(w.part.nslots):
        w._handle(0, records.pub(0, 0, 0, b"full%d" % n, b"m"))
    app(w, pub(b"one-more", b"m"))
    settle(w)
    answer = response(w, FD)
    assert (answer.status, answer.body) == (503, b"id table full\n")


@pytest.mark.parametrize("data, status, reason", [
    (http_request("GET", "/pub/a"), 405, b"publish with POST"),
    (http_request("PUT", "/pub", body=b""), 405, b"publish with POST"),
    (http_request("POST", "/stats", body=b""), 405, b"method not allowed"),
    (http_request("POST", "/health", body=b""), 405, b"method not allowed"),
    (http_request("GET", "/nothing"), 404, b"no such path"),
    (http_request("POST", "/pub/bad!id", body=b"m"), 400, b"id must be"),
    (http_request("POST", "/pub/a", body=b"\xff"), 400, b"message is not UTF-8"),
    (http_request("POST", "/pub/a", body=b"m" * 1025), 413, b"message over 1024 bytes"),
    (http_request("POST", "/pub/a", body=b"m" * 65537), 413, b"body over 65536 bytes"),
    (http_request("POST", "/pub/a", "Origin: https://evil.example", body=b"m"), 403,
     b"browser requests"),
    (http_request("GET", "/stats", "Sec-Fetch-Mode: cors"), 403, b"browser requests")])
def test_a_refused_app_request(w, data, status, reason):
    app(w, data)
    answer = response(w, FD)
    assert answer.status == status and answer.body.startswith(reason), answer
    assert answer.closes and (closed(w, FD) or lingering(w, FD))
    assert w.sent == {}


def test_with_an_app_token_every_request_must_show_it():
    w, = workers(1, app_token="t0ken")
    app(w, pub(b"a", b"m"))
    assert response(w, FD).status == 401
    app(w, pub(b"a", b"m", "Authorization: Bearer wrong"), fd=101)
    assert response(w, 101).status == 401
    app(w, pub(b"a", b"m", "Authorization: bearer t0ken") + http_request("GET", "/health"),
        fd=102)
    settle(w)
    assert [r.status for r in responses(w, 102)] == [202, 200]   # /health needs none


# -- batches ----------------------------------------------------------------------------------

def test_a_batch_publishes_its_good_lines_and_names_the_bad_ones(pair):
    w0, w1 = pair
    a, b = w0.a, w0.b
    app(w0, batch(line(a, "one"),
                  b"not json",
                  b'{"id": "x"}',
                  line("bad id!", "m"),
                  b"",
                  b'{"id": 5, "data": "m"}',
                  line(b, "two"),
                  line(a, "m" * 1025),
                  b"   ",
                  b"[" * 10000))
    assert read_records_to(w0, 0) == [("PUB", FD, w0.serial[FD], 1, a, b"one")]
    assert read_records_to(w0, 1) == [("PUB", FD, w0.serial[FD], 7, b, b"two")]
    settle(w0, w1)
    answer = response(w0, FD)
    assert answer.status == 202
    assert answer.json() == {"published": 2, "errors": [
        {"line": 2, "error": "invalid JSON"},
        {"line": 3, "error": "missing 'data'"},
        {"line": 4, "error": "invalid id"},
        {"line": 6, "error": "id and data must be strings"},
        {"line": 8, "error": "message over 1024 bytes"},
        {"line": 10, "error": "invalid JSON: nested too deeply"}]}


def test_a_batch_of_bad_lines_only_is_answered_at_once(w):
    app(w, batch(b"{}", b"nope"))
    assert w.sent == {}
    assert response(w, FD).json() == {"published": 0, "errors": [
        {"line": 1, "error": "missing 'id'"}, {"line": 2, "error": "invalid JSON"}]}


def test_a_batch_line_the_home_has_no_room_for_is_an_error_of_its_line():
    w, = workers(1, max_ids=1)
    for n in range(w.part.nslots):
        w._handle(0, records.pub(0, 0, 0, b"full%d" % n, b"m"))
    app(w, batch(line(b"full0", "kept"), line(b"new", "refused")))
    settle(w)
    assert response(w, FD).json() == {"published": 1,
                                      "errors": [{"line": 2, "error": "id table full"}]}


def test_a_batch_not_fully_confirmed_says_how_many_are_unconfirmed(pair):
    w0, w1 = pair
    app(w0, batch(line(w0.a, "here"), line(w0.b, "lost?")))
    settle(w0)                                    # only worker 0 answers
    advance(w0, appport.CONFIRM_TIMEOUT + 0.5)
    answer = response(w0, FD)
    assert answer.status == 503
    assert answer.json() == {"published": 1, "errors": [], "unconfirmed": 1}


# -- the binary protocol ---------------------------------------------------------------------

def frame(ident, data):
    return b"\x02" + ident + b"\x00" + data + b"\x00"


def test_binary_frames_become_pubs_that_are_not_acknowledged(pair):
    w0, _ = pair
    a, b = w0.a, w0.b
    app(w0, b"\x01" + frame(a, b"one") + b"\x01" + frame(b, b"two") + b"\x02" + a + b"\x00th")
    assert w0.proto[FD] == protocols.APP_BINARY and w0.deadline[FD] == 0   # may idle
    assert read_records_to(w0, 0) == [("PUB", 0, 0, 0, a, b"one")]
    assert read_records_to(w0, 1) == [("PUB", 0, 0, 0, b, b"two")]
    assert w0.inbuf[FD] == b"\x02" + a + b"\x00th"   # a frame in part waits for the rest
    feed(w0, FD, b"ree\x00")
    assert read_records_to(w0, 0)[-1] == ("PUB", 0, 0, 0, a, b"three")
    assert FD not in w0.inbuf and written(w0, FD) == b""   # the protocol never answers
    settle(w0)
    assert w0.router.acks == {} and written(w0, FD) == b""


def test_a_bad_binary_frame_closes_after_publishing_the_good_ones_before_it(w):
    app(w, frame(b"a", b"good") + frame(b"bad id", b"m") + frame(b"a", b"after"))
    assert read_records_to(w, 0) == [("PUB", 0, 0, 0, b"a", b"good")]
    assert closed(w, FD)
    assert any("binary protocol: invalid id; connection closed" in m for _, m in w.logged)
    assert any("binary publisher closed after 1 frames" in m for _, m in w.logged)


@pytest.mark.parametrize("data, reason", [
    (frame(b"a", b"\xff"), "message is not UTF-8"),
    (frame(b"a", b"m" * 1025), "message over 1024 bytes"),
    (b"\x02a\x00m\x00\x07", "unknown frame byte 0x07")])
def test_a_binary_frame_is_refused(w, data, reason):
    app(w, data)
    assert closed(w, FD)
    assert any(reason in m for _, m in w.logged), w.logged


def test_the_binary_protocol_is_refused_with_an_app_token():
    w, = workers(1, app_token="t0ken")
    app(w, frame(b"a", b"m"))
    assert closed(w, FD) and w.sent == {}


def test_a_first_byte_neither_http_nor_binary_closes(w):
    app(w, b"\x16\x03\x01")                       # a TLS client hello
    assert closed(w, FD)
    assert "first byte 0x16 is neither HTTP nor binary" in w.logged[-1][1]


# -- /health, /stats, /metrics -------------------------------------------------------------------

def test_stats_add_up_every_workers_counters(pair):
    w0, w1 = pair
    app(w0, batch(line(w0.a, "1"), line(w0.b, "2"), line(w0.b, "3")))
    settle(w0, w1)
    written(w0, FD)
    feed(w0, FD, http_request("GET", "/stats"))
    doc = response(w0, FD).json()
    assert [row["index"] for row in doc["workers"]] == [0, 1]
    assert all(row["responsive"] and row["restarts"] == 0 for row in doc["workers"])
    assert [(row["received"], row["published"]) for row in doc["workers"]] == [(3, 1), (0, 2)]
    assert (doc["totals"]["received"], doc["totals"]["published"]) == (3, 3)
    assert doc["totals"]["connections"] == 1
    assert doc["shm"]["ids_used"] == 2 and doc["shm"]["messages"] == 3
    assert set(doc) == {"workers", "totals", "shm", "uptime_s"}


def test_metrics_are_prometheus_text(pair):
    w0, w1 = pair
    app(w0, pub(w0.b, b"m"))
    settle(w0, w1)
    written(w0, FD)
    feed(w0, FD, http_request("GET", "/metrics"))
    answer = response(w0, FD)
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = answer.body.decode()
    assert "# TYPE megacomet_published_total counter\n" in text
    assert 'megacomet_published_total{worker="1"} 1\n' in text
    assert "# TYPE megacomet_connections gauge\n" in text
    assert "megacomet_workers_responsive 2\n" in text


def test_health_says_a_worker_is_down(pair):
    w0, w1 = pair
    app(w0, http_request("GET", "/health"))
    assert response(w0, FD).body == b"ok\n"
    w1.stats.set("heartbeat_ms", int(time.time() * 1000) - 60000)   # its loop stopped turning
    feed(w0, FD, http_request("GET", "/health"))
    answer = response(w0, FD)
    assert (answer.status, answer.body) == (503, b"worker down\n")


# -- regressions, whole server: answers a late reader has not read yet ---------------------------
# (Found reviewing the 2026-12-04 changes; they were tests/test_review_regressions.py.)

def read_raw_answers(sock, count, timeout):
    """Bytes read until ``count`` answers (counted by status line) or EOF/reset/timeout:
    (number of answers, closed by the server?)."""
    sock.settimeout(timeout)
    got = bytearray()
    ended = False
    try:
        while got.count(b"HTTP/1.1 ") < count or not got.endswith(b"}"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                ended = True
                break
            got += chunk
    except ConnectionResetError:
        ended = True
    except socket.timeout:
        pass
    return got.count(b"HTTP/1.1 "), ended


def late_reading_publisher(server, count, delay, ident=None):
    ident = ident or uid("slow")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", server.app))
    data = b"".join(post(ident, "m%d" % i) for i in range(count))

    sender = send_in_background(sock, data)
    time.sleep(delay)
    answers, closed = read_raw_answers(sock, count, 10)
    sender.join(10)
    sock.close()
    return answers, closed


def test_a_late_reading_pipelining_publisher_gets_every_answer(server_factory):
    """The same publisher with the default --max-body (16 MiB) gets every answer."""
    server = server_factory(workers=2)
    count = 100000
    answers, closed = late_reading_publisher(server, count, 3.0)
    assert (answers, closed) == (count, False)


def send_in_background(sock, data):
    """sendall on a daemon thread, ending quietly if the server closes: the thread."""
    def send():
        try:
            sock.sendall(data)
        except OSError:
            pass
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender


@contextmanager
def flooding_publisher(server, requests_for):
    """For the block, B's home is stopped and a publisher (4 KiB receive buffer) held by the
    live worker sends ``requests_for(b)``, then 3.4 MB that will never be answered: its socket."""
    a, b = two_homes(server)
    with worker_stopped(server.worker_pids()[1]):
        sock, _ = connect_to_live_worker(server, rcvbuf=4096)
        send_in_background(sock, requests_for(b)
                           + b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n" * 100000)
        yield sock


def test_a_closing_last_answer_on_a_not_reading_connection_is_not_lost_to_a_reset(
        server_factory):
    """Found in 32e8599 (reverted in edc1721).  B's home stopped; a publisher (4 KiB receive
    buffer) pipelines 128 publishes,
    the last with Connection: close, then 3 MB more that will never be answered.  Past 1 MiB
    the worker stops reading it.  When B's home runs, the 128 answers go out and the
    connection is closed (answer_ready: state is not READING -> closed_http, no read_again)
    with the peer's bytes still unread in the kernel: close() sends a reset, which drops the
    answers still queued for the peer (what 5e6e7af's test guards against when it is read)."""
    server = server_factory("--worker-timeout", 120, workers=2)
    count = 128
    with flooding_publisher(server, lambda b: b"".join(
            post(b, "m%d" % i, close=i == count - 1) for i in range(count))) as sock:
        time.sleep(1.0)
    time.sleep(0.5)                       # B answers: 128 answers, then the close
    answers, closed = read_raw_answers(sock, count, 5)
    sock.close()
    assert answers == count, (answers, closed)


def test_unconfirmed_answers_on_a_not_reading_connection_are_not_lost_to_a_reset(
        server_factory):
    """Found in 32e8599 (reverted), the timeout path: B's home stays stopped past
    CONFIRM_TIMEOUT; a publisher
    (4 KiB receive buffer) has 128 publishes in flight and 3 MB more sent, unread (stopped
    reading).  answer_unconfirmed gives the 128 503s and closes after output, with the peer's
    bytes unread in the kernel: a reset that drops most of those answers."""
    server = server_factory("--worker-timeout", 120, workers=2)
    count = 128
    with flooding_publisher(server, lambda b: b"".join(
            post(b, "m%d" % i) for i in range(count))) as sock:
        time.sleep(4.0)                   # CONFIRM_TIMEOUT (3 s) passes: 128 x 503, close
        answers, closed = read_raw_answers(sock, count, 3)
    sock.close()
    assert answers == count, (answers, closed)

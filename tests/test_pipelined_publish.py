"""Pipelined publishes on the app port: all on their way at once, answered in request order.

A publisher that pipelines ``POST /pub/<id>`` requests must not wait one
round trip to a home per request (issue 8): every publish parsed from the
connection goes to its home at once, and the answers still come back in
request order, each with its own seq.  A request of another kind pipelined
behind publishes (a GET, a refused request) is answered after them.
"""

import json
import os
import select
import signal
import time

from conftest import wait_for
from test_bad_input import connect, uid
from test_hardening import home_of


def post(ident, data, close=False):
    return (b"POST /pub/%s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s"
            % (ident.encode(), len(data), b"Connection: close\r\n" if close else b"",
               data.encode()))


def read_answers(stream, count):
    """``count`` pipelined answers from one buffered stream: [(status, headers, body)]."""
    answers = []
    for _ in range(count):
        line = stream.readline()
        if not line:
            break
        headers = {}
        while (header := stream.readline()) not in (b"\r\n", b""):
            name, _, value = header.partition(b":")
            headers[name.strip().lower()] = value.strip()
        body = stream.read(int(headers.get(b"content-length", 0)))
        answers.append((int(line.split()[1]), headers, body))
    return answers


def test_pipelined_publishes_are_answered_in_order_each_with_its_seq(server_factory):
    server = server_factory(workers=2)
    ids = [uid("pp%d-" % i) for i in range(20)]
    requests = [(ids[i % 20], "m%d" % i) for i in range(200)]
    with connect(server.app, timeout=10) as sock:
        sock.sendall(b"".join(post(ident, data) for ident, data in requests[:100])
                     + b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
                     + b"".join(post(ident, data) for ident, data in requests[100:]))
        answers = read_answers(sock.makefile("rb"), 201)
    assert [status for status, _, _ in answers] == [202] * 100 + [200] + [202] * 100
    assert answers[100][2] == b"ok\n"
    del answers[100]
    seen = {}
    for (ident, _), (_, _, body) in zip(requests, answers):
        doc = json.loads(body)
        seen[ident] = seen.get(ident, 0) + 1
        assert doc == {"id": ident, "seq": seen[ident]}, doc      # its own id's next seq
    for ident in ids:                                 # and what was stored is what was sent
        status, _, body = server.sub(ident, since=0)
        assert status == 200
        assert [m["data"] for m in json.loads(body)["messages"]] == [
            data for i, data in requests if i == ident]


def test_a_refused_request_and_a_close_behind_publishes_wait_their_turn(server_factory):
    server = server_factory(workers=2)
    a, b, c = uid("ra"), uid("rb"), uid("rc")
    with connect(server.app, timeout=10) as sock:
        sock.sendall(post(a, "1") + post(b, "2") + b"POST /pub/bad!id HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Length: 1\r\n\r\nx" + post(c, "never"))
        answers = read_answers(sock.makefile("rb"), 4)
    assert [status for status, _, _ in answers] == [202, 202, 400], answers
    assert answers[2][1].get(b"connection") == b"close"
    with connect(server.app, timeout=10) as sock:
        sock.sendall(post(a, "3") + post(b, "4", close=True) + post(c, "never"))
        answers = read_answers(sock.makefile("rb"), 3)
    assert [status for status, _, _ in answers] == [202, 202], answers
    assert answers[1][1].get(b"connection") == b"close"
    for ident, expected in ((a, ["1", "3"]), (b, ["2", "4"])):
        status, _, body = server.sub(ident, since=0)
        assert [m["data"] for m in json.loads(body)["messages"]] == expected
    status, _, body = server.sub(c, since=0, timeout=1)
    assert status == 200 and json.loads(body)["messages"] == []                      # requests behind the end were not run


def live_stats(server):
    """/stats from whichever worker answers (a connection may land on a stopped one)."""
    for _ in range(40):
        try:
            return server.stats_within(0.5)
        except OSError:
            continue
    raise AssertionError("no worker answered /stats")


def answered_within(sock, seconds):
    return bool(select.select([sock], [], [], seconds)[0])


def test_a_publish_to_a_stopped_home_does_not_hold_up_the_ones_behind_it(server_factory):
    """With B's home stopped (SIGSTOP), a publish to A pipelined behind one to B is stored
    and delivered at once; the answers wait, in order, until B's home runs again."""
    server = server_factory("--worker-timeout", 120, workers=2)
    homes = {}
    while len(homes) < 2:
        ident = uid("home")
        homes.setdefault(home_of(server, ident), ident)
    a, b = homes[0], homes[1]
    stopped = server.worker_pids()[1]
    os.kill(stopped, signal.SIGSTOP)
    try:
        for _ in range(40):                           # a publisher connection on the live worker
            sock = connect(server.app, timeout=10)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            if answered_within(sock, 0.5):
                break
            sock.close()
        else:
            raise AssertionError("every connection landed on the stopped worker")
        stream = sock.makefile("rb")
        assert read_answers(stream, 1)[0][0] == 200
        published = lambda: live_stats(server)["workers"][0]["published"]
        before = published()
        sock.sendall(post(b, "to-b") + post(a, "to-a") + b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        # A's home (the live worker) stores and counts its message while B's ACK is owed.
        wait_for(lambda: published() > before, timeout=5, message="A stored")
        assert not answered_within(sock, 0.3)        # nothing answered: B's answer comes first
    finally:
        os.kill(stopped, signal.SIGCONT)
    answers = read_answers(stream, 3)
    sock.close()
    assert [status for status, _, _ in answers] == [202, 202, 200], answers
    assert json.loads(answers[0][2])["id"] == b and json.loads(answers[1][2])["id"] == a
    status, _, body = server.sub(a, since=1)
    assert [m["data"] for m in json.loads(body)["messages"]] == ["to-a"]

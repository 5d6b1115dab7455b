"""megacomet/httpconn.py without sockets: the request loop of both ports.

Pipelined requests are answered in order, each as it asked (keep-alive, HEAD), a refused
one too; a connection whose answers pile up is not read until they are taken.  A fake
worker (tests/inprocess.py) reads what each test feeds it.
"""

import pytest

from inprocess import (advance, closed, feed, http_request, lingering, open_connection,
                       parse_responses, reading, response, responses, stop, take_output,
                       workers, written)
from megacomet import front, wire, worker
from megacomet.worker import READING

FD = 100
CLIENT_JS = front.static_file("megacomet.js")


@pytest.fixture
def w():
    return workers(1)[0]


def connection(w, port="client"):
    return open_connection(w, FD, port)


# -- pipelining --------------------------------------------------------------------------------

def test_pipelined_requests_are_answered_in_order(w):
    connection(w)
    feed(w, FD, http_request("OPTIONS", "/sub/a") + http_request("GET", "/megacomet.js")
         + http_request("GET", "/nothing.here"))
    assert [r.status for r in responses(w, FD)] == [204, 200, 404]


def test_a_request_in_pieces_is_answered_once_it_is_complete(w):
    connection(w)
    data = http_request("GET", "/megacomet.js") + http_request("OPTIONS", "/sub/a")
    for byte in data[:-1]:
        feed(w, FD, bytes([byte]))
    assert [r.status for r in responses(w, FD)] == [200]      # the second not complete yet
    feed(w, FD, data[-1:])
    assert [r.status for r in responses(w, FD)] == [204]
    assert FD not in w.inbuf


def test_a_request_head_over_8_kib_is_431(w):
    connection(w)
    feed(w, FD, b"GET /megacomet.js HTTP/1.1\r\nX-Big: " + b"x" * wire.MAX_HEAD)
    answer = response(w, FD)
    assert answer.status == 431 and answer.closes


@pytest.mark.parametrize("data, status", [
    (b"GET /megacomet.js HTTP/2.0\r\n\r\n", 505),
    (b"GET /megacomet.js\r\n\r\n", 400),
    (b"GET /megacomet.js HTTP/1.1\r\nBad Header\r\n\r\n", 400),
    (b"GET /megacomet.js HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501)])
def test_a_malformed_request_is_refused_and_closed(w, data, status):
    connection(w)
    feed(w, FD, data)
    answer = response(w, FD)
    assert answer.status == status and answer.closes
    assert closed(w, FD) or lingering(w, FD)


# -- keep-alive --------------------------------------------------------------------------------

@pytest.mark.parametrize("version, headers, keep", [
    ("1.1", (), True),
    ("1.1", ("Connection: close",), False),
    ("1.1", ("Connection: keep-alive, close",), False),
    ("1.0", (), False),
    ("1.0", ("Connection: keep-alive",), True)])
def test_keep_alive_as_the_request_asks(w, version, headers, keep):
    connection(w)
    feed(w, FD, http_request("GET", "/megacomet.js", *headers, version=version))
    answer = response(w, FD)
    assert answer.body == CLIENT_JS and answer.closes is not keep
    if keep:
        assert w.state[FD] == READING and reading(w, FD)
        assert w.deadline[FD] == w._tick_of(w.now + w.cfg.header_timeout)
    else:
        assert closed(w, FD)


def test_what_is_pipelined_behind_a_closing_answer_is_never_answered(w):
    connection(w)
    feed(w, FD, http_request("OPTIONS", "/sub/a", "Connection: close")
         + http_request("OPTIONS", "/sub/a"))
    assert len(responses(w, FD)) == 1
    assert lingering(w, FD)                       # FIN; its input is read and dropped
    feed(w, FD, http_request("OPTIONS", "/sub/a"))
    assert written(w, FD) == b"" and FD not in w.inbuf
    advance(w, 2.5)                               # LINGER_TIMEOUT: closed at last
    assert closed(w, FD)


def test_an_idle_connection_is_closed_at_its_header_timeout(w):
    connection(w)
    feed(w, FD, http_request("OPTIONS", "/sub/a"))
    advance(w, w.cfg.header_timeout - 1)
    assert not closed(w, FD)
    feed(w, FD, b"GET /megac")                    # a slow head does not re-arm it
    advance(w, 1.5)
    assert closed(w, FD)


def test_a_stopping_worker_answers_without_keep_alive(w):
    connection(w)
    stop(w)
    feed(w, FD, http_request("GET", "/megacomet.js") + http_request("OPTIONS", "/sub/a"))
    answer = response(w, FD)
    assert answer.closes and answer.body == CLIENT_JS


# -- HEAD ------------------------------------------------------------------------------------

def test_head_gets_the_headers_of_get_without_the_body(w):
    connection(w)
    feed(w, FD, http_request("HEAD", "/megacomet.js") + http_request("GET", "/megacomet.js"))
    data = written(w, FD)
    head, get = data.split(b"HTTP/1.1 ")[1:]
    assert head.endswith(b"\r\n\r\n")             # no body
    assert head == get[:len(head)]                # the same status line and headers
    assert parse_responses(b"HTTP/1.1 " + get)[0].body == CLIENT_JS
    assert parse_responses(b"HTTP/1.1 " + head, head=True)[0].headers["content-length"] == \
        str(len(CLIENT_JS))


def test_head_on_the_app_port_gets_no_body(w):
    connection(w, "app")
    feed(w, FD, http_request("HEAD", "/health"))
    answer = response(w, FD, head=True)
    assert answer.status == 200 and answer.headers["content-length"] == "3"
    assert written(w, FD) == b""


# -- a refused request: answered as it asked ---------------------------------------------------

def test_a_refused_head_after_a_get_is_answered_without_a_body(w):
    connection(w)
    feed(w, FD, http_request("GET", "/megacomet.js") + http_request("HEAD", "/nothing.here"))
    data = written(w, FD)
    get = parse_responses(data[:data.index(b"HTTP/1.1 404")])[0]
    refused = parse_responses(data[data.index(b"HTTP/1.1 404"):], head=True)[0]
    assert get.body == CLIENT_JS
    assert refused.status == 404 and refused.closes
    assert data.endswith(b"\r\n\r\n")             # the 404 has no body: it was a HEAD


def test_a_refused_get_after_a_head_is_answered_with_its_body(w):
    connection(w)
    feed(w, FD, http_request("HEAD", "/megacomet.js") + http_request("GET", "/nothing.here"))
    data = written(w, FD)
    assert data.endswith(b"\r\n\r\nno such path\n")


def test_an_unreadable_head_after_a_head_gets_a_plain_answer(w):
    connection(w)
    feed(w, FD, http_request("HEAD", "/megacomet.js") + b"BAD\r\n\r\n")
    data = written(w, FD)
    assert data.endswith(b"Connection: close\r\n\r\nmalformed request line\n")


def test_a_refused_request_after_a_keep_alive_one_closes(w):
    connection(w)
    feed(w, FD, http_request("GET", "/megacomet.js") + http_request("POST", "/sub/a", body=b"x"))
    kept, refused = responses(w, FD)
    assert not kept.closes and refused.status == 405 and refused.closes


# -- output the peer does not take -------------------------------------------------------------

def test_a_connection_whose_answers_pile_up_is_not_read_until_they_are_taken(w):
    """Past OUT_LIMIT unsent bytes a connection gets no new answer and is not read; once
    its output is written, the requests it sent meanwhile are answered."""
    connection(w)
    w.io.room[FD] = 0                             # the peer reads nothing for now
    count = worker.OUT_LIMIT // len(CLIENT_JS) + 10
    feed(w, FD, http_request("GET", "/megacomet.js") * count)
    answered = w.output_waiting(FD) // len(CLIENT_JS)
    assert worker.OUT_LIMIT < w.output_waiting(FD) and answered < count
    assert not reading(w, FD) and w.ep.masks[FD] == worker.OUT
    assert FD in w.inbuf                          # the rest waits, unparsed
    take_output(w, FD)                            # the peer reads: all of it is written
    got = responses(w, FD)
    assert len(got) == count and all(r.body == CLIENT_JS for r in got)
    assert reading(w, FD) and FD not in w.inbuf and not w.outbuf


def test_output_the_socket_takes_in_part_waits_for_epollout(w):
    connection(w)
    w.io.room[FD] = 100
    feed(w, FD, http_request("GET", "/megacomet.js"))
    assert len(written(w, FD)) == 100 and w.ep.masks[FD] == worker.IN | worker.OUT
    take_output(w, FD, room=1000)
    assert len(written(w, FD)) == 1000
    take_output(w, FD)
    assert w.ep.masks[FD] == worker.IN and not w.outbuf

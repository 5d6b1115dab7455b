"""megacomet/longpoll.py without sockets: what a poll is answered, and when.

JSON and JSONP polls (``/sub/<id>``) are answered from the home's backlog, by a DELIVER,
or at their timeout, always with the id's ``last`` seq and ``epoch``; the original's compat
poll (``/<id>.js``) takes the home's compat cursor (CPOLL, CMSG).  Fake workers
(tests/inprocess.py): worker 0 is the home, and with two, worker 1 holds the polls.
"""

import json

import pytest

from inprocess import (advance, closed, deliver, feed, hang_up, http_request, lingering,
                       open_connection, read_records_to, response, responses, settle, stop,
                       workers, written)
from megacomet import records, shmqueue
from megacomet.httpconn import CLIENT_INBUF_LIMIT
from megacomet.records import DELIVER_COMPAT
from megacomet.worker import HELD, PENDING, READING

FD = 100
JS = "application/javascript; charset=utf-8"


@pytest.fixture
def w():
    return workers(1)[0]


@pytest.fixture
def pair():
    return workers(2)


def home_id(w, name="news"):
    """An id whose home is worker 0."""
    ident = name.encode()
    while shmqueue.id_key(ident) % w.region.workers:
        ident += b"x"
    return ident


def publish(home, ident, *messages):
    for m in messages:
        home._handle(home.index, records.pub(0, 0, 0, ident, m))


def epoch_of(home, ident):
    return home.part.peek(shmqueue.id_key(ident))[1]


def poll(w, target, *headers, fd=FD, method="GET"):
    open_connection(w, fd)
    feed(w, fd, http_request(method, target, *headers))


def body(ident, messages, last, epoch):
    return json.dumps({"id": ident.decode(), "messages": [{"seq": s, "data": d}
                                                          for s, d in messages],
                       "last": last, "epoch": epoch}).encode()


# -- JSON ------------------------------------------------------------------------------------

def test_a_poll_is_answered_from_the_backlog_with_last_and_epoch(w):
    publish(w, b"news", b"one", b"two")
    poll(w, "/sub/news")
    settle(w)
    answer = response(w, FD)
    assert answer.status == 200 and answer.headers["content-type"] == "application/json"
    assert answer.body == body(b"news", [(1, "one"), (2, "two")], 2, epoch_of(w, b"news"))
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["access-control-allow-origin"] == "*"
    assert not answer.closes and w.state[FD] == READING   # kept alive: the next poll
    assert w.counters[shmqueue.DELIVERED] == 2


def test_a_poll_gets_only_what_came_after_its_since(w):
    publish(w, b"news", b"one", b"two", b"three")
    poll(w, "/sub/news?since=1&epoch=%d" % epoch_of(w, b"news"))
    settle(w)
    assert response(w, FD).json()["messages"] == [{"seq": 2, "data": "two"},
                                                  {"seq": 3, "data": "three"}]


def test_a_held_poll_is_answered_by_the_deliver_of_the_next_message(pair):
    home, holder = pair
    ident = home_id(home)
    poll(holder, "/sub/%s" % ident.decode())
    assert read_records_to(holder, 0)[0][0] == "SUB"
    settle(home, holder)
    assert holder.state[FD] == HELD and written(holder, FD) == b""
    publish(home, ident, "é \"quoted\"".encode())
    assert [r[0] for r in read_records_to(home, 1)] == ["DELIVER"]
    deliver(home, holder)
    assert response(holder, FD).body == body(ident, [(1, "é \"quoted\"")], 1,
                                             epoch_of(home, ident))
    assert holder.state[FD] == READING and not holder.router.held


def test_every_holder_of_the_id_gets_the_message_head_polls_without_a_body(pair):
    home, holder = pair
    ident = home_id(home)
    poll(holder, "/sub/%s" % ident.decode(), fd=100)
    poll(holder, "/sub/%s" % ident.decode(), "Connection: close", fd=101)
    poll(holder, "/sub/%s" % ident.decode(), method="HEAD", fd=102)
    settle(home, holder)
    publish(home, ident, b"m")
    deliver(home, holder)
    kept, closing = response(holder, 100), response(holder, 101)
    head = response(holder, 102, head=True)
    assert kept.body == closing.body and kept.json()["messages"] == [{"seq": 1, "data": "m"}]
    assert not kept.closes and closing.closes and closed(holder, 101)
    assert head.body == b"" and head.headers["content-length"] == str(len(kept.body))


def test_a_poll_that_times_out_is_answered_with_last_its_since_and_the_epoch(w):
    publish(w, b"news", b"one", b"two", b"three")
    epoch = epoch_of(w, b"news")
    poll(w, "/sub/news?since=3&epoch=%d&timeout=5" % epoch)
    assert w.state[FD] == HELD                     # up to date: held at once, asked quietly
    assert read_records_to(w, 0) == [("SUB", FD, w.serial[FD], 3, epoch, records.SUB_QUIET,
                                      b"news")]
    settle(w)
    advance(w, 4.5)
    assert written(w, FD) == b""
    advance(w, 1)
    assert response(w, FD).body == body(b"news", [], 3, epoch)


def test_a_poll_whose_home_never_answers_times_out_with_the_cursor_it_was_given(pair):
    home, holder = pair
    ident = home_id(home)
    poll(holder, "/sub/%s?since=7&epoch=1234&timeout=2" % ident.decode())
    assert holder.state[FD] == PENDING             # its SUB is lost with a stalled home
    advance(holder, 2.5)
    assert response(holder, FD).body == body(ident, [], 7, 1234)


def test_a_gap_in_the_delivers_asks_the_home_again_and_its_answer_fills_it(pair):
    home, holder = pair
    ident = home_id(home)
    publish(home, ident, b"one")
    epoch = epoch_of(home, ident)
    poll(holder, "/sub/%s?since=1&epoch=%d" % (ident.decode(), epoch))
    settle(home, holder)
    assert holder.state[FD] == HELD
    publish(home, ident, b"two", b"three")
    delivers = home.sent.pop(1)
    serial = holder.serial[FD]
    holder._handle(0, delivers[1])                 # seq 3 first: seq 2 is missing
    assert read_records_to(holder, 0) == [("SUB", FD, holder.serial[FD], 1, epoch, 0, ident)]
    assert holder.serial[FD] != serial and holder.state[FD] == PENDING
    holder._handle(0, delivers[0])                 # late: the answer to the new SUB brings it
    assert written(holder, FD) == b""
    settle(home, holder)
    assert response(holder, FD).json()["messages"] == [{"seq": 2, "data": "two"},
                                                       {"seq": 3, "data": "three"}]


def test_a_deliver_the_poll_has_had_is_dropped(pair):
    home, holder = pair
    ident = home_id(home)
    publish(home, ident, b"one", b"two")
    epoch = epoch_of(home, ident)
    poll(holder, "/sub/%s?since=2&epoch=%d" % (ident.decode(), epoch))
    settle(home, holder)
    holder._handle(0, records.deliver(2, epoch, 0, ident, b"two"))
    assert written(holder, FD) == b"" and holder.sent == {} and holder.state[FD] == HELD


def test_a_request_pipelined_behind_a_held_poll_is_served_after_its_answer(w):
    poll(w, "/sub/news?timeout=1")
    feed(w, FD, http_request("OPTIONS", "/sub/news") + http_request("GET", "/sub/news"))
    settle(w)
    assert written(w, FD) == b""                   # held: the rest waits
    advance(w, 1.5)
    first, preflight = responses(w, FD)
    assert (first.status, preflight.status) == (200, 204)
    assert w.state[FD] == HELD                     # the second poll is held now
    assert [r[0] for r in read_records_to(w, 0)] == ["COUNT"]   # registered: no need to ask
    #                                              (the tick reports its one subscriber)


def test_a_held_poll_whose_client_sends_too_much_is_closed(w):
    poll(w, "/sub/news")
    feed(w, FD, b"x" * CLIENT_INBUF_LIMIT)
    assert w.state[FD] == HELD
    feed(w, FD, b"x")
    assert closed(w, FD) and not w.router.held


def test_a_held_poll_whose_client_leaves_is_forgotten(w):
    poll(w, "/sub/news")
    hang_up(w, FD)
    assert not w.router.held and w.counters[shmqueue.SUBSCRIBERS] == 0
    publish(w, b"news", b"m")
    settle(w)
    assert written(w, FD) == b""


def test_a_stopping_worker_answers_its_held_polls_and_closes(w):
    poll(w, "/sub/news")
    stop(w)
    answer = response(w, FD)
    assert answer.json()["messages"] == [] and answer.closes and closed(w, FD)


# -- JSONP ------------------------------------------------------------------------------------

def jsonp(callback, ident, messages, last, epoch):
    return b"/**/%s(%s);" % (callback, body(ident, messages, last, epoch))


def test_a_jsonp_poll_is_answered_with_its_callback(pair):
    home, holder = pair
    ident = home_id(home)
    publish(home, ident, b"one")
    epoch = epoch_of(home, ident)
    poll(holder, "/sub/%s?callback=app.got" % ident.decode())
    settle(home, holder)
    answer = response(holder, FD)
    assert answer.headers["content-type"] == JS
    assert answer.body == jsonp(b"app.got", ident, [(1, "one")], 1, epoch)
    feed(holder, FD, http_request("GET", "/sub/%s?callback=next&since=1&epoch=%d"
                                  % (ident.decode(), epoch)))
    publish(home, ident, b"two")
    deliver(home, holder)                          # a DELIVER answers JSONP too
    assert response(holder, FD).body == jsonp(b"next", ident, [(2, "two")], 2, epoch)
    feed(holder, FD, http_request("GET", "/sub/%s?callback=t&since=2&epoch=%d&timeout=1"
                                  % (ident.decode(), epoch)))
    advance(holder, 1.5)
    assert response(holder, FD).body == jsonp(b"t", ident, [], 2, epoch)


# -- the compat poll: /<id>.js ------------------------------------------------------------------

def test_a_compat_poll_is_answered_with_the_message_as_published_then_closed(pair):
    home, holder = pair
    ident = home_id(home)
    publish(home, ident, b"alert('one')", b"alert('two')")
    poll(holder, "/%s.js" % ident.decode())
    assert read_records_to(holder, 0) == [("CPOLL", FD, holder.serial[FD], 0, ident)]
    deliver(holder, home)
    assert read_records_to(home, 1) == [("CMSG", FD, holder.serial[FD], 1, 1, ident,
                                         b"alert('one')")]
    deliver(home, holder)
    answer = response(holder, FD)
    assert (answer.status, answer.headers["content-type"], answer.body) == (
        200, JS, b"alert('one')")
    assert answer.closes and closed(holder, FD)
    poll(holder, "/%s.js" % ident.decode(), fd=101)       # the next poll: the next message
    settle(home, holder)
    assert response(holder, 101).body == b"alert('two')"


def test_a_compat_poll_with_nothing_waits_for_the_next_message(pair):
    home, holder = pair
    ident = home_id(home)
    poll(holder, "/%s.js" % ident.decode())
    settle(home, holder)
    assert holder.state[FD] == HELD and written(holder, FD) == b""
    publish(home, ident, b"next")
    assert read_records_to(home, 1) == [("DELIVER", 1, epoch_of(home, ident), DELIVER_COMPAT,
                                         ident, b"next")]
    deliver(home, holder)
    assert response(holder, FD).body == b"next"
    # Answered: nothing given back; no compat poll is held here now.
    assert read_records_to(holder, 0) == [("UNSUB", records.UNSUB_COMPAT, ident)]


def test_a_compat_poll_times_out_with_an_empty_script(w):
    poll(w, "/news.js")
    settle(w)
    advance(w, 30.5)
    answer = response(w, FD)
    assert (answer.status, answer.headers["content-type"], answer.body) == (200, JS, b"")
    assert answer.closes


def test_a_head_compat_poll_looks_without_taking(w):
    publish(w, b"news", b"kept")
    poll(w, "/news.js", method="HEAD")
    assert read_records_to(w, 0) == [("CPOLL", FD, w.serial[FD], 1, b"news")]
    settle(w)
    answer = response(w, FD, head=True)
    assert answer.headers["content-length"] == "4" and answer.body == b""
    poll(w, "/news.js", fd=101)
    settle(w)
    assert response(w, 101).body == b"kept"        # still there for a GET


def test_a_head_compat_poll_with_nothing_is_answered_at_once(w):
    poll(w, "/news.js", method="HEAD")
    settle(w)
    answer = response(w, FD, head=True)
    assert answer.headers["content-length"] == "0" and answer.closes


def test_a_compat_message_taken_for_a_poll_that_left_is_given_back(pair):
    home, holder = pair
    ident = home_id(home)
    publish(home, ident, b"m")
    poll(holder, "/%s.js" % ident.decode())
    deliver(holder, home)
    hang_up(holder, FD)                            # gone before the CMSG came
    assert read_records_to(holder, 0) == [("UNSUB", records.UNSUB_COMPAT, ident)]
    deliver(home, holder)
    assert read_records_to(holder, 0)[-1] == ("CGIVE", 1, ident)
    settle(home, holder)
    poll(holder, "/%s.js" % ident.decode(), fd=101)
    settle(home, holder)
    assert response(holder, 101).body == b"m"      # not lost


def test_a_compat_deliver_for_a_poll_that_left_is_given_back(pair):
    home, holder = pair
    ident = home_id(home)
    poll(holder, "/%s.js" % ident.decode())
    settle(home, holder)
    publish(home, ident, b"m")                     # taken for the held poll
    hang_up(holder, FD)
    deliver(home, holder)
    assert read_records_to(holder, 0)[-1] == ("CGIVE", 1, ident)


def test_cwake_makes_a_held_compat_poll_ask_again(pair):
    home, holder = pair
    ident = home_id(home)
    poll(holder, "/%s.js" % ident.decode())
    settle(home, holder)
    serial = holder.serial[FD]
    holder._handle(0, records.cwake(ident))
    assert read_records_to(holder, 0) == [("CPOLL", FD, holder.serial[FD], 0, ident)]
    assert holder.serial[FD] != serial and holder.state[FD] == PENDING


def test_a_late_cmsg_for_a_poll_answered_meanwhile_is_given_back(pair):
    home, holder = pair
    ident = home_id(home)
    poll(holder, "/%s.js" % ident.decode())
    serial = holder.serial[FD]
    advance(holder, 30.5)                          # the home never answered: timed out
    assert response(holder, FD).body == b""
    holder._handle(0, records.cmsg(FD, serial, 4, 1, ident, b"late"))
    assert read_records_to(holder, 0)[-1] == ("CGIVE", 4, ident)
    assert written(holder, FD) == b""


def test_a_compat_poll_pipelined_behind_is_not_answered_it_closes(w):
    publish(w, b"news", b"m")
    open_connection(w, FD)
    feed(w, FD, http_request("GET", "/news.js") + http_request("GET", "/news.js"))
    settle(w)
    assert response(w, FD).body == b"m"
    assert lingering(w, FD)                        # the original closes after each poll


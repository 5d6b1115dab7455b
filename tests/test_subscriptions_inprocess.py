"""megacomet/subscriptions.py without sockets: what a subscription is owed, decided from
the homes' answers (MSGS) and the messages delivered (DELIVER).

Fake workers (tests/inprocess.py); with two, each id below is named for its home (``a``
is worker 0's, ``b`` worker 1's) and the subscriptions are held on worker 0.  The
whole-server tests of the same seams are tests/test_subscriptions.py.
"""

import time

import pytest

from inprocess import (advance, deliver, feed, hang_up, http_request, ids_at,
                       open_connection, read_records_to, records_to, response, settle, stop,
                       take_output, two_workers_and_ids, workers, written)
from megacomet import records, shmqueue, signing
from megacomet.records import MSGS_FINAL, MSGS_RESET
from megacomet.worker import HELD, PENDING

FD = 100


@pytest.fixture
def pair():
    return two_workers_and_ids()


def publish(home, ident, *messages):
    for m in messages:
        home._handle(home.index, records.pub(0, 0, 0, ident, m))


def epoch_of(home, ident):
    return home.part.peek(shmqueue.id_key(ident))[1]


def poll(w, path, query="", fd=FD):
    open_connection(w, fd)
    feed(w, fd, http_request("GET", path + query))


def ids(*idents):
    return ",".join(i.decode() for i in idents)


# -- several ids ------------------------------------------------------------------------------

def test_several_ids_wait_for_every_homes_first_answer_then_answer_all(pair):
    w0, w1 = pair
    a, b = w0.a, w0.b
    publish(w0, a, b"to a")
    publish(w1, b, b"to b")
    poll(w0, "/sub/" + ids(a, b))
    assert {r[-1]: r[0] for r in read_records_to(w0, 0) + read_records_to(w0, 1)} == {
        a: "SUB", b: "SUB"}
    deliver(w0, w0)                               # a's home (worker 0) answers first
    deliver(w0, w0)
    assert written(w0, FD) == b"" and w0.state[FD] == HELD      # (a's next ones reach it)
    assert w0.subs.many[FD].waiting == {b}
    settle(w0, w1)                                # then b's
    doc = response(w0, FD).json()
    assert doc == {"messages": [{"id": a.decode(), "seq": 1, "data": "to a"},
                                {"id": b.decode(), "seq": 1, "data": "to b"}],
                   "last": {a.decode(): 1, b.decode(): 1},
                   "epoch": {a.decode(): epoch_of(w0, a), b.decode(): epoch_of(w1, b)}}


def test_several_ids_with_nothing_new_are_held_and_answered_by_a_deliver(pair):
    w0, w1 = pair
    a, b = w0.a, w0.b
    poll(w0, "/sub/" + ids(a, b))
    settle(w0, w1)
    assert w0.state[FD] == HELD and written(w0, FD) == b""
    publish(w1, b, b"news")
    deliver(w1, w0)
    doc = response(w0, FD).json()
    assert doc["messages"] == [{"id": b.decode(), "seq": 1, "data": "news"}]
    assert doc["last"] == {a.decode(): 0, b.decode(): 1}


def test_several_ids_report_their_since_when_the_home_has_nothing_newer(pair):
    w0, w1 = pair
    a, b = w0.a, w0.b
    publish(w1, b, *[b"m"] * 7)
    poll(w0, "/sub/" + ids(a, b), "?since=%s:7&epoch=%s:%d&timeout=1"
         % (b.decode(), b.decode(), epoch_of(w1, b)))
    settle(w0, w1)
    advance(w0, 1.5)
    assert response(w0, FD).json()["last"] == {a.decode(): 0, b.decode(): 7}


def test_a_message_delivered_while_another_home_has_not_answered_reaches_a_stream(pair):
    w0, w1 = pair
    a, b = w0.a, w0.b
    publish(w0, a, b"a1")
    poll(w0, "/sse/" + ids(a, b))
    written(w0, FD)
    deliver(w0, w0)                               # a's SUB, then its MSGS: a is answered
    deliver(w0, w0)
    publish(w0, a, b"a2")                         # DELIVER a:2 to worker 0
    deliver(w0, w0)
    settle(w0, w1)                                # b's home answers: the stream starts
    events = written(w0, FD)
    assert b'"data": "a1"' in events
    assert b'"data": "a2"' in events, events


# -- cursors: reset, since above last, epochs -------------------------------------------------

def test_a_reset_answer_counts_the_cursor_as_0(pair):
    w0, _ = pair
    a = w0.a
    publish(w0, a, b"one", b"two")
    poll(w0, "/sub/" + a.decode(), "?since=5")     # beyond the last seq
    deliver(w0, w0)                               # the SUB, to a's home (worker 0 itself)
    (msgs,) = read_records_to(w0, 0)
    assert msgs[0] == "MSGS" and msgs[5] == MSGS_FINAL | MSGS_RESET
    deliver(w0, w0)
    doc = response(w0, FD).json()
    assert [m["seq"] for m in doc["messages"]] == [1, 2]
    assert doc["last"] == 2                       # below the since: the home said reset


def test_a_since_above_the_last_seq_of_one_of_several_ids_resets_that_id(pair):
    w0, w1 = pair
    a, b = w0.a, w0.b
    publish(w0, a, b"a1", b"a2")
    publish(w1, b, b"b1", b"b2")
    poll(w0, "/sub/" + ids(a, b), "?since=%s:9,%s:1" % (a.decode(), b.decode()))
    settle(w0, w1)
    doc = response(w0, FD).json()
    assert sorted((m["id"], m["seq"]) for m in doc["messages"]) == [
        (a.decode(), 1), (a.decode(), 2), (b.decode(), 2)]
    assert doc["last"] == {a.decode(): 2, b.decode(): 2}


def test_an_epoch_that_is_not_the_ids_resets_the_cursor(pair):
    w0, _ = pair
    a = w0.a
    publish(w0, a, b"one", b"two")
    poll(w0, "/sub/" + a.decode(), "?since=1&epoch=%d" % (epoch_of(w0, a) + 1))
    settle(w0)
    doc = response(w0, FD).json()
    assert [m["seq"] for m in doc["messages"]] == [1, 2]
    assert doc["epoch"] == epoch_of(w0, a)


def test_a_deliver_of_another_epoch_asks_the_home_again(pair):
    w0, w1 = pair
    b = w0.b
    publish(w1, b, b"one")
    epoch = epoch_of(w1, b)
    poll(w0, "/sub/" + b.decode(), "?since=1&epoch=%d" % epoch)
    settle(w0, w1)
    assert w0.state[FD] == HELD
    w0._handle(1, records.deliver(2, epoch + 1, 0, b, b"of another life"))
    assert written(w0, FD) == b""
    assert read_records_to(w0, 1) == [("SUB", FD, w0.serial[FD], 1, epoch, 0, b)]
    assert w0.state[FD] == PENDING


def test_a_deliver_of_another_epoch_asks_again_for_that_id_of_several(pair):
    w0, w1 = pair
    a, b = w0.a, w0.b
    poll(w0, "/sub/" + ids(a, b))
    settle(w0, w1)
    epoch = epoch_of(w1, b)
    w0._handle(1, records.deliver(1, epoch + 1, 0, b, b"of another life"))
    assert read_records_to(w0, 1) == [("SUB", FD, w0.serial[FD], 0, epoch, 0, b)]
    assert w0.subs.many[FD].waiting == {b} and w0.state[FD] == HELD
    w0._handle(1, records.deliver(2, epoch + 1, 0, b, b"again"))   # the answer brings it
    assert len(records_to(w0, 1)) == 1 and written(w0, FD) == b""


def test_a_new_id_with_no_epoch_adopts_seq_1_of_any_epoch(pair):
    """A poll of an id nobody published to yet, without an epoch, is held at once (the
    home's partition shows it up to date); its id's first message is the one it waits for,
    whatever epoch the home gives the id."""
    w0, w1 = pair
    b = w0.b
    poll(w0, "/sub/" + b.decode())
    assert w0.state[FD] == HELD and w0.subs.epoch[FD] == 0
    w0._handle(1, records.deliver(1, 4242, 0, b, b"first"))
    assert [r[0] for r in read_records_to(w0, 1)] == ["SUB"]   # only the open's quiet SUB
    doc = response(w0, FD).json()
    assert (doc["messages"], doc["last"], doc["epoch"]) == ([{"seq": 1, "data": "first"}],
                                                            1, 4242)


def test_an_id_with_an_epoch_does_not_adopt_another_epochs_seq_1(pair):
    w0, w1 = pair
    b = w0.b
    w1._handle(1, records.sub(1, 1, 0, 0, 0, b))  # the id exists (a subscriber made it)
    w1.sent.clear()
    epoch = epoch_of(w1, b)
    poll(w0, "/sub/" + b.decode(), "?epoch=%d" % epoch)
    assert w0.state[FD] == HELD and w0.subs.epoch[FD] == epoch
    w0.sent.clear()
    w0._handle(1, records.deliver(1, epoch + 1, 0, b, b"of another life"))
    assert written(w0, FD) == b""
    assert read_records_to(w0, 1) == [("SUB", FD, w0.serial[FD], 0, epoch, 0, b)]


def test_an_answer_to_an_earlier_question_misses_once_the_subscription_asked_again(pair):
    w0, w1 = pair
    b = w0.b
    publish(w1, b, b"one")
    epoch = epoch_of(w1, b)
    poll(w0, "/sub/" + b.decode(), "?since=1&epoch=%d" % epoch)
    settle(w0, w1)
    first_serial = w0.serial[FD]
    w0._handle(1, records.deliver(3, epoch, 0, b, b"three"))     # a gap: asks again
    assert w0.serial[FD] != first_serial
    late = records.msgs_header(FD, first_serial, 1, epoch, MSGS_FINAL, b)
    w0._handle(1, late)
    assert written(w0, FD) == b"" and w0.state[FD] == PENDING


# -- release: nothing is left, whichever way it ends --------------------------------------------

SECRET = b"s3cret"


def leftovers(w, fd):
    """What the subscription core (and the routing) still keeps for fd."""
    subs, router = w.subs, w.router
    left = {name: value for name, value in (
        ("since", subs.since[fd]), ("epoch", subs.epoch[fd]), ("fresh", subs.fresh[fd]),
        ("many", subs.many.get(fd)), ("note", subs.note.get(fd)),
        ("expires", subs.expires.get(fd)), ("held_id", router.held_id[fd]),
        ("compat", router.compat[fd])) if value}
    if any(fd == held or (type(held) is set and fd in held) for held in router.held.values()):
        left["held"] = True
    if any(key[0] == fd for key in router.partial):
        left["partial"] = True
    return left


def signed(*idents):
    return signing.query(SECRET, [i.decode() for i in idents], 60, time.time())


KINDS = {
    "one id": lambda a, b: ([a], ""),
    "jsonp of several ids": lambda a, b: ([a, b], "&callback=cb"),
}


def open_signed(w0, kind, since="7"):
    idents, extra = KINDS[kind](w0.a, w0.b)
    if len(idents) == 1:
        cursor = "since=%s&epoch=99" % since
    else:
        cursor = "since=%s&epoch=99" % ",".join("%s:%s" % (i.decode(), since) for i in idents)
    poll(w0, "/sub/" + ids(*idents), "?%s&%s%s" % (cursor, signed(*idents), extra))
    assert leftovers(w0, FD)                      # it keeps something while open


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ending", ["answer", "timeout", "close", "stop"])
def test_release_leaves_nothing_behind(kind, ending):
    w0, w1 = workers(2, secret=SECRET)
    w0.a, w0.b = ids_at(w0, 0, prefix="a")[0], ids_at(w0, 1, prefix="b")[0]
    open_signed(w0, kind)
    if ending == "answer":
        settle(w0, w1)                            # a reset cursor: everything buffered (none)
        publish(w0, w0.a, b"m")
        settle(w0, w1)
        assert response(w0, FD).status == 200
    elif ending == "timeout":
        advance(w0, 31)
        assert response(w0, FD).status == 200
    elif ending == "close":
        hang_up(w0, FD)
    else:
        stop(w0)
        assert response(w0, FD).status == 200
    assert leftovers(w0, FD) == {}


@pytest.mark.parametrize("kind", KINDS)
def test_release_after_a_refusal_leaves_nothing_behind(kind):
    w0, w1 = workers(2, secret=SECRET, max_ids=1)
    w0.a, w0.b = ids_at(w0, 0, prefix="a")[0], ids_at(w0, 1, prefix="b")[0]
    for home in (w0, w1):                         # fill each home's table for subscribers
        for ident in ids_at(home, home.index, home.part.sub_limit, prefix="fill"):
            home._handle(home.index, records.sub(1, 1, 0, 0, 0, ident))
        home.sent.clear()
    open_signed(w0, kind)
    settle(w0, w1)
    assert response(w0, FD).status == 503
    assert leftovers(w0, FD) == {}


def test_release_of_a_partly_received_backlog_leaves_no_part_behind():
    w0, w1 = workers(2, ring_bytes=4096)
    b = ids_at(w0, 1, prefix="b")[0]
    publish(w1, b, *[b"x" * 300] * 8)
    poll(w0, "/sub/" + b.decode())
    deliver(w0, w1)
    first_part = w1.sent[0][0]
    w0._handle(1, first_part)
    assert w0.router.partial
    hang_up(w0, FD)
    assert leftovers(w0, FD) == {}


# -- a fan-out: many holders of one id on one worker -------------------------------------------

def events(data):
    """(seq, data) of each SSE event in data."""
    out = []
    for block in data.split(b"\n\n"):
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
        if b"id" in lines and b"data" in lines:
            out.append((int(lines[b"id"]), lines[b"data"]))
    return out


def test_a_fan_out_gives_each_holder_what_its_own_cursor_is_owed():
    """routing hands the holders of one id to Subscriptions.deliver_many: those up to date
    go in a batch per transport (one frame, Worker.write_many), the others one by one.
    Each must get exactly what deliver() would give it alone, in order, once."""
    w, = workers(1)
    ident = b"score"
    publish(w, ident, b"m1", b"m2")
    settle(w)
    epoch = epoch_of(w, ident)
    streams = {100: "", 101: "", 102: "?since=1", 103: "?since=2&epoch=%d" % epoch,
               104: "?since=2&epoch=%d" % (epoch + 1)}       # another epoch: starts over
    for fd, query in streams.items():
        poll(w, "/sse/" + ident.decode(), query, fd=fd)
    poll(w, "/sub/" + ident.decode(), "?since=2&epoch=%d" % epoch, fd=110)   # a long-poll too
    poll(w, "/sub/" + ident.decode(), "?since=2&epoch=%d" % epoch, fd=111)
    settle(w)
    got = {fd: events(written(w, fd)) for fd in streams}
    w.io.room[102] = 10                  # this reader takes only 10 bytes of what comes next
    delivered = w.counters[shmqueue.DELIVERED]
    publish(w, ident, b"m3")
    publish(w, ident, b"m4")
    settle(w)
    take_output(w, 102)
    for fd in streams:
        got[fd] += events(written(w, fd))
    everything = [(1, b"m1"), (2, b"m2"), (3, b"m3"), (4, b"m4")]
    assert got[100] == got[101] == got[104] == everything
    assert got[102] == everything[1:]
    assert got[103] == everything[2:]
    first, second = response(w, 110).body, response(w, 111).body
    assert first == second and b'"seq": 3' in first and b"m4" not in first
    assert w.counters[shmqueue.DELIVERED] - delivered == 5 * 2 + 2

"""megacomet/routing.py without sockets: an id's home (PUB, SUB, UNSUB, RESET, CPOLL) and
the holders' side (MSGS, DELIVER), record in, records out.

Two fake workers (tests/inprocess.py) share a region: worker 0 is the home of the ids used
here, worker 1 holds subscribers.  A test hands the home a record as if from a worker and
reads the records it sends in return.
"""

import pytest

from inprocess import (advance, deliver, drop_records, feed, http_request, open_connection,
                       read_record, read_records_to, records_to, response, settle, workers,
                       written)
from megacomet import records, shmqueue
from megacomet.records import (DELIVER_COMPAT, MSGS_FINAL, MSGS_REFUSED, MSGS_RESET,
                               SUB_QUIET, UNSUB_ALL, UNSUB_COMPAT)
from megacomet.worker import HELD, PENDING

FD = 100


@pytest.fixture
def pair():
    return workers(2)


def home_id(w, n=0):
    """An id whose home is worker 0."""
    ident = b"r%d" % n
    while shmqueue.id_key(ident) % w.region.workers:
        ident += b"x"
    return ident


def epoch_of(home, ident):
    return home.part.peek(shmqueue.id_key(ident))[1]


def at_home(home, src, *sent):
    """The home handles records from worker src, then ends its turn (the turn's ACKs)."""
    for record in sent:
        home._handle(src, record)
    home.router.flush_acks()


def publish(home, ident, *messages, src=1, fd=0, serial=0):
    at_home(home, src, *(records.pub(fd, serial, line, ident, m)
                         for line, m in enumerate(messages, 1)))


def register(home, ident, src=1, since=0, epoch=0, flags=0, fd=FD, serial=9):
    at_home(home, src, records.sub(fd, serial, since, epoch, flags, ident))


def hold_poll(w, ident, query="", fd=FD):
    open_connection(w, fd)
    feed(w, fd, http_request("GET", "/sub/%s%s" % (ident.decode(), query)))


# -- the home: PUB -------------------------------------------------------------------------

def test_a_pub_at_the_home_is_stored_and_delivered_to_every_registered_worker(pair):
    home, _ = pair
    ident = home_id(home)
    register(home, ident, src=0)
    register(home, ident, src=1)
    drop_records(home)
    publish(home, ident, b"hello")
    epoch = epoch_of(home, ident)
    assert epoch
    for dst in (0, 1):
        assert read_records_to(home, dst) == [("DELIVER", 1, epoch, 0, ident, b"hello")]
    assert home.part.last_seq(shmqueue.id_key(ident)) == 1
    assert home.counters[shmqueue.PUBLISHED] == 1


def test_a_pub_nobody_subscribed_to_is_stored_and_sent_nowhere(pair):
    home, _ = pair
    ident = home_id(home)
    publish(home, ident, b"a", b"b")
    assert home.sent == {}
    assert home.part.last_seq(shmqueue.id_key(ident)) == 2


def test_a_requests_pubs_are_acked_once_per_turn_with_the_count_and_last_seq(pair):
    home, _ = pair
    ident, other = home_id(home, 0), home_id(home, 1)
    for line, (i, serial) in enumerate([(ident, 7), (other, 7), (ident, 7), (ident, 8)], 1):
        home._handle(1, records.pub(FD, serial, line, i, b"m%d" % line))
    assert home.sent == {}                        # acknowledged at the end of the turn
    home.router.flush_acks()
    assert read_records_to(home, 1) == [("ACK", FD, 7, 3, 2, []), ("ACK", FD, 8, 1, 3, [])]
    home.router.flush_acks()
    assert len(records_to(home, 1)) == 2           # said once


def test_a_pub_the_id_table_has_no_room_for_is_refused_and_its_ack_names_its_line():
    home, = workers(1, max_ids=1)
    slots = home.part.nslots
    for n in range(slots):                        # publishers may fill every slot
        publish(home, b"full%d" % n, b"m", src=0)
    drop_records(home)
    at_home(home, 0, records.pub(FD, 5, 1, b"one", b"x"), records.pub(FD, 5, 2, b"more", b"y"),
            records.pub(FD, 5, 3, b"full0", b"z"))
    assert read_records_to(home, 0) == [("ACK", FD, 5, 1, 2, [1, 2])]
    assert home.counters[shmqueue.REFUSED] == 2
    assert [m for _, m in home.logged] == ["publish: id table full, message for one refused",
                                           "publish: id table full, message for more refused"]


def test_an_ack_with_more_refused_lines_than_a_record_holds_is_split():
    home, = workers(1, max_ids=1)
    for n in range(home.part.nslots):
        publish(home, b"full%d" % n, b"m", src=0)
    drop_records(home)
    count = records.ACK_REFUSED_MAX + 3
    at_home(home, 0, records.pub(FD, 5, 1, b"full0", b"stored"),
            *(records.pub(FD, 5, line, b"new%d" % line, b"x") for line in range(2, count + 2)))
    acks = read_records_to(home, 0)
    assert [(a[3], a[4], len(a[5])) for a in acks] == [(1, 2, records.ACK_REFUSED_MAX),
                                                        (0, 2, 3)]
    assert acks[0][5] + acks[1][5] == list(range(2, count + 2))


# -- the home: SUB ---------------------------------------------------------------------------

def test_a_sub_is_answered_with_what_came_after_its_since_the_last_seq_and_the_epoch(pair):
    home, _ = pair
    ident = home_id(home)
    publish(home, ident, b"one", b"two", b"three")
    register(home, ident, since=1)
    epoch = epoch_of(home, ident)
    assert read_records_to(home, 1) == [
        ("MSGS", FD, 9, 3, epoch, MSGS_FINAL, ident, [(2, b"two"), (3, b"three")])]
    drop_records(home)
    publish(home, ident, b"four")                 # and the worker is registered
    assert read_records_to(home, 1) == [("DELIVER", 4, epoch, 0, ident, b"four")]


def test_a_sub_up_to_date_gets_the_last_seq_and_no_message(pair):
    home, _ = pair
    ident = home_id(home)
    publish(home, ident, b"one")
    register(home, ident, since=1, epoch=epoch_of(home, ident))
    assert read_records_to(home, 1) == [("MSGS", FD, 9, 1, epoch_of(home, ident), MSGS_FINAL,
                                         ident, [])]


@pytest.mark.parametrize("since, epoch", [(5, 0), (5, "its"), (1, 12345), (0, 12345)])
def test_a_sub_whose_cursor_is_not_the_ids_is_reset_and_gets_everything(pair, since, epoch):
    """A since beyond the last seq, or an epoch that is not the id's: the cursor counts as 0
    and the answer says so (MSGS_RESET)."""
    home, _ = pair
    ident = home_id(home)
    publish(home, ident, b"one", b"two")
    if epoch == "its":
        epoch = epoch_of(home, ident)
    register(home, ident, since=since, epoch=epoch)
    assert read_records_to(home, 1) == [
        ("MSGS", FD, 9, 2, epoch_of(home, ident), MSGS_FINAL | MSGS_RESET, ident,
         [(1, b"one"), (2, b"two")])]


def test_a_sub_of_a_new_id_creates_it_in_a_new_epoch(pair):
    home, _ = pair
    ident = home_id(home)
    register(home, ident)
    (kind, fd, serial, last, epoch, flags, got, messages), = read_records_to(home, 1)
    assert (kind, last, flags, messages) == ("MSGS", 0, MSGS_FINAL, [])
    assert epoch == epoch_of(home, ident) != 0


def test_a_quiet_sub_is_answered_only_with_news(pair):
    home, _ = pair
    ident = home_id(home)
    publish(home, ident, b"one")
    epoch = epoch_of(home, ident)
    register(home, ident, since=1, epoch=epoch, flags=SUB_QUIET)
    assert home.sent == {}                        # up to date: no answer
    publish(home, ident, b"two")                  # ... but registered
    assert read_records_to(home, 1) == [("DELIVER", 2, epoch, 0, ident, b"two")]
    drop_records(home)
    register(home, ident, since=1, epoch=epoch, flags=SUB_QUIET)
    assert read_records_to(home, 1) == [("MSGS", FD, 9, 2, epoch, MSGS_FINAL, ident,
                                         [(2, b"two")])]
    drop_records(home)
    register(home, ident, since=1, epoch=epoch + 1, flags=SUB_QUIET)   # reset: answered
    assert read_records_to(home, 1)[0][5] == MSGS_FINAL | MSGS_RESET


def test_a_long_backlog_is_split_so_that_no_record_outgrows_the_ring():
    home, holder = workers(2, ring_bytes=4096)
    limit = home.outbox[1].size // 4
    ident = home_id(home)
    messages = [b"%d" % i * 300 for i in range(1, 9)]
    publish(home, ident, *[m[:300] for m in messages])
    hold_poll(holder, ident)
    deliver(holder, home)
    parts = records_to(home, 1)
    assert len(parts) == 3 and all(len(p) <= limit for p in parts)
    read = [read_record(p) for p in parts]
    assert [r[5] for r in read] == [0, 0, MSGS_FINAL]       # the last part ends the answer
    assert {r[1:5] + r[6:7] for r in read} == {(FD, holder.serial[FD], 8,
                                                epoch_of(home, ident), ident)}
    assert [seq for r in read for seq, _ in r[7]] == list(range(1, 9))
    for part in parts[:2]:                        # the holder keeps parts until the last one
        holder._handle(0, part)
        assert written(holder, FD) == b"" and holder.router.partial
    holder._handle(0, parts[2])
    answer = response(holder, FD).json()
    assert [m["seq"] for m in answer["messages"]] == list(range(1, 9))
    assert answer["messages"][0]["data"] == "1" * 300 and not holder.router.partial


def test_a_sub_the_id_table_has_no_room_for_is_refused():
    """Ids created by subscribers may fill the table up to sub_limit; the rest is kept for
    publishers."""
    home, = workers(1, max_ids=1)
    for n in range(home.part.sub_limit):
        register(home, b"sub%d" % n, src=0)
    drop_records(home)
    register(home, b"one-more", src=0)
    assert read_records_to(home, 0) == [("MSGS", FD, 9, 0, 0, MSGS_FINAL | MSGS_REFUSED,
                                         b"one-more", [])]
    publish(home, b"by-a-publisher", b"m", src=0)  # publishers still have room
    assert home.part.last_seq(shmqueue.id_key(b"by-a-publisher")) == 1


def test_a_refused_sub_answers_its_poll_503_and_registers_nothing():
    w, = workers(1, max_ids=1)
    for n in range(w.part.sub_limit):
        register(w, b"sub%d" % n, src=0)
    drop_records(w)
    hold_poll(w, b"one-more")
    settle(w)
    answer = response(w, FD)
    assert (answer.status, answer.body) == (503, b"id table full\n")
    assert b"one-more" not in w.router.held


def test_a_poll_right_after_a_refused_one_asks_the_home_again():
    w, = workers(1, max_ids=1)
    for n in range(w.part.sub_limit):
        register(w, b"sub%d" % n, src=0)
    drop_records(w)
    hold_poll(w, b"one-more")
    settle(w)
    assert response(w, FD).status == 503
    hold_poll(w, b"one-more", fd=101)             # the client tries again at once
    assert [r[0] for r in read_records_to(w, 0)] == ["SUB"]


# -- the home: UNSUB, RESET, CPOLL -------------------------------------------------------------

def answered_by_a_deliver(home, holder, ident):
    """A poll of ident held on the holder, answered by the DELIVER of a message: its answer."""
    hold_poll(holder, ident)
    settle(home, holder)
    assert holder.state[FD] == HELD
    publish(home, ident, b"m")
    deliver(home, holder)
    return response(holder, FD).json()


def test_the_last_holder_leaving_sends_unsub_at_the_next_tick(pair):
    home, holder = pair
    ident = home_id(home)
    answered_by_a_deliver(home, holder, ident)
    assert holder.sent == {}                      # lingering: a next poll would be served
    assert holder.router.registered(ident)
    advance(holder, 0.25)
    assert read_records_to(holder, 0) == [("UNSUB", UNSUB_ALL, ident)]
    settle(home, holder)
    publish(home, ident, b"for nobody")
    assert home.sent == {}


def test_a_timed_out_polls_unsub_goes_in_the_tick_that_answered_it(pair):
    home, holder = pair
    ident = home_id(home)
    hold_poll(holder, ident, "?timeout=1")
    settle(home, holder)
    advance(holder, 1.5)
    assert response(holder, FD).status == 200
    assert read_records_to(holder, 0) == [("UNSUB", UNSUB_ALL, ident)]


def test_a_poll_coming_back_before_the_tick_keeps_the_registration(pair):
    home, holder = pair
    ident = home_id(home)
    answer = answered_by_a_deliver(home, holder, ident)
    feed(holder, FD, http_request("GET", "/sub/%s?since=%d&epoch=%d"
                                  % (ident.decode(), answer["last"], answer["epoch"])))
    assert holder.state[FD] == HELD and holder.sent == {}   # registered: nothing to ask
    advance(holder, 0.25)
    assert [r[0] for r in read_records_to(holder, 0)] == ["COUNT"]   # held again: no UNSUB
    #                                             (the tick reports its subscriber: +1)
    publish(home, ident, b"next")
    deliver(home, holder)
    assert response(holder, FD).json()["messages"] == [{"seq": 2, "data": "next"}]


def test_reset_forgets_every_registration_of_its_sender(pair):
    home, holder = pair
    ident = home_id(home)
    register(home, ident, src=1)
    register(home, ident, src=0)
    drop_records(home)
    holder.stats.set("started_ms", 0)
    holder.router.start()
    assert holder.sent == {}                      # a first start says nothing
    holder.stats.set("started_ms", 1)             # a predecessor ran: RESET to the others
    holder.stats.set("restarts", 1)
    holder.router.start()
    # (RECOUNT: the subscriber counts of its partition start again: see test_presence.py)
    assert [r for r in read_records_to(holder, 0) if r[0] != "RECOUNT"] == [("RESET",)]
    deliver(holder, home)
    assert home.router.generation[1] == 1
    drop_records(home)
    publish(home, ident, b"m")
    assert list(home.sent) == [0]                 # worker 0 is still registered


def test_a_cpoll_takes_the_compat_cursors_next_message(pair):
    home, _ = pair
    ident = home_id(home)
    publish(home, ident, b"one", b"two")
    at_home(home, 1, records.cpoll(FD, 4, 1, ident))            # a HEAD looks
    at_home(home, 1, records.cpoll(FD, 5, 0, ident), records.cpoll(FD, 6, 0, ident))
    assert read_records_to(home, 1) == [("CMSG", FD, 4, 1, 0, ident, b"one"),
                                        ("CMSG", FD, 5, 1, 1, ident, b"one"),
                                        ("CMSG", FD, 6, 2, 1, ident, b"two")]


def test_a_cpoll_finding_nothing_registers_for_the_next_message(pair):
    home, _ = pair
    ident = home_id(home)
    at_home(home, 1, records.cpoll(FD, 5, 0, ident))
    assert read_records_to(home, 1) == [("CMSG", FD, 5, 0, 1, ident, b"")]
    drop_records(home)
    publish(home, ident, b"next")
    epoch = epoch_of(home, ident)
    assert read_records_to(home, 1) == [("DELIVER", 1, epoch, DELIVER_COMPAT, ident, b"next")]
    drop_records(home)
    at_home(home, 1, records.cpoll(FD, 6, 0, ident))           # taken for that poll already
    assert read_records_to(home, 1) == [("CMSG", FD, 6, 0, 1, ident, b"")]


def test_a_compat_message_given_back_by_every_worker_is_taken_again(pair):
    home, _ = pair
    ident = home_id(home)
    at_home(home, 1, records.cpoll(FD, 5, 0, ident))
    drop_records(home)
    publish(home, ident, b"lost")                 # taken off the cursor for worker 1's poll
    at_home(home, 1, records.cgive(1, ident))     # ... which had left
    at_home(home, 1, records.cpoll(FD, 6, 0, ident))
    assert read_records_to(home, 1)[-1] == ("CMSG", FD, 6, 1, 1, ident, b"lost")


def test_unsub_compat_stops_taking_messages_for_the_workers_compat_polls(pair):
    home, _ = pair
    ident = home_id(home)
    at_home(home, 1, records.cpoll(FD, 5, 0, ident))
    at_home(home, 1, records.unsub(UNSUB_COMPAT, ident))
    drop_records(home)
    publish(home, ident, b"kept")
    assert home.sent == {}
    at_home(home, 1, records.cpoll(FD, 6, 0, ident))
    assert read_records_to(home, 1) == [("CMSG", FD, 6, 1, 1, ident, b"kept")]


# -- the holder: MSGS and DELIVER ------------------------------------------------------------

def test_a_deliver_reaches_every_held_fd_of_the_id_and_not_a_pending_one(pair):
    home, holder = pair
    ident = home_id(home)
    for fd in (100, 101):
        hold_poll(holder, ident, fd=fd)
    settle(home, holder)
    hold_poll(holder, ident, "?since=5", fd=102)  # its SUB not answered yet: PENDING
    assert holder.state[102] == PENDING
    epoch = epoch_of(home, ident)
    holder._handle(0, records.deliver(1, epoch, 0, ident, b"m"))
    assert response(holder, 100) == response(holder, 101)   # the same bytes for both
    assert written(holder, 102) == b""
    assert holder.state[102] == PENDING and list(holder.router.holders(ident)) == [102]


def test_a_deliver_for_an_id_held_by_nobody_unsubscribes_the_worker(pair):
    _, holder = pair
    ident = home_id(holder)
    holder._handle(0, records.deliver(3, 77, 0, ident, b"m"))
    holder._handle(0, records.deliver(4, 77, DELIVER_COMPAT, ident, b"c"))
    assert read_records_to(holder, 0) == [("UNSUB", UNSUB_ALL, ident),
                                          ("UNSUB", UNSUB_ALL, ident), ("CGIVE", 4, ident)]


def test_a_msgs_for_an_earlier_request_on_the_fd_misses(pair):
    home, holder = pair
    ident = home_id(home)
    publish(home, ident, b"old")
    hold_poll(holder, ident)
    stale_serial = holder.serial[FD]
    holder.sent.clear()
    holder.close(FD)                              # the client left; the next one on its fd
    hold_poll(holder, ident)
    holder._handle(0, records.msgs_header(FD, stale_serial, 1, epoch_of(home, ident),
                                          MSGS_FINAL, ident) + records.msg_header(1, 3) + b"old")
    assert written(holder, FD) == b"" and holder.state[FD] == PENDING


def test_a_compat_deliver_not_answered_here_is_given_back(pair):
    home, holder = pair
    ident = home_id(home)
    hold_poll(holder, ident)                      # a /sub poll: it does not take compat messages
    settle(home, holder)
    drop_records(holder)
    holder._handle(0, records.deliver(1, epoch_of(home, ident), DELIVER_COMPAT, ident, b"m"))
    assert response(holder, FD).status == 200     # answered as a /sub poll ...
    assert read_records_to(holder, 0) == [("CGIVE", 1, ident)]   # ... and given back

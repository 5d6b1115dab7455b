"""The browser client in a real browser: headless Chromium runs the demo page.

Debian's Chromium (/usr/bin/chromium), driven by Playwright, opens
``/demo?ids=<ids>&transport=<t>`` for each transport forced in turn, and the page
must show every message published to its ids exactly once and in order (per id)
through what a deployment lives through:

- one id: plain traffic; each worker SIGKILLed in turn (the id's home first, so
  that publishes wait for its successor, then the other, so that whichever
  worker held the page's connection has died once) with messages published
  while it is down and after; and the whole server stopped (publishing is then
  refused) and started again on the same ports with fresh shared memory, where
  seqs begin again at 1 in a new epoch, with messages published before the page
  is back (more of them than the page's cursor, so that only the id's epoch
  tells the page that these are not old seqs; Chromium is kept offline
  meanwhile, so that it cannot come back before they are all published) and
  after;
- two ids on one connection through the same full restart: each id's epoch
  changes (one JSON epoch event on an EventSource, each frame's own on a
  WebSocket, {id: epoch} in a poll's answer) and each starts over from seq 1;
- two ids resumed by a new client from the cursors and epochs the page kept
  (``mc.cursors``, ``mc.epochs``, passed back as the options ``since`` and
  ``epoch``, as after a reload), when one id was forgotten meanwhile and created
  again in a new epoch, and the other lived on in its own: all of the first's
  new messages, only the second's new one.

The page is read as a person reads it: the demo writes one line per message,
"[transport] id #seq: data", and its status "state (transport)", which also
proves the forced transport is the one in use.

.ci/run installs both (apt-get install chromium; playwright comes with the
``test`` extra); where either is missing these tests are skipped.
"""

import json
import os
import re
import signal
import time

import pytest

from conftest import PAGE_WAIT_MS, wait_for
from test_bad_input import uid
from test_hardening import is_dead
from test_streams import Stream, pids_or_none

try:
    from playwright.sync_api import TimeoutError as PageTimeout
except ImportError:                                   # skipped by conftest's browser fixture
    PageTimeout = TimeoutError

TRANSPORTS = ["websocket", "eventsource", "poll"]
LINE = re.compile(r"\[(\w+)\] (\S+) #(\d+): (.*)")


def publish(server, ident, data, timeout=15.0):
    """POST until 202, as an application does, and return the seq.

    A publish that failed may still have been stored: a 503 says its home died with it in
    flight, and a connection reset by a dying worker may have passed it on first.  So look
    at the id's buffer (once every worker answers again) before sending it again, else the
    page would rightly show it twice."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, _, body = server.request("POST", "/pub/" + ident, data.encode(), timeout=10)
        except OSError as e:
            status, body = None, repr(e)
        if status == 202:
            return json.loads(body)["seq"]
        assert status in (None, 503), (status, body)
        assert time.monotonic() < deadline, "could not publish %r: %r" % (data, body)
        wait_for(lambda: healthy(server), timeout=10, message="every worker back")
        stored = buffered(server, ident).get(data)
        if stored:
            return stored
        time.sleep(0.05)


def healthy(server):
    try:
        return server.request("GET", "/health", timeout=2)[0] == 200
    except OSError:
        return False


def buffered(server, ident):
    """data -> seq of what the server holds for ident (data is unique in these tests)."""
    status, _, body = server.request("GET", "/sub/%s?since=0&timeout=1" % ident,
                                     port=server.client, timeout=5)
    assert status == 200, (status, body)
    return {m["data"]: m["seq"] for m in json.loads(body)["messages"]}


def shown(page):
    """The demo's message lines, parsed: [(transport, id, seq, data)]."""
    texts = page.eval_on_selector_all("#log div", "rows => rows.map(row => row.textContent)")
    lines = []
    for text in texts:
        match = LINE.fullmatch(text)
        assert match, text
        lines.append((match[1], match[2], int(match[3]), match[4]))
    return lines


def expect_shown(page, transport, ident, expected):
    """Wait until the page shows as many lines as published, then they must be exactly those."""
    try:
        page.wait_for_function("n => document.querySelectorAll('#log div').length >= n",
                               arg=len(expected), timeout=PAGE_WAIT_MS)
    except PageTimeout:
        pass                                          # the comparison below shows what is missing
    assert shown(page) == [(transport, ident, seq, data) for seq, data in expected]
    assert page.text_content("#status") == "open (%s)" % transport


def shown_by_id(page, transport):
    """The demo's lines of several ids: {id: [(seq, data)]}, each id's in the order shown."""
    got = {}
    for via, ident, seq, data in shown(page):
        assert via == transport, (via, ident, seq, data)
        got.setdefault(ident, []).append((seq, data))
    return got


def expect_shown_by_id(page, transport, expected):
    """As expect_shown, for several ids: expected is {id: [(seq, data)]}; the order across
    ids is the server's (a backlog of several ids comes home by home), each id's is fixed."""
    try:
        page.wait_for_function("n => document.querySelectorAll('#log div').length >= n",
                               arg=sum(map(len, expected.values())), timeout=PAGE_WAIT_MS)
    except PageTimeout:
        pass
    assert shown_by_id(page, transport) == {i: m for i, m in expected.items() if m}
    assert page.text_content("#status") == "open (%s)" % transport


def epochs_of(server, *ids):
    """The ids' epochs, as the server tells them (a poll from 0, answered at once): {id: E}."""
    since = "0" if len(ids) == 1 else ",".join(i + ":0" for i in ids)
    status, _, body = server.request("GET", "/sub/%s?since=%s&timeout=1" % (",".join(ids), since),
                                     port=server.client, timeout=5)
    assert status == 200, (status, body)
    epoch = json.loads(body)["epoch"]
    return {ids[0]: epoch} if len(ids) == 1 else epoch


def publish_all(server, ident, names, expected):
    for data in names:
        expected.append((publish(server, ident, data), data))


def stop(server):
    """SIGTERM the supervisor and wait for it and every worker to exit by themselves."""
    workers = server.worker_pids()
    try:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=10)
        wait_for(lambda: all(is_dead(pid) for pid in workers), timeout=5,
                 message="the workers' exit")
    finally:
        # Workers orphaned by a supervisor that is gone are no longer its children, which is
        # all that Server.stop kills: they are killed here, by the pids read before.
        for pid in workers:
            if not is_dead(pid):
                os.kill(pid, signal.SIGKILL)
        server.stop()                                 # its pipes and log (and, if it hangs, it)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_demo_page_gets_every_message_once_in_order_across_worker_kills_and_a_restart(
        server_factory, page, transport):
    server = server_factory(workers=2)
    ident = uid("browser-" + transport)
    page.goto("http://127.0.0.1:%d/demo?ids=%s&transport=%s" % (server.client, ident, transport))
    # Forced: the client may try no other transport (the lines and the status say which it uses).
    assert page.evaluate("client.order") == [transport]
    expected = []

    # Plain traffic: the first message may come as the backlog of the first connection, the
    # others are pushed to a connection that is open.
    publish_all(server, ident, ["a1"], expected)
    expect_shown(page, transport, ident, expected)
    publish_all(server, ident, ["a2", "a3", "a4"], expected)
    expect_shown(page, transport, ident, expected)

    # Each worker SIGKILLed in turn, the id's home (it stored a1..a4) first.
    published = [w["published"] for w in server.stats()["workers"]]
    home = published.index(max(published))
    for index, tag in ((home, "home"), (1 - home, "other")):
        victim = server.worker_pids()[index]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: is_dead(victim), timeout=5, interval=0.005, message="the kill")
        publish_all(server, ident, ["%s-down" % tag], expected)       # sent while it is dead
        wait_for(lambda: (lambda p: p and all(p) and victim not in p)(pids_or_none(server)),
                 timeout=10, message="the supervisor's restart")
        publish_all(server, ident, ["%s-after1" % tag, "%s-after2" % tag], expected)
        expect_shown(page, transport, ident, expected)

    # The id's epoch is kept (a worker's restart keeps the shared memory, and the id in it).
    old_epochs = page.evaluate("client.epochs")
    assert old_epochs == epochs_of(server, ident) and old_epochs[ident] > 0

    # The whole server stopped: nothing can be published, the page keeps retrying.
    client_port, app_port = server.client, server.app
    stop(server)
    with pytest.raises(ConnectionRefusedError):
        server.request("POST", "/pub/" + ident, b"lost", timeout=5)

    # Started again on the same ports, with fresh shared memory: seqs begin again at 1.  Before
    # the page can come back (Chromium offline: its every attempt fails, as against a server
    # that is down) more are published than its cursor, so the new seqs pass it: resuming
    # with since=<cursor> alone would get only those above it.  The page sends the old epoch
    # too, so it gets them all; then two more, pushed to its open connection.
    cursor = len(expected)
    page.context.set_offline(True)
    server = server_factory(workers=2, port=client_port, app_port=app_port)
    publish_all(server, ident, ["new%d" % i for i in range(1, cursor + 3)], expected)
    assert [seq for seq, _ in expected[cursor:]] == list(range(1, cursor + 3))
    assert server.stats()["totals"]["subscribers"] == 0      # the page is not back yet
    page.context.set_offline(False)
    expect_shown(page, transport, ident, expected)
    publish_all(server, ident, ["new%d" % i for i in (cursor + 3, cursor + 4)], expected)
    expect_shown(page, transport, ident, expected)

    # Nothing more comes later: no repeat of a message, late or resumed.
    time.sleep(0.5)
    assert len(shown(page)) == len(expected)
    new_epochs = page.evaluate("client.epochs")
    assert list(new_epochs) == [ident] and new_epochs[ident] not in (0, old_epochs[ident])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_demo_page_of_two_ids_takes_each_from_seq_1_after_a_full_restart(
        server_factory, page, transport):
    server = server_factory(workers=2)
    a, b = uid("browser-a-" + transport), uid("browser-b-" + transport)
    page.goto("http://127.0.0.1:%d/demo?ids=%s,%s&transport=%s" % (server.client, a, b, transport))
    assert page.evaluate("client.order") == [transport]
    expected = {a: [], b: []}
    publish_all(server, a, ["a-old1", "a-old2", "a-old3"], expected[a])
    publish_all(server, b, ["b-old1", "b-old2"], expected[b])
    expect_shown_by_id(page, transport, expected)
    old = epochs_of(server, a, b)
    assert page.evaluate("client.epochs") == old
    assert page.evaluate("client.cursors") == {a: 3, b: 2}

    # A full restart, the page offline until the new run has published more to each id than
    # the page's cursor for it: each id in a new epoch, its new messages from seq 1.
    client_port, app_port = server.client, server.app
    stop(server)
    page.context.set_offline(True)
    server = server_factory(workers=2, port=client_port, app_port=app_port)
    publish_all(server, a, ["a-new%d" % i for i in range(1, 6)], expected[a])
    publish_all(server, b, ["b-new%d" % i for i in range(1, 5)], expected[b])
    assert [seq for seq, _ in expected[a][3:]] == [1, 2, 3, 4, 5]
    assert [seq for seq, _ in expected[b][2:]] == [1, 2, 3, 4]
    assert server.stats()["totals"]["subscribers"] == 0      # the page is not back yet
    page.context.set_offline(False)
    expect_shown_by_id(page, transport, expected)
    publish_all(server, a, ["a-new6"], expected[a])
    publish_all(server, b, ["b-new5"], expected[b])
    expect_shown_by_id(page, transport, expected)

    time.sleep(0.5)
    assert len(shown(page)) == 3 + 2 + 6 + 5
    new = epochs_of(server, a, b)
    assert page.evaluate("client.epochs") == new
    assert all(new[i] != old[i] for i in (a, b)), (old, new)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_client_resumed_from_saved_epochs_takes_a_new_epoch_of_one_id_alone(
        server_factory, page, transport):
    """What a page keeps across its reload (mc.cursors, mc.epochs) given back to a new client
    (the options since and epoch): a was forgotten meanwhile (its messages expired, nobody
    followed it) and created again, seqs from 1 in a new epoch; b lived on (followed)."""
    server = server_factory("--queue-ttl", 2, workers=2)
    a, b = uid("browser-ea-" + transport), uid("browser-eb-" + transport)
    keeper = Stream(server, "/sse/" + b)                      # b is followed throughout
    try:
        page.goto("http://127.0.0.1:%d/demo?ids=%s,%s&transport=%s"
                  % (server.client, a, b, transport))
        # Followed before anything is published: the messages live 2 s, the page's load may not.
        wait_for(lambda: server.stats()["totals"]["subscribers"] >= 2, timeout=10,
                 message="the page's subscription")
        expected = {a: [], b: []}
        publish_all(server, a, ["a-old1", "a-old2", "a-old3"], expected[a])
        publish_all(server, b, ["b-old1", "b-old2"], expected[b])
        expect_shown_by_id(page, transport, expected)
        saved = page.evaluate("({since: client.cursors, epoch: client.epochs})")
        assert saved["since"] == {a: 3, b: 2}
        assert set(saved["epoch"]) == {a, b}
        page.evaluate("client.close()")                       # the page goes away

        # Every message expires; a, followed by nobody now, is forgotten: published again, it
        # starts over at seq 1 in a new epoch.  b, followed, goes on at seq 3 in its own.
        wait_for(lambda: server.stats()["totals"]["expired"] >= 5, timeout=15,
                 message="the messages' expiry")
        assert [publish(server, a, "a-new%d" % i) for i in (1, 2, 3, 4)] == [1, 2, 3, 4]
        assert publish(server, b, "b3") == 3

        page.evaluate("""([ids, transport, saved]) => {
            window.got = [];
            window.resumed = new MegaComet(location.origin, ids, {
              transport: transport, since: saved.since, epoch: saved.epoch,
              onmessage: (id, seq, data) => window.got.push([id, seq, data, resumed.transport]),
            });
        }""", [[a, b], transport, saved])
        try:
            page.wait_for_function("n => window.got.length >= n", arg=5, timeout=PAGE_WAIT_MS)
        except PageTimeout:
            pass
        time.sleep(0.5)                                       # and nothing more, later
        got = page.evaluate("window.got")
        assert {via for *_, via in got} == {transport}
        assert [(seq, data) for i, seq, data, _ in got if i == a] == [
            (i, "a-new%d" % i) for i in (1, 2, 3, 4)]
        assert [(seq, data) for i, seq, data, _ in got if i == b] == [(3, "b3")]
        assert len(got) == 5
        epochs = page.evaluate("resumed.epochs")
        assert epochs == epochs_of(server, a, b)
        assert epochs[b] == saved["epoch"][b] and epochs[a] != saved["epoch"][a]
        assert page.evaluate("resumed.cursors") == {a: 4, b: 3}
        page.evaluate("resumed.close()")
    finally:
        keeper.sock.close()

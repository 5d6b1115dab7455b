"""megacomet/front.py without sockets: the client port's routes, its refusals, and the
cursors a subscription is read with (``cursors_of``).

Each test feeds one fake worker (tests/inprocess.py) a request and looks at what it wrote
and the records it sent: a subscription's SUB carries the cursor the query gave.
"""

import time

import pytest

from inprocess import (closed, feed, http_request, lingering, open_connection, read_records_to,
                       reading, response, responses, settle, workers, written)
from megacomet import front, protocols, records, shmqueue, signing, wire
from megacomet.worker import HELD, PENDING, READING

FD = 100


@pytest.fixture
def w():
    return workers(1)[0]


def get(w, target, *headers, method="GET", fd=FD, version="1.1"):
    """A request on a new client connection; the records it sent, read."""
    open_connection(w, fd)
    feed(w, fd, http_request(method, target, *headers, version=version))
    return read_records_to(w, 0)


def refused(w, status, fd=FD):
    """fd was answered ``status`` and closed: the reason it gave."""
    answer = response(w, fd)
    assert answer.status == status, answer
    assert answer.closes
    assert closed(w, fd) or lingering(w, fd)      # (what it sent unread: FIN, then its close)
    assert answer.headers["access-control-allow-origin"] == "*"   # a browser may read why
    return answer.body.decode()


# -- routes --------------------------------------------------------------------------------

def test_a_sub_path_holds_a_long_poll_and_asks_the_home(w):
    assert get(w, "/sub/news") == [("SUB", FD, w.serial[FD], 0, 0, records.SUB_QUIET, b"news")]
    assert w.state[FD] == HELD and w.proto[FD] == protocols.POLL_JSON
    assert written(w, FD) == b""                  # answered later, by longpoll


def test_a_sub_path_with_a_callback_is_a_jsonp_poll(w):
    get(w, "/sub/news?callback=cb.on_news")
    assert w.proto[FD] == protocols.POLL_JSONP


def test_sse_path_and_sub_path_accepting_an_event_stream_open_a_stream(w):
    for fd, request in ((100, ("/sse/news",)),
                        (101, ("/sub/news", "Accept: text/event-stream"))):
        sent = get(w, *request, fd=fd)
        # The first asks the home; the second finds this worker registered for the id already.
        assert [r[0] for r in sent] == (["SUB"] if fd == 100 else []), sent
        head = written(w, fd)
        assert head.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        if fd == 100:                             # a new id: its epoch comes when it is known
            assert head.endswith(b"\r\n\r\nretry: 2000\n\n")
        else:                                     # known (the first created it): at once
            epoch = w.part.peek(shmqueue.id_key(b"news"))[1]
            assert head.endswith(b"\r\n\r\nretry: 2000\n\nevent: epoch\ndata: %d\n\n" % epoch)
        assert w.proto[fd] == protocols.SSE
        settle(w)
        w.sent.clear()


def test_a_websocket_upgrade_is_answered_101(w):
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    get(w, "/ws/news", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Key: " + key, "Sec-WebSocket-Version: 13")
    head = written(w, FD)
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head   # RFC 6455's
    assert w.proto[FD] == protocols.WS


def test_a_ws_path_without_an_upgrade_is_refused_426(w):
    get(w, "/ws/news")
    assert "WebSocket upgrade is required" in refused(w, 426)


def test_a_websocket_of_another_version_is_refused_426(w):
    get(w, "/sub/news", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 8")
    assert "version 13" in refused(w, 426)


def test_a_websocket_key_that_is_not_16_bytes_is_refused_400(w):
    get(w, "/sub/news", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Key: c2hvcnQ=", "Sec-WebSocket-Version: 13")
    assert "Sec-WebSocket-Key" in refused(w, 400)


def test_a_js_path_is_a_compat_poll(w):
    sent = get(w, "/news.js")
    assert sent == [("CPOLL", FD, w.serial[FD], 0, b"news")]
    assert w.proto[FD] == protocols.POLL_COMPAT and w.state[FD] == PENDING


def test_a_head_of_a_js_path_only_looks(w):
    assert get(w, "/news.js", method="HEAD") == [("CPOLL", FD, w.serial[FD], 1, b"news")]


@pytest.mark.parametrize("path, name, content_type", [
    ("/megacomet.js", "megacomet.js", "application/javascript; charset=utf-8"),
    ("/demo", "demo.html", "text/html; charset=utf-8"),
    ("/", "demo.html", "text/html; charset=utf-8")])
def test_the_client_and_demo_pages_are_served_and_the_connection_kept(w, path, name,
                                                                       content_type):
    assert get(w, path) == []
    page = response(w, FD)
    assert (page.status, page.headers["content-type"]) == (200, content_type)
    assert page.body == front.static_file(name)
    assert page.headers["cache-control"] == "no-store"
    assert not page.closes and w.state[FD] == READING and reading(w, FD)


def test_options_is_a_cors_preflight(w):
    get(w, "/sub/news", method="OPTIONS")
    answer = response(w, FD)
    assert answer.status == 204 and answer.body == b""
    assert answer.headers["access-control-allow-methods"] == "GET, HEAD, OPTIONS"
    assert "Last-Event-ID" in answer.headers["access-control-allow-headers"]
    assert answer.headers["access-control-max-age"] == "86400"
    assert w.state[FD] == READING


# -- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["/nothing", "/a/b.js", "/sub", "/bad!.js", "/pub/news"])
def test_an_unknown_path_is_404(w, target):
    assert get(w, target) == []
    assert refused(w, 404) == "no such path\n"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_a_method_but_get_head_options_is_405(w, method):
    assert get(w, "/sub/news", method=method) == []
    assert refused(w, 405) == "method not allowed\n"


@pytest.mark.parametrize("header", ["Content-Length: 5", "Transfer-Encoding: chunked"])
def test_a_request_with_a_body_is_413_on_its_head(w, header):
    open_connection(w, FD)
    feed(w, FD, b"GET /sub/news HTTP/1.1\r\n%s\r\n\r\n" % header.encode())   # no body sent
    assert refused(w, 413) == "subscriber requests take no body\n"
    assert w.sent == {}


@pytest.mark.parametrize("target, reason", [
    ("/sub/bad!id", wire.ID_RULE),
    ("/sub/" + "i" * (wire.MAX_ID_LENGTH + 1), wire.ID_RULE),
    ("/sub/a,,b", wire.ID_RULE),
    ("/sub/a,b,a", "an id is named twice"),
    ("/sub/" + ",".join("i%d" % i for i in range(front.MAX_IDS + 1)), "at most 16 ids"),
    ("/sub/news?callback=1x", "callback must match"),
    ("/sub/news?callback=a(b)", "callback must match"),
    ("/sub/news?timeout=soon", "timeout must be a whole number"),
    ("/sub/news?since=%C3%A9", "since must be a whole number"),
    ("/sub/news?since=%FF", "query is not UTF-8")])
def test_a_bad_subscription_is_400(w, target, reason):
    assert get(w, target) == []
    assert reason in refused(w, 400)


def test_sixteen_ids_are_one_subscription(w):
    ids = ["i%d" % i for i in range(front.MAX_IDS)]
    sent = get(w, "/sub/" + ",".join(ids))
    assert sorted(r[-1] for r in sent) == sorted(i.encode() for i in ids)
    assert w.state[FD] == HELD and w.subs.many[FD].waiting == {i.encode() for i in ids}


def test_a_refusal_closes_even_a_kept_alive_connection_after_earlier_answers(w):
    open_connection(w, FD)
    feed(w, FD, http_request("OPTIONS", "/sub/a") + http_request("GET", "/sub/a?since=x")
         + http_request("OPTIONS", "/sub/a"))
    assert [r.status for r in responses(w, FD)] == [204, 400]
    assert lingering(w, FD)                       # the OPTIONS behind it is never answered
    assert written(w, FD) == b""


@pytest.mark.parametrize("query, timeout", [("", 30), ("?timeout=7", 7), ("?timeout=0", 1),
                                            ("?timeout=1000", 120)])
def test_a_polls_timeout_is_its_deadline_within_1_and_120_s(w, query, timeout):
    get(w, "/sub/news" + query)
    assert w.deadline[FD] == w._tick_of(w.now + timeout)


@pytest.mark.parametrize("query, timeout", [("", 600), ("?timeout=300", 300),
                                            ("?timeout=1000", 600)])
def test_with_a_longer_poll_timeout_a_poll_may_ask_up_to_it(query, timeout):
    # A host holding a million polls raises --poll-timeout so that their re-polls do not
    # fill its cores; the clients it serves must be able to ask for that long.
    w = workers(1, poll_timeout=600)[0]
    get(w, "/sub/news" + query)
    assert w.deadline[FD] == w._tick_of(w.now + timeout)


# -- signed subscriptions ------------------------------------------------------------------

SECRET = b"s3cret"


def test_with_a_secret_an_unsigned_subscription_is_403():
    w, = workers(1, secret=SECRET)
    assert get(w, "/sub/news") == []
    assert "signed subscription required" in refused(w, 403)


def test_with_a_secret_a_signed_subscription_holds_and_ends_with_its_signature():
    w, = workers(1, secret=SECRET)
    query = signing.query(SECRET, ["a", "b"], 10, time.time())
    assert len(get(w, "/sub/b,a?timeout=60&" + query)) == 2
    assert w.subs.expires[FD] == int(wire.parse_query(query.encode())["exp"])
    assert w.deadline[FD] <= w._tick_of(w.now + 10)     # the signature's end, not 60 s


@pytest.mark.parametrize("query, reason", [
    ("exp={later}&sig=00", "bad subscription signature"),
    ("exp={before}&sig=00", "expired"),
    ("exp=soon&sig=00", "exp must be a unix time")])
def test_with_a_secret_a_badly_signed_subscription_is_403(query, reason):
    w, = workers(1, secret=SECRET)
    now = int(time.time())              # (not at collection: a long suite would outlive it)
    query = query.format(later=now + 3600, before=now - 60)
    assert get(w, "/sub/news?" + query) == []
    assert reason in refused(w, 403)


def test_with_a_secret_a_compat_poll_must_be_signed_too():
    w, = workers(1, secret=SECRET)
    get(w, "/news.js")
    assert "signed subscription required" in refused(w, 403)
    sent = get(w, "/news.js?" + signing.query(SECRET, ["news"], 10, time.time()), fd=101)
    assert [r[0] for r in sent] == ["CPOLL"]


# -- cursors: what the SUB carries -----------------------------------------------------------

def test_since_and_epoch_of_one_id_go_to_its_home(w):
    sent = get(w, "/sub/news?since=4&epoch=77")
    assert sent == [("SUB", FD, w.serial[FD], 4, 77, 0, b"news")]   # not up to date: no QUIET


def test_since_and_epoch_pairs_of_several_ids_go_to_each_home(w):
    sent = get(w, "/sub/a,b,c?since=a:4,c:9&epoch=a:7,b:8")
    assert {r[-1]: r[3:5] for r in sent} == {b"a": (4, 7), b"b": (0, 8), b"c": (9, 0)}


def test_one_epoch_number_counts_for_every_id(w):
    sent = get(w, "/sub/a,b?epoch=5")
    assert {r[-1]: r[3:5] for r in sent} == {b"a": (0, 5), b"b": (0, 5)}


def test_last_event_id_is_a_reconnecting_event_streams_since(w):
    sent = get(w, "/sse/news?since=1", "Last-Event-ID: 12")
    assert sent[0][3] == 12


def one(query):
    return front.cursors_of(b"news", wire.parse_query(query.encode()))


def several(query):
    return front.cursors_of((b"a", b"b"), wire.parse_query(query.encode()))


@pytest.mark.parametrize("query, cursors", [
    ("", (0, 0)),
    ("since=0&epoch=0", (0, 0)),
    ("since=4", (4, 0)),
    ("since=0004&epoch=9", (4, 9)),
    ("since=4294967295", (0xFFFFFFFF, 0)),
    ("since=9999999999", (0xFFFFFFFF, 0)),                  # ten digits: clamped
    ("epoch=18446744073709551615", (0, 0xFFFFFFFFFFFFFFFF)),
    ("epoch=99999999999999999999", (0, 0xFFFFFFFFFFFFFFFF))])
def test_cursors_of_one_id(query, cursors):
    assert one(query) == cursors


@pytest.mark.parametrize("query, cursors", [
    ("", ({b"a": 0, b"b": 0}, {b"a": 0, b"b": 0})),
    ("since=a:4", ({b"a": 4, b"b": 0}, {b"a": 0, b"b": 0})),
    ("since=b:9,a:4&epoch=b:3", ({b"a": 4, b"b": 9}, {b"a": 0, b"b": 3})),
    ("since=a:1,a:2", ({b"a": 2, b"b": 0}, {b"a": 0, b"b": 0})),    # the last one counts
    ("epoch=6", ({b"a": 0, b"b": 0}, {b"a": 6, b"b": 6}))])
def test_cursors_of_several_ids(query, cursors):
    assert several(query) == cursors


def test_pairs_take_ids_with_colons():
    ids = (b"user:1", b"room:2")
    assert front.cursors_of(ids, {"since": "user:1:5,room:2:6"})[0] == {b"user:1": 5,
                                                                       b"room:2": 6}


@pytest.mark.parametrize("query, reason", [
    ("since=-1", "since must be a whole number"),
    ("since=+1", "since must be a whole number"),
    ("since= 1", "since must be a whole number"),
    ("since=1.5", "since must be a whole number"),
    ("since=", "since must be a whole number"),
    ("since=\u00b2", "since must be a whole number"),             # isdigit, not a number
    ("since=\uff11", "since must be a whole number"),             # a fullwidth digit
    ("since=99999999999", "since must be a whole number"),        # longer than any u32
    ("epoch=x", "epoch must be a whole number"),
    ("epoch=123456789012345678901", "epoch must be a whole number")])
def test_bad_cursors_of_one_id_are_400(query, reason):
    with pytest.raises(wire.HttpError) as e:
        one(query)
    assert (e.value.status, e.value.reason) == (400, reason)


@pytest.mark.parametrize("query, reason", [
    ("since=4", "since must be id:seq pairs of the subscription's ids"),
    ("since=c:4", "since must be id:seq pairs of the subscription's ids"),
    ("since=a:4,", "since must be id:seq pairs of the subscription's ids"),
    ("since=a:x", "since must be a whole number"),
    ("since=a:", "since must be a whole number"),
    ("epoch=c:4", "epoch must be id:epoch pairs of the subscription's ids"),
    ("epoch=a:-4", "epoch must be a whole number"),
    ("epoch=-4", "epoch must be a whole number")])
def test_bad_cursors_of_several_ids_are_400(query, reason):
    with pytest.raises(wire.HttpError) as e:
        several(query)
    assert (e.value.status, e.value.reason) == (400, reason)

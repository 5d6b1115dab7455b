"""WebSocket subscribers, end to end: the `websockets` library as an independent client for
what works, raw sockets for what must be refused.

Every bad input of the issue has a test here with a bounded cost and a clear
outcome (a status code or a close code), after which the worker still
serves: a declared length of 2^63, a frame over the limit, unmasked frames,
reserved bits, bad opcodes, long or fragmented control frames, invalid UTF-8,
fragments that never finish, floods of tiny frames and of pings, a client
that vanishes mid-stream, upgrades with a wrong version or no key.
"""

import base64
import contextlib
import json
import os
import socket
import struct
import time

import pytest

from conftest import wait_for
from test_bad_input import assert_serving, uid

from websockets.sync.client import connect as ws_connect

from megacomet import wsframe


def url(server, path):
    return "ws://127.0.0.1:%d%s" % (server.client, path)


def recv_json(ws, timeout=10):
    return json.loads(ws.recv(timeout=timeout))


@pytest.fixture(scope="module")
def srv():
    from conftest import Server
    server = Server("--heartbeat", 1, "--max-message", 4096, workers=2)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- what works -------------------------------------------------------------------------

def test_backlog_then_live_messages_as_json_text_frames(srv):
    ident = uid("ws")
    srv.pub(ident, "first")
    with ws_connect(url(srv, "/ws/" + ident)) as ws:
        first = recv_json(ws)
        epoch = first["epoch"]                         # the id's epoch: the same in each frame
        assert first == {"id": ident, "seq": 1, "data": "first", "epoch": epoch}
        for i in range(2, 20):
            srv.pub(ident, "live ✓ %d\n\"quoted\"" % i)
            assert recv_json(ws) == {"id": ident, "seq": i, "data": "live ✓ %d\n\"quoted\"" % i,
                                     "epoch": epoch}


def test_upgrade_on_sub_path_and_resume_with_since(srv):
    ident = uid("wsresume")
    for i in range(5):
        srv.pub(ident, "m%d" % (i + 1))
    with ws_connect(url(srv, "/sub/%s?since=3" % ident)) as ws:
        assert [recv_json(ws)["seq"] for _ in range(2)] == [4, 5]


def test_many_websockets_get_every_message_once(srv):
    ident = uid("wsfan")
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(ws_connect(url(srv, "/ws/" + ident))) for _ in range(16)]
        wait_for(lambda: min(w["subscribers"] for w in srv.stats()["workers"]) > 0, timeout=10,
                 message="websockets on both workers")
        time.sleep(0.3)
        srv.pub_batch([(ident, "b%d" % i) for i in range(40)])
        for ws in sockets:
            assert [recv_json(ws)["data"] for _ in range(40)] == ["b%d" % i for i in range(40)]


def test_server_answers_pings_and_pings_idle_clients(srv):
    with ws_connect(url(srv, "/ws/" + uid("ping"))) as ws:
        pong = ws.ping(b"are you there")
        assert pong.wait(timeout=5)
    # The server's own pings: a raw client sees a ping frame within the heartbeat (1 s).
    sock = raw_upgrade(srv, "/ws/" + uid("ping2"))
    try:
        started = time.monotonic()
        frame = read_frame(sock, timeout=3)
        assert frame[1] == wsframe.PING and time.monotonic() - started < 2.5
    finally:
        sock.close()


def test_client_close_is_answered_and_frees_the_slot(srv):
    before = srv.stats()["totals"]["subscribers"]
    with ws_connect(url(srv, "/ws/" + uid("bye"))) as ws:
        wait_for(lambda: srv.stats()["totals"]["subscribers"] == before + 1, timeout=5,
                 message="held")
        ws.close()
        assert ws.close_code == 1000
    wait_for(lambda: srv.stats()["totals"]["subscribers"] == before, timeout=5,
             message="the slot freed")


# -- raw clients for bad input ------------------------------------------------------------

def raw_upgrade(server, path, version=b"13", key=None, expect=101):
    sock = socket.create_connection(("127.0.0.1", server.client), timeout=5)
    key = base64.b64encode(os.urandom(16)) if key is None else key
    head = (b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            % path.encode())
    if key != b"-":
        head += b"Sec-WebSocket-Key: %s\r\n" % key
    if version is not None:
        head += b"Sec-WebSocket-Version: %s\r\n" % version
    sock.sendall(head + b"\r\n")
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    status = int(reply.split(b" ", 2)[1])
    assert status == expect, reply
    if status == 101:
        assert wsframe.accept_key(key) in reply
    return sock


def client_frame(opcode, payload=b"", fin=True, mask=True, rsv=0, length=None):
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | rsv | opcode
    if n < 126:
        head = bytes((b0, (0x80 if mask else 0) | n))
    elif n < 65536:
        head = bytes((b0, (0x80 if mask else 0) | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, (0x80 if mask else 0) | 127)) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_frame(sock, timeout=5):
    """(fin, opcode, payload) of the next server frame, skipping nothing."""
    sock.settimeout(timeout)

    def exact(n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data
    b0, b1 = exact(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", exact(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", exact(8))[0]
    return bool(b0 & 0x80), b0 & 0x0F, exact(n)


def close_code_after(sock, data, timeout=5):
    """Send data; the close code the server answers with (skipping pings and messages)."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fin, opcode, payload = read_frame(sock, timeout)
        if opcode == wsframe.CLOSE:
            return struct.unpack("!H", payload[:2])[0]
    raise AssertionError("no close frame")


BAD_FRAMES = [
    ("unmasked", client_frame(wsframe.TEXT, b"hi", mask=False), 1002),
    ("reserved bits", client_frame(wsframe.TEXT, b"hi", rsv=0x40), 1002),
    ("bad opcode", client_frame(0x3, b"hi"), 1002),
    ("long control frame", client_frame(wsframe.PING, b"x" * 126), 1002),
    ("fragmented control", client_frame(wsframe.PING, b"x", fin=False), 1002),
    ("invalid utf-8", client_frame(wsframe.TEXT, b"\xff\xfe"), 1007),
    ("utf-8 broken across fragments", client_frame(wsframe.TEXT, b"ok \xe2\x82", fin=False)
     + client_frame(wsframe.CONT, b"\x28"), 1007),
    ("length 2^63", bytes((0x81, 0xFF)) + struct.pack("!Q", 1 << 63) + b"\0" * 4, 1002),
    ("length 2^62", client_frame(wsframe.BINARY, b"", length=1 << 62)[:14], 1009),
    ("over the limit", client_frame(wsframe.BINARY, b"x" * 5000), 1009),
    ("fragments past the limit", b"".join(client_frame(wsframe.CONT if i else wsframe.BINARY,
                                                       b"x" * 1000, fin=False)
                                          for i in range(6)), 1009),
    ("continuation of nothing", client_frame(wsframe.CONT, b"x"), 1002),
    ("bad close code", client_frame(wsframe.CLOSE, struct.pack("!H", 999)), 1002),
]


@pytest.mark.parametrize("name, data, code", BAD_FRAMES, ids=[b[0] for b in BAD_FRAMES])
def test_protocol_errors_get_their_close_code(srv, name, data, code):
    pids = srv.worker_pids()
    sock = raw_upgrade(srv, "/ws/" + uid("bad"))
    try:
        assert close_code_after(sock, data) == code
    finally:
        sock.close()
    assert srv.worker_pids() == pids


@pytest.mark.parametrize("version, key, status", [(b"8", None, 426), (None, None, 426),
                                                  (b"13", b"-", 400), (b"13", b"short", 400)])
def test_bad_upgrades_get_a_status(srv, version, key, status):
    raw_upgrade(srv, "/ws/" + uid("up"), version=version, key=key, expect=status).close()


def test_ws_path_without_upgrade_is_426(srv):
    status, _, _ = srv.request("GET", "/ws/" + uid("plain"), port=srv.client)
    assert status == 426


def test_floods_and_unfinished_fragments_cost_little_and_harm_nobody(srv):
    pids = srv.worker_pids()
    ident = uid("flood")
    sock = raw_upgrade(srv, "/ws/" + ident)
    try:
        # 20 000 tiny data frames and 2 000 pings, never reading the pongs back.
        tiny = client_frame(wsframe.BINARY, b"x")
        sock.sendall(tiny * 20000 + client_frame(wsframe.PING, b"p") * 2000)
        # A fragmented message that never finishes, within the limit.
        sock.sendall(client_frame(wsframe.TEXT, b"a" * 100, fin=False))
        with ws_connect(url(srv, "/ws/" + ident)) as ws:     # everyone else is served
            srv.pub(ident, "still here")
            assert recv_json(ws)["data"] == "still here"
    finally:
        sock.close()
    assert_serving(srv, pids)


def test_client_vanishing_mid_stream_frees_it(srv):
    ident = uid("vanish")
    before = srv.stats()["totals"]["subscribers"]
    socks = [raw_upgrade(srv, "/ws/" + ident) for _ in range(10)]
    wait_for(lambda: srv.stats()["totals"]["subscribers"] == before + 10, timeout=5,
             message="held")
    srv.pub(ident, "x" * 3000)
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()                                     # RST mid-stream
    srv.pub(ident, "after")
    wait_for(lambda: srv.stats()["totals"]["subscribers"] == before, timeout=5,
             message="every slot freed")


def test_a_ping_flood_from_a_client_that_never_reads_is_bounded(srv):
    """Pongs pile up for a client that pings and never reads: past 1 MiB queued it is closed
    and counted (found by the server fuzzer: 11 MiB queued)."""
    pids = srv.worker_pids()
    before = srv.stats()["totals"]["slow_closed"]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", srv.client))
    key = base64.b64encode(os.urandom(16))
    sock.sendall(b"GET /ws/%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                 % (uid("pingflood").encode(), key))
    ping = client_frame(wsframe.PING, b"x" * 125)
    try:
        deadline = time.monotonic() + 20
        while srv.stats()["totals"]["slow_closed"] == before and time.monotonic() < deadline:
            try:
                sock.send(ping * 500, socket.MSG_DONTWAIT)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                break                                 # closed by the server
        wait_for(lambda: srv.stats()["totals"]["slow_closed"] > before, timeout=5,
                 message="the flooding client to be closed")
    finally:
        sock.close()
    assert_serving(srv, pids)

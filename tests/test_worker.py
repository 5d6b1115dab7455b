"""megacomet/worker.py: the connection states and their one door, without sockets.

A connection's state changes only through ``Worker.set_state``, which allows
exactly the moves of ``worker.TRANSITIONS``; no module of the package writes
``state[fd]`` itself.  At the end, a whole-server regression of the loop: a paused
publisher's fd, reused by the next connection, must not lose its EPOLLOUT.
"""

import os
import re
import socket
import time

import pytest

from conftest import ROOT, wait_for
from megacomet import config, shmqueue, worker
from megacomet.worker import State, StateError, TRANSITIONS
from test_pipelined_publish import connect_to_live_worker, live_stats, two_homes, worker_stopped


@pytest.fixture
def w():
    region = shmqueue.SharedRegion(1, 64, 1 << 20, 1 << 16, ttl_ms=1000, max_queued=4)
    cfg = config.Config(host="127.0.0.1", port=0, compat_ports=0, app_host="127.0.0.1",
                        app_port=0, max_message=1024, max_body=4096, header_timeout=1.0,
                        poll_timeout=1, heartbeat=1.0, queue_ttl=1.0, cors_origin="*",
                        app_token=None, secret=None, worker_timeout=10.0, log_format="text",
                        started_at=0.0)
    return worker.Worker(0, cfg, region, [-1])


def test_every_state_has_its_moves_and_closing_is_always_allowed():
    assert set(TRANSITIONS) == set(State)
    for old, allowed in TRANSITIONS.items():
        assert allowed <= set(State)
        if old != State.FREE:
            assert State.FREE in allowed, old       # whatever it does, a connection may end
    assert TRANSITIONS[State.FREE] == {State.READING}    # only accepting makes a connection


@pytest.mark.parametrize("old", list(State))
@pytest.mark.parametrize("new", list(State))
def test_set_state_allows_exactly_the_table(w, old, new):
    fd = 7
    w.state[fd] = old                               # the test sets the stage by hand
    if new in TRANSITIONS[old]:
        w.set_state(fd, new)
        assert w.state[fd] == new
    else:
        with pytest.raises(StateError, match="%s -> %s" % (old.name, new.name)):
            w.set_state(fd, new)
        assert w.state[fd] == old                   # a refused move changes nothing


def test_no_module_writes_a_connection_state_but_through_set_state():
    """Every ``state[...] =`` in the package is set_state's own (or the last-resort close of
    a connection whose close raised), so the table above is the whole story."""
    package = os.path.join(ROOT, "megacomet")
    writes = []
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            with open(os.path.join(package, name)) as f:
                for number, line in enumerate(f, 1):
                    if re.search(r"\bstate\[[^]]+\]\s*=[^=]", line):
                        writes.append((name, line.strip()))
    assert writes == [("worker.py", "state[fd] = new"),
                      ("worker.py", "self.state[fd] = FREE                    "
                                    "# (no set_state: whatever it was, it ends)")], writes


# -- regression, whole server: a paused publisher's fd reused -----------------------------------
# (Found reviewing the 2026-12-04 changes; it was in tests/test_review_regressions.py.)

def binary_to_live_worker(server, frames):
    """A binary publisher connection held by worker 0 (worker 1 stopped): retried until the
    frames it sends show up in worker 0's 'received'."""
    for _ in range(40):
        before = live_stats(server)["workers"][0]["received"]
        sock = socket.create_connection(("127.0.0.1", server.app), timeout=10)
        sock.sendall(frames[0])
        try:
            wait_for(lambda: live_stats(server)["workers"][0]["received"] > before,
                     timeout=0.5, interval=0.05)
        except AssertionError:
            sock.close()
            continue
        return sock
    raise AssertionError("every binary connection landed on the stopped worker")


def test_a_paused_binary_publishers_fd_reused_keeps_its_epollout(server_factory):
    """worker.pause_reading keeps the fd in Worker.paused; when the binary publisher then
    resets, close() frees the fd but leaves it in the list.  A new connection gets the same
    fd; when the backlog drains, _flush_backlog does ep.modify(fd, IN) on it, dropping the
    EPOLLOUT its unsent output needs: the rest of its answer is never written (here the
    answer of a batch, 3.3 MB, stops where the kernel's buffers ended)."""
    server = server_factory("--worker-timeout", 120, "--header-timeout", 30, workers=2)
    a, b = two_homes(server)
    pids = server.worker_pids()
    bad = b"x\n" * 80000
    batch = b"POST /pub HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s" % (len(bad), bad)
    with worker_stopped(pids[1]):
        frame = lambda i: b"\x02" + b.encode() + b"\x00m%d\x00" % i
        pub = binary_to_live_worker(server, [frame(0)])
        pub.sendall(b"".join(frame(i) for i in range(1, 40000)))   # backlog > BACKLOG_PAUSE
        time.sleep(0.5)
        pub.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        pub.close()                                                 # RST: closed, still "paused"
        time.sleep(0.3)
        sock, stream = connect_to_live_worker(server, rcvbuf=4096)  # the lowest free fd: its
        sock.sendall(batch)                                         # fd, most likely
        time.sleep(1.0)                   # answered: most of it in the kernel, ~0.5 MB waits
    time.sleep(1.5)                       # B runs: the backlog drains, "paused" fds get IN only
    sock.settimeout(3)
    got = bytearray()
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += chunk
            head, _, body = bytes(got).partition(b"\r\n\r\n")
            length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1)) if body else -1
            if len(body) >= length >= 0:
                break
    except socket.timeout:
        pass
    sock.close()
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    assert len(body) == length, (len(body), length)

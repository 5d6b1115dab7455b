"""Defects a review of the 2026-12-04 changes reproduced, kept as regressions.

Answers a publisher has not read yet must not be lost to a reset when its last answer
closes the connection; a worker dying during its reload step must not leave two owners of
one partition (nor shared counters below zero); a paused binary publisher's fd, reused by
the next connection, must not lose that connection's EPOLLOUT.
"""

import os
import re
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager

from conftest import ROOT, wait_for
from test_bad_input import uid
from test_pipelined_publish import (connect_to_live_worker, live_stats, post, two_homes,
                                    worker_stopped)

sys.path.insert(0, os.path.join(ROOT, "tools"))
from chaos import children_of  # noqa: E402


def read_raw_answers(sock, count, timeout):
    """Bytes read until ``count`` answers (counted by status line) or EOF/reset/timeout:
    (number of answers, closed by the server?)."""
    sock.settimeout(timeout)
    got = bytearray()
    closed = False
    try:
        while got.count(b"HTTP/1.1 ") < count or not got.endswith(b"}"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                closed = True
                break
            got += chunk
    except ConnectionResetError:
        closed = True
    except socket.timeout:
        pass
    return got.count(b"HTTP/1.1 "), closed


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


def vm_rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


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
                           + b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n" * 100000)
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


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_a_worker_dying_during_its_reload_step_leaves_one_owner_and_sane_counters(
        server_factory):
    """megacomet.py _reload/_reap: worker 0 dies (SIGKILL) while its reload successor is
    starting.  _reap schedules a restart (restart_at[0]); the standby is then told to take
    the partition over anyway, and once the reload is done _restart_due forks a second
    worker 0: two processes own partition 0 and its stats block.

    With 9011fed the second one's _continue_counters zeroes the shared 'connections' while
    the first holds connections; each close then decrements below 0: memoryview 'Q' raises
    ValueError in Worker.close after state[fd] = FREE but before os.close(fd), so the fd
    stays open and in the epoll set, and the loop spins at 100% CPU on its EOF."""
    server = server_factory(workers=2)
    supervisor = server.proc.pid
    pids = server.worker_pids()
    time.sleep(1.0)                        # worker 0 has lived a second when it is killed
    socks = []
    stop = time.monotonic() + 1.5

    def opener():                          # idle client connections, spread over the workers
        while time.monotonic() < stop:
            try:
                socks.append(socket.create_connection(("127.0.0.1", server.client)))
            except OSError:
                pass
            time.sleep(0.003)
    thread = threading.Thread(target=opener)
    thread.start()
    os.kill(supervisor, signal.SIGHUP)
    time.sleep(0.01)
    os.kill(pids[0], signal.SIGKILL)
    thread.join()
    wait_for(lambda: "reload: done" in server.stderr(), timeout=10, message="the reload")
    time.sleep(0.5)
    workers = children_of(supervisor)
    for sock in socks:
        sock.close()
    time.sleep(1.0)
    before = {pid: cpu_ticks(pid) for pid in workers}
    time.sleep(1.0)
    spinning = [pid for pid in workers if cpu_ticks(pid) - before[pid] > 50]
    problems = []
    if len(workers) != 2:
        problems.append("%d worker processes for 2 workers" % len(workers))
    if "ValueError" in server.stderr():
        problems.append("ValueError (counter underflow) in the workers")
    if spinning:
        problems.append("workers %s spin at 100%% CPU" % spinning)
    # Its lifetime is its own, not its standby's (forked just before the kill): a crash loop
    # is judged by how long the dead worker ran.
    lived = re.search(r"worker 0 \(pid %d\) \S+ .*?after ([0-9.]+) s" % pids[0], server.stderr())
    if lived is None or float(lived.group(1)) < 1.0:
        problems.append("the kill was logged as %r" % (lived and lived.group(0)))
    assert not problems, problems


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
    batch = b"POST /pub HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(bad), bad)
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

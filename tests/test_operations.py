"""What an operator relies on (issue 9), end to end: log lines, the host check, graceful
reload.  The single-file archive and the console command: tests/test_package.py.

Each starts the real server as its own process tree, as an operator would.
"""

import json
import math
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time

from conftest import ROOT, Server, wait_for


# -- logs --------------------------------------------------------------------------

def test_log_lines_are_bounded_per_second_and_structured(server_factory):
    server = server_factory("--log-format", "json", workers=1)
    before = len(server.stderr())
    started = time.monotonic()
    for i in range(400):                              # each one a logged 404 once
        status, _, _ = server.request("GET", "/nowhere/%d" % i, port=server.client)
        assert status == 404
    took = time.monotonic() - started
    time.sleep(1.2)                                   # the worker sums up what it suppressed
    lines = server.stderr()[before:].splitlines()
    records = [json.loads(line) for line in lines]
    # 20 lines per one-second window, plus one line saying how many it suppressed; a burst
    # shorter than a second may still straddle two windows.
    windows = math.ceil(took) + 1
    assert len(records) <= 21 * windows, (len(records), took)
    assert {"ts", "level", "pid", "worker", "msg"} <= set(records[0])
    suppressed = sum(int(r["msg"].split()[0]) for r in records if "suppressed" in r["msg"])
    assert suppressed + len([r for r in records if "404" in r["msg"]]) == 400


# -- the host check ------------------------------------------------------------------

def run_check(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "megacomet.py"), "check", *args],
                          capture_output=True, text=True, timeout=30)


def test_check_passes_for_what_this_host_holds_and_names_the_fix_otherwise():
    small = run_check("--connections", "1000", "--workers", "2")
    assert small.returncode == 0, small.stdout
    assert "this host can hold them" in small.stdout
    hard = int(open("/proc/self/limits").read().split("Max open files")[1].split()[1])
    # More connections per worker than this host's fd limit allows: must fail, with the fix.
    big = run_check("--connections", str(hard * 4), "--workers", "2")
    assert big.returncode == 1, big.stdout
    assert "FIX  fd limit per process" in big.stdout
    assert "LimitNOFILE=%d" % (hard * 2 + 96) in big.stdout
    assert "fall short" in big.stdout.splitlines()[-1]
    for name in ("fs.file-max", "fs.nr_open", "net.core.somaxconn", "tcp_max_syn_backlog",
                 "ip_local_port_range", "tcp_mem", "free memory"):
        assert name in big.stdout, name


def test_check_names_the_max_ids_and_poll_timeout_a_million_polls_need():
    # Both stopped the first million-connection run: "id table full" at ~780 000, then the
    # re-polls of a 30 s (then 120 s) timeout filling both cores.
    default = run_check("--connections", "1000000", "--workers", "64")
    assert "FIX  --max-ids" in default.stdout
    assert "start the server with --max-ids 1340000" in default.stdout
    # At 30 s each of N polls comes back N/30 times a second: more than a quarter of any
    # host's cores once N is 200 000 per core.
    many = str(200000 * os.cpu_count())
    default = run_check("--connections", many, "--workers", "64")
    assert "FIX  cores kept busy by re-polls of idle long-polls at --poll-timeout 30 " \
        in default.stdout
    raised = run_check("--connections", many, "--workers", "64", "--poll-timeout", "3600")
    assert "ok   cores kept busy" in raised.stdout
    assert "ok   --max-ids" in run_check("--connections", "1000000", "--workers", "64",
                                         "--max-ids", "1340000").stdout


# -- graceful reload -----------------------------------------------------------------

sys.path.insert(0, os.path.join(ROOT, "tools"))


class Load:
    """Publishers (HTTP, one connection per message; binary, one long connection) and
    long-poll subscribers re-polling with since, each counting every failed attempt."""

    def __init__(self, server, subscribers=12):
        self.server = server
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.confirmed = {}              # id -> [data] answered 202, in order
        self.received = {}               # id -> [data] seen by its subscriber
        self.binary_sent = 0
        self.failures = []               # (who, error)
        self.ids = ["reload%d" % i for i in range(subscribers)]
        self.threads = [threading.Thread(target=self.subscribe, args=(i,)) for i in self.ids]
        self.threads += [threading.Thread(target=self.publish_http),
                         threading.Thread(target=self.publish_binary)]
        for t in self.threads:
            t.start()

    def fail(self, who, error):
        with self.lock:
            self.failures.append((who, repr(error)))

    def subscribe(self, ident):
        since = 0
        got = self.received.setdefault(ident, [])
        while not self.stop.is_set():
            try:
                status, _, body = self.server.sub(ident, since=since, timeout=2, wait=10)
            except OSError as e:
                self.fail("subscriber", e)
                time.sleep(0.05)
                continue
            if status != 200:
                self.fail("subscriber", status)
                continue
            doc = json.loads(body)
            for message in doc["messages"]:
                got.append(message["data"])
            since = doc["last"]

    def publish_http(self):
        n = 0
        while not self.stop.is_set():
            ident = self.ids[n % len(self.ids)]
            data = "http-%d" % n
            try:
                status, _, body = self.server.request("POST", "/pub/" + ident, data.encode(),
                                                      headers={"Connection": "close"})
            except OSError as e:
                self.fail("http publisher", e)
                continue
            if status == 202:
                self.confirmed.setdefault(ident, []).append(data)
            else:
                self.fail("http publisher", (status, body))
            n += 1
            time.sleep(0.005)

    def publish_binary(self):
        sock = None
        n = 0
        while not self.stop.is_set():
            try:
                if sock is not None and select.select([sock], [], [], 0)[0] and not sock.recv(1):
                    sock.close()                  # EOF: this worker goes away; what we sent
                    sock = None                   # before closing is still published
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.server.app), timeout=5)
                sock.sendall(b"\x02%s\x00bin-%d\x00" % (b"binary-only", n))
                n += 1
                self.binary_sent = n
            except OSError as e:
                self.fail("binary publisher", e)
                sock = None
            time.sleep(0.005)
        if sock is not None:
            sock.close()

    def finish(self):
        time.sleep(0.5)
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)


def test_sighup_reload_replaces_workers_with_new_code_losing_and_refusing_nothing(tmp_path):
    shutil.copytree(os.path.join(ROOT, "megacomet"), tmp_path / "megacomet",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "megacomet.py"), tmp_path)
    pid_file = tmp_path / "megacomet.pid"
    server = Server("--poll-timeout", 30, "--pid-file", pid_file, workers=2,
                    command=[sys.executable, str(tmp_path / "megacomet.py")], cwd=str(tmp_path))
    server.start()
    try:
        old_pids = server.worker_pids()
        load = Load(server)
        time.sleep(1.0)
        source = (tmp_path / "megacomet" / "appport.py").read_text()
        assert source.count('b"ok\\n"') == 1
        (tmp_path / "megacomet" / "appport.py").write_text(source.replace('b"ok\\n"', 'b"ok, reloaded\\n"'))
        assert pid_file.read_text().strip() == str(server.proc.pid)
        asked = subprocess.run([sys.executable, str(tmp_path / "megacomet.py"), "reload",
                                "--pid-file", str(pid_file)], capture_output=True, text=True,
                               timeout=10)
        assert asked.returncode == 0, asked.stderr
        wait_for(lambda: "reload: done" in server.stderr(), timeout=30, message="the reload")
        time.sleep(1.0)
        load.finish()
        assert load.failures == [], load.failures[:10]
        new_pids = server.worker_pids()
        assert all(new_pids) and not set(new_pids) & set(old_pids)
        for _ in range(6):                        # every worker runs the new code
            assert server.request("GET", "/health")[2] == b"ok, reloaded\n"
        published = sum(len(v) for v in load.confirmed.values())
        assert published > 100 and load.binary_sent > 100
        for ident, sent in load.confirmed.items():
            assert load.received[ident] == sent, ident       # none lost, none twice, in order
        try:
            totals = wait_for(lambda: (lambda t: t if t["published"] == t["received"] else None)(
                server.stats()["totals"]), timeout=5, message="every binary frame stored")
        except AssertionError:
            raise AssertionError((server.stats()["totals"], published, load.binary_sent,
                                  server.stderr()[-3000:]))
        assert totals["received"] == published + load.binary_sent
        assert "Traceback" not in server.stderr()
    finally:
        server.stop()
    assert not pid_file.exists()

"""The Redis lab itself (tools/redislab.py, tests/redisfixtures.py, tools/cluster.py --dry-run).

Real redis-server processes: a standalone server starts, answers, loses its
data on restart and leaves no process when stopped; a cluster forms with 3
masters and 3 replicas, a key lands on the master master_for_key() names, and
a killed master is failed over within a bounded time.  About 15 s in all.
"""

import os
import re
import subprocess
import sys
import time

import hiredis
import pytest

from conftest import ROOT
from redisfixtures import redis_cluster, redis_standalone, require_redis  # noqa: F401 (fixtures)

import redislab

FAILOVER_BOUND = 15.0     # node timeout 2 s: about 4 s measured here; busy CI gets slack


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_standalone_answers_restarts_empty_and_stops_without_a_trace(redis_standalone):
    r = redis_standalone
    assert r.url == "redis://127.0.0.1:%d" % r.port
    assert r.command("SET", "greeting", "hello") == "OK"
    assert r.cli("GET", "greeting") == "hello"
    assert r.command("GET", "greeting", encoding=None) == b"hello"
    assert r.command("CONFIG", "GET", "maxmemory-policy") == ["maxmemory-policy", "noeviction"]
    assert r.command("CONFIG", "GET", "save") == ["save", ""]
    with pytest.raises(hiredis.ReplyError):
        r.command("NOSUCHCOMMAND")

    port, old_pid = r.port, r.pid
    r.restart()
    assert r.port == port and r.pid != old_pid and gone(old_pid)
    assert r.command("GET", "greeting") is None          # nothing was saved

    pid, directory = r.pid, r.dir
    r.stop()
    assert gone(pid) and not os.path.exists(directory) and not r.alive()
    assert not redislab.ping(port)
    r.stop()                                             # twice is harmless


def test_standalone_pause_resume_kill(redis_standalone):
    r = redis_standalone
    r.pause()
    with pytest.raises(TimeoutError):
        r.command("PING", timeout=0.3)
    r.resume()
    assert r.command("PING") == "PONG"
    r.command("DEBUG", "SLEEP", "0")                      # allowed from loopback (slow-Redis tests)
    pid = r.pid
    r.kill()
    assert gone(pid) and not r.alive()
    r.restart()
    assert r.command("PING") == "PONG"


def test_cluster_has_three_masters_each_with_a_replica(redis_cluster):
    c = redis_cluster
    masters, replicas = c.masters(), c.replicas()
    assert len(masters) == 3 and len(replicas) == 3
    assert set(masters) | set(replicas) == set(c.nodes)
    assert len(c.urls) == 6 and c.url in c.urls
    ranges = c.slot_map()
    assert ranges[0][0] == 0 and ranges[-1][1] == redislab.SLOTS - 1
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))     # no slot left out
    assert all(len(reps) == 1 and reps[0] in replicas for _, _, _, reps in ranges)
    assert set(c.state().values()) == {"ok"}


def test_a_key_lands_on_the_master_master_for_key_names(redis_cluster):
    c = redis_cluster
    for key in ("alice", "bob", "{room:7}:stream", "{room:7}:seq"):
        master = c.master_for_key(key)
        assert master.command("SET", key, "v-" + key) == "OK"     # no MOVED: its slot is there
        for other in c.masters():
            if other is not master:
                with pytest.raises(hiredis.ReplyError, match="MOVED"):
                    other.command("GET", key)
        assert c.cli("GET", key) == "v-" + key                       # redis-cli -c agrees
    assert c.master_for_key("{room:7}:stream") is c.master_for_key("{room:7}:seq")


def test_a_killed_master_is_failed_over_in_bounded_time():
    require_redis()
    with redislab.Cluster() as c:                # its own: this test kills a master
        old = c.master_for_key("k")
        replica = [reps[0] for _, _, m, reps in c.slot_map() if m is old][0]
        old.command("SET", "k", "v")
        old.command("WAIT", 1, 2000)             # replicated before the kill (else it may be lost)
        started = time.monotonic()
        c.kill(old)
        new = c.wait_failover(old, timeout=FAILOVER_BOUND)
        took = time.monotonic() - started
        assert new is replica and new.role() == "master", (new, replica)
        assert c.master_for_key("k") is new and new.command("GET", "k") == "v"
        assert set(c.state().values()) == {"ok"}
        print("failover took %.1f s" % took)
        old.restart()                            # it rejoins as the new master's replica
        c.wait_ok(timeout=20, synced=True)
        assert old.role() == "slave"
        pids = [n.pid for n in c.nodes]
    assert all(gone(pid) for pid in pids)


def test_cluster_tool_dry_run_starts_redis_prints_the_node_commands_and_stops():
    require_redis()
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cluster.py"), "--dry-run",
                           "--nodes", "2", "--workers", "3", "--base-port", "18000"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    url, pid = re.search(r"Redis: (redis://127\.0\.0\.1:\d+)  pid (\d+)", done.stdout).groups()
    commands = [line for line in done.stdout.splitlines() if "megacomet.py" in line]
    assert len(commands) == 2
    for i, line in enumerate(commands):
        assert ("--workers 3 --host 127.0.0.1 --port %d --app-port %d --redis %s"
                % (18000 + 10 * i, 19000 + 10 * i, url)) in line
    assert gone(int(pid))

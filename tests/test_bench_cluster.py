"""bench.py's cluster modes, short, against MegaComet only, so that they keep working.

One run of ``tools/bench.py --quick`` with cluster-deliver (two nodes on a fresh
Redis: publishes on the subscribers' node and on the other one) and
cluster-resubscribe (10 000 ids held on WebSockets, Redis restarted under them):
the record must carry every figure the table shows, and each must be sane.  Speed
is not judged (the machine may be busy), only that the tool still measures.
"""

import json
import os
import subprocess
import sys

from conftest import ROOT
from redisfixtures import require_redis


def test_bench_cluster_modes_against_megacomet(tmp_path):
    require_redis()
    out = tmp_path / "bench.json"
    # bench.py exits 1 when it adds notes, e.g. "the machine was busy": judge its record.
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "--quick",
                           "--servers", "megacomet", "--workers", "1",
                           "--modes", "cluster-deliver,cluster-resubscribe", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["redis"] == "standalone" and doc["servers"] == ["megacomet"]
    table = {row["metric"]: row["megacomet"] for row in doc["table"]}

    deliver = doc["results"]["megacomet"]["cluster-deliver"]
    assert deliver["ok"], deliver["problems"]
    for where in ("same", "cross"):
        phase = deliver["phases"]["deliver_single_" + where]
        assert phase["expected"] == phase["exactly_one"] == phase["published"] == 2000, phase
        assert table["cluster-deliver/%s: not exactly once" % where] == "0"
        assert phase["publish_per_s"] > 0 and phase["deliveries_per_s"] > 0
        lat = phase["latency_ms"]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["max"], lat
        # Both nodes' processes, and redis-server apart; their sum.
        assert len(phase["server_pids"]) >= 4, phase["server_pids"]
        assert phase["cpu_us_per_delivery"] > 0 and phase["redis_cpu_us_per_delivery"] > 0
        assert abs(phase["all_cpu_us_per_delivery"] - phase["cpu_us_per_delivery"]
                   - phase["redis_cpu_us_per_delivery"]) < 0.1, phase
        # One script per publish, and the commands it runs (commandstats counts them).
        assert phase["redis_scripts_per_publish"] >= 1, phase["redis_calls_by_command"]
        assert phase["redis_commands_per_publish"] >= phase["redis_scripts_per_publish"] + 4
        assert phase["redis_calls_by_command"]["publish"] >= 2000
        for label in ("publish msg/s", "latency p99 ms", "nodes CPU us/delivery",
                      "Redis CPU us/delivery", "nodes+Redis CPU us/delivery",
                      "Redis cmds/publish"):
            assert table["cluster-deliver/%s: %s" % (where, label)] not in ("-", None), label

    resub = doc["results"]["megacomet"]["cluster-resubscribe"]
    assert resub["ok"], resub["problems"]
    phases = resub["phases"]
    assert phases["open"]["ids"] == 10000 and phases["open"]["opened"] == 625
    assert phases["open"]["channels_joined_s"] > 0
    rejoin = phases["rejoin"]
    assert rejoin["expected"] == rejoin["exactly_one"] == 625, rejoin
    assert phases["before"]["exactly_one"] == 625
    # Times count from Redis answering again: every sample message came after it, and the
    # channels were all joined again (Redis says so) within the run.
    assert 0 < rejoin["latency_ms"]["p50"] <= rejoin["time_to_all_ms"] < 30000, rejoin
    assert 0 < rejoin["channels_rejoined_s"] < 30 and rejoin["restart_s"] > 0, rejoin
    assert rejoin["node_counters"]["redis_resubscribes"] > 0, rejoin["node_counters"]
    for label in ("restart to all sample ms", "restart to all channels s",
                  "not exactly once (after)"):
        assert table["cluster-resubscribe: " + label] not in ("-", None), label
    assert table["cluster-resubscribe: not exactly once (after)"] == "0"

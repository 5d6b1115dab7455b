"""CI run of tools/soak.py: 15 s of mixed load; worker memory and fds flat, counters add up.

Held and re-polling subscribers, compat readers, connections opened and
closed, single/batch/binary publishing on 2 workers, sampled every second.
The tool's verdict covers private RSS and fd counts (flat after warm-up, fds
back to idle once the load closes) and /stats totals (received = published =
what was sent, delivered = what was read, no connection left).  About 20 s;
the long run is ``python tools/soak.py`` (600 s).

The load is the one 30 s at the defaults made (~9 000 messages published, ~36 000
delivered, ~5 300 connections accepted, each of the 1 000 held polls answered by its
timeout once), in half the time: --rate 600 instead of 300, twice the churn loops,
--hold-timeout 9 so that the held polls time out during the load.  Private RSS is judged
from the first sample after a 3 s warm-up (it is flat from the first samples of load on) to
the last third: ~25 000 requests apart, as many as in the 30 s run (10 s warm-up, samples
2 s apart), so a leak per request is caught as small as before (~130 B).  The machine
stays far from busy (~0.6 CPU).
"""

import json
import os
import subprocess
import sys

from conftest import ROOT
from test_chaos import alive

SOAK = os.path.join(ROOT, "tools", "soak.py")


def test_soak_short_run_is_flat_and_consistent(tmp_path):
    record = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, SOAK, "--duration", "15", "--interval", "1",
                           "--warmup", "3", "--rate", "600", "--churn", "40",
                           "--hold-timeout", "9", "--json", str(record)],
                          cwd=ROOT, capture_output=True, text=True, timeout=90)
    output = proc.stdout[-5000:] + proc.stderr[-3000:]
    assert record.exists(), output
    rec = json.loads(record.read_text())
    assert rec["problems"] == [], output
    counters = rec["counters"]
    assert counters["received"] == counters["published"] == counters["sent_by_soak"] > 1000, output
    assert counters["delivered"] == counters["read_by_soak"] > 1000, output
    assert counters["connections_after_close"] <= 1, output
    assert counters["subscribers_after_close"] == 0, output
    assert len(rec["workers"]) == 2, output
    assert all(w["fds_closed"] <= w["fds_idle"] + 2 for w in rec["workers"]), output
    assert proc.returncode == 0, output
    assert not [pid for pid in rec["server_pids"] if alive(pid)], "server processes left behind"

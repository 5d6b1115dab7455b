"""CI run of tools/soak.py: 30 s of mixed load; worker memory and fds flat, counters add up.

Held and re-polling subscribers, compat readers, connections opened and
closed, single/batch/binary publishing on 2 workers, sampled every 2 s.
The tool's verdict covers private RSS and fd counts (flat after warm-up, fds
back to idle once the load closes) and /stats totals (received = published =
what was sent, delivered = what was read, no connection left).  About 35 s;
the long run is ``python tools/soak.py`` (600 s).
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
    proc = subprocess.run([sys.executable, SOAK, "--duration", "30", "--interval", "2",
                           "--json", str(record)],
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

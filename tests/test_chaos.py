"""CI run of tools/chaos.py: workers SIGKILLed under load lose, duplicate and reorder nothing.

300 long-poll subscribers on 30 ids, 2 workers, 7.5 s of HTTP and binary
publishing at 600 messages/s with a random worker SIGKILLed every 1.5 s (4 kills),
then the tool's own drain and checks: about 12 s.  (The load of 15 s at the
default 300/s with a kill every 3 s: as many kills, messages and deliveries,
~4 500 and ~44 000; a worker is back within 0.1 s of its kill.)  The long run is
``python tools/chaos.py`` (3000 subscribers, 60 s, 4 workers).
"""

import json
import os
import subprocess
import sys

from conftest import ROOT

CHAOS = os.path.join(ROOT, "tools", "chaos.py")


def alive(pid):
    """Is pid a live (not zombie) megacomet process? A reused pid is some other program."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read()
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return b"megacomet.py" in cmdline and state not in ("Z", "X")


def test_chaos_short_run_loses_nothing(tmp_path):
    record = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, CHAOS, "-n", "300", "--workers", "2", "--duration", "7.5",
                           "--kill-every", "1.5", "--rate", "600", "--seed", "1", "--json", str(record)],
                          cwd=ROOT, capture_output=True, text=True, timeout=90)
    output = proc.stdout[-4000:] + proc.stderr[-3000:]
    assert record.exists(), output
    rec = json.loads(record.read_text())
    assert (rec["lost"], rec["duplicated"], rec["out_of_order"]) == (0, 0, 0), output
    assert rec["hung"] == 0 and rec["checks"].get("seq mismatch", 0) == 0, output
    # The run did what it says: kills happened and were survived, messages flowed.
    assert len(rec["kills"]) >= 3 and rec["restart_s"]["not_restarted"] == 0, output
    assert rec["restart_s"]["max"] < 3.0, output
    assert rec["published"]["http_confirmed"] > 1000 and rec["deliveries"] > 10000, output
    assert proc.returncode == 0, output
    assert not [pid for pid in rec["server_pids"] if alive(pid)], "server processes left behind"

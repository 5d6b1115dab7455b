"""The fuzzer's CI run: tools/fuzz_server.py, briefly, against a real server it starts itself.

What a pass proves: 3000 random and mutated inputs (polls, publishes, batches,
chunked bodies, binary frames, pipelines, truncations, garbage; EventSource
requests with odd since and Last-Event-ID values; WebSocket upgrades valid and
odd, then random client frames, mutated frame streams, floods; streams that
vanish or never read; a few hundred connections at once) to both ports of a
2-worker server with small limits leave every worker alive (the same pids),
/health at 200, publish/subscribe round trips working (buffered, held polls
getting a later publish, fresh WebSocket and EventSource streams getting it
too), each worker's fds and private RSS back at their baseline, no connection
or poll left over, no worker busy with no traffic, no /health probe stalled
while the inputs flew, every valid request answered as it should be (a
WebSocket's close code and pongs included), every stream well formed and in
order, and nothing alarming in the server log ("Traceback", "internal error",
"died", a restart).

It is a sample, not a proof of absence: a few thousand inputs from one seed.
The seed is fixed, so a failure here reproduces with the command in the
message; the long run is ``python tools/fuzz_server.py`` (20 000 inputs, a new
seed each time), which also replays inputs to name the one that broke a worker.
"""

import os
import re
import subprocess
import sys

from conftest import ROOT

SEED = 20261227             # one "drain" flood (16 MiB of pings, read only afterwards): input 2479
INPUTS = 3000


def test_fuzz_server_short_run():
    args = ["-n", str(INPUTS), "--workers", "2", "--seed", str(SEED), "--time-limit", "45",
            "--no-bisect"]
    tool = os.path.join(ROOT, "tools", "fuzz_server.py")
    try:
        proc = subprocess.run([sys.executable, tool, *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=58)
    except subprocess.TimeoutExpired as e:
        raise AssertionError("fuzz_server did not finish within 58 s: %s" % e.stdout) from None
    out = proc.stdout
    report = out[-6000:] + proc.stderr[-3000:]
    hint = "\nto find the input: python tools/fuzz_server.py %s\n" % " ".join(args[:-1])
    failures = re.findall(r"^  (\[[\w -]+\] .*)$", out, re.M)
    assert not failures, hint + report

    sent = {port: int(n) for port, n in re.findall(r"^  (client|app) +port +(\d+):", out, re.M)}
    assert sum(sent.values()) == INPUTS, report
    assert min(sent.get("client", 0), sent.get("app", 0)) > INPUTS // 4, report
    client_kinds = dict(re.findall(r"([\w~-]+) (\d+)", re.search(r"^  client +port +\d+: (.*)$",
                                                                  out, re.M).group(1)))
    for kind in ("sse", "sse~", "ws", "ws~", "ws-upgrade", "ws-upgrade~", "ws-flood"):
        assert int(client_kinds.get(kind, 0)) > 0, (kind, report)
    streams = re.search(r"^streams answered: WebSocket (\d+), EventSource (\d+); from the server: "
                        r"text (\d+), ping \d+, pong (\d+), close \d+ \(([^)]*)\); events (\d+)",
                        out, re.M)
    assert streams, report
    websockets, eventsources, texts, pongs, codes, events = streams.groups()
    assert min(int(websockets), int(texts), int(pongs), int(eventsources), int(events)) > 0, report
    for code in (1000, 1002, 1007, 1009):         # what the oracle's frame sequences call for
        assert "%d x" % code in codes, (code, report)
    floods = re.search(r"^drain floods: (\d+) measured .*, (\d+) closed by the server", out, re.M)
    assert floods and int(floods.group(1)) + int(floods.group(2)) > 0, report

    passed = re.search(r"^checks passed: (.*)$", out, re.M).group(1)
    checks = {name: int(n) for name, n in re.findall(r"(\w[\w ]*?) (\d+)", passed)}
    batches = INPUTS // 1000
    failed = {f[1:f.index("]")] for f in failures}
    assert checks.get("responsive", 0) == batches, passed
    # One round of checks after the warm-up, then one after each batch.
    for name in ("workers alive", "health", "round trip", "held poll", "live streams", "settled",
                 "idle", "server log"):
        if name not in failed:
            assert checks.get(name, 0) == 1 + batches, (name, passed)
    verdict = "fuzz_server: OK: seed %d, %d inputs, 0 failures" % (SEED, INPUTS)
    assert proc.returncode == 0 and verdict in out, hint + report

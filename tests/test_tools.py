"""Short runs of the benchmark tools, so that they keep working.

The long versions live in tools/ (``python tools/bench.py``); here each mode of
the load generator runs once at a small size against a real server, and the
side-by-side bench runs its quick deliver mode against MegaComet and the
aiohttp peer.  Each checks the tools' own correctness verdicts, not speed.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT

MEGATEST = os.path.join(ROOT, "tools", "megatest.py")


def run_tool(args, timeout):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("mode, size", [("hold", ["-n", "400"]), ("deliver", ["-n", "300"]),
                                        ("fanout", ["-n", "300"]), ("queue", ["-m", "2000"]),
                                        ("churn", ["-n", "100", "--rate", "200", "--churn-time", "2"])])
def test_megatest_mode_against_the_server(server_factory, tmp_path, mode, size):
    server = server_factory(workers=2)
    record = tmp_path / "record.json"
    run_tool([MEGATEST, "--mode", mode, *size, "--port", str(server.client),
              "--app-port", str(server.app), "--server-pid", str(server.proc.pid),
              "--duration", "60", "--json", str(record)], timeout=120)
    data = json.loads(record.read_text())
    # megatest's own verdict: every subscriber got exactly its own messages,
    # every queued message drained, nothing stalled.
    assert data["ok"] is True and data["problems"] == [], data["summary"]
    assert data["summary"].startswith("megatest %s:" % mode)


@pytest.mark.parametrize("transport", ["sse", "ws"])
@pytest.mark.parametrize("mode, size", [("hold", ["-n", "300", "--hold", "2"]),
                                        ("deliver", ["-n", "300"]), ("fanout", ["-n", "300"])])
def test_megatest_streams_against_the_server(server_factory, tmp_path, mode, size, transport):
    # A heartbeat of 1 s: the held streams also get pings (WebSocket ones answered with pongs).
    server = server_factory("--heartbeat", "1", workers=2)
    record = tmp_path / "record.json"
    run_tool([MEGATEST, "--mode", mode, "--transport", transport, *size,
              "--port", str(server.client), "--app-port", str(server.app),
              "--server-pid", str(server.proc.pid), "--duration", "30", "--settle", "1.2",
              "--json", str(record)], timeout=60)
    data = json.loads(record.read_text())
    assert data["ok"] is True and data["problems"] == [], data["summary"]
    assert data["summary"].startswith("megatest %s/%s:" % (mode, transport))
    phases = data["phases"]
    if mode == "hold":
        assert phases["hold"]["client_counts"]["streams"] == 300
        # Each stream's pings in 2 s (an EventSource's "retry:" event is a comment too).
        counts = phases["hold"]["client_counts"]
        assert counts["pings"] >= 300 if transport == "ws" else counts["comments"] >= 600, counts
    else:
        for name, phase in phases.items():
            if name != "open":
                assert phase["exactly_one"] == phase["expected"] == 300, (name, phase)


def test_megatest_streams_against_the_aiohttp_peer(tmp_path):
    pytest.importorskip("aiohttp")
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(str(s.getsockname()[1]))
    peer = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "peers", "aiohttp_server.py"),
                             "--port", ports[0], "--app-port", ports[1]], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert "ready" in peer.stdout.readline()
        for transport in ("sse", "ws"):
            record = tmp_path / ("%s.json" % transport)
            run_tool([MEGATEST, "--mode", "deliver", "--transport", transport, "-n", "200",
                      "--publish", "batch,single", "--port", ports[0],
                      "--app-port", ports[1], "--server-pid", str(peer.pid),
                      "--duration", "30", "--json", str(record)], timeout=60)
            data = json.loads(record.read_text())
            assert data["ok"] is True and data["problems"] == [], data["summary"]
    finally:
        peer.terminate()
        peer.wait(10)


@pytest.mark.parametrize("mode", ["queue", "churn"])
def test_megatest_refuses_streams_where_it_only_polls(mode):
    proc = subprocess.run([sys.executable, MEGATEST, "--mode", mode, "--transport", "ws"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "long-poll" in proc.stderr, proc.stderr


def test_bench_quick_deliver_side_by_side(tmp_path):
    pytest.importorskip("aiohttp")
    out = tmp_path / "bench.json"
    # bench.py exits 1 when it adds notes, e.g. "the machine was busy": judge its table instead.
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "--quick",
                           "--servers", "megacomet,aiohttp", "--modes", "deliver", "--workers", "2",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    table = {row["metric"]: row for row in json.loads(out.read_text())["table"]}
    for publish in ("batch", "single one-deep", "single spread"):   # a round per publish shape
        row = table["deliver/%s: not exactly once" % publish]
        assert row["megacomet"] == "0" and row["aiohttp"] == "0", row
        assert int(table["deliver/%s: subscribers" % publish]["megacomet"]) > 0
    assert table["deliver/binary: not exactly once"]["megacomet"] == "0"


def test_scale_small_size(tmp_path):
    """tools/scale.py at one small size: its table has every column, and every message
    arrived exactly once."""
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "scale.py"),
                           "--sizes", "1500", "--workers", "2", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    header, row = doc["table"].splitlines()
    assert "not exactly once" in header
    cells = row.split()
    assert cells[0] == "1500" and cells[-1] == "0", row
    phases = doc["records"][0]["phases"]
    assert phases["hold"]["opened"] == 1500 and phases["deliver_batch"]["delivered"] == 1500
    assert doc["records"][0]["workers"] == 2


def test_scale_auto_workers_keep_each_under_its_open_files():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import scale
    assert [scale.workers_for(n, "auto") for n in (10000, 128000, 129000, 300000, 1000000)] \
        == [8, 8, 16, 24, 64]
    assert scale.workers_for(1000000, "16") == 16

"""``tools/bench.py --plot``: the SVG charts drawn from a real bench record.

tests/data/bench-sample.json is one real run of bench on the development machine (2 cores
shared with the load generator, nginx 1.22 + Nchan 1.3.6), kept as it was written:

    python3 tools/bench.py --quick --servers megacomet,nchan --modes hold,deliver,fanout \\
        --json tests/data/bench-sample.json

made with the commit that added this file (megatest's latency summaries carry a percentile
"curve" from then on).  Make it again the same way when the record's format changes.

Each chart must exist, parse as XML, name both servers, have its axes labelled with
units, and hold one data series per server (an SVG group whose id names chart, mode and
server) that matches the record: the bars' lengths are proportional to CPU per delivery,
the memory points are ordered as PSS per connection, each latency line has a point per
percentile of the record's curve.  The same records give the same bytes in another
process; several files make the memory chart's lines.  The tests need matplotlib (the
bench extra) and are skipped without it, except under CI, where they must run.
"""

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from conftest import ROOT

BENCH = os.path.join(ROOT, "tools", "bench.py")
SAMPLE = os.path.join(ROOT, "tests", "data", "bench-sample.json")
SVG = "{http://www.w3.org/2000/svg}"
CHARTS = {"memory": "memory-per-connection.svg", "cpu": "cpu-per-delivery.svg",
          "latency": "latency.svg"}
UNITS = {"memory": "(bytes)", "cpu": "(µs)", "latency": "(ms)"}
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture
def need_matplotlib():
    if importlib.util.find_spec("matplotlib") is None:
        if IN_CI:
            pytest.fail("matplotlib is not installed, and under CI the chart tests must run "
                        "(it belongs in the test extra)")
        pytest.skip("matplotlib is not installed (pip install 'megacomet[bench]')")


def sample():
    with open(SAMPLE) as f:
        return json.load(f)


def delivery_phases(doc):
    """{(server, series id part): phase} of the sample's delivering phases."""
    out = {}
    for server, by_mode in doc["results"].items():
        for mode, rec in by_mode.items():
            for name, phase in rec["phases"].items():
                if name.startswith(("deliver_", "fanout")):
                    out[server, "poll-" + name.replace("_", "-")] = phase
    return out


def series(root, prefix):
    """{id: <g>} of the data series groups whose id starts with prefix."""
    return {g.get("id"): g for g in root.iter(SVG + "g") if (g.get("id") or "").startswith(prefix)}


def numbers(path_d):
    """The vertices of an SVG path's "d" ("M x y L x y ... z")."""
    vals = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", path_d)]
    return list(zip(vals[0::2], vals[1::2]))


def texts(root):
    return " ".join("".join(t.itertext()) for t in root.iter(SVG + "text"))


def check_charts(outdir, doc):
    servers = doc["servers"]
    assert sorted(servers) == ["megacomet", "nchan"]
    roots = {}
    for chart, name in CHARTS.items():
        path = os.path.join(outdir, name)
        assert os.path.getsize(path) > 1000, path
        roots[chart] = root = ET.parse(path).getroot()
        assert root.tag == SVG + "svg"
        words = texts(root)
        for s in servers:
            assert s in words, (chart, s)
        assert UNITS[chart] in words and "lower is better" in words, (chart, words[:300])

    # Memory: one series per server at the count held, ordered as the record's PSS.
    got = series(roots["memory"], "memory-hold-")
    pss, y = {}, {}
    for s in servers:
        g = got["memory-hold-" + s]
        marks = g.findall(".//" + SVG + "use")
        assert len(marks) == 1, (s, ET.tostring(g)[:300])
        y[s] = float(marks[0].get("y"))
        pss[s] = doc["results"][s]["hold"]["phases"]["hold"]["pss_bytes_per_connection"]
    assert pss["nchan"] != pss["megacomet"]
    # SVG's y grows downwards: the larger figure is drawn higher.
    assert (y["nchan"] < y["megacomet"]) == (pss["nchan"] > pss["megacomet"]), (y, pss)

    # CPU: a bar per server and delivery, its length proportional to the record's figure.
    phases = delivery_phases(doc)
    bars = series(roots["cpu"], "cpu-")
    assert len(bars) == len(phases) == 6, sorted(bars)   # megacomet 4, nchan 2 (single, fanout)
    per_us = []
    for (s, part), phase in phases.items():
        xs = [x for x, _ in numbers(bars["cpu-%s-%s" % (part, s)].find(SVG + "path").get("d"))]
        per_us.append((max(xs) - min(xs)) / phase["cpu_us_per_delivery"])
    assert max(per_us) / min(per_us) < 1.01, per_us

    # Latency: a line per server and delivery, a point per percentile of the record's curve.
    lines = series(roots["latency"], "latency-")
    assert len(lines) == len(phases), sorted(lines)
    for (s, part), phase in phases.items():
        pts = numbers(lines["latency-%s-%s" % (part, s)].find(SVG + "path").get("d"))
        curve = phase["latency_ms"]["curve"]
        assert len(pts) == len(curve) >= 10, (s, part, len(pts))
        ys = [y for _, y in pts]
        assert ys == sorted(ys, reverse=True), (s, part)          # latency never falls
    return roots


def test_plot_from_saved_record(tmp_path, need_matplotlib):
    out = tmp_path / "charts"
    proc = subprocess.run([sys.executable, BENCH, "--plot", str(out), "--from-json", SAMPLE],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(CHARTS.values())
    check_charts(str(out), sample())

    # The same records give the same bytes, here in this process.
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import plots
    finally:
        sys.path.pop(0)
    again = tmp_path / "again"
    written, skipped = plots.write_charts(plots.load([SAMPLE]), str(again))
    assert skipped == {} and len(written) == 3
    for name in CHARTS.values():
        assert (again / name).read_bytes() == (out / name).read_bytes(), name

    # Several files: hold runs at other counts make each server's memory line.
    other = copy.deepcopy(sample())
    other["results"] = {s: {"hold": copy.deepcopy(r["hold"])} for s, r in other["results"].items()}
    for r in other["results"].values():
        hold = r["hold"]["phases"]["hold"]
        hold["opened"] *= 20
        hold["pss_bytes_per_connection"] /= 3
    more = tmp_path / "more.json"
    more.write_text(json.dumps(other))
    both = plots.load([SAMPLE, str(more)])
    path = tmp_path / "memory.svg"
    assert plots.plot_memory(both, str(path))
    got = series(ET.parse(path).getroot(), "memory-hold-")
    for s in ("megacomet", "nchan"):
        pts = numbers(got["memory-hold-" + s].find(SVG + "path").get("d"))
        assert len(pts) == 2 and pts[1][0] > pts[0][0] and pts[1][1] > pts[0][1], pts


def test_plot_without_matplotlib_says_what_to_install(tmp_path):
    out = tmp_path / "charts"
    code = ("import sys; sys.modules['matplotlib'] = None; sys.path.insert(0, %r); "
            "import bench; sys.exit(bench.main(sys.argv[1:]))" % os.path.join(ROOT, "tools"))
    proc = subprocess.run([sys.executable, "-c", code, "--plot", str(out), "--from-json", SAMPLE],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'megacomet[bench]'" in proc.stderr, proc.stderr
    assert not out.exists()
    proc = subprocess.run([sys.executable, BENCH, "--from-json", SAMPLE], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--from-json needs --plot" in proc.stderr, proc.stderr

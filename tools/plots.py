"""plots: SVG charts from tools/bench.py's records (``bench.py --plot DIR``).

Three charts, each written only when the records hold its figures:

  memory-per-connection.svg  server PSS per held connection against the number held, one
                             line per server, one panel per hold mode (hold, hold-sse,
                             hold-ws); several bench files (e.g. hold runs at 10 000,
                             100 000 and 300 000) make the lines
  cpu-per-delivery.svg       server CPU per delivery in microseconds, grouped horizontal
                             bars: one group per way of delivering (deliver/batch,
                             deliver/binary, deliver/single, fanout, churn, and their
                             EventSource and WebSocket versions), one bar per server, "n/a"
                             where a server ran the mode without that way of publishing
                             (Nchan has no batch API); with several runs of the same thing
                             the bar is their median and a whisker spans their range
  latency.svg                publish-to-receive latency of every message as a percentile
                             curve (megatest's "curve"; records from before it have only
                             p50/p90/p99/max, drawn as those points) on an axis that
                             stretches the tail (p90, p99, p99.9 equally spaced), one panel
                             per way of delivering, one line per server and run

matplotlib is imported here only, lazily, and never by the server: it is in the
``bench`` extra (``pip install 'megacomet[bench]'``).  The output is deterministic:
a fixed SVG hash salt, no date in the metadata, text kept as text, so the same
records give byte-identical files.  Each server's data series is an SVG group whose
id names the chart, the panel and the server (e.g. ``memory-hold-nchan``).
"""

import json
import math
import os
import re
import statistics

INSTALL_HINT = "pip install 'megacomet[bench]'"
SERVER_ORDER = ("megacomet", "aiohttp", "nchan")
COLORS = {"megacomet": "#1f77b4", "aiohttp": "#ff7f0e", "nchan": "#2ca02c"}
EXTRA_COLORS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
TRANSPORTS = (("poll", "long-poll"), ("sse", "EventSource"), ("ws", "WebSocket"))
# (megatest mode, delivery) in the order of bench's table, with their labels.
DELIVERIES = ((("deliver", "batch"), "batch publish"), (("deliver", "binary"), "binary publish"),
              (("deliver", "single"), "one POST each"), (("fanout", None), "fan-out to one id"),
              (("churn", None), "churn"))
RC = {"svg.hashsalt": "megacomet-bench", "svg.fonttype": "none", "font.size": 10,
      "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
      "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.grid": True, "grid.alpha": 0.35,
      "axes.spines.top": False, "axes.spines.right": False}
FILES = {"memory": "memory-per-connection.svg", "cpu": "cpu-per-delivery.svg",
         "latency": "latency.svg"}


class MissingMatplotlib(ImportError):
    pass


def require_matplotlib():
    """matplotlib, set to the Agg backend (no display); MissingMatplotlib if not installed."""
    try:
        import matplotlib
    except ImportError as e:
        raise MissingMatplotlib("--plot needs matplotlib (%s): %s, or pip install -r "
                                "tools/requirements-bench.txt" % (e, INSTALL_HINT)) from None
    matplotlib.use("Agg")
    return matplotlib


def load(paths):
    """The bench documents in ``paths`` (files written by ``bench.py --json``)."""
    docs = []
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
            raise ValueError("%s: not a tools/bench.py --json file (no \"results\")" % path)
        docs.append(doc)
    return docs


# ---------------------------------------------------------------------------
# Reading the records.

def _get(rec, *path):
    for k in path:
        if not isinstance(rec, dict) or k not in rec:
            return None
        rec = rec[k]
    return rec


def _split(mode):
    base, _, transport = mode.partition("-")
    return base, transport or "poll"


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _servers(docs):
    seen = []
    for doc in docs:
        for s in list(doc.get("servers") or ()) + list(doc["results"]):
            if s not in seen:
                seen.append(s)
    known = [s for s in SERVER_ORDER if s in seen]
    return known + [s for s in seen if s not in known]


def _records(docs):
    """(run index, server, bench mode, record) for every record."""
    for i, doc in enumerate(docs):
        for server, by_mode in doc["results"].items():
            for mode, rec in (by_mode or {}).items():
                if isinstance(rec, dict):
                    yield i, server, mode, rec


def _delivery_phases(mode, rec):
    """(delivery key, phase) of a record's delivering phases: key = (transport, mode, method)."""
    base, transport = _split(mode)
    phases = rec.get("phases") or {}
    if base == "deliver":
        for method in ("batch", "binary", "single"):
            if "deliver_" + method in phases:
                yield (transport, "deliver", method), phases["deliver_" + method]
        # bench's single-publish rounds per publish shape: "deliver_single_spread".
        for name in sorted(p for p in phases if p.startswith("deliver_single_")):
            yield (transport, "deliver", "single " + name[15:]), phases[name]
    elif base == "fanout":
        # megatest names the phase "fanout", or "fanout_1", "fanout_2", ... with --rounds.
        for name in sorted(p for p in phases if re.fullmatch(r"fanout(_\d+)?", p)):
            yield (transport, "fanout", None), phases[name]
    elif base == "churn" and "churn" in phases:
        yield (transport, "churn", None), phases["churn"]


def _delivery_order(key):
    transport, base, method = key
    t = [t for t, _ in TRANSPORTS].index(transport) if transport in dict(TRANSPORTS) else 9
    kinds = [k for k, _ in DELIVERIES]
    kind = (base, method and method.split()[0])      # "single spread": a shape of "single"
    d = kinds.index(kind) if kind in kinds else 9
    return t, d, str(method)


def _delivery_label(key, sep="\n"):
    transport, base, method = key
    kind = dict(DELIVERIES).get((base, method), "%s/%s" % (base, method))
    if method and " " in method and (base, method.split()[0]) in dict(DELIVERIES):
        kind = "%s, %s" % (dict(DELIVERIES)[base, method.split()[0]], method.split(" ", 1)[1])
    return "%s%s%s" % (dict(TRANSPORTS).get(transport, transport), sep, kind)


def memory_series(docs):
    """{hold mode: {server: [(connections held, PSS bytes per connection), ...]}}."""
    out = {}
    for _, server, mode, rec in _records(docs):
        if _split(mode)[0] != "hold":
            continue
        phase = _get(rec, "phases", "hold") or {}
        n, pss = _num(phase.get("opened")), _num(phase.get("pss_bytes_per_connection"))
        if n and pss is not None and pss > 0:       # a log axis: small runs can measure <= 0
            out.setdefault(mode, {}).setdefault(server, []).append((n, pss))
    return out


def cpu_values(docs):
    """{delivery key: {server: [CPU us per delivery, one per run]}} and the subscriber counts
    {delivery key: set of counts}."""
    out, counts = {}, {}
    for _, server, mode, rec in _records(docs):
        for key, phase in _delivery_phases(mode, rec):
            v = _num(phase.get("cpu_us_per_delivery"))
            if v is not None:
                out.setdefault(key, {}).setdefault(server, []).append(v)
                if _num(phase.get("expected")):
                    counts.setdefault(key, set()).add(phase["expected"])
    return out, counts


def latency_series(docs):
    """{delivery key: {server: [(percentiles, ms values, subscribers), one per run]}}."""
    out = {}
    for _, server, mode, rec in _records(docs):
        for key, phase in _delivery_phases(mode, rec):
            lat = phase.get("latency_ms") or {}
            if not lat.get("n"):
                continue
            curve = lat.get("curve")
            if curve:
                pts = [(float(p), float(v)) for p, v in curve]
            else:       # records from before megatest kept a curve
                pts = [(q, float(lat[k])) for q, k in ((50, "p50"), (90, "p90"), (99, "p99"),
                                                       (100, "max"))
                       if _num(lat.get(k)) is not None]
            if pts:
                out.setdefault(key, {}).setdefault(server, []).append(
                    ([p for p, _ in pts], [v for _, v in pts], phase.get("expected")))
    return out


# ---------------------------------------------------------------------------
# Drawing.

def _color(server, servers):
    if server in COLORS:
        return COLORS[server]
    others = [s for s in servers if s not in COLORS]
    return EXTRA_COLORS[others.index(server) % len(EXTRA_COLORS)]


def _gid(*parts):
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(str(p) for p in parts if p)).strip("-")


def _count(n):
    """10000 -> "10k", 1000000 -> "1M", 1500 -> "1.5k"."""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if n >= div:
            return ("%.3g" % (n / div)) + unit
    return "%d" % n


def _plain(v, _pos=None):
    if v >= 1:
        return "{:,.0f}".format(v).replace(",", " ")
    return "%g" % v


def _source(docs):
    """One line on where the figures come from."""
    sizes = sorted({"quick" if d.get("quick") else "full" for d in docs})
    workers = sorted({d.get("workers") for d in docs if d.get("workers")})
    text = "tools/bench.py, %s sizes" % "/".join(sizes)
    if workers:
        text += ", %s workers" % "/".join(str(w) for w in workers)
    if len(docs) > 1:
        text += ", %d runs" % len(docs)
    return text


def _figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path):
    fig.savefig(path, format="svg", metadata={"Date": None})


def _log_axis(axis, fmt):
    """Ticks at 1, 2, 5 times the powers of ten, labelled by fmt."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(fmt))
    axis.set_minor_formatter(NullFormatter())


def plot_memory(docs, path):
    series = memory_series(docs)
    if not series:
        return False
    servers = _servers(docs)
    modes = sorted(series, key=lambda m: [t for t, _ in TRANSPORTS].index(_split(m)[1])
                   if _split(m)[1] in dict(TRANSPORTS) else 9)
    fig = _figure(min(9.0, 2.9 * len(modes) + 1.3), 4.2)
    axes = fig.subplots(1, len(modes), sharey=True, squeeze=False)[0]
    values = [v for m in modes for pts in series[m].values() for _, v in pts]
    for ax, mode in zip(axes, modes):
        counts = sorted({n for pts in series[mode].values() for n, _ in pts})
        for server in [s for s in servers if s in series[mode]]:
            pts = sorted(series[mode][server])
            # The line goes through the median of the runs at each count; every run is a marker.
            xs = sorted({n for n, _ in pts})
            ys = [statistics.median(v for n, v in pts if n == x) for x in xs]
            color = _color(server, servers)
            line, = ax.plot(xs, ys, "-o", color=color, linewidth=2, markersize=6, label=server)
            line.set_gid(_gid("memory", mode, server))
            if len(pts) > len(xs):          # several runs at one count: each run as a dot
                dots, = ax.plot([n for n, _ in pts], [v for _, v in pts], "o", color=color,
                                markersize=4, alpha=0.5)
                dots.set_gid(_gid("memory", mode, server, "runs"))
            for x, y in list(zip(xs, ys))[-4:]:
                ax.annotate("%s B" % _plain(y), (x, y), textcoords="offset points",
                            xytext=(6, 4), fontsize=8, color=color)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(counts, [_count(n) for n in counts])
        ax.minorticks_off()
        ax.set_xlim(counts[0] / 1.8, counts[-1] * 2.5)
        ax.set_title(dict(TRANSPORTS).get(_split(mode)[1], mode) + " (%s)" % mode)
        ax.set_xlabel("connections held")
    _log_axis(axes[0].yaxis, _plain)
    axes[0].set_ylim(min(values) / 2, max(values) * 2.5)
    axes[0].set_ylabel("server PSS per held connection (bytes)")
    axes[0].legend(loc="best")
    fig.suptitle("Memory per idle connection (lower is better)\n%s" % _source(docs),
                 fontsize=11)
    _save(fig, path)
    return True


def plot_cpu(docs, path):
    values, counts = cpu_values(docs)
    if not values:
        return False
    servers = _servers(docs)
    keys = sorted(values, key=_delivery_order)
    present = [s for s in servers if any(s in values[k] for k in keys)]
    ran = {}            # which servers ran each megatest mode at all: "n/a" only where one did
    for _, server, mode, _rec in _records(docs):
        base, transport = _split(mode)
        ran.setdefault((transport, base), set()).add(server)
    # Horizontal bars: a full run has a dozen groups of three, which stay readable this way.
    fig = _figure(8.8, 1.3 + len(keys) * (0.24 * len(present) + 0.3))
    ax = fig.subplots()
    height = 0.8 / len(present)
    top = max(v for k in keys for vs in values[k].values() for v in vs)
    for j, server in enumerate(present):
        color = _color(server, servers)
        labelled = False
        for i, key in enumerate(keys):
            y = i - 0.4 + height * (j + 0.5)
            vs = values[key].get(server)
            if not vs:
                if server in ran.get((key[0], key[1]), ()):
                    ax.text(top * 0.01, y, "n/a", ha="left", va="center", fontsize=7.5,
                            color="#777777")
                continue
            mid = statistics.median(vs)
            bar = ax.barh(y, mid, height * 0.9, color=color,
                          label="_nolegend_" if labelled else server)
            labelled = True
            bar.patches[0].set_gid(_gid("cpu", *[p for p in key if p], server))
            if len(vs) > 1:
                ax.errorbar(mid, y, xerr=[[mid - min(vs)], [max(vs) - mid]], fmt="none",
                            ecolor="#333333", capsize=2.5, linewidth=1)
            ax.text(max(vs) + top * 0.01, y, ("%.3g" if mid < 100 else "%.0f") % mid,
                    ha="left", va="center", fontsize=8)
    labels = []
    for key in keys:
        c = sorted(counts.get(key, ()))
        labels.append(_delivery_label(key) + (" (%s)" % "/".join(_count(n) for n in c)
                                              if c else ""))
    ax.set_yticks(range(len(keys)), labels)
    ax.set_ylim(len(keys) - 0.5, -0.5)             # first group on top
    ax.set_xlim(0, top * 1.12)
    ax.set_xlabel("server CPU per delivery (µs)")
    ax.grid(axis="y", visible=False)
    fig.legend(loc="outside lower center", ncol=len(present), frameon=False)
    fig.suptitle("CPU per delivered message (lower is better; subscribers in brackets)\n%s"
                 % _source(docs), fontsize=11)
    _save(fig, path)
    return True


def _nines(p):
    """Position of percentile p on a tail-stretching axis: 0 -> 0, 90 -> 1, 99 -> 2, 99.9 -> 3;
    100 (the maximum) is drawn at 3.5."""
    if p >= 100:
        return 3.5
    return min(3.0, -math.log10(1 - p / 100.0))


def plot_latency(docs, path):
    series = latency_series(docs)
    if not series:
        return False
    servers = _servers(docs)
    keys = sorted(series, key=_delivery_order)
    ncols = 1 if len(keys) == 1 else 2          # two panels across fit the README's width
    nrows = (len(keys) + ncols - 1) // ncols
    fig = _figure(4.1 * ncols + 0.6, 3.1 * nrows + 0.9)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    ticks = [(0, "p0"), (50, "p50"), (90, "p90"), (99, "p99"), (99.9, "p99.9"), (100, "max")]
    for ax, key in zip(axes, keys):
        allv = []
        for server in [s for s in servers if s in series[key]]:
            color = _color(server, servers)
            for r, (ps, vs, n) in enumerate(series[key][server]):
                label = server + (" (%s)" % _count(n) if n else "")
                line, = ax.plot([_nines(p) for p in ps], [max(v, 1e-3) for v in vs], "-o",
                                color=color, markersize=3, linewidth=1.8 if r == 0 else 1,
                                alpha=1 if r == 0 else 0.6,
                                label=label if r == 0 else "_nolegend_")
                line.set_gid(_gid("latency", *[p for p in key if p], server, r + 1 if r else ""))
                allv += [max(v, 1e-3) for v in vs]
        ax.set_yscale("log")
        _log_axis(ax.yaxis, _plain)
        ax.set_ylim(min(allv) / 1.6, max(allv) * 1.6)
        ax.set_xticks([_nines(p) for p, _ in ticks], [t for _, t in ticks])
        ax.set_xlim(-0.1, 3.65)
        ax.set_title(_delivery_label(key, sep=", "))
        ax.set_xlabel("percentile of messages (tail stretched)")
        ax.set_ylabel("publish to receive (ms)")
        ax.legend(loc="lower right", title="server (subscribers)", title_fontsize=8)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.suptitle("Publish-to-receive latency of every message (lower is better)\n%s"
                 % _source(docs), fontsize=11)
    _save(fig, path)
    return True


def write_charts(docs, outdir):
    """Write the charts the records have data for into ``outdir``.

    Returns (written paths, {chart: why it was not written})."""
    matplotlib = require_matplotlib()
    os.makedirs(outdir, exist_ok=True)
    written, skipped = [], {}
    why = {"memory": "no hold mode with PSS per connection in the records",
           "cpu": "no deliver, fanout or churn mode with CPU per delivery in the records",
           "latency": "no deliver, fanout or churn mode with latencies in the records"}
    with matplotlib.rc_context(RC):
        for name, draw in (("memory", plot_memory), ("cpu", plot_cpu),
                           ("latency", plot_latency)):
            path = os.path.join(outdir, FILES[name])
            if draw(docs, path):
                written.append(path)
            else:
                skipped[name] = why[name]
    return written, skipped


def gaps(docs):
    """Notes on figures a server's records lack where another server's have them, among
    the servers that ran that mode (for the log)."""
    notes = []
    servers = _servers(docs)
    ran = {}
    for _, server, mode, _rec in _records(docs):
        base, transport = _split(mode)
        ran.setdefault((transport, base), set()).add(server)
    for mode, by_server in sorted(memory_series(docs).items()):
        base, transport = _split(mode)
        missing = [s for s in servers if s in ran.get((transport, base), ()) and s not in by_server]
        if missing:
            notes.append("%s: no positive PSS per connection for %s" % (mode, ", ".join(missing)))
    cpu, _ = cpu_values(docs)
    for key, by_server in sorted(cpu.items(), key=lambda kv: _delivery_order(kv[0])):
        missing = [s for s in servers if s in ran.get(key[:2], ()) and s not in by_server]
        if missing:
            notes.append("%s: no CPU per delivery for %s" % (_delivery_label(key, sep=" "),
                                                          ", ".join(missing)))
    return notes

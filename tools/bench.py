#!/usr/bin/env python3
"""bench: MegaComet against its peers, side by side, in one command.

For every mode (hold, deliver, fanout, queue, churn) and every server it
starts a fresh server on free loopback ports, runs tools/megatest.py against
it, stops the server, and finally prints one table (metric, megacomet, peer,
ratio) and writes everything as JSON (--json).

Those modes long-poll. Streaming modes, chosen with --modes, run hold, deliver
and fanout with EventSource or WebSocket subscribers instead (megatest
--transport): hold-sse, hold-ws, deliver-sse, deliver-ws, fanout-sse,
fanout-ws; their rows are labelled with the mode (e.g. "deliver-ws/single:
CPU us/delivery"). --hold-n N holds N connections in every hold mode.

Servers:
  megacomet  python megacomet.py --workers 8 (this repository)
  aiohttp    tools/peers/aiohttp_server.py (needs aiohttp: tools/requirements-bench.txt)
  nchan      nginx + Nchan, only if installed (module file or `nginx -V`); configured
             in a temporary directory; skipped cleanly otherwise

    python tools/bench.py --quick          # about a minute
    python tools/bench.py                  # about ten minutes
    python tools/bench.py --servers megacomet,aiohttp --modes hold,deliver --json out.json
    python tools/bench.py --modes hold-sse,hold-ws,deliver-sse,deliver-ws,fanout-ws
    python tools/bench.py --servers megacomet --modes hold-sse,hold-ws --hold-n 100000
    python tools/bench.py --quick --json out.json --plot charts/     # records and charts
    python tools/bench.py --plot charts/ --from-json a.json b.json   # charts only, no run

--plot DIR writes SVG charts (tools/plots.py; needs matplotlib, the bench extra:
pip install 'megacomet[bench]'): memory per connection against the number held,
CPU per delivery, publish-to-receive latency. --from-json draws them from earlier
--json files without running anything; several files (e.g. hold runs at 10 000,
100 000 and 300 000 with --hold-n) make the memory chart's lines.

Ratios are megacomet / peer. For memory, CPU and latency lower is better;
for rates higher is better. A single-process peer cannot hold more than its
open-file limit (20 000 here), so its connection counts are capped; the table
shows the count each server ran with.
"""

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launch  # noqa: E402  (tools/launch.py)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MEGATEST = os.path.join(HERE, "megatest.py")
PEER = os.path.join(HERE, "peers", "aiohttp_server.py")
NCHAN_MODULES = ("/usr/lib/nginx/modules/ngx_nchan_module.so",
                 "/usr/share/nginx/modules/ngx_nchan_module.so")
MODES = ("hold", "deliver", "fanout", "queue", "churn")          # the default run: long-polls
STREAM_MODES = ("hold-sse", "hold-ws", "deliver-sse", "deliver-ws", "fanout-sse", "fanout-ws")

# Per-mode sizes. "n" connections, "m" queued messages; churn: rate msg/s, seconds.
SIZES = {
    "quick": {"hold": {"n": 5000, "hold": 1}, "deliver": {"n": 5000},
              "fanout": {"n": 5000}, "queue": {"m": 20000},
              "churn": {"n": 2000, "rate": 2000, "seconds": 4},
              "hold-sse": {"n": 5000, "hold": 1}, "hold-ws": {"n": 5000, "hold": 1},
              "deliver-sse": {"n": 5000}, "deliver-ws": {"n": 5000},
              "fanout-sse": {"n": 5000}, "fanout-ws": {"n": 5000}},
    "full": {"hold": {"n": 100000, "hold": 3}, "deliver": {"n": 18000},
             "fanout": {"n": 18000}, "queue": {"m": 200000},
             "churn": {"n": 10000, "rate": 5000, "seconds": 15},
             "hold-sse": {"n": 20000, "hold": 3}, "hold-ws": {"n": 20000, "hold": 3},
             "deliver-sse": {"n": 18000}, "deliver-ws": {"n": 18000},
             "fanout-sse": {"n": 10000}, "fanout-ws": {"n": 10000}},
}
# Most subscribers a server can hold here (per-process open-file limit 20 000).
CAPACITY = {"aiohttp": 18000}

QUEUED = 64         # messages kept per id, every server
TTL = 120           # seconds a message is kept, every server


def log(text):
    print("bench: " + text, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nchan_available():
    """(nginx binary, module path or None if built in) or None."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                      else None)
    if not nginx:
        return None
    for path in NCHAN_MODULES:
        if os.path.exists(path):
            return nginx, path
    try:
        out = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10)
        if "nchan" in (out.stdout + out.stderr):
            return nginx, None
    except (OSError, subprocess.TimeoutExpired):
        pass
    return None


class Server:
    """A server under test in its own process group, stopped with SIGTERM."""

    def __init__(self, name, workdir, workers):
        self.name = name
        self.workdir = workdir
        self.workers = workers
        self.port = free_port()
        self.app_port = free_port()
        self.proc = None
        self.log_path = os.path.join(workdir, "%s-%d.log" % (name, self.port))
        self.proto = "nchan" if name == "nchan" else "megacomet"
        self.stats_path = "/stats"
        self.notes = []

    def command(self):
        py = sys.executable
        common = ["--port", str(self.port), "--app-port", str(self.app_port),
                  "--max-queued", str(QUEUED), "--queue-ttl", str(TTL)]
        if self.name == "megacomet":
            return [py, os.path.join(ROOT, "megacomet.py"), "--workers", str(self.workers)] + common
        if self.name == "aiohttp":
            return [py, PEER] + common
        if self.name == "nchan":
            return [NCHAN[0], "-p", self.nginx_dir, "-c", self.nginx_conf()]
        raise ValueError(self.name)

    def nginx_conf(self):
        d = self.nginx_dir
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        load = "load_module %s;\n" % NCHAN[1] if NCHAN[1] else ""
        conf = f"""{load}daemon off;
master_process on;
worker_processes {self.workers};
worker_rlimit_nofile 20000;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 19000; multi_accept on; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  client_max_body_size 16m;
  nchan_max_reserved_memory 512M;
  server {{
    listen 127.0.0.1:{self.port} backlog=4096 reuseport;
    # One location for every transport: Nchan picks EventSource on "Accept:
    # text/event-stream", WebSocket on "Upgrade: websocket", else long-poll. Streams
    # are pinged every 15 s, as MegaComet's --heartbeat and the aiohttp peer do.
    location ~ ^/sub/([A-Za-z0-9_~:@-]+)$ {{
      nchan_subscriber longpoll eventsource websocket;
      nchan_channel_id $1;
      nchan_subscriber_timeout 120s;
      nchan_eventsource_ping_interval 15;
      nchan_websocket_ping_interval 15;
    }}
  }}
  server {{
    listen 127.0.0.1:{self.app_port} backlog=4096;
    location ~ ^/pub/([A-Za-z0-9_~:@-]+)$ {{
      nchan_publisher;
      nchan_channel_id $1;
      nchan_message_buffer_length {QUEUED};
      nchan_message_timeout {TTL}s;
    }}
    location = /stats {{ nchan_stub_status; }}
  }}
}}
"""
        path = os.path.join(d, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        return path

    def start(self, timeout=30.0):
        if self.name == "nchan":
            self.nginx_dir = tempfile.mkdtemp(prefix="nchan-", dir=self.workdir)
        cmd = self.command()
        self.logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self.logf,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %s at start; log %s:\n%s" % (
                    self.name, self.proc.returncode, self.log_path, self.tail()))
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("%s not ready within %.0fs; log %s:\n%s"
                           % (self.name, timeout, self.log_path, self.tail()))

    def ready(self):
        if self.name == "nchan":     # nginx prints nothing: wait for both ports
            return all(self.accepts(p) for p in (self.port, self.app_port))
        with open(self.log_path, "rb") as f:
            return b"ready" in f.read()

    accepts = staticmethod(launch.accepts)

    def tail(self, n=2000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self):
        """SIGTERM; SIGKILL the process group if it has not exited in 10 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            t0 = time.monotonic()
            # nginx: SIGTERM is its fast shutdown; SIGQUIT would wait for held polls.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
                took = time.monotonic() - t0
                if took > 5.0:
                    self.notes.append("took %.1fs to exit after SIGTERM" % took)
            except subprocess.TimeoutExpired:
                self.notes.append("did not exit within 10s of SIGTERM: killed")
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        if self.proc.returncode not in (0, -signal.SIGTERM, None):
            self.notes.append("exit status %s" % self.proc.returncode)
        # Leftover processes of the group (a worker that outlived its supervisor).
        try:
            os.killpg(self.proc.pid, 0)
            self.notes.append("processes left in its group after exit: killed")
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.logf.close()
        self.proc = None


NCHAN = None


def split_mode(mode):
    """A bench mode's megatest mode and transport: "deliver-ws" -> ("deliver", "ws")."""
    base, _, transport = mode.partition("-")
    return base, transport or "poll"


def megatest_args(server, mode, size, duration):
    mode, transport = split_mode(mode)
    a = ["--mode", mode, "--transport", transport, "--port", str(server.port),
         "--app-port", str(server.app_port),
         "--proto", server.proto, "--stats-path", server.stats_path,
         "--server-pid", str(server.proc.pid), "--duration", str(duration),
         "--id-prefix", mode[:2]]
    cap = CAPACITY.get(server.name)
    n = size.get("n")
    if n is not None:
        if cap:
            n = min(n, cap)
        a += ["--connections", str(n)]
    if mode == "hold":
        a += ["--hold", str(size["hold"])]
    if mode == "queue":
        a += ["--messages", str(size["m"]), "--batch-size", "1000"]
    if mode == "churn":
        a += ["--rate", str(size["rate"]), "--churn-time", str(size["seconds"])]
    if mode == "deliver":
        methods = {"megacomet": "batch,binary,single", "aiohttp": "batch,single",
                   "nchan": "single"}[server.name]
        a += ["--publish", methods]
    if mode in ("queue", "churn") and server.name == "nchan":
        a += ["--publish", "single"]
    return a


def run_megatest(server, mode, size, workdir, duration, verbose, extra=(), tag=None):
    """One megatest run; ``extra`` arguments come last (so they win), ``tag`` names its files."""
    tag = tag or "%s-%s" % (server.name, mode)
    out = os.path.join(workdir, tag + ".json")
    errlog = os.path.join(workdir, tag + ".log")
    cmd = ([sys.executable, MEGATEST, "--json", out] + megatest_args(server, mode, size, duration)
           + list(extra))
    log("%s %s: %s" % (server.name, mode, " ".join(cmd[2:])))
    with open(errlog, "wb") as ef:
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if verbose else ef,
                               timeout=duration + 60)
            code = p.returncode
            sys.stderr.write(p.stdout.decode("utf-8", "replace"))
        except subprocess.TimeoutExpired:
            code = "timeout"
    try:
        with open(out) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        rec = {"ok": False, "problems": ["megatest wrote no record (exit %s); see %s"
                                         % (code, errlog)], "phases": {}}
    rec["exit"] = code
    rec["log"] = errlog
    return rec


# ---------------------------------------------------------------------------
# The table.

def g(rec, *path):
    for k in path:
        if not isinstance(rec, dict) or k not in rec:
            return None
        rec = rec[k]
    return rec


# (label, mode, path into the record, better: "low"/"high"/None)
def hold_rows(mode):
    p = ("phases", "hold")
    return [
        ("%s: connections" % mode, mode, p + ("opened",), None),
        ("%s: opens/s (client side)" % mode, mode, p + ("open_per_s",), "high"),
        ("%s: opens/s (server counted)" % mode, mode, p + ("confirmed_per_s",), "high"),
        ("%s: RSS B/conn" % mode, mode, p + ("rss_bytes_per_connection",), "low"),
        ("%s: PSS B/conn" % mode, mode, p + ("pss_bytes_per_connection",), "low"),
        ("%s: CPU us/conn" % mode, mode, p + ("cpu_us_per_connection",), "low"),
    ]


def deliver_rows(mode):
    rows = []
    for m in ("batch", "binary", "single"):
        p = ("phases", "deliver_" + m)
        rows += [
            ("%s/%s: subscribers" % (mode, m), mode, p + ("expected",), None),
            ("%s/%s: deliveries/s" % (mode, m), mode, p + ("deliveries_per_s",), "high"),
            ("%s/%s: latency p50 ms" % (mode, m), mode, p + ("latency_ms", "p50"), "low"),
            ("%s/%s: latency p99 ms" % (mode, m), mode, p + ("latency_ms", "p99"), "low"),
            ("%s/%s: latency max ms" % (mode, m), mode, p + ("latency_ms", "max"), "low"),
            ("%s/%s: CPU us/delivery" % (mode, m), mode, p + ("cpu_us_per_delivery",), "low"),
            ("%s/%s: not exactly once" % (mode, m), mode, p + ("not_exactly_once",), "low"),
        ]
    return rows


def fanout_rows(mode):
    p = ("phases", "fanout")
    return [
        ("%s: subscribers" % mode, mode, p + ("expected",), None),
        ("%s: time to all ms" % mode, mode, p + ("time_to_all_ms",), "low"),
        ("%s: latency p50 ms" % mode, mode, p + ("latency_ms", "p50"), "low"),
        ("%s: deliveries/s" % mode, mode, p + ("deliveries_per_s",), "high"),
        ("%s: CPU us/delivery" % mode, mode, p + ("cpu_us_per_delivery",), "low"),
        ("%s: not exactly once" % mode, mode, p + ("not_exactly_once",), "low"),
    ]


ROWS = hold_rows("hold") + deliver_rows("deliver") + fanout_rows("fanout") + [
    ("queue: messages", "queue", ("phases", "queue", "published"), None),
    ("queue: publish msg/s", "queue", ("phases", "queue", "publish_per_s"), "high"),
    ("queue: RSS B/msg", "queue", ("phases", "queue", "rss_bytes_per_message"), "low"),
    ("queue: PSS B/msg", "queue", ("phases", "queue", "pss_bytes_per_message"), "low"),
    ("queue: CPU us/msg", "queue", ("phases", "queue", "cpu_us_per_message"), "low"),
    ("queue: drained ok (sample)", "queue", ("phases", "queue", "drain", "ok"), "high"),
    ("churn: subscribers", "churn", ("phases", "churn", "subscribers"), None),
    ("churn: publish msg/s", "churn", ("phases", "churn", "publish_per_s"), "high"),
    ("churn: sustained deliveries/s", "churn",
     ("phases", "churn", "sustained_deliveries_per_s"), "high"),
    ("churn: latency p50 ms", "churn", ("phases", "churn", "latency_ms", "p50"), "low"),
    ("churn: latency p99 ms", "churn", ("phases", "churn", "latency_ms", "p99"), "low"),
    ("churn: CPU us/delivery", "churn", ("phases", "churn", "cpu_us_per_delivery"), "low"),
    ("churn: lost", "churn", ("phases", "churn", "lost"), "low"),
]
for _t in ("sse", "ws"):
    ROWS += hold_rows("hold-" + _t) + deliver_rows("deliver-" + _t) + fanout_rows("fanout-" + _t)


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return "%.0f" % v
        if abs(v) >= 10:
            return "%.1f" % v
        return "%.3g" % v
    return str(v)


def table(results, servers):
    """results[server][mode] -> record. Rows with no value anywhere are left out."""
    base = "megacomet" if "megacomet" in servers else servers[0]
    peers = [s for s in servers if s != base]
    head = ["metric", base]
    for p in peers:
        head += [p, "%s/%s" % (base, p)]
    rows = []
    for label, mode, path, _ in ROWS:
        vals = {s: g(results.get(s, {}).get(mode), *path) for s in servers}
        if all(v is None for v in vals.values()):
            continue
        row = [label, fmt(vals[base])]
        for p in peers:
            row.append(fmt(vals[p]))
            a, b = vals[base], vals[p]
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
                row.append("%.3gx" % (a / b))
            else:
                row.append("-")
        rows.append(row)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i])
                     for i, h in enumerate(head))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                             for i, c in enumerate(r)))
    return "\n".join(out), [dict(zip(head, r)) for r in rows]


def annotate(rec):
    """Derived fields used by the table."""
    for name, p in (rec.get("phases") or {}).items():
        if name.startswith(("deliver_", "fanout")) and "expected" in p:
            p["not_exactly_once"] = p["expected"] - p.get("exactly_one", 0) + p.get("wrong_id", 0)


def write_plots(plots, docs, outdir):
    """The charts of ``docs`` into ``outdir``; False if there was nothing to draw."""
    written, skipped = plots.write_charts(docs, outdir)
    for path in written:
        log("wrote " + path)
    for name, why in skipped.items():
        log("no %s chart: %s" % (name, why))
    for note in plots.gaps(docs):
        log("charts: " + note)
    return bool(written)


def main(argv=None):
    global NCHAN
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="small sizes: about a minute")
    ap.add_argument("--servers", default="megacomet,aiohttp,nchan",
                    help="comma list; unavailable ones are skipped")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="comma list of %s (default), or of the streaming modes %s"
                         % (", ".join(MODES), ", ".join(STREAM_MODES)))
    ap.add_argument("--hold-n", type=int, default=0, metavar="N",
                    help="connections of every hold mode instead of the size's (e.g. 100000 "
                         "for hold-sse,hold-ws); peers stay capped at what they can hold")
    ap.add_argument("--workers", type=int, default=8, help="megacomet and nginx workers")
    ap.add_argument("--json", metavar="FILE", help="write all records and the table")
    ap.add_argument("--plot", metavar="DIR",
                    help="write SVG charts of the records into DIR (needs matplotlib: "
                         "pip install 'megacomet[bench]')")
    ap.add_argument("--from-json", metavar="FILE", nargs="+",
                    help="with --plot: no run, chart these earlier --json files")
    ap.add_argument("--workdir", help="keep logs and records here (default: a temp dir)")
    ap.add_argument("--duration", type=float, default=0,
                    help="cap per megatest run in seconds (default 60 quick, 240 full)")
    ap.add_argument("--verbose", "-v", action="store_true", help="show megatest progress")
    args = ap.parse_args(argv)
    if args.from_json and not args.plot:
        ap.error("--from-json needs --plot DIR")
    if args.plot:
        # Before a run of minutes, not after it.
        try:
            import plots
            plots.require_matplotlib()
        except ImportError as e:
            print("bench: %s" % e, file=sys.stderr)
            return 2
    if args.from_json:
        try:
            docs = plots.load(args.from_json)
        except (OSError, ValueError) as e:
            print("bench: %s" % e, file=sys.stderr)
            return 2
        return 0 if write_plots(plots, docs, args.plot) else 1

    sizes = SIZES["quick" if args.quick else "full"]
    if args.hold_n:
        sizes = {m: dict(v, n=args.hold_n) if split_mode(m)[0] == "hold" else v
                 for m, v in sizes.items()}
    duration = args.duration or (60 if args.quick else 240)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES + STREAM_MODES:
            ap.error("unknown mode %r" % m)
    servers = []
    skipped = {}
    for s in [x for x in args.servers.split(",") if x]:
        if s == "nchan":
            NCHAN = nchan_available()
            if NCHAN is None:
                skipped[s] = "nginx with the nchan module is not installed"
                log("skipping nchan: " + skipped[s])
                continue
        elif s == "aiohttp":
            if importlib.util.find_spec("aiohttp") is None:
                skipped[s] = "aiohttp is not installed (pip install -r tools/requirements-bench.txt)"
                log("skipping aiohttp: " + skipped[s])
                continue
        elif s != "megacomet":
            ap.error("unknown server %r" % s)
        servers.append(s)
    if not servers:
        ap.error("no server to run")

    workdir = args.workdir or tempfile.mkdtemp(prefix="megabench-")
    os.makedirs(workdir, exist_ok=True)
    keep = bool(args.workdir)
    t0 = time.monotonic()
    results = {s: {} for s in servers}
    notes = []
    stopping = []

    def on_term(signum, frame):
        stopping.append(signum)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    log("sizes %s; servers %s; logs in %s" % ("quick" if args.quick else "full",
                                             ",".join(servers), workdir))
    try:
        for mode in modes:
            for s in servers:
                srv = Server(s, workdir, args.workers)
                try:
                    srv.start()
                except RuntimeError as e:
                    notes.append("%s %s: %s" % (s, mode, e))
                    log(str(e))
                    results[s][mode] = {"ok": False, "problems": [str(e)], "phases": {}}
                    continue
                try:
                    rec = run_megatest(srv, mode, sizes[mode], workdir, duration, args.verbose)
                    if srv.proc.poll() is not None:
                        srv.notes.append("exited during the run with status %s; log %s"
                                         % (srv.proc.returncode, srv.log_path))
                finally:
                    srv.stop()
                other = max([p.get("other_cores_busy", 0) for p in rec.get("phases", {}).values()]
                            or [0])
                if other >= 0.3:
                    notes.append("%s %s: other processes kept %.1f of %d cores busy: wall-clock "
                                 "figures (rates, latency) unreliable; CPU and memory per "
                                 "operation still hold" % (s, mode, other, os.cpu_count()))
                annotate(rec)
                rec["server_notes"] = srv.notes
                results[s][mode] = rec
                for n in srv.notes:
                    notes.append("%s (%s run): %s" % (s, mode, n))
                for pr in rec.get("problems") or ():
                    notes.append("%s %s: %s" % (s, mode, pr))
    except KeyboardInterrupt:
        notes.append("interrupted")
        log("interrupted: servers stopped, partial results below")

    text, rows = table(results, servers)
    elapsed = time.monotonic() - t0
    print()
    print("MegaComet benchmark (%s sizes, %.0fs, %d cores): ratio = %s / peer"
          % ("quick" if args.quick else "full", elapsed, os.cpu_count(),
             "megacomet" if "megacomet" in servers else servers[0]))
    print(text)
    if skipped:
        print("skipped: " + "; ".join("%s (%s)" % kv for kv in skipped.items()))
    if notes:
        print("notes:")
        for n in notes:
            print("  - " + n)
    doc = {"tool": "bench", "quick": args.quick, "elapsed_s": round(elapsed, 1),
           "servers": servers, "skipped": skipped, "modes": modes,
           "sizes": sizes, "workers": args.workers, "table": rows,
           "notes": notes, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        log("wrote " + args.json)
    if args.plot:
        try:
            drawn = write_plots(plots, [doc], args.plot)
        except Exception as e:      # the run's records stay: --json, or the logs kept below
            log("--plot failed: %r" % (e,))
            drawn = False
        if not drawn:
            notes.append("--plot: no chart written")
    if not keep:
        if notes:
            log("logs kept in %s (there were notes)" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if (notes or stopping) else 0


if __name__ == "__main__":
    sys.exit(main())

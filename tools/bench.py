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

Cluster modes, chosen with --modes, run each server as two nodes sharing one fresh
Redis (tools/redislab.py; --redis-cluster: a Redis Cluster of 3 masters + 3
replicas): MegaComet as two `megacomet.py --redis URL` nodes, Nchan as two nginx
instances with the same `upstream { nchan_redis_server URL; }` and
`nchan_redis_pass`. Subscribers are on node B; each round publishes once on A
(cross node) and once on B (same node), single POSTs pipelined over keep-alive
connections for both servers. CPU counts both nodes' processes ("nodes") and,
apart, redis-server's; Redis commands are INFO commandstats' calls (those a
script runs included) per publish; Redis memory is the masters' used_memory.
  cluster-queue        publishes on A to ids nobody holds, 4 to each: publishes/s,
                       Redis commands and memory per buffered message (an id's
                       first message and the later ones apart); a sample read on B
  cluster-deliver      one message to each of N subscribers, each on its own id:
                       publishes/s, latency, CPU per delivery (nodes, Redis); then
                       again paced at 1 000/s, one request deep (latency without
                       the publisher's own queues)
  cluster-fanout       one publish to N subscribers of one id
  cluster-resubscribe  MegaComet only (Nchan has no such hook): B holds 100 000 ids
                       (16 per WebSocket; the nodes' CPU while they sit idle), Redis
                       restarts; the time until a message to each of a sample of
                       ids (one per connection) reaches its subscriber, and until
                       Redis counts every channel again

    python tools/bench.py --quick --servers megacomet,nchan --workers 2 \
        --modes cluster-queue,cluster-deliver,cluster-fanout,cluster-resubscribe

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

Single publishes (deliver modes) are sent the same way to every server, in a round per
publish shape (--publish-shape, rows "deliver/single one-deep: ..."): one-deep, 1 keep-alive
connection 128 requests deep, and spread, 8 connections 16 deep each; both as fast as the
server answers. Nchan gets a location per transport with one subscriber type each
(/sub/ longpoll, /sse/ eventsource, /ws/ websocket: MegaComet's paths) and, as MegaComet's
workers, a reuseport listener on its publishing port.

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
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launch  # noqa: E402  (tools/launch.py)
import redislab  # noqa: E402  (real redis-server processes, for the cluster modes)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MEGATEST = os.path.join(HERE, "megatest.py")
PEER = os.path.join(HERE, "peers", "aiohttp_server.py")
NCHAN_MODULES = ("/usr/lib/nginx/modules/ngx_nchan_module.so",
                 "/usr/share/nginx/modules/ngx_nchan_module.so")
MODES = ("hold", "deliver", "fanout", "queue", "churn")          # the default run: long-polls
STREAM_MODES = ("hold-sse", "hold-ws", "deliver-sse", "deliver-ws", "fanout-sse", "fanout-ws")
# Cluster modes: bench mode -> (megatest mode, transport).
CLUSTER_MODES = {"cluster-queue": ("queue", "poll"), "cluster-deliver": ("deliver", "poll"),
                 "cluster-fanout": ("fanout", "poll"), "cluster-resubscribe": ("resubscribe", "ws")}
# How the cluster modes publish, the same for every server: single POSTs, 4 keep-alive
# connections of 64 in flight each.
CLUSTER_PUBLISH = ["--publish", "single", "--pub-conns", "4", "--pipeline", "64"]
# cluster-deliver also publishes at this rate (messages/s, one request deep on the same 4
# connections), below what any server here accepts: latency without the publisher's queues.
CLUSTER_PACED = 1000
NOT_RUN = {("nchan", "cluster-resubscribe"): "Nchan has no equivalent hook to time"}
# How the deliver modes' single publishes are sent, the same for every server; a round per
# shape (--publish-shape): name -> (keep-alive connections, requests in flight on each).
# one-deep is how bench always published (as fast as one connection goes, which puts every
# publish on one worker of the server); spread is 8 connections at full rate, which the
# server's workers share as its listening socket spreads them.
PUBLISH_SHAPES = {"one-deep": (1, 128), "spread": (8, 16)}

# Per-mode sizes. "n" connections, "m" queued messages; churn: rate msg/s, seconds.
SIZES = {
    "quick": {"hold": {"n": 5000, "hold": 1}, "deliver": {"n": 5000},
              "fanout": {"n": 5000}, "queue": {"m": 20000},
              "churn": {"n": 2000, "rate": 2000, "seconds": 4},
              "hold-sse": {"n": 5000, "hold": 1}, "hold-ws": {"n": 5000, "hold": 1},
              "deliver-sse": {"n": 5000}, "deliver-ws": {"n": 5000},
              "fanout-sse": {"n": 5000}, "fanout-ws": {"n": 5000},
              "cluster-queue": {"m": 4000, "k": 4}, "cluster-deliver": {"n": 2000},
              "cluster-fanout": {"n": 2000},
              "cluster-resubscribe": {"n": 625, "k": 16, "hold": 1}},
    "full": {"hold": {"n": 100000, "hold": 3}, "deliver": {"n": 18000},
             "fanout": {"n": 18000}, "queue": {"m": 200000},
             "churn": {"n": 10000, "rate": 5000, "seconds": 15},
             "hold-sse": {"n": 20000, "hold": 3}, "hold-ws": {"n": 20000, "hold": 3},
             "deliver-sse": {"n": 18000}, "deliver-ws": {"n": 18000},
             "fanout-sse": {"n": 10000}, "fanout-ws": {"n": 10000},
             # queue: m messages, k to each id; resubscribe: n WebSockets of k ids each
             "cluster-queue": {"m": 60000, "k": 4}, "cluster-deliver": {"n": 10000},
             "cluster-fanout": {"n": 10000},
             "cluster-resubscribe": {"n": 6250, "k": 16, "hold": 3}},
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
    """A server under test in its own process group, stopped with SIGTERM.

    With ``redis`` (a list of URLs) it is a node of a cluster (Deployment): MegaComet gets
    --redis for each URL, Nchan an upstream of them that its locations pass to."""

    def __init__(self, name, workdir, workers, redis=(), flags=()):
        self.name = name
        self.flags = list(flags)          # more megacomet.py flags (scale: --max-ids)
        self.workdir = workdir
        self.workers = workers
        self.redis = list(redis)
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
            return ([py, os.path.join(ROOT, "megacomet.py"), "--workers", str(self.workers)]
                    + common + [a for url in self.redis for a in ("--redis", url)]
                    + self.flags)
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
        # Cluster node: messages, and who holds what, live in Redis (Nchan's default
        # "distributed" storage mode). An upstream is what Nchan 1.3 recommends (it warns
        # that nchan_redis_url and nchan_use_redis are discouraged); several servers in it
        # mean a Redis Cluster, which Nchan discovers.
        upstream = redis_pass = ""
        if self.redis:
            upstream = "upstream redis_bench {\n%s  }\n  " % "".join(
                "    nchan_redis_server %s;\n" % url for url in self.redis)
            redis_pass = "nchan_redis_pass redis_bench;"
        # A location per transport with one subscriber type each, at MegaComet's paths, as
        # a user would configure them (a location that allows every type does more work
        # per request). Streams are pinged every 15 s, as MegaComet's --heartbeat and the
        # aiohttp peer do.
        subscribers = "\n    ".join(f"""location ~ ^/{path}/([A-Za-z0-9_~:@-]+)$ {{
      nchan_subscriber {kind};
      nchan_channel_id $1;
      nchan_subscriber_timeout 120s;
      {ping}
      {redis_pass}
    }}""" for path, kind, ping in (
            ("sub", "longpoll", ""),
            ("sse", "eventsource", "nchan_eventsource_ping_interval 15;"),
            ("ws", "websocket", "nchan_websocket_ping_interval 15;")))
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
  {upstream}server {{
    listen 127.0.0.1:{self.port} backlog=4096 reuseport;
    {subscribers}
  }}
  server {{
    # reuseport, as MegaComet's workers each listen on its app port: publisher
    # connections are spread over the workers.
    listen 127.0.0.1:{self.app_port} backlog=4096 reuseport;
    location ~ ^/pub/([A-Za-z0-9_~:@-]+)$ {{
      nchan_publisher;
      nchan_channel_id $1;
      nchan_message_buffer_length {QUEUED};
      nchan_message_timeout {TTL}s;
      {redis_pass}
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

    def pids(self):
        """The supervisors megatest counts, with their descendants, as the server."""
        return [self.proc.pid]

    def check_alive(self):
        """After a run: a note if it exited meanwhile."""
        if self.proc.poll() is not None:
            self.notes.append("exited during the run with status %s; log %s"
                              % (self.proc.returncode, self.log_path))

    def megatest_args(self):
        return []

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


class Deployment:
    """A cluster mode's server: a fresh Redis (one server, or a Redis Cluster of 3 masters
    and 3 replicas) and two nodes of one server sharing it, A and B.  Megatest holds its
    subscribers on B and publishes on A (cross node) and on B (same node); CPU counts
    both nodes.  It stands where a Server does in the run loop."""

    def __init__(self, name, workdir, workers, redis_cluster=False):
        self.name = name
        self.workdir = workdir
        self.workers = workers
        self.proto = "nchan" if name == "nchan" else "megacomet"
        self.stats_path = "/stats"
        self.redis = redislab.Cluster() if redis_cluster else redislab.Standalone()
        self.nodes = []
        self.notes = []

    def start(self):
        try:
            self.redis.start()
            urls = (self.redis.urls if isinstance(self.redis, redislab.Cluster)
                    else [self.redis.url])
            for _ in ("A", "B"):
                self.nodes.append(Server(self.name, self.workdir, self.workers, redis=urls))
                self.nodes[-1].start()
        except (RuntimeError, redislab.RedisLabError) as e:
            self.stop()
            raise RuntimeError("cluster of %s did not start: %s" % (self.name, e))

    @property
    def port(self):                 # subscribers, /stats: node B
        return self.nodes[1].port

    @property
    def app_port(self):
        return self.nodes[1].app_port

    def redis_servers(self):
        return self.redis.nodes if isinstance(self.redis, redislab.Cluster) else [self.redis]

    def pids(self):
        return [n.proc.pid for n in self.nodes]

    def megatest_args(self):
        a, b = self.nodes
        args = ["--publish-to", "cross=%d" % a.app_port, "--publish-to", "same=%d" % b.app_port]
        for r in self.redis_servers():
            args += ["--redis-port", str(r.port)]
        return args

    def restart_redis(self):
        """Stop Redis and start it again on the same port(s), empty (nothing is saved); for a
        Redis Cluster, its masters.  The moments it went down and answered again."""
        servers = (self.redis.masters() if isinstance(self.redis, redislab.Cluster)
                   else [self.redis])
        down = time.monotonic_ns()
        for r in servers:
            r.restart()
        up = time.monotonic_ns()
        if isinstance(self.redis, redislab.Cluster):
            self.redis.wait_ok()
        log("Redis restarted in %.3fs" % ((up - down) / 1e9))
        return {"down_ns": down, "up_ns": up}

    def check_alive(self):
        for node, label in zip(self.nodes, "AB"):
            node.check_alive()
            self.notes += ["node %s %s" % (label, n) for n in node.notes]
            node.notes = []
        for r in self.redis_servers():
            if not r.alive():
                self.notes.append("redis-server on port %s exited during the run" % r.port)

    def stop(self):
        for node, label in zip(self.nodes, "AB"):
            node.stop()
            self.notes += ["node %s %s" % (label, n) for n in node.notes]
        self.redis.stop()


def split_mode(mode):
    """A bench mode's megatest mode and transport: "deliver-ws" -> ("deliver", "ws"),
    "cluster-deliver" -> ("deliver", "poll")."""
    if mode in CLUSTER_MODES:
        return CLUSTER_MODES[mode]
    base, _, transport = mode.partition("-")
    return base, transport or "poll"


def megatest_args(server, mode, size, duration, shapes=tuple(PUBLISH_SHAPES)):
    cluster = mode in CLUSTER_MODES
    mode, transport = split_mode(mode)
    a = ["--mode", mode, "--transport", transport, "--port", str(server.port),
         "--app-port", str(server.app_port),
         "--proto", server.proto, "--stats-path", server.stats_path,
         "--duration", str(duration), "--id-prefix", mode[:2]]
    for pid in server.pids():
        a += ["--server-pid", str(pid)]
    a += server.megatest_args()
    cap = CAPACITY.get(server.name)
    n = size.get("n")
    if n is not None:
        if cap:
            n = min(n, cap)
        a += ["--connections", str(n)]
    if mode == "hold":
        a += ["--hold", str(size["hold"])]
    if mode == "queue":
        a += ["--messages", str(size["m"]), "--per-id", str(size.get("k", 1)),
              "--batch-size", "1000"]
    if mode == "churn":
        a += ["--rate", str(size["rate"]), "--churn-time", str(size["seconds"])]
    if mode == "resubscribe":
        # A rejoin slower than the 10 s default is still measured.
        a += ["--ids-per-conn", str(size["k"]), "--hold", str(size["hold"]), "--stall", "30"]
    if cluster:
        a += CLUSTER_PUBLISH
        if mode == "deliver":
            a += ["--paced", str(CLUSTER_PACED)]
    elif mode == "deliver":
        methods = {"megacomet": "batch,binary,single", "aiohttp": "batch,single",
                   "nchan": "single"}[server.name]
        a += ["--publish", methods]
        for shape in shapes:
            a += ["--publish-shape", "%s=%dx%d" % ((shape,) + PUBLISH_SHAPES[shape])]
    elif mode in ("queue", "churn") and server.name == "nchan":
        a += ["--publish", "single"]
    return a


def run_megatest(server, mode, size, workdir, duration, verbose, extra=(), tag=None,
                 shapes=tuple(PUBLISH_SHAPES)):
    """One megatest run; ``extra`` arguments come last (so they win), ``tag`` names its files.

    Megatest's standard output is passed on, but for its "megatest: restart redis now"
    (resubscribe), which is answered on its standard input once server.restart_redis()
    did it."""
    tag = tag or "%s-%s" % (server.name, mode)
    out = os.path.join(workdir, tag + ".json")
    errlog = os.path.join(workdir, tag + ".log")
    cmd = ([sys.executable, MEGATEST, "--json", out]
           + megatest_args(server, mode, size, duration, shapes) + list(extra))
    log("%s %s: %s" % (server.name, mode, " ".join(cmd[2:])))
    with open(errlog, "wb") as ef:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=None if verbose else ef)
        killed = []
        timer = threading.Timer(duration + 60, lambda: (killed.append(True), proc.kill()))
        timer.start()
        try:
            for line in proc.stdout:
                if line.startswith(b"megatest: restart redis now"):
                    try:
                        answer = json.dumps(server.restart_redis()).encode() + b"\n"
                    except (AttributeError, RuntimeError, redislab.RedisLabError) as e:
                        log("could not restart Redis: %r" % (e,))
                        answer = b""           # megatest sees stdin closed: its problem says so
                    try:
                        proc.stdin.write(answer)
                        proc.stdin.close()
                    except OSError:
                        pass
                else:
                    sys.stderr.write(line.decode("utf-8", "replace"))
            code = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:            # interrupted: as subprocess.run would
                proc.kill()
                proc.wait()
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
        if killed:
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


def redis_rows(label, mode, p, per, unit, cluster):
    """Cluster modes: Redis's share of the work (none for the other modes)."""
    return [] if not cluster else [
        ("%s: Redis CPU us/%s" % (label, unit), mode, p + ("redis_cpu_us_per_" + per,), "low"),
        ("%s: nodes+Redis CPU us/%s" % (label, unit), mode, p + ("all_cpu_us_per_" + per,),
         "low"),
        ("%s: Redis cmds/publish" % (label,), mode, p + ("redis_commands_per_publish",), "low"),
    ] + ([("%s: Redis B/msg" % label, mode, p + ("redis_bytes_per_message",), "low"),
          ("%s: Redis B/msg (an id's first)" % label, mode,
           p + ("redis_bytes_per_first_message",), "low"),
          ("%s: Redis B/msg (later ones)" % label, mode,
           p + ("redis_bytes_per_later_message",), "low")]
         if per == "message" else [])


def deliver_rows(mode, rounds=None):
    """The rows of each round: ``rounds`` is (label, phase) pairs, by default one round per
    way of publishing (single: one per publish shape); cluster modes add the publish rate and
    Redis's share."""
    cluster = mode in CLUSTER_MODES
    rows = []
    for r, phase in rounds or ([(m, "deliver_" + m) for m in ("batch", "binary", "single")]
                               + [("single " + s, "deliver_single_" + s) for s in PUBLISH_SHAPES]):
        p = ("phases", phase)
        label = "%s/%s" % (mode, r)
        rows.append((label + ": subscribers", mode, p + ("expected",), None))
        if cluster:
            rows.append((label + ": publish msg/s", mode, p + ("publish_per_s",), "high"))
        rows += [
            (label + ": deliveries/s", mode, p + ("deliveries_per_s",), "high"),
            (label + ": latency p50 ms", mode, p + ("latency_ms", "p50"), "low"),
            (label + ": latency p99 ms", mode, p + ("latency_ms", "p99"), "low"),
            (label + ": latency max ms", mode, p + ("latency_ms", "max"), "low"),
            (label + (": nodes CPU us/delivery" if cluster else ": CPU us/delivery"), mode,
             p + ("cpu_us_per_delivery",), "low"),
        ] + redis_rows(label, mode, p, "delivery", "delivery", cluster) + [
            (label + ": not exactly once", mode, p + ("not_exactly_once",), "low"),
        ]
    return rows


def fanout_rows(mode, rounds=None):
    """As deliver_rows, for one publish to every subscriber: one round named "fanout" by
    default, else (label, phase) pairs."""
    cluster = mode in CLUSTER_MODES
    rows = []
    for r, phase in rounds or [(None, "fanout")]:
        p = ("phases", phase)
        label = mode if r is None else "%s/%s" % (mode, r)
        rows += [
            (label + ": subscribers", mode, p + ("expected",), None),
            (label + ": time to all ms", mode, p + ("time_to_all_ms",), "low"),
            (label + ": latency p50 ms", mode, p + ("latency_ms", "p50"), "low"),
            (label + ": deliveries/s", mode, p + ("deliveries_per_s",), "high"),
            (label + (": nodes CPU us/delivery" if cluster else ": CPU us/delivery"), mode,
             p + ("cpu_us_per_delivery",), "low"),
        ] + redis_rows(label, mode, p, "delivery", "delivery", cluster) + [
            (label + ": not exactly once", mode, p + ("not_exactly_once",), "low"),
        ]
    return rows


def queue_rows(mode):
    p = ("phases", "queue")
    cpu = "nodes CPU" if mode in CLUSTER_MODES else "CPU"
    return [
        ("%s: messages" % mode, mode, p + ("published",), None),
        ("%s: publish msg/s" % mode, mode, p + ("publish_per_s",), "high"),
        ("%s: RSS B/msg" % mode, mode, p + ("rss_bytes_per_message",), "low"),
        ("%s: PSS B/msg" % mode, mode, p + ("pss_bytes_per_message",), "low"),
        ("%s: %s us/msg" % (mode, cpu), mode, p + ("cpu_us_per_message",), "low"),
    ] + redis_rows(mode, mode, p, "message", "msg", mode in CLUSTER_MODES) + [
        ("%s: drained ok (sample)" % mode, mode, p + ("drain", "ok"), "high"),
    ]


def resubscribe_rows(mode):
    o, b, r = ("phases", "open"), ("phases", "before"), ("phases", "rejoin")
    return [
        ("%s: ids held" % mode, mode, o + ("ids",), None),
        ("%s: connections" % mode, mode, o + ("opened",), None),
        ("%s: channels joined at start s" % mode, mode, o + ("channels_joined_s",), "low"),
        ("%s: nodes cores busy, held idle" % mode, mode, ("phases", "hold", "nodes_cores_busy"),
         "low"),
        ("%s: sample ids" % mode, mode, r + ("expected",), None),
        ("%s: restart to sample p50 ms" % mode, mode, r + ("latency_ms", "p50"), "low"),
        ("%s: restart to sample p99 ms" % mode, mode, r + ("latency_ms", "p99"), "low"),
        ("%s: restart to all sample ms" % mode, mode, r + ("time_to_all_ms",), "low"),
        ("%s: restart to all channels s" % mode, mode, r + ("channels_rejoined_s",), "low"),
        ("%s: first publish accepted s" % mode, mode, r + ("first_accepted_s",), "low"),
        ("%s: nodes CPU s (rejoin)" % mode, mode, r + ("cpu_s",), "low"),
        ("%s: Redis CPU s (rejoin)" % mode, mode, r + ("redis_cpu_s",), "low"),
        ("%s: not exactly once (before)" % mode, mode, b + ("not_exactly_once",), "low"),
        ("%s: not exactly once (after)" % mode, mode, r + ("not_exactly_once",), "low"),
    ]


ROWS = hold_rows("hold") + deliver_rows("deliver") + fanout_rows("fanout") + queue_rows("queue") + [
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
_WHERE = ("same", "cross")
ROWS += (queue_rows("cluster-queue")
         + deliver_rows("cluster-deliver", [(w, "deliver_single_" + w) for w in _WHERE]
                        + [("%s paced" % w, "deliver_single_%s_paced" % w) for w in _WHERE])
         + fanout_rows("cluster-fanout", [(w, "fanout_" + w) for w in _WHERE])
         + resubscribe_rows("cluster-resubscribe"))


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
        if "expected" in p and "exactly_one" in p:
            p["not_exactly_once"] = p["expected"] - p.get("exactly_one", 0) + p.get("wrong_id", 0)


def run_one(name, mode, size, workdir, duration, args):
    """Start a fresh server (for a cluster mode a Deployment: Redis and two nodes), run
    megatest against it, stop it: (record, notes)."""
    if mode in CLUSTER_MODES:
        srv = Deployment(name, workdir, args.workers, args.redis_cluster)
    else:
        srv = Server(name, workdir, args.workers)
    try:
        srv.start()
    except RuntimeError as e:
        log(str(e))
        return ({"ok": False, "problems": [str(e)], "phases": {}},
                ["%s %s: %s" % (name, mode, e)])
    try:
        rec = run_megatest(srv, mode, size, workdir, duration, args.verbose,
                           shapes=args.publish_shape)
        srv.check_alive()
    finally:
        srv.stop()
    notes = []
    other = max([p.get("other_cores_busy", 0) for p in rec.get("phases", {}).values()] or [0])
    if other >= 0.3:
        notes.append("%s %s: other processes kept %.1f of %d cores busy: wall-clock "
                     "figures (rates, latency) unreliable; CPU and memory per "
                     "operation still hold" % (name, mode, other, os.cpu_count()))
    annotate(rec)
    rec["server_notes"] = srv.notes
    notes += ["%s (%s run): %s" % (name, mode, n) for n in srv.notes]
    notes += ["%s %s: %s" % (name, mode, pr) for pr in rec.get("problems") or ()]
    return rec, notes


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
                    help="comma list of %s (default), of the streaming modes %s, or of the "
                         "cluster modes %s" % (", ".join(MODES), ", ".join(STREAM_MODES),
                                               ", ".join(CLUSTER_MODES)))
    ap.add_argument("--redis-cluster", action="store_true",
                    help="cluster modes: a Redis Cluster of 3 masters + 3 replicas instead of "
                         "one Redis")
    ap.add_argument("--hold-n", type=int, default=0, metavar="N",
                    help="connections of every hold mode instead of the size's (e.g. 100000 "
                         "for hold-sse,hold-ws); peers stay capped at what they can hold")
    ap.add_argument("--fanout-n", type=int, default=0, metavar="N",
                    help="subscribers of the one id of every fan-out mode instead of the "
                         "size's (e.g. 100000 for fanout,fanout-ws)")
    ap.add_argument("--workers", type=int, default=8, help="megacomet and nginx workers")
    ap.add_argument("--publish-shape", default=",".join(PUBLISH_SHAPES),
                    help="deliver modes: a single-publish round per shape, every server, rows "
                         "labelled with it (comma list, default all): one-deep = 1 keep-alive "
                         "connection 128 requests deep; spread = 8 connections 16 deep each; "
                         "both as fast as the server answers")
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
    args.publish_shape = [x for x in args.publish_shape.split(",") if x]
    for x in args.publish_shape:
        if x not in PUBLISH_SHAPES:
            ap.error("unknown publish shape %r (%s)" % (x, ", ".join(PUBLISH_SHAPES)))
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
    for base, n in (("hold", args.hold_n), ("fanout", args.fanout_n)):
        if n:
            sizes = {m: dict(v, n=n) if split_mode(m)[0] == base and m not in CLUSTER_MODES
                     else v for m, v in sizes.items()}
    duration = args.duration or (60 if args.quick else 240)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES + STREAM_MODES + tuple(CLUSTER_MODES):
            ap.error("unknown mode %r" % m)
    if any(m in CLUSTER_MODES for m in modes):
        if not redislab.available() or redislab.hiredis is None:
            ap.error("the cluster modes need redis-server and hiredis (Debian: apt-get install "
                     "redis-server; pip install 'megacomet[redis]')")
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
    not_run = {}
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
                if (s, mode) in NOT_RUN:
                    not_run["%s %s" % (s, mode)] = NOT_RUN[(s, mode)]
                    continue
                rec, more = run_one(s, mode, sizes[mode], workdir, duration, args)
                results[s][mode] = rec
                notes += more
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
    if not_run:
        print("not run: " + "; ".join("%s (%s)" % kv for kv in not_run.items()))
    if notes:
        print("notes:")
        for n in notes:
            print("  - " + n)
    doc = {"tool": "bench", "quick": args.quick, "elapsed_s": round(elapsed, 1),
           "servers": servers, "skipped": skipped, "not_run": not_run, "modes": modes,
           "redis": ("cluster" if args.redis_cluster else "standalone")
           if any(m in CLUSTER_MODES for m in modes) else None,
           "sizes": sizes, "workers": args.workers,
           "publish_shapes": {s: PUBLISH_SHAPES[s] for s in args.publish_shape}, "table": rows,
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

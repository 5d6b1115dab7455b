"""MegaComet: the command line and the supervisor.

The supervisor creates the shared region and one eventfd per worker, forks
the workers, restarts any that dies, and stops them all on SIGTERM/SIGINT.
It never touches a connection, a ring or a partition itself: it only
writes each worker's pid into the region (0 while that worker is down), so
that /health and /stats can tell who is alive.

Run it:  python3 megacomet.py --workers 8  (or python3 -m megacomet, or the megacomet command)
Sign a subscription:  MEGACOMET_SECRET=... python3 megacomet.py sign alice
Check the host:  python3 megacomet.py check --connections 300000
Reload the workers' code:  kill -HUP <pid>, or python3 megacomet.py reload --pid-file F
"""

import argparse
import gc
import importlib
import ipaddress
import os
import platform
import re
import resource
import select
import signal
import socket
import sys
import time
import traceback
import zipimport

from . import config
from . import hostcheck
from . import logs
from . import reloadable_modules
from . import server
from . import shmqueue
from . import signing
from . import wire
from . import worker

PROG = "megacomet.py"
TOKEN_ENV = "MEGACOMET_APP_TOKEN"
SECRET_ENV = "MEGACOMET_SECRET"
REDIS_ENV = "MEGACOMET_REDIS_URL"
DEFAULT_WORKERS = os.cpu_count() or 1

# Restarts.  A worker that dies young waits RESTART_BACKOFF_MIN, then twice as long each time
# it dies young again, up to RESTART_BACKOFF_MAX: a crash loop costs little CPU and log.
RESTART_BACKOFF_MIN = 0.1      # seconds before the first restart of a crash-looping worker
RESTART_BACKOFF_MAX = 30.0     # seconds between restarts of a worker that keeps dying
CRASH_LOOP_WINDOW = 1.0        # a worker that dies younger than this is crash-looping
RESTART_DELAY = 0.05           # before restarting a worker that is not

# Stopping.  The README promises that SIGTERM/Ctrl-C ends everything within EXIT_PROMISE:
# the workers get STOP_GRACE to answer held polls and confirm publishes, the last second is
# for SIGKILLing and reaping whatever is left.  A reload's old worker gets the whole of it.
EXIT_PROMISE = 5.0
STOP_GRACE = EXIT_PROMISE - 1.0
STOP_POLL = 0.02               # seconds between reaps while the workers stop

# The supervisor's waits.  It sleeps in select() on its signal pipe (SIGCHLD wakes it), so
# these bound only how late it notices what sends no signal.
SUPERVISE_INTERVAL = 1.0       # a hung worker (its heartbeat in shared memory) is seen this late
REAP_POLL = 0.05               # while a reload waits on a worker: how often deaths are reaped
READY_TIMEOUT = 30.0           # seconds the workers get to listen at start
READY_POLL = 0.2               # how often deaths are reaped meanwhile
RELOAD_STEP_TIMEOUT = 10.0     # seconds a reloaded worker may take to listen, then to serve
PIPE_READ = 4096               # bytes read at once from the signal and ready pipes: all they hold

# Limits of the settings, and the room the shared memory must have beside the messages.
MAX_QUEUE_TTL = 2 ** 31 / 1000     # seconds: the TTL is kept in ms in a signed 32-bit field
MIN_HEARTBEAT, MAX_HEARTBEAT = 0.5, 3600.0
MIN_WORKER_TIMEOUT = SUPERVISE_INTERVAL   # the supervisor checks no more often than that
LOG_RECORD_ROOM = 64           # a message log record's header (shmqueue.REC_HEADER), with room
RING_RECORD_ROOM = 256         # a worker-to-worker record's header and id (wire.MAX_ID_LENGTH)
DEFAULT_POLL_TIMEOUT = 30
BANNER_FDS_BESIDES = 32        # the banner's estimate of a worker's fds that are not connections

# Machines whose stores other cores see in program order (TSO), as shmqueue's rings need: a
# record's bytes are stored before the index that publishes it, and Python has no fence to
# keep another core from seeing the index first where stores may be reordered (ARM, POWER).
TSO_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686"})
# What a header value may not hold: the controls (CR and LF would end the header line).
_HEADER_VALUE_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What --app-server-name may be: a Host header's name (or [IPv6 literal]), maybe with a port.
_SERVER_NAME = re.compile(r"(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog=PROG,
        description="A comet (HTTP long-poll push) server: pre-forked epoll workers sharing "
                    "routing and message queues through shared memory.")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help="worker processes (default: CPU count, %%(default)s here; at most %d)"
                        % shmqueue.MAX_WORKERS)
    p.add_argument("--host", default="0.0.0.0", help="client port address (default %(default)s)")
    p.add_argument("--port", type=int, default=8000,
                   help="client port for subscribers (default %(default)s; 0 picks a free one)")
    p.add_argument("--app-host", default="127.0.0.1",
                   help="app port address for publishers (default %(default)s: keep it private)")
    p.add_argument("--app-port", type=int, default=9000,
                   help="app port: HTTP publish API, /stats, /metrics, /health and the binary "
                        "protocol (default %(default)s; 0 picks a free one)")
    p.add_argument("--max-ids", type=int, default=shmqueue.DEFAULT_MAX_IDS,
                   help="ids the shared table holds at once; subscribers alone may create "
                        "ids in 3/4 of it (default %(default)s)")
    p.add_argument("--shm-mb", type=int, default=128,
                   help="MiB of shared memory for buffered messages (default %(default)s)")
    p.add_argument("--ring-kb", type=int, default=256,
                   help="KiB per worker-to-worker ring (default %(default)s; raised to fit "
                        "2 messages of --max-message)")
    p.add_argument("--max-queued", type=int, default=64,
                   help="messages buffered per id; older ones are dropped (default %(default)s)")
    p.add_argument("--queue-ttl", type=float, default=60.0,
                   help="seconds a buffered message lives (default %(default)s)")
    p.add_argument("--poll-timeout", type=int, default=DEFAULT_POLL_TIMEOUT,
                   help="seconds a long-poll is held without news (default %(default)s; "
                        "?timeout= may ask for 1..120, or up to this if longer)")
    p.add_argument("--compat-ports", action="store_true",
                   help="also serve subscribers on --port+1 .. --port+WORKERS-1, as the original "
                        "MegaComet did (its pages connect to port + hash(id) %% workers)")
    p.add_argument("--heartbeat", type=float, default=15.0,
                   help="seconds between keep-alive pings on EventSource and WebSocket streams "
                        "(default %(default)s)")
    p.add_argument("--max-message", type=int, default=65536,
                   help="largest message in bytes (default %(default)s)")
    p.add_argument("--max-body", type=int, default=16 << 20,
                   help="largest HTTP body on the app port, i.e. a batch (default %(default)s)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send request headers, and may idle "
                        "between keep-alive requests (default %(default)s)")
    p.add_argument("--cors-origin", default="*", type=header_value,
                   help="Access-Control-Allow-Origin sent to subscribers (default %(default)s)")
    p.add_argument("--app-token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on the app port (not for "
                        "GET /health) and refuse the binary protocol. A command line is "
                        "visible to every user (ps): prefer --app-token-file or the "
                        "environment variable " + TOKEN_ENV)
    p.add_argument("--app-token-file", default=None,
                   help="read the app token from this file (its first line)")
    p.add_argument("--insecure-app-port", action="store_true",
                   help="allow --app-host on a non-loopback address without an app token "
                        "(anyone who reaches it can publish)")
    p.add_argument("--proxy-protocol", action="store_true",
                   help="every client-port connection must open with a PROXY protocol header "
                        "(v1 or v2: haproxy's send-proxy, a cloud L4 balancer) naming the real "
                        "client; one without is closed. Only behind a balancer that always "
                        "sends it (off: a PROXY header is never trusted)")
    p.add_argument("--max-conns-per-ip", type=int, default=0, metavar="N",
                   help="client-port connections one address may hold on each worker (the "
                        "real address with --proxy-protocol); more are refused and counted "
                        "in /stats as ip_refused (default: no cap)")
    p.add_argument("--app-server-name", action="append", default=[], metavar="NAME",
                   dest="app_server_names",
                   help="a Host name the app port is reached by, besides its address (and "
                        "localhost, 127.0.0.1, [::1] when it is loopback); requests naming "
                        "another Host get 421 (repeatable)")
    p.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="serve the client port over TLS (https, wss) with this certificate "
                        "chain (PEM, the server's first); needs --tls-key. Each worker reads "
                        "the files when it starts: a reload (SIGHUP) takes a renewed one")
    p.add_argument("--tls-key", default=None, metavar="FILE",
                   help="the private key of --tls-cert (PEM, without a pass phrase)")
    p.add_argument("--redis", action="append", default=[], metavar="URL",
                   help="cluster mode: join the other nodes through this Redis "
                        "(redis://[user:password@]host:port[/db], rediss:// for TLS). Several "
                        "seed URLs, or one node that answers CLUSTER SLOTS, mean a Redis "
                        "Cluster (repeatable; also %s or --redis-url-file, since a URL can "
                        "hold a password). Needs pip install 'megacomet[redis]'" % REDIS_ENV)
    p.add_argument("--redis-url-file", default=None, metavar="FILE",
                   help="read the Redis URLs from this file, one per line")
    p.add_argument("--redis-timeout", type=float, default=2.0, metavar="S",
                   help="seconds Redis may take to answer before a publish gets 503 and the "
                        "link is opened again (default %(default)s)")
    p.add_argument("--redis-wait-replicas", type=int, default=0, metavar="N",
                   help="confirm a publish only once N replicas have it (Redis WAIT), so that "
                        "a failover cannot lose it (default 0: the master's word)")
    p.add_argument("--worker-timeout", type=float, default=10.0,
                   help="seconds a worker may go without turning its loop before it is killed "
                        "and replaced (default %(default)s)")
    p.add_argument("--pid-file", default=None,
                   help="write the supervisor's pid here (for 'megacomet.py reload --pid-file')")
    p.add_argument("--log-format", choices=logs.FORMATS, default="text",
                   help="log lines on stderr as text or one JSON object each (default %(default)s)")
    add_secret_arguments(p)
    args = p.parse_args(argv)
    logs.configure(args.log_format)
    args.app_token = read_secret(p, "app token", args.app_token, args.app_token_file, TOKEN_ENV)
    args.secret = read_secret(p, "secret", args.secret, args.secret_file, SECRET_ENV)
    if args.secret is not None:
        args.secret = args.secret.encode()
    if not args.app_token and not args.insecure_app_port and not is_loopback(args.app_host):
        p.error("--app-host %s is reachable from other machines, and without an app token "
                "anyone there can publish: set one (--app-token-file or %s), or say "
                "--insecure-app-port" % (args.app_host, TOKEN_ENV))
    if not 1 <= args.workers <= shmqueue.MAX_WORKERS:
        p.error("--workers must be 1..%d" % shmqueue.MAX_WORKERS)
    for name in ("max_ids", "shm_mb", "ring_kb", "max_queued", "poll_timeout", "max_message",
                 "max_body"):
        if getattr(args, name) < 1:
            p.error("--%s must be positive" % name.replace("_", "-"))
    if not 0 < args.queue_ttl < MAX_QUEUE_TTL:
        p.error("--queue-ttl must be between 0 and %d days" % (MAX_QUEUE_TTL // 86400))
    if not 0 < args.header_timeout:
        p.error("--header-timeout must be positive")
    if args.compat_ports and not args.port:
        p.error("--compat-ports needs a fixed --port (the original's pages count from it)")
    if not MIN_HEARTBEAT <= args.heartbeat <= MAX_HEARTBEAT:
        p.error("--heartbeat must be %g..%g seconds" % (MIN_HEARTBEAT, MAX_HEARTBEAT))
    if args.max_conns_per_ip < 0:
        p.error("--max-conns-per-ip must be 0 (no cap) or positive")
    for name in args.app_server_names:
        if not _SERVER_NAME.match(name):
            p.error("--app-server-name %r is not a host name (letters, digits, '.', '-', "
                    "'_', an [IPv6] literal, an optional :port)" % name)
    args.app_server_names = tuple(name.lower() for name in args.app_server_names)
    if not args.worker_timeout >= MIN_WORKER_TIMEOUT:
        p.error("--worker-timeout must be at least %g second" % MIN_WORKER_TIMEOUT)
    check_tls_arguments(p, args)
    check_redis_arguments(p, args)
    if args.max_message * 2 + LOG_RECORD_ROOM > (args.shm_mb << 20) // args.workers:
        p.error("--max-message must fit twice in each worker's share of --shm-mb")
    args.ring_kb = max(args.ring_kb, (2 * (args.max_message + RING_RECORD_ROOM) + 1023) // 1024)
    return args


def check_tls_arguments(p, args):
    """--tls-cert and --tls-key: both or neither, and files that load together (checked here
    once: the workers read them again at their start, the supervisor never does)."""
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together: give both, or neither for plain HTTP")
    if args.tls_cert:
        args.tls_cert = os.path.abspath(args.tls_cert)   # the same files whatever the cwd
        args.tls_key = os.path.abspath(args.tls_key)
        from . import tls                        # (only then: a plain server never loads ssl)
        problem = tls.check(args.tls_cert, args.tls_key)
        if problem:
            p.error(problem)


def check_redis_arguments(p, args):
    """The Redis URLs (flags, else the file, else the environment), checked; hiredis with them."""
    urls = list(args.redis)
    if not urls and args.redis_url_file:
        try:
            with open(args.redis_url_file, encoding="utf-8") as f:
                urls = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except (OSError, UnicodeDecodeError) as e:
            p.error("cannot read the Redis URLs from %s: %s" % (args.redis_url_file, e))
        if not urls:
            p.error("%s holds no Redis URL" % args.redis_url_file)
    if not urls and os.environ.get(REDIS_ENV):
        urls = os.environ[REDIS_ENV].replace(",", " ").split()
    args.redis = tuple(urls)
    if not urls:
        return
    try:
        from . import redislink              # (only then: one box never imports hiredis)
    except ImportError:
        p.error("--redis needs the hiredis package: pip install 'megacomet[redis]'")
    for url in urls:
        try:
            redislink.Target(url)
        except ValueError as e:
            p.error(str(e))
    if not args.redis_timeout > 0:
        p.error("--redis-timeout must be positive")
    if args.redis_wait_replicas < 0:
        p.error("--redis-wait-replicas must be 0 or more")


def header_value(value):
    """An argparse type: ``value`` if it can be an HTTP header's value as it is.

    A CR or LF in it would end the header line and start headers of its own (in every
    subscriber answer): refuse it, and every other control, and what latin-1 cannot encode.
    """
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            "%r is not latin-1 text: it cannot be a header value" % value) from None
    if _HEADER_VALUE_CONTROLS.search(value):
        raise argparse.ArgumentTypeError(
            "%r holds a control character (CR, LF, ...): it cannot be a header value" % value)
    return value


def check_memory_ordering(machine=None):
    """None if this machine (default: platform.machine()) orders stores as shmqueue's rings
    need (x86's TSO), else the text that says why the server cannot run here."""
    machine = platform.machine() if machine is None else machine
    if machine.lower() in TSO_MACHINES:
        return None
    return ("this machine is %s: MegaComet runs only on x86-64 (or 32-bit x86). Its workers "
            "share rings in memory that rely on x86's store ordering (TSO: a record's bytes "
            "are seen by other cores before the index that publishes it); this machine does "
            "not promise that ordering, so a worker could read a record before its bytes"
            % (machine or "of an unknown architecture"))


def add_secret_arguments(p):
    p.add_argument("--secret", default=None,
                   help="sign subscriptions: each must carry exp and sig (see '" + PROG + " "
                        "sign'). Visible in ps: prefer --secret-file or " + SECRET_ENV)
    p.add_argument("--secret-file", default=None,
                   help="read the subscription secret from this file (its first line)")


def read_secret(p, what, value, path, env):
    """A secret from the command line, else a file, else the environment; None if none is set."""
    if value is None and path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            p.error("cannot read the %s from %s: %s" % (what, path, e))
    if value is None:
        value = os.environ.get(env)
    if value is not None and not value:
        p.error("the %s is empty" % what)
    return value


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def sign_main(argv):
    """``megacomet.py sign ID... [--ttl S]``: print the query string a subscription carries."""
    p = argparse.ArgumentParser(
        prog=PROG + " sign",
        description="Print 'exp=...&sig=...' for a subscription to the given ids, signed with "
                    "the secret from --secret-file, --secret or " + SECRET_ENV + ".")
    p.add_argument("ids", nargs="+", help="one or more ids (several: one signature over all)")
    p.add_argument("--ttl", type=int, default=3600,
                   help="seconds the signature stays valid (default %(default)s)")
    add_secret_arguments(p)
    args = p.parse_args(argv)
    secret = read_secret(p, "secret", args.secret, args.secret_file, SECRET_ENV)
    if secret is None:
        p.error("no secret: give --secret-file or set " + SECRET_ENV)
    for ident in args.ids:
        if not wire.valid_id(ident.encode()):
            p.error("%r is not an id (%s)" % (ident, wire.ID_TEXT))
    print(signing.query(secret.encode(), args.ids, args.ttl, time.time()))
    return 0


def check_main(argv):
    """``megacomet.py check [--connections N] [--workers W]``: can this host hold them?"""
    p = argparse.ArgumentParser(
        prog=PROG + " check",
        description="Read this host's limits and say whether it can hold N connections, with "
                    "the exact fix for each limit that falls short. Exit status 1 if any does.")
    p.add_argument("--connections", type=int, default=100_000,
                   help="connections to hold (default %(default)s)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help="worker processes (default: CPU count, %(default)s here)")
    p.add_argument("--max-ids", type=int, default=shmqueue.DEFAULT_MAX_IDS,
                   help="the --max-ids the server will run with (default %(default)s)")
    p.add_argument("--poll-timeout", type=int, default=DEFAULT_POLL_TIMEOUT,
                   help="the --poll-timeout the server will run with (default %(default)s)")
    p.add_argument("--redis", action="append", default=[], metavar="URL",
                   help="also check this Redis for cluster mode: reachable, its version, and "
                        "maxmemory-policy noeviction (repeatable)")
    args = p.parse_args(argv)
    if args.connections < 1 or not 1 <= args.workers <= shmqueue.MAX_WORKERS:
        p.error("--connections must be positive and --workers 1..%d" % shmqueue.MAX_WORKERS)
    status = hostcheck.report(args.connections, args.workers, args.max_ids, args.poll_timeout)
    if args.redis:
        try:
            from . import redislink
        except ImportError:
            p.error("--redis needs the hiredis package: pip install 'megacomet[redis]'")
        for url in args.redis:
            try:
                redislink.Target(url)
            except ValueError as e:
                p.error(str(e))
        status |= redislink.check(args.redis)
    return status


def reload_main(argv):
    """``megacomet.py reload --pid-file F``: SIGHUP the running server (a graceful reload)."""
    p = argparse.ArgumentParser(
        prog=PROG + " reload",
        description="Ask a running server to replace its workers, one at a time, with ones "
                    "running the worker code now on disk (the same as kill -HUP).")
    p.add_argument("--pid-file", required=True, help="the file the server wrote (--pid-file)")
    args = p.parse_args(argv)
    try:
        with open(args.pid_file) as f:
            pid = int(f.read().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as e:
        p.error("cannot signal the server in %s: %s" % (args.pid_file, e))
    print("megacomet: reload asked of pid %d (it logs 'reload: done')" % pid)
    return 0


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def reserve_port(host, port):
    """Bind (not listen) a SO_REUSEPORT socket: resolves port 0 and holds the port for the workers.

    It first binds without SO_REUSEPORT, which fails if anything holds the
    port: otherwise a second server started on the same port by the same
    user would silently share its connections with the first.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise OSError(e.errno, "cannot listen on %s:%d: %s" % (host, port, e.strerror)) from None
        port = probe.getsockname()[1]
    return worker.shared_port_socket(host, port)


class Supervisor:
    def __init__(self, args):
        self.args = args
        self.n = args.workers
        self.pids = {}                   # pid -> worker index
        self.started = {}                # pid -> when it was forked (a reload's standby is a
                                         # second process of one index: its own start)
        self.backoff = [0.0] * self.n
        self.restart_at = {}             # index -> when to fork it again
        self.stopping = False
        self.reload_requested = False
        self.reloaded = False            # from the first reload on, workers import fresh code
        self.standby = set()             # pids of reload successors not owning their partition yet
        self.retiring = set()            # pids of workers a reload is replacing

    def run(self):
        args = self.args
        fd_limit = raise_fd_limit()
        reserved = [reserve_port(args.host, args.port), reserve_port(args.app_host, args.app_port)]
        args.port = reserved[0].getsockname()[1]
        args.app_port = reserved[1].getsockname()[1]
        if args.compat_ports:                     # the original's pages pick port + hash % N
            reserved += [reserve_port(args.host, args.port + i) for i in range(1, self.n)]
        # This one Config goes to every worker, reloaded ones too.
        self.config = config.Config.from_args(args, started_at=time.time(),
                                              compat_ports=self.n - 1 if args.compat_ports else 0)
        self.region = shmqueue.SharedRegion(
            self.n, args.max_ids, args.shm_mb << 20, args.ring_kb << 10,
            ttl_ms=int(args.queue_ttl * 1000), max_queued=args.max_queued)
        self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(self.n)]
        self.reserved = reserved
        self.sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(sig_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        self._banner(fd_limit)
        if args.pid_file:
            with open(args.pid_file, "w") as f:
                f.write("%d\n" % os.getpid())
        gc.freeze()          # what exists now is shared with every worker: never collect (copy) it
        for index in range(self.n):
            self._spawn(index, ready_w)
        os.close(ready_w)
        self._wait_ready(ready_r)
        while not self.stopping:
            if self.reload_requested:
                self.reload_requested = False
                self._reload()
            self._reap()
            self._kill_hung()
            self._restart_due()
            timeout = SUPERVISE_INTERVAL
            if self.restart_at:
                timeout = max(0.0, min(self.restart_at.values()) - time.monotonic())
            self._wait_signal(timeout)
        self._stop()
        if args.pid_file:
            try:
                os.unlink(args.pid_file)
            except OSError:
                pass
        return 0

    def _banner(self, fd_limit):
        a = self.args
        lay = self.region.layout
        print("megacomet: %d workers, pid %d" % (self.n, os.getpid()))
        print("megacomet: client port %s://%s:%d  (GET /sub/<id>, /sse/<id>, /ws/<id>, /<id>.js)"
              % ("https" if a.tls_cert else "http", a.host, a.port))
        if a.compat_ports:
            print("megacomet: compat ports %d-%d (the original's port per worker)"
                  % (a.port + 1, a.port + self.n - 1))
        print("megacomet: app port    http://%s:%d  (POST /pub, /stats, /metrics, /health, "
              "binary protocol%s)" % (a.app_host, a.app_port, "; token required" if a.app_token else ""))
        print("megacomet: fd limit %d per worker: up to ~%d connections in all" %
              (fd_limit, (fd_limit - BANNER_FDS_BESIDES) * self.n))
        print("megacomet: shared memory %.1f MiB (ids %d, messages %d MiB, rings %d x %d KiB)" %
              (lay.total / 2 ** 20, lay.slots * self.n,
               lay.log_size * self.n >> 20, self.n * self.n, lay.ring_size >> 10))
        sys.stdout.flush()

    def _wait_ready(self, ready_r):
        """Print 'ready' once every worker listens (tests and scripts wait for that line)."""
        seen = set()
        deadline = time.monotonic() + READY_TIMEOUT
        while len(seen) < self.n and time.monotonic() < deadline and not self.stopping:
            readable, _, _ = select.select([ready_r], [], [], READY_POLL)
            if readable:
                data = os.read(ready_r, PIPE_READ)
                if not data:
                    break
                seen.update(int(x) for x in data.split())
            self._reap()
        os.close(ready_r)
        if len(seen) == self.n:
            print("megacomet: ready", flush=True)
        else:
            print("megacomet: only %d of %d workers started" % (len(seen), self.n), flush=True)

    def _spawn(self, index, ready_w=None, standby_r=None):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(self.sig_r)
                for sock in self.reserved:
                    sock.close()
                for sig in (signal.SIGTERM, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)   # a reload is the supervisor's
                module = fresh_worker_module(self.args) if self.reloaded else server
                module.assemble(index, self.config, self.region, self.eventfds, ready_w,
                                standby_r).run()
            except BaseException as e:   # noqa: BLE001 - anything must end in _exit
                # One entry, traceback included (logs keeps it one line / one JSON object).
                logs.write("error", "died: %r\n%s" % (e, traceback.format_exc().rstrip()), index)
                code = 1
            finally:
                os._exit(code)
        self.pids[pid] = index
        self.started[pid] = time.monotonic()     # the worker writes its pid once it listens
        return pid

    def _on_signal(self, signum, frame):
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        elif signum == signal.SIGHUP:
            self.reload_requested = True

    def _reload(self):
        """Replace the workers one at a time by fresh ones running the worker code now on disk.

        For each: the new worker listens first (standby: connections queue for it), then the
        old one stops as on SIGTERM (it serves what waits in its accept queue, answers held
        polls, delivers what it owes), and only once it has exited does the new one take over
        the partition.  No two processes ever own one partition.
        """
        logs.write("info", "reload: replacing %d workers one at a time" % self.n)
        self.reloaded = True
        for index in range(self.n):
            old = next((pid for pid, i in self.pids.items() if i == index), None)
            if self.stopping or old is None:
                continue                          # down: its restart runs the new code anyway
            ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
            go_r, go_w = os.pipe2(os.O_CLOEXEC)
            new = self._spawn(index, ready_w, go_r)
            self.standby.add(new)
            os.close(ready_w)
            os.close(go_r)
            try:
                if self._read_line(ready_r, RELOAD_STEP_TIMEOUT) != b"listening":
                    logs.write("error", "reload: the new worker %d did not start; reload stopped"
                               % index)
                    self._kill(new)
                    return
                self.retiring.add(old)
                self._kill(old, signal.SIGTERM)
                deadline = time.monotonic() + EXIT_PROMISE
                while old in self.pids and time.monotonic() < deadline:
                    self._wait_signal(REAP_POLL)
                    self._reap()
                if old in self.pids:
                    self._kill(old)
                    while old in self.pids:
                        self._wait_signal(REAP_POLL)
                        self._reap()
                self.standby.discard(new)
                # If the old one died meanwhile, _reap scheduled its restart: the new one is
                # that restart (a second would make two owners of one partition).
                self.restart_at.pop(index, None)
                self.retiring.discard(old)
                os.write(go_w, b"g")              # the partition is free: take it over
                if self._read_line(ready_r, RELOAD_STEP_TIMEOUT) != str(index).encode():
                    logs.write("error", "reload: worker %d did not come up" % index)
            finally:
                os.close(ready_r)
                os.close(go_w)
        logs.write("info", "reload: done")

    def _read_line(self, fd, timeout):
        """One line from a worker's ready pipe, b"" on EOF or timeout; signals and deaths are
        handled meanwhile."""
        data = b""
        deadline = time.monotonic() + timeout
        while not data.endswith(b"\n") and time.monotonic() < deadline:
            readable, _, _ = select.select([fd], [], [], REAP_POLL)
            if readable:
                chunk = os.read(fd, 1)
                if not chunk:
                    break
                data += chunk
            self._reap()
        return data.strip()

    def _kill(self, pid, sig=signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _wait_signal(self, timeout):
        try:
            select.select([self.sig_r], [], [], timeout)
            os.read(self.sig_r, PIPE_READ)
        except (BlockingIOError, InterruptedError):
            pass

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.pids.pop(pid, None)
            forked_at = self.started.pop(pid, time.monotonic())
            if index is None:
                continue
            block = self.region.stats(index)
            if pid in self.standby:              # never owned the partition: the old one does
                self.standby.discard(pid)
                logs.write("error", "reload: standby worker %d (pid %d) %s" %
                           (index, pid, describe_status(status)))
                continue
            if block.get("pid") == pid:
                block.set("pid", 0)
            if pid in self.retiring:             # replaced by a reload, not dead
                self.retiring.discard(pid)
                continue
            if self.stopping:
                continue
            block.set("restarts", block.get("restarts") + 1)
            lived = time.monotonic() - forked_at
            if lived < CRASH_LOOP_WINDOW:
                self.backoff[index] = min(RESTART_BACKOFF_MAX,
                                          max(RESTART_BACKOFF_MIN, self.backoff[index] * 2))
            else:
                self.backoff[index] = RESTART_DELAY
            logs.write("error", "worker %d (pid %d) %s after %.1f s; restarting in %.1f s" %
                       (index, pid, describe_status(status), lived, self.backoff[index]))
            self.restart_at[index] = time.monotonic() + self.backoff[index]

    def _kill_hung(self):
        """SIGKILL a worker whose loop has not turned for --worker-timeout (stuck, or stopped)."""
        now_ms = time.time() * 1000
        for pid, index in self.pids.items():
            block = self.region.stats(index).as_dict()
            if block["pid"] == pid and not worker.responsive(block, now_ms, self.args.worker_timeout):
                logs.write("error", "worker %d (pid %d) has not turned its loop for %.1f s; "
                           "killing it" % (index, pid, (now_ms - block["heartbeat_ms"]) / 1000))
                self._kill(pid)
                self.region.stats(index).set("pid", 0)   # down from now on; _reap restarts it

    def _restart_due(self):
        now = time.monotonic()
        for index, when in list(self.restart_at.items()):
            if when <= now:
                del self.restart_at[index]
                self._spawn(index)

    def _stop(self):
        for pid in self.pids:
            self._kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while self.pids and time.monotonic() < deadline:
            self._reap()
            time.sleep(STOP_POLL)
        for pid in self.pids:
            self._kill(pid)
        while self.pids:
            pid, _ = os.waitpid(-1, 0)
            self.pids.pop(pid, None)
        print("megacomet: stopped", flush=True)


def fresh_worker_module(args):
    """In a worker just forked: import the worker's modules again from disk (a reload)."""
    zipimport._zip_directory_cache.clear()      # a .pyz replaced on disk: read its index again
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()
    package = sys.modules[__package__]
    for name in reloadable_modules():
        sys.modules.pop("%s.%s" % (__package__, name), None)
        # `from . import x` takes the package's attribute when there is one: drop it too.
        package.__dict__.pop(name, None)
    importlib.import_module(".logs", __package__).configure(args.log_format)
    return importlib.import_module(".server", __package__)


def describe_status(status):
    if os.WIFSIGNALED(status):
        return "killed by %s" % signal.Signals(os.WTERMSIG(status)).name
    return "exited with %d" % os.waitstatus_to_exitcode(status)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sign"]:
        return sign_main(argv[1:])
    if argv[:1] == ["check"]:
        return check_main(argv[1:])
    if argv[:1] == ["reload"]:
        return reload_main(argv[1:])
    args = parse_args(argv)
    problem = check_memory_ordering()      # before any shared memory is made
    if problem:
        logs.write("error", problem)
        return 2
    try:
        return Supervisor(args).run()
    except OSError as e:
        logs.write("error", e.strerror or str(e))
        return 1


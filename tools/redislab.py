#!/usr/bin/env python3
"""redislab: real redis-server processes on free loopback ports, for tests and tools.

The one way the tests (tests/redisfixtures.py) and the tools (tools/cluster.py)
get a Redis of their own: the ``redis-server`` and ``redis-cli`` of the
machine (Debian's ``redis-server`` package), never a mock::

    with Standalone() as r:              # one server, no persistence
        r.command("SET", "k", "v")       # raw socket + hiredis
        r.cli("GET", "k")                # redis-cli, its output as text
        r.restart()                      # same port, data gone

    with Cluster() as c:                 # 3 masters + 3 replicas (redis-cli --cluster create)
        node = c.master_for_key("k")
        c.kill(node)
        new = c.wait_failover(node, timeout=20)

Every server is bound to 127.0.0.1, has its own temporary directory, saves
nothing (``--save ''``, ``--appendonly no``) and evicts nothing
(``--maxmemory-policy noeviction``, what MegaComet requires of a Redis).

It must never touch a Redis it did not start (nothing on 6379, no system
service), never send anything off loopback, never signal a process that is
not one it started (always by pid), never leave one behind: stop() runs in
``finally``/``__exit__``, a failed start stops what it started, and every
server gets SIGKILL should the process that started it die
(PR_SET_PDEATHSIG: start servers from the thread that will stop them).
Every wait has a timeout.

Standard library, plus ``hiredis`` for command() (imported when first used).
Run it to try it: ``python3 tools/redislab.py [--cluster]`` starts, checks and
stops a lab.
"""

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

try:
    import hiredis                   # the lab's one dependency beyond the standard library
except ImportError:                  # only command() needs it: say so there
    hiredis = None

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
HOST = "127.0.0.1"
START_TIMEOUT = 15.0
STOP_GRACE = 5.0             # SIGTERM, then SIGKILL: an unsaved Redis exits in milliseconds
COMMAND_TIMEOUT = 10.0
CLUSTER_TIMEOUT = 60.0       # create and settle six servers on a busy 2-core machine
NODE_TIMEOUT_MS = 2000       # cluster-node-timeout: a dead master is failed over in seconds
BUS_OFFSET = 10000           # Redis Cluster's bus listens on port + 10000
SLOTS = 16384
PR_SET_PDEATHSIG = 1
LOG_TAIL = 3000              # characters of a server's log quoted in an error

_random = random.SystemRandom()   # parallel test runs must not pick the same ports in turn
_handed_out = set()               # ports this process picked (servers may not have bound yet)


class RedisLabError(RuntimeError):
    """A server did not start, did not answer, or a cluster did not settle in time."""


def available():
    """Are redis-server and redis-cli installed?"""
    return os.access(REDIS_SERVER, os.X_OK) and os.access(REDIS_CLI, os.X_OK)


# -- ports --------------------------------------------------------------------------------

def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port):
    # No SO_REUSEADDR: a port in TIME_WAIT counts as taken, which only makes us pickier.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(bus=False):
    """A loopback port nothing is bound to (and, with ``bus``, whose port + 10000 is free too).

    Ports are picked below the ephemeral range (and so is the bus port) when it leaves room:
    there no outgoing connection of another process can take them between our check
    and redis-server's bind.  A race with another picker remains; start() retries.
    """
    span = BUS_OFFSET if bus else 0
    low, high = 12000, _ephemeral_low() - span
    for _ in range(200):
        if high - low >= 1000:
            port = _random.randrange(low, high)
        else:                                  # an unusual ip_local_port_range: ask the kernel
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((HOST, 0))
                port = s.getsockname()[1]
            if port + span >= 65536:
                continue
        if port in _handed_out or (bus and port + BUS_OFFSET in _handed_out):
            continue
        if _bindable(port) and (not bus or _bindable(port + BUS_OFFSET)):
            _handed_out.add(port)
            if bus:
                _handed_out.add(port + BUS_OFFSET)
            return port
    raise RedisLabError("no free loopback port found")


# -- talking to a server ------------------------------------------------------------------

def command(port, *args, host=HOST, timeout=COMMAND_TIMEOUT, encoding="utf-8"):
    """Send one command on a new connection and return its reply, decoded by hiredis.

    Strings come back as str (``encoding=None``: bytes); an error reply raises
    hiredis.ReplyError (MOVED and ASK included: this is no cluster client).
    """
    if hiredis is None:
        raise RedisLabError("the hiredis package is missing: python3 -m pip install hiredis")
    reader = hiredis.Reader(encoding=encoding, errors="replace") if encoding else hiredis.Reader()
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(hiredis.pack_command(tuple(args)))
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no reply to %s from %s:%d within %.1f s"
                                   % (args[0] if args else "?", host, port, timeout))
            s.settimeout(remaining)
            data = s.recv(65536)
            if not data:
                raise ConnectionError("%s:%d closed the connection" % (host, port))
            reader.feed(data)
            reply = reader.gets()
            if reply is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise reply
                return reply


def ping(port, host=HOST, timeout=1.0):
    """True when the server answers PING with PONG (not LOADING, not refused)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")                     # inline command: no parser needed
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def set_pdeathsig(sig=signal.SIGKILL):
    """In a child (preexec_fn): get ``sig`` when the thread that started it dies, so that
    nothing started here outlives a killed test run or tool."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


# What a wait loop asks again after: a node down, slow, busy or not yet agreeing.
TRANSIENT = (OSError, RedisLabError) + ((hiredis.HiredisError,) if hiredis else ())


def _info(text):
    """INFO's or CLUSTER INFO's ``key:value`` lines as a dict."""
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


# -- one server ---------------------------------------------------------------------------

class Standalone:
    """One redis-server in its own temporary directory, bound to 127.0.0.1.

    ``port=0`` picks a free one.  ``args`` are extra command-line settings
    (``["--requirepass", "s3cret"]``).  ``start()`` returns self once it answers PING.
    """

    kind = "standalone"

    def __init__(self, port=0, args=(), start_timeout=START_TIMEOUT):
        self.requested_port = port
        self.port = port or None
        self.args = [str(a) for a in args]
        self.start_timeout = start_timeout
        self.proc = None
        self.dir = None

    # The settings every lab server has; Cluster's nodes add theirs.
    def argv(self):
        return [REDIS_SERVER,
                "--port", str(self.port), "--bind", HOST,
                "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log"),
                "--daemonize", "no",
                "--save", "", "--appendonly", "no",       # a restart loses everything
                "--maxmemory-policy", "noeviction",       # what MegaComet asks of a Redis
                # DEBUG SLEEP (a slow Redis) is for tests; loopback connections only.
                "--enable-debug-command", "local",
                # A master's SIGTERM waits up to 10 s for lagging replicas by default:
                # a stop must not, since replicas may be dead or paused here.
                "--shutdown-timeout", "0",
                *self.extra_argv(), *self.args]

    def extra_argv(self):
        return []

    @property
    def url(self):
        return "redis://%s:%d" % (HOST, self.port)

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    def __repr__(self):
        return "<%s %s:%s pid %s>" % (type(self).__name__, HOST, self.port, self.pid)

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        """Start the server (a free port unless one was given) and wait until it answers."""
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="redislab-")
        tries = 1 if self.requested_port else 5
        try:
            for attempt in range(tries):
                if not self.requested_port:
                    self.port = free_port(bus=self.kind == "cluster")
                try:
                    self._spawn()
                    return self
                except RedisLabError:
                    # Another process took the port between our check and the bind: pick again.
                    if attempt + 1 == tries or "Address already in use" not in self.log():
                        raise
        except BaseException:
            self.stop()
            raise

    def _spawn(self):
        open(os.path.join(self.dir, "redis.log"), "w").close()     # this start's log only
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd=self.dir, preexec_fn=set_pdeathsig,
                                     # A terminal's Ctrl-C is for whoever started it: it
                                     # stops the servers itself, in order, by pid.
                                     start_new_session=True)
        try:
            self.wait_ready(self.start_timeout)
        except BaseException:
            self._terminate()
            raise

    def wait_ready(self, timeout=START_TIMEOUT):
        """Return once the server answers PING; RedisLabError if it exits or the time passes."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RedisLabError("redis-server on port %s exited (status %s):\n%s" % (
                    self.port, None if self.proc is None else self.proc.returncode,
                    self.log_tail()))
            if ping(self.port):
                return self
            if time.monotonic() >= deadline:
                raise RedisLabError("redis-server on port %s did not answer within %.0f s:\n%s"
                                    % (self.port, timeout, self.log_tail()))
            time.sleep(0.02)

    def log(self):
        try:
            with open(os.path.join(self.dir, "redis.log"), errors="replace") as f:
                return f.read()
        except (OSError, TypeError):
            return ""

    def log_tail(self):
        return self.log()[-LOG_TAIL:]

    # -- signals, always by pid --

    def _terminate(self, grace=STOP_GRACE):
        """SIGTERM (and SIGCONT, should it be paused), SIGKILL after ``grace``; reap it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.send_signal(signal.SIGCONT)    # a stopped process handles no SIGTERM
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def stop(self):
        """Stop the server by pid and remove its directory.  Safe to call twice."""
        try:
            self._terminate()
        finally:
            if self.dir is not None:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def kill(self):
        """SIGKILL it (no shutdown at all) and reap it; its directory stays for restart()."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)

    def restart(self, timeout=START_TIMEOUT):
        """Stop it (if running) and start it again on the same port and directory.

        A standalone server comes back empty (nothing was saved); a cluster node keeps its
        nodes.conf, so it rejoins its cluster (as a replica if it was failed over).
        """
        self._terminate()
        self.requested_port = self.port             # the same port, no retrying elsewhere
        self.start_timeout = timeout
        self._spawn()
        return self

    def pause(self):
        """SIGSTOP: the server holds its connections and answers nothing (a hung Redis)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    # -- commands --

    def command(self, *args, timeout=COMMAND_TIMEOUT, encoding="utf-8"):
        """One command over a raw socket (hiredis parses the reply); errors raise ReplyError."""
        return command(self.port, *args, timeout=timeout, encoding=encoding)

    def cli(self, *args, timeout=COMMAND_TIMEOUT, options=()):
        """redis-cli against this server: its standard output as text, without the last newline.

        An error reply shows as its text (redis-cli prints it); RedisLabError if redis-cli
        fails to run or takes longer than ``timeout``.
        """
        argv = [REDIS_CLI, "-h", HOST, "-p", str(self.port), *options, *map(str, args)]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RedisLabError("redis-cli took more than %.0f s: %s" % (timeout, " ".join(argv)))
        out = done.stdout.decode(errors="replace")
        if done.returncode != 0 and not out:
            raise RedisLabError("%s: exit status %d: %s" % (" ".join(argv), done.returncode,
                                                           done.stderr.decode(errors="replace")))
        return out[:-1] if out.endswith("\n") else out

    def info(self, section=None):
        """INFO (or one section of it) as a dict of strings."""
        return _info(self.command("INFO", *([section] if section else [])))


# -- a cluster ----------------------------------------------------------------------------

class ClusterNode(Standalone):
    """One server of a Cluster: cluster mode on, its nodes.conf in its own directory."""

    kind = "cluster"

    def __init__(self, port=0, args=(), node_timeout_ms=NODE_TIMEOUT_MS, **kw):
        super().__init__(port, args, **kw)
        self.node_timeout_ms = node_timeout_ms
        self.id = None                  # CLUSTER MYID, read once started

    def extra_argv(self):
        return ["--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                # A replica whose master died may always take over, however long its link
                # was down: the lab's failovers must not depend on how busy the machine was.
                "--cluster-replica-validity-factor", "0",
                # A master waits 5 s (the default) for more replicas before a diskless full
                # sync; here a replica should be in sync as soon as it asks.
                "--repl-diskless-sync-delay", "0",
                # Redis 7.0 leaves a replica out of CLUSTER SLOTS while its replication offset
                # is 0, i.e. until its master's first replication PING (every 10 s by default):
                # a new cluster would list no replicas for 10 s.
                "--repl-ping-replica-period", "1"]

    def _spawn(self):
        super()._spawn()
        self.id = self.command("CLUSTER", "MYID")

    def cluster_info(self, timeout=2.0):
        return _info(self.command("CLUSTER", "INFO", timeout=timeout))

    def role(self):
        """'master' or 'slave', as the node itself says (ROLE)."""
        return self.command("ROLE", timeout=2.0)[0]


class Cluster:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each, all on loopback.

    Made with ``redis-cli --cluster create``; start() returns once every node says
    cluster_state:ok with all 16384 slots assigned and every replica is in sync.
    """

    def __init__(self, masters=3, replicas=1, node_timeout_ms=NODE_TIMEOUT_MS, args=(),
                 timeout=CLUSTER_TIMEOUT):
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.n_masters = masters
        self.n_replicas = replicas
        self.timeout = timeout
        self.nodes = [ClusterNode(0, args, node_timeout_ms) for _ in range(masters * (1 + replicas))]
        self._slots_of = {}              # node id -> [(start, end)] it served when last seen

    def __enter__(self):
        if not any(n.proc for n in self.nodes):
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return "<Cluster %s>" % " ".join(str(n.port) for n in self.nodes)

    @property
    def urls(self):
        """Every node's URL, as started (dead ones included: they are seeds like the others)."""
        return [n.url for n in self.nodes]

    @property
    def url(self):
        """One seed: the first node still running."""
        return self.live()[0].url

    def live(self):
        return [n for n in self.nodes if n.alive()]

    def node(self, port):
        for n in self.nodes:
            if n.port == port:
                return n
        raise KeyError("no node on port %s" % port)

    def start(self):
        deadline = time.monotonic() + self.timeout
        try:
            for n in self.nodes:
                n.start()
            argv = [REDIS_CLI, "--cluster", "create",
                    *["%s:%d" % (HOST, n.port) for n in self.nodes],
                    "--cluster-replicas", str(self.n_replicas), "--cluster-yes"]
            try:
                done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                      timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RedisLabError("redis-cli --cluster create took more than %.0f s"
                                    % self.timeout)
            if done.returncode != 0:
                raise RedisLabError("redis-cli --cluster create failed (%d):\n%s%s" % (
                    done.returncode, done.stdout.decode(errors="replace")[-LOG_TAIL:],
                    done.stderr.decode(errors="replace")[-LOG_TAIL:]))
            self.wait_ok(max(1.0, deadline - time.monotonic()), synced=True)
            return self
        except BaseException:
            self.stop()
            raise

    def stop(self):
        """Stop every node by pid (SIGTERM to all first, so they go down together)."""
        for n in self.nodes:
            if n.alive():
                try:
                    n.proc.send_signal(signal.SIGTERM)
                    n.proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
        errors = []
        for n in self.nodes:
            try:
                n.stop()
            except Exception as e:                   # stop the others whatever happens
                errors.append(e)
        if errors:
            raise errors[0]

    # -- what the cluster says --

    def _ask(self, *args, timeout=2.0):
        """The first live node's answer to a command (skipping nodes that do not answer)."""
        last = None
        for n in self.live():
            try:
                return n.command(*args, timeout=timeout)
            except TRANSIENT as e:
                last = e
        raise RedisLabError("no node of the cluster answers (%s)" % last)

    def slot_map(self, via=None):
        """[(start, end, master node, [replica nodes])] from CLUSTER SLOTS."""
        reply = via.command("CLUSTER", "SLOTS", timeout=2.0) if via else self._ask("CLUSTER", "SLOTS")
        ranges = []
        for start, end, master, *replicas in reply:
            ranges.append((start, end, self.node(master[1]), [self.node(r[1]) for r in replicas]))
        return sorted(ranges, key=lambda r: r[0])

    def masters(self):
        """Live nodes that serve slots, per the slot map (ordered by their first slot)."""
        seen = []
        for _, _, master, _ in self.slot_map():
            if master not in seen and master.alive():
                seen.append(master)
        return seen

    def replicas(self):
        """Live nodes that say they are replicas (ROLE)."""
        return [n for n in self.live() if n.role() == "slave"]

    def keyslot(self, key):
        return self._ask("CLUSTER", "KEYSLOT", key)

    def master_for_key(self, key):
        slot = self.keyslot(key)
        for start, end, master, _ in self.slot_map():
            if start <= slot <= end:
                return master
        raise RedisLabError("slot %d is served by no node" % slot)

    def cli(self, *args, timeout=COMMAND_TIMEOUT):
        """redis-cli -c (follows MOVED) against a live node: its output as text."""
        return self.live()[0].cli(*args, timeout=timeout, options=["-c"])

    def state(self):
        """{port: cluster_state} of every live node ('?' when it does not answer)."""
        states = {}
        for n in self.live():
            try:
                states[n.port] = n.cluster_info().get("cluster_state", "?")
            except TRANSIENT:
                states[n.port] = "?"
        return states

    def _settled(self, synced):
        for n in self.live():
            info = n.cluster_info()
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_assigned") != str(SLOTS):
                return False
        # Gossip takes a moment: a node may not know yet that another became a replica (it
        # still calls it a master without slots), or a restarted node may still believe in
        # its old slots.  All must agree, and every live node must be in the map.
        views = {tuple((s, e, m.port, tuple(sorted(r.port for r in reps)))
                       for s, e, m, reps in self.slot_map(via=n)) for n in self.live()}
        if len(views) != 1:
            return False
        mapped = {p for _, _, m, reps in views.pop() for p in (m, *reps)}
        if mapped != {n.port for n in self.live()}:
            return False
        if synced:
            for n in self.live():
                rep = _info(n.command("INFO", "replication", timeout=2.0))
                if rep.get("role") == "slave" and rep.get("master_link_status") != "up":
                    return False
        self._remember_slots()
        return True

    def _remember_slots(self, via=None):
        slots = {}
        for start, end, master, _ in self.slot_map(via):
            slots.setdefault(master.id, []).append((start, end))
        self._slots_of.update(slots)

    def wait_ok(self, timeout=CLUSTER_TIMEOUT, synced=False):
        """Until every live node says cluster_state:ok with all slots assigned (and, with
        ``synced``, every replica's link to its master is up)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._settled(synced):
                    return self
            except TRANSIENT as e:
                last = e                               # a node busy or down: ask again
            else:
                last = self.state()
            if time.monotonic() >= deadline:
                raise RedisLabError("the cluster did not settle within %.0f s (%s)" % (timeout, last))
            time.sleep(0.05)

    # -- failures --

    def kill(self, node):
        """SIGKILL one node (its slots, if a master's, are remembered for wait_failover)."""
        node = node if isinstance(node, ClusterNode) else self.node(node)
        try:
            self._remember_slots(via=next(n for n in self.live() if n is not node))
        except (StopIteration, *TRANSIENT):
            pass                                     # the map as last seen will do
        node.kill()

    def pause(self, node):
        """SIGSTOP one node: to the others it looks dead after the node timeout."""
        node = node if isinstance(node, ClusterNode) else self.node(node)
        self._remember_slots(via=next(n for n in self.live() if n is not node))
        node.pause()

    def wait_failover(self, old_master, timeout=30.0):
        """Until a replica of ``old_master`` serves its slots in every live node's view and
        every live node says cluster_state:ok.  Returns the new master."""
        old_master = old_master if isinstance(old_master, ClusterNode) else self.node(old_master)
        ranges = self._slots_of.get(old_master.id)
        if not ranges:
            raise RedisLabError("%r served no slots as far as the lab saw" % old_master)
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                new = self._failed_over(old_master, ranges[0][0])
                if new is not None:
                    self._slots_of[new.id] = ranges
                    return new
                last = self.state()
            except TRANSIENT as e:
                last = e
            if time.monotonic() >= deadline:
                raise RedisLabError("no failover of %r within %.0f s (%s)" % (old_master, timeout, last))
            time.sleep(0.05)

    def _failed_over(self, old_master, slot):
        new = None
        for n in self.live():
            if n is old_master:
                continue
            if n.cluster_info().get("cluster_state") != "ok":
                return None
            owner = [m for s, e, m, _ in self.slot_map(via=n) if s <= slot <= e]
            if not owner or owner[0] is old_master or (new is not None and owner[0] is not new):
                return None
            new = owner[0]
        if new is None or new.role() != "master":
            return None
        return new


def _main(argv):
    """Start a lab, show that it works, stop it (a manual check)."""
    cluster = "--cluster" in argv
    t0 = time.monotonic()
    lab = Cluster() if cluster else Standalone()
    with lab:
        print("started in %.1f s: %s" % (time.monotonic() - t0, " ".join(
            lab.urls if cluster else [lab.url])))
        if cluster:
            print(lab.cli("SET", "greeting", "hello"), lab.cli("GET", "greeting"))
            print("masters:", lab.masters(), "\nreplicas:", lab.replicas())
        else:
            print(lab.command("SET", "greeting", "hello"), lab.cli("GET", "greeting"))
    print("stopped")


if __name__ == "__main__":
    _main(sys.argv[1:])

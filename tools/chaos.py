#!/usr/bin/env python3
"""chaos: SIGKILL random MegaComet workers under load and count what subscribers lost.

It starts its own server (``megacomet.py --host 127.0.0.1 --port 0 --app-port 0``)
and, for --duration seconds:

* S subscribers (-n, in --procs child processes, asyncio) long-poll
  ``GET /sub/<id>?since=<last seq seen>&timeout=T`` over keep-alive
  connections, several per id; each re-polls at once after an answer and
  reconnects, with ``since``, after any error;
* HTTP publishers send ``POST /pub/<id>`` and NDJSON batches to ``POST /pub``:
  a 202 confirms a message; a 503 or a broken connection leaves it
  unconfirmed (never retried: a retried message can be stored twice);
* binary publishers send ``0x02 <id> 0x00 <data> 0x00`` frames
  (fire-and-forget, so "sent", never "confirmed"), reconnecting on error;
* every --kill-every seconds a random worker (pid from /stats) gets SIGKILL,
  and the time until /stats shows its successor's pid is measured.

Every message's data is a unique token ``<kind><publisher>.<counter>``.  When
publishing stops, subscribers drain until nothing more arrives, and every
CONFIRMED message is checked against every subscriber of its id that was
polling before the message was published:

    lost          that subscriber never received it
    duplicated    one subscriber received it twice
    out of order  one subscriber saw seq decrease, or one publisher's confirmed
                  messages arrive in another order than they were confirmed

Exit status 0 only when all three are 0, every killed worker came back, no
poll or publish hung, and every subscriber saw the seq its publisher was told.
Binary ("sent") messages are reported on their own line.  Optional compat
readers (--compat: ``GET /<id>.js``, one reader per id, a new connection per
message) must get each confirmed message of their id exactly once, in
publish order; they count in the verdict when asked for.

Rates stay within what the server buffers: at the default --rate an id gets
about 1 message/s (rate / ids), and the server runs with --max-queued 256 so
that a subscriber whose reconnect takes long still finds its backlog.
Subscribers beyond 20 000 bind 127.0.0.2, 127.0.0.3, ... (ephemeral ports
per source address), and a child process holds at most 15 000 (fd limit).

It must never send traffic off loopback, never retry a publish, never signal
a process that is not a worker of the server it started, and never leave a
process behind: the server's tree is stopped by pid (then its process
group) on any exit, Ctrl-C and SIGTERM included; the server gets SIGTERM and
the children SIGKILL should this tool itself be killed (PR_SET_PDEATHSIG).
Every wait is bounded.

Standard library only.  tools/soak.py borrows its server and HTTP helpers.

    python tools/chaos.py                      # 3000 subscribers, 60 s, a kill every 3 s
    python tools/chaos.py -n 300 --workers 2 --duration 15 --json chaos.json

Cluster mode (``--cluster``): a Redis Cluster of 3 masters and 3 replicas
(tools/redislab.py: redis-server, redis-cli and hiredis) and --nodes MegaComet
nodes (3) with ``--redis``, for --duration seconds:

* subscribers, long-poll and WebSocket (--ws-share), keep each id's cursor and
  epoch as the README says and move to another node with them every
  --move-every seconds or so, and at once when their node fails them;
* publishers (single POSTs, NDJSON batches) send each message with its own
  Idempotency-Key (``key`` in a batch line) and retry a 503, or a node that
  does not answer (on another node), with the same key for up to 30 s;
* every --action-every seconds, in turn (--actions): ``node`` SIGKILLs a node's
  supervisor and workers by pid and starts it again on its ports 1.5 s later;
  ``master`` SIGKILLs a Redis master and, once its replica took over, starts
  it again (it comes back as a replica); ``pubsub`` runs CLIENT KILL TYPE
  pubsub on every master; ``lagging-master`` is ``master`` with the replica
  paused and its replication link killed --lag seconds first, the window of
  asynchronous replication that loopback never opens by itself.

Among CONFIRMED messages, lost / duplicated (within one epoch) / out of order
(a seq not above the one before it in its epoch) must be 0 / 0 / 0, no seq may
differ from what its 202 said, and no poll or publish may hang.  A confirmed
message missing from Redis's streams at the end was lost by Redis in a
failover: with --redis-wait-replicas 1 it counts as lost; without, it is
reported apart as the asynchronous replication window.  Nodes, Redis servers
and subscriber processes are all stopped by pid on any exit.

    python tools/chaos.py --cluster                          # 300 subscribers, 60 s
    python tools/chaos.py --cluster --redis-wait-replicas 1 --actions node,master,pubsub
"""

import argparse
import asyncio
import base64
import collections
import ctypes
import json
import math
import multiprocessing
import os
import random
import signal
import statistics
import sys
import tempfile
import time

# launch (beside this file) is how the tests and tools start a server and stop it.
from launch import MEGACOMET, ROOT, children_of, launch
from launch import stop as stop_tree

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1
SOURCE_SPAN = 20000          # connections per loopback source address (about 28 000 ports each)
PROC_SPAN = 15000            # subscriber connections per child process (fd limit 20 000)
CONNECT_TIMEOUT = 5.0
CONNECTS_IN_FLIGHT = 256     # per child: a burst of SYNs past the accept backlog only costs retries
PUBLISH_TIMEOUT = 10.0       # the server answers 503 after 3 s without progress: 10 s is a hang
START_TIMEOUT = 30.0
STOP_GRACE = 8.0


# ---------------------------------------------------------------------------
# The server under test: started here, stopped here, whatever happens.

def set_pdeathsig(sig=signal.SIGKILL):
    """Get ``sig`` when the parent dies: nothing started here may outlive a killed coordinator."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def parent_of(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2:].split()[1])


class ServerTree:
    """One megacomet.py supervisor and its workers, in a session of their own.

    stop() is the way out; the process group is its last resort for workers
    the supervisor could not stop.
    """

    def __init__(self, workers, extra=()):
        self.workers = workers
        self.cmd = [sys.executable, MEGACOMET, "--workers", str(workers), "--host", HOST,
                    "--port", "0", "--app-port", "0", *map(str, extra)]
        self.proc = None
        self.log = tempfile.NamedTemporaryFile(prefix="megacomet-chaos-", suffix=".log", delete=False)
        self.client = self.app = None
        self.banner = ""

    def start(self):
        # Its own session keeps a terminal's Ctrl-C for us (we stop it in order); SIGTERM
        # on our death (even SIGKILL) makes it stop its workers rather than outlive us.
        started = launch(self.cmd, log=self.log.name, cwd=ROOT, timeout=START_TIMEOUT,
                         start_new_session=True,
                         preexec_fn=lambda: set_pdeathsig(signal.SIGTERM))
        self.proc, self.client, self.app, self.banner = (started.proc, started.client,
                                                         started.app, started.banner)
        return self

    def log_text(self):
        self.log.flush()
        with open(self.log.name, "rb") as f:
            return f.read().decode(errors="replace")

    def is_worker(self, pid):
        return self.proc is not None and pid > 0 and parent_of(pid) == self.proc.pid

    def tree_pids(self):
        return [self.proc.pid, *children_of(self.proc.pid)] if self.proc else []

    def stop(self):
        """SIGTERM the supervisor (it stops its workers), then SIGKILL whatever of the tree is
        left: its workers by pid, and the session we created for it (nobody else's)."""
        if self.proc is None:
            return
        stop_tree(self.proc, grace=STOP_GRACE, group=True)
        self.proc = None

    def discard_log(self):
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Minimal asyncio HTTP/1.1 (the server always sends Content-Length).

class HttpError(Exception):
    pass


async def read_response(reader):
    """(status, body, server closes) of one response."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        raise HttpError("not an HTTP response: %r" % head[:40])
    status = int(head[9:12])
    low = head.lower()
    k = low.find(b"\r\ncontent-length:")
    length = 0 if k < 0 else int(low[k + 17:low.find(b"\r\n", k + 17)])
    body = await reader.readexactly(length) if length else b""
    return status, body, b"\r\nconnection: close\r\n" in low


def build_request(method, path, body=None, close=False):
    head = "%s %s HTTP/1.1\r\nHost: localhost\r\n" % (method, path)
    if body is not None:
        head += "Content-Length: %d\r\n" % len(body)
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + (body or b"")


async def http_once(port, method, path, body=None, timeout=5.0):
    """One request on a connection of its own: (status, body); raises on error or timeout."""
    async def go():
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(build_request(method, path, body, close=True))
            status, rbody, _ = await read_response(reader)
            return status, rbody
        finally:
            writer.close()
    return await asyncio.wait_for(go(), timeout)


async def get_stats(port, timeout=2.0, attempts=5):
    """/stats as a dict, or None when it could not be had in a few tries."""
    for _ in range(attempts):
        try:
            status, body = await http_once(port, "GET", "/stats", timeout=timeout)
            if status == 200:
                return json.loads(body)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, HttpError, ValueError):
            pass
        await asyncio.sleep(0.05)
    return None


def error_name(e):
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    if isinstance(e, asyncio.IncompleteReadError):
        return "closed mid-response" if e.partial else "closed"
    return type(e).__name__


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(math.ceil(p / 100.0 * len(values))) - 1)]


# ---------------------------------------------------------------------------
# Subscribers: a child process runs a share of them on its own event loop.

class SubscriberGroup:
    """members: [(subscriber number, id, kind "sub"|"js", source address)].

    Talks to the coordinator over a multiprocessing pipe: sends
    ("progress", {...}) twice a second, then ("result", {...}) once it is
    told "stop".
    """

    def __init__(self, conn, cfg, members):
        self.conn = conn
        self.cfg = cfg
        self.members = members
        self.first = [0.0] * len(members)       # when each one's first poll was written
        self.got = [[] for _ in members]        # (seq or 0, data, receive time)
        self.counts = collections.Counter()
        self.deliveries = 0
        self.connected = 0

    def run(self):
        asyncio.run(self.main())

    async def main(self):
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_command():
            try:
                if self.conn.recv() == "stop":
                    stop.set()
            except (EOFError, OSError):
                stop.set()
        loop.add_reader(self.conn.fileno(), on_command)
        self.slots = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
        tasks = [asyncio.create_task(self.member_task(j)) for j in range(len(self.members))]
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            self.conn.send(("progress", {"polling": sum(1 for t in self.first if t),
                                         "connected": self.connected,
                                         "deliveries": self.deliveries}))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        loop.remove_reader(self.conn.fileno())
        self.conn.send(("result", {"members": [(m[0], self.first[j], self.got[j])
                                               for j, m in enumerate(self.members)],
                                   "counts": dict(self.counts), "deliveries": self.deliveries}))

    def member_task(self, j):
        """The coroutine that runs member j (by its kind)."""
        return self.compat(j) if self.members[j][2] == "js" else self.subscriber(j)

    async def connect(self, j):
        """A connection for member j, retried with a growing pause until it is cancelled."""
        cfg = self.cfg
        src = self.members[j][3]
        pause = 0.0
        while True:
            if pause:
                await asyncio.sleep(pause * (0.5 + random.random()))
            try:
                async with self.slots:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(HOST, cfg["port"],
                                                local_addr=(src, 0) if src != HOST else None),
                        CONNECT_TIMEOUT)
                self.counts["connects"] += 1
                return reader, writer
            except ConnectionRefusedError:
                self.counts["connect refused"] += 1
            except (OSError, asyncio.TimeoutError) as e:
                self.counts["connect " + error_name(e)] += 1
            pause = min(1.0, max(0.02, pause * 2))

    async def subscriber(self, j):
        ident = self.members[j][1]
        got = self.got[j]
        since = 0
        prefix = ("GET /sub/%s?timeout=%d&since=" % (ident, self.cfg["poll_timeout"])).encode()
        read_timeout = self.cfg["poll_timeout"] + 10.0
        while True:
            reader, writer = await self.connect(j)
            self.connected += 1
            try:
                while True:
                    writer.write(prefix + b"%d HTTP/1.1\r\nHost: chaos\r\n\r\n" % since)
                    if not self.first[j]:
                        self.first[j] = time.monotonic()
                    status, body, close = await asyncio.wait_for(read_response(reader), read_timeout)
                    if status != 200:
                        self.counts["poll status %d" % status] += 1
                        await asyncio.sleep(0.1)
                        break
                    doc = json.loads(body)
                    now = time.monotonic()
                    for m in doc["messages"]:
                        got.append((m["seq"], m["data"], now))
                    self.deliveries += len(doc["messages"])
                    if doc["last"] < since:
                        self.counts["last went back"] += 1
                    since = doc["last"]
                    self.counts["answers"] += 1
                    if close:
                        self.counts["server closed keep-alive"] += 1
                        break
            except asyncio.TimeoutError:
                self.counts["poll hung"] += 1             # held past its own timeout: a defect
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    HttpError, ValueError) as e:
                self.counts["poll " + error_name(e)] += 1
            finally:
                self.connected -= 1
                writer.close()
            self.counts["reconnects"] += 1

    async def compat(self, j):
        """GET /<id>.js: one message (or an empty script on timeout) per connection."""
        ident = self.members[j][1]
        got = self.got[j]
        request = ("GET /%s.js HTTP/1.1\r\nHost: chaos\r\n\r\n" % ident).encode()
        read_timeout = self.cfg["server_poll_timeout"] + 10.0
        while True:
            reader, writer = await self.connect(j)
            self.connected += 1
            try:
                writer.write(request)
                if not self.first[j]:
                    self.first[j] = time.monotonic()
                status, body, _ = await asyncio.wait_for(read_response(reader), read_timeout)
                if status == 200 and body:
                    got.append((0, body.decode(), time.monotonic()))
                    self.deliveries += 1
                elif status not in (200, 204):
                    self.counts["compat status %d" % status] += 1
                    await asyncio.sleep(0.1)
            except asyncio.TimeoutError:
                self.counts["compat hung"] += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    HttpError, ValueError) as e:
                self.counts["compat " + error_name(e)] += 1
            finally:
                self.connected -= 1
                writer.close()


def subscriber_child(conn, cfg, members):
    set_pdeathsig()
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the coordinator stops us, in order
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    random.seed(cfg["seed"] * 7919 + os.getpid())
    SubscriberGroup(conn, cfg, members).run()


# ---------------------------------------------------------------------------
# Publishers (in the coordinator's event loop).

class Message:
    """One published message, by its token."""

    __slots__ = ("ident", "kind", "pub", "counter", "sent", "status", "seq")

    def __init__(self, ident, kind, pub, counter, sent):
        self.ident, self.kind, self.pub, self.counter, self.sent = ident, kind, pub, counter, sent
        # pending -> ok (202) | unconfirmed (503) | error (no answer) | refused | sent (binary)
        self.status = "pending"
        self.seq = 0                 # known for a single POST only: its 202 says it


class Ledger:
    """Every message published (token -> Message), and the publishers' event counts."""

    def __init__(self):
        self.messages = {}
        self.counts = collections.Counter()

    def add(self, token, ident, kind, pub, counter, sent):
        self.messages[token] = Message(ident, kind, pub, counter, sent)

    def settle(self, tokens, status, seq=0):
        for token in tokens:
            m = self.messages[token]
            m.status = status
            if seq:
                m.seq = seq


class Publisher:
    """One HTTP (single or batch) or binary publisher at its own steady rate."""

    def __init__(self, kind, number, port, ids, rate, per_request, ledger, rng, stop):
        self.kind = kind                 # "s" single, "b" batch, "x" binary
        self.number = number
        self.port = port
        self.ids = ids
        self.interval = per_request / rate
        self.per_request = per_request
        self.ledger = ledger
        self.rng = rng
        self.stop = stop
        self.counter = 0
        self.reader = self.writer = None
        self.closed = None               # binary: an event set when the server closes the link

    def tokens(self, n):
        out = []
        now = time.monotonic()
        for _ in range(n):
            self.counter += 1
            token = "%s%d.%d" % (self.kind, self.number, self.counter)
            ident = self.rng.choice(self.ids)
            self.ledger.add(token, ident, self.kind, self.number, self.counter, now)
            out.append((token, ident))
        return out

    async def run(self):
        next_at = time.monotonic()
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if next_at > now:
                    try:
                        await asyncio.wait_for(self.stop.wait(), next_at - now)
                        break
                    except asyncio.TimeoutError:
                        pass
                next_at = max(next_at + self.interval, time.monotonic() - 1.0)   # no catch-up burst
                await self.publish()
        finally:
            self.drop()

    async def publish(self):
        """One request's worth (per_request messages), at its time."""
        if self.kind == "x":
            await self.send_binary()
        else:
            await self.send_http()

    def drop(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def connect(self):
        try:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(HOST, self.port), CONNECT_TIMEOUT)
            self.ledger.counts["publisher connects"] += 1
            return True
        except ConnectionRefusedError:
            self.ledger.counts["publisher connect refused"] += 1
        except (OSError, asyncio.TimeoutError) as e:
            self.ledger.counts["publisher connect " + error_name(e)] += 1
        await asyncio.sleep(0.05)
        return False

    async def send_http(self):
        if self.writer is None and not await self.connect():
            return
        items = self.tokens(self.per_request)
        tokens = [t for t, _ in items]
        if self.kind == "s":
            token, ident = items[0]
            request = build_request("POST", "/pub/" + ident, token.encode())
        else:
            body = "".join('{"id":"%s","data":"%s"}\n' % (ident, token) for token, ident in items)
            request = build_request("POST", "/pub", body.encode())
        ledger = self.ledger
        try:
            self.writer.write(request)
            status, body, close = await asyncio.wait_for(read_response(self.reader), PUBLISH_TIMEOUT)
        except asyncio.TimeoutError:
            ledger.counts["publish hung"] += 1
            ledger.settle(tokens, "error")
            self.drop()
            return
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, HttpError,
                ValueError) as e:
            ledger.counts["publish connection " + error_name(e)] += 1
            ledger.settle(tokens, "error")
            self.drop()
            return
        if status == 202:
            doc = json.loads(body)
            if self.kind == "s":
                ledger.settle(tokens, "ok", doc["seq"])
            else:
                refused = {e.get("line") for e in doc.get("errors") or ()}
                if refused:
                    ledger.counts["batch line errors"] += len(refused)
                ledger.settle([t for i, t in enumerate(tokens, 1) if i not in refused], "ok")
                ledger.settle([t for i, t in enumerate(tokens, 1) if i in refused], "refused")
        elif status == 503:
            ledger.counts["publish 503"] += 1
            ledger.settle(tokens, "unconfirmed")
        else:
            ledger.counts["publish status %d" % status] += 1
            ledger.settle(tokens, "refused")
        if close:
            self.drop()

    async def send_binary(self):
        if self.writer is None:
            if not await self.connect():
                return
            self.closed = asyncio.Event()
            asyncio.get_running_loop().create_task(self.watch(self.reader, self.closed))
        if self.closed.is_set():
            self.ledger.counts["binary link closed by server"] += 1
            self.drop()
            return
        items = self.tokens(self.per_request)
        try:
            self.writer.write(b"".join(b"\x02%s\x00%s\x00" % (ident.encode(), token.encode())
                                       for token, ident in items))
            await asyncio.wait_for(self.writer.drain(), PUBLISH_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as e:
            self.ledger.counts["binary " + error_name(e)] += 1
            self.ledger.settle([t for t, _ in items], "error")
            self.drop()
            return
        self.ledger.settle([t for t, _ in items], "sent")

    @staticmethod
    async def watch(reader, closed):
        """The server never writes on a binary link: anything read ends it."""
        try:
            await reader.read(1)
        except (OSError, asyncio.CancelledError):
            pass
        closed.set()


# ---------------------------------------------------------------------------
# The run.

class Chaos:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.server = None
        self.children = []          # (process, pipe)
        self.progress = {}
        self.kills = []             # dicts: index, pid, at, restart_s, new_pid
        self.ledger = Ledger()
        self.notes = []
        self.server_pids = set()    # supervisor and every worker seen: all must be gone at the end

    # -- set-up (before any event loop: children are forked) --------------------
    def layout(self):
        a = self.args
        n_ids = max(1, a.ids or a.subscribers // 10)
        self.ids = ["chaos-%d" % k for k in range(n_ids)]
        # One compat reader per id: the compat cursor is shared by an id's readers, so with
        # two, a message can go to both (held at once) or to neither one's own count.
        self.js_ids = ["chaosjs-%d" % k for k in range(a.compat)]
        members = []
        for j in range(a.subscribers):
            src = "127.0.0.%d" % (1 + j // SOURCE_SPAN)
            members.append((j, self.ids[j % n_ids], "sub", src))
        for k in range(a.compat):
            members.append((a.subscribers + k, self.js_ids[k], "js", HOST))
        self.members = members
        procs = a.procs or max(1, math.ceil(len(members) / PROC_SPAN))
        return [members[c::procs] for c in range(procs)]

    def child_config(self):
        """(function, cfg) each subscriber child runs with its share."""
        return subscriber_child, {"port": self.server.client, "poll_timeout": self.args.poll_timeout,
                                  "server_poll_timeout": 30, "seed": self.args.seed}

    def fork_children(self, shares):
        ctx = multiprocessing.get_context("fork")
        target, cfg = self.child_config()
        for share in shares:
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=target, args=(theirs, cfg, share), daemon=True)
            proc.start()
            theirs.close()
            self.children.append((proc, ours))

    def stop_children(self):
        for proc, conn in self.children:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            conn.close()
        self.children = []

    # -- the coordinator's loop ----------------------------------------------------
    async def run(self):
        a = self.args
        loop = asyncio.get_running_loop()
        results = {}
        for c, (_, conn) in enumerate(self.children):
            loop.add_reader(conn.fileno(), self.on_child, c, conn, results)
        total = len(self.members)
        # Every subscriber polling, and held by the server, before the first publish.
        await self.wait_until(lambda: self.total("polling") >= total, 60, "every subscriber polling")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            stats = await get_stats(self.server.app)
            if stats:
                self.server_pids.update(w["pid"] for w in stats["workers"] if w["pid"])
            if stats and stats["totals"]["subscribers"] >= total:
                break
            await asyncio.sleep(0.1)
        else:
            self.notes.append("only %s of %d polls held before publishing"
                              % (stats and stats["totals"]["subscribers"], total))
        self.setup_s = time.monotonic() - self.started
        self.t0 = time.monotonic()
        stop = asyncio.Event()
        publishers = self.make_publishers(stop)
        tasks = [asyncio.create_task(p.run()) for p in publishers]
        killer = asyncio.create_task(self.killer(self.t0 + a.duration))
        await asyncio.sleep(a.duration)
        stop.set()
        await asyncio.wait(tasks, timeout=PUBLISH_TIMEOUT + 2)
        for t in tasks:
            t.cancel()
        await asyncio.wait_for(killer, 15)
        self.publish_end = time.monotonic()
        await self.drain()
        self.final_stats = await get_stats(self.server.app)
        await self.collect(results)
        self.analysis = analyse(self)
        self.buffered = await self.buffered_of_lost()

    async def drain(self):
        """At least --drain-min seconds after publish_end, then until deliveries stop
        growing for 2 s (--drain-max at the most)."""
        a = self.args
        last, stable_since = -1, time.monotonic()
        while time.monotonic() - self.publish_end < a.drain_max:
            now = time.monotonic()
            d = self.total("deliveries")
            if d != last:
                last, stable_since = d, now
            elif now - stable_since >= 2.0 and now - self.publish_end >= a.drain_min:
                break
            await asyncio.sleep(0.25)
        self.drain_s = time.monotonic() - self.publish_end

    async def collect(self, results):
        """Tells the subscriber children to stop; self.results: what they report."""
        for _, conn in self.children:
            conn.send("stop")
        await self.wait_until(lambda: len(results) == len(self.children), 60, "subscriber results")
        loop = asyncio.get_running_loop()
        for _, conn in self.children:
            loop.remove_reader(conn.fileno())
        self.results = [results[c] for c in range(len(self.children))]

    def on_child(self, c, conn, results):
        try:
            kind, body = conn.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())
            return
        if kind == "progress":
            self.progress[c] = body
        else:
            results[c] = body

    def total(self, key):
        return sum(p.get(key, 0) for p in self.progress.values())

    async def wait_until(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError("timed out after %d s waiting for %s" % (timeout, what))
            if any(not proc.is_alive() for proc, _ in self.children):
                raise RuntimeError("a subscriber process died")
            await asyncio.sleep(0.1)

    def make_publishers(self, stop):
        a = self.args
        ids = self.ids + self.js_ids
        out = []
        shares = (("s", a.single, 1), ("b", a.batch, a.batch_size), ("x", a.binary, 5))
        weights = sum(n for _, n, _ in shares)
        for kind, count, per_request in shares:
            for k in range(count):
                rate = a.rate / weights          # each publisher's share of the messages/s
                out.append(Publisher(kind, k, self.server.app, ids, rate, per_request, self.ledger,
                                     random.Random(self.rng.random()), stop))
        return out

    async def killer(self, until):
        a = self.args
        next_at = self.t0 + a.kill_every
        while next_at < until:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            index = self.rng.randrange(a.workers)
            stats = await get_stats(self.server.app)
            pid = stats and stats["workers"][index]["pid"]
            if not pid or not self.server.is_worker(pid):
                self.notes.append("kill at %.1f s skipped: worker %d pid %r" % (
                    time.monotonic() - self.t0, index, pid))
                next_at += 1.0
                continue
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            kill = {"index": index, "pid": pid, "at": killed - self.t0, "restart_s": None}
            self.kills.append(kill)
            while time.monotonic() - killed < 10:
                await asyncio.sleep(0.01)
                stats = await get_stats(self.server.app, timeout=1.0, attempts=1)
                new = stats and stats["workers"][index]["pid"]
                if new and new != pid:
                    kill["restart_s"] = time.monotonic() - killed
                    kill["new_pid"] = new
                    self.server_pids.add(new)
                    break
            restarted = time.monotonic()
            # The supervisor backs off for a worker that dies within 1 s of its start.
            next_at = max(killed + a.kill_every, restarted + 1.1)

    async def buffered_of_lost(self):
        """For a few ids with lost messages: what the server still buffers (was it stored at all?)."""
        out = {}
        for ident in sorted({e["id"] for e in self.analysis["lost_examples"]})[:10]:
            try:
                status, body = await http_once(self.server.client, "GET",
                                               "/sub/%s?since=0&timeout=1" % ident, timeout=5)
                doc = json.loads(body)
                out[ident] = {m["data"]: m["seq"] for m in doc["messages"]}
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, HttpError, ValueError):
                pass
        return out


# ---------------------------------------------------------------------------
# The verdict.

def near_kill(kills, t, before=0.5, after=1.0):
    """The kill whose window [kill - before, restart + after] holds t (seconds from t0), or None."""
    for k in kills:
        end = k["at"] + (k["restart_s"] or 10.0)
        if k["at"] - before <= t <= end + after:
            return k
    return None


def analyse(chaos):
    """Check every subscriber's deliveries against the ledger; counts and a few examples."""
    messages = chaos.ledger.messages
    t0 = chaos.t0
    by_id = collections.defaultdict(list)      # id -> its tokens
    for token, m in messages.items():
        by_id[m.ident].append(token)
    c = collections.Counter()
    lost_examples, dup_examples, ooo_examples = [], [], []
    latencies = []
    seq_of = {}                                # token -> the seq the first subscriber saw
    for result in chaos.results:
        for number, first, got in result["members"]:
            _, ident, kind, _ = chaos.members[number]
            js = kind == "js"                  # one compat reader per id: the cursor's only reader
            prefix = "compat " if js else ""
            seen = collections.Counter()
            last_seq = 0
            last_counter = {}                  # publisher -> highest counter seen of those it settled
            for seq, data, at in got:
                m = messages.get(data)
                if m is None:
                    c[prefix + "foreign"] += 1
                    continue
                status = m.status
                group = prefix + ("confirmed" if status == "ok" else
                                  "binary" if m.kind == "x" else "unconfirmed")
                seen[data] += 1
                if seen[data] > 1:
                    c[group + " duplicated"] += 1
                    if status == "ok" and len(dup_examples) < 10:
                        dup_examples.append({"id": ident, "token": data, "subscriber": number,
                                             "seq": seq})
                    continue
                if status == "ok" and not js:
                    latencies.append(at - m.sent)
                if not js:
                    if m.seq and m.seq != seq or seq_of.setdefault(data, seq) != seq:
                        c["seq mismatch"] += 1
                    if seq <= last_seq:
                        c[group + " out of order"] += 1
                        if len(ooo_examples) < 10:
                            ooo_examples.append({"id": ident, "token": data, "subscriber": number,
                                                 "seq": seq, "after seq": last_seq})
                    last_seq = max(last_seq, seq)
                if status in ("ok", "sent"):   # one publisher's settled messages keep its order
                    key = m.kind, m.pub
                    if m.counter < last_counter.get(key, 0):
                        c[group + " out of order"] += 1
                        if len(ooo_examples) < 10:
                            ooo_examples.append({"id": ident, "token": data, "subscriber": number,
                                                 "seq": seq, "after counter": last_counter[key]})
                    last_counter[key] = max(last_counter.get(key, 0), m.counter)
            for token in by_id.get(ident, ()):
                m = messages[token]
                if not first or m.sent <= first or seen[token]:
                    continue                   # published before it polled, or received
                if m.status == "ok":
                    c[prefix + "confirmed lost"] += 1
                    if len(lost_examples) < 20:
                        t = m.sent - t0
                        k = near_kill(chaos.kills, t)
                        lost_examples.append({
                            "id": ident, "token": token, "subscriber": number, "kind": kind,
                            "published_at_s": round(t, 3), "seq": m.seq or seq_of.get(token),
                            "near_kill": k and {"worker": k["index"], "at_s": round(k["at"], 3)}})
                elif m.status == "sent":
                    c[prefix + "binary missing"] += 1
                    if near_kill(chaos.kills, m.sent - t0) is None:
                        c[prefix + "binary missing far from a kill"] += 1
    return {"counts": c, "lost_examples": lost_examples, "dup_examples": dup_examples,
            "ooo_examples": ooo_examples, "latencies": latencies}


def summarise(chaos):
    a = chaos.args
    an = chaos.analysis
    c = an["counts"]
    status = collections.Counter((m.kind, m.status) for m in chaos.ledger.messages.values())
    sub_counts = collections.Counter()
    deliveries = 0
    for r in chaos.results:
        sub_counts.update(r["counts"])
        deliveries += r["deliveries"]
    restarts = [k["restart_s"] for k in chaos.kills if k["restart_s"] is not None]
    lat = an["latencies"]
    hung = sub_counts["poll hung"] + sub_counts["compat hung"] + chaos.ledger.counts["publish hung"]
    lost = c["confirmed lost"] + (c["compat confirmed lost"] if a.compat else 0)
    dup = c["confirmed duplicated"] + (c["compat confirmed duplicated"] if a.compat else 0)
    ooo = c["confirmed out of order"] + (c["compat confirmed out of order"] if a.compat else 0)
    not_restarted = sum(1 for k in chaos.kills if k["restart_s"] is None)
    ok = lost == dup == ooo == 0 and not hung and not not_restarted and c["seq mismatch"] == 0
    totals = (chaos.final_stats or {}).get("totals", {})
    # The supervisor counts restarts (newer servers): more than our kills means a worker was
    # also replaced for another reason, e.g. its loop stopped turning.
    restarts_counted = sum(w.get("restarts", 0) for w in (chaos.final_stats or {}).get("workers", ()))
    rec = {
        "ok": ok, "lost": lost, "duplicated": dup, "out_of_order": ooo,
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "config": {"subscribers": a.subscribers, "ids": len(chaos.ids), "compat_readers": a.compat,
                   "workers": a.workers, "duration_s": a.duration, "kill_every_s": a.kill_every,
                   "rate": a.rate, "seed": a.seed, "server": chaos.server.cmd[1:]},
        "setup_s": round(chaos.setup_s, 2), "drain_s": round(chaos.drain_s, 2),
        "kills": chaos.kills, "server_restarts": restarts_counted,
        "restart_s": {"n": len(restarts),
                      "min": min(restarts) if restarts else None,
                      "median": statistics.median(restarts) if restarts else None,
                      "max": max(restarts) if restarts else None,
                      "not_restarted": not_restarted},
        "published": {
            "http_confirmed": status["s", "ok"] + status["b", "ok"],
            "single_confirmed": status["s", "ok"], "batch_confirmed": status["b", "ok"],
            "http_unconfirmed_503": status["s", "unconfirmed"] + status["b", "unconfirmed"],
            "http_connection_errors": status["s", "error"] + status["b", "error"],
            "http_refused": status["s", "refused"] + status["b", "refused"],
            "binary_sent": status["x", "sent"], "binary_errors": status["x", "error"],
            "requests_503": chaos.ledger.counts["publish 503"],
        },
        "deliveries": deliveries,
        "latency_s": {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                      "max": max(lat) if lat else None},
        "checks": dict(c),
        "hung": hung,
        "connection_refused": (sub_counts["connect refused"]
                               + chaos.ledger.counts["publisher connect refused"]),
        "subscriber_counts": dict(sub_counts), "publisher_counts": dict(chaos.ledger.counts),
        "server_totals": totals,
        "lost_examples": an["lost_examples"], "dup_examples": an["dup_examples"],
        "ooo_examples": an["ooo_examples"], "lost_buffered": chaos.buffered,
        "notes": chaos.notes,
        "server_pids": sorted(chaos.server_pids | {chaos.server.proc.pid}),
    }
    return rec


def fmt_s(v):
    return "-" if v is None else "%.3f" % v


def report(rec):
    p, r, c = rec["published"], rec["restart_s"], rec["checks"]
    cfg = rec["config"]
    lines = [
        "chaos: %d subscribers on %d ids%s, %d workers, %d s, a kill every %g s, seed %d" % (
            cfg["subscribers"], cfg["ids"],
            " + %d compat readers" % cfg["compat_readers"] if cfg["compat_readers"] else "",
            cfg["workers"], cfg["duration_s"], cfg["kill_every_s"], cfg["seed"]),
        "setup %.1f s, drain %.1f s" % (rec["setup_s"], rec["drain_s"]),
        "kills          %d; restart (kill -> new pid in /stats) min %s / median %s / max %s s%s" % (
            len(rec["kills"]), fmt_s(r["min"]), fmt_s(r["median"]), fmt_s(r["max"]),
            "; NOT restarted: %d" % r["not_restarted"] if r["not_restarted"] else ""),
        "               the server counted %d restarts" % rec["server_restarts"],
        "published      http confirmed %d (single %d, batch %d); unconfirmed: 503 %d msgs in %d "
        "requests, connection errors %d, refused %d" % (
            p["http_confirmed"], p["single_confirmed"], p["batch_confirmed"], p["http_unconfirmed_503"],
            p["requests_503"], p["http_connection_errors"], p["http_refused"]),
        "               binary sent %d, write errors %d" % (p["binary_sent"], p["binary_errors"]),
        "deliveries     %d; latency of confirmed p50 %s / p99 %s / max %s s" % (
            rec["deliveries"], fmt_s(rec["latency_s"]["p50"]), fmt_s(rec["latency_s"]["p99"]),
            fmt_s(rec["latency_s"]["max"])),
        "CONFIRMED      lost %d, duplicated %d, out of order %d" % (rec["lost"], rec["duplicated"],
                                                                    rec["out_of_order"]),
        "unconfirmed    duplicated %d, out of order %d (not in the verdict)" % (
            c.get("unconfirmed duplicated", 0), c.get("unconfirmed out of order", 0)),
        "binary (sent)  missing %d (far from a kill %d), duplicated %d, out of order %d" % (
            c.get("binary missing", 0), c.get("binary missing far from a kill", 0),
            c.get("binary duplicated", 0), c.get("binary out of order", 0)),
    ]
    if cfg["compat_readers"]:
        lines.append("compat (.js)   confirmed lost %d, duplicated %d, out of order %d; "
                     "binary missing %d (far from a kill %d), duplicated %d" % (
                         c.get("compat confirmed lost", 0), c.get("compat confirmed duplicated", 0),
                         c.get("compat confirmed out of order", 0), c.get("compat binary missing", 0),
                         c.get("compat binary missing far from a kill", 0),
                         c.get("compat binary duplicated", 0)))
    sc = rec["subscriber_counts"]
    lines.append("subscribers    connects %d, reconnects %d, connect refused %d, hung polls %d, "
                 "seq mismatch %d" % (
        sc.get("connects", 0), sc.get("reconnects", 0), sc.get("connect refused", 0),
        sc.get("poll hung", 0) + sc.get("compat hung", 0), c.get("seq mismatch", 0)))
    errs = {k: v for k, v in sorted(sc.items())
            if k.startswith(("poll ", "compat ", "connect ", "last"))}
    if errs:
        lines.append("               " + ", ".join("%s %d" % kv for kv in errs.items()))
    pc = {k: v for k, v in sorted(rec["publisher_counts"].items()) if k != "publisher connects"}
    if pc:
        lines.append("publishers     " + ", ".join("%s %d" % kv for kv in pc.items()))
    t = rec["server_totals"]
    if t:
        lines.append("server totals  " + ", ".join(
            "%s %d" % (k, t.get(k, 0))
            for k in ("received", "published", "delivered", "dropped", "expired", "connections")))
    for e in rec["lost_examples"][:10]:
        stored = rec["lost_buffered"].get(e["id"], {})
        lines.append("  lost: %s" % json.dumps(dict(e, still_buffered_as_seq=stored.get(e["token"]))))
    for e in rec["dup_examples"][:5]:
        lines.append("  duplicated: %s" % json.dumps(e))
    for e in rec["ooo_examples"][:5]:
        lines.append("  out of order: %s" % json.dumps(e))
    for n in rec["notes"]:
        lines.append("  note: " + n)
    lines.append("verdict        " + ("OK: 0 lost / 0 duplicated / 0 out of order" if rec["ok"]
                                      else "FAIL"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Cluster mode (--cluster): one Redis Cluster (tools/redislab.py), several nodes, clients
# that move between them, and nodes, masters and pub/sub links killed meanwhile.

CLUSTER_POLL_TIMEOUT = 5     # ?timeout= of each long-poll in cluster mode
CLUSTER_HEARTBEAT = 2        # the nodes' --heartbeat: a WebSocket hears something every 2 s
RETRY_FOR = 30.0             # seconds a publisher retries one message (503, no node) with its key
NODE_DOWN = 1.5              # seconds a killed node stays down before it is started again


def ws_frame(opcode, payload=b""):
    """One final, masked client frame (RFC 6455): what a client sends."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def ws_read_frame(reader):
    """(opcode, payload) of one server frame (never masked, never fragmented here)."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return b0 & 0x0F, await reader.readexactly(n) if n else b""


class ClusterSubscribers(SubscriberGroup):
    """members: [(number, id, kind "lp"|"ws")].  Each keeps its cursor and epoch as the
    README says (another epoch: the cursor is 0 before the answer's messages are taken),
    moves to another node every --move-every seconds or so, and at once when its node fails
    it.  Same pipe protocol as SubscriberGroup."""

    def __init__(self, conn, cfg, members):
        super().__init__(conn, cfg, members)      # got: (epoch, seq, data, receive time)
        self.rng = random.Random(cfg["seed"] * 7919 + os.getpid())

    def member_task(self, j):
        return self.websocket(j) if self.members[j][2] == "ws" else self.longpoll(j)

    def next_node(self, at):
        ports = self.cfg["ports"]
        return (at + self.rng.randrange(1, len(ports))) % len(ports) if len(ports) > 1 else at

    def move_at(self):
        return time.monotonic() + self.cfg["move_every"] * self.rng.uniform(0.5, 1.5)

    async def open(self, port):
        try:
            conn = await asyncio.wait_for(asyncio.open_connection(HOST, port), CONNECT_TIMEOUT)
            self.counts["connects"] += 1
            return conn
        except ConnectionRefusedError:
            self.counts["connect refused"] += 1
        except (OSError, asyncio.TimeoutError) as e:
            self.counts["connect " + error_name(e)] += 1
        return None

    async def connect(self, at):
        """(node index, reader, writer): node ``at``, or the next that accepts."""
        while True:
            conn = await self.open(self.cfg["ports"][at])
            if conn is not None:
                self.connected += 1
                return (at, *conn)
            at = self.next_node(at)
            await asyncio.sleep(self.rng.uniform(0.02, 0.1))

    def take(self, j, state, epoch, messages):
        """Rule 3 of the README's epochs; then the messages, in the epoch they count in."""
        if epoch and epoch != state["epoch"]:
            if state["epoch"]:
                self.counts["epoch changed"] += 1
            state["epoch"] = epoch
            state["since"] = 0
        now = time.monotonic()
        for seq, data in messages:
            self.got[j].append((state["epoch"], seq, data, now))
            state["since"] = seq
        self.deliveries += len(messages)

    async def longpoll(self, j):
        _, ident, _ = self.members[j]
        state = {"since": 0, "epoch": 0}
        at = j % len(self.cfg["ports"])
        timeout = CLUSTER_POLL_TIMEOUT
        while True:
            at, reader, writer = await self.connect(at)
            leave_at = self.move_at()
            try:
                while True:
                    path = "/sub/%s?timeout=%d&since=%d" % (ident, timeout, state["since"])
                    if state["epoch"]:
                        path += "&epoch=%d" % state["epoch"]
                    writer.write(build_request("GET", path))
                    if not self.first[j]:
                        self.first[j] = time.monotonic()
                    status, body, close = await asyncio.wait_for(read_response(reader),
                                                                 timeout + 10)
                    if status != 200:
                        self.counts["poll status %d" % status] += 1
                        await asyncio.sleep(0.1)
                        at = self.next_node(at)
                        break
                    doc = json.loads(body)
                    before = state["since"], state["epoch"]
                    self.take(j, state, doc["epoch"],
                              [(m["seq"], m["data"]) for m in doc["messages"]])
                    if doc["last"] < state["since"] or (
                            doc["last"] < before[0] and state["epoch"] == before[1]):
                        self.counts["last went back"] += 1
                    state["since"] = doc["last"]
                    self.counts["answers"] += 1
                    if close:
                        break
                    if time.monotonic() >= leave_at:
                        self.counts["moves"] += 1
                        at = self.next_node(at)
                        break
            except asyncio.TimeoutError:
                self.counts["poll hung"] += 1
                at = self.next_node(at)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    HttpError, ValueError) as e:
                self.counts["poll " + error_name(e)] += 1
                at = self.next_node(at)
            finally:
                self.connected -= 1
                writer.close()

    async def websocket(self, j):
        _, ident, _ = self.members[j]
        state = {"since": 0, "epoch": 0}
        at = j % len(self.cfg["ports"])
        quiet = CLUSTER_HEARTBEAT * 3 + 5        # the server pings every CLUSTER_HEARTBEAT s
        while True:
            at, reader, writer = await self.connect(at)
            port = self.cfg["ports"][at]
            leave_at = self.move_at()
            try:
                path = "/ws/%s?since=%d" % (ident, state["since"])
                if state["epoch"]:
                    path += "&epoch=%d" % state["epoch"]
                key = base64.b64encode(os.urandom(16)).decode()
                writer.write(("GET %s HTTP/1.1\r\nHost: localhost:%d\r\nUpgrade: websocket\r\n"
                              "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                              "Sec-WebSocket-Version: 13\r\n\r\n" % (path, port, key)).encode())
                if not self.first[j]:
                    self.first[j] = time.monotonic()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                if not head.startswith(b"HTTP/1.1 101"):
                    self.counts["ws status %s" % head[9:12].decode(errors="replace")] += 1
                    await asyncio.sleep(0.1)
                    at = self.next_node(at)
                    continue
                while True:
                    wait = min(quiet, max(0.0, leave_at - time.monotonic()))
                    try:
                        opcode, payload = await asyncio.wait_for(ws_read_frame(reader), wait)
                    except asyncio.TimeoutError:
                        if time.monotonic() < leave_at:
                            raise                   # nothing, not even a ping: hung
                        writer.write(ws_frame(0x8, (1000).to_bytes(2, "big")))
                        self.counts["moves"] += 1
                        at = self.next_node(at)
                        break
                    if opcode == 0x1:
                        frame = json.loads(payload)
                        self.take(j, state, frame["epoch"], [(frame["seq"], frame["data"])])
                    elif opcode == 0x9:
                        writer.write(ws_frame(0xA, payload))
                    elif opcode == 0x8:
                        self.counts["ws closed by the server"] += 1
                        at = self.next_node(at)
                        break
            except asyncio.TimeoutError:
                self.counts["ws hung"] += 1
                at = self.next_node(at)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError) as e:
                self.counts["ws " + error_name(e)] += 1
                at = self.next_node(at)
            finally:
                self.connected -= 1
                writer.close()


def cluster_subscriber_child(conn, cfg, members):
    set_pdeathsig()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ClusterSubscribers(conn, cfg, members).run()


class ClusterPublisher(Publisher):
    """Publishes unique tokens (each its own Idempotency-Key) to its ids, one request at a
    time: a single POST per message ("s"), or NDJSON batches whose lines carry ``key``
    ("b").  A 503, or no answer, is retried with the same keys (for RETRY_FOR seconds), on
    another node when its node does not answer; a message is confirmed once a 202 says so
    (a batch line: its request answered, the line not among its errors)."""

    def __init__(self, kind, number, ports, ids, rate, per_request, ledger, rng, stop):
        super().__init__(kind, number, None, ids, rate, per_request, ledger, rng, stop)
        self.ports = ports
        self.at = number % len(ports)

    async def publish(self):
        await self.send(self.tokens(self.per_request))

    async def request(self, raw):
        """(status, body) of one request on the publisher's connection; None on failure."""
        if self.writer is None:
            try:
                self.reader, self.writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, self.ports[self.at]), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as e:
                self.ledger.counts["publisher connect " + error_name(e)] += 1
                return None
        try:
            self.writer.write(raw)
            status, body, close = await asyncio.wait_for(read_response(self.reader),
                                                         PUBLISH_TIMEOUT)
        except asyncio.TimeoutError:
            self.ledger.counts["publish hung"] += 1
            self.drop()
            return None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, HttpError,
                ValueError) as e:
            self.ledger.counts["publish connection " + error_name(e)] += 1
            self.drop()
            return None
        if close:
            self.drop()
        return status, body

    async def send(self, items):
        """Until every item is confirmed or refused, or RETRY_FOR has passed."""
        ledger = self.ledger
        deadline = time.monotonic() + RETRY_FOR
        pending = list(items)
        tries = 0
        while pending:
            tries += 1
            if self.kind == "s":
                token, ident = pending[0]
                raw = (b"POST /pub/%s HTTP/1.1\r\nHost: localhost\r\nIdempotency-Key: %s\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (ident.encode(), token.encode(),
                                                          len(token), token.encode()))
            else:
                body = "".join('{"id":"%s","data":"%s","key":"%s"}\n' % (i, t, t)
                               for t, i in pending).encode()
                raw = build_request("POST", "/pub", body)
            answer = await self.request(raw)
            if answer is None:
                self.at = (self.at + 1) % len(self.ports)        # its node may be down
                status = None
            else:
                status, body = answer
            if status == 202 or (status == 503 and self.kind == "b" and body[:1] == b"{"):
                if self.kind == "s":
                    ledger.settle([pending[0][0]], "ok", json.loads(body)["seq"])
                    pending = []
                else:
                    doc = json.loads(body)
                    errors = {e["line"]: e["error"] for e in doc.get("errors") or ()}
                    again = []
                    for line, (token, ident) in enumerate(pending, 1):
                        error = errors.get(line)
                        if error is None:
                            ledger.settle([token], "ok")
                        elif error.startswith("redis unavailable"):
                            again.append((token, ident))
                        else:
                            ledger.counts["batch line error: %s" % error] += 1
                            ledger.settle([token], "refused")
                    pending = again
            elif status == 503:
                ledger.counts["publish 503"] += 1
            elif status is not None:
                ledger.counts["publish status %d" % status] += 1
                ledger.settle([t for t, _ in pending], "refused")
                return
            if pending:
                if status == 503:
                    ledger.counts["retried after 503"] += 1
                if time.monotonic() > deadline:
                    ledger.settle([t for t, _ in pending], "unconfirmed")
                    ledger.counts["gave up after %.0f s" % RETRY_FOR] += len(pending)
                    return
                await asyncio.sleep(self.rng.uniform(0.05, 0.25))
        if tries > 1:
            ledger.counts["confirmed after a retry"] += len(items)


class ClusterChaos(Chaos):
    """The coordinator: Redis Cluster, nodes, subscriber children, publishers, the killer."""

    def __init__(self, args):
        super().__init__(args)
        self.redis = None
        self.nodes = []              # ServerTree per node (the live one, restarted in place)
        self.ports = []              # (client, app) per node: a restarted node keeps its ports
        self.trees = []              # every ServerTree ever started (logs, clean-up)
        self.actions = []            # what the killer did, with its timings
        self.master_down = None      # a killed master not yet back as a replica
        self.node_down = set()       # indexes of nodes killed, not yet started again

    # -- set-up ------------------------------------------------------------------------------
    def layout(self):
        a = self.args
        n_ids = max(1, a.ids or a.subscribers // 5)
        self.ids = ["cc-%d" % k for k in range(n_ids)]
        ws = int(round(a.subscribers * a.ws_share))
        self.members = [(j, self.ids[j % n_ids], "ws" if j < ws else "lp")
                        for j in range(a.subscribers)]
        procs = a.procs or max(1, math.ceil(len(self.members) / 2000))
        return [self.members[c::procs] for c in range(procs)]

    def node_flags(self):
        a = self.args
        flags = []
        for url in self.redis.urls:
            flags += ["--redis", url]
        return flags + ["--redis-timeout", a.redis_timeout,
                        "--redis-wait-replicas", a.redis_wait_replicas,
                        "--max-queued", a.max_queued, "--queue-ttl", int(a.duration) + 300,
                        "--heartbeat", CLUSTER_HEARTBEAT]

    def start_node(self, index=None):
        extra = self.node_flags()
        if index is not None:
            client, app = self.ports[index]
            extra += ["--port", client, "--app-port", app]
        tree = ServerTree(self.args.workers, extra)
        self.trees.append(tree)
        tree.start()
        self.server_pids.add(tree.proc.pid)
        self.server_pids.update(children_of(tree.proc.pid))
        if index is None:
            self.nodes.append(tree)
            self.ports.append((tree.client, tree.app))
        else:
            self.nodes[index] = tree
        return tree

    def start(self):
        import redislab                        # (tools/: hiredis, redis-server, redis-cli)
        if not redislab.available():
            raise RuntimeError("redis-server and redis-cli are needed: apt-get install redis-server")
        if redislab.hiredis is None:
            raise RuntimeError("hiredis is needed: python3 -m pip install hiredis")
        self.redislab = redislab
        t = time.monotonic()
        self.redis = redislab.Cluster(masters=3, replicas=1)
        self.redis.start()
        for _ in range(self.args.nodes):
            self.start_node()
        self.setup_started = t

    def child_config(self):
        return cluster_subscriber_child, {"ports": [c for c, _ in self.ports],
                                          "seed": self.args.seed,
                                          "move_every": self.args.move_every}

    def stop(self):
        self.stop_children()
        for tree in self.trees:
            tree.stop()
        if self.redis is not None:
            self.redis.stop()

    # -- the run -----------------------------------------------------------------------------
    async def run(self):
        a = self.args
        loop = asyncio.get_running_loop()
        results = {}
        for c, (_, conn) in enumerate(self.children):
            loop.add_reader(conn.fileno(), self.on_child, c, conn, results)
        total = len(self.members)
        await self.wait_until(lambda: self.total("polling") >= total, 60,
                              "every subscriber connected")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            held = 0
            for tree in self.nodes:
                stats = await get_stats(tree.app)
                held += (stats or {}).get("totals", {}).get("connections", 0)
            if held >= total:
                break
            await asyncio.sleep(0.1)
        self.setup_s = time.monotonic() - self.setup_started
        self.t0 = time.monotonic()
        stop = asyncio.Event()
        publishers = []
        app_ports = [p for _, p in self.ports]
        weights = a.single + a.batch
        for kind, count, per_request in (("s", a.single, 1), ("b", a.batch, a.batch_size)):
            for k in range(count):
                publishers.append(ClusterPublisher(kind, k, app_ports, self.ids,
                                                   a.rate / weights, per_request, self.ledger,
                                                   random.Random(self.rng.random()), stop))
        tasks = [asyncio.create_task(p.run()) for p in publishers]
        killer = asyncio.create_task(self.killer(self.t0 + a.duration))
        await asyncio.sleep(a.duration)
        stop.set()
        await asyncio.wait(tasks, timeout=RETRY_FOR + PUBLISH_TIMEOUT + 5)
        for t in tasks:
            t.cancel()
        await asyncio.wait_for(killer, 90)
        await self.recover()
        self.publish_end = time.monotonic()
        await self.drain()
        self.final_stats = [await get_stats(tree.app) for tree in self.nodes]
        await self.collect(results)
        self.kept = await asyncio.to_thread(self.streams)

    async def killer(self, until):
        a = self.args
        cycle = [k for k in a.actions.split(",") if k]
        n = 0
        next_at = self.t0 + min(a.action_every, 2.0)
        pending = []
        while next_at < until - 0.5:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            kind = cycle[n % len(cycle)]
            n += 1
            action = {"kind": kind, "at": round(time.monotonic() - self.t0, 3)}
            try:
                if kind == "node":
                    pending.append(asyncio.create_task(self.kill_node(action)))
                elif kind in ("master", "lagging-master"):
                    if self.master_down is not None:
                        action["skipped"] = "a master is still down"
                    else:
                        pending.append(asyncio.create_task(self.kill_master(
                            action, a.lag if kind == "lagging-master" else 0.0)))
                elif kind == "pubsub":
                    action["killed"] = await asyncio.to_thread(self.kill_pubsub)
                else:
                    raise RuntimeError("unknown action %r (node, master, lagging-master, "
                                       "pubsub)" % kind)
            finally:
                self.actions.append(action)
            next_at += a.action_every
        if pending:
            await asyncio.wait(pending, timeout=80)

    # (Nodes and Redis servers started again from asyncio.to_thread get their death signal
    # when the thread that started them ends: the default executor's threads live until
    # asyncio.run returns, after everything is measured, and stop() follows.)

    async def kill_node(self, action):
        live = [i for i in range(len(self.nodes)) if i not in self.node_down]
        if len(live) < 2:
            action["skipped"] = "only one node is up"
            return
        index = self.rng.choice(live)
        tree = self.nodes[index]
        pids = [tree.proc.pid, *children_of(tree.proc.pid)]
        self.node_down.add(index)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed = time.monotonic()
        await asyncio.to_thread(tree.proc.wait, 10)
        action.update(node=index, pids=pids)
        await asyncio.sleep(NODE_DOWN)
        try:
            new = await asyncio.to_thread(self.start_node, index)
            action["restart_s"] = round(time.monotonic() - killed, 3)
            action["new_pid"] = new.proc.pid
        except Exception as e:                    # (StartError: reported, the run goes on)
            action["error"] = "restart failed: %s" % str(e)[:300]
        finally:
            self.node_down.discard(index)

    async def kill_master(self, action, lag=0.0):
        """SIGKILL a master; once a replica took over, start it again (a replica now).  With
        ``lag``, its replica is first paused and its replication link killed, and the master
        takes writes for ``lag`` seconds that no replica sees: on loopback a replica is never
        behind by more than microseconds, and this is the window a real network opens."""
        cluster = self.redis
        try:
            slots = await asyncio.to_thread(cluster.slot_map)
        except self.redislab.TRANSIENT as e:
            action["skipped"] = "no slot map: %s" % e
            return
        masters = {m: reps for _, _, m, reps in slots if m.alive() and reps}
        if not masters:
            action["skipped"] = "no master has a replica"
            return
        victim = self.rng.choice(sorted(masters, key=lambda m: m.port))
        self.master_down = victim
        action["port"] = victim.port
        killed = time.monotonic()
        try:
            if lag:
                replica = masters[victim][0]
                replica.pause()
                try:
                    await asyncio.to_thread(victim.command, "CLIENT", "KILL", "TYPE", "replica")
                    await asyncio.sleep(lag)
                    await asyncio.to_thread(cluster.kill, victim)
                finally:
                    replica.resume()
                action["lag_s"] = lag
                killed = time.monotonic()
            else:
                await asyncio.to_thread(cluster.kill, victim)
            await asyncio.to_thread(cluster.wait_failover, victim, 30)
            action["failover_s"] = round(time.monotonic() - killed, 3)
            # Back as a replica of the master that took over, once the cluster agrees.
            await asyncio.sleep(self.args.master_down)
            await asyncio.to_thread(victim.restart)
            await asyncio.to_thread(cluster.wait_ok, 30, True)
            action["back_as_replica_s"] = round(time.monotonic() - killed, 3)
        except Exception as e:
            action["error"] = "%s: %s" % (type(e).__name__, str(e)[:300])
        finally:
            self.master_down = None

    def kill_pubsub(self):
        """CLIENT KILL TYPE pubsub on every master: every node's channels on it drop."""
        killed = {}
        for m in self.redis.masters():
            try:
                killed[m.port] = m.command("CLIENT", "KILL", "TYPE", "pubsub", timeout=2)
            except self.redislab.TRANSIENT as e:
                killed[m.port] = "error: %s" % e
        return killed

    async def recover(self):
        """After the last action: every node and master back (the drain needs them)."""
        deadline = time.monotonic() + 60
        while (self.node_down or self.master_down is not None) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.node_down or self.master_down is not None:
            self.notes.append("not everything came back: nodes %s, master %s"
                              % (sorted(self.node_down), self.master_down))

    def streams(self):
        """{id: {token: seq}} of what Redis holds at the end (the masters' streams)."""
        kept = {}
        for ident in self.ids:
            try:
                master = self.redis.master_for_key("mc:{%s}:s" % ident)
                entries = master.command("XRANGE", "mc:{%s}:s" % ident, "-", "+", timeout=5)
            except self.redislab.TRANSIENT as e:
                self.notes.append("could not read the stream of %s: %s" % (ident, e))
                continue
            kept[ident] = {fields[1]: int(entry_id.split("-")[0]) for entry_id, fields in entries}
        return kept


def analyse_cluster(chaos):
    """Each subscriber against the ledger: among confirmed messages, lost (split: those Redis
    still holds, and those it lost, the asynchronous replication window), duplicated within
    an epoch, out of order (a seq not above the one before it in its epoch), seq mismatch
    (never had under the seq its 202 said)."""
    messages = chaos.ledger.messages
    by_id = collections.defaultdict(list)
    for token, m in messages.items():
        by_id[m.ident].append(token)
    c = collections.Counter()
    examples = collections.defaultdict(list)
    latencies = []
    members = {m[0]: m for m in chaos.members}
    for result in chaos.results:
        for number, first, got in result["members"]:
            _, ident, kind = members[number]
            seen = collections.Counter()
            received = set()
            last_seq = {}
            seqs_of = collections.defaultdict(set)
            for epoch, seq, data, at in got:
                m = messages.get(data)
                if m is None:
                    c["foreign"] += 1
                    continue
                group = "confirmed" if m.status == "ok" else "unconfirmed"
                seen[epoch, data] += 1
                if seen[epoch, data] > 1:
                    c[group + " duplicated"] += 1
                    if group == "confirmed" and len(examples["duplicated"]) < 10:
                        examples["duplicated"].append({"id": ident, "token": data, "seq": seq,
                                                       "subscriber": number, "kind": kind})
                    continue
                if data in received:
                    c["delivered again in a new epoch"] += 1
                elif m.status == "ok":
                    latencies.append(at - m.sent)
                received.add(data)
                if seq <= last_seq.get(epoch, 0):
                    c[group + " out of order"] += 1
                    if len(examples["out_of_order"]) < 10:
                        examples["out_of_order"].append({
                            "id": ident, "token": data, "seq": seq, "after": last_seq[epoch],
                            "subscriber": number, "kind": kind, "status": m.status})
                last_seq[epoch] = max(last_seq.get(epoch, 0), seq)
                if m.seq:
                    seqs_of[data].add(seq)
            # A single publish's 202 says its seq: the subscriber must have had it under that
            # seq (also under another, in an older epoch, when it was sent before a failover
            # lost it with its key, and stored again when retried).
            c["seq mismatch"] += sum(1 for data, seqs in seqs_of.items()
                                     if messages[data].seq not in seqs)
            kept = chaos.kept.get(ident)
            for token in by_id.get(ident, ()):
                m = messages[token]
                if m.status != "ok" or token in received or not first:
                    continue
                if kept is not None and token not in kept:
                    c["confirmed lost by Redis"] += 1
                    key = "lost by Redis"
                else:
                    c["confirmed lost"] += 1
                    key = "lost"
                if len(examples[key]) < 10:
                    examples[key].append({"id": ident, "token": token, "subscriber": number,
                                          "kind": kind, "seq": m.seq,
                                          "sent_at_s": round(m.sent - chaos.t0, 3),
                                          "redis_seq": (kept or {}).get(token)})
    return {"counts": c, "examples": dict(examples), "latencies": latencies}


def summarise_cluster(chaos):
    a = chaos.args
    an = analyse_cluster(chaos)
    c = an["counts"]
    status = collections.Counter((m.kind, m.status) for m in chaos.ledger.messages.values())
    sub_counts = collections.Counter()
    deliveries = 0
    for r in chaos.results:
        sub_counts.update(r["counts"])
        deliveries += r["deliveries"]
    waited = a.redis_wait_replicas > 0
    window = c["confirmed lost by Redis"]
    # Redis's own loss, whoever received those messages before it lost them.
    redis_lost = sum(1 for token, m in chaos.ledger.messages.items()
                     if m.status == "ok" and m.ident in chaos.kept
                     and token not in chaos.kept[m.ident])
    lost = c["confirmed lost"] + (window if waited else 0)
    dup = c["confirmed duplicated"]
    ooo = c["confirmed out of order"]
    hung = sub_counts["poll hung"] + sub_counts["ws hung"] + chaos.ledger.counts["publish hung"]
    failed_actions = [x for x in chaos.actions if "error" in x]
    done = collections.Counter(x["kind"] for x in chaos.actions if "skipped" not in x)
    lat = an["latencies"]
    totals = collections.Counter()
    for stats in chaos.final_stats:
        for k, v in ((stats or {}).get("totals") or {}).items():
            if isinstance(v, (int, float)):
                totals[k] += v
    ok = (lost == dup == ooo == 0 and not hung and c["seq mismatch"] == 0
          and not failed_actions and not chaos.notes)
    return {
        "ok": ok, "mode": "cluster", "lost": lost, "duplicated": dup, "out_of_order": ooo,
        "replication_window_lost": window, "counted_in_lost": waited,
        "confirmed_missing_from_redis": redis_lost,
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "config": {"subscribers": a.subscribers, "ids": len(chaos.ids),
                   "websockets": sum(1 for m in chaos.members if m[2] == "ws"),
                   "nodes": a.nodes, "workers": a.workers, "duration_s": a.duration,
                   "action_every_s": a.action_every, "actions": a.actions,
                   "move_every_s": a.move_every, "rate": a.rate, "seed": a.seed,
                   "redis_wait_replicas": a.redis_wait_replicas,
                   "redis_timeout": a.redis_timeout, "server": chaos.node_flags()},
        "setup_s": round(chaos.setup_s, 2), "drain_s": round(chaos.drain_s, 2),
        "actions": chaos.actions, "actions_done": dict(done),
        "published": {
            "confirmed": status["s", "ok"] + status["b", "ok"],
            "single_confirmed": status["s", "ok"], "batch_confirmed": status["b", "ok"],
            "unconfirmed": status["s", "unconfirmed"] + status["b", "unconfirmed"],
            "refused": status["s", "refused"] + status["b", "refused"],
            "pending": status["s", "pending"] + status["b", "pending"],
        },
        "deliveries": deliveries,
        "latency_s": {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                      "max": max(lat) if lat else None},
        "checks": dict(c), "hung": hung,
        "subscriber_counts": dict(sub_counts), "publisher_counts": dict(chaos.ledger.counts),
        "server_totals": {k: totals[k] for k in sorted(totals) if k.startswith("redis_")
                          or k in ("received", "published", "refused", "delivered")},
        "examples": an["examples"], "notes": chaos.notes,
        "server_pids": sorted(chaos.server_pids),
    }


def report_cluster(rec):
    cfg, p, c = rec["config"], rec["published"], rec["checks"]
    lines = [
        "chaos --cluster: %d subscribers (%d WebSocket) on %d ids, %d nodes x %d workers, "
        "Redis Cluster 3+3, %g s, an action every %g s (%s), --redis-wait-replicas %d, seed %d"
        % (cfg["subscribers"], cfg["websockets"], cfg["ids"], cfg["nodes"], cfg["workers"],
           cfg["duration_s"], cfg["action_every_s"], cfg["actions"],
           cfg["redis_wait_replicas"], cfg["seed"]),
        "setup %.1f s, drain %.1f s" % (rec["setup_s"], rec["drain_s"]),
    ]
    for x in rec["actions"]:
        detail = ", ".join("%s %s" % (k, v) for k, v in x.items()
                           if k not in ("kind", "at", "pids"))
        lines.append("action         %5.1f s  %-6s %s" % (x["at"], x["kind"], detail))
    lines += [
        "published      confirmed %d (single %d, batch %d); unconfirmed after %g s of retries "
        "%d, refused %d" % (p["confirmed"], p["single_confirmed"], p["batch_confirmed"],
                            RETRY_FOR, p["unconfirmed"], p["refused"]),
        "deliveries     %d; latency of confirmed p50 %s / p99 %s / max %s s" % (
            rec["deliveries"], fmt_s(rec["latency_s"]["p50"]), fmt_s(rec["latency_s"]["p99"]),
            fmt_s(rec["latency_s"]["max"])),
        "CONFIRMED      lost %d, duplicated %d, out of order %d" % (
            rec["lost"], rec["duplicated"], rec["out_of_order"]),
        "async replication window: confirmed messages Redis lost %d, of which subscribers "
        "missed %d (%s)" % (
            rec["confirmed_missing_from_redis"], rec["replication_window_lost"],
            "counted in lost: --redis-wait-replicas" if rec["counted_in_lost"]
            else "not counted in lost without --redis-wait-replicas"),
        "unconfirmed    duplicated %d, out of order %d (not in the verdict)" % (
            c.get("unconfirmed duplicated", 0), c.get("unconfirmed out of order", 0)),
        "seq mismatch %d, hung %d, epoch changes seen %d, delivered again in a new epoch %d" % (
            c.get("seq mismatch", 0), rec["hung"], rec["subscriber_counts"].get("epoch changed", 0),
            c.get("delivered again in a new epoch", 0)),
    ]
    sc = rec["subscriber_counts"]
    lines.append("subscribers    " + ", ".join("%s %d" % kv for kv in sorted(sc.items())))
    if rec["publisher_counts"]:
        lines.append("publishers     " + ", ".join(
            "%s %d" % kv for kv in sorted(rec["publisher_counts"].items())))
    lines.append("server totals  " + ", ".join("%s %d" % kv for kv in rec["server_totals"].items()))
    for key, found in rec["examples"].items():
        for e in found[:5]:
            lines.append("  %s: %s" % (key, json.dumps(e)))
    for n in rec["notes"]:
        lines.append("  note: " + n)
    lines.append("verdict        " + ("OK: 0 lost / 0 duplicated / 0 out of order"
                                      if rec["ok"] else "FAIL"))
    return "\n".join(lines)


def supervise(chaos, begin, conclude, clean_up):
    """Run one chaos (either mode): SIGTERM and Ctrl-C stop it, and whatever happens its
    children and servers are stopped.  ``begin`` starts the servers, ``conclude`` reports
    and returns the exit status, ``clean_up(code)`` stops the servers."""
    me = os.getpid()

    def on_signal(signum, frame):
        if os.getpid() == me:
            raise Interrupted(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, on_signal)
    code = 2
    try:
        shares = chaos.layout()
        begin()
        chaos.fork_children(shares)
        asyncio.run(chaos.run())
        code = conclude()
    except (KeyboardInterrupt, Interrupted) as e:
        print("chaos: stopped (%s)" % (str(e) or "Ctrl-C"), file=sys.stderr)
        code = 130
    except RuntimeError as e:
        print("chaos: %s" % e, file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)    # clean-up must not be cut short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        clean_up(code)
    return code


def write_json(path, rec):
    if path:
        with open(path, "w") as f:
            json.dump(rec, f, indent=1)


def keep_or_discard(args, code, what, tree):
    if args.keep_log or code == 1:
        print("chaos: %s log kept at %s" % (what, tree.log.name), file=sys.stderr)
    else:
        tree.discard_log()


def main_cluster(args):
    chaos = ClusterChaos(args)

    def conclude():
        rec = summarise_cluster(chaos)
        logs = "".join(tree.log_text() for tree in chaos.trees)
        rec["server_log_tracebacks"] = logs.count("Traceback") + logs.count("internal error")
        if rec["server_log_tracebacks"]:
            rec["ok"] = False
            rec["notes"].append("the nodes logged %d internal errors"
                                % rec["server_log_tracebacks"])
        print(report_cluster(rec), flush=True)
        if args.dump:
            with open(args.dump, "w") as f:
                json.dump({"t0": chaos.t0, "members": chaos.members, "results": chaos.results,
                           "kept": chaos.kept, "ledger": {
                               t: [m.ident, m.kind, m.pub, m.counter, m.sent, m.status, m.seq]
                               for t, m in chaos.ledger.messages.items()}}, f)
        write_json(args.json, rec)
        return 0 if rec["ok"] else 1

    def clean_up(code):
        chaos.stop()
        for tree in chaos.trees:
            keep_or_discard(args, code, "node", tree)

    return supervise(chaos, chaos.start, conclude, clean_up)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--subscribers", type=int, default=None,
                   help="long-poll subscribers (default 3000; --cluster: 300, some WebSocket)")
    p.add_argument("--ids", type=int, default=0, help="ids they share (default: subscribers / 10)")
    p.add_argument("--compat", type=int, default=0,
                   help="compat readers (GET /<id>.js), one per id of their own (default %(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of publishing and killing")
    p.add_argument("--kill-every", type=float, default=3.0, help="seconds between SIGKILLs")
    p.add_argument("--workers", type=int, default=None,
                   help="server workers (default 4; --cluster: 2 per node)")
    p.add_argument("--rate", type=float, default=300.0,
                   help="messages/s over all publishers (default %(default)s); per id it is rate/ids")
    p.add_argument("--single", type=int, default=3, help="POST /pub/<id> publishers")
    p.add_argument("--batch", type=int, default=3, help="POST /pub (NDJSON) publishers")
    p.add_argument("--batch-size", type=int, default=10, help="messages per batch")
    p.add_argument("--binary", type=int, default=2, help="binary-protocol publishers")
    p.add_argument("--poll-timeout", type=int, default=20, help="?timeout= of each long-poll")
    p.add_argument("--max-queued", type=int, default=None,
                   help="the server's --max-queued: the backlog a reconnecting subscriber can get "
                        "(default 256; --cluster: 100000, so that what Redis lost can be told)")
    p.add_argument("--procs", type=int, default=0,
                   help="subscriber processes (default: one per %d)" % PROC_SPAN)
    p.add_argument("--drain-min", type=float, default=3.0)
    p.add_argument("--drain-max", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the full record here")
    p.add_argument("--keep-log", action="store_true", help="keep the server's stderr log file")
    c = p.add_argument_group("cluster mode: a Redis Cluster (3 masters + 3 replicas, tools/redislab.py) "
                             "and several nodes with --redis; needs redis-server and hiredis")
    c.add_argument("--cluster", action="store_true",
                   help="run it (the options above apply but --compat, --binary, "
                        "--poll-timeout, --kill-every)")
    c.add_argument("--nodes", type=int, default=3, help="MegaComet nodes (default %(default)s)")
    c.add_argument("--redis-wait-replicas", type=int, default=0,
                   help="the nodes' --redis-wait-replicas: with 1, a message Redis lost in a "
                        "failover counts as lost; without, it is reported apart (default 0)")
    c.add_argument("--redis-timeout", type=float, default=1.0,
                   help="the nodes' --redis-timeout (default %(default)s)")
    c.add_argument("--ws-share", type=float, default=0.3,
                   help="the share of subscribers on WebSocket, the rest long-poll (default 0.3)")
    c.add_argument("--move-every", type=float, default=3.0,
                   help="seconds (+-50%%) a subscriber stays on a node before it moves on with "
                        "its cursor (default %(default)s)")
    c.add_argument("--action-every", type=float, default=3.0,
                   help="seconds between actions (default %(default)s)")
    c.add_argument("--actions", default="node,pubsub,master",
                   help="what is done in turn: node (SIGKILL a node, start it again %.1f s "
                        "later), master (SIGKILL a Redis master, start it again as a replica "
                        "after the failover), lagging-master (the same, its replica kept "
                        "behind for --lag s first: the asynchronous replication window), "
                        "pubsub (CLIENT KILL TYPE pubsub on every master); default "
                        "%%(default)s" % NODE_DOWN)
    c.add_argument("--lag", type=float, default=0.3,
                   help="lagging-master: seconds the master takes writes its paused replica "
                        "never sees before it is killed (default %(default)s)")
    c.add_argument("--dump", metavar="FILE",
                   help="write every subscriber's deliveries (epoch, seq, data, time), the "
                        "publishers' ledger and Redis's streams at the end here (JSON), to "
                        "look into a failure")
    c.add_argument("--master-down", type=float, default=1.0,
                   help="seconds a failed-over master stays down (default %(default)s)")
    args = p.parse_args(argv)
    cluster = args.cluster
    for name, one_box, in_cluster in (("subscribers", 3000, 300), ("workers", 4, 2),
                                      ("max_queued", 256, 100000)):
        if getattr(args, name) is None:
            setattr(args, name, in_cluster if cluster else one_box)
    if cluster and (args.nodes < 2 or not 0 <= args.ws_share <= 1 or args.move_every <= 0
                    or args.action_every <= 0):
        p.error("--cluster needs 2 or more nodes, a --ws-share in 0..1, positive --move-every "
                "and --action-every")
    if args.subscribers < 1 or args.workers < 1 or args.duration <= 0 or args.kill_every <= 0:
        p.error("subscribers, workers, duration and kill-every must be positive")
    if args.subscribers > SOURCE_SPAN * 250:
        p.error("at most %d subscribers" % (SOURCE_SPAN * 250))
    return args


class Interrupted(Exception):
    pass


def main(argv=None):
    args = parse_args(argv)
    if args.cluster:
        return main_cluster(args)
    chaos = Chaos(args)

    def begin():
        chaos.server = ServerTree(args.workers, ["--max-queued", args.max_queued]).start()
        chaos.started = time.monotonic()

    def conclude():
        rec = summarise(chaos)
        log = chaos.server.log_text()
        rec["server_log_tracebacks"] = log.count("Traceback") + log.count("internal error")
        print(report(rec), flush=True)
        write_json(args.json, rec)
        return 0 if rec["ok"] else 1

    def clean_up(code):
        chaos.stop_children()
        if chaos.server is not None:
            chaos.server.stop()
            keep_or_discard(args, code, "server", chaos.server)

    return supervise(chaos, begin, conclude, clean_up)


if __name__ == "__main__":
    sys.exit(main())

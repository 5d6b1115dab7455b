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
"""

import argparse
import asyncio
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
        tasks = [asyncio.create_task(self.compat(j) if kind == "js" else self.subscriber(j))
                 for j, (_, _, kind, _) in enumerate(self.members)]
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
                if self.kind == "x":
                    await self.send_binary()
                else:
                    await self.send_http()
        finally:
            self.drop()

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

    def fork_children(self, shares):
        ctx = multiprocessing.get_context("fork")
        cfg = {"port": self.server.client, "poll_timeout": self.args.poll_timeout,
               "server_poll_timeout": 30, "seed": self.args.seed}
        for share in shares:
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=subscriber_child, args=(theirs, cfg, share), daemon=True)
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
        # Drain: at least --drain-min seconds, then until deliveries stop growing for 2 s.
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
        self.final_stats = await get_stats(self.server.app)
        for _, conn in self.children:
            conn.send("stop")
        await self.wait_until(lambda: len(results) == len(self.children), 60, "subscriber results")
        for _, conn in self.children:
            loop.remove_reader(conn.fileno())
        self.results = [results[c] for c in range(len(self.children))]
        self.analysis = analyse(self)
        self.buffered = await self.buffered_of_lost()

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--subscribers", type=int, default=3000,
                   help="long-poll subscribers (default %(default)s)")
    p.add_argument("--ids", type=int, default=0, help="ids they share (default: subscribers / 10)")
    p.add_argument("--compat", type=int, default=0,
                   help="compat readers (GET /<id>.js), one per id of their own (default %(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of publishing and killing")
    p.add_argument("--kill-every", type=float, default=3.0, help="seconds between SIGKILLs")
    p.add_argument("--workers", type=int, default=4, help="server workers (default %(default)s)")
    p.add_argument("--rate", type=float, default=300.0,
                   help="messages/s over all publishers (default %(default)s); per id it is rate/ids")
    p.add_argument("--single", type=int, default=3, help="POST /pub/<id> publishers")
    p.add_argument("--batch", type=int, default=3, help="POST /pub (NDJSON) publishers")
    p.add_argument("--batch-size", type=int, default=10, help="messages per batch")
    p.add_argument("--binary", type=int, default=2, help="binary-protocol publishers")
    p.add_argument("--poll-timeout", type=int, default=20, help="?timeout= of each long-poll")
    p.add_argument("--max-queued", type=int, default=256,
                   help="the server's --max-queued: the backlog a reconnecting subscriber can get")
    p.add_argument("--procs", type=int, default=0,
                   help="subscriber processes (default: one per %d)" % PROC_SPAN)
    p.add_argument("--drain-min", type=float, default=3.0)
    p.add_argument("--drain-max", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the full record here")
    p.add_argument("--keep-log", action="store_true", help="keep the server's stderr log file")
    args = p.parse_args(argv)
    if args.subscribers < 1 or args.workers < 1 or args.duration <= 0 or args.kill_every <= 0:
        p.error("subscribers, workers, duration and kill-every must be positive")
    if args.subscribers > SOURCE_SPAN * 250:
        p.error("at most %d subscribers" % (SOURCE_SPAN * 250))
    return args


class Interrupted(Exception):
    pass


def main(argv=None):
    args = parse_args(argv)
    chaos = Chaos(args)
    me = os.getpid()

    def on_signal(signum, frame):
        if os.getpid() == me:
            raise Interrupted(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, on_signal)
    code = 2
    try:
        shares = chaos.layout()
        chaos.server = ServerTree(args.workers, ["--max-queued", args.max_queued]).start()
        chaos.started = time.monotonic()
        chaos.fork_children(shares)
        asyncio.run(chaos.run())
        rec = summarise(chaos)
        log = chaos.server.log_text()
        rec["server_log_tracebacks"] = log.count("Traceback") + log.count("internal error")
        print(report(rec), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rec, f, indent=1)
        code = 0 if rec["ok"] else 1
    except (KeyboardInterrupt, Interrupted) as e:
        print("chaos: stopped (%s)" % (str(e) or "Ctrl-C"), file=sys.stderr)
        code = 130
    except RuntimeError as e:
        print("chaos: %s" % e, file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)    # clean-up must not be cut short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        chaos.stop_children()
        if chaos.server is not None:
            chaos.server.stop()
            if args.keep_log or code == 1:
                print("chaos: server log kept at %s" % chaos.server.log.name, file=sys.stderr)
            else:
                chaos.server.discard_log()
    return code


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""megatest: load generator for MegaComet (and for peers that speak its HTTP API).

Opens N subscriber connections from P child processes, each a raw select.epoll
loop over non-blocking sockets bound to its own loopback source addresses
(127.0.0.2, 127.0.0.3, ...), and measures the server from the outside:

  hold     open N subscribers and hold them: open rate, server memory per
           connection (RSS and PSS from /proc/<pid>/smaps_rollup), CPU per accept
  deliver  N subscribers each on its own id; one message to each through the
           batch API, then (separate round) through the binary protocol: checks
           each got exactly its own message; deliveries/s, latency p50/p99/max
  fanout   N subscribers on one id, one publish: time until all have it
  queue    M messages to M absent ids (no subscribers): memory per queued
           message, then a sample of ids must drain with GET /sub/<id>
  churn    S subscribers re-polling with since=last after every delivery under
           a steady publish rate: sustained deliveries/s and latency
  resubscribe  (cluster mode) WebSockets of --ids-per-conn ids each, held; then
           Redis restarts (megatest prints "megatest: restart redis now" and
           waits for a line on stdin: bench's times, or Enter once done by hand)
           and a message to a sample of the ids must reach each subscriber: the
           time from the restart until they all have

Cluster mode (several nodes sharing a Redis): --publish-to [NAME=]PORT
publishes on another node's app port (repeatable: deliver and fanout run a
round per port, named deliver_single_NAME, fanout_NAME), and --redis-port PORT
(repeatable) measures that Redis with the server: its CPU, INFO commandstats
calls per publish, used_memory (queue: per message; --per-id K puts K messages
on each id, the first and the later ones counted apart) and channels.

Subscribers long-poll (--transport poll, the default) or, in hold, deliver and
fanout, open one stream each and keep it: an EventSource (--transport sse,
GET /sse/<id>) or a WebSocket (--transport ws, GET /ws/<id>), the same paths
with --proto nchan (bench configures a location with one subscriber type each). Every
transport checks each message the same way: its own id, this round, exactly
once, latency from the publish time it carries.

Server CPU: run time (schedstat; else utime+stime) of every server process (the
pids in /stats, --server-pid and its descendants), before and after a phase.
Traffic only goes to 127.0.0.0/8; every phase and the whole run are bounded
in time (--duration). Ctrl-C / SIGTERM stop every child.

Standard library only.
"""

import argparse
import array
import base64
import collections
import ctypes
import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import select
import signal
import socket
import struct
import sys
import threading
import time

IP_BIND_ADDRESS_NO_PORT = 24
PR_SET_PDEATHSIG = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_BATCH = 10000
MONO = time.monotonic_ns

# Connection states in a child.
PENDING, CONNECTING, OPEN, DEAD = 0, 1, 2, 3

TRANSPORTS = ("poll", "sse", "ws")
STREAM_MODES = ("hold", "deliver", "fanout")     # the modes a stream transport applies to
MODES = ("hold", "deliver", "fanout", "queue", "churn", "resubscribe")

# WebSocket (RFC 6455) opcodes, and the GUID of the handshake's accept key.
WS_CONT, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Stopped(Exception):
    """Raised in the coordinator on SIGINT/SIGTERM or when --duration runs out."""


# ---------------------------------------------------------------------------
# HTTP/1.1 response parsing shared by children and the coordinator.

def parse_response(data, pos):
    """Parse one response starting at data[pos].

    Returns None when incomplete, else (status, head, low, body, end): head
    the raw header block, low its lower-cased copy, end the offset after it.
    """
    he = data.find(b"\r\n\r\n", pos)
    if he < 0:
        return None
    head = data[pos:he]
    low = head.lower()
    status = int(head[9:12])
    bs = he + 4
    k = low.find(b"\r\ncontent-length:")
    if k >= 0:
        e = low.find(b"\r\n", k + 17)
        end = bs + int(low[k + 17:e if e >= 0 else len(low)])
        if end > len(data):
            return None
        return status, head, low, data[bs:end], end
    if b"\r\ntransfer-encoding:" in low and b"chunked" in low:
        body = bytearray()
        p = bs
        while True:
            le = data.find(b"\r\n", p)
            if le < 0:
                return None
            size = int(data[p:le].split(b";")[0], 16)
            p = le + 2
            if size == 0:
                while True:             # optional trailers, then an empty line
                    te = data.find(b"\r\n", p)
                    if te < 0:
                        return None
                    if te == p:
                        return status, head, low, bytes(body), te + 2
                    p = te + 2
            if p + size + 2 > len(data):
                return None
            body += data[p:p + size]
            p += size + 2
    if status in (204, 304) or 100 <= status < 200:
        return status, head, low, b"", bs
    raise ValueError("response without Content-Length or chunking: %r" % head[:80])


def header_value(head, low, name):
    """Value of header `name` (lower-case bytes) from a parsed head, or None."""
    k = low.find(b"\r\n" + name + b":")
    if k < 0:
        return None
    s = k + len(name) + 3
    e = low.find(b"\r\n", s)
    return head[s:e if e >= 0 else len(head)].strip()


def ws_client_frame(opcode, payload=b""):
    """One final frame masked as a client must send it; only control frames (<= 125 bytes)."""
    mask = os.urandom(4)
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return bytes((0x80 | opcode, 0x80 | n)) + mask + masked


class HttpConn:
    """A tiny blocking keep-alive HTTP/1.1 client (publisher, stats, drain)."""

    def __init__(self, host, port, timeout=30.0):
        self.addr = (host, port)
        self.timeout = timeout
        self.sock = None
        self.buf = b""

    def connect(self):
        self.close()
        self.sock = socket.create_connection(self.addr, timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    @staticmethod
    def build(method, path, body=None, headers=()):
        h = ["%s %s HTTP/1.1" % (method, path), "Host: localhost"]
        h.extend(headers)
        if body is not None:
            h.append("Content-Length: %d" % len(body))
        req = ("\r\n".join(h) + "\r\n\r\n").encode()
        return req + body if body is not None else req

    def read_one(self):
        while True:
            r = parse_response(self.buf, 0)
            if r is not None:
                self.buf = self.buf[r[4]:]
                return r[:4]
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk

    def pipeline(self, requests, attempts=3):
        """Send requests back to back; return their (status, head, low, body).

        When the server closes the connection part-way (Connection: close, or
        a keep-alive request limit such as nginx's keepalive_requests), the
        unanswered requests are sent again on a new connection."""
        out = []
        todo = list(requests)
        failures = 0
        while todo:
            if self.sock is None:
                self.connect()
            got = 0
            try:
                self.sock.sendall(b"".join(todo))
                while got < len(todo):
                    r = self.read_one()
                    out.append(r)
                    got += 1
                    if b"connection: close" in r[2]:
                        self.close()
                        break
            except (OSError, ValueError):
                self.close()
                failures = failures + 1 if not got else 0
                if failures >= attempts:
                    raise
            todo = todo[got:]
        return out

    def request(self, method, path, body=None, headers=(), attempts=3):
        req = self.build(method, path, body, headers)
        status, head, low, rbody = self.pipeline([req], attempts)[0]
        return status, rbody


class Publisher:
    """One publisher connection (HTTP keep-alive, or a binary-protocol stream).

    Each message is "<round>|<monotonic ns at send>|<id>", so a subscriber can
    check it got its own message and compute publish-to-receive latency; with a
    ``stamp`` (monotonic ns) the messages carry it instead of the send time, and the
    latency counts from it (resubscribe: from Redis's restart)."""

    def __init__(self, host, port, batch_size, pipeline=128):
        self.host, self.port = host, port
        self.window = max(1, pipeline)
        self.batch_size = min(batch_size, MAX_BATCH)
        self.http = HttpConn(host, port, timeout=60)
        self.bin = None
        self.done = 0          # messages handed to the server so far (progress)
        self.rate = 0.0        # single: messages/s on this connection (0: as fast as it goes)
        self.refused = []      # single: ids answered 503 (cluster mode: Redis did not confirm)

    def close(self):
        self.http.close()
        if self.bin is not None:
            # Fire-and-forget: half-close, then give the server a moment to read.
            try:
                self.bin.shutdown(socket.SHUT_WR)
                self.bin.settimeout(2.0)
                while self.bin.recv(65536):
                    pass
            except OSError:
                pass
            self.bin.close()
            self.bin = None

    def batch(self, ids, rnd, stamp=None):
        ok = 0
        errors = collections.Counter()
        size = self.batch_size
        for i in range(0, len(ids), size):
            part = ids[i:i + size]
            t = stamp or MONO()
            body = "".join(['{"id":"%s","data":"%d|%d|%s"}\n' % (x, rnd, t, x)
                            for x in part]).encode()
            try:
                status, rbody = self.http.request("POST", "/pub", body)
            except (OSError, ValueError) as e:
                errors["batch: " + repr(e)] += len(part)
                continue
            if status not in (200, 201, 202):
                errors["batch: http %d" % status] += len(part)
                continue
            try:
                r = json.loads(rbody)
                ok += int(r.get("published", 0))
                for e in r.get("errors") or ():
                    errors["batch: %s" % (e.get("error") if isinstance(e, dict) else e)] += 1
            except (ValueError, AttributeError, TypeError):
                errors["batch: bad answer"] += 1
            self.done += len(part)
        return ok, errors

    def binary(self, ids, rnd, stamp=None):
        if self.bin is None:
            self.bin = socket.create_connection((self.host, self.port), timeout=60)
        sent = 0
        for i in range(0, len(ids), 1000):
            part = ids[i:i + 1000]
            t = stamp or MONO()
            self.bin.sendall(b"".join([b"\x02%s\x00%d|%d|%s\x00" % (x.encode(), rnd, t, x.encode())
                                       for x in part]))
            sent += len(part)
            self.done += len(part)
        return sent, {}

    def single(self, ids, rnd, stamp=None):
        ok = 0
        errors = collections.Counter()
        window = self.window
        start = time.monotonic()
        for i in range(0, len(ids), window):
            if self.rate:            # paced: window i is sent no earlier than i/rate s in
                delay = start + i / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            t = stamp or MONO()
            part = ids[i:i + window]
            reqs = [HttpConn.build("POST", "/pub/" + x, ("%d|%d|%s" % (rnd, t, x)).encode())
                    for x in part]
            try:
                for x, (status, _, _, _) in zip(part, self.http.pipeline(reqs)):
                    if status in (200, 201, 202):
                        ok += 1
                    else:
                        errors["single: http %d" % status] += 1
                        if status == 503:
                            self.refused.append(x)
            except (OSError, ValueError) as e:
                errors["single: " + repr(e)] += len(reqs)
            self.done += len(reqs)
        return ok, errors


# ---------------------------------------------------------------------------
# Server process accounting.

def descendants(pid):
    """pid's descendants (scan of /proc)."""
    children = collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        children[int(fields[1])].append(int(name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out


def cpu_by_pid(pids):
    """{pid: CPU seconds}; missing pids are skipped.

    The scheduler's run time of each of the process's threads, in ns
    (/proc/<pid>/task/*/schedstat), where the kernel has it: utime+stime count
    whole clock ticks (10 ms), so over 9 server processes a phase's figure could
    be off by up to 90 ms, 9 us a delivery on a 10 000-subscriber fanout.
    (A thread that exits takes its run time along; servers here do not end
    threads mid-phase.) Elsewhere utime+stime."""
    out = {}
    for pid in pids:
        try:
            ns = 0
            for tid in os.listdir("/proc/%d/task" % pid):
                with open("/proc/%d/task/%s/schedstat" % (pid, tid), "rb") as f:
                    ns += int(f.read().split()[0])
            out[pid] = ns / 1e9
            continue
        except (OSError, ValueError, IndexError):
            pass
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        out[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def cpu_seconds(pids):
    """CPU seconds summed over pids (cpu_by_pid); missing pids are skipped."""
    return sum(cpu_by_pid(pids).values())


SMAPS_FIELDS = {"Rss": "rss", "Pss": "pss", "Pss_Anon": "pss_anon", "Pss_Shmem": "pss_shmem",
                "Private_Clean": "private", "Private_Dirty": "private"}


def memory(pids):
    """Bytes summed over /proc/<pid>/smaps_rollup of pids.

    rss counts a page shared by k processes k times; pss splits it among them
    (the honest total); pss_shmem is the shared-memory part of pss (MAP_SHARED
    regions), pss_anon the private heap part, private = Private_Clean+Dirty."""
    out = dict.fromkeys(SMAPS_FIELDS.values(), 0)
    n = 0
    for pid in pids:
        try:
            with open("/proc/%d/smaps_rollup" % pid) as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in SMAPS_FIELDS:
                        out[SMAPS_FIELDS[k]] += int(v.split()[0]) * 1024
            n += 1
        except OSError:
            continue
    out["pids"] = n
    return out


def machine_busy_seconds():
    """CPU seconds all cores spent not idle (from /proc/stat), or 0."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return 0.0


def kernel_memory():
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                if k in ("Slab", "MemAvailable"):
                    out[k.lower()] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def redis_info(port, section="all", host="127.0.0.1", timeout=5.0):
    """``INFO <section>`` of the Redis on port as a dict of strings, or None if it does not
    answer (down, restarting).  INFO's reply is one RESP bulk string: read here by hand."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"INFO %s\r\n" % section.encode())
            buf = b""
            while True:
                chunk = s.recv(1 << 16)
                if not chunk:
                    return None
                buf += chunk
                e = buf.find(b"\r\n")
                if e < 0:
                    continue
                if buf[:1] != b"$":
                    return None
                n = int(buf[1:e])
                if len(buf) >= e + 2 + n:
                    body = buf[e + 2:e + 2 + n].decode("utf-8", "replace")
                    break
    except (OSError, ValueError):
        return None
    return dict(line.split(":", 1) for line in body.splitlines()
                if ":" in line and not line.startswith("#"))


SCRIPT_COMMANDS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")


def redis_snapshot(ports):
    """What the Redis servers on ports have done so far (--redis-port): CPU by pid (as for the
    server's processes, replicas included), the masters' calls by command from ``INFO
    commandstats`` (the commands a script runs count too; INFO, which we send, does not)
    and their ``used_memory``, and the pub/sub channels subscribed (plain and sharded)."""
    out = {"cpu_by_pid": {}, "calls": {}, "used_memory": 0, "channels": 0, "answered": 0}
    for port in ports:
        info = redis_info(port)
        if info is None:
            continue
        out["answered"] += 1
        try:
            out["cpu_by_pid"].update(cpu_by_pid([int(info["process_id"])]))
            if info.get("role") != "master":
                continue                  # a replica runs again what its master did
            for k, v in info.items():
                if k.startswith("cmdstat_") and k != "cmdstat_info":
                    name = k[8:]
                    out["calls"][name] = out["calls"].get(name, 0) + int(
                        v.split(",", 1)[0].split("=", 1)[1])
            out["used_memory"] += int(info["used_memory"])
            out["channels"] += (int(info.get("pubsub_channels", 0))
                                + int(info.get("pubsubshard_channels", 0)))
        except (KeyError, ValueError, IndexError):
            continue
    return out


def redis_channels(ports):
    """Pub/sub channels (plain and sharded) subscribed on the Redis servers, or None."""
    total, seen = 0, False
    for port in ports:
        info = redis_info(port, "stats", timeout=2.0)
        if info is not None:
            seen = True
            total += int(info.get("pubsub_channels", 0)) + int(info.get("pubsubshard_channels", 0))
    return total if seen else None


def parse_stats(body):
    """Normalize a /stats answer: MegaComet JSON, or Nchan's stub status text."""
    try:
        obj = json.loads(body)
        if isinstance(obj, dict):
            return obj
    except ValueError:
        pass
    totals = {}
    for line in body.decode("latin-1").splitlines():
        k, _, v = line.partition(":")
        v = v.strip()
        if v.isdigit():
            totals[k.strip().replace(" ", "_")] = int(v)
    if "subscribers" in totals:
        totals.setdefault("published", totals.get("total_published_messages", 0))
        return {"workers": [], "totals": totals, "format": "nchan_stub_status"}
    raise ValueError("unrecognized stats answer: %r" % body[:80])


# ---------------------------------------------------------------------------
# Child: an epoll loop over its share of the connections.

def set_pdeathsig():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def send_msg(sock, obj):
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(struct.pack("<I", len(data)) + data)


def take_msgs(buf):
    """Split complete length-prefixed pickles off a bytearray buffer."""
    out = []
    while len(buf) >= 4:
        n = struct.unpack_from("<I", buf)[0]
        if len(buf) < 4 + n:
            break
        out.append(pickle.loads(bytes(buf[4:4 + n])))
        del buf[:4 + n]
    return out


class Child:
    """Runs in a forked process; talks to the coordinator over `ctl`.

    Its subscribers long-poll; StreamChild and its subclasses keep a stream instead."""

    def __init__(self, index, ctl, cfg, lo, hi):
        self.index = index
        self.ctl = ctl
        self.cfg = cfg
        self.lo = lo
        self.n = n = hi - lo
        self.addr = (cfg["host"], cfg["port"])
        self.nchan = cfg["proto"] == "nchan"
        self.host_hdr = ("Host: %s:%d\r\n" % self.addr).encode()
        self.timeout_q = ("timeout=%d" % cfg["poll_timeout"]).encode()
        self.ids = [cfg["id_of"](lo + j) for j in range(n)]
        # A connection on several ids (--ids-per-conn, "a,b,c") takes a message of any of them.
        self.multi = cfg["ids_per_conn"] > 1
        self.names = [frozenset(x.decode().split(",")) if self.multi else x.decode()
                      for x in self.ids]
        self.srcs = [cfg["src_of"](lo + j) for j in range(n)]
        self.socks = [None] * n
        self.state = bytearray(n)
        self.started = array.array("d", bytes(8 * n))
        self.retries = bytearray(n)
        self.last = [0] * n                      # json: last seq; nchan: cursor headers
        self.got = array.array("i", bytes(4 * n))  # messages of the current round
        self.waiting = bytearray(n)              # a request is outstanding
        self.fdmap = {}
        self.rbuf = {}
        self.wbuf = {}
        self.queue = collections.deque()
        self.ep = select.epoll()
        self.ctl_buf = bytearray()
        self.parent = os.getppid()
        self.round = 0
        self.repoll = True
        self.stop = False
        self.open_reported = True
        self.counts = collections.Counter()
        self.errors = collections.Counter()
        self.n_connecting = 0
        self.n_open = 0
        self.n_waiting = 0
        self.lat = array.array("d")
        self.rx_first = self.rx_last = 0
        self.inflight = cfg["inflight"]
        self.rate = cfg["connect_rate"]
        self.rate_t0 = 0
        self.rate_done = 0

    # -- requests ----------------------------------------------------------
    def request(self, j):
        ident = self.ids[j]
        if self.nchan:
            cur = self.last[j]
            extra = b""
            if cur:
                extra = b"If-Modified-Since: " + cur[0] + b"\r\nIf-None-Match: " + cur[1] + b"\r\n"
            return b"GET /sub/" + ident + b" HTTP/1.1\r\n" + self.host_hdr + extra + b"\r\n"
        return (b"GET /sub/" + ident + b"?since=%d&" % self.last[j] + self.timeout_q
                + b" HTTP/1.1\r\n" + self.host_hdr + b"\r\n")

    def send(self, j, data):
        if j in self.wbuf:
            self.wbuf[j] += data
            return
        self.write_some(j, data)

    def flush(self, j):
        data = self.wbuf.pop(j, None)
        if data is None or self.socks[j] is None:
            return
        if self.write_some(j, data):
            self.ep.modify(self.socks[j].fileno(), select.EPOLLIN)

    def write_some(self, j, data):
        """Send what the socket takes; keep the rest for EPOLLOUT. True when all of it went."""
        s = self.socks[j]
        try:
            n = s.send(data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self.dead(j, "send:" + errno.errorcode.get(e.errno, str(e.errno)))
            return False
        if n < len(data):
            self.wbuf[j] = data[n:]
            self.ep.modify(s.fileno(), select.EPOLLIN | select.EPOLLOUT)
            return False
        return True

    def poll_next(self, j):
        if not self.waiting[j]:
            self.waiting[j] = 1
            self.n_waiting += 1
        self.counts["polls"] += 1
        self.send(j, self.request(j))

    # -- connections -------------------------------------------------------
    def start_connects(self, now):
        budget = self.inflight - self.n_connecting
        if self.rate:
            allowed = int(self.rate * (now - self.rate_t0) / 1e9) - self.rate_done
            budget = min(budget, allowed)
        addr = self.addr
        while budget > 0 and self.queue:
            j = self.queue.popleft()
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError as e:
                self.fail(j, "socket:" + errno.errorcode.get(e.errno, str(e.errno)), retry=False)
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    while self.queue:
                        self.fail(self.queue.popleft(), "socket:EMFILE", retry=False)
                return
            s.setblocking(False)
            try:
                s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((self.srcs[j], 0))
                err = s.connect_ex(addr)
            except OSError as e:
                err = e.errno
            if err not in (0, errno.EINPROGRESS):
                s.close()
                self.fail(j, "connect:" + errno.errorcode.get(err, str(err)))
                continue
            fd = s.fileno()
            self.fdmap[fd] = j
            self.socks[j] = s
            self.state[j] = CONNECTING
            self.started[j] = now
            self.n_connecting += 1
            self.rate_done += 1
            self.ep.register(fd, select.EPOLLOUT)
            budget -= 1

    def fail(self, j, why, retry=True):
        """A connect attempt failed: retry later or give up on j."""
        if retry and self.retries[j] < self.cfg["retries"]:
            self.retries[j] += 1
            self.counts["retries"] += 1
            self.queue.append(j)
        else:
            self.errors[why] += 1
            self.state[j] = DEAD

    def connected(self, j, fd):
        s = self.socks[j]
        self.n_connecting -= 1
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.drop(j, fd)
            self.fail(j, "connect:" + errno.errorcode.get(err, str(err)))
            return
        self.state[j] = OPEN
        self.n_open += 1
        self.counts["opened"] += 1
        self.ep.modify(fd, select.EPOLLIN)
        self.poll_next(j)

    def drop(self, j, fd):
        s = self.socks[j]
        self.socks[j] = None
        self.fdmap.pop(fd, None)
        self.rbuf.pop(j, None)
        self.wbuf.pop(j, None)
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        s.close()

    def dead(self, j, why):
        """An open connection ended."""
        s = self.socks[j]
        if s is None:
            return
        self.drop(j, s.fileno())
        if self.state[j] == OPEN:
            self.n_open -= 1
        self.state[j] = DEAD
        if self.waiting[j]:
            self.waiting[j] = 0
            self.n_waiting -= 1
        self.errors[why] += 1
        self.counts["closed"] += 1

    def check_connect_timeouts(self, now):
        limit = now - self.cfg["connect_timeout"] * 1e9
        for j in range(self.n):
            if self.state[j] == CONNECTING and self.started[j] < limit:
                self.n_connecting -= 1
                self.drop(j, self.socks[j].fileno())
                self.fail(j, "connect:timeout")

    # -- responses ---------------------------------------------------------
    def recv(self, j):
        """What the socket has for us, or None (nothing yet, or j is dead now)."""
        try:
            data = self.socks[j].recv(262144)
        except BlockingIOError:
            return None
        except OSError as e:
            self.dead(j, "recv:" + errno.errorcode.get(e.errno, str(e.errno)))
            return None
        if not data:
            self.dead(j, "closed by server")
            return None
        return data

    def readable(self, j, fd):
        s = self.socks[j]
        data = self.recv(j)
        if data is None:
            return
        pend = self.rbuf.pop(j, None)
        if pend is not None:
            data = pend + data
        pos = 0
        size = len(data)
        while pos < size:
            try:
                r = parse_response(data, pos)
            except ValueError:
                self.dead(j, "bad response")
                return
            if r is None:
                break
            pos = r[4]
            self.response(j, r[0], r[1], r[2], r[3])
            if self.socks[j] is not s:
                return
        if pos < size:
            self.rbuf[j] = data[pos:]

    def response(self, j, status, head, low, body):
        now = MONO()
        self.counts["responses"] += 1
        if self.waiting[j]:
            self.waiting[j] = 0
            self.n_waiting -= 1
        again = self.repoll
        if self.nchan:
            if status == 200:
                self.message(j, body.decode("utf-8", "replace"), now)
                lm = header_value(head, low, b"last-modified")
                et = header_value(head, low, b"etag")
                if lm is not None and et is not None:
                    self.last[j] = (lm, et)
            elif status in (304, 408):
                self.counts["empty"] += 1
            else:
                self.errors["http %d" % status] += 1
                again = False
        elif status == 200:
            try:
                obj = json.loads(body)
                msgs = obj["messages"]
            except (ValueError, KeyError, TypeError):
                self.errors["bad json"] += 1
                msgs = ()
                again = False
            if not msgs:
                self.counts["empty"] += 1
            for m in msgs:
                self.seen(j, m["seq"], m["data"], now)
        else:
            self.errors["http %d" % status] += 1
            again = False
        if b"connection: close" in low:
            self.dead(j, "closed by server (Connection: close)")
            return
        if again:
            self.poll_next(j)

    def seen(self, j, seq, data, now):
        """A message with its seq: one not newer than the last seen is counted, not taken."""
        if seq <= self.last[j]:
            self.counts["dup_seq"] += 1
            return
        self.last[j] = seq
        self.message(j, data, now)

    def message(self, j, data, now):
        parts = data.split("|", 3)
        try:
            rnd, t = int(parts[0]), int(parts[1])
            mid = parts[2]
        except (ValueError, IndexError):
            self.counts["foreign"] += 1
            return
        name = self.names[j]
        if mid != name and not (self.multi and mid in name):
            self.counts["wrong"] += 1
        elif rnd != self.round:
            self.counts["stale"] += 1
        else:
            self.got[j] += 1
            self.counts["delivered"] += 1
            if len(self.lat) < 4_000_000:
                self.lat.append((now - t) / 1e6)
            if not self.rx_first:
                self.rx_first = now
            self.rx_last = now

    # -- control -----------------------------------------------------------
    def progress(self):
        return {"type": "progress", "child": self.index, "open": self.n_open,
                "connecting": self.n_connecting, "pending": len(self.queue),
                "waiting": self.n_waiting, "counts": dict(self.counts),
                "errors": dict(self.errors)}

    def control(self):
        try:
            data = self.ctl.recv(1 << 20)
        except BlockingIOError:
            return
        if not data:
            self.stop = True
            return
        self.ctl_buf += data
        for msg in take_msgs(self.ctl_buf):
            self.command(msg)

    def command(self, msg):
        cmd = msg["cmd"]
        reply = {"type": "ack", "seq": msg.get("seq"), "child": self.index}
        if cmd == "open":
            self.queue.extend(j for j in range(self.n) if self.state[j] == PENDING)
            self.open_reported = False
            self.rate_t0 = MONO()
            self.rate_done = 0
        elif cmd == "round":
            self.round = msg["round"]
            self.got = array.array("i", bytes(4 * self.n))
            self.lat = array.array("d")
            self.rx_first = self.rx_last = 0
            for k in ("delivered", "wrong", "stale", "foreign", "dup_seq"):
                self.counts.pop(k, None)
            # The parent's last progress of ours predates the reset: without fresh counts a
            # wait for this round's deliveries would be met by the previous round's.
            reply.update(self.progress(), type="ack")
        elif cmd == "report":
            hist = collections.Counter(min(g, 3) for g, st in zip(self.got, self.state)
                                       if st == OPEN or g)
            reply.update(self.progress())
            reply.update(type="report", lat=self.lat.tobytes(), rx_first=self.rx_first,
                         rx_last=self.rx_last, got_hist=dict(hist))
        elif cmd == "repoll":
            self.repoll = msg["on"]
        elif cmd == "close":
            self.repoll = False
            for j in range(self.n):
                if self.socks[j] is not None:
                    st = self.state[j]
                    self.drop(j, self.socks[j].fileno())
                    self.state[j] = DEAD
                    if st == OPEN:
                        self.n_open -= 1
                    elif st == CONNECTING:
                        self.n_connecting -= 1
            self.queue.clear()
            self.n_waiting = 0
            self.waiting = bytearray(self.n)
        elif cmd == "stop":
            self.stop = True
        send_msg(self.ctl, reply)

    def run(self):
        ep = self.ep
        ctl_fd = self.ctl.fileno()
        ep.register(ctl_fd, select.EPOLLIN)
        fdmap = self.fdmap
        socks = self.socks
        state = self.state
        next_report = next_check = 0
        EPOLLOUT = select.EPOLLOUT
        while not self.stop:
            busy = self.queue or self.n_connecting
            try:
                events = ep.poll(0.02 if busy else 0.25, 8192)
            except InterruptedError:
                continue
            for fd, ev in events:
                j = fdmap.get(fd)
                if j is None:
                    if fd == ctl_fd:
                        self.control()
                    continue
                if state[j] == CONNECTING:
                    self.connected(j, fd)
                    continue
                if ev & EPOLLOUT:
                    self.flush(j)
                if ev & ~EPOLLOUT and socks[j] is not None:
                    self.readable(j, fd)
            now = MONO()
            if self.queue and self.n_connecting < self.inflight:
                self.start_connects(now)
            if now >= next_check:
                next_check = now + 1_000_000_000
                if self.n_connecting:
                    self.check_connect_timeouts(now)
                if os.getppid() != self.parent:
                    break
            if not self.open_reported and not self.queue and not self.n_connecting:
                self.open_reported = True
                msg = self.progress()
                msg["type"] = "opened"
                send_msg(self.ctl, msg)
            if now >= next_report:
                next_report = now + 400_000_000
                send_msg(self.ctl, self.progress())


class StreamChild(Child):
    """A child whose connections each send one request and keep the stream it opens.

    The answer's head is checked once (``waiting`` then means "subscribed",
    which is what the coordinator waits for before a round); the body after
    it is de-chunked if the server chunks it and handed to ``stream``, which
    the subclass implements for its framing. Messages then go through
    ``seen``/``message`` like a long-poll's."""

    PATH = None            # MegaComet's path for the transport
    STATUS = 200           # the status that opens the stream

    def __init__(self, *a):
        super().__init__(*a)
        self.path = self.PATH
        self.chunked = bytearray(self.n)     # the body is chunked (aiohttp's StreamResponse)
        self.cbuf = {}                       # j -> raw bytes of a chunk not complete yet

    def request(self, j):
        return (b"GET " + self.path + self.ids[j] + b" HTTP/1.1\r\n" + self.host_hdr
                + self.headers(j) + b"\r\n")

    def poll_next(self, j):
        """Open the stream: its only request."""
        self.counts["requests"] += 1
        self.send(j, self.request(j))

    def drop(self, j, fd):
        super().drop(j, fd)
        self.cbuf.pop(j, None)
        self.chunked[j] = 0

    def readable(self, j, fd):
        data = self.recv(j)
        if data is None:
            return
        if not self.waiting[j]:                   # the head has not come (all of it) yet
            pend = self.rbuf.pop(j, None)
            if pend is not None:
                data = pend + data
            he = data.find(b"\r\n\r\n")
            if he < 0:
                self.rbuf[j] = data
                return
            if not self.opened(j, data[:he]):
                return
            data = data[he + 4:]
        if self.chunked[j]:
            data = self.dechunk(j, data)
        if data:
            self.stream(j, data)

    def opened(self, j, head):
        """Check the head of the stream's answer; True when the stream is open."""
        low = head.lower()
        try:
            status = int(head[9:12])
        except ValueError:
            status = 0
        if status != self.STATUS:
            self.dead(j, "http %d" % status if status else "bad response")
            return False
        why = self.check_head(j, head, low)
        if why:
            self.dead(j, why)
            return False
        self.chunked[j] = b"\r\ntransfer-encoding:" in low and b"chunked" in low
        self.waiting[j] = 1
        self.n_waiting += 1
        self.counts["streams"] += 1
        return True

    def check_head(self, j, head, low):
        """Why a head with the right status is still wrong, or None."""
        return None

    def dechunk(self, j, data):
        """The payload of the complete chunks in data (the rest waits in cbuf); b"" on the
        last chunk or bad chunking, after which j is dead."""
        pend = self.cbuf.pop(j, None)
        if pend is not None:
            data = pend + data
        out = []
        pos, size = 0, len(data)
        while pos < size:
            le = data.find(b"\r\n", pos)
            if le < 0:
                break
            try:
                n = int(data[pos:le].split(b";")[0], 16)
            except ValueError:
                self.dead(j, "bad chunking")
                return b""
            if n == 0:
                self.dead(j, "closed by server (last chunk)")
                return b""
            end = le + 2 + n
            if end + 2 > size:
                break
            out.append(data[le + 2:end])
            pos = end + 2
        if pos < size:
            self.cbuf[j] = data[pos:]
        return b"".join(out)

    def stream(self, j, data):
        raise NotImplementedError


class SseChild(StreamChild):
    """EventSource subscribers: events are split at blank lines; an event with data
    lines is a message (its ``id:`` is MegaComet's seq; Nchan's is opaque), one
    without (``: ping``, ``retry:``) is not, nor is a named one (``event: x``),
    which a browser hands to its own listener, not to onmessage."""

    PATH = b"/sse/"

    def headers(self, j):
        return b"Accept: text/event-stream\r\nCache-Control: no-cache\r\n"

    def stream(self, j, data):
        pend = self.rbuf.pop(j, None)
        if pend is not None:
            data = pend + data
        end = data.rfind(b"\n\n")
        if end < 0:
            self.rbuf[j] = data
            return
        if end + 2 < len(data):
            self.rbuf[j] = data[end + 2:]
        now = MONO()
        for event in data[:end].split(b"\n\n"):
            self.event(j, event, now)

    def event(self, j, event, now):
        ident = None
        lines = []
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                lines.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line.startswith(b"id:"):
                ident = line[3:].strip()
            elif line.startswith(b"event:") and line[6:].strip() != b"message":
                self.counts["named_events"] += 1
                return
        if not lines:
            if event:
                self.counts["comments"] += 1
            return
        data = b"\n".join(lines).decode("utf-8", "replace")
        if self.nchan:
            self.message(j, data, now)
            return
        try:
            seq = int(ident)
        except (TypeError, ValueError):
            self.counts["foreign"] += 1
            return
        self.seen(j, seq, data, now)


class WsChild(StreamChild):
    """WebSocket subscribers: a handshake with a random key, then unmasked frames from the
    server. A text frame is a message (MegaComet's JSON {"id", "seq", "data"}, or Nchan's
    raw text); pings get a pong, a close frame is answered and ends the connection."""

    PATH = b"/ws/"
    STATUS = 101

    def __init__(self, *a):
        super().__init__(*a)
        self.accept = {}         # j -> the Sec-WebSocket-Accept its handshake must bring
        self.fragments = {}      # j -> payloads of a fragmented message so far

    def headers(self, j):
        key = base64.b64encode(os.urandom(16))
        self.accept[j] = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        return (b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: " + key + b"\r\n")

    def check_head(self, j, head, low):
        if header_value(head, low, b"sec-websocket-accept") != self.accept.pop(j, None):
            return "bad Sec-WebSocket-Accept"
        return None

    def drop(self, j, fd):
        super().drop(j, fd)
        self.accept.pop(j, None)
        self.fragments.pop(j, None)

    def stream(self, j, data):
        s = self.socks[j]
        pend = self.rbuf.pop(j, None)
        if pend is not None:
            data = pend + data
        pos, size = 0, len(data)
        now = MONO()
        while size - pos >= 2:
            b0, n = data[pos], data[pos + 1]
            if n & 0x80:
                self.dead(j, "websocket: masked frame from the server")
                return
            p = pos + 2
            if n == 126:
                if size - p < 2:
                    break
                n = int.from_bytes(data[p:p + 2], "big")
                p += 2
            elif n == 127:
                if size - p < 8:
                    break
                n = int.from_bytes(data[p:p + 8], "big")
                p += 8
            if size - p < n:
                break
            pos = p + n
            self.frame(j, b0 & 0x80, b0 & 0x0F, data[p:pos], now)
            if self.socks[j] is not s:
                return
        if pos < size:
            self.rbuf[j] = data[pos:]

    def frame(self, j, fin, opcode, payload, now):
        if opcode == WS_PING:
            self.counts["pings"] += 1
            self.send(j, ws_client_frame(WS_PONG, payload))
        elif opcode == WS_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.send(j, ws_client_frame(WS_CLOSE, payload[:2]))
            self.dead(j, "closed by server (websocket close %d)" % code)
        elif opcode in (WS_TEXT, WS_BINARY, WS_CONT):
            if not fin or j in self.fragments:
                parts = self.fragments.setdefault(j, [])
                parts.append(payload)
                if not fin:
                    return
                payload = b"".join(self.fragments.pop(j))
            self.text(j, payload, now)
        elif opcode != WS_PONG:
            self.dead(j, "websocket: unknown opcode %d" % opcode)

    def text(self, j, payload, now):
        if self.nchan:
            self.message(j, payload.decode("utf-8", "replace"), now)
            return
        try:
            obj = json.loads(payload)
            seq, data, ident = obj["seq"], obj["data"], obj["id"]
        except (ValueError, KeyError, TypeError):
            self.counts["foreign"] += 1
            return
        name = self.names[j]
        if ident != name and not (self.multi and ident in name):
            self.counts["wrong"] += 1
        elif self.multi:
            # Seqs count per id, and a connection holds several: each round checks that
            # every connection got exactly the messages it was sent.
            self.message(j, data, now)
        else:
            self.seen(j, seq, data, now)


CHILDREN = {"poll": Child, "sse": SseChild, "ws": WsChild}


def child_main(index, ctl, cfg, lo, hi):
    set_pdeathsig()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    code = 0
    try:
        ctl.settimeout(60)
        CHILDREN[cfg["transport"]](index, ctl, cfg, lo, hi).run()
    except BaseException as e:  # report, then die: the coordinator sees EOF
        code = 1
        try:
            send_msg(ctl, {"type": "crash", "child": index, "error": repr(e)})
        except Exception:
            pass
    os._exit(code)


# ---------------------------------------------------------------------------
# Coordinator.

# The percentiles of a latency's "curve" (tools/plots.py draws it): the whole distribution in
# a few numbers, denser in the tail.
CURVE_PERCENTILES = (0, 1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97.5, 99, 99.5, 99.9, 100)


def percentiles(values):
    """Nearest-rank p50/p90/p99, max and mean of ``values``, and "curve": [[percentile,
    value], ...] at CURVE_PERCENTILES (p0 is the smallest value, p100 the largest)."""
    if not values:
        return {"n": 0}
    values = sorted(values)
    n = len(values)

    def pick(q):
        return round(values[max(0, min(n - 1, math.ceil(round(q * n, 6)) - 1))], 3)
    return {"n": n, "p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99),
            "max": round(values[-1], 3), "mean": round(sum(values) / n, 3),
            "curve": [[p, pick(p / 100)] for p in CURVE_PERCENTILES]}


def ip_add(base, k):
    """The k-th usable address after base (skips .0 and .255 last octets)."""
    a = struct.unpack("!I", socket.inet_aton(base))[0]
    while k:
        a += 1
        if a & 0xFF not in (0, 255):
            k -= 1
    return socket.inet_ntoa(struct.pack("!I", a))


class ChannelWatch:
    """A thread that asks Redis (--redis-port) every 20 ms how many channels are subscribed,
    from a moment on (monotonic ns): ``reached_s``, the seconds until the count first reached
    ``target`` (None: not yet), and ``curve``, [seconds, count] every 0.1 s."""

    def __init__(self, ports, target, since_ns):
        self.ports, self.target, self.since = ports, target, since_ns
        self.reached_s = None
        self.last = None
        self.curve = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        next_point = 0.0
        while not self.done.wait(0.02):
            count = redis_channels(self.ports)
            at = (MONO() - self.since) / 1e9
            if count is None:
                continue
            self.last = count
            if at >= next_point:
                self.curve.append([round(at, 2), count])
                next_point = at + 0.1
            if self.reached_s is None and count >= self.target:
                self.reached_s = round(at, 3)
                self.curve.append([round(at, 2), count])

    def stop(self):
        self.done.set()
        self.thread.join(5)


class Coordinator:
    def __init__(self, args):
        self.args = args
        self.t_start = time.monotonic()
        self.deadline = self.t_start + args.duration
        self.children = []          # dicts: pid, sock, buf, alive, progress, ...
        self.seq = 0
        self.replies = {}
        self.problems = []
        self.streaming = args.transport != "poll"
        self.record = {"tool": "megatest", "mode": args.mode, "transport": args.transport,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "args": {k: v for k, v in vars(args).items() if k != "func"},
                       "phases": {}}
        self.phase = "setup"
        self.next_print = 0
        self.last_print = (time.monotonic(), 0, 0)
        self.tag = "%s%04x-" % (args.id_prefix, random.getrandbits(16))
        # Short and single-shot: a wedged server must not stall every wait.
        self.stats_conn = HttpConn(args.host, args.app_port, timeout=5)
        self.stats_failures = 0
        self.known_pids = set()
        self.counts_subscribers = False     # set once: does /stats count subscribers?
        self.publishers = []
        self.pub_port = args.publish_to[0][1]   # where publish() sends (--publish-to)
        # How publish() sends: connections and requests in flight on each (--publish-shape).
        self.pub_conns, self.pipeline = args.pub_conns, args.pipeline
        self.pub_rate = 0.0
        self.refused = []                       # ids answered 503 by the last publish()
        # Every node's app port (--app-port, --publish-to), for their Redis counters in /stats.
        self.node_ports = sorted({args.app_port} | {port for _, port in args.publish_to})

    # -- logging -----------------------------------------------------------
    def log(self, text):
        print("[%6.1fs] %s" % (time.monotonic() - self.t_start, text), file=sys.stderr,
              flush=True)

    def problem(self, text):
        self.problems.append(text)
        self.log("PROBLEM: " + text)

    def check_time(self):
        if time.monotonic() >= self.deadline:
            raise Stopped("--duration %.0fs reached" % self.args.duration)

    # -- server ------------------------------------------------------------
    def stats(self):
        try:
            status, body = self.stats_conn.request("GET", self.args.stats_path, attempts=1)
            if status != 200:
                raise ValueError("http %d" % status)
            return parse_stats(body)
        except (OSError, ValueError) as e:
            self.stats_conn.close()
            self.stats_failures += 1
            if self.stats_failures <= 5:
                self.log("stats request failed: %r" % e)
            return None

    def server_pids(self, st=None):
        """Server processes: /stats workers, --server-pid and its descendants, and
        any pid seen before that still runs (so a failed /stats call loses none)."""
        pids = self.known_pids
        st = st if st is not None else self.stats()
        for w in (st or {}).get("workers", []):
            if isinstance(w, dict) and w.get("pid"):
                pids.add(int(w["pid"]))
        for pid in self.args.server_pid or ():
            pids.add(pid)
            pids.update(descendants(pid))
        pids.intersection_update(p for p in list(pids) if os.path.exists("/proc/%d" % p))
        return sorted(pids)

    def snapshot(self):
        st = self.stats()
        pids = self.server_pids(st)
        by_pid = cpu_by_pid(pids)
        snap = {"t": time.monotonic(), "pids": pids, "cpu_s": sum(by_pid.values()),
                "cpu_by_pid": by_pid, "machine_busy_s": machine_busy_seconds(),
                "client_cpu_s": cpu_seconds([c["pid"] for c in self.children])
                + sum(os.times()[:2]),
                "mem": memory(pids), "kernel": kernel_memory(), "stats": st}
        if st and isinstance(st.get("workers"), list):
            snap["stats_rss"] = sum(int(w.get("rss_bytes", 0) or 0) for w in st["workers"]
                                    if isinstance(w, dict))
        if self.args.redis_port:
            snap["redis"] = redis_snapshot(self.args.redis_port)
            snap["node_counters"] = self.node_counters(st)
        return snap

    def node_counters(self, st):
        """Cluster mode: the Redis counters of every node's /stats, summed (None: no node has
        them, e.g. Nchan)."""
        out = collections.Counter()
        for port in self.node_ports:
            if port != self.args.app_port:
                conn = HttpConn(self.args.host, port, timeout=5)
                try:
                    status, body = conn.request("GET", self.args.stats_path, attempts=1)
                    other = parse_stats(body) if status == 200 else None
                except (OSError, ValueError):
                    other = None
                finally:
                    conn.close()
            else:
                other = st
            for k in ("redis_round_trips", "redis_commands", "redis_reconnects",
                      "redis_resubscribes", "redis_gaps_filled", "redis_unavailable"):
                v = self.totals(other, k)
                if v is not None:
                    out[k] += v
        return dict(out) or None

    @staticmethod
    def totals(st, key):
        if not st:
            return None
        v = (st.get("totals") or {}).get(key)
        if v is None and st.get("workers"):
            try:
                v = sum(int(w.get(key, 0) or 0) for w in st["workers"])
            except (TypeError, ValueError, AttributeError):
                return None
        return v

    def cost(self, before, after, ops, per="op"):
        """CPU µs per operation and memory per operation between two snapshots."""
        out = {"server_pids": after["pids"]}
        if ops <= 0:
            return out
        out["cpu_s"] = round(after["cpu_s"] - before["cpu_s"], 3)
        out["cpu_us_per_" + per] = round((after["cpu_s"] - before["cpu_s"]) * 1e6 / ops, 2)
        per_pid = {str(p): round(c - before["cpu_by_pid"].get(p, 0.0), 3)
                   for p, c in after["cpu_by_pid"].items()}
        out["cpu_s_by_pid"] = per_pid
        out["cpu_s_busiest_process"] = max(per_pid.values(), default=0.0)
        # The load generator's own CPU (children and coordinator): when server plus
        # client approach the core count, wall-clock rates measure the client.
        dc = after["client_cpu_s"] - before["client_cpu_s"]
        out["client_cpu_s"] = round(dc, 3)
        out["client_cpu_us_per_" + per] = round(dc * 1e6 / ops, 2)
        # Redis (--redis-port): the processes that ran in both snapshots (a restart is a new one).
        dr = 0.0
        if "redis" in before and "redis" in after:
            rb, ra = before["redis"]["cpu_by_pid"], after["redis"]["cpu_by_pid"]
            dr = sum(ra[p] - rb[p] for p in ra if p in rb)
            out["redis_cpu_s"] = round(dr, 3)
            out["redis_cpu_us_per_" + per] = round(dr * 1e6 / ops, 2)
            out["all_cpu_us_per_" + per] = round((after["cpu_s"] - before["cpu_s"] + dr) * 1e6
                                                 / ops, 2)
        wall = after["t"] - before["t"]
        if wall > 0:
            out["cores_busy"] = round((after["cpu_s"] - before["cpu_s"] + dc + dr) / wall, 2)
            # Everything else on the machine (other processes, unattributed softirq).
            other = after["machine_busy_s"] - before["machine_busy_s"] \
                - (after["cpu_s"] - before["cpu_s"]) - dc - dr
            out["other_cores_busy"] = round(max(0.0, other) / wall, 2)
        return out

    @staticmethod
    def redis_cost(before, after, publishes):
        """What Redis did between two snapshots, per publish: calls of every command summed
        (those a script runs included), scripts run, the busiest commands, and the change in
        the masters' used_memory.  {} without --redis-port."""
        if "redis" not in before or "redis" not in after:
            return {}
        cb, ca = before["redis"]["calls"], after["redis"]["calls"]
        delta = {k: v - cb.get(k, 0) for k, v in ca.items() if v - cb.get(k, 0) > 0}
        calls = sum(delta.values())
        scripts = sum(delta.get(k, 0) for k in SCRIPT_COMMANDS)
        p = max(publishes, 1)
        out = {"redis_calls": calls, "redis_commands_per_publish": round(calls / p, 2),
               "redis_scripts_per_publish": round(scripts / p, 2),
               "redis_calls_by_command": dict(sorted(delta.items(), key=lambda kv: -kv[1])),
               "redis_used_memory_delta": after["redis"]["used_memory"]
               - before["redis"]["used_memory"]}
        nb, na = before.get("node_counters"), after.get("node_counters")
        if nb and na:
            out["node_counters"] = {k: na[k] - nb.get(k, 0) for k in na}
            for k in ("redis_round_trips", "redis_commands"):
                if k in na and k in nb:
                    out["node_%s_per_publish" % k] = round((na[k] - nb[k]) / p, 3)
        return out

    def memory_delta(self, before, after, count, per):
        out = {}
        if not count:
            return out
        for k in ("rss", "pss", "pss_anon", "pss_shmem", "private"):
            d = after["mem"][k] - before["mem"][k]
            out[k + "_delta"] = d
            out[k + "_bytes_per_" + per] = round(d / count, 1)
            out[k + "_total"] = after["mem"][k]
        if "stats_rss" in before and "stats_rss" in after:
            out["stats_rss_bytes_per_" + per] = round(
                (after["stats_rss"] - before["stats_rss"]) / count, 1)
        if "slab" in before["kernel"] and "slab" in after["kernel"]:
            out["kernel_slab_bytes_per_" + per] = round(
                (after["kernel"]["slab"] - before["kernel"]["slab"]) / count, 1)
        if after.get("stats") and after["stats"].get("shm") is not None:
            out["shm_after"] = after["stats"]["shm"]
            out["shm_before"] = (before.get("stats") or {}).get("shm")
        return out

    # -- children ----------------------------------------------------------
    def spawn(self, n, id_of):
        args = self.args
        procs = args.procs or max(1, math.ceil(n / args.per_proc))
        if n / procs > 18000:
            raise SystemExit("megatest: %d connections over %d processes exceeds ~18000 "
                             "sockets per process (open-file limit 20000); raise --procs"
                             % (n, procs))
        per_src = args.per_source

        def src_of(i):
            return ip_add(args.source_base, 1 + i // per_src)
        n_src = max(1, math.ceil(n / per_src))
        cfg = {"host": args.host, "port": args.port, "proto": args.proto,
               "transport": args.transport, "ids_per_conn": args.ids_per_conn,
               "poll_timeout": args.poll_timeout, "id_of": id_of, "src_of": src_of,
               "inflight": max(1, math.ceil(args.inflight / procs)),
               "connect_rate": args.connect_rate / procs if args.connect_rate else 0,
               "connect_timeout": args.connect_timeout, "retries": args.retries}
        self.record["clients"] = {"procs": procs, "connections": n,
                                  "sources": [src_of(0), src_of(n - 1)], "n_sources": n_src}
        parent_ends = []
        for k in range(procs):
            lo, hi = n * k // procs, n * (k + 1) // procs
            a, b = socket.socketpair()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                a.close()
                for s in parent_ends:
                    s.close()
                self.stats_conn.close()
                child_main(k, b, cfg, lo, hi)
            b.close()
            a.settimeout(30)
            parent_ends.append(a)
            self.children.append({"index": k, "pid": pid, "sock": a, "buf": bytearray(),
                                  "alive": True, "progress": {}, "opened": False,
                                  "n": hi - lo})
        self.log("%d client processes, %d connections, sources %s..%s (%d per source)"
                 % (procs, n, src_of(0), src_of(n - 1), per_src))

    def pump(self, timeout):
        """Read child messages for up to `timeout` seconds (returns after the first batch)."""
        live = [c for c in self.children if c["alive"]]
        if not live:
            time.sleep(min(timeout, 0.1))
            return
        try:
            ready, _, _ = select.select([c["sock"] for c in live], [], [], max(0, timeout))
        except InterruptedError:
            return
        for c in live:
            if c["sock"] not in ready:
                continue
            try:
                data = c["sock"].recv(1 << 22)
            except (BlockingIOError, socket.timeout):
                continue
            except OSError:
                data = b""
            if not data:
                c["alive"] = False
                self.problem("client process %d (pid %d) exited unexpectedly"
                             % (c["index"], c["pid"]))
                continue
            c["buf"] += data
            for msg in take_msgs(c["buf"]):
                t = msg["type"]
                if t in ("progress", "opened", "report") or "counts" in msg:
                    c["progress"] = msg      # an ack carries the counts as of the command
                if t == "opened":
                    c["opened"] = True
                if t in ("ack", "report"):
                    self.replies[(msg["seq"], c["index"])] = msg
                if t == "crash":
                    self.problem("client process %d crashed: %s" % (c["index"], msg["error"]))

    def agg(self):
        tot = collections.Counter()
        errs = collections.Counter()
        for c in self.children:
            p = c["progress"]
            for k in ("open", "connecting", "pending", "waiting"):
                tot[k] += p.get(k, 0)
            tot.update(p.get("counts", {}))
            errs.update(p.get("errors", {}))
        return tot, errs

    def show(self, force=False, extra=""):
        now = time.monotonic()
        if not force and now < self.next_print:
            return
        self.next_print = now + 1.0
        tot, errs = self.agg()
        t0, o0, d0 = self.last_print
        dt = max(now - t0, 1e-6)
        self.last_print = (now, tot["opened"], tot["delivered"])
        self.log("%-14s open %d (+%d/s) connecting %d errors %d delivered %d (+%d/s)%s"
                 % (self.phase, tot["open"], max(0, tot["opened"] - o0) / dt, tot["connecting"],
                    sum(errs.values()), tot["delivered"], max(0, tot["delivered"] - d0) / dt,
                    extra))

    def wait(self, cond, timeout, what, stall=None, value=None):
        """Pump until cond() or timeout; optional stall limit on value() progress."""
        end = min(time.monotonic() + timeout, self.deadline)
        last_v, last_t = None, time.monotonic()
        while True:
            if cond():
                return True
            now = time.monotonic()
            if stall and value:
                v = value()
                if v != last_v:
                    last_v, last_t = v, now
                elif now - last_t > stall:
                    self.problem("%s: no progress for %.0fs" % (what, stall))
                    return False
            if now >= end:
                self.check_time()
                self.problem("%s: timed out after %.0fs" % (what, timeout))
                return False
            if not any(c["alive"] for c in self.children):
                self.problem("%s: no client process left" % what)
                return False
            self.pump(min(0.2, end - now))
            self.show()

    def command(self, cmd, timeout=15.0, **kw):
        self.seq += 1
        seq = self.seq
        msg = dict(kw, cmd=cmd, seq=seq)
        for c in self.children:
            if c["alive"]:
                try:
                    send_msg(c["sock"], msg)
                except OSError:
                    c["alive"] = False
        live = [c["index"] for c in self.children if c["alive"]]
        self.wait(lambda: all((seq, k) in self.replies or not self.children[k]["alive"]
                              for k in live), timeout, "command %s" % cmd)
        return [self.replies.pop((seq, k)) for k in live if (seq, k) in self.replies]

    def shutdown(self):
        for c in self.children:
            if c["alive"]:
                try:
                    send_msg(c["sock"], {"cmd": "stop", "seq": 0})
                except OSError:
                    pass
        end = time.monotonic() + 3
        pending = {c["pid"] for c in self.children}
        while pending and time.monotonic() < end:
            for pid in list(pending):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    pending.discard(pid)
            time.sleep(0.05)
        for pid in pending:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for c in self.children:
            c["sock"].close()
            c["alive"] = False
        self.children = []

    # -- phases ------------------------------------------------------------
    def open_phase(self, n, expect_subscribers=True):
        """Open every child's connections; confirm with /stats subscribers."""
        self.phase = "open"
        base_subs = self.totals(self.stats(), "subscribers") or 0
        t0 = time.monotonic()
        # Each child answers between its connects: with a million connects under way on 2
        # cores, its answer may take more than the usual 15 s.
        self.command("open", timeout=max(15.0, n / 20000))
        # Progress is an open, a retry or a failure; a retried connect may take
        # --connect-timeout before anything moves.
        tot_of = self.agg
        ok = self.wait(lambda: all(c["opened"] or not c["alive"] for c in self.children),
                       max(60.0, n / 500), "open", stall=self.args.connect_timeout + 10,
                       value=lambda: (tot_of()[0]["opened"], tot_of()[0]["retries"],
                                      sum(tot_of()[1].values())))
        t1 = time.monotonic()
        tot, errs = self.agg()
        opened = tot["open"]
        res = {"target": n, "opened": opened, "failed": n - opened, "errors": dict(errs),
               "retries": tot["retries"], "client_s": round(t1 - t0, 3),
               "open_per_s": round(opened / max(t1 - t0, 1e-9), 1), "complete": ok}
        self.show(force=True)
        if expect_subscribers:
            want = base_subs + opened
            seen = [None]

            def confirmed():
                # A stream is open once its answer's head has come: the client knows.
                if self.streaming and self.agg()[0]["waiting"] < opened:
                    return False
                if not self.counts_subscribers:
                    return True
                v = self.totals(self.stats(), "subscribers")
                if v is not None:
                    seen[0] = v
                return v is not None and v >= want
            self.phase = "confirm"
            if self.wait(confirmed, self.args.confirm_timeout, "server subscriber count"):
                t2 = time.monotonic()
                if seen[0] is not None:
                    res["confirmed_s"] = round(t2 - t0, 3)
                    res["confirmed_per_s"] = round(opened / max(t2 - t0, 1e-9), 1)
            res["server_subscribers"] = seen[0]
        if res["failed"]:
            self.problem("%d of %d connections failed to open: %s"
                         % (res["failed"], n, dict(errs)))
        self.log("opened %d/%d in %.2fs (%.0f/s)%s" % (
            opened, n, t1 - t0, res["open_per_s"],
            ", server confirmed after %.2fs (%.0f/s)" % (res["confirmed_s"], res["confirmed_per_s"])
            if "confirmed_s" in res else ""))
        return res

    def await_polls(self, what):
        """All open connections hold a request (or an open stream), and the server counts them."""
        self.phase = "re-poll"
        self.wait(lambda: self.agg()[0]["waiting"] >= self.agg()[0]["open"], 30,
                  what + ": re-polls sent")
        want = self.agg()[0]["waiting"]
        if self.counts_subscribers:
            self.wait(lambda: (self.totals(self.stats(), "subscribers") or 0) >= want,
                      self.args.confirm_timeout, what + ": server subscriber count")

    def round_result(self, reports, t_pub0, t_pub1, expected, name):
        lat = array.array("d")
        hist = collections.Counter()
        tot = collections.Counter()
        rx_last = 0
        for r in reports:
            lat.frombytes(r["lat"])
            hist.update(r["got_hist"])
            tot.update(r["counts"])
            rx_last = max(rx_last, r["rx_last"])
        delivered = tot["delivered"]
        span = (rx_last / 1e9 - t_pub0) if rx_last else None
        res = {"expected": expected, "delivered": delivered,
               "exactly_one": hist.get(1, 0), "missing": hist.get(0, 0),
               "duplicated": hist.get(2, 0) + hist.get(3, 0),
               "wrong_id": tot["wrong"], "stale": tot["stale"], "foreign": tot["foreign"],
               "dup_seq": tot["dup_seq"], "publish_s": round(t_pub1 - t_pub0, 3),
               "latency_ms": percentiles(lat)}
        if span and span > 0:
            res["span_s"] = round(span, 3)
            res["deliveries_per_s"] = round(delivered / span, 1)
        return res

    def publish(self, method, items, rnd, background=True, stamp=None):
        """Publish one message to each id in items for round rnd; returns (ok, errors), and
        leaves the ids answered 503 in self.refused.

        Publisher connections (to self.pub_port) persist across calls (see
        close_publishers).  In the background (threads) the coordinator keeps
        reading its children and printing progress meanwhile."""
        k = max(1, min(self.pub_conns, len(items)))
        while len(self.publishers) < k:
            self.publishers.append(Publisher(self.args.host, self.pub_port,
                                             self.args.batch_size, self.pipeline))
        parts = [items[i * len(items) // k:(i + 1) * len(items) // k] for i in range(k)]
        for p in self.publishers:
            p.rate = self.pub_rate / k
        results = [None] * k

        def run(i):
            try:
                results[i] = getattr(self.publishers[i], method)(parts[i], rnd, stamp)
            except Exception as e:       # counted below
                self.publishers[i].close()
                results[i] = (0, {method + ": " + repr(e): len(parts[i])})
        if not background:
            for i in range(k):
                run(i)
        else:
            threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(k)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                self.check_time()
                if self.children:
                    self.pump(0.1)
                else:
                    threads[0].join(0.1)
                self.show(extra=" published %d" % sum(p.done for p in self.publishers))
        ok = 0
        errors = collections.Counter()
        for r in results:
            if r is None:
                errors["publisher thread did not finish"] += 1
                continue
            ok += r[0]
            errors.update(r[1])
        self.refused = [x for p in self.publishers for x in p.refused]
        for p in self.publishers:
            p.refused = []
        return ok, dict(errors)

    def at_targets(self, name, shaped=False):
        """The phase name of a round at each --publish-to target ("deliver_single_cross"),
        with publish() sending there meanwhile; ``shaped``: a round per --publish-shape too
        ("deliver_single_spread"), publish() using its connections and depth."""
        shapes = (self.args.publish_shape if shaped else []) or [("", None, None)]
        if shaped and self.args.paced:
            # The same connections one request deep, at a rate every server keeps up with:
            # latency without the queues of publishing as fast as it goes.
            shapes = shapes + [("paced", None, 1)]
        for where, port in self.args.publish_to:
            for shape, conns, depth in shapes:
                self.close_publishers()
                self.pub_port = port
                self.pub_conns = conns or self.args.pub_conns
                self.pipeline = depth or self.args.pipeline
                self.pub_rate = self.args.paced if shape == "paced" else 0.0
                yield name + ("_" + where if where else "") + ("_" + shape if shape else "")

    def close_publishers(self):
        for p in self.publishers:
            p.close()
        self.publishers = []

    def deliver_round(self, name, method, ids, rnd, expected, stamp=None, retry=0.0,
                      before=None):
        """Publish to ids in round rnd and wait for `expected` deliveries.

        With a ``stamp`` the messages carry it (latencies count from it); with ``retry``,
        ids answered 503 are published again, for up to that many seconds; ``before``, a
        snapshot taken earlier, counts the round's costs from then."""
        self.await_polls(name)
        self.command("round", round=rnd)
        self.last_print = (self.last_print[0], self.last_print[1], 0)
        closed0 = self.agg()[0]["closed"]
        before = before or self.snapshot()
        self.phase = name
        self.log("%s: publishing %d messages via %s" % (name, len(ids), method))
        t0 = time.monotonic()
        ok, errors = self.publish(method, ids, rnd, stamp=stamp)
        attempts, retried, first_ok = 1, 0, (time.monotonic() if ok else None)
        kept = collections.Counter()          # errors other than 503, of every attempt
        while self.refused and time.monotonic() < t0 + retry:
            kept.update({k: v for k, v in errors.items() if k != "single: http 503"})
            todo = self.refused
            self.pump(0.05)
            more, errors = self.publish(method, todo, rnd, stamp=stamp)
            ok += more
            attempts += 1
            retried += len(todo)
            if more and first_ok is None:
                first_ok = time.monotonic()
        errors = dict(kept + collections.Counter(errors))
        t1 = time.monotonic()
        if errors:
            self.problem("%s: publish errors %s" % (name, errors))
        target = expected if not errors else min(expected, expected * ok // max(1, len(ids)))
        self.wait(lambda: self.agg()[0]["delivered"] >= target,
                  max(30.0, expected / 1000), name + ": deliveries", stall=self.args.stall,
                  value=lambda: self.agg()[0]["delivered"])
        time.sleep(self.args.settle)       # let duplicates, if any, arrive
        self.pump(0)
        self.close_publishers()
        after = self.snapshot()
        reports = self.command("report")
        self.show(force=True)
        res = self.round_result(reports, t0, t1, expected, name)
        res.update(method=method, published=ok, publish_errors=errors,
                   publish_per_s=round(ok / max(t1 - t0, 1e-9), 1))
        if retry:
            res.update(publish_attempts=attempts, republished=retried,
                       first_accepted_s=round(first_ok - t0, 3) if first_ok else None)
        res.update(self.cost(before, after, max(res["delivered"], 1), "delivery"))
        res.update(self.redis_cost(before, after, ok))
        res["connections_lost"] = self.agg()[0]["closed"] - closed0
        if res["connections_lost"]:
            self.problem("%s: %d subscriber connections closed during the round: %s"
                         % (name, res["connections_lost"], dict(self.agg()[1])))
        if res["missing"] or res["duplicated"] or res["wrong_id"]:
            self.problem("%s: %d missing, %d duplicated, %d wrong id" % (
                name, res["missing"], res["duplicated"], res["wrong_id"]))
        return res

    # -- modes -------------------------------------------------------------
    def mode_hold(self):
        n = self.args.connections
        base = self.snapshot()
        self.spawn(n, lambda i, t=self.tag: ("%s%d" % (t, i)).encode())
        res = self.open_phase(n)
        self.phase = "hold"
        end = time.monotonic() + self.args.hold
        self.wait(lambda: time.monotonic() >= end, self.args.hold + 5, "hold")
        at_n = self.snapshot()
        tot, errs = self.agg()
        res["still_open"] = tot["open"]
        res["client_counts"] = dict(tot)      # streams: heads, pings and comments seen
        res["lost_during_hold"] = res["opened"] - tot["open"]
        res.update(self.cost(base, at_n, res["opened"], "connection"))
        res.update(self.memory_delta(base, at_n, res["opened"], "connection"))
        res["server_connections"] = self.totals(at_n["stats"], "connections")
        self.record["phases"]["hold"] = res
        if res["lost_during_hold"]:
            self.problem("%d connections lost during hold" % res["lost_during_hold"])

    def mode_deliver(self):
        n = self.args.connections
        ids = ["%s%d" % (self.tag, i) for i in range(n)]
        self.spawn(n, lambda i, t=self.tag: ("%s%d" % (t, i)).encode())
        self.record["phases"]["open"] = self.open_phase(n)
        rnd = 0
        for method in self.args.publish:
            for name in self.at_targets("deliver_" + method, shaped=method == "single"):
                rnd += 1
                self.record["phases"][name] = self.deliver_round(name, method, ids, rnd, n)

    def mode_fanout(self):
        n = self.args.connections
        fan = self.tag + "fan"
        self.spawn(n, lambda i, f=fan.encode(): f)
        self.record["phases"]["open"] = self.open_phase(n)
        method = self.args.publish[0] if self.args.publish[0] != "batch" else "single"
        rnd = 0
        for r in range(1, self.args.rounds + 1):
            for name in self.at_targets("fanout" if self.args.rounds == 1 else "fanout_%d" % r):
                rnd += 1
                res = self.deliver_round(name, method, [fan], rnd, n)
                lat = res["latency_ms"]
                if lat.get("n"):
                    res["time_to_all_ms"] = lat["max"]
                self.record["phases"][name] = res

    def mode_queue(self):
        """M messages to absent ids, --per-id K to each (M/K ids, K passes over them); with
        K > 1 Redis's memory is also split into the ids' first messages and the others."""
        k = self.args.per_id
        m = self.args.messages // k * k
        ids = ["%s%d" % (self.tag, i) for i in range(m // k)]
        method = self.args.publish[0]
        base = self.snapshot()
        self.phase = "queue"
        self.log("queue: publishing %d messages to %d absent ids via %s" % (m, len(ids), method))
        ok, errors, took = 0, collections.Counter(), 0.0
        for rnd in range(1, k + 1):
            t0 = time.monotonic()
            done, err = self.publish(method, ids, rnd)
            took += time.monotonic() - t0
            ok += done
            errors.update(err)
            if rnd == 1:
                first, first_ok = (self.snapshot(), ok) if k > 1 else (None, ok)
        errors = dict(errors)
        self.close_publishers()
        time.sleep(self.args.settle)
        after = self.snapshot()
        if errors:
            self.problem("queue: publish errors %s" % errors)
        res = {"messages": m, "ids": len(ids), "per_id": k, "published": ok,
               "publish_errors": errors, "method": method,
               "publish_s": round(took, 3), "publish_per_s": round(ok / max(took, 1e-9), 1)}
        res.update(self.cost(base, after, max(ok, 1), "message"))
        res.update(self.memory_delta(base, after, max(ok, 1), "message"))
        res.update(self.redis_cost(base, after, ok))
        if "redis_used_memory_delta" in res and ok:
            res["redis_bytes_per_message"] = round(res["redis_used_memory_delta"] / ok, 1)
            if first is not None and first_ok and ok > first_ok:
                mem = [snap["redis"]["used_memory"] for snap in (base, first, after)]
                res["redis_bytes_per_first_message"] = round((mem[1] - mem[0]) / first_ok, 1)
                res["redis_bytes_per_later_message"] = round((mem[2] - mem[1])
                                                             / (ok - first_ok), 1)
        # Drain a sample.
        sample = sorted(random.sample(range(len(ids)), min(self.args.drain_sample, len(ids))))
        conn = HttpConn(self.args.host, self.args.port, timeout=3)
        good = bad = 0
        lat = []
        bad_examples = []
        for i in sample:
            self.check_time()
            x = ids[i]
            path = ("/sub/%s" % x) if self.args.proto == "nchan" else "/sub/%s?since=0&timeout=1" % x
            t = time.monotonic()
            try:
                status, body = conn.request("GET", path)
            except (OSError, ValueError) as e:
                bad += 1
                bad_examples.append((x, repr(e)))
                conn.close()
                continue
            lat.append((time.monotonic() - t) * 1e3)
            if self.args.proto == "nchan":
                datas = [body.decode("utf-8", "replace")] if status == 200 else []
            else:
                try:
                    datas = [mm["data"] for mm in json.loads(body)["messages"]]
                except (ValueError, KeyError, TypeError):
                    datas = []
            # All K (Nchan's long-poll: the oldest), each naming its id.
            want = 1 if self.args.proto == "nchan" else k
            if status == 200 and len(datas) == want and all(
                    d.split("|", 3)[2:3] == [x] for d in datas):
                good += 1
            else:
                bad += 1
                if len(bad_examples) < 5:
                    bad_examples.append((x, status, body[:200].decode("latin-1")))
        conn.close()
        res["drain"] = {"sample": len(sample), "ok": good, "bad": bad,
                        "latency_ms": percentiles(lat), "bad_examples": bad_examples}
        if bad:
            self.problem("queue drain: %d of %d sampled ids wrong, e.g. %s"
                         % (bad, len(sample), bad_examples[:2]))
        self.record["phases"]["queue"] = res
        self.log("queue: %d published in %.2fs; %s" % (ok, took, {
            k: v for k, v in res.items() if k.endswith("per_message")}))

    def mode_churn(self):
        args = self.args
        n = args.connections
        ids = ["%s%d" % (self.tag, i) for i in range(n)]
        self.spawn(n, lambda i, t=self.tag: ("%s%d" % (t, i)).encode())
        self.record["phases"]["open"] = self.open_phase(n)
        self.await_polls("churn")
        self.command("round", round=1)
        method = args.publish[0]
        before = self.snapshot()
        self.phase = "churn"
        self.log("churn: %d subscribers, %.0f msg/s via %s for %.0fs"
                 % (n, args.rate, method, args.churn_time))
        t0 = time.monotonic()
        sent = ok = 0
        errors = collections.Counter()
        cursor = random.randrange(n)
        tick = 0.02
        while True:
            now = time.monotonic()
            if now - t0 >= args.churn_time:
                break
            self.check_time()
            due = min(int(args.rate * (now - t0)) - sent, MAX_BATCH)
            if due > 0:
                batch = [ids[(cursor + k) % n] for k in range(due)]
                cursor = (cursor + due) % n
                sent += due
                good, err = self.publish(method, batch, 1, background=False)
                ok += good
                errors.update(err)
            self.pump(max(0.0, tick - (time.monotonic() - now)))
            self.show(extra=" published %d" % sent)
        t1 = time.monotonic()
        self.close_publishers()
        closed = self.agg()[0]["closed"]
        if closed:
            self.problem("churn: %d subscriber connections closed: %s" % (closed, dict(self.agg()[1])))
        self.phase = "churn drain"
        self.wait(lambda: self.agg()[0]["delivered"] >= ok, 10, "churn: drain",
                  stall=3, value=lambda: self.agg()[0]["delivered"])
        after = self.snapshot()
        reports = self.command("report")
        self.command("repoll", on=False)
        self.show(force=True)
        res = self.round_result(reports, t0, t1, ok, "churn")
        tot = collections.Counter()
        for r in reports:
            tot.update(r["counts"])
        res.pop("exactly_one")
        res.pop("missing")
        res.pop("duplicated")
        res.update(subscribers=n, rate_target=args.rate, method=method, published=ok,
                   publish_errors=dict(errors), seconds=round(t1 - t0, 3),
                   publish_per_s=round(ok / max(t1 - t0, 1e-9), 1),
                   lost=ok - res["delivered"], responses=tot["responses"], empty=tot["empty"])
        if res["delivered"]:
            res["messages_per_response"] = round(res["delivered"] / max(1, tot["responses"]
                                                                      - tot["empty"]), 3)
            res["sustained_deliveries_per_s"] = round(res["delivered"] / max(t1 - t0, 1e-9), 1)
        res.update(self.cost(before, after, max(res["delivered"], 1), "delivery"))
        if errors:
            self.problem("churn: publish errors %s" % dict(errors))
        if res["lost"] or res["wrong_id"]:
            self.problem("churn: %d messages not delivered, %d wrong id"
                         % (res["lost"], res["wrong_id"]))
        self.record["phases"]["churn"] = res

    def mode_resubscribe(self):
        """Cluster mode: --connections WebSockets on --ids-per-conn ids each, until Redis
        counts all their channels; held idle for --hold seconds; one message to a sample (an id of every connection, at
        every position in turn) to check them; then Redis restarts (ask_restart), and a
        message to each sample id, stamped with the moment Redis answered again, must reach
        its subscriber: the round's latencies are the times from the restart, its max the
        time the node took to join the sample's channels again (publishes refused meanwhile
        are sent again).  Redis's own count of channels is followed too (ChannelWatch)."""
        args = self.args
        n, k = args.connections, args.ids_per_conn
        total = n * k
        ports = args.redis_port
        self.spawn(n, lambda i, t=self.tag, k=k: ",".join(
            "%s%d" % (t, x) for x in range(i * k, (i + 1) * k)).encode())
        t0 = time.monotonic()
        opened = self.record["phases"]["open"] = self.open_phase(n)
        opened["ids"] = total
        self.phase = "join"
        # From the first connect until Redis counts every channel.
        if self.wait(lambda: (redis_channels(ports) or 0) >= total, max(60.0, total / 2000),
                     "resubscribe: Redis counting the %d channels" % total):
            opened["channels_joined_s"] = round(time.monotonic() - t0, 3)
        # Holding them, idle: what the ids cost the nodes (and Redis) when nothing happens.
        self.phase = "hold"
        before = self.snapshot()
        end = time.monotonic() + args.hold
        self.wait(lambda: time.monotonic() >= end, args.hold + 5, "hold")
        after = self.snapshot()
        wall = after["t"] - before["t"]
        hold = self.record["phases"]["hold"] = self.cost(before, after, total, "id")
        hold.update(seconds=round(wall, 3),
                    nodes_cores_busy=round(hold["cpu_s"] / wall, 3),
                    redis_cores_busy=round(hold.get("redis_cpu_s", 0) / wall, 3))
        sample = ["%s%d" % (self.tag, i * k + i % k) for i in range(n)]
        method = args.publish[0]
        self.record["phases"]["before"] = self.deliver_round("before", method, sample, 1, n)
        times = self.ask_restart()
        if times is None:
            return
        watch = ChannelWatch(ports, total, times["up_ns"])
        try:
            res = self.deliver_round("rejoin", method, sample, 2, n, stamp=times["up_ns"],
                                     retry=max(0.0, self.deadline - time.monotonic() - 30),
                                     before=self.snapshot())
        finally:
            watch.stop()
        res.update(ids=total, restart_s=round((times["up_ns"] - times["down_ns"]) / 1e9, 3),
                   channels_rejoined_s=watch.reached_s, channels_curve=watch.curve)
        if res["latency_ms"].get("n"):
            res["time_to_all_ms"] = res["latency_ms"]["max"]
        self.record["phases"]["rejoin"] = res
        if watch.reached_s is None:
            self.problem("rejoin: Redis counted %s of the %d channels at the end"
                         % (watch.last, total))

    def ask_restart(self):
        """Ask whoever runs us to restart Redis now (a line on stdout) and wait for the answer
        on stdin: a JSON object {"down_ns", "up_ns"} (CLOCK_MONOTONIC ns: Redis stopped,
        Redis answering again; bench sends it), or an empty line from a person who restarted
        it by hand (then both are now).  None, and a problem, if no answer comes."""
        self.phase = "restart"
        self.log("asking for a Redis restart (stdout), waiting for its times (stdin)")
        print("megatest: restart redis now", flush=True)
        end = min(self.deadline, time.monotonic() + 120)
        while time.monotonic() < end:
            self.pump(0.05)
            if select.select([sys.stdin], [], [], 0)[0]:
                line = sys.stdin.readline()
                if not line:
                    break
                if not line.strip():
                    now = MONO()
                    return {"down_ns": now, "up_ns": now}
                try:
                    times = json.loads(line)
                    return {"down_ns": int(times["down_ns"]), "up_ns": int(times["up_ns"])}
                except (ValueError, KeyError, TypeError):
                    self.problem("restart: not an answer: %r" % line[:200])
                    return None
        self.problem("restart: no answer on stdin (who restarts Redis?)")
        return None

    # -- driver ------------------------------------------------------------
    def run(self):
        args = self.args
        st = self.stats()
        self.counts_subscribers = self.totals(st, "subscribers") is not None
        if st is None:
            self.problem("no stats from %s:%d%s (memory/CPU figures limited to --server-pid)"
                         % (args.host, args.app_port, args.stats_path))
        self.record["server"] = {"pids": self.server_pids(st), "supervisor": args.server_pid,
                                 "uptime_s": (st or {}).get("uptime_s")}
        with open("/proc/loadavg") as f:
            self.record["loadavg_at_start"] = f.read().split()[:3]
        try:
            getattr(self, "mode_" + args.mode)()
        except Stopped as e:
            self.problem("stopped: %s" % e)
            self.record["stopped"] = str(e)
        finally:
            signal.alarm(0)
            self.phase = "teardown"
            self.close_publishers()
            try:
                if self.children:
                    # Closing is the kernel's work on both ends: about 20 000/s here.
                    self.command("close", timeout=max(10.0, self.args.connections / 20000))
            except Stopped:
                pass
            self.shutdown()
        self.record["problems"] = self.problems
        self.record["ok"] = not self.problems
        self.record["elapsed_s"] = round(time.monotonic() - self.t_start, 3)
        return self.record


def summary_line(rec):
    transport = rec.get("transport", "poll")
    bits = ["megatest %s:" % (rec["mode"] if transport == "poll"
                              else "%s/%s" % (rec["mode"], transport))]
    for name, p in rec["phases"].items():
        f = []
        for k in ("opened", "target", "open_per_s", "confirmed_per_s", "delivered", "expected",
                  "missing", "duplicated", "wrong_id", "deliveries_per_s",
                  "sustained_deliveries_per_s", "time_to_all_ms", "published",
                  "rss_bytes_per_connection", "pss_bytes_per_connection",
                  "rss_bytes_per_message", "pss_bytes_per_message", "cpu_us_per_connection",
                  "cpu_us_per_delivery", "cpu_us_per_message"):
            if k in p:
                f.append("%s=%s" % (k, p[k]))
        lat = p.get("latency_ms")
        if lat and lat.get("n"):
            f.append("lat_ms p50=%s p99=%s max=%s" % (lat["p50"], lat["p99"], lat["max"]))
        if "drain" in p:
            f.append("drain_ok=%d/%d" % (p["drain"]["ok"], p["drain"]["sample"]))
        bits.append("[%s %s]" % (name, " ".join(f)))
    bits.append("ok" if rec.get("ok") else "PROBLEMS=%d" % len(rec.get("problems", ())))
    return " ".join(bits)


def loopback(host):
    try:
        return socket.inet_aton(host)[0] == 127
    except OSError:
        return False


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Load generator for MegaComet and servers speaking its API (loopback only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=MODES, default="hold")
    p.add_argument("--transport", choices=TRANSPORTS, default=None,
                   help="how subscribers subscribe: long-poll, EventSource or WebSocket "
                        "(sse and ws: hold, deliver and fanout modes; resubscribe: ws only). "
                        "Default: poll, resubscribe ws")
    p.add_argument("--connections", "-n", type=int, default=10000,
                   help="subscriber connections")
    p.add_argument("--messages", "-m", type=int, default=100000, help="queue mode: messages")
    p.add_argument("--per-id", type=int, default=1, metavar="K",
                   help="queue mode: messages to each id (M/K ids)")
    p.add_argument("--host", default="127.0.0.1", help="server address (127.0.0.0/8 only)")
    p.add_argument("--port", type=int, default=8000, help="client port")
    p.add_argument("--app-port", type=int, default=9000,
                   help="application port: publishes and /stats (subscribers counted there)")
    p.add_argument("--publish-to", action="append", default=[], metavar="[NAME=]PORT",
                   help="publish on this app port instead (e.g. another cluster node's); "
                        "repeatable: deliver and fanout then run a round per port, their "
                        "phases named with NAME (deliver_single_NAME), queue uses the first")
    p.add_argument("--redis-port", type=int, action="append", default=[], metavar="PORT",
                   help="cluster mode: a Redis server on 127.0.0.1 the servers use "
                        "(repeatable): its CPU, INFO commandstats, used_memory and channels "
                        "are measured with the server's")
    p.add_argument("--ids-per-conn", type=int, default=1, metavar="K",
                   help="ids each subscriber connection subscribes to (/ws/a,b,c; ws only)")
    p.add_argument("--proto", choices=("megacomet", "nchan"), default="megacomet",
                   help="subscriber protocol: MegaComet JSON, or Nchan long-poll")
    p.add_argument("--stats-path", default="/stats")
    p.add_argument("--server-pid", type=int, action="append",
                   help="supervisor pid (repeatable); its descendants count as server too")
    p.add_argument("--publish", default=None,
                   help="comma list of publish methods: batch, binary, single "
                        "(default: deliver batch,binary; others batch; nchan single)")
    p.add_argument("--batch-size", type=int, default=1000, help="messages per POST /pub")
    p.add_argument("--pub-conns", type=int, default=1, help="parallel publisher connections")
    p.add_argument("--pipeline", type=int, default=128,
                   help="single: POST /pub/<id> requests in flight per connection")
    p.add_argument("--publish-shape", action="append", default=[], metavar="NAME=CONNSxDEPTH",
                   help="deliver: a single-publish round per shape (repeatable), named "
                        "deliver_single_NAME, over CONNS connections DEPTH requests deep "
                        "each, e.g. spread=8x16 (instead of --pub-conns and --pipeline)")
    p.add_argument("--paced", type=float, default=0.0, metavar="RATE",
                   help="deliver: one more single-publish round per target, named "
                        "deliver_single_..._paced, at RATE messages/s in all over the same "
                        "connections, one request deep (publish-to-receive latency without "
                        "the publisher's queues)")
    p.add_argument("--procs", type=int, default=0, help="client processes (0: auto)")
    p.add_argument("--per-proc", type=int, default=15000,
                   help="connections per client process when --procs is auto")
    p.add_argument("--per-source", type=int, default=10000,
                   help="connections per loopback source address")
    p.add_argument("--source-base", default="127.0.0.1",
                   help="source addresses start after this one")
    p.add_argument("--inflight", type=int, default=2048, help="connects in flight, total")
    p.add_argument("--connect-rate", type=float, default=0, help="connects/s cap (0: none)")
    p.add_argument("--connect-timeout", type=float, default=15.0)
    p.add_argument("--retries", type=int, default=2, help="connect retries per connection")
    p.add_argument("--poll-timeout", type=int, default=120, help="timeout= of each long-poll")
    p.add_argument("--confirm-timeout", type=float, default=20.0,
                   help="wait for /stats to count the subscribers")
    p.add_argument("--hold", type=float, default=5.0,
                   help="hold mode: seconds to hold; resubscribe: seconds held idle")
    p.add_argument("--rounds", type=int, default=1, help="fanout mode: publishes")
    p.add_argument("--rate", type=float, default=5000, help="churn mode: messages/s")
    p.add_argument("--churn-time", type=float, default=10.0, help="churn mode: seconds")
    p.add_argument("--drain-sample", type=int, default=1000, help="queue mode: ids drained")
    p.add_argument("--settle", type=float, default=0.5,
                   help="seconds to wait after a round before reading memory/reports")
    p.add_argument("--stall", type=float, default=10.0,
                   help="give up waiting for deliveries after this long without progress")
    p.add_argument("--duration", type=float, default=600.0, help="hard cap on the whole run (s)")
    p.add_argument("--id-prefix", default="mt")
    p.add_argument("--json", metavar="FILE", help="write the record as JSON")
    args = p.parse_args(argv)
    if not loopback(args.host):
        p.error("--host must be a 127.0.0.0/8 address (loopback-only load)")
    if not loopback(args.source_base):
        p.error("--source-base must be a 127.0.0.0/8 address")
    if args.transport is None:
        args.transport = "ws" if args.mode == "resubscribe" else "poll"
    try:
        args.publish_to = [(t.rpartition("=")[0], int(t.rpartition("=")[2]))
                           for t in args.publish_to] or [("", args.app_port)]
    except ValueError:
        p.error("--publish-to takes [NAME=]PORT")
    try:
        args.publish_shape = [(n, int(c), int(d)) for n, c, d in
                              (re.fullmatch(r"([\w-]+)=(\d+)x(\d+)", t).groups()
                               for t in args.publish_shape)]
    except AttributeError:
        p.error("--publish-shape takes NAME=CONNSxDEPTH, e.g. spread=8x16")
    if any(c < 1 or d < 1 for _, c, d in args.publish_shape):
        p.error("--publish-shape: connections and depth must be positive")
    if args.paced < 0 or any(n == "paced" for n, _, _ in args.publish_shape):
        p.error("--paced takes a positive rate, and names its own round (no shape 'paced')")
    if args.publish is None:
        if args.proto == "nchan" or args.mode == "resubscribe":
            args.publish = "single"
        elif args.mode == "deliver":
            args.publish = "batch,binary"
        elif args.mode == "fanout":
            args.publish = "single"
        else:
            args.publish = "batch"
    args.publish = [x.strip() for x in args.publish.split(",") if x.strip()]
    for x in args.publish:
        if x not in ("batch", "binary", "single"):
            p.error("unknown publish method %r" % x)
    if args.proto == "nchan" and set(args.publish) - {"single"}:
        p.error("nchan supports only --publish single")
    if args.transport != "poll" and args.mode not in STREAM_MODES + ("resubscribe",):
        p.error("--transport %s applies to the %s modes; %s subscribers only long-poll"
                % (args.transport, "/".join(STREAM_MODES), args.mode))
    if args.ids_per_conn < 1 or (args.ids_per_conn > 1 and (args.transport != "ws"
                                                             or args.proto != "megacomet")):
        p.error("--ids-per-conn K > 1 needs --transport ws and --proto megacomet")
    if args.mode == "resubscribe" and (args.transport != "ws" or not args.redis_port):
        p.error("--mode resubscribe needs --transport ws and --redis-port")
    if args.connections < 1 or args.messages < 1 or not 1 <= args.per_id <= args.messages:
        p.error("--connections and --messages must be positive, --per-id from 1 to --messages")
    return args


def main(argv=None):
    args = parse_args(argv)
    coord = Coordinator(args)
    me = os.getpid()
    hits = [0]

    def on_signal(signum, frame):
        if os.getpid() != me:
            os._exit(1)
        hits[0] += 1
        if hits[0] > 1:
            for c in coord.children:
                try:
                    os.kill(c["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os._exit(130)
        raise Stopped(signal.Signals(signum).name)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(sig, on_signal)
    signal.alarm(int(args.duration) + 1)
    try:
        rec = coord.run()
    except Stopped as e:          # a signal outside the guarded section
        coord.shutdown()
        rec = coord.record
        rec["stopped"] = str(e)
        rec["ok"] = False
    line = summary_line(rec)
    rec["summary"] = line
    print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1)
    return 0 if rec.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())

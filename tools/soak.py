#!/usr/bin/env python3
"""soak: a steady mixed load for a long while; worker memory and fds must stay flat,
and /stats counters must add up.

It starts its own server and runs, for --duration seconds, all at once:

  held      long-polls on ids nobody publishes to, answered only by their timeout
  active    subscribers re-polling ``since=<last>`` at once after each answer
  compat    ``GET /<id>.js`` readers, one per id, a new connection per message
  churn     connections opened and closed: a short poll read to its end, a poll
            abandoned while held, a request cut off mid-headers, an OPTIONS
  publish   ``POST /pub/<id>``, NDJSON batches, binary frames; app connections
            are re-opened now and then

Every --interval seconds it samples each worker's /proc/PID/status (VmRSS,
RssShmem) and fd count.  At the end it stops publishing, lets subscribers
drain, checks the counters, closes every connection, and checks:

  memory    per worker, private RSS (VmRSS - RssShmem) averaged over the last
            third of the samples is at most max(--rss-tol-mb 3, --rss-tol-pct 10
            of it) above the first sample after warm-up.  Pages of the shared
            message store count into VmRSS as they are first written, up to
            --shm-mb, however healthy the worker: they are shown, not judged
            (600 s at the defaults: 6.6 -> 9.0 MiB per worker, still rising).
            Why 3 MiB: in that run private RSS moved 0.1 MiB after warm-up
            (pymalloc arenas are 1 MiB; a dict resize a few hundred KiB), while
            the load makes ~1400 requests/s, so 3 MiB flags a leak of ~130 B a
            request in the 30 s CI run and of ~6 B a request in 600 s.
  fds       per worker, the last-third average is within max(20, 5 %) of the
            first sample after warm-up (the load's connections are steady),
            and once the load's connections are closed every worker is back
            to its idle count from before the load (+2 for the /stats probe).
  counters  /stats totals: received == published + refused == the
            messages this tool sent; delivered == the
            messages its subscribers read; connections <= 1 (the /stats probe
            itself) and subscribers == 0 after closing; accepted == the
            connections it opened.  Active subscribers and compat readers got
            every message of their id exactly once (no kills here: no excuse).

Exit status 0 only if all of that holds and nothing hung or failed.

It must never send traffic off loopback, never leave a process behind (the
server tree is stopped by pid on any exit, Ctrl-C included), and every wait
in it is bounded.  Standard library only; the server and HTTP helpers are
tools/chaos.py's.

    python tools/soak.py                           # 10 minutes
    python tools/soak.py --duration 30 --interval 2 --json soak.json
"""

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chaos import HOST, HttpError, ServerTree, build_request, error_name, read_response  # noqa: E402

CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0
FD_SLACK_IDLE = 2            # the /stats probe's own connection may still be open on a worker
MIB = 1 << 20


def proc_sample(pid):
    """VmRSS and RssShmem in bytes and the open fd count of pid, or None if it is gone."""
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
        out["fds"] = len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return None
    out["private"] = out.get("VmRSS", 0) - out.get("RssShmem", 0)
    return out


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.server = None
        self.counts = collections.Counter()     # client-side events
        self.errors = collections.Counter()     # unexpected ones: any fails the run
        self.opened = 0                         # connections this tool opened (server: accepted)
        self.sent = 0                           # messages handed over: 202 lines + binary frames
        self.read = 0                           # messages subscribers read
        self.samples = []
        self.notes = []
        a = args
        self.quiet_ids = ["quiet-%d" % k for k in range(max(1, a.held // 4))]
        self.active_ids = ["act-%d" % k for k in range(max(1, a.active // 5))]
        self.compat_ids = ["cjs-%d" % k for k in range(a.compat)]
        self.published = collections.Counter()  # id -> messages sent to it (seq = this count)
        self.compat_sent = collections.defaultdict(set)
        self.compat_got = collections.defaultdict(list)
        self.active_state = []                  # per active subscriber: [id, last seq, gaps, repeats]

    # -- connections ---------------------------------------------------------------
    async def open(self, port):
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), CONNECT_TIMEOUT)
        self.opened += 1
        return reader, writer

    async def guarded(self, name, body):
        """Run one load loop until it returns or is cancelled; an unexpected error is counted,
        then the loop starts again."""
        while True:
            try:
                return await body()
            except asyncio.CancelledError:
                raise
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, HttpError, ValueError,
                    KeyError) as e:
                self.errors["%s: %s" % (name, error_name(e))] += 1
                await asyncio.sleep(0.2)

    # -- subscribers ---------------------------------------------------------------
    async def held(self, k):
        ident = self.quiet_ids[k % len(self.quiet_ids)]
        request = build_request("GET", "/sub/%s?timeout=%d" % (ident, self.args.hold_timeout))
        reader, writer = await self.open(self.server.client)
        try:
            while True:
                writer.write(request)
                status, body, close = await asyncio.wait_for(read_response(reader),
                                                             self.args.hold_timeout + REQUEST_TIMEOUT)
                doc = json.loads(body)
                if status != 200 or doc["messages"] or close:
                    raise HttpError("held poll answered %d %r" % (status, body[:80]))
                self.counts["held timeouts"] += 1
        finally:
            writer.close()

    async def active(self, k):
        state = self.active_state[k]
        ident = state[0]
        reader, writer = await self.open(self.server.client)
        try:
            while True:
                writer.write(build_request("GET", "/sub/%s?since=%d&timeout=20" % (ident, state[1])))
                status, body, close = await asyncio.wait_for(read_response(reader),
                                                             20 + REQUEST_TIMEOUT)
                if status != 200:
                    raise HttpError("active poll answered %d" % status)
                doc = json.loads(body)
                for m in doc["messages"]:
                    if m["seq"] == state[1] + 1:
                        pass
                    elif m["seq"] <= state[1]:
                        state[3] += 1
                    else:
                        state[2] += m["seq"] - state[1] - 1
                    state[1] = max(state[1], m["seq"])
                self.read += len(doc["messages"])
                self.counts["active answers"] += 1
                if close:
                    raise HttpError("keep-alive poll closed by the server")
        finally:
            writer.close()

    async def compat(self, k):
        ident = self.compat_ids[k]
        request = build_request("GET", "/%s.js" % ident)
        while True:
            reader, writer = await self.open(self.server.client)
            try:
                writer.write(request)
                status, body, _ = await asyncio.wait_for(read_response(reader), 30 + REQUEST_TIMEOUT)
            finally:
                writer.close()
            if status != 200:
                raise HttpError("compat poll answered %d" % status)
            if body:
                self.compat_got[ident].append(body.decode())
                self.read += 1
            self.counts["compat answers"] += 1

    async def churn(self, k):
        """Connections that come and go; none of them may take a message, so counts stay exact."""
        rng = random.Random(self.args.seed * 1000 + k)
        while True:
            kind = rng.randrange(4)
            ident = rng.choice(self.quiet_ids)
            reader, writer = await self.open(self.server.client)
            try:
                if kind == 0:                     # a short poll, read to its end
                    query = "timeout=1" + ("&callback=cb%d" % k if rng.random() < 0.3 else "")
                    writer.write(build_request("GET", "/sub/%s?%s" % (ident, query)))
                    status, _, _ = await asyncio.wait_for(read_response(reader), 1 + REQUEST_TIMEOUT)
                    if status != 200:
                        raise HttpError("short poll answered %d" % status)
                elif kind == 1:                   # a poll abandoned while it is held
                    writer.write(build_request("GET", "/sub/%s?timeout=30" % ident))
                    await asyncio.sleep(rng.uniform(0.01, 0.3))
                elif kind == 2:                   # headers cut off half-way
                    writer.write(b"GET /sub/%s?timeout=5 HTTP/1.1\r\nHo" % ident.encode())
                    await asyncio.sleep(rng.uniform(0.0, 0.1))
                else:
                    writer.write(build_request("OPTIONS", "/sub/%s" % ident))
                    status, _, _ = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT)
                    if status != 204:
                        raise HttpError("OPTIONS answered %d" % status)
                self.counts["churn %d" % kind] += 1
            finally:
                writer.close()
            await asyncio.sleep(rng.uniform(0.0, 2 * self.args.churn_pause))

    # -- publishers ----------------------------------------------------------------
    def pick(self, rng):
        ident = rng.choice(self.targets)
        self.published[ident] += 1
        token = "%s#%d" % (ident, self.published[ident])
        if ident in self.compat_sent:
            self.compat_sent[ident].add(token)
        return ident, token

    async def paced(self, rate, step, stop):
        """Call step() `rate` times a second until stop; no catch-up bursts."""
        next_at = time.monotonic()
        while not stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    return
                except asyncio.TimeoutError:
                    pass
            next_at = max(next_at + 1.0 / rate, time.monotonic() - 1.0)
            await step()

    async def http_publisher(self, batch, rate, stop):
        rng = random.Random(self.args.seed * 7 + batch)
        conn = [None, None, 0]                    # reader, writer, requests on it

        async def step():
            if conn[1] is None or conn[2] >= self.args.requests_per_conn:
                if conn[1] is not None:
                    conn[1].close()
                conn[0], conn[1] = await self.open(self.server.app)
                conn[2] = 0
            items = [self.pick(rng) for _ in range(batch or 1)]
            if batch:
                body = "".join('{"id":"%s","data":"%s"}\n' % it for it in items).encode()
                request = build_request("POST", "/pub", body)
            else:
                request = build_request("POST", "/pub/" + items[0][0], items[0][1].encode())
            conn[1].write(request)
            conn[2] += 1
            try:
                status, body, close = await asyncio.wait_for(read_response(conn[0]), REQUEST_TIMEOUT)
            except BaseException:
                conn[1].close()
                conn[1] = None
                raise
            doc = json.loads(body) if status == 202 else None
            if status != 202 or (batch and doc["errors"]):
                raise HttpError("publish answered %d %r" % (status, body[:200]))
            self.sent += len(items)
            if close:
                conn[1].close()
                conn[1] = None
        try:
            await self.guarded("publish" if not batch else "batch publish",
                               lambda: self.paced(rate, step, stop))
        finally:
            if conn[1] is not None:
                conn[1].close()

    async def binary_publisher(self, per_frame_batch, rate, stop):
        rng = random.Random(self.args.seed * 11)
        conn = [None, 0]

        async def step():
            if conn[0] is None or conn[1] >= self.args.requests_per_conn * 10:
                await self.close_binary(conn[0])
                _, conn[0] = await self.open(self.server.app)
                conn[1] = 0
            items = [self.pick(rng) for _ in range(per_frame_batch)]
            conn[0].write(b"".join(b"\x02%s\x00%s\x00" % (i.encode(), t.encode()) for i, t in items))
            await asyncio.wait_for(conn[0].drain(), REQUEST_TIMEOUT)
            conn[1] += len(items)
            self.sent += len(items)
        try:
            await self.guarded("binary publish", lambda: self.paced(rate, step, stop))
        finally:
            await self.close_binary(conn[0])

    @staticmethod
    async def close_binary(writer):
        """Half-close, so that the server reads every frame before it sees the end."""
        if writer is None:
            return
        try:
            writer.write_eof()
            await asyncio.wait_for(writer.drain(), 2)
        except (OSError, asyncio.TimeoutError):
            pass
        writer.close()

    # -- sampling ----------------------------------------------------------------
    async def stats(self):
        """/stats on a connection of its own (counted: the server's `accepted` must match)."""
        for _ in range(5):
            try:
                reader, writer = await self.open(self.server.app)
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.1)
                continue
            try:
                writer.write(build_request("GET", "/stats", close=True))
                status, body, _ = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT)
                if status == 200:
                    return json.loads(body)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, HttpError, ValueError):
                pass
            finally:
                writer.close()
            await asyncio.sleep(0.1)
        self.errors["/stats unanswered"] += 1
        return None

    async def sample(self, phase):
        stats = await self.stats()
        if stats is None:
            return None
        totals = stats["totals"]
        row = {"t": round(time.monotonic() - self.t0, 1), "phase": phase, "workers": [],
               "connections": totals["connections"], "subscribers": totals["subscribers"],
               "delivered": totals["delivered"], "received": totals["received"]}
        for w in stats["workers"]:
            pid = w["pid"]
            s = proc_sample(pid) if self.server.is_worker(pid) else None
            row["workers"].append(dict(s or {}, pid=pid))
        self.samples.append(row)
        return stats

    async def sampler(self, stop):
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.args.interval)
            except asyncio.TimeoutError:
                await self.sample("load")

    # -- the run ------------------------------------------------------------------
    async def run(self):
        a = self.args
        self.t0 = time.monotonic()
        self.targets = self.active_ids + self.compat_ids
        for ident in self.compat_ids:
            self.compat_sent[ident] = set()
        await asyncio.sleep(0.5)
        await self.sample("idle")                 # the baseline fds go back to
        self.idle = self.samples[-1]
        # Per active subscriber: its id, last seq, seqs skipped, seqs repeated.
        self.active_state = [[self.active_ids[k % len(self.active_ids)], 0, 0, 0]
                             for k in range(a.active)]
        subs = [asyncio.create_task(self.guarded("held poll", lambda k=k: self.held(k)))
                for k in range(a.held)]
        subs += [asyncio.create_task(self.guarded("active poll", lambda k=k: self.active(k)))
                 for k in range(a.active)]
        subs += [asyncio.create_task(self.guarded("compat poll", lambda k=k: self.compat(k)))
                 for k in range(a.compat)]
        churn = [asyncio.create_task(self.guarded("churn", lambda k=k: self.churn(k)))
                 for k in range(a.churn)]
        expected = a.held + a.active + a.compat
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:       # every subscriber held before the first publish
            stats = await self.stats()
            if stats and stats["totals"]["subscribers"] >= expected:
                break
            await asyncio.sleep(0.2)
        stop_pub = asyncio.Event()
        share = a.rate / 3.0
        pubs = [asyncio.create_task(self.http_publisher(0, share, stop_pub)),
                asyncio.create_task(self.http_publisher(a.batch_size, share / a.batch_size, stop_pub)),
                asyncio.create_task(self.binary_publisher(5, share / 5, stop_pub))]
        stop_sampler = asyncio.Event()
        self.load_t0 = time.monotonic()
        sampler = asyncio.create_task(self.sampler(stop_sampler))
        await asyncio.sleep(a.duration)
        # Publishing stops; subscribers drain; the counters must meet.
        stop_pub.set()
        await asyncio.wait(pubs, timeout=REQUEST_TIMEOUT + 5)
        for t in pubs:
            t.cancel()
        stop_sampler.set()
        await asyncio.wait([sampler], timeout=10)
        last, stable, drain_t0 = -1, time.monotonic(), time.monotonic()
        while time.monotonic() - drain_t0 < 20:
            if self.read != last:
                last, stable = self.read, time.monotonic()
            elif time.monotonic() - stable > 2.0:
                break
            await asyncio.sleep(0.2)
        self.loaded_stats = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = await self.stats()
            if stats:
                self.loaded_stats = stats
                t = stats["totals"]
                if t["received"] == t["published"] + self.refused(t) and t["delivered"] == self.read:
                    break
            await asyncio.sleep(0.25)
        # Close everything the load opened; the server must let go of all of it.
        for t in subs + churn:
            t.cancel()
        await asyncio.wait(subs + churn, timeout=10)
        self.closed_stats = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            stats = await self.sample("closed")
            if stats:
                self.closed_stats = stats
                if stats["totals"]["connections"] <= 1 and stats["totals"]["subscribers"] == 0 and \
                        self.fds_back(self.samples[-1]):
                    break

    def refused(self, totals):
        """Messages the server refused (id table full): its /stats counter, or for a server
        without one, its log lines."""
        if "refused" in totals:
            return totals["refused"]
        return len(re.findall(r"id table full, message", self.server.log_text()))

    def fds_back(self, row):
        return all(w.get("fds", 1 << 30) <= i.get("fds", 0) + FD_SLACK_IDLE
                   for w, i in zip(row["workers"], self.idle["workers"]))

    # -- the verdict ----------------------------------------------------------------
    def flatness(self, problems):
        """Per worker: private RSS and fds, first sample after warm-up vs the last third."""
        a = self.args
        warm_until = (self.load_t0 - self.t0) + max(a.warmup, a.duration / 5.0)
        after = [r for r in self.samples if r["phase"] == "load" and r["t"] >= warm_until]
        if len(after) < 3:
            problems.append("only %d samples after warm-up: run longer or sample more often"
                            % len(after))
            return []
        tail = after[-max(1, len(after) // 3):]
        rows = []
        for w, idle in enumerate(self.idle["workers"]):
            series = [r["workers"][w] for r in after]
            base = series[0]
            if any(s.get("pid") != base.get("pid") or "fds" not in s for s in series):
                problems.append("worker %d changed pid (or could not be sampled) during the soak" % w)
                continue
            ends = [r["workers"][w] for r in tail]
            row = {"worker": w, "pid": base["pid"],
                   "private_start": base["private"], "private_end": mean(s["private"] for s in ends),
                   "rss_start": base["VmRSS"], "rss_end": mean(s["VmRSS"] for s in ends),
                   "shm_start": base.get("RssShmem", 0), "shm_end": ends[-1].get("RssShmem", 0),
                   "fds_idle": idle.get("fds"), "fds_start": base["fds"],
                   "fds_end": mean(s["fds"] for s in ends),
                   "fds_closed": self.samples[-1]["workers"][w].get("fds"),
                   "private_tolerance": max(a.rss_tol_mb * MIB,
                                            a.rss_tol_pct / 100.0 * base["private"]),
                   "fd_tolerance": max(20, 0.05 * base["fds"])}
            rows.append(row)
            grew = row["private_end"] - row["private_start"]
            if grew > row["private_tolerance"]:
                problems.append("worker %d: private RSS grew %.1f MiB (%.1f -> %.1f), tolerance %.1f MiB"
                                % (w, grew / MIB, row["private_start"] / MIB, row["private_end"] / MIB,
                                   row["private_tolerance"] / MIB))
            if abs(row["fds_end"] - row["fds_start"]) > row["fd_tolerance"]:
                problems.append("worker %d: %d fds after warm-up, %.0f at the end (tolerance %d)"
                                % (w, row["fds_start"], row["fds_end"], row["fd_tolerance"]))
        return rows

    def consistency(self, problems):
        """/stats totals against what this tool sent, read and opened."""
        if self.loaded_stats is None or self.closed_stats is None:
            problems.append("/stats unanswered at the end")
            return {}
        t, c = self.loaded_stats["totals"], self.closed_stats["totals"]
        refused = self.refused(t)
        counters = {"received": t["received"], "published": t["published"], "refused": refused,
                    "sent_by_soak": self.sent, "delivered": t["delivered"], "read_by_soak": self.read,
                    "accepted": c["accepted"], "opened_by_soak": self.opened,
                    "connections_after_close": c["connections"],
                    "subscribers_after_close": c["subscribers"],
                    "dropped": c["dropped"], "expired": c["expired"]}
        if t["received"] != t["published"] + refused:
            problems.append("received %d != published %d + refused %d"
                            % (t["received"], t["published"], refused))
        if t["received"] != self.sent:
            problems.append("server received %d, soak sent %d" % (t["received"], self.sent))
        if t["delivered"] != self.read:
            problems.append("server delivered %d, subscribers read %d" % (t["delivered"], self.read))
        if c["connections"] > 1 or c["subscribers"] != 0:
            problems.append("after closing: %d connections, %d subscribers"
                            % (c["connections"], c["subscribers"]))
        # The /stats request that read `accepted` is one of ours, counted on both sides.  A
        # connect that timed out here may still have been accepted there: a little slack.
        if c["accepted"] != self.opened:
            self.notes.append("accepted %d vs %d connections opened" % (c["accepted"], self.opened))
            if abs(c["accepted"] - self.opened) > max(5, self.opened // 1000):
                problems.append("server accepted %d connections, soak opened %d"
                                % (c["accepted"], self.opened))
        if not self.fds_back(self.samples[-1]):
            problems.append("fds not back to idle once the load closed: idle %s, now %s" % (
                [w.get("fds") for w in self.idle["workers"]],
                [w.get("fds") for w in self.samples[-1]["workers"]]))
        gaps = sum(s[2] for s in self.active_state)
        repeats = sum(s[3] for s in self.active_state)
        short = sum(1 for s in self.active_state if s[1] != self.published[s[0]])
        if gaps or repeats or short:
            problems.append("active subscribers: %d messages skipped, %d repeated, %d short of the "
                            "last seq" % (gaps, repeats, short))
        lost = sum(len(self.compat_sent[i] - set(self.compat_got[i])) for i in self.compat_ids)
        twice = sum(len(self.compat_got[i]) - len(set(self.compat_got[i])) for i in self.compat_ids)
        if lost or twice:
            problems.append("compat readers: %d messages never read, %d read twice" % (lost, twice))
        return counters

    def verdict(self):
        problems = []
        workers = self.flatness(problems)
        counters = self.consistency(problems)
        for name, n in sorted(self.errors.items()):
            problems.append("%d unexpected %s" % (n, name))
        pids = {self.server.proc.pid} | {w["pid"] for r in self.samples for w in r["workers"]
                                          if w.get("pid")}
        return {"ok": not problems, "problems": problems, "workers": workers, "counters": counters,
                "client_counts": dict(self.counts), "samples": self.samples, "notes": self.notes,
                "config": vars(self.args), "server": self.server.cmd[1:], "server_pids": sorted(pids)}


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def table(rec):
    n = len(rec["samples"][0]["workers"]) if rec["samples"] else 0
    head = "%7s %-6s %6s %5s %9s" % ("t s", "phase", "conns", "subs", "delivered")
    head += "".join("  | w%d %7s %6s %5s" % (w, "privMiB", "shmMiB", "fds") for w in range(n))
    lines = [head]
    for r in rec["samples"]:
        line = "%7.1f %-6s %6d %5d %9d" % (r["t"], r["phase"], r["connections"], r["subscribers"],
                                           r["delivered"])
        for s in r["workers"]:
            line += "  |    %7.1f %6.1f %5s" % (s.get("private", 0) / MIB, s.get("RssShmem", 0) / MIB,
                                                s.get("fds", "-"))
        lines.append(line)
    return "\n".join(lines)


def report(rec):
    lines = [table(rec), ""]
    for w in rec["workers"]:
        lines.append(
            "worker %d: private RSS %.1f -> %.1f MiB (tolerance +%.1f); VmRSS %.1f -> %.1f MiB, "
            "of which shared store %.1f -> %.1f; fds idle %s, after warm-up %d, end %.0f, "
            "closed %s" % (
                w["worker"], w["private_start"] / MIB, w["private_end"] / MIB,
                w["private_tolerance"] / MIB, w["rss_start"] / MIB, w["rss_end"] / MIB,
                w["shm_start"] / MIB, w["shm_end"] / MIB,
                w["fds_idle"], w["fds_start"], w["fds_end"], w["fds_closed"]))
    if rec["counters"]:
        lines.append("counters: " + ", ".join("%s %s" % kv for kv in rec["counters"].items()))
    lines.append("client: " + ", ".join("%s %d" % kv for kv in sorted(rec["client_counts"].items())))
    lines += ["note: " + n for n in rec["notes"]]
    lines += ["PROBLEM: " + p for p in rec["problems"]]
    lines.append("soak verdict: %s" % ("OK: flat and consistent" if rec["ok"] else "FAIL"))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600.0,
                   help="seconds of load (default %(default)s)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=10.0,
                   help="seconds of load before the reference sample (at least duration/5)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--held", type=int, default=1000, help="idle long-polls")
    p.add_argument("--hold-timeout", type=int, default=30, help="their ?timeout=")
    p.add_argument("--active", type=int, default=300, help="re-polling subscribers, 5 per id")
    p.add_argument("--compat", type=int, default=20, help="compat (.js) readers, one per id")
    p.add_argument("--churn", type=int, default=20, help="loops opening and closing connections")
    p.add_argument("--churn-pause", type=float, default=0.05,
                   help="mean pause between a churn loop's connections")
    p.add_argument("--rate", type=float, default=300.0, help="messages/s over all publishers")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--requests-per-conn", type=int, default=100,
                   help="app requests before a publisher reconnects")
    p.add_argument("--rss-tol-mb", type=float, default=3.0)
    p.add_argument("--rss-tol-pct", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the full record here")
    p.add_argument("server_args", nargs="*", help="more server flags, after --")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.interval <= 0 or args.active < 1:
        p.error("duration, interval and active must be positive")
    if args.held + args.active + args.compat + args.churn > 15000:
        p.error("at most 15000 connections from this one process (fd limit)")
    return args


class Interrupted(Exception):
    pass


def main(argv=None):
    args = parse_args(argv)
    soak = Soak(args)

    def on_signal(signum, frame):
        raise Interrupted(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, on_signal)
    code = 2
    try:
        soak.server = ServerTree(args.workers, args.server_args).start()
        asyncio.run(soak.run())
        rec = soak.verdict()
        print(report(rec), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rec, f, indent=1)
        code = 0 if rec["ok"] else 1
    except (KeyboardInterrupt, Interrupted) as e:
        print("soak: stopped (%s)" % (str(e) or "Ctrl-C"), file=sys.stderr)
        code = 130
    except RuntimeError as e:
        print("soak: %s" % e, file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if soak.server is not None:
            soak.server.stop()
            if code == 1:
                print("soak: server log kept at %s" % soak.server.log.name, file=sys.stderr)
            else:
                soak.server.discard_log()
    return code


if __name__ == "__main__":
    sys.exit(main())

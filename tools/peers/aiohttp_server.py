#!/usr/bin/env python3
"""A plain single-process aiohttp pub/sub server: MegaComet's benchmark peer.

It speaks MegaComet's HTTP API (not the binary protocol) the way one would
write it idiomatically with aiohttp: one asyncio task per request, one future
per waiting subscriber, a deque of recent messages per id.

    GET  /sub/<id>[?since=N][&timeout=S]   long-poll, JSON
    GET  /sse/<id>[?since=N]               EventSource: "id: <seq>" and "data:" lines per
                                           message, resumes after Last-Event-ID
    GET  /ws/<id>[?since=N]                WebSocket: a text frame {"id", "seq", "data"} per message
    POST /pub/<id>                         body = message text -> 202 {"id", "seq"}
    POST /pub                              NDJSON {"id", "data"} lines -> 202 {"published", "errors"}
    GET  /stats                            {"workers": [{"pid", ...}], "totals", "shm", "uptime_s"}

Every route is served on both --port and --app-port (both on --host).
Prints a line containing ``ready`` once both ports listen; SIGTERM/SIGINT stop it.
Benchmark-only dependency: aiohttp (see tools/requirements-bench.txt).
"""

import argparse
import asyncio
import collections
import faulthandler
import json
import os
import re
import signal
import sys
import time

from aiohttp import web

ID_RE = re.compile(r"[A-Za-z0-9_~:@-]{1,128}")
LINE_BREAK = re.compile(r"\r\n|\r|\n")      # what starts a new data: line of an event
MAX_BATCH = 10000
STAT_NAMES = ("connections", "subscribers", "accepted", "published",
              "delivered", "expired", "dropped", "rss_bytes")


class Channel:
    __slots__ = ("messages", "seq", "waiters", "streams")

    def __init__(self, max_queued):
        self.messages = collections.deque(maxlen=max_queued)  # (seq, expires_at, data)
        self.seq = 0
        self.waiters = set()
        # Open streams of this id: the sweeper keeps the channel (and its seqs) while any
        # is open, even in the instant none of them waits.
        self.streams = 0


class TooManyIds(Exception):
    pass


class Hub:
    def __init__(self, max_queued, ttl, max_ids):
        self.max_queued = max_queued
        self.ttl = ttl
        self.max_ids = max_ids
        self.channels = {}
        self.subscribers = 0
        self.accepted = 0
        self.published = 0
        self.delivered = 0
        self.expired = 0
        self.dropped = 0

    def channel(self, ident):
        ch = self.channels.get(ident)
        if ch is None:
            if len(self.channels) >= self.max_ids:
                raise TooManyIds(ident)
            ch = self.channels[ident] = Channel(self.max_queued)
        return ch

    def publish(self, ident, data):
        ch = self.channel(ident)
        ch.seq += 1
        if len(ch.messages) == self.max_queued:
            self.dropped += 1
        ch.messages.append((ch.seq, time.monotonic() + self.ttl, data))
        self.published += 1
        for fut in ch.waiters:
            if not fut.done():
                fut.set_result(None)
        ch.waiters.clear()
        return ch.seq

    def expire(self, ch, now):
        msgs = ch.messages
        while msgs and msgs[0][1] <= now:
            msgs.popleft()
            self.expired += 1

    def pending(self, ch, since):
        self.expire(ch, time.monotonic())
        return [m for m in ch.messages if m[0] > since]

    async def sweeper(self):
        while True:
            await asyncio.sleep(2.0)
            now = time.monotonic()
            for ident in list(self.channels):
                ch = self.channels[ident]
                self.expire(ch, now)
                if not ch.messages and not ch.waiters and not ch.streams:
                    del self.channels[ident]

    async def follow(self, ident, since, idle=None):
        """Every message of ident after since, as it is published: yields (seq, data),
        or None after `idle` seconds without one (time for a heartbeat)."""
        ch = self.channel(ident)
        ch.streams += 1
        self.subscribers += 1
        try:
            while True:
                for seq, _, data in self.pending(ch, since):
                    since = seq
                    self.delivered += 1
                    yield seq, data
                fut = asyncio.get_running_loop().create_future()
                ch.waiters.add(fut)
                try:
                    await asyncio.wait_for(fut, idle)
                    quiet = False
                except asyncio.TimeoutError:
                    quiet = True
                finally:
                    ch.waiters.discard(fut)
                if quiet:
                    yield None
        finally:
            ch.streams -= 1
            self.subscribers -= 1


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_app(hub, default_timeout, heartbeat, runners):
    started = time.monotonic()
    routes = web.RouteTableDef()

    def bad(text, status=400):
        return web.json_response({"error": text}, status=status)

    @routes.get("/sub/{id}")
    async def sub(request):
        ident = request.match_info["id"]
        if not ID_RE.fullmatch(ident):
            return bad("invalid id")
        try:
            since = int(request.query.get("since", 0))
            timeout = float(request.query.get("timeout", default_timeout))
        except ValueError:
            return bad("invalid since or timeout")
        timeout = min(max(timeout, 1.0), 120.0)
        ch = hub.channels.get(ident)
        msgs = hub.pending(ch, since) if ch is not None else []
        if not msgs:
            try:
                ch = hub.channel(ident)
            except TooManyIds:
                return bad("too many ids", 503)
            fut = asyncio.get_running_loop().create_future()
            ch.waiters.add(fut)
            hub.subscribers += 1
            try:
                await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                ch.waiters.discard(fut)
                hub.subscribers -= 1
            msgs = hub.pending(ch, since)
        hub.delivered += len(msgs)
        return web.json_response({
            "id": ident,
            "messages": [{"seq": seq, "data": data} for seq, _, data in msgs],
            "last": msgs[-1][0] if msgs else since,
        })

    def stream_args(request):
        """(id, since) of a stream request, its channel made; refused with 400 or 503."""
        ident = request.match_info["id"]
        if not ID_RE.fullmatch(ident):
            raise web.HTTPBadRequest(text="invalid id")
        try:
            since = int(request.headers.get("Last-Event-ID") or request.query.get("since", 0))
        except ValueError:
            raise web.HTTPBadRequest(text="invalid since") from None
        try:
            hub.channel(ident)      # refused now, while the answer can still be a status
        except TooManyIds:
            raise web.HTTPServiceUnavailable(text="too many ids") from None
        return ident, since

    @routes.get("/sse/{id}")
    async def sse(request):
        ident, since = stream_args(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store"})
        await resp.prepare(request)
        await resp.write(b"retry: 2000\n\n")
        async for message in hub.follow(ident, since, idle=heartbeat):
            if message is None:
                await resp.write(b": ping\n\n")
                continue
            seq, data = message
            lines = "".join("data: %s\n" % line for line in LINE_BREAK.split(data))
            await resp.write(("id: %d\n%s\n" % (seq, lines)).encode())
        return resp

    @routes.get("/ws/{id}")
    async def ws(request):
        ident, since = stream_args(request)
        sock = web.WebSocketResponse(heartbeat=heartbeat)
        await sock.prepare(request)

        async def push():
            async for seq, data in hub.follow(ident, since):
                await sock.send_json({"id": ident, "seq": seq, "data": data})
        pusher = asyncio.create_task(push())
        try:
            async for _ in sock:         # pings and close are handled by aiohttp; data ignored
                pass
        finally:
            pusher.cancel()
            await asyncio.gather(pusher, return_exceptions=True)
        return sock

    @routes.post("/pub/{id}")
    async def pub_one(request):
        ident = request.match_info["id"]
        if not ID_RE.fullmatch(ident):
            return bad("invalid id")
        data = await request.text()
        try:
            seq = hub.publish(ident, data)
        except TooManyIds:
            return bad("too many ids", 507)
        return web.json_response({"id": ident, "seq": seq}, status=202)

    @routes.post("/pub")
    async def pub_batch(request):
        lines = (await request.text()).splitlines()
        lines = [ln for ln in lines if ln.strip()]
        if len(lines) > MAX_BATCH:
            return bad(f"more than {MAX_BATCH} messages", 413)
        published, errors = 0, []
        for n, line in enumerate(lines):
            try:
                obj = json.loads(line)
                ident, data = obj["id"], obj["data"]
                if not isinstance(ident, str) or not ID_RE.fullmatch(ident) \
                        or not isinstance(data, str):
                    raise ValueError("invalid id or data")
                hub.publish(ident, data)
                published += 1
            except TooManyIds:
                errors.append({"line": n, "error": "too many ids"})
            except (ValueError, KeyError, TypeError) as e:
                errors.append({"line": n, "error": str(e) or type(e).__name__})
        return web.json_response({"published": published, "errors": errors}, status=202)

    @routes.get("/stats")
    async def stats(request):
        worker = {
            "pid": os.getpid(),
            "connections": sum(len(r.server.connections) for r in runners if r.server),
            "subscribers": hub.subscribers,
            "accepted": hub.accepted,
            "published": hub.published,
            "delivered": hub.delivered,
            "expired": hub.expired,
            "dropped": hub.dropped,
            "rss_bytes": rss_bytes(),
        }
        totals = {k: worker[k] for k in STAT_NAMES}
        totals["ids"] = len(hub.channels)
        return web.json_response({"workers": [worker], "totals": totals, "shm": {},
                                  "uptime_s": round(time.monotonic() - started, 3)})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes(routes)
    return app


async def main(args):
    hub = Hub(args.max_queued, args.queue_ttl, args.max_ids)
    runners = []
    app = make_app(hub, args.poll_timeout, args.heartbeat, runners)
    # One runner per port so each has its own connection list; both share the app.
    for port in dict.fromkeys((args.port, args.app_port)):
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0,
                               access_log=None)
        await runner.setup()
        srv = runner.server
        inner = srv.connection_made

        def counting(handler, transport, _inner=inner):
            hub.accepted += 1
            _inner(handler, transport)
        srv.connection_made = counting
        runners.append(runner)
        await web.TCPSite(runner, args.host, port, backlog=args.backlog).start()
    sweeper = asyncio.ensure_future(hub.sweeper())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"aiohttp peer ready pid={os.getpid()} port={args.port} app-port={args.app_port}",
          flush=True)
    await stop.wait()
    sweeper.cancel()
    # Release pending long-polls before the runners close their connections.
    for ch in hub.channels.values():
        for fut in ch.waiters:
            if not fut.done():
                fut.set_result(None)
    # Graceful close, but bounded: with tens of thousands of connections aiohttp's
    # cleanup (and asyncio.run's task teardown) takes many seconds.
    try:
        await asyncio.wait_for(asyncio.gather(*(r.cleanup() for r in runners)), 2.0)
    except asyncio.TimeoutError:
        pass
    sys.stdout.flush()
    os._exit(0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="client port")
    p.add_argument("--app-port", type=int, default=9000, help="application port")
    p.add_argument("--max-ids", type=int, default=1_000_000)
    p.add_argument("--max-queued", type=int, default=100, help="messages kept per id")
    p.add_argument("--queue-ttl", type=float, default=60.0, help="seconds a message is kept")
    p.add_argument("--poll-timeout", type=float, default=30.0, help="default long-poll timeout")
    p.add_argument("--heartbeat", type=float, default=15.0,
                   help="seconds between pings on EventSource and WebSocket streams")
    p.add_argument("--backlog", type=int, default=4096)
    return p.parse_args(argv)


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1)   # kill -USR1 <pid>: tracebacks on stderr
    asyncio.run(main(parse_args()))

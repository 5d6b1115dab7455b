#!/usr/bin/env python3
"""fuzz_server: random and mutated traffic against a RUNNING MegaComet, checking that it survives.

The parsers have their own fuzz tests (tests/test_wire.py, tests/test_wsframe.py); this tool
fuzzes the whole server through its sockets.  It starts its own server with small
limits (or attaches to one: --port, --app-port, --server-pid, --server-log)
and sends -n inputs, a few hundred connections in flight at a time, to both
ports: /sub and .js polls, HEAD, OPTIONS, publishes (single, batch, chunked),
/stats, /metrics, /health, binary-protocol frames, pipelines and garbage.
About half are valid seeds left alone, the rest mutated: bit flips,
insertions, deletions, CRLF games, odd numbers (``since=%C2%B2``,
``timeout=%E2%91%A0``), bad UTF-8; some inputs are deeply nested JSON,
oversize heads and bodies, broken chunk sizes, floods of pipelined polls of a
full backlog; some are sent in pieces, cut short, or never read.

The streams get the same treatment.  EventSource requests (/sse/<id>, or
/sub/<id> with Accept: text/event-stream) carry odd ``since`` and
``Last-Event-ID`` values.  WebSocket upgrades come valid, or with headers
dropped, duplicated or garbled, wrong versions, bad keys; after a valid one,
random sequences of client frames (masked by hand here: the tool trusts no
code of the server's): every opcode, fragments, pings, closes with valid and
invalid codes, unmasked frames, reserved bits, declared lengths of 2^63 and
2^62, frames over --max-message, invalid UTF-8 (also across fragments),
truncated frames, byte-level mutations of valid frame streams, floods of tiny
frames.  Stream clients may vanish mid-stream (RST) or never read; rarely one
sends 16 MiB of pings without reading and only then drains (back-pressure).
What the server sends on a stream is judged whatever was sent to it: frames
well formed (unmasked, final, shortest length, known opcode, a close code it
documents), nothing after its close frame, messages as JSON (or SSE events) of
the right id with seqs rising.  For an unmutated frame sequence the tool
knows what RFC 6455 asks: the close code of its one violation (for a client
close, 1000 or its own code echoed; or no close at all) and a pong for each
ping before it.  The back-pressure oracle: the pongs the silent client reads
once it drains, less all the kernel held for it when it began to (both ends,
looked up by sock_diag) and all it sent since, were queued in the server's own
memory, which must stay under FLOOD_QUEUE_LIMIT.

While inputs fly, it watches the worker pids and probes /health every 0.25 s.
After every batch (--batch) it checks that no worker died, that /health
answers 200, that publish/subscribe round trips work (buffered, polls held
before a publish, and fresh WebSocket and EventSource streams on every worker
it can reach), that each worker's fds, private RSS, open connections
and held polls are back at their baseline, that no worker is busy with no
traffic, and that the server log has no "Traceback", "internal error",
"died" or restart line.  Valid seeds must also get the answers they should.
When a worker dies or stalls, the inputs around it are replayed (bisection)
until one input alone does it; it is printed with the command to replay it.

Input i is a pure function of (seed, i), so a seed sends the same bytes again.
Exit status 0 only if every check passed.

It must never send anything anywhere but 127.0.0.1, never run unbounded
(every connection, wait and replay has a limit, the run as a whole
--time-limit), and never signal a process it did not start.  Standard
library only.

    python tools/fuzz_server.py                         # 20 000 inputs, 2 workers
    python tools/fuzz_server.py -n 3000 --seed 7        # the same inputs as last time
    python tools/fuzz_server.py --seed 7 --replay 1234  # one input alone, then the checks
"""

import argparse
import base64
import codecs
import collections
import hashlib
import http.client
import json
import os
import random
import re
import resource
import selectors
import signal
import socket
import struct
import sys
import tempfile
import threading
import time

# launch (beside this file) is how the tests and tools start a server and stop it.
from launch import MEGACOMET, ROOT, launch
from launch import StartError as LaunchError
from launch import stop as stop_tree

HOST = "127.0.0.1"
# Small limits: slow heads are cut within a second, and limits are reached often; streams
# are pinged every second, so that inputs see the server's pings.
SERVER_FLAGS = ["--header-timeout", "1", "--max-ids", "100000", "--shm-mb", "32", "--heartbeat", "1"]
# "restarting" is the supervisor's line for a worker that died without last words.
LOG_ALARMS = ("Traceback", "internal error", "died", "restarting")
FD_SLACK = 5                     # a settled worker may hold this many fds above its baseline
RSS_SLACK = 8 << 20              # and this much private RSS
READ_CAP = 4 << 20               # bytes read per connection; past it the tool hangs up
CONN_TIME = 4.0                  # no connection of the tool lives longer
CHECK_TIMEOUT = 5.0              # per request of a check
CLK_TCK = os.sysconf("SC_CLK_TCK")
FLOOD_BYTES = 16 << 20           # pings sent by the client that reads nothing, then drains
FLOOD_MEASURE = 5.0              # seconds after which it is measured, whatever the server took
# What the server may keep queued for a client that does not read: its own 1 MiB output limit
# and what one read of pings (64 KiB) asks for, with room to spare.
FLOOD_QUEUE_LIMIT = 4 << 20


# -- inputs ----------------------------------------------------------------------

class Input:
    """One connection's worth of bytes and how to send them.

    ``expect``: the statuses an untouched valid seed may get (None: anything
    but a crash); ``methods``: its requests' methods in order, so that the
    responses to HEAD are known to have no body.  For a WebSocket:
    ``close_codes``, those the server may close with after this input's frames
    (0 in it: it may keep the connection; None: not known), ``pings``, the
    payloads it must answer with pongs, in order, before it closes, and
    ``ws_key``, to check Sec-WebSocket-Accept.
    """

    __slots__ = ("index", "port", "kind", "segments", "gap", "linger", "mode", "expect",
                 "methods", "ident", "close_codes", "pings", "ws_key", "reset", "life",
                 "read_cap", "buffers")

    def __init__(self, index, port, kind, data, expect=None, methods=None, ident=None):
        self.index, self.port, self.kind = index, port, kind
        self.segments = [data]
        self.gap = 0.0          # seconds between segments
        self.linger = 0.3       # seconds of silence after which the tool hangs up
        # Or "noread" (never reads), "truncate" (hangs up once sent), "drain" (reads nothing
        # until the server has taken what it will, measures what it queued, then reads all).
        self.mode = "read"
        self.expect, self.methods, self.ident = expect, methods, ident
        self.close_codes = self.pings = self.ws_key = None
        self.reset = False      # hang up with RST, not FIN: a client that vanishes
        self.life = CONN_TIME   # seconds after which the tool hangs up whatever happens
        self.read_cap = READ_CAP
        self.buffers = None     # SO_RCVBUF and SO_SNDBUF, if small ones are wanted

    def forget(self):
        """The bytes no longer say what they ask: no expectation beyond "no crash"."""
        self.expect = self.methods = self.ident = None
        self.close_codes = self.pings = self.ws_key = None

    def data(self):
        return b"".join(self.segments)

    def describe(self, limit=400):
        data = self.data()
        shown = repr(data[:limit]) + (" ... (%d bytes in all)" % len(data) if len(data) > limit else "")
        return "input %d: %s port, %s, %s, %d segment(s): %s" % (
            self.index, self.port, self.kind, self.mode, len(self.segments), shown)


NUMBERS = [b"0", b"1", b"-1", b"+1", b" 1", b"01", b"1.5", b"1e3", b"0x1f", b"", b"4294967295",
           b"4294967296", b"9999999999", b"99999999999", b"18446744073709551616", b"9" * 40,
           b"%C2%B2", b"%E2%91%A0", b"%EF%BC%91", b"%D9%A1", b"%F0%9D%9F%8F", b"\xc2\xb2",
           b"\xd9\xa1", b"%2B1", b"%20%31", b"%00", b"%ff", b"%", b"%%", b"NaN", b"-0"]
TOKENS = [b"\r\n", b"\r\n\r\n", b"\n", b"\r", b"\x00", b" ", b"\t", b"%", b"%00", b"%ff",
          b"%C2%B2", b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"?", b"&",
          b"=", b"/", b"..", b";", b":", b",", b"\"", b"\\", b"[", b"{", b"}", b"\\u0000",
          b"\\ud800", b"\x02", b"\x01", b"HTTP/1.0", b"HTTP/2.0", b"GET ", b"HEAD ", b"POST ",
          b"Content-Length: 5\r\n", b"Content-Length: -1\r\n", b"Content-Length: 0\r\n",
          b"Content-Length: 99999999999999999999\r\n", b"Transfer-Encoding: chunked\r\n",
          b"Transfer-Encoding: gzip\r\n", b"Connection: close\r\n", b"Connection: keep-alive\r\n",
          b"Origin: http://x\r\n", b"Expect: 100-continue\r\n", b"0\r\n\r\n", b"ffffffff\r\n"]
TEXT = "abcxyz ABC 0123456789 <>&\"'\\/\t\n\u00e9\u00fc\u4e2d\u6587\U0001F600\u2028\ufeff"
BAD_ID_CHARS = "/#% .\x00\u00e9+=\"'<>"
# Kinds whose builders mutate their inputs themselves (a WebSocket's frames, not its upgrade).
SELF_MUTATED = ("garbage", "backlog-flood", "ws", "ws-upgrade", "ws-flood")

# WebSocket (RFC 6455), written here from the RFC: the tool shares no code with the server.
WS_CONT, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_CLOSE_OK = (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999)
WS_CLOSE_BAD = (0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535)
SERVER_CLOSE_CODES = (1000, 1001, 1002, 1007, 1009, 1013)   # the README's, and 1013: table full
BAD_UTF8 = (b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc3\x28", b"ok \xe2\x82")
WS_VERSIONS = (b"13", b" 13", b"13 ", b"13\t", b"8", b"12", b"14", b"", b"013", b"13, 8", b"1 3",
               b"+13", b"13.0", b"\xd9\xa1\xd9\xa3", b"99999999999")
WS_UPGRADES = (b"websocket", b"WebSocket", b"websocket, h2c", b"h2c, websocket", b"h2c",
               b"web socket", b"websockets", b"")
WS_CONNECTIONS = (b"Upgrade", b"upgrade", b"keep-alive, Upgrade", b"Upgrade, keep-alive",
                  b"keep-alive", b"close", b"Upgrades", b"")
WS_EXTRA_FIELDS = ((b"Origin", b"http://example.com"), (b"Sec-WebSocket-Protocol", b"chat, superchat"),
                   (b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits"),
                   (b"User-Agent", b"fuzz/1"), (b"Accept", b"text/event-stream"))
SSE_ACCEPTS = (b"text/event-stream", b"text/event-stream; charset=utf-8", b"TEXT/Event-Stream",
               b"text/html, text/event-stream;q=0.9", b"*/*", b"application/json")
LAST_EVENT_IDS = (b"0", b"1", b"5", b"63", b"64", b"65", b"4294967295", b"4294967296", b"9999999999",
                  b"99999999999", b"0000000001", b"00000000001", b" 7 ", b"7\t", b"-1", b"+1", b"",
                  b" ", b"1 2", b"0x10", b"1e3", b"1.0", b"abc", b"%31", b"\xd9\xa1", b"\xb2",
                  b"\xef\xbc\x91", b"1" * 200)


class Generator:
    """Input i from (seed, i) alone, so that any input can be replayed by its index."""

    def __init__(self, seed, max_message, max_body):
        self.seed = seed
        self.max_message = max_message
        self.max_body = max_body
        pool = random.Random("%d/ids" % seed)
        # A bounded id universe: the table (--max-ids) never fills, and ids recur.
        self.ids = ["fz%s" % "".join(pool.choice("abcdefghijklmnopqrstuvwxyz0123456789_~:@-")
                                     for _ in range(pool.randint(1, 12))) for _ in range(400)]
        self.hot = self.ids[:12]          # get the backlogs (warm-up fills them)
        self.text = "".join(pool.choices(TEXT, k=max_message + 100000))   # messages are slices
        self.kinds = [
            ("client", "sub", 16, self.sub), ("client", "js", 4, self.js),
            ("client", "options", 2, self.options), ("client", "pipeline", 4, self.client_pipeline),
            ("client", "backlog-flood", 1, self.backlog_flood), ("client", "garbage", 2, self.garbage),
            ("client", "oversize", 1, self.oversize),
            ("client", "sse", 6, self.sse), ("client", "ws", 8, self.ws),
            ("client", "ws-upgrade", 5, self.ws_upgrade), ("client", "ws-flood", 1, self.ws_flood),
            ("app", "pub", 12, self.pub), ("app", "pub-chunked", 4, self.pub_chunked),
            ("app", "batch", 9, self.batch), ("app", "admin", 5, self.admin),
            ("app", "pipeline", 3, self.app_pipeline), ("app", "binary", 9, self.binary),
            ("app", "garbage", 3, self.garbage), ("app", "oversize", 1, self.oversize),
        ]
        self.weights = [k[2] for k in self.kinds]

    def make(self, index):
        rng = random.Random("%d/%d" % (self.seed, index))
        port, kind, _, build = rng.choices(self.kinds, self.weights)[0]
        inp = build(rng, index, port)
        inp.kind = inp.kind or kind
        if kind not in SELF_MUTATED and rng.random() < 0.55:
            data = inp.data()
            for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 5))):
                data = mutate(rng, data)
            inp.segments = [data]
            inp.kind += "~"               # mutated: no expectation beyond "no crash"
            inp.forget()
        if kind != "ws-flood":            # a flood's pace and reading are what it tests
            self.shape(rng, inp)
        return inp

    def shape(self, rng, inp):
        data = inp.data()
        r = rng.random()
        if r < 0.2 and len(data) > 1:     # split: the server sees partial heads and frames
            cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 4))))
            inp.segments = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
            inp.gap = rng.choice((0.0, 0.002, 0.02, 0.1))
        elif r < 0.26 and len(data) > 1:  # truncated, then the tool hangs up
            inp.segments = [data[:rng.randrange(1, len(data))]]
            inp.mode = "truncate"
            inp.forget()
        elif r < 0.29:
            inp.mode = "noread"
        if rng.random() < 0.06:           # patient: header timeouts, ?timeout=1 polls, pings fire
            inp.linger = rng.uniform(1.3, 2.5)
            # Not to the time limit, though: a stream pinged every second is never silent, and
            # the last connection of a batch holds up the next.
            inp.life = min(inp.life, inp.linger + 1.0)
        if rng.random() < 0.08:           # vanishes: the server sees an RST, not a FIN
            inp.reset = True

    # -- client port

    def ident(self, rng):
        r = rng.random()
        if r < 0.35:
            return rng.choice(self.hot)
        if r < 0.93:
            return rng.choice(self.ids)
        if r < 0.97:
            return "x" * rng.choice((128, 129, 1000))
        return rng.choice(self.ids) + rng.choice(BAD_ID_CHARS)

    def headers(self, rng, app=False):
        out = []
        for _ in range(rng.choice((0, 1, 1, 2))):
            out.append(rng.choice((b"Host: localhost", b"User-Agent: fuzz/1", b"Accept: */*",
                                   b"Connection: keep-alive", b"Cache-Control: no-cache",
                                   b"X-Pad: " + b"p" * rng.randint(0, 200))))
        if not app and rng.random() < 0.15:
            out.append(b"Origin: http://example.com")
        if rng.random() < 0.3:
            out.append(b"Connection: close")
        return b"".join(h + b"\r\n" for h in out)

    def sub_request(self, rng):
        """One /sub request: (bytes, method, expected statuses or None, id)."""
        ident = self.ident(rng)
        method = "HEAD" if rng.random() < 0.1 else "GET"
        query = []
        odd = False
        if rng.random() < 0.8:
            query.append("since=%d" % rng.choice((0, 0, 0, 1, 5, 63, 64, 1000, 2 ** 32 - 1)))
        if rng.random() < 0.5:
            query.append("timeout=%d" % rng.choice((1, 1, 2, 5, 30, 120, 121)))
        if rng.random() < 0.15:
            query.append("callback=%s" % rng.choice(("cb", "on_push", "a.b.c", "$x", "1bad",
                                                     "x" * 65, "alert(1)//")))
            odd = True
        if rng.random() < 0.25:
            name = rng.choice(("since", "timeout", "callback"))
            query.append("%s=%s" % (name, rng.choice(NUMBERS).decode("latin-1")))
            odd = True
        rng.shuffle(query)
        path = "/sub/" + ident + ("?" + "&".join(query) if query else "")
        version = "HTTP/1.0" if rng.random() < 0.1 else "HTTP/1.1"
        data = ("%s %s %s\r\n" % (method, path, version)).encode("utf-8", "surrogatepass") + \
            self.headers(rng) + b"\r\n"
        valid = self.valid_id(ident)
        expect = ({200, 400} if odd else {200}) if valid else {400, 404}
        return data, method, expect, ident

    @staticmethod
    def valid_id(ident):
        return re.fullmatch(r"[A-Za-z0-9_~:@-]{1,128}", ident) is not None

    def sub(self, rng, index, port):
        data, method, expect, ident = self.sub_request(rng)
        return Input(index, port, "sub", data, expect, [method], ident)

    def js(self, rng, index, port):
        ident = self.ident(rng)
        method = "HEAD" if rng.random() < 0.2 else "GET"
        data = ("%s /%s.js HTTP/1.1\r\n" % (method, ident)).encode() + self.headers(rng) + b"\r\n"
        expect = {200, 204} if self.valid_id(ident) else {400, 404}
        return Input(index, port, "js", data, expect, [method])

    def options(self, rng, index, port):
        ident = self.ident(rng)
        data = ("OPTIONS /sub/%s HTTP/1.1\r\n" % ident).encode() + \
            self.headers(rng) + b"Access-Control-Request-Method: GET\r\n\r\n"
        expect = {204} if self.valid_id(ident) else {204, 400}    # 400: not a request line
        return Input(index, port, "options", data, expect, ["OPTIONS"])

    def client_pipeline(self, rng, index, port):
        parts, methods, expect = [], [], set()
        for _ in range(rng.choice((2, 3, 5, 10, 50))):
            data, method, exp, _ = self.sub_request(rng)
            data = data.replace(b"Connection: close\r\n", b"")
            parts.append(data)
            methods.append(method)
            expect |= exp
        return Input(index, port, "pipeline", b"".join(parts), expect, methods)

    def backlog_flood(self, rng, index, port):
        """Many pipelined polls of a full backlog: big answers the tool reads slowly or never."""
        request = b"GET /sub/%s?since=0 HTTP/1.1\r\n\r\n" % rng.choice(self.hot).encode()
        inp = Input(index, port, "backlog-flood", request * rng.choice((50, 300, 1500, 3000)))
        inp.mode = rng.choice(("read", "noread", "noread"))
        return inp

    # -- client port: streams

    def stream_habits(self, rng, inp):
        """How a stream's client behaves: most read and hang up after silence; some vanish
        while the backlog flows (RST); some never read, or read only once the server has
        taken all they sent (its output still queued then: nothing may follow a close
        frame), through a small window."""
        r = rng.random()
        if r < 0.12:
            inp.life, inp.reset = rng.choice((0.002, 0.02, 0.1, 0.5)), True
        elif r < 0.2:
            inp.mode, inp.buffers, inp.linger = "noread", 4096, rng.choice((0.3, 1.5))
        elif r < 0.26:
            inp.mode, inp.buffers = "drain", 4096
        return inp

    def sse(self, rng, index, port):
        """An EventSource request: /sse/<id>, or /sub/<id> asking for text/event-stream, with
        odd ``since`` and Last-Event-ID values (of two Last-Event-IDs, the last counts)."""
        ident = self.ident(rng)
        method = "HEAD" if rng.random() < 0.08 else "GET"
        on_sse = rng.random() < 0.6
        lines = []
        accept = rng.choice(SSE_ACCEPTS) if not on_sse or rng.random() < 0.3 else None
        if accept is not None:
            lines.append(b"Accept: " + accept)
        streams = on_sse or b"text/event-stream" in (accept or b"").lower()
        query, since_known = b"", True
        if rng.random() < 0.5:
            if rng.random() < 0.7:
                query = b"?since=%d" % rng.choice((0, 0, 1, 63, 64, 65, 1000, 2 ** 32 - 1))
            else:
                query, since_known = b"?since=" + rng.choice(NUMBERS), False
        last_id_ok = True
        for _ in range(rng.choice((0, 0, 1, 1, 1, 2))):
            value = rng.choice(LAST_EVENT_IDS)
            lines.append(b"Last-Event-ID: " + value)
            last_id_ok = re.fullmatch(rb"[0-9]{1,10}", value.strip(b" \t")) is not None
        path = (b"/sse/" if on_sse else b"/sub/") + ident.encode("utf-8", "surrogatepass") + query
        data = b"%s %s HTTP/1.1\r\n" % (method.encode(), path) + self.headers(rng) + \
            b"".join(line + b"\r\n" for line in lines) + b"\r\n"
        valid = request_target_ok(path) and self.valid_id(ident)
        if not valid:
            expect = {400, 404}
        elif not since_known:
            expect = {200, 400}
        else:
            expect = {400} if streams and not last_id_ok else {200}
        inp = Input(index, port, "sse", data, expect, [method], ident if valid else None)
        return self.stream_habits(rng, inp)

    def ws_request(self, rng, ident, odd):
        """A WebSocket upgrade: (bytes, the key the server sees, the statuses it may get, methods).

        ``odd``: headers dropped, duplicated, garbled or given odd values, an odd method,
        since or HTTP version, a request pipelined before it.  The status is worked out
        from what was sent, after RFC 6455 4.2.1 and the README: 405 for a method the
        port refuses, 426 for /ws/ without an upgrade or a version other than 13, 400
        for a bad id, since or key or a malformed head, else 101 (or a poll, 200).
        """
        fields = [[b"Host", b"localhost"], [b"Upgrade", b"websocket"], [b"Connection", b"Upgrade"],
                  [b"Sec-WebSocket-Key", base64.b64encode(rng.randbytes(16))],
                  [b"Sec-WebSocket-Version", b"13"]]
        if rng.random() < 0.3:
            fields.append(list(rng.choice(WS_EXTRA_FIELDS)))
        rng.shuffle(fields)
        method, version, before = b"GET", b"HTTP/1.1", b""
        prefix = rng.choice((b"/ws/", b"/ws/", b"/sub/"))
        query, since_known = b"", True
        if rng.random() < 0.4:
            query = b"?since=%d" % rng.choice((0, 0, 1, 64, 2 ** 32 - 1))
        for _ in range(rng.choice((1, 1, 2, 3)) if odd else 0):
            op = rng.randrange(12)
            if op == 0 and fields:                        # a header dropped
                del fields[rng.randrange(len(fields))]
            elif op == 1 and fields:                      # one duplicated
                fields.insert(rng.randrange(len(fields) + 1), list(rng.choice(fields)))
            elif op < 6:                                  # an odd value, replacing or added
                name, values = rng.choice(((b"Sec-WebSocket-Key", None), (b"Sec-WebSocket-Version",
                                           WS_VERSIONS), (b"Upgrade", WS_UPGRADES),
                                           (b"Connection", WS_CONNECTIONS)))
                value = rng.choice(values) if values else rng.choice((
                    bad_ws_key(rng), base64.b64encode(rng.randbytes(16)) + rng.choice((b" ", b"\t"))))
                same = [f for f in fields if f[0].lower() == name.lower()]
                if same and rng.random() < 0.5:
                    rng.choice(same)[1] = value
                else:
                    fields.append([name, value])
            elif op == 6 and fields:                      # names are case-insensitive
                field = rng.choice(fields)
                field[0] = rng.choice((field[0].lower(), field[0].upper()))
            elif op == 7:
                method = rng.choice((b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS"))
            elif op == 8:
                query, since_known = b"?since=" + rng.choice(NUMBERS), False
            elif op == 9 and any(value is not None for _, value in fields):   # no header: 400
                field = rng.choice([f for f in fields if f[1] is not None])
                field[:] = [rng.choice((field[0] + b" " + field[1], field[0] + b" : " + field[1],
                                        b": " + field[1])), None]
            elif op == 10:
                version = b"HTTP/1.0"
            else:                                         # a keep-alive request before it
                before = b"OPTIONS /sub/%s HTTP/1.1\r\nHost: x\r\n\r\n" % rng.choice(self.ids).encode()
        path = prefix + ident.encode("utf-8", "surrogatepass") + query
        data = before + b"%s %s %s\r\n" % (method, path, version) + b"".join(
            name + b"\r\n" if value is None else name + b": " + value + b"\r\n"
            for name, value in fields) + b"\r\n"

        def tokens(name):                                  # the comma-separated values of a header
            return {t.strip() for n, v in fields if v is not None and n.lower() == name
                    for t in v.lower().split(b",")}

        def last(name):                                    # of repeated headers, the last counts
            values = [v.strip(b" \t") for n, v in fields if v is not None and n.lower() == name]
            return values[-1] if values else None

        upgrade = b"websocket" in tokens(b"upgrade") and b"upgrade" in tokens(b"connection")
        key = last(b"sec-websocket-key")
        if any(value is None for _, value in fields) or not request_target_ok(path):
            expect = {400}
        elif method in (b"POST", b"PUT", b"DELETE"):
            expect = {405}
        elif method == b"OPTIONS":
            expect = {204}
        elif prefix == b"/ws/" and not upgrade:
            expect = {426}
        elif not self.valid_id(ident):
            expect = {400}
        else:
            if not upgrade:
                expect = {200}                             # a long-poll (or EventSource) on /sub/
            elif method != b"GET":
                expect = {400}
            elif last(b"sec-websocket-version") != b"13":
                expect = {426}
            else:
                expect = {101} if ws_key_ok(key) else {400}
            if not since_known:
                expect.add(400)
        methods = ["OPTIONS"] * bool(before) + [method.decode()]
        return data, key, expect | ({204} if before else set()), methods

    def ws(self, rng, index, port):
        """A valid upgrade, then random client frames; 4 in 10 have their frames mutated."""
        ident = rng.choice(self.hot) if rng.random() < 0.3 else rng.choice(self.ids)
        head, key, expect, methods = self.ws_request(rng, ident, odd=False)
        inp = Input(index, port, "ws", head, expect, methods, ident)
        inp.ws_key = key
        frames, inp.close_codes, inp.pings = self.ws_frames(rng)
        if rng.random() < 0.4:
            for _ in range(rng.choice((1, 1, 2, 3))):
                frames = mutate_frames(rng, frames)
            inp.kind += "~"                # its upgrade is still valid: that answer is known
            inp.close_codes = inp.pings = None
        self.send_frames(rng, inp, frames)
        return self.stream_habits(rng, inp)

    def ws_upgrade(self, rng, index, port):
        """An odd upgrade (see ws_request), then frames if it should succeed; some are mutated."""
        ident = self.ident(rng)
        head, key, expect, methods = self.ws_request(rng, ident, odd=True)
        inp = Input(index, port, "ws-upgrade", head, expect, methods,
                    ident if self.valid_id(ident) else None)
        if 101 in expect and expect <= {101, 204}:
            inp.ws_key = key
            frames, inp.close_codes, inp.pings = self.ws_frames(rng)
            self.send_frames(rng, inp, frames)
        elif rng.random() < 0.3:
            inp.segments = [mutate(rng, head)]
            inp.kind += "~"
            inp.forget()
        return self.stream_habits(rng, inp)

    @staticmethod
    def send_frames(rng, inp, frames):
        """Frames go with the upgrade, or in up to three later segments (other reads)."""
        if not frames:
            return
        if rng.random() < 0.3:
            inp.segments = [inp.segments[0] + b"".join(frames)]
            return
        cuts = sorted(rng.sample(range(1, len(frames)), min(len(frames) - 1, rng.randint(0, 2))))
        inp.segments += [b"".join(frames[a:b]) for a, b in zip([0] + cuts, cuts + [len(frames)])]
        inp.gap = rng.choice((0.0, 0.005, 0.03))

    def ws_frames(self, rng):
        """Random client frames for after an upgrade, and what RFC 6455 has the server do.

        Returns (frames, close codes, pings): the codes the server may close with (0: it
        keeps the connection), and the payloads of the pings it must answer first, in
        order.  Most sequences are valid; the others end in one violation, sometimes
        followed by valid frames the server must ignore.
        """
        frames, pings, codes = [], [], None
        message = None                     # the fragmented message in progress, if any
        for _ in range(rng.choice((0, 1, 2, 3, 5, 10, 30))):
            r = rng.random()
            if r < 0.12:
                more, codes = self.ws_violation(rng, message)
                frames += more
                break
            if r < 0.22:
                payload = rng.randbytes(rng.choice((0, 1, 4, 125)))
                frames.append(ws_frame(rng, WS_PING, payload))
                pings.append(payload)
            elif r < 0.26:                 # unsolicited: ignored
                frames.append(ws_frame(rng, WS_PONG, rng.randbytes(rng.choice((0, 8)))))
            elif r < 0.3:
                frame, codes = self.ws_close(rng)
                if message is not None:    # a message left unfinished: some say 1002 (websockets)
                    codes.add(1002)
                frames.append(frame)
                break
            else:
                frame, message, codes = self.ws_data(rng, message)
                frames.append(frame)
                if codes:
                    break
        if codes is None:
            codes = {0}
            if rng.random() < 0.15:        # a frame cut short: the server waits for the rest
                frame = ws_frame(rng, rng.choice((WS_PING, WS_CONT if message else WS_BINARY)),
                                 rng.randbytes(rng.randint(1, 120)))
                frames.append(frame[:rng.randrange(1, len(frame))])
        elif 0 not in codes and rng.random() < 0.3:
            frames += [ws_frame(rng, WS_PING, b"ignored"), ws_frame(rng, WS_TEXT, b"ignored"),
                       self.ws_close(rng)[0]][:rng.randint(1, 3)]
        return frames, codes, pings

    def ws_data(self, rng, message):
        """A whole data message, or the start, a middle or the end of a fragmented one:
        (frame, the message still in progress after it, the close codes it calls for)."""
        if message is None:
            text = rng.random() < 0.6
            size = rng.choice((0, 1, 5, 125, 126, 127, 1000, self.max_message))
            body = self.message(rng, size) if text else rng.randbytes(size)
            message = WsMessage(text, self.max_message, body)
            opcode = WS_TEXT if text else WS_BINARY
        else:
            opcode = WS_CONT
        fin = rng.random() < (0.7 if opcode != WS_CONT else 0.4)
        cut = len(message.rest) if fin else rng.randint(0, len(message.rest))
        payload, message.rest = message.rest[:cut], message.rest[cut:]
        codes = message.add(payload, fin)
        return ws_frame(rng, opcode, payload, fin), None if fin else message, codes or None

    @staticmethod
    def ws_close(rng):
        """A valid close frame (empty, or an allowed code and a UTF-8 reason), and the codes
        of the answer: 1000 as the README says, or the client's own, as RFC 6455 5.5.1 has
        it "typically" echoed (none, 1005 here, for an empty one)."""
        if rng.random() < 0.2:
            return ws_frame(rng, WS_CLOSE), {1000, 1005}
        code = rng.choice(WS_CLOSE_OK)
        reason = rng.choice(("", "bye", "d\u00e9j\u00e0 vu", "x" * 123)).encode()
        return ws_frame(rng, WS_CLOSE, struct.pack("!H", code) + reason), {1000, code}

    def ws_violation(self, rng, message):
        """Frames that end in one violation of RFC 6455, and the close codes it calls for."""
        limit = self.max_message
        data_op = WS_CONT if message is not None else rng.choice((WS_TEXT, WS_BINARY))
        any_op = rng.choice((WS_TEXT, WS_BINARY, WS_CONT, WS_PING, WS_PONG, WS_CLOSE))
        choice = rng.randrange(13)
        if choice == 0:
            return [ws_frame(rng, any_op, b"hi", masked=False)], {1002}
        if choice == 1:
            return [ws_frame(rng, any_op, b"hi", rsv=rng.choice((0x10, 0x20, 0x40, 0x70)))], {1002}
        if choice == 2:
            return [ws_frame(rng, rng.choice((3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)), b"hi")], {1002}
        if choice == 3:                                   # a control frame over 125 bytes
            return [ws_frame(rng, rng.choice((WS_PING, WS_PONG, WS_CLOSE)),
                             rng.randbytes(rng.randint(126, 200)))], {1002}
        if choice == 4:                                   # a fragmented control frame
            return [ws_frame(rng, rng.choice((WS_PING, WS_PONG, WS_CLOSE)), b"", fin=False)], {1002}
        if choice == 5:                                   # a huge declared length: the header
            # Its top bit set, a length is a protocol error (RFC 6455 5.2), and too big as well.
            length, codes = rng.choice(((1 << 63, {1002, 1009}), ((1 << 64) - 1, {1002, 1009}),
                                        (1 << 62, {1009}), (1 << 32, {1009}), (limit + 1, {1009})))
            payload = rng.randbytes(rng.choice((0, 10, 1000)))
            if length == limit + 1 and rng.random() < 0.5:
                payload = rng.randbytes(length)           # or all of it: still over the limit
            return [ws_frame(rng, data_op, length=length) + payload], codes
        if choice == 6 and (message is None or message.text):
            model = message or WsMessage(True, limit)
            payload = self.message(rng, rng.choice((0, 5, 50))) + rng.choice(BAD_UTF8)
            fin = rng.random() < 0.5
            codes = model.add(payload, fin)
            return [ws_frame(rng, WS_CONT if message else WS_TEXT, payload, fin)], codes or {0}
        if choice in (6, 7):
            if message is None:                           # a continuation of nothing
                return [ws_frame(rng, WS_CONT, b"x")], {1002}
            return [ws_frame(rng, rng.choice((WS_TEXT, WS_BINARY)), b"x")], {1002}
        if choice == 8:                                   # fragments, each within, past the limit
            frames, model = [], message
            if model is None:
                model = WsMessage(False, limit)
                payload = rng.randbytes(limit // 2 + 1)
                model.add(payload, False)
                frames.append(ws_frame(rng, WS_BINARY, payload, fin=False))
            payload = b"a" * min(limit, limit - model.size + rng.choice((1, 100)))
            fin = rng.random() < 0.5
            codes = model.add(payload, fin)
            frames.append(ws_frame(rng, WS_CONT, payload, fin))
            return frames, codes or {0}
        if choice == 9:
            return [ws_frame(rng, WS_CLOSE, struct.pack("!H", rng.choice(WS_CLOSE_BAD)))], {1002}
        if choice == 10:
            return [ws_frame(rng, WS_CLOSE, b"\x03")], {1002}
        if choice == 11:                                  # (or 1002 for a message left unfinished)
            return [ws_frame(rng, WS_CLOSE, struct.pack("!H", 1000) + rng.choice(BAD_UTF8))], \
                {1007} | ({1002} if message is not None else set())
        # A length not in its shortest form: RFC 6455 5.2 says MUST NOT; a server may take it
        # (and then judge the payload as any other: ASCII, but it may end a character cut short).
        payload, fin = b"a" * rng.randint(0, 20), rng.random() < 0.5
        codes = (message or WsMessage(False, limit)).add(payload, fin) or {0}
        return [ws_frame(rng, WS_BINARY if message is None else WS_CONT, payload,
                         fin=fin or message is None, wide=True)], codes | {1002}

    def ws_flood(self, rng, index, port):
        """Floods after a valid upgrade, read or not: tiny data frames, pings, empty fragments
        of a message that never ends.  Rarely FLOOD_BYTES of pings from a client that reads
        nothing until they are sent, then a close and frames after it ("drain": judged)."""
        r = rng.random()
        # The drain flood's id is its own: a message for it would have the server close the
        # stream as too slow (a fair answer, but then no measure).
        ident = "fzflood-%d" % index if r < 0.12 else rng.choice(self.ids)
        head, key, expect, methods = self.ws_request(rng, ident, odd=False)
        inp = Input(index, port, "ws-flood", head, expect, methods, ident)
        inp.ws_key, inp.close_codes, inp.pings = key, {0}, []
        if r < 0.12:
            payload = rng.randbytes(125)
            ping = ws_frame(rng, WS_PING, payload)
            count = FLOOD_BYTES // len(ping)
            # The frames after the close come in another read, while pongs may still be
            # queued: the server must ignore them, and send nothing after its close frame.
            inp.segments += [ping * count, ws_frame(rng, WS_CLOSE, struct.pack("!H", 1000)),
                             ws_frame(rng, WS_PING, b"after close") +
                             ws_frame(rng, WS_CLOSE, struct.pack("!H", 999))]
            inp.pings, inp.close_codes = [payload] * count, {1000}
            inp.mode, inp.gap, inp.linger, inp.life = "drain", 0.1, 1.0, FLOOD_MEASURE + 5
            inp.read_cap, inp.buffers = 4 * FLOOD_BYTES, 65536
            return inp
        if r < 0.45:                                      # tiny data frames, now and then a ping
            tiny = ws_frame(rng, rng.choice((WS_TEXT, WS_BINARY)), rng.choice((b"", b"x")))
            payload = rng.randbytes(rng.choice((0, 3)))
            every = rng.choice((10, 100, 1000))
            rounds = rng.choice((1000, 5000, 20000)) // every
            inp.segments.append((tiny * (every - 1) + ws_frame(rng, WS_PING, payload)) * rounds)
            inp.pings = [payload] * rounds
        elif r < 0.7:
            payload = rng.randbytes(rng.choice((0, 1, 50, 125)))
            count = rng.choice((100, 1000, 5000))
            inp.segments.append(ws_frame(rng, WS_PING, payload) * count)
            inp.pings = [payload] * count
        else:                                             # a text message that never ends
            count = rng.choice((1000, 10000, 30000))
            inp.segments.append(ws_frame(rng, WS_TEXT, b"", fin=False) +
                                ws_frame(rng, WS_CONT, b"", fin=False) * count)
        if rng.random() < 0.3:
            inp.mode, inp.buffers = "noread", 4096
        inp.reset = rng.random() < 0.3
        return inp

    # -- app port

    def message(self, rng, size=None):
        """Up to ``size`` characters of text, at most max_message bytes of UTF-8."""
        if size is None:
            size = rng.choice((0, 1, 5, 20, 100, 1000, rng.randint(0, self.max_message)))
        start = rng.randrange(len(self.text) - size)
        data = self.text[start:start + size].encode()
        return data[:self.max_message].decode("utf-8", "ignore").encode()

    def pub_request(self, rng):
        ident = self.ident(rng)
        r = rng.random()
        expect = {202}
        if r < 0.05:
            body = b"y" * (self.max_message + rng.randint(1, 100))
            expect = {413}
        elif r < 0.1:
            body = self.message(rng) + rng.choice((b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc3"))
            expect = {400, 413}
        else:
            body = self.message(rng)
        if not self.valid_id(ident):
            expect = {400, 404}
        head = b"POST /pub/%s HTTP/1.1\r\n" % ident.encode("utf-8") + self.headers(rng, app=True)
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body, expect

    def pub(self, rng, index, port):
        data, expect = self.pub_request(rng)
        return Input(index, port, "pub", data, expect, ["POST"])

    def pub_chunked(self, rng, index, port):
        body = self.message(rng)
        chunks, pos = [], 0
        while pos < len(body):
            n = rng.randint(1, max(1, len(body) // 2))
            chunks.append(b"%x\r\n%s\r\n" % (n, body[pos:pos + n]))
            pos += n
        broken = rng.random() < 0.5
        if broken:
            bad = rng.choice((b"ffffffffffffffff", b"10000000000000000", b"-1", b"0x10", b"1x",
                              b"", b" ", b"5;ext=1", b"7fffffff", b"%x" % (self.max_body + 1)))
            chunks.insert(rng.randint(0, len(chunks)), bad + rng.choice((b"\r\n", b"\n", b"")) +
                          rng.choice((b"abc", b"", b"x" * 100)) + rng.choice((b"\r\n", b"")))
        chunks.append(b"0\r\n" + rng.choice((b"", b"X-Trailer: 1\r\n", b"bad trailer\r\n")) + b"\r\n")
        head = b"POST /pub/%s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n" % rng.choice(self.hot).encode()
        return Input(index, port, "pub-chunked", head + b"\r\n" + b"".join(chunks),
                     None if broken else {202, 400}, None if broken else ["POST"])

    def batch_line(self, rng):
        ident, data = rng.choice(self.ids), self.message(rng, rng.choice((0, 3, 30, 300)))
        if rng.random() < 0.7:
            return json.dumps({"id": ident, "data": data.decode()},
                              ensure_ascii=rng.random() < 0.5).encode()
        ident = ident.encode()
        return rng.choice((
            b'{"id": "%s", "data": "\\ud800"}' % ident,
            b'{"id": "%s", "data": "\xff\xfe"}' % ident,
            b'{"id": %s, "data": "x"}' % (b"9" * 5000),
            b'{"id": "%s", "data": 1e999}' % ident,
            b'{"id": "%s", "data": NaN}' % ident,
            b'{"id": ["a"], "data": {"b": null}}',
            b'{"id": "%s"}' % ident,
            b'["id", "data"]',
            b'{"id": "a/b", "data": "x"}',
            b'{"id": "%s", "data": "%s"}' % (ident, b"z" * (self.max_message + 1)),
            b'{"id": "%s", "data": "x", "id": "y"}' % ident,
            b"   ", b"\r", b"null", b"\"\\u", b"{}" * 100,
        ))

    def deep_line(self, rng):
        """JSON nested past any recursion limit, still well inside --max-body."""
        depth = rng.choice((1000, 5000, self.max_body // 4))
        return rng.choice((b"[" * depth, b'{"a":' * (depth // 5),
                           b'{"id": "x", "data": %s}' % (b"[" * depth + b"]" * depth)))

    def batch(self, rng, index, port):
        lines = [self.batch_line(rng) for _ in range(rng.choice((1, 2, 5, 20, 100, 1000)))]
        while len(lines) > 1 and sum(len(line) + 1 for line in lines) > self.max_body * 2 // 3:
            lines = lines[:len(lines) // 2]           # over the limit is the oversize kind's job
        if rng.random() < 0.06:
            lines.insert(rng.randint(0, len(lines)), self.deep_line(rng))
        body = rng.choice((b"\n", b"\r\n")).join(lines)
        head = b"POST /pub HTTP/1.1\r\n" + self.headers(rng, app=True)
        expect = {202} if len(body) <= self.max_body else {413}
        return Input(index, port, "batch", head + b"Content-Length: %d\r\n\r\n" % len(body) + body,
                     expect, ["POST"])

    def admin_request(self, rng):
        path = rng.choice(("/stats", "/metrics", "/health", "/health", "/nope", "/pub", "/stats/"))
        method = rng.choice(("GET", "GET", "GET", "HEAD", "POST", "DELETE", "PUT"))
        if method == "POST" and path == "/pub":
            method = "GET"
        data = ("%s %s HTTP/1.1\r\n" % (method, path)).encode() + self.headers(rng, app=True)
        if method in ("POST", "PUT"):
            data += b"Content-Length: 2\r\n\r\nhi"
        else:
            data += b"\r\n"
        valid = path in ("/stats", "/metrics", "/health")
        if not valid:
            expect = {404, 405}
        elif method not in ("GET", "HEAD"):
            expect = {405}
        else:
            expect = {200, 503} if path == "/health" else {200}     # 503 while a worker restarts
        return data, method, expect

    def admin(self, rng, index, port):
        data, method, expect = self.admin_request(rng)
        return Input(index, port, "admin", data, expect, [method])

    def app_pipeline(self, rng, index, port):
        parts, methods, expect = [], [], set()
        for _ in range(rng.choice((2, 3, 10, 50))):
            if rng.random() < 0.5:
                data, exp = self.pub_request(rng)
                method = "POST"
            else:
                data, method, exp = self.admin_request(rng)
            parts.append(data.replace(b"Connection: close\r\n", b""))
            methods.append(method)
            expect |= exp
        return Input(index, port, "pipeline", b"".join(parts), expect, methods)

    def binary(self, rng, index, port):
        frames = []
        for _ in range(rng.choice((1, 2, 10, 100, 1000))):
            r = rng.random()
            if r < 0.1:
                frames.append(b"\x01")
                continue
            ident, msg = rng.choice(self.ids).encode(), self.message(rng, rng.choice((0, 5, 50, 500)))
            if r < 0.95:
                frames.append(b"\x02" + ident + b"\0" + msg + b"\0")
            else:
                frames.append(rng.choice((
                    b"\x02" + b"i" * 129 + b"\0x\0", b"\x02a/b\0x\0", b"\x02\0x\0",
                    b"\x02" + ident + b"\0\xff\xfe\0",
                    b"\x02" + ident + b"\0" + b"m" * (self.max_message + 1) + b"\0",
                    b"\x03", b"\x00", b"\x02" + ident, b"GET / HTTP/1.1\r\n\r\n")))
        return Input(index, port, "binary", b"".join(frames))

    def garbage(self, rng, index, port):
        n = rng.choice((1, 2, 16, 100, 1000, 10000))
        data = rng.randbytes(n)
        if rng.random() < 0.5:         # past the app port's first-byte check
            data = rng.choice((b"G", b"P", b"\x02", b"\x01", b"GET /")) + data
        return Input(index, port, "garbage", data)

    def oversize(self, rng, index, port):
        r = rng.random()
        if r < 0.4:
            big = b"b" * rng.choice((8200, 20000, 70000))
            head = b"GET /sub/a HTTP/1.1\r\nX-Big: " + big + b"\r\n\r\n"
            return Input(index, port, "oversize-head", head, {431}, ["GET"])
        if r < 0.6:
            head = b"GET /" + b"p" * rng.choice((8200, 70000)) + b" HTTP/1.1\r\n\r\n"
            return Input(index, port, "oversize-line", head, {431}, ["GET"])
        size = self.max_body + rng.choice((1, 1000, 100000))
        lying = rng.random() < 0.3          # says more than it sends
        body = b"[" * (size if not lying else 100)
        path = rng.choice((b"/pub", b"/pub/a", b"/sub/a"))
        data = b"POST %s HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (path, size) + body
        return Input(index, port, "oversize-body", data, None if lying else {405, 413}, ["POST"])


def mutate(rng, data):
    """One random mutation of ``data``."""
    if not data:
        return rng.choice(TOKENS)
    n = len(data)
    op = rng.randrange(11)
    i = rng.randrange(n)
    if op == 0:                                   # bit flip
        return data[:i] + bytes((data[i] ^ (1 << rng.randrange(8)),)) + data[i + 1:]
    if op == 1:                                   # random byte
        return data[:i] + bytes((rng.getrandbits(8),)) + data[i + 1:]
    if op == 2:                                   # insert a token
        return data[:i] + rng.choice(TOKENS) + data[i:]
    if op == 3:                                   # delete a range
        return data[:i] + data[i + rng.randint(1, 16):]
    if op == 4:                                   # a number becomes an odd one
        numbers = list(re.finditer(rb"\d+", data))
        if numbers:
            m = rng.choice(numbers)
            return data[:m.start()] + rng.choice(NUMBERS) + data[m.end():]
        return data + rng.choice(NUMBERS)
    if op == 5:                                   # a CRLF duplicated or removed
        crlfs = [m.start() for m in re.finditer(rb"\r\n", data)]
        if crlfs:
            j = rng.choice(crlfs)
            return data[:j] + rng.choice((b"\r\n\r\n", b"", b"\n", b"\r")) + data[j + 2:]
        return data + b"\r\n"
    if op == 6:                                   # truncated
        return data[:i]
    if op == 7:                                   # a slice repeated
        j = rng.randint(i, min(n, i + 64))
        return data[:j] + data[i:j] * rng.choice((2, 10, 100)) + data[j:]
    if op == 8:                                   # bad UTF-8 or a NUL somewhere
        return data[:i] + rng.choice((b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\0", b"\xe2")) + data[i:]
    if op == 9:                                   # case games on the head
        return data[:i] + data[i:i + 32].swapcase() + data[i + 32:]
    return data + data[:rng.randint(1, n)]       # a second request glued on


def request_target_ok(path):
    """Is this a request-target the server's request line takes (printable ASCII, no space)?"""
    return all(0x21 <= b <= 0x7E for b in path)


def ws_frame(rng, opcode, payload=b"", fin=True, rsv=0, masked=True, length=None, wide=False):
    """A client frame, masked with a key from ``rng``.  ``length`` declares a length other
    than the payload's; ``wide`` writes it in 8 bytes whatever it is (not the shortest form)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | rsv | opcode
    m = 0x80 if masked else 0
    if wide or n >= 1 << 16:
        head = bytes((b0, m | 127)) + struct.pack("!Q", n)
    elif n >= 126:
        head = bytes((b0, m | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, m | n))
    if not masked:
        return head + payload
    key = rng.randbytes(4)
    return head + key + xor_mask(payload, key)


def xor_mask(data, key):
    """data XOR the 4-byte key repeated, as one big-int XOR (a loop over bytes is slow)."""
    if not data:
        return b""
    n = len(data)
    stream = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ stream).to_bytes(n, "big")


def ws_accept(key):
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def ws_key_ok(key):
    """RFC 6455 4.1: the key is 16 bytes, base64-encoded."""
    try:
        return key is not None and len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


def bad_ws_key(rng):
    """A Sec-WebSocket-Key that is certainly not 16 bytes in base64."""
    raw = rng.randbytes(17)
    good = base64.b64encode(raw[:16])
    return rng.choice((b"", b"short", base64.b64encode(raw[:15]), base64.b64encode(raw), good[:22],
                       good[:23] + b"*", raw[:16].hex().encode(), good[:10] + b" " + good[10:],
                       good[:22] + b"===", b"=" * 24))


class WsMessage:
    """The tool's account of a data message as its frames go: what is left to send, its size,
    and for text whether its bytes can still be UTF-8; ``add`` says what a frame calls for."""

    def __init__(self, text, limit, rest=b""):
        self.text, self.limit, self.rest, self.size = text, limit, rest, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")() if text else None

    def add(self, payload, fin):
        """The close codes this frame of the message calls for (none: it is fine)."""
        codes = set()
        self.size += len(payload)
        if self.size > self.limit:
            codes.add(1009)
        if self.decoder is not None:
            try:
                self.decoder.decode(payload, fin)
            except UnicodeDecodeError:
                codes.add(1007)
        return codes


def mutate_frames(rng, frames):
    """One byte-level mutation of a frame stream: a header bit (FIN, RSV, opcode, MASK, length),
    a declared length, a frame duplicated, swapped, dropped or cut, or mutate() on it all."""
    frames = list(frames) or [b""]
    i = rng.randrange(len(frames))
    frame = frames[i]
    op = rng.randrange(7)
    if op == 0 and len(frame) >= 2:
        byte, bit = divmod(rng.randrange(16), 8)
        frames[i] = frame[:byte] + bytes((frame[byte] ^ (0x80 >> bit),)) + frame[byte + 1:]
    elif op == 1 and len(frame) >= 2:             # the old length's bytes stay, as payload
        length = rng.choice((0, 125, 126, 65535, 65536, 1 << 31, 1 << 62, 1 << 63, (1 << 64) - 1))
        field = struct.pack("!Q", length) if rng.random() < 0.5 else struct.pack("!H", length & 0xFFFF)
        frames[i] = frame[:1] + bytes((frame[1] & 0x80 | (127 if len(field) == 8 else 126),)) + \
            field + frame[2:]
    elif op == 2:
        frames.insert(i, frame)
    elif op == 3:
        j = rng.randrange(len(frames))
        frames[i], frames[j] = frames[j], frames[i]
    elif op == 4:
        del frames[i]
    elif op == 5:
        frames[i] = frame[:rng.randrange(len(frame) + 1)]
    else:
        return [mutate(rng, b"".join(frames))]
    return frames


# -- the engine: many non-blocking connections at once -----------------------------

class Conn:
    __slots__ = ("inp", "sock", "seg", "offset", "send_at", "buf", "last_io", "end_at",
                 "read", "methods", "record", "connected", "events", "start", "sent", "sent_at",
                 # a stream: "ws" or "sse" once answered so, its last seq, pongs (and their bytes)
                 # read, the server's close code, whether a fault was reported already
                 "stream", "seq", "pongs", "pong_bytes", "close", "faulty",
                 # a "drain" client: bytes the kernel held for it when measured, and sent by then;
                 # what the server had not read yet at the last look, and when to look again
                 "kernel", "sent_measured", "measured_at", "unread", "look_at")


# sock_diag (linux/sock_diag.h, inet_diag.h): the request type, and where the queues are in
# the answer (after the netlink header, the first 4 bytes, the socket id and a timer field).
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, NLMSG_ERROR = 4, 20, 1, 2
INET_DIAG_QUEUES = 16 + 4 + 48 + 4
# A block of an event stream: the retry hint, a ping, a message, or the refusal of a full table.
SSE_BLOCK = re.compile(rb"retry: \d+|: ping|id: (\d+)(?:\ndata: [^\r\n]*)+|event: error\ndata: [^\r\n]*"
                       rb"|event: epoch\ndata: \d+")
EVENT_STREAM = re.compile(rb"\r\ncontent-type: *text/event-stream", re.I)
WS_NAMES = {WS_TEXT: "text", WS_CLOSE: "close", WS_PING: "ping", WS_PONG: "pong"}


def server_frame(buf, pos):
    """The frame at buf[pos:], if complete: (first byte, second byte, length, payload, end)."""
    have = len(buf) - pos
    if have < 2:
        return None
    b0, b1 = buf[pos], buf[pos + 1]
    n, head = b1 & 0x7F, 2
    if n == 126:
        if have < 4:
            return None
        n, head = struct.unpack_from("!H", buf, pos + 2)[0], 4
    elif n == 127:
        if have < 10:
            return None
        n, head = struct.unpack_from("!Q", buf, pos + 2)[0], 10
    if b1 & 0x80:                                 # masked: wrong from a server, frame_fault says
        head += 4
    if head + n > have:
        return None
    end = pos + head + n
    return b0, b1, n, bytes(buf[end - n:end]), end


def frame_fault(b0, b1, n, payload):
    """What is wrong with a frame from the server (RFC 6455 5.2, 5.5, 7.4; the README), or None."""
    opcode = b0 & 0x0F
    if b0 & 0x70:
        return "reserved bits set"
    if b1 & 0x80:
        return "a masked frame (a server must not mask)"
    if not b0 & 0x80:
        return "a fragment (the server sends each message whole)"
    if opcode not in WS_NAMES:
        return "opcode 0x%x" % opcode
    if (b1 & 0x7F == 126 and n < 126) or (b1 & 0x7F == 127 and n < 1 << 16):
        return "a length of %d not in its shortest form" % n
    if opcode >= WS_CLOSE and n > 125:
        return "a control frame of %d bytes" % n
    if opcode == WS_CLOSE and n == 1:
        return "a close frame of 1 byte"
    if opcode == WS_CLOSE and n and struct.unpack("!H", payload[:2])[0] not in SERVER_CLOSE_CODES:
        return "close code %d, not one the server sends" % struct.unpack("!H", payload[:2])
    if opcode in (WS_TEXT, WS_CLOSE):
        try:
            (payload if opcode == WS_TEXT else payload[2:]).decode("utf-8")
        except UnicodeDecodeError:
            return "text that is not UTF-8: %r" % payload[:100]
    return None


def tcp_queue(local, remote):
    """(unacknowledged, unread) bytes the kernel holds for the loopback TCP socket from port
    ``local`` to port ``remote`` (None: there is none), looked up by sock_diag (netlink): the
    same figures as /proc/net/tcp, without reading every socket of the host.  OSError if
    sock_diag cannot be used here."""
    ip = socket.inet_aton(HOST)
    req = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + \
        struct.pack("!HH", local, remote) + ip + bytes(12) + ip + bytes(12) + \
        struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)        # any interface, no cookie
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as s:
        s.settimeout(1.0)
        s.sendto(struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
                 + req, (0, 0))
        reply = s.recv(8192)
    if struct.unpack_from("=H", reply, 4)[0] == NLMSG_ERROR:
        return None
    unread, unacknowledged = struct.unpack_from("=II", reply, INET_DIAG_QUEUES)
    return unacknowledged, unread


class Tally:
    """What happened, for the summary."""

    def __init__(self):
        self.inputs = collections.Counter()       # (port, kind) -> inputs
        self.statuses = collections.Counter()     # (port, status) -> responses
        self.outcomes = collections.Counter()     # how connections ended
        self.streams = collections.Counter()      # streams opened, frames and events read
        self.flood_queued = None                  # the most a "drain" client found queued
        self.sent_bytes = 0
        self.read_bytes = 0


class Engine:
    """Runs inputs over up to ``concurrency`` connections at once; every connection is bounded."""

    def __init__(self, ports, concurrency, tally, on_oracle, on_tick):
        self.ports = ports
        self.concurrency = concurrency
        self.tally = tally
        self.on_oracle = on_oracle            # (input, status, message): a valid seed got a wrong answer
        self.on_tick = on_tick                # called about every 0.1 s (the death watch)
        self.sel = selectors.DefaultSelector()
        self.conns = set()
        self.recent = collections.deque(maxlen=4000)   # [start, end or None, index]

    def run(self, inputs, deadline):
        """Send every input (unless ``deadline`` passes first); True if all were sent."""
        inputs = iter(inputs)
        more = True
        next_tick = 0.0
        while more or self.conns:
            now = time.monotonic()
            if now > deadline:
                for c in list(self.conns):
                    self.finish(c, "cut at the time limit")
                return False
            while more and len(self.conns) < self.concurrency:
                inp = next(inputs, None)
                if inp is None:
                    more = False
                else:
                    self.open(inp, now)
            for key, mask in self.sel.select(0.02):
                c = key.data
                if c in self.conns:
                    self.on_event(c, mask)
            now = time.monotonic()
            for c in list(self.conns):
                self.on_time(c, now)
            if now >= next_tick:
                next_tick = now + 0.1
                self.on_tick()
        return True

    def open(self, inp, now):
        c = Conn()
        c.inp, c.seg, c.offset, c.send_at, c.buf, c.read = inp, 0, 0, now, bytearray(), 0
        c.methods = list(inp.methods) if inp.methods else None
        c.last_io = c.start = now
        c.end_at = now + inp.life
        c.connected = False
        c.sent, c.sent_at = 0, None
        c.stream = c.close = c.kernel = c.unread = None
        c.seq = c.pongs = c.pong_bytes = 0
        c.look_at = now
        c.faulty = False
        c.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if inp.buffers:                       # before connecting, or the window is set already
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, inp.buffers)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, inp.buffers)
        c.sock.setblocking(False)
        c.sock.connect_ex((HOST, self.ports[inp.port]))
        self.tally.inputs[inp.port, inp.kind] += 1
        self.conns.add(c)
        c.record = [now, None, inp.index]
        self.recent.append(c.record)
        c.events = 0
        self.watch(c, selectors.EVENT_WRITE)

    def on_event(self, c, mask):
        if mask & selectors.EVENT_WRITE:
            if not c.connected:
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self.finish(c, "connect failed: %s" % os.strerror(err))
                    return
                c.connected = True
            self.send(c)
        if mask & selectors.EVENT_READ and c in self.conns:
            self.receive(c)

    def send(self, c):
        inp = c.inp
        while c.seg < len(inp.segments):
            if time.monotonic() < c.send_at:
                self.watch(c, self.reading(c))
                return
            seg = inp.segments[c.seg]
            try:
                n = c.sock.send(memoryview(seg)[c.offset:]) if seg else 0
            except BlockingIOError:
                return
            except OSError:                   # it answered and closed before we were done
                self.read_rest(c)
                self.finish(c, "closed by the server")
                return
            self.tally.sent_bytes += n
            c.sent += n
            c.offset += n
            if c.offset < len(seg):
                return
            c.seg, c.offset = c.seg + 1, 0
            c.send_at = time.monotonic() + inp.gap
            c.last_io = time.monotonic()
            if inp.gap and c.seg < len(inp.segments):
                self.watch(c, self.reading(c))
                return
        if c.sent_at is None:
            c.sent_at = time.monotonic()
        if inp.mode == "truncate":
            self.finish(c, "hung up after a truncated input", reset=True)
            return
        self.watch(c, self.reading(c))

    @staticmethod
    def reading(c):
        if c.inp.mode == "noread" or (c.inp.mode == "drain" and c.kernel is None):
            return 0
        return selectors.EVENT_READ

    def read_rest(self, c):
        """What the server sent before it closed (an RST may follow it): read, then judged."""
        while self.reading(c) and c.read <= c.inp.read_cap:
            try:
                data = c.sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            c.read += len(data)
            self.tally.read_bytes += len(data)
            c.buf += data
        self.parse(c, final=True)

    def watch(self, c, events):
        if events == c.events:
            return
        if not events:
            self.sel.unregister(c.sock)
        elif not c.events:
            self.sel.register(c.sock, events, c)
        else:
            self.sel.modify(c.sock, events, c)
        c.events = events

    def receive(self, c):
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.parse(c, final=True)
            self.finish(c, "closed by the server")
            return
        c.last_io = time.monotonic()
        c.read += len(data)
        self.tally.read_bytes += len(data)
        c.buf += data
        self.parse(c)
        if c.read > c.inp.read_cap:
            self.finish(c, "hung up after %d MiB read" % (c.inp.read_cap >> 20), reset=True)

    def on_time(self, c, now):
        sent = c.seg >= len(c.inp.segments)
        waiting = c.inp.mode == "drain" and c.kernel is None       # reads nothing yet
        if waiting and c.connected and now >= c.look_at:
            waiting = not self.measure(c, now, sent)
        if now > c.end_at:
            self.parse(c, final=True)
            self.finish(c, "hung up at the connection time limit", reset=c.inp.reset)
        elif sent and not waiting and now - c.last_io > c.inp.linger:
            self.parse(c, final=True)
            self.finish(c, "hung up after silence (held or idle)", reset=c.inp.reset)
        elif not sent and c.connected and now >= c.send_at:
            self.watch(c, selectors.EVENT_WRITE | self.reading(c))

    def measure(self, c, now, sent):
        """A "drain" client has read nothing so far.  Once the server has taken all it will
        of what was sent (all of it, or, with back-pressure, what it took stops growing; at
        the latest FLOOD_MEASURE after the start), note what the kernel holds for it at both
        ends and what it sent; then it reads everything (judge does the sums).  True if so."""
        c.look_at = now + 0.1
        local, server = c.sock.getsockname()[1], self.ports[c.inp.port]
        try:
            mine, theirs = tcp_queue(local, server) or (0, 0), tcp_queue(server, local) or (0, 0)
        except OSError:                       # no sock_diag: what the kernel holds is unknown,
            mine, theirs = (float("inf"), 0), (0, 0)   # so no verdict (judge finds -inf queued)
        unread = mine[0] + theirs[1]          # sent, and not read by the server yet
        taken = sent and now >= c.sent_at + 0.2 and unread in (0, c.unread)
        c.unread = unread
        if not taken and now < c.start + FLOOD_MEASURE:
            return False
        c.kernel = sum(mine) + sum(theirs)
        c.sent_measured = c.sent
        c.last_io = c.measured_at = now
        self.watch(c, self.reading(c) | (0 if sent else selectors.EVENT_WRITE))
        return True

    def parse(self, c, final=False):
        """Count the complete responses in c.buf; for valid seeds check what they say.  After
        a 101 or an event stream's head, what follows is frames or events (parse_stream)."""
        if c.stream:
            self.parse_stream(c)
            return
        buf, pos = c.buf, 0
        while True:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                break
            head = bytes(buf[pos:end])
            m = re.match(rb"HTTP/1\.1 (\d{3}) [^\r\n]*", head)
            if m is None:
                self.tally.outcomes["response not HTTP/1.1 (or a HEAD answer misread)"] += 1
                if c.inp.expect is not None:
                    self.on_oracle(c.inp, None, "a response that is not HTTP/1.1: %r" % head[:200])
                pos = len(buf)
                break
            status = int(m.group(1))
            length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
            body_start = end + 4
            method = c.methods.pop(0) if c.methods else None
            if status == 101 or (status == 200 and method != "HEAD" and EVENT_STREAM.search(head)):
                self.tally.statuses[c.inp.port, status] += 1
                if c.inp.expect is not None:
                    self.check_answer(c.inp, status, head, b"")
                del buf[:body_start]
                self.open_stream(c, status, head)
                return
            if status == 204 or length is None or method == "HEAD":
                body_end = body_start
            elif method is None and buf.startswith(b"HTTP/1.1 ", body_start):
                body_end = body_start                 # most likely a HEAD answer: no body
            else:
                body_end = body_start + int(length.group(1))
                if body_end > len(buf):
                    if method is None and final:      # a HEAD answer at the end
                        body_end = body_start
                    else:
                        if method:
                            c.methods.insert(0, method)
                        break
            self.tally.statuses[c.inp.port, status] += 1
            if c.inp.expect is not None:
                self.check_answer(c.inp, status, head, bytes(buf[body_start:body_end]))
            pos = body_end
        del buf[:pos]

    def check_answer(self, inp, status, head, body):
        if status not in inp.expect:
            self.on_oracle(inp, status, "status %d, expected %s: %r" % (
                status, "/".join(map(str, sorted(inp.expect))), body[:200]))
            return
        if status == 200 and body and b"application/json" in head.lower():
            try:
                doc = json.loads(body)
            except ValueError:
                self.on_oracle(inp, status, "a JSON answer that does not parse: %r" % body[:200])
                return
            if inp.ident is not None and doc.get("id") != inp.ident:
                self.on_oracle(inp, status, "the answer for id %r names %r" % (inp.ident, doc.get("id")))

    # -- streams: what the server sends on them is judged whatever was sent to it

    def open_stream(self, c, status, head):
        c.stream = "ws" if status == 101 else "sse"
        self.tally.streams[c.stream + " opened"] += 1
        if c.stream == "ws" and c.inp.ws_key is not None:
            m = re.search(rb"\r\nsec-websocket-accept: *([^\r]*)", head, re.I)
            if m is None or m.group(1).strip() != ws_accept(c.inp.ws_key):
                self.stream_fault(c, "Sec-WebSocket-Accept %r, not %r" % (
                    m and m.group(1), ws_accept(c.inp.ws_key)))
        self.parse_stream(c)

    def parse_stream(self, c):
        buf, pos = c.buf, 0
        if c.stream == "ws":
            while True:
                frame = server_frame(buf, pos)
                if frame is None:
                    break
                pos = frame[4]
                self.on_ws_frame(c, *frame[:4])
        else:
            while True:
                end = buf.find(b"\n\n", pos)
                if end < 0:
                    break
                block, pos = bytes(buf[pos:end]), end + 2
                m = SSE_BLOCK.fullmatch(block)
                if m is None:
                    self.stream_fault(c, "not an event: %r" % block[:200])
                elif m.group(1) is not None:
                    self.tally.streams["sse events"] += 1
                    try:
                        block.decode("utf-8")
                        fault = self.seq_fault(c, int(m.group(1)))
                    except UnicodeDecodeError:
                        fault = "an event that is not UTF-8: %r" % block[:200]
                    if fault:
                        self.stream_fault(c, fault)
                elif block == b": ping":
                    self.tally.streams["sse pings"] += 1
        del buf[:pos]

    def on_ws_frame(self, c, b0, b1, n, payload):
        inp, opcode = c.inp, b0 & 0x0F
        fault = frame_fault(b0, b1, n, payload)
        if fault is None and c.close is not None:
            fault = "a frame (opcode 0x%x) after its close frame (%d)" % (opcode, c.close)
        if opcode == WS_PONG:
            c.pongs += 1
            c.pong_bytes += 2 + n
            if fault is None and inp.pings is not None:
                if c.pongs > len(inp.pings):
                    fault = "pong %d, for %d ping(s) sent: %r" % (c.pongs, len(inp.pings), payload[:50])
                elif inp.pings[c.pongs - 1] != payload:
                    fault = "pong %d carries %r, its ping %r" % (
                        c.pongs, payload[:50], inp.pings[c.pongs - 1][:50])
        elif opcode == WS_TEXT and fault is None:
            fault = self.message_fault(c, payload)
        elif opcode == WS_CLOSE and c.close is None:
            c.close = struct.unpack("!H", payload[:2])[0] if n >= 2 else 1005
            self.tally.streams["ws close %d" % c.close] += 1
        self.tally.streams["ws %s" % WS_NAMES.get(opcode, "bad")] += 1
        if fault:
            self.stream_fault(c, fault)

    def message_fault(self, c, payload):
        """What is wrong with a message on a WebSocket: {"id": ..., "seq": N, "data": ...,
        "epoch": E}."""
        try:
            doc = json.loads(payload)
        except ValueError:
            return "a text frame that is not JSON: %r" % payload[:200]
        if not (isinstance(doc, dict) and set(doc) == {"id", "seq", "data", "epoch"} and
                type(doc["seq"]) is int and isinstance(doc["data"], str) and
                type(doc["epoch"]) is int):
            return "a message not of the form {id, seq, data, epoch}: %r" % payload[:200]
        if c.inp.ident is not None and doc["id"] != c.inp.ident:
            return "a message for %r on a stream of %r" % (doc["id"], c.inp.ident)
        return self.seq_fault(c, doc["seq"])

    @staticmethod
    def seq_fault(c, seq):
        if seq <= c.seq:
            return "seq %d after seq %d: each message once, in order" % (seq, c.seq)
        c.seq = seq
        return None

    def stream_fault(self, c, fault):
        if not c.faulty:                      # the first fault of a stream tells; the rest follow
            c.faulty = True
            self.on_oracle(c.inp, None, "%s stream: %s" % (c.stream, fault), "stream")

    def judge(self, c):
        """As a connection ends: the close code its frames called for; and for a "drain"
        client, the pongs it read after the measure, less all the kernel then held and all
        it sent since, were queued in the server's memory: that is what back-pressure bounds."""
        inp = c.inp
        if c.stream == "ws" and inp.close_codes is not None and c.close is not None and \
                c.close not in inp.close_codes and c.close != 1013:
            wanted = ["%d" % code for code in sorted(inp.close_codes - {0})]
            self.stream_fault(c, "closed with %d where the frames sent call for %s" % (
                c.close, " or ".join(wanted + ["no close"] * (0 in inp.close_codes))))
        if inp.mode != "drain":
            return
        if c.kernel is None:                  # closed first (too slow a reader): bounded too
            self.tally.streams["%s closed before the measure" % inp.kind] += 1
            return
        queued = c.pong_bytes - c.kernel - (c.sent - c.sent_measured)
        self.tally.streams["%s measured" % inp.kind] += 1
        if inp.kind == "ws-flood" and queued > float("-inf"):
            self.tally.flood_queued = max(queued, queued if self.tally.flood_queued is None
                                          else self.tally.flood_queued)
        if queued > FLOOD_QUEUE_LIMIT:
            self.on_oracle(inp, None, (
                "a WebSocket client that read nothing for %.1f s (%.1f MiB of pings sent) "
                "then read %.1f MiB of pongs; the kernel held %.1f MiB, so the server had "
                "queued at least %.1f MiB in its own memory (limit %d MiB): it keeps reading "
                "pings it cannot answer") % (
                c.measured_at - c.start, c.sent_measured / 2 ** 20, c.pong_bytes / 2 ** 20,
                c.kernel / 2 ** 20, queued / 2 ** 20, FLOOD_QUEUE_LIMIT >> 20), "back-pressure")

    def finish(self, c, outcome, reset=False):
        self.judge(c)
        self.conns.discard(c)
        self.watch(c, 0)
        if reset:                             # RST, not FIN: the server must cope with both
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.sock.close()
        c.record[1] = time.monotonic()
        self.tally.outcomes[outcome] += 1


# -- the server, started or attached -------------------------------------------------

class StartError(Exception):
    pass


class Server:
    """The server under test: one this tool started (and stops), or one it attached to."""

    def __init__(self, client, app, proc=None, supervisor=None, log_path=None):
        self.client, self.app = client, app
        self.proc = proc
        self.supervisor = supervisor
        self.log_path = log_path
        self.log_pos = 0

    @classmethod
    def start(cls, workers, flags, log_path, timeout=30.0):
        # Servers restarted by the tool share one log: each start appends to it.
        try:
            started = launch([sys.executable, MEGACOMET],
                             ["--workers", workers, "--host", HOST, "--port", 0,
                              "--app-host", HOST, "--app-port", 0, *flags],
                             log=log_path, cwd=ROOT, timeout=timeout)
        except LaunchError as e:                   # its tree is stopped already
            raise StartError(str(e)) from None
        server = cls(started.client, started.app, started.proc, started.proc.pid, log_path)
        server.log_pos = started.log_offset
        return server

    def new_log_lines(self):
        """Whole lines the server logged since the last call."""
        if not self.log_path:
            return []
        with open(self.log_path, "rb") as f:
            f.seek(self.log_pos)
            data = f.read()
        data = data[:data.rfind(b"\n") + 1]
        self.log_pos += len(data)
        return data.decode(errors="replace").splitlines()

    def alive(self):
        if self.proc is not None:
            return self.proc.poll() is None
        return self.supervisor is None or alive(self.supervisor)

    def stop(self):
        """SIGTERM the supervisor this tool started, then SIGKILL its workers if any is left."""
        if self.proc is None:
            return
        stop_tree(self.proc, grace=8)
        self.proc = None


def request(port, method, path, body=None, timeout=CHECK_TIMEOUT):
    """(status, body) of one request on its own connection; (None, why) if it got no answer."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException) as e:
        return None, repr(e)
    finally:
        conn.close()


def proc_status(pid):
    """(fds, private RSS bytes, VmRSS bytes) of pid, or None if it is gone.

    Private RSS is VmRSS less RssShmem: the shared message store is touched
    more as it fills, which is not a leak.
    """
    try:
        fds = len(os.listdir("/proc/%d/fd" % pid))
        with open("/proc/%d/status" % pid) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    kib = {name: int(fields.get(name, "0 kB").split()[0]) << 10 for name in ("VmRSS", "RssShmem")}
    return fds, kib["VmRSS"] - kib["RssShmem"], kib["VmRSS"]


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def cpu_seconds(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except OSError:
        return 0.0


class Heartbeat(threading.Thread):
    """GET /health every 0.25 s while inputs fly, each on a new connection: the slowest wait.

    A worker frozen by one connection answers nobody else, and the probes'
    connections are spread over the workers like anyone's: one soon waits.
    """

    def __init__(self, port, limit):
        super().__init__(daemon=True)
        self.port, self.limit = port, limit
        self.worst = 0.0
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.25):
            start = time.monotonic()
            request(self.port, "GET", "/health", timeout=self.limit)
            self.worst = max(self.worst, time.monotonic() - start)

    def stop(self):
        self.done.set()
        self.join(self.limit + 1)
        return self.worst


class LiveError(Exception):
    pass


class LiveClient:
    """A stream the checks open and read with blocking calls: "ws" or "sse"."""

    def __init__(self, kind, port, ident):
        self.kind, self.buf = kind, bytearray()
        self.sock = socket.create_connection((HOST, port), timeout=CHECK_TIMEOUT)
        if kind == "ws":
            key = base64.b64encode(os.urandom(16))
            self.sock.sendall(b"GET /ws/%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                              b"Sec-WebSocket-Version: 13\r\n\r\n" % (ident.encode(), key))
            head = self.head()
            if not head.startswith(b"HTTP/1.1 101 ") or ws_accept(key) not in head:
                raise LiveError("the upgrade was answered %r" % head[:300])
        else:
            self.sock.sendall(b"GET /sse/%s HTTP/1.1\r\nHost: x\r\n"
                              b"Accept: text/event-stream\r\n\r\n" % ident.encode())
            head = self.head()
            if not head.startswith(b"HTTP/1.1 200 ") or not EVENT_STREAM.search(head):
                raise LiveError("the EventSource was answered %r" % head[:300])

    def fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise LiveError("a %s client: nothing more in time; it has %r" % (
                self.kind, bytes(self.buf[-200:])))
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            raise LiveError("a %s client: closed by the server; it has %r" % (
                self.kind, bytes(self.buf[-200:])))
        self.buf += data

    def head(self):
        deadline = time.monotonic() + CHECK_TIMEOUT
        while b"\r\n\r\n" not in self.buf:
            self.fill(deadline)
        end = self.buf.index(b"\r\n\r\n") + 4
        head = bytes(self.buf[:end])
        del self.buf[:end]
        return head

    def frame(self, deadline):
        """(opcode, payload) of the next frame, which must be well formed."""
        while (frame := server_frame(self.buf, 0)) is None:
            self.fill(deadline)
        b0, b1, n, payload, end = frame
        del self.buf[:end]
        fault = frame_fault(b0, b1, n, payload)
        if fault:
            raise LiveError("a WebSocket client got a bad frame: %s" % fault)
        return b0 & 0x0F, payload

    def message(self, deadline):
        """(id or None, seq, data) of the next message; pings and the retry hint skipped."""
        if self.kind == "ws":
            while True:
                opcode, payload = self.frame(deadline)
                if opcode == WS_TEXT:
                    doc = json.loads(payload)
                    return doc["id"], doc["seq"], doc["data"]
                if opcode == WS_CLOSE:
                    raise LiveError("a WebSocket client: closed by the server: %r" % payload)
        while True:
            while b"\n\n" not in self.buf:
                self.fill(deadline)
            end = self.buf.index(b"\n\n")
            block = bytes(self.buf[:end])
            del self.buf[:end + 2]
            m = SSE_BLOCK.fullmatch(block)
            if m is None:
                raise LiveError("an EventSource client got %r" % block[:200])
            if m.group(1) is not None:
                lines = block.decode().split("\n")
                return None, int(m.group(1)), "\n".join(line[len("data: "):] for line in lines[1:])

    def close(self, deadline):
        """Send a close (1000): the code of the close frame that answers it."""
        self.sock.sendall(ws_frame(random.Random(), WS_CLOSE, struct.pack("!H", 1000)))
        while True:
            opcode, payload = self.frame(deadline)
            if opcode == WS_CLOSE:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


# -- the fuzzer: batches of inputs, checks between them --------------------------------

class Fuzzer:
    def __init__(self, args, gen, server=None):
        self.args = args
        self.gen = gen
        self.server = server                  # None: the fuzzer starts (and restarts) its own
        self.attached = server is not None
        self.starts = 0                       # servers started (restarted after a stall)
        self.log_path = None                  # the log of the servers started
        self.ports = {}
        self.tally = Tally()
        self.engine = Engine(self.ports, args.concurrency, self.tally, self.on_oracle, self.watch_deaths)
        self.elapsed = 0.0                    # seconds spent sending inputs (checks excluded)
        self.worst_wait = 0.0                 # the slowest /health probe while inputs flew
        self.replayed = 0
        self.checks = collections.Counter()
        self.oracle_sorts = collections.Counter()     # (check, message less numbers) -> shown
        self.live_cover = collections.Counter()       # stream kind -> checks it held on every worker
        self.failures = []                    # (check, detail, index of the last input before it)
        self.defects = {}                     # input index -> what it does alone
        self.causes = {}                      # a worker's dying words -> the input found to cause them
        self.trial_words = set()              # the dying words of the latest replay
        self.alarms = []
        self.log_window = []                  # log lines read since the last log check
        self.log_lines = None                 # lines read in all (None: no log to read)
        self.deaths = []                      # (when, pid) seen while inputs were in flight
        self.pids = []
        self.base = {}                        # pid -> (fds, private RSS, VmRSS) at its first check
        self.last = {}                        # pid -> the same at its latest check
        self.base_conns = self.base_subs = 0
        self.fatal = False                    # a worker stopped answering
        self.serial = 0
        self.printed = None
        self.deadline = time.monotonic() + args.time_limit
        if server is not None:
            self.ports.update(client=server.client, app=server.app)

    def time_left(self):
        return self.deadline - time.monotonic()

    def last_index(self):
        return self.engine.recent[-1][2] if self.engine.recent else None

    def fail(self, check, detail, index=None):
        index = self.last_index() if index is None else index
        self.failures.append((check, detail, index))
        print("FAIL %s: %s" % (check, detail), flush=True)
        if index is not None and index != self.printed:
            print("     seed %d, last input before it: %s" % (
                self.args.seed, self.gen.make(index).describe(300)), flush=True)
            self.printed = index

    def on_oracle(self, inp, status, message, check="answer"):
        """A wrong answer (check "answer"), stream ("stream") or back-pressure.  Two of one
        sort (numbers and quoted bytes aside) tell all: the rest are counted, so that one
        defect met often neither floods the report nor ends the run (--max-failures)."""
        sort = (check, re.sub(r"\d+|b?'[^']*'|b?\"[^\"]*\"", "_", message)[:60])
        if status == 503 and self.deaths:
            self.tally.outcomes["503 while a worker was down (not a failure)"] += 1
        elif self.oracle_sorts[sort] < 2 and sum(1 for f in self.failures if f[0] == check) < 20:
            self.oracle_sorts[sort] += 1
            self.fail(check, "%s to %s" % (message, inp.kind), inp.index)
        else:
            self.tally.outcomes["%s failures like those shown" % check] += 1

    def watch_deaths(self):
        for pid in self.pids:
            if not alive(pid) and pid not in (d[1] for d in self.deaths):
                self.deaths.append((time.monotonic(), pid))

    # -- the server

    def start_server(self):
        """A fresh server (the old one, if any, stopped), warmed up and measured."""
        if self.server is not None:
            self.read_log()
            self.check_log()
            self.server.stop()
        flags = SERVER_FLAGS + ["--max-message", str(self.args.max_message),
                                "--max-body", str(self.args.max_body)]
        log_path = os.path.join(tempfile.gettempdir(),
                                "fuzz_server-%d-%d.log" % (os.getpid(), self.args.seed))
        self.starts += 1
        self.server = Server.start(self.args.workers, flags, log_path)
        self.log_path = log_path
        self.ports.update(client=self.server.client, app=self.server.app)
        if self.starts == 1:
            print("server: client port %d, app port %d, %d workers, %s; log %s" % (
                self.server.client, self.server.app, self.args.workers, " ".join(flags), log_path),
                flush=True)
        self.pids, self.base, self.last = [], {}, {}
        self.warm_up()

    def warm_up(self):
        """Backlogs for the hot ids, one round of checks, then the baseline."""
        self.pids = self.worker_pids()
        rng = random.Random("%d/warm" % self.args.seed)
        lines = [json.dumps({"id": ident, "data": self.gen.message(
                     rng, rng.randint(100, self.args.max_message)).decode()})
                 for ident in self.gen.hot for _ in range(64)]
        for start in range(0, len(lines), 8):
            body = "\n".join(lines[start:start + 8]).encode()
            status, body = request(self.ports["app"], "POST", "/pub", body)
            if status != 202:
                self.fail("warm-up", "POST /pub: %s %r" % (status, body[:200]))
                self.fatal = True
                return
        doc = self.stats()
        if doc is None:
            self.fail("warm-up", "/stats did not answer")
            self.fatal = True
            return
        self.base_conns, self.base_subs = doc["totals"]["connections"], doc["totals"]["subscribers"]
        self.run_checks("the warm-up")
        if self.starts <= 1 or self.args.verbose:
            print("%s: %s" % (
                "baseline" if self.starts <= 1 else "server restarted, baseline",
                "; ".join("worker %d: %d fds, private RSS %.1f MiB" % (pid, u[0], u[1] / 2 ** 20)
                          for pid, u in sorted(self.base.items()))), flush=True)

    def stats(self):
        status, body = request(self.ports["app"], "GET", "/stats")
        return json.loads(body) if status == 200 else None

    def worker_pids(self, wait=10.0):
        """Pids from /stats once every worker is up (a restarted one shows 0 meanwhile)."""
        deadline = time.monotonic() + min(wait, max(self.time_left(), 1.0))
        while True:
            doc = self.stats()
            pids = [w["pid"] for w in doc["workers"]] if doc else []
            if (pids and all(pids)) or time.monotonic() > deadline:
                return pids
            time.sleep(0.1)

    # -- checks, once the tool's connections are all closed

    def run_checks(self, label):
        self.serial += 1
        if self.server is not None and not self.server.alive():
            self.fail("server alive", "the supervisor exited")
            self.fatal = True
            return
        pids = self.worker_pids(wait=3.0)
        if not pids or not all(pids):
            self.fail("workers alive", "/stats %s" % (
                "did not answer" if not pids else "shows pids %s" % pids))
            self.fatal = True
        elif self.pids and pids != self.pids:
            self.fail("workers alive", "pids %s became %s (a worker died and was restarted)" % (
                self.pids, pids))
        else:
            self.checks["workers alive"] += 1
        self.pids = pids or self.pids
        if not self.fatal:
            self.check_health()
        if not self.fatal:                   # these would only time out, one by one
            self.check_round_trip()
            self.check_held_poll()
            self.check_live_streams()
            self.check_settled(label)
        self.check_idle()
        gone = [pid for pid in self.pids if not alive(pid)]
        if gone:
            self.fail("workers alive", "worker(s) %s died during the checks" % gone)
            self.pids = self.worker_pids()
        self.read_log()
        self.check_log()

    def check_health(self):
        # Several connections: SO_REUSEPORT spreads them, so each worker most likely gets one.
        answers = [request(self.ports["app"], "GET", "/health") for _ in range(8)]
        bad = [a for a in answers if a[0] != 200]
        if bad:
            self.fail("health", "%d of 8 answers were not 200: %s %r" % (
                len(bad), bad[0][0], bad[0][1][:100]))
            self.fatal = any(a[0] is None for a in bad)
        else:
            self.checks["health"] += 1

    def check_round_trip(self):
        ident = "chk-%d-%d-%d" % (self.args.seed, self.serial, os.getpid())
        data = "round trip %d \u00e9" % self.serial
        status, body = request(self.ports["app"], "POST", "/pub/" + ident, data.encode())
        if status != 202:
            self.fail("round trip", "POST /pub/%s: %s %r" % (ident, status, body[:200]))
            return
        status, body = request(self.ports["client"], "GET", "/sub/%s?since=0&timeout=5" % ident)
        try:
            messages = json.loads(body)["messages"] if status == 200 else None
        except (ValueError, KeyError, TypeError):
            messages = None
        if not messages or messages[-1].get("data") != data:
            self.fail("round trip", "GET /sub/%s?since=0: %s %r" % (ident, status, body[:200]))
        else:
            self.checks["round trip"] += 1

    def check_held_poll(self):
        """Polls held before a publish all get it (several: most likely on different workers)."""
        ident = "held-%d-%d-%d" % (self.args.seed, self.serial, os.getpid())
        data = "held %d" % self.serial
        doc = self.stats()
        before = doc["totals"]["subscribers"] if doc else 0
        socks = []
        try:
            for _ in range(max(2, len(self.pids))):
                s = socket.create_connection((HOST, self.ports["client"]), timeout=CHECK_TIMEOUT)
                socks.append(s)
                s.sendall(b"GET /sub/%s?since=0&timeout=10 HTTP/1.1\r\nHost: x\r\n\r\n" % ident.encode())
            held_by = time.monotonic() + 3.0
            while time.monotonic() < held_by:
                doc = self.stats()
                if doc and doc["totals"]["subscribers"] >= before + len(socks):
                    break
                time.sleep(0.05)
            status, body = request(self.ports["app"], "POST", "/pub/" + ident, data.encode())
            if status != 202:
                self.fail("held poll", "POST /pub/%s: %s %r" % (ident, status, body[:200]))
                return
            for s in socks:
                resp = http.client.HTTPResponse(s)
                try:
                    resp.begin()
                    got = json.loads(resp.read())["messages"][0]["data"]
                except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as e:
                    got = "no answer: %r" % e
                if got != data:
                    self.fail("held poll", "a poll held before the publish got %r, not %r" % (got, data))
                    return
            self.checks["held poll"] += 1
        except OSError as e:
            self.fail("held poll", "could not hold a poll: %r" % e)
        finally:
            for s in socks:
                s.close()

    def check_live_streams(self):
        """Fresh WebSocket and EventSource clients, of each kind one held on every worker if a
        few tries get there, all get a message published after they connected; then the
        WebSockets close, and the server must answer 1000."""
        ident = "live-%d-%d-%d" % (self.args.seed, self.serial, os.getpid())
        data = "live %d \u00e9 \"quoted\"\nsecond line" % self.serial
        clients = []
        try:
            for kind in ("ws", "sse"):
                workers = set()
                for _ in range(4 * len(self.pids)):
                    if len(workers) >= len(self.pids):
                        break
                    before = self.held()
                    clients.append(LiveClient(kind, self.ports["client"], ident))
                    workers |= self.newly_held(before)
                if len(workers) >= len(self.pids):
                    self.live_cover[kind] += 1
            status, body = request(self.ports["app"], "POST", "/pub/" + ident, data.encode())
            if status != 202:
                self.fail("live streams", "POST /pub/%s: %s %r" % (ident, status, body[:200]))
                return
            deadline = time.monotonic() + CHECK_TIMEOUT
            for client in clients:
                got, wanted = client.message(deadline), (ident if client.kind == "ws" else None, 1, data)
                if got != wanted:
                    self.fail("live streams", "a %s client got %r, not %r" % (client.kind, got, wanted))
                    return
            for client in clients:
                if client.kind == "ws" and client.close(deadline) != 1000:
                    self.fail("live streams", "a WebSocket closed with 1000 was not answered 1000")
                    return
            self.checks["live streams"] += 1
        except (OSError, ValueError, KeyError, LiveError) as e:
            self.fail("live streams", "%d stream(s) open: %r" % (len(clients), e))
        finally:
            for client in clients:
                client.sock.close()

    def held(self):
        doc = self.stats()
        return [w["subscribers"] for w in doc["workers"]] if doc else []

    def newly_held(self, before, wait=3.0):
        """The workers that hold more subscribers than ``before`` said, once one does."""
        give_up = time.monotonic() + wait
        while time.monotonic() < give_up:
            now = self.held()
            if len(now) == len(before) and sum(now) > sum(before):
                return {i for i, (a, b) in enumerate(zip(before, now)) if b > a}
            time.sleep(0.02)
        return set()

    def check_settled(self, label):
        """Per worker: fds and private RSS back near the baseline; no connection or poll left."""
        settle_by = time.monotonic() + self.args.settle
        while True:
            doc = self.stats()
            usage = {pid: proc_status(pid) for pid in self.pids}
            problems = []
            if doc is None:
                problems.append("/stats did not answer")
            else:
                conns, subs = doc["totals"]["connections"], doc["totals"]["subscribers"]
                if conns > self.base_conns:
                    problems.append("%d connections open (baseline %d)" % (conns, self.base_conns))
                if subs > self.base_subs:
                    problems.append("%d polls held (baseline %d)" % (subs, self.base_subs))
            for pid, now in usage.items():
                if now is None:
                    problems.append("worker %d is gone" % pid)
                    continue
                base = self.base.setdefault(pid, now)     # a new worker: its first look is its baseline
                if now[0] > base[0] + FD_SLACK:
                    problems.append("worker %d has %d fds (baseline %d)" % (pid, now[0], base[0]))
                if now[1] > base[1] + RSS_SLACK:
                    problems.append("worker %d private RSS %.1f MiB (baseline %.1f)" % (
                        pid, now[1] / 2 ** 20, base[1] / 2 ** 20))
            if not problems or time.monotonic() > settle_by:
                break
            time.sleep(0.25)
        self.last.update((pid, u) for pid, u in usage.items() if u)
        if problems:
            self.fail("settled", "%.0f s after %s: %s" % (self.args.settle, label, "; ".join(problems)))
        else:
            self.checks["settled"] += 1

    def spinning(self, window=0.5):
        """Workers busy for most of ``window`` seconds with no traffic from the tool."""
        before = {pid: cpu_seconds(pid) for pid in self.pids}
        time.sleep(window)
        return {pid: round((cpu_seconds(pid) - t) / window, 2) for pid, t in before.items()
                if cpu_seconds(pid) - t > window / 2}

    def check_idle(self):
        busy = self.spinning()
        if busy:
            self.fail("idle", "workers busy with no traffic (share of a CPU): %s" % busy)
            self.fatal = True
        else:
            self.checks["idle"] += 1

    def read_log(self, window=True):
        """New lines of the server's log; into the window that check_log judges, unless not."""
        if self.server is None or not self.server.log_path:
            return []
        lines = self.server.new_log_lines()
        self.log_lines = (self.log_lines or 0) + len(lines)
        if window:
            self.log_window += lines
        return lines

    def check_log(self):
        lines = [line for line in self.log_window if any(a in line for a in LOG_ALARMS)]
        self.log_window = []
        if lines:
            self.alarms += lines
            self.fail("server log", "%d alarming line(s): %s" % (len(lines), " | ".join(lines[:4])))
        elif self.server is not None and self.server.log_path:
            self.checks["server log"] += 1

    # -- the run

    def fuzz(self, indexes):
        for start in range(0, len(indexes), self.args.batch):
            if len(self.failures) >= self.args.max_failures:
                print("stopping: %d failures" % len(self.failures), flush=True)
                break
            chunk = indexes[start:start + self.args.batch]
            self.deaths = []
            t0 = time.monotonic()
            heartbeat = Heartbeat(self.ports["app"], self.args.stall)
            heartbeat.start()
            done = self.engine.run((self.gen.make(i) for i in chunk), self.deadline - 10)
            self.worst_wait = max(self.worst_wait, heartbeat.stop())
            self.elapsed += time.monotonic() - t0
            time.sleep(0.2)                   # a death from the last inputs: seen by the watch
            self.watch_deaths()
            if self.deaths:
                self.explain_deaths()
            if heartbeat.worst >= self.args.stall:
                self.fail("responsive", "a /health probe waited %.1f s or more meanwhile"
                          % heartbeat.worst)
            else:
                self.checks["responsive"] += 1
            self.run_checks("inputs %d-%d" % (chunk[0], chunk[-1]))
            if self.fatal and self.attached:
                print("stopping: the server does not answer any more", flush=True)
                break
            if self.fatal or heartbeat.worst >= self.args.stall:
                self.explain_stall(chunk)
            if self.args.verbose:
                print("inputs %d-%d done: %d failures so far, %.0f s left; private RSS %s MiB" % (
                    chunk[0], chunk[-1], len(self.failures), self.time_left(),
                    " ".join("%.1f" % (self.last[pid][1] / 2 ** 20) for pid in self.pids
                             if pid in self.last)), flush=True)
            if not done:
                self.fail("time limit", "--time-limit %g s ran out before every input was sent"
                          % self.args.time_limit)
                break

    @staticmethod
    def dying_words(lines):
        """What workers said as they died, numbers blanked: a death's signature."""
        words = set()
        for line in lines:
            m = re.search(r"died: (.*)|\) (killed by \w+)", line)
            if m:
                words.add(re.sub(r"\d+", "N", m.group(1) or m.group(2))[:40])
        return words

    def explain_deaths(self):
        """A worker died: find the input that kills one, by replaying those in flight around it."""
        time.sleep(0.2)                       # the dying words reach the log
        self.read_log()
        words = self.dying_words(self.log_window)
        pids = [pid for _, pid in self.deaths]
        suspects = sorted({r[2] for when, _ in self.deaths for r in self.engine.recent
                           if r[0] <= when and (r[1] is None or r[1] >= when - 1.0)})
        said = " / ".join(sorted(words)) or "no last words in the log"
        new = words - set(self.causes)
        if words and not new:
            self.fail("worker died", "pid %s: %s, as input %s does" % (
                pids, said, ", ".join(sorted({str(self.causes[w]) for w in words}))),
                max(suspects, default=None))
        else:
            print("worker(s) %s died (%s) with %d inputs in flight%s" % (
                pids, said, len(suspects),
                "" if self.args.no_bisect else "; replaying them to find which"),
                flush=True)
            # What is new is what is looked for: a known killer among the suspects must not hide it.
            wanted = (lambda effects: "death" in effects and (self.trial_words & new or not new))
            culprit = None if self.args.no_bisect else self.bisect(suspects, wanted)
            if culprit is None:
                self.fail("worker died", "pid %s (%s); not narrowed down to one input in flight: %s" % (
                    pids, said, ",".join(map(str, suspects[:40]))), max(suspects, default=None))
            else:
                self.found(culprit, "kills a worker (%s)" % (
                    " / ".join(sorted(self.trial_words)) or "no last words"))
                for w in self.trial_words:
                    self.causes.setdefault(w, culprit)
        self.pids = self.worker_pids()        # the restarted workers are watched from now on

    def explain_stall(self, chunk):
        """A worker stopped answering for a while: bisect the batch (on a fresh server if need be)."""
        print("a worker stopped answering during inputs %d-%d%s" % (
            chunk[0], chunk[-1], "" if self.args.no_bisect else "; replaying them to find which"),
            flush=True)
        if self.fatal and not self.attached:
            self.fatal = False
            self.start_server()
        if not self.args.no_bisect:
            # Inputs of a kind that stalled a worker before go first: most likely the same bug.
            kinds = {self.gen.make(i).kind for i, what in self.defects.items() if "stalls" in what}
            likely = [i for i in chunk if self.gen.make(i).kind in kinds]
            if likely and "stall" in self.replay(likely, copies=4):
                chunk = likely
            # A stall may need the input's id to live on another worker than its connection: 4 copies.
            culprit = self.bisect(chunk, lambda effects: "stall" in effects, copies=4)
            if culprit is None:
                print("the stall was not narrowed down to one input", flush=True)
            else:
                self.found(culprit, "stalls a worker (no /health answer, or busy with no traffic)", 4)
        self.pids = self.worker_pids()

    def found(self, index, what, copies=1):
        self.defects[index] = what
        self.fail("defect", "input %d %s on its own; reproduce: %s" % (
            index, what, self.reproduce(index, copies)), index)

    def reproduce(self, index, copies=1):
        limits = "".join(" --%s %d" % (name.replace("_", "-"), getattr(self.args, name))
                         for name, default in (("max_message", 4096), ("max_body", 65536))
                         if getattr(self.args, name) != default)
        return "python tools/fuzz_server.py --seed %d --replay %d%s%s" % (
            self.args.seed, index, " --copies %d" % copies if copies > 1 else "", limits)

    def bisect(self, suspects, wanted, copies=1):
        """The one input among ``suspects`` whose replay alone is ``wanted`` (of its effects), or None.

        Each input is sent ``copies`` times per replay, and each half tried twice:
        some effects depend on which worker the kernel hands a connection to.
        """
        seen = False
        give_up = time.monotonic() + self.args.bisect_time
        while len(suspects) > 1 and self.time_left() > 20 and time.monotonic() < give_up:
            half = len(suspects) // 2
            for part in (suspects[:half], suspects[half:]) * 2:
                effects = self.replay(part, copies)
                if self.args.verbose:
                    print("  replayed %d inputs (%d-%d): %s" % (len(part), part[0], part[-1],
                                                               " ".join(sorted(effects)) or "nothing"),
                          flush=True)
                if wanted(effects):
                    suspects, seen = part, True
                    break
            else:
                return None                   # only together, or not reproducible
        if len(suspects) == 1 and (seen or any(wanted(self.replay(suspects, copies)) for _ in range(2))):
            return suspects[0]
        return None

    def replay(self, indexes, copies=1):
        """Send these inputs again; the set of what they did: "death", "stall".  Heals the server."""
        pids = self.pids = self.worker_pids()
        self.read_log()                       # what came before the replay is judged as usual
        engine = Engine(self.ports, self.args.concurrency, Tally(), lambda *_: None, lambda: None)
        heartbeat = Heartbeat(self.ports["app"], self.args.stall)
        heartbeat.start()
        engine.run((self.gen.make(i) for i in indexes for _ in range(copies)), self.deadline - 10)
        self.replayed += len(indexes) * copies
        time.sleep(0.2)
        effects = {"stall"} if heartbeat.stop() >= self.args.stall else set()
        if not all(alive(pid) for pid in pids):
            effects.add("death")
            self.pids = [pid for pid in pids if alive(pid)]     # a stall must be seen in a survivor
        stuck = self.spinning() or any(
            request(self.ports["app"], "GET", "/health", timeout=2.0)[0] is None for _ in range(8))
        if stuck:
            effects.add("stall")
        self.trial_words = self.dying_words(self.read_log(window=False))   # expected: not alarms
        if stuck and not self.attached:
            self.start_server()
        elif "death" in effects:
            self.worker_pids()
            time.sleep(1.1)                   # past the supervisor's crash-loop window
        return effects


# -- the summary --------------------------------------------------------------------------

def summary(fz, wall):
    t = fz.tally
    total = sum(t.inputs.values())
    out = ["inputs: %d sent in %.1f s of fuzzing (%.0f/s), %.1f MiB out, %.1f MiB in; %d more replayed"
           % (total, fz.elapsed, total / max(fz.elapsed, 1e-9), t.sent_bytes / 2 ** 20,
              t.read_bytes / 2 ** 20, fz.replayed)]
    for port in ("client", "app"):
        kinds = sorted((k, n) for (p, k), n in t.inputs.items() if p == port)
        out.append("  %-6s port %5d: %s" % (
            port, sum(n for _, n in kinds), ", ".join("%s %d" % kn for kn in kinds)))
    out.append("  (a kind ending in ~ was mutated)")
    for port in ("client", "app"):
        codes = sorted((s, n) for (p, s), n in t.statuses.items() if p == port)
        out.append("status codes, %s port: %s" % (
            port, ", ".join("%d x%d" % sn for sn in codes) or "none"))
    st = t.streams
    out.append("streams answered: WebSocket %d, EventSource %d; from the server: text %d, ping %d, "
               "pong %d, close %d (%s); events %d, : ping %d" % (
                   st["ws opened"], st["sse opened"], st["ws text"], st["ws ping"], st["ws pong"],
                   st["ws close"], ", ".join("%s x%d" % (k[9:], n) for k, n in sorted(st.items())
                                             if k.startswith("ws close ")) or "no codes",
                   st["sse events"], st["sse pings"]))
    if st["ws-flood measured"] or st["ws-flood closed before the measure"]:
        out.append("drain floods: %d measured (the most the server queued for one: %.1f MiB, "
                   "limit %d MiB), %d closed by the server before the measure (too slow a reader)"
                   % (st["ws-flood measured"], (t.flood_queued or 0) / 2 ** 20,
                      FLOOD_QUEUE_LIMIT >> 20, st["ws-flood closed before the measure"]))
    out.append("live stream checks: WebSockets held on every worker in %d, EventSources in %d" % (
        fz.live_cover["ws"], fz.live_cover["sse"]))
    out.append("connections:")
    out += ["  %7d  %s" % (n, outcome) for outcome, n in t.outcomes.most_common()]
    out.append("checks passed: %s" % ", ".join("%s %d" % kv for kv in sorted(fz.checks.items())))
    out.append("slowest /health probe while inputs flew: %.2f s" % fz.worst_wait)
    for pid in sorted(fz.last):
        base, last = fz.base[pid], fz.last[pid]
        out.append("worker %d: fds %d -> %d, private RSS %.1f -> %.1f MiB, VmRSS %.1f -> %.1f MiB" % (
            pid, base[0], last[0], base[1] / 2 ** 20, last[1] / 2 ** 20,
            base[2] / 2 ** 20, last[2] / 2 ** 20))
    out.append("server log: %s, %d alarming" % ("%d lines" % fz.log_lines if fz.log_lines is not None
                                                  else "not read", len(fz.alarms)))
    out += ["  " + line for line in fz.alarms[:20]]
    out.append("failures: %d" % len(fz.failures))
    out += ["  [%s] %s (last input before it: %s)" % failure for failure in fz.failures]
    if fz.defects:
        out.append("defects: inputs that break a worker on their own (seed %d)" % fz.args.seed)
        for index, what in fz.defects.items():
            out.append("  input %d %s:\n      %s" % (index, what, fz.gen.make(index).describe(300)))
    named = sorted({i for _, _, i in fz.failures if i is not None} - set(fz.defects))[:10]
    if named:
        out.append("inputs named above (seed %d):" % fz.args.seed)
        out += ["  " + fz.gen.make(i).describe(300) for i in named]
    out.append("fuzz_server: %s: seed %d, %d inputs, %d failures, %.1f s" % (
        "OK" if not fz.failures and total else "FAILED", fz.args.seed, total, len(fz.failures), wall))
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=20000, help="inputs to send (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a new one, printed)")
    p.add_argument("--replay", default=None, help="comma-separated input indexes: send only these")
    p.add_argument("--copies", type=int, default=1,
                   help="with --replay, send each this many times: a stall may need the connection "
                        "and its id's home on different workers (default %(default)s)")
    p.add_argument("--workers", type=int, default=2,
                   help="workers of the server started (default %(default)s)")
    p.add_argument("--batch", type=int, default=1000, help="inputs between checks (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=300,
                   help="connections in flight (default %(default)s)")
    p.add_argument("--stall", type=float, default=2.0,
                   help="a /health probe waiting this long while inputs fly is a failure "
                        "(default %(default)s)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds fds and RSS get to come back (default %(default)s)")
    p.add_argument("--time-limit", type=float, default=900.0,
                   help="seconds for the whole run (default %(default)s)")
    p.add_argument("--max-failures", type=int, default=20,
                   help="stop after this many (default %(default)s)")
    p.add_argument("--no-bisect", action="store_true",
                   help="do not replay inputs to find the one that broke a worker")
    p.add_argument("--bisect-time", type=float, default=120.0,
                   help="seconds for each such search (default %(default)s)")
    p.add_argument("--port", type=int, help="attach: the client port of a running server")
    p.add_argument("--app-port", type=int, help="attach: its app port")
    p.add_argument("--server-pid", type=int, help="attach: its supervisor's pid (checked for liveness)")
    p.add_argument("--server-log", help="attach: its stderr log, scanned for alarming lines")
    p.add_argument("--max-message", type=int, default=4096,
                   help="the server's --max-message (default %(default)s)")
    p.add_argument("--max-body", type=int, default=65536,
                   help="the server's --max-body (default %(default)s)")
    p.add_argument("--keep-log", action="store_true",
                   help="keep the server log of a run that passed (one that failed keeps it)")
    p.add_argument("-v", "--verbose", action="store_true", help="a line per batch")
    args = p.parse_args(argv)
    if (args.port is None) != (args.app_port is None):
        p.error("attaching needs both --port and --app-port")
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.monotonic()
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))     # so that `finally` stops the server
    print("fuzz_server: seed %d (same inputs again: --seed %d)" % (args.seed, args.seed), flush=True)
    gen = Generator(args.seed, args.max_message, args.max_body)
    if args.port is not None:
        server = Server(args.port, args.app_port, supervisor=args.server_pid, log_path=args.server_log)
        server.log_pos = os.path.getsize(args.server_log) if args.server_log else 0
        fz = Fuzzer(args, gen, server)
    else:
        fz = Fuzzer(args, gen)
    try:
        if fz.attached:
            fz.warm_up()
        else:
            fz.start_server()
        if not fz.fatal:
            if args.replay:
                fz.fuzz([int(i) for i in args.replay.split(",") for _ in range(args.copies)])
            else:
                fz.fuzz(list(range(args.n)))
        print(summary(fz, time.monotonic() - started), flush=True)
        return 0 if not fz.failures and sum(fz.tally.inputs.values()) else 1
    except StartError as e:
        print("fuzz_server: FAILED: %s" % e, flush=True)
        return 1
    finally:
        if not fz.attached and fz.server is not None:
            fz.server.stop()
        if fz.log_path and (args.keep_log or fz.failures):
            print("server log kept: %s" % fz.log_path)
        elif fz.log_path and os.path.exists(fz.log_path):
            os.unlink(fz.log_path)


if __name__ == "__main__":
    sys.exit(main())

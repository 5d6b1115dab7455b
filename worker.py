"""One worker process: a single-threaded epoll loop that holds connections.

Each worker listens on the client and app ports itself (SO_REUSEPORT: the
kernel spreads connections), owns one partition of the shared region (the
ids whose home it is) and talks to the other workers only through the rings
of ``shmqueue``.  Everything about an id goes to its home as a small record:

    PUB     any worker -> home    store a message, deliver it, maybe ACK back
    ACK     home -> publisher     how many of a request's messages it stored (one per turn)
    SUB     any worker -> home    register the worker, answer with MSGS (backlog)
    CPOLL   any worker -> home    take the compat cursor's next message (CMSG)
    CGIVE   any worker -> home    give back a message taken for compat polls that had left
    CWAKE   home -> holders       compat polls: a message was given back, CPOLL again
    UNSUB   any worker -> home    the worker holds nobody for the id any more
    RESET   restarted  -> home    forget every registration of the sender
    DELIVER home -> subscribers   one new message for every holder of the id

Records a worker sends to itself go through a local FIFO, never a direct
call, so that one order holds for every pair of workers: a SUB's MSGS reply
always precedes the DELIVERs of messages published after it.

The loop must never block (sockets are non-blocking, rings report full
instead of waiting), never scan all connections (timeouts live in a wheel
of buckets), never keep a socket object or a header dict per connection,
and never let one bad connection affect another.
"""

import array
import collections
import errno
import fcntl
import gc
import hmac
import json
import os
import resource
import select
import signal
import socket
import struct
import time

import logs
import shmqueue
import signing
import wire

TICK = 0.25                      # seconds between housekeeping passes
STATS_LAG = 0.01                 # /stats may lag a busy worker's counters by this much
READ_SIZE = 65536
ACCEPT_BATCH = 128
EVENT_BATCH = 1024
DRAIN_BATCH = 4096               # records taken from one ring per loop turn
BACKLOG_PAUSE = 20000            # unsent records at which app reads pause
LOG_LINES_PER_SECOND = 20
OUT_LIMIT = 1 << 20              # unsent bytes past which a connection's next requests wait
APP_FD_RESERVE = 64              # fds only the app port may use (fewer under a low fd limit)
CLIENT_CAP_SLACK = 4             # clients accept again this far below their cap
CLIENT_INBUF_LIMIT = READ_SIZE + 8192   # unparsed bytes a subscriber may send ahead of our answers
SHUTDOWN_DRAIN = 3.0             # seconds a stopping worker may take to deliver what it owes
SHUTDOWN_REQUEST_GRACE = 0.3     # ... and gives a connection it accepted to send its request
CONFIRM_TIMEOUT = 3.0            # seconds a publish may wait for its home's ACK without progress

IN = select.EPOLLIN | select.EPOLLRDHUP
OUT = select.EPOLLOUT

# Record kinds and their fixed headers (little-endian); variable parts follow.
PUB, ACK, SUB, MSGS, DELIVER, UNSUB, CPOLL, CMSG, RESET, CGIVE, CWAKE = b"PASMDUCcRGW"
_PUB = struct.Struct("<BIIIB")        # kind, fd, serial, line, id length | id, data
_ACK = struct.Struct("<BIIIII")       # kind, fd, serial, stored, last seq, refused | lines
_LINE = struct.Struct("<I")
ACK_REFUSED_MAX = 4096                # refused line numbers per ACK record
_SUB = struct.Struct("<BIIIBB")       # kind, fd, serial, since, flags, id length | id
_MSGS = struct.Struct("<BIIIB")       # kind, fd, serial, last, flags | (seq, len, data)*
_MSG = struct.Struct("<II")
_DELIVER = struct.Struct("<BIBB")     # kind, seq, flags, id length | id, data
_UNSUB = struct.Struct("<BBB")        # kind, which (UNSUB_*), id length | id
_CPOLL = struct.Struct("<BIIBB")      # kind, fd, serial, peek, id length | id
_CMSG = struct.Struct("<BIIIBB")      # kind, fd, serial, seq (0 = none), taken, id length | id, data
_CGIVE = struct.Struct("<BIB")        # kind, seq, id length | id
_CWAKE = struct.Struct("<BB")         # kind, id length | id
MSGS_FINAL, MSGS_REFUSED = 1, 2
SUB_QUIET = 1                         # answer only with news (or a refusal)
UNSUB_ALL, UNSUB_COMPAT = 0, 1
DELIVER_COMPAT = 1

JS_TYPE = b"application/javascript; charset=utf-8"

# Connection states; FREE is also "this fd is not a connection of ours".
FREE, READING, PENDING, HELD, BUSY, CLOSING = range(6)
# Connection kinds.
CLIENT, APP_NEW, APP_HTTP, APP_BINARY = range(4)
# Per-request flags, and the formats a held client connection answers in.
KEEP_ALIVE, HEAD_ONLY = 1, 2
FMT_JSON, FMT_JSONP, FMT_COMPAT = range(3)


class Batch:
    """An app request waiting for the ACKs of the messages it published."""

    __slots__ = ("waiting", "published", "errors", "seq")

    def __init__(self, waiting):
        self.waiting = waiting
        self.published = 0
        self.errors = []
        self.seq = 0


class Worker:
    """One worker's loop and state.

    A connection is its fd: its state lives in flat arrays indexed by fd
    (a few bytes each, allocated once for the whole fd limit), plus sparse
    dicts for what only a few connections have at a time (unread input,
    unsent output, a JSONP callback, a batch in flight).  An idle held
    long-poll costs its id bytes, one entry in ``held`` and one in the
    timeout wheel: no object of its own.
    """

    def __init__(self, index, config, region, eventfds, ready_fd=None, standby_fd=None):
        self.index = index
        self.cfg = config
        self.region = region
        self.eventfds = eventfds
        self.ready_fd = ready_fd       # written once listening (standby) and once serving
        self.standby_fd = standby_fd   # a reload: read before taking over the partition
        self.homes = [region.partition(w) for w in range(region.workers)]   # others: read only
        self.part = self.homes[index]
        n = region.workers
        self.inbox = [(src, region.ring(src, index)) for src in range(n) if src != index]
        self.outbox = [region.ring(index, dst) for dst in range(n)]
        self.backlog = [collections.deque() for _ in range(n)]
        self.backlogged = 0
        self.local = collections.deque()
        self.wake = set()
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_int = list(range(limit))   # one int object per fd, shared by every table
        self.state = bytearray(limit)
        self.kind = bytearray(limit)
        self.flags = bytearray(limit)
        self.fmt = bytearray(limit)
        self.since = array.array("I", bytes(4 * limit))
        self.last = array.array("I", bytes(4 * limit))
        self.serial = array.array("I", bytes(4 * limit))
        self.deadline = array.array("I", bytes(4 * limit))
        self.ident = [b""] * limit
        self.inbuf = {}          # fd -> bytes received and not yet parsed
        self.outbuf = {}         # fd -> bytes the socket did not take yet
        self.callback = {}       # fd -> JSONP function name
        self.batches = {}        # fd -> Batch
        self.acks = {}           # (src, fd, serial) -> [stored, last seq, refused lines]: home side
        self.compat_sent = {}    # key -> [seq, workers yet to answer, when]: home side, see CGIVE
        self.partial = {}        # fd -> messages of a MSGS reply still arriving in parts
        self.frames_in = {}      # binary fd -> frames taken from it (logged when it closes)
        self.open = 0
        self.held = {}           # id -> fd, or set of fds (pending and held)
        self.compat_held = {}    # id -> how many of its holders are compat polls
        self.lingering = set()   # ids whose last holder left; UNSUB at the next tick
        self.sub_lingering = set()   # those of them whose last holder was a /sub poll
        self.paused = []         # binary fds not read while the backlog is over the limit
        self.wheel = {}          # tick number -> [fd]; an fd counts only if deadline[fd] matches
        self.wheel_at = 0
        self.next_serial = int.from_bytes(os.urandom(4), "little") | 1
        self.stopping = False
        self.now = time.monotonic()
        self.stats = region.stats(index)
        self._continue_counters()
        self.subscribers = 0
        self.rss = 0
        self.rss_at = 0.0
        self.stats_at = 0.0
        self.log_budget = LOG_LINES_PER_SECOND
        self.log_suppressed = 0
        self.accept_paused_until = 0.0
        self.accept_failing = False
        self.common = (b"Cache-Control: no-store\r\nAccess-Control-Allow-Origin: %s\r\n"
                       b"X-Content-Type-Options: nosniff\r\n" % config.cors_origin.encode())
        self.token = config.app_token.encode() if config.app_token else None
        self.secret = config.secret

    # -- start, loop, stop ----------------------------------------------------

    def run(self):
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # the supervisor handles Ctrl-C
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.ep = select.epoll()
        self.listeners = {}
        self.listening = {}
        for host, port, kind in ((self.cfg.host, self.cfg.port, CLIENT),
                                 (self.cfg.app_host, self.cfg.app_port, APP_NEW)):
            sock = listen_socket(host, port)      # connections queue from here on
            self.listeners[sock.fileno()] = (sock, kind)
            self.listening[sock.fileno()] = True
        if self.standby_fd is not None:
            # A reload: the predecessor still owns the partition. Say we listen, and wait for
            # the supervisor's word that it has exited (EOF: the supervisor died, so do we).
            signal.signal(signal.SIGTERM, signal.SIG_DFL)   # stopped before it began: just go
            os.write(self.ready_fd, b"listening\n")
            if not os.read(self.standby_fd, 1):
                return
            os.close(self.standby_fd)
            signal.signal(signal.SIGTERM, self._on_sigterm)
            self._continue_counters()
        for fd in self.listeners:
            self.ep.register(fd, select.EPOLLIN)
        self.efd = self.eventfds[self.index]
        self.ep.register(self.efd, select.EPOLLIN)
        self.ep.register(self.wake_r, select.EPOLLIN)
        # Every fd but connections is open now: keep APP_FD_RESERVE of the rest for the app
        # port, so that subscribers alone can never lock publishers and /health out.
        fd_limit = len(self.state)
        reserve = max(4, min(APP_FD_RESERVE, fd_limit // 8))
        self.client_cap = fd_limit - len(os.listdir("/proc/self/fd")) - reserve
        self.part.repair()
        if self.stats.get("started_ms"):          # a predecessor ran: forget what it held,
            # in our own partition before any record is handled (a PUB in a ring must not
            # meet the predecessor's registrations), in the others by a RESET that precedes
            # anything we send them.
            self.part.clear_worker(1 << self.index)
            for dst in range(self.region.workers):
                if dst != self.index:
                    self._send(dst, bytes((RESET,)))
        self.stats.set("started_ms", int(time.time() * 1000))
        self.stats.set("heartbeat_ms", int(time.time() * 1000))
        self.stats.set("pid", os.getpid())        # alive for /health from now: it listens
        self._flush_stats()
        gc.freeze()                               # start-up objects: never scanned, never copied
        self._tell_ready()
        self.wheel_at = self._tick_of(self.now)
        self.next_tick = self.now + TICK
        self.busy = False
        while not self.stopping:
            self._turn()
        self._shutdown()

    def _continue_counters(self):
        """A restarted worker continues its predecessor's counters (read once it has exited)."""
        saved = self.stats.as_dict()
        self.accepted = saved["accepted"]
        self.received = saved["received"]       # messages taken from publishers, here
        self.published = saved["published"]
        self.refused = saved["refused"]         # messages the home could not store: table full
        self.delivered = saved["delivered"]
        self.part.expired = saved["expired"]
        self.part.dropped = saved["dropped"]

    def _tell_ready(self):
        if self.ready_fd is not None:
            os.write(self.ready_fd, b"%d\n" % self.index)
            os.close(self.ready_fd)
            self.ready_fd = None

    def _turn(self):
        """One loop turn: wait for events (not at all while work is left), handle them, then
        the before-sleep step: records, ACKs, ring back-pressure, wake-ups, stats, the tick."""
        state = self.state
        busy = self.busy
        timeout = 0 if busy or self.local else max(0.0, self.next_tick - time.monotonic())
        events = self.ep.poll(timeout, EVENT_BATCH)
        self.now = time.monotonic()
        busy = False
        for fd, ev in events:
            if state[fd]:
                try:
                    if ev & OUT:
                        self._flush_out(fd)
                    if ev & ~OUT and state[fd]:
                        self._on_readable(fd)
                except Exception as e:          # a bug must cost one connection, not the worker
                    self._on_internal_error(fd, e)
            elif fd == self.efd:
                try:
                    os.eventfd_read(self.efd)
                except BlockingIOError:
                    pass
                busy = self._drain_inbox()
            elif fd in self.listeners:
                self._accept(*self.listeners[fd])
            elif fd == self.wake_r:
                os.read(self.wake_r, 64)
        if busy:
            busy = self._drain_inbox()
        self.busy = busy
        self._run_local()
        if self.acks:
            self._flush_acks()
        self._flush_backlog()
        self._notify()
        if self.now - self.stats_at >= STATS_LAG or not (busy or self.local):
            self._flush_stats()               # at least before sleeping: /stats is current
        if self.now >= self.next_tick:
            self._tick()
            self.next_tick = self.now + TICK

    def _on_sigterm(self, signum, frame):
        self.stopping = True

    def _connections(self):
        return [fd for fd in range(len(self.state)) if self.state[fd]]

    def _shutdown(self):
        """Stop accepting (serving what waited in the accept queues, not resetting it), answer
        held polls as timed out, finish publishes in flight and send what is queued, exit.

        Used for SIGTERM and for a reload alike: what this worker owes others (ACKs, records
        in its backlog, answers not yet written) is delivered, for at most SHUTDOWN_DRAIN s.
        """
        for fd, (sock, kind) in self.listeners.items():
            self.listening[fd] = True
            self.client_cap = len(self.state)
            self._accept(sock, kind)
            self.ep.unregister(fd)
            sock.close()
        self.listeners = {}
        for fd in self._connections():
            if self.kind[fd] == APP_BINARY:       # EOF tells the publisher to go elsewhere; what
                half_close(fd)                    # it sent before closing is still read
        started = time.monotonic()
        deadline = started + SHUTDOWN_DRAIN
        while True:
            # Idle connections are closed, but those just accepted get a moment to send a request.
            idle_closes = time.monotonic() > started + SHUTDOWN_REQUEST_GRACE
            publishers = 0
            for fd in self._connections():
                if self.kind[fd] == CLIENT and self.state[fd] in (PENDING, HELD):
                    self._answer_timeout(fd)      # `stopping` makes it close afterwards
                elif self.kind[fd] == APP_BINARY:
                    publishers += 1
                elif (idle_closes and self.state[fd] == READING and fd not in self.inbuf
                      and fd not in self.outbuf):
                    self._close(fd)
            if idle_closes and not (self.outbuf or self.batches or self.backlogged or self.local
                                    or self.inbuf or self.acks or publishers) \
                    or time.monotonic() > deadline:
                break
            self.next_tick = time.monotonic() + 0.02
            self._turn()
        self._flush_acks()
        self._flush_backlog()
        self._notify()
        self._flush_stats()
        for fd in self._connections():
            self._close(fd)

    # -- housekeeping --------------------------------------------------------

    def _tick_of(self, t):
        return int(t / TICK) + 1

    def _set_deadline(self, fd, seconds):
        tick = self._tick_of(self.now + seconds)
        self.deadline[fd] = tick
        bucket = self.wheel.get(tick)
        if bucket is None:
            self.wheel[tick] = [self.fd_int[fd]]
        else:
            bucket.append(self.fd_int[fd])

    def _tick(self):
        self.stats.set("heartbeat_ms", int(time.time() * 1000))   # the loop turns: see Supervisor
        self._drain_inbox()        # eventfds are the fast path; this bounds any missed wake-up
        self._flush_acks()
        now_tick = self._tick_of(self.now) - 1
        state, deadline = self.state, self.deadline
        while self.wheel_at <= now_tick:
            for fd in self.wheel.pop(self.wheel_at, ()):
                if deadline[fd] != self.wheel_at:
                    continue                      # re-armed since: another bucket has it
                if state[fd] == READING:
                    self._close(fd)               # headers too slow (or idle keep-alive)
                elif state[fd] in (PENDING, HELD):
                    self._answer_timeout(fd)
                elif state[fd] == BUSY:
                    self._answer_unconfirmed(fd)
            self.wheel_at += 1
        self.part.expire(self._now_ms())
        if self.compat_sent:                      # some worker answered a poll: no word comes
            stale = self.now - self.cfg.queue_ttl
            for key in [k for k, sent in self.compat_sent.items() if sent[2] < stale]:
                del self.compat_sent[key]
        if self.lingering:
            for ident in self.lingering:
                if ident not in self.held:
                    self._send_home(ident, _UNSUB.pack(UNSUB, UNSUB_ALL, len(ident)) + ident)
            self.lingering.clear()
            self.sub_lingering.clear()
        self._update_listening()
        self.log_budget = LOG_LINES_PER_SECOND * TICK * 4
        if self.log_suppressed:
            self.log("%d log lines suppressed" % self.log_suppressed, force=True)
            self.log_suppressed = 0
        self._flush_stats()
        self._flush_backlog()
        self._notify()

    def _flush_stats(self):
        if self.now >= self.rss_at:
            self.rss_at = self.now + 2.0
            try:
                with open("/proc/self/statm", "rb") as f:
                    self.rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except OSError:
                pass
        self.stats_at = self.now
        self.stats.set_counters((self.open, self.subscribers, self.accepted, self.received,
                                 self.published, self.refused, self.delivered, self.part.expired,
                                 self.part.dropped, self.rss))

    def _now_ms(self):
        return int(self.now * 1000)

    def log(self, message, level="warning", force=False):
        """One log line; at most LOG_LINES_PER_SECOND unless forced, the rest only counted."""
        if not force:
            if self.log_budget <= 0:
                self.log_suppressed += 1
                return
            self.log_budget -= 1
        logs.write(level, message, self.index)

    # -- sockets -------------------------------------------------------------

    def _accept(self, sock, kind):
        for _ in range(ACCEPT_BATCH):
            if kind == CLIENT and self.open >= self.client_cap:
                self.log("client port: %d connections; the fds left are the app port's, "
                         "accepting again below %d" % (self.open, self.client_cap - CLIENT_CAP_SLACK))
                self._set_listening(client=False)
                return
            try:
                fd, _addr = sock._accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if not self.accept_failing:   # once per episode, not per retry
                        self.log("accept: %s; retrying every 0.5 s until fds are free"
                                 % os.strerror(e.errno))
                        self.accept_failing = True
                    self.accept_paused_until = self.now + 0.5
                    self._set_listening(client=False, app=False)
                    return
                continue                          # ECONNABORTED and the like: next one
            if self.accept_failing:
                self.accept_failing = False
                self.log("accept: working again", "info")
            fcntl.fcntl(fd, fcntl.F_SETFL, os.O_RDWR | os.O_NONBLOCK)
            self.state[fd] = READING
            self.kind[fd] = kind
            self.flags[fd] = self.fmt[fd] = 0
            self.serial[fd] = 0                   # replies meant for a former owner of the fd miss
            self.ep.register(fd, IN)
            self.open += 1
            self._set_deadline(fd, self.cfg.header_timeout)
            self.accepted += 1

    def _set_listening(self, client=True, app=True):
        """Turn accepting on or off per port (the listeners stay open and keep their queues)."""
        for fd, (_sock, kind) in self.listeners.items():
            on = client if kind == CLIENT else app
            if self.listening.get(fd) != on:
                self.listening[fd] = on
                self.ep.modify(fd, select.EPOLLIN if on else 0)

    def _update_listening(self):
        """Accept again once the EMFILE pause is over and clients are back under their cap."""
        if self.accept_paused_until:
            if self.now < self.accept_paused_until:
                return
            self.accept_paused_until = 0.0
        self._set_listening(client=self.open < self.client_cap - CLIENT_CAP_SLACK)

    def _on_readable(self, fd):
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(fd)
            return
        buf = self.inbuf.get(fd)
        if buf is None:
            buf = self.inbuf[fd] = data
        else:
            if type(buf) is bytes:                # growing: append in place, not by copying
                buf = self.inbuf[fd] = bytearray(buf)
            buf += data
        kind = self.kind[fd]
        if kind == APP_BINARY:
            if self.state[fd] == READING:
                self._on_frames(fd)               # frames bound themselves (max_message)
            return
        if self.state[fd] == READING:
            self._on_requests(fd)
        buf = self.inbuf.get(fd)                  # what is left unparsed: pipelined far ahead
        if buf is not None and len(buf) > (CLIENT_INBUF_LIMIT if kind == CLIENT else
                                           wire.MAX_HEAD + self.cfg.max_body):
            self._close(fd)

    def _write(self, fd, data):
        """Send what the socket takes now; keep the rest for EPOLLOUT."""
        pending = self.outbuf.get(fd)
        if pending is not None:
            pending += data                       # a bytearray: appends do not copy what waits
            return
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            n = 0
        except OSError:
            self._close(fd)
            return
        if n < len(data):
            self.outbuf[fd] = bytearray(memoryview(data)[n:])
            self.ep.modify(fd, IN | OUT)

    def _flush_out(self, fd):
        pending = self.outbuf.get(fd)
        if pending is None:
            return
        try:
            n = os.write(fd, pending)
        except BlockingIOError:
            return
        except OSError:
            self._close(fd)
            return
        del pending[:n]                           # O(1) at a bytearray's front
        if pending:
            return
        del self.outbuf[fd]
        if self.state[fd] == CLOSING:
            self._close(fd)
            return
        self.ep.modify(fd, IN)
        self._resume(fd)                          # requests parked while the output was full

    def _output_full(self, fd):
        """Has fd more unsent output than OUT_LIMIT? Then it gets no new answer until it reads."""
        pending = self.outbuf.get(fd)
        if pending is None or len(pending) <= OUT_LIMIT:
            return False
        self.ep.modify(fd, OUT)                   # and nothing more is read from it meanwhile
        return True

    def _close(self, fd):
        state = self.state[fd]
        if not state:
            return
        if state in (PENDING, HELD) and self.kind[fd] == CLIENT:
            self._unhold(fd)
        self.state[fd] = FREE
        self.ident[fd] = b""
        if self.kind[fd] == APP_BINARY:
            self.log("app: binary publisher closed after %d frames%s" % (
                self.frames_in.pop(fd, 0), " (%d bytes unparsed)" % len(self.inbuf[fd])
                if fd in self.inbuf else ""), "info")
        for table in (self.inbuf, self.outbuf, self.callback, self.batches, self.partial):
            table.pop(fd, None)
        self.open -= 1
        os.close(fd)                              # also leaves the epoll set

    def _respond(self, fd, status, body=b"", content_type=b"application/json", headers=b""):
        """Answer the current request; then wait for the next one, or close."""
        flags = self._response_flags(fd)
        self._send_response(fd, wire.response(status, body, content_type, flags & KEEP_ALIVE,
                                              headers, flags & HEAD_ONLY), flags & KEEP_ALIVE)

    def _response_flags(self, fd):
        """KEEP_ALIVE | HEAD_ONLY as this answer honours them (no keep-alive while stopping)."""
        return self.flags[fd] & ~KEEP_ALIVE if self.stopping else self.flags[fd]

    def _send_response(self, fd, data, keep):
        self._write(fd, data)
        if not self.state[fd]:
            return                                # the write found the peer gone
        if keep:
            self.state[fd] = READING
            self._set_deadline(fd, self.cfg.header_timeout)
        elif fd in self.outbuf:
            self.state[fd] = CLOSING
        else:
            self._close(fd)

    def _resume(self, fd):
        """After an answer given outside the request loop: serve what was pipelined behind it."""
        if self.state[fd] == READING and fd in self.inbuf:
            self._on_requests(fd)

    def _fail(self, fd, status, reason):
        client = self.kind[fd] == CLIENT
        self.log("%s: %d %s" % ("client" if client else "app", status, reason))
        self.flags[fd] &= ~KEEP_ALIVE
        self._respond(fd, status, reason.encode() + b"\n", b"text/plain; charset=utf-8",
                      self.common if client else b"")

    # -- HTTP requests ---------------------------------------------------------

    def _on_requests(self, fd):
        """Parse and route every complete request in the buffer, one at a time."""
        state, inbuf = self.state, self.inbuf
        while state[fd] == READING:
            buf = inbuf.get(fd)
            if buf is None or self._output_full(fd):
                return
            kind = self.kind[fd]
            if kind == APP_NEW:
                kind = self._decide_app_protocol(fd, buf[0])
                if kind != APP_HTTP:
                    return
            try:
                req = wire.parse_head(buf)
                if req is None:
                    return
                if kind == CLIENT:                # only GET, HEAD and OPTIONS, none with a body
                    if req.method not in (b"GET", b"HEAD", b"OPTIONS"):
                        raise wire.HttpError(405, "method not allowed")
                    if req.content_length or req.chunked:
                        raise wire.HttpError(413, "subscriber requests take no body")
                else:
                    self._check_app_caller(req)   # on the head: no unauthorized body is read
                parsed = wire.parse_body(buf, req, self.cfg.max_body)
                if parsed is None:
                    return
                body, end = parsed
                if end < len(buf):
                    inbuf[fd] = buf[end:]
                else:
                    del inbuf[fd]
                self.flags[fd] = (KEEP_ALIVE if req.keep_alive else 0) | \
                    (HEAD_ONLY if req.method == b"HEAD" else 0)
                if kind == CLIENT:
                    self._route_client(fd, req)
                else:
                    self._route_app(fd, req, body)
            except wire.HttpError as e:
                self._fail(fd, e.status, e.reason)
                return

    def _decide_app_protocol(self, fd, first):
        """The app port speaks HTTP or the binary protocol: the first byte tells."""
        if first in (wire.FRAME_PUBLISH, wire.FRAME_PING):
            if self.token is not None:
                self.log("app: binary protocol refused (--app-token is set)")
                self._close(fd)
                return FREE
            self.kind[fd] = APP_BINARY
            self.deadline[fd] = 0                 # a publisher link may idle for ever
            self._on_frames(fd)
            return APP_BINARY
        if not (0x41 <= first <= 0x5A or 0x61 <= first <= 0x7A):
            self.log("app: first byte 0x%02x is neither HTTP nor binary; closed" % first)
            self._close(fd)
            return FREE
        self.kind[fd] = APP_HTTP
        return APP_HTTP

    def _route_client(self, fd, req):
        method, path = req.method, req.path
        if method == b"OPTIONS":
            self._respond(fd, 204, headers=self.common + b"Access-Control-Allow-Methods: GET, HEAD, OPTIONS\r\n"
                          b"Access-Control-Allow-Headers: Content-Type, Cache-Control, Last-Event-ID\r\n"
                          b"Access-Control-Max-Age: 86400\r\n")
            return
        if path.startswith(b"/sub/"):
            ident = path[5:]
            if not wire.valid_id(ident):
                raise wire.HttpError(400, "id must be 1-128 characters of A-Z a-z 0-9 _ ~ : @ -")
            query = wire.parse_query(req.query) if req.query else {}
            self._check_signature(ident, query)
            since = _int_param(query, "since", 0, 0, 0xFFFFFFFF)
            timeout = _int_param(query, "timeout", self.cfg.poll_timeout, 1, 120)
            callback = query.get("callback")
            if callback is None:
                self.fmt[fd] = FMT_JSON
            elif wire.CALLBACK_PATTERN.match(callback):
                self.fmt[fd] = FMT_JSONP
                self.callback[fd] = callback
            else:
                raise wire.HttpError(400, "callback must match [A-Za-z_$][A-Za-z0-9_$.]{0,63}")
            self._subscribe(fd, ident, since, timeout)
            return
        if path.endswith(b".js") and path.count(b"/") == 1 and wire.valid_id(path[1:-3]):
            ident = path[1:-3]
            if self.secret is not None:
                self._check_signature(ident, wire.parse_query(req.query) if req.query else {})
            self.fmt[fd] = FMT_COMPAT
            self.flags[fd] &= ~KEEP_ALIVE           # the original closes after each poll
            self._hold(fd, ident, self.cfg.poll_timeout)
            self._poll_compat(fd, peek=method == b"HEAD")   # a HEAD looks: the cursor stays
            return
        raise wire.HttpError(404, "no such path")

    def _check_signature(self, ident, query):
        """With --secret, a subscription must carry a valid, unexpired exp and sig: else 403."""
        if self.secret is None:
            return
        reason = signing.refusal(self.secret, [ident.decode()], query.get("exp"), query.get("sig"),
                                 time.time())
        if reason is not None:
            raise wire.HttpError(403, reason)

    def _subscribe(self, fd, ident, since, timeout):
        """Hold fd for ident's messages newer than ``since``.

        The fast path: read the id's last seq straight from its home's
        partition.  If the client already has everything, the poll is held at
        once, and the home hears of it only if this worker is not registered
        for the id yet (a quiet SUB: it answers only with news).  Otherwise the
        poll waits for the home's MSGS answer.  A misread only costs a detour:
        the home's answer, or a gap in the DELIVERs, corrects it.
        """
        registered = self._has_sub_holder(ident) or ident in self.sub_lingering
        key = shmqueue.id_key(ident)
        home = key % self.region.workers
        self.since[fd] = since
        self._hold(fd, ident, timeout)
        last = self.homes[home].peek_last(key)
        if since == max(last, 0):
            self.state[fd] = HELD
            self.last[fd] = since
            if registered:
                return
            flags = SUB_QUIET
        else:
            flags = 0
        self._send(home, _SUB.pack(SUB, fd, self.serial[fd], since, flags, len(ident)) + ident)

    def _has_sub_holder(self, ident):
        """Does a /sub poll hold ident here? Then the home has this worker's bit (or a SUB
        setting it is on its way): no UNSUB goes out while one does."""
        entry = self.held.get(ident)
        if entry is None:
            return False
        if type(entry) is int:
            return self.fmt[entry] != FMT_COMPAT
        return any(self.fmt[fd] != FMT_COMPAT for fd in entry)

    def _check_app_caller(self, req):
        """Browsers may not use the app port; with --app-token, callers must show it."""
        if req.browser:
            raise wire.HttpError(403, "browser requests (Origin, Sec-Fetch-*) are refused here")
        if self.token is None or req.path == b"/health":
            return
        scheme, _, credentials = (req.authorization or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials.strip(), self.token):
            raise wire.HttpError(401, "app token required")

    def _route_app(self, fd, req, body):
        method, path = req.method, req.path
        if path == b"/health":
            if method not in (b"GET", b"HEAD"):
                raise wire.HttpError(405, "method not allowed")
            now_ms = time.time() * 1000
            alive = all(responsive(self.region.stats(w).as_dict(), now_ms, self.cfg.worker_timeout)
                        for w in range(self.region.workers))
            self._respond(fd, 200 if alive else 503, b"ok\n" if alive else b"worker down\n",
                          b"text/plain; charset=utf-8")
            return
        if path == b"/pub" or path.startswith(b"/pub/"):
            if method != b"POST":
                raise wire.HttpError(405, "publish with POST")
            if path == b"/pub":
                self._publish_batch(fd, body)
                return
            ident = path[5:]
            if not wire.valid_id(ident):
                raise wire.HttpError(400, "id must be 1-128 characters of A-Z a-z 0-9 _ ~ : @ -")
            if len(body) > self.cfg.max_message:
                raise wire.HttpError(413, "message over %d bytes" % self.cfg.max_message)
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                raise wire.HttpError(400, "message is not UTF-8") from None
            self._begin_app_wait(fd, 1)
            self.ident[fd] = ident
            self._publish(ident, body, fd, 0)
            return
        if method not in (b"GET", b"HEAD"):
            raise wire.HttpError(405, "method not allowed")
        if path == b"/stats":
            self._respond(fd, 200, json.dumps(self.stats_document()).encode())
        elif path == b"/metrics":
            self._respond(fd, 200, self.metrics_text().encode(),
                          b"text/plain; version=0.0.4; charset=utf-8")
        else:
            raise wire.HttpError(404, "no such path")

    def _publish_batch(self, fd, body):
        batch = self._begin_app_wait(fd, 0)
        self.ident[fd] = b""
        for number, line in enumerate(body.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ident, data = item["id"], item["data"]
                if not isinstance(ident, str) or not isinstance(data, str):
                    raise ValueError("id and data must be strings")
                ident = ident.encode()
                if not wire.valid_id(ident):
                    raise ValueError("invalid id")
                data = data.encode("utf-8")
                if len(data) > self.cfg.max_message:
                    raise ValueError("message over %d bytes" % self.cfg.max_message)
            except (ValueError, KeyError, TypeError, UnicodeError, RecursionError) as e:
                batch.errors.append({"line": number, "error": _error_text(e)})
                continue
            batch.waiting += 1
            self._publish(ident, data, fd, number)
        self._maybe_finish_batch(fd, resume=False)   # the request loop goes on by itself

    def _begin_app_wait(self, fd, waiting):
        self._new_serial(fd)
        self.state[fd] = BUSY
        batch = self.batches[fd] = Batch(waiting)
        self._set_deadline(fd, CONFIRM_TIMEOUT)
        return batch

    def _answer_unconfirmed(self, fd):
        """No ACK came for CONFIRM_TIMEOUT: a home died after storing or before. Say so."""
        batch = self.batches.pop(fd)
        ident, self.ident[fd] = self.ident[fd], b""
        self.state[fd] = READING
        self.flags[fd] &= ~KEEP_ALIVE             # late ACKs must not meet a next request
        self.log("publish: %d messages not confirmed in %.0f s" % (batch.waiting, CONFIRM_TIMEOUT))
        if ident:
            self._respond(fd, 503, b"not confirmed: a worker restarted; it may or may not have "
                          b"been stored\n", b"text/plain; charset=utf-8")
        else:
            batch.errors.sort(key=lambda error: error["line"])
            self._respond(fd, 503, json.dumps({"published": batch.published,
                                               "unconfirmed": batch.waiting,
                                               "errors": batch.errors}).encode())

    def _maybe_finish_batch(self, fd, resume=True):
        batch = self.batches.get(fd)
        if batch is None or batch.waiting:
            return
        del self.batches[fd]
        self.state[fd] = READING
        ident, self.ident[fd] = self.ident[fd], b""
        if ident:                                  # a single POST /pub/<id>
            if batch.seq:
                self._respond(fd, 202, b'{"id": "%s", "seq": %d}' % (ident, batch.seq))
            else:
                self._fail(fd, 503, "id table full")
        else:
            batch.errors.sort(key=lambda error: error["line"])
            self._respond(fd, 202, json.dumps({"published": batch.published,
                                               "errors": batch.errors}).encode())
        if resume:
            self._resume(fd)

    # -- binary protocol ---------------------------------------------------------

    def _on_frames(self, fd):
        try:
            frames, used = wire.parse_frames(self.inbuf[fd], self.cfg.max_message)
        except wire.FrameError as e:
            for ident, message in e.frames:
                self._publish(ident, message, 0, 0)
            self.frames_in[fd] = self.frames_in.get(fd, 0) + len(e.frames)
            self.log("app: binary protocol: %s; connection closed" % e)
            self._close(fd)
            return
        buf = self.inbuf[fd]
        if used == len(buf):
            del self.inbuf[fd]
        elif used:
            self.inbuf[fd] = buf[used:]
        for ident, message in frames:
            self._publish(ident, message, 0, 0)
        self.frames_in[fd] = self.frames_in.get(fd, 0) + len(frames)
        if self.backlogged > BACKLOG_PAUSE:
            self.ep.modify(fd, 0)                 # back-pressure: read it again once rings drain
            self.paused.append(self.fd_int[fd])

    # -- talking to homes ------------------------------------------------------

    def _send(self, dst, record):
        if dst == self.index:
            self.local.append(record)
            return
        queue = self.backlog[dst]
        if queue or not self.outbox[dst].push(record):
            queue.append(record)
            self.backlogged += 1
        self.wake.add(dst)

    def _send_home(self, ident, record):
        self._send(shmqueue.id_key(ident) % self.region.workers, record)

    def _publish(self, ident, data, fd, line):
        """Send a message to its home; with fd, the home ACKs it back to that request."""
        self.received += 1
        serial = self.serial[fd] if fd else 0
        self._send_home(ident, _PUB.pack(PUB, fd, serial, line, len(ident)) + ident + data)

    def _flush_backlog(self):
        if not self.backlogged:
            return
        for dst, queue in enumerate(self.backlog):
            ring = self.outbox[dst]
            while queue and ring.push(queue[0]):
                queue.popleft()
                self.backlogged -= 1
                self.wake.add(dst)
        if self.paused and self.backlogged < BACKLOG_PAUSE // 2:
            paused, self.paused = self.paused, []
            for fd in paused:
                if self.state[fd] and self.kind[fd] == APP_BINARY:
                    self.ep.modify(fd, IN)
                    if fd in self.inbuf:
                        self._on_frames(fd)

    def _notify(self):
        for dst in self.wake:
            os.eventfd_write(self.eventfds[dst], 1)
        self.wake.clear()

    def _drain_inbox(self):
        """Handle what other workers sent; True if a ring still has more."""
        more = False
        for src, ring in self.inbox:
            for _ in range(DRAIN_BATCH):
                record = ring.pop()
                if record is None:
                    break
                self._handle(src, record)
                ring.commit(len(record))
            else:
                more = True
        return more

    def _run_local(self):
        """Handle the records this worker sent itself, as many as there were on entry.

        Handling one may queue another (an answer lets the next pipelined
        request ask again): those wait for the next turn, after epoll.
        """
        local = self.local
        for _ in range(len(local)):
            self._handle(self.index, local.popleft())

    def _on_internal_error(self, fd, e):
        self.log("internal error on a %s connection: %r; closed" % (
            "client" if self.kind[fd] == CLIENT else "app", e), "error")
        try:
            self._close(fd)
        except Exception:                            # half-closed state: at least drop the fd
            self.state[fd] = FREE
            os.close(fd)

    def _handle(self, src, record):
        try:
            HANDLERS[record[0]](self, src, record)
        except Exception as e:                      # a bug must cost one record, not the worker
            self.log("internal error handling record %r from worker %d: %r" % (record[:1], src, e),
                     "error")

    # home side

    def _on_pub(self, src, record):
        _, fd, serial, line, n = _PUB.unpack_from(record)
        start = _PUB.size
        ident = record[start:start + n]
        data = record[start + n:]
        try:
            seq, targets, compat = self.part.publish(shmqueue.id_key(ident), data, self._now_ms())
        except shmqueue.TableFull:
            seq = targets = compat = 0
            self.refused += 1
            self.log("publish: id table full, message for %s refused" % ident.decode())
        else:
            self.published += 1
        if serial:                                 # acknowledged in bulk by _flush_acks
            tally = self.acks.get((src, fd, serial))
            if tally is None:
                tally = self.acks[src, fd, serial] = [0, 0, []]
            if seq:
                tally[0] += 1
                tally[1] = seq
            else:
                tally[2].append(line)
        if targets:
            if compat:                             # the cursor moved: given back if nobody reads it
                self.compat_sent[shmqueue.id_key(ident)] = [seq, bin(compat).count("1"), self.now]
            plain = _DELIVER.pack(DELIVER, seq, 0, n) + ident + data
            dst = 0
            while targets:
                if targets & 1:
                    if compat >> dst & 1:
                        self._send(dst, _DELIVER.pack(DELIVER, seq, DELIVER_COMPAT, n) + ident + data)
                    else:
                        self._send(dst, plain)
                targets >>= 1
                dst += 1

    def _flush_acks(self):
        """One ACK per publishing request and loop turn, not one per message."""
        for (src, fd, serial), (stored, last, refused) in self.acks.items():
            for start in range(0, max(len(refused), 1), ACK_REFUSED_MAX):
                lines = refused[start:start + ACK_REFUSED_MAX]
                self._send(src, _ACK.pack(ACK, fd, serial, stored, last, len(lines))
                           + b"".join(_LINE.pack(line) for line in lines))
                stored = 0
        self.acks.clear()

    def _on_sub(self, src, record):
        _, fd, serial, since, flags, n = _SUB.unpack_from(record)
        ident = record[_SUB.size:_SUB.size + n]
        try:
            last, messages = self.part.subscribe(shmqueue.id_key(ident), 1 << src, since,
                                                 self._now_ms())
        except shmqueue.TableFull:
            self._send(src, _MSGS.pack(MSGS, fd, serial, 0, MSGS_FINAL | MSGS_REFUSED))
            return
        if flags & SUB_QUIET and not messages:
            return                                # the poll is held already: no news, no answer
        # Split a long backlog so that no record outgrows a ring.
        limit = self.outbox[src].size // 4
        parts = [_MSGS.pack(MSGS, fd, serial, last, 0)]
        size = _MSGS.size
        for seq, data in messages:
            if size + 8 + len(data) > limit:
                self._send(src, b"".join(parts))
                parts = [_MSGS.pack(MSGS, fd, serial, last, 0)]
                size = _MSGS.size
            parts.append(_MSG.pack(seq, len(data)))
            parts.append(data)
            size += 8 + len(data)
        parts[0] = _MSGS.pack(MSGS, fd, serial, last, MSGS_FINAL)
        self._send(src, b"".join(parts))

    def _on_cpoll(self, src, record):
        _, fd, serial, peek, n = _CPOLL.unpack_from(record)
        ident = record[_CPOLL.size:_CPOLL.size + n]
        try:
            found = self.part.compat_take(shmqueue.id_key(ident), 1 << src, self._now_ms(),
                                          consume=not peek)
        except shmqueue.TableFull:
            found = None
        seq, data = found if found else (0, b"")
        self._send(src, _CMSG.pack(CMSG, fd, serial, seq, not peek, n) + ident + data)

    def _on_cgive(self, src, record):
        """A worker could not hand message seq to a compat poll: undo the cursor's move once
        every worker it went to has said so (one that did answer a poll says nothing)."""
        _, seq, n = _CGIVE.unpack_from(record)
        ident = record[_CGIVE.size:_CGIVE.size + n]
        key = shmqueue.id_key(ident)
        sent = self.compat_sent.get(key)
        if sent is not None and sent[0] == seq:
            sent[1] -= 1
            if sent[1]:
                return
            del self.compat_sent[key]
        self._wake_compat_holders(ident, self.part.compat_untake(key, seq))

    def _wake_compat_holders(self, ident, workers):
        wake = _CWAKE.pack(CWAKE, len(ident)) + ident
        dst = 0
        while workers:
            if workers & 1:
                self._send(dst, wake)
            workers >>= 1
            dst += 1

    def _on_unsub(self, src, record):
        _, which, n = _UNSUB.unpack_from(record)
        ident = record[_UNSUB.size:_UNSUB.size + n]
        self.part.unsubscribe(shmqueue.id_key(ident), 1 << src, compat_only=which == UNSUB_COMPAT)

    def _on_reset(self, src, record):
        self.part.clear_worker(1 << src)

    # subscriber side

    def _is_waiting(self, fd, serial, *states):
        """Is the reply for (fd, serial) still wanted: the same request, in one of ``states``?"""
        return fd < len(self.state) and self.serial[fd] == serial and self.state[fd] in states

    def _on_ack(self, src, record):
        _, fd, serial, stored, last, refused = _ACK.unpack_from(record)
        if not self._is_waiting(fd, serial, BUSY):
            return                                   # the publisher went away meanwhile
        batch = self.batches[fd]
        self._set_deadline(fd, CONFIRM_TIMEOUT)     # progress: the wait starts again
        batch.waiting -= stored + refused
        batch.published += stored
        if stored:
            batch.seq = last
        for i in range(refused):
            line = _LINE.unpack_from(record, _ACK.size + 4 * i)[0]
            batch.errors.append({"line": line, "error": "id table full"})
        self._maybe_finish_batch(fd)

    def _on_msgs(self, src, record):
        _, fd, serial, last, flags = _MSGS.unpack_from(record)
        if not self._is_waiting(fd, serial, PENDING, HELD):
            return
        if flags & MSGS_REFUSED:
            self._unhold(fd)
            self.sub_lingering.discard(self.ident[fd])   # never registered: next time, ask again
            self._fail(fd, 503, "id table full")
            return
        pos = _MSGS.size
        messages = self.partial.pop(fd, [])
        while pos < len(record):
            seq, n = _MSG.unpack_from(record, pos)
            pos += 8
            messages.append((seq, record[pos:pos + n]))
            pos += n
        if not flags & MSGS_FINAL:
            self.partial[fd] = messages
            return
        self.last[fd] = last
        if messages:
            self._answer(fd, messages, last)
        else:
            self.since[fd] = last
            self.state[fd] = HELD

    def _on_cmsg(self, src, record):
        _, fd, serial, seq, taken, n = _CMSG.unpack_from(record)
        if not self._is_waiting(fd, serial, PENDING):
            if seq and taken:                     # taken for a poll that left: give it back
                ident = record[_CMSG.size:_CMSG.size + n]
                self._send(src, _CGIVE.pack(CGIVE, seq, n) + ident)
            return
        if seq:
            self._answer_compat(fd, record[_CMSG.size + n:])
        elif self.flags[fd] & HEAD_ONLY:
            self._answer_timeout(fd)              # nothing to look at; a HEAD is not held
        else:
            self.state[fd] = HELD

    def _on_deliver(self, src, record):
        _, seq, flags, n = _DELIVER.unpack_from(record)
        start = _DELIVER.size
        ident = record[start:start + n]
        entry = self.held.get(ident)
        if entry is None:                              # a stale registration: heal it,
            self._send(src, _UNSUB.pack(UNSUB, UNSUB_ALL, n) + ident)
            self.sub_lingering.discard(ident)          # and no longer count as registered
            if flags & DELIVER_COMPAT:                 # the compat cursor moved for nobody
                self._send(src, _CGIVE.pack(CGIVE, seq, n) + ident)
            return
        data = record[start + n:]
        holders = (entry,) if type(entry) is int else list(entry)
        state, fmt, since = self.state, self.fmt, self.since
        compat_answered = False
        body = None
        responses = {}                                 # one response per flags variant, for all
        for fd in holders:
            if state[fd] != HELD:
                continue                               # pending: its MSGS reply brings it
            if fmt[fd] == FMT_COMPAT:
                if flags & DELIVER_COMPAT:
                    self._answer_compat(fd, data)
                    compat_answered = True
            elif seq > since[fd] + 1:
                self._resubscribe(fd)                  # a gap: the home's MSGS fills it
            elif seq > since[fd]:
                if fmt[fd] == FMT_JSONP:
                    self._answer(fd, [(seq, data)], seq)
                    continue
                variant = self._response_flags(fd)
                response = responses.get(variant)
                if response is None:
                    if body is None:
                        body = json_body_of(ident, [(seq, data)], seq)
                    response = responses[variant] = wire.response(
                        200, body, b"application/json", variant & KEEP_ALIVE, self.common,
                        variant & HEAD_ONLY)
                self._unhold(fd)
                self._send_response(fd, response, variant & KEEP_ALIVE)
                self.delivered += 1
                self._resume(fd)
        if flags & DELIVER_COMPAT and not compat_answered:
            self._send(src, _CGIVE.pack(CGIVE, seq, n) + ident)

    def _on_cwake(self, src, record):
        _, n = _CWAKE.unpack_from(record)
        entry = self.held.get(record[_CWAKE.size:_CWAKE.size + n])
        if entry is None:
            return
        for fd in (entry,) if type(entry) is int else list(entry):
            if self.state[fd] == HELD and self.fmt[fd] == FMT_COMPAT:
                self._poll_compat(fd, peek=False)

    # -- answering held connections -------------------------------------------

    def _poll_compat(self, fd, peek):
        """Ask the home for the compat cursor's next message; the poll waits for the CMSG."""
        ident = self.ident[fd]
        self._new_serial(fd)
        self.state[fd] = PENDING
        self._send_home(ident, _CPOLL.pack(CPOLL, fd, self.serial[fd], peek, len(ident)) + ident)

    def _resubscribe(self, fd):
        """Ask the home for everything after since[fd]; the poll waits for that answer."""
        ident = self.ident[fd]
        self._new_serial(fd)
        self.state[fd] = PENDING
        self._send_home(ident, _SUB.pack(SUB, fd, self.serial[fd], self.since[fd], 0, len(ident))
                        + ident)

    def _new_serial(self, fd):
        serial = self.next_serial = (self.next_serial + 1) & 0xFFFFFFFF or 1
        self.serial[fd] = serial

    def _hold(self, fd, ident, timeout):
        self._new_serial(fd)
        self.ident[fd] = ident
        self.last[fd] = 0                         # known once the home answers
        self.state[fd] = PENDING
        fd = self.fd_int[fd]
        entry = self.held.get(ident)
        if entry is None:
            self.held[ident] = fd
        elif type(entry) is set:
            entry.add(fd)
        else:
            self.held[ident] = {entry, fd}
        if self.fmt[fd] == FMT_COMPAT:
            self.compat_held[ident] = self.compat_held.get(ident, 0) + 1
        self.subscribers += 1
        self._set_deadline(fd, timeout)

    def _unhold(self, fd):
        """Take fd out of ``held``; it is READING again (or about to be closed)."""
        ident = self.ident[fd]
        entry = self.held.get(ident)
        if entry == fd:
            last_holder = True
        elif type(entry) is set and fd in entry:
            entry.discard(fd)
            last_holder = not entry
        else:
            return
        if last_holder:
            del self.held[ident]
            self.lingering.add(ident)
            if self.fmt[fd] != FMT_COMPAT:
                self.sub_lingering.add(ident)
        if self.fmt[fd] == FMT_COMPAT:
            left = self.compat_held[ident] - 1
            if left:
                self.compat_held[ident] = left
            else:                                 # no compat poll here now: stop taking
                del self.compat_held[ident]       # messages off the compat cursor for us
                self._send_home(ident, _UNSUB.pack(UNSUB, UNSUB_COMPAT, len(ident)) + ident)
        self.subscribers -= 1
        self.state[fd] = READING

    def _answer(self, fd, messages, last):
        callback = self.callback.pop(fd, None)
        body = json_body_of(self.ident[fd], messages, last, callback)
        content_type = b"application/json" if callback is None else JS_TYPE
        self._unhold(fd)
        self._respond(fd, 200, body, content_type, self.common)
        self.delivered += len(messages)
        self._resume(fd)

    def _answer_compat(self, fd, data):
        self._unhold(fd)
        self._respond(fd, 200, data, JS_TYPE, self.common)
        self.delivered += 1

    def _answer_timeout(self, fd):
        if self.fmt[fd] == FMT_COMPAT:
            # An empty script, not a 204: a <script> tag fires onerror for a 204 sent with
            # nosniff (no Content-Type), and a page in the original style stops polling.
            self._unhold(fd)
            self._respond(fd, 200, b"", JS_TYPE, self.common)   # closes: nothing pipelined
        else:
            self._answer(fd, [], self.last[fd])

    # -- /stats and /metrics ---------------------------------------------------

    def stats_document(self):
        self._flush_stats()
        workers = []
        totals = dict.fromkeys(shmqueue.COUNTER_FIELDS, 0)
        now_ms = time.time() * 1000
        for w in range(self.region.workers):
            block = self.region.stats(w).as_dict()
            row = {"index": w, "pid": block["pid"],
                   "responsive": responsive(block, now_ms, self.cfg.worker_timeout),
                   "loop_age_ms": max(0, int(now_ms - block["heartbeat_ms"])) if block["pid"] else None,
                   "restarts": block["restarts"]}
            for name in shmqueue.COUNTER_FIELDS:
                row[name] = block[name]
                totals[name] += block[name]
            workers.append(row)
        return {"workers": workers, "totals": totals, "shm": self.region.totals(),
                "uptime_s": round(time.time() - self.cfg.started_at, 3)}

    def metrics_text(self):
        doc = self.stats_document()
        lines = []
        for name in shmqueue.COUNTER_FIELDS:
            gauge = name in ("connections", "subscribers", "rss_bytes")
            metric = "megacomet_" + name + ("" if gauge else "_total")
            lines.append("# TYPE %s %s" % (metric, "gauge" if gauge else "counter"))
            for row in doc["workers"]:
                lines.append('%s{worker="%d"} %d' % (metric, row["index"], row[name]))
        for name, value in doc["shm"].items():
            lines.append("# TYPE megacomet_shm_%s gauge" % name)
            lines.append("megacomet_shm_%s %d" % (name, value))
        lines.append("# TYPE megacomet_workers_alive gauge")
        lines.append("megacomet_workers_alive %d" % sum(1 for r in doc["workers"] if r["pid"]))
        lines.append("# TYPE megacomet_workers_responsive gauge")
        lines.append("megacomet_workers_responsive %d" % sum(r["responsive"] for r in doc["workers"]))
        lines.append("# TYPE megacomet_worker_restarts_total counter")
        for row in doc["workers"]:
            lines.append('megacomet_worker_restarts_total{worker="%d"} %d' % (row["index"], row["restarts"]))
        lines.append("# TYPE megacomet_uptime_seconds gauge")
        lines.append("megacomet_uptime_seconds %s" % doc["uptime_s"])
        return "\n".join(lines) + "\n"


HANDLERS = {PUB: Worker._on_pub, SUB: Worker._on_sub, CPOLL: Worker._on_cpoll,
            UNSUB: Worker._on_unsub, RESET: Worker._on_reset, ACK: Worker._on_ack,
            MSGS: Worker._on_msgs, CMSG: Worker._on_cmsg, DELIVER: Worker._on_deliver,
            CGIVE: Worker._on_cgive, CWAKE: Worker._on_cwake}


def responsive(block, now_ms, timeout_s):
    """Is the worker of this stats block alive and turning its loop (heartbeat within timeout)?"""
    return bool(block["pid"]) and now_ms - block["heartbeat_ms"] < timeout_s * 1000


def json_body_of(ident, messages, last, callback=None):
    """The /sub answer: ``{"id": ..., "messages": [{"seq", "data"}], "last": N}``, maybe JSONP-wrapped."""
    items = ", ".join('{"seq": %d, "data": %s}' % (seq, json.dumps(data.decode("utf-8")))
                      for seq, data in messages)
    body = '{"id": "%s", "messages": [%s], "last": %d}' % (ident.decode(), items, last)
    if callback is not None:
        body = "/**/%s(%s);" % (callback, body)
    return body.encode()


def _int_param(query, name, default, low, high):
    text = query.get(name)
    if text is None:
        return default
    # ASCII digits only: str.isdigit() also accepts "²" or "①", which int() refuses.
    if not (0 < len(text) <= 10 and text.isascii() and text.isdigit()):
        raise wire.HttpError(400, "%s must be a whole number" % name)
    return min(max(int(text), low), high)


def _error_text(e):
    if isinstance(e, KeyError):
        return "missing %s" % e
    if isinstance(e, json.JSONDecodeError):
        return "invalid JSON"
    if isinstance(e, RecursionError):
        return "invalid JSON: nested too deeply"
    return str(e)


def half_close(fd):
    """Send FIN on a connection we only know by its fd; keep reading it."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.detach()


def shared_port_socket(host, port):
    """A TCP socket bound to (host, port) with SO_REUSEPORT: every worker binds the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def listen_socket(host, port):
    """A non-blocking listening socket on (host, port) that shares the port with its siblings."""
    sock = shared_port_socket(host, port)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.listen(socket.SOMAXCONN)
    sock.setblocking(False)
    return sock

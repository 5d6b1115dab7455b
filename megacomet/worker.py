"""One worker process's event loop: connections, timers, the rings to the other workers.

Each worker listens on the client and app ports itself (SO_REUSEPORT: the
kernel spreads connections), owns one partition of the shared region and
talks to the other workers only through the rings of ``shmqueue``.  This
module is the loop and nothing else: it accepts, reads into a connection's
input buffer (or stops reading it when its protocol says so), writes
(keeping what the socket does not take), closes (lingering while the peer
may still be sending), runs the timeout wheel, sends records and hands
received ones to their handler.

What a connection *means* is its protocol: one byte per fd (``proto``)
picks a ``Protocol`` from ``protocols``, a table of functions (readable,
timeout, drained, closed, stop) set up by ``server``.  Records are handed to
``record_handlers`` by their kind byte.  So this module knows no path, no
HTTP, no JSON and no record layout.

The loop must never block (sockets are non-blocking, rings report full
instead of waiting), never scan all connections while serving (timeouts
live in a wheel of buckets), never keep a socket object or an object per
connection, and never let one bad connection affect another.
"""

import array
import collections
import enum
import errno
import fcntl
import gc
import os
import resource
import select
import signal
import socket
import sys
import time
import traceback

from . import logs
from . import proxyproto
from . import shmqueue
from .shmqueue import (ACCEPTED, CONNECTIONS, DROPPED, EXPIRED, IP_REFUSED, RSS_BYTES,
                       SUBSCRIBERS)

TICK = 0.25                      # seconds between housekeeping passes
READ_SIZE = 65536
ACCEPT_BATCH = 128
EVENT_BATCH = 1024
DRAIN_BATCH = 4096               # records taken from one ring per loop turn
BACKLOG_PAUSE = 20000            # unsent records at which publishers' reads pause
LOG_LINES_PER_SECOND = 20
OUT_LIMIT = 1 << 20              # unsent bytes past which a connection gets no new answer
APP_FD_RESERVE = 64              # fds only the app port may use (fewer under a low fd limit)
CLIENT_CAP_SLACK = 4             # clients accept again this far below their cap
SHUTDOWN_DRAIN = 3.0             # seconds a stopping worker may take to deliver what it owes
SHUTDOWN_REQUEST_GRACE = 0.3     # ... and gives a connection it accepted to send its request
LINGER_TIMEOUT = 2.0             # seconds a closing connection reads (and drops) its peer's input

IN = select.EPOLLIN | select.EPOLLRDHUP
OUT = select.EPOLLOUT



class State(enum.IntEnum):
    """What a connection is doing: one byte per fd (``Worker.state``), changed only through
    ``Worker.set_state``, which allows the moves in TRANSITIONS and refuses the rest.

    The loop itself acts on FREE and CLOSING; the others are the protocols'.
    """
    FREE = 0        # not a connection of ours (never accepted, or closed)
    READING = 1     # reads a request: the first, or the next one on a kept-alive connection
    PENDING = 2     # waits for another worker's answer: a home's backlog (SUB), a compat message
    HELD = 3        # subscribed: waits for messages (a long-poll, an open stream)
    BUSY = 4        # an app-port request waits for its publishes' acknowledgements
    CLOSING = 5     # writes what is left, then closes (or lingers while the peer still sends)


# Plain ints for the hot paths (comparing bytes to an IntEnum member costs more).
FREE, READING, PENDING, HELD, BUSY, CLOSING = (int(s) for s in State)

# Every move a connection may make.  Any state may be closed (FREE); PENDING -> PENDING is
# asking again (a new serial), BUSY -> BUSY an answer sent while more are still owed,
# CLOSING -> CLOSING a close that starts lingering.
TRANSITIONS = {
    State.FREE: {State.READING},
    State.READING: {State.READING, State.PENDING, State.HELD, State.BUSY, State.CLOSING,
                    State.FREE},
    State.PENDING: {State.PENDING, State.HELD, State.READING, State.CLOSING, State.FREE},
    State.HELD: {State.PENDING, State.READING, State.CLOSING, State.FREE},
    State.BUSY: {State.BUSY, State.READING, State.CLOSING, State.FREE},
    State.CLOSING: {State.CLOSING, State.FREE},
}
_STATES = len(State)
_ALLOWED = bytearray(_STATES * _STATES)     # old * len(State) + new -> 1 if allowed
for _old, _news in TRANSITIONS.items():
    for _new in _news:
        _ALLOWED[_old * _STATES + _new] = 1


class StateError(Exception):
    """A move TRANSITIONS does not allow: a bug, which costs that connection."""


class Protocol:
    """What a connection's protocol byte selects: how to react to what happens to it.

    readable(fd)  new bytes are in inbuf[fd]
    timeout(fd)   its deadline (set_deadline) passed
    drained(fd)   all its output is written
    closed(fd)    it is being closed: forget it
    stop(fd)      the worker is stopping: answer or close it; True if it must still be read
                  until the peer closes (or the drain ends)

    Each is a function of the fd alone, usually a method of the protocol's one
    object per worker.
    """

    __slots__ = ("name", "readable", "timeout", "drained", "closed", "stop")

    def __init__(self, name, readable, timeout, drained=None, closed=None, stop=None):
        self.name = name
        self.readable = readable
        self.timeout = timeout
        self.drained = drained or _nothing
        self.closed = closed or _nothing
        self.stop = stop or _nothing


def _nothing(fd):
    return None


class Worker:
    """One worker's loop and per-connection state.

    A connection is its fd: its state lives in flat arrays indexed by fd
    (a few bytes each, allocated once for the whole fd limit), plus sparse
    dicts for what only a few connections have at a time (unread input,
    unsent output).  The protocols keep theirs the same way.
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
        self.proto = bytearray(limit)
        self.serial = array.array("I", bytes(4 * limit))   # which request a reply is for
        self.unread = bytearray(limit)     # 1: its protocol stopped reading it (stop_reading)
        self.deadline = array.array("I", bytes(4 * limit))
        self.inbuf = {}          # fd -> bytes received and not yet parsed
        # Who is connecting: kept only while a feature needs it (idle connections pay nothing
        # otherwise; a log line asks the socket).  See _accept and _proxy_preamble.
        # (getattr: tools/perf.py builds a Worker without a Config)
        self.proxy_protocol = getattr(config, "proxy_protocol", False)   # a PROXY header first
        self.max_per_ip = getattr(config, "max_conns_per_ip", 0) or 0    # per client address
        self.keep_peers = self.proxy_protocol or bool(self.max_per_ip)
        self.peers = {}          # client fd -> its real ip (interned: one str per address)
        self.peer_port = array.array("H", bytes(2 * limit)) if self.keep_peers else None
        self.per_ip = {}         # ip -> client connections counted for it (max_per_ip only)
        self.proxy_pending = {}  # client fd -> what came of its PROXY header so far
        # Every read lands in this one buffer and is copied out at its size.  (os.read would
        # malloc READ_SIZE each time and shrink it: with thousands of connections the heap
        # fragments and keeps about 370 KB more per worker resident.)
        self.read_buffer = bytearray(READ_SIZE)
        self.read_buffers = (self.read_buffer,)
        self.read_view = memoryview(self.read_buffer)
        self.outbuf = {}         # fd -> bytearray the socket did not take yet
        # TLS on the client port (tls.py, imported only then): fd -> its tls.Connection, for
        # TLS connections alone; tls_accept makes one for each accepted client fd.
        self.tls = {}
        self.tls_accept = None
        self.paused = []         # publisher fds not read while the backlog is over the limit
        self.wheel = {}          # tick -> array of fds; an fd counts only if deadline[fd] matches
        self.wheel_at = 0
        self.next_serial = int.from_bytes(os.urandom(4), "little") | 1
        self.stopping = False
        self.now = time.monotonic()
        self.stats = region.stats(index)
        self.counters = self.stats.counters()   # in shared memory: written once we serve
        self.rss_at = 0.0
        self.log_budget = LOG_LINES_PER_SECOND
        self.log_window_end = 0.0
        self.log_suppressed = 0
        self.accept_paused_until = 0.0
        self.accept_failing = False
        self.listeners = {}      # fd -> (socket, protocol byte of its connections, is client)
        self.listening = {}
        self.watched = {}        # fd -> handler(events): sockets that are not connections (Redis)
        self.listen_on = []      # (host, port, protocol byte, is the client port)
        # Set by server.assemble: the protocol table, the record handlers, and what runs
        # before each sleep and at each tick.
        self.protocols = []
        self.record_handlers = {}
        self.before_sleep = []
        self.on_tick = []
        self.on_start = []
        self.owes = lambda: False   # does a protocol still wait for something (an ACK)?
        self.linger_proto = None    # the protocol byte of lingering connections (_finish)

    # -- start, loop, stop ----------------------------------------------------

    def run(self):
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # the supervisor handles Ctrl-C
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        if getattr(self.cfg, "tls_cert", None):
            # This worker's context, from the files as they are now (a reload's new workers
            # read a renewed certificate), before it listens: if they no longer load, it dies
            # here and a reload stops with the old workers serving.
            from . import tls
            try:
                self.tls_accept = tls.Acceptor(self.cfg.tls_cert, self.cfg.tls_key)
            except tls.LoadError as e:                # one line, no traceback: nothing to debug
                logs.write("error", "%s; this worker exits" % e, self.index)
                os._exit(1)
        self.ep = select.epoll()
        for host, port, proto, client in self.listen_on:
            sock = listen_socket(host, port)      # connections queue from here on
            self.listeners[sock.fileno()] = (sock, proto, client)
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
        for start in self.on_start:               # before any record is handled
            start()
        self.stats.set("started_ms", int(time.time() * 1000))
        self.stats.set("heartbeat_ms", int(time.time() * 1000))
        self.stats.set("pid", os.getpid())        # alive for /health from now: it listens
        self.refresh_stats()
        gc.freeze()                               # start-up objects: never scanned, never copied
        self._tell_ready()
        self.wheel_at = self._tick_of(self.now)
        self.next_tick = self.now + TICK
        self.busy = False
        while not self.stopping:
            self._turn()
        self._shutdown()

    def _continue_counters(self):
        """A restarted worker counts on from its predecessor's counters (touched only once it
        has exited), holding no connection yet."""
        counters = self.counters
        counters[CONNECTIONS] = counters[SUBSCRIBERS] = 0
        self.part.expired = counters[EXPIRED]
        self.part.dropped = counters[DROPPED]

    def _tell_ready(self):
        if self.ready_fd is not None:
            os.write(self.ready_fd, b"%d\n" % self.index)
            os.close(self.ready_fd)
            self.ready_fd = None

    def _turn(self):
        """One loop turn: wait for events (not at all while work is left), handle them, then
        the before-sleep step: records, ring back-pressure, wake-ups, stats, the tick."""
        state, protocols, proto = self.state, self.protocols, self.proto
        timeout = 0 if self.busy or self.local else max(0.0, self.next_tick - time.monotonic())
        events = self.ep.poll(timeout, EVENT_BATCH)
        self.now = time.monotonic()
        busy = False
        for fd, ev in events:
            if state[fd]:
                try:
                    if ev & OUT:
                        self._flush_out(fd)
                    if ev & ~OUT and state[fd] and self._read(fd):
                        protocols[proto[fd]].readable(fd)
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
            elif fd in self.watched:
                try:
                    self.watched[fd](ev)
                except Exception as e:          # (a bug there must not stop the loop either)
                    self.log("internal error on fd %d: %r" % (fd, e), "error",
                             with_traceback=True)
        if busy:
            busy = self._drain_inbox()
        self.busy = busy
        self._run_local()
        for step in self.before_sleep:
            step()
        self._flush_backlog()
        self._notify()
        if self.now >= self.next_tick:
            self._tick()
            self.next_tick = self.now + TICK

    # -- other sockets on the loop (the Redis links of cluster mode) -------------------------

    def register(self, fd, handler, events):
        self.watched[fd] = handler
        self.ep.register(fd, events)

    def modify(self, fd, events):
        self.ep.modify(fd, events)

    def unregister(self, fd):
        del self.watched[fd]
        self.ep.unregister(fd)

    def _on_sigterm(self, signum, frame):
        self.stopping = True

    def _connections(self):
        return [fd for fd in range(len(self.state)) if self.state[fd]]

    def _shutdown(self):
        """Stop accepting (serving what waited in the accept queues, not resetting it), let
        each protocol answer or close its connections, deliver what is owed, exit.

        Used for SIGTERM and for a reload alike: what this worker owes others (ACKs, records
        in its backlog, answers not yet written) is delivered, for at most SHUTDOWN_DRAIN s.
        """
        for fd, (sock, proto, client) in self.listeners.items():
            self.listening[fd] = True
            self.client_cap = len(self.state)
            self._accept(sock, proto, client)
            self.ep.unregister(fd)
            sock.close()
        self.listeners = {}
        started = time.monotonic()
        deadline = started + SHUTDOWN_DRAIN
        while True:
            # Connections just accepted get a moment to send their request before idle ones close.
            grace_over = time.monotonic() > started + SHUTDOWN_REQUEST_GRACE
            readers = 0
            for fd in self._connections():
                if self.protocols[self.proto[fd]].stop(fd):
                    readers += 1
                elif (grace_over and self.state[fd] == READING and fd not in self.inbuf
                      and fd not in self.outbuf):
                    self.close(fd)
            if grace_over and not (self.outbuf or self.backlogged or self.local or self.inbuf
                                   or readers or self.owes()) or time.monotonic() > deadline:
                break
            self.next_tick = time.monotonic() + 0.02
            self._turn()
        for step in self.before_sleep:
            step()
        self._flush_backlog()
        self._notify()
        self.refresh_stats()
        for fd in self._connections():
            self.close(fd)

    # -- housekeeping --------------------------------------------------------

    def _tick_of(self, t):
        return int(t / TICK) + 1

    def set_deadline(self, fd, seconds):
        tick = int((self.now + seconds) / TICK) + 1          # (_tick_of, inline: a hot path)
        if self.deadline[fd] == tick:
            return                                # in that bucket already (not yet run)
        self.deadline[fd] = tick
        bucket = self.wheel.get(tick)
        if bucket is None:
            # 4 bytes an entry, not a list's 8 and up: at a million held polls the wheel
            # was about 18 B of each one's share.
            self.wheel[tick] = array.array("i", (fd,))
        else:
            bucket.append(fd)

    def clear_deadline(self, fd):
        self.deadline[fd] = 0

    def _tick(self):
        self.stats.set("heartbeat_ms", int(time.time() * 1000))   # the loop turns: see Supervisor
        self._drain_inbox()        # eventfds are the fast path; this bounds any missed wake-up
        now_tick = self._tick_of(self.now) - 1
        state, deadline, protocols, proto = self.state, self.deadline, self.protocols, self.proto
        while self.wheel_at <= now_tick:
            for fd in self.wheel.pop(self.wheel_at, ()):
                if deadline[fd] != self.wheel_at or not state[fd]:
                    continue                      # re-armed since: another bucket has it
                protocols[proto[fd]].timeout(fd)
            self.wheel_at += 1
        self.part.expire(self.now_ms())
        for step in self.on_tick:
            step()
        self._update_listening()
        if self.now >= self.log_window_end:      # a new second: a new budget of lines
            self.log_window_end = self.now + 1.0
            self.log_budget = LOG_LINES_PER_SECOND
            if self.log_suppressed:
                self.log("%d log lines suppressed" % self.log_suppressed, force=True)
                self.log_suppressed = 0
        self.refresh_stats()
        self._flush_backlog()
        self._notify()

    def refresh_stats(self):
        """The counters that are not counted where they happen: what the partition expired
        and dropped, and the RSS (every 2 s).  At each tick, and for /stats."""
        counters = self.counters
        if self.now >= self.rss_at:
            self.rss_at = self.now + 2.0
            try:
                with open("/proc/self/statm", "rb") as f:
                    counters[RSS_BYTES] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except OSError:
                pass
        counters[EXPIRED] = self.part.expired
        counters[DROPPED] = self.part.dropped

    def now_ms(self):
        return int(self.now * 1000)

    def log(self, message, level="warning", force=False, with_traceback=False, fd=None):
        """One log line; at most LOG_LINES_PER_SECOND unless forced, the rest only counted.
        ``with_traceback``: the exception being handled follows (only if the line is written:
        a flood of errors must not cost a formatted traceback each).  ``fd``: a connection
        the line is about, named by its client's address (only if the line is written)."""
        if not force:
            if self.log_budget <= 0:
                self.log_suppressed += 1
                return
            self.log_budget -= 1
        if fd is not None:
            message += " (client %s)" % self.peer_name(fd)
        if with_traceback:
            message += "\n" + traceback.format_exc().rstrip()
        logs.write(level, message, self.index)

    # -- sockets -------------------------------------------------------------

    def _accept(self, sock, proto, client):
        for _ in range(ACCEPT_BATCH):
            if client and self.counters[CONNECTIONS] >= self.client_cap:
                self.log("client port: %d connections; the fds left are the app port's, "
                         "accepting again below %d"
                         % (self.counters[CONNECTIONS], self.client_cap - CLIENT_CAP_SLACK))
                self._set_listening(client=False)
                return
            try:
                fd, addr = sock._accept()
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
            if client and self.keep_peers:        # who it is: only while a feature needs it
                ip = sys.intern(proxyproto.canonical_text(addr[0]))
                if self.proxy_protocol:           # the real address comes in its header
                    self.proxy_pending[fd] = b""
                elif not self._admit(fd, ip):
                    continue
                self.peers[self.fd_int[fd]] = ip  # (the fd's own int: no new key object)
                self.peer_port[fd] = addr[1]
            fcntl.fcntl(fd, fcntl.F_SETFL, os.O_RDWR | os.O_NONBLOCK)
            self.set_state(fd, READING)
            self.proto[fd] = proto
            self.serial[fd] = 0                   # replies meant for a former owner of the fd miss
            self.unread[fd] = 0
            if client and self.tls_accept is not None:   # TLS: from its first byte (tls.py)
                self.tls[fd] = self.tls_accept()
            self.ep.register(fd, IN)
            self.set_deadline(fd, self.cfg.header_timeout)   # (bounds a TLS handshake too)
            self.counters[CONNECTIONS] += 1
            self.counters[ACCEPTED] += 1

    # -- who is connecting: --max-conns-per-ip, --proxy-protocol ---------------------------

    def _admit(self, fd, ip):
        """Count a client connection for its address (the real one), or refuse it past
        --max-conns-per-ip (closed at once, counted in /stats, one log line).  Each worker
        counts its own connections.  True if admitted (or no cap)."""
        if not self.max_per_ip:
            return True
        count = self.per_ip.get(ip, 0)
        if count >= self.max_per_ip:
            self.counters[IP_REFUSED] += 1
            self.log("client: %s already holds %d connections on this worker "
                     "(--max-conns-per-ip); refused" % (ip, count))
            if self.state[fd]:                    # accepted already: closed as any is
                self.peers.pop(fd, None)
                self.close(fd)
            else:
                os.close(fd)
            return False
        self.per_ip[ip] = count + 1
        return True

    def _forget_peer(self, fd):
        """fd is being closed: its address and its count go."""
        ip = self.peers.pop(fd, None)
        if ip is not None and self.proxy_pending.pop(fd, None) is None and self.max_per_ip:
            count = self.per_ip.get(ip, 0) - 1
            if count > 0:
                self.per_ip[ip] = count
            else:
                self.per_ip.pop(ip, None)

    def _proxy_preamble(self, fd, data):
        """--proxy-protocol: what a client connection sends until its PROXY header is
        complete is the header's.  Returns what follows the header (b"" if nothing yet), or
        None if the connection was closed (no valid header, or over --max-conns-per-ip).
        The header's address becomes the connection's real one."""
        buf = self.proxy_pending[fd] + data
        try:
            found = proxyproto.parse(buf)
        except proxyproto.ProxyError as e:
            self.log("client: %s; closed" % e, fd=fd)
            self.close(fd)
            return None
        if found is None:
            self.proxy_pending[fd] = buf          # at most a header's bytes (proxyproto bounds)
            return b""
        source, used = found
        del self.proxy_pending[fd]
        if source is not None:                    # else (LOCAL, UNKNOWN) the peer's stands
            self.peers[self.fd_int[fd]] = sys.intern(source[0])
            self.peer_port[fd] = source[1]
        if not self._admit(fd, self.peers[fd]):
            return None
        return memoryview(buf)[used:]             # (a memoryview, as the read's own bytes are)

    def peer_name(self, fd):
        """fd's client as "ip:port": the real address when kept (PROXY header, peer of a
        capped connection), else asked of its socket now (nothing is kept for a log line)."""
        ip = self.peers.get(fd)
        if ip is not None:
            port = self.peer_port[fd]
        else:
            try:
                sock = socket.socket(fileno=fd)
                try:
                    addr = sock.getpeername()
                finally:
                    sock.detach()
            except (OSError, ValueError):
                return "?"
            if not (isinstance(addr, tuple) and isinstance(addr[0], str)):
                return "local"                    # (a Unix socket, say)
            ip, port = proxyproto.canonical_text(addr[0]), addr[1]
        return ("[%s]:%d" if ":" in ip else "%s:%d") % (ip, port)

    def _set_listening(self, client=True, app=True):
        """Turn accepting on or off per port (the listeners stay open and keep their queues)."""
        for fd, (_sock, _proto, is_client) in self.listeners.items():
            on = client if is_client else app
            if self.listening.get(fd) != on:
                self.listening[fd] = on
                self.ep.modify(fd, select.EPOLLIN if on else 0)

    def _update_listening(self):
        """Accept again once the EMFILE pause is over and clients are back under their cap."""
        if self.accept_paused_until:
            if self.now < self.accept_paused_until:
                return
            self.accept_paused_until = 0.0
        self._set_listening(client=self.counters[CONNECTIONS] < self.client_cap - CLIENT_CAP_SLACK)

    def _read(self, fd):
        """Append what the socket has to inbuf[fd]; False if the connection ended (closed)."""
        try:
            n = os.readv(fd, self.read_buffers)
        except BlockingIOError:
            return False
        except OSError:
            n = 0
        if not n:
            self.close(fd)
            return False
        data = self.read_view[:n]
        if self.proxy_pending and fd in self.proxy_pending:
            # --proxy-protocol: the PROXY header, before anything else (TLS included)
            data = self._proxy_preamble(fd, data.tobytes())
            if not data:
                return False                      # not complete yet, or closed
        if fd in self.tls:                        # TLS: records, decrypted into inbuf (tls.py)
            return self.tls[fd].receive(self, fd, data)
        buf = self.inbuf.get(fd)
        if buf is None:
            self.inbuf[fd] = bytes(data)
        else:
            if type(buf) is bytes:                # growing: append in place, not by copying
                buf = self.inbuf[fd] = bytearray(buf)
            buf += data
        return True

    def consumed(self, fd, used):
        """The protocol parsed the first ``used`` bytes of inbuf[fd]."""
        buf = self.inbuf[fd]
        if used >= len(buf):
            del self.inbuf[fd]
        elif used:
            self.inbuf[fd] = buf[used:]

    def write(self, fd, data, sealed=False):
        """Send what the socket takes now; keep the rest for EPOLLOUT.  On a TLS connection
        the data is encrypted first, unless it is ``sealed`` already (tls.py's handshake)."""
        if not sealed and fd in self.tls:         # TLS: what is sent (and kept) is ciphertext
            data = self.tls[fd].seal(self, fd, data)
            if data is None:                      # (it failed: fd is closed)
                return
        pending = self.outbuf.get(fd)
        if pending is not None:
            pending += data                       # a bytearray: appends do not copy what waits
            return
        n = self._write_now(fd, data)
        if 0 <= n < len(data):
            self._keep_unsent(fd, data, n)

    def write_many(self, fds, data):
        """write(fd, data) to each of fds: one message to many subscribers, the loop kept
        here so that each costs little more than its syscall.  Returns (the fds with output
        still waiting, most often none; how many of fds were closed as they failed)."""
        outbuf, tls = self.outbuf, self.tls
        size = len(data)
        waiting = []
        closed = 0
        for fd in fds:
            if fd in outbuf or fd in tls:
                self.write(fd, data)
                if not self.state[fd]:
                    closed += 1
                    continue
            else:
                n = self._write_now(fd, data)
                if n == size:
                    continue
                if n < 0:
                    closed += 1
                    continue
                self._keep_unsent(fd, data, n)
            if fd in outbuf:
                waiting.append(fd)
        return waiting, closed

    def _write_now(self, fd, data):
        """What the socket takes of data now: the bytes sent, or -1 if it failed (closed)."""
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            self.close(fd)
            return -1

    def _keep_unsent(self, fd, data, sent):
        """The socket took only ``sent`` bytes of data: keep the rest for EPOLLOUT."""
        self.outbuf[fd] = bytearray(memoryview(data)[sent:])
        self.ep.modify(fd, self._mask(fd))

    def _flush_out(self, fd):
        pending = self.outbuf.get(fd)
        if pending is None:
            return
        try:
            n = os.write(fd, pending)
        except BlockingIOError:
            return
        except OSError:
            self.close(fd)
            return
        del pending[:n]                           # O(1) at a bytearray's front
        if pending:
            return
        del self.outbuf[fd]
        if self.state[fd] == CLOSING:
            self._finish(fd)
            return
        self.ep.modify(fd, self._mask(fd))
        self.protocols[self.proto[fd]].drained(fd)

    def output_waiting(self, fd):
        """How many bytes queued for fd the socket has not taken yet."""
        pending = self.outbuf.get(fd)
        return 0 if pending is None else len(pending)

    def output_full(self, fd):
        """Has fd more unsent output than OUT_LIMIT? Then it gets no new answer and nothing
        more is read from it until it reads (``drained`` tells its protocol)."""
        if self.output_waiting(fd) <= OUT_LIMIT:
            return False
        self.ep.modify(fd, OUT)
        return True

    def _mask(self, fd):
        """fd's epoll events: input unless its protocol stopped reading it or its output is
        over OUT_LIMIT (then it reads again once all is written: ``drained``); output while
        any waits."""
        waiting = self.output_waiting(fd)
        if not waiting:
            return 0 if self.unread[fd] else IN
        return OUT if self.unread[fd] or waiting > OUT_LIMIT else IN | OUT

    def stop_reading(self, fd):
        """Take no more input from fd for now: it stays in the socket, and TCP makes the peer
        wait.  Output still goes out.  Until ``read_again``."""
        if not self.unread[fd]:
            self.unread[fd] = 1
            self.ep.modify(fd, self._mask(fd))

    def read_again(self, fd):
        if self.unread[fd]:
            self.unread[fd] = 0
            self.ep.modify(fd, self._mask(fd))

    def close_after_output(self, fd):
        """Close once what is queued for fd is written (at once if nothing is)."""
        if fd in self.outbuf:
            self.set_state(fd, CLOSING)
        else:
            self._finish(fd)

    def _finish(self, fd):
        """Close fd, all its output written.  If its peer may have sent more than we read, it
        lingers instead: FIN, then its input is read and dropped until the peer closes or
        LINGER_TIMEOUT, since closing with input unread would send a reset, and a reset
        can destroy the answers the peer has not read yet."""
        if fd in self.tls:                        # TLS: close_notify; any lingering is raw
            self.tls.pop(fd).close_notify(fd)
        if not (self.unread[fd] or fd in self.inbuf):
            self.close(fd)
            return
        self.protocols[self.proto[fd]].closed(fd)   # closed, as far as its protocol knows
        half_close(fd)
        self.set_state(fd, CLOSING)
        self.proto[fd] = self.linger_proto
        self.inbuf.pop(fd, None)
        self.unread[fd] = 0
        self.ep.modify(fd, IN)
        self.set_deadline(fd, LINGER_TIMEOUT)

    def linger_readable(self, fd):
        self.inbuf.pop(fd, None)

    def close(self, fd):
        if not self.state[fd]:
            return
        self.protocols[self.proto[fd]].closed(fd)
        self.set_state(fd, FREE)
        self.unread[fd] = 0
        self.inbuf.pop(fd, None)
        self.outbuf.pop(fd, None)
        if fd in self.tls:
            del self.tls[fd]                      # (frees its SSL object)
        if self.peers:
            self._forget_peer(fd)
        if self.paused and fd in self.paused:     # its next owner must not be "unpaused"
            self.paused = [p for p in self.paused if p != fd]
        os.close(fd)                              # also leaves the epoll set
        if self.counters[CONNECTIONS]:            # (shared: never below 0, whatever happened)
            self.counters[CONNECTIONS] -= 1

    def pause_reading(self, fd):
        """Back-pressure: read fd again once the backlog of records has drained."""
        self.stop_reading(fd)
        self.paused.append(self.fd_int[fd])

    def set_state(self, fd, new):
        """The one way a connection's state changes: StateError for a move TRANSITIONS does
        not allow (the catch-all closes that connection and logs it)."""
        state = self.state
        old = state[fd]
        if not _ALLOWED[old * _STATES + new]:
            raise StateError("fd %d: %s -> %s" % (fd, State(old).name, State(new).name))
        state[fd] = new

    def new_serial(self, fd):
        """A new request on fd: replies to the previous one (which carry its serial) miss."""
        serial = self.next_serial = (self.next_serial + 1) & 0xFFFFFFFF or 1
        self.serial[fd] = serial
        return serial

    def _on_internal_error(self, fd, e):
        self.log("internal error on a %s connection: %r; closed"
                 % (self.protocols[self.proto[fd]].name, e), "error", with_traceback=True,
                 fd=fd)
        try:
            self.close(fd)
        except Exception:                            # half-closed state: at least drop the fd
            self.state[fd] = FREE                    # (no set_state: whatever it was, it ends)
            self.unread[fd] = 0
            self.tls.pop(fd, None)
            if self.peers:
                self._forget_peer(fd)
            os.close(fd)

    # -- talking to other workers ------------------------------------------------

    def send(self, dst, record):
        """Queue a record for worker dst (ourselves included: through the local FIFO, so that
        one order holds for every pair of workers)."""
        if dst == self.index:
            self.local.append(record)
            return
        queue = self.backlog[dst]
        if queue or not self.outbox[dst].push(record):
            queue.append(record)
            self.backlogged += 1
        self.wake.add(dst)

    def send_home(self, ident, record):
        self.send(shmqueue.id_key(ident) % self.region.workers, record)

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
                if self.state[fd]:
                    self.read_again(fd)
                    if fd in self.inbuf:
                        self.protocols[self.proto[fd]].readable(fd)

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

    def _handle(self, src, record):
        try:
            self.record_handlers[record[0]](src, record)
        except Exception as e:                      # a bug must cost one record, not the worker
            self.log("internal error handling record %r from worker %d: %r"
                     % (record[:1], src, e), "error", with_traceback=True)


def responsive(block, now_ms, timeout_s):
    """Is the worker of this stats block alive and turning its loop (heartbeat within timeout)?"""
    return bool(block["pid"]) and now_ms - block["heartbeat_ms"] < timeout_s * 1000


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

"""Workers in the test process, without sockets: feed a connection bytes, look at the bytes
and the records that come out (in the spirit of the ``websockets`` library's
tests/test_protocol.py).

A fake worker is what ``server.assemble`` builds, over a real in-process SharedRegion of 1
or 2 workers: every protocol, record handler and hook is the server's own.  Only the
syscalls are replaced (``FakeWorker``): ``write`` records the bytes per fd, ``close``
records the close, ``send`` keeps records per destination, and epoll is a table of masks.
Nothing polls: a test moves things along itself.

    w, = workers(1)
    open_connection(w, 100)                        # what _accept does
    feed(w, 100, http_request("GET", "/sub/a?since=4"))   # read; the protocol's readable
    read_records_to(w, 0)                          # [("SUB", 100, serial, 4, 0, 0, b"a")]
    settle(w)                                      # records to their handlers until quiet
    advance(w, 31)                                 # the clock moves; the real tick runs
    responses(w, 100)                              # [Response(200, {...}, b'{"id": "a", ...')]

Connections get fds from 100 up in the tests, which the test process does not use.
"""

import collections
import contextlib
import json
import os
import time
from unittest import mock

from megacomet import config, protocols, records, server, shmqueue, worker

PORTS = {"client": protocols.CLIENT_HTTP, "app": protocols.APP_NEW}


def make_config(**overrides):
    values = dict(host="127.0.0.1", port=0, compat_ports=0, app_host="127.0.0.1", app_port=0,
                  max_message=1024, max_body=65536, header_timeout=5.0, poll_timeout=30,
                  heartbeat=20.0, queue_ttl=60.0, cors_origin="*", app_token=None, secret=None,
                  worker_timeout=10.0, log_format="text", started_at=time.time())
    values.update(overrides)
    return config.Config(**values)


class FakeEpoll:
    """The epoll set as a table: fd -> its event mask (what the worker would wait for)."""

    def __init__(self):
        self.masks = {}

    def register(self, fd, mask):
        self.masks[fd] = mask

    def modify(self, fd, mask):
        assert fd in self.masks, "epoll: fd %d is not registered" % fd
        self.masks[fd] = mask

    def unregister(self, fd):
        del self.masks[fd]


class Syscalls:
    """What the worker module asks of ``os`` (and its ``half_close``) for a connection,
    recorded instead: it stands in for them while a FakeWorker method that makes them runs."""

    def __init__(self, epoll):
        self.epoll = epoll
        self.written = collections.defaultdict(bytearray)   # fd -> bytes not yet looked at
        self.closed = []          # fds, in the order they were closed
        self.half_closed = []
        self.room = {}            # fd -> bytes its socket takes now (not there: all of them)

    def write(self, fd, data):
        n = min(len(data), self.room.get(fd, len(data)))
        if fd in self.room:
            self.room[fd] -= n
        if not n and data:
            raise BlockingIOError
        self.written[fd] += data[:n]
        return n

    def close(self, fd):
        self.closed.append(fd)
        self.epoll.masks.pop(fd, None)            # a closed fd leaves the epoll set

    def half_close(self, fd):
        self.half_closed.append(fd)

    def __getattr__(self, name):                  # the rest of os, as it is
        return getattr(os, name)


class FakeWorker(worker.Worker):
    """A Worker whose syscalls are recorded (see Syscalls), whose records wait in ``sent``
    (dst -> [record]) until a test hands them over (``deliver``), and whose log lines are
    kept in ``logged``; an internal error (a record handler that raised, which the loop
    logs and survives) fails the test instead."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ep = FakeEpoll()
        self.io = Syscalls(self.ep)
        self.sent = collections.defaultdict(list)
        self.logged = []                          # (level, message)

    @contextlib.contextmanager
    def syscalls(self):
        """For the duration: the worker module's ``os`` and ``half_close`` are ours."""
        with mock.patch.multiple(worker, os=self.io, half_close=self.io.half_close):
            yield

    def write(self, fd, data):
        with self.syscalls():
            super().write(fd, data)

    def write_many(self, fds, data):
        with self.syscalls():
            return super().write_many(fds, data)

    def _flush_out(self, fd):
        with self.syscalls():
            super()._flush_out(fd)

    def close(self, fd):
        with self.syscalls():
            super().close(fd)

    def _finish(self, fd):
        with self.syscalls():
            super()._finish(fd)

    def send(self, dst, record):
        self.sent[dst].append(bytes(record))

    def _notify(self):
        self.wake.clear()

    def log(self, message, level="warning", force=False, with_traceback=False, fd=None):
        if level == "error":
            raise AssertionError(message)         # the exception being handled is its cause
        self.logged.append((level, message))


def workers(n=1, max_ids=1000, log_bytes=1 << 20, ring_bytes=1 << 16, ttl_ms=60000,
            max_queued=100, **cfg):
    """n fake workers (1 or 2) sharing one region, ready as ``Worker.run`` leaves them
    before its first turn; ``cfg``: Config fields."""
    region = shmqueue.SharedRegion(n, max_ids, log_bytes, ring_bytes, ttl_ms=ttl_ms,
                                   max_queued=max_queued)
    cfg = make_config(**cfg)
    made = []
    with mock.patch.object(worker, "Worker", FakeWorker):   # what assemble builds
        for index in range(n):
            made.append(server.assemble(index, cfg, region, [-1] * n))
    now = time.monotonic()
    for w in made:
        # What assemble made, by name (the loop knows them only through its tables).
        w.door = w.protocols[protocols.CLIENT_HTTP].readable.__self__
        w.http, w.subs, w.poll, w.streams = (w.door.http, w.door.subscriptions,
                                             w.door.longpoll, w.door.streams)
        w.router = w.poll.router
        w.app = w.protocols[protocols.APP_HTTP].readable.__self__
        w.now = now
        w.part.repair()
        for start in w.on_start:
            start()
        w.stats.set("started_ms", int(time.time() * 1000))
        w.stats.set("heartbeat_ms", int(time.time() * 1000))
        w.stats.set("pid", os.getpid())           # alive: its registrations are not stale
        w.client_cap = len(w.state)
        w.wheel_at = w._tick_of(w.now)
    return made


def home_of(w, ident):
    return shmqueue.id_key(ident) % w.region.workers


def ids_at(w, home, count=1, prefix="id"):
    """``count`` ids whose home is worker ``home`` (ids hash differently in each run)."""
    found = []
    n = 0
    while len(found) < count:
        ident = b"%s%d" % (prefix.encode(), n)
        if home_of(w, ident) == home:
            found.append(ident)
        n += 1
    return found



def two_workers_and_ids():
    """Two workers, the first knowing ``a`` (an id whose home is worker 0) and ``b`` (one
    whose home is worker 1): a holder and two homes, one of them remote."""
    w0, w1 = workers(2)
    w0.a, w0.b = ids_at(w0, 0, prefix="a")[0], ids_at(w0, 1, prefix="b")[0]
    return w0, w1

# -- a connection: what the loop does with its socket --------------------------------------

def open_connection(w, fd, port="client"):
    """What ``Worker._accept`` does for a new connection on ``port`` ("client" or "app")."""
    w.set_state(fd, worker.READING)
    w.proto[fd] = PORTS[port]
    w.serial[fd] = 0
    w.unread[fd] = 0
    w.ep.register(fd, worker.IN)
    w.set_deadline(fd, w.cfg.header_timeout)
    w.counters[shmqueue.CONNECTIONS] += 1
    return fd


def feed(w, fd, data):
    """Bytes from the peer: appended to inbuf[fd], then the protocol's readable, as the loop
    does when epoll reports input.  The loop reads only an fd whose mask asks for input: so
    does this (the bytes must not arrive while the worker does not read)."""
    assert w.state[fd], "fd %d is not a connection" % fd
    assert w.ep.masks.get(fd, 0) & worker.IN, "fd %d is not read now" % fd
    buf = w.inbuf.get(fd)
    if buf is None:
        w.inbuf[fd] = bytes(data)
    else:
        if type(buf) is bytes:
            buf = w.inbuf[fd] = bytearray(buf)
        buf += data
    w.protocols[w.proto[fd]].readable(fd)


def hang_up(w, fd):
    """The peer closed: the loop's read finds EOF and closes the connection."""
    w.close(fd)


def reading(w, fd):
    """Does the worker read fd now (its epoll mask asks for input)?"""
    return bool(w.ep.masks.get(fd, 0) & worker.IN)


def take_output(w, fd, room=None):
    """The peer reads: the socket takes ``room`` more bytes (None: all, from now on), then the
    loop's EPOLLOUT handling (``_flush_out``: the rest of the output, ``drained``)."""
    if room is None:
        w.io.room.pop(fd, None)
    else:
        w.io.room[fd] = room
    if w.ep.masks.get(fd, 0) & worker.OUT:
        w._flush_out(fd)


def written(w, fd):
    """The bytes written to fd since the last look."""
    data = bytes(w.io.written.pop(fd, b""))
    return data


def closed(w, fd):
    """Was fd closed (its fd given back)?"""
    return fd in w.io.closed


def lingering(w, fd):
    """Is fd closing with its peer's input unread: FIN sent, reading until the peer closes?"""
    return (w.state[fd] == worker.CLOSING and w.proto[fd] == protocols.LINGER
            and fd in w.io.half_closed)


# -- HTTP requests and responses ----------------------------------------------------------

def http_request(method, target, *headers, body=None, version="1.1"):
    """One request's bytes; ``headers``: "Name: value" strings; a body gets its Content-Length."""
    lines = ["%s %s HTTP/%s" % (method, target, version), "Host: localhost", *headers]
    if body is not None:
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")



class Response(collections.namedtuple("Response", "status headers body")):
    """One HTTP response: status, headers (lower-cased names) and body."""

    def json(self):
        return json.loads(self.body)

    @property
    def closes(self):
        return self.headers.get("connection") == "close"


def parse_responses(data, head=False):
    """The complete responses in ``data`` (``head``: answers to HEAD, without bodies);
    raises if bytes are left over."""
    found = []
    while data:
        end = data.index(b"\r\n\r\n")
        lines = data[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head or status == 204 else int(headers.get("content-length", 0))
        body = data[end + 4:end + 4 + length]
        assert len(body) == length, "an incomplete response: %r" % data
        found.append(Response(status, headers, body))
        data = data[end + 4 + length:]
    return found


def responses(w, fd, head=False):
    """The responses written to fd since the last look, parsed."""
    return parse_responses(written(w, fd), head)


def response(w, fd, head=False):
    """The one response written to fd since the last look."""
    found = responses(w, fd, head)
    assert len(found) == 1, found
    return found[0]


# -- records between workers -------------------------------------------------------------

NAMES = {records.PUB: "PUB", records.ACK: "ACK", records.SUB: "SUB", records.MSGS: "MSGS",
         records.DELIVER: "DELIVER", records.UNSUB: "UNSUB", records.CPOLL: "CPOLL",
         records.CMSG: "CMSG", records.RESET: "RESET", records.CGIVE: "CGIVE",
         records.CWAKE: "CWAKE", records.COUNT: "COUNT", records.RECOUNT: "RECOUNT"}
READERS = {records.PUB: records.read_pub, records.ACK: records.read_ack,
           records.SUB: records.read_sub, records.MSGS: records.read_msgs,
           records.DELIVER: records.read_deliver, records.UNSUB: records.read_unsub,
           records.CPOLL: records.read_cpoll, records.CMSG: records.read_cmsg,
           records.RESET: lambda record: (), records.CGIVE: records.read_cgive,
           records.CWAKE: lambda record: (records.read_cwake(record),),
           records.COUNT: records.read_count,
           records.RECOUNT: lambda record: (records.read_recount(record),)}


def read_record(record):
    """A record as a tuple: its kind's name, then its fields as ``records.read_*`` gives them
    (("SUB", fd, serial, since, epoch, flags, id), ("DELIVER", seq, epoch, flags, id, data))."""
    return (NAMES[record[0]], *READERS[record[0]](record))


def records_to(w, dst):
    """The records w sent worker ``dst`` (itself too) that were not delivered yet."""
    return list(w.sent.get(dst, ()))


def read_records_to(w, dst):
    return [read_record(record) for record in records_to(w, dst)]


def drop_records(w, dst=None):
    """Forget what w sent dst (every worker: None) and did not deliver."""
    if dst is None:
        w.sent.clear()
    else:
        w.sent.pop(dst, None)


def deliver(src, dst):
    """Hand what ``src`` sent ``dst`` to dst's record handlers, in order: another worker's
    through ``_handle`` (as ``_drain_inbox`` does), its own through its local FIFO
    (``_run_local``).  Returns the records handed over."""
    queued = src.sent.pop(dst.index, [])
    if src is dst:
        dst.local.extend(queued)
        dst._run_local()
    else:
        for record in queued:
            dst._handle(src.index, record)
    return queued


def settle(*ws, turns=100):
    """Loop turns until no record is in flight between ``ws``: each turn runs every worker's
    before-sleep steps (the ACKs of the turn), then delivers what each sent the others and
    itself."""
    for _ in range(turns):
        for w in ws:
            for step in w.before_sleep:
                step()
        moved = False
        for src in ws:
            for dst in ws:
                if src.sent.get(dst.index):
                    deliver(src, dst)
                    moved = True
        if not moved:
            return
    raise AssertionError("records still flow after %d turns" % turns)


# -- time ------------------------------------------------------------------------------

def advance(w, seconds):
    """The clock moves on; the real tick runs (deadlines due, expiry, the routing's tick)."""
    w.now += seconds
    w._tick()


def stop(w):
    """The worker is told to stop: each connection's protocol answers or closes it (one
    pass of ``_shutdown``)."""
    w.stopping = True
    with w.syscalls():
        for fd in w._connections():
            w.protocols[w.proto[fd]].stop(fd)

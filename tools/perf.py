"""pyperf micro-benchmarks of MegaComet's hot paths.

    python tools/perf.py -o new.json            # add --fast for a quick look
    python -m pyperf compare_to old.json new.json

Each benchmark times one operation of the loop a worker runs per request or
per message, on the real code (no server; one socketpair for the read), so a regression shows
up here before it shows up in tools/bench.py.  tests/test_hot_paths.py runs
the same cases once in CI so they never rot.
"""

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacomet import appport, longpoll, shmqueue, wire, worker  # noqa: E402

REQUEST = (b"GET /sub/user:12345?since=41&timeout=30 HTTP/1.1\r\nHost: push.example.com\r\n"
           b"User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nAccept: */*\r\n"
           b"Accept-Language: en-US,en;q=0.5\r\nConnection: keep-alive\r\n"
           b"Origin: https://www.example.com\r\nCookie: session=abcdef0123456789\r\n\r\n")
COMMON = (b"Cache-Control: no-store\r\nAccess-Control-Allow-Origin: *\r\n"
          b"X-Content-Type-Options: nosniff\r\n")
MESSAGE = b'{"type": "chat", "from": "bob", "text": "see you at 8"}'


def parse_request():
    req = wire.parse_head(REQUEST)
    wire.parse_query(req.query)
    return req


def build_response():
    return wire.response(200, b'{"id": "user:12345", "messages": [], "last": 41}',
                         b"application/json", True, COMMON)


def encode_body():
    return longpoll.json_body_of(b"user:12345", [(42, MESSAGE)], 42)


def make_region(workers=1):
    return shmqueue.SharedRegion(workers, 200_000, 32 << 20, 1 << 20, ttl_ms=60_000, max_queued=64)


class TableCase:
    """Subscribe (insert), find (lookup) and unsubscribe (delete) of distinct ids."""

    def __init__(self, n=100_000):
        self.part = make_region().partition(0)
        self.keys = [shmqueue.id_key(b"user:%d" % i) for i in range(n)]

    def run(self, count):
        part, keys = self.part, self.keys[:count]
        for key in keys:
            part.subscribe(key, 1, 0, 0)
        for key in keys:
            part.find(key)
        for key in keys:
            part.unsubscribe(key, 1)


class PublishCase:
    """Publish a tiny message to one of many ids: log append plus slot update."""

    def __init__(self, n=10_000):
        self.part = make_region().partition(0)
        self.keys = [shmqueue.id_key(b"user:%d" % i) for i in range(n)]

    def run(self, count):
        part, keys = self.part, self.keys
        n = len(keys)
        for i in range(count):
            part.publish(keys[i % n], MESSAGE, 1000)


class RingCase:
    """Push then pop-and-commit records of a typical DELIVER size."""

    def __init__(self):
        self.ring = make_region(2).ring(0, 1)
        self.record = b"D" + bytes(7) + b"user:12345" + MESSAGE

    def run(self, count):
        ring, record = self.ring, self.record
        for _ in range(count):
            ring.push(record)
            got = ring.pop()
            ring.commit(len(got))


class PipelineCase:
    """A publisher's pipeline of POST /pub/<id> requests as the app port takes it: each
    request parsed off the front of the connection's buffer, then, their ACKs in, every
    answer built and joined for one write."""

    def __init__(self, n=128):
        self.data = (b"POST /pub/user:12345 HTTP/1.1\r\nHost: push.example.com\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(MESSAGE), MESSAGE)) * n

    def run(self, count):
        for _ in range(count):
            buf = bytearray(self.data)
            publishes = []
            while buf:
                req = wire.parse_head(buf)
                body, end = wire.parse_body(buf, req, 1 << 20)
                del buf[:end]
                publish = appport.Publish(len(publishes) + 1, req.path[5:], 1, 1)
                publish.waiting, publish.published, publish.seq = 0, 1, len(publishes) + 1
                publishes.append(publish)
            answers = []
            for publish in publishes:
                status, body, content_type, headers = appport.answer_of(publish)
                answers.append(wire.response(status, body, content_type, True, headers))
            b"".join(answers)


class ReadCase:
    """A subscriber's request read off its socket into the connection's input buffer by
    the worker's own read (Worker._read), then taken as the parser would take it."""

    def __init__(self):
        self.w = worker.Worker(0, None, make_region(1), [])
        self.client, server = socket.socketpair()
        self.server = server                     # kept: closing it would close the fd
        server.setblocking(False)
        self.fd = server.fileno()
        self.w.state[self.fd] = worker.READING
        self.got = b""

    def run(self, count):
        w, fd, send = self.w, self.fd, self.client.send
        for _ in range(count):
            send(REQUEST)
            w._read(fd)
            self.got = w.inbuf.pop(fd)


def _time_loops(func):
    def timed(loops):
        t0 = time.perf_counter()
        for _ in range(loops):
            func()
        return time.perf_counter() - t0
    return timed


def _time_case(case, per_loop):
    def timed(loops):
        t0 = time.perf_counter()
        for _ in range(loops):
            case.run(per_loop)
        return time.perf_counter() - t0
    return timed


def main():
    import pyperf
    runner = pyperf.Runner()
    runner.bench_time_func("parse_request", _time_loops(parse_request))
    runner.bench_time_func("build_response", _time_loops(build_response))
    runner.bench_time_func("encode_json_body", _time_loops(encode_body))
    runner.bench_time_func("table_sub_find_unsub_x1000", _time_case(TableCase(), 1000))
    runner.bench_time_func("publish_x1000", _time_case(PublishCase(), 1000))
    runner.bench_time_func("ring_push_pop_x1000", _time_case(RingCase(), 1000))
    runner.bench_time_func("publish_pipeline_x128", _time_case(PipelineCase(), 1))
    runner.bench_time_func("read_request_x1000", _time_case(ReadCase(), 1000))


if __name__ == "__main__":
    main()

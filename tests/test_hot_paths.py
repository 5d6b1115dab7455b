"""The pyperf cases of tools/perf.py as pytest-benchmark tests.

In CI they run once each (``--benchmark-disable`` in setup.cfg) so the
benchmark code never rots; ``python -m pytest tests/test_hot_paths.py
--benchmark-enable`` times them.  Each also checks its result, so a fast
wrong answer fails.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import perf  # noqa: E402


def test_parse_request(benchmark):
    req = benchmark(perf.parse_request)
    assert req.path == b"/sub/user:12345" and req.keep_alive


def test_build_response(benchmark):
    data = benchmark(perf.build_response)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: %d" % len(body) in head


def test_encode_json_body(benchmark):
    body = json.loads(benchmark(perf.encode_body))
    assert body["messages"][0]["data"] == perf.MESSAGE.decode() and body["last"] == 42


def test_table_insert_find_delete(benchmark):
    case = perf.TableCase(n=2000)
    benchmark(case.run, 2000)
    assert all(case.part.find(k) == -1 for k in case.keys)     # every insert was deleted again


def test_publish(benchmark):
    case = perf.PublishCase(n=100)
    benchmark(case.run, 1000)
    last, _epoch, _reset, messages = case.part.subscribe(case.keys[0], 1, 0, 1000)
    assert last >= 10 and [s for s, _ in messages] == list(range(last - len(messages) + 1, last + 1))


def test_ring_push_pop(benchmark):
    case = perf.RingCase()
    benchmark(case.run, 1000)
    assert case.ring.pop() is None and case.ring.pending_bytes() == 0


def test_read_request(benchmark):
    case = perf.ReadCase()
    benchmark(case.run, 1000)
    assert case.got == perf.REQUEST and case.fd not in case.w.inbuf


def test_publish_pipeline(benchmark):
    case = perf.PipelineCase(n=16)
    benchmark(case.run, 1)
    publish = perf.appport.Publish(1, b"user:12345", 1, 0)
    publish.seq = 7
    status, body, _, _ = perf.appport.answer_of(publish)
    assert status == 202 and json.loads(body) == {"id": "user:12345", "seq": 7, "subscribers": 0}

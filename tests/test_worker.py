"""megacomet/worker.py without sockets: the connection states and their one door.

A connection's state changes only through ``Worker.set_state``, which allows
exactly the moves of ``worker.TRANSITIONS``; no module of the package writes
``state[fd]`` itself.
"""

import os
import re

import pytest

from conftest import ROOT
from megacomet import config, shmqueue, worker
from megacomet.worker import State, StateError, TRANSITIONS


@pytest.fixture
def w():
    region = shmqueue.SharedRegion(1, 64, 1 << 20, 1 << 16, ttl_ms=1000, max_queued=4)
    cfg = config.Config(host="127.0.0.1", port=0, compat_ports=0, app_host="127.0.0.1",
                        app_port=0, max_message=1024, max_body=4096, header_timeout=1.0,
                        poll_timeout=1, heartbeat=1.0, queue_ttl=1.0, cors_origin="*",
                        app_token=None, secret=None, worker_timeout=10.0, log_format="text",
                        started_at=0.0)
    return worker.Worker(0, cfg, region, [-1])


def test_every_state_has_its_moves_and_closing_is_always_allowed():
    assert set(TRANSITIONS) == set(State)
    for old, allowed in TRANSITIONS.items():
        assert allowed <= set(State)
        if old != State.FREE:
            assert State.FREE in allowed, old       # whatever it does, a connection may end
    assert TRANSITIONS[State.FREE] == {State.READING}    # only accepting makes a connection


@pytest.mark.parametrize("old", list(State))
@pytest.mark.parametrize("new", list(State))
def test_set_state_allows_exactly_the_table(w, old, new):
    fd = 7
    w.state[fd] = old                               # the test sets the stage by hand
    if new in TRANSITIONS[old]:
        w.set_state(fd, new)
        assert w.state[fd] == new
    else:
        with pytest.raises(StateError, match="%s -> %s" % (old.name, new.name)):
            w.set_state(fd, new)
        assert w.state[fd] == old                   # a refused move changes nothing


def test_no_module_writes_a_connection_state_but_through_set_state():
    """Every ``state[...] =`` in the package is set_state's own (or the last-resort close of
    a connection whose close raised), so the table above is the whole story."""
    package = os.path.join(ROOT, "megacomet")
    writes = []
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            with open(os.path.join(package, name)) as f:
                for number, line in enumerate(f, 1):
                    if re.search(r"\bstate\[[^]]+\]\s*=[^=]", line):
                        writes.append((name, line.strip()))
    assert writes == [("worker.py", "state[fd] = new"),
                      ("worker.py", "self.state[fd] = FREE                    "
                                    "# (no set_state: whatever it was, it ends)")], writes

"""Pytest fixtures for tests that need a real Redis: ``redis_standalone``, ``redis_cluster``.

A test file imports them by name (tests/ is on sys.path, as for ``from conftest
import ...``; importing a fixture into a test module is all pytest needs)::

    from redisfixtures import redis_standalone, redis_cluster  # noqa: F401 (fixtures)

    def test_something(redis_standalone):
        redis_standalone.command("SET", "k", "v")
        ... redis_standalone.url ...

* ``redis_standalone`` (function scope): a fresh, empty redis-server for each
  test (about 10 ms to start); the test may kill, restart or pause it.
* ``redis_cluster`` (making one takes 3 to 4 s): a 3-master, 3-replica Redis
  Cluster shared by every test that asks for it, in whatever module (made by
  the first, stopped when pytest ends).  Tests using it must use keys of their
  own and must never kill, pause or restart its nodes; a test that does makes
  its own ``redislab.Cluster()`` in a ``with`` block.  A module that finds it
  damaged anyway (a node gone, a cluster_state not ok) gets a new one.

Both are tools/redislab.py's objects (see there for the API).  Without
redis-server (``apt-get install redis-server``) or hiredis the tests that use
them are skipped, except under CI (CI=true), where they fail: CI installs both,
so a missing one there is a broken setup, not a reason to skip.

This module must never start anything when it is imported, and never leave a
redis-server behind: every server is stopped by pid when its scope ends (the shared
cluster's, at pytest's end).
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import redislab  # noqa: E402


def require_redis():
    """Skip (fail under CI) when redis-server, redis-cli or hiredis is missing."""
    missing = None
    if not redislab.available():
        missing = "redis-server is not installed: apt-get install redis-server"
    elif redislab.hiredis is None:
        missing = "hiredis is not installed: python3 -m pip install -e '.[test]'"
    if missing is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(missing + " (CI=true: CI must have it)", pytrace=False)
    pytest.skip(missing)


@pytest.fixture
def redis_standalone():
    """A fresh redis-server (redislab.Standalone) for this test, stopped after it."""
    require_redis()
    with redislab.Standalone() as server:
        yield server


_shared_cluster = []               # the one redis_cluster, once made


def _sound(cluster):
    try:
        return (all(n.alive() for n in cluster.nodes)
                and set(cluster.state().values()) == {"ok"})
    except Exception:
        return False


@pytest.fixture(scope="module")
def redis_cluster(request):
    """A 3 + 3 Redis Cluster (redislab.Cluster) shared by the session: never kill its nodes.

    (A fixture imported into several modules is a fixture of each: a session scope would
    make one per module.  So the module fixture hands out the one cluster kept here.)"""
    require_redis()
    if _shared_cluster and not _sound(_shared_cluster[0]):
        _shared_cluster.pop().stop()
    if not _shared_cluster:
        cluster = redislab.Cluster(masters=3, replicas=1).start()
        _shared_cluster.append(cluster)
        request.config.add_cleanup(cluster.stop)
    yield _shared_cluster[0]

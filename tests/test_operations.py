"""What an operator relies on (issue 9), end to end: the single-file archive, the console
command, log lines, the host check, graceful reload.

Each starts the real server as its own process tree, as an operator would.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, Server, wait_for


def round_trip(server, ident="ops"):
    seq = server.pub(ident, "hello from %s" % ident)
    status, _, body = server.sub(ident, since=seq - 1, wait=5)
    assert status == 200 and json.loads(body)["messages"][0]["data"] == "hello from %s" % ident


# -- one file ----------------------------------------------------------------------

def test_pyz_runs_alone_in_an_empty_directory(tmp_path):
    built = tmp_path / "build" / "megacomet.pyz"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_pyz.py"),
                           "-o", str(built)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    host = tmp_path / "host"
    host.mkdir()
    pyz = host / "megacomet.pyz"
    shutil.copy(built, pyz)
    assert os.access(pyz, os.X_OK)
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    # -I: no user site, no PYTHONPATH, no script directory: only the archive.
    env = {"PATH": os.environ["PATH"]}
    server = Server(workers=2, command=[sys.executable, "-I", str(pyz)], cwd=str(host), env=env)
    server.start()
    try:
        for i in range(4):                           # both workers, forked from the archive
            round_trip(server, "pyz%d" % i)
        assert all(server.worker_pids())
    finally:
        server.stop()
    assert os.listdir(host) == ["megacomet.pyz"]     # it wrote nothing beside itself


def test_console_command_from_pip_install():
    command = shutil.which("megacomet")
    if command is None:
        pytest.skip("the package is not installed (python -m pip install -e '.[test]')")
    server = Server(workers=1, command=[command])
    server.start()
    try:
        round_trip(server, "console")
    finally:
        server.stop()


# -- logs --------------------------------------------------------------------------

def test_log_lines_are_bounded_per_second_and_structured(server_factory):
    server = server_factory("--log-format", "json", workers=1)
    before = len(server.stderr())
    started = time.monotonic()
    for i in range(400):                              # each one a logged 404 once
        status, _, _ = server.request("GET", "/nowhere/%d" % i, port=server.client)
        assert status == 404
    took = time.monotonic() - started
    time.sleep(1.2)                                   # the worker sums up what it suppressed
    lines = server.stderr()[before:].splitlines()
    records = [json.loads(line) for line in lines]
    per_second = 20 * (took + 1.5)
    assert len(records) <= per_second + 2, (len(records), took)
    assert {"ts", "level", "pid", "worker", "msg"} <= set(records[0])
    suppressed = sum(int(r["msg"].split()[0]) for r in records if "suppressed" in r["msg"])
    assert suppressed + len([r for r in records if "404" in r["msg"]]) == 400

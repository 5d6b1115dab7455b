"""The command line and the supervisor (megacomet/cli.py) and the log lines it writes.

What a value given at start may hold (--cors-origin), the machines the server refuses to
run on, the id limit's one constant, a worker's death logged with its traceback as
one entry, and a worker dying during its reload step.  Most run parse_args or a function
in-process; the few that start a server start one worker (two for the reload).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import ROOT, wait_for

from megacomet import cli
from megacomet import logs
from megacomet import wire

sys.path.insert(0, os.path.join(ROOT, "tools"))
from chaos import children_of  # noqa: E402

MEGACOMET = [sys.executable, os.path.join(ROOT, "megacomet.py")]
LOOPBACK = ["--host", "127.0.0.1", "--port", "0", "--app-port", "0"]


def run(argv, timeout=20, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


# -- --cors-origin: a header value, checked at start ------------------------------------

def test_cors_origin_with_crlf_is_refused_at_start():
    proc = run([*MEGACOMET, "--workers", "1", *LOOPBACK, "--cors-origin", "a\r\nX-Evil: 1"])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "argument --cors-origin" in proc.stderr
    assert "control character" in proc.stderr
    assert "megacomet: ready" not in proc.stdout and "X-Evil: 1\n" not in proc.stderr


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\0b", "a\tb", "a\x1bb", "a\x7fb",
                                   "a\x85b", "\r\n", "https://example.com\r\n"])
def test_cors_origin_with_a_control_character_is_refused(capsys, value):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--cors-origin", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --cors-origin" in err and "control character" in err
    assert repr(value) in err                     # shown escaped, never raw


@pytest.mark.parametrize("value", ["https://例え.jp", "a\u2028b", "a\udcffb"])
def test_cors_origin_that_latin1_cannot_encode_is_refused(capsys, value):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--cors-origin", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --cors-origin" in err and "not latin-1" in err


@pytest.mark.parametrize("value", ["*", "null", "https://example.com",
                                   "http://127.0.0.1:8080", "https://xn--r8jz45g.jp"])
def test_cors_origin_that_is_a_header_value_is_kept(value):
    assert cli.parse_args(["--cors-origin", value]).cors_origin == value


def test_cors_origin_default_is_star():
    assert cli.parse_args([]).cors_origin == "*"


def test_normal_cors_origin_starts_and_is_sent(server_factory):
    server = server_factory("--cors-origin", "https://example.com", workers=1)
    status, headers, _ = server.sub("corsok", timeout=1, wait=10)
    assert status == 200
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower["access-control-allow-origin"] == "https://example.com"


# -- memory ordering ----------------------------------------------------------------------

@pytest.mark.parametrize("machine", ["x86_64", "AMD64", "amd64", "i386", "i686"])
def test_check_memory_ordering_accepts_x86(machine):
    assert cli.check_memory_ordering(machine) is None


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "armv7l", "ppc64le", "riscv64",
                                     "s390x", ""])
def test_check_memory_ordering_refuses_the_others(machine):
    problem = cli.check_memory_ordering(machine)
    assert problem and "x86-64" in problem and "TSO" in problem
    assert (machine or "unknown") in problem


def test_check_memory_ordering_defaults_to_this_machine(monkeypatch):
    monkeypatch.setattr(cli.platform, "machine", lambda: "aarch64")
    assert "aarch64" in cli.check_memory_ordering()
    monkeypatch.setattr(cli.platform, "machine", lambda: "x86_64")
    assert cli.check_memory_ordering() is None


def test_supervisor_refuses_to_start_on_aarch64_but_subcommands_run():
    fake = textwrap.dedent("""
        import platform, sys
        platform.machine = lambda: "aarch64"
        from megacomet.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    proc = run([sys.executable, "-c", fake, "--workers", "1", *LOOPBACK])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "this machine is aarch64" in proc.stderr
    assert "megacomet: " not in proc.stdout              # no banner: nothing was made
    proc = run([sys.executable, "-c", fake, "sign", "alice", "--secret", "s3"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("exp=")


# -- the id limit: one constant -------------------------------------------------------------

def test_id_limit_is_one_constant(capsys):
    n = wire.MAX_ID_LENGTH
    assert n == 128
    assert wire.valid_id(b"a" * n) and not wire.valid_id(b"a" * (n + 1))
    assert "1-%d characters" % n in wire.ID_RULE
    assert wire.parse_frames(b"\x02" + b"i" * n + b"\0m\0", 10) == ([(b"i" * n, b"m")], n + 4)
    with pytest.raises(wire.FrameError, match="id over %d bytes" % n):
        wire.parse_frames(b"\x02" + b"i" * (n + 1), 10)
    with pytest.raises(SystemExit) as exc:
        cli.main(["sign", "a" * (n + 1), "--secret", "s3"])
    assert exc.value.code == 2
    assert "1-%d characters" % n in capsys.readouterr().err


# -- log entries stay one line -----------------------------------------------------------------

@pytest.fixture
def log_format():
    yield logs.configure
    logs.configure("text")


def test_text_log_entry_of_several_lines_is_one_line(capfd, log_format):
    log_format("text")
    logs.write("error", "died: boom\nTraceback (most recent call last):\n  File \"x\"\r\x1b[31m"
               "\u2028end", 3)
    out = capfd.readouterr().err
    assert out.count("\n") == 1 and out.endswith("\n") and len(out.splitlines()) == 1
    assert "megacomet[worker 3 pid %d] error: died: boom\\nTraceback" % os.getpid() in out
    assert "\\r\\x1b[31m\\u2028end" in out


def test_json_log_entry_of_several_lines_is_one_object(capfd, log_format):
    log_format("json")
    message = "died: boom\nTraceback (most recent call last):\n\x85\u2028\u2029é"
    logs.write("error", message, 3)
    out = capfd.readouterr().err
    assert out.count("\n") == 1 and len(out.splitlines()) == 1
    record = json.loads(out)
    assert record["msg"] == message and record["worker"] == 3 and record["level"] == "error"


# -- a worker's death is logged with its traceback ----------------------------------------------

DYING_WORKER = textwrap.dedent("""
    import os, sys
    from megacomet import cli, server

    class Dying:
        def __init__(self, index, ready_fd):
            self.index, self.ready_fd = index, ready_fd

        def run(self):
            if self.ready_fd is not None:
                os.write(self.ready_fd, b"%d\\n" % self.index)
            deep_in_the_worker()

    def deep_in_the_worker():
        raise ValueError("boom")

    server.assemble = lambda index, config, region, eventfds, ready_fd=None, standby_fd=None: \\
        Dying(index, ready_fd)
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_worker_death_is_logged_with_its_traceback_as_one_entry(fmt):
    proc = subprocess.Popen([sys.executable, "-c", DYING_WORKER, "--workers", "1", *LOOPBACK,
                             "--log-format", fmt], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        banner = ""
        while "megacomet: ready" not in banner:
            line = proc.stdout.readline()
            assert line, banner
            banner += line
        first = proc.stderr.readline()       # the worker logs, then dies: wait for that line
        assert "died: " in first, first
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=cli.EXIT_PROMISE + 5)
        err = first + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    died = [line for line in err.splitlines() if "died: " in line]
    assert died, err
    for line in died:
        if fmt == "json":
            message = json.loads(line)["msg"]
        else:
            assert "megacomet[worker 0 pid " in line
            message = line.split(" error: ", 1)[1].replace("\\n", "\n")
        assert message.startswith("died: ValueError('boom')\nTraceback (most recent call last):")
        assert "in deep_in_the_worker" in message
        assert message.endswith("ValueError: boom")
    if fmt == "json":
        for line in err.splitlines():
            json.loads(line)                   # every line of stderr is one JSON object


# -- regression: a worker dying during its reload step ----------------------------------------
# (Found reviewing the 2026-12-04 changes; it was in tests/test_review_regressions.py.)

def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_a_worker_dying_during_its_reload_step_leaves_one_owner_and_sane_counters(
        server_factory):
    """megacomet.py _reload/_reap: worker 0 dies (SIGKILL) while its reload successor is
    starting.  _reap schedules a restart (restart_at[0]); the standby is then told to take
    the partition over anyway, and once the reload is done _restart_due forks a second
    worker 0: two processes own partition 0 and its stats block.

    With 9011fed the second one's _continue_counters zeroes the shared 'connections' while
    the first holds connections; each close then decrements below 0: memoryview 'Q' raises
    ValueError in Worker.close after state[fd] = FREE but before os.close(fd), so the fd
    stays open and in the epoll set, and the loop spins at 100% CPU on its EOF."""
    server = server_factory(workers=2)
    supervisor = server.proc.pid
    pids = server.worker_pids()
    time.sleep(1.0)                        # worker 0 has lived a second when it is killed
    socks = []
    stop = time.monotonic() + 1.5

    def opener():                          # idle client connections, spread over the workers
        while time.monotonic() < stop:
            try:
                socks.append(socket.create_connection(("127.0.0.1", server.client)))
            except OSError:
                pass
            time.sleep(0.003)
    thread = threading.Thread(target=opener)
    thread.start()
    os.kill(supervisor, signal.SIGHUP)
    time.sleep(0.01)
    os.kill(pids[0], signal.SIGKILL)
    thread.join()
    wait_for(lambda: "reload: done" in server.stderr(), timeout=10, message="the reload")
    time.sleep(0.5)
    workers = children_of(supervisor)
    for sock in socks:
        sock.close()
    time.sleep(1.0)
    before = {pid: cpu_ticks(pid) for pid in workers}
    time.sleep(1.0)
    spinning = [pid for pid in workers if cpu_ticks(pid) - before[pid] > 50]
    problems = []
    if len(workers) != 2:
        problems.append("%d worker processes for 2 workers" % len(workers))
    if "ValueError" in server.stderr():
        problems.append("ValueError (counter underflow) in the workers")
    if spinning:
        problems.append("workers %s spin at 100%% CPU" % spinning)
    # Its lifetime is its own, not its standby's (forked just before the kill): a crash loop
    # is judged by how long the dead worker ran.
    lived = re.search(r"worker 0 \(pid %d\) \S+ .*?after ([0-9.]+) s" % pids[0], server.stderr())
    if lived is None or float(lived.group(1)) < 1.0:
        problems.append("the kill was logged as %r" % (lived and lived.group(0)))
    assert not problems, problems

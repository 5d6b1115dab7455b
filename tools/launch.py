"""Start a MegaComet server and read its banner; stop it by pid.

The one way the tests (tests/conftest.py's Server) and the tools (chaos.py's
ServerTree, which soak.py uses too, and fuzz_server.py's Server) start a
server of their own::

    started = launch([sys.executable, MEGACOMET], ["--workers", 2, "--port", 0, "--app-port", 0],
                     log="/tmp/server.log")
    ...  started.client, started.app, started.banner, started.proc
    stop(started.proc)

launch() reads the server's stdout until its banner's last line
("megacomet: ready"), the process exits or the timeout passes, whichever
comes first; the ports are read off the banner (ports 0 ask for free ones).
On failure the process tree is stopped and StartError says why, with what
the server printed on both outputs.  Nothing here waits without a deadline.
"""

import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEGACOMET = os.path.join(ROOT, "megacomet.py")     # the clone's own door to the package
READY = b"megacomet: ready"
START_TIMEOUT = 30.0
STOP_GRACE = 8.0
ERROR_TAIL = 6000                                  # characters of stderr quoted in a StartError


class StartError(RuntimeError):
    """The server gave no banner: it exited or was too slow.  Its tree is already stopped."""

    def __init__(self, message, output="", stderr="", returncode=None):
        super().__init__(message)
        self.output = output            # what it printed on stdout
        self.stderr = stderr            # what it logged on stderr (this start's part of the log)
        self.returncode = returncode


class Launched:
    """A server that printed its banner: its supervisor process, its ports and the banner."""

    def __init__(self, proc, client, app, banner, log_offset=0):
        self.proc = proc
        self.client = client
        self.app = app
        self.banner = banner
        self.log_offset = log_offset    # where this start's lines begin in the log

    def __repr__(self):
        return "<Launched pid %d client %d app %d>" % (self.proc.pid, self.client, self.app)


def launch(command, flags=(), log=None, cwd=ROOT, env=None, timeout=START_TIMEOUT, **popen):
    """Start ``command + flags`` and return a Launched once its banner says it is ready.

    ``log`` is the path the server's stderr is appended to (None: a temporary file,
    read only to explain a failure).  ``popen`` goes to subprocess.Popen as it is
    (preexec_fn, start_new_session, ...).  Raises StartError, the tree stopped.
    """
    argv = [*map(str, command), *map(str, flags)]
    if log is None:
        err = tempfile.TemporaryFile(prefix="megacomet-launch-")
        offset = 0
    else:
        err = open(log, "ab")
        offset = err.tell()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, cwd=cwd, env=env, **popen)
        try:
            text, why = read_banner(proc, timeout)
            ports = parse_ports(text) if why is None else None
            if why is None and ports is None:
                why = "its banner names no client and app ports"
        except BaseException:
            stop(proc)
            raise
        if why is None:
            return Launched(proc, ports[0], ports[1], text.decode(errors="replace"), offset)
        stop(proc)
        stderr = read_from(err if log is None else log, offset)
        output = text.decode(errors="replace")
        tail = stderr[-ERROR_TAIL:]
        if len(tail) < len(stderr):
            tail = "...\n" + tail[tail.find("\n") + 1:]        # whole lines
        raise StartError("the server did not start (%s): %s\n  stdout: %r\n  stderr:\n%s" % (
            why, " ".join(argv), output, tail), output, stderr, proc.returncode)
    finally:
        err.close()


def read_banner(proc, timeout):
    """(stdout read, None) once READY is in it; (stdout read, why not) otherwise."""
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    text = b""
    deadline = time.monotonic() + timeout
    while READY not in text:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return text, "no banner after %.0f s" % timeout
        readable, _, _ = select.select([fd], [], [], min(remaining, 0.2))
        chunk = None
        if readable:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
        if chunk:
            text += chunk
            continue
        if chunk == b"":                       # stdout closed: it is exiting, if not gone
            try:
                proc.wait(timeout=min(2.0, max(remaining, 0.1)))
            except subprocess.TimeoutExpired:
                return text, "it closed its stdout"
        if proc.poll() is not None:
            return text, "it exited with status %s" % proc.returncode
    return text, None


def parse_ports(text):
    """(client port, app port) from a banner, or None if it lacks either line."""
    banner = text.decode(errors="replace")
    client = re.search(r"client port +https?://\S*:(\d+)", banner)   # https: TLS
    app = re.search(r"app port +http://\S*:(\d+)", banner)
    if client is None or app is None:
        return None
    return int(client.group(1)), int(app.group(1))


def read_from(log, offset):
    """The text of a log (a path or an open binary file) from offset on."""
    try:
        if isinstance(log, (str, bytes, os.PathLike)):
            with open(log, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        log.flush()
        log.seek(offset)
        return log.read().decode(errors="replace")
    except (OSError, ValueError) as e:
        return "(the log could not be read: %s)" % e


def children_of(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def stop(proc, grace=STOP_GRACE, group=False):
    """SIGTERM the supervisor (it stops its workers), SIGKILL it after ``grace`` seconds, then
    SIGKILL whichever of its workers is left, by pid; with ``group``, also the process group
    the supervisor leads (start_new_session=True made it: it is nobody else's)."""
    workers = children_of(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            workers += children_of(proc.pid)
            proc.kill()
            proc.wait(timeout=5)
    for pid in set(workers):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if proc.stdout is not None:
        proc.stdout.close()


if __name__ == "__main__":
    # A manual check: start the clone's server on free ports, print the banner, stop it.
    started = launch([sys.executable, MEGACOMET],
                     ["--workers", 1, "--host", "127.0.0.1", "--port", 0, "--app-port", 0,
                      *sys.argv[1:]])
    print(started.banner, end="")
    print("launch: client %d, app %d" % (started.client, started.app))
    stop(started.proc)


def accepts(port, host="127.0.0.1"):
    """Does something accept connections on (host, port) now?"""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False

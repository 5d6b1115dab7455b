"""The package as its users get it (issue 9 and the move into ``megacomet/``), end to end.

``pip install .`` adds one top-level name, ``megacomet``, and nothing else.  The
browser client and the demo page (package data, megacomet/static/) are served,
byte for byte, by a server run every way one can be run: from the clone
(``python3 megacomet.py``, ``python3 -m megacomet``), from a virtual
environment's install, from a ``pip install --user``, from the single-file
.pyz, and by the console command of the development install.  Each run of an
install proves which copy of the package it imported (``-v``/PYTHONVERBOSE
names every file imported): the installed one, never the clone's.  A user's own
``config.py``, ``server.py``, ... beside them do not shadow the package's modules.

Real processes and sockets only; every server is stopped by pid.  The virtual
environment and the user install are made once for the module.
"""

import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, Server

PACKAGE = os.path.join(ROOT, "megacomet")
PAGES = {"/megacomet.js": ("megacomet.js", "application/javascript"),
         "/demo": ("demo.html", "text/html")}
PIP_TIMEOUT = 180                 # one pip run; a build may fetch setuptools and wheel first
# Not copied with the clone: VCS data, what builds and test runs leave.
NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                    ".pytest_cache", ".hypothesis", ".benchmarks", ".venv")


def run(argv, timeout=60, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          **kw)


def clean_env(**extra):
    """This environment without its PYTHON* settings (no PYTHONPATH, no PYTHONUSERBASE, ...):
    what a user's shell would give, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTHON") and k not in ("VIRTUAL_ENV", "__PYVENV_LAUNCHER__")
           and k not in ("PIP_TARGET", "PIP_PREFIX", "PIP_ROOT", "PIP_USER", "PIP_EDITABLE",
                         "PIP_REQUIRE_VIRTUALENV")}    # where pip installs is ours to say
    env.update(extra)
    return env


def static_files(package_dir):
    """The package's static files (what GET /megacomet.js and /demo must answer), by name."""
    files = {}
    for name, _ in PAGES.values():
        with open(os.path.join(package_dir, "static", name), "rb") as f:
            files[name] = f.read()
    return files


def imported_from(log):
    """The directories the server's ``megacomet`` modules were imported from, read off the
    import trace of -v / PYTHONVERBOSE=1, workers' included: "# code object from <file>"
    for files, "import 'megacomet.x' # <zipimporter object "<archive>/megacomet/">" for
    the .pyz's."""
    dirs = set()
    for path in re.findall(r"^# code object from '?([^'\n]+?)'?$", log, re.M):
        parts = path.replace(os.sep, "/").split("/")
        if "__pycache__" in parts:                        # <package>/__pycache__/<module>.pyc
            parts = parts[:parts.index("__pycache__")] + ["-"]
        if len(parts) >= 2 and parts[-2] == "megacomet":
            dirs.add(os.path.realpath("/".join(parts[:-1])))
    for module, where in re.findall(r"^import '(megacomet(?:\.\w+)?)' # <zipimporter object \"([^\"]+)\">",
                                    log, re.M):
        where = where.rstrip("/")
        dirs.add(os.path.realpath(where if "." in module else where + "/megacomet"))
    return dirs


def assert_serves_static(server, expected):
    """GET /megacomet.js and /demo on the client port answer the package's files, bytes equal."""
    for path, (name, content_type) in PAGES.items():
        try:
            status, headers, body = server.request("GET", path, port=server.client, timeout=5)
        except TimeoutError:           # without the file, /megacomet.js is a compat poll: it waits
            raise AssertionError("GET %s got no answer in 5 s: static/%s is not served"
                                 % (path, name)) from None
        assert status == 200, (path, status, body[:200])
        assert headers["Content-Type"].startswith(content_type), (path, headers)
        assert body == expected[name], "%s is not static/%s (%d bytes, not %d)" % (
            path, name, len(body), len(expected[name]))


def assert_imported_only(server, package_dir):
    """Every megacomet module the server (supervisor and workers) imported came from
    ``package_dir``: none from the clone, unless that is the clone."""
    dirs = imported_from(server.stderr())
    assert dirs == {os.path.realpath(package_dir)}, \
        "megacomet imported from %s, expected only %s" % (sorted(dirs), package_dir)


def can_build_wheels(python):
    """Whether ``python``'s own setuptools can build a wheel (setuptools 70.1+ has bdist_wheel,
    older ones need the wheel package), so that pip needs no index to build ours."""
    code = ("import importlib.util as u, sys\n"
            "sys.exit(0 if u.find_spec('setuptools') and (u.find_spec('wheel') or "
            "u.find_spec('setuptools.command.bdist_wheel')) else 1)")
    return run([python, "-c", code], env=clean_env()).returncode == 0


def pip_install(python, source, *options, env):
    """``python -m pip install <source>``: the package as a user installs it from a clone.

    Offline (--no-build-isolation --no-index) when ``python``'s setuptools builds wheels by
    itself.  Python 3.11's ensurepip gives setuptools 65 without the wheel package, which
    cannot: then pip builds as ``pip install .`` does by default, in an isolated environment
    with setuptools and wheel from the index pip is configured with.  Skips if there is
    neither; fails on any other error."""
    offline = can_build_wheels(python)
    argv = [python, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check",
            "--no-warn-script-location", *options]
    if offline:
        argv += ["--no-build-isolation", "--no-index"]
    proc = run([*argv, source], timeout=PIP_TIMEOUT, env=env, cwd=os.path.dirname(source))
    if proc.returncode != 0:
        output = proc.stdout[-3000:] + proc.stderr[-3000:]
        unreachable = ("Could not find a version", "No matching distribution",
                       "Failed to establish a new connection", "Network is unreachable",
                       "Temporary failure in name resolution", "Max retries exceeded")
        if not offline and any(s in output for s in unreachable):
            pytest.skip("cannot build the package: %s's setuptools builds no wheels offline "
                        "(no wheel package) and pip found no setuptools/wheel to build with:\n%s"
                        % (python, output))
        pytest.fail("%s failed:\n%s" % (" ".join(map(str, argv)), output))
    return proc


def site_entries(site_dir):
    """Top-level names in a site-packages: no *.dist-info, no __pycache__."""
    return {e for e in os.listdir(site_dir) if not e.endswith(".dist-info") and e != "__pycache__"}


# -- installs, made once for the module -----------------------------------------------

@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The clone as a fresh checkout has it, copied: pip builds in the source tree (build/,
    megacomet.egg-info/), and the clone is where others work."""
    src = tmp_path_factory.mktemp("source") / "megacomet-src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    return src


@pytest.fixture(scope="module")
def venv(tmp_path_factory, source):
    """An empty virtual environment (pip and setuptools only), then ``pip install .`` in it."""
    path = tmp_path_factory.mktemp("venv") / "env"
    proc = run([sys.executable, "-m", "venv", path], timeout=120, env=clean_env())
    python = path / "bin" / "python"
    if proc.returncode != 0 or not python.exists():
        pytest.skip("no virtual environment with pip here (venv/ensurepip unavailable): %s"
                    % (proc.stderr[-2000:] or proc.stdout[-2000:]))
    if run([python, "-m", "pip", "--version"], env=clean_env()).returncode != 0:
        pytest.skip("the virtual environment has no pip (ensurepip unavailable)")
    where = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                env=clean_env())
    site_dir = where.stdout.strip()
    before = site_entries(site_dir)
    pip_install(python, source, env=clean_env())
    return {"path": path, "python": python, "site": site_dir, "before": before,
            "after": site_entries(site_dir), "command": path / "bin" / "megacomet"}


@pytest.fixture(scope="module")
def user_install(tmp_path_factory, source):
    """``pip install --user .`` with PYTHONUSERBASE a directory of our own: the Python's
    site-packages (where a development install may be) is never written to.  A virtual
    environment (the README's test command runs in one) sees no user site-packages, so the
    Python used is the one the environment was made from."""
    python = sys.executable
    if sys.prefix != sys.base_prefix:
        python = getattr(sys, "_base_executable", None)
        if not python or not os.access(python, os.X_OK):
            pytest.skip("no base interpreter behind this virtual environment")
    base = tmp_path_factory.mktemp("userbase")
    env = clean_env(PYTHONUSERBASE=str(base))
    where = run([python, "-c", "import site; print(site.ENABLE_USER_SITE, "
                 "site.getusersitepackages())"], env=env)
    enabled, user_site = where.stdout.split()
    if enabled != "True":
        pytest.skip("this Python has user site-packages disabled")
    assert user_site.startswith(str(base)), (user_site, base)
    pip_install(python, source, "--user", env=env)
    return {"base": base, "site": user_site, "env": env, "python": python,
            "command": base / "bin" / "megacomet"}


# -- what an install holds --------------------------------------------------------------

def test_pip_install_adds_only_the_megacomet_package(venv, source):
    added = venv["after"] - venv["before"]
    assert added == {"megacomet"}, "pip install . added top-level %s" % sorted(added)
    assert venv["before"] <= venv["after"]
    # The installed distribution's own account: its files and top-level names.
    dist_info = [e for e in os.listdir(venv["site"])
                 if e.startswith("megacomet-") and e.endswith(".dist-info")]
    assert len(dist_info) == 1, dist_info
    dist = os.path.join(venv["site"], dist_info[0])
    if os.path.exists(os.path.join(dist, "top_level.txt")):
        assert open(os.path.join(dist, "top_level.txt")).read().split() == ["megacomet"]
    record = [line.split(",")[0] for line in open(os.path.join(dist, "RECORD")) if line.strip()]
    tops = {path.split("/")[0] for path in record if not path.startswith("../")}
    assert tops == {"megacomet", dist_info[0]}, sorted(tops)
    scripts = sorted(os.path.basename(p) for p in record if p.startswith("../"))
    assert scripts == ["megacomet"], scripts                    # the console script only
    # The package with its data, not a link back to the clone.
    installed = os.path.join(venv["site"], "megacomet")
    assert not os.path.islink(installed)
    assert static_files(installed) == static_files(source / "megacomet")
    modules = {m.name for m in pkgutil.iter_modules([installed])}
    assert modules == {m.name for m in pkgutil.iter_modules([str(source / "megacomet")])}
    assert {"cli", "config", "server", "worker", "front", "__main__"} <= modules


# -- served by every way of running it ----------------------------------------------

def test_clone_megacomet_py_serves_client_and_demo(server_factory):
    expected = static_files(PACKAGE)
    server = server_factory(workers=1, command=[sys.executable, os.path.join(ROOT, "megacomet.py")],
                            cwd=ROOT, env=clean_env(PYTHONVERBOSE="1"))
    assert_serves_static(server, expected)
    assert_imported_only(server, PACKAGE)


def test_clone_python_m_megacomet_serves_client_and_demo(server_factory):
    expected = static_files(PACKAGE)
    server = server_factory(workers=1, command=[sys.executable, "-m", "megacomet"], cwd=ROOT,
                            env=clean_env(PYTHONVERBOSE="1"))
    assert_serves_static(server, expected)
    assert_imported_only(server, PACKAGE)        # the package, not the clone's megacomet.py


def test_venv_console_script_serves_its_own_copy(venv, source, server_factory, tmp_path):
    assert venv["command"].exists(), "pip install . made no console script megacomet"
    installed = os.path.join(venv["site"], "megacomet")
    server = server_factory(workers=1, command=[venv["command"]], cwd=str(tmp_path),
                            env=clean_env(PYTHONVERBOSE="1"))
    assert_serves_static(server, static_files(source / "megacomet"))
    assert_imported_only(server, installed)


def test_user_install_serves_its_own_copy(user_install, source, server_factory, tmp_path):
    installed = os.path.join(user_install["site"], "megacomet")
    # The import a user's shell (this environment) resolves: the user site's copy, ahead of
    # the development install's finder that points at the clone.
    where = run([user_install["python"], "-c", "import megacomet; print(megacomet.__file__)"],
                env=user_install["env"], cwd=str(tmp_path))
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip() == os.path.join(installed, "__init__.py"), where.stdout
    assert user_install["command"].exists(), "pip install --user made no console script"
    server = server_factory(workers=1, command=[user_install["command"]], cwd=str(tmp_path),
                            env={**user_install["env"], "PYTHONVERBOSE": "1"})
    assert_serves_static(server, static_files(source / "megacomet"))
    assert_imported_only(server, installed)
    # The development install is as it was: the user install shadows it, never replaces it.
    dev = run([sys.executable, "-c", "import megacomet; print(megacomet.__file__)"],
              env=clean_env(), cwd=ROOT)
    assert dev.stdout.strip() == os.path.join(PACKAGE, "__init__.py"), dev.stdout


def test_pyz_runs_alone_in_an_empty_directory(tmp_path):
    expected = static_files(PACKAGE)
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
    # -I: no user site, no PYTHONPATH, no script directory: only the archive.  -v: the import
    # trace says where each module came from (this Python's development install of megacomet
    # is still on its path, behind the archive).
    env = {"PATH": os.environ["PATH"]}
    server = Server(workers=2, command=[sys.executable, "-I", "-v", str(pyz)], cwd=str(host),
                    env=env)
    server.start()
    try:
        for i in range(4):                           # both workers, forked from the archive
            round_trip(server, "pyz%d" % i)
        assert all(server.worker_pids())
        assert_serves_static(server, expected)
        assert_imported_only(server, os.path.join(pyz, "megacomet"))
    finally:
        server.stop()
    assert os.listdir(host) == ["megacomet.pyz"]     # it wrote nothing beside itself


def test_console_command_from_pip_install():
    """The development install's console command (python -m pip install -e '.[test]'): the
    one beside this interpreter (the README's .venv/bin/megacomet: .venv/bin need not be on
    PATH), else the one on PATH."""
    command = os.path.join(os.path.dirname(sys.executable), "megacomet")
    if not os.access(command, os.X_OK):
        command = shutil.which("megacomet")
    if command is None:
        pytest.skip("the package is not installed (python -m pip install -e '.[test]')")
    server = Server(workers=1, command=[command])
    server.start()
    try:
        round_trip(server, "console")
        assert_serves_static(server, static_files(PACKAGE))
    finally:
        server.stop()


def test_own_modules_in_the_working_directory_do_not_shadow_the_package(server_factory, tmp_path):
    """``python3 -m megacomet`` puts the working directory first on sys.path: a user's own
    config.py (or server.py, worker.py, ... any name of ours) there must never be imported."""
    names = sorted({m.name for m in pkgutil.iter_modules([PACKAGE])} - {"__main__"})
    for name in names:
        (tmp_path / (name + ".py")).write_text(
            "open(%r, 'w').close()\n"
            "raise RuntimeError(\"the user's own %s.py was imported, not megacomet's\")\n"
            % (str(tmp_path / ("imported-" + name)), name))
    (tmp_path / "static").mkdir()                    # and not their static files either
    for name, _ in PAGES.values():
        (tmp_path / "static" / name).write_text("not megacomet's %s\n" % name)
    expected = static_files(PACKAGE)
    # PYTHONPATH: the clone, behind the working directory -m puts first.
    server = server_factory(workers=1, command=[sys.executable, "-m", "megacomet"],
                            cwd=str(tmp_path), env=clean_env(PYTHONPATH=ROOT, PYTHONVERBOSE="1"))
    round_trip(server, "shadow")
    assert_serves_static(server, expected)
    assert_imported_only(server, PACKAGE)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("imported-")]
    assert "the user's own" not in server.stderr()


def round_trip(server, ident):
    seq = server.pub(ident, "hello from %s" % ident)
    status, _, body = server.sub(ident, since=seq - 1, wait=5)
    assert status == 200 and json.loads(body)["messages"][0]["data"] == "hello from %s" % ident

"""Build dist/megacomet.pyz: the whole server in one file to copy onto a host.

    python tools/build_pyz.py [-o dist/megacomet.pyz]
    scp dist/megacomet.pyz host: && ssh host ./megacomet.pyz --workers 8

The archive holds the server's modules (and its static files, once it has
any) and a __main__ that runs the command line, behind a
``#!/usr/bin/env python3`` line.  Workers are forked from the supervisor, so
they run from the archive too: nothing else is needed on the host but
Python 3.11+.  It must never pack tests, tools or anything outside
SERVER_MODULES, and never depend on the build machine's site-packages.
"""

import argparse
import os
import shutil
import sys
import tempfile
import zipapp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_MODULES = ("megacomet.py", "worker.py", "shmqueue.py", "wire.py", "signing.py", "logs.py",
                  "hostcheck.py")
MAIN = '''import sys
import megacomet
sys.exit(megacomet.main())
'''


def build(output):
    with tempfile.TemporaryDirectory() as staging:
        for name in SERVER_MODULES:
            shutil.copy2(os.path.join(ROOT, name), staging)
        with open(os.path.join(staging, "__main__.py"), "w") as f:
            f.write(MAIN)
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        zipapp.create_archive(staging, output, interpreter="/usr/bin/env python3", compressed=True)
    return output


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the single-file server archive.")
    p.add_argument("-o", "--output", default=os.path.join(ROOT, "dist", "megacomet.pyz"))
    args = p.parse_args(argv)
    path = build(args.output)
    print("%s: %d bytes" % (path, os.path.getsize(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build dist/megacomet.pyz: the whole server in one file to copy onto a host.

    python tools/build_pyz.py [-o dist/megacomet.pyz]
    scp dist/megacomet.pyz host: && ssh host ./megacomet.pyz --workers 8

The archive holds the server's modules, its static files (the browser client
and demo page) and a __main__ that runs the command line, behind a
``#!/usr/bin/env python3`` line.  Workers are forked from the supervisor, so
they run from the archive too: nothing else is needed on the host but
Python 3.11+.  It must never pack tests, tools or anything outside
setup.cfg's py_modules, and never depend on the build machine's site-packages.
"""

import argparse
import configparser
import os
import shutil
import sys
import tempfile
import zipapp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def server_modules():
    """The server's module files: setup.cfg's py_modules, the one list of them."""
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    return [name + ".py" for name in parser["options"]["py_modules"].split()]


MAIN = '''import sys
import megacomet
sys.exit(megacomet.main())
'''


def build(output):
    with tempfile.TemporaryDirectory() as staging:
        for name in server_modules():
            shutil.copy2(os.path.join(ROOT, name), staging)
        shutil.copytree(os.path.join(ROOT, "static"), os.path.join(staging, "static"))
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

"""Build dist/megacomet.pyz: the whole server in one file to copy onto a host.

    python tools/build_pyz.py [-o dist/megacomet.pyz]
    scp dist/megacomet.pyz host: && ssh host ./megacomet.pyz --workers 8

The archive holds the ``megacomet`` package (its modules and its static
files: the browser client and demo page) and a ``__main__`` that runs the
package's own ``__main__``, behind a ``#!/usr/bin/env python3`` line.  Workers
are forked from the supervisor, so they run from the archive too: nothing
else is needed on the host but Python 3.11+.  It must never pack tests, tools
or anything outside the package, and never depend on the build machine's
site-packages.
"""

import argparse
import os
import shutil
import sys
import tempfile
import zipapp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


PACKAGE = os.path.join(ROOT, "megacomet")
MAIN = "import runpy\nrunpy.run_module('megacomet', run_name='__main__')\n"


def build(output):
    with tempfile.TemporaryDirectory() as staging:
        shutil.copytree(PACKAGE, os.path.join(staging, "megacomet"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
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

#!/usr/bin/env python3
"""Run MegaComet from a clone: ``python3 megacomet.py --workers 8``.

The server is the ``megacomet`` package beside this file; this is only its
command line's door (``python3 -m megacomet`` is the same).
"""

import sys

from megacomet.cli import main

if __name__ == "__main__":
    sys.exit(main())

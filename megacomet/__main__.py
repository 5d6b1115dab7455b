"""``python3 -m megacomet``, and the entry point of the single-file ``megacomet.pyz``."""

import sys

from megacomet.cli import main

sys.exit(main())

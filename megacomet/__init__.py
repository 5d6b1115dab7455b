"""MegaComet: a comet (long-poll, EventSource, WebSocket) push server of pre-forked epoll
workers that share routing and message queues through shared memory.

The package's modules, in the order a request meets them, are listed in the
README ("How it works").  ``cli`` is the command line and the supervisor;
``python3 -m megacomet`` and the top-level ``megacomet.py`` of a clone both
run ``cli.main``.  This file must stay free of imports of the package's own
modules: the supervisor imports it once and never again, reloads included.
"""

import pkgutil

# What old and new workers must agree on while both run during a graceful reload (SIGHUP):
# the shared memory's layout, the records they send each other, the settings the supervisor
# hands them, and the supervisor itself.  A change to one of these needs a full restart.
NOT_RELOADED = ("__main__", "cli", "config", "records", "shmqueue")


def reloadable_modules():
    """The package's modules a reload imports afresh from disk: every one not in NOT_RELOADED."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in NOT_RELOADED)

"""Log lines: one per event, on stderr, with a timestamp, who wrote it and a level.

Text (the default) for people, ``--log-format json`` (one object a line)
for log shippers.  Each line is one ``os.write`` of stderr, so lines from
the supervisor and the workers never interleave mid-line.  This module
never buffers, never raises on a closed stderr and never rate-limits: a
caller that logs because of a request must bound itself (the worker does).
"""

import json
import os
import time

FORMATS = ("text", "json")
_format = "text"


def configure(fmt):
    global _format
    if fmt not in FORMATS:
        raise ValueError("log format must be one of %s" % ", ".join(FORMATS))
    _format = fmt


def write(level, message, worker=None):
    """Write one line; ``worker`` is the worker index, None for the supervisor."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".%03dZ" % (now % 1 * 1000)
    pid = os.getpid()
    if _format == "json":
        record = {"ts": stamp, "level": level, "pid": pid, "msg": message}
        if worker is not None:
            record["worker"] = worker
        line = json.dumps(record, ensure_ascii=False)
    elif worker is None:
        line = "%s megacomet[supervisor pid %d] %s: %s" % (stamp, pid, level, message)
    else:
        line = "%s megacomet[worker %d pid %d] %s: %s" % (stamp, worker, pid, level, message)
    try:
        os.write(2, line.encode("utf-8", "replace") + b"\n")
    except OSError:
        pass

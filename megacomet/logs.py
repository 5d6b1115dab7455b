"""Log lines: one per event, on stderr, with a timestamp, who wrote it and a level.

Text (the default) for people, ``--log-format json`` (one object a line)
for log shippers.  Each line is one ``os.write`` of stderr, so lines from
the supervisor and the workers never interleave mid-line.  A message of
several lines (a traceback) stays one line: text escapes its line breaks
and other control characters (``\\n``, ``\\x1b``), JSON escapes them in the
string, so no message can split its entry or forge another.  This module
never buffers, never raises on a closed stderr and never rate-limits: a
caller that logs because of a request must bound itself (the worker does).
"""

import json
import os
import time

FORMATS = ("text", "json")
_format = "text"

# What could end or break a line: the C0 controls but tab, DEL, and what str.splitlines also
# splits on (NEL, LINE and PARAGRAPH SEPARATOR).  Text writes them escaped.
_BREAKS = [c for c in range(0x20) if c != 0x09] + [0x7F, 0x85, 0x2028, 0x2029]
_TEXT_ESCAPES = {c: repr(chr(c))[1:-1] for c in _BREAKS}
# json.dumps(ensure_ascii=False) escapes the C0 controls but leaves these raw (legal JSON, but
# some line splitters break on them); they only occur inside a string, where \uXXXX is the same.
_JSON_ESCAPES = {c: "\\u%04x" % c for c in (0x85, 0x2028, 0x2029)}


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
        line = json.dumps(record, ensure_ascii=False).translate(_JSON_ESCAPES)
    elif worker is None:
        line = "%s megacomet[supervisor pid %d] %s: %s" % (stamp, pid, level,
                                                           message.translate(_TEXT_ESCAPES))
    else:
        line = "%s megacomet[worker %d pid %d] %s: %s" % (stamp, worker, pid, level,
                                                          message.translate(_TEXT_ESCAPES))
    try:
        os.write(2, line.encode("utf-8", "replace") + b"\n")
    except OSError:
        pass

#!/usr/bin/env python3
"""scale: how MegaComet's costs grow with the number of held long-polls.

For each size it starts a fresh ``megacomet.py --workers W`` on free loopback
ports and opens that many long-polls (each on an id of its own, spread over
as many load-generator processes and loopback source addresses as the fd
and port limits need) and holds them: memory and CPU per connection.  Then,
on another fresh server, the same again, and one message published to every
one of them (batch API), each checked to arrive exactly once: CPU per
delivery and the time until the last arrived.  It prints one table:

    held  workers  PSS B/conn  kernel slab B/conn  CPU us/conn  CPU us/delivery
    time to all s  latency max ms  deliveries/s  not exactly once

    python tools/scale.py                                  # 10k, 50k, 150k, 300k; 16 workers
    python tools/scale.py --sizes 10000,100000,300000,1000000 --workers auto
    python tools/scale.py --sizes 10000,50000 --workers 8 --json scale.json

Flat columns are the goal: what one held connection or one delivery costs
should not depend on how many others there are.  The server gets the
--max-ids its n ids need and --poll-timeout 600 (see POLL_TIMEOUT); with
--workers auto each size gets the workers the 20 000 open files per process
call for.  Loopback keeps both ends of every connection in one kernel: about
10 KB of slab per connection, so 1 000 000 need about 10 GB besides the
load generator's processes; run `python3 megacomet.py check --connections N
--workers W` first and apply the sysctls it names.  It is a tool, not a test
(tests/test_tools.py runs a small size once).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megacomet import shmqueue  # noqa: E402

SIZES = (10000, 50000, 150000, 300000)
# Seconds a poll is held without news.  Every held poll answered at its timeout polls again:
# n / timeout re-polls a second, each costing about what a delivery does.  At 1 000 000
# with the server's default 30 s that is 33 000/s, more than this 2-core box serves, and
# the runs would measure the re-polls; a real deployment sets it by the same sum.
POLL_TIMEOUT = 600
PER_WORKER = 16000       # --workers auto: connections per worker at most


def workers_for(n, workers):
    """The --workers for n held connections: a number, or 'auto' (see PER_WORKER)."""
    if workers != "auto":
        return int(workers)
    needed = -(-n // PER_WORKER)
    return min(shmqueue.MAX_WORKERS, max(8, (needed + 7) // 8 * 8))


def workers_arg(text):
    if text == "auto" or (text.isdigit() and 1 <= int(text) <= shmqueue.MAX_WORKERS):
        return text
    raise argparse.ArgumentTypeError("a number of workers (1..%d) or 'auto'"
                                     % shmqueue.MAX_WORKERS)


COLUMNS = (("held", ("phases", "hold", "opened")),
           ("workers", ("workers",)),
           ("PSS B/conn", ("phases", "hold", "pss_bytes_per_connection")),
           ("kernel slab B/conn", ("phases", "hold", "kernel_slab_bytes_per_connection")),
           ("CPU us/conn", ("phases", "hold", "cpu_us_per_connection")),
           ("CPU us/delivery", ("phases", "deliver_batch", "cpu_us_per_delivery")),
           ("time to all s", ("phases", "deliver_batch", "span_s")),
           ("latency max ms", ("phases", "deliver_batch", "latency_ms", "max")),
           ("deliveries/s", ("phases", "deliver_batch", "deliveries_per_s")),
           ("not exactly once", ("phases", "deliver_batch", "not_exactly_once")))


def run_size(n, workers, workdir, duration, verbose, poll_timeout=POLL_TIMEOUT):
    """Hold n long-polls (memory, CPU per connection), then, on a fresh server, n again and
    one message to each (CPU per delivery, time to all): one record with both phases."""
    record = {"phases": {}, "problems": [], "workers": workers}
    for mode, size, extra in (("hold", {"n": n, "hold": 2}, ()),
                              ("deliver", {"n": n}, ("--publish", "batch"))):
        # Every connection subscribes to an id of its own: the table must let subscribers
        # create n ids (what `megacomet.py check --connections n` asks for).
        max_ids = max(shmqueue.DEFAULT_MAX_IDS, shmqueue.max_ids_for(n, workers))
        server = bench.Server("megacomet", workdir, workers,
                              flags=["--max-ids", str(max_ids),
                                     "--poll-timeout", str(poll_timeout)])
        server.start()
        try:
            rec = bench.run_megatest(server, mode, size, workdir, duration, verbose,
                                     extra=extra + ("--poll-timeout", str(poll_timeout)),
                                     tag="scale-%d-%s" % (n, mode))
        finally:
            server.stop()
        bench.annotate(rec)
        record["phases"].update(rec.get("phases", {}))
        record["problems"] += rec.get("problems", [])
    return record


def table(records):
    rows = [[name for name, _ in COLUMNS]]
    for rec in records:
        rows.append([bench.fmt(bench.g(rec, *path)) for _, path in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths))
                     for row in rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)),
                    help="comma list of held connections")
    ap.add_argument("--workers", default="16", type=workers_arg,
                    help="worker processes, or 'auto': per size, the smallest multiple of 8 "
                         "that keeps each worker under %d connections (the 20 000 open "
                         "files per process)" % PER_WORKER)
    ap.add_argument("--duration", type=float, default=600, help="cap per size in seconds")
    ap.add_argument("--poll-timeout", type=int, default=POLL_TIMEOUT,
                    help="the server's --poll-timeout (default %(default)s s: see POLL_TIMEOUT)")
    ap.add_argument("--json", metavar="FILE", help="write the records and the table")
    ap.add_argument("--workdir", help="keep logs and records here (default: a temp dir)")
    ap.add_argument("--verbose", "-v", action="store_true", help="show megatest progress")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    workdir = args.workdir or tempfile.mkdtemp(prefix="megascale-")
    os.makedirs(workdir, exist_ok=True)
    started = time.monotonic()
    records = []
    for n in sizes:
        workers = workers_for(n, args.workers)
        bench.log("scale: %d held, %d workers" % (n, workers))
        records.append(run_size(n, workers, workdir, args.duration, args.verbose,
                                args.poll_timeout))
    text = table(records)
    print("\nMegaComet scaling (--workers %s, %d cores): one message to every held long-poll"
          % (args.workers, os.cpu_count()))
    print(text)
    problems = [p for rec in records for p in rec.get("problems", [])]
    for problem in problems:
        print("  - " + problem)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tool": "scale", "workers": args.workers, "sizes": sizes,
                       "elapsed_s": round(time.monotonic() - started, 1), "table": text,
                       "records": records}, f, indent=1)
    bench.log("scale: %.0f s; logs in %s" % (time.monotonic() - started, workdir))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

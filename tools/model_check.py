#!/usr/bin/env python3
"""model_check: the reference-model test of the subscription semantics, run for longer.

The same Hypothesis state machine as tests/test_model.py (tests/refmodel.py is the model)
drives one live server (2 workers, --queue-ttl 3, --max-ids 64, --max-queued 6, run from a
copy of the package taken at the start) for --seconds, examples after examples with more
steps each, and prints how many steps ran and every violation found, each kind once in full
with the history of its id.  Exit status 1 if any.

    python tools/model_check.py                     # ten minutes
    python tools/model_check.py --seconds 120 --seed 7 --verbose
    python tools/model_check.py --code /tmp/other-checkout   # another version of the server
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from test_model import Harness, format_violations, run_machine  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=600, help="how long to run (default 600)")
    p.add_argument("--seed", type=int, default=0, help="Hypothesis seed of the first batch of "
                   "examples; each later batch uses the next (default 0)")
    p.add_argument("--steps", type=int, default=30, help="steps per example (default 30)")
    p.add_argument("--examples", type=int, default=5, help="examples per batch (default 5)")
    p.add_argument("--ttl", type=float, default=3.0, help="--queue-ttl of the server (default 3)")
    p.add_argument("--max-ids", type=int, default=64, help="--max-ids of the server (default 64)")
    p.add_argument("--max-queued", type=int, default=6,
                   help="--max-queued of the server (default 6)")
    p.add_argument("--code", default=ROOT, help="directory with megacomet.py and the package "
                   "(default: this checkout); copied at the start")
    p.add_argument("--no-epoch-pairs", action="store_true", help="clients never send "
                   "epoch=a:E1,b:E2 (one number or none): for servers from before per-id epochs")
    p.add_argument("--verbose", action="store_true", help="print every step and violation as it comes")
    args = p.parse_args(argv)

    started = time.monotonic()
    log = (lambda text: print("%7.1f %s" % (time.monotonic() - started, text), flush=True)) \
        if args.verbose else None
    h = Harness(ttl=args.ttl, max_ids=args.max_ids, max_queued=args.max_queued, code=args.code,
                deadline=started + args.seconds, log=log,
                epoch_pairs=not args.no_epoch_pairs).start()
    batch = 0
    try:
        while not h.out_of_time():
            run_machine(h, max_examples=args.examples, steps=args.steps, seed=args.seed + batch)
            batch += 1
            for v in h.new_violations():
                print("violation (%.0f s): %s" % (time.monotonic() - started, v.report(limit=0)
                                                  if not args.verbose else v.report()), flush=True)
    finally:
        h.stop()
    elapsed = time.monotonic() - started
    violations = h.model.violations
    print("model_check: %d steps in %d examples (%d batches, seeds %d..%d), %d model events, "
          "%d refusals, %.0f s" % (h.steps, h.examples, batch, args.seed, args.seed + batch - 1,
                                   h.model.events, h.model.refusals, elapsed))
    print("steps per rule: " + ", ".join("%s %d" % kv for kv in sorted(h.rules.items())))
    if violations:
        print("every violation:")
        for v in violations:
            print("  [%s] %s: %s" % (v.category, v.ident or "-", v.message))
        print()
        print(format_violations(violations, limit=40))
        return 1
    print("no violation")
    return 0


if __name__ == "__main__":
    sys.exit(main())

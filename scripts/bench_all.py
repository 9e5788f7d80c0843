#!/usr/bin/env python
"""Run every benchmark under scripts/, then regenerate README.md's figures and benchmarks/REPORT.md from their
JSON summaries (scripts/report.py).

    python scripts/bench_all.py                 # run all, then the report
    python scripts/bench_all.py --only batch    # run some
    python scripts/bench_all.py --report-only   # only regenerate from benchmarks/*.json
"""

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["model", "formats", "tag", "serve", "client", "failover", "events", "priority", "deletes", "backfill", "batch", "index",
         "filters", "shards", "train", "rollout", "drift"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=ORDER)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        for name in args.only or ORDER:
            print(f"== bench_{name}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, str(ROOT / "scripts" / f"bench_{name}.py")], check=True)
    if not args.report_only and (args.only is None or "model" in args.only):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_backends.py")], check=True)
    import report

    sys.argv = [sys.argv[0]]
    report.main()


if __name__ == "__main__":
    main()

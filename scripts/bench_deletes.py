#!/usr/bin/env python
"""Delete -> gone on the demo setup: how long after an image is deleted from the bucket the service stops returning
it. Writes benchmarks/deletes.json.

Runs `lens demo` (moto's S3/SQS, a local Ray, the Serve app with the event consumer and a searcher whose delta feed
polls every 1 s, as the demo configures it) with --deletes N: N of the uploaded images are deleted from the bucket
one after another, and each is timed from its DeleteObject until its id lookup answers 404 (the S3 ObjectRemoved
event -> SQS -> the consumer's tombstone part -> the searcher's delta feed). The demo then checks no image search
returns them and every sidecar says ``deleted``. The same path's freshness for an addition is the demo's
``searchable_in_s``, recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=60, help="augmented images seeded for the index")
    ap.add_argument("--uploads", type=int, default=40, help="images uploaded through the event path")
    ap.add_argument("--deletes", type=int, default=30, help="of those, deleted again")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "deletes.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lens-bench-deletes-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    p = subprocess.run([sys.executable, "-m", "lens.cli.main", "demo", "--images", str(args.images), "--new-images",
                        str(args.uploads), "--deletes", str(args.deletes), "--workdir", str(work / "demo"),
                        "--port", "0", "--no-dashboard"], capture_output=True, text=True, env=env, cwd=work,
                       timeout=1200)
    if p.returncode != 0:
        sys.exit(f"lens demo failed ({p.returncode}):\n{p.stderr[-4000:]}")
    s = json.loads(p.stdout.strip().splitlines()[-1])
    sys.path.insert(0, str(ROOT / "scripts"))
    from machine import describe

    out = {"machine": describe(), "setup": "lens demo: moto S3/SQS, local Ray, Serve app with the event consumer; "
           "searcher refresh_s 1.0", "uploads": args.uploads, "deletes": s["deletes"],
           "add_searchable_in_s": s["events"]["searchable_in_s"], "refresh_s": 1.0}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

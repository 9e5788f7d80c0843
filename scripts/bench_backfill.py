#!/usr/bin/env python
"""Backfill at bulk speed: `lens events backfill` against `lens embed` on the same objects. Writes
benchmarks/backfill.json.

Both read the same camera-size JPEGs from one prefix of moto's S3 (on loopback, started here; on 2 cores its server
takes CPU from both jobs alike), on a local Ray of this machine's CPUs, with the same model (the embedded
EfficientNet-Lite0, the backend `auto` picks). `lens embed` reads the prefix as an image folder and writes embedding
shards; the backfill lists the prefix and the sidecars, then writes a sidecar per image (a conditional PUT) and
embedding parts: the event path's outputs. Rates are over each job's own run (images / seconds from the first
batch handed to Ray Data to the last result), and the whole command's time is recorded beside them; the jobs
alternate for --rounds rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "backfill.json"))
    args = ap.parse_args()

    import boto3

    from bench_serve import free_port
    from lens.cli.events import start_local_aws
    from lens.runtime.samples import augmented_jpegs

    endpoint = start_local_aws(free_port())
    s3 = boto3.client("s3")
    work = Path(tempfile.mkdtemp(prefix="lens-bench-backfill-"))
    env = os.environ | {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "AWS_ENDPOINT_URL": endpoint}
    env.pop("RAY_ADDRESS", None)
    rounds = []
    data = [d for _, d, _ in augmented_jpegs(args.images, seed=2024, long_side=(1600, 2400))]
    for r in range(args.rounds):
        tag = uuid.uuid4().hex[:8]
        bucket, results = f"bench-{tag}", f"bench-res-{tag}"
        s3.create_bucket(Bucket=bucket)
        s3.create_bucket(Bucket=results)
        for i, d in enumerate(data):
            s3.put_object(Bucket=bucket, Key=f"photos/{i:05d}.jpg", Body=d)
        t = time.perf_counter()
        e = subprocess.run([sys.executable, "-m", "lens.cli.main", "embed", "--input", f"s3://{bucket}/photos/",
                            "--output", f"s3://{results}/embed-{r}/"], capture_output=True, text=True, env=env,
                           timeout=3600)
        embed_whole = time.perf_counter() - t
        if e.returncode != 0:
            sys.exit(f"lens embed failed:\n{e.stderr[-3000:]}")
        embed = json.loads(e.stdout.strip().splitlines()[-1])
        conf = work / f"events-{r}.json"
        conf.write_text(json.dumps({"applications": [
            {"name": "lens", "route_prefix": "/", "import_path": "lens.serve.app:build_app", "args": {}},
            {"name": "lens-events", "route_prefix": None, "import_path": "lens.serve.events.app:build_events_app",
             "args": {"events": {"bucket": bucket, "results_bucket": results}}}]}))
        t = time.perf_counter()
        b = subprocess.run([sys.executable, "-m", "lens.cli.main", "events", "--config", str(conf), "backfill",
                            f"s3://{bucket}/photos/"], capture_output=True, text=True, env=env, timeout=3600)
        backfill_whole = time.perf_counter() - t
        if b.returncode != 0:
            sys.exit(f"lens events backfill failed:\n{b.stderr[-3000:]}")
        back = json.loads(b.stdout.strip().splitlines()[-1])
        assert back["outcomes"].get("tagged") == args.images, back
        rounds.append({"embed_images_per_s": embed["images_per_s"], "embed_whole_s": round(embed_whole, 2),
                       "embed_backend": embed.get("served", {}).get("backend"),
                       "backfill_images_per_s": back["images_per_s"], "backfill_whole_s": round(backfill_whole, 2),
                       "backfill_backend": back["backend"], "backfill_outcomes": back["outcomes"]})
        print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in ("embed_images_per_s", "backfill_images_per_s",
                                                                  "embed_whole_s", "backfill_whole_s")}
    ratio = round(med["backfill_images_per_s"] / med["embed_images_per_s"], 3)
    from machine import describe

    out = {"machine": describe(), "images": args.images, "rounds": rounds, "median": med,
           "ratio_backfill_vs_embed": ratio,
           "ratio_whole_command": round(med["embed_whole_s"] / med["backfill_whole_s"], 3),
           "targets": {"backfill >= 0.8x lens embed on the same objects": ratio >= 0.8}}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark a sharded index against one index over the same vectors; prints JSON, writes benchmarks/shards.json.

Seeded clustered 1280-d vectors (1M by default; scripts/bench_index.py's generator), written as embedding parts,
then `lens index build --index ivf-flat` with --shards 1 and --shards 2 (the shards filled in parallel Ray tasks on
this machine's local Ray). For each: build time, bytes per shard, tuned nprobe, recall@10 on 200 held-out queries
(never indexed) against exact search, and queries/s at batch 1 and 64 through the same search path (a sharded
version searched as one: every shard, top-k merged). Both share the seed, so the coarse quantizer is trained on the
same sample. On one machine sharding buys memory per process, not speed: the figures say what it costs.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from machine import describe  # noqa: E402 - the benchmarks' machine record (scripts/machine.py)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="50k rows")
    args = ap.parse_args()
    rows = 50_000 if args.quick else args.rows

    from bench_index import MODEL, clustered, qps, write_parts
    from lens.index.build import BuildConfig, build_index
    from lens.index.search import SearchService

    out = {"machine": describe(), "rows": rows, "dim": 1280,
           "queries": "200 held out, same distribution, never indexed", "builds": {}}
    with tempfile.TemporaryDirectory(prefix="lens-bench-shards-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        x = clustered(rows + 200, 1280, seed=0)
        x, q = x[:rows], x[rows:]
        ids = [f"v{i}" for i in range(rows)]
        write_parts(tmp / "emb", ids, x, MODEL)
        truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
        del x
        out["generate_s"] = round(time.perf_counter() - t0, 1)
        for shards in (1, 2):
            t0 = time.perf_counter()
            m = build_index(BuildConfig(embeddings=[str(tmp / "emb")], output=str(tmp / f"idx{shards}"),
                                        index="ivf-flat", memory_budget="1000GB", shards=shards, queries=300),
                            log=lambda s: print(s, file=sys.stderr))
            build_s = time.perf_counter() - t0
            svc = SearchService(str(tmp / f"idx{shards}"), mmap=False)
            # ids are v0..vN-1: map result rows to source ranks for the recall against exact search
            rank = np.array([int(i[1:]) for i in svc.version.ids])
            found_ok = recall_ranked(svc, q, truth, rank)
            vdir = Path(m["path"])
            sizes = sorted(p.stat().st_size for p in vdir.rglob("index.faiss"))
            out["builds"][str(shards)] = {
                "factory": m["factory"], "build_s": round(build_s, 1), "shard_index_bytes": sizes,
                "bytes_per_vector": round(sum(sizes) / rows, 1), "tuned": m["search"],
                "recall_at_10_tuning": m["recall"]["value"], "recall_at_10": round(found_ok, 4),
                "qps_batch1": round(qps(svc, q, 1), 1), "qps_batch64": round(qps(svc, q, 64), 1)}
            print(json.dumps({shards: out["builds"][str(shards)]}), file=sys.stderr)
            del svc
    b1, b2 = out["builds"]["1"], out["builds"]["2"]
    out["ratios_2_vs_1"] = {"qps_batch1": round(b2["qps_batch1"] / b1["qps_batch1"], 3),
                            "qps_batch64": round(b2["qps_batch64"] / b1["qps_batch64"], 3),
                            "build_s": round(b2["build_s"] / b1["build_s"], 3),
                            "largest_shard_bytes": round(max(b2["shard_index_bytes"]) / max(b1["shard_index_bytes"]),
                                                         3)}
    out["targets"] = {"2 shards: held-out recall@10 within 0.01 of one index":
                      abs(b2["recall_at_10"] - b1["recall_at_10"]) <= 0.01}
    (ROOT / "benchmarks").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "shards.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def recall_ranked(svc, q: np.ndarray, truth: np.ndarray, rank: np.ndarray) -> float:
    from lens.index.build import recall_at_k
    from lens.index.store import k_factor_of, search_params

    m = svc.version.manifest
    rows = svc.version.index.search(q, 10, params=search_params(m["type"], m["search"]["value"],
                                                                k_factor=k_factor_of(m)))[1]
    return recall_at_k(np.where(rows >= 0, rank[rows], -1), truth)


if __name__ == "__main__":
    main()

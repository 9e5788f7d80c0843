#!/usr/bin/env python
"""Filtered search at 1M vectors: recall@10 against exact search over the filtered subset, queries/s against
unfiltered search, and what post-filtering the top-k would have returned. Writes benchmarks/filters.json.

The index is what `lens index build` chooses for 1M vectors that fit the memory budget (IVF-Flat, tuned to recall
0.95), built from Parquet with carried columns ``g2``, ``g10``, ``g100``, ``g1000`` (a random group of each row,
independent of where its vector lies: the hard case for filtering, no help from the clusters). Each filter
``{"gN": "0"}`` keeps 1/N of the rows: 50 %, 10 %, 1 %, 0.1 %. Held-out queries (never indexed) come from the
same clusters; every figure is over the same queries, batched as one request of all of them and one at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def clustered(n: int, dim: int, seed: int, clusters: int = 1000, noise: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "filters.json"))
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lens.index.build import BuildConfig, build_index
    from lens.index.search import SearchService

    work = Path(tempfile.mkdtemp(prefix="lens-bench-filters-"))
    model = {"model": "synthetic", "weights_sha256": "00" * 32, "embed_dim": args.dim,
             "preprocess": {"input_size": [3, 8, 8], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
                            "crop_pct": 1.0, "crop_mode": "center"}}
    t0 = time.perf_counter()
    x = clustered(args.n + args.queries, args.dim, seed=0)
    x, held = x[: args.n], x[args.n:]
    rng = np.random.default_rng(1)
    groups = {f"g{g}": rng.integers(0, g, args.n) for g in (2, 10, 100, 1000)}
    emb = work / "emb"
    emb.mkdir()
    files = []
    for i, lo in enumerate(range(0, args.n, 250_000)):
        hi = min(args.n, lo + 250_000)
        cols = {"id": [f"img-{j}" for j in range(lo, hi)],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[lo:hi].ravel()), args.dim)}
        cols |= {k: pa.array(v[lo:hi].astype(str)) for k, v in groups.items()}
        pq.write_table(pa.table(cols), emb / f"part-{i}.parquet")
        files.append(f"part-{i}.parquet")
    (emb / "manifest.json").write_text(json.dumps({"files": files, "model_identity": model,
                                                   "carry_columns": list(groups)}))
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = build_index(BuildConfig(embeddings=[str(emb)], output=str(work / "idx"), queries=500),
                    log=lambda s: print(s, file=sys.stderr, flush=True))
    build_s = time.perf_counter() - t0
    svc = SearchService(str(work / "idx"), mmap=False)
    k = 10

    def timed(fn, reps: int = 1):
        best = None
        for _ in range(reps):
            t = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        return out, best

    q = held
    _, unf_batch_s = timed(lambda: svc.search(q, k), reps=3)
    _, unf_one_s = timed(lambda: [svc.search(v[None], k) for v in q[:50]], reps=2)
    unfiltered_top = svc.search(q, 100)[1]  # for the post-filtering contrast: the unfiltered top-10 and top-100
    rows = []
    for g, values in groups.items():
        f = {g: "0"}
        sel = np.flatnonzero(values == 0)
        frac = len(sel) / args.n
        t = time.perf_counter()
        svc.search(q[:1], k, filter=f)  # the first query of a filter: its mask is computed (the columns, if first)
        first_s = time.perf_counter() - t
        (_, hits), batch_s = timed(lambda: svc.search(q, k, filter=f), reps=3)
        _, one_s = timed(lambda: [svc.search(v[None], k, filter=f) for v in q[:50]], reps=2)
        xs = x[sel]
        truth = [set(sel[np.argpartition(-(xs @ v), k)[:k]]) for v in q]
        got = [{int(h.id[4:]) for h in hs} for hs in hits]
        recall = float(np.mean([len(a & b) / k for a, b in zip(got, truth)]))
        assert all(values[int(h.id[4:])] == 0 for hs in hits for h in hs)
        post10 = [[h for h in hs[:k] if values[int(h.id[4:])] == 0] for hs in unfiltered_top]
        post100 = [[h for h in hs if values[int(h.id[4:])] == 0][:k] for hs in unfiltered_top]
        rows.append({
            "filter": f, "selectivity": round(frac, 4), "rows_selected": int(len(sel)),
            "recall_at_10": round(recall, 4),
            "qps_batch": round(len(q) / batch_s, 1), "qps_one_at_a_time": round(50 / one_s, 1),
            "vs_unfiltered_batch": round(unf_batch_s / batch_s, 3),
            "vs_unfiltered_one_at_a_time": round(unf_one_s / one_s, 3),
            "first_query_s": round(first_s, 3),
            "post_filter_top10": {"mean_results": round(float(np.mean([len(p) for p in post10])), 2),
                                  "recall_at_10": round(float(np.mean([len({int(h.id[4:]) for h in p} & t) / k
                                                                       for p, t in zip(post10, truth)])), 4)},
            "post_filter_top100": {"mean_results": round(float(np.mean([len(p) for p in post100])), 2),
                                   "recall_at_10": round(float(np.mean([len({int(h.id[4:]) for h in p} & t) / k
                                                                        for p, t in zip(post100, truth)])), 4)},
        })
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    from machine import describe

    out = {"machine": describe(), "n": args.n, "dim": args.dim, "queries": len(q), "k": k,
           "index": {"type": m["type"], "factory": m["factory"], "nlist": m["nlist"], "tuned": m["search"],
                     "recall_unfiltered": m["recall"]["value"], "build_s": round(build_s, 1),
                     "write_parquet_s": round(write_s, 1)},
           "unfiltered": {"qps_batch": round(len(q) / unf_batch_s, 1), "qps_one_at_a_time": round(50 / unf_one_s, 1)},
           "filtered": rows,
           "targets": {f"recall@10 >= 0.95 keeping 1/{g[1:]} of the rows": r["recall_at_10"] >= 0.95
                       for g, r in zip(groups, rows)}}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

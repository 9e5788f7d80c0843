#!/usr/bin/env python
"""Run every benchmark under scripts/ and write benchmarks/REPORT.md from their JSON summaries.

    python scripts/bench_all.py                 # run all (about 25 minutes on 2 cores), then the report
    python scripts/bench_all.py --only batch    # run some
    python scripts/bench_all.py --report-only   # rebuild REPORT.md from benchmarks/*.json
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
ORDER = ["model", "serve", "events", "batch", "index"]


def load(name: str) -> dict | None:
    p = BENCH / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def ok(flag: bool) -> str:
    return "met" if flag else "**not met**"


def report() -> str:
    lines = ["# Lens benchmark report", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `scripts/bench_all.py` from "
             "`benchmarks/*.json`; each figure is a ratio against a baseline measured in the same run. Machine: "
             f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, no GPU. Shared machines are noisy "
             "(±10 % run to run); re-run rather than trust one figure.", ""]
    m = load("model")
    if m:
        b = m["backends"] if "backends" in m else {}
        lines += ["## Model runtime (`bench_model.py`)", "", "```json",
                  json.dumps({k: m[k] for k in ("ratios", "targets") if k in m}, indent=2), "```", ""]
    s = load("serve")
    if s:
        lines += ["## Online tagging (`bench_serve.py`)", "", "![serve](serve.png)", "",
                  "```json", json.dumps({k: v for k, v in s.items() if k not in ("points", "curve")}, indent=2)[:4000],
                  "```", ""]
    e = load("events")
    if e:
        lines += ["## Event path (`bench_events.py`)", "", "```json", json.dumps(e, indent=2)[:3000], "```", ""]
    b = load("batch")
    if b:
        base = b["baseline_single_loop"]["images_per_s"]
        job = b["job"]
        lines += ["## Bulk embedding (`bench_batch.py`)", "",
                  f"| | images/s | ratio vs single loop ({base} images/s) |", "|---|---|---|",
                  f"| job, dataset execution ({b['rows']} rows, actor start-up included) | {job['images_per_s']} | "
                  f"{b['ratio_vs_single_loop']} |",
                  f"| job, steady state (first part to last) | {job['steady_images_per_s']} | "
                  f"{b.get('ratio_steady_state', '')} |",
                  f"| whole command incl. Ray start | {round(job['rows_run'] / job['seconds'], 1)} | "
                  f"{b['ratio_whole_job_incl_ray_start']} |"]
        runs = b.get("runs", [])
        if "job_4x_rows" in b:
            j4 = b["job_4x_rows"]
            lines += [f"| job on 4x rows ({j4['rows_run']}) | {j4['images_per_s']} | "
                      f"{b.get('ratio_4x_rows_vs_single_loop', '')} |", "",
                      f"Peak memory (RSS of driver + Ray processes): "
                      f"{b.get('peak_rss_mb_1x_min') or round(j4['peak_rss_mb'] / b['peak_memory_ratio_4x'])} MB "
                      f"(smallest of the {b['rows']}-row runs), {j4['peak_rss_mb']} MB at {j4['rows_run']} rows: "
                      f"ratio {b['peak_memory_ratio_4x']} "
                      f"(target ≤ 1.5: {ok(b['peak_memory_ratio_4x'] <= 1.5)})."]
        if len(runs) > 1:
            lines += ["", f"Target ≥ 0.8× (median of {len(runs)} alternating baseline/job pairs): "
                      f"{ok(b['ratio_vs_single_loop'] >= 0.8)}; every pair's ratio: "
                      + ", ".join(str(r["ratio"]) for r in runs) + "."]
        lines += [""]
    i = load("index")
    if i:
        syn = i["synthetic"]
        lines += ["## Similarity search (`bench_index.py`)", "", "![index](index.png)", "",
                  f"{syn['rows']} × {syn['dim']} seeded clustered vectors; recall@10 against exact search on "
                  "held-out queries.", "",
                  "| index | factory | build s | bytes/vector | tuned | recall@10 | q/s batch 1 | q/s batch 64 |",
                  "|---|---|---|---|---|---|---|---|"]
        for k, t in syn["types"].items():
            tuned = f"{t['tuned']['param']}={t['tuned']['value']}" if t["tuned"]["param"] else "exact"
            lines.append(f"| {k} | `{t['factory']}` | {t['build_s']} | {t['bytes_per_vector']} | {tuned} | "
                         f"{t['recall_at_10']} | {t['qps_batch1']} | {t['qps_batch64']} |")
        sp, mb, nd = syn["speedup_at_recall_0.95_vs_flat_batch1"], syn["memory_bound_choice"], i["near_duplicates"]
        lines += ["",
                  f"* Fastest index at recall@10 ≥ 0.95: {sp['type']}, **{sp['ratio']}×** exact Flat's queries/s at "
                  f"batch 1 (target ≥ 10×: {ok((sp['ratio'] or 0) >= 10)}).",
                  f"* Memory-bound choice (ivf-pq): {mb['bytes_ratio_vs_flat']} of Flat's bytes per vector at "
                  f"recall@10 {mb['recall_at_10']} (target ≤ 1/8 at ≥ 0.9: "
                  f"{ok(mb['bytes_ratio_vs_flat'] <= 0.125 and mb['recall_at_10'] >= 0.9)}).",
                  f"* Near-duplicates on real photos ({nd['originals']} tiles of {nd['photos']} photos): top-5 hit "
                  f"rate **{nd['top5_hit_rate']}**, top-1 {nd['top1_hit_rate']} (target ≥ 0.95: "
                  f"{ok(nd['top5_hit_rate'] >= 0.95)}).", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=ORDER)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        for name in args.only or ORDER:
            print(f"== bench_{name}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, str(ROOT / "scripts" / f"bench_{name}.py")], check=True)
    BENCH.mkdir(exist_ok=True)
    (BENCH / "REPORT.md").write_text(report())
    print(BENCH / "REPORT.md")


if __name__ == "__main__":
    main()

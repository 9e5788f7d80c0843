#!/usr/bin/env python
"""Benchmark `lens tag` as a user runs it, warm caches, int8 against fp32; prints one JSON summary, writes
benchmarks/tag.json.

Each configuration is a whole `lens tag` process (Python start, imports, model load, decode, model, output),
run in alternating rounds in the same run, after one untimed run that fills every cache (ONNX export, OpenVINO IR,
the int8 model and its accuracy gate, auto's backend measurement):

* whole run: 50 augmented crops of real photos (JPEGs, 256-800 px long side) -> images/s = 50 / wall seconds;
* start-up to the first result: one image, wall seconds from process start to its JSON line.

Configurations: `--precision int8` (OpenVINO, behind the gate), and the fp32 baselines `--backend auto` (the
faster fp32 backend measured on this machine: the strongest) and `--backend openvino` (the same runtime as int8).
Targets (issue "Right answers first", item 3): int8 whole-run rate >= 1.0x fp32's; int8 start-up to first result
<= fp32's + 0.5 s. The CPU flags are recorded: int8's gain depends on VNNI/AMX.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {"int8": ["--precision", "int8"], "fp32_auto": ["--backend", "auto"],
           "fp32_openvino": ["--backend", "openvino"]}


def run(args: list[str], env: dict) -> tuple[float, float, str]:
    """(seconds to the first JSON line, seconds to exit, stderr) of one `lens tag` process."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "lens.cli.main", "tag", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    first = p.stdout.readline()
    t_first = time.perf_counter() - t0
    rest = p.stdout.read()  # (communicate() would miss what readline already buffered)
    err = p.stderr.read()  # a few lines: it cannot fill its pipe while stdout is read
    p.wait(timeout=600)
    t_end = time.perf_counter() - t0
    if p.returncode != 0 or not first:
        raise RuntimeError(f"lens tag {' '.join(args)} failed: {err[-2000:]}")
    assert len((first + rest).splitlines()) == sum(1 for a in args if a.endswith(".jpg")), "a result is missing"
    return t_first, t_end, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "tag.json"))
    args = ap.parse_args()

    from lens.runtime.samples import augmented_jpegs

    work = Path(tempfile.mkdtemp(prefix="lens-bench-tag-"))
    env = os.environ | {"LENS_CACHE_DIR": os.environ.get("LENS_CACHE_DIR", str(work / "cache")),
                        "PYTHONPATH": str(ROOT)}
    files = []
    for i, (_, data, _) in enumerate(augmented_jpegs(args.images, seed=4242)):
        f = work / f"img-{i:03d}.jpg"
        f.write_bytes(data)
        files.append(str(f))
    served = {}
    for name, flags in CONFIGS.items():  # fill every cache; say what each configuration actually ran
        _, _, err = run([*flags, files[0]], env)
        served[name] = [line for line in err.splitlines() if line.startswith("lens tag: ")][-1]
    whole: dict[str, list[float]] = {n: [] for n in CONFIGS}
    first: dict[str, list[float]] = {n: [] for n in CONFIGS}
    for _ in range(args.rounds):
        for name, flags in CONFIGS.items():
            whole[name].append(run([*flags, *files], env)[1])
            first[name].append(run([*flags, files[0]], env)[0])
    med = {n: {"whole_run_s": round(statistics.median(whole[n]), 3),
               "images_per_s_whole_run": round(args.images / statistics.median(whole[n]), 2),
               "first_result_s": round(statistics.median(first[n]), 3),
               "runs_whole_s": [round(x, 3) for x in whole[n]], "runs_first_s": [round(x, 3) for x in first[n]]}
           for n in CONFIGS}
    best_fp32 = max(("fp32_auto", "fp32_openvino"), key=lambda n: med[n]["images_per_s_whole_run"])
    ratio = round(med["int8"]["images_per_s_whole_run"] / med[best_fp32]["images_per_s_whole_run"], 3)
    extra = round(med["int8"]["first_result_s"] - med[best_fp32]["first_result_s"], 3)
    from machine import describe

    out = {
        "machine": describe(),
        "images": args.images, "rounds": args.rounds, "served": served, "configs": med,
        "fp32_baseline": best_fp32,
        "ratio_int8_vs_fp32_whole_run": ratio,
        "int8_first_result_minus_fp32_s": extra,
        "targets": {"int8_whole_run_ge_1.0x_fp32": ratio >= 1.0, "int8_first_result_le_fp32_plus_0.5s": extra <= 0.5},
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

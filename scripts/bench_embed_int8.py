#!/usr/bin/env python
"""Benchmark `lens embed` with the int8 model against `lens embed` fp32, same data, same run; prints JSON.

The data is bench_batch's (seeded camera-size JPEGs made from the bundled photos, in Parquet shards). Then
--repeat rounds, the order alternating: `lens embed` fp32 as a user runs it (`backend: auto`, the faster fp32 CPU
backend measured once per machine and cached: the strongest fp32 job, not a slower one) and `lens embed
--precision int8` (OpenVINO int8 behind the accuracy gate), each a fresh process with its own Ray, as a user
runs the command. Both models are made and cached before the first round (the int8 model is quantized and judged
once per cache, as in serving), so no round pays a one-off cost. Reported: each job's dataset images/s (actor
start-up included), steady images/s (first part written to last) and whole-command images/s (Ray start
included), per round and the median round's ratios int8 / fp32; the gate's verdict the int8 jobs served under;
how far the int8 rows are from the fp32 rows of the same images; one core's cost per image of decode, the fp32
and the int8 model, and the ratio they bound the jobs' to. Writes benchmarks/embed-int8.json (with
--small-photos, benchmarks/embed-int8-small.json).
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_batch import make_shards, run_child  # noqa: E402 - the same data and job runner as bench_batch
from machine import describe  # noqa: E402

TARGET = 1.6  # issue 33: lens embed int8 >= 1.6x lens embed fp32 on the bench_batch data, same run


def job(shards: Path, out: Path, args, precision: str) -> dict:
    backend = "openvino" if precision == "int8" else "auto"
    return run_child(["--child-job", str(shards), str(out), "--batch-size", str(args.batch_size),
                      "--backend", backend, "--precision", precision], f"lens embed {precision}")


def rates(j: dict) -> dict:
    return {"dataset": j["images_per_s"], "steady": j["steady_images_per_s"],
            "whole_command": round(j["rows_run"] / j["seconds"], 1)}


def agreement(fp32_out: Path, int8_out: Path) -> dict:
    """Cosine between the int8 and the fp32 row of each image (both jobs embed the same rows)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    def rows(out: Path) -> dict:
        m = json.loads((out / "manifest.json").read_text())
        t = pa.concat_tables([pq.read_table(out / f, columns=["id", "embedding"]) for f in m["files"]])
        return dict(zip(t.column("id").to_pylist(), np.asarray(t.column("embedding").to_pylist(), np.float32)))

    a, b = rows(fp32_out), rows(int8_out)
    common = sorted(set(a) & set(b))
    cos = np.array([float(a[i] @ b[i]) for i in common])  # rows are L2-normalised
    return {"rows": len(common), "mean_cosine": round(float(cos.mean()), 5),
            "p5_cosine": round(float(np.percentile(cos, 5)), 5), "min_cosine": round(float(cos.min()), 5)}


def costs(shards: Path, fp32_backend: str, n: int = 48) -> dict:
    """One core's milliseconds per image, on ``n`` of the job's rows: decode + resize (the same for both), the fp32
    model (the backend the fp32 job ran) and the int8 model, at batch 16; and the bound they put on the ratio
    (decode + fp32) / (decode + int8): what int8 can gain where every image is decoded too."""
    import numpy as np
    import pyarrow.parquet as pq

    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor

    blobs = pq.read_table(sorted(shards.glob("*.parquet"))[0], columns=["image"]).column("image").to_pylist()[:n]
    fp = Predictor.from_config(ModelConfig(backend=fp32_backend, device="cpu", num_threads=1))
    q = Predictor.from_config(ModelConfig(backend="openvino", precision="int8", device="cpu", num_threads=1))
    t0 = time.perf_counter()
    px = np.stack([fp.prepare_pixels(b) for b in blobs])
    out = {"images": len(blobs), "decode_resize_ms": (time.perf_counter() - t0) / len(blobs) * 1000}
    for name, p in (("fp32_model_ms", fp), ("int8_model_ms", q)):
        p.infer_pixels(px[:16])  # warm
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(0, len(px), 16):
                p.infer_pixels(px[i : i + 16])
            best = min(best, (time.perf_counter() - t0) / len(px) * 1000)
        out[name] = best
    out = {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}
    out["bound_int8_vs_fp32"] = round((out["decode_resize_ms"] + out["fp32_model_ms"])
                                      / (out["decode_resize_ms"] + out["int8_model_ms"]), 3)
    out["model_only_int8_vs_fp32"] = round(out["fp32_model_ms"] / out["int8_model_ms"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--rows-per-shard", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="fp32/int8 pairs (median round reported)")
    ap.add_argument("--small-photos", action="store_true", help="long side 256-800 px instead of camera-size")
    ap.add_argument("--quick", action="store_true", help="500 rows, one pair")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "embed-int8.json"))
    args = ap.parse_args()
    if args.small_photos and args.out == ap.get_default("out"):
        args.out = str(ROOT / "benchmarks" / "embed-int8-small.json")
    rows = 500 if args.quick else args.rows
    if args.quick:
        args.repeat = 1

    from lens.runtime.config import ModelConfig
    from lens.runtime.loading import load_model

    t0 = time.perf_counter()
    load_model(ModelConfig(device="cpu"))  # fp32: the ONNX export and auto's choice, cached
    int8 = load_model(ModelConfig(backend="openvino", precision="int8", device="cpu"))  # quantized + judged, cached
    warm_s = time.perf_counter() - t0
    gate = int8.served().get("int8_gate")
    with tempfile.TemporaryDirectory(prefix="lens-bench-int8-") as tmp:
        tmp = Path(tmp)
        make_shards(tmp / "x", rows, args.rows_per_shard, seed=0, camera=not args.small_photos)
        rounds = []
        for i in range(args.repeat):
            order = ("fp32", "int8") if i % 2 == 0 else ("int8", "fp32")
            jobs = {p: job(tmp / "x", tmp / f"out-{p}-{i}", args, p) for p in order}
            r = {"order": list(order), "fp32": rates(jobs["fp32"]), "int8": rates(jobs["int8"]),
                 "served": {p: jobs[p]["served"]["backend"] + " " + jobs[p]["served"]["precision"] for p in jobs}}
            r["int8_vs_fp32"] = {k: round(r["int8"][k] / r["fp32"][k], 3) for k in r["fp32"]}
            if i == 0:
                agree = agreement(tmp / "out-fp32-0", tmp / "out-int8-0")
                served = {p: jobs[p]["served"] for p in jobs}
            rounds.append(r)
        per_image = costs(tmp / "x", served["fp32"]["backend"])
    rep = sorted(rounds, key=lambda r: r["int8_vs_fp32"]["dataset"])[len(rounds) // 2]
    summary = {
        "benchmark": "embed_int8",
        "machine": describe(python=platform.python_version()),
        "model": "tf_efficientnet_lite0 (embedded weights), CPU",
        "rows": rows, "photos": "small" if args.small_photos else "camera", "repeats": args.repeat,
        "batch_size": args.batch_size, "models_cached_before_rounds_s": round(warm_s, 1),
        "served": served,
        "int8_gate": gate,
        "rows_int8_vs_fp32": agree,
        "per_image_one_core": per_image,
        "rounds": rounds,
        "fp32_images_per_s": rep["fp32"], "int8_images_per_s": rep["int8"],
        "int8_vs_fp32": rep["int8_vs_fp32"],
        "int8_vs_fp32_dataset_rounds": [r["int8_vs_fp32"]["dataset"] for r in rounds],
        "int8_vs_fp32_whole_command_median": statistics.median(r["int8_vs_fp32"]["whole_command"] for r in rounds),
        "targets": {f"lens embed int8 >= {TARGET}x lens embed fp32 ({'small' if args.small_photos else 'camera'} "
                    "photos, dataset images/s)": rep["int8_vs_fp32"]["dataset"] >= TARGET},
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if not args.quick:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

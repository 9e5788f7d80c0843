#!/usr/bin/env python
"""Benchmark the model runtime on this machine; prints one JSON summary.

* images/s of the default model (EfficientNet-Lite0) for torch eager fp32 (NCHW),
  torch ``channels_last`` and ONNX Runtime, at batch sizes 1, 8 and 32;
* decode + preprocess time per image for a ~1 MP JPEG, full decode vs draft mode,
  and whether top-1 agrees;
* replica cold start (imports + construct + load weights + warm-up) in a fresh
  process with the ONNX cache warm.

Targets (ratios measured in the same run): auto backend >= 2.5x torch eager at
batch 8; draft decode >= 2x full decode; cold start <= 3 s.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

from machine import describe  # noqa: E402 - the benchmarks' machine record (scripts/machine.py)


def timed(fn, *, min_time: float, repeats: int) -> float:
    """Median seconds per call over ``repeats`` rounds of at least ``min_time`` each."""
    fn()  # warm
    rounds = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        rounds.append(dt / n)
    return statistics.median(rounds)


def bench_backends(cfg, batch_sizes, min_time, repeats):
    from lens.runtime.backends import OnnxBackend, TorchBackend, heads_module
    from lens.runtime.loading import build_torch, load_model
    from lens.runtime.weights import resolve_weights

    onnx = load_model(cfg.model_copy(update={"backend": "onnx"}))  # exports once if the cache is cold
    weights = resolve_weights(cfg.name, cfg.weights, cfg.cache_dir)
    model, pp, _, _ = build_torch(cfg, weights)
    ov_fp32 = load_model(cfg.model_copy(update={"backend": "openvino"}))
    ov_int8 = load_model(cfg.model_copy(update={"backend": "openvino", "precision": "int8"}))
    backends = {
        "torch_eager_fp32": TorchBackend(heads_module(model), "cpu", channels_last=False),
        "torch_channels_last": TorchBackend(heads_module(model), "cpu", channels_last=True),
        "onnxruntime": OnnxBackend(onnx.onnx_path),
        "openvino_fp32": ov_fp32.backend,
        f"openvino_int8 (served: {ov_int8.quantization['served']})": ov_int8.backend,
    }
    rng = np.random.default_rng(0)
    out = {}
    for bs in batch_sizes:
        x = rng.standard_normal((bs, *pp.input_size)).astype(np.float32)
        for name, b in backends.items():
            sec = timed(lambda: b.run(x), min_time=min_time, repeats=repeats)
            out.setdefault(name, {})[f"batch_{bs}"] = round(bs / sec, 2)
    return out, ov_int8.quantization, agreement_on_photos(onnx, ov_fp32, ov_int8)


def agreement_on_photos(onnx, *others) -> dict:
    """Top-1 agreement and embedding cosine of each backend with ONNX Runtime fp32 on the bundled photos and 96
    seeded augmented copies (the int8 gate's held-out half)."""
    from lens.runtime import int8_gate
    from lens.runtime.preprocess import Preprocessor
    from lens.runtime.samples import sample_paths

    prep = Preprocessor(onnx.preprocess)
    x = np.concatenate([np.stack([prep(p.read_bytes()) for p in sample_paths()]),
                        int8_gate.preprocess_all(int8_gate.holdout_images(None), prep, what="held-out")])
    out = {}
    for m in others:
        r = int8_gate.judge(onnx.backend.run, m.backend.run, x, onnx.labels, int8_gate.GateThresholds())
        out[f"{m.backend.name}_{m.backend.precision}"] = {k: r[k] for k in (
            "images", "top1_agreement", "top5_overlap", "mean_cosine", "p5_cosine", "recall_at_10_vs_fp32_index")}
    return out


def bench_decode(predictor, photo: bytes, min_time, repeats):
    """Per-image decode + preprocess time, four ways, for one JPEG.

    * ``lens_draft``: Lens's path (draft-mode DCT scaling, then resize of the cropped region);
    * ``lens_no_draft``: the same with draft mode off (isolates what draft mode buys);
    * ``full_decode_then_resize``: the conventional path: decode at full size, resize the whole
      image (short side to 256), centre-crop, normalise;
    * ``timm_transform``: ``Image.open().convert("RGB")`` then timm's ``create_transform``.
    """
    from timm.data import create_transform

    from lens.runtime.decode import DecodeLimits, decode_image
    from lens.runtime.preprocess import Preprocessor

    cfg = predictor.model.preprocess
    draft = Preprocessor(cfg, DecodeLimits(draft=True))
    no_draft = Preprocessor(cfg, DecodeLimits(draft=False))
    th, tw = cfg.size
    s = cfg.scale_size

    def conventional(data: bytes) -> np.ndarray:
        img = decode_image(data, DecodeLimits(draft=False))
        w, h = img.size
        nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        return no_draft.to_array(img.crop((left, top, left + tw, top + th)))

    timm_tf = create_transform(**cfg.to_dict())
    ms = {
        "lens_draft": timed(lambda: draft(photo), min_time=min_time, repeats=repeats),
        "lens_no_draft": timed(lambda: no_draft(photo), min_time=min_time, repeats=repeats),
        "full_decode_then_resize": timed(lambda: conventional(photo), min_time=min_time, repeats=repeats),
        "timm_transform": timed(lambda: timm_tf(Image.open(io.BytesIO(photo)).convert("RGB")),
                                min_time=min_time, repeats=repeats),
    }
    top1 = {name: int(predictor.infer(fn(photo)[None])[0].argmax())
            for name, fn in (("lens_draft", draft), ("full_decode_then_resize", conventional))}
    size = Image.open(io.BytesIO(photo)).size
    return {
        "size": f"{size[0]}x{size[1]}",
        "megapixels": round(size[0] * size[1] / 1e6, 2),
        "bytes": len(photo),
        "ms_per_image": {k: round(v * 1000, 3) for k, v in ms.items()},
        "draft_speedup_vs_full_decode_then_resize": round(ms["full_decode_then_resize"] / ms["lens_draft"], 2),
        "draft_speedup_vs_lens_no_draft": round(ms["lens_no_draft"] / ms["lens_draft"], 2),
        "draft_speedup_vs_timm_transform": round(ms["timm_transform"] / ms["lens_draft"], 2),
        "same_top1": len(set(top1.values())) == 1,
        "top1_class_id": top1["full_decode_then_resize"],
    }


def decode_inputs() -> dict[str, bytes]:
    """Real ~1 MP JPEGs from the installed sample photos."""
    from lens.runtime.samples import sample_dir, sample_path

    hubble = sample_path("hubble_deep_field.jpg").read_bytes()  # as shipped: 872x1000, 4:4:4, ~4.8 bits/px
    retina = Image.open(sample_dir() / "retina.jpg").convert("RGB")  # a real 1411x1411 photograph
    buf = io.BytesIO()
    retina.resize((1000, 1000), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=90)  # camera-like 4:2:0
    return {"hubble_deep_field_as_shipped": hubble, "retina_1mp_q90": buf.getvalue()}


COLD_START = """
import time; t0 = time.perf_counter()
from lens.runtime.config import ModelConfig
from lens.runtime.predictor import Predictor
p = Predictor.from_config(ModelConfig(backend=%r))
t1 = time.perf_counter(); p.warmup(); t2 = time.perf_counter()
print(t1 - t0, t2 - t1, t2 - t0)
"""


def bench_cold_start(backend: str, runs: int) -> dict:
    totals, loads, warms, procs = [], [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", COLD_START % backend], capture_output=True, text=True, check=True)
        procs.append(time.perf_counter() - t0)
        load, warm, total = map(float, r.stdout.split())
        loads.append(load)
        warms.append(warm)
        totals.append(total)
    return {
        "construct_load_s": round(statistics.median(loads), 3),
        "warmup_s": round(statistics.median(warms), 3),
        "total_s": round(statistics.median(totals), 3),
        "process_wall_s": round(statistics.median(procs), 3),
    }


EXPORT = """
import sys, time; t0 = time.perf_counter()
from lens.runtime.config import ModelConfig
from lens.runtime.loading import load_model
load_model(ModelConfig(backend="onnx", cache_dir=sys.argv[1]))
print(time.perf_counter() - t0)
"""


def bench_export(runs: int) -> dict:
    """First load of the embedded model into an empty cache (torch build + ONNX export), in a fresh process;
    the embedded weights are read from their package, so nothing is downloaded."""
    import tempfile

    times = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="lens-export-") as cache:
            r = subprocess.run([sys.executable, "-c", EXPORT, cache], capture_output=True, text=True, check=True)
            times.append(float(r.stdout.split()[-1]))
    return {"first_load_with_export_s": round(statistics.median(times), 2), "runs": [round(t, 2) for t in times]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter rounds (noisier)")
    ap.add_argument("--batch-sizes", default="1,8,32")
    args = ap.parse_args()
    min_time, repeats = (0.5, 3) if args.quick else (2.0, 5)

    from lens.runtime.config import ModelConfig
    from lens.runtime.openvino import cpu_flags
    from lens.runtime.predictor import Predictor
    cfg = ModelConfig()
    predictor = Predictor.from_config(cfg.model_copy(update={"backend": "onnx"}))
    from lens.runtime.loading import load_model

    auto = load_model(cfg)  # what `auto` picks here (measured once per machine and cached)
    auto_backend = auto.backend.name
    auto_choice = auto.backend_choice
    del auto

    throughput, int8_gate_report, agreement = bench_backends(cfg, [int(b) for b in args.batch_sizes.split(",")],
                                                             min_time, repeats)
    int8_name = next(k for k in throughput if k.startswith("openvino_int8"))

    decode = {name: bench_decode(predictor, data, min_time, repeats) for name, data in decode_inputs().items()}
    draft_gain = min(d["draft_speedup_vs_full_decode_then_resize"] for d in decode.values())
    cold = {b: bench_cold_start(b, 3) for b in ("onnx", "torch")}
    export = bench_export(1 if args.quick else 3)

    onnx_b8 = throughput["onnxruntime" if auto_backend == "onnx" else "openvino_fp32"]["batch_8"]
    eager_b8 = throughput["torch_eager_fp32"]["batch_8"]
    summary = {
        "benchmark": "model",
        "machine": describe(python=platform.python_version()),
        "model": cfg.name,
        "auto_backend_on_this_machine": auto_backend,
        "auto_backend_choice": auto_choice,
        "cpu_flags": cpu_flags(),
        "images_per_s": throughput,
        "agreement_with_onnx_fp32": agreement,
        "int8_gate": {k: v for k, v in int8_gate_report.items() if k != "thresholds"},
        "decode_preprocess": decode,
        "cold_start": cold,
        "onnx_export": export,
        "ratios": {
            "auto_vs_torch_eager_batch8": round(onnx_b8 / eager_b8, 2),
            "channels_last_vs_eager_batch8": round(throughput["torch_channels_last"]["batch_8"] / eager_b8, 2),
            "draft_vs_full_decode_then_resize_min": draft_gain,
            "draft_vs_lens_no_draft_min": min(d["draft_speedup_vs_lens_no_draft"] for d in decode.values()),
            "openvino_int8_vs_onnxruntime_fp32": {b: round(throughput[int8_name][b] / throughput["onnxruntime"][b], 2)
                                                  for b in throughput["onnxruntime"]},
            "openvino_fp32_vs_onnxruntime_fp32": {b: round(throughput["openvino_fp32"][b]
                                                           / throughput["onnxruntime"][b], 2)
                                                  for b in throughput["onnxruntime"]},
        },
        "targets": {
            "auto_vs_torch_eager_batch8 >= 2.5": onnx_b8 / eager_b8 >= 2.5,
            **{f"draft_vs_full_decode_then_resize >= 2 ({name})": d["draft_speedup_vs_full_decode_then_resize"] >= 2
               for name, d in decode.items()},
            "draft_same_top1": all(d["same_top1"] for d in decode.values()),
            "cold_start_onnx_warm_cache <= 3s": cold["onnx"]["total_s"] <= 3.0,
            "openvino int8 >= 1.5x onnxruntime fp32 (batch 8)": (int8_gate_report["served"] == "int8" and
                throughput[int8_name]["batch_8"] >= 1.5 * throughput["onnxruntime"]["batch_8"]),
        },
    }
    out = ROOT / "benchmarks" / "model.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

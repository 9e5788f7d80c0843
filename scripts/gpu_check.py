#!/usr/bin/env python
"""Everything Lens runs on a GPU, checked and measured in one command; writes one JSON.

Run it on a machine with one NVIDIA GPU (``scripts/gpu_check.sh`` installs Lens first and keeps the whole run
within 8 minutes); ``--device cpu`` runs the very same code on CPU, which is how the test suite exercises it
(``tests/test_gpu_check.py``), so nothing here is untested code. Stages, in order, each timed and recorded
with its error if it fails (a failed stage never stops the others; the exit status says whether all passed):

* ``environment``: torch, CUDA and the device, the CPU;
* ``correctness``: torch on the device (fp16 autocast on CUDA) against ONNX Runtime fp32 on CPU on the bundled
  photos (top-1 agreement, embedding cosine, the expected classes), and one predictor shared by threads
  against its sequential answers;
* ``decode``: Lens's CPU decode (Pillow with JPEG DCT scaling, resize, crop) against
  ``torchvision.io.decode_jpeg(device=...)`` (nvJPEG on CUDA) plus resize on the device, on camera-size JPEGs,
  images/s each, and whether the device's decode pays;
* ``embed``: ``lens embed`` with model actors on the device (``gpus_per_worker``) on bench_batch's data, against
  a pipelined loop on the same device in the same run (decode threads feeding model batches);
* ``finetune``: ``lens train --mode finetune`` for one short epoch (AMP on CUDA) on a small labeled set;
* ``serve``: the GPU profile's pool (``infra/serve-gpu.yaml``, one replica) under closed-loop load: images/s,
  p50/p99, and the batch sizes the replica ran.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

STAGES = ("environment", "correctness", "decode", "embed", "finetune", "serve")


def model_cfg(device: str, quick: bool = False) -> dict:
    """The model as the GPU profile runs it: torch, fp16 autocast on CUDA (fp32 on CPU). ``quick`` (the suite's
    CPU run) swaps in timm's tiny test EfficientNet with random weights where the figures do not matter (embed,
    finetune, serve): the same code runs, sooner."""
    tiny = {"name": "test_efficientnet", "weights": "random"} if quick else {"name": "tf_efficientnet_lite0"}
    return tiny | {"backend": "torch", "device": device, "precision": "fp16" if device.startswith("cuda") else "fp32"}


def environment(device: str, quick: bool, tmp: Path) -> dict:
    import torch

    from machine import describe

    out = {"machine": describe(python=platform.python_version()), "torch": torch.__version__,
           "cuda_available": torch.cuda.is_available(), "device": device}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no CUDA device")
        p = torch.cuda.get_device_properties(0)
        out |= {"gpu": p.name, "gpu_memory_gb": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version()}
    return out


def correctness(device: str, quick: bool, tmp: Path) -> dict:
    import numpy as np

    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor
    from lens.runtime.samples import augmented_jpegs, sample_paths

    photos = {p.name: p.read_bytes() for p in sample_paths()}
    crops = [b for _, b, _ in augmented_jpegs(8 if quick else 48, seed=31)]
    items = list(photos.values()) + crops
    ref = Predictor.from_config(ModelConfig(backend="onnx", device="cpu"))
    dev = Predictor.from_config(ModelConfig(**model_cfg(device)))
    a, b = ref.predict(items), dev.predict(items)
    cos = [float(np.dot(x.embedding, y.embedding)) for x, y in zip(a, b)]
    top1 = sum(x.tags[0].class_id == y.tags[0].class_id for x, y in zip(a, b)) / len(items)
    named = {n: r.tags[0].label for n, r in zip(photos, b)}
    # one predictor, many threads: each thread's answers equal the sequential ones (b, above)
    seq = [r.embedding for r in b]
    got: dict[int, list] = {}

    def worker(k: int) -> None:
        got[k] = [r.embedding for r in dev.predict(items[k::4])]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    threaded = min(float(np.dot(e, s)) for k in range(4) for e, s in zip(got[k], seq[k::4]))
    checks = {"top1_agreement_ge_0.9": top1 >= 0.9, "min_cosine_ge_0.99": min(cos) >= 0.99,
              "coffee_is_espresso": named["coffee.png"] == "espresso",
              "threads_equal_sequential": threaded >= 0.9999}
    if not all(checks.values()):
        raise AssertionError(f"correctness checks failed: {checks}; top-1 {top1}, min cosine {min(cos)}")
    return {"images": len(items), "served": dev.model.served(), "top1_agreement_vs_onnx_fp32": round(top1, 4),
            "mean_cosine": round(float(np.mean(cos)), 5), "min_cosine": round(min(cos), 5),
            "threads_min_cosine_vs_sequential": round(threaded, 6), "checks": checks}


def decode(device: str, quick: bool, tmp: Path) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg

    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor
    from lens.runtime.samples import augmented_jpegs

    jpegs = [b for _, b, _ in augmented_jpegs(8 if quick else 64, seed=0, long_side=(3000, 4000))]
    pred = Predictor.from_config(ModelConfig(**model_cfg("cpu") | {"backend": "onnx"}))
    size = pred.model.preprocess.input_size[-1]

    def cpu() -> None:
        for b in jpegs:
            pred.prepare_pixels(b)

    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]

    def on_device() -> None:
        imgs = decode_jpeg(datas, device=device)  # nvJPEG batched on CUDA
        for im in imgs:  # resize the short side, then centre-crop, on the device
            h, w = im.shape[-2:]
            s = size / min(h, w)
            x = F.interpolate(im[None].float(), size=(max(size, round(h * s)), max(size, round(w * s))),
                              mode="bilinear", antialias=True, align_corners=False)
            hh, ww = x.shape[-2:]
            x[..., (hh - size) // 2:(hh - size) // 2 + size, (ww - size) // 2:(ww - size) // 2 + size].contiguous()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def rate(fn, reps: int = 2) -> float:
        fn()  # warm (nvJPEG's handles, the resize kernels)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return len(jpegs) / best

    cpu_ips, dev_ips = rate(cpu), rate(on_device)
    cores = os.cpu_count() or 1
    return {"images": len(jpegs), "mean_bytes": int(np.mean([len(b) for b in jpegs])),
            "cpu_one_thread_images_per_s": round(cpu_ips, 1), "cpu_all_cores_bound_images_per_s": round(cpu_ips * cores, 1),
            "device_images_per_s": round(dev_ips, 1), "device_vs_cpu_all_cores": round(dev_ips / (cpu_ips * cores), 3),
            "pays": dev_ips > cpu_ips * cores}


def embed(device: str, quick: bool, tmp: Path) -> dict:
    import pyarrow.parquet as pq

    from baselines import pipelined
    from bench_batch import make_shards
    from lens.batch.config import EmbedConfig
    from lens.batch.job import run_embed
    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor

    rows = 16 if quick else 3000
    make_shards(tmp / "shards", rows, max(32, rows // 6), seed=0, camera=True)
    gpu = device.startswith("cuda")
    cfg = EmbedConfig(input=str(tmp / "shards"), output=str(tmp / "embed-out"), batch_size=64 if gpu else 16,
                      model=model_cfg(device, quick), **({"gpus_per_worker": 1} if gpu else {}))
    t0 = time.perf_counter()
    s = run_embed(cfg, log=lambda *a: None)
    job_s = time.perf_counter() - t0
    if s.embedded != rows:
        raise AssertionError(f"lens embed embedded {s.embedded} of {rows} rows")
    blobs = [b for f in sorted((tmp / "shards").glob("*.parquet"))
             for b in pq.read_table(f, columns=["image"]).column("image").to_pylist()]
    pred = Predictor.from_config(ModelConfig(**model_cfg(device, quick)))
    pred.warmup(cfg.batch_size)
    loop = pipelined(pred, blobs, batch_size=cfg.batch_size, decode_threads=os.cpu_count() or 2)
    return {"rows": rows, "job": {"images_per_s": s.images_per_s, "steady_images_per_s": s.steady_images_per_s,
                                  "whole_command_images_per_s": round(rows / job_s, 1), "served": s.served},
            "pipelined_loop": loop, "job_vs_loop": round(s.images_per_s / loop["images_per_s"], 3),
            "job_steady_vs_loop": round(s.steady_images_per_s / loop["images_per_s"], 3)}


def finetune(device: str, quick: bool, tmp: Path) -> dict:
    import lens.train.job
    from lens.runtime.samples import scene_dataset
    from lens.train.config import TrainConfig

    per = 6 if quick else 40
    scene_dataset(tmp / "scenes", train_per_class=per, val_per_class=max(3, per // 4),
                  scenes={"chelsea.png": "cat", "coffee.png": "coffee", "rocket.jpg": "rocket"})
    gpu = device.startswith("cuda")
    # the classifier first (on cached embeddings: the card's least, 5 epochs), then one epoch of the network
    cfg = TrainConfig(data=str(tmp / "scenes"), output=str(tmp / "pkg"), mode="finetune", epochs=5,
                      finetune_epochs=1, batch_size=16, use_gpu=gpu, seed=0, test_fraction=0.2,
                      model=model_cfg(device, quick) | {"precision": "fp32"},
                      checkpoint_storage=str(tmp / "ckpt"))
    t0 = time.perf_counter()
    summary = lens.train.job.run_train(cfg, log=lambda *a: None)
    return {"seconds": round(time.perf_counter() - t0, 1), "amp": gpu, "images_per_class": per,
            "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}}


def serve_load(device: str, quick: bool, tmp: Path) -> dict:
    import yaml
    from ray import serve

    from bench_serve import closed_loop, free_port, jpeg_bodies
    from lens.serve.run import deploy

    doc = yaml.safe_load((ROOT / "infra" / "serve-gpu.yaml").read_text())
    port = free_port()
    doc["http_options"].update(host="127.0.0.1", port=port)
    app = doc["applications"][0]
    pool = app["args"]["pools"][0]  # the GPU pool alone, one replica
    app["args"]["pools"] = [pool]
    pool["model"] = model_cfg(device, quick)
    if not device.startswith("cuda"):
        pool.pop("num_gpus", None)
        pool["num_cpus"] = 1
        pool["decode_threads"] = 2
    deps = [d for d in app.get("deployments", []) if d["name"] == pool["name"]]  # one pool: it holds the HTTP API
    for d in deps:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
    app["deployments"] = deps
    deploy(doc, where="gpu_check")
    url = f"http://127.0.0.1:{port}/v1/tag"
    bodies = jpeg_bodies()
    points = [asyncio.run(closed_loop(url, bodies, c, 1.5 if quick else 10.0)) for c in ((8,) if quick else (8, 32, 64))]
    handle = serve.get_deployment_handle(pool["name"], app_name=app["name"])
    stats = handle.stats.remote().result()  # the app goes with this process's Ray (no 30 s graceful stop)
    if not all(p["statuses"].get("200") for p in points):
        raise AssertionError(f"the pool answered no 200 at some load point: {points}")
    return {"pool": pool["name"], "model": pool["model"], "by_connections": points,
            "batches": stats["batches"], "images": stats["images"], "max_batch_seen": stats["max_batch_seen"],
            "recent_batch_sizes": sorted(set(stats["recent_batch_sizes"]))}


RUN = {"environment": environment, "correctness": correctness, "decode": decode, "embed": embed,
       "finetune": finetune, "serve": serve_load}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (the suite's run of the same code)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: every stage's code, in about a minute on CPU")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu-check.json"))
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        ap.error(f"unknown stages {unknown}; known: {', '.join(STAGES)}")
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    from lens.cluster import init_ray

    report: dict = {"benchmark": "gpu_check", "device": args.device, "quick": args.quick, "stages": {}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lens-gpu-check-") as tmp:
        if {"embed", "finetune", "serve"} & set(stages):  # one Ray for every stage that needs one
            from lens.serve.frontdoor import prepare

            _, runtime_env = prepare(None)
            init_ray(None, what="gpu_check", runtime_env=runtime_env, loopback=True)
        for name in stages:
            t0 = time.perf_counter()
            try:
                out = {"ok": True} | RUN[name](args.device, args.quick, Path(tmp) / name)
            except Exception as e:  # noqa: BLE001 - record it, run the other stages
                out = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            out["seconds"] = round(time.perf_counter() - t0, 1)
            report["stages"][name] = out
            print(f"gpu_check: {name} {'ok' if out['ok'] else 'FAILED: ' + out['error']} ({out['seconds']} s)",
                  file=sys.stderr, flush=True)
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    report["ok"] = all(s["ok"] for s in report["stages"].values())
    text = json.dumps(report, indent=1, default=str)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(args.out).with_suffix(".tmp")
    tmp_out.write_text(text + "\n")
    os.replace(tmp_out, args.out)
    print(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

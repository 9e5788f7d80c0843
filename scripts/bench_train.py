#!/usr/bin/env python
"""Benchmark `lens train`; prints one JSON summary, writes benchmarks/train.json|png.

Data: two different sets of 10 classes of real photos (scikit-image's), training images cut from the left 60 % of
each photo, held-out images from the rest (seeded augmented crops), so no held-out image shares pixels with a
training image. 60 training images per class; the 40 held-out ones are split by `lens train` into 20 validation
(which chooses: epochs, thresholds, the best checkpoint) and 20 test (which only measures).

1. Test top-1 on each set: head mode and LP-FT fine-tuning (`--mode finetune`: a classifier trained on the frozen
   features, then 5 epochs of the network, lr 5e-3 for the classifier and 5e-4 for the backbone, batch 32, Lite0,
   Ray Train, 1 worker), from the same run; the baseline a k-NN vote (k=5, cosine, FAISS) over the same ImageNet
   Lite0 embeddings. Target: fine-tune >= head on both sets. Seconds per fine-tuning epoch are reported.
2. Head training time for 10,000 embeddings (card defaults: 10 epochs, batch 32); target under 10 s on CPU.
3. Fine-tuning throughput (images/s, top blocks unfrozen) through Ray Train (Ray Data decoding and augmenting in
   CPU tasks) against a plain single-process timm training loop in the same run (decode, augment, forward,
   backward one batch after another, same model, same trainable layers, same batch size); target >= 0.85x. On a
   GPU (`--use-gpu`), both with AMP.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def knn_top1(train_x, train_y, val_x, val_y, k: int = 5) -> float:
    import faiss

    index = faiss.IndexFlatIP(train_x.shape[1])
    index.add(np.ascontiguousarray(train_x, np.float32))
    sims, ids = index.search(np.ascontiguousarray(val_x, np.float32), k)
    right = 0
    for s, row, y in zip(sims, ids, val_y):
        votes: dict[int, float] = {}
        for sim, j in zip(s, row):
            votes[int(train_y[j])] = votes.get(int(train_y[j]), 0.0) + float(sim)
        right += max(votes, key=votes.get) == y
    return round(right / len(val_y), 4)


def embeddings_of(files: list[Path], model_cfg) -> np.ndarray:
    """The cached embeddings `lens train` computed for ``files`` (by content hash)."""
    from lens.train.features import EmbeddingCache

    from lens.runtime.loading import load_model

    cache = EmbeddingCache(model_cfg.cache_dir, load_model(model_cfg).identity()).load()
    return np.stack([cache[hashlib.sha256(f.read_bytes()).hexdigest()] for f in files])


class _Files:
    """(image, label) pairs decoded and augmented where the DataLoader runs them (its workers, or inline)."""

    def __init__(self, files, labels, tf):
        self.files, self.labels, self.tf = files, labels, tf

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from lens.runtime.decode import decode_image

        return self.tf(decode_image(self.files[i].read_bytes()).convert("RGB")), self.labels[i]


def _one_thread(_worker_id):
    import torch

    torch.set_num_threads(1)  # a decode worker must not take the training's cores


def plain_loop(data: Path, classes: list[str], model_name: str, batch_size: int, images: int, use_gpu: bool,
               threads: int) -> dict:
    """The strongest plain single-process timm fine-tuning loop: the same transforms and step as lens train,
    images decoded and augmented by a torch DataLoader with 0, 1 .. cores worker processes (each measured; the
    fastest is the baseline)."""
    import timm
    import torch
    from lens.train.finetune import _set_trainable, _train_mode
    from timm.data import create_transform, resolve_data_config
    from torch.utils.data import DataLoader, RandomSampler

    from lens.runtime.config import ModelConfig
    from lens.runtime.loading import build_torch
    from lens.runtime.weights import resolve_weights

    torch.set_num_threads(threads)
    cfg = ModelConfig(name=model_name)
    parent, pp, _, _ = build_torch(cfg, resolve_weights(cfg.name, cfg.weights, Path(cfg.cache_dir)))
    files = sorted((data / "train").glob("*/*.jpg"))
    labels = [classes.index(f.parent.name) for f in files]
    device = torch.device("cuda" if use_gpu else "cpu")
    runs = []
    for workers in sorted({0, 1, os.cpu_count() or 1}):
        torch.manual_seed(0)
        model = timm.create_model(model_name, num_classes=len(classes), drop_rate=0.2)
        model.load_state_dict({k: v for k, v in parent.state_dict().items() if not k.startswith("classifier.")},
                              strict=False)
        _set_trainable(model, "top")
        model.to(device)
        tf = create_transform(**{k: v for k, v in resolve_data_config(model=model).items()
                                 if k in ("input_size", "mean", "std", "interpolation")}, is_training=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        scaler = torch.amp.GradScaler("cuda", enabled=use_gpu)
        ds = _Files(files, labels, tf)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, worker_init_fn=_one_thread,
                            sampler=RandomSampler(ds, replacement=True, num_samples=images + batch_size,
                                                  generator=torch.Generator().manual_seed(0)),
                            prefetch_factor=4 if workers else None, persistent_workers=False, drop_last=True)
        _train_mode(model, freeze_bn=batch_size < 64)  # as lens train does at this batch size
        done, t0 = 0, None
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_gpu):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if t0 is None:  # the first batch warms up (and starts the workers)
                t0 = time.perf_counter()
                continue
            done += len(y)
        dt = time.perf_counter() - t0
        runs.append({"dataloader_workers": workers, "images": done, "seconds": round(dt, 2),
                     "images_per_s": round(done / dt, 2)})
        print(f"plain loop, {workers} DataLoader workers: {runs[-1]['images_per_s']} images/s", file=sys.stderr)
    best = max(runs, key=lambda r: r["images_per_s"])
    return best | {"loop": "timm fine-tuning step, torch DataLoader (fastest worker count of those measured)",
                   "runs": runs}


#: Two sets of 10 photos each: one class per photo (crops of different photos, never of the same one)
SETS = {
    "scenes": {"chelsea.png": "cat", "coffee.png": "coffee", "astronaut.png": "astronaut", "rocket.jpg": "rocket",
               "motorcycle_left.png": "motorcycle", "horse.png": "horse", "brick.png": "brick", "coins.png": "coins",
               "hubble_deep_field.jpg": "galaxies", "camera.png": "cameraman"},
    "textures": {"cell.png": "cell", "color.png": "colour-chart", "grass.png": "grass", "gravel.png": "gravel",
                 "ihc.png": "tissue", "logo.png": "logo", "moon.png": "moon", "page.png": "page",
                 "retina.jpg": "retina", "text.png": "text"},
}


def one_set(name: str, scenes: dict, work: Path, args, log) -> dict:
    from lens.train.config import TrainConfig
    from lens.train.job import run_train

    from lens.runtime.config import ModelConfig
    from lens.runtime.samples import scene_dataset

    data = work / name
    scene_dataset(data, train_per_class=args.train_per_class, val_per_class=args.held_out_per_class, seed=0,
                  scenes=scenes)
    classes = sorted(scenes.values())
    t0 = time.perf_counter()
    run = run_train(TrainConfig(data=str(data), output=str(work / f"{name}-pkg"), mode="finetune", workers=1,
                                lr=args.lr, batch_size=32, finetune_epochs=args.finetune_epochs,
                                use_gpu=args.use_gpu, patience=0), log=log)
    seconds = time.perf_counter() - t0
    split = json.loads((work / f"{name}-pkg" / "split.json").read_text())
    files = {s: [data / i for i in split[s]] for s in ("train", "test")}
    tr_x, te_x = embeddings_of(files["train"], ModelConfig()), embeddings_of(files["test"], ModelConfig())
    tr_y = np.array([classes.index(f.parent.name) for f in files["train"]])
    te_y = np.array([classes.index(f.parent.name) for f in files["test"]])
    c = run["compare"]
    return {"classes": len(classes), "train": run["train"], "val": run["val"], "test": run["test"],
            "photos": list(scenes),
            "test_top1": {"knn5_imagenet_embeddings": knn_top1(tr_x, tr_y, te_x, te_y),
                          "head": c["head"]["test_top1"], "finetune": c["finetune"]["test_top1"]},
            "val_top1": {"head": c["head"]["val_top1"], "finetune": c["finetune"]["val_top1"]},
            "test_at_tuned_thresholds": {k: {"macro_precision": v["test_macro_precision_at_thresholds"],
                                             "macro_recall": v["test_macro_recall_at_thresholds"]}
                                         for k, v in c.items()},
            "finetune_epochs": run["epochs"], "best_epoch": run["best_epoch"],
            "seconds_per_epoch": run["seconds_per_epoch"], "fit_seconds": run["fit_seconds"],
            "embedding_seconds_cold_cache": run["embedding_seconds"], "head_seconds": run["head_seconds"],
            "whole_run_seconds": round(seconds, 1),
            "finetune_ge_head": c["finetune"]["test_top1"] >= c["head"]["test_top1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-per-class", type=int, default=60)
    ap.add_argument("--held-out-per-class", type=int, default=40, help="split by lens train: half validation, "
                    "half test")
    ap.add_argument("--finetune-epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=5e-3, help="the classifier's rate (the backbone's: x 0.1)")
    ap.add_argument("--sets", default=",".join(SETS), help="which image sets (default: both)")
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "train.json"))
    args = ap.parse_args()

    import ray
    from lens.train.head import train_head

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    work = Path(tempfile.mkdtemp(prefix="lens-bench-train-"))
    os.environ.setdefault("LENS_CACHE_DIR", str(work / "cache"))  # a cold cache: the first run embeds everything
    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    sets = {name: one_set(name, SETS[name], work, args, log) for name in args.sets.split(",")}

    # head training time on 10k embeddings: the real training embeddings, resampled with a little noise
    from lens.runtime.config import ModelConfig

    first = next(iter(sets))
    tr_files = sorted((work / first / "train").glob("*/*.jpg"))
    classes = sorted({f.parent.name for f in tr_files})
    tr_x = embeddings_of(tr_files, ModelConfig())
    tr_y = np.array([classes.index(f.parent.name) for f in tr_files])
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(tr_x), 10_000)
    x10k = tr_x[pick] + 0.01 * rng.normal(size=(10_000, tr_x.shape[1])).astype(np.float32)
    x10k /= np.linalg.norm(x10k, axis=1, keepdims=True)
    times = []
    for _ in range(3):
        r = train_head(x10k, tr_y[pick], tr_x[:50], tr_y[:50], len(classes), epochs=10, lr=1e-3, batch_size=32,
                       dropout=0.2, label_smoothing=0.1, weight_decay=1e-4, patience=0, seed=0)
        times.append(r.seconds)
    head_10k_s = round(float(np.median(times)), 3)

    ray_ips = float(np.median([r["images_per_s"] for s in sets.values() for r in s["finetune_epochs"]
                               if r["epoch"] > 0]))
    ray.shutdown()
    threads = os.cpu_count() or 1
    loop = plain_loop(work / first, classes, "tf_efficientnet_lite0", 32, max(128, int(ray_ips * 20) // 32 * 32),
                      args.use_gpu, threads)
    ratio = round(ray_ips / loop["images_per_s"], 3)

    from machine import describe

    out = {
        "machine": describe(gpu=args.use_gpu),
        "data": {"source": "scikit-image photos, one class per photo; train from the left 60 % of each photo, "
                           "held-out from the rest, split by lens train into validation and test",
                 "train_per_class": args.train_per_class, "held_out_per_class": args.held_out_per_class},
        "settings": {"mode": "finetune (LP-FT)", "lr": args.lr, "backbone_lr_mult": 0.1, "batch_size": 32,
                     "finetune_epochs": args.finetune_epochs, "workers": 1, "unfreeze": "top"},
        "sets": sets,
        "head_10k_embeddings_seconds": head_10k_s, "head_10k_runs": [round(t, 3) for t in times],
        "ray_train_images_per_s": round(ray_ips, 2),
        "plain_loop": loop,
        "ratio_ray_train_vs_plain_loop": ratio,
        "targets": {"finetune_test_top1_ge_head_on_every_set": all(s["finetune_ge_head"] for s in sets.values()),
                    "head_10k_under_10s": head_10k_s < 10.0, "finetune_throughput_ge_0.85x_plain_loop": ratio >= 0.85},
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(sets) + 1, figsize=(4 * (len(sets) + 1), 3.5))
        for a, (name, s) in zip(axes, sets.items()):
            names = list(s["test_top1"])
            a.bar(names, [s["test_top1"][n] or 0 for n in names], color=["#999", "#36c", "#c63"])
            a.set_ylim(0, 1)
            a.set_title(f"{name}: test top-1")
            a.tick_params(axis="x", labelsize=7)
        axes[-1].bar(["plain loop", "Ray Train"], [loop["images_per_s"], ray_ips], color=["#999", "#36c"])
        axes[-1].set_title("fine-tuning images/s")
        fig.tight_layout()
        fig.savefig(Path(args.out).with_suffix(".png"), dpi=100)
    except ImportError:
        pass
    print(json.dumps(out))


if __name__ == "__main__":
    main()

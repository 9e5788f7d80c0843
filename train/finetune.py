"""Mode ``finetune``: the network itself, trained with Ray Train.

Two phases, each its own ``TorchTrainer.fit()`` (changing ``requires_grad`` inside a DDP-wrapped model silently
breaks gradient sync): the classifier first with the backbone frozen (``head_epochs``), then the top blocks (or
all of them) unfrozen at ``lr x finetune_lr_factor``. timm's ``create_model(num_classes, drop_rate)`` and its
training transforms (derived from the model's pretrained config), label smoothing, AdamW with a cosine schedule,
AMP on GPU, early stopping on validation top-1. Images stream from Ray Data: decode (Lens's safe decoder) and
augment in CPU tasks, then to the workers. Every epoch is checkpointed; ``FailureConfig(max_failures)`` restarts a
lost worker group from the last checkpoint. Validation uses Lens's own preprocessing, the one serving uses.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lens import __version__
from lens.cluster import init_ray
from lens.decode import DecodeLimits
from lens.faults import crash_point
from lens.package import write_package

from .config import TrainConfig, effective_settings
from .dataset import Dataset
from .metrics import assess, confusion_png

__all__ = ["run_finetune", "train_loop"]

#: a timm EfficientNet's modules above the blocks; "top" also unfreezes the last two block stages
_TOP_MODULES = ("conv_head", "bn2", "classifier")


def _decode_batch(batch: dict, *, preprocess: dict, limits: DecodeLimits, training: bool, seed: int) -> dict:
    """Ray Data task: encoded images -> (N, 3, H, W) float32 tensors. Training rows get timm's augmentation;
    validation rows Lens's own preprocessing (what serving does). Undecodable rows were dropped before."""
    from lens.decode import decode_image
    from lens.preprocess import PreprocessConfig, Preprocessor

    pp = PreprocessConfig.from_dict(preprocess)
    if training:
        import torch
        from timm.data import create_transform

        torch.manual_seed(seed + int(batch["row"][0]))
        tf = create_transform(input_size=pp.input_size, is_training=True, mean=pp.mean, std=pp.std,
                              interpolation=pp.interpolation)
        xs = [tf(decode_image(bytes(b), limits).convert("RGB")).numpy() for b in batch["image"]]
    else:
        prep = Preprocessor(pp, limits)
        xs = [prep(bytes(b)) for b in batch["image"]]
    return {"x": np.stack(xs).astype(np.float32), "y": np.asarray(batch["label"], np.int64)}


def _set_trainable(model, unfreeze: str) -> None:
    for p in model.parameters():
        p.requires_grad = unfreeze == "all"
    if unfreeze == "head":
        for p in model.get_classifier().parameters():
            p.requires_grad = True
        return
    if unfreeze == "top":
        mods = [getattr(model, n) for n in _TOP_MODULES if hasattr(model, n)] + list(model.blocks[-2:])
        for m in mods:
            for p in m.parameters():
                p.requires_grad = True


def train_loop(config: dict) -> None:
    """One Ray Train worker: one phase of fine-tuning (``config["phase"]``)."""
    import ray.train
    import timm
    import torch
    from ray.train.torch import get_device, prepare_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])  # Ray sets 1 thread for a fractional CPU reservation
    torch.manual_seed(config["seed"])
    device = get_device()
    model = timm.create_model(config["model"], pretrained=False, num_classes=config["num_classes"],
                              drop_rate=config["dropout"])
    model.load_state_dict(config["state"], strict=True)
    start_epoch, best, stale, history = 1, (-1.0, math.inf), 0, []
    best_state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # a restarted worker group: resume where the last checkpoint left off
        with ckpt.as_directory() as d:
            saved = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        best_state = saved["best_model"]
        start_epoch, best, stale, history = saved["epoch"] + 1, tuple(saved["best"]), saved["stale"], saved["history"]
        history = history + [{"resumed_after_epoch": saved["epoch"]}]
    _set_trainable(model, config["unfreeze"])  # before DDP wraps it: DDP syncs what requires grad at wrap time
    model = prepare_model(model, move_to_device=True)
    core = model.module if hasattr(model, "module") else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    steps_per_epoch = max(1, math.ceil(config["n_train"] / world / config["batch_size"]))
    total = config["epochs"] * steps_per_epoch
    done = (start_epoch - 1) * steps_per_epoch  # a resumed run continues the schedule where it stopped
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s + done, total) / total)))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, config["epochs"] + 1):
        _train_mode(core)
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for batch in train_shard.iter_torch_batches(batch_size=config["batch_size"], device=device,
                                                    dtypes={"x": torch.float32, "y": torch.int64}):
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = loss_fn(model(batch["x"]), batch["y"])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            seen += len(batch["y"])
            loss_sum += float(loss.detach()) * len(batch["y"])
        train_s = time.perf_counter() - t0
        model.eval()
        stats = torch.zeros(5, dtype=torch.float64, device=device)  # correct, n, val loss sum, trained, loss sum
        with torch.no_grad():
            for batch in val_shard.iter_torch_batches(batch_size=64, device=device,
                                                      dtypes={"x": torch.float32, "y": torch.int64}):
                logits = model(batch["x"]).float()
                stats[0] += (logits.argmax(1) == batch["y"]).sum()
                stats[1] += len(batch["y"])
                stats[2] += torch.nn.functional.cross_entropy(logits, batch["y"], reduction="sum")
        stats[3], stats[4] = seen, loss_sum
        if world > 1:
            torch.distributed.all_reduce(stats)
        top1 = float(stats[0] / stats[1]) if stats[1] else math.nan
        val_loss = float(stats[2] / stats[1]) if stats[1] else math.nan
        row = {"phase": config["phase"], "epoch": epoch, "train_loss": round(float(stats[4] / max(stats[3], 1)), 5),
               "val_loss": round(val_loss, 5), "val_top1": round(top1, 5),
               "images_per_s": round(float(stats[3]) / max(train_s, 1e-9), 2), "train_seconds": round(train_s, 3)}
        history.append(row)
        if (top1, -val_loss) > (best[0], -best[1]):
            best, stale = (top1, val_loss), 0
            best_state = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
        else:
            stale += 1
        stop = bool(config["patience"]) and stale >= config["patience"]
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save({"model": {k: v.detach().cpu() for k, v in core.state_dict().items()},
                            "best_model": best_state, "epoch": epoch, "best": list(best), "stale": stale,
                            "history": history}, Path(d) / "state.pt")
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(row | {"stop": stop}, checkpoint=checkpoint)
        if rank == 0:
            crash_point("train.after_checkpoint")
        if stop:
            break


def _train_mode(model) -> None:
    """Training mode, except BatchNorm layers whose parameters are frozen: their running statistics stay."""
    import torch

    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def _datasets(ds: Dataset, class_id: dict, preprocess: dict, limits: DecodeLimits, seed: int):
    import ray.data

    out = {}
    for split in ("train", "val"):
        rows = [{"row": i, "image": ds.read(e), "label": class_id[e.label]}
                for i, e in enumerate(ds.examples) if e.split == split]
        out[split] = ray.data.from_items(rows).map_batches(
            _decode_batch, batch_size=16, fn_kwargs={"preprocess": preprocess, "limits": limits,
                                                    "training": split == "train", "seed": seed})
    return out


def _fit(phase: str, state: dict, cfg: TrainConfig, datasets, common: dict, epochs: int, lr: float, storage: str,
         log) -> tuple[dict, list]:
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import ray

    env = {k: os.environ[k] for k in ("LENS_CRASH_AT", "LENS_CACHE_DIR") if k in os.environ}
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    cpus = cfg.cpus_per_worker or (1.0 if cfg.use_gpu else max(0.25, min(4.0, (cluster_cpus - 1) / cfg.workers)))
    common = common | {"threads": max(1, cluster_cpus // cfg.workers) if not cfg.cpus_per_worker
                       else max(1, int(cfg.cpus_per_worker))}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=common | {"phase": phase, "state": state, "epochs": epochs, "lr": lr,
                                    "unfreeze": "head" if phase == "head" else cfg.unfreeze},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=RunConfig(name=f"lens-train-{phase}-{os.getpid()}-{int(time.time())}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             worker_runtime_env={"env_vars": env} if env else None),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"fine-tuning phase {phase} ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        saved = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
    for row in saved["history"]:
        if "epoch" in row:
            log(f"lens train: {phase} epoch {row['epoch']}/{epochs} train_loss {row['train_loss']:.4f} "
                f"val_top1 {row['val_top1']:.4f} ({row['images_per_s']:.1f} images/s)")
    return saved["best_model"] or saved["model"], saved["history"]


def run_finetune(cfg: TrainConfig, prep, *, log, started: float) -> dict:
    """Fine-tune on ``prep`` (a :class:`train.job.Prepared`) and write a ``finetune`` package."""
    import ray
    import torch
    from safetensors.torch import save

    from lens.runtime import _build_torch
    from lens.weights import resolve_weights

    init_ray(cfg.address, log=log, what="lens train")
    parent_ref = resolve_weights(cfg.model.name, cfg.model.weights, Path(cfg.model.cache_dir))
    parent, pp, _, _ = _build_torch(cfg.model, parent_ref)
    import timm

    ds = prep.ds  # undecodable images are already out (found by the embedding job's decoder), leaked ones too
    n_train = len(ds.split("train"))
    settings, applied = effective_settings(cfg, n_train)
    class_id = {c: i for i, c in enumerate(ds.classes)}
    model = timm.create_model(cfg.model.name, pretrained=False, num_classes=len(ds.classes),
                              drop_rate=settings["dropout"])
    sd = {k: v for k, v in parent.state_dict().items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise RuntimeError(f"parent weights do not fit {cfg.model.name}: missing {missing}, unexpected {unexpected}")
    del parent
    # a fresh classifier starts small: timm's EfficientNet init draws it from +-1/sqrt(num_classes), which on
    # 1280 ReLU6 features gives logits in the tens and a first phase spent unlearning them
    torch.nn.init.normal_(model.get_classifier().weight, std=0.01)
    torch.nn.init.zeros_(model.get_classifier().bias)
    unusable = prep.unusable
    limits = cfg.decode.limits()
    datasets = _datasets(ds, class_id, pp.to_dict(), limits, settings["seed"])
    common = {"model": cfg.model.name, "num_classes": len(ds.classes), "dropout": settings["dropout"],
              "batch_size": settings["batch_size"], "label_smoothing": settings["label_smoothing"],
              "weight_decay": settings["weight_decay"], "patience": settings["patience"], "seed": settings["seed"],
              "n_train": n_train}
    storage = cfg.checkpoint_storage or tempfile.mkdtemp(prefix="lens-train-ray-")
    t_fit = time.perf_counter()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    history: list = []
    if cfg.head_epochs:
        state, h = _fit("head", state, cfg, datasets, common, cfg.head_epochs, settings["lr"], storage, log)
        history += h
    state, h = _fit("finetune", state, cfg, datasets, common, settings["epochs"],
                    settings["lr"] * cfg.finetune_lr_factor, storage, log)
    history += h
    fit_seconds = time.perf_counter() - t_fit

    model.load_state_dict(state)
    model.eval()
    weights = save({k: v.contiguous() for k, v in model.state_dict().items()})
    # validation with the serving path's preprocessing, in this process
    from lens.preprocess import Preprocessor

    preprocessor = Preprocessor(pp, limits)
    val = ds.split("val")
    with torch.no_grad():
        logits = np.concatenate([model(torch.from_numpy(np.stack([preprocessor(ds.read(e))
                                                                   for e in val[i:i + 32]]))).numpy()
                                 for i in range(0, len(val), 32)])
    y = np.array([class_id[e.label] for e in val])
    metrics, thresholds = assess(logits, y, ds.classes, cfg.target_precision)
    import hashlib

    from lens.identity import ModelIdentity, labels_digest

    identity = ModelIdentity(model=cfg.model.name, weights_sha256=hashlib.sha256(weights).hexdigest(),
                             preprocess=pp.to_dict(), embed_dim=int(model.num_features),
                             num_classes=len(ds.classes), labels_sha256=labels_digest(ds.classes))
    epochs_rows = [r for r in history if "epoch" in r]
    summary_metrics = {k: metrics[k] for k in metrics if k not in ("per_class", "confusion")}
    training = {"mode": "finetune", **settings, "workers": cfg.workers, "use_gpu": cfg.use_gpu,
                "unfreeze": cfg.unfreeze, "head_epochs": cfg.head_epochs,
                "finetune_lr_factor": cfg.finetune_lr_factor, "recommended_applied": applied, "history": history,
                "fit_seconds": round(fit_seconds, 3),
                "restarts": sum(1 for r in history if "resumed_after_epoch" in r)}
    files = {"model.safetensors": weights, "labels.json": json.dumps(ds.classes).encode(),
             "metrics.json": json.dumps(metrics, indent=1).encode(),
             "confusion.png": confusion_png(np.asarray(metrics["confusion"]), ds.classes),
             "split.json": json.dumps({"train": [e.id for e in ds.split("train")], "val": [e.id for e in val],
                                       "removed_near_duplicates": [e.id for e in prep.removed],
                                       "unusable": [{"id": e.id, "error": e.error} for e in unusable]}).encode()}
    manifest = {"kind": "finetune", "name": cfg.package_name, "created": datetime.now(timezone.utc).isoformat(),
                "lens_version": __version__, "labels": ds.classes, "thresholds": [float(t) for t in thresholds],
                "target_precision": cfg.target_precision, "identity": identity.to_dict(),
                "parent_weights_sha256": parent_ref.sha256, "training": training,
                "dataset": ds.report() | {"errors": len(unusable), "embedding": prep.emb_report,
                                          "near_duplicates": prep.dedup},
                "metrics": summary_metrics}
    where = write_package(cfg.output, files, manifest, overwrite=cfg.overwrite)
    log(f"lens train: validation top-1 {metrics['top1']}; package written to {where}")
    return {"package": where, "name": cfg.package_name, "mode": "finetune", "classes": len(ds.classes),
            "train": n_train, "val": len(val), "metrics": summary_metrics, "settings": settings,
            "recommended_applied": applied, "errors": len(unusable), "restarts": training["restarts"],
            "near_duplicates": {k: prep.dedup[k] for k in ("pairs", "removed")},
            "epochs": epochs_rows, "fit_seconds": round(fit_seconds, 3),
            "seconds": round(time.perf_counter() - started, 3), "warnings": ds.warnings}


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("use: lens train --mode finetune")

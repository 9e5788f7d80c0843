"""Mode ``finetune``: the network itself, trained with Ray Train, starting from a trained classifier (LP-FT).

1. **Linear probe.** The backbone's pooled features of the training and validation images (serving's
   preprocessing, no augmentation) are computed once in the driver; a classifier is trained on them with the head
   recipe (:func:`lens.train.head.train_head`) and becomes the network's classifier. Fine-tuning starts from a
   classifier that already works, so its first steps do not tear down the backbone's features (Kumar et al.,
   "Fine-Tuning can Distort Pretrained Features", 2022).
2. **Fine-tune.** One ``TorchTrainer.fit()``: the classifier learns at ``lr``, the unfrozen backbone (its top
   blocks, or all of it) at ``lr x backbone_lr_mult``; linear warm-up, then cosine decay; BatchNorm running
   statistics frozen when a worker's batch is small; label smoothing, AdamW, AMP on GPU. Validation runs before the
   first step (the probe's own accuracy, "epoch 0") and after every epoch; the best state seen is what is packaged,
   so it is never worse on validation than the classifier it started from.

Images stream from Ray Data (decode with Lens's safe decoder and augment with timm's training transform, derived
from the model's pretrained config, in CPU tasks; order preserved, so one worker repeats its run). Every epoch is
checkpointed; ``FailureConfig(max_failures)`` restarts a lost worker group from the last checkpoint. Validation
and test use Lens's own preprocessing, the one serving uses.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from lens.cluster import init_ray, quiet_ray
from lens.faults import crash_point
from lens.runtime.decode import DecodeLimits

from .config import TrainConfig, effective_settings
from .dataset import Dataset
from .metrics import measure

__all__ = ["run_finetune", "train_loop"]

#: a timm EfficientNet's modules above the blocks; "top" also unfreezes the last two block stages
_TOP_MODULES = ("conv_head", "bn2", "classifier")


def _decode_batch(batch: dict, *, preprocess: dict, limits: DecodeLimits, training: bool, seed: int) -> dict:
    """Ray Data task: encoded images -> (N, 3, H, W) float32 tensors. Training rows get timm's augmentation
    (seeded per batch); validation rows Lens's own preprocessing (what serving does)."""
    from lens.runtime.decode import decode_image
    from lens.runtime.preprocess import PreprocessConfig, Preprocessor

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
    if unfreeze == "top":
        mods = [getattr(model, n) for n in _TOP_MODULES if hasattr(model, n)] + list(model.blocks[-2:])
        for m in mods:
            for p in m.parameters():
                p.requires_grad = True


def _schedule(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / max(1, total - warmup)))


def train_loop(config: dict) -> None:
    """One Ray Train worker of the fine-tuning phase."""
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
    start_epoch, best, stale, history = 0, (-1.0, math.inf), 0, []
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
    head = {id(p) for p in core.get_classifier().parameters()}
    groups = [{"params": [p for p in core.parameters() if p.requires_grad and id(p) in head], "lr": config["lr"]},
              {"params": [p for p in core.parameters() if p.requires_grad and id(p) not in head],
               "lr": config["lr"] * config["backbone_lr_mult"]}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config["weight_decay"])
    steps_per_epoch = max(1, math.ceil(config["n_train"] / world / config["batch_size"]))
    total = config["epochs"] * steps_per_epoch
    warmup = min(total, round(config["warmup_epochs"] * steps_per_epoch))
    done = max(0, start_epoch - 1) * steps_per_epoch  # a resumed run continues the schedule where it stopped
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s + done, warmup, total))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, config["epochs"] + 1):
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        if epoch > 0:  # epoch 0 only validates the starting point: the probe's classifier on frozen features
            _train_mode(core, freeze_bn=config["freeze_bn"])
            for batch in train_shard.iter_torch_batches(batch_size=config["batch_size"], device=device,
                                                        dtypes={"x": torch.float32, "y": torch.int64},
                                                        local_shuffle_buffer_size=4 * config["batch_size"],
                                                        local_shuffle_seed=config["seed"] * 1000 + epoch):
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
        row = {"phase": "finetune" if epoch else "probe", "epoch": epoch,
               "train_loss": round(float(stats[4] / max(stats[3], 1)), 5) if epoch else None,
               "val_loss": round(val_loss, 5), "val_top1": round(top1, 5),
               "images_per_s": round(float(stats[3]) / max(train_s, 1e-9), 2) if epoch else None,
               "train_seconds": round(train_s, 3)}
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
            if config.get("mlflow"):
                from .tracking import log_epoch_metrics

                log_epoch_metrics(config["mlflow"]["tracking_uri"], config["mlflow"]["run_id"], row["phase"], row)
            crash_point("train.after_checkpoint")
        if stop:
            break


def _train_mode(model, *, freeze_bn: bool) -> None:
    """Training mode, except BatchNorm layers whose running statistics stay: all of them with ``freeze_bn`` (small
    batches), else those whose parameters are frozen."""
    import torch

    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (
                freeze_bn or not any(p.requires_grad for p in m.parameters())):
            m.eval()


def _datasets(ds: Dataset, class_id: dict, preprocess: dict, limits: DecodeLimits, seed: int):
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # one worker repeats its run
    out = {}
    for split in ("train", "val"):
        rows = [{"row": i, "image": ds.read(e), "label": class_id[e.label]}
                for i, e in enumerate(ds.examples) if e.split == split]
        out[split] = ray.data.from_items(rows).map_batches(
            _decode_batch, batch_size=16, fn_kwargs={"preprocess": preprocess, "limits": limits,
                                                    "training": split == "train", "seed": seed})
    return out


def run_name(cfg: TrainConfig, fingerprint: str, parent_sha256: str, common: dict) -> str:
    """Ray Train's run name for this job: a digest of everything that decides what the run computes (the data's
    fingerprint, the parent weights, the settings, the package it is for). A restarted driver (a RayJob's retry)
    gets the same name and, with the same ``checkpoint_storage``, Ray Train resumes that run from its last
    checkpoint instead of starting over; another job never shares a run by accident."""
    what = {"data": fingerprint, "parent": parent_sha256, "model": cfg.model.name, "output": cfg.output,
            "unfreeze": cfg.unfreeze, "workers": cfg.workers, "use_gpu": cfg.use_gpu,
            "settings": {k: v for k, v in common.items() if k != "mlflow"}}
    return "lens-train-finetune-" + hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()
                                                   ).hexdigest()[:20]


def _fit(state: dict, cfg: TrainConfig, datasets, common: dict, storage: str, name: str,
         log) -> tuple[dict, list]:
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    env = {k: os.environ[k] for k in ("LENS_CRASH_AT", "LENS_CACHE_DIR") if k in os.environ}
    if common.get("mlflow"):
        from .tracking import worker_env

        env |= worker_env()
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    cpus = cfg.cpus_per_worker or (1.0 if cfg.use_gpu else max(0.25, min(4.0, (cluster_cpus - 1) / cfg.workers)))
    common = common | {"threads": max(1, cluster_cpus // cfg.workers) if not cfg.cpus_per_worker
                       else max(1, int(cfg.cpus_per_worker))}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=common | {"state": state, "unfreeze": cfg.unfreeze},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             worker_runtime_env={"env_vars": env} if env else None),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"fine-tuning ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        saved = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
    for row in saved["history"]:
        if row.get("phase") == "probe":
            log(f"lens train: finetune epoch 0 (the probe's classifier) val_top1 {row['val_top1']:.4f}")
        elif "epoch" in row:
            log(f"lens train: finetune epoch {row['epoch']}/{common['epochs']} train_loss {row['train_loss']:.4f} "
                f"val_top1 {row['val_top1']:.4f} ({row['images_per_s']:.1f} images/s, {row['train_seconds']:.0f} s)")
    return saved["best_model"] or saved["model"], saved["history"]


def _run_exists(storage: str, name: str) -> bool:
    from lens.storage import Location

    try:
        loc = Location.parse(storage)
        return loc.exists(loc.path(name))
    except (ValueError, OSError):
        return False


def _forward(model, ds: Dataset, rows: list, preprocessor, *, features: bool = False, batch: int = 32) -> np.ndarray:
    """The network's logits (or, with ``features``, its pooled features before the classifier) for ``rows``'
    images: serving's preprocessing, eval mode, in this process."""
    import torch

    out = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            x = torch.from_numpy(np.stack([preprocessor(ds.read(ds.examples[r])) for r in rows[i : i + batch]]))
            y = model.forward_head(model.forward_features(x), pre_logits=True) if features else model(x)
            out.append(y.float().numpy())
    width = model.num_features if features else model.num_classes
    return np.concatenate(out) if out else np.zeros((0, width), np.float32)


def run_finetune(cfg: TrainConfig, prep, *, log, tracking=None):
    """LP-FT on ``prep`` (a :class:`lens.train.candidate.Prepared`): the candidate a ``finetune`` package is written from
    (a :class:`lens.train.candidate.Trained`)."""
    import timm
    import torch
    from safetensors.torch import save

    from lens.identity import ModelIdentity, labels_digest
    from lens.runtime.loading import build_torch
    from lens.runtime.preprocess import Preprocessor
    from lens.runtime.weights import resolve_weights

    from .candidate import Trained
    from .head import train_head

    init_ray(cfg.address, log=log, what="lens train", log_to_driver=False)  # Lens prints each epoch itself
    quiet_ray()
    torch.manual_seed(cfg.seed)
    parent_ref = resolve_weights(cfg.model.name, cfg.model.weights, Path(cfg.model.cache_dir))
    parent, pp, _, _ = build_torch(cfg.model, parent_ref)
    ds, y, tr, va, te = prep.ds, prep.y, prep.tr.tolist(), prep.va.tolist(), prep.te.tolist()
    settings, applied = effective_settings(cfg, len(tr))
    classes = len(ds.classes)
    model = timm.create_model(cfg.model.name, pretrained=False, num_classes=classes, drop_rate=settings["dropout"])
    sd = {k: v for k, v in parent.state_dict().items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise RuntimeError(f"parent weights do not fit {cfg.model.name}: missing {missing}, unexpected {unexpected}")
    del parent
    limits = cfg.decode.limits()
    preprocessor = Preprocessor(pp, limits)

    # 1. the linear probe: the head recipe on the network's own (unnormalised) pooled features
    t_probe = time.perf_counter()
    feats = _forward(model, ds, tr + va, preprocessor, features=True)
    probe = train_head(feats[: len(tr)], y[tr], feats[len(tr):], y[va], classes, epochs=settings["epochs"],
                       lr=settings["lr"], batch_size=settings["batch_size"], dropout=settings["dropout"],
                       label_smoothing=settings["label_smoothing"], weight_decay=settings["weight_decay"],
                       patience=settings["patience"], seed=settings["seed"])
    with torch.no_grad():
        model.get_classifier().weight.copy_(torch.from_numpy(probe.weight))
        model.get_classifier().bias.copy_(torch.from_numpy(probe.bias))
    probe_s = time.perf_counter() - t_probe
    log(f"lens train: finetune: classifier trained on frozen features (best epoch {probe.best_epoch} of "
        f"{probe.epochs_run}, {probe_s:.1f} s with the features)")

    # 2. the network, from there
    freeze_bn = settings["batch_size"] < cfg.freeze_bn_below
    datasets = _datasets(ds, {c: i for i, c in enumerate(ds.classes)}, pp.to_dict(), limits, settings["seed"])
    common = {"model": cfg.model.name, "num_classes": classes, "dropout": settings["dropout"],
              "batch_size": settings["batch_size"], "label_smoothing": settings["label_smoothing"],
              "weight_decay": settings["weight_decay"], "patience": settings["patience"], "seed": settings["seed"],
              "n_train": len(tr), "epochs": cfg.finetune_epochs, "lr": settings["lr"],
              "backbone_lr_mult": cfg.backbone_lr_mult, "warmup_epochs": cfg.warmup_epochs, "freeze_bn": freeze_bn}
    storage = cfg.checkpoint_storage or tempfile.mkdtemp(prefix="lens-train-ray-")
    name = run_name(cfg, ds.fingerprint(), parent_ref.sha256, common)
    if cfg.checkpoint_storage and _run_exists(storage, name):
        log(f"lens train: finetune: resuming Ray Train run {name} from its checkpoints in {storage} (the same job "
            "ran there before: a restarted driver continues from the last checkpoint)")
    t_fit = time.perf_counter()
    if tracking is not None:  # rank 0 logs each epoch to the run as it ends
        common["mlflow"] = tracking.worker_config()
    state, history = _fit({k: v.clone() for k, v in model.state_dict().items()}, cfg, datasets, common, storage,
                          name, log)
    fit_seconds = time.perf_counter() - t_fit
    model.load_state_dict(state)
    weights = save({k: v.contiguous() for k, v in model.state_dict().items()})

    # 3. measured with the serving path's preprocessing, in this process: thresholds on validation, test reported
    val, test, thresholds = measure(_forward(model, ds, va, preprocessor), y[va], _forward(model, ds, te, preprocessor),
                                    y[te], ds.classes, cfg.target_precision)
    identity = ModelIdentity(model=cfg.model.name, weights_sha256=hashlib.sha256(weights).hexdigest(),
                             preprocess=pp.to_dict(), embed_dim=int(model.num_features), num_classes=classes,
                             labels_sha256=labels_digest(ds.classes))
    epochs_rows = [r for r in history if "epoch" in r]
    trained = [r for r in epochs_rows if r["epoch"] > 0]
    best = max(epochs_rows, key=lambda r: (r["val_top1"], -r["val_loss"]))
    training = {"mode": "finetune", **settings, "finetune_epochs": cfg.finetune_epochs,
                "backbone_lr_mult": cfg.backbone_lr_mult, "warmup_epochs": cfg.warmup_epochs,
                "bn_statistics_frozen": freeze_bn, "workers": cfg.workers, "use_gpu": cfg.use_gpu,
                "unfreeze": cfg.unfreeze, "target_precision": cfg.target_precision, "recommended_applied": applied,
                "probe": {"best_epoch": probe.best_epoch, "epochs_run": probe.epochs_run,
                          "seconds": round(probe_s, 3)},
                "best_epoch": best["epoch"], "history": history, "fit_seconds": round(fit_seconds, 3),
                "seconds_per_epoch": round(float(np.mean([r["train_seconds"] for r in trained])), 3) if trained
                else None, "restarts": sum(1 for r in history if "resumed_after_epoch" in r)}
    log(f"lens train: finetune: best validation at epoch {best['epoch']}" + (" (the probe itself)"
                                                                             if best["epoch"] == 0 else ""))
    return Trained("finetune", {"model.safetensors": weights, "labels.json": json.dumps(ds.classes).encode()},
                   identity, thresholds, val, test, training,
                   {"manifest": {"parent_weights_sha256": parent_ref.sha256}, "epochs": epochs_rows,
                    "restarts": training["restarts"], "fit_seconds": round(fit_seconds, 3),
                    "seconds_per_epoch": training["seconds_per_epoch"], "best_epoch": best["epoch"]})


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("use: lens train --mode finetune")

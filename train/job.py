"""``lens train``: check the data, embed it (cached), catch split leakage, train, measure, write the package."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from lens import __version__
from lens.cluster import absolute
from lens.identity import ModelIdentity
from lens.package import is_package, write_package

from .config import TrainConfig, effective_settings
from .dataset import Dataset, DatasetError, check_counts, discover
from .dedup import near_duplicates
from .metrics import assess, confusion_png

__all__ = ["run_train", "Prepared"]


def run_train(cfg: TrainConfig, *, log=print) -> dict:
    """Train ``cfg.mode`` on ``cfg.data`` and write the package to ``cfg.output``; returns the summary."""
    t0 = time.perf_counter()
    # local paths absolute before any Ray task sees them (a joined cluster's workers have another working folder)
    cfg = cfg.model_copy(update={k: absolute(getattr(cfg, k)) for k in ("data", "val_data", "output", "feedback",
                                                                         "checkpoint_storage")}
                         | {"model": cfg.model.with_absolute_paths()})
    if is_package(cfg.output) and not cfg.overwrite:  # before any compute
        raise DatasetError(f"{cfg.output} already holds a package; choose a new --output or pass --overwrite",
                           code="usage")
    ds = discover(cfg)
    for w in ds.warnings:
        log(f"lens train: warning: {w}")
    log(f"lens train: {len(ds.examples)} images in {len(ds.classes)} classes ({ds.layout}); "
        f"{len(ds.split('train'))} train / {len(ds.split('val'))} val")
    prep = _prepare(cfg, ds, log)
    if cfg.mode == "finetune":
        from .finetune import run_finetune

        return run_finetune(cfg, prep, log=log, started=t0)
    return _run_head(cfg, prep, log=log, started=t0)


@dataclass
class Prepared:
    """The training set after embedding (cached), error rows and the leakage check."""

    ds: Dataset  # usable examples only; with --dedup, the leaked training images are gone
    emb: np.ndarray  # (N, D): the backbone's embeddings of ds.examples
    y: np.ndarray  # class ids
    tr: np.ndarray  # row positions of training examples
    va: np.ndarray  # row positions of validation examples
    identity: ModelIdentity  # the backbone's
    unusable: list  # examples with an error
    removed: list  # training examples removed as near-duplicates
    dedup: dict
    emb_report: dict
    emb_seconds: float


def _usable(ds: Dataset, emb: np.ndarray) -> tuple[Dataset, np.ndarray]:
    keep = [i for i, e in enumerate(ds.examples) if not e.error]
    good = ds.take(keep)
    check_counts(good, after=" that decode")
    return good, emb[keep]


def _prepare(cfg: TrainConfig, ds: Dataset, log) -> Prepared:
    from lens.runtime import load_model

    from .features import embed_dataset

    model = load_model(cfg.model)
    identity = model.identity()
    del model
    t_emb = time.perf_counter()
    emb, emb_report = embed_dataset(ds, cfg.model, cfg.decode, identity, log=log, address=cfg.address)
    emb_seconds = time.perf_counter() - t_emb
    if emb_report["errors"]:
        log(f"lens train: {emb_report['errors']} image(s) could not be used: {emb_report['errors_by_code']}")
    unusable = [e for e in ds.examples if e.error]
    ds, emb = _usable(ds, emb)
    class_id = {c: i for i, c in enumerate(ds.classes)}
    y = np.array([class_id[e.label] for e in ds.examples])
    is_val = np.array([e.split == "val" for e in ds.examples])
    tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)

    pairs = near_duplicates(emb[tr], emb[va], cfg.dedup_threshold)
    leaked = sorted({int(tr[t]) for t, _, _ in pairs})
    dedup = {"threshold": cfg.dedup_threshold, "pairs": len(pairs), "train_images_involved": len(leaked),
             "removed": len(leaked) if cfg.dedup else 0,
             "examples": [{"train": ds.examples[tr[t]].id, "val": ds.examples[va[v]].id, "cosine": round(c, 4)}
                          for t, v, c in pairs[:10]]}
    if pairs:
        log(f"lens train: {len(pairs)} near-duplicate pair(s) across the split (cosine >= {cfg.dedup_threshold}; "
            f"{len(leaked)} training image(s)); " + ("removed from training" if cfg.dedup else
                                                     "validation accuracy is inflated by them: --dedup removes them"))
    removed = []
    if cfg.dedup and leaked:
        removed = [ds.examples[i] for i in leaked]
        keep = np.setdiff1d(np.arange(len(ds.examples)), leaked)
        ds = ds.take(keep)
        emb, y = emb[keep], y[keep]
        is_val = is_val[keep]
        tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
        missing = [c for c in ds.classes if not (y[tr] == class_id[c]).any()]
        if missing:
            raise DatasetError(f"--dedup removed every training image of {missing}: they all repeat validation images")
    return Prepared(ds=ds, emb=emb, y=y, tr=tr, va=va, identity=identity, unusable=unusable, removed=removed,
                    dedup=dedup, emb_report=emb_report, emb_seconds=emb_seconds)


def _run_head(cfg: TrainConfig, prep: Prepared, *, log, started: float) -> dict:
    from .head import train_head

    ds, emb, y, tr, va, identity = prep.ds, prep.emb, prep.y, prep.tr, prep.va, prep.identity
    dedup, emb_report, emb_seconds = prep.dedup, prep.emb_report, prep.emb_seconds
    settings, applied = effective_settings(cfg, len(tr))
    if applied:
        log(f"lens train: --recommended for {len(tr)} training images chose " +
            ", ".join(f"{k}={v:g}" for k, v in applied.items()))
    head = train_head(emb[tr], y[tr], emb[va], y[va], len(ds.classes), epochs=settings["epochs"],
                      lr=settings["lr"], batch_size=settings["batch_size"], dropout=settings["dropout"],
                      label_smoothing=settings["label_smoothing"], weight_decay=settings["weight_decay"],
                      patience=settings["patience"], seed=settings["seed"], log=log)
    metrics, thresholds = assess(emb[va] @ head.weight.T + head.bias, y[va], ds.classes, cfg.target_precision)
    log(f"lens train: validation top-1 {metrics['top1']}, macro F1 {metrics['macro_f1']}, ECE {metrics['ece']} "
        f"(best epoch {head.best_epoch} of {head.epochs_run}, {head.seconds:.2f} s)")

    dataset = ds.report() | {"fingerprint": ds.fingerprint(), "embedding": emb_report, "near_duplicates": dedup}
    summary_metrics = {k: metrics[k] for k in metrics if k not in ("per_class", "confusion")}
    training = {"mode": "head", **settings, "target_precision": cfg.target_precision,
                "recommended_applied": applied, "best_epoch": head.best_epoch, "epochs_run": head.epochs_run,
                "history": head.history, "head_seconds": round(head.seconds, 3),
                "embedding_seconds": round(emb_seconds, 3)}
    from safetensors.numpy import save

    files = {
        "head.safetensors": save({"weight": head.weight, "bias": head.bias}),
        "metrics.json": json.dumps(metrics, indent=1).encode(),
        "confusion.png": confusion_png(np.asarray(metrics["confusion"]), ds.classes),
        "split.json": json.dumps({"train": [ds.examples[i].id for i in tr], "val": [ds.examples[i].id for i in va],
                                  "removed_near_duplicates": [e.id for e in prep.removed],
                                  "unusable": [{"id": e.id, "error": e.error} for e in prep.unusable]},
                                 indent=0).encode(),
    }
    manifest = {"kind": "head", "name": cfg.package_name, "created": datetime.now(timezone.utc).isoformat(),
                "lens_version": __version__, "labels": ds.classes, "thresholds": [float(t) for t in thresholds],
                "target_precision": cfg.target_precision, "identity": identity.to_dict(),
                "training": training, "dataset": dataset, "metrics": summary_metrics}
    where = write_package(cfg.output, files, manifest, overwrite=cfg.overwrite)
    log(f"lens train: package written to {where}")
    return {"package": where, "name": cfg.package_name, "mode": "head", "classes": len(ds.classes),
            "train": int(len(tr)), "val": int(len(va)), "metrics": summary_metrics, "settings": settings,
            "recommended_applied": applied, "near_duplicates": {k: dedup[k] for k in ("pairs", "removed")},
            "errors": emb_report["errors"], "from_cache": emb_report["from_cache"],
            "embedding_seconds": round(emb_seconds, 3), "head_seconds": round(head.seconds, 3),
            "seconds": round(time.perf_counter() - started, 3), "warnings": ds.warnings}

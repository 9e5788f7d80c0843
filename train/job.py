"""``lens train``: check the data, embed it (cached), catch split leakage, train, measure, write the package.

Every mode trains the head (a classifier on the frozen backbone's embeddings: seconds). ``finetune`` (and
``auto`` on a large enough set) also fine-tunes the network from a classifier trained on its frozen features
(:mod:`lens.train.finetune`). Validation chooses (epochs, thresholds, and in ``auto`` which one is packaged); the test
split only reports, both candidates side by side.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import numpy as np

from lens import __version__
from lens.cluster import absolute, quiet_ray
from lens.package import check_output, is_package, write_package

from .candidate import Prepared, Trained
from .config import TrainConfig, effective_settings
from .dataset import Dataset, DatasetError, check_counts, discover
from .dedup import near_duplicates
from .metrics import confusion_png, measure, summary

__all__ = ["run_train", "Prepared", "Trained"]


def run_train(cfg: TrainConfig, *, log=print) -> dict:
    """Train on ``cfg.data`` as ``cfg.mode`` asks and write the package to ``cfg.output``; returns the summary."""
    t0 = time.perf_counter()
    quiet_ray()  # lens train prints its own progress: Ray's progress bars and INFO logs stay off the terminal
    # local paths absolute before any Ray task sees them (a joined cluster's workers have another working folder)
    cfg = cfg.model_copy(update={k: absolute(getattr(cfg, k)) for k in ("data", "val_data", "test_data", "output",
                                                                         "feedback", "feedback_index",
                                                                         "checkpoint_storage")}
                         | {"model": cfg.model.with_absolute_paths()})
    if is_package(cfg.output) and not cfg.overwrite:  # before any compute
        raise DatasetError(f"{cfg.output} already holds a package; choose a new --output or pass --overwrite",
                           code="usage")
    check_output(cfg.output, keep=(cfg.data, cfg.val_data, cfg.test_data, cfg.feedback))  # before any compute too
    tracking = None
    if cfg.mlflow is not None:
        from .tracking import MlflowRun

        tracking = MlflowRun.start(cfg, log=log)
    try:
        return _run(cfg, t0, tracking, log)
    except BaseException as e:
        if tracking is not None:
            tracking.fail(e)
        raise


def _run(cfg: TrainConfig, t0: float, tracking, log) -> dict:
    ds = discover(cfg)
    for w in ds.warnings:
        log(f"lens train: warning: {w}")
    log(f"lens train: {len(ds.examples)} images in {len(ds.classes)} classes ({ds.layout}); "
        f"{len(ds.split('train'))} train / {len(ds.split('val'))} val / {len(ds.split('test'))} test")
    prep = _prepare(cfg, ds, log)
    head = _train_head(cfg, prep, log)
    if tracking is not None:
        tracking.log_epochs("head", head.training["history"])
    candidates = {"head": head}
    per_class = len(prep.tr) / len(prep.ds.classes)
    if cfg.mode == "head":
        why = "--mode head"
    elif cfg.mode == "auto" and per_class < cfg.finetune_min_per_class:
        why = (f"--mode auto: {per_class:.0f} training images per class, below finetune_min_per_class "
               f"{cfg.finetune_min_per_class}: fine-tuning the network is not expected to pay")
    else:
        from .finetune import run_finetune

        candidates["finetune"] = run_finetune(cfg, prep, log=log, tracking=tracking)
        why = "--mode finetune" if cfg.mode == "finetune" else (
            f"--mode auto: {per_class:.0f} training images per class (>= {cfg.finetune_min_per_class}): both trained")
    chosen = _choose(cfg, candidates)
    if cfg.mode == "auto" and len(candidates) > 1:
        why += f"; {chosen.kind} is better on validation ({_cmp(candidates)})"
    log(f"lens train: packaging the {chosen.kind} ({why})")
    for t in candidates.values():
        log(f"lens train: {t.kind}: validation top-1 {t.val['top1']}, test top-1 {t.test.get('top1')}, test "
            f"precision/recall at the tuned thresholds {t.test['at_thresholds']['macro_precision']}/"
            f"{t.test['at_thresholds']['macro_recall']}")
    out = _write(cfg, prep, chosen, candidates, why, started=t0, tracking=tracking, log=log)
    if tracking is not None:
        from lens.package import open_package

        pkg = open_package(out["package"], cache_dir=cfg.model.cache_dir)
        out["mlflow"] = {"run_id": tracking.run_id, "experiment_id": tracking.experiment_id}
        tracking.finish(out | {"package_sha256": pkg.sha256,
                               "dataset_fingerprint": pkg.manifest["dataset"]["fingerprint"]},
                        pkg, chosen.test, prep.ds.classes, log)
    return out


def _usable(ds: Dataset, emb: np.ndarray) -> tuple[Dataset, np.ndarray]:
    keep = [i for i, e in enumerate(ds.examples) if not e.error]
    good = ds.take(keep)
    check_counts(good, after=" that decode")
    return good, emb[keep]


def _rows(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    split = np.array([e.split for e in ds.examples])
    return np.flatnonzero(split == "train"), np.flatnonzero(split == "val"), np.flatnonzero(split == "test")


def _prepare(cfg: TrainConfig, ds: Dataset, log) -> Prepared:
    from lens.runtime.loading import load_model

    from .features import embed_dataset

    model = load_model(cfg.model)
    identity = model.identity()
    del model
    # One choice per job: `backend: auto` chose here, and the embedding job runs exactly that backend (its own
    # driver would measure again at its actors' thread count and, near a tie, could pick the other runtime).
    pinned = cfg.model.model_copy(update={"backend": identity.backend or cfg.model.backend})
    t_emb = time.perf_counter()
    emb, emb_report = embed_dataset(ds, pinned, cfg.decode, identity, log=log, address=cfg.address)
    emb_seconds = time.perf_counter() - t_emb
    if emb_report["errors"]:
        log(f"lens train: {emb_report['errors']} image(s) could not be used: {emb_report['errors_by_code']}")
    unusable = [e for e in ds.examples if e.error]
    ds, emb = _usable(ds, emb)
    class_id = {c: i for i, c in enumerate(ds.classes)}
    y = np.array([class_id[e.label] for e in ds.examples])
    tr, va, te = _rows(ds)
    held = np.concatenate([va, te])  # validation and test: neither may repeat a training image

    pairs = near_duplicates(emb[tr], emb[held], cfg.dedup_threshold)
    leaked = sorted({int(tr[t]) for t, _, _ in pairs})
    dedup = {"threshold": cfg.dedup_threshold, "pairs": len(pairs), "train_images_involved": len(leaked),
             "removed": len(leaked) if cfg.dedup else 0,
             "examples": [{"train": ds.examples[tr[t]].id, ds.examples[held[v]].split: ds.examples[held[v]].id,
                           "cosine": round(c, 4)} for t, v, c in pairs[:10]]}
    if pairs:
        log(f"lens train: {len(pairs)} near-duplicate pair(s) across the split (cosine >= {cfg.dedup_threshold}; "
            f"{len(leaked)} training image(s)); " + ("removed from training" if cfg.dedup else
                                                     "held-out accuracy is inflated by them: --dedup removes them"))
    removed = []
    if cfg.dedup and leaked:
        removed = [ds.examples[i] for i in leaked]
        keep = np.setdiff1d(np.arange(len(ds.examples)), leaked)
        ds = ds.take(keep)
        emb, y = emb[keep], y[keep]
        tr, va, te = _rows(ds)
        missing = [c for c in ds.classes if not (y[tr] == class_id[c]).any()]
        if missing:
            raise DatasetError(f"--dedup removed every training image of {missing}: they all repeat held-out images")
    return Prepared(ds=ds, emb=emb, y=y, tr=tr, va=va, te=te, identity=identity, unusable=unusable, removed=removed,
                    dedup=dedup, emb_report=emb_report, emb_seconds=emb_seconds)


def _train_head(cfg: TrainConfig, prep: Prepared, log) -> Trained:
    from safetensors.numpy import save

    from .head import train_head

    ds, emb, y, tr, va, te = prep.ds, prep.emb, prep.y, prep.tr, prep.va, prep.te
    settings, applied = effective_settings(cfg, len(tr))
    if applied:
        log(f"lens train: --recommended for {len(tr)} training images chose " +
            ", ".join(f"{k}={v:g}" for k, v in applied.items()))
    head = train_head(emb[tr], y[tr], emb[va], y[va], len(ds.classes), epochs=settings["epochs"],
                      lr=settings["lr"], batch_size=settings["batch_size"], dropout=settings["dropout"],
                      label_smoothing=settings["label_smoothing"], weight_decay=settings["weight_decay"],
                      patience=settings["patience"], seed=settings["seed"], log=log)
    val, test, thresholds = measure(emb[va] @ head.weight.T + head.bias, y[va], emb[te] @ head.weight.T + head.bias,
                                    y[te], ds.classes, cfg.target_precision)
    log(f"lens train: head: validation top-1 {val['top1']}, macro F1 {val['macro_f1']}, ECE {val['ece']} "
        f"(best epoch {head.best_epoch} of {head.epochs_run}, {head.seconds:.2f} s)")
    training = {"mode": "head", **settings, "target_precision": cfg.target_precision,
                "recommended_applied": applied, "best_epoch": head.best_epoch, "epochs_run": head.epochs_run,
                "history": head.history, "head_seconds": round(head.seconds, 3),
                "embedding_seconds": round(prep.emb_seconds, 3)}
    return Trained("head", {"head.safetensors": save({"weight": head.weight, "bias": head.bias})}, prep.identity,
                   thresholds, val, test, training, {"head_seconds": round(head.seconds, 3)})


def _choose(cfg: TrainConfig, candidates: dict) -> Trained:
    """``--mode finetune`` packages the fine-tune; ``auto`` the better on validation (top-1, then loss-free ties go
    to the head, which rides on the shared backbone); ``head`` the head. Test numbers never choose."""
    if cfg.mode == "finetune":
        return candidates["finetune"]
    if "finetune" in candidates and candidates["finetune"].val["top1"] > candidates["head"].val["top1"]:
        return candidates["finetune"]
    return candidates["head"]


def _cmp(candidates: dict) -> str:
    return ", ".join(f"{k} {t.val['top1']}" for k, t in candidates.items())


def _write(cfg: TrainConfig, prep: Prepared, chosen: Trained, candidates: dict, why: str, *, started: float,
           tracking=None, log) -> dict:
    ds = prep.ds
    ids = {s: [ds.examples[i].id for i in rows] for s, rows in (("train", prep.tr), ("val", prep.va),
                                                                ("test", prep.te))}
    compare = {k: {"val_top1": t.val["top1"], "test_top1": t.test.get("top1"),
                   "test_macro_precision_at_thresholds": t.test["at_thresholds"]["macro_precision"],
                   "test_macro_recall_at_thresholds": t.test["at_thresholds"]["macro_recall"]}
               for k, t in candidates.items()}
    files = chosen.files | {
        "metrics.json": json.dumps({"test": chosen.test, "validation": chosen.val}, indent=1).encode(),
        "confusion.png": confusion_png(np.asarray(chosen.test.get("confusion", chosen.val["confusion"])), ds.classes),
        "split.json": json.dumps(ids | {"removed_near_duplicates": [e.id for e in prep.removed],
                                        "unusable": [{"id": e.id, "error": e.error} for e in prep.unusable]},
                                 indent=0).encode(),
    }
    dataset = ds.report() | {"fingerprint": ds.fingerprint(), "embedding": prep.emb_report,
                             "near_duplicates": prep.dedup, "errors": len(prep.unusable)}
    manifest = {"kind": chosen.kind, "name": cfg.package_name, "created": datetime.now(timezone.utc).isoformat(),
                "lens_version": __version__, "labels": ds.classes,
                "thresholds": [float(t) for t in chosen.thresholds], "target_precision": cfg.target_precision,
                "model_identity": chosen.identity.to_dict(), "training": chosen.training | {"requested_mode": cfg.mode,
                                                                                     "chosen_because": why} | (
                    {"mlflow": {"run_id": tracking.run_id, "experiment_id": tracking.experiment_id}}
                    if tracking is not None else {}),
                "dataset": dataset, "metrics": summary(chosen.test), "validation": summary(chosen.val),
                "compare": compare} | chosen.extra.get("manifest", {})
    where = write_package(cfg.output, files, manifest, overwrite=cfg.overwrite,
                          keep=(cfg.data, cfg.val_data, cfg.test_data, cfg.feedback))
    log(f"lens train: test top-1 {chosen.test.get('top1')} ({chosen.kind}); package written to {where}")
    return {"package": where, "name": cfg.package_name, "mode": chosen.kind, "requested_mode": cfg.mode,
            "chosen_because": why, "classes": len(ds.classes), "train": int(len(prep.tr)), "val": int(len(prep.va)),
            "test": int(len(prep.te)), "metrics": summary(chosen.test), "validation": summary(chosen.val),
            "compare": compare, "settings": {k: chosen.training[k] for k in ("epochs", "lr", "batch_size", "dropout",
                                                                              "label_smoothing", "weight_decay",
                                                                              "patience", "seed")},
            "recommended_applied": chosen.training["recommended_applied"],
            "near_duplicates": {k: prep.dedup[k] for k in ("pairs", "removed")},
            "errors": prep.emb_report["errors"], "from_cache": prep.emb_report["from_cache"],
            "embedding_seconds": round(prep.emb_seconds, 3), "seconds": round(time.perf_counter() - started, 3),
            "warnings": ds.warnings} | {k: v for k, v in chosen.extra.items() if k != "manifest"} | (
                {"head_seconds": candidates["head"].extra["head_seconds"]})

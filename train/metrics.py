"""Metrics of a trained classifier, per-class score thresholds, and the confusion-matrix picture.

Thresholds are tuned on the validation split (:func:`assess`); :func:`measure` then reports accuracy and the
precision and recall those thresholds give on the test split, which chose nothing.
"""

from __future__ import annotations

import io

import numpy as np

from lens.runtime.heads import softmax

__all__ = ["assess", "measure", "evaluate", "tune_thresholds", "at_thresholds", "summary", "confusion_png"]


def _ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence (equal-width bins)."""
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def evaluate(probs: np.ndarray, y: np.ndarray, labels: list[str]) -> dict:
    """top-1, top-5, per-class precision/recall/F1/support, the confusion matrix (rows: truth) and the
    calibration error, on validation probabilities ``probs`` (N, C)."""
    c = len(labels)
    pred = probs.argmax(1)
    k = min(5, c)
    topk = np.argsort(-probs, axis=1)[:, :k]
    cm = np.zeros((c, c), np.int64)
    np.add.at(cm, (y, pred), 1)
    per_class = {}
    for i, name in enumerate(labels):
        tp = int(cm[i, i])
        p_den, r_den = int(cm[:, i].sum()), int(cm[i].sum())
        prec = tp / p_den if p_den else 0.0
        rec = tp / r_den if r_den else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[name] = {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4), "support": r_den}
    return {
        "top1": round(float((pred == y).mean()), 4) if len(y) else None,
        f"top{k}": round(float((topk == y[:, None]).any(1).mean()), 4) if len(y) else None,
        "macro_f1": round(float(np.mean([v["f1"] for v in per_class.values()])), 4),
        "ece": round(_ece(probs, y), 4) if len(y) else None,
        "per_class": per_class,
        "confusion": cm.tolist(),
        "n": int(len(y)),
    }


def tune_thresholds(probs: np.ndarray, y: np.ndarray, target_precision: float) -> tuple[np.ndarray, dict]:
    """Per class, the lowest score threshold whose validation precision (images scoring at or above it that
    truly are the class) reaches ``target_precision``: the most recall at that precision. A class that never
    reaches it gets the threshold of its best F1 instead, and is listed as not meeting the target."""
    c = probs.shape[1]
    out = np.ones(c, np.float32)
    detail = {}
    for j in range(c):
        s, pos = probs[:, j], (y == j)
        order = np.argsort(-s, kind="stable")
        tp = np.cumsum(pos[order])
        n = np.arange(1, len(order) + 1)
        precision = tp / n
        recall = tp / max(1, pos.sum())
        # only cut between distinct scores: a threshold keeps every image scoring at or above it
        last_of_tie = np.r_[s[order][1:] != s[order][:-1], True]
        ok = last_of_tie & (precision >= target_precision) & (tp > 0)
        if ok.any():
            i = np.flatnonzero(ok)[-1]
            met = True
        else:
            f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0) * last_of_tie
            i = int(np.argmax(f1))
            met = False
        out[j] = float(s[order][i]) if len(order) else 1.0
        detail[j] = {"threshold": round(float(out[j]), 6), "precision": round(float(precision[i]), 4) if len(order) else 0,
                     "recall": round(float(recall[i]), 4) if len(order) else 0, "target_met": met}
    return out, detail


def assess(logits: np.ndarray, y: np.ndarray, labels: list[str], target_precision: float) -> tuple[dict, np.ndarray]:
    """(metrics with each class's tuned threshold, thresholds) of a classifier's validation ``logits``, scored
    with the softmax serving uses."""
    probs = softmax(logits)
    metrics = evaluate(probs, y, labels)
    thresholds, per_class = tune_thresholds(probs, y, target_precision)
    for j, name in enumerate(labels):
        metrics["per_class"][name]["threshold"] = per_class[j]
    return metrics, thresholds


def at_thresholds(probs: np.ndarray, y: np.ndarray, thresholds: np.ndarray, labels: list[str]) -> dict:
    """Per class, the precision and recall of the tags ``thresholds`` give (an image is tagged with a class when
    its probability reaches the class's threshold), and their macro means over classes with test images."""
    per = {}
    for j, name in enumerate(labels):
        tagged, pos = probs[:, j] >= thresholds[j], y == j
        tp = int((tagged & pos).sum())
        per[name] = {"threshold": round(float(thresholds[j]), 6), "tagged": int(tagged.sum()), "support": int(pos.sum()),
                     "precision": round(tp / tagged.sum(), 4) if tagged.any() else None,
                     "recall": round(tp / pos.sum(), 4) if pos.any() else None}
    prec = [v["precision"] for v in per.values() if v["precision"] is not None]
    rec = [v["recall"] for v in per.values() if v["recall"] is not None]
    return {"per_class": per, "macro_precision": round(float(np.mean(prec)), 4) if prec else None,
            "macro_recall": round(float(np.mean(rec)), 4) if rec else None}


def measure(val_logits: np.ndarray, y_val: np.ndarray, test_logits: np.ndarray, y_test: np.ndarray,
            labels: list[str], target_precision: float) -> tuple[dict, dict, np.ndarray]:
    """(validation metrics with the thresholds tuned on them, test metrics of those thresholds, thresholds)."""
    val, thresholds = assess(val_logits, y_val, labels, target_precision)
    probs = softmax(test_logits)
    test = evaluate(probs, y_test, labels) if len(y_test) else {"n": 0}
    test["at_thresholds"] = at_thresholds(probs, y_test, thresholds, labels)
    return val, test, thresholds


def summary(metrics: dict) -> dict:
    """The headline numbers of a metrics dict (no per-class tables, no confusion matrix)."""
    out = {k: v for k, v in metrics.items() if k not in ("per_class", "confusion", "at_thresholds")}
    if "at_thresholds" in metrics:
        out |= {f"{k}_at_thresholds": metrics["at_thresholds"][k] for k in ("macro_precision", "macro_recall")}
    return out


def confusion_png(cm: np.ndarray, labels: list[str]) -> bytes:
    """The confusion matrix (rows: truth, columns: prediction; shade = share of the row) as a PNG."""
    from PIL import Image, ImageDraw, ImageFont

    cm = np.asarray(cm)
    c = len(labels)
    cell = max(18, min(48, 640 // max(c, 1)))
    names = [lab if len(lab) <= 18 else lab[:17] + "…" for lab in labels]
    font = ImageFont.load_default()
    margin = 8 + 7 * max(len(n) for n in names)
    size = (margin + c * cell + 10, margin + c * cell + 10)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    rows = cm.sum(1, keepdims=True).clip(min=1)
    share = cm / rows
    for i in range(c):
        d.text((4, margin + i * cell + cell // 2 - 5), names[i], fill="black", font=font)
        for j in range(c):
            v = float(share[i, j])
            shade = int(255 * (1 - v))
            x, yy = margin + j * cell, margin + i * cell
            d.rectangle([x, yy, x + cell - 1, yy + cell - 1], fill=(shade, shade, 255), outline=(200, 200, 200))
            if cm[i, j] and cell >= 24:
                d.text((x + 3, yy + cell // 2 - 5), str(int(cm[i, j])), fill="white" if v > 0.5 else "black",
                       font=font)
    label_strip = Image.new("RGB", (margin, c * cell), "white")
    ds = ImageDraw.Draw(label_strip)
    for j in range(c):
        ds.text((4, j * cell + cell // 2 - 5), names[j], fill="black", font=font)
    img.paste(label_strip.rotate(90, expand=True), (margin, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()

"""Custom tags from a ``head`` package, served on top of the backbone's forward pass.

A head is one linear layer on the L2-normalised embedding the predictor already computes, so several heads
share one backbone and cost a (N, D) x (D, C) product each. Tags are the classes whose probability reaches the
class's own threshold (tuned on validation for a target precision by ``lens train``), best first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lens.errors import ConfigError
from lens.identity import ModelIdentity, identity_of
from lens.package import Package, PackageError, open_package

__all__ = ["Head", "load_head", "softmax", "threshold_tags"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32: the one Lens scores classes with, when serving and when tuning thresholds."""
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    return z / z.sum(axis=-1, keepdims=True)


def threshold_tags(probs: np.ndarray, labels: list[str], thresholds: np.ndarray,
                   top_k: int | None = None) -> list[list[dict]]:
    """Per row, best first: ``[{label, class_id, score}]`` of the classes whose probability reaches their threshold
    (a custom classifier's tags, tuned on validation by ``lens train``; a row may have none); or, with ``top_k``,
    the ``top_k`` most probable classes whatever their score, each with ``passed`` (at or above its threshold)."""
    out = []
    for row in probs:
        if top_k is None:
            hit = np.flatnonzero(row >= thresholds)
            hit = hit[np.argsort(-row[hit], kind="stable")]
            out.append([{"label": labels[i], "class_id": int(i), "score": float(row[i])} for i in hit])
        else:
            best = np.argsort(-row, kind="stable")[:top_k]
            out.append([{"label": labels[i], "class_id": int(i), "score": float(row[i]),
                         "passed": bool(row[i] >= thresholds[i])} for i in best])
    return out


@dataclass
class Head:
    name: str
    labels: list[str]
    weight: np.ndarray  # (C, D) float32
    bias: np.ndarray  # (C,) float32
    thresholds: np.ndarray  # (C,) float32: a class is a tag when its probability >= its threshold
    backbone: ModelIdentity
    sha256: str
    uri: str

    def check_backbone(self, identity: ModelIdentity) -> None:
        """Refuse a backbone whose embeddings differ from the ones the head was trained on."""
        diff = self.backbone.mismatch(identity)
        if diff:
            raise ConfigError(
                f"head {self.name!r} ({self.uri}) was trained on {self.backbone.model} with weights "
                f"{self.backbone.weights_sha256[:12]}..., but this pool runs {identity.model} with weights "
                f"{identity.weights_sha256[:12]}... (differs in {', '.join(diff)}); serve it on the backbone it "
                "was trained on, or train it again on this one")

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(embeddings, dtype=np.float32) @ self.weight.T + self.bias)

    def tags(self, embeddings: np.ndarray, top_k: int | None = None) -> list[list[dict]]:
        """Per row: :func:`threshold_tags` of this head's probabilities (thresholded, or its ``top_k`` best)."""
        return threshold_tags(self.probabilities(embeddings), self.labels, self.thresholds, top_k)

    def info(self) -> dict:
        return {"name": self.name, "uri": self.uri, "sha256": self.sha256, "classes": len(self.labels)}


def load_head(uri: str, *, cache_dir=None, max_bytes: int | None = None, deadline_s: float | None = None) -> Head:
    """A ``head`` package, verified; :class:`~lens.package.PackageError` naming the file otherwise. ``max_bytes``
    and ``deadline_s`` bound a download (:func:`lens.package.open_package`)."""
    from safetensors.numpy import load_file

    limits = {"max_bytes": max_bytes} if max_bytes is not None else {}
    pkg: Package = open_package(uri, cache_dir=cache_dir, deadline_s=deadline_s, **limits)
    if pkg.kind != "head":
        raise PackageError(f"{uri} is a {pkg.kind} package: give it as the model's weights, not as a head",
                           code="usage", status=400)
    m = pkg.manifest
    tensors = load_file(str(pkg.file("head.safetensors")))
    weight, bias = tensors["weight"].astype(np.float32), tensors["bias"].astype(np.float32)
    labels = list(m["labels"])
    thresholds = np.asarray(m["thresholds"], dtype=np.float32)
    backbone = ModelIdentity.from_dict(identity_of(m) or {})
    if weight.shape != (len(labels), backbone.embed_dim) or bias.shape != (len(labels),) \
            or thresholds.shape != (len(labels),):
        raise PackageError(f"head {uri}: weight {weight.shape}, bias {bias.shape} and {len(thresholds)} thresholds "
                           f"do not fit {len(labels)} classes on a {backbone.embed_dim}-dim embedding")
    return Head(name=m["name"], labels=labels, weight=weight, bias=bias, thresholds=thresholds, backbone=backbone,
                sha256=pkg.sha256, uri=str(uri))

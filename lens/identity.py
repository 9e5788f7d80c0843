"""A model's identity: what makes two embeddings comparable, and the one way Lens writes it into an artefact.

Every artefact that holds embeddings or results records ``"model_identity": ModelIdentity.to_dict()``
(:data:`IDENTITY_KEY`): the bulk-embedding job file and manifest, the index manifest, model packages, drift
profiles, event embedding parts (Parquet schema metadata ``lens_model_identity``), sidecars and the HTTP API.
:func:`identity_of` reads it, and also the ``identity`` key packages and drift profiles used before. :meth:`ModelIdentity.from_dict` also reads what earlier Lens versions
wrote (a flat ``dim`` or ``embed_dim``, the index manifest's nested ``model`` block, a replica's whole
``info()`` in ``lens_model``), so existing outputs stay readable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Sequence

__all__ = ["ModelIdentity", "labels_digest", "identity_of", "precision_compat", "space_refusal", "IDENTITY_KEY",
           "PARQUET_KEY", "LEGACY_PARQUET_KEY", "COMPAT_KEY"]

#: The one JSON key every artefact writes a model identity under.
IDENTITY_KEY = "model_identity"
#: What model packages and drift profiles wrote before (read, never written).
LEGACY_IDENTITY_KEY = "identity"

#: Parquet schema-metadata key of an embedding part's identity (and the key earlier versions used).
PARQUET_KEY = b"lens_model_identity"
LEGACY_PARQUET_KEY = b"lens_model"
#: Fields that must agree for two embeddings to be comparable.
COMPARED = ("model", "weights_sha256", "preprocess", "embed_dim")
#: Index manifest key of what the index's rows may be mixed with (:func:`precision_compat`).
COMPAT_KEY = "precision_compat"
#: What an int8 identity records of its accuracy gate (:meth:`ModelIdentity.quantization`).
QUANTIZATION_FIELDS = ("calibration_sha256", "nncf", "holdout", "holdout_sha256", "recall_at_10_vs_fp32_index",
                       "recall_at_10_vs_int8_index", "min_recall_at_10")
#: Bump to orphan every cache of model outputs (see :meth:`ModelIdentity.outputs_key`).
OUTPUTS_KEY_FORMAT = 2


def quantization_of(report: dict | None, precision: str) -> dict | None:
    """An int8 identity's ``quantization`` from an accuracy-gate report (or an identity's own, or a model's
    ``info()``): :data:`QUANTIZATION_FIELDS` only; None for vectors that are not int8."""
    if precision != "int8" or not isinstance(report, dict):
        return None
    least = report.get("min_recall_at_10", (report.get("thresholds") or {}).get("min_recall_at_10"))
    return {k: report.get(k) for k in QUANTIZATION_FIELDS} | {"min_recall_at_10": least}


def identity_of(doc: dict) -> dict | None:
    """The identity dict an artefact (a manifest, a profile header) holds, under :data:`IDENTITY_KEY` or the
    earlier ``identity``; None when it holds none."""
    for key in (IDENTITY_KEY, LEGACY_IDENTITY_KEY):
        if isinstance(doc.get(key), dict):
            return doc[key]
    return None


def labels_digest(labels: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(labels).encode()).hexdigest()


@dataclass
class ModelIdentity:
    model: str  # timm architecture name
    weights_sha256: str
    preprocess: dict  # PreprocessConfig.to_dict()
    embed_dim: int
    num_classes: int | None = None
    labels_sha256: str | None = None
    precision: str = "fp32"  # the weights' numeric form where the embeddings were made (fp32, fp16, int8 ...)
    backend: str | None = None  # onnx, openvino, torch: recorded, not compared (fp32 backends agree; int8 is
    #                             gated on recall against fp32 before it serves)
    version: str | None = None  # registry name@version the model was served from: recorded, not compared (the
    #                             weights digest already decides comparability)
    backend_version: str | None = None  # the runtime's release (onnxruntime, openvino, torch): recorded, and part
    #                                     of every cache key of model outputs (outputs_key)
    quantization: dict | None = None  # int8 only: which quantized model (calibration digest, NNCF release) and
    #                                   what its gate measured on held-out images (QUANTIZATION_FIELDS); the
    #                                   calibration and NNCF release are part of outputs_key

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelIdentity":
        """From :meth:`to_dict`, from an artefact holding it under ``model_identity`` (or the earlier
        ``identity``: :func:`identity_of`), or from what earlier versions wrote (see the module docstring)."""
        wrapped = identity_of(d)
        if wrapped is not None:
            d = wrapped
        elif isinstance(d.get("model"), dict):  # index manifest before model_identity: {"model": {...}, "dim": N}
            d = d["model"] | {"embed_dim": d.get("dim")}
        dim = d.get("embed_dim", d.get("dim"))
        missing = [k for k, v in (("model", d.get("model")), ("weights_sha256", d.get("weights_sha256")),
                                  ("preprocess", d.get("preprocess")), ("embed_dim", dim)) if v is None]
        if missing:
            raise ValueError(f"not a model identity: missing {', '.join(missing)}")
        return cls(model=str(d["model"]), weights_sha256=str(d["weights_sha256"]), preprocess=dict(d["preprocess"]),
                   embed_dim=int(dim), num_classes=d.get("num_classes"), labels_sha256=d.get("labels_sha256"),
                   precision=d.get("precision") or "fp32", backend=d.get("backend"), version=d.get("version"),
                   backend_version=d.get("backend_version"),
                   quantization=quantization_of(d.get("quantization"), d.get("precision") or "fp32"))

    def comparable(self) -> dict:
        """The fields that decide whether embeddings can be compared."""
        return {k: getattr(self, k) for k in COMPARED}

    def outputs_key(self) -> str:
        """A digest of everything that changes the model's outputs bit for bit: the comparable fields, the
        classifier, and the backend, precision and backend release that computed them. Every cache of model outputs
        is keyed by it (an entry from another backend, precision or release is never read)."""
        fields = self.comparable() | {"num_classes": self.num_classes, "labels_sha256": self.labels_sha256,
                                      "backend": self.backend, "precision": self.precision,
                                      "backend_version": self.backend_version, "format": OUTPUTS_KEY_FORMAT}
        if self.quantization:  # another calibration set or NNCF release quantizes to other weights
            fields["quantized"] = self.quantized_by()
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def describe(self) -> str:
        """``backend precision (release)``, as summaries and logs say what ran."""
        return f"{self.backend or '?'} {self.precision}" + (f" ({self.backend} {self.backend_version})"
                                                           if self.backend_version else "")

    def mismatch(self, other: "ModelIdentity") -> list[str]:
        """The :data:`COMPARED` fields on which ``other`` differs (empty: comparable)."""
        return [k for k in COMPARED if getattr(self, k) != getattr(other, k)]

    def quantized_by(self) -> dict | None:
        """Which int8 model made these vectors (calibration digest, NNCF release); None for float vectors."""
        if self.space() != "int8":
            return None
        return {k: (self.quantization or {}).get(k) for k in ("calibration_sha256", "nncf")}

    def same_space(self, other: "ModelIdentity") -> bool:
        """Whether ``other``'s vectors live in this identity's precision space: both float, or both from the same
        int8 model (:meth:`quantized_by` is None exactly for float vectors)."""
        return self.quantized_by() == other.quantized_by()

    def space(self) -> str:
        """The embedding space its vectors live in: ``int8`` or ``float`` (fp32, fp16 and bf16 on any backend agree
        to within rounding; an int8 model's vectors differ by what its gate measured)."""
        return "int8" if self.precision == "int8" else "float"


def precision_compat(rows: ModelIdentity, int8: ModelIdentity | None = None) -> dict:
    """What an index of ``rows``' vectors may be searched with, or mixed with, in the other precision space: the
    record :data:`COMPAT_KEY` an index manifest keeps. An int8 index carries its own gate's measurement (fp32
    queries against int8 vectors); a float index one only when ``int8`` (an int8 identity of the same model,
    :meth:`ModelIdentity.quantization` holding its gate's numbers) is given: its int8 queries against fp32 vectors.
    Each entry: the measured recall@10 (relative to queries of the index's own precision, on the gate's held-out
    images), the least allowed, whether it passes, and which int8 model (calibration, NNCF release) it holds for."""
    if rows.space() == "int8":
        int8, other, key = rows, "float", "recall_at_10_vs_int8_index"
    elif int8 is not None:
        if int8.space() != "int8" or int8.mismatch(rows):
            raise ValueError("int8 compatibility is measured by an int8 model of the index's own model")
        other, key = "int8", "recall_at_10_vs_fp32_index"
    else:
        return {}
    q = int8.quantization
    if not q or q.get(key) is None:
        return {}
    least = q.get("min_recall_at_10")
    return {other: {"recall_at_10": q[key], "min_recall_at_10": least,
                    "allowed": least is not None and q[key] >= least,
                    "int8_model": int8.quantized_by(),
                    "holdout": q.get("holdout"), "holdout_sha256": q.get("holdout_sha256")}}


def space_refusal(index: ModelIdentity, compat: dict | None, other: ModelIdentity) -> str | None:
    """Why vectors of ``other`` (a query's, or delta rows') may not meet an index of ``index``'s vectors whose
    manifest records ``compat`` (:func:`precision_compat`); None when they may: the same precision space, or
    the other space's measured recall@10 is at or above its least for exactly this int8 model."""
    if index.space() == other.space():
        if not index.same_space(other):
            return ("int8 vectors of another int8 model (another calibration set or NNCF release) than the "
                    "index's; rebuild the index with the serving model")
        return None
    entry = (compat or {}).get(other.space())
    int8 = other if other.space() == "int8" else index
    what = f"{other.precision} vectors against an index of {index.precision} embeddings"
    if not entry:
        return (f"{what}: their agreement was never measured for this index; rebuild the index with the "
                f"serving precision, or build it with --int8-compat (the int8 gate's recall@10, recorded)")
    if entry.get("int8_model") != int8.quantized_by():
        return (f"{what}: the index records the agreement of another int8 model (another calibration set or "
                f"NNCF release); rebuild the index with the serving model")
    if not entry.get("allowed"):
        return (f"{what}: recall@10 {entry['recall_at_10']} on held-out images is below the least allowed "
                f"{entry['min_recall_at_10']}; rebuild the index with the serving precision")
    return None

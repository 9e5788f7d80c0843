"""What a training mode hands back to :mod:`lens.train.job`: the prepared (embedded, checked) training set, and a
trained candidate with its validation and test figures."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lens.identity import ModelIdentity

from .dataset import Dataset

__all__ = ["Prepared", "Trained"]


@dataclass
class Prepared:
    """The training set after embedding (cached), error rows and the leakage check."""

    ds: Dataset  # usable examples only; with --dedup, the leaked training images are gone
    emb: np.ndarray  # (N, D): the backbone's embeddings of ds.examples
    y: np.ndarray  # class ids
    tr: np.ndarray  # row positions of training examples
    va: np.ndarray  # row positions of validation examples
    te: np.ndarray  # row positions of test examples
    identity: ModelIdentity  # the backbone's
    unusable: list  # examples with an error
    removed: list  # training examples removed as near-duplicates
    dedup: dict
    emb_report: dict
    emb_seconds: float


@dataclass
class Trained:
    """One candidate: what would be packaged, and how it measured."""

    kind: str  # "head" | "finetune"
    files: dict  # package files besides metrics, confusion and split
    identity: ModelIdentity  # what the package's model identity is
    thresholds: np.ndarray
    val: dict  # validation metrics (the thresholds were tuned on them)
    test: dict  # test metrics of those thresholds
    training: dict  # settings, history, seconds
    extra: dict  # manifest and summary fields of this kind

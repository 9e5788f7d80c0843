"""The predictor core shared by the online (Ray Serve) and offline (Ray Data) paths.

A :class:`Predictor` takes a batch of untrusted bytes, PIL images or arrays and
returns, per item and in order, a :class:`Prediction` (top-k tags and an
L2-normalised embedding from one forward pass) or an :class:`ItemError`, so one
bad image never fails its batch. Its two halves can also run apart:
:meth:`Predictor.prepare` (decode + preprocess, CPU, no model) and
:meth:`Predictor.infer` (model only), which is how the pipelines overlap them.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
from PIL import Image

from lens.errors import ConfigError, ImageError, LensError, error_body

from .config import DEFAULT_MAX_BATCH_SIZE, DecodeConfig, ModelConfig
from .decode import DecodeLimits
from .heads import Head, load_head, softmax, threshold_tags
from .loading import LoadedModel, load_model
from .preprocess import Preprocessor

__all__ = ["Tag", "Prediction", "ItemError", "Predictor", "top_k_tags", "l2_normalize", "check_top_k", "MAX_TOP_K"]

#: The most tags one image may ask for, on the CLI and (by default) over HTTP.
MAX_TOP_K = 100

logger = logging.getLogger(__name__)

Item = Union[bytes, bytearray, memoryview, Image.Image, np.ndarray]


@dataclass(frozen=True)
class Tag:
    label: str
    class_id: int
    score: float

    def to_dict(self) -> dict:
        return {"label": self.label, "class_id": self.class_id, "score": self.score}


@dataclass
class Prediction:
    tags: list[Tag]
    embedding: np.ndarray  # float32, L2-normalised, shape (embed_dim,)
    custom: dict[str, list[dict]] | None = None  # head name -> its tags above threshold (None: no heads)

    ok = True

    def to_dict(self, *, embedding: bool = False) -> dict:
        d = {"tags": [t.to_dict() for t in self.tags]}
        if self.custom is not None:
            d["custom_tags"] = self.custom
        if embedding:
            d["embedding"] = self.embedding.tolist()
        return d


@dataclass
class ItemError:
    """Why one item of a batch produced no prediction."""

    code: str
    message: str
    status: int

    ok = False

    @classmethod
    def from_exception(cls, e: Exception) -> "ItemError":
        if isinstance(e, ImageError):
            return cls(e.code, e.message, e.http_status)
        if isinstance(e, TypeError):
            return cls("invalid_input", str(e), 400)
        return cls("internal_error", f"{type(e).__name__}: {e}", 500)

    def to_dict(self) -> dict:
        return error_body(self.code, self.message, self.status)

    def to_error(self) -> LensError:
        """This failure as an exception (how it crosses a Serve handle)."""
        from lens.errors import RequestFailed

        return RequestFailed(self.message, code=self.code, status=self.status)


Result = Union[Prediction, ItemError]


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def check_top_k(k: int, max_k: int = MAX_TOP_K) -> int:
    """``k`` if it is in ``1..max_k``; else :class:`~lens.errors.InvalidRequestError` (a 400 over HTTP)."""
    from lens.errors import InvalidRequestError

    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise InvalidRequestError(f"top_k must be an integer in 1..{max_k}, got {k!r}", code="bad_request")
    return k


def top_k_tags(logits: np.ndarray, labels: Sequence[str], k: int) -> list[list[Tag]]:
    """Softmax scores and the ``k`` best classes per row, best first."""
    k = max(1, min(int(k), logits.shape[-1]))
    probs = softmax(logits)
    idx = np.argpartition(-probs, k - 1, axis=-1)[:, :k]
    out = []
    for row, cand in zip(probs, idx):
        cand = cand[np.argsort(-row[cand], kind="stable")]
        out.append([Tag(labels[c], int(c), float(row[c])) for c in cand])
    return out


class Predictor:
    """Decode, preprocess and run a model; per-item results, never a failed batch for a bad item."""

    def __init__(self, model: LoadedModel, limits: DecodeLimits = DecodeLimits(), *,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 default_top_k: int = 5, heads: Sequence[Head] = (), custom_top_k: int | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        names = [h.name for h in heads]
        if len(set(names)) != len(names):
            raise ConfigError(f"two heads share a name: {sorted(n for n in names if names.count(n) > 1)}")
        for head in heads:
            head.check_backbone(model.identity())
        self.heads = list(heads)
        self.model = model
        self.preprocessor = Preprocessor(model.preprocess, limits)
        self.max_batch_size = max_batch_size
        self.default_top_k = default_top_k
        self.custom_top_k = custom_top_k  # None: custom tags are the thresholded classes; K: each head's K best
        self.warmed_up = False

    @classmethod
    def from_config(cls, model_cfg: ModelConfig | None = None, decode_cfg: DecodeConfig | None = None,
                    **kwargs) -> "Predictor":
        model_cfg = model_cfg or ModelConfig()
        decode_cfg = decode_cfg or DecodeConfig()
        kwargs.setdefault("max_batch_size", model_cfg.max_batch_size)
        kwargs.setdefault("custom_top_k", model_cfg.custom_top_k)
        if model_cfg.heads and "heads" not in kwargs:
            kwargs["heads"] = [load_head(uri, cache_dir=model_cfg.cache_dir) for uri in model_cfg.heads]
        return cls(load_model(model_cfg), decode_cfg.limits(), **kwargs)

    # -- description -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.model.name

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    def identity(self):
        """The model's :class:`lens.identity.ModelIdentity`, as artefacts record it."""
        return self.model.identity()

    def info(self) -> dict:
        return self.model.info() | {"max_batch_size": self.max_batch_size, "warmed_up": self.warmed_up,
                                    "heads": [h.info() for h in self.heads]}

    # -- the two halves ----------------------------------------------------------------------
    def prepare(self, item: Item) -> np.ndarray:
        """Decode (if bytes) and preprocess one item to (3, H, W) float32. Raises ImageError/TypeError."""
        return self.preprocessor(item)

    def prepare_pixels(self, item: Item) -> np.ndarray:
        """Decode and resize/crop one item to (H, W, 3) uint8, the compact form pipelines ship between stages;
        :meth:`infer_pixels` finishes the job. Raises ImageError/TypeError."""
        return self.preprocessor.pixels(item)

    def prepare_many(self, items: Sequence[Item], executor: Executor | None = None, *,
                     pixels: bool = False) -> list[np.ndarray | ItemError]:
        """:meth:`prepare` (or, with ``pixels``, :meth:`prepare_pixels`) each item, catching per-item
        failures; in parallel if an executor is given."""
        prepare = self.prepare_pixels if pixels else self.prepare

        def one(item: Item) -> np.ndarray | ItemError:
            try:
                return prepare(item)
            except Exception as e:  # noqa: BLE001 - one bad item must not fail the batch
                err = ItemError.from_exception(e)
                if err.status >= 500:
                    logger.exception("unexpected error preparing an item")
                return err

        if executor is None:
            return [one(it) for it in items]
        return list(executor.map(one, items))

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the model on a (N, 3, H, W) batch in chunks of ``max_batch_size``: (logits, embeddings)."""
        if batch.ndim != 4 or batch.shape[1:] != tuple(self.model.preprocess.input_size):
            raise ValueError(f"batch must be (N, {', '.join(map(str, self.model.preprocess.input_size))}), "
                             f"got {batch.shape}")
        logits, feats = [], []
        for i in range(0, len(batch), self.max_batch_size):
            lg, ft = self.model.backend.run(batch[i : i + self.max_batch_size])
            logits.append(lg)
            feats.append(ft)
        if not logits:
            return (np.zeros((0, self.model.num_classes), np.float32), np.zeros((0, self.embed_dim), np.float32))
        return np.concatenate(logits), l2_normalize(np.concatenate(feats))

    def infer_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`infer` on (N, H, W, 3) uint8 crops from :meth:`prepare_pixels`; bit-identical to
        ``infer(stack(prepare(item)))``."""
        return self.infer(self.preprocessor.normalize(pixels))

    def custom_tags(self, embeddings: np.ndarray, logits: np.ndarray | None = None,
                    top_k: int | None = None) -> list[dict[str, list[dict]]] | None:
        """Per row, each custom classifier's tags: every head's, and a fine-tuned model package's own (from
        ``logits``). By default a classifier's classes at or above their own thresholds (possibly none); with
        ``top_k`` (else the predictor's ``custom_top_k``) its ``top_k`` best, each marked ``passed`` or not. None
        when there are no custom classifiers."""
        top_k = top_k or self.custom_top_k
        pkg = self.model.package
        own = bool(pkg and pkg.get("thresholds") and logits is not None)
        if not self.heads and not own:
            return None
        per_head = {h.name: h.tags(embeddings, top_k) for h in self.heads}
        if own:
            per_head[pkg["name"]] = threshold_tags(softmax(logits), self.model.labels,
                                                   np.asarray(pkg["thresholds"], np.float32), top_k)
        return [{name: rows[i] for name, rows in per_head.items()} for i in range(len(embeddings))]

    def postprocess(self, logits: np.ndarray, embeddings: np.ndarray, top_k: int | None = None,
                    custom_top_k: int | None = None) -> list[Prediction]:
        tags = top_k_tags(logits, self.model.labels, top_k or self.default_top_k)
        custom = self.custom_tags(embeddings, logits, custom_top_k) or [None] * len(tags)
        return [Prediction(t, e, c) for t, e, c in zip(tags, embeddings, custom)]

    # -- the whole thing ---------------------------------------------------------------------
    def predict(self, items: Sequence[Item], top_k: int | None = None,
                executor: Executor | None = None, custom_top_k: int | None = None) -> list[Result]:
        """One result per item, in order: a :class:`Prediction` or an :class:`ItemError`."""
        prepared = self.prepare_many(items, executor)
        return self.predict_prepared(prepared, top_k, custom_top_k)

    def predict_prepared(self, prepared: Sequence[np.ndarray | ItemError], top_k: int | None = None,
                         custom_top_k: int | None = None) -> list[Result]:
        """Run the model over already-prepared items, keeping the errors in place."""
        good = [i for i, p in enumerate(prepared) if isinstance(p, np.ndarray)]
        results: list[Result] = list(prepared)  # errors stay where they are
        if good:
            batch = np.stack([prepared[i] for i in good])
            logits, emb = self.infer(batch)
            finite = np.isfinite(logits).all(axis=1) & np.isfinite(emb).all(axis=1)
            for i, ok, pred in zip(good, finite, self.postprocess(logits, emb, top_k, custom_top_k)):
                results[i] = pred if ok else ItemError(
                    "model_output_not_finite", f"the model ({self.name}) produced non-finite outputs for this image",
                    500)
        assert len(results) == len(prepared)
        return results

    def warmup(self, batch_size: int = 1) -> float:
        """Run one dummy batch so the first real request pays no lazy initialisation. Returns seconds."""
        t0 = time.perf_counter()
        dummy = np.zeros((batch_size, *self.model.preprocess.input_size), dtype=np.float32)
        self.infer(dummy)
        self.warmed_up = True
        return time.perf_counter() - t0

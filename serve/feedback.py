"""Labeled feedback: ``POST /v1/feedback`` items, checked, written durably, and counted as accuracy.

A client echoes what Lens answered (``version``, the predicted labels, ``predicted_at``, the image's ``sha256``
or its ``id``) with the true labels. Each item is validated (a clear 400 naming the item and the field), then
the batch is **group-committed**: requests arriving within ``flush_s`` share one Parquet part, written atomically
(the same durable parts as the event path), and each request is answered only once its part is written; a failed
write answers 503 (retry), so an acknowledged item is never lost. Accuracy, per-class counts and label lag become
metrics (top-1 correct when the predicted top-1 is among the true labels).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from lens.errors import OverloadedError
from lens.quality.feedback import write_feedback_part
from lens.storage import Location

from .body import HttpError
from .config import FeedbackConfig

__all__ = ["parse_feedback", "FeedbackSink"]

logger = logging.getLogger("lens.serve")

_MAX_TEXT = 1024


def _text(item: dict, key: str, i: int, *, required: bool = False) -> str | None:
    v = item.get(key)
    if v is None:
        if required:
            raise HttpError(f"feedback item {i}: {key!r} is required", code="invalid_feedback")
        return None
    if not isinstance(v, str) or not v or len(v) > _MAX_TEXT:
        raise HttpError(f"feedback item {i}: {key!r} must be a non-empty string of at most {_MAX_TEXT} characters",
                        code="invalid_feedback")
    return v


def _labels(item: dict, key: str, i: int, max_labels: int) -> list[str]:
    v = item.get(key)
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or len(v) > max_labels or not all(
            isinstance(x, str) and x and len(x) <= _MAX_TEXT for x in v):
        raise HttpError(f"feedback item {i}: {key!r} must be a label or a list of 1..{max_labels} labels",
                        code="invalid_feedback")
    return v


def parse_feedback(body: dict, cfg: FeedbackConfig, *, now: float | None = None) -> list[dict]:
    """``{"items": [...]}`` or one item -> validated rows; an :class:`HttpError` (400/413) names what is wrong."""
    now = time.time() if now is None else now
    items = body.get("items") if "items" in body else [body]
    if not isinstance(items, list) or not items:
        raise HttpError('send one feedback item or {"items": [...]}', code="invalid_feedback")
    if len(items) > cfg.max_items:
        raise HttpError(f"at most {cfg.max_items} feedback items per request, got {len(items)}", status=413,
                        code="too_many_items")
    rows = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise HttpError(f"feedback item {i} must be an object", code="invalid_feedback")
        unknown = set(item) - {"id", "sha256", "labels", "predicted", "version", "predicted_at", "head"}
        if unknown:
            raise HttpError(f"feedback item {i}: unknown field(s) {sorted(unknown)}", code="invalid_feedback")
        ident, digest = _text(item, "id", i), _text(item, "sha256", i)
        if ident is None and digest is None:
            raise HttpError(f"feedback item {i}: give the image's 'id' or 'sha256' (from the /v1/tag answer)",
                            code="invalid_feedback")
        if digest is not None and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
            raise HttpError(f"feedback item {i}: 'sha256' must be 64 lowercase hex digits", code="invalid_feedback")
        at = item.get("predicted_at")
        if at is not None and (isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at)
                               or not 0 < at <= now + 300):
            raise HttpError(f"feedback item {i}: 'predicted_at' must be the answer's unix time", code="invalid_feedback")
        rows.append({"id": ident, "sha256": digest, "labels": _labels(item, "labels", i, cfg.max_labels),
                     "predicted": _labels(item, "predicted", i, cfg.max_labels),
                     "version": _text(item, "version", i), "head": _text(item, "head", i),
                     "predicted_at": float(at) if at is not None else None, "received_at": now})
    return rows


class FeedbackSink:
    """Group commit of feedback rows into Parquet parts under ``cfg.sink`` (one part per flush)."""

    def __init__(self, cfg: FeedbackConfig, metrics=None) -> None:
        self.cfg = cfg
        self.loc = Location.parse(cfg.sink)
        self.metrics = metrics
        self.vocabulary: dict | None = None  # {"labels", "versions"} the served pools know (set by the ingress)
        self._pending: list[tuple[list[dict], asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self.parts = 0

    async def write(self, rows: list[dict]) -> str:
        """Queue ``rows``; returns the part they were written to once it is written (raises if it was not)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._flusher())
        fut = loop.create_future()
        self._pending.append((rows, fut))
        self._wake.set()
        return await fut

    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.cfg.flush_s)  # let the requests of this interval join the part
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            rows = [r for rs, _ in batch for r in rs]
            try:
                name = await asyncio.to_thread(self._write_part, rows)
            except Exception as e:  # noqa: BLE001 - every waiting request learns it was not stored
                logger.exception("feedback part not written (%d items); clients get 503 and retry", len(rows))
                err = OverloadedError(f"feedback not stored ({type(e).__name__}); retry")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            if self.metrics is not None:  # counted before anyone is answered: an acknowledged item is counted
                try:
                    self.metrics.count(rows, self.vocabulary)
                except Exception:  # noqa: BLE001 - the rows are stored; a metrics fault must not stop the flusher
                    logger.exception("feedback metrics not updated for %d stored items", len(rows))
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(name)

    def _write_part(self, rows: list[dict]) -> str:
        name = write_feedback_part(self.loc, rows)
        self.parts += 1
        return name

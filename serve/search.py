"""Similarity search on Ray Serve: the :class:`IndexSearcher` deployment, reached by handle from the HTTP ingress.

It serves the index version ``CURRENT`` names, checks for a new one every ``refresh_s`` (loaded aside, then
swapped in by one reference assignment, so no request is dropped or sees a half-loaded index), and folds
the event path's new embedding parts into a small delta index so freshly tagged images are searchable
before the next build. Answers are dicts; a failure is ``{"error", "message", "status"}``, as for tagging.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from ray import serve

from lens.errors import InvalidRequestError, LensError

__all__ = ["IndexSearcher", "DeltaFeed"]

logger = logging.getLogger("lens.serve")


class DeltaFeed:
    """Reads embedding parts that appeared under the delta sources since the last look."""

    def __init__(self, uris: list[str]) -> None:
        from lens.storage import Location

        self.locs = [Location.parse(u) for u in uris]
        self.seen: set[str] = set()

    def poll(self) -> list:
        from index.source import EmbeddingSource

        chunks = []
        for loc in self.locs:
            try:
                files = [f for f in loc.list_files() if f.endswith(".parquet") and f not in self.seen]
            except OSError as e:
                logger.warning("cannot list delta source %s: %s", loc.uri, e)
                continue
            for f in files:
                try:
                    src = EmbeddingSource(loc.uri_of(f))
                    chunks.append((src.identity, list(src.chunks(10_000))))
                except Exception as e:  # noqa: BLE001 - a bad part is skipped (and logged), not fatal
                    logger.warning("skipping delta part %s: %s", f, e)
                self.seen.add(f)
        return chunks


@serve.deployment(
    name="IndexSearcher",
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
    logging_config={"enable_access_log": False},
)
class IndexSearcher:
    def __init__(self, search: dict) -> None:
        from index.search import SearchService
        from lens.config import validate

        from .config import SearchConfig

        self.cfg = validate(SearchConfig, search, where="search config")
        self.service = SearchService(self.cfg.index, mmap=self.cfg.mmap, max_k=self.cfg.max_k)
        self.feed = DeltaFeed(list(self.cfg.delta_sources))
        self.refresh_error: str | None = None  # why the last new version was refused, until one is taken
        self._refresh_once()
        self._task = asyncio.get_event_loop().create_task(self._refresher())
        logger.info("index %s loaded: %s", self.service.version.name, self.service.info())

    def _refresh_once(self) -> None:
        try:
            self.service.refresh()
            self.refresh_error = None
        except LensError as e:  # a broken new version: keep serving the current one
            logger.error("not swapping to the new index version: %s", e.message)
            self.refresh_error = e.message
        for identity, chunks in self.feed.poll():
            if identity is not None and identity.mismatch(self.service.identity):
                logger.warning("delta part from another model (%s) ignored", identity.model)
                continue
            for c in chunks:
                keep = [i for i, x in enumerate(c.ids) if x is not None]  # null/empty ids are never searchable
                if len(keep) < len(c.ids):
                    logger.warning("delta part: %d rows with a null or empty id skipped", len(c.ids) - len(keep))
                if keep:
                    c = c.take(keep)
                    self.service.delta.add(c.ids, c.vectors, c.metadata)

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.refresh_s)
            try:
                await asyncio.to_thread(self._refresh_once)
            except Exception:  # noqa: BLE001 - never let the refresher die
                logger.exception("index refresh failed")

    async def refresh(self) -> dict:
        """Check for a new version and new delta parts now (tests, operators)."""
        await asyncio.to_thread(self._refresh_once)
        return self.info()

    def info(self) -> dict:
        return self.service.info() | {"refresh_error": self.refresh_error}

    def check_health(self) -> None:
        if self._task.done():
            raise RuntimeError("the index refresher stopped")

    async def search_vectors(self, vectors: list, k: int, param: int | None = None,
                             model_info: dict | None = None) -> dict:
        """Top-k for one or more vectors. With ``model_info`` (the model that embedded them), refuse a mismatch.
        Raises :class:`LensError` subclasses (a mismatch, a bad vector, a bad ``k``) to the caller."""
        if model_info is not None:
            self.service.check_model(model_info)
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.service.version.manifest["dim"] or not np.isfinite(q).all():
            raise InvalidRequestError(f"vectors must be finite and of dimension "
                                      f"{self.service.version.manifest['dim']}, got shape {list(q.shape)}",
                                      code="invalid_vector")
        name, hits = await asyncio.to_thread(self.service.search, q, k, param=param)
        return {"index_version": name, "results": [[h.to_dict() for h in hs] for hs in hits]}

    async def locate(self, item_id: str) -> str:
        """Where ``item_id``'s image lives (``s3://...`` or a local path); :class:`NotFoundError` if unknown."""
        return self.service.location_of(item_id)

    async def search_id(self, item_id: str, k: int, param: int | None = None) -> dict:
        name, hits = await asyncio.to_thread(self.service.search_id, item_id, k, param=param)
        return {"index_version": name, "results": [h.to_dict() for h in hits]}

"""Similarity search on Ray Serve: the :class:`IndexSearcher` deployment, reached by handle from the HTTP ingress.

It serves the index version ``CURRENT`` names, checks for a new one every ``refresh_s`` (loaded aside, then
swapped in by one reference assignment, so no request is dropped or sees a half-loaded index), and folds
the event path's new embedding parts into a small delta index so freshly tagged images are searchable
before the next build. Answers are dicts; a failure is ``{"error", "message", "status"}``, as for tagging.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import numpy as np
from ray import serve

from lens.errors import InvalidRequestError, LensError
from lens.tombstones import TOMBSTONES_DIR

from .logs import to_replica_log

__all__ = ["IndexSearcher", "IndexShard", "ShardDeployments", "DeltaFeed", "shard_count"]

logger = logging.getLogger("lens.serve")


class DeltaFeed:
    """Reads the embedding parts and tombstone parts (:mod:`lens.tombstones`) that appeared under the delta sources
    since the last look."""

    def __init__(self, uris: list[str]) -> None:
        from lens.storage import Location

        self.locs = [Location.parse(u) for u in uris]
        self.seen: set[str] = set()

    def poll(self) -> tuple[list, list]:
        """(the new parts' (model identity, chunks), the new tombstones' (id, order value))."""
        from lens.index.source import EmbeddingSource
        from lens.tombstones import is_tombstone_file, read_tombstones

        chunks, deletions = [], []
        for loc in self.locs:
            try:
                files = [f for f in loc.list_files() if f.endswith(".parquet") and f not in self.seen]
            except OSError as e:
                logger.warning("cannot list delta source %s: %s", loc.uri, e)
                continue
            for f in files:
                try:
                    if is_tombstone_file(f):
                        deletions += read_tombstones(loc, f)
                    else:
                        src = EmbeddingSource(loc.uri_of(f))
                        chunks.append((src.identity, list(src.chunks(10_000))))
                except Exception as e:  # noqa: BLE001 - a bad part is skipped (and logged), not fatal
                    logger.warning("skipping delta part %s: %s", f, e)
                self.seen.add(f)
        return chunks, deletions


@serve.deployment(
    name="IndexSearcher",
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
    logging_config={"enable_access_log": False},
)
class IndexSearcher:
    def __init__(self, search: dict, shards: list | None = None) -> None:
        to_replica_log()
        from lens.index.search import SearchService

        from lens.runtime.config import validate

        from .config import SearchConfig

        self.cfg = validate(SearchConfig, search, where="search config")
        main = ShardDeployments(self.cfg.index, shards) if shards else None
        self.service = SearchService(self.cfg.index, mmap=self.cfg.mmap, max_k=self.cfg.max_k, main=main)
        # the event path's parts, and the index's manual erasures (lens index delete)
        self.feed = DeltaFeed([*self.cfg.delta_sources, f"{self.cfg.index.rstrip('/')}/{TOMBSTONES_DIR}"])
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
        parts, deletions = self.feed.poll()
        if deletions:
            n = self.service.delete(deletions)
            logger.info("%d deletions read (%d new); %d tombstones", len(deletions), n, len(self.service.tombstones))
        for identity, chunks in parts:
            if identity is not None and identity.mismatch(self.service.identity):
                logger.warning("delta part from another model (%s) ignored", identity.model)
                continue
            why = self.service.space_refusal(identity) if identity is not None else None
            if why:
                logger.warning("delta part ignored: %s", why)
                continue
            for c in chunks:
                keep = [i for i, x in enumerate(c.ids) if x is not None]  # null/empty ids are never searchable
                if len(keep) < len(c.ids):
                    logger.warning("delta part: %d rows with a null or empty id skipped", len(c.ids) - len(keep))
                if keep:
                    c = c.take(keep)
                    self.service.add_rows(c.ids, c.vectors, c.metadata)

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
                             model_info: dict | None = None, flt=None) -> dict:
        """Top-k for one or more vectors (``flt``: a filter, :mod:`lens.index.filters`, as the client sent it).
        With ``model_info`` (the model that embedded them), refuse a mismatch. Raises :class:`LensError`
        subclasses (a mismatch, a bad vector, a bad ``k`` or filter) to the caller."""
        if model_info is not None:
            self.service.check_model(model_info)
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.service.version.manifest["dim"] or not np.isfinite(q).all():
            raise InvalidRequestError(f"vectors must be finite and of dimension "
                                      f"{self.service.version.manifest['dim']}, got shape {list(q.shape)}",
                                      code="invalid_vector")
        name, hits = await asyncio.to_thread(self.service.search, q, k, param=param, filter=flt)
        return {"index_version": name, "results": [[h.to_dict() for h in hs] for hs in hits]}

    async def locate(self, item_id: str) -> str:
        """Where ``item_id``'s image lives (``s3://...`` or a local path); :class:`NotFoundError` if unknown."""
        return await asyncio.to_thread(self.service.location_of, item_id)

    async def search_id(self, item_id: str, k: int, param: int | None = None, flt=None) -> dict:
        name, hits = await asyncio.to_thread(self.service.search_id, item_id, k, param=param, filter=flt)
        return {"index_version": name, "results": [h.to_dict() for h in hits]}


def shard_count(root: str) -> int:
    """The number of shards of the index version ``root``'s CURRENT names (a config error if it is not sharded)."""
    from lens.index.store import SHARDED_FORMAT, resolve_version

    from lens.errors import ConfigError

    vdir = resolve_version(root)
    manifest = json.loads((vdir / "manifest.json").read_text())
    if manifest.get("format") != SHARDED_FORMAT:
        raise ConfigError(f"search.shard_deployments needs a sharded index (lens index build --shards N); "
                          f"{vdir} is not sharded")
    return len(manifest["shards"])


@serve.deployment(
    name="IndexShard",
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
    logging_config={"enable_access_log": False},
)
class IndexShard:
    """One shard of a sharded index, for the searcher's scatter-gather. It keeps the shard of the version CURRENT
    names and of the one before (so the searcher can switch every shard at once, and queries in flight on the old
    version finish on it); a new version is loaded aside every ``refresh_s``."""

    def __init__(self, search: dict, shard: int) -> None:
        to_replica_log()
        from lens.runtime.config import validate

        from .config import SearchConfig

        self.cfg = validate(SearchConfig, search, where="search config")
        self.shard = shard
        self.loaded: dict = {}  # version name -> IndexVersion of this shard (newest last, at most 2)
        from lens.index.search import FilterMasks, HiddenRows

        self._hidden_rows = HiddenRows()
        self._filters = FilterMasks()
        self._load_current()
        self._task = asyncio.get_event_loop().create_task(self._refresher())

    def _load_current(self) -> None:
        from lens.index.store import current_version, load_version

        name = current_version(self.cfg.index)
        if name is None or name in self.loaded:
            return
        manifest = json.loads((Path(self.cfg.index) / name / "manifest.json").read_text())
        shards = manifest.get("shards") or []
        if len(shards) <= self.shard:
            raise LensError(f"index version {name} has {len(shards)} shard(s); this is shard {self.shard}: "
                            "redeploy with the new shard count")
        self.loaded[name] = load_version(Path(self.cfg.index) / name / shards[self.shard], mmap=self.cfg.mmap)
        while len(self.loaded) > 2:
            self.loaded.pop(next(iter(self.loaded)))
        logger.info("index shard %d of %s loaded (%d vectors)", self.shard, name, len(self.loaded[name].ids))

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.refresh_s)
            try:
                await asyncio.to_thread(self._load_current)
            except Exception:  # noqa: BLE001 - keep serving what is loaded
                logger.exception("index shard %d: cannot load the new version", self.shard)

    def check_health(self) -> None:
        if self._task.done():
            raise RuntimeError("the shard refresher stopped")

    async def refresh(self) -> list[str]:
        await asyncio.to_thread(self._load_current)
        return list(self.loaded)

    def versions(self) -> list[str]:
        return list(self.loaded)

    async def fields(self, version: str) -> set[str]:
        """The filterable fields of this shard's rows."""
        v = self._version(version)
        return await asyncio.to_thread(lambda: self._filters.columns(v.name, v.ids, v.metadata).fields())

    def node_id(self) -> str:
        """The Ray node this shard replica runs on (placement checks, operators)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def _version(self, name: str):
        v = self.loaded.get(name)
        if v is None:
            raise LensError(f"index shard {self.shard} does not hold version {name} (yet)", code="not_ready",
                            status=503)
        return v

    async def search(self, version: str, q: np.ndarray, k: int, value: int | None, hidden=None, flt=None,
                     known=None) -> tuple:
        """This shard's top-``k`` of each query: (scores, ids, metadata JSON), -1 rows dropped; the rows
        ``hidden`` (a :class:`lens.index.search.Hidden`) names are excluded, and with a filter only the rows it
        matches are selected, inside the search."""
        from lens.index.search import filtered_top_k
        from lens.index.store import k_factor_of, search_params

        v = self._version(version)
        kk = min(k, len(v.ids))
        if kk == 0:
            return np.zeros((len(q), 0), np.float32), [[] for _ in q], [[] for _ in q]
        if flt is not None:
            allowed = self._filters.allowed(v, hidden, flt, known, self._hidden_rows)
            hits = await asyncio.to_thread(filtered_top_k, v, q, kk, value, allowed)
            return ([[h.score for h in best.values()] for best in hits], [list(best) for best in hits],
                    [[json.dumps(h.metadata) for h in best.values()] for best in hits])
        exclude = self._hidden_rows(v, hidden) if hidden else None
        scores, rows = await asyncio.to_thread(v.index.search, q, kk,
                                               params=search_params(v.manifest["type"], value, exclude=exclude,
                                                                    k_factor=k_factor_of(v.manifest)))
        ids = [[v.ids[r] if r >= 0 else None for r in row] for row in rows]
        meta = [[v.metadata[r] if r >= 0 else "{}" for r in row] for row in rows]
        return scores, ids, meta

    async def lookup(self, version: str, item_id: str):
        """(vector, metadata dict) of an id this shard holds, or None."""
        from lens.index.search import stored_vector

        v = self._version(version)
        row = v.row_of.get(item_id)
        if row is None:
            return None
        return await asyncio.to_thread(stored_vector, v, row), json.loads(v.metadata[row])

    async def holds(self, version: str, ids: list[str]) -> dict:
        """The ids of ``ids`` this shard holds -> their rows' order values (:mod:`lens.tombstones`)."""
        from lens.index.source import row_seq

        v = self._version(version)
        return {i: row_seq(v.metadata[v.row_of[i]]) for i in ids if i in v.row_of}


class ShardDeployments:
    """The main index of a :class:`lens.index.search.SearchService` held by :class:`IndexShard` deployments: each
    query is sent to every shard (scatter), the per-shard top-k gathered. A new version is taken only when every
    shard holds it, then by one assignment: every answer comes wholly from one version."""

    def __init__(self, root: str, shards: list) -> None:
        from lens.index.store import current_version

        self.root, self.shards = root, shards
        self._fields: tuple = (None, set())
        self._set(current_version(root))  # what every shard loads at start (handles are not called here)

    def _set(self, name: str) -> None:
        from lens.index.store import SHARDED_FORMAT

        manifest = json.loads((Path(self.root) / name / "manifest.json").read_text())
        if manifest.get("format") != SHARDED_FORMAT or len(manifest["shards"]) != len(self.shards):
            raise LensError(f"index version {name} is not sharded {len(self.shards)} ways: redeploy the search "
                            "app for it", code="index_shape_changed")
        self.version = _VersionInfo(name, manifest)

    def take(self, name: str) -> bool:
        held = [h.refresh.remote() for h in self.shards]
        if not all(name in r.result() for r in held):
            return False  # a shard has not loaded it yet
        self._set(name)
        logger.info("searching sharded index %s (%d shards)", name, len(self.shards))
        return True

    def holds(self, v, ids: list[str]) -> dict:
        held = [h.holds.remote(v.name, ids) for h in self.shards]
        return {i: q for r in held for i, q in r.result().items()}

    def fields(self, v) -> set[str]:
        """Every shard's filterable fields (asked once per version)."""
        if self._fields[0] != v.name:
            self._fields = (v.name, set().union(*(r.result() for r in [h.fields.remote(v.name) for h in self.shards])))
        return self._fields[1]

    def top_k(self, v, q: np.ndarray, k: int, value, hidden=None, flt=None, known=None) -> list[dict]:
        from lens.index.search import Hit

        answers = [r.result() for r in [h.search.remote(v.name, q, k, value, hidden or None, flt, known)
                                        for h in self.shards]]
        out = []
        for qi in range(len(q)):
            best: dict = {}
            for scores, ids, meta in answers:
                for s, i, m in zip(scores[qi], ids[qi], meta[qi]):
                    if i is not None:
                        best[i] = Hit(i, float(s), json.loads(m))
            out.append(best)
        return out

    def lookup(self, v, id_: str, *, vector: bool = True):
        from lens.index.shards import shard_of

        return self.shards[int(shard_of([id_], len(self.shards))[0])].lookup.remote(v.name, id_).result()

    def info(self) -> dict:
        return {"shards": len(self.shards)}


class _VersionInfo:
    def __init__(self, name: str, manifest: dict) -> None:
        self.name, self.manifest = name, manifest

    @property
    def identity(self):
        from lens.identity import ModelIdentity

        return ModelIdentity.from_dict(self.manifest)

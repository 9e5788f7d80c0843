"""Searching an index version plus a small delta of fresh embeddings, and swapping versions under load.

:class:`SearchService` holds a reference to the current :class:`~index.store.IndexVersion` and a
:class:`DeltaIndex`. A query takes the reference once, so a hot swap (build aside, load, replace the reference)
never changes an index under a running query: each answer comes wholly from the old or the new version.
Search parameters travel with each call (FAISS ``SearchParameters``), never set on the shared index.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from lens.errors import InvalidRequestError, ModelMismatchError, NotFoundError
from lens.identity import ModelIdentity
from lens.predictor import l2_normalize

from .store import IndexVersion, ShardedIndex, current_version, load_version, search_params

__all__ = ["Hit", "DeltaIndex", "DeltaSnapshot", "SearchService", "stored_vector"]

logger = logging.getLogger(__name__)

#: the metadata key holding an item's image location (the ``uri`` column of ``lens shards``)
LOCATION_KEY = "uri"


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    metadata: dict

    def to_dict(self) -> dict:
        return {"id": self.id, "score": self.score, "metadata": self.metadata}


class DeltaSnapshot(NamedTuple):
    """One consistent state of the delta: readers take it whole, writers publish a new one."""

    ids: list[str]
    metadata: list[str]
    vectors: np.ndarray
    row_of: dict[str, int]


class DeltaIndex:
    """Exact search over embeddings that arrived after the main index was built (the event path's output).
    Small by design: the next build folds them into the main index and they are pruned here."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._lock = threading.Lock()  # serialises writers; readers never wait
        self._snap = DeltaSnapshot([], [], np.zeros((0, dim), np.float32), {})

    def __len__(self) -> int:
        return len(self._snap.ids)

    def snapshot(self) -> DeltaSnapshot:
        return self._snap

    def add(self, ids_in: list[str], vectors: np.ndarray, metadata: list[str] | None = None) -> int:
        """Insert or replace (same id) rows; returns how many ids are new."""
        vectors = l2_normalize(np.asarray(vectors, np.float32).reshape(-1, self.dim))
        metadata = metadata or ["{}"] * len(ids_in)
        with self._lock:
            old = self._snap
            vecs = old.vectors.copy()  # O(delta) copy: the delta is small by design, and readers keep theirs
            ids, meta, row_of = list(old.ids), list(old.metadata), dict(old.row_of)
            extra: list[np.ndarray] = []
            added = 0
            for i, v, m in zip(ids_in, vectors, metadata):
                r = row_of.get(i)
                if r is None:
                    row_of[i] = len(ids)
                    ids.append(i)
                    meta.append(m)
                    extra.append(v)
                    added += 1
                    continue
                meta[r] = m  # a newer embedding of the same object replaces the old one
                if r < len(vecs):
                    vecs[r] = v
                else:
                    extra[r - len(vecs)] = v
            if extra:
                vecs = np.concatenate([vecs, np.stack(extra)])
            self._snap = DeltaSnapshot(ids, meta, vecs, row_of)  # publish: one reference assignment
        return added

    def prune(self, keep) -> int:
        """Drop rows whose id ``keep`` rejects (those now in the main index); returns how many."""
        with self._lock:
            old = self._snap
            rows = [r for r, i in enumerate(old.ids) if keep(i)]
            dropped = len(old.ids) - len(rows)
            if dropped:
                ids = [old.ids[r] for r in rows]
                self._snap = DeltaSnapshot(ids, [old.metadata[r] for r in rows], old.vectors[rows],
                                           {i: r for r, i in enumerate(ids)})
        return dropped


class SearchService:
    """The current index version + a delta; thread-safe, hot-swappable."""

    def __init__(self, root: str, *, mmap: bool | None = None, max_k: int = 1000) -> None:
        self.root = root
        self.mmap = mmap
        self.max_k = max_k
        self._swap_lock = threading.Lock()
        self.version: IndexVersion = load_version(root, mmap=mmap)
        self.delta = DeltaIndex(self.version.manifest["dim"])

    # -- versions ------------------------------------------------------------------------------
    @property
    def identity(self) -> ModelIdentity:
        return self.version.identity

    def refresh(self) -> bool:
        """Load the version ``CURRENT`` names if it is new, then swap to it. Returns whether it swapped."""
        name = current_version(self.root)
        if name is None or name == self.version.name:
            return False
        with self._swap_lock:
            if name == self.version.name:
                return False
            new = load_version(f"{self.root}/{name}", mmap=self.mmap)  # aside: the old one keeps serving
            old = self.version
            if new.identity.mismatch(old.identity):
                logger.warning("index %s uses another model than %s; swapping anyway", new.name, old.name)
            self.version = new  # the swap: one reference assignment
            pruned = self.delta.prune(lambda i: i not in new.row_of)
            logger.info("swapped index %s -> %s (%d vectors); %d delta rows now in the main index",
                        old.name, new.name, new.index.ntotal, pruned)
            return True

    def info(self) -> dict:
        v = self.version
        m = v.manifest
        return {"index_version": v.name, "type": m["type"], "factory": m["factory"], "count": m["count"],
                "dim": m["dim"], "search": m["search"], "recall": {k: m["recall"][k] for k in ("k", "value")},
                "model_identity": self.identity.to_dict(), "delta": len(self.delta)}

    # -- queries -------------------------------------------------------------------------------
    def check_model(self, info: dict) -> None:
        """Refuse a query embedded by another model, weights or preprocessing than the index's."""
        other = ModelIdentity.from_dict(info)
        diff = self.identity.mismatch(other)
        if diff:
            raise ModelMismatchError(
                f"the index {self.version.name} was built with {self.identity.model} "
                f"(weights {self.identity.weights_sha256[:12]}); this query's embedding differs in "
                f"{', '.join(diff)}: rebuild the index with the serving model or serve the index's model")

    def _k(self, k: int) -> int:
        if not 1 <= int(k) <= self.max_k:
            raise InvalidRequestError(f"k must be between 1 and {self.max_k}, got {k}")
        return int(k)

    def search(self, vectors: np.ndarray, k: int = 10, *, param: int | None = None,
               exclude: list[str | None] | None = None) -> tuple[str, list[list[Hit]]]:
        """Top-``k`` per query vector over main + delta: (index version, hits best first). ``param`` overrides
        the tuned nprobe/efSearch for this call only; ``exclude[i]`` drops that id from query i's results."""
        k = self._k(k)
        v = self.version  # one reference for the whole query: a concurrent swap cannot mix versions
        q = l2_normalize(np.asarray(vectors, np.float32).reshape(-1, v.manifest["dim"]))
        value = param if param is not None else v.manifest["search"]["value"]
        extra = 1 if exclude else 0
        kk = min(k + extra, v.index.ntotal)
        scores, rows = v.index.search(q, kk, params=search_params(v.manifest["type"], value))
        d_ids, d_meta, d_vecs, _ = self.delta.snapshot()
        if len(d_ids):
            d_scores = q @ d_vecs.T
        out = []
        for qi in range(len(q)):
            best: dict[str, Hit] = {}
            for s, r in zip(scores[qi], rows[qi]):
                if r < 0:
                    continue
                i = v.ids[r]
                best[i] = Hit(i, float(s), json.loads(v.metadata[r]))
            out.append(with_delta(best, d_scores[qi] if len(d_ids) else None, d_ids, d_meta, k, extra,
                                  exclude[qi] if exclude else None))
        return v.name, out

    def vector_of(self, id_: str) -> np.ndarray:
        """The stored vector of ``id_`` (delta first: it is the fresher)."""
        delta = self.delta.snapshot()
        if id_ in delta.row_of:
            return delta.vectors[delta.row_of[id_]]
        v = self.version
        row = v.row_of.get(id_)
        if row is None:
            raise NotFoundError(f"no id {id_!r} in index {v.name}")
        return stored_vector(v, row)

    def metadata_of(self, id_: str) -> dict:
        """The stored metadata of ``id_`` (delta first: it is the fresher)."""
        delta = self.delta.snapshot()
        if id_ in delta.row_of:
            return json.loads(delta.metadata[delta.row_of[id_]])
        v = self.version
        row = v.row_of.get(id_)
        if row is None:
            raise NotFoundError(f"no id {id_!r} in index {v.name}")
        return json.loads(v.metadata[row])

    def location_of(self, id_: str) -> str:
        """Where ``id_``'s image lives: its ``uri`` metadata (``lens shards`` writes one per image, ``lens embed``
        and ``lens index build`` keep it), else the id itself when it is a location (the event path's ids are
        ``s3://bucket/key``; an id may be an absolute path). :class:`NotFoundError` for an unknown id or one
        with no location."""
        return location_from(id_, self.metadata_of(id_), self.version.name)

    def search_id(self, id_: str, k: int = 10, *, param: int | None = None) -> tuple[str, list[Hit]]:
        """Neighbours of a stored item, itself excluded."""
        name, hits = self.search(self.vector_of(id_)[None], k, param=param, exclude=[id_])
        return name, hits[0]


def with_delta(best: dict, d_scores, d_ids: list, d_meta: list, k: int, extra: int, excluded) -> list:
    """One query's answer: the main index's ``best`` (id -> Hit) joined with the delta's top ``k + extra`` (an id in
    both: the fresher vector answers, once), ``excluded`` dropped, best ``k`` first."""
    if d_scores is not None:
        for r in np.argsort(-d_scores)[: k + extra]:
            i, s = d_ids[r], float(d_scores[r])
            if i not in best or best[i].score < s:
                best[i] = Hit(i, s, json.loads(d_meta[r]))
    if excluded is not None:
        best.pop(excluded, None)
    return sorted(best.values(), key=lambda h: -h.score)[:k]


def location_from(id_: str, metadata: dict, version: str) -> str:
    """An item's image location: its ``uri`` metadata, else the id when it is one (``s3://...``, an absolute path);
    :class:`NotFoundError` (``no_location``) otherwise."""
    uri = metadata.get(LOCATION_KEY)
    if isinstance(uri, str) and uri:
        return uri
    if id_.startswith("s3://") or id_.startswith("/"):
        return id_
    raise NotFoundError(f"id {id_!r} has no image location in index {version}: pack images with `lens shards` (it "
                        f"writes a {LOCATION_KEY} column) or carry a {LOCATION_KEY} column through `lens embed "
                        f"--carry {LOCATION_KEY}`", code="no_location")


_direct_map_lock = threading.Lock()


def stored_vector(v: IndexVersion, row: int) -> np.ndarray:
    """The vector the index stores at ``row`` (exact for Flat, IVF-Flat and HNSW; IVF-PQ's approximation)."""
    return v.index.reconstruct(int(row)) if isinstance(v.index, ShardedIndex) else _reconstruct_index(v.index, row)


def _reconstruct_index(index, row: int) -> np.ndarray:
    import faiss

    try:
        return index.reconstruct(int(row))
    except RuntimeError:
        # IVF indexes reconstruct through a direct map, built once on first use
        with _direct_map_lock:
            ivf = faiss.extract_index_ivf(index)
            if ivf.direct_map.type == faiss.DirectMap.NoMap:
                ivf.make_direct_map()
        return index.reconstruct(int(row))

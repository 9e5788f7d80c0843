"""Searching an index version plus a small delta of fresh embeddings, and swapping versions under load.

:class:`SearchService` holds a reference to the current :class:`~lens.index.store.IndexVersion` and a
:class:`DeltaIndex`. A query takes the reference once, so a hot swap (build aside, load, replace the reference)
never changes an index under a running query: each answer comes wholly from the old or the new version.
Search parameters travel with each call (FAISS ``SearchParameters``), never set on the shared index.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import numpy as np

from lens.errors import InvalidRequestError, ModelMismatchError, NotFoundError
from lens.identity import COMPAT_KEY, ModelIdentity, space_refusal
from lens.runtime.predictor import l2_normalize
from lens.tombstones import Tombstones, is_dead

from .filters import MetadataColumns, parse_filter
from .source import deletions_in, row_seq

from .store import (IndexVersion, ShardedIndex, current_version, k_factor_of, load_version, reconstruct,
                    search_params)

__all__ = ["Hit", "DeltaIndex", "DeltaSnapshot", "Hidden", "HiddenRows", "LocalIndex", "SearchService",
           "stored_vector"]

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
    seqs: list = []  # each row's order value (lens.tombstones.seq_value of its event's sequencer)
    generation: int = 0


@dataclass(frozen=True)
class Hidden:
    """What the main index must not answer, at one moment: ids the delta holds a fresher row of, and tombstones
    (id -> order value). ``token`` changes whenever either does, so what is derived from it can be cached."""

    token: tuple
    fresher: frozenset
    tombstones: Mapping[str, float | int]

    def __bool__(self) -> bool:
        return bool(self.fresher or self.tombstones)

    def rows(self, v) -> np.ndarray:
        """The rows of index version ``v`` (an :class:`IndexVersion`) that are hidden, sorted."""
        out = [r for i in self.fresher if (r := v.row_of.get(i)) is not None]
        out += [r for i, t in self.tombstones.items()
                if (r := v.row_of.get(i)) is not None and is_dead(row_seq(v.metadata[r]), t)]
        return np.unique(np.asarray(out, np.int64))


class HiddenRows:
    """:meth:`Hidden.rows` of one version, cached by the version and the token (one entry: the latest)."""

    def __init__(self) -> None:
        self._cache: tuple = (None, None)

    def __call__(self, v, hidden: Hidden) -> np.ndarray:
        key, rows = self._cache
        if key != (v.name, hidden.token):
            rows = hidden.rows(v)
            self._cache = ((v.name, hidden.token), rows)
        return rows


class DeltaIndex:
    """Exact search over embeddings that arrived after the main index was built (the event path's output).
    Small by design: the next build folds them into the main index and they are pruned here."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._lock = threading.Lock()  # serialises writers; readers never wait
        self._snap = DeltaSnapshot([], [], np.zeros((0, dim), np.float32), {}, [], 0)

    def __len__(self) -> int:
        return len(self._snap.ids)

    def snapshot(self) -> DeltaSnapshot:
        return self._snap

    def add(self, ids_in: list[str], vectors: np.ndarray, metadata: list[str] | None = None, *,
            hides=None) -> int:
        """Insert rows, or replace the row of the same id with a row of a newer or equal event (an older one is
        ignored: events arrive out of order); ``hides(id, order)`` -> a tombstone hides it (never inserted).
        Returns how many ids are new."""
        vectors = l2_normalize(np.asarray(vectors, np.float32).reshape(-1, self.dim))
        metadata = metadata or ["{}"] * len(ids_in)
        with self._lock:
            old = self._snap
            vecs = old.vectors.copy()  # O(delta) copy: the delta is small by design, and readers keep theirs
            ids, meta, row_of, seqs = list(old.ids), list(old.metadata), dict(old.row_of), list(old.seqs)
            extra: list[np.ndarray] = []
            added = 0
            for i, v, m in zip(ids_in, vectors, metadata):
                q = row_seq(m)
                if hides is not None and hides(i, q):
                    continue
                r = row_of.get(i)
                if r is None:
                    row_of[i] = len(ids)
                    ids.append(i)
                    meta.append(m)
                    seqs.append(q)
                    extra.append(v)
                    added += 1
                    continue
                if q < seqs[r]:
                    continue  # a late copy of an older event
                meta[r], seqs[r] = m, q  # a newer embedding of the same object replaces the old one
                if r < len(vecs):
                    vecs[r] = v
                else:
                    extra[r - len(vecs)] = v
            if extra:
                vecs = np.concatenate([vecs, np.stack(extra)])
            # publish: one reference assignment
            self._snap = DeltaSnapshot(ids, meta, vecs, row_of, seqs, old.generation + 1)
        return added

    def prune(self, keep) -> int:
        """Drop rows that ``keep(id, order)`` rejects (now in the main index, or deleted); returns how many."""
        with self._lock:
            old = self._snap
            rows = [r for r, i in enumerate(old.ids) if keep(i, old.seqs[r])]
            dropped = len(old.ids) - len(rows)
            if dropped:
                ids = [old.ids[r] for r in rows]
                self._snap = DeltaSnapshot(ids, [old.metadata[r] for r in rows], old.vectors[rows],
                                           {i: r for r, i in enumerate(ids)}, [old.seqs[r] for r in rows],
                                           old.generation + 1)
        return dropped


def filtered_plan(kind: str, value, frac: float, nlist: int | None) -> tuple[str, int | None]:
    """How to search when a filter lets ``frac`` of the rows through: (``"index"`` with this search parameter, or
    ``"exact"``: every selected row compared). IVF probes ``value / frac`` lists (about as many selected candidates
    as an unfiltered search sees; every list, an exact search of the selected rows, once that reaches ``nlist``);
    HNSW widens ``efSearch`` the same way down to 10 % and below that compares the selected rows exactly (a graph
    walk through mostly filtered-out nodes loses recall)."""
    if kind == "flat" or value is None:
        return "index", value
    if kind in ("ivf-flat", "ivf-pq"):
        return "index", int(min(nlist or value, math.ceil(value / max(frac, 1e-12))))
    if frac >= 0.1:
        return "index", int(min(4096, math.ceil(value / frac)))
    return "exact", None


#: a selection of at most this many floats (rows x dim) is searched as a small matrix of its own rows, gathered once
#: from the index (per cached filter): exact, and faster than any index walk that skips the other rows
GATHER_FLOATS = 4 * 2**20


class Selection:
    """The rows a filter lets through: a boolean mask, its count and its FAISS bitmap, computed once and cached; for a
    small selection, also its rows' stored vectors (gathered on first use)."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask
        self.count = int(mask.sum())
        self.bitmap = np.packbits(mask, bitorder="little")  # bit r of byte r // 8 = row r
        self._gathered = None
        self._lock = threading.Lock()

    def gathered(self, v):
        """(rows, an exact FAISS index of their stored vectors) of the selection in version ``v`` (the vectors are
        exact for Flat, IVF-Flat and HNSW; IVF-PQ's codes decoded, the values its own search scores). FAISS, not
        numpy, scores them: one thread pool for every search of the process."""
        import faiss

        if self._gathered is None:
            with self._lock:
                if self._gathered is None:
                    rows = np.flatnonzero(self.mask)
                    flat = faiss.IndexFlatIP(v.manifest["dim"])
                    if len(rows):
                        flat.add(np.stack([stored_vector(v, int(r)) for r in rows]).astype(np.float32))
                    self._gathered = (rows, flat)
        return self._gathered

    def __len__(self) -> int:
        return len(self.mask)

    def __array__(self, dtype=None, copy=None):
        return self.mask if dtype is None else self.mask.astype(dtype)


def filtered_top_k(v, q: np.ndarray, k: int, value, allowed: Selection) -> list[dict]:
    """Each query's best ``k`` among the rows ``allowed`` selects, selected inside the search (an ID-selector
    bitmap) with :func:`filtered_plan`'s parameter."""
    import faiss

    n_sel = allowed.count
    if n_sel == 0:
        return [{} for _ in q]
    kind = v.manifest["type"]
    mode, val = filtered_plan(kind, value, n_sel / len(allowed), v.manifest.get("nlist"))
    kk = min(k, n_sel)
    if n_sel * v.manifest["dim"] <= GATHER_FLOATS:  # few rows: score them all, exactly
        rows, flat = allowed.gathered(v)
        scores, found = flat.search(q, kk)
        return [{v.ids[rows[j]]: Hit(v.ids[rows[j]], float(sc), json.loads(v.metadata[rows[j]]))
                 for sc, j in zip(ss, js) if j >= 0} for ss, js in zip(scores, found)]
    if isinstance(v.index, ShardedIndex):
        scores, rows = v.index.search(q, kk, kind=kind, value=val, allowed=allowed, k_factor=k_factor_of(v.manifest))
    elif mode == "exact":  # HNSW,Flat keeps the full vectors in its storage: compare the selected ones
        scores, rows = faiss.downcast_index(v.index.storage).search(q, kk, params=search_params("flat", None,
                                                                                                allowed=allowed))
    else:
        scores, rows = v.index.search(q, kk, params=search_params(kind, val, allowed=allowed,
                                                                  k_factor=k_factor_of(v.manifest)))
    return [{v.ids[r]: Hit(v.ids[r], float(s), json.loads(v.metadata[r])) for s, r in zip(sc, rs) if r >= 0}
            for sc, rs in zip(scores, rows)]


class FilterMasks:
    """Per index version: its metadata as columns (:class:`MetadataColumns`, parsed once) and the masks of recent
    filters (LRU), each with the hidden rows removed; keyed by the filter, the version and the hidden token."""

    def __init__(self, size: int = 32) -> None:
        self._columns: tuple = (None, None)
        self._masks: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.size = size

    def columns(self, name: str, ids: list[str], metadata: list[str]) -> MetadataColumns:
        key, cols = self._columns
        if key != name:
            cols = MetadataColumns(ids, metadata)
            self._columns = (name, cols)
        return cols

    def allowed(self, v, hidden: Hidden | None, node: dict, known: set[str] | None, hidden_rows) -> Selection:
        key = (v.name, json.dumps(node, sort_keys=True), hidden.token if hidden else None)
        with self._lock:
            if key in self._masks:
                self._masks.move_to_end(key)
                return self._masks[key]
        mask = self.columns(v.name, v.ids, v.metadata).mask(node, known=known)
        if hidden:
            rows = hidden_rows(v, hidden)
            if len(rows):
                mask = mask.copy()
                mask[rows] = False
        mask = Selection(mask)
        with self._lock:
            self._masks[key] = mask
            while len(self._masks) > self.size:
                self._masks.popitem(last=False)
        return mask


class LocalIndex:
    """The main index of a :class:`SearchService` held in this process: one :class:`IndexVersion`."""

    def __init__(self, root: str, *, mmap: bool | None = None) -> None:
        self.root, self.mmap = root, mmap
        self.version: IndexVersion = load_version(root, mmap=mmap)
        self._hidden_rows = HiddenRows()
        self._filters = FilterMasks()

    def fields(self, v: IndexVersion) -> set[str]:
        """The filterable fields of version ``v``'s rows."""
        return self._filters.columns(v.name, v.ids, v.metadata).fields()

    def take(self, name: str) -> bool:
        """Load version ``name`` aside, then make it the one searched (one reference assignment)."""
        new = load_version(f"{self.root}/{name}", mmap=self.mmap)  # aside: the old one keeps serving
        if new.identity.mismatch(self.version.identity):
            logger.warning("index %s uses another model than %s; swapping anyway", new.name, self.version.name)
        self.version = new
        return True

    def holds(self, v: IndexVersion, ids: list[str]) -> dict[str, float | int]:
        """The ids of ``ids`` that ``v`` holds -> their rows' order values."""
        return {i: row_seq(v.metadata[v.row_of[i]]) for i in ids if i in v.row_of}

    def top_k(self, v: IndexVersion, q: np.ndarray, k: int, value, hidden: Hidden | None = None,
              flt: dict | None = None, known: set[str] | None = None) -> list[dict]:
        """Each query's best ``k`` of version ``v`` (id -> :class:`Hit`), ``hidden`` rows excluded and only rows
        the filter ``flt`` matches selected inside FAISS's search (an ID selector), so a query still gets ``k``
        answers however many rows are hidden or filtered out."""
        if flt is not None:
            return filtered_top_k(v, q, k, value, self._filters.allowed(v, hidden, flt, known, self._hidden_rows))
        exclude = self._hidden_rows(v, hidden) if hidden else None
        kind, kk = v.manifest["type"], min(k, v.index.ntotal)
        if isinstance(v.index, ShardedIndex):
            scores, rows = v.index.search(q, kk, kind=kind, value=value, exclude=exclude,
                                          k_factor=k_factor_of(v.manifest))
        else:
            scores, rows = v.index.search(q, kk, params=search_params(kind, value, exclude=exclude,
                                                                      k_factor=k_factor_of(v.manifest)))
        return [{v.ids[r]: Hit(v.ids[r], float(s), json.loads(v.metadata[r])) for s, r in zip(sc, rs) if r >= 0}
                for sc, rs in zip(scores, rows)]

    def lookup(self, v: IndexVersion, id_: str, *, vector: bool = True):
        """(stored vector or None, metadata dict) of ``id_`` in ``v``, or None when ``v`` does not hold it."""
        row = v.row_of.get(id_)
        if row is None:
            return None
        return (stored_vector(v, row) if vector else None), json.loads(v.metadata[row])

    def info(self) -> dict:
        return {}


class SearchService:
    """The current index version + a delta; thread-safe, hot-swappable. Where the main index lives is ``main``:
    :class:`LocalIndex` (this process, the default) or the serving layer's shard deployments, which answer the
    same five calls (``version``, ``take``, ``holds``, ``top_k``, ``lookup``); everything else (the delta, the
    swap, merging, ``k``, the model check) is this one class."""

    def __init__(self, root: str, *, mmap: bool | None = None, max_k: int = 1000, main=None) -> None:
        self.root = root
        self.max_k = max_k
        self.main = main if main is not None else LocalIndex(root, mmap=mmap)
        self._swap_lock = threading.Lock()
        self.delta = DeltaIndex(self.version.manifest["dim"])
        self.tombstones = Tombstones()
        self._delta_filters = FilterMasks()
        self._delta_ids: tuple = (-1, frozenset())
        self.delete(deletions_in([], root))  # the index's manual erasures (lens index delete)

    # -- versions ------------------------------------------------------------------------------
    @property
    def version(self):
        """The version searched now (an :class:`IndexVersion` for a :class:`LocalIndex`)."""
        return self.main.version

    @property
    def identity(self) -> ModelIdentity:
        return self.version.identity

    def refresh(self) -> bool:
        """Take the version ``CURRENT`` names if it is new (loaded aside, then swapped in); delta rows the new
        version holds leave the delta. Returns whether it swapped."""
        name = current_version(self.root)
        if name is None or name == self.version.name:
            return False
        with self._swap_lock:
            if name == self.version.name:
                return False
            old = self.version
            if not self.main.take(name):
                return False  # not ready everywhere yet: the next refresh tries again
            new = self.version
            ids = list(self.delta.snapshot().ids)
            inside = self.main.holds(new, ids) if ids else {}
            # a delta row leaves when the new version holds its id from the same or a newer event
            pruned = self.delta.prune(lambda i, q: i not in inside or q > inside[i])
            logger.info("swapped index %s -> %s (%d vectors); %d delta rows now in the main index",
                        old.name, new.name, new.manifest["count"], pruned)
            return True

    # -- the live delta and deletions --------------------------------------------------------------
    def add_rows(self, ids: list[str], vectors: np.ndarray, metadata: list[str] | None = None) -> int:
        """Fresh rows of the event path (a newer event's row replaces an id's older one; deleted rows stay out)."""
        return self.delta.add(ids, vectors, metadata, hides=self.tombstones.hides)

    def delete(self, entries) -> int:
        """Record deletions ((id, order value) pairs; :mod:`lens.tombstones`): from now on no answer, lookup or
        thumbnail returns a row they hide. Returns how many ids got a new or newer tombstone."""
        changed = self.tombstones.add(entries)
        if changed:
            self.delta.prune(lambda i, q: not self.tombstones.hides(i, q))
        return len(changed)

    def hidden(self) -> Hidden:
        """What the main index must not answer now: ids the delta holds fresher rows of, and the tombstones."""
        d = self.delta.snapshot()
        gen, ids = self._delta_ids
        if gen != d.generation:  # one set per delta state, not per query
            gen, ids = d.generation, frozenset(d.ids)
            self._delta_ids = (gen, ids)
        return Hidden((gen, self.tombstones.generation), ids, self.tombstones.snapshot())

    def info(self) -> dict:
        v = self.version
        m = v.manifest
        return {"index_version": v.name, "type": m["type"], "factory": m["factory"], "count": m["count"],
                "dim": m["dim"], "search": m["search"], "recall": {k: m["recall"][k] for k in ("k", "value")},
                "model_identity": self.identity.to_dict(), "delta": len(self.delta),
                "tombstones": len(self.tombstones)} | self.main.info()

    # -- queries -------------------------------------------------------------------------------
    def check_model(self, info: dict) -> None:
        """Refuse a query embedded by another model, weights or preprocessing than the index's, or in another
        precision space (int8/float) unless the index records their measured agreement."""
        other = ModelIdentity.from_dict(info)
        v = self.version  # one version for both checks
        diff = v.identity.mismatch(other)
        if diff:
            raise ModelMismatchError(
                f"the index {v.name} was built with {v.identity.model} "
                f"(weights {v.identity.weights_sha256[:12]}); this query's embedding differs in "
                f"{', '.join(diff)}: rebuild the index with the serving model or serve the index's model")
        why = self.space_refusal(other, v)
        if why:
            raise ModelMismatchError(f"the index {v.name} refuses this query: {why}")

    def space_refusal(self, other: ModelIdentity, v: IndexVersion | None = None) -> str | None:
        """Why vectors of ``other`` (a query's, delta rows') may not meet version ``v``'s (default the current
        one), by its precision compatibility record (:func:`lens.identity.space_refusal`); None when they may."""
        v = v or self.version
        return space_refusal(v.identity, v.manifest.get(COMPAT_KEY), other)

    def _k(self, k: int) -> int:
        if not 1 <= int(k) <= self.max_k:
            raise InvalidRequestError(f"k must be between 1 and {self.max_k}, got {k}")
        return int(k)

    def search(self, vectors: np.ndarray, k: int = 10, *, param: int | None = None,
               exclude: list[str | None] | None = None, filter=None) -> tuple[str, list[list[Hit]]]:
        """Top-``k`` per query vector over main + delta: (index version, hits best first). ``param`` overrides
        the tuned nprobe/efSearch for this call only; ``exclude[i]`` drops that id from query i's results;
        ``filter`` (:mod:`lens.index.filters`: a dict or its JSON) keeps only the items it matches, selected
        inside the search."""
        k = self._k(k)
        node = parse_filter(filter)
        v = self.version  # one reference for the whole query: a concurrent swap cannot mix versions
        q = l2_normalize(np.asarray(vectors, np.float32).reshape(-1, v.manifest["dim"]))
        value = param if param is not None else v.manifest["search"]["value"]
        extra = 1 if exclude else 0
        hidden = self.hidden()
        d = self.delta.snapshot()
        d_ids, d_meta, d_vecs = d.ids, d.metadata, d.vectors
        if node is None:
            best = self.main.top_k(v, q, k + extra, value, hidden)
        else:
            d_cols = self._delta_filters.columns(f"delta-{d.generation}", d.ids, d.metadata)
            known = self.main.fields(v) | d_cols.fields()
            best = self.main.top_k(v, q, k + extra, value, hidden, node, known)
            keep = np.flatnonzero(d_cols.mask(node, known=known)) if len(d.ids) else []
            d_ids, d_meta, d_vecs = [d.ids[r] for r in keep], [d.metadata[r] for r in keep], d.vectors[keep]
        d_scores = q @ d_vecs.T if len(d_ids) else None
        return v.name, [with_delta(best[qi], None if d_scores is None else d_scores[qi], d_ids, d_meta, k, extra,
                                   exclude[qi] if exclude else None) for qi in range(len(q))]

    def _lookup(self, id_: str, *, vector: bool) -> tuple:
        delta = self.delta.snapshot()
        if id_ in delta.row_of:
            r = delta.row_of[id_]
            return delta.vectors[r], json.loads(delta.metadata[r])
        v = self.version
        found = self.main.lookup(v, id_, vector=vector)
        if found is None or self.tombstones.hides(id_, row_seq(found[1])):
            raise NotFoundError(f"no id {id_!r} in index {v.name}")
        return found

    def vector_of(self, id_: str) -> np.ndarray:
        """The stored vector of ``id_`` (delta first: it is the fresher)."""
        return np.asarray(self._lookup(id_, vector=True)[0])

    def metadata_of(self, id_: str) -> dict:
        """The stored metadata of ``id_`` (delta first: it is the fresher)."""
        return self._lookup(id_, vector=False)[1]

    def location_of(self, id_: str) -> str:
        """Where ``id_``'s image lives: its ``uri`` metadata (``lens shards`` writes one per image, ``lens embed``
        and ``lens index build`` keep it), else the id itself when it is a location (the event path's ids are
        ``s3://bucket/key``; an id may be an absolute path). :class:`NotFoundError` for an unknown id or one
        with no location."""
        return location_from(id_, self.metadata_of(id_), self.version.name)

    def search_id(self, id_: str, k: int = 10, *, param: int | None = None, filter=None) -> tuple[str, list[Hit]]:
        """Neighbours of a stored item, itself excluded (``filter``: as :meth:`search`)."""
        name, hits = self.search(self.vector_of(id_)[None], k, param=param, exclude=[id_], filter=filter)
        return name, hits[0]


def with_delta(best: dict, d_scores, d_ids: list, d_meta: list, k: int, extra: int, excluded) -> list:
    """One query's answer: the main index's ``best`` (id -> Hit; it excludes the ids the delta holds, whose rows
    there are fresher) joined with the delta's top ``k + extra``, ``excluded`` dropped, best ``k`` first."""
    if d_scores is not None:
        for r in np.argsort(-d_scores)[: k + extra]:
            best[d_ids[r]] = Hit(d_ids[r], float(d_scores[r]), json.loads(d_meta[r]))
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


def stored_vector(v: IndexVersion, row: int) -> np.ndarray:
    """The vector the index stores at ``row`` (exact for Flat, IVF-Flat and HNSW; IVF-PQ's approximation)."""
    return v.index.reconstruct(int(row)) if isinstance(v.index, ShardedIndex) else reconstruct(v.index, row)



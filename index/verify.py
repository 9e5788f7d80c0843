"""``lens index verify``: re-embed a seeded sample of stored rows from their source images and list the rows whose
stored vector disagrees (cosine below :data:`lens.runtime.verify.MIN_COSINE`).

Two kinds of store:

* an embeddings folder (``lens embed`` output, or event-path parts): the sampled rows' vectors are read from the
  parts; each image is found through the row's ``uri`` column (``lens shards`` writes one), the id itself when it
  is a location (the event path's ``s3://bucket/key``), or the job's input named in its manifest (Parquet shards:
  the row with that id; an image folder: the file at that relative path);
* an index version: the vectors it stores (exact for Flat, IVF-Flat and HNSW; an IVF-PQ index keeps approximate
  codes, so its rows are checked in the embeddings it was built from), each image through the index's metadata
  (``uri``), the id, or the sources in its manifest.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import numpy as np
import pyarrow.parquet as pq

from lens.errors import ConfigError
from lens.identity import ModelIdentity
from lens.runtime.verify import Row, VerifyReport, reembed_and_compare
from lens.storage import Location, split_glob

from .source import EmbeddingSource, as_id, open_sources

__all__ = ["verify_embeddings", "verify_index"]


def verify_embeddings(uri: str, sample: int, *, seed: int = 0, log=None, **model) -> VerifyReport:
    """Check ``sample`` seeded random rows of the embeddings at ``uri``."""
    src = EmbeddingSource(uri)
    if src.identity is None:
        raise ConfigError(f"{uri}: no embeddings")
    rows = list(_sample_source(src, None, sample, seed))
    return reembed_and_compare(src.identity, _with_images(rows, [src]), log=log, **model)


def verify_index(root: str, sample: int, *, seed: int = 0, log=None, **model) -> VerifyReport:
    """Check ``sample`` seeded random rows of the index at ``root`` (its CURRENT version, or a version dir)."""
    import json

    from .search import stored_vector
    from .store import load_version

    v = load_version(root, mmap=False)
    ident = ModelIdentity.from_dict(v.manifest)
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(v.ids), size=min(sample, len(v.ids)), replace=False).tolist())
    sources = _sources_of(v.manifest)
    if v.manifest.get("type") == "ivf-pq":  # approximate codes: the vectors it was built from are the record
        if log is not None:
            log(f"{v.name} is IVF-PQ (approximate codes): checking its rows in the embeddings it was built from")
        wanted = {v.ids[r] for r in picked}
        rows = [row for src in sources for row in _sample_source(src, wanted, len(wanted), seed)]
    else:
        rows = [(v.ids[r], stored_vector(v, r), json.loads(v.metadata[r]).get("uri")) for r in picked]
    if log is not None:
        log(f"verifying {len(rows)} of {len(v.ids):,} rows of index version {v.name}")
    return reembed_and_compare(ident, _with_images(rows, sources), log=log, **model)


# -- rows ------------------------------------------------------------------------------------------


def _sources_of(manifest: dict) -> list[EmbeddingSource]:
    uris = [s["uri"] for s in manifest.get("sources") or []]
    if not uris:
        return []
    sources, _ = open_sources(uris)
    return sources


def _sample_source(src: EmbeddingSource, wanted: set[str] | None, sample: int,
                   seed: int) -> Iterator[tuple[str, np.ndarray, str | None]]:
    """(id, stored vector, uri or None) of ``sample`` seeded random rows of ``src`` (or, with ``wanted``, of the
    rows with those ids)."""
    counts = []
    for f in src.files:
        with src.loc.fs.open_input_file(f) as fh:
            counts.append(pq.ParquetFile(fh).metadata.num_rows)
    total = sum(counts)
    if wanted is None:
        rng = np.random.default_rng(seed)
        chosen = set(rng.choice(total, size=min(sample, total), replace=False).tolist())
    start = 0
    for f, n in zip(src.files, counts):
        if wanted is None and not any(start <= p < start + n for p in chosen):
            start += n
            continue
        with src.loc.fs.open_input_file(f) as fh:
            t = pq.ParquetFile(fh).read(columns=[c for c in ("id", "embedding", "uri")
                                                 if c in pq.ParquetFile(fh).schema_arrow.names])
        ids = [as_id(x) for x in t.column("id").to_pylist()]
        uris = t.column("uri").to_pylist() if "uri" in t.column_names else [None] * len(ids)
        emb = t.column("embedding").combine_chunks()
        vecs = np.asarray(emb.values.to_numpy(zero_copy_only=False), np.float32).reshape(-1, src.identity.embed_dim)
        for i, id_ in enumerate(ids):
            if id_ is None:
                continue
            if (wanted is None and start + i in chosen) or (wanted is not None and id_ in wanted):
                yield id_, vecs[i], uris[i]
        start += n


def _with_images(rows, sources: list[EmbeddingSource]) -> Iterator[Row]:
    """Each (id, vector, uri) with a reader of its source image: the uri, the id when it is a location, else the
    job input its embeddings folder's manifest names (looked up for the sampled ids only, in one pass)."""
    rows = list(rows)
    need = {id_ for id_, _, uri in rows if _location(id_, uri) is None}
    found: dict[str, bytes] = {}
    for s in sources:
        if need - set(found) and s.manifest and s.manifest.get("input"):
            found |= _input_images(s.manifest, need - set(found))
    for id_, vec, uri in rows:
        yield Row(id_, vec, _reader(id_, _location(id_, uri), found))


def _location(id_: str, uri: str | None) -> str | None:
    return uri or (id_ if id_.startswith("s3://") or id_.startswith("/") else None)


def _reader(id_: str, location: str | None, found: dict[str, bytes]) -> Callable[[], bytes]:
    def read() -> bytes:
        if location is not None:
            base, name = location.rsplit("/", 1)
            loc = Location.parse(base)
            return loc.read_bytes(loc.path(name))
        if id_ in found:
            return found[id_]
        raise FileNotFoundError(f"no image for id {id_!r}: no uri, and not in the input the manifest names")

    return read


def _input_images(manifest: dict, ids: set[str]) -> dict[str, bytes]:
    """The images of ``ids`` in a ``lens embed`` job's input: Parquet shards (the rows with those ids; only the id
    column is read for the others) or an image folder (the files at those relative paths)."""
    base, pattern = split_glob(str(manifest["input"]))
    loc = Location.parse(base)
    out: dict[str, bytes] = {}
    if manifest.get("input_format") != "parquet":
        for id_ in ids:
            path = loc.path(id_)
            if not os.path.normpath(loc.relative(path)).startswith("..") and loc.exists(path):
                out[id_] = loc.read_bytes(path)
        return out
    id_col, img_col = manifest.get("id_column") or "id", manifest.get("image_column") or "image"
    for f in (f for f in loc.list_files(pattern=pattern) if f.endswith(".parquet")):
        with loc.fs.open_input_file(f) as fh:
            pf = pq.ParquetFile(fh)
            if id_col not in pf.schema_arrow.names or img_col not in pf.schema_arrow.names:
                continue
            file_ids = [as_id(x) for x in pf.read(columns=[id_col]).column(id_col).to_pylist()]
            hits = [i for i, x in enumerate(file_ids) if x in ids]
            if hits:
                images = pf.read(columns=[img_col]).column(img_col).take(hits).to_pylist()
                out |= {file_ids[i]: b for i, b in zip(hits, images)}
        if len(out) == len(ids):
            break
    return out

"""Embedding sources an index is built from, read in bounded chunks.

Two kinds, both Parquet with ``id`` and ``embedding`` (``fixed_size_list<float32>[dim]``):

* a ``lens embed`` output directory (local or ``s3://``): its ``manifest.json`` lists the files and names the
  model, weights checksum and preprocessing;
* the event path's embedding parts (``lens.serve.events.results``): any ``*.parquet`` under a prefix, each carrying the
  model's identity in its schema metadata (``lens_model_identity``; ``lens_model`` from earlier versions).

Every source must come from the same model, weights and preprocessing, or the build is refused: vectors
from different models are not comparable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lens.errors import ConfigError
from lens.identity import LEGACY_PARQUET_KEY, PARQUET_KEY, ModelIdentity
from lens.storage import Location
from lens.tombstones import is_tombstone_file, read_tombstones, seq_value

__all__ = ["EmbeddingSource", "Chunk", "open_sources", "kept_chunks", "as_id", "row_seq",
           "deletions_in"]

#: the event path's column of each row's S3 sequencer (orders the events of one key; see lens.tombstones)
SEQUENCER = "sequencer"
#: when a row was embedded (Unix seconds): the event path writes it per row; a lens embed output's rows take its
#: manifest's created_at
INDEXED_AT = "indexed_at"
#: custom classifiers' tags, as `lens embed` and the event path write them: per row a JSON object, head name -> its tags
CUSTOM_TAGS = "custom_tags"
#: kept (compactly) in the index's metadata sidecar when present
METADATA_COLUMNS = ("tags", "top1", "uri", SEQUENCER, INDEXED_AT, CUSTOM_TAGS)
#: The longest image location kept (``s3://`` + a 63-character bucket + a 1,024-byte key fits).
MAX_LOCATION_CHARS = 1100
#: The longest value of a carried column kept in the index metadata (a caption, a URL), in characters.
MAX_CARRIED_CHARS = 1000


@dataclass
class Chunk:
    ids: list[str | None]  # None: a null or empty id, dropped by every reader
    vectors: np.ndarray  # (n, dim) float32
    metadata: list[str]  # JSON per row

    def take(self, rows) -> "Chunk":
        """The chunk's rows at positions ``rows``, in that order."""
        return Chunk([self.ids[i] for i in rows], self.vectors[rows], [self.metadata[i] for i in rows])


class EmbeddingSource:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.loc = Location.parse(uri)
        manifest = self.loc.read_json(self.loc.path("manifest.json")) if not self.loc.uri.endswith(".parquet") else None
        self.manifest = manifest
        if manifest is not None:
            self.kind = "lens-embed"
            self.files = [self.loc.path(f) for f in manifest["files"]]
            self.identity = ModelIdentity.from_dict(manifest)
            # `lens embed --carry url,caption`: kept in the index metadata, so search results return them
            self.carry = [c for c in manifest.get("carry_columns") or [] if c not in ("id", "embedding",
                                                                                        *METADATA_COLUMNS)]
        else:
            self.kind = "parts"
            self.carry = []
            found = [f for f in self.loc.list_files(pattern=None) if f.endswith(".parquet")]
            self.files = [f for f in found if not is_tombstone_file(f)]  # deletions beside them: deletions_in
            self.identity = self._identity_from_parts() if self.files else None

    def _parquet(self, path: str, fh) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(fh)
        except (pa.ArrowInvalid, OSError) as e:
            raise ConfigError(f"{self.loc.uri_of(path)} is not a readable Parquet file ({str(e).splitlines()[0]}); "
                              "--embeddings must hold only embedding parts") from e

    def _identity_from_parts(self) -> ModelIdentity:
        with self.loc.fs.open_input_file(self.files[0]) as f:
            meta = self._parquet(self.files[0], f).schema_arrow.metadata or {}
        raw = meta.get(PARQUET_KEY) or meta.get(LEGACY_PARQUET_KEY)  # the legacy key: parts of earlier versions
        if raw is None:
            raise ConfigError(f"{self.uri}: no manifest.json and {self.loc.uri_of(self.files[0])} names no model "
                              "(lens_model_identity metadata): not a Lens embedding output")
        return ModelIdentity.from_dict(json.loads(raw))

    def ids(self) -> Iterator[list[str | None]]:
        """Each file's ids in order; ``None`` for a null or empty id (such a row is never indexed)."""
        for f in self.files:
            with self.loc.fs.open_input_file(f) as fh:
                pf = self._parquet(f, fh)
                if "id" not in pf.schema_arrow.names or "embedding" not in pf.schema_arrow.names:
                    raise ConfigError(f"{self.loc.uri_of(f)} has no id and embedding columns: not an embedding part")
                yield [as_id(x) for x in pf.read(columns=["id"]).column("id").to_pylist()]

    def keys(self) -> Iterator[tuple[list[str | None], list]]:
        """Each file's (ids, order values): the rows' sequencers as :func:`lens.tombstones.seq_value` (``-1`` where
        the file has none, as ``lens embed`` outputs)."""
        for f in self.files:
            with self.loc.fs.open_input_file(f) as fh:
                pf = self._parquet(f, fh)
                if "id" not in pf.schema_arrow.names or "embedding" not in pf.schema_arrow.names:
                    raise ConfigError(f"{self.loc.uri_of(f)} has no id and embedding columns: not an embedding part")
                cols = ["id"] + ([SEQUENCER] if SEQUENCER in pf.schema_arrow.names else [])
                t = pf.read(columns=cols)
                ids = [as_id(x) for x in t.column("id").to_pylist()]
                seqs = [seq_value(x) for x in t.column(SEQUENCER).to_pylist()] if SEQUENCER in cols else \
                    [-1] * len(ids)
                yield ids, seqs

    def chunks(self, rows: int) -> Iterator[Chunk]:
        """The rows in file order, ``rows`` at a time at most (one file at a time in memory)."""
        for f in self.files:
            with self.loc.fs.open_input_file(f) as fh:
                pf = self._parquet(f, fh)
                cols = [c for c in ("id", "embedding", *METADATA_COLUMNS, *self.carry) if c in pf.schema_arrow.names]
                for rb in pf.iter_batches(batch_size=rows, columns=cols):
                    yield _chunk(rb, self.identity.embed_dim, self.carry, self.created_at)

    @property
    def created_at(self) -> float | None:
        """A lens embed output's time (its manifest's created_at), the indexed_at of rows without their own."""
        from datetime import datetime, timezone

        stamp = (self.manifest or {}).get("created_at")
        try:
            return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp() \
                if stamp else None
        except ValueError:
            return None


def _chunk(rb: pa.RecordBatch, dim: int, carry: list[str] = (), created_at: float | None = None) -> Chunk:
    emb = rb.column(rb.schema.get_field_index("embedding"))
    flat = emb.values if isinstance(emb, pa.FixedSizeListArray) else pa.concat_arrays([emb.flatten()])
    vectors = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
    names = rb.schema.names
    meta = []
    tags = rb.column(names.index("tags")).to_pylist() if "tags" in names else None
    top1 = rb.column(names.index("top1")).to_pylist() if "top1" in names else None
    carried = {c: rb.column(names.index(c)).to_pylist() for c in carry if c in names}
    uris = rb.column(names.index("uri")).to_pylist() if "uri" in names else None
    seqs = rb.column(names.index(SEQUENCER)).to_pylist() if SEQUENCER in names else None
    times = rb.column(names.index(INDEXED_AT)).to_pylist() if INDEXED_AT in names else None
    customs = rb.column(names.index(CUSTOM_TAGS)).to_pylist() if CUSTOM_TAGS in names else None
    for i in range(rb.num_rows):
        m = {}
        if tags is not None and tags[i]:
            m["tags"] = [t["label"] for t in tags[i][:3]]
        elif top1 is not None and top1[i]:
            m["tags"] = [top1[i]]
        if uris is not None and uris[i] and len(str(uris[i])) <= MAX_LOCATION_CHARS:  # where the image lives
            m["uri"] = str(uris[i])
        if seqs is not None and seqs[i]:  # the event that wrote the row: orders it against deletions
            m[SEQUENCER] = str(seqs[i])
        if customs is not None and customs[i] and (labels := custom_labels(customs[i])):
            m[CUSTOM_TAGS] = labels  # filterable: {"custom_tags": "coffee"}
        when = times[i] if times is not None and times[i] is not None else created_at
        if when is not None:
            m[INDEXED_AT] = float(when)
        for c, values in carried.items():
            if values[i] is not None:
                m[c] = str(values[i])[:MAX_CARRIED_CHARS]
        meta.append(json.dumps(m))
    ids = [as_id(x) for x in rb.column(names.index("id")).to_pylist()]
    return Chunk(ids, vectors, meta)


def custom_labels(value: str | dict) -> list[str]:
    """The labels a row's custom classifiers gave it (every head's, those that passed their threshold), sorted:
    what the index keeps to filter on. ``value``: head name -> tags, or its JSON; anything else gives none."""
    try:
        heads = json.loads(value) if isinstance(value, str) else value
        return sorted({str(t["label"]) for tags in heads.values() for t in tags or () if t.get("passed", True)})
    except (ValueError, TypeError, AttributeError, KeyError):
        return []


def row_seq(metadata: dict | str) -> float | int:
    """A stored row's order value, from its metadata (JSON or dict): its event's sequencer, else ``-1``."""
    if isinstance(metadata, str):
        if SEQUENCER not in metadata:  # most rows: no JSON parse
            return -1
        metadata = json.loads(metadata)
    return seq_value(metadata.get(SEQUENCER))


def as_id(value) -> str | None:
    """An item id as a string; ``None`` for a null or blank one (never the string ``"None"``)."""
    if value is None:
        return None
    text = str(value)
    return text if text.strip() else None


def open_sources(uris: list[str]) -> tuple[list[EmbeddingSource], ModelIdentity]:
    """Open every source and check they share one model identity."""
    sources = [EmbeddingSource(u) for u in uris]
    known = [s for s in sources if s.identity is not None]
    if not known:
        raise ConfigError(f"no embeddings found in {', '.join(uris)}")
    ident = known[0].identity
    for s in known[1:]:
        diff = ident.mismatch(s.identity)
        if diff:
            raise ConfigError(f"{s.uri} was embedded with a different {', '.join(diff)} than {known[0].uri}; "
                              "an index needs one model")
        if not s.identity.same_space(ident):
            raise ConfigError(f"{s.uri} holds {s.identity.precision} embeddings and {known[0].uri} "
                              f"{ident.precision} ones (or int8 from another calibration); an index holds one precision's "
                              "embeddings (re-embed one of them)")
    return [s for s in sources if s.files], ident


def deletions_in(uris: list[str], index_root: str | None = None) -> list[tuple[str, float | int]]:
    """(id, order value) of every tombstone beside the embedding parts under ``uris`` and, with ``index_root``, of
    the index's manual erasures (``INDEX_ROOT/tombstones/``)."""
    from lens.tombstones import TOMBSTONES_DIR

    out: list[tuple[str, float | int]] = []
    places = [u for u in uris if not u.endswith(".parquet")]
    if index_root is not None:
        places.append(f"{index_root.rstrip('/')}/{TOMBSTONES_DIR}")
    for u in places:
        loc = Location.parse(u)
        out += [e for f in loc.list_files(pattern=None) if is_tombstone_file(f) for e in read_tombstones(loc, f)]
    return out


def kept_chunks(sources, keep: np.ndarray, rows: int):
    """(rank of the chunk's first kept row, chunk of kept rows), in order."""
    pos = rank = 0
    for src in sources:
        for chunk in src.chunks(rows):
            m = keep[pos : pos + len(chunk.ids)]
            pos += len(chunk.ids)
            if not m.any():
                continue
            if not m.all():
                chunk = chunk.take(np.flatnonzero(m))
            yield rank, chunk
            rank += len(chunk.ids)

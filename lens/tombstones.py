"""Tombstones: the durable record that an item was deleted, and the one rule that decides what a deletion hides.

A tombstone part is a small Parquet file named ``tombstone-*.parquet`` with the columns ``id``, ``sequencer``
(the S3 event's sequencer, hex; null for a manual erasure), ``deleted_at`` (Unix seconds), ``source`` and
``reason``, and the schema metadata ``lens_tombstones``. Two places hold them:

* the event path's embedding prefix, beside the embedding parts (an ``s3:ObjectRemoved:*`` event), so every
  searcher replica reads them through the same delta feed as the additions, and every index build over that
  prefix drops the deleted rows;
* ``INDEX_ROOT/tombstones/`` (``lens index delete``), read by the searchers and builds of that index.

**The rule** (:func:`is_dead`): a row of id ``i`` written from an event with sequencer ``s`` is hidden by a
tombstone of ``i`` with sequencer ``t`` unless ``s`` is newer than ``t`` (S3 orders the events of one key by
sequencer: an upload after the deletion comes back, a late redelivery of the upload before it does not). A row
without a sequencer (``lens embed``, parts of earlier versions) is older than any tombstone of its id, and a
manual erasure (no sequencer) hides every row of its id, whatever comes later: an erasure request holds.
Tombstones are never dropped by Lens: a searcher keeps them for as long as it runs, so a build that started
before a deletion cannot bring the row back.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
import time
import uuid
from typing import Iterable

__all__ = ["TOMBSTONE_PREFIX", "TOMBSTONES_DIR", "seq_value", "is_dead", "is_tombstone_file", "tombstone_table",
           "read_tombstones", "write_tombstones", "Tombstones"]

#: file-name prefix of a tombstone part (embedding parts are ``part-*.parquet``)
TOMBSTONE_PREFIX = "tombstone-"
#: the folder of an index root that holds the manual erasures (``lens index delete``)
TOMBSTONES_DIR = "tombstones"
#: Parquet schema-metadata key marking a tombstone part (and its format version)
METADATA_KEY = b"lens_tombstones"
FORMAT = b"1"

#: the order value of a manual erasure: newer than any sequencer
FOREVER = math.inf


def seq_value(sequencer) -> float | int:
    """A sequencer as a number that orders the events of one key (S3: hex, compared after padding with zeros, which
    is comparing the numbers); ``-1`` for none (older than any event)."""
    if sequencer is None or sequencer == "":
        return -1
    if isinstance(sequencer, (int, float)):
        return sequencer
    try:
        return int(str(sequencer), 16)
    except ValueError:
        return -1


def is_dead(row_seq, tomb_seq) -> bool:
    """Does a tombstone of order ``tomb_seq`` hide a row of order ``row_seq`` (both from :func:`seq_value`)?"""
    return tomb_seq is not None and not row_seq > tomb_seq


def is_tombstone_file(path: str) -> bool:
    return path.rsplit("/", 1)[-1].startswith(TOMBSTONE_PREFIX) and path.endswith(".parquet")


def tombstone_table(ids: list[str], sequencers: list[str | None], *, source: str, reason: str | None = None,
                    deleted_at: float | None = None):
    import pyarrow as pa

    now = time.time() if deleted_at is None else deleted_at
    return pa.table({"id": pa.array(ids, pa.string()), "sequencer": pa.array(sequencers, pa.string()),
                     "deleted_at": pa.array([now] * len(ids), pa.float64()),
                     "source": pa.array([source] * len(ids), pa.string()),
                     "reason": pa.array([reason] * len(ids), pa.string())},
                    metadata={METADATA_KEY: FORMAT})


def table_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def part_name(ids: Iterable[str], sequencers: Iterable[str | None]) -> str:
    """A name derived from what the part holds: writing the same deletions again replaces it, never duplicates."""
    key = "\n".join(sorted(f"{i}@{s}" for i, s in zip(ids, sequencers)))
    return f"{TOMBSTONE_PREFIX}{hashlib.sha256(key.encode()).hexdigest()[:32]}.parquet"


def write_tombstones(folder_uri: str, ids: list[str], *, source: str, reason: str | None = None,
                     sequencers: list[str | None] | None = None) -> str:
    """Write one tombstone part under ``folder_uri`` (local or ``s3://``; atomic) and return its URI. Manual erasures
    (no sequencers) get a unique name: each request is its own record."""
    from lens.storage import Location

    sequencers = sequencers if sequencers is not None else [None] * len(ids)
    if sequencers and all(s is None for s in sequencers):
        name = f"{TOMBSTONE_PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}.parquet"
    else:
        name = part_name(ids, sequencers)
    loc = Location.parse(folder_uri)
    path = loc.path(name)
    loc.write_bytes(path, table_bytes(tombstone_table(ids, sequencers, source=source, reason=reason)))
    return loc.uri_of(path)


def read_tombstones(loc, path: str) -> list[tuple[str, float | int]]:
    """(id, order value) of each row of the tombstone part ``path`` of :class:`~lens.storage.Location` ``loc``."""
    import pyarrow.parquet as pq

    with loc.fs.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        if (pf.schema_arrow.metadata or {}).get(METADATA_KEY) is None:
            raise ValueError(f"{loc.uri_of(path)} is not a tombstone part (no {METADATA_KEY.decode()} metadata)")
        t = pf.read(columns=["id", "sequencer"])
    return [(i, FOREVER if s is None else seq_value(s))
            for i, s in zip(t.column("id").to_pylist(), t.column("sequencer").to_pylist()) if i]


class Tombstones:
    """The deletions one process knows: id -> the newest tombstone's order value. Thread-safe; readers take
    :meth:`snapshot` (an immutable mapping) and :attr:`generation`, which changes with every new deletion."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._map: dict[str, float | int] = {}
        self.generation = 0

    def __len__(self) -> int:
        return len(self._map)

    def add(self, entries: Iterable[tuple[str, float | int]]) -> list[str]:
        """Record deletions; returns the ids whose tombstone is new or newer (the rows to look at again)."""
        changed = []
        with self._lock:
            new = dict(self._map)
            for i, t in entries:
                if i not in new or t > new[i]:
                    new[i] = t
                    changed.append(i)
            if changed:
                self._map = new  # publish: one reference assignment
                self.generation += 1
        return changed

    def snapshot(self) -> dict[str, float | int]:
        return self._map

    def hides(self, id_: str, row_seq) -> bool:
        """Is a row of ``id_`` with order ``row_seq`` deleted?"""
        t = self._map.get(id_)
        return t is not None and is_dead(row_seq, t)

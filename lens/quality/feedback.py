"""Labeled feedback at rest: the Parquet parts ``POST /v1/feedback`` writes, and reading them back (``lens train
--feedback``, accuracy reports). One row per item: ``id``, ``sha256``, ``labels`` (the truth), ``predicted``,
``version``, ``head``, ``predicted_at``, ``received_at``."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from lens.storage import Location

__all__ = ["feedback_schema", "write_feedback_part", "read_feedback"]


def feedback_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("sha256", pa.string()), ("labels", pa.list_(pa.string())),
                      ("predicted", pa.list_(pa.string())), ("version", pa.string()), ("head", pa.string()),
                      ("predicted_at", pa.float64()), ("received_at", pa.float64())])


def write_feedback_part(loc: Location, rows: list[dict]) -> str:
    """One part holding ``rows``, written atomically under ``loc``; its URI."""
    import pyarrow as pa

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = loc.path(f"part-{stamp}-{uuid.uuid4().hex[:12]}.parquet")
    loc.write_table(path, pa.Table.from_pylist(rows, schema=feedback_schema()))
    return loc.uri_of(path)


def read_feedback(uri: str):
    """Every feedback part under ``uri`` as one Arrow table (empty if there is none)."""
    import pyarrow as pa

    loc = Location.parse(uri)
    files = loc.list_files(pattern="*.parquet")
    if not files:
        return pa.Table.from_pylist([], schema=feedback_schema())
    return pa.concat_tables([loc.read_table(f) for f in files])

"""Where tagging results go: a JSON sidecar per image (the idempotency record), optional S3 object tags,
and Parquet parts of embeddings for the search index."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass

import numpy as np

from lens.identity import PARQUET_KEY, ModelIdentity

from .objects import Boto3Objects, in_thread
from .s3events import ObjectEvent, sequencer_newer

__all__ = ["ResultStore", "Record", "s3_tags", "count_writes", "embedding_rows"]

logger = logging.getLogger("lens.events")

_TAG_SAFE = re.compile(r"[^A-Za-z0-9 +\-=._:/@]")


@dataclass
class Record:
    """What the sidecar holds about one object version."""

    event: ObjectEvent
    status: str  # "tagged" | "skipped" | "deleted"
    reason: str | None = None
    tags: list | None = None
    embedding: np.ndarray | None = None
    custom_tags: dict | None = None  # head name -> tags above threshold (pools serving lens train heads)
    model_identity: dict | None = None  # the version that tagged it, when the pool serves registry versions

    def to_json(self, model: dict, embedding: bool = True) -> dict:
        model = self.model_identity or model
        ident = _identity(model)
        d = {
            "bucket": self.event.bucket, "key": self.event.key, "etag": self.event.etag,
            "version_id": self.event.version_id, "sequencer": self.event.sequencer,
            "status": self.status, "processed_at": time.time(),
            "model": model.get("model"), "weights_sha256": model.get("weights_sha256"),
            "model_identity": ident.to_dict() if ident else None,
            "version": ident.version if ident else None,
        }
        if self.reason:
            d["reason"] = self.reason
        if self.tags is not None:
            d["tags"] = self.tags
        if self.custom_tags is not None:
            d["custom_tags"] = self.custom_tags
        if embedding and self.embedding is not None:
            d["embedding"] = [float(x) for x in self.embedding]
        return d


def _identity(model: dict) -> ModelIdentity | None:
    """The tagging model's identity from its ``info()`` (``None`` before the model has answered)."""
    try:
        return ModelIdentity.from_dict(model)
    except ValueError:
        return None


def s3_tags(existing: list[dict], tags: list[dict], model: str) -> list[dict]:
    """Merge Lens's tags into an object's tag set within S3's limits (10 tags, 128/256 chars).

    Keys that are not Lens's are kept; Lens uses ``lens:model`` and ``lens:tag1``..``lens:tagN``
    for as many labels as fit.
    """
    kept = [t for t in existing if not t["Key"].startswith("lens:")]
    room = 10 - len(kept)
    ours = [{"Key": "lens:model", "Value": _TAG_SAFE.sub(" ", model)[:256]}] if room > 0 else []
    for i, t in enumerate(tags[: max(0, room - 1)]):
        ours.append({"Key": f"lens:tag{i + 1}", "Value": _TAG_SAFE.sub(" ", t["label"])[:256]})
    return kept + ours


#: S3's limit on an object key, in UTF-8 bytes.
MAX_KEY_BYTES = 1024
#: Where sidecars of keys too long to mirror go: ``{result_prefix}{LONG_KEYS}{sha256}.json``.
LONG_KEYS = "_long-keys/"


class ResultStore:
    """Sidecars at ``s3://{results bucket}/{result_prefix}{key}.json`` (``{result_prefix}{bucket}/{key}.json`` when
    several source buckets share one results bucket); embeddings under ``embeddings_prefix``.

    A sidecar key that would pass S3's 1,024-byte limit is ``{result_prefix}_long-keys/{sha256 of bucket/key}.json``
    instead; the sidecar itself records the bucket and the full key.
    """

    def __init__(self, s3, result_prefix: str, embeddings_prefix: str, *, results_bucket: str | None = None,
                 object_tags: bool = False, key_by_bucket: bool = False, sidecar_embedding: bool = False,
                 objects=None) -> None:
        self.s3 = s3
        self.objects = objects or Boto3Objects(s3)  # the sidecars' conditional writes (lens.serve.events.objects)
        self.result_prefix = result_prefix
        self.embeddings_prefix = embeddings_prefix
        self.results_bucket = results_bucket
        self.object_tags = object_tags
        self.key_by_bucket = key_by_bucket
        self.sidecar_embedding = sidecar_embedding

    def sidecar_key(self, bucket: str, key: str) -> str:
        out = f"{self.result_prefix}{bucket}/{key}.json" if self.key_by_bucket else f"{self.result_prefix}{key}.json"
        if len(out.encode()) <= MAX_KEY_BYTES:
            return out
        digest = hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()
        return f"{self.result_prefix}{LONG_KEYS}{digest}.json"

    def is_output(self, key: str) -> bool:
        """Lens's own outputs raise events too; they are never inputs."""
        return key.startswith(self.result_prefix) or key.startswith(self.embeddings_prefix)

    def _where(self, ev: ObjectEvent) -> tuple[str, str]:
        return self.results_bucket or ev.bucket, self.sidecar_key(ev.bucket, ev.key)

    async def write(self, rec: Record, model: dict) -> str:
        """Write the sidecar unless this object version already has one; returns what happened.

        A conditional PUT (``If-None-Match: *``) makes the first writer win without a prior read. If a
        sidecar exists: the same version is a ``"duplicate"`` (nothing written); an older version is
        replaced with a compare-and-swap (``If-Match`` on the sidecar's ETag); a newer one, by S3
        sequencer, makes this event ``"stale"``. Each PUT is durable and atomic.
        """
        bucket, key = self._where(rec.event)
        body = json.dumps(rec.to_json(model, self.sidecar_embedding)).encode()
        if not await self.objects.create(bucket, key, body, "application/json"):
            prev_body, etag = await self.objects.read(bucket, key)
            verdict = _against(rec, json.loads(prev_body))
            if verdict is not None:
                return verdict
            # raises Changed (and the object is retried) if someone wrote in between
            await self.objects.replace(bucket, key, body, etag, "application/json")
        if self.object_tags and rec.status == "tagged":
            # boto3's tagging calls, on the threads of the object client's other blocking requests
            await in_thread(self.objects.executor, self._tag_object, rec, model)
        return "written"

    def write_tombstones(self, records: list[Record], bucket: str) -> str | None:
        """A tombstone part (:mod:`lens.tombstones`) beside the embedding parts for the deleted records; named from
        the deletions it holds, so re-processing the same set overwrites it."""
        from lens.tombstones import part_name, table_bytes, tombstone_table

        rows = [r for r in records if r.status == "deleted"]
        if not rows:
            return None
        ids = [f"s3://{r.event.bucket}/{r.event.key}" for r in rows]
        seqs = [r.event.sequencer for r in rows]
        table = tombstone_table(ids, seqs, source="s3-event", reason=None)
        key = f"{self.embeddings_prefix}{part_name(ids, seqs)}"
        self.s3.put_object(Bucket=self.results_bucket or bucket, Key=key, Body=table_bytes(table))
        return key

    def _tag_object(self, rec: Record, model: dict) -> None:
        ev = rec.event
        kw = {"VersionId": ev.version_id} if ev.version_id else {}
        existing = self.s3.get_object_tagging(Bucket=ev.bucket, Key=ev.key, **kw)["TagSet"]
        self.s3.put_object_tagging(Bucket=ev.bucket, Key=ev.key, **kw,
                                   Tagging={"TagSet": s3_tags(existing, rec.tags or [], model.get("model", ""))})

    def write_embeddings(self, records: list[Record], model: dict, bucket: str) -> str | None:
        """A Parquet part with the tagged records' embeddings. Its name is derived from the object
        versions it holds, so re-processing the same set overwrites it instead of duplicating rows;
        readers dedupe on (bucket, key, etag) across parts."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [r for r in records if r.status == "tagged" and r.embedding is not None]
        if not rows:
            return None
        ids = sorted(f"{r.event.bucket}/{r.event.key}@{r.event.version_id or r.event.etag}" for r in rows)
        name = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]
        dim = len(rows[0].embedding)
        table = pa.table({
            "id": [f"s3://{r.event.bucket}/{r.event.key}" for r in rows],
            "bucket": [r.event.bucket for r in rows],
            "key": [r.event.key for r in rows],
            "etag": [r.event.etag for r in rows],
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(np.concatenate([np.asarray(r.embedding, np.float32) for r in rows])), dim),
            "top1": [r.tags[0]["label"] if r.tags else None for r in rows],
            "sequencer": pa.array([r.event.sequencer for r in rows], pa.string()),  # orders a row against deletions
            "indexed_at": pa.array([time.time()] * len(rows), pa.float64()),  # a filterable field of search
            # custom classifiers' tags (pools serving lens train heads), as lens embed writes them: filterable too
            **({"custom_tags": pa.array([json.dumps(r.custom_tags) if r.custom_tags is not None else None
                                         for r in rows], pa.string())} if any(r.custom_tags for r in rows) else {}),
        }, metadata={PARQUET_KEY: json.dumps(_identity(model).to_dict()).encode()})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        key = f"{self.embeddings_prefix}part-{name}.parquet"
        self.s3.put_object(Bucket=self.results_bucket or bucket, Key=key, Body=buf.getvalue())
        return key


def _against(rec: Record, prev: dict) -> str | None:
    """What a record does to the sidecar already there (``prev``): ``"duplicate"`` or ``"stale"`` (nothing
    written), or ``None`` (replace it, by compare-and-swap)."""
    ev = rec.event
    if rec.status == "deleted" or prev.get("status") == "deleted":
        if rec.status == "deleted" and prev.get("status") == "deleted" and prev.get("sequencer") == ev.sequencer:
            return "duplicate"
        if rec.status == "skipped" and rec.reason == GONE:  # the object is gone: its deletion stays on record
            return "stale"
        # S3 orders one key's events by sequencer: an upload after the deletion replaces it, an older one never
        return "stale" if sequencer_newer(prev.get("sequencer"), ev.sequencer) else None
    if (ev.version_id and prev.get("version_id") == ev.version_id) or (
            not ev.version_id and ev.etag and prev.get("etag") == ev.etag):
        return "duplicate"
    # Without versions, the object was fetched with If-Match on this event's ETag, so this event
    # describes the current object and the recorded one is older. With versions, order by sequencer.
    if ev.version_id and not sequencer_newer(ev.sequencer, prev.get("sequencer")):
        return "stale"
    return None


#: the reason of a record whose object was gone when its event was processed
GONE = "deleted before processing"


# -- audit: with versioning on the results bucket, every PUT is kept, so "one result per object" can be checked --
def count_writes(s3, bucket: str, prefix: str) -> dict[str, int]:
    """key -> how many times it was written (its object versions) under ``prefix`` of a versioned bucket."""
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for v in page.get("Versions", []):
            out[v["Key"]] = out.get(v["Key"], 0) + 1
    return out


def embedding_rows(s3, bucket: str, prefix: str, *, every_version: bool = False) -> dict[str, int]:
    """Source object key -> its rows in the embedding parts under ``prefix``: in the parts as they are now, or
    (``every_version``, versioned bucket) in every part ever written."""
    import pyarrow.parquet as pq

    rows: dict[str, int] = {}
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for v in page.get("Versions", []):
            if not (every_version or v["IsLatest"]):
                continue
            body = s3.get_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])["Body"].read()
            for k in pq.read_table(io.BytesIO(body), columns=["key"]).column("key").to_pylist():
                rows[k] = rows.get(k, 0) + 1
    return rows

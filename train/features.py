"""Backbone embeddings of a training set, from the bulk-embedding job, cached by content hash.

Every image is read once and hashed (SHA-256 of its bytes). Images already in the cache for this backbone's
identity are not embedded again (a second ``lens train`` on the same folder, or a folder that grew, embeds only
what is new); the rest are written to a temporary Parquet shard and embedded by ``lens embed``'s Ray Data job
(the same decoder, limits and predictor as everywhere). Its error rows come back as counted error rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from lens.batch.config import EmbedConfig
from lens.batch.job import run_embed

from lens.cluster import init_ray
from lens.identity import ModelIdentity
from lens.runtime.config import DecodeConfig, ModelConfig
from lens.storage import atomic_write_bytes

from .dataset import Dataset

__all__ = ["EmbeddingCache", "embed_dataset"]

logger = logging.getLogger(__name__)


class EmbeddingCache:
    """``{cache_dir}/train-embeddings/{outputs key}/part-*.parquet`` of (sha256, embedding), keyed by the full
    model identity (:meth:`~lens.identity.ModelIdentity.outputs_key`: model, weights, preprocessing, backend,
    precision and the backend's release), so vectors another backend or release made are never read."""

    def __init__(self, cache_dir: str | os.PathLike, identity: ModelIdentity) -> None:
        key = identity.outputs_key()[:24]
        self.root = Path(cache_dir) / "train-embeddings" / key
        self.dim = identity.embed_dim

    def load(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for part in sorted(self.root.glob("part-*.parquet")) if self.root.is_dir() else ():
            try:
                t = pq.read_table(part)
                vecs = np.asarray(t.column("embedding").combine_chunks().values, np.float32).reshape(-1, self.dim)
            except Exception:  # noqa: BLE001 - a broken cache part is only a cache miss
                logger.warning("ignoring unreadable embedding cache part %s", part)
                continue
            out.update(zip(t.column("sha256").to_pylist(), vecs))
        return out

    def add(self, digests: list[str], vectors: np.ndarray) -> None:
        if not digests:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        t = pa.table({"sha256": digests, "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(np.asarray(vectors, np.float32).ravel()), self.dim)})
        import io

        buf = io.BytesIO()
        pq.write_table(t, buf)
        atomic_write_bytes(self.root / f"part-{uuid.uuid4().hex[:16]}.parquet", buf.getvalue())


def embed_dataset(ds: Dataset, model: ModelConfig, decode: DecodeConfig, identity: ModelIdentity, *,
                  log=print, address: str | None = None) -> tuple[np.ndarray, dict]:
    """(embeddings (N, D) in ``ds.examples`` order, a report). Examples that could not be used get ``error``
    set (their row is zeros); the report counts them by code and says how many came from the cache."""
    cache = EmbeddingCache(model.cache_dir, identity)
    cached = cache.load()
    work = Path(tempfile.mkdtemp(prefix="lens-train-"))
    try:
        pending: dict[str, None] = {}
        writer = None
        rows: list[tuple[str, bytes]] = []

        def flush() -> None:
            nonlocal writer
            if not rows:
                return
            t = pa.table({"id": [d for d, _ in rows], "image": pa.array([b for _, b in rows], pa.binary())})
            if writer is None:
                (work / "in").mkdir()
                writer = pq.ParquetWriter(work / "in" / "images.parquet", t.schema)
            writer.write_table(t, row_group_size=128)
            rows.clear()

        for ex in ds.examples:
            if ex.size > decode.max_bytes:
                ex.error = f"image_too_large: {ex.size} bytes; the limit is {decode.max_bytes}"
                continue
            try:
                data = ds.read(ex)
            except OSError as e:
                ex.error = f"unreadable: {e}"
                continue
            ex.digest = hashlib.sha256(data).hexdigest()
            if ex.digest in cached or ex.digest in pending:
                continue
            pending[ex.digest] = None
            rows.append((ex.digest, data))
            if len(rows) >= 128:
                flush()
        flush()
        if writer is not None:
            writer.close()
        errors: dict[str, str] = {}
        if pending:
            init_ray(address, log=log, what="lens train", log_to_driver=False)  # Lens prints the progress
            log(f"lens train: embedding {len(pending)} new image(s) with the bulk-embedding job "
                f"({len(cached)} cached)")
            cfg = EmbedConfig(input=str(work / "in"), output=str(work / "out"), input_format="parquet",
                              model=model, decode=decode, top_k=1, address=address)
            run_embed(cfg, log=lambda m: logger.info("%s", m))
            manifest = json.loads((work / "out" / "manifest.json").read_text())
            got = ModelIdentity.from_dict(manifest)
            if got.outputs_key() != identity.outputs_key():
                raise RuntimeError(f"the embedding job ran another model than expected: {got.describe()} "
                                   f"{got.comparable()} instead of {identity.describe()} {identity.comparable()}")
            digests, vectors = [], []
            for f in manifest["files"]:
                t = pq.read_table(work / "out" / f if not os.path.isabs(f) else f, columns=["id", "embedding"])
                digests += t.column("id").to_pylist()
                vectors.append(np.asarray(t.column("embedding").combine_chunks().values, np.float32)
                               .reshape(-1, identity.embed_dim))
            for f in manifest.get("error_files", []):
                t = pq.read_table(work / "out" / f if not os.path.isabs(f) else f, columns=["id", "error", "message"])
                for d, code, msg in zip(*(t.column(c).to_pylist() for c in ("id", "error", "message"))):
                    errors[d] = f"{code}: {msg}"
            if digests:
                vecs = np.concatenate(vectors)
                cache.add(digests, vecs)
                cached.update(zip(digests, vecs))
        out = np.zeros((len(ds.examples), identity.embed_dim), np.float32)
        from_cache = 0
        for i, ex in enumerate(ds.examples):
            if ex.error:
                continue
            if ex.digest in errors:
                ex.error = errors[ex.digest]
            elif ex.digest in cached:
                out[i] = cached[ex.digest]
                from_cache += ex.digest not in pending
            else:
                ex.error = "internal_error: no embedding came back for this image"
        failed = [ex for ex in ds.examples if ex.error]
        by_code: dict[str, int] = {}
        for ex in failed:
            code = ex.error.split(":", 1)[0]
            by_code[code] = by_code.get(code, 0) + 1
        report = {"embedded": len(pending), "from_cache": from_cache, "errors": len(failed), "errors_by_code": by_code,
                  "error_examples": [{"id": ex.id, "error": ex.error} for ex in failed[:10]]}
        return out, report
    finally:
        shutil.rmtree(work, ignore_errors=True)

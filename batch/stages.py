"""The three per-batch stages of ``lens embed``, each a plain callable Ray Data maps over Arrow batches (on CPU,
:class:`UnitEmbedder` runs all three in each model actor).

1. :class:`Decoder` (CPU tasks): read a unit of input rows, bytes -> (H, W, 3) uint8 crops, or an error row
   with the reason.
2. :class:`Embedder` (actor pool; holds the model): crops -> L2-normalised embedding + top-k tags through the
   same :class:`~lens.runtime.predictor.Predictor` the online path uses.
3. :class:`PartWriter` (a small actor pool, no CPU reserved): rows -> one Parquet part per (shard, kind) under the shard's output directory,
   named by its content so a retried task rewrites the same file; only a small record per part goes on.

Rows carry their input shard's key in ``_shard`` so the driver can tell when a shard is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lens.runtime.config import DecodeConfig, ModelConfig
from lens.runtime.predictor import ItemError, Predictor
from lens.runtime.preprocess import Preprocessor
from lens.storage import Location

from .shards import LOCATION_COLUMN, ReadUnit

__all__ = ["Decoder", "Embedder", "PartWriter", "UnitEmbedder", "decode_units", "PART_SCHEMA", "SHARD",
           "PIXELS"]

logger = logging.getLogger(__name__)

SHARD = "_shard"
PIXELS = "_pixels"
#: Where the time goes, carried per row from stage to stage and summed per part by the writer (seconds of each
#: stage's wall time spent on the row's batch, split evenly over its rows; the model actor's start-up once)
TIMING = ("_read_s", "_decode_s", "_model_s")
#: "pid:init seconds:ready unix time:process start unix time:init start unix time" of the model actor that embedded
#: the row (process start to init start is the worker's start-up and imports)
ACTOR = "_actor"

#: lens train heads' tags per row: JSON ``{head name: [{label, class_id, score}]}`` (present when heads are served)
CUSTOM_TAGS = "custom_tags"
TAG_TYPE = pa.list_(pa.struct([("label", pa.string()), ("class_id", pa.int32()), ("score", pa.float32())]))
#: What the writer stage emits: one row per written part file.
PART_SCHEMA = pa.schema([("shard", pa.string()), ("kind", pa.string()), ("path", pa.string()),
                         ("rows", pa.int64()), ("read_s", pa.float64()), ("decode_s", pa.float64()),
                         ("model_s", pa.float64()), ("write_s", pa.float64()), ("actors", pa.list_(pa.string()))])


def _tensor_column(arr: np.ndarray) -> pa.Array:
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(arr)


class Decoder:
    """Read + decode + resize/crop on CPU. Input: a block of :class:`~lens.batch.shards.ReadUnit` rows (JSON in
    ``unit``); output, ``batch_size`` rows at a time: the id column, carried columns, ``_shard``, ``_pixels``
    (uint8 crops; zeros for a failed row), ``error`` and ``message`` (empty when the row is fine). For image-file
    input the id is the file's path relative to the input location.

    Reading happens here rather than in a separate Ray Data read stage: the encoded bytes never go through the
    object store, and the first crops reach the model as soon as one task has read and decoded a few rows."""

    def __init__(self, input_uri: str, preprocess: dict, decode: DecodeConfig, id_column: str, image_column: str,
                 carry_columns: tuple[str, ...], batch_size: int) -> None:
        from lens.runtime.preprocess import PreprocessConfig

        self.loc = Location.parse(input_uri)
        self.preprocessor = Preprocessor(PreprocessConfig.from_dict(preprocess), decode.limits())
        self.id_column = id_column
        self.image_column = image_column
        self.carry = list(carry_columns)
        self.batch_size = batch_size

    def __call__(self, units: pa.Table) -> Iterator[pa.Table]:
        for text in units.column("unit").to_pylist():
            unit = ReadUnit.from_row(json.loads(text))
            batches = _first_small(self._read(unit), FIRST_BATCH_ROWS)
            while True:
                t0 = time.perf_counter()
                try:
                    batch, read_errors = next(batches)
                except StopIteration:
                    break
                t1 = time.perf_counter()
                out = self._decode(unit.shard, batch, read_errors)
                t2 = time.perf_counter()
                n = max(out.num_rows, 1)
                out = out.append_column("_read_s", pa.array(np.full(out.num_rows, (t1 - t0) / n)))
                yield out.append_column("_decode_s", pa.array(np.full(out.num_rows, (t2 - t1) / n)))

    def _read(self, unit: ReadUnit) -> Iterator[tuple[pa.Table, dict[int, ItemError]]]:
        """Batches of input rows, with the rows whose bytes could not be read (image files gone or forbidden since
        they were listed: error rows, like an undecodable image). A Parquet file that cannot be read fails the
        task, and so the job, naming it: its rows cannot be accounted for. (Transient S3 errors are retried by
        pyarrow's S3 client.)"""
        if unit.files:
            for i in range(0, len(unit.files), self.batch_size):
                files = unit.files[i : i + self.batch_size]
                blobs: list[bytes | None] = []
                errors: dict[int, ItemError] = {}
                for j, f in enumerate(files):
                    try:
                        blobs.append(self.loc.read_bytes(f))
                    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
                        blobs.append(None)
                        errors[j] = ItemError("unreadable", f"cannot read {self.loc.uri_of(f)}: {e}", 404)
                ids = [self.loc.relative(f) for f in files]
                cols = {"id": pa.array(ids, pa.string()), self.image_column: pa.array(blobs, pa.binary())}
                if LOCATION_COLUMN in self.carry:
                    cols[LOCATION_COLUMN] = pa.array([self.loc.uri_of(f) for f in files], pa.string())
                yield pa.table(cols), errors
            return
        try:
            with self.loc.fs.open_input_file(unit.path) as f:
                pf = pq.ParquetFile(f)
                for rb in pf.iter_batches(batch_size=self.batch_size, row_groups=list(unit.row_groups),
                                          columns=[self.id_column, self.image_column, *self.carry]):
                    yield pa.Table.from_batches([rb]), {}
        except OSError as e:
            raise OSError(f"cannot read row groups {list(unit.row_groups)} of {self.loc.uri_of(unit.path)}: "
                          f"{e}") from e

    def _decode(self, shard: str, batch: pa.Table, read_errors: dict[int, ItemError]) -> pa.Table:
        images = batch.column(self.image_column).to_pylist()
        ids = batch.column(self.id_column).to_pylist()
        h, w = self.preprocessor.cfg.size
        pixels = np.zeros((len(images), h, w, 3), dtype=np.uint8)
        errors, messages = [""] * len(images), [""] * len(images)
        for i, data in enumerate(images):
            err = read_errors.get(i)
            if err is None and (ids[i] is None or not str(ids[i]).strip()):
                err = ItemError("invalid_id", f"row {i} of the batch has a null or empty id", 400)
            if err is None:
                try:
                    if data is None:
                        raise TypeError("the image column is null")
                    pixels[i] = self.preprocessor.pixels(data)
                    continue
                except Exception as e:  # noqa: BLE001 - a bad row is recorded, never fatal
                    err = ItemError.from_exception(e)
            errors[i], messages[i] = err.code, err.message
        out = batch.drop_columns([self.image_column])
        out = out.append_column(SHARD, pa.array([shard] * len(images), pa.string()))
        out = out.append_column("error", pa.array(errors, pa.string()))
        out = out.append_column("message", pa.array(messages, pa.string()))
        return out.append_column(PIXELS, _tensor_column(pixels))


#: Rows in each read unit's first decode batch: the unit's first part is written after a few images rather than a
#: whole batch (on 2 cores, with 4 units decoding at once, a first batch of 16 camera photos took ~1.5 s after the
#: actor was ready and one of 4 ~0.5 s; scripts/bench_batch.py). Only the first: small batches cost model speed.
FIRST_BATCH_ROWS = 4


def _first_small(batches: Iterator[tuple[pa.Table, dict[int, ItemError]]],
                 rows: int) -> Iterator[tuple[pa.Table, dict[int, ItemError]]]:
    """``batches`` with the first one split after ``rows`` rows (its read errors, keyed by row, split alike), so
    the same unit always yields the same batches (a retried unit rewrites the same part files)."""
    first = True
    for table, errors in batches:
        if first and table.num_rows > rows:
            yield table.slice(0, rows), {i: e for i, e in errors.items() if i < rows}
            table, errors = table.slice(rows), {i - rows: e for i, e in errors.items() if i >= rows}
        first = False
        yield table, errors


def _process_start() -> float:
    """This process's start (unix time), from the kernel's process table (0.0 where it cannot be read)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a figure for the breakdown only
        return 0.0


class Embedder:
    """Holds one model (ONNX Runtime on CPU, torch on GPU) and embeds decoded crops; error rows pass through."""

    def __init__(self, model: ModelConfig, decode: DecodeConfig, top_k: int) -> None:
        t0, started = time.perf_counter(), time.time()
        self.predictor = Predictor.from_config(model, decode, default_top_k=top_k)
        self.predictor.warmup(min(8, self.predictor.max_batch_size))
        self.top_k = top_k
        self.dim = self.predictor.embed_dim
        self.actor = (f"{os.getpid()}:{time.perf_counter() - t0:.3f}:{time.time():.3f}:{_process_start():.3f}:"
                      f"{started:.3f}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        n = batch.num_rows
        ok = np.asarray(pc.equal(batch.column("error"), "").to_numpy(zero_copy_only=False), dtype=bool)
        emb = np.zeros((n, self.dim), dtype=np.float32)
        tags: list = [None] * n
        custom: list = [None] * n
        if ok.any():
            pixels = batch.column(PIXELS).combine_chunks().to_numpy()
            logits, e = self.predictor.infer_pixels(np.ascontiguousarray(pixels[ok]))
            emb[ok] = e
            for i, pred in zip(np.flatnonzero(ok), self.predictor.postprocess(logits, e, self.top_k)):
                tags[i] = [t.to_dict() for t in pred.tags]
                if pred.custom is not None:
                    custom[i] = json.dumps(pred.custom)
        out = batch.drop_columns([PIXELS])
        out = out.append_column("embedding", pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), self.dim))
        out = out.append_column("tags", pa.array(tags, TAG_TYPE))
        if self.predictor.heads:  # head name -> tags above threshold, as JSON (heads differ in classes)
            out = out.append_column(CUSTOM_TAGS, pa.array(custom, pa.string()))
        out = out.append_column("_model_s", pa.array(np.full(n, (time.perf_counter() - t0) / max(n, 1))))
        return out.append_column(ACTOR, pa.array([self.actor] * n, pa.string()))


class UnitEmbedder:
    """CPU actors that do the whole job for their read units: read + decode (:class:`Decoder`), model
    (:class:`Embedder`), Parquet parts (:class:`PartWriter`), yielding only the parts' records. This is the online
    path's shape, decode threads beside the model in one process: crops never go through Ray's object store and
    the pipeline starts one kind of worker process. Ray Data runs ``actor_threads`` calls at once per actor, so
    one unit decodes while another's batch is in the model (ONNX Runtime and Pillow release the GIL)."""

    def __init__(self, decoder: dict, model: ModelConfig, decode: DecodeConfig, top_k: int, output: str,
                 id_column: str, carry_columns: tuple[str, ...]) -> None:
        self.decoder = Decoder(**decoder)
        self.embedder = Embedder(model, decode, top_k)
        self.writer = PartWriter(output, id_column, carry_columns)

    def __call__(self, units: pa.Table) -> Iterator[pa.Table]:
        for batch in self.decoder(units):
            yield self.writer(self.embedder(batch))


def _timing(rows: pa.Table) -> dict:
    """The rows' summed stage times and the model actors that embedded them (for the job's breakdown)."""
    out = {k[1:]: float(pc.sum(rows.column(k)).as_py() or 0.0) if k in rows.column_names else 0.0 for k in TIMING}
    out["actors"] = pc.unique(rows.column(ACTOR)).to_pylist() if ACTOR in rows.column_names else []
    return out


def decode_units(units: pa.Table, **kwargs) -> Iterator[pa.Table]:
    """:class:`Decoder` as a function, so Ray Data runs it as stateless tasks (its set-up is microseconds)."""
    yield from Decoder(**kwargs)(units)


class PartWriter:
    """Writes each shard's rows of a batch as ``embeddings/<shard>/part-<hash>.parquet`` (and errors alike)."""

    def __init__(self, output: str, id_column: str, carry_columns: tuple[str, ...]) -> None:
        self.loc = Location.parse(output)
        self.id_column = id_column
        self.carry = list(carry_columns)

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = []
        shards = batch.column(SHARD)
        for shard in pc.unique(shards).to_pylist():
            rows = batch.filter(pc.equal(shards, shard))
            ok = pc.equal(rows.column("error"), "")
            good, bad = rows.filter(ok), rows.filter(pc.invert(ok))
            if good.num_rows:
                t = pa.table({"id": good.column(self.id_column), "embedding": good.column("embedding"),
                              "tags": good.column("tags"),
                              **({CUSTOM_TAGS: good.column(CUSTOM_TAGS)} if CUSTOM_TAGS in good.column_names else {}),
                              **{c: good.column(c) for c in self.carry}})
                records.append(self._write(shard, "embeddings", t) | _timing(good))
            if bad.num_rows:
                t = pa.table({"id": bad.column(self.id_column), "error": bad.column("error"),
                              "message": bad.column("message"), **{c: bad.column(c) for c in self.carry}})
                records.append(self._write(shard, "errors", t) | _timing(bad))
        return pa.Table.from_pylist(records, schema=PART_SCHEMA)

    def _write(self, shard: str, kind: str, table: pa.Table) -> dict:
        t0 = time.perf_counter()
        # Named by content: a retried task (or a re-sent batch) rewrites the same file instead of adding one.
        digest = hashlib.sha1()
        for v in table.column("id").to_pylist():
            digest.update(repr(v).encode())
            digest.update(b"\0")
        path = self.loc.path(kind, shard, f"part-{digest.hexdigest()[:20]}.parquet")
        self.loc.write_table(path, table)
        return {"shard": shard, "kind": kind, "path": path, "rows": table.num_rows,
                "write_s": time.perf_counter() - t0}

"""``lens shards`` as a Ray job: pack millions of image files into Parquet shards.

The driver lists the source once (names and sizes, no reads) and plans the shards deterministically: files in
sorted order, a shard closing at ``rows_per_shard`` files or ``max_shard_bytes``. Each shard is then one Ray task
that reads its files (threads: reads are I/O) and writes ``PREFIX-NNNNN.parquet`` atomically, so any task can
run on any node and a retried task rewrites the same file. The driver keeps at most ``max_in_flight`` shards
running (Ray's ``ray.wait`` back-pressure), so memory stays bounded by shards in flight x ``max_shard_bytes``
whatever the number of files, and it reports progress as shards finish.

Resumable: a shard whose file already exists with exactly its planned ids (its ``id`` column is read, nothing
else) is skipped, so re-running after an interruption writes only what is missing; a shard whose files changed
since is rewritten.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from lens.errors import ConfigError
from lens.storage import Location

from .config import IMAGE_EXTENSIONS

__all__ = ["LOCATION_COLUMN", "ID_SCHEMES", "ShardPlan", "plan_shards", "pack_images"]

#: The column holding each image's location (``s3://bucket/key`` or an absolute path): ``lens shards`` writes it,
#: ``lens embed`` carries it when its input has it, the index keeps it, and the search page's thumbnails read it.
LOCATION_COLUMN = "uri"
ID_SCHEMES = ("relative", "uri")
SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), (LOCATION_COLUMN, pa.string())])
#: concurrent reads inside one shard task (S3 GETs and local reads are I/O-bound)
READ_THREADS = 16


def image_suffixes(extensions: tuple[str, ...]) -> tuple[str, ...]:
    """``("jpg", ".PNG")`` -> ``(".jpg", ".png")``, for matching lower-cased file names."""
    return tuple("." + e.lower().lstrip(".") for e in extensions)


@dataclass(frozen=True)
class ShardPlan:
    path: str  # the output file
    files: tuple[str, ...]
    ids: tuple[str, ...]
    bytes: int


def plan_shards(files: list[tuple[str, int]], src: Location, dst: Location, *, rows_per_shard: int,
                max_shard_bytes: int, ids: str, prefix: str) -> list[ShardPlan]:
    """Cut the (file, size) list into shards: a shard closes at ``rows_per_shard`` files, or before the file that
    would take it past ``max_shard_bytes`` (a file larger than that is a shard of its own)."""
    plans: list[ShardPlan] = []
    group: list[str] = []
    size = 0

    def close() -> None:
        nonlocal group, size
        if group:
            names = tuple(src.uri_of(f) if ids == "uri" else src.relative(f) for f in group)
            plans.append(ShardPlan(dst.path(f"{prefix}-{len(plans):05d}.parquet"), tuple(group), names, size))
            group, size = [], 0

    for f, n in files:
        if group and (len(group) >= rows_per_shard or size + n > max_shard_bytes):
            close()
        group.append(f)
        size += n
    close()
    return plans


def _already_written(dst: Location, plan: ShardPlan) -> bool:
    """The shard's file exists with exactly the planned ids (an earlier run, or a retried task, wrote it)."""
    try:
        return tuple(dst.read_table(plan.path, columns=["id"]).column("id").to_pylist()) == plan.ids
    except (FileNotFoundError, OSError, pa.ArrowInvalid, KeyError):
        return False


def write_shard(src_uri: str, dst_uri: str, plan: ShardPlan) -> dict:
    """Read the plan's files and write its Parquet file atomically; ``{"path", "rows", "bytes", "skipped"}``."""
    src, dst = Location.parse(src_uri), Location.parse(dst_uri)
    if _already_written(dst, plan):
        return {"path": dst.uri_of(plan.path), "rows": len(plan.files), "bytes": plan.bytes, "skipped": True}
    with ThreadPoolExecutor(min(READ_THREADS, len(plan.files))) as pool:
        blobs = list(pool.map(src.read_bytes, plan.files))
    table = pa.table([pa.array(plan.ids, pa.string()), pa.array(blobs, pa.binary()),
                      pa.array([src.uri_of(f) for f in plan.files], pa.string())], schema=SCHEMA)
    # images are already compressed: store them as they are, in row groups of ~64 rows for streaming reads
    dst.write_table(plan.path, table, compression="none", row_group_size=64)
    return {"path": dst.uri_of(plan.path), "rows": len(plan.files), "bytes": sum(map(len, blobs)), "skipped": False}


def pack_images(src: str, dst: str, *, rows_per_shard: int = 1000, max_shard_bytes: int = 256 << 20,
                extensions: tuple[str, ...] = IMAGE_EXTENSIONS, ids: str = "relative", prefix: str = "part",
                max_in_flight: int | None = None, address: str | None = None, progress=None, log=None) -> list[dict]:
    """Pack the image files under ``src`` into Parquet shards at ``dst`` on Ray (see the module docstring).

    Each shard holds ``id`` (the path relative to ``src``, or with ``ids="uri"`` the file's full URI, the id the
    event path gives an ``s3://`` object), ``image`` (the file's bytes) and ``uri`` (where the file lives).
    Returns one ``{"path", "rows", "bytes", "skipped"}`` per shard, in order. ``progress(done_files, total_files,
    shards_done, shards_skipped)`` is called as shards finish."""
    import ray

    from lens.cluster import init_ray

    if rows_per_shard < 1 or max_shard_bytes < 1:
        raise ValueError("rows_per_shard and max_shard_bytes must be positive")
    if ids not in ID_SCHEMES:
        raise ValueError(f"ids must be one of {ID_SCHEMES}, got {ids!r}")
    src_loc, dst_loc = Location.parse(src), Location.parse(dst)
    exts = image_suffixes(extensions)
    files = [(f, n) for f, n in src_loc.list_file_sizes() if f.lower().endswith(exts)]
    if not files:
        raise ConfigError(f"no image files ({', '.join(exts)}) under {src}")
    plans = plan_shards(files, src_loc, dst_loc, rows_per_shard=rows_per_shard, max_shard_bytes=max_shard_bytes,
                        ids=ids, prefix=prefix)

    init_ray(address, log=log, what="lens shards")
    if max_in_flight is None:  # enough to keep every CPU reading; memory ~ this x max_shard_bytes
        max_in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    largest = max(p.bytes for p in plans)
    # a task holds its shard's bytes twice at most (the blobs, then the Parquet buffer): tell the scheduler
    task = ray.remote(write_shard).options(num_cpus=0.5, memory=2 * largest + (64 << 20), max_retries=3)
    results: dict[int, dict] = {}
    pending: dict = {}
    done_files = skipped = 0
    nxt = 0
    while nxt < len(plans) or pending:
        while nxt < len(plans) and len(pending) < max_in_flight:
            pending[task.remote(src_loc.uri, dst_loc.uri, plans[nxt])] = nxt
            nxt += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            i = pending.pop(ref)
            results[i] = ray.get(ref)
            done_files += results[i]["rows"]
            skipped += results[i]["skipped"]
            if progress is not None:
                progress(done_files, len(files), len(results), skipped)
    return [results[i] for i in range(len(plans))]


def timed_progress(log):
    """A progress callback printing files done, share, shards and rate (for the CLI)."""
    t0 = time.perf_counter()

    def progress(done: int, total: int, shards: int, skipped: int) -> None:
        rate = done / max(time.perf_counter() - t0, 1e-9)
        log(f"lens shards: {done:,}/{total:,} files ({100 * done / total:.0f} %), {shards} shard(s)"
            f"{f' ({skipped} already written)' if skipped else ''}, {rate:,.0f} files/s")

    return progress

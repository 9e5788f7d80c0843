"""Input shards: discover them (Parquet files, or a folder of images cut into fixed-size groups), and pack a
folder of images into Parquet shards (``lens shards``).

A shard is the unit of progress of ``lens embed``: it is completed, committed and
skipped on resume as a whole. Its ``key`` names its output directory and marker.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from lens.errors import ConfigError

from .config import IMAGE_EXTENSIONS
from .storage import Location, split_glob

__all__ = ["InputShard", "discover_shards", "make_shards"]


_KEY_CHARS = re.compile(r"[^A-Za-z0-9._=-]+")


@dataclass(frozen=True)
class InputShard:
    key: str  # stable, filesystem-safe name of the shard's outputs
    path: str  # Parquet file (filesystem path); for an image group, its first file
    rows: int
    files: tuple[str, ...] = field(default=(), repr=False)  # image-folder input: the files in this group


def _suffixes(extensions: tuple[str, ...]) -> tuple[str, ...]:
    """``("jpg", ".PNG")`` -> ``(".jpg", ".png")``, for matching lower-cased file names."""
    return tuple("." + e.lower().lstrip(".") for e in extensions)


def shard_key(rel_path: str) -> str:
    stem = rel_path[: -len(".parquet")] if rel_path.endswith(".parquet") else rel_path
    return _KEY_CHARS.sub("_", stem.replace("/", "__")).strip("_") or "shard"


def discover_shards(input_uri: str, input_format: str, *, id_column: str, image_column: str,
                    carry_columns: tuple[str, ...], extensions: tuple[str, ...],
                    files_per_shard: int) -> tuple[Location, str, list[InputShard]]:
    """(location, format, shards) for an input directory, file, glob or ``s3://`` prefix."""
    base, pattern = split_glob(input_uri)
    loc = Location.parse(base)
    files = loc.list_files(pattern=loc.path(pattern) if pattern else None)
    if not files:
        raise ConfigError(f"no input files at {input_uri}")
    parquet = [f for f in files if f.endswith(".parquet")]
    fmt = input_format
    if fmt == "auto":
        fmt = "parquet" if parquet else "images"
    if fmt == "parquet":
        if not parquet:
            raise ConfigError(f"no .parquet files at {input_uri}")
        return loc, fmt, _parquet_shards(loc, parquet, id_column, image_column, carry_columns)
    exts = _suffixes(extensions)
    images = [f for f in files if f.lower().endswith(exts)]
    if not images:
        raise ConfigError(f"no image files ({', '.join(exts)}) at {input_uri}")
    shards = []
    for n, i in enumerate(range(0, len(images), files_per_shard)):
        group = tuple(images[i : i + files_per_shard])
        shards.append(InputShard(f"files-{n:06d}", group[0], len(group), group))
    return loc, fmt, shards


def _parquet_shards(loc: Location, files: list[str], id_column: str, image_column: str,
                    carry_columns: tuple[str, ...]) -> list[InputShard]:
    def meta(path: str) -> pq.FileMetaData:
        try:
            with loc.fs.open_input_file(path) as f:
                return pq.ParquetFile(f).metadata
        except Exception as e:  # noqa: BLE001 - name the file in the error
            raise ConfigError(f"cannot read Parquet metadata of {loc.uri_of(path)}: {e}") from e

    with ThreadPoolExecutor(16) as pool:
        metas = list(pool.map(meta, files))
    shards, keys = [], {}
    base = loc.root if loc.info().type.name == "Directory" else loc.root.rsplit("/", 1)[0]
    for path, md in zip(files, metas):
        names = set(md.schema.to_arrow_schema().names)
        missing = [c for c in (id_column, image_column, *carry_columns) if c not in names]
        if missing:
            raise ConfigError(f"{loc.uri_of(path)} has no column(s) {missing}; it has {sorted(names)} "
                              "(set --id-column/--image-column)")
        key = shard_key(path[len(base):].lstrip("/"))
        if key in keys:
            raise ConfigError(f"input files {keys[key]} and {path} map to the same shard key {key!r}")
        keys[key] = path
        shards.append(InputShard(key, path, md.num_rows))
    return shards


def make_shards(src: str, dst: str, *, rows_per_shard: int = 1000, max_shard_bytes: int = 256 << 20,
                extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
                prefix: str = "part") -> list[dict]:
    """Pack the image files under ``src`` into Parquet shards at ``dst`` (``id`` = path relative to ``src``,
    ``image`` = the file's bytes). A shard closes at ``rows_per_shard`` rows or ``max_shard_bytes``.
    Each shard is written atomically; returns one ``{"path", "rows", "bytes"}`` per shard."""
    if rows_per_shard < 1 or max_shard_bytes < 1:
        raise ValueError("rows_per_shard and max_shard_bytes must be positive")
    src_loc, dst_loc = Location.parse(src), Location.parse(dst)
    exts = _suffixes(extensions)
    files = [f for f in src_loc.list_files() if f.lower().endswith(exts)]
    if not files:
        raise ConfigError(f"no image files ({', '.join(exts)}) under {src}")
    schema = pa.schema([("id", pa.string()), ("image", pa.binary())])
    written: list[dict] = []
    ids: list[str] = []
    blobs: list[bytes] = []
    size = 0

    def flush() -> None:
        nonlocal ids, blobs, size
        if not ids:
            return
        path = dst_loc.path(f"{prefix}-{len(written):05d}.parquet")
        table = pa.table([pa.array(ids, pa.string()), pa.array(blobs, pa.binary())], schema=schema)
        # images are already compressed: store them as they are, in row groups of ~64 rows for streaming reads
        dst_loc.write_table(path, table, compression="none", row_group_size=64)
        written.append({"path": dst_loc.uri_of(path), "rows": len(ids), "bytes": size})
        ids, blobs, size = [], [], 0

    for f in files:
        data = src_loc.read_bytes(f)
        if ids and (len(ids) >= rows_per_shard or size + len(data) > max_shard_bytes):
            flush()
        ids.append(os.path.relpath(f, src_loc.root) if not src_loc.is_s3 else f[len(src_loc.root):].lstrip("/"))
        blobs.append(data)
        size += len(data)
    flush()
    return written

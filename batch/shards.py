"""Input shards: discover them (Parquet files, or a folder of images cut into fixed-size groups), and pack a
folder of images into Parquet shards (``lens shards``).

A shard is the unit of progress of ``lens embed``: it is completed, committed and
skipped on resume as a whole. Its ``key`` names its output directory and marker.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from lens.errors import ConfigError
from lens.storage import Location, split_glob

from .config import IMAGE_EXTENSIONS
from .pack import LOCATION_COLUMN, image_suffixes

__all__ = ["InputShard", "ReadUnit", "LOCATION_COLUMN", "discover_shards", "make_shards", "output_carry",
           "read_units"]


_KEY_CHARS = re.compile(r"[^A-Za-z0-9._=-]+")


@dataclass(frozen=True)
class InputShard:
    key: str  # stable, filesystem-safe name of the shard's outputs
    path: str  # Parquet file (filesystem path); for an image group, its first file
    rows: int
    files: tuple[str, ...] = field(default=(), repr=False)  # image-folder input: the files in this group
    row_groups: tuple[int, ...] = field(default=(), repr=False)  # Parquet input: rows of each row group
    columns: tuple[str, ...] = field(default=(), repr=False)  # Parquet input: the file's columns


@dataclass(frozen=True)
class ReadUnit:
    """What one read + decode task reads: some row groups of one Parquet shard, or some files of an image group."""

    shard: str
    path: str
    row_groups: tuple[int, ...] = ()  # indexes into the file's row groups
    files: tuple[str, ...] = ()
    rows: int = 0

    def to_row(self) -> dict:
        return {"shard": self.shard, "path": self.path, "row_groups": list(self.row_groups),
                "files": list(self.files), "rows": self.rows}

    @classmethod
    def from_row(cls, row: dict) -> "ReadUnit":
        return cls(row["shard"], row["path"], tuple(row["row_groups"]), tuple(row["files"]), row["rows"])


def output_carry(fmt: str, shards: list[InputShard], id_column: str, image_column: str,
                 carry_columns: tuple[str, ...]) -> tuple[str, ...]:
    """The input columns an embedding job copies to its output: the asked-for ``carry_columns``, plus each image's
    location (:data:`LOCATION_COLUMN`) when the input has one (every ``lens shards`` output; an image folder's
    files), so an index built from the output can show every hit's image."""
    if LOCATION_COLUMN in (id_column, image_column, *carry_columns):
        return carry_columns
    if fmt == "images" or (shards and all(LOCATION_COLUMN in s.columns for s in shards)):
        return (*carry_columns, LOCATION_COLUMN)
    return carry_columns


def read_units(shards: list[InputShard], rows_per_unit: int) -> list[ReadUnit]:
    """Cut shards into read units of about ``rows_per_unit`` rows: whole row groups (a row group is Parquet's
    smallest read), or runs of image files. Small units start the pipeline sooner and spread a shard over
    several decode tasks; each unit is one Ray Data block, so one task."""
    units: list[ReadUnit] = []
    for s in shards:
        if s.files:
            for i in range(0, len(s.files), rows_per_unit):
                files = s.files[i : i + rows_per_unit]
                units.append(ReadUnit(s.key, s.path, files=files, rows=len(files)))
            continue
        groups: list[int] = []
        rows = 0
        for g, n in enumerate(s.row_groups):
            if n == 0:
                continue
            groups.append(g)
            rows += n
            if rows >= rows_per_unit:
                units.append(ReadUnit(s.key, s.path, tuple(groups), rows=rows))
                groups, rows = [], 0
        if groups:
            units.append(ReadUnit(s.key, s.path, tuple(groups), rows=rows))
    return units


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
    if carry_columns:
        raise ConfigError(f"carry columns {list(carry_columns)} need Parquet input; {input_uri} holds image files")
    exts = image_suffixes(extensions)
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
        shards.append(InputShard(key, path, md.num_rows,
                                 row_groups=tuple(md.row_group(i).num_rows for i in range(md.num_row_groups)),
                                 columns=tuple(md.schema.to_arrow_schema().names)))
    return shards


def make_shards(src: str, dst: str, *, rows_per_shard: int = 1000, max_shard_bytes: int = 256 << 20,
                extensions: tuple[str, ...] = IMAGE_EXTENSIONS, ids: str = "relative",
                prefix: str = "part", progress=None, address: str | None = None, log=None) -> list[dict]:
    """``lens shards``: pack the image files under ``src`` into Parquet shards at ``dst`` (``id``, ``image``,
    ``uri``), as a resumable Ray job: see :func:`lens.batch.pack.pack_images`."""
    from .pack import pack_images

    return pack_images(src, dst, rows_per_shard=rows_per_shard, max_shard_bytes=max_shard_bytes,
                       extensions=extensions, ids=ids, prefix=prefix, progress=progress, address=address,
                       log=log)

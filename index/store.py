"""Index versions on disk: written safely, verified before use.

::

    ROOT/CURRENT                    the name of the version to serve (replaced atomically)
    ROOT/v-<time>-<rand>/index.faiss
    ROOT/v-<time>-<rand>/ids.parquet    row (int64, the FAISS id), id (source id), metadata (JSON)
    ROOT/v-<time>-<rand>/manifest.json  written last: type, factory, tuned parameters, recall, dim, metric,
                                        count, model, weights checksum, preprocessing, checksums of every file

A version is built in a hidden temporary directory, each file written to a temporary name and
``os.replace``\\d, the manifest last, then the directory is renamed into place and ``CURRENT`` replaced: a
reader sees the previous version or the whole new one. :func:`load_version` checks every checksum and that
the index holds as many vectors as the sidecar has rows before anything is searched.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lens.errors import IndexCorruptError
from lens.identity import ModelIdentity
from lens.storage import atomic_write_bytes, sha256_file


__all__ = ["IndexVersion", "write_version", "load_version", "resolve_version", "current_version",
           "search_params"]

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
MANIFEST = "manifest.json"
FORMAT = "lens-index/1"


@dataclass
class IndexVersion:
    """A loaded, verified index version."""

    path: Path
    manifest: dict
    index: "object"  # faiss.Index
    ids: list[str]
    metadata: list[str]
    row_of: dict[str, int]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity.from_dict(self.manifest)  # model_identity, or an earlier version's "model" block


def write_version(root: str | os.PathLike, index, ids: list[str], metadata: list[str], manifest: dict,
                  *, make_current: bool = True, extra_files: dict[str, bytes] | None = None) -> Path:
    """Persist a built index as a new version under ``root`` (with ``extra_files``, say a drift profile, listed and
    checksummed in the manifest like the index itself); returns its directory."""
    import faiss

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"v-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    tmp = root / f".{name}.tmp"
    tmp.mkdir()
    try:
        part = tmp / f".{INDEX_FILE}.tmp"
        faiss.write_index(index, str(part))
        os.replace(part, tmp / INDEX_FILE)
        table = pa.table({"row": pa.array(np.arange(len(ids), dtype=np.int64)), "id": pa.array(ids, pa.string()),
                          "metadata": pa.array(metadata, pa.string())})
        part = tmp / f".{IDS_FILE}.tmp"
        pq.write_table(table, part)
        os.replace(part, tmp / IDS_FILE)
        for fname, data in (extra_files or {}).items():
            atomic_write_bytes(tmp / fname, data)
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)}
                 for f in (INDEX_FILE, IDS_FILE, *(extra_files or {}))}
        manifest = {"format": FORMAT, "version": name, **manifest, "count": len(ids), "files": files}
        atomic_write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        _fsync_dir(tmp)
        os.replace(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if make_current:
        set_current(root, name)
    return root / name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_current(root: Path, name: str) -> None:
    atomic_write_bytes(Path(root) / "CURRENT", (name + "\n").encode())


def current_version(root: str | os.PathLike) -> str | None:
    p = Path(root) / "CURRENT"
    return p.read_text().strip() if p.is_file() else None


def list_versions(root: str | os.PathLike) -> list[dict]:
    """Every complete version under ``root`` (a manifest written last), oldest first: name, created_at, count,
    type, bytes, current."""
    root = Path(root)
    if not root.is_dir():
        raise IndexCorruptError(f"no index root at {root}")
    current = current_version(root)
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            m = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError):
            continue  # an interrupted build: not a version
        out.append({"version": d.name, "created_at": m.get("created_at"), "count": m.get("count"),
                    "type": m.get("type"), "dim": m.get("dim"), "recall": (m.get("recall") or {}).get("value"),
                    "model": (m.get("model_identity") or {}).get("model"),
                    "model_version": (m.get("model_identity") or {}).get("version"),
                    "bytes": sum(f.get("bytes", 0) for f in m.get("files", {}).values()), "current": d.name == current})
    return out


def use_version(root: str | os.PathLike, name: str) -> None:
    """Make ``name`` CURRENT (a rollback or roll-forward of the index): verified before the pointer moves."""
    load_version(Path(root) / name)  # refuses a missing, incomplete or corrupt version
    set_current(Path(root), name)


def prune_versions(root: str | os.PathLike, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions (never CURRENT) and leftovers of interrupted builds."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    versions = [v["version"] for v in list_versions(root)]
    current = current_version(root)
    doomed = [v for v in versions[:-keep] if v != current]
    doomed += [p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(".v-") and p.name.endswith(".tmp")]
    for name in doomed:
        shutil.rmtree(root / name)
    return doomed


def resolve_version(path: str | os.PathLike) -> Path:
    """An index root (follow ``CURRENT``) or a version directory itself."""
    p = Path(path)
    if (p / MANIFEST).is_file() or (p / INDEX_FILE).exists():
        return p
    name = current_version(p)
    if name is None:
        if not p.exists():
            raise IndexCorruptError(f"no index at {p}")
        raise IndexCorruptError(f"{p} is not an index: no CURRENT file and no {MANIFEST}")
    return p / name


def load_version(path: str | os.PathLike, *, mmap: bool | None = None, verify: bool = True) -> IndexVersion:
    """Load and verify one index version. ``mmap`` (default: for IVF indexes) maps the index file instead of
    reading it into memory. Any inconsistency is an :class:`IndexCorruptError` naming what is wrong."""
    import faiss

    vdir = resolve_version(path)
    mpath = vdir / MANIFEST
    if not mpath.is_file():
        raise IndexCorruptError(f"{vdir} has no {MANIFEST}: the version is incomplete (a build was interrupted?)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        count = int(manifest["count"])
    except (ValueError, KeyError, TypeError) as e:
        raise IndexCorruptError(f"{mpath} is not a valid index manifest: {e}") from e
    if manifest.get("format") != FORMAT:
        raise IndexCorruptError(f"{mpath}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    for fname, want in files.items():
        f = vdir / fname
        if not f.is_file():
            raise IndexCorruptError(f"{f} is missing")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise IndexCorruptError(f"{f} is {size} bytes, the manifest says {want['bytes']}: truncated or replaced")
        if verify and sha256_file(f) != want["sha256"]:
            raise IndexCorruptError(f"{f} does not match its checksum in {mpath}")
    try:
        table = pq.read_table(vdir / IDS_FILE)
    except Exception as e:  # noqa: BLE001
        raise IndexCorruptError(f"cannot read {vdir / IDS_FILE}: {e}") from e
    if mmap is None:
        mmap = manifest.get("type", "").startswith("ivf")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        index = faiss.read_index(str(vdir / INDEX_FILE), flags)
    except Exception as e:  # noqa: BLE001 - faiss raises RuntimeError for any bad file
        raise IndexCorruptError(f"cannot read {vdir / INDEX_FILE}: {e}") from e
    if index.ntotal != table.num_rows or index.ntotal != count:
        raise IndexCorruptError(f"{vdir}: the index holds {index.ntotal} vectors, the id sidecar {table.num_rows} "
                                f"rows and the manifest says {count}")
    if index.d != manifest.get("dim"):
        raise IndexCorruptError(f"{vdir}: index dimension {index.d} != manifest dim {manifest.get('dim')}")
    ids = table.column("id").to_pylist()
    return IndexVersion(vdir, manifest, index, ids, table.column("metadata").to_pylist(),
                        {i: r for r, i in enumerate(ids)})


def search_params(kind: str, value: int | None):
    """Per-query FAISS search parameters (never a mutation of the shared index)."""
    import faiss

    if value is None or kind == "flat":
        return None
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=int(value))
    return faiss.SearchParametersIVF(nprobe=int(value))

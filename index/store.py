"""Index versions on disk: written safely, verified before use.

::

    ROOT/CURRENT                    the name of the version to serve (replaced atomically)
    ROOT/v-<time>-<rand>/index.faiss
    ROOT/v-<time>-<rand>/ids.parquet    row (int64, the FAISS id), id (source id), metadata (JSON)
    ROOT/v-<time>-<rand>/manifest.json  written last: type, factory, tuned parameters, recall, dim, metric,
                                        count, model, weights checksum, preprocessing, checksums of every file

A sharded version (``lens index build --shards N``) is a version directory holding ``shard-000/`` ...
``shard-NNN/``, each a complete version as above (its own manifest and checksums; IVF indexes sharing one trained
coarse quantizer), and a manifest of format ``lens-index-sharded/1`` listing them with the SHA-256 of each shard's
manifest. ``CURRENT`` names the sharded version, so its shards are swapped in together.

A version is built in a hidden temporary directory, each file written to a temporary name and
``os.replace``\\d, the manifest last, then the directory is renamed into place and ``CURRENT`` replaced: a
reader sees the previous version or the whole new one. :func:`load_version` checks every checksum and that
the index holds as many vectors as the sidecar has rows before anything is searched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lens.errors import IndexCorruptError
from lens.identity import ModelIdentity
from lens.storage import atomic_write_bytes, sha256_file

__all__ = ["IndexVersion", "write_version", "load_version", "resolve_version", "current_version",
           "search_params", "k_factor_of", "reconstruct"]

INDEX_FILE = "index.faiss"
#: autofaiss's description of an index, beside it (clip-retrieval and autofaiss users read it)
INFOS_FILE = "index_infos.json"
IDS_FILE = "ids.parquet"
MANIFEST = "manifest.json"
FORMAT = "lens-index/1"
SHARDED_FORMAT = "lens-index-sharded/1"


class ShardedIndex:
    """Several FAISS indexes searched as one: rows numbered shard after shard, top-k merged by score.

    With IVF shards that share one trained quantizer (and PQ codebooks), probing the same lists in every shard
    finds exactly the candidates one index over all the vectors would, with the same scores: the merged answer is
    that index's answer (``tests/test_index.py`` checks it)."""

    def __init__(self, indexes: list) -> None:
        self.shards = indexes
        self.offsets = np.cumsum([0] + [ix.ntotal for ix in indexes])
        self.ntotal = int(self.offsets[-1])
        self.d = indexes[0].d

    def search(self, q: np.ndarray, k: int, params=None, *, kind: str | None = None, value=None,
               exclude: np.ndarray | None = None, allowed: np.ndarray | None = None, k_factor: int | None = None):
        """Top-``k`` over every shard. Either ``params`` for all of them, or ``kind``/``value``/``k_factor`` and
        ``exclude`` / ``allowed`` (rows numbered shard after shard) from which each shard gets its own parameters."""
        scores, rows = [], []
        for off, end, ix in zip(self.offsets, self.offsets[1:], self.shards):
            kk = min(k, ix.ntotal)
            if kk == 0:
                continue
            if kind is not None:
                mine = None if exclude is None else exclude[(exclude >= off) & (exclude < end)] - off
                params = search_params(kind, value, exclude=mine, k_factor=k_factor,
                                       allowed=None if allowed is None else np.asarray(allowed)[off:end])
            s, r = ix.search(q, kk, params=params)
            scores.append(s)
            rows.append(np.where(r >= 0, r + off, -1))
        s, r = np.concatenate(scores, axis=1), np.concatenate(rows, axis=1)  # a missing hit scores FAISS's worst
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, top, 1), np.take_along_axis(r, top, 1)

    def reconstruct(self, row: int) -> np.ndarray:

        s = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return reconstruct(self.shards[s], int(row - self.offsets[s]))


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


def new_version_name() -> str:
    """``v-<UTC time to the microsecond>-<random>``: names sort in build order, two builds in one second included
    (names from before microseconds, ``v-<second>-<random>``, sort before any later build of the same second)."""
    return f"v-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S.%f')}-{uuid.uuid4().hex[:6]}"


def index_infos(manifest: dict, size_bytes: int, count: int, index_path) -> dict:
    """``index_infos.json`` in autofaiss's shape (its key names, spaces included), from a version's manifest: the
    factory string, the tuned search parameter, the file and its size, vectors and dimension, the compression
    against float32 vectors, the metric, recall@k against exact search on held-out queries and the one-query
    search latency measured at build time (those two only where the build measured them: not per shard)."""
    search = manifest.get("search") or {}
    dim = int(manifest.get("dim", 0))
    out = {"index_key": manifest.get("factory"),
           # FAISS's ParameterSpace string: an IndexRefine's re-ranking factor is its k_factor_rf
           "index_param": ",".join([f"{search['param']}={search['value']}"] + (
               [f"k_factor_rf={search['k_factor']}"] if search.get("k_factor") else [])) if search.get("param") else "",
           "index_path": index_path, "size in bytes": int(size_bytes), "nb vectors": int(count),
           "vectors dimension": dim,
           "compression ratio": round(4 * dim * count / size_bytes, 3) if size_bytes else None,
           "metric_type": "ip", "lens_metric": manifest.get("metric")}
    speed = manifest.get("search_speed_ms")
    if speed:
        out |= {"avg_search_speed_ms": speed["avg"], "99p_search_speed_ms": speed["p99"]}
    recall = manifest.get("recall")
    if recall:
        out[f"{recall['k']}-recall@{recall['k']}"] = recall["value"]
    return out


def write_version(root: str | os.PathLike, index, ids: list[str], metadata: list[str], manifest: dict,
                  *, make_current: bool = True, extra_files: dict[str, bytes] | None = None,
                  name: str | None = None) -> Path:
    """Persist a built index as a new version under ``root`` (with ``extra_files``, say a drift profile, listed and
    checksummed in the manifest like the index itself); returns its directory."""
    import faiss

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = name or new_version_name()
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
        extra_files = dict(extra_files or {})
        extra_files[INFOS_FILE] = (json.dumps(index_infos(manifest, (tmp / INDEX_FILE).stat().st_size, len(ids),
                                                          INDEX_FILE), indent=2) + "\n").encode()
        for fname, data in extra_files.items():
            atomic_write_bytes(tmp / fname, data)
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)}
                 for f in (INDEX_FILE, IDS_FILE, *extra_files)}
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


def write_sharded_version(root: str | os.PathLike, tmp: Path, shard_dirs: list[Path], manifest: dict,
                          *, extra_files: dict[str, bytes] | None = None) -> Path:
    """Finish a sharded version built in ``tmp`` (its shards already written there as complete versions): write
    ``extra_files`` and its manifest (checksums of every shard's manifest and of the extra files), move it into
    place, make it CURRENT."""
    shard_manifests = [json.loads((d / MANIFEST).read_text()) for d in shard_dirs]
    extra_files = dict(extra_files or {})
    extra_files[INFOS_FILE] = (json.dumps(index_infos(
        manifest, sum(m["files"][INDEX_FILE]["bytes"] for m in shard_manifests),
        sum(m["count"] for m in shard_manifests), [f"{d.name}/{INDEX_FILE}" for d in shard_dirs]),
        indent=2) + "\n").encode()
    for fname, data in extra_files.items():
        atomic_write_bytes(tmp / fname, data)
    listed = [f"{d.name}/{MANIFEST}" for d in shard_dirs] + list(extra_files)
    files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in listed}
    name = tmp.name[1:-len(".tmp")]
    manifest = {"format": SHARDED_FORMAT, "version": name, **manifest,
                "count": sum(m["count"] for m in shard_manifests), "shards": [d.name for d in shard_dirs],
                "shard_counts": [m["count"] for m in shard_manifests], "files": files,
                "bytes_total": sum(f["bytes"] for m in shard_manifests for f in m["files"].values())}
    atomic_write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    _fsync_dir(tmp)
    os.replace(tmp, Path(root) / name)
    set_current(Path(root), name)
    return Path(root) / name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_current(root: Path, name: str) -> None:
    atomic_write_bytes(Path(root) / "CURRENT", (name + "\n").encode())


def current_version(root: str | os.PathLike) -> str | None:
    """The version ``CURRENT`` names: one directory name inside the root (a ``..``, a path or anything but a plain
    name is refused: the pointer never leads out of the index root)."""
    p = Path(root) / "CURRENT"
    if not p.is_file():
        return None
    name = p.read_text().strip()
    if not _VERSION_NAME.match(name) or name in (".", ".."):
        raise IndexCorruptError(f"{p} names {name[:80]!r}, not a version directory of this index")
    return name


#: what CURRENT may name: a directory inside the index root (Lens writes v-<time>-<random>)
_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
                    "bytes": m.get("bytes_total") or sum(f.get("bytes", 0) for f in m.get("files", {}).values()),
                    "shards": len(m.get("shards") or []) or 1, "current": d.name == current})
    return out


def use_version(root: str | os.PathLike, name: str) -> None:
    """Make ``name`` CURRENT (a rollback or roll-forward of the index): verified before the pointer moves."""
    if not _VERSION_NAME.match(name):
        raise IndexCorruptError(f"{name[:80]!r} is not a version name of {root}")
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
    if manifest.get("format") not in (FORMAT, SHARDED_FORMAT):
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
    if manifest["format"] == SHARDED_FORMAT:
        return _load_sharded(vdir, manifest, mmap=mmap, verify=verify)
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


def _load_sharded(vdir: Path, manifest: dict, *, mmap: bool | None, verify: bool) -> IndexVersion:
    """Every shard loaded and verified, then searched as one (:class:`ShardedIndex`); rows shard after shard."""
    shards = [load_version(vdir / s, mmap=mmap, verify=verify) for s in manifest["shards"]]
    ids = [i for s in shards for i in s.ids]
    if len(ids) != int(manifest["count"]):
        raise IndexCorruptError(f"{vdir}: the shards hold {len(ids)} vectors, the manifest says {manifest['count']}")
    row_of = {i: r for r, i in enumerate(ids)}
    if len(row_of) != len(ids):
        raise IndexCorruptError(f"{vdir}: an id is in more than one shard")
    return IndexVersion(vdir, manifest, ShardedIndex([s.index for s in shards]), ids,
                        [m for s in shards for m in s.metadata], row_of)


def k_factor_of(manifest: dict) -> int | None:
    """The re-ranking factor of a version whose IVF-PQ index re-ranks with finer codes (None: no re-ranking)."""
    return (manifest.get("search") or {}).get("k_factor")


def search_params(kind: str, value: int | None, *, exclude: np.ndarray | None = None,
                  allowed: np.ndarray | None = None, k_factor: int | None = None):
    """Per-query FAISS search parameters (never a mutation of the shared index). ``exclude``: rows the search must
    not return; ``allowed``: a boolean mask of the only rows it may return (a filter). Either is applied inside the
    search by an ID selector (FAISS's filtered search), so ``k`` answers still come back. ``k_factor``: the index is
    an ``IndexRefine`` (IVF-PQ re-ranked with finer codes): the IVF parameters and selector go to its PQ stage, which
    finds ``k x k_factor`` candidates; the re-ranking scores only those. The returned object is to be passed as
    ``params=`` while it is referenced."""
    import faiss

    sel = inner = None
    if allowed is not None:
        # bit r of byte r // 8 = row r (a Selection brings its bitmap packed once)
        inner = allowed.bitmap if hasattr(allowed, "bitmap") else np.packbits(np.asarray(allowed, bool),
                                                                               bitorder="little")
        sel = faiss.IDSelectorBitmap(len(inner), faiss.swig_ptr(inner))  # n: the bitmap's bytes; kept below
    elif exclude is not None and len(exclude):
        rows = np.ascontiguousarray(exclude, dtype=np.int64)
        inner = faiss.IDSelectorBatch(len(rows), faiss.swig_ptr(rows))  # copies the ids
        sel = faiss.IDSelectorNot(inner)
    if sel is None and (value is None or kind == "flat") and not k_factor:
        return None
    kw = {"sel": sel} if sel is not None else {}
    if kind == "flat" or value is None:
        params = faiss.SearchParameters(**kw)
    elif kind == "hnsw":
        params = faiss.SearchParametersHNSW(efSearch=int(value), **kw)
    else:
        params = faiss.SearchParametersIVF(nprobe=int(value), **kw)
    if k_factor:
        base = params
        params = faiss.IndexRefineSearchParameters(k_factor=float(k_factor), base_index_params=base)
        params._lens_base = base  # FAISS keeps a raw pointer: the base parameters live as long as these
    if sel is None:
        return params
    params._lens_refs = (inner, sel)  # the selectors live as long as the parameters
    return params


_direct_map_lock = threading.Lock()


def reconstruct(index, row: int) -> np.ndarray:
    """The vector ``index`` stores at ``row`` (IVF indexes get a direct map, built once on first use)."""
    import faiss

    try:
        return index.reconstruct(int(row))
    except RuntimeError:
        # IVF indexes reconstruct through a direct map, built once on first use
        with _direct_map_lock:
            ivf = faiss.extract_index_ivf(index)
            if ivf.direct_map.type == faiss.DirectMap.NoMap:
                ivf.make_direct_map()
        return index.reconstruct(int(row))

"""Where Lens's files live, and how they are written: checksums, atomic local writes, and :class:`Location`, a
local path or an ``s3://`` URI through one pyarrow filesystem (the inputs and outputs of jobs, indexes, deltas).

S3 is reached with pyarrow's S3 filesystem configured from the same environment
boto3 reads (``AWS_ENDPOINT_URL[_S3]``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
credentials from the default chain), so moto on loopback and AWS use one code
path. Writes are atomic: locally a temporary name then ``rename``; on S3 a
single PUT, which readers never see half-written.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

__all__ = ["Location", "s3_filesystem", "split_glob", "atomic_write_bytes", "sha256_file", "default_cache_dir"]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a local ``path`` so readers see the old file, no file, or the whole new one: a temporary
    file in the same directory, fsync'd, then ``os.replace``."""
    tmp = _synced_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _synced_temp(path: str | os.PathLike, data: bytes) -> str:
    """``data`` in a complete, fsync'd temporary file beside ``path`` (its folder created); the caller moves it
    into place (rename or link) and removes it if that fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


# pyarrow is imported where a Location is used, not with this module: the model runtime (weights, ONNX cache)
# needs only the functions above, and a replica's cold start should not pay for pyarrow.
def _pafs():
    import pyarrow.fs

    return pyarrow.fs

GLOB_CHARS = set("*?[")


def s3_endpoint() -> str | None:
    """The S3 endpoint boto3 takes from the environment (``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``: moto,
    MinIO, a VPC endpoint), for the S3 clients that are not boto3's; None: AWS's own."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem, honouring boto3's endpoint and region variables."""
    kw: dict = {}
    endpoint = s3_endpoint()
    if endpoint:
        u = urlparse(endpoint)
        kw["endpoint_override"] = u.netloc or u.path
        kw["scheme"] = u.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kw["region"] = region
    return _pafs().S3FileSystem(**kw)


@dataclass(frozen=True)
class Location:
    """A directory-like place: ``fs`` plus a ``root`` path in that filesystem's terms (``bucket/prefix`` on S3)."""

    uri: str
    fs: pafs.FileSystem
    root: str

    @classmethod
    def parse(cls, uri: str) -> "Location":
        uri = str(uri)
        if uri.startswith("s3://"):
            rest = uri[len("s3://"):].rstrip("/")
            if not rest or rest.startswith("/"):
                raise ValueError(f"an s3 location must look like s3://bucket[/prefix], got {uri!r}")
            return cls(uri, s3_filesystem(), rest)
        if "://" in uri:
            raise ValueError(f"unsupported location {uri!r}: use a local path or s3://bucket/prefix")
        return cls(uri, _pafs().LocalFileSystem(), os.path.abspath(os.path.expanduser(uri)))

    @property
    def is_s3(self) -> bool:
        return isinstance(self.fs, _pafs().S3FileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *(p.strip("/") for p in parts if p)])

    def uri_of(self, path: str) -> str:
        return f"s3://{path}" if self.is_s3 else path

    def relative(self, path: str) -> str:
        """A path under this location, relative to its root: ``ROOT/a/b.jpg`` -> ``a/b.jpg``."""
        return path[len(self.root):].lstrip("/")

    # -- listing -------------------------------------------------------------------------------
    def info(self, path: str | None = None) -> pafs.FileInfo:
        return self.fs.get_file_info(path or self.root)

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != _pafs().FileType.NotFound

    def list_files(self, path: str | None = None, pattern: str | None = None) -> list[str]:
        """Files under ``path`` (recursively), sorted; ``pattern`` is a glob matched against the whole path.
        Hidden and underscore-prefixed names (``_SUCCESS``, ``.tmp``) are skipped, as Spark and Arrow do."""
        return [p for p, _ in self.list_file_sizes(path, pattern)]

    def list_file_sizes(self, path: str | None = None, pattern: str | None = None) -> list[tuple[str, int]]:
        """(file, size in bytes) for :meth:`list_files`' files, from the same one listing."""
        base = path or self.root
        info = self.fs.get_file_info(base)
        if info.type == _pafs().FileType.File:
            return [(base, info.size)]
        if info.type == _pafs().FileType.NotFound:
            return []
        out = []
        for fi in self.fs.get_file_info(_pafs().FileSelector(base, recursive=True)):
            if fi.type != _pafs().FileType.File:
                continue
            rel = fi.path[len(base):].lstrip("/")
            if any(part.startswith((".", "_")) for part in rel.split("/")):
                continue
            if pattern and not fnmatch.fnmatchcase(fi.path, pattern):
                continue
            out.append((fi.path, fi.size))
        return sorted(out)

    def delete_dir(self, path: str) -> None:
        if self.fs.get_file_info(path).type == _pafs().FileType.Directory:
            self.fs.delete_dir(path)
        elif self.is_s3:  # an S3 "directory" may exist only as a key prefix
            for fi in self.fs.get_file_info(_pafs().FileSelector(path, recursive=True, allow_not_found=True)):
                if fi.type == _pafs().FileType.File:
                    self.fs.delete_file(fi.path)

    def delete_file(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_file(path)

    # -- reading -------------------------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def read_json(self, path: str) -> dict | None:
        """The JSON object at ``path``, or None if there is none; :class:`~lens.errors.CorruptFileError` naming the
        file if it is not JSON."""
        try:
            raw = self.read_bytes(path)
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            from .errors import CorruptFileError

            raise CorruptFileError(f"{self.uri_of(path)} is not valid JSON ({str(e)[:120]})") from None

    # -- atomic writing ------------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Write ``data`` so that readers see the old file, no file, or the whole new file."""
        if self.is_s3:
            with self.fs.open_output_stream(path) as f:  # one PUT: atomic on S3
                f.write(data)
            return
        atomic_write_bytes(path, data)

    def write_json(self, path: str, obj: dict) -> None:
        self.write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    # -- concurrent writers -----------------------------------------------------------------------
    def create_only(self, path: str, data: bytes) -> bool:
        """Write ``data`` at ``path`` only if nothing is there: True if this call created it, False if another
        writer had. Atomic against concurrent writers: on S3 a conditional PUT (``If-None-Match: *``), locally a
        complete temporary file hard-linked into place (``link`` fails if the name exists)."""
        if self.is_s3:
            return self._s3_put(path, data, IfNoneMatch="*")
        tmp = _synced_temp(path, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)

    def update_json(self, path: str, change, *, attempts: int = 100):
        """Read-modify-write the JSON object at ``path`` so no concurrent writer's update is lost: ``change(old)``
        (old: the object or None) returns the new object, or None to leave the file as it is. Locally under a
        file lock; on S3 by compare-and-swap (``If-Match`` on the ETag read, ``If-None-Match`` when there was no
        file), re-reading and calling ``change`` again after a conflict. Returns (old, new)."""
        if not self.is_s3:
            from filelock import FileLock

            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(Path(path).parent / f".{Path(path).name}.lock"), timeout=600):
                old = self.read_json(path)
                new = change(old)
                if new is not None:
                    self.write_json(path, new)
                return old, new
        import random
        import time

        for i in range(attempts):
            old, etag = self._s3_get_json(path)
            new = change(old)
            if new is None:
                return old, None
            body = (json.dumps(new, indent=2) + "\n").encode()
            if self._s3_put(path, body, **({"IfMatch": etag} if etag else {"IfNoneMatch": "*"})):
                return old, new
            time.sleep(random.uniform(0, 0.01 * (i + 1)))  # another writer won this round: read theirs, again
        raise RuntimeError(f"{self.uri_of(path)}: still conflicting after {attempts} attempts")

    def _s3_client(self):
        import boto3

        return boto3.client("s3")

    def _s3_put(self, path: str, data: bytes, **condition) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = path.split("/", 1)
        try:
            self._s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict",
                                                           "409"):
                return False
            raise

    def _s3_get_json(self, path: str) -> tuple[dict | None, str | None]:
        from botocore.exceptions import ClientError

        bucket, key = path.split("/", 1)
        try:
            r = self._s3_client().get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise
        return json.loads(r["Body"].read()), r["ETag"]

    def write_table(self, path: str, table: pa.Table, **kwargs) -> None:
        """A Parquet file written atomically (to memory first: output parts are small)."""
        buf = io.BytesIO()
        import pyarrow.parquet as pq

        pq.write_table(table, buf, **kwargs)
        self.write_bytes(path, buf.getvalue())

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        import pyarrow.parquet as pq

        return pq.read_table(path, filesystem=self.fs, columns=columns)


def split_glob(uri: str) -> tuple[str, str | None]:
    """``dir/*/x-*.parquet`` -> (``dir``, ``*/x-*.parquet``); a plain path -> (path, None)."""
    scheme = "s3://" if uri.startswith("s3://") else ""
    rest = uri[len(scheme):]
    parts = rest.split("/")
    for i, part in enumerate(parts):
        if GLOB_CHARS & set(part):
            return scheme + ("/".join(parts[:i]) or "."), "/".join(parts[i:])
    return uri, None


def default_cache_dir() -> Path:
    """``$LENS_CACHE_DIR``, else ``$XDG_CACHE_HOME/lens``, else ``~/.cache/lens``."""
    env = os.environ.get("LENS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lens"

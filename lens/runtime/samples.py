"""Real photographs that ship in an installed package (scikit-image's ``data`` folder).

They are found on disk without importing scikit-image, and serve the demo, the
tests (real weights on real photos) and the benchmarks.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["SAMPLES", "PHOTOS", "sample_dir", "sample_path", "sample_paths", "photo_paths", "unseen_photo_paths",
           "augment", "augmented_jpegs"]

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


#: every colour or greyscale photograph in that folder: the pool for seeded augmented copies
PHOTOS: tuple[str, ...] = tuple(SAMPLES) + (
    "brick.png", "cell.png", "coins.png", "color.png", "grass.png", "gravel.png", "horse.png", "ihc.png",
    "logo.png", "moon.png", "page.png", "retina.jpg", "text.png", "clock_motion.png", "motorcycle_right.png",
)


def sample_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sample photos come from scikit-image, which is not installed: pip install "
                                "'lens-vision[samples]' (for int8, or set model.calibration to your own images)")
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


def photo_paths() -> list[Path]:
    """The photos of :data:`PHOTOS` present in this scikit-image install."""
    base = sample_dir()
    return [base / n for n in PHOTOS if (base / n).is_file()]


def unseen_photo_paths() -> list[Path]:
    """Photographs that never chose anything in Lens (not the int8 recipe, not a threshold): the two that ship with
    scikit-learn (a temple, a flower; installed with the int8 extra, NNCF needs scikit-learn) and matplotlib's
    portrait when matplotlib is installed. The int8 gate's default held-out set."""
    out = []
    for package, rel in (("sklearn", ("datasets", "images", "china.jpg")), ("sklearn", ("datasets", "images", "flower.jpg")),
                         ("matplotlib", ("mpl-data", "sample_data", "grace_hopper.jpg"))):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))).joinpath(*rel)
        if path.is_file():
            out.append(path)
    if not out:
        raise FileNotFoundError("the int8 gate's default held-out photos come from scikit-learn, which is not "
                                "installed: pip install 'lens-vision[int8]' (or set model.int8_holdout to your images)")
    return out


def augment(img, rng, *, min_area: float = 0.5, long_side: tuple[int, int] = (256, 800)):
    """A seeded random copy: crop (``min_area``..1 of the area), maybe mirrored, colour-jittered and resized."""
    from PIL import Image, ImageEnhance, ImageOps

    img = img.convert("RGB")
    w, h = img.size
    area = rng.uniform(min_area, 1.0)
    aspect = rng.uniform(0.8, 1.25)
    cw = max(16, min(w, int(round(w * (area * aspect) ** 0.5))))
    ch = max(16, min(h, int(round(h * (area / aspect) ** 0.5))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(float(rng.uniform(0.75, 1.25)))
    target = int(rng.integers(long_side[0], long_side[1] + 1))
    scale = target / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)


def augmented_jpegs(n: int, seed: int = 0, *, paths=None, **kwargs):
    """``n`` seeded augmented copies of the bundled photos (or of ``paths``) as ``(name, jpeg_bytes,
    source_photo)``."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [(p.stem, Image.open(p).convert("RGB")) for p in (paths or photo_paths())]
    for i in range(n):
        stem, img = photos[i % len(photos)]
        buf = io.BytesIO()
        augment(img, rng, **kwargs).save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
        yield f"{stem}-{i:06d}.jpg", buf.getvalue(), stem


#: photo -> class name for :func:`scene_dataset`: distinct scenes, each a class of "custom tags"
SCENES: dict[str, str] = {
    "chelsea.png": "cat", "coffee.png": "coffee", "astronaut.png": "astronaut", "rocket.jpg": "rocket",
    "motorcycle_left.png": "motorcycle", "horse.png": "horse", "brick.png": "brick", "coins.png": "coins",
}


def scene_dataset(root, *, train_per_class: int = 20, val_per_class: int = 6, seed: int = 0,
                  scenes: dict[str, str] | None = None, split_at: float = 0.6) -> dict[str, int]:
    """Write a labeled image folder made from real photos: ``root/train/<class>/*.jpg`` and
    ``root/val/<class>/*.jpg``, one class per photo of ``scenes``. Training images are seeded augmented crops of
    the photo's left ``split_at`` share, validation images of the rest, so validation never sees training
    pixels. Returns images per class written."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = sample_dir()
    counts = {}
    for photo, label in (scenes or SCENES).items():
        img = Image.open(base / photo).convert("RGB")
        w, h = img.size
        cut = int(w * split_at)
        for split, region, n in (("train", (0, 0, cut, h), train_per_class), ("val", (cut, 0, w, h), val_per_class)):
            part = img.crop(region)
            out = Path(root) / split / label
            out.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                augment(part, rng, min_area=0.4, long_side=(160, 320)).save(
                    out / f"{label}-{i:04d}.jpg", format="JPEG", quality=int(rng.integers(80, 95)))
        counts[label] = train_per_class + val_per_class
    return counts

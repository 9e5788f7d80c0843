"""Preprocessing derived from a model's pretrained config, never hard-coded.

:class:`PreprocessConfig` holds what ``timm.data.resolve_data_config`` resolves
for a model (input size, interpolation, crop, mean/std). :class:`Preprocessor`
reproduces timm's eval transform (``Resize(floor(size / crop_pct))`` on the short
side, ``CenterCrop``, ``ToTensor``, ``Normalize``) with Pillow and numpy, so it
runs without torch; ``tests/test_preprocess.py`` holds it to timm's own transform.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .decode import DecodeLimits, decode_image

__all__ = ["PreprocessConfig", "Preprocessor"]

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_CROP_MODES = ("center", "squash", "border")


@dataclass(frozen=True)
class PreprocessConfig:
    """A model's resolved eval-time data config (the fields of ``resolve_data_config``)."""

    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        c, h, w = self.input_size
        if c != 3 or h <= 0 or w <= 0:
            raise ValueError(f"input_size must be (3, H, W) with H, W > 0, got {self.input_size}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {self.interpolation!r}")
        if self.crop_mode not in _CROP_MODES:
            raise ValueError(f"crop_mode must be one of {_CROP_MODES}, got {self.crop_mode!r}")
        if not 0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 values with std > 0, got {self.mean}/{self.std}")

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        return cls(
            input_size=tuple(int(v) for v in d["input_size"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            crop_pct=float(d["crop_pct"]),
            crop_mode=str(d.get("crop_mode", "center")),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        return self.input_size[1], self.input_size[2]

    @property
    def scale_size(self) -> int | tuple[int, int]:
        """The resize target before cropping, exactly as timm's ``transforms_imagenet_eval``."""
        h, w = self.size
        if h == w:
            return math.floor(h / self.crop_pct)
        return (math.floor(h / self.crop_pct), math.floor(w / self.crop_pct))

    @property
    def min_decode_size(self) -> int:
        """The shortest side an image needs before resizing (draft-mode decoding may stop there)."""
        s = self.scale_size
        return s if isinstance(s, int) else max(s)


class Preprocessor:
    """Turns images or untrusted bytes into normalised ``float32`` CHW arrays."""

    def __init__(self, cfg: PreprocessConfig, limits: DecodeLimits = DecodeLimits()) -> None:
        self.cfg = cfg
        self.limits = limits
        self._resample = _INTERPOLATION[cfg.interpolation]
        mean = np.asarray(cfg.mean, dtype=np.float32)
        std = np.asarray(cfg.std, dtype=np.float32)
        # (x / 255 - mean) / std == x * scale + bias, per channel, broadcast over (C, H, W)
        self._scale = (1.0 / (255.0 * std)).reshape(3, 1, 1)
        self._bias = (-mean / std).reshape(3, 1, 1)

    def decode(self, data: bytes) -> Image.Image:
        """Safe decode (see :func:`lens.runtime.decode.decode_image`), JPEG draft sized for this model."""
        return decode_image(data, self.limits, min_size=self.cfg.min_decode_size)

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """Resize and crop an RGB image to the model's input size, as timm's eval transform does."""
        th, tw = self.cfg.size
        if self.cfg.crop_mode == "squash":
            return img.resize((tw, th), self._resample)
        scale = self.cfg.scale_size
        w, h = img.size
        if isinstance(scale, int):
            # torchvision Resize(int): the short side becomes `scale`, the long side keeps the ratio
            if w <= h:
                nw, nh = scale, int(scale * h / w)
            else:
                nw, nh = int(scale * w / h), scale
        else:
            nh, nw = scale
        if self.cfg.crop_mode == "border":
            raise NotImplementedError("crop_mode='border' is not used by any EfficientNet config")
        if nw < w and nh < h and nw >= tw and nh >= th:
            # Downscaling: resize only the region the crop keeps. Same sample positions and filter
            # taps as resizing everything and then cropping, for a fraction of the work.
            top = int(round((nh - th) / 2.0))  # torchvision CenterCrop offsets, in resized coordinates
            left = int(round((nw - tw) / 2.0))
            sx, sy = w / nw, h / nh
            return img.resize((tw, th), self._resample, box=(left * sx, top * sy, (left + tw) * sx, (top + th) * sy))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), self._resample)
        if nw < tw or nh < th:  # smaller than the crop: pad around the centre, as CenterCrop does
            canvas = Image.new("RGB", (max(nw, tw), max(nh, th)))
            canvas.paste(img, ((canvas.width - nw) // 2, (canvas.height - nh) // 2))
            img = canvas
            nw, nh = canvas.size
        top = int(round((nh - th) / 2.0))
        left = int(round((nw - tw) / 2.0))
        return img.crop((left, top, left + tw, top + th))

    def to_array(self, img: Image.Image) -> np.ndarray:
        """Normalise an RGB image of the model's input size to ``float32`` (3, H, W)."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        return self.normalize(np.asarray(img)[None])[0]

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 crops (from :meth:`pixels`) -> (N, 3, H, W) float32, the same arithmetic as
        :meth:`to_array`, so shipping uint8 between pipeline stages changes no output bit."""
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[3] != 3:
            raise TypeError(f"expected (N, H, W, 3) uint8 pixels, got {pixels.dtype} with shape {pixels.shape}")
        nchw = pixels.transpose(0, 3, 1, 2)
        out = np.empty(nchw.shape, dtype=np.float32)
        np.multiply(nchw, self._scale, out=out, casting="unsafe")
        out += self._bias
        return out

    def pixels(self, item: "bytes | Image.Image | np.ndarray") -> np.ndarray:
        """Decode and resize/crop to the model's input size, stopping before normalisation: (H, W, 3) uint8,
        a quarter of the float32 array's size, for pipelines that move preprocessed images between processes."""
        img = self._image(item)
        out = self.resize_crop(img)
        if out.mode != "RGB":
            out = out.convert("RGB")
        return np.asarray(out)

    def __call__(self, item: "bytes | Image.Image | np.ndarray") -> np.ndarray:
        """Bytes (decoded safely), a PIL image, or an HWC uint8 array -> (3, H, W) float32."""
        return self.to_array(self.resize_crop(self._image(item)))

    def _image(self, item: "bytes | Image.Image | np.ndarray") -> Image.Image:
        if isinstance(item, (bytes, bytearray, memoryview)):
            img = self.decode(item)
        elif isinstance(item, Image.Image):
            img = item if item.mode == "RGB" else item.convert("RGB")
        elif isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim not in (2, 3):
                raise TypeError(f"arrays must be uint8 HW or HWC, got {item.dtype} with shape {item.shape}")
            img = Image.fromarray(item).convert("RGB")
        else:
            raise TypeError(f"expected bytes, PIL.Image or numpy array, got {type(item).__name__}")
        return img

"""Safe decoding of untrusted image bytes into RGB ``PIL.Image`` objects.

Every rejection is a typed :mod:`lens.errors` exception, so callers (the HTTP
layer, the event consumer, the bulk job) can map it to a status or an error row
without parsing messages. Nothing here ever turns on
``ImageFile.LOAD_TRUNCATED_IMAGES`` or switches off Pillow's decompression-bomb
guard.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, ImageOps

from lens.errors import ImageTooLargeError, InvalidImageError, UnsupportedImageTypeError

__all__ = ["DecodeLimits", "ALL_FORMATS", "sniff_format", "decode_image", "to_rgb"]

logger = logging.getLogger(__name__)

#: Formats Lens accepts, by the name Pillow gives them. HEIF (iPhones' HEIC) through pillow-heif's opener, AVIF
#: (Android's, increasingly) through Pillow's own plugin.
ALL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")

#: ISO base media file brands (the ``ftyp`` box): AVIF's, and HEIF's (HEVC-coded stills and sequences, and the
#: generic image brands an AVIF file names among its compatible brands too)
_AVIF_BRANDS = (b"avif", b"avis")
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


def _register_heif() -> bool:
    try:
        from pillow_heif import register_heif_opener
    except ImportError:  # pragma: no cover - a core dependency; without it HEIF is a clear 415
        logger.warning("pillow-heif is not installed: HEIF/HEIC images are refused")
        return False
    register_heif_opener()
    return True


HEIF_SUPPORTED = _register_heif()

# Pillow's own bomb guard: warn above MAX_IMAGE_PIXELS, raise above twice that.
PILLOW_MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485


@dataclass(frozen=True)
class DecodeLimits:
    """What an untrusted image may be. Validated on construction."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = PILLOW_MAX_PIXELS
    formats: tuple[str, ...] = ALL_FORMATS
    #: colour that transparent pixels are composited onto
    background: tuple[int, int, int] = (255, 255, 255)
    #: let libjpeg decode at 1/2, 1/4 or 1/8 scale when the image is larger than needed
    draft: bool = True
    _fmt_set: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {self.max_bytes}")
        if not 0 < self.max_pixels <= PILLOW_MAX_PIXELS:
            raise ValueError(
                f"max_pixels must be in (0, {PILLOW_MAX_PIXELS}] (Pillow's decompression-bomb "
                f"limit stays on), got {self.max_pixels}"
            )
        unknown = set(self.formats) - set(ALL_FORMATS)
        if unknown or not self.formats:
            raise ValueError(f"formats must be a non-empty subset of {ALL_FORMATS}, got {self.formats}")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            raise ValueError(f"background must be three ints in 0..255, got {self.background}")
        object.__setattr__(self, "_fmt_set", frozenset(self.formats))


def sniff_format(data: bytes) -> str | None:
    """Detect the image format from magic bytes (the first 64 are enough); ``None`` if it is none we know."""
    head = data[:16]
    if data[4:8] == b"ftyp":  # ISO BMFF: the major brand, then the compatible brands of the ftyp box
        size = int.from_bytes(data[:4], "big")
        brands = [data[8:12]] + [data[i:i + 4] for i in range(16, min(size, len(data)) - 3, 4)]
        if any(b in _AVIF_BRANDS for b in brands):
            return "AVIF"
        if any(b in _HEIF_BRANDS for b in brands):
            return "HEIF"
        return None
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def decode_image(
    data: bytes | bytearray | memoryview,
    limits: DecodeLimits = DecodeLimits(),
    *,
    min_size: int | None = None,
) -> Image.Image:
    """Decode untrusted bytes to an RGB image with EXIF orientation applied.

    ``min_size`` is the shortest side the caller will resize to; for JPEGs larger
    than that, libjpeg's DCT scaling (draft mode) decodes at the smallest of
    1/1, 1/2, 1/4, 1/8 scale that still keeps both sides at least ``min_size``.

    Raises :class:`ImageTooLargeError` (413), :class:`UnsupportedImageTypeError` (415)
    or :class:`InvalidImageError` (400).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImageError(f"expected image bytes, got {type(data).__name__}")
    n = len(data)
    if n == 0:
        raise InvalidImageError("empty body: no image bytes", code="empty_image")
    if n > limits.max_bytes:
        raise ImageTooLargeError(f"image is {n} bytes; the limit is {limits.max_bytes} bytes")
    fmt = sniff_format(bytes(data[:64]))
    if fmt is None:
        raise UnsupportedImageTypeError(
            f"not a supported image format (magic bytes {bytes(data[:8]).hex()}); "
            f"accepted: {', '.join(limits.formats)}"
        )
    if fmt not in limits._fmt_set:
        raise UnsupportedImageTypeError(f"{fmt} images are not accepted here; accepted: {', '.join(limits.formats)}")
    if fmt == "HEIF" and not HEIF_SUPPORTED:
        raise UnsupportedImageTypeError("HEIF images need pillow-heif, which is not installed here")

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False, "LOAD_TRUNCATED_IMAGES must never be enabled"
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image has too many pixels: {e}", code="decompression_bomb") from e
    except Exception as e:  # noqa: BLE001 - untrusted input: any parser failure is a bad image
        raise InvalidImageError(f"cannot decode {fmt} image: {e}") from e

    try:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise InvalidImageError(f"{fmt} image has an invalid size {w}x{h}")
        if w * h > limits.max_pixels:
            raise ImageTooLargeError(
                f"image is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels}",
                code="decompression_bomb",
            )
        if fmt == "JPEG" and limits.draft and min_size and min(w, h) >= 2 * min_size:
            im.draft(im.mode, (min_size, min_size))
        im.load()  # raises on truncated data; the first frame only for GIF/TIFF/WebP
        im = ImageOps.exif_transpose(im)
        return to_rgb(im, limits.background)
    except (InvalidImageError, ImageTooLargeError):
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image has too many pixels: {e}", code="decompression_bomb") from e
    except Exception as e:  # noqa: BLE001 - see above
        msg = str(e) or type(e).__name__
        code = "truncated_image" if "truncated" in msg.lower() else "invalid_image"
        raise InvalidImageError(f"cannot decode {fmt} image: {msg}", code=code) from e


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparency (RGBA, LA, PA, P with a transparent index) is composited onto
    ``background``; 16/32-bit greyscale is scaled down, not clipped.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale (PNG/TIFF). Scale 0..65535 to 0..255 instead of clipping.
        arr = np.asarray(im, dtype=np.float64)
        arr = np.clip(arr / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr = np.nan_to_num((arr - lo) * scale).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if mode == "L" and "transparency" in im.info:
        has_alpha = True
    if has_alpha:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, background + (255,))
        bg.alpha_composite(rgba)
        return bg.convert("RGB")
    # CMYK (Pillow already undoes Adobe's inversion), P, 1, L, YCbCr, LAB, HSV
    return im.convert("RGB")

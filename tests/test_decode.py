"""Safe decoding: every malformed or hostile input gets its typed error; every mode becomes RGB."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from conftest import encode, random_rgb
from PIL import Image

from lens.errors import ImageTooLargeError, InvalidImageError, UnsupportedImageTypeError
from lens.runtime.decode import DecodeLimits, decode_image, sniff_format


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF"])
def test_every_allowed_format_decodes_to_rgb(rng, fmt):
    img = random_rgb(rng, 40, 30)
    data = encode(img, fmt)
    assert sniff_format(data) == fmt
    out = decode_image(data)
    assert out.mode == "RGB" and out.size == (40, 30)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_phone_formats_decode_close_to_the_original_and_keep_every_limit(fmt):
    """iPhones' HEIC and Android's AVIF, written by their real encoders (pillow-heif's libheif/x265, Pillow's
    libavif): decoded close to the photo they were made from; the byte, pixel and format limits apply as to any
    image, the pixel count before the pixels are decoded; a truncated file is a 400."""
    from lens.runtime.samples import sample_path

    photo = Image.open(sample_path("coffee.png")).convert("RGB")
    data = encode(photo, fmt, quality=90)
    assert sniff_format(data) == fmt
    out = decode_image(data)
    assert out.size == photo.size
    assert np.abs(np.asarray(out, np.int16) - np.asarray(photo, np.int16)).mean() < 6
    w, h = photo.size
    with pytest.raises(ImageTooLargeError, match=f"{w}x{h}"):
        decode_image(data, DecodeLimits(max_pixels=w * h - 1))
    with pytest.raises(ImageTooLargeError):
        decode_image(data, DecodeLimits(max_bytes=len(data) - 1))
    with pytest.raises(UnsupportedImageTypeError, match=f"{fmt} images are not accepted"):
        decode_image(data, DecodeLimits(formats=("JPEG",)))
    with pytest.raises(InvalidImageError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.http_status == 400


def test_the_decode_config_accepts_every_format_decode_does_and_defaults_to_all():
    from lens.runtime.config import DecodeConfig
    from lens.runtime.decode import ALL_FORMATS

    assert DecodeConfig().limits().formats == ALL_FORMATS and "HEIF" in ALL_FORMATS and "AVIF" in ALL_FORMATS
    assert DecodeConfig(formats=("HEIF", "AVIF")).limits().formats == ("HEIF", "AVIF")
    with pytest.raises(Exception, match="JPEG"):
        DecodeConfig(formats=("JPG",))


def test_iso_media_files_are_told_apart_by_their_brands():
    def ftyp(major: bytes, *compatible: bytes) -> bytes:
        body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
        return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\x00" * 16

    assert sniff_format(ftyp(b"heic", b"mif1", b"heic")) == "HEIF"
    assert sniff_format(ftyp(b"mif1", b"mif1", b"heic")) == "HEIF"
    assert sniff_format(ftyp(b"mif1", b"mif1", b"avif")) == "AVIF"  # an AVIF may lead with the generic brand
    assert sniff_format(ftyp(b"avif", b"mif1")) == "AVIF"
    assert sniff_format(ftyp(b"isom", b"mp41")) is None  # an MP4 video is not an image: 415
    with pytest.raises(UnsupportedImageTypeError):
        decode_image(ftyp(b"isom", b"mp41"))


def test_lossless_formats_keep_pixels(rng):
    img = random_rgb(rng, 16, 8)
    for fmt in ("PNG", "BMP", "TIFF"):
        assert np.array_equal(np.asarray(decode_image(encode(img, fmt))), np.asarray(img))


def test_empty_body_is_400():
    with pytest.raises(InvalidImageError) as e:
        decode_image(b"")
    assert e.value.http_status == 400 and e.value.code == "empty_image"


def test_unknown_magic_is_415():
    with pytest.raises(UnsupportedImageTypeError) as e:
        decode_image(b"%PDF-1.7 not an image at all")
    assert e.value.http_status == 415


def test_format_outside_allowlist_is_415(rng):
    png = encode(random_rgb(rng), "PNG")
    with pytest.raises(UnsupportedImageTypeError, match="PNG images are not accepted"):
        decode_image(png, DecodeLimits(formats=("JPEG",)))


def test_too_many_bytes_is_413(rng):
    data = encode(random_rgb(rng, 200, 200), "PNG")
    with pytest.raises(ImageTooLargeError) as e:
        decode_image(data, DecodeLimits(max_bytes=len(data) - 1))
    assert e.value.http_status == 413
    decode_image(data, DecodeLimits(max_bytes=len(data)))  # exactly at the limit is fine


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares a huge canvas: the classic decompression bomb shape."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_413_before_decoding():
    bomb = _png_header_only(30_000, 30_000)  # 900 Mpx declared in a few bytes
    assert len(bomb) < 200
    with pytest.raises(ImageTooLargeError) as e:
        decode_image(bomb)
    assert e.value.http_status == 413 and e.value.code == "decompression_bomb"


def test_pixel_limit_is_configurable(rng):
    data = encode(random_rgb(rng, 100, 100), "PNG")
    with pytest.raises(ImageTooLargeError, match="10000 pixels"):
        decode_image(data, DecodeLimits(max_pixels=9_999))


def test_pillow_bomb_limit_cannot_be_switched_off():
    with pytest.raises(ValueError, match="decompression-bomb"):
        DecodeLimits(max_pixels=10**12)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_rejected(rng, fmt):
    data = encode(random_rgb(rng, 256, 256), fmt)
    with pytest.raises(InvalidImageError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.http_status == 400


def test_corrupt_body_after_valid_magic_is_400():
    with pytest.raises(InvalidImageError) as e:
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    assert e.value.http_status == 400


def test_non_bytes_input_is_400():
    with pytest.raises(InvalidImageError):
        decode_image("not bytes")  # type: ignore[arg-type]


def test_exif_orientation_is_applied():
    # A 40x20 image whose left half is red, stored with orientation 6 (rotate 90 CW to view).
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)  # rotated to portrait
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[35, 10]
    assert top[0] > 200 and top[1] < 60  # the red half is now on top
    assert bottom.max() < 60


def test_cmyk_jpeg_converts_to_rgb():
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    out = np.asarray(decode_image(encode(cyan, "JPEG", quality=100)))
    assert out.shape == (16, 16, 3)
    r, g, b = out[8, 8].astype(int)
    assert r < 30 and g > 225 and b > 225


def test_rgba_is_composited_on_the_background():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    out = np.asarray(decode_image(encode(img, "PNG")))
    assert tuple(out[4, 4]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (0, 0, 255)
    black = np.asarray(decode_image(encode(img, "PNG"), DecodeLimits(background=(0, 0, 0))))
    assert tuple(black[4, 4]) == (0, 0, 0)


def test_palette_with_transparency():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([255, 0, 0] + [0, 255, 0] * 255)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0  # index 0 (red) is transparent
    out = np.asarray(decode_image(encode(img, "PNG", transparency=0)))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[1, 1]) == (0, 255, 0)


def test_la_mode():
    img = Image.new("LA", (4, 4), (100, 255))
    img.putpixel((0, 0), (0, 0))
    out = np.asarray(decode_image(encode(img, "PNG")))
    assert tuple(out[1, 1]) == (100, 100, 100)
    assert tuple(out[0, 0]) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    for fmt in ("PNG", "TIFF"):
        out = np.asarray(decode_image(encode(img, fmt)))
        assert out.shape == (1, 4, 3)
        assert list(out[0, :, 0]) == [0, 128, 255, 4], fmt


def test_one_bit_mode():
    img = Image.new("1", (8, 8), 0)
    img.putpixel((2, 2), 1)
    out = np.asarray(decode_image(encode(img, "PNG")))
    assert tuple(out[2, 2]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 0)


def test_gif_uses_the_first_frame():
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    blue = Image.new("RGB", (8, 8), (0, 0, 255))
    buf = io.BytesIO()
    red.save(buf, format="GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    out = np.asarray(decode_image(buf.getvalue()))
    r, g, b = out[4, 4].astype(int)
    assert r > 200 and b < 50


def test_draft_mode_decodes_large_jpegs_smaller_but_not_below_the_needed_size(rng):
    img = Image.fromarray(rng.integers(0, 256, (800, 1280, 3), dtype=np.uint8))
    data = encode(img, "JPEG", quality=90)
    full = decode_image(data, DecodeLimits(draft=False), min_size=256)
    drafted = decode_image(data, min_size=256)
    assert full.size == (1280, 800)
    assert drafted.size == (640, 400)  # 1/2 scale: 1/4 would drop the short side below 256
    assert decode_image(data, min_size=600).size == (1280, 800)  # no room to scale


def test_limits_validate_on_construction():
    with pytest.raises(ValueError, match="max_bytes"):
        DecodeLimits(max_bytes=0)
    with pytest.raises(ValueError, match="formats"):
        DecodeLimits(formats=("JPEG", "HEIC"))

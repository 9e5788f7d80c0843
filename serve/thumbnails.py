"""Thumbnails for the search page: an indexed item's image, read from where it lives, shrunk, sent as JPEG.

The location comes from the index (:meth:`lens.index.search.SearchService.location_of`): an ``s3://`` object or a
local path. An ``s3://`` image is read (bounded by ``max_image_bytes``) and shrunk here, or, with
``thumbnails: presign``, answered with a redirect to a short-lived presigned URL of the original. A local path is
read only when it lies inside one of ``local_roots`` (after resolving symlinks and ``..``): an index's metadata
must not turn the service into a file server for the rest of the disk. Decoding goes through
:func:`lens.runtime.decode.decode_image` (the same bomb and format guards as tagging); at most ``max_concurrent``
thumbnails are made at once per replica, in threads, so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import io
import os

from lens.errors import ImageTooLargeError, NotFoundError
from lens.runtime.decode import DecodeLimits, decode_image

from .body import HttpError
from .config import UiConfig

__all__ = ["Thumbnails", "make_thumbnail"]


def make_thumbnail(data: bytes, px: int, limits: DecodeLimits) -> bytes:
    """JPEG bytes of ``data`` shrunk to fit ``px`` x ``px`` (never enlarged); the decode errors of tagging."""
    im = decode_image(data, limits, min_size=px)
    im.thumbnail((px, px))
    out = io.BytesIO()
    im.save(out, "JPEG", quality=85, optimize=True)
    return out.getvalue()


def _under(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives
        return False


class Thumbnails:
    """What ``GET /v1/thumbnail/{id}`` answers for an image location."""

    def __init__(self, cfg: UiConfig) -> None:
        self.cfg = cfg
        self.roots = [os.path.realpath(os.path.expanduser(r)) for r in cfg.local_roots]
        self.limits = DecodeLimits(max_bytes=cfg.max_image_bytes)
        self._slots: asyncio.Semaphore | None = None

    def local_path(self, uri: str) -> str:
        """``uri`` resolved, if it lies inside an allowed root; else a 403 naming the knob."""
        path = os.path.realpath(uri)
        if not any(_under(path, r) for r in self.roots):
            hint = (f"allowed roots: {', '.join(self.roots)}" if self.roots
                    else "no local roots are allowed (api.ui.local_roots)")
            raise HttpError(f"the image of this id is a local file outside the allowed roots; {hint}",
                            status=403, code="forbidden_location")
        return path

    def presigned_url(self, uri: str) -> str:
        import boto3

        bucket, _, key = uri[len("s3://"):].partition("/")
        return boto3.client("s3").generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.cfg.presign_expiry_s)

    def _read(self, uri: str) -> bytes:
        """The image's bytes, refusing one over ``max_image_bytes`` before reading it."""
        from lens.storage import Location

        if uri.startswith("s3://"):
            loc, path = Location.parse(uri), uri[len("s3://"):]
        else:
            loc, path = Location.parse(self.local_path(uri)), None
            path = loc.root
        info = loc.info(path)
        if info.type.name == "NotFound":
            raise NotFoundError(f"the image of this id is gone from {uri}", code="image_not_found")
        if info.type.name != "File":
            raise NotFoundError(f"{uri} is not a file", code="image_not_found")
        if info.size is not None and info.size > self.cfg.max_image_bytes:
            raise ImageTooLargeError(f"{uri} is {info.size} bytes; thumbnails are made of images up to "
                                     f"{self.cfg.max_image_bytes} bytes (api.ui.max_image_bytes)")
        return loc.read_bytes(path)

    async def thumbnail(self, uri: str) -> bytes:
        """A JPEG thumbnail of the image at ``uri`` (read and shrunk in a thread, ``max_concurrent`` at a time)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.cfg.max_concurrent)
        if not uri.startswith("s3://"):
            self.local_path(uri)  # refused before it queues
        async with self._slots:
            return await asyncio.to_thread(lambda: make_thumbnail(self._read(uri), self.cfg.thumbnail_px,
                                                                  self.limits))

"""Typed errors shared by every Lens component.

Each user-facing error carries a stable ``code`` and the HTTP status the online
API maps it to, so the decoding layer never has to know about HTTP and the HTTP
layer never has to parse messages.
"""

from __future__ import annotations

__all__ = [
    "LensError",
    "ConfigError",
    "UnknownModelError",
    "WeightsError",
    "ImageError",
    "InvalidImageError",
    "UnsupportedImageTypeError",
    "ImageTooLargeError",
    "IndexCorruptError",
    "ModelMismatchError",
    "NotFoundError",
    "InvalidRequestError",
    "OverloadedError",
    "ModelError",
    "RequestFailed",
    "lens_error_of",
    "error_body",
]


def error_body(code: str, message: str, status: int) -> dict:
    """Lens's one error shape, for every error answer and every failed item: ``{error, message, status}``."""
    return {"error": code, "message": message, "status": status}


class LensError(Exception):
    """Base class for every error Lens raises on purpose."""

    code: str = "lens_error"
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.http_status = status

    @property
    def status(self) -> int:
        return self.http_status

    def __reduce__(self):  # pickles with its code and status (errors cross Ray Serve handles)
        return _rebuild, (type(self), self.message, self.code, self.http_status)

    def to_dict(self) -> dict:
        return error_body(self.code, self.message, self.http_status)


def _rebuild(cls, message: str, code: str, status: int) -> "LensError":
    e = cls.__new__(cls)
    LensError.__init__(e, message, code=code, status=status)
    return e


def lens_error_of(exc: BaseException) -> "LensError | None":
    """The :class:`LensError` an exception is or wraps (Ray re-raises a replica's error wrapped in a
    ``RayTaskError`` that is also an instance of it, with the original as ``cause``); else ``None``."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, LensError):
        return cause
    return exc if isinstance(exc, LensError) else None


class ConfigError(LensError, ValueError):
    """A configuration value is invalid; raised at start-up, before any model loads."""

    code = "invalid_config"
    http_status = 500


class CorruptFileError(LensError, ValueError):
    """A file Lens reads (a manifest, a pointer) is not what it should be: named in the message."""

    code = "corrupt_file"
    http_status = 500


class UnknownModelError(ConfigError):
    code = "unknown_model"


class WeightsError(LensError):
    """A checkpoint is missing, unreadable, or does not fit the architecture."""

    code = "bad_weights"
    http_status = 500


class ImageError(LensError):
    """Base class for problems with one input image (a client error)."""

    code = "invalid_image"
    http_status = 400


class InvalidImageError(ImageError):
    """Bytes that claim to be an image but cannot be decoded (corrupt, truncated, empty)."""

    code = "invalid_image"
    http_status = 400


class UnsupportedImageTypeError(ImageError):
    """The bytes are not one of the allowed image formats."""

    code = "unsupported_media_type"
    http_status = 415


class ImageTooLargeError(ImageError):
    """Too many bytes, or too many pixels (decompression-bomb guard)."""

    code = "image_too_large"
    http_status = 413


class IndexCorruptError(LensError):
    """An index directory that is incomplete, truncated or fails its checksums: never searched."""

    code = "index_corrupt"
    http_status = 500


class ModelMismatchError(LensError):
    """A query embedded with a model (or preprocessing) other than the one the index was built with."""

    code = "model_mismatch"
    http_status = 409


class NotFoundError(LensError):
    """An id the index does not hold."""

    code = "not_found"
    http_status = 404


class InvalidRequestError(LensError):
    """A request parameter out of its allowed range (a client error)."""

    code = "invalid_request"
    http_status = 400


class OverloadedError(LensError):
    """A model replica (or every pool) is at its queue limit: retry later."""

    code = "overloaded"
    http_status = 503


class ModelError(LensError):
    """The model call failed for a whole batch (a server error; the request may be retried)."""

    code = "model_error"
    http_status = 500


class RequestFailed(LensError):
    """One request's failure as another component reported it (a per-item decode error, an HTTP error answer):
    the code and status are the reporter's."""

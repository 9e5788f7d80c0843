"""Reading request bodies with a hard size limit, and splitting multipart forms.

The limit is checked against ``Content-Length`` before anything is read and again
while a chunked body streams in, so an unbounded body is never buffered.
"""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.requests import Request

from lens.errors import LensError

__all__ = ["HttpError", "BodyTooLarge", "BadRequest", "UnsupportedType", "read_body", "read_images", "read_json"]

IMAGE_TYPES = ("image/", "application/octet-stream")


class HttpError(LensError):
    """A client error in an HTTP request (its body, parameters or state), with its status and a stable code."""

    http_status = 400
    code = "bad_request"


class BodyTooLarge(HttpError):
    http_status = 413
    code = "body_too_large"


class BadRequest(HttpError):
    http_status = 400
    code = "bad_request"


class UnsupportedType(HttpError):
    http_status = 415
    code = "unsupported_media_type"


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise BadRequest(f"invalid Content-Length {length!r}") from None
        if n > limit:
            raise BodyTooLarge(f"body is {n} bytes; the limit is {limit} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_images(request: Request, limit: int, *, field: str = "image", max_items: int = 1) -> list[bytes]:
    """Image bytes from a raw ``image/*`` body or from ``multipart/form-data`` file fields named ``field``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype.startswith(IMAGE_TYPES) or (ctype == "" and max_items == 1):
        if max_items > 1:
            raise UnsupportedType("send several images as multipart/form-data")
        return [await read_body(request, limit)]
    if ctype != "multipart/form-data":
        raise UnsupportedType(
            f"Content-Type {ctype or '(none)'} is not accepted: send image/* (raw bytes) or multipart/form-data "
            f"with file field {field!r}"
        )
    body = await read_body(request, limit)

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    form_request = Request(request.scope, replay)
    try:
        form = await form_request.form(max_files=max_items + 1, max_fields=max_items + 16)
    except Exception as e:  # noqa: BLE001 - a malformed multipart body is the client's error
        raise BadRequest(f"malformed multipart body: {e}") from e
    try:
        files = [v for v in form.getlist(field) if isinstance(v, UploadFile)]
        if not files:
            raise BadRequest(f"multipart body has no file field {field!r}")
        if len(files) > max_items:
            raise BadRequest(f"{len(files)} images in one request; the limit is {max_items}")
        return [await f.read() for f in files]
    finally:
        await form.close()


async def read_json(request: Request, limit: int) -> dict:
    """A JSON object body of at most ``limit`` bytes, sent as ``application/json`` (415 otherwise: a form or a
    text/plain body, which a browser page of another origin can send without a CORS preflight, is not read);
    400 if it is not a JSON object."""
    import json

    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise HttpError(f"send the body as application/json, not {ctype or 'no content type'}", status=415,
                        code="unsupported_media_type")
    raw = await read_body(request, limit)
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise HttpError(f"the body is not valid JSON: {e}") from e
    except RecursionError:
        raise HttpError("the body is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise HttpError("the body must be a JSON object")
    return body

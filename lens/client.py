"""A Python client of the Lens HTTP API: :class:`LensClient` (blocking, ``httpx``) and :class:`AsyncLensClient`
(asyncio, ``aiohttp``), with the same methods, one request plan and one retry policy (``tenacity``) for both.

* ``tag``, ``tag_batch``, ``embed``, ``search`` (by image, id or vector), ``feedback``, ``models``, ``health``;
  images as bytes, a path, or a file object;
* 502, 503 and 504 (the service shedding load, starting, or a replica lost behind the front door) and connection
  errors are retried ``retries`` times (feedback, not idempotent, only on 503: nothing was stored), waiting
  what ``Retry-After`` says (else an exponential backoff from ``backoff_s``), with jitter so clients that were
  refused together do not return together; every other error raises :class:`LensAPIError` with the API's code,
  message and status at once (a 400 is not going to succeed on retry);
* ``timeout_s`` per request; ``api_key`` sent as ``Authorization: Bearer``.

Example::

    from lens.client import LensClient

    lens = LensClient("http://127.0.0.1:8000", api_key="k-...")
    answer = lens.tag("cat.jpg", top_k=3)
    hits = lens.search(id="s3://photos/2026/cat.jpg", k=5)
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import IO, Sequence, Union

from .errors import LensError

__all__ = ["LensClient", "AsyncLensClient", "LensAPIError"]

Image = Union[bytes, bytearray, str, os.PathLike, IO[bytes]]
#: Answers retried (with backoff, honouring Retry-After): the service or its front door could not take the request
#: now (a replica restarting, draining or lost), nothing was done. Every call is retried on them, and on connection
#: errors, except feedback, which is not idempotent: it is retried only on 503, which it answers when nothing was
#: stored.
_RETRY = (502, 503, 504)
_NOT_IDEMPOTENT = {"feedback"}


def _retry(op: str, status: int | None) -> bool:
    """Whether ``op`` is retried after ``status`` (None: a connection error)."""
    if op in _NOT_IDEMPOTENT:
        return status == 503
    return status is None or status in _RETRY


class LensAPIError(LensError):
    """An error answer of the Lens API (``code``, ``message``, ``http_status`` as the API gave them)."""

    code = "api_error"
    http_status = 500


def _bytes(image: Image) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    return image.read()


def _error(status: int, body) -> LensAPIError:
    if isinstance(body, dict) and "error" in body:
        return LensAPIError(str(body.get("message", "")), code=str(body["error"]), status=status)
    return LensAPIError(f"HTTP {status}: {str(body)[:300]}", code="http_error", status=status)


class _Answer(Exception):
    """A call's answer other than 200 (``status`` None: no answer, the service was not reached)."""

    def __init__(self, status: int | None, body, retry_after: str | None) -> None:
        super().__init__(status)
        self.status, self.body, self.retry_after = status, body, retry_after

    def error(self) -> LensAPIError:
        if self.status is None:
            return LensAPIError(str(self.body), code="unreachable", status=503)
        return _error(self.status, self.body)


class _Base:
    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be http(s)://host[:port][/prefix], got {url!r}")
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s, self.retries = timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        """Seconds before retry number ``attempt`` (0-based): Retry-After if given, else exponential; jittered."""
        try:
            base = float(retry_after) if retry_after is not None else self.backoff_s * 2 ** attempt
        except ValueError:
            base = self.backoff_s * 2 ** attempt
        return min(self.max_backoff_s, base) * random.uniform(1.0, 1.5)

    def _policy(self, op: str) -> dict:
        """The one retry policy (tenacity) of both clients, for the attempts after a first answer that asked for a
        retry: which answers are retried, how long to wait (Retry-After, else exponential; jittered), when to stop;
        the last answer is raised as it came. The first attempt goes out without it (the policy's machinery cost
        a third of a loopback call's client time, benchmarks/client.json) and hands over only on such an answer."""
        import tenacity

        return {"stop": tenacity.stop_after_attempt(self.retries), "reraise": True,
                "retry": tenacity.retry_if_exception(lambda e: isinstance(e, _Answer) and _retry(op, e.status)),
                "wait": lambda state: self._wait(state.attempt_number,
                                                 getattr(state.outcome.exception(), "retry_after", None))}

    def _first_wait(self, op: str, answer: "_Answer") -> float:
        """Seconds before the first retry, or raise ``answer`` if it is not retried."""
        if self.retries < 1 or not _retry(op, answer.status):
            raise answer
        return self._wait(0, answer.retry_after)

    @staticmethod
    def _result(status: int, body, retry_after: str | None):
        """The body of a 200, else :class:`_Answer` (retried or raised by the policy)."""
        if status == 200:
            return body
        raise _Answer(status, body, retry_after)

    def _unreachable(self, e: Exception) -> "_Answer":
        return _Answer(None, f"cannot reach {self.url}: {type(e).__name__}: {e}", None)

    @staticmethod
    def _params(**kw) -> dict:
        return {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in kw.items() if v is not None}

    def _plan(self, op: str, *args, **kw) -> tuple[str, str, dict]:
        """(method, path, request keyword arguments) of an operation."""
        head = {"serve_multiplexed_model_id": kw.pop("head")} if kw.get("head") else {}
        kw.pop("head", None)
        if op == "tag":
            (image,) = args
            return "POST", "/v1/tag", {"content": _bytes(image), "headers": {"Content-Type": "application/octet-stream"}
                                       | head, "params": self._params(top_k=kw.get("top_k"),
                                                                      embedding=kw.get("embedding") or None,
                                                                      custom_top_k=kw.get("custom_top_k"))}
        if op == "embed":
            (image,) = args
            return "POST", "/v1/embed", {"content": _bytes(image),
                                         "headers": {"Content-Type": "application/octet-stream"}}
        if op == "tag_batch":
            (images,) = args
            files = [("image", (f"image-{i}", _bytes(im), "application/octet-stream")) for i, im in enumerate(images)]
            return "POST", "/v1/tag:batch", {"files": files, "headers": head,
                                             "params": self._params(top_k=kw.get("top_k"),
                                                                    custom_top_k=kw.get("custom_top_k"))}
        if op == "search":
            image, item_id, vector, vectors = (kw.get(x) for x in ("image", "id", "vector", "vectors"))
            if sum(x is not None for x in (image, item_id, vector, vectors)) != 1:
                raise ValueError("search by exactly one of image=, id=, vector= or vectors=")
            flt = kw.get("filter")
            params = self._params(k=kw.get("k"), param=kw.get("param"),
                                  filter=None if flt is None or vector is not None or vectors is not None
                                  else (flt if isinstance(flt, str) else json.dumps(flt)))
            if image is not None:
                return "POST", "/v1/search", {"content": _bytes(image), "params": params,
                                              "headers": {"Content-Type": "application/octet-stream"}}
            if item_id is not None:
                from urllib.parse import quote

                return "GET", f"/v1/search/{quote(str(item_id), safe='/:@')}", {"params": params}
            body = {"vector": [float(x) for x in vector]} if vector is not None else {
                "vectors": [[float(x) for x in v] for v in vectors]}
            if flt is not None:
                body["filter"] = json.loads(flt) if isinstance(flt, str) else flt
            return "POST", "/v1/search:vector", {"json": body, "params": params}
        if op == "feedback":
            (items,) = args
            return "POST", "/v1/feedback", {"json": {"items": list(items)}}
        if op == "models":
            return "GET", "/v1/models", {}
        if op == "index":
            return "GET", "/v1/index", {}
        if op == "thumbnail":
            from urllib.parse import quote

            (item_id,) = args
            return "GET", f"/v1/thumbnail/{quote(str(item_id), safe='/:@')}", {}
        if op == "health":
            return "GET", "/healthz", {}
        raise ValueError(op)


class LensClient(_Base):
    """Blocking client (one ``httpx.Client``, safe to share between threads; 1.27-1.45x the calls/s of the
    ``requests`` client it replaced, benchmarks/client.json)."""

    def __init__(self, url: str, **kw) -> None:
        import httpx

        super().__init__(url, **kw)
        self.http = httpx.Client(headers=self.headers, timeout=self.timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "LensClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, method: str, path: str, req: dict):
        import httpx

        try:
            r = self.http.request(method, self.url + path, **req)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        if r.headers.get("Content-Type", "").startswith("image/"):
            body = r.content
        else:
            try:
                body = r.json()
            except ValueError:
                body = r.text
        return self._result(r.status_code, body, r.headers.get("Retry-After"))

    def _call(self, op: str, *args, **kw):
        import tenacity

        method, path, req = self._plan(op, *args, **kw)
        try:
            try:
                return self._send(method, path, req)
            except _Answer as first:
                time.sleep(self._first_wait(op, first))
            for attempt in tenacity.Retrying(**self._policy(op)):
                with attempt:
                    return self._send(method, path, req)
        except _Answer as e:
            raise e.error() from None
        raise AssertionError("unreachable")

    def tag(self, image: Image, *, top_k: int | None = None, embedding: bool = False, head: str | None = None,
            custom_top_k: int | None = None) -> dict:
        return self._call("tag", image, top_k=top_k, embedding=embedding, head=head, custom_top_k=custom_top_k)

    def tag_batch(self, images: Sequence[Image], *, top_k: int | None = None, head: str | None = None,
                  custom_top_k: int | None = None) -> dict:
        return self._call("tag_batch", images, top_k=top_k, head=head, custom_top_k=custom_top_k)

    def embed(self, image: Image) -> dict:
        return self._call("embed", image)

    def search(self, image: Image | None = None, *, id: str | None = None, vector=None, vectors=None,
               k: int | None = None, param: int | None = None, filter: dict | str | None = None) -> dict:
        """Nearest neighbours of an image, a stored id or vector(s); ``filter`` keeps only the items it matches
        (a dict or its JSON: ``{"tags": "tabby"}``, ``{"id": {"prefix": "s3://b/2026/"}}``, ...)."""
        return self._call("search", image=image, id=id, vector=vector, vectors=vectors, k=k, param=param,
                          filter=filter)

    def feedback(self, items: Sequence[dict]) -> dict:
        return self._call("feedback", items)

    def models(self) -> dict:
        return self._call("models")

    def index(self) -> dict:
        """The served index: version, type, count, dim, delta, model identity."""
        return self._call("index")

    def thumbnail(self, id: str) -> bytes:
        """JPEG bytes of an indexed item's image (the service follows the index's location for it)."""
        return self._call("thumbnail", id)

    def health(self) -> dict:
        return self._call("health")


class AsyncLensClient(_Base):
    """The same API for asyncio (one ``aiohttp`` session: at 32 concurrent calls aiohttp made 10,480 calls/s here
    where httpx's AsyncClient made 671, benchmarks/client.json); use ``async with AsyncLensClient(url) as lens:``."""

    def __init__(self, url: str, **kw) -> None:
        super().__init__(url, **kw)
        self._session = None

    async def __aenter__(self) -> "AsyncLensClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _send(self, method: str, path: str, req: dict):
        import asyncio

        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self.headers,
                                                  timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        req = dict(req)
        if "content" in req:
            req["data"] = req.pop("content")
        if "files" in req:  # multipart, as httpx builds it
            form = aiohttp.FormData()
            for field, (name, data, ctype) in req.pop("files"):
                form.add_field(field, data, filename=name, content_type=ctype)
            req["data"] = form
        try:
            async with self._session.request(method, self.url + path, **req) as r:
                if r.headers.get("Content-Type", "").startswith("image/"):
                    body = await r.read()
                else:
                    try:
                        body = await r.json(content_type=None)
                    except ValueError:
                        body = await r.text()
                return self._result(r.status, body, r.headers.get("Retry-After"))
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
            raise self._unreachable(e) from e

    async def _call(self, op: str, *args, **kw):
        import tenacity

        import asyncio

        method, path, req = self._plan(op, *args, **kw)
        try:
            try:
                return await self._send(method, path, req)
            except _Answer as first:
                await asyncio.sleep(self._first_wait(op, first))
            async for attempt in tenacity.AsyncRetrying(**self._policy(op)):
                with attempt:
                    return await self._send(method, path, req)
        except _Answer as e:
            raise e.error() from None
        raise AssertionError("unreachable")

    async def tag(self, image: Image, *, top_k: int | None = None, embedding: bool = False,
                  head: str | None = None, custom_top_k: int | None = None) -> dict:
        return await self._call("tag", image, top_k=top_k, embedding=embedding, head=head, custom_top_k=custom_top_k)

    async def tag_batch(self, images: Sequence[Image], *, top_k: int | None = None, head: str | None = None,
                        custom_top_k: int | None = None) -> dict:
        return await self._call("tag_batch", images, top_k=top_k, head=head, custom_top_k=custom_top_k)

    async def embed(self, image: Image) -> dict:
        return await self._call("embed", image)

    async def search(self, image: Image | None = None, *, id: str | None = None, vector=None, vectors=None,
                     k: int | None = None, param: int | None = None, filter: dict | str | None = None) -> dict:
        return await self._call("search", image=image, id=id, vector=vector, vectors=vectors, k=k, param=param,
                                filter=filter)

    async def feedback(self, items: Sequence[dict]) -> dict:
        return await self._call("feedback", items)

    async def models(self) -> dict:
        return await self._call("models")

    async def index(self) -> dict:
        return await self._call("index")

    async def thumbnail(self, id: str) -> bytes:
        return await self._call("thumbnail", id)

    async def health(self) -> dict:
        return await self._call("health")

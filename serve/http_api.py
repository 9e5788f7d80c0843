"""The HTTP API, written once and mounted on either deployment that serves HTTP.

Routes: ``POST /v1/tag``, ``POST /v1/embed``, ``POST /v1/tag:batch``, ``POST /v1/search`` (image),
``GET /v1/search/{id}``, ``POST /v1/search:vector``, ``GET /v1/index``, ``GET /v1/thumbnail/{id}``,
``POST /v1/feedback``, ``GET /healthz``, ``GET /v1/models``; the search page ``GET /ui``.
Every error is JSON:
``{"error": code, "message": ..., "status": ...}``.

:class:`HttpApi` holds the routes; a deployment class mixes it in and says how a
request reaches a model (:meth:`HttpApi._dispatch`): directly, when the HTTP
replica is itself the model replica (one hop from Serve's proxy), or through
deployment handles to one or more model pools.
"""

# No `from __future__ import annotations` here: FastAPI must see the real Request type on the methods.
import asyncio
import hashlib
import logging
import math
import time
import types
import uuid
from typing import Any, Awaitable, Callable, Optional

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lens.errors import LensError, error_body, lens_error_of
from lens.index.filters import parse_filter
from lens.runtime.config import validate
from lens.runtime.predictor import check_top_k

from .auth import ApiKeys
from .body import HttpError, read_images, read_json
from .config import ApiConfig, FeedbackConfig
from .feedback import FeedbackSink, parse_feedback
from .frontdoor import RECEIVED_HEADER
from .logs import to_replica_log
from .metrics import FeedbackMetrics, IngressMetrics
from .schemas import BODY_MODELS, route_docs
from .thumbnails import Thumbnails
from .ui import API_CSP, ui_csp, ui_page

__all__ = ["HttpApi", "new_fastapi"]

logger = logging.getLogger("lens.serve")


def _shown(exc: BaseException) -> LensError | None:
    """The :class:`LensError` a client may see for ``exc``: a client error, or a 503 (retry later). ``None`` for a
    server fault, whose details stay in the log."""
    e = lens_error_of(exc)
    return e if e is not None and (e.http_status < 500 or e.http_status == 503) else None


def _custom(result: dict) -> dict:
    """``custom_tags`` (head name -> tags above threshold) when the pool serves heads, and the per-request head."""
    return {k: result[k] for k in ("custom_tags", "head") if k in result}


#: The header that picks a per-request custom head (Serve's model-multiplexing header).
HEAD_HEADER = "serve_multiplexed_model_id"


def _receipt(data: bytes) -> dict:
    """What a client echoes in /v1/feedback: the image's SHA-256 and when it was answered."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "predicted_at": round(time.time(), 3)}


def _head(request: Request) -> Optional[str]:
    return request.headers.get(HEAD_HEADER) or None


def _item_error(exc: BaseException, route: str) -> dict:
    """One item's failure inside a batch answer, in the error shape (a server fault without its internals)."""
    e = _shown(exc)
    if e is None:
        logger.error("%s: item failed", route, exc_info=exc)
        return error_body("internal_error", "internal error; see the server log", 500)
    return e.to_dict()


def error(status: int, code: str, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, status), status_code=status, headers=headers)


def _gate_watcher(in_flight):
    """This ingress replica's watch on its application's drain gate (:mod:`lens.serve.drain`); None outside Serve."""
    try:
        ctx = serve.get_replica_context()
    except Exception:  # noqa: BLE001 - outside a Serve replica (unit tests): no drain
        return None
    from .drain import GateWatcher

    return GateWatcher(ctx.app_name, ctx.deployment, ctx.replica_id.unique_id, in_flight)


def internal_error(route: str) -> JSONResponse:
    """A 500 that tells the client nothing of the server's insides: the details go to the log under a reference."""
    ref = uuid.uuid4().hex[:12]
    logger.exception("request to %s failed (reference %s)", route, ref)
    return error(500, "internal_error", f"internal error (reference {ref}); the server log has the details")


#: The largest vector dimension /v1/search:vector accepts before it asks the index (EfficientNet-B7: 2560).
MAX_VECTOR_DIM = 8192


#: the ``filter`` query parameter, as the API docs show it
FILTER_DOC = ('a JSON filter over the items\' metadata, e.g. {"tags": "tabby"}, {"category": {"in": ["a", "b"]}}, '
              '{"indexed_at": {"gte": 1764547200}}, {"id": {"prefix": "s3://photos/2026/"}}, combined with and/or/not '
              '(docs/how-to/search.md#filtered-search); a bad filter is a 400 naming the problem')


def parse_vectors(body: dict, max_items: int) -> tuple[np.ndarray, bool]:
    """``{"vector": [...]}`` or ``{"vectors": [[...], ...]}`` as a finite (n, d) float32 array, and whether it was
    one vector; anything else is an :class:`HttpError` (400, or 413 for too many vectors) naming what is wrong."""
    single = "vector" in body
    vectors = [body["vector"]] if single else body.get("vectors")
    if not isinstance(vectors, list) or not vectors or not all(isinstance(v, list) and v for v in vectors):
        raise HttpError('send {"vector": [floats]} or {"vectors": [[floats], ...]}', code="invalid_vector")
    if len(vectors) > max_items:
        raise HttpError(f"at most {max_items} vectors per request, got {len(vectors)}", status=413,
                        code="too_many_items")
    dim = len(vectors[0])
    for i, v in enumerate(vectors):
        if len(v) != dim or dim > MAX_VECTOR_DIM:
            raise HttpError(f"vector {i} has {len(v)} numbers; every vector needs the same dimension "
                            f"(at most {MAX_VECTOR_DIM})", code="invalid_vector")
        for x in v:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise HttpError(f"vector {i} holds {str(x)[:40]!r}; vectors must be finite numbers",
                                code="invalid_vector")
    return np.asarray(vectors, dtype=np.float32), single


class HttpApi:
    """Route handlers. Subclasses implement ``_dispatch``, ``_infos`` and ``_pool_names``."""

    def _init_http(self, api_config: dict, search=None, feedback: Optional[dict] = None) -> None:
        to_replica_log()
        self.api_cfg = validate(ApiConfig, api_config, where="api config")
        self.feedback = None if feedback is None else FeedbackSink(
            validate(FeedbackConfig, feedback, where="feedback config"), FeedbackMetrics())
        self.search = search  # a handle to the IndexSearcher deployment, or None
        self.thumbnails = Thumbnails(self.api_cfg.ui)
        self.keys = ApiKeys.load(self.api_cfg.api_keys_env, self.api_cfg.api_keys_file)
        self.http_metrics = IngressMetrics()
        self._model_names: dict = {}
        self._http_in_flight = 0
        self._gate = _gate_watcher(lambda: self._http_in_flight)

    # -- to implement ------------------------------------------------------------------------
    async def _dispatch(self, method: str, args: tuple, pool: Optional[str], head: Optional[str] = None) -> Any:
        raise NotImplementedError

    async def _infos(self) -> list:
        raise NotImplementedError

    def _pool_names(self) -> list:
        raise NotImplementedError

    # -- plumbing ----------------------------------------------------------------------------
    def _authorised(self, request: Request) -> bool:
        """With keys configured: an ``Authorization`` header, when sent, is the only credential read (it must be
        ``Bearer KEY``); ``X-API-Key`` is read only when there is no ``Authorization`` header."""
        if not self.keys.enabled:
            return True
        auth = request.headers.get("authorization")
        if auth is not None:
            key = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        else:
            key = request.headers.get("x-api-key")
        return self.keys.check(key)

    def _unauthorised(self) -> JSONResponse:
        return error(401, "unauthorized", "missing or wrong API key (Authorization: Bearer KEY or X-API-Key)",
                     headers={"WWW-Authenticate": "Bearer"})

    async def _handle(self, request: Request, route: str,
                      work: Callable[[Optional[str]], Awaitable[dict]]) -> JSONResponse:
        t0 = time.perf_counter()
        self._http_in_flight += 1  # counted before the drain check: a request past it is waited for
        try:
            if self._gate is not None and self._gate.refuses(request.headers.get(RECEIVED_HEADER)):
                resp = error(503, "draining", "this server is shutting down; retry (another replica or server "
                             "answers)", headers={"Retry-After": str(self.api_cfg.retry_after_s)})
            else:
                resp = await self._guarded(request, route, work, t0)
        finally:
            self._http_in_flight -= 1
        self.http_metrics.latency.observe((time.perf_counter() - t0) * 1000,
                                          tags={"route": route, "status": str(resp.status_code)})
        if resp.status_code >= 400:
            self.http_metrics.errors.inc(tags={"route": route, "kind": str(resp.status_code)})
        return resp

    async def _guarded(self, request: Request, route: str, work, t0: float) -> JSONResponse:
        if not self._authorised(request):
            return self._unauthorised()
        pool = request.query_params.get("pool")
        if pool is not None and pool not in self._pool_names():
            return error(400, "unknown_pool", f"unknown pool {pool!r}; pools: {', '.join(self._pool_names())}")
        try:
            body = await asyncio.wait_for(work(pool), timeout=self.api_cfg.request_timeout_s)
        except asyncio.TimeoutError:
            return error(504, "timeout", f"no result within {self.api_cfg.request_timeout_s}s")
        except ClientDisconnect:  # the client went away mid-body: one line, no traceback (499, as nginx logs it)
            logger.info("%s: the client disconnected before its request was read", route)
            return error(499, "client_closed_request", "the client disconnected")
        except Exception as exc:  # noqa: BLE001 - every failure becomes the JSON error here, and only here
            e = _shown(exc)
            if e is None:
                return internal_error(route)  # no internals to the client; the reference is in the log
            headers = {"Retry-After": str(self.api_cfg.retry_after_s)} if e.http_status == 503 else None
            return error(e.http_status, e.code, e.message, headers=headers)
        if isinstance(body, Response):  # an image or a redirect (thumbnails)
            return body
        if route not in ("/v1/embed", "/v1/search:vector", "/v1/index"):
            body["latency_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return JSONResponse(body)

    def _top_k(self, top_k: Optional[int]) -> int:
        return check_top_k(self.api_cfg.default_top_k if top_k is None else top_k, self.api_cfg.max_top_k)

    def _custom_top_k(self, custom_top_k: Optional[int]) -> Optional[int]:
        """None: the pool's default (thresholded custom tags, or its model.custom_top_k); else checked like top_k."""
        return None if custom_top_k is None else check_top_k(custom_top_k, self.api_cfg.max_top_k)

    async def _vocabulary(self) -> dict:
        """The class names and versions the pools serve (what feedback metrics may use as label values), asked
        at most every 30 s."""
        now = time.monotonic()
        cached = getattr(self, "_vocab", None)
        if cached is None or now - cached[0] > 30.0:
            labels, versions = set(), set()
            for name in self._pool_names():
                try:
                    v = await self._dispatch("vocabulary", (), name)
                except Exception:  # noqa: BLE001 - a pool that cannot answer adds nothing: its strings count as other
                    continue
                labels |= set(v["labels"])
                versions |= set(v["versions"])
            cached = (now, {"labels": labels, "versions": versions})
            self._vocab = cached
        return cached[1]

    async def _model_info(self, pool: Optional[str]) -> dict:
        name = pool or self._pool_names()[0]
        if name not in self._model_names:
            self._model_names[name] = await self._dispatch("info", (), name)
        return self._model_names[name]

    async def _model_name(self, pool: Optional[str]) -> str:
        return (await self._model_info(pool))["model"]

    async def _index_identity(self) -> dict:
        """The served index's model identity (cached for a second: indexes swap every refresh_s at most)."""
        now = time.monotonic()
        cached = getattr(self, "_index_ident", None)
        if cached is None or now - cached[0] > 1.0:
            cached = (now, (await self.search.info.remote())["model_identity"])
            self._index_ident = cached
        return cached[1]

    def _search_args(self, k: Optional[int], param: Optional[int]) -> tuple:
        if self.search is None:
            raise HttpError("similarity search is not configured on this service (app args `search:`)",
                            status=404, code="search_not_configured")
        k = 10 if k is None else k  # its range is the searcher's (SearchConfig.max_k), checked there once
        if param is not None and param < 1:
            raise HttpError(f"param (nprobe/efSearch) must be >= 1, got {param}")
        return k, param

    # -- routes ------------------------------------------------------------------------------
    async def http_tag(self, request: Request, top_k: Optional[int] = Query(None),
                       embedding: bool = Query(False), custom_top_k: Optional[int] = Query(None)) -> JSONResponse:
        async def work(pool):
            k, ck = self._top_k(top_k), self._custom_top_k(custom_top_k)
            (data,) = await read_images(request, self.api_cfg.max_body_bytes)
            result = await self._dispatch("tag", (data, k, embedding, None, ck), pool, _head(request))
            body = {"model": result["model"], "version": result.get("version"), "tags": result["tags"]} | \
                _custom(result) | _receipt(data)
            if embedding:  # with the identity of the version that made it (what an embedding part records)
                body["embedding"] = [float(x) for x in result["embedding"]]
                body["model_identity"] = result["model_identity"]
            return body

        return await self._handle(request, "/v1/tag", work)

    async def http_embed(self, request: Request) -> JSONResponse:
        async def work(pool):
            (data,) = await read_images(request, self.api_cfg.max_body_bytes)
            result = await self._dispatch("tag", (data, 1, True), pool)
            emb = result["embedding"]
            return {"model": result["model"], "version": result.get("version"), "dim": int(len(emb)),
                    "embedding": [float(x) for x in emb]}

        return await self._handle(request, "/v1/embed", work)

    async def http_tag_batch(self, request: Request, top_k: Optional[int] = Query(None),
                             custom_top_k: Optional[int] = Query(None)) -> JSONResponse:
        async def work(pool):
            k, ck = self._top_k(top_k), self._custom_top_k(custom_top_k)
            images = await read_images(request, self.api_cfg.max_batch_body_bytes,
                                       max_items=self.api_cfg.max_batch_items)
            for i, img in enumerate(images):
                if len(img) > self.api_cfg.max_body_bytes:
                    raise HttpError(f"image {i} is {len(img)} bytes; the per-image limit is "
                                    f"{self.api_cfg.max_body_bytes}", status=413, code="image_too_large")
            head = _head(request)
            results = await asyncio.gather(*(self._dispatch("tag", (img, k, False, None, ck), pool, head)
                                             for img in images),
                                           return_exceptions=True)
            out = [{"index": i} | (_item_error(r, "/v1/tag:batch") if isinstance(r, BaseException)
                                   else {"tags": r["tags"], "version": r.get("version")} | _custom(r)
                                   | _receipt(images[i])) for i, r in enumerate(results)]
            return {"model": await self._model_name(pool), "results": out}

        return await self._handle(request, "/v1/tag:batch", work)

    async def http_search_image(self, request: Request, k: Optional[int] = Query(None),
                                param: Optional[int] = Query(None),
                                filter: Optional[str] = Query(None, description=FILTER_DOC)) -> JSONResponse:
        async def work(pool):
            kk, p = self._search_args(k, param)
            parse_filter(filter)  # checked before the image is embedded; the searcher reads it again
            (data,) = await read_images(request, self.api_cfg.max_body_bytes)
            # embed with the version the index was built with (a pool keeps it loaded until the next index)
            index_identity = await self._index_identity()
            result = await self._dispatch("tag", (data, 1, True, index_identity), pool)
            out = await self.search.search_vectors.remote([list(map(float, result["embedding"]))], kk, p,
                                                          result["model_identity"], filter)
            return {"results": out["results"][0], "index_version": out["index_version"],
                    "model": result["model"], "version": result.get("version")}

        return await self._handle(request, "/v1/search", work)

    async def http_search_id(self, request: Request, item_id: str, k: Optional[int] = Query(None),
                             param: Optional[int] = Query(None),
                             filter: Optional[str] = Query(None, description=FILTER_DOC)) -> JSONResponse:
        async def work(pool):
            kk, p = self._search_args(k, param)
            parse_filter(filter)  # a bad filter is the ingress's 400, before a handle
            return await self.search.search_id.remote(item_id, kk, p, filter)

        return await self._handle(request, "/v1/search/{id}", work)

    async def http_search_vector(self, request: Request, k: Optional[int] = Query(None),
                                 param: Optional[int] = Query(None),
                                 filter: Optional[str] = Query(None, description=FILTER_DOC)) -> JSONResponse:
        async def work(pool):
            kk, p = self._search_args(k, param)
            body = await read_json(request, self.api_cfg.max_batch_body_bytes)
            vectors, single = parse_vectors(body, self.api_cfg.max_batch_items)  # checked before any handle
            flt = body.get("filter") if isinstance(body, dict) and "filter" in body else filter
            parse_filter(flt)
            out = await self.search.search_vectors.remote(vectors, kk, p, None, flt)
            return {"results": out["results"][0] if single else out["results"],
                         "index_version": out["index_version"]}

        return await self._handle(request, "/v1/search:vector", work)

    async def http_index(self, request: Request) -> JSONResponse:
        async def work(pool):
            self._search_args(None, None)
            info = await self.search.info.remote()
            return {k: info[k] for k in ("index_version", "type", "count", "dim", "delta", "model_identity")}

        return await self._handle(request, "/v1/index", work)

    async def http_thumbnail(self, request: Request, item_id: str, as_url: bool = Query(False)) -> Response:
        """The image of an indexed id, shrunk (or a redirect to a presigned URL of the original; with
        ``as_url=true``, that URL as ``{"url"}``, for a page that sets it as an image's source)."""
        async def work(pool):
            self._search_args(None, None)
            if self.api_cfg.ui.thumbnails == "off":
                raise HttpError("thumbnails are off on this service (api.ui.thumbnails)", status=404,
                                code="thumbnails_off")
            uri = await self.search.locate.remote(item_id)
            if uri.startswith("s3://") and self.api_cfg.ui.thumbnails == "presign":
                url = await asyncio.to_thread(self.thumbnails.presigned_url, uri)
                return JSONResponse({"url": url}) if as_url else RedirectResponse(url, status_code=307)
            jpeg = await self.thumbnails.thumbnail(uri)
            return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

        return await self._handle(request, "/v1/thumbnail/{id}", work)

    async def http_ui(self, request: Request) -> HTMLResponse:
        """The search page: static, so it needs no key itself; its API calls send the key the user types."""
        if not self.api_cfg.ui.enabled:
            return error(404, "ui_off", "the search page is off on this service (api.ui.enabled)")
        return HTMLResponse(ui_page(), headers={"Cache-Control": "no-cache"})

    async def http_feedback(self, request: Request) -> JSONResponse:
        """Labeled feedback: one item or ``{"items": [...]}``, each ``{"sha256"|"id", "labels", "predicted",
        "version", "predicted_at"}`` (echo the /v1/tag answer); answered once durably stored."""
        async def work(pool):
            if self.feedback is None:
                raise HttpError("feedback is not configured on this service (app args `feedback:`)", status=404,
                                code="feedback_not_configured")
            rows = parse_feedback(await read_json(request, self.api_cfg.max_batch_body_bytes), self.feedback.cfg)
            self.feedback.vocabulary = await self._vocabulary()
            await self.feedback.write(rows)
            return {"stored": len(rows)}

        return await self._handle(request, "/v1/feedback", work)

    async def _answer_within(self, what: str, awaitable, timeout: float):
        """The answer of ``awaitable``; a 503 ``not_ready`` :class:`HttpError` naming ``what`` if it fails or takes
        longer than ``timeout``."""
        try:
            return await asyncio.wait_for(awaitable, timeout=timeout)
        except asyncio.TimeoutError:
            raise HttpError(f"{what} did not answer within {timeout:g}s (starting, or not placed: see `serve status`)",
                            status=503, code="not_ready") from None
        except Exception as e:  # noqa: BLE001 - any failure means not ready
            logger.warning("health check: %s not ready: %s", what, e)
            raise HttpError(f"{what}: not ready", status=503, code="not_ready") from None

    async def http_healthz(self) -> JSONResponse:
        """200 only when every model pool is warm and the index searcher (if configured) answers; otherwise a
        503 within ``health_timeout_s``, naming what is not ready. Never needs an API key (load balancers)."""
        timeout = self.api_cfg.health_timeout_s
        if self._gate is not None and self._gate.draining:  # a load balancer takes this server out first
            return error(503, "draining", "this server is shutting down",
                         headers={"Retry-After": str(self.api_cfg.retry_after_s)})
        try:
            infos = await self._answer_within("model pools", self._infos(), timeout)
            if not infos or not all(i.get("warmed_up") for i in infos):
                raise HttpError("model not warmed up", status=503, code="not_ready")
            if self.search is not None:
                await self._answer_within("the index searcher", self.search.info.remote(), timeout)
        except HttpError as e:
            return error(e.status, e.code, e.message)
        return JSONResponse({"status": "ok", "pools": {i["pool"]: i["model"] for i in infos}})

    def _docs_allowed(self, request: Request) -> bool:
        return self.api_cfg.public_docs or self._authorised(request)

    async def http_models(self, request: Request) -> JSONResponse:
        if not self._docs_allowed(request):
            return self._unauthorised()
        return JSONResponse({"pools": await self._infos()})

    async def http_openapi(self, request: Request) -> JSONResponse:
        if not self._docs_allowed(request):
            return self._unauthorised()
        return JSONResponse(request.app.openapi())

    async def http_docs(self, request: Request) -> HTMLResponse:
        if not self._docs_allowed(request):
            return self._unauthorised()
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json",
                                   title="Lens API")

    async def http_redoc(self, request: Request) -> HTMLResponse:
        if not self._docs_allowed(request):
            return self._unauthorised()
        return get_redoc_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json", title="Lens API")


def _own_copy(fn: Callable) -> Callable:
    """A distinct function object with the same code and name.

    ``serve.ingress`` rewrites each route's signature in place and pickles the app;
    a copy per app keeps apps from sharing that state, and (not being reachable as
    ``HttpApi.<name>``) it is pickled by value, rewritten signature included.
    """
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__module__ = fn.__module__
    copy.__annotations__ = dict(fn.__annotations__)
    copy.__doc__ = fn.__doc__
    return copy


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 413: "body_too_large", 415: "unsupported_media_type"}


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own 404/405 (unknown route or method) in Lens's error shape."""
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = (f"no route {request.method} {request.url.path}" if exc.status_code == 404 else
               f"{request.method} is not allowed on {request.url.path}" if exc.status_code == 405 else
               str(exc.detail))
    return error(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A query or path parameter of the wrong type: 400 naming the parameter and the value, not FastAPI's 422."""
    problems = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        where = f"{loc[0]} parameter {'.'.join(loc[1:])}" if len(loc) > 1 else ".".join(loc) or "request"
        got = f" (got {str(err['input'])[:60]!r})" if "input" in err and err["input"] is not None else ""
        problems.append(f"{where}: {err.get('msg', 'invalid')}{got}")
    return error(400, "bad_request", "; ".join(problems) or "invalid request")


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    return internal_error(request.url.path)


def new_fastapi() -> FastAPI:
    """A FastAPI app with :class:`HttpApi`'s routes (one app per deployment class).

    FastAPI's own docs routes are off; ``/docs``, ``/redoc`` and ``/openapi.json`` are Lens routes that ask for an
    API key when keys are configured (unless ``api.public_docs``). Every error, FastAPI's and Starlette's included,
    answers ``{"error", "message", "status"}``."""
    api = FastAPI(title="Lens", version="1", description="EfficientNet image tagging, embedding and search",
                  docs_url=None, redoc_url=None, openapi_url=None)
    api.add_exception_handler(StarletteHTTPException, _http_exception)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(Exception, _unhandled)
    docs = route_docs()
    api.post("/v1/tag", **docs["/v1/tag"])(_own_copy(HttpApi.http_tag))
    api.post("/v1/embed", **docs["/v1/embed"])(_own_copy(HttpApi.http_embed))
    api.post("/v1/tag:batch", **docs["/v1/tag:batch"])(_own_copy(HttpApi.http_tag_batch))
    api.post("/v1/search", **docs["/v1/search"])(_own_copy(HttpApi.http_search_image))
    api.post("/v1/search:vector", **docs["/v1/search:vector"])(_own_copy(HttpApi.http_search_vector))
    api.post("/v1/feedback", **docs["/v1/feedback"])(_own_copy(HttpApi.http_feedback))
    api.get("/v1/search/{item_id:path}", **docs["/v1/search/{item_id:path}"])(_own_copy(HttpApi.http_search_id))
    api.get("/v1/thumbnail/{item_id:path}", **docs["/v1/thumbnail/{item_id:path}"])(
        _own_copy(HttpApi.http_thumbnail))
    api.get("/v1/index", **docs["/v1/index"])(_own_copy(HttpApi.http_index))
    api.get("/ui", include_in_schema=False)(_own_copy(HttpApi.http_ui))
    api.get("/healthz", **docs["/healthz"])(_own_copy(HttpApi.http_healthz))
    api.get("/v1/models", **docs["/v1/models"])(_own_copy(HttpApi.http_models))
    api.get("/openapi.json", include_in_schema=False)(_own_copy(HttpApi.http_openapi))
    api.get("/docs", include_in_schema=False)(_own_copy(HttpApi.http_docs))
    api.get("/redoc", include_in_schema=False)(_own_copy(HttpApi.http_redoc))
    api.openapi = lambda: _openapi(api)
    api.add_middleware(_SecurityHeaders)
    return api


class _SecurityHeaders:
    """Every answer: ``nosniff`` and no framing; API answers a CSP that allows nothing, the search page its own
    hashed CSP (:func:`lens.serve.ui.ui_csp`). The docs pages (FastAPI's, which load their script from a CDN) get no CSP.
    A plain ASGI middleware: it adds headers and never buffers or reads a body."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        csp = ui_csp() if path.endswith("/ui") else None if path.endswith(("/docs", "/redoc")) else API_CSP

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY")]
                if csp:
                    headers.append((b"content-security-policy", csp.encode()))
                message = dict(message, headers=headers)
            await send(message)

        await self.app(scope, receive, with_headers)


def _openapi(api: FastAPI) -> dict:
    """FastAPI's schema, plus the models that only request bodies refer to (so every $ref resolves)."""
    if api.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for ops in schema.get("paths", {}).values():  # Lens answers a bad parameter with 400, never FastAPI's 422
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            comps.pop(name, None)
        for model in BODY_MODELS:
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, d in js.pop("$defs", {}).items():
                comps.setdefault(name, d)
            comps.setdefault(model.__name__, js)
        api.openapi_schema = schema
    return api.openapi_schema

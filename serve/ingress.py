"""The HTTP ingress: a FastAPI app on Ray Serve in front of the model pools.

Routes: ``POST /v1/tag``, ``POST /v1/embed``, ``POST /v1/tag:batch``,
``GET /healthz``, ``GET /v1/models``. Every error is JSON:
``{"error": code, "message": ..., "status": ...}``.
"""


import asyncio
import logging
import time

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from lens.config import validate

from .auth import ApiKeys
from .body import HttpError, read_images
from .config import ApiConfig
from .metrics import IngressMetrics

__all__ = ["LensIngress", "api"]

logger = logging.getLogger("lens.serve.ingress")

api = FastAPI(title="Lens", version="1", description="EfficientNet image tagging, embedding and search")


class Overloaded(Exception):
    pass


def error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, "status": status}, status_code=status, headers=headers)


@serve.deployment(
    name="LensIngress",
    max_ongoing_requests=256,
    max_queued_requests=512,
    ray_actor_options={"num_cpus": 0},
)
@serve.ingress(api)
class LensIngress:
    def __init__(self, api_config: dict, pools: dict[str, DeploymentHandle]) -> None:
        self.cfg = validate(ApiConfig, api_config, where="ingress args")
        self.keys = ApiKeys.load(self.cfg.api_keys_env, self.cfg.api_keys_file)
        self.pools = pools  # ordered: the first pool that accepts a request gets it
        self.metrics = IngressMetrics()
        self._names: dict[str, str] = {}  # pool -> model name, learnt on first use
        logger.info("ingress ready: pools=%s auth=%s", list(pools), "on" if self.keys.enabled else "off")

    # -- plumbing ----------------------------------------------------------------------------
    def _authorised(self, request: Request) -> bool:
        if not self.keys.enabled:
            return True
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
        return self.keys.check(key)

    async def _call_pool(self, method: str, *args, pool: str | None = None):
        """Send to the first pool with room; a full pool (BackPressureError) overflows to the next."""
        names = [pool] if pool else list(self.pools)
        for name in names:
            try:
                return await getattr(self.pools[name], method).remote(*args)
            except BackPressureError:
                continue
        raise Overloaded(f"all model pools are at capacity ({', '.join(names)})")

    async def _handle(self, request: Request, route: str, work) -> JSONResponse:
        t0 = time.perf_counter()
        resp = await self._guarded(request, route, work, t0)
        self.metrics.latency.observe((time.perf_counter() - t0) * 1000,
                                     tags={"route": route, "status": str(resp.status_code)})
        if resp.status_code >= 400:
            self.metrics.errors.inc(tags={"route": route, "kind": str(resp.status_code)})
        return resp

    async def _guarded(self, request: Request, route: str, work, t0: float) -> JSONResponse:
        if not self._authorised(request):
            return error(401, "unauthorized", "missing or wrong API key (Authorization: Bearer KEY or X-API-Key)",
                         headers={"WWW-Authenticate": "Bearer"})
        pool = request.query_params.get("pool")
        if pool is not None and pool not in self.pools:
            return error(400, "unknown_pool", f"unknown pool {pool!r}; pools: {', '.join(self.pools)}")
        try:
            status, body = await asyncio.wait_for(work(pool), timeout=self.cfg.request_timeout_s)
        except HttpError as e:
            return error(e.status, e.code, e.message)
        except Overloaded as e:
            return error(503, "overloaded", str(e), headers={"Retry-After": str(self.cfg.retry_after_s)})
        except asyncio.TimeoutError:
            return error(504, "timeout", f"no result within {self.cfg.request_timeout_s}s")
        if status == 200 and route != "/v1/embed":
            body["latency_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return JSONResponse(body, status_code=status)

    def _top_k(self, top_k: int | None) -> int:
        k = top_k or self.cfg.default_top_k
        if not 1 <= k <= self.cfg.max_top_k:
            raise HttpError(f"top_k must be in 1..{self.cfg.max_top_k}, got {k}")
        return k

    @staticmethod
    def _result(result: dict, model: str) -> tuple[int, dict]:
        if "error" in result:
            return result["status"], result
        return 200, {"model": model} | result

    async def _model_name(self, pool: str | None) -> str:
        name = pool or next(iter(self.pools))
        if name not in self._names:
            self._names[name] = (await self.pools[name].info.remote())["model"]
        return self._names[name]

    # -- routes ------------------------------------------------------------------------------
    @api.post("/v1/tag")
    async def tag(self, request: Request, top_k: int | None = Query(None)) -> JSONResponse:
        async def work(pool):
            k = self._top_k(top_k)
            (data,) = await read_images(request, self.cfg.max_body_bytes)
            result = await self._call_pool("tag", data, k, False, pool=pool)
            return self._result(result, await self._model_name(pool))

        return await self._handle(request, "/v1/tag", work)

    @api.post("/v1/embed")
    async def embed(self, request: Request) -> JSONResponse:
        async def work(pool):
            (data,) = await read_images(request, self.cfg.max_body_bytes)
            result = await self._call_pool("tag", data, 1, True, pool=pool)
            if "error" in result:
                return result["status"], result
            emb = result["embedding"]
            return 200, {"model": await self._model_name(pool), "dim": int(len(emb)),
                         "embedding": [float(x) for x in emb]}

        return await self._handle(request, "/v1/embed", work)

    @api.post("/v1/tag:batch")
    async def tag_batch(self, request: Request, top_k: int | None = Query(None)) -> JSONResponse:
        async def work(pool):
            k = self._top_k(top_k)
            images = await read_images(request, self.cfg.max_batch_body_bytes, max_items=self.cfg.max_batch_items)
            for i, img in enumerate(images):
                if len(img) > self.cfg.max_body_bytes:
                    raise HttpError(f"image {i} is {len(img)} bytes; the per-image limit is "
                                    f"{self.cfg.max_body_bytes}", status=413, code="image_too_large")
            results = await asyncio.gather(*(self._call_pool("tag", img, k, False, pool=pool) for img in images))
            model = await self._model_name(pool)
            out = []
            for i, r in enumerate(results):
                out.append({"index": i} | (r if "error" in r else {"tags": r["tags"]}))
            return 200, {"model": model, "results": out}

        return await self._handle(request, "/v1/tag:batch", work)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            infos = await asyncio.wait_for(
                asyncio.gather(*(h.info.remote() for h in self.pools.values())), timeout=10)
        except Exception as e:  # noqa: BLE001 - any failure means not ready
            return error(503, "not_ready", f"model pools not ready: {type(e).__name__}: {e}")
        if not all(i.get("warmed_up") for i in infos):
            return error(503, "not_ready", "model not warmed up")
        return JSONResponse({"status": "ok", "pools": {i["pool"]: i["model"] for i in infos}})

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        infos = await asyncio.gather(*(h.info.remote() for h in self.pools.values()))
        return JSONResponse({"pools": infos})

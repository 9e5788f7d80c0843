"""The Ray Serve deployments of the Lens app.

* :class:`TaggerIngress`: HTTP API and model in one replica. Serve's proxy reaches
  the model in one hop; this is the default (one pool).
* :class:`Tagger`: a model pool reached by handle (from :class:`LensIngress`, the
  event consumer, or search).
* :class:`LensIngress`: HTTP API in front of several pools (say GPU first, CPU as
  overflow); a pool at its queue limit passes the request to the next.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from lens.errors import OverloadedError, lens_error_of

from .config import MODEL_MAX_ONGOING_REQUESTS
from .core import TaggerCore
from .http_api import HttpApi, new_fastapi

__all__ = ["Tagger", "TaggerIngress", "LensIngress"]

logger = logging.getLogger("lens.serve")

# Model replicas: batches fill only if max_ongoing_requests >= max_batch_size (checked before deploying).
_MODEL_OPTIONS = dict(
    max_ongoing_requests=MODEL_MAX_ONGOING_REQUESTS,
    max_queued_requests=256,
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=20,
    ray_actor_options={"num_cpus": 1},
    # A log line per request costs more CPU than the HTTP handling itself on small hosts;
    # latency and status are in the metrics. Turn it on in the Serve config if wanted.
    logging_config={"enable_access_log": False},
)


@serve.deployment(name="Tagger", **_MODEL_OPTIONS)
class Tagger(TaggerCore):
    pass


@serve.deployment(name="Tagger", **_MODEL_OPTIONS)
@serve.ingress(new_fastapi())
class TaggerIngress(TaggerCore, HttpApi):
    def __init__(self, pool: dict, api_config: dict, search: DeploymentHandle | None = None,
                 controller: DeploymentHandle | None = None, feedback: dict | None = None) -> None:
        TaggerCore.__init__(self, pool, controller)
        self._init_http(api_config, search, feedback)

    async def _dispatch(self, method: str, args: tuple, pool: str | None, head: str | None = None) -> Any:
        # a per-request head arrives in Serve's request context (the proxy reads serve_multiplexed_model_id)
        fn = getattr(self, method)
        return await fn(*args) if asyncio.iscoroutinefunction(fn) else fn(*args)

    async def _infos(self) -> list:
        return [self.info()]

    def _pool_names(self) -> list:
        return [self.cfg.name]


@serve.deployment(
    name="LensIngress",
    max_ongoing_requests=256,
    max_queued_requests=512,
    ray_actor_options={"num_cpus": 0},
    logging_config={"enable_access_log": False},
)
@serve.ingress(new_fastapi())
class LensIngress(HttpApi):
    def __init__(self, api_config: dict, pools: dict[str, DeploymentHandle],
                 search: DeploymentHandle | None = None, feedback: dict | None = None) -> None:
        self._init_http(api_config, search, feedback)
        self.pools = pools  # ordered: the first pool with room gets the request
        logger.info("ingress ready: pools=%s auth=%s", list(pools), "on" if self.keys.enabled else "off")

    async def _dispatch(self, method: str, args: tuple, pool: str | None, head: str | None = None) -> Any:
        names = [pool] if pool else list(self.pools)
        for name in names:
            handle = self.pools[name].options(multiplexed_model_id=head) if head else self.pools[name]
            try:
                return await getattr(handle, method).remote(*args)
            except BackPressureError:
                continue
            except Exception as e:
                if isinstance(lens_error_of(e), OverloadedError):
                    continue  # this pool is full: the next one
                raise
        raise OverloadedError(f"all model pools are at capacity ({', '.join(names)})")

    async def _infos(self) -> list:
        return list(await asyncio.gather(*(h.info.remote() for h in self.pools.values())))

    def _pool_names(self) -> list:
        return list(self.pools)

"""The application builder named by the Serve config YAMLs: ``import_path: serve.app:build_app``."""

from __future__ import annotations

from ray.serve import Application

from lens.config import validate

from .config import AppArgs
from .ingress import LensIngress
from .tagger import Tagger

__all__ = ["build_app"]


def build_app(args: dict | None = None) -> Application:
    """Validate ``args`` (see :class:`serve.config.AppArgs`) and bind the ingress to its model pools.

    Every pool is a ``Tagger`` deployment named after the pool; the Serve config's
    ``deployments:`` section can override its replicas, autoscaling and ``user_config``.
    """
    cfg = validate(AppArgs, args or {}, where="application args")
    pools = {}
    for pool in cfg.pools:
        actor = {"num_cpus": pool.num_cpus}
        if pool.num_gpus:
            actor["num_gpus"] = pool.num_gpus
        pools[pool.name] = Tagger.options(
            name=pool.name,
            ray_actor_options=actor,
            user_config=pool.batching.model_dump(),
        ).bind(pool.model_dump(mode="json"))
    return LensIngress.bind(cfg.api.model_dump(mode="json"), pools)

"""The application builder named by the Serve config YAMLs: ``import_path: lens.serve.app:build_app``."""

from __future__ import annotations

from ray.serve import Application

from lens.cluster import worker_niceness_env
from lens.runtime.config import validate

from .config import AppArgs, PoolConfig
from .deployments import LensIngress, Tagger, TaggerIngress
from .rollout import RolloutController
from .search import IndexSearcher

__all__ = ["build_app", "pool_options"]


def pool_options(pool: PoolConfig, nice: int | None = None) -> dict:
    """A pool's deployment options: its name, resources, batching knobs and, with ``pool.nice`` (else ``nice``),
    the runtime environment that starts its replicas at that CPU niceness."""
    actor: dict = {"num_cpus": pool.num_cpus}
    if pool.num_gpus:
        actor["num_gpus"] = pool.num_gpus
    env = worker_niceness_env(pool.nice if pool.nice is not None else nice)
    if env:
        actor["runtime_env"] = env
    return {"name": pool.name, "ray_actor_options": actor, "user_config": pool.batching.model_dump()}


def build_app(args: dict | None = None) -> Application:
    """Validate ``args`` (see :class:`lens.serve.config.AppArgs`) and bind the deployments.

    One pool: a single ``TaggerIngress`` deployment serves HTTP and runs the model.
    Several pools: a ``LensIngress`` router in front of one ``Tagger`` deployment per pool.
    With ``search``, an ``IndexSearcher`` deployment serves ``/v1/search`` through the same ingress.
    Deployments are named after their pools, so the Serve config's ``deployments:``
    section can override replicas, autoscaling and ``user_config`` by name.
    """
    cfg = validate(AppArgs, args or {}, where="application args")
    api = cfg.api.model_dump(mode="json")
    feedback = cfg.feedback.model_dump(mode="json") if cfg.feedback else None
    search = None
    if cfg.search is not None:
        shards = None
        if cfg.search.shard_deployments:
            from .search import IndexShard, shard_count

            opts = {"num_cpus": cfg.search.shard_num_cpus} | (
                {"resources": dict(cfg.search.shard_resources)} if cfg.search.shard_resources else {})
            shards = [IndexShard.options(name=f"IndexShard{i}", ray_actor_options=opts).bind(
                cfg.search.model_dump(mode="json"), i) for i in range(shard_count(cfg.search.index))]
        search = IndexSearcher.options(ray_actor_options={"num_cpus": cfg.search.num_cpus}).bind(
            cfg.search.model_dump(mode="json"), shards)
    versioned = [p.versions for p in cfg.pools if p.versions is not None]
    controller = None
    if versioned:  # one controller judges every versioned pool's rollouts
        models = list({(v.registry, v.model): {"registry": v.registry, "model": v.model} for v in versioned}.values())
        controller = RolloutController.bind(models, cfg.rollout.model_dump(mode="json"))
    if len(cfg.pools) == 1 and not cfg.separate_ingress:
        (pool,) = cfg.pools
        return TaggerIngress.options(**pool_options(pool)).bind(pool.model_dump(mode="json"), api, search, controller,
                                                            feedback)
    pools = {p.name: Tagger.options(**pool_options(p)).bind(p.model_dump(mode="json"), controller) for p in cfg.pools}
    return LensIngress.bind(api, pools, search, feedback)

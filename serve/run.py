"""``lens serve``: validate a Serve config and run it on a local (or existing) Ray cluster.

The config is the same YAML that ``serve run`` and ``serve deploy`` accept; Lens
checks it first with Ray's own schema and its own typed arguments, so a bad value
fails before any replica starts.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import sys
import threading
import time
from typing import NamedTuple

from lens.cluster import METRICS_HOSTS, init_ray, requested_address
from lens.errors import ConfigError, LensError
from lens.runtime.config import read_yaml_mapping, validate
from lens.runtime.loading import served_line

from .config import MODEL_MAX_ONGOING_REQUESTS, AppArgs, BatchingConfig, PoolConfig, replica_cpus

__all__ = ["load_serve_config", "check_serve_config", "check_resources", "resource_demand", "deploy", "drain", "run"]

logger = logging.getLogger("lens.serve")

BUILDER = "lens.serve.app:build_app"
EVENTS_BUILDER = "lens.serve.events.app:build_events_app"

DEFAULT_CONFIG = {
    "proxy_location": "HeadOnly",
    "http_options": {"host": "127.0.0.1", "port": 8000},
    "applications": [{"name": "lens", "route_prefix": "/", "import_path": BUILDER, "args": {}}],
}


class NotRunningError(LensError, TimeoutError):
    code = "not_running"
    http_status = 503


def load_serve_config(path: str | None) -> dict:
    if path is None:
        return copy.deepcopy(DEFAULT_CONFIG)
    return read_yaml_mapping(path, "Serve config")


def _lens_apps(doc: dict, where: str):
    """(validated args, ``deployments:`` overrides by name) of each Lens application in a Serve config."""
    for app in doc.get("applications", []):
        if app.get("import_path") != BUILDER:
            continue
        args = validate(AppArgs, app.get("args") or {}, where=f"{where}, application {app.get('name')!r} args")
        yield args, {d.get("name"): d for d in app.get("deployments") or []}


def check_serve_config(doc: dict, where: str = "Serve config"):
    """Validate with Ray's ``ServeDeploySchema`` and Lens's ``AppArgs``; returns the Ray schema object.

    Also checks, per model deployment, that ``max_ongoing_requests >= max_batch_size``
    (otherwise batches never fill) after the ``deployments:`` overrides are applied.
    """
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        schema = ServeDeploySchema.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(f"{where} is not a valid Serve config: {e}") from e
    for args, overrides in _lens_apps(doc, where):
        pool_names = {p.name for p in args.pools}
        for name in overrides:
            if name not in pool_names | {"LensIngress"}:
                raise ConfigError(f"{where}: deployments override {name!r} matches no deployment "
                                  f"(pools: {', '.join(sorted(pool_names))})")
        for pool in args.pools:
            _check_batching(pool, overrides.get(pool.name, {}), where)
    for pool, override in _events_pools(doc, where):
        _check_batching(pool, override, where)
    return schema


def _check_batching(pool, override: dict, where: str) -> None:
    batching = validate(BatchingConfig, override.get("user_config") or pool.batching.model_dump(),
                        where=f"{where}, {pool.name}.user_config")
    ongoing = override.get("max_ongoing_requests", MODEL_MAX_ONGOING_REQUESTS)
    if batching.max_batch_size > ongoing:
        raise ConfigError(f"{where}: {pool.name} has max_batch_size {batching.max_batch_size} > "
                          f"max_ongoing_requests {ongoing}; batches could never fill")
    lanes = pool.lanes_for(replica_cpus(pool.num_cpus))
    if batching.max_batch_size * lanes > ongoing:
        raise ConfigError(f"{where}: {pool.name} runs {lanes} batches at once (concurrent_batches) of up to "
                          f"max_batch_size {batching.max_batch_size}, more than max_ongoing_requests {ongoing} "
                          "lets in; raise max_ongoing_requests or set concurrent_batches: 1")


def _replicas(override: dict) -> int:
    """Replicas a deployment starts with: ``num_replicas``, else autoscaling's initial (or minimum), else 1."""
    n = override.get("num_replicas")
    if isinstance(n, int):
        return n
    auto = override.get("autoscaling_config") or {}
    initial = auto.get("initial_replicas")
    return int(initial if initial is not None else auto.get("min_replicas", 1))


class Demand(NamedTuple):
    """What one deployment asks of the cluster when it starts."""

    name: str
    replicas: int
    cpus: float  # each
    gpus: float  # each


def resource_demand(doc: dict, where: str = "Serve config") -> list[Demand]:
    """The replicas and resources of the Lens deployments a Serve config starts (the event consumer and the
    multi-pool router ask for none; the index searcher is not overridable in ``deployments:``, so one replica)."""
    out = []
    for args, overrides in _lens_apps(doc, where):
        for pool in args.pools:
            o = overrides.get(pool.name, {})
            actor = o.get("ray_actor_options") or {}
            out.append(Demand(pool.name, _replicas(o), float(actor.get("num_cpus", pool.num_cpus)),
                              float(actor.get("num_gpus", pool.num_gpus))))
        if args.search is not None:
            out.append(Demand("IndexSearcher", 1, float(args.search.num_cpus), 0.0))
    for pool, o in _events_pools(doc, where):
        actor = o.get("ray_actor_options") or {}
        out.append(Demand(pool.name, _replicas(o), float(actor.get("num_cpus", pool.num_cpus)),
                          float(actor.get("num_gpus", pool.num_gpus))))
    return out


def _events_pools(doc: dict, where: str):
    """(pool, its ``deployments:`` override) of each event application with a model pool of its own (its
    ``args.pool``; the rest of its args is the events layer's to check)."""
    for app in doc.get("applications", []):
        pool = (app.get("args") or {}).get("pool") if app.get("import_path") == EVENTS_BUILDER else None
        if pool is not None:
            pool = validate(PoolConfig, pool, where=f"{where}, application {app.get('name')!r} args.pool")
            overrides = {d.get("name"): d for d in app.get("deployments") or []}
            yield pool, overrides.get(pool.name, {})


def check_resources(doc: dict, cluster: dict) -> None:
    """Refuse, with the arithmetic, a config whose replicas need more CPUs or GPUs than ``cluster`` has in all,
    or one replica more than any single node has (it could never be placed and the service would hang)."""
    demand = resource_demand(doc)
    for res, field in (("CPU", "cpus"), ("GPU", "gpus")):
        want = sum(d.replicas * getattr(d, field) for d in demand)
        have = float(cluster.get("total", {}).get(res, 0.0))
        if want > have + 1e-9:
            parts = ", ".join(f"{d.name} {d.replicas} x {getattr(d, field):g}" for d in demand if getattr(d, field))
            raise ConfigError(f"the config needs {want:g} {res}s ({parts}) but this Ray cluster has {have:g}; "
                              f"lower num_{res.lower()}s or replicas, or add nodes (--skip-resource-check for a "
                              "cluster that autoscales)")
        node_max = max((float(n.get(res, 0.0)) for n in cluster.get("nodes", [])), default=have)
        for d in demand:
            if getattr(d, field) > node_max + 1e-9:
                raise ConfigError(f"one {d.name} replica wants {getattr(d, field):g} {res}s but the largest node "
                                  f"has {node_max:g}")


def cluster_resources() -> dict:
    """Total and per-node resources of the connected Ray cluster (alive nodes)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return {"total": dict(ray.cluster_resources()), "nodes": nodes}


def deploy(doc: dict, where: str = "Serve config", timeout_s: float = 600, *, check_fit: bool = True,
           wait: bool = True) -> list[str]:
    """Validate ``doc`` and deploy it on the connected Ray cluster, as ``serve run CONFIG`` does;
    returns the application names once all are RUNNING. With ``check_fit``, a config the cluster cannot
    place is refused before anything is deployed (:func:`check_resources`)."""
    from ray.serve._private.api import serve_start  # what `serve run CONFIG` uses

    schema = check_serve_config(doc, where)
    if check_fit:
        check_resources(doc, cluster_resources())
    elif _separate_unplaceable_ingress(doc, where):
        schema = check_serve_config(doc, where)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    names = [a.name for a in schema.applications]
    if wait:
        _wait_running(names, timeout_s)
    return names


def served_pools(app_names: list[str], timeout_s: float = 60) -> list[dict]:
    """What each model pool of these applications serves once they run: ``{app, pool, model, served}`` (the
    backend, precision and int8 verdict its replica chose; see :meth:`lens.runtime.loading.LoadedModel.served`)."""
    from ray import serve

    out = []
    apps = serve.status().applications
    for app in app_names:
        for dep in (apps[app].deployments if app in apps else {}):
            if dep in _NOT_POOLS or dep.startswith("IndexShard"):
                continue
            try:
                info = serve.get_deployment_handle(dep, app).info.remote().result(timeout_s=timeout_s)
            except Exception:  # noqa: BLE001 - a deployment without info() is not a model pool
                continue
            if isinstance(info, dict) and "served" in info:
                out.append({"app": app, "pool": info.get("pool", dep), "model": info["model"], "served": info["served"]})
    return out


_NOT_POOLS = {"LensIngress", "IndexSearcher", "EventConsumer", "RolloutController"}  # and IndexShardN


def _separate_unplaceable_ingress(doc: dict, where: str) -> bool:
    """``--skip-resource-check`` with a config this cluster cannot place now (an autoscaling cluster, say): an
    application whose only pool would also be its HTTP ingress gets a separate ingress instead, so ``/healthz``
    answers (503, naming what is not up) instead of nothing until a node can take the pool. Returns whether
    ``doc`` changed."""
    try:
        check_resources(doc, cluster_resources())
        return False
    except ConfigError as e:
        why = e.message
    changed = False
    for app in doc.get("applications", []):
        args = app.get("args") or {}
        if app.get("import_path") == BUILDER and len(args.get("pools") or [{}]) == 1 \
                and args.get("separate_ingress") is None:
            app["args"] = dict(args, separate_ingress=True)
            print(f"application {app.get('name')!r}: {why}; deploying anyway (--skip-resource-check) with a separate "
                  "HTTP ingress, so /healthz answers 503 until its pool is placed", file=sys.stderr)
            changed = True
    return changed


def _wait_running(app_names: list[str], timeout_s: float = 600) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in app_names}
        failed = {n: apps[n].message for n in app_names if n in apps and apps[n].status == "DEPLOY_FAILED"}
        if failed:
            raise ConfigError(f"deployment failed: {failed}")
        if all(s == "RUNNING" for s in states.values()):
            return
        time.sleep(0.5)
    raise NotRunningError(f"applications not running after {timeout_s:g}s: {states} (a replica that cannot be "
                          "placed or fails to start; `serve status` says which)")


def drain(app_names: list[str], grace_s: float, http_apps: tuple[str, ...] = ()) -> bool:
    """Stop taking new requests and let the ones in flight finish, for at most ``grace_s`` seconds; the caller
    then stops Serve.

    ``http_apps`` (Lens applications that answer HTTP) are gated, not deleted: their ingress replicas answer new
    requests with a JSON 503 (``Retry-After``), which clients retry elsewhere, until each has nothing in flight
    (:mod:`lens.serve.drain`); deleting them first would remove their routes at once, and every request arriving
    meanwhile would get the proxy's text/plain 404. The other applications (the event consumer) are deleted, which
    stops each replica gracefully after its work in hand. Returns whether everything finished in time.
    """
    from ray import serve

    from .drain import open_gates, wait_idle

    deadline = time.monotonic() + grace_s
    gated = [n for n in app_names if n in http_apps]
    gates = open_gates(gated) if gated else []
    others = [n for n in app_names if n not in http_apps]
    for name in others:
        try:
            serve.delete(name, _blocking=False)
        except Exception:  # noqa: BLE001 - already gone
            logger.warning("could not delete application %s", name, exc_info=True)
    while others and time.monotonic() < deadline:
        try:
            if not any(n in serve.status().applications for n in others):
                break
        except Exception:  # noqa: BLE001 - the controller is going away
            return False
        time.sleep(0.25)
    else:
        if others:
            return False
    try:
        return wait_idle(gates, gated, deadline) if gates else True
    except Exception:  # noqa: BLE001 - the controller or a gate going away: stop anyway
        logger.warning("drain: could not wait for the requests in flight", exc_info=True)
        return False


def http_apps_of(doc: dict) -> tuple[str, ...]:
    """The Lens applications of a Serve config that answer HTTP (a route prefix: not the event consumer)."""
    return tuple(a["name"] for a in doc.get("applications", [])
                 if a.get("import_path") == BUILDER and a.get("route_prefix", "/") is not None)


def run(config: str | dict | None = None, *, host: str | None = None, port: int | None = None,
        address: str | None = None, proxy: str = "haproxy", metrics_port: int | None = 8080,
        metrics_host: str = "127.0.0.1", block: bool = True, frontdoor=None, check_fit: bool = True, grace_s: float = 30.0) -> dict:
    """Deploy the config (a path, a loaded document, or None for the default) and, if ``block``,
    serve until SIGINT/SIGTERM, then drain (at most ``grace_s``) and shut down cleanly.

    ``frontdoor`` (a :class:`lens.serve.frontdoor.FrontDoorConfig`; default limits if None) hardens the HAProxy
    front door: slow-client timeouts, connection caps, admin ports bound to one address.

    ``metrics_host``: where Lens's own local Ray exports its Prometheus metrics (``metrics_port``): loopback
    (the default) or ``0.0.0.0`` for every interface; a joined cluster keeps its own."""
    from . import frontdoor as front

    doc = copy.deepcopy(config) if isinstance(config, dict) else load_serve_config(config)
    where = config if isinstance(config, str) else "config"
    http = doc.setdefault("http_options", {})
    if host:
        http["host"] = host
    if port:
        http["port"] = port
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)
    check_serve_config(doc, where=where)  # fail before Ray starts
    if metrics_host not in METRICS_HOSTS:
        raise ConfigError(f"metrics host must be one of {', '.join(METRICS_HOSTS)} (Ray's exporter listens on "
                          f"loopback or on every interface), got {metrics_host!r}")

    import ray
    from ray import serve

    own = requested_address(address) is None  # Lens's own local Ray (else a cluster it joins)
    init: dict = {}
    if proxy == "haproxy":
        # Ray Serve's HAProxy mode: a C proxy in front of replicas that serve HTTP themselves.
        # Set before Ray starts so every Serve process sees it.
        os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
        fd, init["runtime_env"] = front.prepare(frontdoor)
        print(f"HAProxy: header timeout {fd.header_timeout_s}s, idle {fd.idle_timeout_s}s, "
              f"{fd.max_conn_per_client} connections per client, {fd.max_connections} in all; stats "
              f"http://{fd.admin_host}:{fd.stats_port}/stats, metrics http://{fd.admin_host}:{fd.exporter_port}/metrics",
              file=sys.stderr)
    elif proxy != "python":
        raise ConfigError(f"proxy must be haproxy or python, got {proxy!r}")
    if metrics_port and own:
        init["_metrics_export_port"] = metrics_port
    init_ray(address, log=lambda m: print(m, file=sys.stderr), what="lens serve",
             loopback=metrics_host != "0.0.0.0", **init)
    try:
        t0 = time.monotonic()
        names = deploy(doc, where=where, check_fit=check_fit)
    except BaseException:
        ray.shutdown()
        raise
    url = f"http://{http['host']}:{http['port']}"
    summary = {"url": url, "applications": names, "ready_s": round(time.monotonic() - t0, 1),
               "metrics": f"http://{'127.0.0.1' if metrics_host == '0.0.0.0' else metrics_host}:{metrics_port}"
                          "/metrics" if metrics_port and own else None,
               "pools": served_pools(names)}
    print(f"Lens is serving {', '.join(names)} at {url} (ready in {summary['ready_s']}s)", file=sys.stderr)
    for p in summary["pools"]:
        print(f"  pool {p['pool']} ({p['app']}): {p['model']} on {served_line(p['served'])}", file=sys.stderr)
    print(f"  curl -s --data-binary @photo.jpg -H 'Content-Type: image/jpeg' '{url}/v1/tag?top_k=5'",
          file=sys.stderr)
    if summary["metrics"]:
        print(f"  Prometheus metrics: {summary['metrics']}", file=sys.stderr)
    if not block:
        return summary
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        print(f"shutting down Lens: draining requests in flight (at most {grace_s:g}s) ...", file=sys.stderr)
        drained = drain(names, grace_s, http_apps_of(doc))
        if not drained:
            print(f"  grace period of {grace_s:g}s over; stopping what is left", file=sys.stderr)
        serve.shutdown()
        ray.shutdown()
    return summary

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
from lens.config import read_yaml_mapping, validate
from lens.errors import ConfigError

from .config import AppArgs, BatchingConfig

__all__ = ["load_serve_config", "check_serve_config", "deploy", "run"]

logger = logging.getLogger("lens.serve")

BUILDER = "serve.app:build_app"

DEFAULT_CONFIG = {
    "proxy_location": "HeadOnly",
    "http_options": {"host": "127.0.0.1", "port": 8000},
    "applications": [{"name": "lens", "route_prefix": "/", "import_path": BUILDER, "args": {}}],
}


def load_serve_config(path: str | None) -> dict:
    if path is None:
        return copy.deepcopy(DEFAULT_CONFIG)
    return read_yaml_mapping(path, "Serve config")


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
    for app in doc.get("applications", []):
        if app.get("import_path") != BUILDER:
            continue
        args = validate(AppArgs, app.get("args") or {}, where=f"{where}, application {app.get('name')!r} args")
        overrides = {d.get("name"): d for d in app.get("deployments") or []}
        pool_names = {p.name for p in args.pools}
        for name in overrides:
            if name not in pool_names | {"LensIngress"}:
                raise ConfigError(f"{where}: deployments override {name!r} matches no deployment "
                                  f"(pools: {', '.join(sorted(pool_names))})")
        for pool in args.pools:
            o = overrides.get(pool.name, {})
            batching = validate(BatchingConfig, o.get("user_config") or pool.batching.model_dump(),
                                where=f"{where}, {pool.name}.user_config")
            ongoing = o.get("max_ongoing_requests", 128)  # the Tagger default
            if batching.max_batch_size > ongoing:
                raise ConfigError(f"{where}: {pool.name} has max_batch_size {batching.max_batch_size} > "
                                  f"max_ongoing_requests {ongoing}; batches could never fill")
    return schema


def deploy(doc: dict, where: str = "Serve config", timeout_s: float = 600) -> list[str]:
    """Validate ``doc`` and deploy it on the connected Ray cluster, as ``serve run CONFIG`` does;
    returns the application names once all are RUNNING."""
    from ray.serve._private.api import serve_start  # what `serve run CONFIG` uses

    schema = check_serve_config(doc, where)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    names = [a.name for a in schema.applications]
    _wait_running(names, timeout_s)
    return names


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
    raise TimeoutError(f"applications not running after {timeout_s}s: {states}")


def run(config: str | dict | None = None, *, host: str | None = None, port: int | None = None,
        address: str | None = None, proxy: str = "haproxy", metrics_port: int | None = 8080,
        block: bool = True) -> dict:
    """Deploy the config (a path, a loaded document, or None for the default) and, if ``block``,
    serve until SIGINT/SIGTERM, then shut down cleanly."""
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

    import ray
    from ray import serve

    if proxy == "haproxy":
        # Ray Serve's HAProxy mode: a C proxy in front of replicas that serve HTTP themselves.
        # Set before Ray starts so every Serve process sees it.
        os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    elif proxy != "python":
        raise ConfigError(f"proxy must be haproxy or python, got {proxy!r}")
    init = {"address": address} if address else {"include_dashboard": False}
    if metrics_port and not address:
        init["_metrics_export_port"] = metrics_port
    ray.init(logging_level="WARNING", **init)
    t0 = time.monotonic()
    names = deploy(doc, where=where)
    url = f"http://{http['host']}:{http['port']}"
    summary = {"url": url, "applications": names, "ready_s": round(time.monotonic() - t0, 1),
               "metrics": f"http://127.0.0.1:{metrics_port}/metrics" if metrics_port and not address else None}
    print(f"Lens is serving {', '.join(names)} at {url} (ready in {summary['ready_s']}s)", file=sys.stderr)
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
        print("shutting down Lens ...", file=sys.stderr)
        serve.shutdown()
        ray.shutdown()
    return summary

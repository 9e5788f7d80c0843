"""Which Ray a Lens command runs on: its own local instance unless it is told an address.

Ray's own ``ray.init()`` with no address joins the most recent cluster started with ``ray start`` on the host, so
a plain ``lens embed`` used to run inside someone else's cluster (their resources, runtime environment and
Python) or time out. Every Lens command that starts Ray comes here instead:

* no ``--address`` and no ``RAY_ADDRESS``: a new local instance (``address="local"``), private to the command;
* ``--address auto`` (the cluster ``ray start`` made on this host), ``ray://host:10001`` or ``host:6379``, or
  ``RAY_ADDRESS`` in the environment: join that cluster.

The first line a command logs says which one it runs on. Paths handed to Ray tasks must be absolute
(:func:`absolute`): a joined cluster's workers do not share the driver's working directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["init_ray", "describe_ray", "requested_address", "absolute", "quiet_ray", "METRICS_HOSTS", "niceness",
           "worker_niceness_env"]

logger = logging.getLogger(__name__)

#: Where Ray's metrics exporter of a local instance can listen: loopback (``init_ray(loopback=True)``), or every
#: interface (Ray binds nothing in between)
METRICS_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0")


def requested_address(address: str | None = None) -> str | None:
    """The cluster the user asked to join (``address``, else ``RAY_ADDRESS``), or None for a private instance."""
    return address or os.environ.get("RAY_ADDRESS") or None


def init_ray(address: str | None = None, *, log=None, what: str = "lens", runtime_env: dict | None = None,
             logging_level: int | str = logging.WARNING, log_to_driver: bool = True, loopback: bool = False,
             **start):
    """Start (or join) Ray for a Lens command; ``log`` gets the line that says which cluster it runs on. Returns
    ``ray.init``'s context (None when Ray was already initialised in this process). ``start`` (``num_cpus``, ``include_dashboard``, ``dashboard_port`` ...) applies only to a new
    local instance: a joined cluster keeps its own resources. Nothing happens when Ray is already initialised in
    this process (a test's, or the caller's).

    ``loopback``: a new local instance takes 127.0.0.1 as its node address, so the ports Ray binds to the node
    address (its Prometheus metrics exporter among them) listen on loopback only. Ray otherwise resolves a loopback
    node address to the machine's address (so other machines can join) and its exporter listens on every
    interface; the switch Ray keeps for single-machine use (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) is set for this
    process and the Ray processes it starts. A joined cluster keeps its own addresses."""
    import ray

    ctx = None
    if ray.is_initialized():
        line = f"{what}: on the Ray already initialised in this process ({describe_ray()})"
    else:
        joined = requested_address(address)
        common = {"logging_level": logging_level, "log_to_driver": log_to_driver}
        if runtime_env is not None:
            common["runtime_env"] = runtime_env
        if joined:
            ctx = ray.init(address=joined, **common)
            line = f"{what}: joined the Ray cluster at {joined} ({describe_ray()})"
        else:
            start.setdefault("include_dashboard", False)
            if loopback:
                _single_machine()
                start["_node_ip_address"] = "127.0.0.1"
            ctx = ray.init(address="local", **common, **start)
            line = f"{what}: on its own local Ray instance ({describe_ray()}; --address or RAY_ADDRESS joins a cluster)"
        if not log_to_driver:
            line += "; worker logs stay in Ray's session folder (/tmp/ray/session_latest/logs on the head node)"
    if log is not None:
        log(line)
    else:
        logger.info("%s", line)
    return ctx


def _single_machine() -> None:
    """Ray's own switch for a machine that no other node joins: a loopback node address stays loopback (read by
    Ray from the environment at import in the processes it starts, and from ``ray_constants`` in this one)."""
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def quiet_ray() -> None:
    """Keep Ray's own progress and INFO logging (Ray Data's execution plans and progress, Ray Train's checkpoint and
    placement-group messages) off a command's terminal, for commands that print their own progress; warnings and
    errors still show."""
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    for name in ("ray.data", "ray.train", "ray.tune", "ray.air"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    except ImportError:  # pragma: no cover - ray[data] is a dependency
        pass


def describe_ray() -> str:
    """``GCS address, N CPUs[, M GPUs]`` of the Ray this process is connected to."""
    import ray

    ctx = ray.get_runtime_context()
    res = ray.cluster_resources()
    gcs = getattr(ctx, "gcs_address", None) or "?"
    gpus = int(res.get("GPU", 0))
    return f"GCS {gcs}, {res.get('CPU', 0):g} CPU(s)" + (f", {gpus} GPU(s)" if gpus else "")


def absolute(path: str | os.PathLike | None) -> str | None:
    """A local path made absolute on the driver (``s3://`` URIs and None pass through unchanged), before any Ray
    task sees it: a worker of a joined cluster resolves a relative path against its own working directory."""
    if path is None:
        return None
    s = str(path)
    if "://" in s:
        return s
    return str(Path(s).expanduser().absolute())


def niceness() -> int:
    """The CPU niceness of the calling thread (on Linux niceness is per thread: Ray's own threads in a worker
    keep 0 while the threads that run its tasks, and those they start, have the worker's niceness)."""
    import threading

    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except OSError:  # a platform without per-thread priorities
        return os.getpriority(os.PRIO_PROCESS, 0)


def worker_niceness_env(nice: int | None) -> dict:
    """The ``runtime_env`` that starts a Ray actor's process at CPU niceness ``nice`` (0-19; lower runs first).
    Ray starts every worker at 15 (``RAY_worker_niceness``), which a process cannot lower by itself; set in the
    actor's environment, the worker applies it as it starts (Ray's own job supervisor does the same). None: Ray's."""
    return {} if nice is None else {"env_vars": {"RAY_worker_niceness": str(int(nice))}}

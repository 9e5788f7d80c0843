"""Hardening of Ray Serve's HAProxy front door: slow-client timeouts, connection caps, admin ports on one host.

Ray Serve (2.60) renders HAProxy's configuration from a template with no ``timeout http-request``, its stats page
bound to ``*:8404`` and its Prometheus exporter to ``:9101``, and offers no setting for any of these. Lens adds them
by editing that template in the process that renders it (Serve's HAProxy manager actor), through Ray's
``worker_process_setup_hook``; :func:`runtime_env` gives ``ray.init`` what it needs, from a :class:`FrontDoorConfig`.

What the edited configuration does:

* ``timeout http-request`` with ``option http-buffer-request``: a client gets ``header_timeout_s`` to send its
  headers and the first buffer of its body; a slower one gets HAProxy's 408 and never reaches a replica, so
  trickling clients cannot occupy the model replicas' request slots (this 408 is HAProxy's own small HTML page,
  not Lens's JSON shape: HAProxy answers it before any Lens code sees the request);
* ``timeout client``: a connection idle that long mid-request is closed;
* a per-client-address cap on open connections (``max_conn_per_client``; more are refused at accept) and a total
  cap (``maxconn``, Ray's ``RAY_SERVE_HAPROXY_MAXCONN``);
* the stats page and the Prometheus exporter bound to ``admin_host`` (loopback by default) on configurable ports;
* a request with a header value that is not ASCII gets a 400 in Lens's JSON shape from HAProxy itself (Ray's
  replica would fail decoding it with a text/plain 500, before any Lens code or key check);
* HAProxy's own 502/503/504 (no replica could answer: one restarting, draining, or lost) become one JSON 503 in
  Lens's shape with ``Retry-After``, which clients retry, instead of Serve's text/plain 500 page.

A template that no longer has the expected shape (another Ray version) is not edited half-way: the hook logs an
error naming what it could not find and leaves Serve's configuration as it is.
"""

from __future__ import annotations

import json
import logging
import os

from pydantic import Field, PositiveInt

from lens.errors import error_body
from lens.runtime.config import StrictModel

__all__ = ["FrontDoorConfig", "runtime_env", "prepare", "from_args", "port_or_free", "apply", "ENV"]

logger = logging.getLogger("lens.serve")

#: The environment variable carrying the JSON of a :class:`FrontDoorConfig` to the HAProxy manager's process.
ENV = "LENS_FRONTDOOR"
HOOK = "lens.serve.frontdoor.apply"


class FrontDoorConfig(StrictModel):
    """Limits of the HAProxy front door (the ``lens serve`` / ``lens events run`` flags of the same names)."""

    header_timeout_s: PositiveInt = Field(10, le=300, description="time to send headers (and the first body "
                                          "buffer) before a 408")
    idle_timeout_s: PositiveInt = Field(60, le=3600, description="a client connection idle this long is closed")
    max_conn_per_client: int = Field(256, ge=0, description="open connections one client address may hold "
                                     "(0 = no cap; raise it, or 0, behind a load balancer, where every connection "
                                     "comes from the balancer's few addresses)")
    max_connections: PositiveInt = Field(4096, description="open client connections in all (HAProxy maxconn)")
    admin_host: str = Field("127.0.0.1", description="address of HAProxy's stats page and Prometheus exporter")
    stats_port: int = Field(8404, ge=1, le=65535, description="HAProxy stats page port")
    exporter_port: int = Field(9101, ge=1, le=65535, description="HAProxy Prometheus exporter port")


def runtime_env(cfg: FrontDoorConfig) -> dict:
    """The ``runtime_env`` (and the env vars Ray itself reads) that apply ``cfg`` to the HAProxy front door."""
    env = {
        ENV: cfg.model_dump_json(),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(cfg.stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(cfg.exporter_port),
        "RAY_SERVE_HAPROXY_MAXCONN": str(cfg.max_connections),
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(cfg.idle_timeout_s),
    }
    return {"worker_process_setup_hook": HOOK, "env_vars": env}


def port_or_free(preferred: int, host: str = "127.0.0.1") -> int:
    """``preferred`` if it is free on ``host``, else a free port (a second Lens on one host gets its own)."""
    import socket

    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
                return sock.getsockname()[1]
            except OSError:
                continue
    raise OSError(f"no free port on {host}")


def from_args(args) -> FrontDoorConfig | None:
    """The limits from command-line flags named like the fields; ``None`` when no flag was given."""
    from lens.runtime.config import validate

    given = {k: getattr(args, k) for k in FrontDoorConfig.model_fields if getattr(args, k, None) is not None}
    return validate(FrontDoorConfig, given, where="command line") if given else None


def prepare(cfg: FrontDoorConfig | None) -> tuple[FrontDoorConfig, dict]:
    """The limits in force and the ``runtime_env`` for ``ray.init``; Ray's own HAProxy variables are also set in
    this process's environment (a local Ray reads them from there). ``None`` means the defaults, with a free port
    in place of a default stats or exporter port that another process (another Lens) holds."""
    if cfg is None:
        cfg = FrontDoorConfig()
        cfg = cfg.model_copy(update={"stats_port": port_or_free(cfg.stats_port, cfg.admin_host),
                                     "exporter_port": port_or_free(cfg.exporter_port, cfg.admin_host)})
    env = runtime_env(cfg)
    os.environ.update(env["env_vars"])
    return cfg, env


#: The header HAProxy sets on every request: when it received it, in ms since the epoch
RECEIVED_HEADER = "X-Lens-Received"
#: The body of HAProxy's answer to a header value that is not ASCII (Lens's error shape)
BAD_HEADER = json.dumps(error_body("bad_header", "header values must be ASCII", 400))
#: HAProxy's answer when no replica could take a request (its 502, 503 and 504), in Lens's shape: clients retry it
_UNAVAILABLE_BODY = json.dumps(error_body("unavailable", "no replica could answer this request now (one is restarting, "
                                          "draining or gone); retry", 503)) + "\n"
UNAVAILABLE = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
               f"Cache-Control: no-cache\r\nContent-Length: {len(_UNAVAILABLE_BODY.encode())}\r\n"
               "Connection: close\r\n\r\n" + _UNAVAILABLE_BODY)


# (what Serve's template says, what Lens puts there); every one must be found or nothing is changed
def _edits(cfg: FrontDoorConfig, error_file: str) -> list[tuple[str, str]]:
    host = cfg.admin_host
    cap = ("    stick-table type ipv6 size 100k expire 60s store conn_cur\n"
           "    tcp-request connection track-sc0 src\n"
           f"    tcp-request connection reject if {{ sc_conn_cur(0) gt {cfg.max_conn_per_client} }}\n"
           if cfg.max_conn_per_client else "")
    return [
        ("{% if config.timeout_http_request_s is not none %}timeout http-request "
         "{{ config.timeout_http_request_s }}s{% endif %}",
         f"timeout http-request {cfg.header_timeout_s}s\n    option http-buffer-request"),
        ("bind :{{ config.metrics_port }}", f"bind {host}:{{{{ config.metrics_port }}}}"),
        ("bind *:{{ config.stats_port }}", f"bind {host}:{{{{ config.stats_port }}}}"),
        ("    bind {{ config.frontend_host }}:{{ config.frontend_port }}\n",
         "    bind {{ config.frontend_host }}:{{ config.frontend_port }}\n" + cap +
         # when the front door took the request (ms; replaces whatever a client sent): a drain serves what arrived
         # before it began and answers the rest 503 (lens.serve.drain)
         f"    http-request set-header {RECEIVED_HEADER} %[date(0,ms)]\n" +
         f"    http-request return status 400 content-type application/json string '{BAD_HEADER}' "
         "if { req.hdrs -m reg '[\\x80-\\xff]' }\n"),
        *[(f"    errorfile {code} {{{{ config.error_file_path }}}}", f"    errorfile {code} {error_file}")
          for code in (502, 503, 504)],
    ]


def edit_template(template: str, cfg: FrontDoorConfig, error_file: str = "/dev/null") -> str:
    """``template`` with Lens's edits (``error_file``: where :data:`UNAVAILABLE` is written); raises
    ``ValueError`` naming the first part it cannot find."""
    out = template
    for old, new in _edits(cfg, error_file):
        if old not in out:
            raise ValueError(f"Ray Serve's HAProxy template has no {old.strip()!r}")
        out = out.replace(old, new, 1)
    return out


def apply() -> None:
    """``worker_process_setup_hook``: edit the HAProxy template in this process if it will render one."""
    raw = os.environ.get(ENV)
    if not raw:
        return
    try:
        from ray.serve._private import haproxy
    except ImportError:  # a Ray without HAProxy mode: nothing to edit
        return
    if getattr(haproxy, "_lens_frontdoor", False):
        return
    cfg = FrontDoorConfig.model_validate(json.loads(raw))
    import hashlib
    import tempfile

    from lens.storage import atomic_write_bytes

    # read by HAProxy on this host; named by its content, so every HAProxy manager (each reload, each Lens on
    # the host) shares one file instead of leaving one behind per start
    page = UNAVAILABLE.encode()
    error_file = os.path.join(tempfile.gettempdir(), f"lens-haproxy-503-{hashlib.sha256(page).hexdigest()[:16]}.http")
    try:
        with open(error_file, "rb") as f:
            same = f.read() == page
    except OSError:
        same = False
    if not same:
        try:
            atomic_write_bytes(error_file, page)
        except OSError:  # another user's file of that name in a shared /tmp: a private one instead
            fd, error_file = tempfile.mkstemp(prefix="lens-haproxy-", suffix="-503.http")
            with os.fdopen(fd, "wb") as f:
                f.write(page)
    try:
        haproxy.HAPROXY_CONFIG_TEMPLATE = edit_template(haproxy.HAPROXY_CONFIG_TEMPLATE, cfg, error_file)
    except ValueError as e:
        logger.error("Lens front-door limits NOT applied (%s); HAProxy runs with Ray Serve's defaults", e)
        return
    haproxy._lens_frontdoor = True

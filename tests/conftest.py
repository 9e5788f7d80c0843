"""Shared fixtures: a per-session Lens cache, the real embedded model, tiny seeded models, real photos."""

from __future__ import annotations

import io
import os
import threading

import numpy as np
import pytest
from PIL import Image


def _allowed_skips() -> list[str]:
    """Skip reasons the README lists between its allowed-skips markers."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- allowed-skips", 1)[1].split("-->", 1)[1].split("<!-- /allowed-skips -->", 1)[0]
    return [line[2:].strip() for line in block.splitlines() if line.startswith("- ")]


_SKIPPED: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append((report.nodeid, reason))


def pytest_collectreport(report):
    """Skips at collection (a module-level ``pytest.importorskip``) count too: a missing dependency that skips a
    whole module must fail the run like any other skip the README does not allow."""
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append((report.nodeid, reason))


_SESSION: list = []


def pytest_sessionstart(session):
    _SESSION.append(session)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process with pytest's own exit status, without CPython's interpreter teardown. With Ray,
    ONNX Runtime, OpenVINO, FAISS and Playwright threads alive in one process, that teardown once segfaulted after
    a run had printed its summary (exit 139), which would fail CI for nothing the tests measured. Every result is
    final and printed by now; Ray is shut down first."""
    if not _SESSION:
        return
    import sys

    status = int(_SESSION[0].exitstatus)
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - the status is what matters here
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def pytest_sessionfinish(session, exitstatus):
    """Fail the run on any skip whose reason the README does not list: a missing dependency must not pass."""
    _stop_mlflow_server()  # started at collection, even where no test that needed it ran
    allowed = _allowed_skips()
    bad = [(node, why) for node, why in _SKIPPED if not any(a in why for a in allowed)]
    if bad:
        for node, why in bad:
            print(f"\nskipped without a reason the README allows: {node}: {why}")
        session.exitstatus = 1


@pytest.fixture(scope="session", autouse=True)
def no_ingress_drain_wait():
    """No load balancer stands in front of the tests' Serve apps: a stopping ingress replica need not stay
    reachable 30 s for one to deregister it (Ray's default in HAProxy mode), so shutdowns don't wait for nothing."""
    old = os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S")
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "0"
    yield
    if old is None:
        os.environ.pop("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", None)
    else:
        os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = old


@pytest.fixture(scope="session", autouse=True)
def lens_cache(tmp_path_factory):
    """Every test session gets its own cache (ONNX exports, downloaded weights)."""
    path = tmp_path_factory.mktemp("lens-cache")
    old = os.environ.get("LENS_CACHE_DIR")
    os.environ["LENS_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LENS_CACHE_DIR", None)
    else:
        os.environ["LENS_CACHE_DIR"] = old


# -- one Serve cluster shared by the modules that deploy Lens apps in-process -----------------------------------

#: the fixture those modules use; every module that uses it runs in one block (pytest_collection_modifyitems)
SHARED_SERVE = "serve_cluster"
_SHARED: dict = {}


@pytest.fixture(scope="session")
def serve_cluster(lens_cache, moto_endpoint):
    """A local Ray of 2 CPUs with Serve (Python proxy) on a free loopback port, started once for every module that
    deploys Lens applications in-process (``test_lambda``, ``test_security``, ``test_serve``, ``test_ui``) and shut
    down as soon as the next test is in a module that does not use it. Each module deploys its own applications
    (a Serve config replaces every application not in it) and deletes them when it ends. Replicas see the
    session's Lens cache and moto's endpoint."""
    import ray
    from ray import serve

    if ray.is_initialized():  # a module's own Ray that outlived it
        ray.shutdown()
    port = free_port()
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")} | {"LENS_CACHE_DIR": str(lens_cache)}
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": env})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    _SHARED["up"] = True
    yield f"http://127.0.0.1:{port}"
    _stop_shared_serve()


def _stop_shared_serve() -> None:
    if _SHARED.pop("up", False):
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def _uses_shared_serve(item) -> bool:
    return item.module.__name__ in _SHARED.get("modules", ())


def pytest_collection_modifyitems(session, config, items):
    """The modules that use :data:`SHARED_SERVE` run one after another, where the first of them would run, each in
    its own order: their Serve cluster starts once and stops before any other module starts its own Ray. A
    session whose tests need the MLflow server starts it now, in the background."""
    if any("mlflow_server" in getattr(item, "fixturenames", ()) for item in items):
        _start_mlflow_server()
    users = []
    for item in items:
        if SHARED_SERVE in getattr(item, "fixturenames", ()) and item.module.__name__ not in users:
            users.append(item.module.__name__)
    _SHARED["modules"] = tuple(users)
    if not users:
        return
    block = [i for i in items if i.module.__name__ in users]
    block.sort(key=lambda i: users.index(i.module.__name__))  # stable: each module keeps its order
    first = next(k for k, i in enumerate(items) if i.module.__name__ in users)
    rest = [i for i in items if i.module.__name__ not in users]
    items[:] = rest[:first] + block + rest[first:]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last test of the block (and its module's fixtures), the shared Serve cluster stops."""
    yield
    if _SHARED.get("up") and (nextitem is None or not _uses_shared_serve(nextitem)):
        _stop_shared_serve()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for one test module (Ray Data and Ray Train jobs), shut down after it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    from lens.runtime.samples import SAMPLES, sample_path

    return {name: sample_path(name).read_bytes() for name in SAMPLES}


@pytest.fixture(scope="session")
def lite0_onnx(lens_cache):
    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor

    return Predictor.from_config(ModelConfig(backend="onnx", cache_dir=lens_cache))


@pytest.fixture(scope="session")
def lite0_torch(lens_cache):
    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor

    return Predictor.from_config(ModelConfig(backend="torch", device="cpu", cache_dir=lens_cache))


@pytest.fixture(scope="session")
def tiny(lens_cache):
    """timm's ``test_efficientnet`` with seeded random weights on ONNX Runtime: real inference, fast."""
    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor

    return Predictor.from_config(ModelConfig(name="test_efficientnet", weights="random", backend="onnx",
                                             cache_dir=lens_cache, max_batch_size=4))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_rgb(rng, w=64, h=48) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def free_port(lo: int = 10_000, hi: int | None = None) -> int:
    """A free loopback port for a server that cannot bind port 0 itself (Serve's proxy, HAProxy, a CLI flag).

    Picked at random in ``lo..hi``, by default below the kernel's ephemeral range, so no outgoing connection of
    this machine (which takes its local port from that range) can take it between this check and the server's
    bind. (`ray start` refuses ports in its worker range, 10002-19999: the foreign cluster asks for 20000-30000.)"""
    import random
    import socket

    if hi is None:
        try:
            low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
        except (OSError, ValueError, IndexError):
            low = 32768
        hi = max(lo + 1, low - 1)
    for _ in range(200):
        port = random.randint(lo, hi)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {lo}..{hi}")


def wait_healthy(url: str, proc, timeout_s: float = 240) -> None:
    """Poll ``url`` until it answers 200, failing early if ``proc`` (the server) exits."""
    import time

    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or no replica behind the proxy yet
            pass
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.25)  # a loopback probe: cheap, and every server test waits here
    pytest.fail(f"{url} did not become healthy in {timeout_s}s")


def scrape_metrics(port: int, wanted: list[str], timeout_s: float = 90) -> str:
    """Ray's Prometheus endpoint on ``port`` once it shows every name in ``wanted`` (Ray exports every few
    seconds); fails naming the missing ones."""
    import time

    import requests

    text, deadline = "", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in wanted):
            return text
        time.sleep(0.25)
    missing = [w for w in wanted if w not in text]
    assert not missing, f"not exported: {missing}"
    return text


def interrupt(proc, timeout_s: float = 60) -> str:
    """Ctrl-C a server started with ``start_new_session=True``; returns its output."""
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return out


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's S3/SQS server on loopback; boto3 reaches it through AWS_ENDPOINT_URL, as it would AWS."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # the OS picks; no race
    server.start()
    endpoint = "http://127.0.0.1:{}".format(server.get_host_and_port()[1])
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def write_head_package(path, identity, labels: list[str], thresholds: list[float], seed: int = 0) -> str:
    """A ``head`` package with seeded random weights for a backbone ``identity`` (a ModelIdentity): what
    ``lens train`` writes, without training (serving tests need the plumbing, not the accuracy)."""
    from safetensors.numpy import save

    from lens.package import write_package

    g = np.random.default_rng(seed)
    w = g.normal(size=(len(labels), identity.embed_dim)).astype(np.float32) * 4
    b = g.normal(size=len(labels)).astype(np.float32)
    return write_package(str(path), {"head.safetensors": save({"weight": w, "bias": b})},
                         {"kind": "head", "name": os.path.basename(str(path)), "labels": labels,
                          "thresholds": thresholds, "identity": identity.to_dict()})


@pytest.fixture(scope="session")
def tiny_head(tmp_path_factory, tiny):
    """A head on the tiny model: classes red and green always tagged (threshold 0), blue never (1.01)."""
    return write_head_package(tmp_path_factory.mktemp("heads") / "colours", tiny.identity(),
                              ["red", "green", "blue"], [0.0, 0.0, 1.01])


def at_once(n: int, call) -> list:
    """``call(i)`` for i in 0..n-1 in n threads released together by a barrier; their results in order (fails
    naming every exception raised)."""
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def one(i):
        try:
            barrier.wait()
            results[i] = call(i)
        except BaseException as e:  # noqa: BLE001 - every writer's failure is reported
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def wait_for(cond, what: str, timeout_s: float = 120, poll_s: float = 0.05):
    """Poll ``cond`` (a synchronisation point, not a timing claim) until true; fail naming ``what``."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(poll_s)


#: where `ray start` says which cluster a bare `ray.init()` joins
RAY_ADDRESS_FILE = "/tmp/ray/ray_current_cluster"


def own_instance(out: str, what: str) -> None:
    """``what`` (``lens embed`` ...) said it ran on its own local Ray instance."""
    assert f"{what}: on its own local Ray instance" in out, out[-3000:]


def ray_jobs(address: str, *, joined: bool = False) -> list[dict]:
    """Every driver the cluster at ``address`` has seen, except the probes (this function) that asked and the
    commands that were told to join it (``--address`` on their command line); with ``joined``, only those."""
    import json
    import subprocess
    import sys

    code = ("import json, ray, ray._private.state as st\n"
            f"ray.init(address={address!r}, logging_level='ERROR')\n"
            "jobs = [(j, set(j.get('Entrypoint', '').split())) for j in st.jobs()]  # LENS_PROBE\n"
            f"print(json.dumps([j for j, w in jobs if 'LENS_PROBE' not in w and ('--address' in w) == {joined}]))\n")
    # Ray 2.60 turns token authentication on for a new cluster (~/.ray/auth_token); a client that names the
    # address (not `auto`) must say it uses the token
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def foreign_ray(tmp_path_factory):
    """Someone else's cluster: ``ray start --head`` on this host, the one a bare ``ray.init()`` would join (its
    address file is restored afterwards). Every test that runs a Lens command that starts Ray takes it and checks,
    with :func:`ray_jobs`, that no driver of the command joined it."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    address_file = Path(RAY_ADDRESS_FILE)
    saved = address_file.read_text() if address_file.is_file() else None
    port, client, agent, metrics = (free_port(20_000, 30_000) for _ in range(4))
    ports = [f"--port={port}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
             f"--metrics-export-port={metrics}"]
    log = open(tmp_path_factory.mktemp("foreign-ray") / "ray-start.log", "w+")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=1",
                             "--include-dashboard=false", "--disable-usage-stats", *ports],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def mine() -> bool:
        return address_file.is_file() and address_file.read_text().strip().endswith(f":{port}")

    try:
        wait_for(lambda: mine() or proc.poll() is not None, "the foreign cluster did not start", timeout_s=120,
                 poll_s=0.2)
        log.seek(0)
        assert proc.poll() is None, log.read()
        address = address_file.read_text().strip()
        assert ray_jobs(address) == []
        yield address
    finally:
        # ``ray start`` alone gets SIGTERM: it drains its node through its GCS, then stops the rest. Signalled
        # together, the GCS went first and the drain waited 30 s for it.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of that cluster still alive
        except ProcessLookupError:
            pass
        log.close()
        if saved is not None:
            address_file.write_text(saved)
        elif mine():
            address_file.unlink()


_MLFLOW: dict = {}


def _start_mlflow_server() -> None:
    """Start the session's MLflow server (``mlflow server``: SQLite backend, artifacts served through the server
    from a folder, on loopback) without waiting for it: its start-up (imports, the SQLite schema's migrations, ~15
    s of one core) runs beside the tests before the first one that needs it. MLflow's server-side job runner (a
    huey consumer per job type: seven more Python processes, ~20 s of CPU to start, polling while idle) is for
    GenAI jobs Lens never submits: off."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    if _MLFLOW:
        return
    root = Path(tempfile.mkdtemp(prefix="lens-test-mlflow-"))
    port = free_port()
    log = open(root / "server.log", "w+")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", "--backend-store-uri",
                             f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
                            env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    _MLFLOW.update(root=root, proc=proc, log=log, uri=f"http://127.0.0.1:{port}")


def _stop_mlflow_server() -> None:
    import shutil
    import signal
    import subprocess

    if not _MLFLOW:
        return
    proc, log = _MLFLOW["proc"], _MLFLOW["log"]
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log.close()
    shutil.rmtree(_MLFLOW["root"], ignore_errors=True)
    _MLFLOW.clear()


@pytest.fixture(scope="session")
def mlflow_server():
    """A local MLflow tracking server as teams run one, on loopback; its URI. Started at collection when a
    collected test needs it (see :func:`pytest_collection_modifyitems`), else here; stopped at the session's end."""
    import urllib.request

    _start_mlflow_server()
    uri, proc, log = _MLFLOW["uri"], _MLFLOW["proc"], _MLFLOW["log"]

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(lambda: up() or proc.poll() is not None, "the MLflow server did not start", timeout_s=180,
                 poll_s=0.2)
        log.seek(0)
        assert proc.poll() is None, log.read()[-3000:]
        yield uri
    finally:
        _stop_mlflow_server()

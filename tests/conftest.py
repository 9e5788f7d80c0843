"""Shared fixtures: a per-session Lens cache, the real embedded model, tiny seeded models, real photos."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image


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


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    from lens.samples import SAMPLES, sample_path

    return {name: sample_path(name).read_bytes() for name in SAMPLES}


@pytest.fixture(scope="session")
def lite0_onnx(lens_cache):
    from lens.config import ModelConfig
    from lens.predictor import Predictor

    return Predictor.from_config(ModelConfig(backend="onnx", cache_dir=lens_cache))


@pytest.fixture(scope="session")
def lite0_torch(lens_cache):
    from lens.config import ModelConfig
    from lens.predictor import Predictor

    return Predictor.from_config(ModelConfig(backend="torch", device="cpu", cache_dir=lens_cache))


@pytest.fixture(scope="session")
def tiny(lens_cache):
    """timm's ``test_efficientnet`` with seeded random weights on ONNX Runtime: real inference, fast."""
    from lens.config import ModelConfig
    from lens.predictor import Predictor

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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        time.sleep(1)
    pytest.fail(f"{url} did not become healthy in {timeout_s}s")


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

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
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

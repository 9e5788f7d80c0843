"""Every backend is safe under concurrent ``run()`` calls: 8 threads x 64 distinct images through one backend
instance give the sequential results, row by row (OpenVINO once shared one infer request between threads and
handed rows another image's embedding). timm's ``test_efficientnet`` (seeded random weights) on every installed
backend, int8 included: what is tested is the backend's handling of concurrent calls, whatever the weights."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import at_once

pytestmark = pytest.mark.slow

THREADS, PER_THREAD = 8, 64


TINY = {"name": "test_efficientnet", "weights": "random"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """This module's own model cache: its tiny int8 variant and gate report stay out of the session's."""
    return tmp_path_factory.mktemp("concurrency-cache")


@pytest.fixture(scope="module")
def images(tiny):
    """512 distinct preprocessed crops of the bundled photos (seeded), one (3, H, W) array each."""
    from lens.runtime.samples import augmented_jpegs

    jpegs = [b for _, b, _ in augmented_jpegs(THREADS * PER_THREAD, seed=3601)]
    x = np.stack([tiny.prepare(b) for b in jpegs])
    assert len({row.tobytes() for row in x}) == len(x)
    return x


def _backend(kind: str, cache, tiny):
    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor

    if kind == "onnx":
        return tiny.model.backend
    if kind == "torch":
        return Predictor.from_config(ModelConfig(**TINY, backend="torch", device="cpu")).model.backend
    if kind == "openvino-fp32":
        return Predictor.from_config(ModelConfig(**TINY, backend="openvino", cache_dir=cache)).model.backend
    if kind == "openvino-2streams":  # a Serve replica's two concurrent batches: two streams of one thread
        return Predictor.from_config(ModelConfig(**TINY, backend="openvino", cache_dir=cache, num_threads=1,
                                                 streams=2)).model.backend
    # int8: the quantized model itself (random weights fail the accuracy gate, so a Predictor would serve fp32)
    from pathlib import Path

    from lens.runtime.loading import load_model
    from lens.runtime.openvino import OpenVinoBackend

    int8 = load_model(ModelConfig(**TINY, backend="openvino", precision="int8", cache_dir=cache))
    assert int8.quantization["served"] == "fp32"  # the gate refused it; the int8 model is built all the same
    (xml,) = Path(cache).glob(f"openvino/{int8.onnx_path.stem}-*int8*/model.xml")
    return OpenVinoBackend(xml, "int8")


@pytest.mark.parametrize("kind", ["onnx", "torch", "openvino-fp32", "openvino-2streams", "openvino-int8"])
def test_concurrent_runs_give_the_sequential_results(kind, images, cache, tiny):
    backend = _backend(kind, cache, tiny)
    sizes = (1, 3, 4, 8)  # batches of several sizes: concurrent callers never line up

    def batches(rows):
        i, k = 0, 0
        while i < len(rows):
            yield rows[i : i + sizes[k % len(sizes)]]
            i += sizes[k % len(sizes)]
            k += 1

    # the reference: the same instance, one call at a time, with the same batch layout
    width = backend.run(images[:1])  # (logits, features) widths
    ref_logits = np.zeros((len(images), width[0].shape[1]), np.float32)
    ref_feats = np.zeros((len(images), width[1].shape[1]), np.float32)
    for t in range(THREADS):
        for rows in batches(np.arange(t * PER_THREAD, (t + 1) * PER_THREAD)):
            ref_logits[rows], ref_feats[rows] = backend.run(images[rows])

    logits = np.full_like(ref_logits, np.nan)
    feats = np.full_like(ref_feats, np.nan)

    def worker(t: int) -> None:
        for rows in batches(np.arange(t * PER_THREAD, (t + 1) * PER_THREAD)):
            logits[rows], feats[rows] = backend.run(images[rows])

    at_once(THREADS, worker)  # released together; fails naming any thread's exception
    cos = (feats * ref_feats).sum(1) / (np.linalg.norm(feats, axis=1) * np.linalg.norm(ref_feats, axis=1))
    wrong = np.flatnonzero(~(cos > 0.9999))
    assert wrong.size == 0, f"{kind}: {wrong.size} of {len(images)} rows differ (min cosine {np.nanmin(cos):.3f})"
    assert np.allclose(feats, ref_feats, atol=1e-3) and np.allclose(logits, ref_logits, atol=1e-3)
    if kind.startswith("openvino"):  # one request per concurrent caller, not one request behind a lock
        assert 1 < backend.requests <= THREADS

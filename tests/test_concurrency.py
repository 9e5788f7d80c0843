"""Every backend is safe under concurrent ``run()`` calls: 8 threads x 64 distinct images through one backend
instance give the sequential results, row by row (OpenVINO once shared one infer request between threads and
handed rows another image's embedding)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytestmark = pytest.mark.slow

THREADS, PER_THREAD = 8, 64


@pytest.fixture(scope="module")
def images(lite0_onnx):
    """512 distinct preprocessed crops of the bundled photos (seeded), one (3, H, W) array each."""
    from lens.samples import augmented_jpegs

    jpegs = [b for _, b, _ in augmented_jpegs(THREADS * PER_THREAD, seed=3601)]
    x = np.stack([lite0_onnx.prepare(b) for b in jpegs])
    assert len({row.tobytes() for row in x}) == len(x)
    return x


def _backend(kind: str, lens_cache, lite0_onnx, lite0_torch):
    from lens.config import ModelConfig
    from lens.predictor import Predictor

    if kind == "onnx":
        return lite0_onnx.model.backend
    if kind == "torch":
        return lite0_torch.model.backend
    precision = kind.split("-")[1]
    p = Predictor.from_config(ModelConfig(backend="openvino", precision=precision, cache_dir=lens_cache))
    assert p.identity().precision == precision
    return p.model.backend


@pytest.mark.parametrize("kind", ["onnx", "torch", "openvino-fp32", "openvino-int8"])
def test_concurrent_runs_give_the_sequential_results(kind, images, lens_cache, lite0_onnx, lite0_torch):
    backend = _backend(kind, lens_cache, lite0_onnx, lite0_torch)
    sizes = (1, 3, 4, 8)  # batches of several sizes: concurrent callers never line up

    def batches(rows):
        i, k = 0, 0
        while i < len(rows):
            yield rows[i : i + sizes[k % len(sizes)]]
            i += sizes[k % len(sizes)]
            k += 1

    # the reference: the same instance, one call at a time, with the same batch layout
    ref_logits = np.zeros((len(images), 1000), np.float32)
    ref_feats = np.zeros((len(images), 1280), np.float32)
    for t in range(THREADS):
        for rows in batches(np.arange(t * PER_THREAD, (t + 1) * PER_THREAD)):
            ref_logits[rows], ref_feats[rows] = backend.run(images[rows])

    logits = np.full_like(ref_logits, np.nan)
    feats = np.full_like(ref_feats, np.nan)
    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            start.wait()
            for rows in batches(np.arange(t * PER_THREAD, (t + 1) * PER_THREAD)):
                logits[rows], feats[rows] = backend.run(images[rows])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    cos = (feats * ref_feats).sum(1) / (np.linalg.norm(feats, axis=1) * np.linalg.norm(ref_feats, axis=1))
    wrong = np.flatnonzero(~(cos > 0.9999))
    assert wrong.size == 0, f"{kind}: {wrong.size} of {len(images)} rows differ (min cosine {np.nanmin(cos):.3f})"
    assert np.allclose(feats, ref_feats, atol=1e-3) and np.allclose(logits, ref_logits, atol=1e-3)
    if kind.startswith("openvino"):  # one request per concurrent caller, not one request behind a lock
        assert 1 < backend.requests <= THREADS

"""The model runtime: real weights on real photos, backend agreement, weights sources, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lens.errors import ConfigError, UnknownModelError, WeightsError
from lens.runtime.config import ModelConfig
from lens.runtime.loading import load_model, onnx_cache_paths
from lens.runtime.predictor import Predictor

pytestmark = pytest.mark.slow

TABBY, TIGER_CAT, ESPRESSO = 281, 282, 967


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_real_weights_on_real_photos(request, photos, backend):
    predictor = request.getfixturevalue(f"lite0_{backend}")
    cat, coffee = predictor.predict([photos["chelsea.png"], photos["coffee.png"]], top_k=5)
    assert cat.tags[0].class_id in (TABBY, TIGER_CAT)
    assert {TABBY, TIGER_CAT} <= {t.class_id for t in cat.tags}
    assert coffee.tags[0].class_id == ESPRESSO and coffee.tags[0].label == "espresso"
    assert coffee.tags[0].score > 0.9
    scores = [t.score for t in cat.tags]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001


def test_embedding_is_pooled_l2_normalised_float32(lite0_onnx, photos):
    (pred,) = lite0_onnx.predict([photos["coffee.png"]])
    assert pred.embedding.shape == (1280,) and pred.embedding.dtype == np.float32
    assert abs(float(np.linalg.norm(pred.embedding)) - 1.0) < 1e-5
    assert lite0_onnx.embed_dim == 1280


def test_backends_agree(lite0_onnx, lite0_torch, photos):
    items = list(photos.values())
    a = lite0_onnx.predict(items)
    b = lite0_torch.predict(items)
    for name, ra, rb in zip(photos, a, b):
        assert ra.tags[0].class_id == rb.tags[0].class_id, name
        cos = float(ra.embedding @ rb.embedding)
        assert cos >= 0.999, (name, cos)


def test_auto_picks_the_faster_cpu_runtime_once_and_reports_it(lite0_onnx, lens_cache):
    model = load_model(ModelConfig(cache_dir=lens_cache))
    info = model.info()
    choice = info["backend_choice"]
    assert set(choice["images_per_s_batch8"]) == {"onnx", "openvino"}
    assert info["backend"] == choice["picked"] == max(choice["images_per_s_batch8"],
                                                      key=choice["images_per_s_batch8"].get)
    assert info["device"] == "cpu"
    again = load_model(ModelConfig(cache_dir=lens_cache)).info()["backend_choice"]
    assert again == choice  # measured once, then read from the cache
    assert info["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert info["preprocess"]["interpolation"] == "bicubic"
    assert len(info["weights_sha256"]) == 64 and info["weights"].startswith("embedded:")


def test_onnx_export_is_cached_and_reused(lite0_onnx, lens_cache, monkeypatch):
    """A second replica opens the cached export; it neither re-exports nor imports the model code."""
    import lens.runtime.loading

    def no_export(*a, **k):
        raise AssertionError("re-exported although the cache is warm")

    monkeypatch.setattr(lens.runtime.loading, "export_onnx", no_export)
    monkeypatch.setattr(lens.runtime.loading, "build_torch", no_export)
    model = load_model(ModelConfig(backend="onnx", cache_dir=lens_cache))
    assert model.onnx_path == lite0_onnx.model.onnx_path and model.onnx_path.is_file()
    meta = json.loads(onnx_cache_paths(ModelConfig(cache_dir=lens_cache), model.weights)[1].read_text())
    assert meta["weights_sha256"] == model.weights.sha256 and len(meta["labels"]) == 1000


def test_warmup_runs_a_batch_of_the_asked_size_before_it_reports_warm(lens_cache):
    p = Predictor.from_config(ModelConfig(name="test_efficientnet", weights="random", backend="onnx",
                                          cache_dir=lens_cache))
    assert p.warmed_up is False and p.info()["warmed_up"] is False
    shapes = []
    real = p.infer
    p.infer = lambda batch: shapes.append(batch.shape) or real(batch)
    p.warmup(4)
    assert shapes == [(4, *p.model.preprocess.input_size)]  # one real model call on a dummy batch of 4
    assert p.warmed_up is True and p.info()["warmed_up"] is True


def test_unknown_model_name_is_a_clear_error(lens_cache):
    with pytest.raises(UnknownModelError, match="did you mean efficientnet_b"):
        load_model(ModelConfig(name="efficientnet_b9", cache_dir=lens_cache))
    with pytest.raises(UnknownModelError, match="resnet50"):
        load_model(ModelConfig(name="resnet50", weights="random", cache_dir=lens_cache))


def test_timm_native_names_tags_hub_names_and_a_preprocessing_overlay(lens_cache, tmp_path):
    import torch

    from lens.runtime.loading import onnx_cache_paths
    from lens.runtime.weights import resolve_weights

    assert ModelConfig(name="hf-hub:timm/efficientnet_b0.ra_in1k").name == "efficientnet_b0.ra_in1k"
    with pytest.raises(UnknownModelError, match="no pretrained tag 'nope'; its tags: r160_in1k"):
        load_model(ModelConfig(name="test_efficientnet.nope", weights="random", cache_dir=lens_cache))
    # a tag takes timm's pretrained config for that tag (here 160 px), the weights from a local file
    import timm

    ckpt = tmp_path / "w.pth"
    torch.save({"state_dict_ema": timm.create_model("test_efficientnet").state_dict()}, ckpt)  # timm's loader
    tagged = load_model(ModelConfig(name="hf-hub:timm/test_efficientnet.r160_in1k", weights=str(ckpt),
                                    backend="onnx", cache_dir=lens_cache))
    assert tagged.name == "test_efficientnet.r160_in1k" and tagged.preprocess.input_size == (3, 160, 160)
    over = ModelConfig(name="test_efficientnet.r160_in1k", weights=str(ckpt), backend="onnx", cache_dir=lens_cache,
                       pretrained_cfg_overlay={"input_size": (3, 128, 128), "crop_pct": 1.0})
    loaded = load_model(over)
    assert loaded.preprocess.input_size == (3, 128, 128) and loaded.preprocess.crop_pct == 1.0
    assert loaded.identity().mismatch(tagged.identity()) == ["preprocess"]
    ref = resolve_weights(over.name, over.weights, lens_cache)
    assert onnx_cache_paths(over, ref)[0] != onnx_cache_paths(over.model_copy(update={"pretrained_cfg_overlay": None}),
                                                               ref)[0]  # another export, not a stale one
    with pytest.raises(ValueError, match="pretrained_cfg_overlay keys"):
        ModelConfig(pretrained_cfg_overlay={"num_classes": 3})
    bad = tmp_path / "bad.pth"
    sd = timm.create_model("test_efficientnet").state_dict()
    sd["conv_stem.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(sd, bad)
    with pytest.raises(WeightsError, match="conv_stem.weight"):  # Lens's message names the tensor
        load_model(ModelConfig(name="test_efficientnet", weights=str(bad), backend="torch", device="cpu",
                               cache_dir=lens_cache))


def test_missing_weights_is_a_clear_error(lens_cache):
    with pytest.raises(WeightsError, match="--weights"):
        load_model(ModelConfig(name="efficientnet_b0", cache_dir=lens_cache))
    with pytest.raises(WeightsError, match="not found"):
        load_model(ModelConfig(name="efficientnet_b0", weights="/nonexistent/b0.pth", cache_dir=lens_cache))


def _tiny_checkpoint(tmp_path, num_classes: int, fmt: str, wrap: bool = False, seed: int = 1):
    import timm
    import torch

    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", num_classes=num_classes).eval()
    sd = model.state_dict()
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}} if wrap else sd, path)
    return model, path


@pytest.mark.parametrize("fmt,wrap", [("pth", False), ("pth", True), ("safetensors", False)])
def test_local_checkpoint_with_custom_head_and_labels(tmp_path, lens_cache, photos, fmt, wrap):
    import torch

    model, path = _tiny_checkpoint(tmp_path, 3, fmt, wrap)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ncoffee\nrocket\n")
    for backend in ("torch", "onnx"):
        p = Predictor.from_config(ModelConfig(name="test_efficientnet", weights=str(path), labels=str(labels),
                                              backend=backend, device="cpu", cache_dir=lens_cache))
        assert p.model.num_classes == 3  # inferred from the checkpoint's classifier
        assert p.model.weights.sha256 != "random-seed0"
        x = p.prepare(photos["chelsea.png"])
        logits, _ = p.infer(x[None])
        with torch.inference_mode():
            ref = model(torch.from_numpy(x[None])).numpy()
        assert np.allclose(logits, ref, rtol=1e-3, atol=1e-4)
        (pred,) = p.predict([photos["chelsea.png"]], top_k=3)
        # the custom labels, in the order of the checkpoint's own logits
        assert [t.label for t in pred.tags] == [["cat", "coffee", "rocket"][i] for i in np.argsort(-ref[0])]


def test_checkpoint_that_does_not_fit_names_the_tensors(tmp_path, lens_cache):
    _, path = _tiny_checkpoint(tmp_path, 3, "pth")
    with pytest.raises(WeightsError, match="does not fit"):
        load_model(ModelConfig(name="efficientnet_b0", weights=str(path), backend="torch", cache_dir=lens_cache))
    with pytest.raises(WeightsError, match="3-class classifier but num_classes=5"):
        load_model(ModelConfig(name="test_efficientnet", weights=str(path), num_classes=5, backend="torch",
                               cache_dir=lens_cache))
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read checkpoint"):
        load_model(ModelConfig(name="test_efficientnet", weights=str(bad), backend="torch", cache_dir=lens_cache))


def test_labels_file_must_match_the_head(tmp_path, lens_cache):
    _, path = _tiny_checkpoint(tmp_path, 3, "pth")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["a", "b"]))
    with pytest.raises(ConfigError, match="2 names but the model has 3 classes"):
        load_model(ModelConfig(name="test_efficientnet", weights=str(path), labels=str(labels), backend="torch",
                               cache_dir=lens_cache))


def test_embedded_mapping_checks_every_shape():
    import torch

    from lens.runtime.weights import map_by_order

    model_sd = {"a.weight": torch.zeros(2, 3), "b.bias": torch.zeros(2)}
    assert set(map_by_order({"x": torch.ones(2, 3), "y": torch.ones(2)}, model_sd, "pkg")) == {"a.weight", "b.bias"}
    with pytest.raises(WeightsError, match="tensor #1 y"):
        map_by_order({"x": torch.ones(2, 3), "y": torch.ones(3)}, model_sd, "pkg")
    with pytest.raises(WeightsError, match="1 tensors"):
        map_by_order({"x": torch.ones(2, 3)}, model_sd, "pkg")


def test_s3_weights_download_once_into_a_checksum_keyed_cache(tmp_path, moto_endpoint, photos):
    import boto3

    _, path = _tiny_checkpoint(tmp_path, 4, "safetensors")
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="models")
    s3.upload_file(str(path), "models", "tiny/ckpt.safetensors")
    cache = tmp_path / "cache"
    cfg = ModelConfig(name="test_efficientnet", weights="s3://models/tiny/ckpt.safetensors", backend="torch",
                      cache_dir=cache)
    first = load_model(cfg)
    blobs = list((cache / "weights" / "blobs").iterdir())
    assert [b.name for b in blobs] == [f"{first.weights.sha256}.safetensors"]
    mtime = blobs[0].stat().st_mtime_ns
    second = load_model(cfg)
    assert second.weights.sha256 == first.weights.sha256
    assert blobs[0].stat().st_mtime_ns == mtime  # not downloaded again
    assert first.num_classes == 4
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_model(ModelConfig(name="test_efficientnet", weights="s3://models/missing.pth", cache_dir=cache))
    # new weights under the same key (a new ETag): downloaded again, and the new checksum is what loads
    _, newer = _tiny_checkpoint(tmp_path / "v2", 4, "safetensors", seed=2)
    s3.upload_file(str(newer), "models", "tiny/ckpt.safetensors")
    third = load_model(cfg)
    assert third.weights.sha256 != first.weights.sha256
    assert sorted(b.name for b in (cache / "weights" / "blobs").iterdir()) == sorted(
        f"{w.weights.sha256}.safetensors" for w in (first, third))


def test_config_rejects_bad_values_before_loading():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="device"):
        ModelConfig(device="tpu")
    with pytest.raises(ValidationError, match="safetensors"):
        ModelConfig(weights="model.ckpt")
    with pytest.raises(ValidationError):
        ModelConfig(backend="tensorrt")
    with pytest.raises(ValidationError):
        ModelConfig(unknown_knob=1)


def test_onnx_on_cuda_is_refused():
    from lens.runtime.loading import resolve_backend

    with pytest.raises(ConfigError, match="ONNX Runtime on CPU"):
        resolve_backend("onnx", "cuda")
    assert resolve_backend("auto", "cuda") == "torch" and resolve_backend("auto", "cpu") == "onnx"  # then measured


_LOAD = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from lens.runtime.config import ModelConfig
from lens.runtime.predictor import Predictor
p = Predictor.from_config(ModelConfig(name="test_efficientnet", weights="random", backend="onnx", cache_dir=sys.argv[1]))
print(json.dumps({"onnx": str(p.model.onnx_path), "embedding": [float(v) for v in p.predict([open(sys.argv[2], "rb").read()])[0].embedding[:8]]}))
"""


def test_replicas_starting_together_export_once_under_the_lock(tmp_path):
    """Four processes load the same model into an empty cache at once: one exports, the others wait for it
    and load its file."""
    import subprocess
    import sys

    from lens.runtime.samples import sample_path

    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD, str(cache), str(sample_path("coffee.png"))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    exports = sum(err.count("exported test_efficientnet to ONNX") for _, err in outs)
    results = [json.loads(out) for out, _ in outs]
    assert exports == 1, [err[-500:] for _, err in outs]
    assert len({r["onnx"] for r in results}) == 1 and len(list((cache / "onnx").glob("*.onnx"))) == 1
    assert all(np.allclose(r["embedding"], results[0]["embedding"], atol=1e-6) for r in results)

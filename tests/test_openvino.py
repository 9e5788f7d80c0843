"""The OpenVINO backend: fp32 agrees with ONNX Runtime; int8 serves only after the accuracy gate."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def held(lite0_onnx):
    from lens.runtime import int8_gate
    from lens.runtime.preprocess import Preprocessor

    return int8_gate.preprocess_all(int8_gate.held_out_images(32), Preprocessor(lite0_onnx.model.preprocess),
                                    what="held-out")


@pytest.fixture(scope="module")
def lite0_int8(lens_cache):
    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor

    return Predictor.from_config(ModelConfig(backend="openvino", precision="int8", cache_dir=lens_cache))


def test_openvino_fp32_matches_onnx_runtime_on_real_photos(lens_cache, lite0_onnx, photos, held):
    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor

    ov = Predictor.from_config(ModelConfig(backend="openvino", cache_dir=lens_cache))
    assert ov.info()["backend"] == "openvino" and ov.identity().precision == "fp32"
    # never pinned: OpenVINO pins every process's threads to the same first cores, so two model processes on one
    # node (two embed actors, two replicas) would share one core (scripts/bench_batch.py, batch-openvino.json)
    assert ov.model.backend._compiled.get_property("ENABLE_CPU_PINNING") is False
    a, b = lite0_onnx.model.backend.run(held), ov.model.backend.run(held)
    assert np.allclose(a[0], b[0], atol=1e-3) and np.allclose(a[1], b[1], atol=1e-3)
    res = ov.predict(list(photos.values()))
    assert [r.tags[0].label for r in res] == [r.tags[0].label for r in lite0_onnx.predict(list(photos.values()))]
    assert res[list(photos).index("coffee.png")].tags[0].label == "espresso"


def test_int8_passes_the_gate_and_serves_int8(lite0_int8, lite0_onnx, photos):
    q = lite0_int8.model.quantization
    assert q["served"] == "int8" and q["passed"] and q["failed"] == []
    assert q["top1_agreement"] >= 0.85 and q["mean_cosine"] >= 0.98 and q["recall_at_10_vs_fp32_index"] >= 0.93
    assert q["images"] == 96 and q["calibration"].startswith("bundled") and "cpu_flags" in q
    ident = lite0_int8.identity()
    assert ident.precision == "int8" and ident.backend == "openvino"
    assert ident.mismatch(lite0_onnx.identity()) == []  # gated on recall: int8 queries may search fp32 indexes
    res = lite0_int8.predict([photos["coffee.png"], photos["chelsea.png"]])
    assert res[0].tags[0].label == "espresso" and res[1].tags[0].class_id in (281, 282)
    info = lite0_int8.info()
    assert info["precision"] == "int8" and info["quantization"]["served"] == "int8"


def test_int8_agreement_holds_on_images_that_never_chose_the_recipe(lite0_int8, lite0_onnx):
    """The gate's 96 crops chose the int8 recipe; its verdict is re-measured on 96 new crops (a new seed, photos
    calibration never saw), against the same thresholds: the recipe is not fitted to the gate's sample."""
    from lens.runtime import int8_gate
    from lens.runtime.preprocess import Preprocessor
    from lens.runtime.samples import augmented_jpegs

    fresh = [b for _, b, _ in augmented_jpegs(96, seed=20261203, paths=int8_gate._photos(1))]
    assert not set(fresh) & (set(int8_gate.held_out_images(96)) | set(int8_gate.calibration_images(None)))
    x = int8_gate.preprocess_all(fresh, Preprocessor(lite0_onnx.model.preprocess), what="fresh")
    verdict = int8_gate.judge(lite0_onnx.model.backend.run, lite0_int8.model.backend.run, x,
                              lite0_onnx.model.labels, int8_gate.GateThresholds())
    print(f"\nint8 vs fp32 on 96 fresh crops: {verdict}")
    assert verdict["passed"], verdict


def test_gate_report_is_stored_and_shown_by_lens_models(lite0_int8, lens_cache, capsys):
    from lens.cli import main as cli

    from lens.runtime.openvino import gate_reports

    (report,) = [r for r in gate_reports(lens_cache) if r["calibration"].startswith("bundled")]
    assert report["passed"] and report["model"] == "tf_efficientnet_lite0"
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "int8 accuracy-gate reports" in out and "passed; top-1 agreement" in out


def test_a_broken_calibration_is_refused_and_fp32_serves_loudly(lite0_int8, lens_cache, tmp_path):
    from conftest import encode
    from PIL import Image

    from lens.runtime.config import ModelConfig
    from lens.runtime.openvino import gate_reports
    from lens.runtime.predictor import Predictor

    black = tmp_path / "black"
    black.mkdir()
    for i in range(16):
        (black / f"{i}.png").write_bytes(encode(Image.new("RGB", (256 + i, 256), "black"), "PNG"))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("lens.runtime.loading").addHandler(handler)
    try:
        p = Predictor.from_config(ModelConfig(backend="openvino", precision="int8", calibration=str(black),
                                              cache_dir=lens_cache))
    finally:
        logging.getLogger("lens.runtime.loading").removeHandler(handler)
    q = p.model.quantization
    assert q["served"] == "fp32" and not q["passed"] and q["failed"]
    assert p.model.backend.precision == "fp32" and p.identity().precision == "fp32"
    assert any("REFUSED by the accuracy gate" in r.getMessage() for r in records)
    # the cache is keyed by the calibration set: two int8 variants now, each with its own report
    assert len([r for r in gate_reports(lens_cache) if r["model"] == "tf_efficientnet_lite0"]) == 2
    again = Predictor.from_config(ModelConfig(backend="openvino", precision="int8", calibration=str(black),
                                              cache_dir=lens_cache))
    assert again.model.quantization["top1_agreement"] == q["top1_agreement"]  # reused, not re-quantized
    assert len(list((Path(lens_cache) / "openvino").glob("*int8*/model.xml"))) == 2


def test_bad_calibration_inputs_get_clear_errors(tmp_path):
    from lens.errors import ConfigError
    from lens.runtime.int8_gate import calibration_images, preprocess_all
    from lens.runtime.preprocess import PreprocessConfig, Preprocessor

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        calibration_images(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="does not exist"):
        calibration_images(str(tmp_path / "missing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    images = calibration_images(str(tmp_path / "bad"))
    pp = Preprocessor(PreprocessConfig(input_size=(3, 32, 32), interpolation="bilinear", mean=(0.5,) * 3,
                                       std=(0.5,) * 3, crop_pct=1.0))
    with pytest.raises(ConfigError, match="1 calibration image.*could not be decoded"):
        preprocess_all(images, pp, what="calibration")


def test_int8_needs_the_openvino_backend():
    from lens.errors import ConfigError
    from lens.runtime.config import ModelConfig, validate

    with pytest.raises(ConfigError, match="precision int8 runs on the openvino backend"):
        validate(ModelConfig, {"backend": "onnx", "precision": "int8"})
    assert ModelConfig(precision="int8").backend == "auto"  # auto + int8 resolves to openvino


def test_int8_without_nncf_installed_names_the_extra(tmp_path, monkeypatch):
    """NNCF is the optional ``int8`` extra: asking for int8 without it is one clear error, before any work."""
    import lens.runtime.openvino as ov
    from lens.errors import ConfigError
    from lens.runtime.config import ModelConfig
    from lens.runtime.loading import load_model

    real = ov.package_version
    monkeypatch.setattr(ov, "package_version", lambda name: (_ for _ in ()).throw(ImportError(name)) if name == "nncf"
                        else real(name))
    with pytest.raises(ConfigError, match=r"pip install 'lens-vision\[int8\]'"):
        load_model(ModelConfig(name="test_efficientnet", weights="random", backend="openvino", precision="int8",
                               cache_dir=tmp_path))


def test_a_warm_int8_start_imports_neither_nncf_nor_torch(lite0_int8, lens_cache):
    """NNCF (about 5 s to import) is needed only to build an int8 model: a warm start reads its version, part of
    the cache key, from package metadata, and imports only openvino."""
    import json
    import subprocess
    import sys

    code = ("import json, sys\n"
            "from lens.runtime.config import ModelConfig\nfrom lens.runtime.predictor import Predictor\n"
            "p = Predictor.from_config(ModelConfig(backend='openvino', precision='int8'))\n"
            "print(json.dumps([p.identity().precision, sorted({m.split('.')[0] for m in sys.modules} & "
            "{'nncf', 'torch', 'timm'})]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=__import__("os").environ | {"LENS_CACHE_DIR": str(lens_cache)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ["int8", []]


def test_an_image_search_embeds_in_the_index_model_space(lite0_int8, lite0_onnx, photos, tmp_path, capsys):
    """An index built with OpenVINO int8, searched by image from a command whose `auto` picks an fp32 backend:
    the query is embedded with the index's backend and precision, so a stored image finds itself exactly."""
    from lens.cli import main as cli
    from lens.index.build import BuildConfig, build_index
    from test_index import write_part

    names = sorted(photos)
    vectors = np.stack([r.embedding for r in lite0_int8.predict([photos[n] for n in names])])
    ident = lite0_int8.identity()
    assert (ident.backend, ident.precision) == ("openvino", "int8")
    write_part(tmp_path / "emb" / "part-0.parquet", names, vectors, model=ident.to_dict())
    build_index(BuildConfig(embeddings=[str(tmp_path / "emb")], output=str(tmp_path / "idx"), index="flat"),
                log=lambda *a: None)
    query = tmp_path / "query.png"
    query.write_bytes(photos["chelsea.png"])
    assert cli.main(["index", "search", "--index", str(tmp_path / "idx"), "--image", str(query), "-k", "3"]) == 0
    out = capsys.readouterr()
    hits = json.loads(out.out)["results"]
    assert hits[0]["id"] == "chelsea.png" and hits[0]["score"] > 0.9999, hits
    assert "query embedded with tf_efficientnet_lite0 on openvino int8 on cpu" in out.err
    # the fp32 embedding of the same photo is close but not the stored vector: the test tells the two apart
    (fp32,) = lite0_onnx.predict([photos["chelsea.png"]])
    assert float(fp32.embedding @ vectors[names.index("chelsea.png")]) < 0.9999

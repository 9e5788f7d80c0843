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

    return int8_gate.preprocess_all(int8_gate.holdout_images(None, 32), Preprocessor(lite0_onnx.model.preprocess),
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
    from lens.runtime import int8_gate

    q = lite0_int8.model.quantization
    assert q["served"] == "int8" and q["passed"] and q["failed"] == []
    assert q["top1_agreement"] >= 0.85 and q["mean_cosine"] >= 0.98 and q["recall_at_10_vs_fp32_index"] >= 0.93
    assert q["recall_at_10_vs_int8_index"] >= 0.93
    assert q["images"] == 96 and q["calibration"].startswith("bundled") and "cpu_flags" in q
    assert q["holdout"] == int8_gate.DEFAULT_HOLDOUT and len(q["holdout_sha256"]) == 64
    ident = lite0_int8.identity()
    assert ident.precision == "int8" and ident.backend == "openvino" and ident.space() == "int8"
    assert ident.mismatch(lite0_onnx.identity()) == []  # the same model: the precision space is checked apart
    assert ident.quantization["calibration_sha256"] == q["calibration_sha256"]
    assert ident.quantization["recall_at_10_vs_fp32_index"] == q["recall_at_10_vs_fp32_index"]
    assert ident.outputs_key() != lite0_onnx.identity().outputs_key()
    res = lite0_int8.predict([photos["coffee.png"], photos["chelsea.png"]])
    assert res[0].tags[0].label == "espresso" and res[1].tags[0].class_id in (281, 282)
    info = lite0_int8.info()
    assert info["precision"] == "int8" and info["quantization"]["served"] == "int8"


def test_int8_agreement_holds_on_images_that_never_chose_the_recipe(lite0_int8, lite0_onnx):
    """The gate judges on crops of photos that never chose anything (scikit-learn's, matplotlib's); its verdict
    holds on 96 more crops of the bundled photos calibration never saw (a new seed), against the same
    thresholds."""
    from lens.runtime import int8_gate
    from lens.runtime.preprocess import Preprocessor
    from lens.runtime.samples import PHOTOS, augmented_jpegs, unseen_photo_paths

    assert unseen_photo_paths() and not {p.name for p in unseen_photo_paths()} & set(PHOTOS)
    fresh = [b for _, b, _ in augmented_jpegs(96, seed=20261203, paths=int8_gate._photos(1))]
    assert not set(fresh) & (set(int8_gate.holdout_images(None)) | set(int8_gate.calibration_images(None)))
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


def test_an_image_search_of_an_index_quantized_with_another_calibration_set_names_the_flag(
        lite0_int8, photos, tmp_path, capsys, monkeypatch):
    """An index of int8 rows from a model quantized with the user's own calibration set: `lens index search
    --image` with the bundled calibration is refused (exit 2) naming --calibration; with --calibration and
    --int8-holdout the query's model is configured with those sets (the index's model space)."""
    from lens.cli import main as cli
    from lens.index.build import BuildConfig, build_index
    from lens.runtime.predictor import Predictor
    from test_index import write_part

    names = sorted(photos)
    vectors = np.stack([r.embedding for r in lite0_int8.predict([photos[n] for n in names])])
    ident = lite0_int8.identity().to_dict()
    ident["quantization"] = dict(ident["quantization"], calibration_sha256="0" * 64)  # another calibration set
    write_part(tmp_path / "emb" / "part-0.parquet", names, vectors, model=ident)
    build_index(BuildConfig(embeddings=[str(tmp_path / "emb")], output=str(tmp_path / "idx"), index="flat"),
                log=lambda *a: None)
    query = tmp_path / "query.png"
    query.write_bytes(photos["chelsea.png"])
    argv = ["index", "search", "--index", str(tmp_path / "idx"), "--image", str(query)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "another int8 model" in err and "--calibration DIR" in err, err

    seen = []
    monkeypatch.setattr(Predictor, "from_config", classmethod(lambda cls, cfg: seen.append(cfg) or lite0_int8))
    assert cli.main(argv + ["--calibration", str(tmp_path / "mine"), "--int8-holdout", str(tmp_path / "held")]) == 2
    (cfg,) = seen
    assert (cfg.backend, cfg.precision) == ("openvino", "int8")
    assert (cfg.calibration, cfg.int8_holdout) == (str(tmp_path / "mine"), str(tmp_path / "held"))
    err = capsys.readouterr().err
    assert "another int8 model" in err and "--calibration DIR" not in err, err  # this model is still not the index's


def test_the_gate_judges_on_the_held_out_set_the_user_names(lite0_int8, lens_cache, tmp_path, photos):
    """model.int8_holdout: the gate re-judges the cached int8 model on the user's images (no new quantization),
    its report named by and stored for that set; the default set's report stays as it was."""
    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor

    mine = tmp_path / "holdout"
    mine.mkdir()
    for name, data in photos.items():
        (mine / name).write_bytes(data)
    p = Predictor.from_config(ModelConfig(backend="openvino", precision="int8", int8_holdout=str(mine),
                                          cache_dir=lens_cache))
    q, default = p.model.quantization, lite0_int8.model.quantization
    assert q["holdout"] == str(mine) and q["images"] == len(photos) and q["holdout_sha256"] != default["holdout_sha256"]
    assert q["calibration_sha256"] == default["calibration_sha256"]  # the same int8 model, judged again
    variant = [d for d in (Path(lens_cache) / "openvino").glob("*int8*cal" + default["calibration_sha256"][:16])]
    assert len(variant) == 1 and len(list(variant[0].glob("gate-*.json"))) >= 2
    assert p.identity().quantized_by() == lite0_int8.identity().quantized_by()  # same outputs: same cache key
    assert p.identity().outputs_key() == lite0_int8.identity().outputs_key()


def test_precision_spaces_meet_only_where_the_index_records_their_measured_agreement(
        local_ray, lite0_int8, lite0_onnx, lens_cache, tmp_path, photos):
    """lens embed runs int8 where the gate passes; an int8 index records its gate's figure and answers fp32
    queries; an fp32 index refuses int8 queries (409) until built with --int8-compat, and then only those of
    the int8 model it measured."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lens.batch.config import EmbedConfig
    from lens.batch.job import run_embed
    from lens.errors import ModelMismatchError
    from lens.identity import COMPAT_KEY, ModelIdentity
    from lens.index.build import BuildConfig, build_index
    from lens.index.search import SearchService
    from lens.runtime.samples import augmented_jpegs

    rows = [(f"p{i:03d}", b) for i, (_, b, _) in enumerate(augmented_jpegs(40, seed=11))]
    rows += sorted(photos.items())
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [r[0] for r in rows], "image": pa.array([r[1] for r in rows], pa.binary())}),
                   tmp_path / "in" / "a.parquet")
    cfg = EmbedConfig(input=str(tmp_path / "in"), output=str(tmp_path / "emb-int8"),
                      model={"backend": "openvino", "precision": "int8", "cache_dir": str(lens_cache)})
    assert run_embed(cfg, log=lambda *a: None).embedded == len(rows)
    # the same rows in fp32, as lens embed writes them (its fp32 path is tests/test_batch.py's)
    from test_index import write_part

    vectors = np.stack([r.embedding for r in lite0_onnx.predict([r[1] for r in rows])])
    write_part(tmp_path / "emb-fp32" / "part-0.parquet", [r[0] for r in rows], vectors,
               model=lite0_onnx.identity().to_dict())
    m8 = json.loads((tmp_path / "emb-int8" / "manifest.json").read_text())
    ident8 = ModelIdentity.from_dict(m8)
    assert ident8.precision == "int8" and ident8.quantized_by() == lite0_int8.identity().quantized_by()
    assert m8["served"]["int8_gate"]["served"] == "int8"
    # the rows are the int8 model's: as the online int8 predictor embeds them, and not the fp32 rows
    t8 = pa.concat_tables([pq.read_table(tmp_path / "emb-int8" / f) for f in m8["files"]])
    got = dict(zip(t8.column("id").to_pylist(), np.asarray(t8.column("embedding").to_pylist(), np.float32)))
    online8 = lite0_int8.predict([photos["coffee.png"]])[0].embedding
    online32 = lite0_onnx.predict([photos["coffee.png"]])[0].embedding
    assert float(got["coffee.png"] @ online8) >= 0.9999 and float(got["coffee.png"] @ online32) < 0.9999

    quiet = {"queries": 10}
    build_index(BuildConfig(embeddings=[str(tmp_path / "emb-int8")], output=str(tmp_path / "idx8"), **quiet),
                log=lambda *a: None)
    svc8 = SearchService(str(tmp_path / "idx8"))
    compat8 = svc8.version.manifest[COMPAT_KEY]["float"]
    assert compat8["recall_at_10"] == lite0_int8.model.quantization["recall_at_10_vs_int8_index"]
    assert compat8["allowed"] and compat8["min_recall_at_10"] == 0.93
    svc8.check_model(lite0_int8.info())  # its own space
    svc8.check_model(lite0_onnx.info())  # fp32 queries: measured, allowed

    build_index(BuildConfig(embeddings=[str(tmp_path / "emb-fp32")], output=str(tmp_path / "idx32"), **quiet),
                log=lambda *a: None)
    svc32 = SearchService(str(tmp_path / "idx32"))
    assert svc32.version.manifest[COMPAT_KEY] == {}
    svc32.check_model(lite0_onnx.info())
    with pytest.raises(ModelMismatchError, match="never measured") as e:
        svc32.check_model(lite0_int8.info())
    assert e.value.http_status == 409

    build_index(BuildConfig(embeddings=[str(tmp_path / "emb-fp32")], output=str(tmp_path / "idx32"),
                            int8_compat=True, cache_dir=str(lens_cache), **quiet), log=lambda *a: None)
    svc32 = SearchService(str(tmp_path / "idx32"))
    rec = svc32.version.manifest[COMPAT_KEY]["int8"]
    assert rec["recall_at_10"] == lite0_int8.model.quantization["recall_at_10_vs_fp32_index"] and rec["allowed"]
    assert rec["int8_model"] == lite0_int8.identity().quantized_by()
    svc32.check_model(lite0_int8.info())  # measured, allowed
    other = lite0_int8.identity().to_dict()
    other["quantization"] = dict(other["quantization"], calibration_sha256="0" * 64)
    with pytest.raises(ModelMismatchError, match="another int8 model"):
        svc32.check_model(other)
    # a recorded agreement below the least allowed refuses, naming the numbers
    from lens.identity import space_refusal

    low = {"int8": dict(rec, recall_at_10=0.5, allowed=False)}
    assert "recall@10 0.5" in space_refusal(svc32.identity, low, lite0_int8.identity())
    # one index holds one precision's rows
    from lens.errors import ConfigError

    with pytest.raises(ConfigError, match="one precision"):
        build_index(BuildConfig(embeddings=[str(tmp_path / "emb-fp32"), str(tmp_path / "emb-int8")],
                                output=str(tmp_path / "mixed"), **quiet), log=lambda *a: None)

"""``lens tag`` and ``lens models`` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def lens(*args, **kw):
    return subprocess.run([sys.executable, "-m", "lens.cli", *args], capture_output=True, text=True, timeout=300,
                          **kw)


def test_tag_prints_one_json_line_per_image_and_fails_for_the_bad_one(tmp_path, lite0_onnx):
    from lens.samples import sample_path

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this jpeg is cut short")
    cat = sample_path("chelsea.png")
    r = lens("tag", str(cat), str(bad), str(tmp_path / "missing.png"), "--top-k", "3")
    assert r.returncode == 1, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(cat), str(bad), str(tmp_path / "missing.png")]
    assert lines[0]["model"] == "tf_efficientnet_lite0" and len(lines[0]["tags"]) == 3
    assert lines[0]["tags"][0]["class_id"] in (281, 282)
    assert set(lines[0]["tags"][0]) == {"label", "class_id", "score"}
    assert lines[1]["status"] == 400 and "error" in lines[1]
    assert lines[2]["error"] == "unreadable"


def test_tag_samples_succeeds(lite0_onnx):
    r = lens("tag", "--samples", "--embedding", "--top-k", "1")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == 7 and all(len(line["embedding"]) == 1280 for line in lines)
    coffee = next(line for line in lines if line["image"].endswith("coffee.png"))
    assert coffee["tags"][0]["label"] == "espresso"


def test_config_errors_exit_2_with_a_message():
    r = lens("tag", "x.jpg", "--model", "efficientnet_b9")
    assert r.returncode == 2 and "unknown or unsupported model" in r.stderr and "Traceback" not in r.stderr
    r = lens("tag", "x.jpg", "--device", "tpu")
    assert r.returncode == 2 and "device" in r.stderr
    r = lens("tag")
    assert r.returncode == 2 and "no images" in r.stderr


def test_models_lists_the_family_and_where_weights_are():
    r = lens("models", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in map(json.loads, r.stdout.splitlines())}
    for name in ("efficientnet_b0", "efficientnet_b7", "tf_efficientnetv2_s", "efficientnetv2_m",
                 "tf_efficientnet_lite4", "efficientnet_lite0"):
        assert name in rows
    assert rows["tf_efficientnet_lite0"]["weights_here"] is True
    assert rows["efficientnet_b0"]["weights_here"] is False
    assert "resnet50" not in rows


def test_config_file_with_flag_override(tmp_path, lite0_onnx):
    from lens.samples import sample_path

    cfg = tmp_path / "lens.yaml"
    cfg.write_text("model:\n  backend: onnx\ndecode:\n  max_bytes: 1000\n")
    r = lens("tag", str(sample_path("coffee.png")), "--config", str(cfg))
    assert r.returncode == 1
    assert json.loads(r.stdout)["status"] == 413  # the decode section applied
    cfg.write_text("model:\n  backend: onnx\n  max_batch_size: 0\n")
    r = lens("tag", "x.png", "--config", str(cfg))
    assert r.returncode == 2 and "max_batch_size" in r.stderr


def test_shipped_config_validates():
    from pathlib import Path

    import yaml

    from lens.config import DecodeConfig, ModelConfig

    data = yaml.safe_load((Path(__file__).parents[1] / "infra" / "lens.yaml").read_text())
    assert ModelConfig.model_validate(data["model"]) == ModelConfig(cache_dir=ModelConfig().cache_dir)
    assert DecodeConfig.model_validate(data["decode"]) == DecodeConfig()

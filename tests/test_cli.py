"""``lens tag`` and ``lens models`` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def lens(*args, **kw):
    return subprocess.run([sys.executable, "-m", "lens.cli.main", *args], capture_output=True, text=True, timeout=300,
                          **kw)


def test_tag_prints_one_json_line_per_image_and_fails_for_the_bad_one(tmp_path, lite0_onnx):
    from lens.runtime.samples import sample_path

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
    from lens.runtime.samples import sample_path

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

    from lens.runtime.config import DecodeConfig, ModelConfig

    data = yaml.safe_load((Path(__file__).parents[1] / "infra" / "lens.yaml").read_text())
    assert ModelConfig.model_validate(data["model"]) == ModelConfig(cache_dir=ModelConfig().cache_dir)
    assert DecodeConfig.model_validate(data["decode"]) == DecodeConfig()


def _sweep_files(root):
    """Garbage and half-right inputs a careless operator points the CLI at."""
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 2)
    (root / "list.yaml").write_text("- just\n- a list\n")
    (root / "emb").mkdir()
    (root / "emb" / "notes.txt").write_text("not an embedding")
    (root / "emb" / "part-0.parquet").write_bytes(b"PAR1 but not really")
    (root / "empty").mkdir()
    (root / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    return root


SWEEP = [  # (arguments, a phrase the one-line error must contain)
    (["tag", "--config", "binary.yaml", "photo.jpg"], "not a text (UTF-8) file"),
    (["tag", "--config", "list.yaml", "photo.jpg"], "must be a mapping"),
    (["tag", "--config", "missing.yaml", "photo.jpg"], "cannot read config file"),
    (["tag", "--top-k", "0", "photo.jpg"], "top_k must be an integer in 1..100"),
    (["tag", "--top-k", "101", "photo.jpg"], "top_k must be an integer in 1..100"),
    (["tag", "--num-classes", "0", "photo.jpg"], "num_classes"),
    (["tag", "--weights", "model.txt", "photo.jpg"], "weights must be"),
    (["serve", "--config", "binary.yaml"], "not a text (UTF-8) file"),
    (["serve", "--config", "missing.yaml"], "cannot read Serve config"),
    (["serve", "--header-timeout-s", "0"], "header_timeout_s"),
    (["events", "--config", "binary.yaml", "status"], "not a text (UTF-8) file"),
    (["events", "status"], "no AWS region"),
    (["events", "dlq", "list"], "no AWS region"),
    (["events", "dlq", "redrive"], "no AWS region"),
    (["index", "build", "--embeddings", "emb", "--output", "out"], "part-0.parquet is not a readable Parquet file"),
    (["index", "build", "--embeddings", "empty", "--output", "out"], "no embeddings found"),
    (["index", "build", "--embeddings", "missing", "--output", "out"], "no embeddings found"),
    (["index", "build", "--embeddings", "empty", "--output", "out", "--target-recall", "2"], "target_recall"),
    (["index", "search", "--index", "empty", "--id", "x"], "not an index"),
    (["index", "search", "--index", "missing", "--id", "x"], "no index"),
    (["embed", "--input", "missing", "--output", "out"], "no input files"),
    (["embed", "--input", "binary.yaml", "--output", "out"], "no image files"),
    (["shards", "--input", "empty", "--output", "out"], "no image files"),
    (["demo", "--workdir", "emb"], "not empty and was not made by lens demo"),
    (["demo", "--workdir", "photo.jpg"], "is a file, not a directory"),
]


@pytest.mark.parametrize("args,phrase", SWEEP, ids=[" ".join(a) for a, _ in SWEEP])
def test_bad_arguments_and_files_give_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, phrase):
    from lens.cli.main import main

    monkeypatch.chdir(_sweep_files(tmp_path))
    for var in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_PROFILE", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"lens {args[0]}: error: "), err
    assert phrase in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and (tmp_path / "emb" / "notes.txt").exists()


def test_an_unexpected_error_is_one_line_and_exit_1(monkeypatch, capsys):
    import lens.cli.main as cli

    def boom(args):
        raise RuntimeError("something Lens did not expect\nsecond line")

    monkeypatch.setattr(cli, "cmd_models", boom)
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("lens models: internal error: RuntimeError: something Lens did not expect "
                   "(run with -v for the traceback)")


def test_every_command_shows_examples_that_parse_and_every_flag_says_its_value():
    import argparse
    import contextlib
    import io
    import shlex

    from lens.cli.examples import COMMAND_EXAMPLES, leaf_parsers
    from lens.cli.main import build_parser

    parser = build_parser()
    commands = dict(leaf_parsers(parser))
    assert set(commands) == set(COMMAND_EXAMPLES), set(commands) ^ set(COMMAND_EXAMPLES)
    for path, sub in commands.items():
        assert sub.format_help().split("examples:\n", 1)[1].splitlines()[0].startswith(f"  lens {path.split()[0]}")
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            help_ = action.help or ""
            assert help_, f"lens {path} {action.option_strings[0]} has no help"
            if action.nargs != 0 and not action.choices:  # a value: an example or the default is shown
                assert "e.g." in help_ or "default" in help_, f"lens {path} {action.option_strings[0]}: {help_}"
    for path, lines in COMMAND_EXAMPLES.items():
        for line in lines:
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    args = parser.parse_args(shlex.split(line)[1:])
            except SystemExit:
                pytest.fail(f"the example {line!r} of lens {path} does not parse: {err.getvalue()}")
            assert callable(getattr(args, "func", None)), line


def test_every_backend_the_config_accepts_the_cli_accepts_and_the_summary_says_what_ran(lite0_onnx):
    from lens.runtime.samples import sample_path

    r = lens("tag", str(sample_path("coffee.png")), "--backend", "openvino", "--top-k", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tags"][0]["label"] == "espresso"
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lens tag: 1 image(s), 1 tagged, 0 failed; tf_efficientnet_lite0 on openvino fp32 on cpu "
                           "(openvino "), r.stderr
    r = lens("tag", "--help")
    for value in ("auto", "torch", "onnx", "openvino", "int8", "--custom-top-k"):
        assert value in r.stdout


@pytest.mark.parametrize("text,says", [
    ("custom_top_k: 3\n", "unknown top-level key 'custom_top_k': no Lens command reads it; it is a key of the "
                          "model: section"),
    ("modle:\n  name: x\n", "unknown top-level key 'modle': no Lens command reads it; did you mean 'model'?"),
    ("model:\n  custom_topk: 3\n", "custom_topk: Extra inputs are not permitted; did you mean 'custom_top_k'?"),
    ("model:\n  backend: onnx\ntrain:\n  epohcs: 3\n", "epohcs: Extra inputs are not permitted; did you mean 'epochs'?"),
])
def test_a_config_key_no_command_reads_is_refused_naming_the_nearest_valid_one(tmp_path, text, says, capsys):
    from lens.cli import main as cli

    cfg = tmp_path / "lens.yaml"
    cfg.write_text(text)
    command = ["train", "--data", str(tmp_path), "--output", str(tmp_path / "o")] if "train:" in text else \
        ["tag", "--samples"]
    assert cli.main([*command, "--config", str(cfg)]) == 2  # before any model loads
    err = capsys.readouterr().err
    assert says in err and str(cfg) in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_a_section_of_another_command_is_allowed(tmp_path, lite0_onnx):
    from lens.runtime.samples import sample_path

    cfg = tmp_path / "lens.yaml"
    cfg.write_text("model:\n  backend: onnx\nembed:\n  top_k: 3\ntrain:\n  epochs: 5\nserve: {}\n")
    r = lens("tag", str(sample_path("coffee.png")), "--config", str(cfg))
    assert r.returncode == 0, r.stderr


def test_a_cold_int8_build_keeps_stdout_json_lines_only(tmp_path):
    """NNCF logs and draws progress bars on stdout while it builds an int8 model: `lens tag`'s stdout must stay
    one JSON object per image (the tiny random model fails the accuracy gate, which is said on stderr)."""
    from lens.runtime.samples import sample_path

    r = lens("tag", str(sample_path("coffee.png")), "--model", "test_efficientnet", "--weights", "random",
             "--precision", "int8", env=__import__("os").environ | {"LENS_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["tags"], r.stdout[:2000]
    assert "int8 gate REFUSED" in r.stderr

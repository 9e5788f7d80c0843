"""MLflow, where teams keep their runs and models: `lens train --mlflow` logs the run, `lens models push
--mlflow-model` registers a package, and ``models:/NAME@ALIAS`` serves it, verified like any other package. Against
a real tracking server (``mlflow server``, SQLite backend) on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import encode, random_rgb

TINY = {"name": "test_efficientnet", "weights": "random", "backend": "onnx"}


def _images(root, per_class: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for label, n in per_class.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / label / f"{i:03d}.png").write_bytes(encode(random_rgb(rng, 48, 40), "PNG"))


def _lens(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lens.cli.main", *argv], capture_output=True, text=True,
                          timeout=300, env=os.environ | (env or {}))


@pytest.fixture(scope="module")
def trained(local_ray, tmp_path_factory, mlflow_server, lens_cache):
    """A head package trained with --mlflow (in this process, as `lens train` runs it)."""
    from lens.runtime.config import ModelConfig
    from lens.train.config import TrainConfig
    from lens.train.job import run_train

    root = tmp_path_factory.mktemp("mlflow-train")
    _images(root / "data", {"red": 8, "blue": 8, "green": 8})
    logs: list[str] = []
    summary = run_train(TrainConfig(data=str(root / "data"), output=str(root / "pkg"), mode="head", epochs=5,
                                    model=ModelConfig(**TINY, cache_dir=lens_cache),
                                    mlflow={"tracking_uri": mlflow_server, "experiment": "colours"}),
                        log=logs.append)
    return root / "pkg", summary, logs


def test_lens_train_logs_its_settings_epochs_metrics_confusion_matrix_and_package(trained, mlflow_server):
    from mlflow import MlflowClient

    from lens.package import open_package

    pkg_dir, summary, logs = trained
    client = MlflowClient(mlflow_server)
    run_id = summary["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "colours"
    p = run.data.params
    assert p["mode"] == "head" and p["epochs"] == "5" and p["model.name"] == "test_efficientnet" and p["seed"] == "0"
    # each epoch of the head, as a step
    history = client.get_metric_history(run_id, "head/val_top1")
    assert sorted(m.step for m in history) == list(range(1, len(history) + 1)) and len(history) >= 1
    assert {m.key for m in client.get_metric_history(run_id, "head/train_loss")} == {"head/train_loss"}
    # the outcome: the test split's numbers, as lens train printed them
    assert run.data.metrics["test.top1"] == pytest.approx(summary["metrics"]["top1"])
    assert run.data.metrics["val.top1"] == pytest.approx(summary["validation"]["top1"])
    files = {f.path for f in client.list_artifacts(run_id)}
    assert {"confusion.json", "confusion.png", "lens-package"} <= files, files
    confusion = json.loads(open(client.download_artifacts(run_id, "confusion.json")).read())
    assert confusion["labels"] == ["blue", "green", "red"] and np.asarray(confusion["matrix"]).sum() == summary["test"]
    # the package, logged whole; and the package knows its run
    logged = {f.path for f in client.list_artifacts(run_id, "lens-package")}
    pkg = open_package(str(pkg_dir))
    assert logged == {f"lens-package/{n}" for n in [*pkg.manifest["files"], "lens-package.json"]}
    assert pkg.manifest["training"]["mlflow"] == {"run_id": run_id, "experiment_id": run.info.experiment_id}
    assert run.data.tags["lens.package.sha256"] == pkg.sha256
    assert run.data.tags["lens.dataset.fingerprint"] == pkg.manifest["dataset"]["fingerprint"]
    assert any(f"MLflow run {run_id}" in line for line in logs)


def test_a_failed_training_marks_its_run_failed(local_ray, tmp_path, mlflow_server):
    from mlflow import MlflowClient

    from lens.train.config import TrainConfig
    from lens.train.dataset import DatasetError
    from lens.train.job import run_train

    _images(tmp_path / "data", {"red": 8, "blue": 2})  # too few blue images: refused after the run opened
    with pytest.raises(DatasetError):
        run_train(TrainConfig(data=str(tmp_path / "data"), output=str(tmp_path / "pkg"), model=TINY,
                              mlflow={"tracking_uri": mlflow_server, "experiment": "failing"}), log=lambda m: None)
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"] and "DatasetError" in runs[0].data.tags["lens.error"]


def test_push_registers_the_package_and_models_uri_serves_it_verified(trained, tmp_path, mlflow_server):
    from mlflow import MlflowClient

    from lens.errors import LensError
    from lens.package import PackageError
    from lens.runtime.heads import load_head

    pkg_dir, summary, _ = trained
    (pkg_dir / "notes.txt").write_text("someone's notes beside the package: not part of it")
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    r = _lens("models", "push", str(pkg_dir), "--mlflow-model", "colours", "--mlflow-alias", "champion", "--json",
              env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)["mlflow"]
    assert out["version"] == "1" and out["uri"] == "models:/colours@champion"
    client = MlflowClient(mlflow_server)
    mv = client.get_model_version_by_alias("colours", "champion")
    assert mv.version == "1" and mv.tags["lens.package.sha256"] == out["sha256"]
    assert client.get_run(mv.run_id).data.tags["lens.training_run_id"] == summary["mlflow"]["run_id"]
    logged = {f.path for f in client.list_artifacts(mv.run_id, "lens-package")}
    assert "lens-package/notes.txt" not in logged and "lens-package/lens-package.json" in logged  # its files only

    # served by alias, as a head on its backbone: the same package, every file verified
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    try:
        head = load_head("models:/colours@champion", cache_dir=tmp_path / "cache")
        assert head.sha256 == out["sha256"] and head.labels == ["blue", "green", "red"]
        assert head.uri == "models:/colours@champion"
        assert load_head("models:/colours/1", cache_dir=tmp_path / "cache").sha256 == out["sha256"]
        # a file changed in the cache after download is refused, naming it
        cached = next((tmp_path / "cache" / "mlflow").glob("*/head.safetensors"))
        cached.write_bytes(cached.read_bytes()[:-4] + b"\0\0\0\0")
        with pytest.raises(PackageError, match="head.safetensors does not match its checksum"):
            load_head("models:/colours@champion", cache_dir=tmp_path / "cache")
        with pytest.raises(LensError) as e:
            load_head("models:/colours@nobody", cache_dir=tmp_path / "cache")
        assert e.value.code == "unknown_version" and e.value.http_status == 404
        with pytest.raises(LensError, match="models:/NAME@ALIAS or models:/NAME/VERSION"):
            load_head("models:/colours/../x", cache_dir=tmp_path / "cache")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    # a second push is version 2, and the alias follows only when asked
    r = _lens("models", "push", str(pkg_dir), "--mlflow-model", "colours", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["mlflow"]["version"] == "2", r.stderr[-3000:]
    assert client.get_model_version_by_alias("colours", "champion").version == "1"


def test_a_model_package_in_mlflow_is_served_as_weights(tmp_path, mlflow_server, lens_cache):
    """`weights: models:/NAME@ALIAS`: the model loads from MLflow with the identity of the package it holds."""
    from lens.registry.mlflow import register_package
    from lens.registry.modelpack import package_model
    from lens.runtime.config import ModelConfig
    from lens.runtime.loading import load_model

    base = ModelConfig(**TINY, cache_dir=lens_cache)
    package_model(base, str(tmp_path / "base"), name="base")
    out = register_package(str(tmp_path / "base"), "base", alias="prod", tracking_uri=mlflow_server)
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    try:
        m = load_model(base.model_copy(update={"weights": "models:/base@prod", "cache_dir": tmp_path / "c"}))
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    direct = load_model(base.model_copy(update={"weights": str(tmp_path / "base")}))
    assert m.identity().weights_sha256 == direct.identity().weights_sha256
    assert m.identity().version == "models:/base/1" and m.info()["package"]["mlflow"]["alias"] == "prod"
    assert m.info()["package"]["sha256"] == out["sha256"]


def test_models_uris_are_checked_before_anything_loads():
    from lens.errors import ConfigError
    from lens.runtime.config import ModelConfig, validate

    assert ModelConfig(weights="models:/tagger@champion").weights == "models:/tagger@champion"
    assert ModelConfig(weights="models:/tagger/3").weights == "models:/tagger/3"
    for bad in ("models:/", "models:/tagger", "models:/tagger@", "models:/a/b/c", "models:/tagger@x y"):
        with pytest.raises(ConfigError):
            validate(ModelConfig, {"weights": bad})


def test_a_fine_tune_run_is_named_by_its_job_and_workers_get_only_mlflows_variables(monkeypatch):
    """The Ray Train run name is what makes a rerun resume (tests/test_train.py runs one): equal for the same job,
    different when anything that decides the result differs; workers get MLflow's variables and nothing else."""
    from lens.train.config import TrainConfig
    from lens.train.finetune import run_name
    from lens.train.tracking import _absolute, worker_env

    cfg = TrainConfig(data="d", output="/out/pkg", mode="finetune", model=TINY)
    common = {"epochs": 5, "lr": 1e-3, "seed": 0}
    name = run_name(cfg, "fp", "parent", common)
    assert name == run_name(cfg, "fp", "parent", dict(common)) and name.startswith("lens-train-finetune-")
    assert run_name(cfg, "fp", "parent", common | {"mlflow": {"run_id": "x"}}) == name  # logging is not the job
    others = {run_name(cfg, "fp2", "parent", common), run_name(cfg, "fp", "parent2", common),
              run_name(cfg, "fp", "parent", common | {"seed": 1}),
              run_name(cfg.model_copy(update={"output": "/out/other"}), "fp", "parent", common),
              run_name(cfg.model_copy(update={"workers": 2}), "fp", "parent", common)}
    assert name not in others and len(others) == 5
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    assert worker_env()["MLFLOW_TRACKING_TOKEN"] == "t" and not any(k.startswith("AWS_") for k in worker_env())
    assert _absolute("sqlite:///mlflow.db") == f"sqlite:///{os.getcwd()}/mlflow.db"
    assert _absolute("http://mlflow:5000") == "http://mlflow:5000" and _absolute("databricks") == "databricks"

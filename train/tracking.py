"""``lens train --mlflow``: the run in MLflow, logged the way Ray Train's MLflow integration logs one.

The driver opens the run and logs the settings; the head's epochs are logged
when it has trained (seconds, in the driver); the fine-tune's epochs are logged by rank 0 as each one ends (on
every node, through the same tracking server); and at the end the driver logs the validation and test metrics,
the confusion matrix (``confusion.json`` and ``confusion.png``), and the package itself as the run's artifacts
(``lens-package/``, the folder ``lens models push --mlflow-model`` registers), with the split sizes. The package's
manifest records the run's id, and the run is tagged with the package's digest and the data's fingerprint. A failed ``lens train`` marks its run FAILED.

The tracking server is ``train.mlflow.tracking_uri``, else MLflow's own resolution (``MLFLOW_TRACKING_URI``, with
MLflow's credential variables; fine-tune workers receive the driver's ``MLFLOW_*`` variables in their runtime
environment, so a token set there is visible wherever Ray shows runtime environments: prefer giving worker pods the
same variables the driver has).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from pydantic import Field

from lens.runtime.config import StrictModel

__all__ = ["MlflowConfig", "MlflowRun", "worker_env", "log_epoch_metrics"]

#: MLflow's own environment variables a fine-tune worker needs to reach the same server (URI, token, TLS): workers
#: log metrics only (the driver logs every artifact), so no artifact-store credentials are passed on
_FORWARD_PREFIXES = ("MLFLOW_",)
_MAX_PARAM = 6000  # MLflow's limit on a parameter's value


class MlflowConfig(StrictModel):
    """Where ``lens train`` logs its run."""

    tracking_uri: str | None = Field(None, description="MLflow tracking server (http(s)://..., databricks, "
                                     "sqlite:///file.db, a folder); None = MLflow's own resolution "
                                     "(MLFLOW_TRACKING_URI)")
    experiment: str = Field("lens-train", min_length=1, max_length=500, description="experiment the run is logged in "
                            "(created if missing)")
    run_name: str | None = Field(None, max_length=250, description="the run's name; None = the package's name and "
                                 "the mode")


def _absolute(uri: str) -> str:
    """A local store made absolute (fine-tune workers resolve relative paths against their own folders)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).absolute())
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file:" + str(Path(uri[len("file:"):]).absolute())
    if "://" not in uri and ":" not in uri.split("/", 1)[0] and uri not in ("databricks",):
        return str(Path(uri).absolute())
    return uri


def worker_env() -> dict:
    """The environment variables a fine-tune worker needs to log to the same server as the driver."""
    return {k: v for k, v in os.environ.items() if k.startswith(_FORWARD_PREFIXES)}


def _flat(prefix: str, d: dict) -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _flat(f"{key}.", v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            out[key] = float(v)
    return out


def log_epoch_metrics(tracking_uri: str, run_id: str, phase: str, row: dict) -> None:
    """One epoch's numbers (``row``: epoch, train_loss, val_loss, val_top1, images_per_s...) as ``PHASE/KEY`` at
    step ``epoch``: what rank 0 calls after each fine-tune epoch and the driver after the head's."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    step = int(row["epoch"])
    metrics = [Metric(f"{phase}/{k}", float(v), now, step) for k, v in row.items()
               if k not in ("epoch", "phase") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not metrics:
        return
    try:
        MlflowClient(tracking_uri).log_batch(run_id, metrics=metrics)
    except Exception as e:  # noqa: BLE001 - a tracking server that is down never stops the training it records
        logging.getLogger(__name__).warning("MLflow: epoch %s of run %s not logged: %s: %s", step, run_id,
                                            type(e).__name__, e)


class MlflowRun:
    """One ``lens train`` run in MLflow (opened by :meth:`start`, closed by :meth:`finish` or :meth:`fail`)."""

    def __init__(self, client, tracking_uri: str, run_id: str, experiment_id: str):
        self.client, self.tracking_uri, self.run_id, self.experiment_id = client, tracking_uri, run_id, experiment_id

    @classmethod
    def start(cls, cfg, *, log) -> "MlflowRun":
        """Open the run of train config ``cfg`` and log its settings."""
        from lens.mlflow_registry import mlflow_client

        m: MlflowConfig = cfg.mlflow
        client = mlflow_client(_absolute(m.tracking_uri) if m.tracking_uri else None)
        import mlflow

        uri = _absolute(m.tracking_uri or mlflow.get_tracking_uri())
        exp = client.get_experiment_by_name(m.experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(m.experiment)
        name = m.run_name or f"{cfg.package_name} ({cfg.mode})"
        run = client.create_run(exp_id, run_name=name, tags={"lens.output": cfg.output, "lens.mode": cfg.mode,
                                                             "lens.model": cfg.model.name})
        self = cls(client, uri, run.info.run_id, exp_id)
        params = cfg.model_dump(mode="json", exclude={"mlflow"})
        model = params.pop("model")
        flat = {k: v for k, v in params.items() if v is not None} | {
            f"model.{k}": v for k, v in model.items() if k in ("name", "weights", "backend", "precision", "device")
            and v is not None}
        self._params(flat)
        log(f"lens train: logging to MLflow run {self.run_id} (experiment {m.experiment!r}) at {_redact(uri)}")
        return self

    def _params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def worker_config(self) -> dict:
        """What a fine-tune worker needs to log its epochs to this run."""
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    def log_epochs(self, phase: str, rows: list[dict]) -> None:
        for row in rows:
            if "epoch" in row:
                log_epoch_metrics(self.tracking_uri, self.run_id, phase, row)

    def finish(self, summary: dict, pkg, test: dict, classes: list[str], log) -> None:
        """The outcome: metrics, the confusion matrix, the package as artifacts, its identity as tags."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        flat = _flat("test.", summary.get("metrics") or {}) | _flat("val.", summary.get("validation") or {}) | {
            k: float(summary[k]) for k in ("seconds", "embedding_seconds", "train", "val", "test", "errors")
            if isinstance(summary.get(k), (int, float))}
        metrics = [Metric(k, v, now, 0) for k, v in sorted(flat.items())]
        for i in range(0, len(metrics), 500):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 500])
        if "confusion" in test:
            self.client.log_dict(self.run_id, {"labels": classes, "matrix": test["confusion"],
                                               "rows": "true class", "columns": "predicted class"},
                                 "confusion.json")
        if "confusion.png" in pkg.manifest["files"]:
            self.client.log_artifact(self.run_id, str(pkg.file("confusion.png")))
        from lens.mlflow_registry import ARTIFACT_PATH, end_run
        from lens.registry.mlflow import log_package

        log_package(self.client, self.run_id, pkg)
        for k, v in {"lens.package": summary["package"], "lens.package.mode": summary["mode"],
                     "lens.package.sha256": summary.get("package_sha256", ""),
                     "lens.dataset.fingerprint": summary.get("dataset_fingerprint", ""),
                     "lens.chosen_because": summary.get("chosen_because", "")}.items():
            if v:
                self.client.set_tag(self.run_id, k, str(v)[:5000])
        end_run(self.client, self.run_id, "FINISHED")
        log(f"lens train: MLflow run {self.run_id}: metrics, confusion matrix and the package ({ARTIFACT_PATH}/) "
            "logged")

    def fail(self, err: BaseException) -> None:
        from lens.mlflow_registry import end_run

        try:
            self.client.set_tag(self.run_id, "lens.error", f"{type(err).__name__}: {err}"[:5000])
            end_run(self.client, self.run_id, "FAILED")
        except Exception:  # noqa: BLE001 - the training error is the one to report
            pass


def _redact(uri: str) -> str:
    """A tracking URI without credentials (``https://user:token@host`` -> ``https://***@host``)."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri

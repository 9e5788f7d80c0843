"""Registering Lens packages in MLflow's model registry (``lens models push --mlflow-model``); resolving
``models:/`` references is :mod:`lens.mlflow_registry`'s."""

from __future__ import annotations

import os
import re

from lens.mlflow_registry import ARTIFACT_PATH, MODELS_SCHEME, end_run, mlflow_client, parse_mlflow_ref

__all__ = ["register_package", "log_package"]

_ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


def log_package(client, run_id: str, pkg) -> None:
    """A verified package's files (those its manifest names, and the manifest) as ``lens-package/`` artifacts of
    ``run_id``: nothing else that may lie in its folder."""
    from lens.package import MANIFEST

    for name in [*sorted(pkg.manifest["files"]), MANIFEST]:
        sub = name.rpartition("/")[0]
        client.log_artifact(run_id, str(pkg.root / name), f"{ARTIFACT_PATH}/{sub}" if sub else ARTIFACT_PATH)


def register_package(package: str, name: str, *, alias: str | None = None, experiment: str = "lens-models",
                     tracking_uri: str | None = None, cache_dir: str | os.PathLike | None = None,
                     description: str | None = None) -> dict:
    """Register a verified package as a new version of MLflow model ``name``: its files are logged as the
    artifacts (``lens-package/``) of a run in ``experiment`` (tagged with the package's identity and the run that
    trained it, where the manifest names one), and the version's source is that folder. ``alias`` is then pointed
    at the new version. Returns ``{"name", "version", "uri", "run_id", "source", "sha256"}``."""
    from mlflow.exceptions import MlflowException

    from lens.package import PackageError, open_package

    if alias is not None and not _ALIAS.match(alias):
        raise PackageError(f"an MLflow alias is letters, digits, _ and - (at most 255), got {alias!r}",
                           code="usage", status=400)
    parse_mlflow_ref(f"{MODELS_SCHEME}{name}/1")  # the name's shape, before anything is written
    pkg = open_package(package, cache_dir=cache_dir)  # every file verified before anything is logged
    client = mlflow_client(tracking_uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
        trained_by = ((pkg.manifest.get("training") or {}).get("mlflow") or {}).get("run_id")
        tags = {"lens.package.name": pkg.name, "lens.package.kind": pkg.kind, "lens.package.sha256": pkg.sha256,
                "lens.package.uri": str(package), "mlflow.runName": f"register {name} ({pkg.name})"} | (
                    {"lens.training_run_id": trained_by} if trained_by else {})
        run = client.create_run(exp_id, tags=tags)
        try:
            log_package(client, run.info.run_id, pkg)
        except Exception:
            end_run(client, run.info.run_id, "FAILED")
            raise
        end_run(client, run.info.run_id, "FINISHED")
        source = f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_PATH}"
        try:
            client.create_registered_model(name, description=description)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in (getattr(e, "error_code", "") or ""):
                raise
        mv = client.create_model_version(name, source, run_id=run.info.run_id,
                                         tags={"lens.package.sha256": pkg.sha256, "lens.package.kind": pkg.kind},
                                         description=description)
        if alias:
            client.set_registered_model_alias(name, alias, mv.version)
    except MlflowException as e:
        raise PackageError(f"registering {package} as MLflow model {name!r} failed: {getattr(e, 'message', e)}",
                           status=502) from None
    ref = f"{MODELS_SCHEME}{name}@{alias}" if alias else f"{MODELS_SCHEME}{name}/{mv.version}"
    return {"name": name, "version": str(mv.version), "alias": alias, "uri": ref, "run_id": run.info.run_id,
            "source": source, "sha256": pkg.sha256}

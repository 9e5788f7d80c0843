"""MLflow's model registry as a home for Lens packages.

A package registered in MLflow is a model version whose ``source`` is a run's artifact folder holding the
package's files (``lens-package/``, manifest included). Serving, ``lens tag``, ``lens embed`` and heads take
``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` wherever they take a package: the reference is resolved through
MLflow's client (the tracking server of ``MLFLOW_TRACKING_URI``, ``MLFLOW_REGISTRY_URI`` where it differs, with
MLflow's own credential variables), the version's artifacts are downloaded once into the cache (keyed by server,
name, version and source), and the package is then verified file by file against its manifest, exactly as a
package read from a folder or ``s3://`` is. An alias is resolved when the model loads: a replica started after the
alias moved serves the new version (``lens serve``'s replicas resolve at start-up; recycle them to follow a move).

Only the operator's configuration names these references; nothing a client sends reaches MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from lens.errors import LensError

__all__ = ["MODELS_SCHEME", "ARTIFACT_PATH", "MlflowRef", "parse_mlflow_ref", "resolve_mlflow",
           "mlflow_client", "end_run", "MlflowModelError"]

MODELS_SCHEME = "models:/"
#: the run artifact folder a registered package lives in
ARTIFACT_PATH = "lens-package"
_NAME = r"[^/@\s][^/@]{0,255}"
_REF = re.compile(rf"^models:/({_NAME})(?:@([A-Za-z0-9_-]{{1,255}})|/([1-9][0-9]{{0,9}}))$")


class MlflowModelError(LensError):
    """A ``models:/`` reference that is malformed, unknown to the registry, too large or not a Lens package."""

    code = "bad_package"
    http_status = 500


class MlflowRef(NamedTuple):
    """What ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names."""

    name: str
    alias: str | None
    version: str | None


def parse_mlflow_ref(uri: str) -> MlflowRef:
    m = _REF.match(str(uri))
    if not m:
        raise MlflowModelError(f"an MLflow model is named models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}",
                           code="usage", status=400)
    return MlflowRef(m.group(1), m.group(2), m.group(3))


def mlflow_client(tracking_uri: str | None = None):
    """MLflow's client (``tracking_uri`` or MLflow's own resolution: ``MLFLOW_TRACKING_URI``, then its default)."""
    # Lens prints its own progress; MLflow's per-file progress bars stay off unless the user turned them on
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise LensError("MLflow is not installed: pip install 'lens-vision[mlflow]' (MLflow's client, "
                        "mlflow-skinny)", code="usage") from None
    return MlflowClient(tracking_uri=tracking_uri)


def end_run(client, run_id: str, status: str) -> None:
    """Mark a run ended. MLflow prints the run's link to stdout here; Lens's stdout is JSON lines, so the link
    goes to stderr, where people read."""
    with contextlib.redirect_stdout(sys.stderr):
        client.set_terminated(run_id, status)


def _mlflow_error(e: Exception, uri: str):
    code = getattr(e, "error_code", "") or ""
    if "RESOURCE_DOES_NOT_EXIST" in code or "NOT_FOUND" in code or "INVALID_PARAMETER_VALUE" in code:
        return MlflowModelError(f"{uri}: no such registered model version ({getattr(e, 'message', e)})",
                                code="unknown_version", status=404)
    return MlflowModelError(f"{uri}: MLflow answered {type(e).__name__}: {getattr(e, 'message', e)}", status=502)


def resolve_mlflow(uri: str, *, cache_dir: str | os.PathLike, max_bytes: int, manifest: str,
                   tracking_uri: str | None = None) -> tuple[Path, dict]:
    """The local folder holding the package of ``uri`` (downloaded once per server, name, version and source,
    at most ``max_bytes``, holding the file ``manifest``; not yet verified: :func:`lens.package.open_package`
    checks every file) and what it resolved to: ``{"name", "version", "alias", "run_id", "source"}``."""
    from mlflow.exceptions import MlflowException

    ref = parse_mlflow_ref(uri)
    client = mlflow_client(tracking_uri)
    try:
        mv = (client.get_model_version_by_alias(ref.name, ref.alias) if ref.alias
              else client.get_model_version(ref.name, ref.version))
    except MlflowException as e:
        raise _mlflow_error(e, uri) from None
    import mlflow.artifacts

    server = f"{tracking_uri or mlflow.get_tracking_uri()} {mlflow.get_registry_uri()}"
    key = hashlib.sha256("\n".join([str(server), ref.name, str(mv.version), str(mv.source),
                                    str(mv.run_id)]).encode()).hexdigest()[:32]
    root = Path(cache_dir) / "mlflow" / key
    resolved = {"name": ref.name, "version": str(mv.version), "alias": ref.alias, "run_id": mv.run_id,
                "source": mv.source}
    if (root / manifest).is_file():
        return root, resolved
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        sizes = _artifact_sizes(client, mv)
        if sizes is not None and sum(sizes) > max_bytes:
            raise MlflowModelError(f"{uri} holds {sum(sizes):,} bytes; the limit is {max_bytes:,}",
                                   code="package_too_large", status=413)
        stage = Path(tempfile.mkdtemp(prefix=".dl-", dir=root.parent))
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(stage),
                                                           tracking_uri=tracking_uri))
            if not (got / manifest).is_file():
                raise MlflowModelError(f"{uri} (source {mv.source}) is not a Lens model package (no {manifest})",
                                       code="not_a_package", status=400)
            try:
                got.rename(root)
            except OSError:  # another process downloaded it meanwhile
                pass
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    except MlflowException as e:
        raise _mlflow_error(e, uri) from None
    return root, resolved


def _artifact_sizes(client, mv) -> list[int] | None:
    """The sizes of a run-backed version's files (None where the source is not a run's artifact folder)."""
    if not mv.run_id:
        return None
    run = client.get_run(mv.run_id)
    base = run.info.artifact_uri.rstrip("/") + "/"
    source = str(mv.source)
    if source.startswith(f"runs:/{mv.run_id}/"):
        path = source[len(f"runs:/{mv.run_id}/"):]
    elif source.startswith(base):
        path = source[len(base):]
    else:
        return None
    sizes, todo = [], [path]
    while todo:
        for f in client.list_artifacts(mv.run_id, todo.pop()):
            if f.is_dir:
                todo.append(f.path)
            else:
                sizes.append(int(f.file_size or 0))
    return sizes

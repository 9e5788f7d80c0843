"""Build a ready-to-run model from a :class:`~lens.runtime.config.ModelConfig`.

``load_model`` resolves the device and backend, checksums the weights, and
either opens the cached ONNX export (a warm start that never imports torch or
timm) or builds the timm model, loads the weights strictly and, for the ONNX
backend, exports once under a file lock so concurrent replicas never re-export.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lens.errors import ConfigError, WeightsError
from lens.identity import ModelIdentity, identity_of, labels_digest, quantization_of
from lens.storage import atomic_write_bytes

from .backends import ONNX_OPSET, Backend, OnnxBackend, TorchBackend, export_onnx, heads_module
from .config import ModelConfig
from .labels import default_labels, read_labels
from .preprocess import PreprocessConfig
from .weights import (
    WeightsRef,
    classifier_shape,
    load_into,
    map_by_order,
    read_state_dict,
    resolve_weights,
)

__all__ = ["LoadedModel", "load_model", "resolve_device", "resolve_backend", "onnx_cache_paths", "served_line",
           "build_torch", "config_for_identity"]

logger = logging.getLogger(__name__)

#: Bump when the exported graph's contract changes, to invalidate old cache entries.
ONNX_FORMAT = 1


@dataclass
class LoadedModel:
    """A model ready for inference, and everything needed to describe it."""

    name: str
    weights: WeightsRef
    num_classes: int
    labels: list[str]
    preprocess: PreprocessConfig
    embed_dim: int
    backend: Backend
    load_seconds: float = 0.0
    onnx_path: Path | None = None
    package: dict | None = None  # a finetune/model package: {"name", "uri", "sha256", "thresholds", ["version"]}
    quantization: dict | None = None  # precision int8: the accuracy gate's report and what is "served"
    backend_choice: dict | None = None  # backend auto on CPU: what was measured and picked

    @functools.cached_property
    def labels_sha256(self) -> str:  # info() answers every health probe: hash the labels once
        return labels_digest(self.labels)

    def info(self) -> dict:
        return {
            "model": self.name,
            "weights": self.weights.source,
            "weights_sha256": self.weights.sha256,
            "num_classes": self.num_classes,
            "embed_dim": self.embed_dim,
            "preprocess": self.preprocess.to_dict(),
            "backend": self.backend.name,
            "device": self.backend.device,
            "precision": getattr(self.backend, "precision", "fp32"),
            "backend_version": getattr(self.backend, "version", None),
            "labels_sha256": self.labels_sha256,
            "version": (self.package or {}).get("version"),  # NAME@vN when loaded from a registry version
            "served": self.served(),
        } | ({"package": {k: v for k, v in self.package.items() if k != "thresholds"}} if self.package else {}) | (
            {"quantization": self.quantization} if self.quantization else {}) | (
            {"backend_choice": self.backend_choice} if self.backend_choice else {})

    def served(self) -> dict:
        """What actually runs, after ``backend: auto`` and the int8 gate chose: backend, device, precision, the
        backend's release, and why (the auto measurement, the gate's verdict and numbers)."""
        out = {"backend": self.backend.name, "device": self.backend.device,
               "precision": getattr(self.backend, "precision", "fp32"),
               "backend_version": getattr(self.backend, "version", None)}
        if self.backend_choice:
            out["backend_auto"] = {k: self.backend_choice[k] for k in ("picked", "images_per_s_batch8", "threads",
                                                                          "reason") if k in self.backend_choice}
        if self.quantization:
            q = self.quantization
            out["int8_gate"] = {"passed": q.get("passed"), "failed": q.get("failed", []), "served": q.get("served")} | {
                k: q[k] for k in ("top1_agreement", "top5_overlap", "mean_cosine", "recall_at_10_vs_fp32_index",
                                  "recall_at_10_vs_int8_index", "holdout") if k in q}
        return out

    def identity(self) -> ModelIdentity:
        return ModelIdentity(model=self.name, weights_sha256=self.weights.sha256, preprocess=self.preprocess.to_dict(),
                             embed_dim=self.embed_dim, num_classes=self.num_classes,
                             labels_sha256=self.labels_sha256,
                             precision=getattr(self.backend, "precision", "fp32"), backend=self.backend.name,
                             version=(self.package or {}).get("version"),
                             backend_version=getattr(self.backend, "version", None),
                             quantization=quantization_of(self.quantization,
                                                          getattr(self.backend, "precision", "fp32")))


def served_line(served: dict) -> str:
    """One line for summaries and logs: ``openvino int8 on cpu (openvino 2025.3.0; int8 gate passed: ...)``."""
    why = []
    if served.get("backend_version"):
        why.append(f"{served['backend']} {served['backend_version']}")
    auto = served.get("backend_auto")
    if auto and "images_per_s_batch8" in auto:
        why.append("auto picked it: " + ", ".join(f"{k} {v:g}" for k, v in auto["images_per_s_batch8"].items())
                   + f" images/s at batch 8, {auto.get('threads', 'default')} thread(s)")
    gate = served.get("int8_gate")
    if gate:
        nums = ", ".join(f"{k} {gate[k]}" for k in ("top1_agreement", "mean_cosine", "recall_at_10_vs_fp32_index")
                         if k in gate)
        why.append(f"int8 gate {'passed' if gate['passed'] else 'REFUSED (' + ', '.join(gate['failed']) + ')'}: "
                   f"{nums}; serving {gate['served']}")
    return f"{served['backend']} {served['precision']} on {served['device']}" + (f" ({'; '.join(why)})" if why else "")


def config_for_identity(identity: ModelIdentity, **overrides) -> ModelConfig:
    """The model config that embeds in ``identity``'s model space: its architecture, and the backend and precision
    it was embedded with (not what ``auto`` would pick here), so queries meet an index on its own terms. An
    identity made on a GPU in fp16/bf16 is queried with torch fp32 on a host without CUDA (the closest this host
    can run; the caller can compare the loaded identity and say so). ``overrides`` (weights, cache_dir ...) win."""
    backend, precision = identity.backend or "auto", identity.precision or "auto"
    if backend == "torch":
        device = resolve_device("auto")
        if device == "cpu":
            precision = "fp32"
        return ModelConfig(name=identity.model, backend="torch", device=device, precision=precision, **overrides)
    if backend not in ("onnx", "openvino"):
        backend = "auto"
    return ModelConfig(name=identity.model, backend=backend, device="cpu" if backend != "auto" else "auto",
                       precision=precision if precision in ("fp32", "int8") else "auto", **overrides)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a usable GPU is visible, else ``cpu``; checks explicit CUDA requests."""
    if device == "cpu":
        return "cpu"
    if device == "auto":
        # Cheap checks first, so CPU-only hosts never import torch just to learn there is no GPU.
        if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
            return "cpu"
        if not (Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists()):
            return "cpu"
    import torch

    if not torch.cuda.is_available():
        if device == "auto":
            return "cpu"
        raise ConfigError(f"device {device!r} requested but CUDA is not available here")
    if device == "auto":
        return "cuda"
    idx = int(device.split(":")[1]) if ":" in device else 0
    if idx >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def resolve_backend(backend: str, device: str, precision: str = "auto") -> str:
    if backend == "auto":
        if precision == "int8":
            backend = "openvino"
        else:
            return "onnx" if device == "cpu" else "torch"
    if backend == "onnx" and device != "cpu":
        raise ConfigError("the onnx backend runs ONNX Runtime on CPU; use backend torch (or auto) on CUDA")
    if backend == "openvino" and device != "cpu":
        raise ConfigError("the openvino backend runs OpenVINO on CPU; use backend torch (or auto) on CUDA")
    return backend


def onnx_cache_paths(cfg: ModelConfig, weights: WeightsRef) -> tuple[Path, Path]:
    """(model.onnx, meta.json) for this model name, weights checksum, input size and head."""
    size = cfg.input_size or "default"
    nc = cfg.num_classes or "ckpt"
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", cfg.name)
    stem = f"{safe}-{size}-{nc}-{weights.sha256[:16]}-f{ONNX_FORMAT}o{ONNX_OPSET}"
    if cfg.pretrained_cfg_overlay:  # other preprocessing: another export (its meta holds the preprocessing)
        overlay = json.dumps(cfg.pretrained_cfg_overlay, sort_keys=True)
        stem += "-p" + hashlib.sha256(overlay.encode()).hexdigest()[:10]
    root = Path(cfg.cache_dir) / "onnx"
    return root / f"{stem}.onnx", root / f"{stem}.json"


def _from_package(cfg: ModelConfig) -> tuple[ModelConfig, dict | None]:
    """A ``finetune`` package given as ``weights``: its weights file, labels and architecture, verified."""
    w = cfg.weights
    if not w or w == "random" or Path(w).suffix.lower() in (".pth", ".pt", ".bin", ".safetensors"):
        return cfg, None
    from lens.package import PackageError, open_package

    from .config import EMBEDDED_MODEL

    pkg = open_package(w, cache_dir=cfg.cache_dir)
    if pkg.kind == "head":
        raise PackageError(f"{w} is a {pkg.kind} package: serve it with --head (model.heads), on its backbone",
                           code="usage", status=400)
    arch = identity_of(pkg.manifest)["model"]
    if cfg.name not in (arch, EMBEDDED_MODEL):
        raise ConfigError(f"package {w} holds a fine-tuned {arch}, but the model name is {cfg.name}")
    labels = pkg.manifest["labels"]
    cfg = cfg.model_copy(update={"name": arch, "weights": str(pkg.file("model.safetensors")),
                                 "labels": str(pkg.file("labels.json")), "num_classes": len(labels)})
    reg = pkg.manifest.get("registry") or {}
    return cfg, {"name": pkg.name, "uri": str(w), "sha256": pkg.sha256, "kind": pkg.kind,
                 "thresholds": pkg.manifest.get("thresholds")} | (
        {"version": f"{reg['name']}@{reg['version']}"} if reg.get("version") else {}) | (
        {"mlflow": pkg.mlflow, "version": f"models:/{pkg.mlflow['name']}/{pkg.mlflow['version']}"} if pkg.mlflow
        else {})


def load_model(cfg: ModelConfig) -> LoadedModel:
    t0 = time.perf_counter()
    cfg, package = _from_package(cfg)
    device = resolve_device(cfg.device)
    backend_name = resolve_backend(cfg.backend, device, cfg.precision)
    try:
        weights = resolve_weights(cfg.name, cfg.weights, Path(cfg.cache_dir))
    except WeightsError:
        from .models import check_model_name

        check_model_name(cfg.name)  # an unknown name is the clearer error
        raise

    quantization = choice = None
    if backend_name in ("onnx", "openvino"):
        onnx_path, meta = _ensure_onnx(cfg, weights)
        if cfg.backend == "auto" and backend_name == "onnx":  # fp32 on CPU: the faster runtime, measured once
            backend_name, choice = _measured_cpu_backend(cfg, onnx_path, meta)
        num_classes = int(meta["num_classes"])
        labels = read_labels(cfg.labels, num_classes) if cfg.labels else list(meta["labels"])
        if backend_name == "onnx":
            backend: Backend = OnnxBackend(onnx_path, num_threads=cfg.num_threads)
        else:
            backend, quantization = _openvino_backend(cfg, onnx_path, meta, labels)
        loaded = LoadedModel(
            name=cfg.name,
            weights=weights,
            num_classes=num_classes,
            labels=labels,
            preprocess=PreprocessConfig.from_dict(meta["preprocess"]),
            embed_dim=int(meta["embed_dim"]),
            backend=backend,
            onnx_path=onnx_path,
        )
    else:
        model, pp, num_classes, labels = build_torch(cfg, weights)
        backend = TorchBackend(heads_module(model), device=device, precision=cfg.precision,
                               num_threads=cfg.num_threads)
        loaded = LoadedModel(
            name=cfg.name,
            weights=weights,
            num_classes=num_classes,
            labels=labels,
            preprocess=pp,
            embed_dim=int(model.num_features),
            backend=backend,
        )
    loaded.package = package
    loaded.quantization = quantization
    loaded.backend_choice = choice
    loaded.load_seconds = time.perf_counter() - t0
    logger.info("loaded %s (%s) in %.2fs", cfg.name, served_line(loaded.served()), loaded.load_seconds)
    return loaded


def _ensure_onnx(cfg: ModelConfig, weights: WeightsRef) -> tuple[Path, dict]:
    """The cached ONNX export of this model and its metadata, exported once (under a file lock) if missing."""
    onnx_path, meta_path = onnx_cache_paths(cfg, weights)
    meta = _read_meta(meta_path, onnx_path)
    if meta is None:
        from filelock import FileLock

        with FileLock(str(onnx_path) + ".lock", timeout=600):
            meta = _read_meta(meta_path, onnx_path)  # another process may have exported meanwhile
            if meta is None:
                model, pp, num_classes, labels = build_torch(cfg, weights)
                te = time.perf_counter()
                export_onnx(model, onnx_path, pp.input_size)
                meta = {
                    "format": ONNX_FORMAT,
                    "model": cfg.name,
                    "weights_sha256": weights.sha256,
                    "num_classes": num_classes,
                    "embed_dim": int(model.num_features),
                    "preprocess": pp.to_dict(),
                    "labels": labels,
                }
                atomic_write_bytes(meta_path, json.dumps(meta).encode())
                logger.info("exported %s to ONNX in %.1fs: %s", cfg.name, time.perf_counter() - te, onnx_path)
    return onnx_path, meta


#: auto's measurement: rounds alternating the two runtimes (each ROUND_S seconds at batch 8), the median kept
AUTO_ROUNDS, AUTO_ROUND_S = 3, 0.4


def _measured_cpu_backend(cfg: ModelConfig, onnx_path: Path, meta: dict) -> tuple[str, dict]:
    """``auto`` on CPU: ONNX Runtime or OpenVINO (both fp32, the same answers to 1e-3), whichever ran this model
    faster on this machine at the thread count the caller runs it with (a `lens embed` actor's one thread beside
    its decode threads ranks them differently from a replica's every core). Measured once, in alternating rounds
    (so a burst of other work on the machine does not fall on one runtime only), and cached per model export,
    OpenVINO version, CPU and thread count; later starts read the choice and import only the runtime they use."""
    import platform

    from .openvino import cpu_flags

    threads = cfg.num_threads or 0  # 0: the runtimes' default (one per core)
    key = hashlib.sha256(json.dumps([onnx_path.stem, platform.machine(), os.cpu_count(), cpu_flags(),
                                     _openvino_version_or_none(), threads]).encode()).hexdigest()[:16]
    path = Path(cfg.cache_dir) / "backend-choice" / f"{onnx_path.stem}-{key}.json"
    try:
        choice = json.loads(path.read_text())
        return choice["picked"], choice
    except (OSError, ValueError, KeyError):
        pass
    if _openvino_version_or_none() is None:
        return "onnx", {"picked": "onnx", "reason": "openvino is not installed"}
    from filelock import FileLock

    from .openvino import OpenVinoBackend, ensure_fp32

    with FileLock(str(path) + ".lock", timeout=600):
        if path.is_file():
            choice = json.loads(path.read_text())
            return choice["picked"], choice
        x = np.zeros((8, *PreprocessConfig.from_dict(meta["preprocess"]).input_size), np.float32)
        runtimes = {"onnx": OnnxBackend(onnx_path, num_threads=cfg.num_threads),
                    "openvino": OpenVinoBackend(ensure_fp32(onnx_path), "fp32", cfg.num_threads)}
        rates: dict[str, list[float]] = {name: [] for name in runtimes}
        for backend in runtimes.values():
            backend.run(x)  # first-call allocations out of the measurement
        for _ in range(AUTO_ROUNDS):
            for name, backend in runtimes.items():
                t0, n = time.perf_counter(), 0
                while time.perf_counter() - t0 < AUTO_ROUND_S:
                    backend.run(x)
                    n += len(x)
                rates[name].append(n / (time.perf_counter() - t0))
        measured = {name: round(float(np.median(r)), 1) for name, r in rates.items()}
        picked = max(measured, key=measured.get)
        choice = {"picked": picked, "images_per_s_batch8": measured, "threads": threads or "default",
                  "measured_at": time.time()}
        atomic_write_bytes(path, json.dumps(choice).encode())
    logger.warning("backend auto: measured %s images/s at batch 8 on this CPU (%s threads); picked %s (cached in "
                   "%s)", measured, threads or "default", picked, path)
    return picked, choice


def _openvino_version_or_none() -> str | None:
    from .openvino import openvino_version  # reads package metadata: openvino itself is not imported

    try:
        return openvino_version()
    except ImportError:
        return None


def _openvino_backend(cfg: ModelConfig, onnx_path: Path, meta: dict, labels: list[str]):
    """(OpenVINO backend, int8 gate report or None). An int8 model that fails the gate is not served: fp32 is,
    with a warning naming the numbers."""
    from . import int8_gate
    from .openvino import OpenVinoBackend, cpu_flags, ensure_fp32, ensure_int8, openvino_version, package_version
    from .preprocess import Preprocessor

    fp32_xml = ensure_fp32(onnx_path)
    if cfg.precision != "int8":
        return OpenVinoBackend(fp32_xml, "fp32", cfg.num_threads, cfg.streams), None
    try:
        package_version("nncf")  # part of the int8 model's cache key, and what builds it
    except ImportError:
        raise ConfigError("precision int8 quantizes the model with NNCF, which is not installed: "
                          "pip install 'lens-vision[int8]'") from None
    thresholds = int8_gate.GateThresholds(min_top1_agreement=cfg.int8_min_top1_agreement,
                                          min_mean_cosine=cfg.int8_min_mean_cosine,
                                          min_top5_overlap=cfg.int8_min_top5_overlap,
                                          min_recall_at_10=cfg.int8_min_recall_at_10)
    pp = PreprocessConfig.from_dict(meta["preprocess"])
    preprocess_json = json.dumps(meta["preprocess"], sort_keys=True)

    def keyed(name: str) -> str:  # a set of images under this preprocessing: what its cached outputs are keyed by
        return hashlib.sha256((name + preprocess_json).encode()).hexdigest()

    # The default sets are fixed: their recipes name them, no need to make them to know. The user's are keyed by
    # their content: read once, for the key and (if building or judging) their use.
    user_images = None if cfg.calibration is None else int8_gate.calibration_images(cfg.calibration)
    digest = keyed("bundled-v1:" if user_images is None else int8_gate.digest_of(user_images))
    holdout = None if cfg.int8_holdout is None else int8_gate.holdout_images(cfg.int8_holdout)
    holdout_digest = keyed(int8_gate.default_holdout_recipe() if holdout is None else int8_gate.digest_of(holdout))

    def calibration():
        images = user_images if user_images is not None else int8_gate.calibration_images(None)
        return int8_gate.preprocess_all(images, Preprocessor(pp), what="calibration")

    def gate(int8_xml):
        images = holdout if holdout is not None else int8_gate.holdout_images(None)
        held = int8_gate.preprocess_all(images, Preprocessor(pp), what="held-out")
        fp, q = OpenVinoBackend(fp32_xml, "fp32", cfg.num_threads), OpenVinoBackend(int8_xml, "int8", cfg.num_threads)
        return int8_gate.judge(fp.run, q.run, held, labels, thresholds) | {
            "model": cfg.name, "weights_sha256": meta["weights_sha256"],
            "calibration": cfg.calibration or "bundled photos (even half, seed 7001)", "calibration_sha256": digest,
            "holdout": cfg.int8_holdout or int8_gate.DEFAULT_HOLDOUT, "cpu_flags": cpu_flags(),
            "openvino": openvino_version(), "nncf": package_version("nncf")}

    xml, report = ensure_int8(onnx_path, calibration, digest, gate, holdout_digest)
    report = int8_gate.rejudge(report, thresholds)  # thresholds may have changed since the model was cached
    if report["passed"]:
        return OpenVinoBackend(xml, "int8", cfg.num_threads, cfg.streams), report | {"served": "int8"}
    logger.warning("int8 model of %s REFUSED by the accuracy gate (%s): serving fp32 instead; numbers: %s",
                   cfg.name, ", ".join(report["failed"]),
                   {k: report[k] for k in ("top1_agreement", "top5_overlap", "mean_cosine",
                                           "recall_at_10_vs_fp32_index", "recall_at_10_vs_int8_index")})
    return OpenVinoBackend(fp32_xml, "fp32", cfg.num_threads, cfg.streams), report | {"served": "fp32"}


def _read_meta(meta_path: Path, onnx_path: Path) -> dict | None:
    if not (meta_path.is_file() and onnx_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        logger.warning("ignoring unreadable ONNX cache metadata %s", meta_path)
        return None
    return meta if meta.get("format") == ONNX_FORMAT else None


def build_torch(cfg: ModelConfig, weights: WeightsRef):
    """Create the timm model, load weights strictly, and resolve its preprocessing and labels."""
    import timm
    import torch
    from timm.data import resolve_data_config

    from .models import check_model_name

    check_model_name(cfg.name)
    sd = None
    num_classes = cfg.num_classes
    if weights.path is not None:
        sd = read_state_dict(weights.path)
        if not weights.embedded:
            found = classifier_shape(sd)
            if num_classes is None:
                num_classes = found
            elif found is not None and found != num_classes:
                raise WeightsError(
                    f"checkpoint {weights.source} has a {found}-class classifier but num_classes={num_classes}"
                )
    kwargs = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights.path is None:
        torch.manual_seed(0)  # 'random' weights are a seeded init, so every replica agrees
    try:
        if cfg.pretrained_cfg_overlay:
            kwargs["pretrained_cfg_overlay"] = dict(cfg.pretrained_cfg_overlay)
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm raises various errors for bad kwargs
        raise ConfigError(f"cannot create {cfg.name} with {kwargs}: {e}") from e
    if sd is not None:
        if weights.embedded:
            sd = map_by_order(sd, model.state_dict(), weights.source)
        load_into(model, sd, weights.source)
    model.eval()
    num_classes = int(model.num_classes)
    if num_classes <= 0:
        raise WeightsError(f"{cfg.name} has no classifier head (num_classes={num_classes}); Lens needs one to tag")

    data_cfg = resolve_data_config(model=model)
    if cfg.input_size is not None:
        data_cfg["input_size"] = (3, cfg.input_size, cfg.input_size)
    pp = PreprocessConfig.from_dict(data_cfg)
    labels = read_labels(cfg.labels, num_classes) if cfg.labels else default_labels(num_classes)
    return model, pp, num_classes, labels

"""The OpenVINO backend: fp32 and post-training int8 (NNCF) models converted from Lens's ONNX export.

Variants are cached beside the ONNX export, keyed by everything that changes them: the ONNX stem (model name,
input size, classes, weights checksum, export format), OpenVINO's version, and for int8 NNCF's version and the
calibration set's digest. They are built under a file lock (one process converts, the rest wait and reuse) and
written atomically (a directory renamed into place). The warm path imports only ``openvino``.

An int8 model serves only if it passes the accuracy gate (:mod:`lens.runtime.int8_gate`) against fp32 on images never used
for calibration; the gate's report is stored next to it. A refused int8 model falls back to fp32, loudly.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

__all__ = ["OpenVinoBackend", "ensure_fp32", "ensure_int8", "cpu_flags", "openvino_version"]

logger = logging.getLogger(__name__)

#: bump when the conversion or quantization recipe changes: old cache entries are then never read
OV_FORMAT = 1


def package_version(name: str) -> str:
    """An installed package's version from its metadata, without importing it (openvino takes a while to import,
    nncf about 5 s); ImportError when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        raise ImportError(f"{name} is not installed") from None


def openvino_version() -> str:
    """The installed OpenVINO's version (``backend: auto`` asks on every start)."""
    return package_version("openvino")


def cpu_flags() -> list[str]:
    """The CPU's vector/matrix instruction sets that decide int8 speed (AVX2, AVX-512, VNNI, AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in wanted if f in have]


class OpenVinoBackend:
    """OpenVINO Runtime on CPU over an IR model (``.xml`` + ``.bin``).

    Safe under concurrent :meth:`run` calls by construction: an ``InferRequest`` holds its input and output
    tensors, so each caller takes one of its own from a free list (a new one is created when every request is
    busy, so the pool grows to the number of concurrent callers and is never shared by two of them). One request
    shared between threads once gave rows another image's embedding, or failed with "Infer Request is busy"."""

    name = "openvino"
    device = "cpu"

    def __init__(self, xml: str | os.PathLike, precision: str = "fp32", num_threads: int | None = None,
                 streams: int = 1) -> None:
        import openvino as ov

        core = ov.Core()
        self.path = Path(xml)
        # OpenVINO's own cache of compiled models (keyed by it: the model file, device, config and its release),
        # beside Lens's variants: a warm start loads the compiled blob instead of compiling (0.27 -> 0.07 s, Lite0)
        core.set_property({"CACHE_DIR": str(self.path.parent.parent / "compiled")})
        # fp32 means fp32: on CPUs with AMX/AVX512-BF16 OpenVINO would otherwise run "fp32" models in bf16
        # No CPU pinning: OpenVINO pins its inference threads to the first cores by default, and every process
        # pins to the same ones: two 1-thread processes (lens embed's two actors, two Serve replicas) ran 89
        # images/s together on 2 cores pinned and 178-182 unpinned; one process on all cores ran the same either
        # way (174-185). Lens runs several model processes per node, so the OS places the threads.
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False}
        if streams > 1:  # concurrent batches (a Serve pool's concurrent_batches), num_threads threads each
            config["NUM_STREAMS"] = int(streams)
        if num_threads:
            config["INFERENCE_NUM_THREADS"] = int(num_threads) * int(streams)
        self.precision = precision
        self.version = openvino_version()
        self._compiled = core.compile_model(str(self.path), "CPU", config)
        self._idle: queue.SimpleQueue = queue.SimpleQueue()  # requests no caller holds
        self._idle.put(self._compiled.create_infer_request())
        self._made = 1
        self._made_lock = threading.Lock()
        outs = {o.get_any_name(): o for o in self._compiled.outputs}
        self._logits, self._features = outs["logits"], outs["features"]

    @property
    def requests(self) -> int:
        """How many infer requests exist: the most callers that ran at once (for tests and stats)."""
        return self._made

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
            with self._made_lock:
                self._made += 1
        try:
            # share_outputs=False: the arrays returned are copies, still valid after the request runs again
            res = request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)}, share_inputs=False,
                                share_outputs=False)
            return (np.asarray(res[self._logits], np.float32), np.asarray(res[self._features], np.float32))
        finally:
            self._idle.put(request)


def _variant_dir(onnx_path: Path, tag: str) -> Path:
    return onnx_path.parent.parent / "openvino" / f"{onnx_path.stem}-ov{openvino_version()}f{OV_FORMAT}-{tag}"


def _build(target: Path, make) -> Path:
    """``target/model.xml``, made once by ``make(stage_dir)`` under a file lock, the directory renamed into
    place when complete."""
    from filelock import FileLock

    xml = target / "model.xml"
    if xml.is_file():
        return xml
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=1800):
        if xml.is_file():  # another process built it meanwhile
            return xml
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            make(stage)
            os.replace(stage, target)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return xml


def ensure_fp32(onnx_path: Path) -> Path:
    """The fp32 IR converted from ``onnx_path`` (cached)."""

    def make(stage: Path) -> None:
        import openvino as ov

        ov.save_model(ov.convert_model(str(onnx_path)), str(stage / "model.xml"), compress_to_fp16=False)

    return _build(_variant_dir(onnx_path, "fp32"), make)


def ensure_int8(onnx_path: Path, calibration, calibration_digest: str, gate, holdout_digest: str) -> tuple[Path, dict]:
    """The NNCF int8 IR for this calibration set (cached, built once: ``calibration() -> (N, 3, H, W)`` is called
    only then) and its gate report on the held-out set whose digest is ``holdout_digest`` (``gate(int8_xml) ->
    report`` runs once per held-out set, its report stored beside the model as ``gate-<digest>.json``). A warm
    start (model and report cached) never imports NNCF: its version, part of the cache key, comes from package
    metadata."""
    from filelock import FileLock

    from lens.storage import atomic_write_bytes

    target = _variant_dir(onnx_path, f"int8-nncf{package_version('nncf')}-cal{calibration_digest[:16]}")

    def make(stage: Path) -> None:
        import contextlib
        import sys

        import nncf
        import openvino as ov

        # NNCF logs and draws progress bars on stdout, where `lens tag` writes its JSON lines: to stderr instead
        nncf.set_log_level(logging.WARNING)
        with contextlib.redirect_stdout(sys.stderr):
            _quantize(nncf, ov, stage)

    def _quantize(nncf, ov, stage: Path) -> None:
        model = ov.Core().read_model(str(ensure_fp32(onnx_path)))
        x = calibration()
        batches = [x[i : i + 1] for i in range(len(x))]
        # The recipe measured on Lite0 (README, int8): symmetric (PERFORMANCE) activations, full bias correction,
        # and three layers kept in fp32: the stem (raw pixels), the last convolution (it makes the embedding)
        # and the classifier. Quantizing all of them costs ~20 points of top-1 agreement with fp32.
        convs = [op.get_friendly_name() for op in model.get_ordered_ops()
                 if op.get_type_name() in ("Convolution", "GroupConvolution")]
        q = nncf.quantize(model, nncf.Dataset(batches), preset=nncf.QuantizationPreset.PERFORMANCE,
                          subset_size=len(batches), fast_bias_correction=False,
                          ignored_scope=nncf.IgnoredScope(types=["MatMul"], names=convs[:1] + convs[-1:],
                                                          validate=False))
        ov.save_model(q, str(stage / "model.xml"), compress_to_fp16=False)

    xml = _build(target, make)
    report_path = target / f"gate-{holdout_digest[:16]}.json"
    if not report_path.is_file():
        with FileLock(str(report_path) + ".lock", timeout=1800):
            if not report_path.is_file():  # another process judged it meanwhile
                report = gate(xml) | {"holdout_sha256": holdout_digest}
                atomic_write_bytes(report_path, (json.dumps(report, indent=1) + "\n").encode())
    return xml, json.loads(report_path.read_text())


def gate_reports(cache_dir: str | os.PathLike) -> list[dict]:
    """Every stored int8 gate report under ``cache_dir`` (for ``lens models``)."""
    out = []
    for p in sorted((Path(cache_dir) / "openvino").glob("*/gate-*.json")):
        try:
            out.append(json.loads(p.read_text()) | {"variant": p.parent.name})
        except (OSError, json.JSONDecodeError):
            continue
    return out

"""Inference backends. Each takes a normalised NCHW ``float32`` batch and returns
``(logits, pooled_features)`` as ``float32`` numpy arrays from one forward pass.

* :class:`TorchBackend`: eager PyTorch; fp32 ``channels_last`` on CPU, fp16/bf16
  autocast on CUDA.
* :class:`OnnxBackend`: ONNX Runtime on CPU, over a model exported once by
  :func:`export_onnx` and cached on disk (see :mod:`lens.runtime.loading`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Backend", "TorchBackend", "OnnxBackend", "heads_module", "export_onnx", "ONNX_OPSET"]

logger = logging.getLogger(__name__)

ONNX_OPSET = 18


class Backend(Protocol):
    """``run`` is safe to call from several threads at once on one instance (tests/test_concurrency.py): ONNX
    Runtime's ``InferenceSession.run`` and torch's inference are; OpenVINO keeps one infer request per caller."""

    name: str
    device: str
    precision: str
    version: str  # the runtime's version (part of every cache key of model outputs)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def heads_module(model: "torch.nn.Module") -> "torch.nn.Module":
    """Wrap a timm classifier so one forward pass returns ``(logits, pre_logits_features)``."""
    import torch

    class _Heads(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            feats = self.m.forward_head(self.m.forward_features(x), pre_logits=True)
            return self.m.get_classifier()(feats), feats

    return _Heads(model).eval()


class TorchBackend:
    """Eager PyTorch inference."""

    name = "torch"

    def __init__(self, module: "torch.nn.Module", device: str = "cpu", precision: str = "auto",
                 num_threads: int | None = None, channels_last: bool = True) -> None:
        import torch

        self.device = device
        self._torch = torch
        self._cuda = device.startswith("cuda")
        if precision == "auto":
            precision = "fp16" if self._cuda else "fp32"
        if not self._cuda and precision != "fp32":
            raise ValueError(f"precision {precision} needs CUDA; CPU runs fp32")
        self.precision = precision
        self.version = torch.__version__
        self._dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]
        if num_threads and not self._cuda:
            torch.set_num_threads(num_threads)
        self._channels_last = channels_last
        module = module.to(device)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self._module = module.eval()

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self._cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self._dtype is not None:
                with torch.autocast(device_type="cuda", dtype=self._dtype):
                    logits, feats = self._module(x)
            else:
                logits, feats = self._module(x)
        return logits.float().cpu().numpy(), feats.float().cpu().numpy()


class OnnxBackend:
    """ONNX Runtime on CPU."""

    name = "onnx"
    device = "cpu"
    precision = "fp32"

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None, spin: bool = False) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = int(num_threads or 0)  # 0 = one per physical core
        so.inter_op_num_threads = 1
        if not spin:
            # Idle intra-op threads sleep instead of busy-waiting: on a shared host (a Serve replica beside
            # its proxy, decode threads and other replicas) spinning steals the cores the rest needs.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.version = ort.__version__
        self._session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, feats = self._session.run(
            ["logits", "features"], {self._input: np.ascontiguousarray(batch, dtype=np.float32)}
        )
        return logits, feats


def export_onnx(model: "torch.nn.Module", path: Path, input_size: tuple[int, int, int]) -> None:
    """Export ``(logits, features)`` heads of ``model`` to one self-contained ONNX file, atomically."""
    import torch

    heads = heads_module(model).to("cpu").float()
    example = torch.zeros((2, *input_size), dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.onnx")
    os.close(fd)
    # The exporter's optimiser logs hundreds of INFO lines; keep them out of service logs.
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        torch.onnx.export(
            heads,
            (example,),
            tmp,
            input_names=["input"],
            output_names=["logits", "features"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)

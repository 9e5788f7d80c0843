#!/usr/bin/env python
"""Why Lens offers no ONNX Runtime int8: ORT static int8 (three formats) against OpenVINO int8 and ORT fp32 on
this CPU, with the same calibration images and held-out crops as Lens's int8 gate.
Prints JSON and writes benchmarks/ort_int8.json."""

import json
import logging
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from machine import describe  # noqa: E402 - the benchmarks' machine record (scripts/machine.py)


def main() -> None:
    logging.disable(logging.WARNING)
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from lens.runtime import int8_gate
    from lens.runtime.backends import OnnxBackend
    from lens.runtime.config import ModelConfig
    from lens.runtime.loading import load_model
    from lens.runtime.openvino import cpu_flags
    from lens.runtime.preprocess import Preprocessor

    m = load_model(ModelConfig(backend="onnx"))
    prep = Preprocessor(m.preprocess)
    cal = int8_gate.preprocess_all(int8_gate.calibration_images(None, 64), prep, what="calibration")
    held = int8_gate.preprocess_all(int8_gate.holdout_images(None), prep, what="held-out")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": cal[i : i + 1]} for i in range(len(cal))])

        def get_next(self):
            return next(self.it, None)

    work = Path(tempfile.mkdtemp(prefix="lens-ort-int8-"))
    quant_pre_process(str(m.onnx_path), str(work / "pre.onnx"))
    ov = load_model(ModelConfig(backend="openvino", precision="int8"))

    def speed(b) -> float:
        x = held[:8]
        b.run(x)
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < 3:
            b.run(x)
            k += 8
        return round(k / (time.perf_counter() - t0), 1)

    keys = ("top1_agreement", "mean_cosine", "recall_at_10_vs_fp32_index")
    out = {"machine": describe(), "cpu_flags": cpu_flags(),
           "images_per_s_batch8": {"onnxruntime_fp32": speed(m.backend), "openvino_int8": speed(ov.backend)},
           "openvino_int8_gate": {k: ov.quantization[k] for k in keys}, "onnxruntime_int8": {}}
    variants = {
        "QDQ u8s8 per-channel reduce_range": dict(quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                                                  activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8),
        "QDQ s8s8 per-channel": dict(quant_format=QuantFormat.QDQ, per_channel=True,
                                     activation_type=QuantType.QInt8, weight_type=QuantType.QInt8),
        "QOperator u8s8 per-channel": dict(quant_format=QuantFormat.QOperator, per_channel=True,
                                           activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8),
    }
    for name, kw in variants.items():
        try:
            quantize_static(str(work / "pre.onnx"), str(work / "q.onnx"), Reader(), **kw)
            b = OnnxBackend(work / "q.onnx")
            r = int8_gate.judge(m.backend.run, b.run, held, m.labels, int8_gate.GateThresholds())
            out["onnxruntime_int8"][name] = {k: r[k] for k in keys} | {"images_per_s_batch8": speed(b)}
        except Exception as e:  # noqa: BLE001 - a format that fails to build is a result too
            out["onnxruntime_int8"][name] = {"failed": f"{type(e).__name__}: {str(e)[:150]}"}
    (ROOT / "benchmarks" / "ort_int8.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

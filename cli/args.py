"""Command-line flags for a model (``--model``, ``--weights``, ``--backend`` ...) and the configs they make: shared
by every command that loads a model (``lens tag``, ``lens embed``, ``lens index search``)."""

from __future__ import annotations

import argparse

__all__ = ["add_model_args", "configs_from_args"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="timm EfficientNet name (default: tf_efficientnet_lite0)")
    g.add_argument("--weights", default=None, help="checkpoint: PATH (.pth/.safetensors) or s3://URI; "
                   "default: the embedded Lite0 ImageNet weights")
    g.add_argument("--num-classes", type=int, default=None, help="classifier size of a fine-tuned checkpoint")
    g.add_argument("--labels", default=None, help="label names file for a custom head (one per line or JSON)")
    g.add_argument("--head", action="append", default=None, metavar="PACKAGE",
                   help="a lens train head package (directory or s3://) whose custom tags join every answer; "
                   "repeat for several heads on one backbone")
    g.add_argument("--backend", choices=_choices("backend"), default=None,
                   help="auto (default): on CPU the faster of ONNX Runtime and OpenVINO (measured once), torch on GPU; "
                   "onnx, openvino (CPU) or torch")
    g.add_argument("--precision", choices=_choices("precision"), default=None,
                   help="auto (default: fp32 on CPU, fp16 on GPU); int8: OpenVINO post-training quantization, served "
                   "only if it passes the accuracy gate (else fp32, said loudly); fp16/bf16: torch on GPU")
    g.add_argument("--calibration", default=None, metavar="DIR", help="int8: calibration images (a folder of image "
                   "files or Parquet with an image column; default: the bundled set)")
    g.add_argument("--int8-holdout", default=None, metavar="DIR", help="int8: the accuracy gate's held-out images, "
                   "never calibrated on (default: crops of photos that never chose the int8 recipe)")
    g.add_argument("--custom-top-k", type=int, default=None, metavar="K",
                   help="custom tags: each head's K best classes with scores, each marked whether it passed its "
                   "threshold (default: only the classes at or above their thresholds)")
    g.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    g.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="YAML with `model:` and `decode:` sections (see infra/lens.yaml); flags override it")


_MODEL_FLAGS = {"name": "model", "weights": "weights", "num_classes": "num_classes", "labels": "labels",
                "backend": "backend", "precision": "precision", "device": "device", "num_threads": "threads",
                "max_batch_size": "batch_size", "heads": "head", "custom_top_k": "custom_top_k",
                "calibration": "calibration", "int8_holdout": "int8_holdout"}


def _choices(field: str) -> list[str]:
    """Every value ``ModelConfig.<field>`` accepts: the CLI offers exactly what the config does."""
    from typing import get_args

    from lens.runtime.config import ModelConfig

    return list(get_args(ModelConfig.model_fields[field].annotation))


def configs_from_args(args: argparse.Namespace, data: dict | None = None):
    """(ModelConfig, DecodeConfig) from ``--config FILE`` (if given; ``data``: its content, already read) with
    command-line flags on top."""
    from lens.runtime.config import DecodeConfig, ModelConfig, read_config, validate

    where = f"{args.config} and the command line" if args.config else "command line"
    if data is None:
        data = read_config(args.config) if args.config else {}
    model = dict(data.get("model") or {})
    for key, attr in _MODEL_FLAGS.items():
        if getattr(args, attr, None) is not None:
            model[key] = getattr(args, attr)
    return validate(ModelConfig, model, where=where), validate(DecodeConfig, data.get("decode") or {}, where=where)

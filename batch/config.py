"""Typed configuration of a bulk embedding job (``lens embed``), validated before Ray starts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, field_validator, model_validator

from lens.runtime.config import DEFAULT_MAX_BATCH_SIZE, DecodeConfig, ModelConfig, StrictModel

__all__ = ["EmbedConfig", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


class EmbedConfig(StrictModel):
    """One ``lens embed`` run: where from, where to, which model, how wide."""

    input: str = Field(..., description="Parquet shards (directory, file, glob or s3:// prefix) or a folder "
                       "of image files")
    output: str = Field(..., description="output directory or s3:// prefix; re-running resumes")
    input_format: Literal["auto", "parquet", "images"] = Field(
        "auto", description="auto: Parquet if the input holds .parquet files, else image files")
    id_column: str = Field("id", description="Parquet column with the row's id (any type; carried as is)")
    image_column: str = Field("image", description="Parquet column with encoded image bytes")
    carry_columns: tuple[str, ...] = Field((), description="other input columns copied to the output")
    files_per_shard: PositiveInt = Field(
        1000, description="image-folder input: files per unit of progress (what a resume skips or redoes)")
    image_extensions: tuple[str, ...] = Field(IMAGE_EXTENSIONS, description="image-folder input: file types read")

    model: ModelConfig = Field(default_factory=ModelConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    top_k: PositiveInt = Field(5, le=100, description="tags stored per image")

    batch_size: PositiveInt = Field(DEFAULT_MAX_BATCH_SIZE,
                                    description="images per model call in a worker (sets model.max_batch_size)")
    read_rows: PositiveInt = Field(
        128, description="most rows per read unit (one actor call or decode task): whole Parquet row groups (or "
        "image files); a job small for its pool gets smaller units, at least 8 per concurrent slot, down to one row group")
    decode_batch_size: PositiveInt = Field(16, description="images decoded per batch inside a decode task")
    decode_cpus: PositiveFloat = Field(1.0, description="CPUs reserved per decode task (when decoding runs in "
                                       "separate tasks: GPU actors, or decode_in_actors: false)")
    decode_in_actors: bool | None = Field(
        None, description="read and decode inside the model actors, in threads beside the model (the shape of the "
        "online path: no crops through Ray's object store, one kind of worker process); None = yes for CPU actors, "
        "no for GPU actors (a GPU outruns the CPUs of its own actor, so separate decode tasks feed it)")
    actor_threads: PositiveInt = Field(
        2, le=16, description="decode_in_actors: read units one CPU actor works on at once, each in its own thread "
        "(one unit's decoding overlaps another's model call)")
    block_mb: PositiveFloat | None = Field(
        None, le=1024, description="with decode tasks (not decode_in_actors): target Ray Data block size (MiB) "
        "between stages; None = one decode batch of preprocessed crops (decode_batch_size x H x W x 3 bytes, "
        "2.4 MiB at 224 px), so each decoded batch moves on at once")
    workers: PositiveInt | None = Field(
        None, description="model actors; None = automatic: one per GPU / gpus_per_worker, or on CPU one per "
        "cpus_per_worker of the cluster's CPUs (half of them with decode tasks); a fixed pool (scripts/bench_batch.py)")
    gpus_per_worker: NonNegativeFloat = Field(
        0.0, description="GPUs per model actor; 0 = CPU actors running ONNX Runtime. Fractions share a GPU")
    cpus_per_worker: PositiveFloat | None = Field(
        None, description="CPUs reserved per model actor; None = 1 (CPU actors that decode too, and GPU actors) or "
        "0.5 (CPU actors fed by decode tasks). A CPU actor runs one inference thread per reserved CPU (2x with decode "
        "tasks beside it) unless model.num_threads says otherwise: by default one actor per CPU with one thread "
        "each, the fastest when decoding shares the cores (scripts/bench_batch.py)")
    address: str | None = Field(None, description="Ray cluster address; None = RAY_ADDRESS or a local Ray")

    @field_validator("carry_columns")
    @classmethod
    def _no_reserved(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        reserved = {"embedding", "tags", "error", "message", "_shard", "_pixels"}
        bad = sorted(reserved & set(v))
        if bad:
            raise ValueError(f"carry_columns may not include Lens output columns {bad}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "EmbedConfig":
        if self.input.rstrip("/") == self.output.rstrip("/"):
            raise ValueError("input and output must differ")
        if self.id_column in self.carry_columns or self.image_column in self.carry_columns:
            raise ValueError("carry_columns must not repeat id_column or image_column")
        if self.gpus_per_worker > 0 and self.model.device == "cpu":
            raise ValueError("gpus_per_worker > 0 needs model.device auto or cuda, not cpu")
        return self

    @property
    def uses_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def fused(self) -> bool:
        """Whether the model actors read and decode their rows themselves (no separate decode tasks)."""
        return (not self.uses_gpu) if self.decode_in_actors is None else self.decode_in_actors

    @property
    def actor_cpus(self) -> float:
        """CPUs reserved per model actor."""
        if self.cpus_per_worker is not None:
            return self.cpus_per_worker
        return 1.0 if self.uses_gpu or self.fused else 0.5

"""Typed arguments of the Lens Serve application (the ``args:`` of a Serve config YAML)."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from lens.runtime.config import DecodeConfig, ModelConfig, StrictModel

from .versions import VersionsConfig

__all__ = ["BatchingConfig", "PoolConfig", "replica_cpus", "ApiConfig", "AppArgs", "RolloutConfig", "DriftConfig",
           "FeedbackConfig", "UiConfig"]

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


#: A model deployment's ``max_ongoing_requests`` unless the Serve config overrides it (one value: the
#: deployments use it and the config check compares ``max_batch_size`` with it).
MODEL_MAX_ONGOING_REQUESTS = 128


class BatchingConfig(StrictModel):
    """Live knobs of a model pool, sent as the deployment's ``user_config`` and applied in ``reconfigure``.
    ``max_batch_size <= max_pending`` is checked here, so a bad value fails before any model loads; the
    other bound, ``<= max_ongoing_requests``, is checked with the deployment's settings before deploying."""

    max_pending: PositiveInt = Field(
        96, description="images a replica holds (decoding or waiting for the model) before answering 503"
    )
    max_batch_size: PositiveInt = Field(16, le=512, description="largest batch the model sees")
    batch_wait_timeout_s: float = Field(
        0.03, ge=0.0, le=5.0,
        description="how long a batch may wait to fill, and only while other images are still decoding; "
        "a lone request never waits",
    )

    @model_validator(mode="after")
    def _batches_can_fill(self):
        if self.max_batch_size > self.max_pending:
            raise ValueError(f"max_batch_size ({self.max_batch_size}) must be <= max_pending ({self.max_pending}), "
                             "or batches can never fill")
        return self


class DriftConfig(StrictModel):
    """Online drift detection in each replica of a pool: a window of recent embeddings and top-1 classes tested
    against a reference profile (``lens drift profile``; ``lens embed`` and ``lens index build`` write one)."""

    reference: str = Field(..., description="drift profile (a drift-profile.npz file, or the directory of an embedding "
                           "job or index version holding one; local or s3://)")
    window: int = Field(500, ge=50, le=5000, description="images per tested window (500-1,000: larger windows make "
                        "negligible shifts 'significant')")
    every: PositiveInt = Field(250, description="images between two tests (each test is a few ms, off the request "
                               "path)")
    alpha: float = Field(0.01, gt=0, lt=1, description="significance level of the overall test (Bonferroni over the "
                         "PCA components and the class test)")
    min_ks: float = Field(0.1, ge=0, le=1, description="effect-size floor: largest per-component KS distance")
    min_psi: float = Field(0.1, ge=0, description="effect-size floor: PSI of the top-1 class distribution")


def replica_cpus(num_cpus: float) -> int:
    """The CPUs a replica given ``num_cpus`` of Ray's counts as its own (threads and lanes follow it): rounded, at
    least 1; 0 (none assigned, or outside Ray) means every core of the machine."""
    return max(1, int(round(num_cpus))) if num_cpus else (os.cpu_count() or 1)


class PoolConfig(StrictModel):
    """One model deployment: a pool of replicas on one kind of device."""

    name: str = Field("Tagger", description="Serve deployment name (what `deployments:` overrides refer to)")
    model: ModelConfig = ModelConfig()
    decode: DecodeConfig = DecodeConfig()
    batching: BatchingConfig = BatchingConfig()
    decode_threads: PositiveInt | None = Field(
        None, description="threads that decode+preprocess while the model runs; None = the replica's num_cpus"
    )
    concurrent_batches: PositiveInt | None = Field(
        None, le=8, description="batches a replica runs on the model at once, each on num_cpus / concurrent_batches "
        "inference threads (OpenVINO: one stream each). None: 2 on a CPU replica of 2 or more CPUs (one batch per "
        "thread keeps every core busy where one batch on two threads leaves them waiting on each other: docs: "
        "performance), else 1 (a GPU runs one batch at a time)")
    warmup_batch_sizes: tuple[PositiveInt, ...] = Field((1,), description="dummy batches run before taking traffic")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (ONNX Runtime threads follow it)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; fractions share a GPU")
    nice: int | None = Field(None, ge=0, le=19, description="CPU scheduling niceness of the pool's replica "
                             "processes: the threads that run its code and its model (lower runs first; Ray's own gRPC threads in the "
                             "process keep their own). None: Ray's worker niceness "
                             "(15 unless RAY_worker_niceness says otherwise). The event consumer's bulk pool runs at "
                             "19 by default, so interactive pools on the same node get the cores first and bulk work "
                             "takes them back when they are idle. It orders CPU time within a node (one pod), not "
                             "GPU time")
    versions: VersionsConfig | None = Field(None, description="serve a registry model by alias (stable, plus a "
                                            "running rollout's canary) instead of model.weights")
    drift: DriftConfig | None = Field(None, description="online drift detection against a reference profile "
                                      "(None: off)")
    head_registry: str | None = Field(None, description="registry where per-request heads "
                                      "(serve_multiplexed_model_id: NAME[@VERSION]) are found; default: versions' "
                                      "registry")
    heads_allowed: dict[str, str] = Field(
        default_factory=dict, description="per-request heads by name besides the registry's: NAME -> a head "
        "package (directory or s3:// prefix) the operator chose. A request names a head only by NAME[@VERSION]: "
        "never a path or a URI")
    max_head_bytes: int = Field(64 << 20, gt=0, description="largest per-request head package downloaded (a head "
                                "is kilobytes): a larger one is refused before any byte is fetched")
    head_download_s: float = Field(30.0, gt=0, description="a per-request head's download stops after this long "
                                   "(the request has been answered 504 by then); nothing unverified is kept")

    def lanes_for(self, cpus: int) -> int:
        """Batches a replica of ``cpus`` CPUs runs on the model at once: ``concurrent_batches``, by default 2 on a
        CPU replica of 2+ CPUs, else 1."""
        return self.concurrent_batches or (2 if cpus >= 2 and self.num_gpus == 0 else 1)

    def model_for(self, cpus: int) -> ModelConfig:
        """The model config as a replica of ``cpus`` CPUs runs it: ``streams`` = :meth:`lanes_for`, each on
        ``num_threads`` = its share of the CPUs unless the pool sets the threads itself."""
        lanes = self.lanes_for(cpus)
        update: dict = {"streams": lanes}
        if self.model.num_threads is None:
            update["num_threads"] = max(1, cpus // lanes)
        return self.model.model_copy(update=update)

    @field_validator("heads_allowed")
    @classmethod
    def _head_names(cls, v: dict[str, str]) -> dict[str, str]:
        from lens.errors import LensError
        from lens.registry.store import parse_model_ref

        for name in v:
            try:
                ok = "@" not in name and parse_model_ref(name)[0] == name
            except LensError:
                ok = False
            if not ok:
                raise ValueError(f"heads_allowed names must be plain names (letters, digits, ._-), got {name!r}")
        return v

    @model_validator(mode="after")
    def _device_matches_resources(self) -> "PoolConfig":
        on_gpu = self.model.device.startswith("cuda")
        if on_gpu and self.num_gpus <= 0:
            raise ValueError(f"pool {self.name}: device {self.model.device} needs num_gpus > 0")
        if self.num_gpus > 0 and self.model.device == "cpu":
            raise ValueError(f"pool {self.name}: num_gpus={self.num_gpus} with device cpu wastes the GPU")
        return self

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"pool name must match {_NAME.pattern}, got {v!r}")
        return v


class RolloutConfig(StrictModel):
    """When the controller rolls a canary back, advances it, or promotes it (app args ``rollout:``)."""

    eval_interval_s: PositiveFloat = Field(5.0, le=600, description="how often running rollouts are judged")
    min_requests: PositiveInt = Field(20, description="canary requests a window needs before its rates count")
    max_error_rate: float = Field(0.02, ge=0, le=1, description="roll back above this canary 5xx rate")
    max_p95_ratio: PositiveFloat = Field(1.5, description="roll back when canary p95 > this x stable p95 ...")
    min_p95_delta_ms: float = Field(25.0, ge=0, description="... and more than this many ms above it")
    min_top1_agreement: float = Field(0.8, ge=0, le=1, description="roll back below this shadow top-1 agreement")
    min_shadow_pairs: PositiveInt = Field(20, description="shadow comparisons needed before agreement counts")
    stale_after_s: PositiveFloat = Field(30.0, description="ignore a replica that has not reported for this long")


class FeedbackConfig(StrictModel):
    """``POST /v1/feedback``: labeled feedback, written to durable Parquet parts and counted as accuracy metrics."""

    sink: str = Field(..., description="where feedback parts go (directory or s3://bucket/prefix)")
    flush_s: PositiveFloat = Field(1.0, le=60, description="group commit: a request is answered once the part holding "
                                   "it is written (at most this long after it arrives)")
    max_items: PositiveInt = Field(100, le=10_000, description="most feedback items in one request")
    max_labels: PositiveInt = Field(20, le=1000, description="most true labels per item")


class UiConfig(StrictModel):
    """The search page (``/ui``) and the thumbnails it shows (``GET /v1/thumbnail/{id}``)."""

    enabled: bool = Field(True, description="serve the search page at /ui (it calls the API with the user's key)")
    thumbnails: Literal["proxy", "presign", "off"] = Field(
        "proxy", description="how /v1/thumbnail answers for s3:// images: proxy = read, shrink and send a JPEG "
        "(bounded); presign = redirect (307) to a presigned S3 URL of the original; off = 404. Local images are "
        "always proxied, and only from local_roots")
    local_roots: tuple[str, ...] = Field((), description="directories whose images /v1/thumbnail may read (a local "
                                         "path outside them is refused with 403; none: no local images)")
    thumbnail_px: int = Field(256, ge=32, le=1024, description="longest side of a proxied thumbnail")
    max_image_bytes: PositiveInt = Field(20 * 1024 * 1024, description="largest source image a thumbnail is made "
                                         "from (413 above)")
    max_concurrent: PositiveInt = Field(4, le=64, description="thumbnails made at once per ingress replica (the rest "
                                        "wait their turn)")
    presign_expiry_s: int = Field(300, ge=10, le=7 * 24 * 3600, description="lifetime of a presigned URL")


class ApiConfig(StrictModel):
    """HTTP behaviour of the ingress."""

    max_body_bytes: PositiveInt = Field(20 * 1024 * 1024, description="largest request body (413 above)")
    max_batch_body_bytes: PositiveInt = Field(64 * 1024 * 1024, description="largest /v1/tag:batch body")
    max_batch_items: PositiveInt = Field(64, description="most images in one /v1/tag:batch request")
    request_timeout_s: PositiveFloat = Field(30.0, description="a request still waiting after this gets 504")
    retry_after_s: PositiveInt = Field(1, description="Retry-After sent with 503 when the queue is full")
    default_top_k: PositiveInt = Field(5, description="tags per image when a request gives no top_k")
    max_top_k: PositiveInt = Field(100, description="largest top_k a request may ask for")
    api_keys_env: str | None = Field("LENS_API_KEYS", description="env var with comma-separated API keys")
    api_keys_file: str | None = Field(None, description="file with one API key per line")
    public_docs: bool = Field(False, description="with API keys on, still serve /docs, /redoc, /openapi.json and "
                              "/v1/models without a key (default: they need one too; /healthz never does)")
    health_timeout_s: PositiveFloat = Field(3.0, le=60, description="/healthz answers 503 when a deployment has "
                                            "not answered within this")
    ui: UiConfig = Field(default_factory=UiConfig, description="the search page and its thumbnails")


class SearchConfig(StrictModel):
    """Similarity search behind the same ingress (``/v1/search``): which index, how it stays fresh."""

    index: str = Field(..., description="index root directory (its CURRENT version is served)")
    refresh_s: float = Field(10.0, gt=0, description="how often to look for a new version and new delta parts")
    delta_sources: tuple[str, ...] = Field((), description="event-path embedding prefixes (local or s3://) whose "
                                           "new parts are searchable before the next build")
    mmap: bool | None = Field(None, description="memory-map the index file (default: IVF indexes)")
    max_k: int = Field(100, ge=1, le=1000, description="largest k a request may ask for")
    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved for the searcher replica")
    shard_deployments: bool = Field(False, description="a sharded index (lens index build --shards N): serve each "
                                    "shard from its own deployment (IndexShard0..N-1, placed by Ray across nodes) "
                                    "behind the searcher, which scatters each query and merges the top-k; false: "
                                    "the searcher loads every shard itself")
    shard_num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per shard replica")
    shard_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per shard "
                                              "replica (e.g. {index_node: 1} to put one shard per node that has it)")


class AppArgs(StrictModel):
    """Everything ``lens.serve.app:build_app`` takes. Pools are tried in order; a full pool overflows to the next."""

    pools: tuple[PoolConfig, ...] = (PoolConfig(),)
    separate_ingress: bool | None = Field(
        None, description="serve HTTP from a LensIngress deployment in front of the pools (no CPUs of its own); None "
        "= only with several pools (one pool answers HTTP itself, one hop less). lens serve --skip-resource-check "
        "turns it on for one pool the cluster cannot place yet, so /healthz answers 503 until it is")
    api: ApiConfig = ApiConfig()
    search: SearchConfig | None = None
    rollout: RolloutConfig = RolloutConfig()
    feedback: FeedbackConfig | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> "AppArgs":
        names = [p.name for p in self.pools]
        if not names:
            raise ValueError("at least one model pool is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique, got {names}")
        for taken in ("LensIngress", "RolloutController", "IndexSearcher"):
            if taken in names:
                raise ValueError(f"{taken} is one of Lens's own deployment names; choose another pool name")
        return self

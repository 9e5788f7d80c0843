"""Typed configuration of the S3 -> SQS event consumer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from lens.runtime.config import StrictModel

__all__ = ["EventsConfig"]


class EventsConfig(StrictModel):
    bucket: str = Field("lens-images", description="bucket whose ObjectCreated/ObjectRemoved events are consumed")
    extra_buckets: tuple[str, ...] = Field(
        (), description="more source buckets; events naming any bucket not configured are skipped unread")
    max_records_per_message: PositiveInt = Field(
        100, le=10_000, description="a message with more S3 records than this is poison (DLQ); S3 sends one")
    queue: str = Field("lens-events", description="SQS queue name (or full URL) receiving the notifications")
    dlq: str = Field("lens-events-dlq", description="dead-letter queue name (or URL)")
    max_receive_count: PositiveInt = Field(5, description="deliveries before a message moves to the DLQ")
    result_prefix: str = Field("lens-tags/", description="sidecars go to {result_prefix}{key}.json")
    embeddings_prefix: str = Field("lens-embeddings/", description="Parquet parts of embeddings for search")
    results_bucket: str | None = Field(None, description="where outputs go; None = the event's bucket")
    object_tags: bool = Field(False, description="also set lens:* S3 object tags on the source object")
    sidecar_embedding: bool = Field(
        False, description="also write the embedding (a JSON list of floats) into each sidecar; it is always in the "
        "Parquet parts under embeddings_prefix, and in the sidecar costs ~25 KB and ~0.6 ms of JSON per 1,280-d image")
    max_object_bytes: PositiveInt = Field(20 * 1024 * 1024, description="larger objects are skipped")
    top_k: PositiveInt = Field(5, description="tags written per image")
    wait_time_s: int = Field(20, ge=0, le=20, description="SQS long-poll wait")
    visibility_timeout_s: PositiveInt = Field(60, description="a message being processed is hidden this long")
    messages_per_poll: int = Field(10, ge=1, le=10, description="messages per ReceiveMessage (SQS allows 10)")
    concurrency: PositiveInt = Field(16, description="objects fetched from S3 at once (a poll's images then go to "
                                      "the model pool in one call)")
    min_pollers: int = Field(1, ge=0, description="pollers kept when the queue is idle (the warm minimum)")
    max_pollers: PositiveInt = Field(4, description="pollers when the backlog is large")
    messages_per_poller: PositiveInt = Field(50, description="backlog per extra poller")
    scale_interval_s: PositiveFloat = Field(5.0, description="how often queue depth is checked")
    region: str | None = Field(None, description="AWS region; None = the usual AWS environment")
    s3_client: Literal["auto", "obstore", "boto3"] = Field(
        "auto", description="client of the two S3 requests every event costs (the image's GET, the sidecar's "
        "conditional PUT): obstore (Rust's object_store, about 1/7 of boto3's CPU per request, same conditional "
        "writes and credential chain) where installed; boto3 for everything else either way")
    route: Literal["s3", "eventbridge"] = Field(
        "s3", description="how `lens events setup` routes the buckets' events to the queue: S3 notifications, or "
        "S3 -> EventBridge -> SQS (a rule on the default bus); the consumer reads both formats either way")

    @property
    def source_buckets(self) -> tuple[str, ...]:
        """Every bucket whose events are processed; anything else is skipped without a read."""
        return tuple(dict.fromkeys((self.bucket, *self.extra_buckets)))

    @model_validator(mode="after")
    def _check(self) -> "EventsConfig":
        if self.min_pollers > self.max_pollers:
            raise ValueError(f"min_pollers ({self.min_pollers}) > max_pollers ({self.max_pollers})")
        for name in ("result_prefix", "embeddings_prefix"):
            if not getattr(self, name) or not getattr(self, name).endswith("/"):
                raise ValueError(f"{name} must be a non-empty prefix ending in '/'")
        return self

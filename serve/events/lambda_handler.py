"""A plain ``handler(event, context)`` so a Lambda (or any function runtime) can front Lens.

It accepts an S3 event or an SQS batch of S3 events, tags each new object by calling the Lens HTTP
API (``LENS_API_URL``, optional ``LENS_API_KEY``), writes the same sidecars and embedding parts as the
Ray consumer (same :class:`~lens.serve.events.consumer.EventProcessor`), and answers SQS batches in the
partial-batch-response format, naming exactly the records to retry.

Environment: ``LENS_API_URL`` (required), ``LENS_API_KEY``, ``LENS_EVENTS_CONFIG`` (JSON of
:class:`~lens.serve.events.config.EventsConfig` fields: ``bucket``/``extra_buckets`` name the source buckets, whose events
alone are processed; prefixes), ``LENS_API_TIMEOUT_S`` (30).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from lens.client import LensAPIError, LensClient
from lens.errors import RequestFailed

from .config import EventsConfig
from .consumer import EventProcessor

__all__ = ["handler", "HttpTagger"]

logger = logging.getLogger("lens.events")


class HttpTagger:
    """The Lens HTTP API (through :class:`lens.client.LensClient`: retries on 503 honouring Retry-After) with the
    model deployment's ``tag_many`` contract."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 30.0, retries: int = 2) -> None:
        self.client = LensClient(base_url, api_key=api_key, timeout_s=timeout_s, retries=retries)
        self._info: dict | None = None

    def info(self) -> dict:
        if self._info is None:
            try:
                pools = self.client.models().get("pools")
            except LensAPIError as e:
                logger.warning("Lens /v1/models: %s", e.message)
                pools = None
            self._info = pools[0] if pools else {}
        return self._info

    async def __call__(self, items: list[bytes], top_k: int, embedding: bool) -> list:
        return list(await asyncio.gather(*(self._tag(d, top_k) for d in items), return_exceptions=True))

    async def _tag(self, data: bytes, top_k: int) -> dict:
        try:
            body = await asyncio.to_thread(self.client.tag, data, top_k=top_k, embedding=True)
        except LensAPIError as e:
            # the API's error answer as the model deployment would raise it; 429/503/504: retry later, not the image
            raise RequestFailed(e.message, code=e.code,
                                status=503 if e.http_status in (429, 503, 504) else e.http_status) from None
        return {"tags": body["tags"], "embedding": body["embedding"]} | {
            k: body[k] for k in ("custom_tags", "model_identity") if k in body}


def _processor(tagger: HttpTagger) -> EventProcessor:
    import boto3

    cfg = EventsConfig.model_validate(json.loads(os.environ.get("LENS_EVENTS_CONFIG", "{}")))
    return EventProcessor(cfg, boto3.client("s3"), tagger, tagger.info())


def handler(event: dict, context=None) -> dict:
    tagger = HttpTagger(os.environ["LENS_API_URL"], os.environ.get("LENS_API_KEY"),
                        float(os.environ.get("LENS_API_TIMEOUT_S", "30")))
    processor = _processor(tagger)
    records = event.get("Records") or []
    if records and records[0].get("eventSource") == "aws:sqs":
        messages = [{"Body": r["body"], "MessageId": r["messageId"], "ReceiptHandle": r["messageId"]}
                    for r in records]
        out = asyncio.run(processor.process_messages(messages))
        return {"batchItemFailures": [{"itemIdentifier": mid} for mid in out.failed]}
    # A direct S3 event (async invocation): a failure raises, so Lambda retries it / sends it to its DLQ.
    out = asyncio.run(processor.process_messages([{"Body": json.dumps(event), "MessageId": "s3-event",
                                                   "ReceiptHandle": "s3-event"}]))
    if out.failed:
        raise RuntimeError(f"Lens could not process the S3 event: {out.counts}")
    return {"processed": out.counts}

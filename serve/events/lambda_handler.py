"""A plain ``handler(event, context)`` so a Lambda (or any function runtime) can front Lens.

It accepts an S3 event or an SQS batch of S3 events, tags each new object by calling the Lens HTTP
API (``LENS_API_URL``, optional ``LENS_API_KEY``), writes the same sidecars and embedding parts as the
Ray consumer (same :class:`~serve.events.consumer.EventProcessor`), and answers SQS batches in the
partial-batch-response format, naming exactly the records to retry.

Environment: ``LENS_API_URL`` (required), ``LENS_API_KEY``, ``LENS_EVENTS_CONFIG`` (JSON of
:class:`~serve.events.config.EventsConfig` fields: ``bucket``/``extra_buckets`` name the source buckets, whose events
alone are processed; prefixes), ``LENS_API_TIMEOUT_S`` (30).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.error
import urllib.request

from lens.errors import RequestFailed

from .consumer import EventProcessor
from .config import EventsConfig

__all__ = ["handler", "HttpTagger"]

logger = logging.getLogger("lens.events")


class HttpTagger:
    """The Lens HTTP API with the model deployment's ``tag`` contract."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self._info: dict | None = None

    def _request(self, path: str, data: bytes | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/octet-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers,
                                     method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                return e.code, json.loads(e.read())
            except ValueError:
                return e.code, {"error": "http_error", "message": str(e), "status": e.code}
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            return 503, {"error": "unreachable", "message": f"Lens API unreachable: {e}", "status": 503}

    def info(self) -> dict:
        if self._info is None:
            status, body = self._request("/v1/models")
            pools = body.get("pools") if status == 200 else None
            self._info = pools[0] if pools else {}
        return self._info

    async def __call__(self, data: bytes, top_k: int, embedding: bool) -> dict:
        status, body = await asyncio.to_thread(self._request, f"/v1/tag?top_k={top_k}&embedding=true", data)
        if status == 200:
            return {"tags": body["tags"], "embedding": body["embedding"]} | (
                {"custom_tags": body["custom_tags"]} if "custom_tags" in body else {})
        # the API's error answer as the model deployment would raise it; 429/503/504: retry later, not the image
        raise RequestFailed(str(body.get("message", "")), code=str(body.get("error", "http_error")),
                            status=503 if status in (429, 503, 504) else int(body.get("status", status)))


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

"""The event consumer: SQS messages of S3 object events in, one result per object version out; deletions too.

Delivery is at least once and out of order; the consumer makes it exactly once in effect:

* a sidecar per object is the idempotency record, written with a conditional PUT: an event whose object
  version (ETag/version) already has one writes nothing; an older one (S3 sequencer) is dropped;
* a message is deleted only after every object it names has its sidecar written;
* a message that keeps failing is left alone and the queue's redrive policy moves it to the DLQ
  after ``maxReceiveCount`` deliveries; malformed messages take that path too;
* objects deleted before processing, non-images and oversized objects get a ``skipped`` sidecar with
  the reason, and their message is deleted: retrying cannot help;
* an ``ObjectRemoved`` event (a deletion, or a versioned bucket's delete marker) whose object is really gone
  writes a tombstone part beside the embedding parts (:mod:`lens.tombstones`: every searcher stops returning
  the image, every later index build drops it) and marks the sidecar ``deleted`` by the same conditional
  writes; one whose key holds an object again (re-uploaded since, or only an older version removed) is
  ``superseded``: the current object's own event decides.

The same :class:`EventProcessor` runs in the Ray Serve consumer deployment, in ``lens events`` and in
the Lambda-style handler; only the tagger (a Serve handle, a local predictor, or the HTTP API) differs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from lens.errors import lens_error_of
from lens.faults import crash_point

from .config import EventsConfig
from .objects import Changed, Missing, in_thread, object_io
from .results import GONE, Record, ResultStore
from .s3events import ObjectEvent, PoisonMessage, parse_message

__all__ = ["EventProcessor", "Outcome", "LocalTagger", "Poller", "queue_url", "queue_depth"]

logger = logging.getLogger("lens.events")

# (a poll's image bytes, top_k, with embedding) -> one answer per image, in order: {"tags", "embedding", ...}, or
# the image's failure as an exception object (a LensError subclass where it is the image's fault); raising fails
# every image of the call
Tagger = Callable[[list[bytes], int, bool], Awaitable[list]]


class RetryLater(Exception):
    """Processing failed in a way that may pass (S3 throttling, model error): leave the message."""


@dataclass
class Outcome:
    """What happened to one batch of messages."""

    deleted: list[str] = field(default_factory=list)  # receipt handles of finished messages
    failed: list[str] = field(default_factory=list)  # message ids left for redelivery / DLQ
    counts: dict = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n


class LocalTagger:
    """The predictor core in this process, with the Serve model's ``tag_many`` contract."""

    def __init__(self, predictor, decode=None) -> None:
        self.predictor = predictor
        self.decode = decode  # an executor that decodes a call's images in parallel; None: one by one
        self._lock = asyncio.Lock()

    async def __call__(self, items: list[bytes], top_k: int, embedding: bool) -> list:
        async with self._lock:  # one model call at a time: a poll's images are its batch
            results = await asyncio.to_thread(self.predictor.predict, items, top_k, self.decode)
        return [r.to_dict() | ({"embedding": r.embedding} if embedding else {}) if r.ok else r.to_error()
                for r in results]

    def info(self) -> dict:
        return self.predictor.info()


class EventProcessor:
    def __init__(self, cfg: EventsConfig, s3, tagger: Tagger, model_info: dict, *, calls=None) -> None:
        self.cfg = cfg
        self.s3 = s3
        self.tagger = tagger
        self.model_info = model_info
        # boto3 is blocking: its calls get their own threads (asyncio's default pool has cpu+4 of them)
        self._io = ThreadPoolExecutor(cfg.concurrency + 4, thread_name_prefix="lens-s3")
        # the image's GET and the sidecar's conditional PUTs (obstore's own runtime where installed, else boto3 on
        # those threads); ``calls`` counts them
        self.objects = object_io(s3, cfg.s3_client, region=cfg.region, calls=calls, executor=self._io)
        self.store = ResultStore(s3, cfg.result_prefix, cfg.embeddings_prefix, results_bucket=cfg.results_bucket,
                                 object_tags=cfg.object_tags, key_by_bucket=len(cfg.source_buckets) > 1,
                                 sidecar_embedding=cfg.sidecar_embedding, objects=self.objects)
        self.sources = frozenset(cfg.source_buckets)
        self._sem = asyncio.Semaphore(cfg.concurrency)

    async def _io_call(self, fn, *args, **kwargs):
        return await in_thread(self._io, fn, *args, **kwargs)

    async def process_messages(self, messages: list[dict]) -> Outcome:
        """Process SQS messages (``Body``, ``ReceiptHandle``, ``MessageId``); never raises for one message."""
        out = Outcome()
        jobs: dict[str, list[ObjectEvent]] = {}
        for m in messages:
            try:
                events = parse_message(m["Body"], self.cfg.max_records_per_message)
            except PoisonMessage as e:
                logger.error("poison message %s: %s", m.get("MessageId"), e)
                out.failed.append(m["MessageId"])
                out.count("poison")
                continue
            if events is None:
                out.deleted.append(m["ReceiptHandle"])
                out.count("test_event")
                continue
            jobs[m["MessageId"]] = []
            for ev in events:
                if ev.bucket in self.sources:
                    jobs[m["MessageId"]].append(ev)
                else:  # never read: only the configured buckets are processed
                    logger.warning("skipping s3://%s/%s (message %s): bucket %r is not a configured source (%s)",
                                   ev.bucket, ev.key, m.get("MessageId"), ev.bucket, ", ".join(sorted(self.sources)))
                    out.count("foreign_bucket")

        async def one(ev: ObjectEvent) -> bytes | Record | None:
            async with self._sem:
                return await self.fetch(ev, out)

        flat, seen = [], set()
        for mid, evs in jobs.items():
            for ev in evs:
                if ev.identity in seen:  # the same object version twice in one receive
                    out.count("duplicate")
                    continue
                seen.add(ev.identity)
                flat.append((mid, ev))
        results = await asyncio.gather(*(one(ev) for _, ev in flat), return_exceptions=True)
        await self.tag_fetched([ev for _, ev in flat], results)
        failed_msgs: set[str] = set()
        done: list[tuple[str, Record]] = []
        for (mid, ev), res in zip(flat, results):
            if isinstance(res, BaseException):
                logger.warning("s3://%s/%s failed (message %s will be retried): %s", ev.bucket, ev.key, mid, res)
                failed_msgs.add(mid)
                out.count("failed")
            elif res is not None:
                done.append((mid, res))
        await self.write_records(done, failed_msgs, out)
        for m in messages:
            mid = m["MessageId"]
            if mid not in jobs:
                continue
            if mid in failed_msgs:
                out.failed.append(mid)
            else:
                out.deleted.append(m["ReceiptHandle"])
        return out

    async def write_records(self, done: list[tuple[str, Record]], failed_msgs: set[str], out: Outcome) -> None:
        """Write the records of one batch, each under its group (an SQS message; a group in ``failed_msgs`` is
        retried whole, and a group that fails here is added to it): tombstones and embedding parts, then sidecars."""
        # Embeddings and tombstones first, sidecars second: a crash in between re-tags on redelivery (a duplicate
        # row that readers drop on (bucket, key, etag)), never a sidecar whose embedding or deletion was lost.
        gone: dict[str, list[tuple[str, Record]]] = {}
        for mid, r in done:
            if r.status == "deleted" and mid not in failed_msgs:
                gone.setdefault(self.cfg.results_bucket or r.event.bucket, []).append((mid, r))
        for bucket, group in gone.items():
            try:
                await self._io_call(self.store.write_tombstones, [r for _, r in group], bucket)
            except Exception as e:  # noqa: BLE001 - S3 trouble: retry the whole set later
                logger.warning("tombstone part not written, its messages will be retried: %s", e)
                failed_msgs.update(mid for mid, _ in group)
        tagged = [(mid, r) for mid, r in done if r.status == "tagged" and mid not in failed_msgs]
        # one part per output bucket and model version: a part's rows share one embedding space (a rollout's
        # canary may answer some of them)
        by_bucket: dict[tuple, list[tuple[str, Record]]] = {}
        for mid, r in tagged:
            version = json.dumps(r.model_identity, sort_keys=True) if r.model_identity else None
            by_bucket.setdefault((self.cfg.results_bucket or r.event.bucket, version), []).append((mid, r))
        for (bucket, _), group in by_bucket.items():
            try:
                await self._io_call(self.store.write_embeddings, [r for _, r in group],
                                    group[0][1].model_identity or self.model_info, bucket)
            except Exception as e:  # noqa: BLE001 - S3 trouble: retry the whole set later
                logger.warning("embedding part not written, its messages will be retried: %s", e)
                failed_msgs.update(mid for mid, _ in group)
        crash_point("events.before_sidecars")
        pending = [(mid, r) for mid, r in done if mid not in failed_msgs]
        writes = await asyncio.gather(*(self.store.write(r, self.model_info) for _, r in pending),
                                      return_exceptions=True)
        for (mid, r), w in zip(pending, writes):
            if isinstance(w, BaseException):
                logger.warning("sidecar for s3://%s/%s not written: %s", r.event.bucket, r.event.key, w)
                failed_msgs.add(mid)
            else:
                out.count(r.status if w == "written" else w)

    async def tag_fetched(self, events: list[ObjectEvent], got: list) -> None:
        """Replace each fetched image in ``got`` (bytes, beside records, ``None`` and exceptions) by its record, or
        by :class:`RetryLater`: the images of a poll go to the tagger in one call (a Serve handle call costs the
        consumer about as much CPU whether it carries one image or ten; ``scripts/bench_events.py``)."""
        idx = [i for i, g in enumerate(got) if isinstance(g, bytes)]
        if not idx:
            return
        try:
            answers = await self.tagger([got[i] for i in idx], self.cfg.top_k, True)
            if len(answers) != len(idx):
                raise RuntimeError(f"the tagger answered {len(answers)} of {len(idx)} images")
        except Exception as exc:  # noqa: BLE001 - the tagger's trouble (no replica, died): each image fails
            answers = [exc] * len(idx)
        for i, answer in zip(idx, answers):
            try:
                got[i] = self.record_of(events[i], answer)
            except RetryLater as e:
                got[i] = e

    async def fetch(self, ev: ObjectEvent, out: Outcome) -> bytes | Record | None:
        """The object's bytes to tag, or what to do instead: a record to write (a deletion, a skip) or ``None``
        (nothing: Lens's own output, an object changed since its event)."""
        if self.store.is_output(ev.key):
            out.count("own_output")
            return None
        if ev.removed:
            return await self._removed(ev, out)
        # No read of the sidecar first: duplicates are rare, and the conditional write in
        # ResultStore.write settles them (a duplicate costs a model call, a new object one fewer S3 call).
        try:
            size, data = await self.objects.get(ev.bucket, ev.key, version_id=ev.version_id,
                                                if_match=None if ev.version_id else ev.etag,
                                                max_bytes=self.cfg.max_object_bytes)
        except Missing:
            return self._skip(ev, GONE)
        except Changed:
            # Overwritten since this event; the newer object's own event will tag it.
            out.count("superseded")
            return None
        except Exception as e:  # noqa: BLE001 - S3 trouble (throttling, a timeout): the message comes back
            raise RetryLater(f"get_object: {e}") from e
        if data is None:
            return self._skip(ev, f"object is {size} bytes; the limit is {self.cfg.max_object_bytes}")
        return data

    def record_of(self, ev: ObjectEvent, result) -> Record:
        """The record of a tagged object from its tagger answer: its tags and embedding, a ``skipped`` record when
        the image is at fault (undecodable, too large), or :class:`RetryLater` raised for anything that may pass (a
        model error)."""
        if isinstance(result, BaseException):
            e = lens_error_of(result)
            if e is None or e.http_status >= 500:
                raise RetryLater(f"tagger: {e.message if e else result}") from result
            return self._skip(ev, f"{e.code}: {e.message}")
        return Record(ev, "tagged", tags=result["tags"], embedding=result["embedding"],
                      custom_tags=result.get("custom_tags"), model_identity=result.get("model_identity"))

    async def _removed(self, ev: ObjectEvent, out: Outcome) -> Record | None:
        """A deletion: the record to write when the key holds no object now, else ``None`` (``superseded``: a newer
        upload, or a versioned bucket's older version removed, left an object whose own event decides)."""
        from botocore.exceptions import ClientError

        try:
            await self._io_call(self.s3.head_object, Bucket=ev.bucket, Key=ev.key)
        except ClientError as e:
            code = e.response["Error"]["Code"]
            if code in ("NoSuchKey", "404", "NotFound", "405", "MethodNotAllowed"):  # 405: a delete marker
                return Record(ev, "deleted", reason=ev.event_name)
            raise RetryLater(f"head_object: {code}") from e
        out.count("superseded")
        return None

    @staticmethod
    def _skip(ev: ObjectEvent, reason: str) -> Record:
        logger.info("skipping s3://%s/%s: %s", ev.bucket, ev.key, reason)
        return Record(ev, "skipped", reason=reason)


def queue_url(sqs, name_or_url: str) -> str:
    if name_or_url.startswith(("https://", "http://")):
        return name_or_url
    return sqs.get_queue_url(QueueName=name_or_url)["QueueUrl"]


def queue_depth(sqs, url: str) -> dict:
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return {"visible": int(attrs.get("ApproximateNumberOfMessages", 0)),
            "in_flight": int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0))}


class Poller:
    """Long-polls the queue with a number of concurrent poll loops that follows the backlog."""

    def __init__(self, cfg: EventsConfig, processor: EventProcessor, sqs, metrics=None) -> None:
        self.cfg = cfg
        self.processor = processor
        self.sqs = sqs
        self.metrics = metrics  # lens.serve.metrics.EventMetrics inside Serve; None in-process
        self.url = queue_url(sqs, cfg.queue)
        self.dlq_url: str | None = None
        self.totals: dict = {}
        self._loops: list[tuple[asyncio.Task, asyncio.Event]] = []  # (poll loop, its own stop flag)
        self._stopping = asyncio.Event()

    @property
    def pollers(self) -> int:
        return len([t for t, stop in self._loops if not t.done() and not stop.is_set()])

    def wanted(self, backlog: int) -> int:
        extra = math.ceil(backlog / self.cfg.messages_per_poller) if backlog else 0
        return max(self.cfg.min_pollers, min(self.cfg.max_pollers, max(1, extra) if backlog else 0))

    async def poll_once(self) -> Outcome:
        resp = await asyncio.to_thread(
            self.sqs.receive_message, QueueUrl=self.url, MaxNumberOfMessages=self.cfg.messages_per_poll,
            WaitTimeSeconds=self.cfg.wait_time_s, VisibilityTimeout=self.cfg.visibility_timeout_s,
            AttributeNames=["ApproximateReceiveCount", "SentTimestamp"])
        messages = resp.get("Messages", [])
        if not messages:
            return Outcome()
        if self.metrics is not None:
            now_ms = time.time() * 1000
            for m in messages:
                sent = m.get("Attributes", {}).get("SentTimestamp")
                if sent:
                    self.metrics.age.observe(max(0.0, (now_ms - int(sent)) / 1000))
        out = await self.processor.process_messages(messages)
        crash_point("events.before_delete")
        for i in range(0, len(out.deleted), 10):
            entries = [{"Id": str(j), "ReceiptHandle": h} for j, h in enumerate(out.deleted[i: i + 10])]
            await asyncio.to_thread(self.sqs.delete_message_batch, QueueUrl=self.url, Entries=entries)
        for k, v in out.counts.items():
            self.totals[k] = self.totals.get(k, 0) + v
            if self.metrics is not None:
                self.metrics.outcomes.inc(v, tags={"outcome": k})
        return out

    async def _loop(self, stop: asyncio.Event) -> None:
        while not (self._stopping.is_set() or stop.is_set()):
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep polling; the messages come back after the visibility timeout
                logger.exception("poll failed")
                await asyncio.sleep(1)

    async def run(self) -> None:
        """Poll until :meth:`stop`; every ``scale_interval_s`` set the number of poll loops from the backlog."""
        while not self._stopping.is_set():
            try:
                depth = await asyncio.to_thread(queue_depth, self.sqs, self.url)
                want = self.wanted(depth["visible"])
                if self.metrics is not None:
                    await asyncio.to_thread(self._export_depth, depth)
            except Exception:  # noqa: BLE001
                logger.exception("queue depth check failed")
                want = max(self.pollers, self.cfg.min_pollers, 1)
            self._loops = [(t, s) for t, s in self._loops if not t.done() and not s.is_set()]
            while len(self._loops) < want:
                stop = asyncio.Event()
                self._loops.append((asyncio.create_task(self._loop(stop)), stop))
            while len(self._loops) > want:
                self._loops.pop()[1].set()  # finishes its current batch (and deletes its messages), then exits
            try:
                await asyncio.wait_for(self._stopping.wait(), self.cfg.scale_interval_s)
            except asyncio.TimeoutError:
                pass

    def _export_depth(self, depth: dict) -> None:
        self.metrics.visible.set(depth["visible"])
        self.metrics.in_flight.set(depth["in_flight"])
        self.metrics.pollers.set(self.pollers)
        try:
            if self.dlq_url is None:
                self.dlq_url = queue_url(self.sqs, self.cfg.dlq)
            self.metrics.dlq.set(queue_depth(self.sqs, self.dlq_url)["visible"])
        except Exception:  # noqa: BLE001 - a metric, not a reason to stop polling
            logger.warning("cannot read the DLQ depth", exc_info=True)

    def stop(self) -> None:
        """Stop now: batches in flight are abandoned and come back after the visibility timeout."""
        self._stopping.set()
        for t, _ in self._loops:
            t.cancel()

"""``lens events backfill``: tag what is already in the bucket, as if each object's event had arrived.

The driver lists the objects under ``s3://bucket/prefix`` (a configured source bucket; Lens's own outputs and
folder markers are never inputs) and the sidecars already written for them, and keeps the objects whose sidecar is
missing or older than the object: a resumed backfill, or objects the live consumer has tagged, are not redone. The
rest run on Ray Data through the event path's own steps (:class:`~lens.serve.events.consumer.EventProcessor`):
worker actors fetch each object by the ETag the listing saw (``If-Match``: an object changed since is left to its
own event), tag the batch in one model call, and write tombstone-free embedding parts and sidecars with the same
conditional writes as the consumer. So whichever of the live consumer, a killed earlier run or this run gets to an
object first, it ends with one sidecar and a searchable embedding row, and a rerun finishes what a killed one left.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from pydantic import Field, PositiveInt

from lens.cluster import niceness, worker_niceness_env
from lens.errors import ConfigError
from lens.runtime.config import ModelConfig, StrictModel

from .config import EventsConfig
from .consumer import EventProcessor, LocalTagger, Outcome
from .s3events import ObjectEvent

__all__ = ["BackfillConfig", "list_pending", "run_backfill", "BackfillWorker"]

logger = logging.getLogger("lens.events")

#: the event name a backfilled record carries (its sidecar's ``event``, its logs)
EVENT_NAME = "ObjectCreated:Backfill"


class BackfillConfig(StrictModel):
    uri: str = Field(..., description="s3://bucket/prefix of the objects to tag (the bucket: a configured source)")
    batch_size: PositiveInt = Field(32, le=1024, description="objects per worker call (one model call)")
    workers: PositiveInt | None = Field(None, description="worker actors (default: one per CPU of the cluster)")
    address: str | None = Field(None, description="Ray cluster (default: RAY_ADDRESS or a local Ray)")
    redo: bool = Field(False, description="also run objects whose sidecar is newer than the object (the conditional "
                       "writes still make each a duplicate, never a second result)")
    nice: int = Field(19, ge=0, le=19, description="CPU niceness of the worker actors: 19 (the most yielding) lets "
                      "interactive pools on the same nodes keep their latency while a backfill runs beside them")

    def split(self) -> tuple[str, str]:
        if not self.uri.startswith("s3://"):
            raise ConfigError(f"backfill reads an S3 bucket: s3://bucket/prefix, got {self.uri!r}")
        bucket, _, prefix = self.uri[len("s3://"):].partition("/")
        if not bucket:
            raise ConfigError(f"no bucket in {self.uri!r}")
        return bucket, prefix


def list_pending(events: EventsConfig, s3, bucket: str, prefix: str, *, redo: bool = False) -> tuple[list, dict]:
    """(the objects to run: bucket, key, etag, size; counts of what the listing skipped)."""
    from .results import ResultStore

    if bucket not in events.source_buckets:
        raise ConfigError(f"s3://{bucket} is not a configured source bucket ({', '.join(events.source_buckets)}): "
                          "backfill tags only what the event path would")
    store = ResultStore(s3, events.result_prefix, events.embeddings_prefix, results_bucket=events.results_bucket,
                        key_by_bucket=len(events.source_buckets) > 1)
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objects += page.get("Contents", [])
    counts = {"listed": len(objects)}
    done: dict[str, float] = {}
    if not redo:
        side_bucket = events.results_bucket or bucket
        side_prefix = store.sidecar_key(bucket, prefix)[: -len(".json")]  # the sidecars of the keys under prefix
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=side_bucket, Prefix=side_prefix):
            done |= {o["Key"]: o["LastModified"].timestamp() for o in page.get("Contents", [])}
    pending = []
    for o in objects:
        key = o["Key"]
        if key.endswith("/") or store.is_output(key):
            counts["own_output_or_folder"] = counts.get("own_output_or_folder", 0) + 1
            continue
        written = done.get(store.sidecar_key(bucket, key))
        if written is not None and written >= o["LastModified"].timestamp():
            counts["done_before"] = counts.get("done_before", 0) + 1  # its sidecar was written after the object
            continue
        pending.append({"bucket": bucket, "key": key, "etag": o["ETag"].strip('"'), "size": int(o["Size"])})
    counts["pending"] = len(pending)
    return pending, counts


class BackfillWorker:
    """A Ray Data actor: one model, the event processor's fetch, record and write steps, a batch per call."""

    def __init__(self, events: dict, model: dict, fetch_threads: int = 8) -> None:
        from lens.runtime.config import validate
        from lens.runtime.predictor import Predictor

        from .setup import clients

        self.cfg = validate(EventsConfig, events, where="events config")
        self.predictor = Predictor.from_config(validate(ModelConfig, model, where="model config"))
        s3, _ = clients(self.cfg.region, concurrency=fetch_threads)
        tagger = LocalTagger(self.predictor, ThreadPoolExecutor(2, thread_name_prefix="lens-decode"))
        self.processor = EventProcessor(self.cfg.model_copy(update={"concurrency": fetch_threads}), s3, tagger,
                                        self.predictor.info())

    def __call__(self, batch: dict) -> dict:
        events = [ObjectEvent(bucket=str(b), key=str(k), etag=str(e), version_id=None, size=int(s), sequencer=None,
                              event_name=EVENT_NAME)
                  for b, k, e, s in zip(batch["bucket"], batch["key"], batch["etag"], batch["size"])]
        out = Outcome()
        t0 = time.perf_counter()
        asyncio.run(self._run(events, out))
        return {"counts": np.array([json.dumps(out.counts)]), "seconds": np.array([time.perf_counter() - t0]),
                "nice": np.array([niceness()])}

    async def _run(self, events: list[ObjectEvent], out: Outcome) -> None:
        p = self.processor
        got = await asyncio.gather(*(p.fetch(ev, out) for ev in events), return_exceptions=True)
        await p.tag_fetched(events, got)  # the batch's images in one model call
        done, failed = [], set()
        for ev, g in zip(events, got):
            if isinstance(g, BaseException):  # S3 trouble, or the model failed: not written; a rerun picks it up
                logger.warning("backfill: s3://%s/%s not done: %s", ev.bucket, ev.key, g)
                out.count("failed")
            elif g is not None:
                done.append((ev.key, g))
        await p.write_records(done, failed, out)
        if failed:
            out.count("failed", len(failed))


def run_backfill(cfg: BackfillConfig, events: EventsConfig, model: ModelConfig, *, log=logger.info) -> dict:
    """Backfill ``cfg.uri``; returns the summary (counts of every outcome, images/s)."""
    import ray

    from lens.cluster import init_ray
    from lens.faults import crash_point
    from lens.runtime.loading import load_model, served_line

    from .setup import clients

    bucket, prefix = cfg.split()
    t0 = time.perf_counter()
    s3, _ = clients(events.region)
    pending, counts = list_pending(events, s3, bucket, prefix, redo=cfg.redo)
    log(f"lens events backfill: {counts['listed']} object(s) under s3://{bucket}/{prefix}; {counts['pending']} to "
        f"tag ({counts.get('done_before', 0)} already have a newer sidecar)")
    summary = {"uri": cfg.uri, "listing": counts, "outcomes": {}, "images_per_s": 0.0}
    if not pending:
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        return summary
    init_ray(cfg.address, log=log, what="lens events backfill")
    workers = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    one = model.model_copy(update={"device": "cpu", "num_threads": model.num_threads or 1})
    if one.backend == "auto":  # chosen once, here, as the workers run it: every worker runs the same backend
        m = load_model(one)
        log(f"lens events backfill: model {m.identity().model}: {served_line(m.info()['served'])}")
        one = one.model_copy(update={"backend": m.identity().backend})
        del m
    ds = ray.data.from_items(pending, override_num_blocks=max(1, math.ceil(len(pending) / cfg.batch_size)))
    ds = ds.map_batches(BackfillWorker, fn_constructor_kwargs={"events": events.model_dump(), "model": one.model_dump()},
                        batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1,
                        runtime_env=worker_niceness_env(cfg.nice),
                        compute=ray.data.ActorPoolStrategy(size=min(workers, math.ceil(len(pending) / cfg.batch_size))))
    t_run = time.perf_counter()
    outcomes: dict[str, int] = {}
    nice: set[int] = set()
    seen = said = 0
    said_at = time.perf_counter()
    for row in ds.iter_rows():
        for k, v in json.loads(row["counts"]).items():
            outcomes[k] = outcomes.get(k, 0) + v
        seen += sum(json.loads(row["counts"]).values())
        nice.add(int(row["nice"]))
        crash_point("backfill.after_batch")
        if time.perf_counter() - said_at > 5:
            said_at = time.perf_counter()
            rate = (seen - said) / 5
            said = seen
            log(f"lens events backfill: {seen}/{len(pending)} ({100 * seen / len(pending):.0f} %), {rate:.0f}/s")
    run_s = time.perf_counter() - t_run
    summary |= {"outcomes": outcomes, "workers": workers, "worker_niceness": sorted(nice), "backend": one.backend,
                "run_seconds": round(run_s, 2),
                "seconds": round(time.perf_counter() - t0, 2),
                "images_per_s": round(len(pending) / run_s, 1) if run_s > 0 else 0.0}
    log(f"lens events backfill: done: {outcomes} in {run_s:.1f} s ({summary['images_per_s']} images/s)")
    return summary

"""``lens events backfill``: the objects already in the bucket end exactly as if their events had arrived (one
sidecar, an embedding row, searchable), beside the live consumer, and a rerun finishes what a killed run left."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_events import TINY, images, sidecar

pytestmark = pytest.mark.slow


@pytest.fixture
def bucket_env(moto_endpoint, lens_cache):
    """A fresh source bucket with a queue and notifications, a versioned results bucket (every sidecar PUT is
    kept, so "written once" can be counted), and 24 images + one non-image already in the bucket."""
    import boto3

    from lens.serve.events.config import EventsConfig
    from lens.serve.events.setup import clients, ensure_resources

    tag = uuid.uuid4().hex[:8]
    cfg = EventsConfig(bucket=f"bf-{tag}", results_bucket=f"bfres-{tag}", queue=f"bfq-{tag}", dlq=f"bfdlq-{tag}",
                       wait_time_s=1, visibility_timeout_s=5, concurrency=8)
    s3, sqs = clients()
    ensure_resources(cfg, s3, sqs)
    s3.put_bucket_versioning(Bucket=cfg.results_bucket, VersioningConfiguration={"Status": "Enabled"})
    keys = [f"old/{i:02d}.jpg" for i in range(24)]
    boto3.client("s3")  # the environment reaches moto
    return cfg, s3, sqs, keys


def drain_all(cfg, s3, sqs, tiny) -> dict:
    """The live consumer until the queue is empty (a fresh poller per poll: one event loop each)."""
    from test_events import poller

    from lens.serve.events.consumer import queue_depth

    totals: dict = {}
    url = sqs.get_queue_url(QueueName=cfg.queue)["QueueUrl"]
    for _ in range(60):
        p = poller(cfg, s3, sqs, tiny)
        asyncio.run(p.poll_once())
        for k, v in p.totals.items():
            totals[k] = totals.get(k, 0) + v
        if queue_depth(sqs, url) == {"visible": 0, "in_flight": 0}:
            return totals
    raise AssertionError(f"the queue did not drain: {queue_depth(sqs, url)}")


def take_events(sqs, cfg, n: int) -> list[str]:
    """Receive and delete the next ``n`` object events (as if they had never been delivered); their bodies."""
    url = sqs.get_queue_url(QueueName=cfg.queue)["QueueUrl"]
    bodies: list[str] = []
    for _ in range(200):
        for m in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
            if "Records" in json.loads(m["Body"]):
                bodies.append(m["Body"])
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        if len(bodies) >= n:
            return bodies
    raise AssertionError(f"{len(bodies)} of {n} events arrived")


def _run(cfg, uri: str, tmp_path: Path, *extra: str, crash: str | None = None) -> subprocess.CompletedProcess:
    """`lens events backfill` as a user runs it, with a config naming the test's buckets and the tiny model."""
    doc = {"applications": [
        {"name": "lens", "route_prefix": "/", "import_path": "lens.serve.app:build_app",
         "args": {"pools": [{"name": "Tagger", "model": TINY}]}},
        {"name": "lens-events", "route_prefix": None, "import_path": "lens.serve.events.app:build_events_app",
         "args": {"events": cfg.model_dump(exclude_defaults=True)}}]}
    conf = tmp_path / f"events-{uuid.uuid4().hex[:6]}.json"
    conf.write_text(json.dumps(doc))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    if crash:
        env["LENS_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "lens.cli.main", "events", "--config", str(conf), "backfill", uri,
                           "--batch-size", "4", "--workers", "2", *extra], capture_output=True, text=True,
                          env=env, timeout=600, start_new_session=True)


def _sidecar_writes(s3, cfg) -> dict:
    from lens.serve.events.results import count_writes

    return count_writes(s3, cfg.results_bucket, cfg.result_prefix)


def test_backfill_tags_what_is_there_once_beside_the_live_path_and_a_rerun_finishes_a_killed_run(bucket_env,
                                                                                                  tmp_path, tiny):
    from lens.index.build import BuildConfig, build_index
    from lens.index.search import SearchService
    from lens.serve.events.results import embedding_rows

    cfg, s3, sqs, keys = bucket_env
    bodies = images(24, seed=77)
    # 8 images and a text file arrive while the live consumer runs; 16 were there before Lens (their events never
    # delivered: kept aside, to be delivered late at the end)
    for k, b in zip(keys[:8], bodies):
        s3.put_object(Bucket=cfg.bucket, Key=k, Body=b)
    s3.put_object(Bucket=cfg.bucket, Key="old/notes.txt", Body=b"not an image")
    assert drain_all(cfg, s3, sqs, tiny)["tagged"] == 8
    for k, b in zip(keys[8:], bodies[8:]):
        s3.put_object(Bucket=cfg.bucket, Key=k, Body=b)
    late = take_events(sqs, cfg, 16)
    assert sorted(_sidecar_writes(s3, cfg)) == sorted(f"{cfg.result_prefix}{k}.json" for k in [*keys[:8], "old/notes.txt"])

    # a backfill killed after its first batch's outcome, then run again: every object ends with one sidecar
    r = _run(cfg, f"s3://{cfg.bucket}/old/", tmp_path, crash="backfill.after_batch")
    assert r.returncode != 0 and "killed at backfill.after_batch" in r.stderr, r.stderr[-3000:]
    r = _run(cfg, f"s3://{cfg.bucket}/old/", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["listing"]["done_before"] >= 9 + 4, summary  # the live path's 9, and the killed run's batch
    if summary["listing"]["pending"]:  # a fast machine may have finished every batch before the kill took effect
        assert summary["worker_niceness"] == [19], summary  # interactive pools on the same node first
    writes = _sidecar_writes(s3, cfg)
    assert writes == {f"{cfg.result_prefix}{k}.json": 1 for k in [*keys, "old/notes.txt"]}, writes
    for k in keys[8:]:
        rec = sidecar(s3, cfg.model_copy(update={"bucket": cfg.results_bucket}), k)
        assert rec["status"] == "tagged" and len(rec["tags"]) == cfg.top_k and rec["etag"]
    assert sidecar(s3, cfg.model_copy(update={"bucket": cfg.results_bucket}), "old/notes.txt")["status"] == "skipped"
    rows = embedding_rows(s3, cfg.results_bucket, cfg.embeddings_prefix)
    assert set(rows) == set(keys)  # every image has its row (a re-run batch may repeat one; readers keep one)

    # the index built from the parts holds each image once, searchable by its own id
    out = tmp_path / "parts"
    for o in s3.list_objects_v2(Bucket=cfg.results_bucket, Prefix=cfg.embeddings_prefix)["Contents"]:
        (out / Path(o["Key"]).name).parent.mkdir(parents=True, exist_ok=True)
        (out / Path(o["Key"]).name).write_bytes(s3.get_object(Bucket=cfg.results_bucket, Key=o["Key"])["Body"].read())
    m = build_index(BuildConfig(embeddings=[str(out)], output=str(tmp_path / "idx"), queries=10),
                    log=lambda *a: None)
    assert m["count"] == len(keys)
    svc = SearchService(str(tmp_path / "idx"))
    data = s3.get_object(Bucket=cfg.bucket, Key=keys[12])["Body"].read()
    _, (hits,) = svc.search(tiny.predict([data])[0].embedding[None], 1)
    assert hits[0].id == f"s3://{cfg.bucket}/{keys[12]}"

    # once more: nothing left to do; --redo runs them all and every one is a duplicate, never a second result
    again = json.loads(_run(cfg, f"s3://{cfg.bucket}/old/", tmp_path).stdout.strip().splitlines()[-1])
    assert again["listing"]["pending"] == 0 and again["outcomes"] == {}
    redo = json.loads(_run(cfg, f"s3://{cfg.bucket}/old/", tmp_path, "--redo", "--nice", "7"
                           ).stdout.strip().splitlines()[-1])
    assert redo["outcomes"] == {"duplicate": len(keys) + 1} and redo["worker_niceness"] == [7], redo
    assert _sidecar_writes(s3, cfg) == writes
    # the 16 events delivered late, after the backfill: duplicates too
    url = sqs.get_queue_url(QueueName=cfg.queue)["QueueUrl"]
    for b in late:
        sqs.send_message(QueueUrl=url, MessageBody=b)
    totals = drain_all(cfg, s3, sqs, tiny)
    assert totals.get("duplicate", 0) >= 16 and not totals.get("tagged"), totals
    assert _sidecar_writes(s3, cfg) == writes


def test_backfill_workers_default_to_the_most_yielding_niceness():
    from lens.cli.main import build_parser
    from lens.serve.events.backfill import BackfillConfig

    args = build_parser().parse_args(["events", "backfill", "s3://b/p/"])
    assert args.nice == BackfillConfig(uri="s3://b/p/").nice == 19


def test_backfill_refuses_a_bucket_that_is_not_a_source(bucket_env, tmp_path):
    cfg, s3, _, _ = bucket_env
    r = _run(cfg, "s3://someone-elses-bucket/", tmp_path)
    assert r.returncode == 2 and "not a configured source bucket" in r.stderr, r.stderr[-2000:]
    r = _run(cfg, "/local/folder", tmp_path)
    assert r.returncode == 2 and "s3://bucket/prefix" in r.stderr, r.stderr[-2000:]

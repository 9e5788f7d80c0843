"""The S3 -> SQS event path against moto's server on loopback, with a tiny real model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from conftest import encode

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TINY = {"name": "test_efficientnet", "weights": "random", "backend": "onnx", "device": "cpu"}


@pytest.fixture
def env(moto_endpoint, lens_cache):
    """A fresh bucket, queue and DLQ (with redrive) and the bucket notification, per test."""
    from lens.serve.events.config import EventsConfig
    from lens.serve.events.setup import clients, ensure_resources

    tag = uuid.uuid4().hex[:8]
    cfg = EventsConfig(bucket=f"img-{tag}", queue=f"q-{tag}", dlq=f"dlq-{tag}", max_receive_count=3,
                       wait_time_s=1, visibility_timeout_s=2, scale_interval_s=0.5, concurrency=8)
    s3, sqs = clients()
    changes = ensure_resources(cfg, s3, sqs)
    assert any("created bucket" in c for c in changes) and ensure_resources(cfg, s3, sqs) == []  # idempotent
    return cfg, s3, sqs


def images(n, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [encode(Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)), "JPEG") for _ in range(n)]


def processor(cfg, s3, tiny):
    from lens.serve.events.consumer import EventProcessor, LocalTagger

    p = EventProcessor(cfg, s3, LocalTagger(tiny), tiny.info())
    return p


def poller(cfg, s3, sqs, tiny):
    from lens.serve.events.consumer import Poller

    return Poller(cfg, processor(cfg, s3, tiny), sqs)


def drain(cfg, s3, sqs, tiny, rounds=20):
    """Poll until the queue is empty (visible and in flight)."""
    from lens.serve.events.consumer import queue_depth

    p = poller(cfg, s3, sqs, tiny)
    for _ in range(rounds):
        asyncio.run(p.poll_once())
        d = queue_depth(sqs, p.url)
        if d["visible"] == 0 and d["in_flight"] == 0:
            break
    return p


def next_object_event(sqs, url):
    """Receive the next S3 object event message (dropping the s3:TestEvent S3 sends on setup)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for m in sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1).get("Messages", []):
            if "Records" in json.loads(m["Body"]):
                return m
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    raise AssertionError("no object event arrived")


def sidecar(s3, cfg, key):
    return json.loads(s3.get_object(Bucket=cfg.bucket, Key=f"{cfg.result_prefix}{key}.json")["Body"].read())


def sidecars(s3, cfg):
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=cfg.bucket, Prefix=cfg.result_prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_put_object_gets_one_result_with_tags_and_embedding(env, tiny):
    cfg, s3, sqs = env
    s3.put_object(Bucket=cfg.bucket, Key="cats/one.jpg", Body=images(1)[0])
    p = drain(cfg, s3, sqs, tiny)
    rec = sidecar(s3, cfg, "cats/one.jpg")
    assert rec["status"] == "tagged" and rec["model"] == "test_efficientnet" and len(rec["tags"]) == 5
    assert rec["etag"] == s3.head_object(Bucket=cfg.bucket, Key="cats/one.jpg")["ETag"].strip('"')
    assert rec["weights_sha256"] and "embedding" not in rec  # the embedding is in the part, not twice
    expected = tiny.predict([images(1)[0]])[0].embedding
    assert p.totals.get("tagged") == 1
    # the embedding part for search
    import io

    import pyarrow.parquet as pq

    parts = s3.list_objects_v2(Bucket=cfg.bucket, Prefix=cfg.embeddings_prefix)["Contents"]
    table = pq.read_table(io.BytesIO(s3.get_object(Bucket=cfg.bucket, Key=parts[0]["Key"])["Body"].read()))
    assert table.column("key").to_pylist() == ["cats/one.jpg"] and table.schema.field("embedding").type.list_size == 256
    assert float(np.dot(table.column("embedding").to_pylist()[0], expected)) > 0.999
    # sidecar_embedding: the sidecar carries it too
    with_emb = cfg.model_copy(update={"sidecar_embedding": True})
    s3.put_object(Bucket=cfg.bucket, Key="cats/two.jpg", Body=images(1)[0])
    drain(with_emb, s3, sqs, tiny)
    assert float(np.dot(sidecar(s3, cfg, "cats/two.jpg")["embedding"], expected)) > 0.999


def test_duplicate_delivery_writes_one_result(env, tiny):
    cfg, s3, sqs = env
    s3.put_object(Bucket=cfg.bucket, Key="dup.jpg", Body=images(1)[0])
    url = sqs.get_queue_url(QueueName=cfg.queue)["QueueUrl"]
    msg = next_object_event(sqs, url)
    sqs.send_message(QueueUrl=url, MessageBody=msg["Body"])  # at-least-once: the same event again
    sqs.send_message(QueueUrl=url, MessageBody=msg["Body"])
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=msg["ReceiptHandle"], VisibilityTimeout=0)
    p = drain(cfg, s3, sqs, tiny)
    assert sidecars(s3, cfg) == [f"{cfg.result_prefix}dup.jpg.json"]
    assert p.totals.get("tagged") == 1 and p.totals.get("duplicate", 0) >= 2
    first = sidecar(s3, cfg, "dup.jpg")["processed_at"]
    sqs.send_message(QueueUrl=url, MessageBody=msg["Body"])  # much later: still nothing new
    drain(cfg, s3, sqs, tiny)
    assert sidecar(s3, cfg, "dup.jpg")["processed_at"] == first


def test_test_event_is_skipped_and_url_encoded_keys_are_decoded(env, tiny):
    cfg, s3, sqs = env
    url = sqs.get_queue_url(QueueName=cfg.queue)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent",
                                                           "Bucket": cfg.bucket}))
    keys = ["holiday photos/beach day.jpg", "café/Ünïcødé 猫.jpg", "a+b/c%d.jpg"]
    for k, body in zip(keys, images(3)):
        s3.put_object(Bucket=cfg.bucket, Key=k, Body=body)
    p = drain(cfg, s3, sqs, tiny)
    assert p.totals.get("test_event") >= 1 and p.totals.get("tagged") == 3
    for k in keys:
        assert sidecar(s3, cfg, k)["key"] == k


def test_deleted_non_image_and_oversized_objects_are_skipped_with_reasons(env, tiny):
    cfg, s3, sqs = env
    cfg = cfg.model_copy(update={"max_object_bytes": 50_000})
    s3.put_object(Bucket=cfg.bucket, Key="gone.jpg", Body=images(1)[0])
    s3.delete_object(Bucket=cfg.bucket, Key="gone.jpg")
    s3.put_object(Bucket=cfg.bucket, Key="notes.txt", Body=b"not an image")
    s3.put_object(Bucket=cfg.bucket, Key="huge.jpg", Body=b"\xff\xd8\xff" + b"\x00" * 60_000)
    p = drain(cfg, s3, sqs, tiny)
    assert "deleted" in sidecar(s3, cfg, "gone.jpg")["reason"]
    assert sidecar(s3, cfg, "notes.txt")["reason"].startswith("unsupported_media_type")
    assert "limit" in sidecar(s3, cfg, "huge.jpg")["reason"]
    assert all(sidecar(s3, cfg, k)["status"] == "skipped" for k in ("gone.jpg", "notes.txt", "huge.jpg"))
    assert p.totals.get("skipped") == 3


def test_a_polls_images_reach_the_tagger_in_one_call_and_each_answer_is_its_own(env, tiny):
    """One tagger call per poll (a Serve handle call costs the consumer about as much CPU for one image as for ten),
    and each image's answer stays its own: an undecodable one is skipped, one the model failed on leaves only its
    message for redelivery."""
    from lens.serve.events.consumer import LocalTagger, Poller, queue_depth

    cfg, s3, sqs = env
    cfg = cfg.model_copy(update={"messages_per_poll": 10, "visibility_timeout_s": 60})
    bodies = images(4, seed=61)
    for i, body in enumerate(bodies):
        s3.put_object(Bucket=cfg.bucket, Key=f"one-call/{i}.jpg", Body=body)
    s3.put_object(Bucket=cfg.bucket, Key="one-call/notes.txt", Body=b"not an image")
    url = sqs.get_queue_url(QueueName=cfg.queue)["QueueUrl"]
    deadline = time.monotonic() + 30
    while queue_depth(sqs, url)["visible"] < 5:  # the five object events (and S3's test event) are all there
        assert time.monotonic() < deadline, queue_depth(sqs, url)
        time.sleep(0.1)
    local, calls = LocalTagger(tiny), []

    async def tagger(items, top_k, embedding):
        calls.append(len(items))
        answers = await local(items, top_k, embedding)
        return [RuntimeError("the replica died") if data == bodies[2] else a for data, a in zip(items, answers)]

    p = Poller(cfg, processor(cfg, s3, tiny), sqs)
    p.processor.tagger = tagger
    out = asyncio.run(p.poll_once())
    assert calls == [5], calls
    assert out.counts.get("tagged") == 3 and out.counts.get("skipped") == 1 and out.counts.get("failed") == 1
    assert sidecar(s3, cfg, "one-call/notes.txt")["reason"].startswith("unsupported_media_type")
    for i, body in enumerate(bodies):
        if i == 2:
            assert "one-call/2.jpg.json" not in " ".join(sidecars(s3, cfg))
        else:
            rec = sidecar(s3, cfg, f"one-call/{i}.jpg")
            assert rec["status"] == "tagged" and rec["tags"] == tiny.predict([body])[0].to_dict()["tags"]
    # only the failed image's message is kept (the visible ones are the events of the sidecars and part just written)
    assert queue_depth(sqs, url)["in_flight"] == 1


def test_a_tagger_answer_of_the_wrong_length_fails_the_calls_images_and_never_mismatches_them(env, tiny):
    from lens.serve.events.consumer import RetryLater
    from lens.serve.events.s3events import ObjectEvent

    cfg, s3, _ = env
    p = processor(cfg, s3, tiny)

    async def short(items, top_k, embedding):
        return [{"tags": [], "embedding": None}] * (len(items) - 1)  # one answer missing: which one is unknown

    p.tagger = short
    evs = [ObjectEvent(bucket=cfg.bucket, key=f"{i}.jpg", etag="e", version_id=None, size=1, sequencer=None,
                       event_name="ObjectCreated:Put") for i in range(3)]
    got = [b"a", None, b"c"]
    asyncio.run(p.tag_fetched(evs, got))
    assert got[1] is None and all(isinstance(g, RetryLater) and "answered 1 of 2" in str(g) for g in (got[0], got[2]))


def test_poison_message_goes_to_the_dlq_and_the_queue_drains(env, tiny):
    cfg, s3, sqs = env
    url = sqs.get_queue_url(QueueName=cfg.queue)["QueueUrl"]
    dlq = sqs.get_queue_url(QueueName=cfg.dlq)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody='{"Records": [{"eventName": "ObjectCreated:Put"}]}')
    s3.put_object(Bucket=cfg.bucket, Key="fine.jpg", Body=images(1)[0])
    from lens.serve.events.consumer import queue_depth

    p = poller(cfg, s3, sqs, tiny)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        asyncio.run(p.poll_once())
        if queue_depth(sqs, url) == {"visible": 0, "in_flight": 0} and queue_depth(sqs, dlq)["visible"] == 1:
            break
        time.sleep(0.2)
    assert queue_depth(sqs, url) == {"visible": 0, "in_flight": 0}
    (dead,) = sqs.receive_message(QueueUrl=dlq, WaitTimeSeconds=1)["Messages"]
    assert "ObjectCreated:Put" in dead["Body"]
    assert sidecar(s3, cfg, "fine.jpg")["status"] == "tagged"
    assert p.totals.get("poison") == 3  # delivered maxReceiveCount times, then moved


def test_out_of_order_events_keep_the_newest_version(env, tiny):
    cfg, s3, sqs = env
    url = sqs.get_queue_url(QueueName=cfg.queue)["QueueUrl"]
    old, new = images(2, seed=5)
    s3.put_object(Bucket=cfg.bucket, Key="v.jpg", Body=old)
    first = next_object_event(sqs, url)
    s3.put_object(Bucket=cfg.bucket, Key="v.jpg", Body=new)
    drain(cfg, s3, sqs, tiny)  # the newer event is processed first
    newest = sidecar(s3, cfg, "v.jpg")
    sqs.send_message(QueueUrl=url, MessageBody=first["Body"])  # the older event arrives late
    sqs.delete_message(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"])
    drain(cfg, s3, sqs, tiny)
    assert sidecar(s3, cfg, "v.jpg") == newest


@pytest.mark.parametrize("point,polled_before", [("events.before_delete", (2, 20)), ("events.before_sidecars", (1, 10))])
def test_consumer_killed_mid_batch_then_restarted_gives_exactly_one_result_per_key(env, tiny, lens_cache, tmp_path,
                                                                                   point, polled_before):
    from lens.index.build import BuildConfig, build_index
    from lens.serve.events.consumer import queue_depth
    from lens.serve.events.results import count_writes as sidecar_writes
    from lens.serve.events.results import embedding_rows

    cfg, s3, sqs = env
    results = f"res-{uuid.uuid4().hex[:8]}"  # versioned: every sidecar and part write is kept and counted
    s3.create_bucket(Bucket=results)
    s3.put_bucket_versioning(Bucket=results, VersioningConfiguration={"Status": "Enabled"})
    cfg = cfg.model_copy(update={"visibility_timeout_s": 3, "messages_per_poll": 10, "concurrency": 4,
                                 "max_pollers": 1, "results_bucket": results})
    keys = [f"batch/{i:03d}.jpg" for i in range(40)]
    for k, body in zip(keys, images(40, seed=9)):
        s3.put_object(Bucket=cfg.bucket, Key=k, Body=body)
    cmd = [sys.executable, "-m", "lens.serve.events.app", cfg.model_dump_json(), json.dumps(TINY)]
    env_vars = os.environ | {"LENS_CACHE_DIR": str(lens_cache)}
    # The consumer dies in its second poll: after writing its parts and sidecars but before deleting its messages
    # (before_delete), or after writing its embedding parts but before any sidecar (before_sidecars).
    first = subprocess.run(cmd, env=env_vars | {"LENS_CRASH_AT": f"{point}:2"}, capture_output=True,
                           text=True, timeout=300, start_new_session=True)
    assert first.returncode == -signal.SIGKILL and f"killed at {point} (pass 2)" in first.stderr, first.stderr[-3000:]
    written_before = len(sidecar_writes(s3, results, cfg.result_prefix))
    assert polled_before[0] <= written_before <= polled_before[1]  # polls of at most 10 messages each
    proc = subprocess.Popen(cmd, env=env_vars, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = sqs.get_queue_url(QueueName=cfg.queue)["QueueUrl"]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if (len(sidecar_writes(s3, results, cfg.result_prefix)) == len(keys)
                    and queue_depth(sqs, url) == {"visible": 0, "in_flight": 0}):
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    processed = json.loads(out.strip().splitlines()[-1])["processed"]
    assert processed["tagged"] == len(keys) - written_before, processed
    if point == "events.before_delete":  # the second poll's messages came back and were recognised, not re-written
        assert processed.get("duplicate", 0) >= 1, processed
    writes = sidecar_writes(s3, results, cfg.result_prefix)
    assert writes == {f"{cfg.result_prefix}{k}.json": 1 for k in keys}  # one PUT per key, ever
    assert all(sidecar(s3, cfg.model_copy(update={"bucket": results}), k)["status"] == "tagged" for k in keys)
    # embeddings: re-tagging a redelivered message writes its rows again; readers keep one per object
    rows = embedding_rows(s3, results, cfg.embeddings_prefix, every_version=True)
    assert set(rows) == set(keys) and sum(rows.values()) > len(keys), rows
    current = embedding_rows(s3, results, cfg.embeddings_prefix)
    summary = build_index(BuildConfig(embeddings=[f"s3://{results}/{cfg.embeddings_prefix}"],
                                      output=str(tmp_path / "idx"), index="flat", queries=10), log=lambda *a: None)
    assert summary["count"] == len(keys) and summary["duplicates_dropped"] == sum(current.values()) - len(keys)
    assert queue_depth(sqs, sqs.get_queue_url(QueueName=cfg.dlq)["QueueUrl"])["visible"] == 0


def test_poller_count_follows_the_backlog(env, tiny):
    cfg, s3, sqs = env
    cfg = cfg.model_copy(update={"min_pollers": 1, "max_pollers": 4, "messages_per_poller": 5})
    p = poller(cfg, s3, sqs, tiny)
    assert p.wanted(0) == 1 and p.wanted(4) == 1 and p.wanted(12) == 3 and p.wanted(1000) == 4
    assert poller(cfg.model_copy(update={"min_pollers": 0}), s3, sqs, tiny).wanted(0) == 0


def test_s3_object_tags_respect_limits_and_keep_user_tags():
    from lens.serve.events.results import s3_tags

    existing = [{"Key": f"user{i}", "Value": "x"} for i in range(7)] + [{"Key": "lens:tag1", "Value": "old"}]
    tags = [{"label": "tabby, tabby cat", "class_id": 281, "score": 0.5}] * 5
    merged = s3_tags(existing, tags, "tf_efficientnet_lite0")
    assert len(merged) == 10 and [t["Key"] for t in merged[:7]] == [f"user{i}" for i in range(7)]
    assert [t["Key"] for t in merged[7:]] == ["lens:model", "lens:tag1", "lens:tag2"]
    assert merged[8]["Value"] == "tabby  tabby cat"  # commas are not allowed in S3 tag values
    assert all(len(t["Key"]) <= 128 and len(t["Value"]) <= 256 for t in merged)


def _message(records: list[dict], mid: str = "m-1") -> dict:
    return {"MessageId": mid, "ReceiptHandle": f"rh-{mid}", "Body": json.dumps({"Records": records})}


def _record(bucket: str, key: str, etag: str | None = None, version: str | None = None,
            sequencer: str | None = None) -> dict:
    from urllib.parse import quote_plus

    obj = {"key": quote_plus(key), "size": 1} | ({"eTag": etag} if etag else {})
    obj |= ({"versionId": version} if version else {}) | ({"sequencer": sequencer} if sequencer else {})
    return {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": bucket}, "object": obj}}


def test_events_naming_an_unconfigured_bucket_are_skipped_without_a_read(env, tiny):
    cfg, s3, sqs = env
    other = f"other-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=other)
    s3.put_object(Bucket=other, Key="secret.jpg", Body=images(1)[0])
    s3.put_object(Bucket=cfg.bucket, Key="mine.jpg", Body=images(1, seed=1)[0])
    p = processor(cfg, s3, tiny)
    reads = []
    real_get = p.objects.get  # the image GET (obstore or boto3: lens.serve.events.objects)
    p.objects.get = lambda bucket, key, **kw: reads.append(bucket) or real_get(bucket, key, **kw)
    out = asyncio.run(p.process_messages([_message([_record(other, "secret.jpg"), _record(cfg.bucket, "mine.jpg")])]))
    assert out.counts == {"foreign_bucket": 1, "tagged": 1} and out.deleted == ["rh-m-1"]
    assert reads == [cfg.bucket]  # the other bucket's object was never fetched
    assert sidecars(s3, cfg) == [f"{cfg.result_prefix}mine.jpg.json"]
    assert "Contents" not in s3.list_objects_v2(Bucket=other, Prefix=cfg.result_prefix)


def test_two_source_buckets_get_separate_sidecars_and_long_keys_a_hashed_one(env, tiny):
    from lens.serve.events.config import EventsConfig
    from lens.serve.events.results import MAX_KEY_BYTES

    cfg, s3, sqs = env
    second = f"second-{uuid.uuid4().hex[:8]}"
    results = f"results-{uuid.uuid4().hex[:8]}"
    for b in (second, results):
        s3.create_bucket(Bucket=b)
    cfg2 = EventsConfig(**(cfg.model_dump() | {"extra_buckets": (second,), "results_bucket": results,
                                               "sidecar_embedding": True}))
    long_key = "deep/" + "k" * (MAX_KEY_BYTES - 10) + ".jpg"  # fits S3 (1,019 bytes), its sidecar key would not
    assert len(long_key.encode()) <= MAX_KEY_BYTES
    s3.put_object(Bucket=cfg.bucket, Key="same.jpg", Body=images(1, seed=2)[0])
    s3.put_object(Bucket=second, Key="same.jpg", Body=images(1, seed=3)[0])
    s3.put_object(Bucket=second, Key=long_key, Body=images(1, seed=4)[0])
    out = asyncio.run(processor(cfg2, s3, tiny).process_messages([_message(
        [_record(cfg.bucket, "same.jpg"), _record(second, "same.jpg"), _record(second, long_key)])]))
    assert out.counts == {"tagged": 3}
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=results, Prefix=cfg.result_prefix)["Contents"])
    hashed = [k for k in keys if "/_long-keys/" in k]
    assert f"{cfg.result_prefix}{cfg.bucket}/same.jpg.json" in keys and f"{cfg.result_prefix}{second}/same.jpg.json" in keys
    assert len(keys) == 3 and len(hashed) == 1 and all(len(k.encode()) <= MAX_KEY_BYTES for k in keys)
    rec = json.loads(s3.get_object(Bucket=results, Key=hashed[0])["Body"].read())
    assert rec["bucket"] == second and rec["key"] == long_key and rec["status"] == "tagged"
    a = json.loads(s3.get_object(Bucket=results, Key=f"{cfg.result_prefix}{cfg.bucket}/same.jpg.json")["Body"].read())
    b = json.loads(s3.get_object(Bucket=results, Key=f"{cfg.result_prefix}{second}/same.jpg.json")["Body"].read())
    assert (a["bucket"], b["bucket"]) == (cfg.bucket, second) and a["embedding"] != b["embedding"]


def test_a_message_with_too_many_records_is_poison(env, tiny):
    from lens.serve.events.s3events import PoisonMessage, parse_message

    cfg, s3, sqs = env
    body = json.dumps({"Records": [_record(cfg.bucket, f"{i}.jpg") for i in range(cfg.max_records_per_message + 1)]})
    with pytest.raises(PoisonMessage, match="at most 100"):
        parse_message(body, cfg.max_records_per_message)
    out = asyncio.run(processor(cfg, s3, tiny).process_messages([{"MessageId": "big", "ReceiptHandle": "rh",
                                                                   "Body": body}]))
    assert out.failed == ["big"] and out.deleted == [] and out.counts == {"poison": 1}  # left for the DLQ
    assert len(parse_message(json.dumps({"Records": [_record(cfg.bucket, "x.jpg")] * 100}), 100)) == 100


@pytest.mark.parametrize("client", ["obstore", "boto3"])
def test_a_newer_version_replaces_the_sidecar_by_compare_and_swap_and_an_older_one_never_does(env, tiny, client):
    from lens.serve.events.results import count_writes

    cfg, s3, sqs = env
    cfg = cfg.model_copy(update={"s3_client": client})  # the image GETs and sidecar PUTs: either client
    results = f"res-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=results)
    s3.put_bucket_versioning(Bucket=results, VersioningConfiguration={"Status": "Enabled"})
    s3.put_bucket_versioning(Bucket=cfg.bucket, VersioningConfiguration={"Status": "Enabled"})
    cfg = cfg.model_copy(update={"results_bucket": results, "object_tags": True, "sidecar_embedding": True})
    one, two = images(2, seed=31)
    v1 = s3.put_object(Bucket=cfg.bucket, Key="v.jpg", Body=one, Tagging="owner=team-a")
    v2 = s3.put_object(Bucket=cfg.bucket, Key="v.jpg", Body=two, Tagging="owner=team-a")
    ev1 = _record(cfg.bucket, "v.jpg", v1["ETag"].strip('"'), v1["VersionId"], "0A")
    ev2 = _record(cfg.bucket, "v.jpg", v2["ETag"].strip('"'), v2["VersionId"], "0B")
    run = lambda rec, mid: asyncio.run(processor(cfg, s3, tiny).process_messages([_message([rec], mid)])).counts  # noqa: E731
    side = f"{cfg.result_prefix}v.jpg.json"
    read = lambda: json.loads(s3.get_object(Bucket=results, Key=side)["Body"].read())  # noqa: E731

    assert run(ev1, "m1") == {"tagged": 1} and read()["version_id"] == v1["VersionId"]
    assert run(ev2, "m2") == {"tagged": 1} and read()["version_id"] == v2["VersionId"]  # newer: swapped in
    assert run(ev1, "m3") == {"stale": 1} and read()["version_id"] == v2["VersionId"]  # older, late: dropped
    assert run(ev2, "m4") == {"duplicate": 1}
    assert count_writes(s3, results, cfg.result_prefix) == {side: 2}  # v1's sidecar, then v2's: nothing else
    expected = tiny.predict([two])[0].embedding
    assert float(np.dot(read()["embedding"], expected)) > 0.999
    # object tags were written on the version tagged, and the user's own tag kept
    tagset = {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=cfg.bucket, Key="v.jpg",
                                                                  VersionId=v2["VersionId"])["TagSet"]}
    assert tagset["owner"] == "team-a" and tagset["lens:model"] == "test_efficientnet"
    assert tagset["lens:tag1"] == read()["tags"][0]["label"].replace(",", " ")


@pytest.mark.parametrize("client", ["obstore", "boto3"])
def test_an_event_for_an_object_changed_since_writes_nothing(env, tiny, client):
    from lens.serve.events.results import count_writes

    cfg, s3, sqs = env
    cfg = cfg.model_copy(update={"s3_client": client})
    results = f"res-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=results)
    s3.put_bucket_versioning(Bucket=results, VersioningConfiguration={"Status": "Enabled"})
    cfg = cfg.model_copy(update={"results_bucket": results})
    old, new = images(2, seed=41)
    etag_old = s3.put_object(Bucket=cfg.bucket, Key="c.jpg", Body=old)["ETag"].strip('"')
    etag_new = s3.put_object(Bucket=cfg.bucket, Key="c.jpg", Body=new)["ETag"].strip('"')
    p = processor(cfg, s3, tiny)
    assert p.objects.name == client
    out = asyncio.run(p.process_messages([_message([_record(cfg.bucket, "c.jpg", etag_old)], "old")]))
    assert out.counts == {"superseded": 1} and out.deleted == ["rh-old"]  # the new object's own event tags it
    assert count_writes(s3, results, cfg.result_prefix) == {}
    out = asyncio.run(p.process_messages([_message([_record(cfg.bucket, "c.jpg", etag_new)], "new")]))
    assert out.counts == {"tagged": 1}
    assert json.loads(s3.get_object(Bucket=results, Key=f"{cfg.result_prefix}c.jpg.json")["Body"].read())["etag"] \
        == etag_new


def test_poll_loops_scale_up_with_the_backlog_and_back_down_when_it_drains(env, tiny):
    from lens.serve.events.consumer import EventProcessor, LocalTagger, Poller, queue_depth

    cfg, s3, sqs = env
    cfg = cfg.model_copy(update={"min_pollers": 1, "max_pollers": 3, "messages_per_poller": 5, "messages_per_poll": 2,
                                 "visibility_timeout_s": 60, "scale_interval_s": 0.2})
    for i, body in enumerate(images(20, seed=51)):
        s3.put_object(Bucket=cfg.bucket, Key=f"s/{i}.jpg", Body=body)
    local = LocalTagger(tiny)

    async def main() -> tuple[int, int, dict]:
        gate = asyncio.Event()  # the model is held until the scale-up has been seen: no race with the backlog

        async def held(data, top_k, embedding):
            await gate.wait()
            return await local(data, top_k, embedding)

        p = Poller(cfg, EventProcessor(cfg, s3, held, tiny.info()), sqs)
        task = asyncio.create_task(p.run())

        async def until(cond, what: str, timeout_s: float = 60):
            deadline = time.monotonic() + timeout_s
            while not cond():
                assert time.monotonic() < deadline, what
                await asyncio.sleep(0.05)

        await until(lambda: p.pollers == cfg.max_pollers, "no scale-up under a backlog of 20 messages")
        up = p.pollers
        gate.set()
        await until(lambda: p.totals.get("tagged", 0) == 20, "backlog not drained")
        await until(lambda: p.pollers == cfg.min_pollers, "no scale-down after the backlog drained")
        down = p.pollers
        # the events of Lens's own outputs (sidecars, parts) are consumed too before stopping: a poll cut short by
        # stop() would leave what it received in flight
        url = sqs.get_queue_url(QueueName=cfg.queue)["QueueUrl"]
        await until(lambda: queue_depth(sqs, url) == {"visible": 0, "in_flight": 0}, "the queue not emptied")
        p.stop()
        task.cancel()
        return up, down, p.totals

    up, down, totals = asyncio.run(main())
    assert (up, down) == (3, 1) and totals["tagged"] == 20
    assert queue_depth(sqs, sqs.get_queue_url(QueueName=cfg.queue)["QueueUrl"]) == {"visible": 0, "in_flight": 0}


def test_dlq_redrive_keeps_attributes_honours_the_limit_and_uses_sqs_move_tasks_where_there_are_any(env):
    """moto's server has no StartMessageMoveTask: there `auto` copies (body and message attributes, batches of 10,
    at most --limit). The move-task path is SQS's own; its calls are checked against botocore's stubbed client
    (the request shapes botocore validates), as no local endpoint implements them."""
    from botocore.stub import Stubber
    from lens.cli.events import _move_task, dlq_redrive
    from lens.serve.events.consumer import queue_depth

    cfg, s3, sqs = env
    url = sqs.get_queue_url(QueueName=cfg.queue)["QueueUrl"]
    dlq = sqs.get_queue_url(QueueName=cfg.dlq)["QueueUrl"]
    for i in range(13):
        sqs.send_message(QueueUrl=dlq, MessageBody=f"dead {i}", MessageAttributes={
            "origin": {"DataType": "String", "StringValue": f"test-{i}"}})
    assert dlq_redrive(cfg, limit=5) == {"redriven": 5, "method": "copy"}
    assert queue_depth(sqs, dlq)["visible"] == 8
    assert dlq_redrive(cfg) == {"redriven": 8, "method": "copy"}  # auto: no move tasks here
    got = []
    while len(got) < 13:
        msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                   MessageAttributeNames=["All"]).get("Messages", [])
        assert msgs, got
        got += [m for m in msgs if m["Body"].startswith("dead ")]  # not S3's test event from the setup
    assert sorted(m["Body"] for m in got) == sorted(f"dead {i}" for i in range(13))
    assert all(m["MessageAttributes"]["origin"]["StringValue"] == "test-" + m["Body"].split()[1] for m in got)
    with pytest.raises(Exception, match="500"):  # asked for explicitly, where there is none: the endpoint's error
        dlq_redrive(cfg, method="move-task")

    import boto3

    stub_sqs = boto3.client("sqs", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    src, dst = "https://sqs/123/dlq", "https://sqs/123/q"
    with Stubber(stub_sqs) as st:
        for u, arn in ((src, "arn:aws:sqs:us-east-1:123:dlq"), (dst, "arn:aws:sqs:us-east-1:123:q")):
            st.add_response("get_queue_attributes", {"Attributes": {"QueueArn": arn}},
                            {"QueueUrl": u, "AttributeNames": ["QueueArn"]})
        st.add_response("start_message_move_task", {"TaskHandle": "h1"},
                        {"SourceArn": "arn:aws:sqs:us-east-1:123:dlq", "DestinationArn": "arn:aws:sqs:us-east-1:123:q"})
        st.add_response("list_message_move_tasks", {"Results": [{"TaskHandle": "h1", "Status": "RUNNING"}]},
                        {"SourceArn": "arn:aws:sqs:us-east-1:123:dlq", "MaxResults": 10})
        st.add_response("list_message_move_tasks", {"Results": [
            {"TaskHandle": "h1", "Status": "COMPLETED", "ApproximateNumberOfMessagesMoved": 42}]},
            {"SourceArn": "arn:aws:sqs:us-east-1:123:dlq", "MaxResults": 10})
        assert _move_task(stub_sqs, src, dst, poll_s=0.0) == 42


def test_the_event_path_tags_with_the_int8_model_where_its_gate_passes(env, lens_cache):
    """precision int8 on the event path: the same gate and cache as serving; the embedding parts carry the int8
    identity (which quantized model, its gate's figures), so an index built from them knows its precision."""
    import io

    import pyarrow.parquet as pq

    from lens.identity import PARQUET_KEY, ModelIdentity
    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor
    from lens.runtime.samples import sample_path

    cfg, s3, sqs = env
    int8 = Predictor.from_config(ModelConfig(backend="openvino", precision="int8", cache_dir=lens_cache))
    assert int8.model.quantization["served"] == "int8"
    coffee = sample_path("coffee.png").read_bytes()
    s3.put_object(Bucket=cfg.bucket, Key="cups/coffee.png", Body=coffee)
    drain(cfg, s3, sqs, int8)
    rec = sidecar(s3, cfg, "cups/coffee.png")
    assert rec["status"] == "tagged" and rec["tags"][0]["label"] == "espresso"
    (part,) = s3.list_objects_v2(Bucket=cfg.bucket, Prefix=cfg.embeddings_prefix)["Contents"]
    table = pq.read_table(io.BytesIO(s3.get_object(Bucket=cfg.bucket, Key=part["Key"])["Body"].read()))
    ident = ModelIdentity.from_dict(json.loads(table.schema.metadata[PARQUET_KEY]))
    assert ident == int8.identity() and ident.space() == "int8" and ident.quantization["recall_at_10_vs_int8_index"]
    online = int8.predict([coffee])[0].embedding
    assert float(np.dot(table.column("embedding").to_pylist()[0], online)) >= 0.9999

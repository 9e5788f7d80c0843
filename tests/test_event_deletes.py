"""The event path follows the bucket: ObjectRemoved events (and delete markers) become tombstones and ``deleted``
sidecars, in every order of deliveries; S3 -> EventBridge -> SQS messages are understood and routed by setup."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from test_events import _message, drain, env, images, processor, sidecar  # noqa: F401 - env is a fixture

from lens.tombstones import is_dead, seq_value


def _event(bucket: str, key: str, name: str, sequencer: str, etag: str | None = None,
           version: str | None = None) -> dict:
    obj = {"key": key, "size": 1, "sequencer": sequencer} | ({"eTag": etag} if etag else {}) | (
        {"versionId": version} if version else {})
    return {"eventName": name, "s3": {"bucket": {"name": bucket}, "object": obj}}


def _parts(s3, cfg) -> tuple[dict, dict]:
    """(id -> newest row order in the embedding parts, id -> newest tombstone order) under the prefix."""
    import io

    import pyarrow.parquet as pq

    from lens.tombstones import is_tombstone_file

    rows: dict = {}
    tombs: dict = {}
    for o in s3.list_objects_v2(Bucket=cfg.bucket, Prefix=cfg.embeddings_prefix).get("Contents", []):
        t = pq.read_table(io.BytesIO(s3.get_object(Bucket=cfg.bucket, Key=o["Key"])["Body"].read()))
        into = tombs if is_tombstone_file(o["Key"]) else rows
        for i, q in zip(t.column("id").to_pylist(), t.column("sequencer").to_pylist()):
            into[i] = max(into.get(i, -1), seq_value(q))
    return rows, tombs


def searchable(s3, cfg, id_: str) -> bool:
    rows, tombs = _parts(s3, cfg)
    return id_ in rows and not (id_ in tombs and is_dead(rows[id_], tombs[id_]))


def test_a_deleted_object_gets_a_tombstone_and_a_deleted_sidecar(env, tiny):  # noqa: F811 - the env fixture
    from lens.serve.search import DeltaFeed

    cfg, s3, sqs = env
    s3.put_object(Bucket=cfg.bucket, Key="gone/a.jpg", Body=images(1)[0])
    s3.put_object(Bucket=cfg.bucket, Key="kept.jpg", Body=images(1, seed=2)[0])
    drain(cfg, s3, sqs, tiny)
    assert sidecar(s3, cfg, "gone/a.jpg")["status"] == "tagged" and searchable(s3, cfg, f"s3://{cfg.bucket}/gone/a.jpg")
    s3.delete_object(Bucket=cfg.bucket, Key="gone/a.jpg")  # moto sends s3:ObjectRemoved:Delete, as S3 does
    p = drain(cfg, s3, sqs, tiny)
    assert p.totals.get("deleted") == 1
    rec = sidecar(s3, cfg, "gone/a.jpg")
    assert rec["status"] == "deleted" and rec["reason"] == "ObjectRemoved:Delete"
    assert not searchable(s3, cfg, f"s3://{cfg.bucket}/gone/a.jpg") and searchable(s3, cfg, f"s3://{cfg.bucket}/kept.jpg")
    # the searchers' delta feed reads the deletion beside the additions
    _, deletions = DeltaFeed([f"s3://{cfg.bucket}/{cfg.embeddings_prefix}"]).poll()
    assert [i for i, _ in deletions] == [f"s3://{cfg.bucket}/gone/a.jpg"]


def test_every_order_of_upload_and_delete_deliveries_ends_right(env, tiny):  # noqa: F811 - the env fixture
    """Delete processed before its upload's event; the upload redelivered after the delete; a re-upload after the
    delete (a newer sequencer) - each ends as S3's own order of the key's events says."""
    cfg, s3, sqs = env
    b, key = cfg.bucket, "race.jpg"
    id_ = f"s3://{b}/{key}"
    run = lambda recs, mid: asyncio.run(processor(cfg, s3, tiny).process_messages([_message(recs, mid)])).counts  # noqa: E731

    etag1 = s3.put_object(Bucket=b, Key=key, Body=images(1, seed=5)[0])["ETag"].strip('"')
    s3.delete_object(Bucket=b, Key=key)
    created, removed = _event(b, key, "ObjectCreated:Put", "0A", etag1), _event(b, key, "ObjectRemoved:Delete", "0B")
    # 1. the deletion is processed before the upload's event
    assert run([removed], "d1") == {"deleted": 1}
    assert run([created], "c1") == {"stale": 1}  # the object is gone: skipped, and the deletion stays on record
    assert sidecar(s3, cfg, key)["status"] == "deleted" and not searchable(s3, cfg, id_)
    # 2. the upload's event redelivered again, and the deletion's: nothing changes
    assert run([created], "c2") == {"stale": 1} and run([removed], "d2") == {"duplicate": 1}
    # 3. a re-upload after the deletion: tagged, searchable (its sequencer is newer than the tombstone's)
    etag2 = s3.put_object(Bucket=b, Key=key, Body=images(1, seed=6)[0])["ETag"].strip('"')
    assert run([_event(b, key, "ObjectCreated:Put", "0C", etag2)], "c3") == {"tagged": 1}
    assert sidecar(s3, cfg, key)["status"] == "tagged" and searchable(s3, cfg, id_)
    # 4. the old deletion redelivered late: the key holds an object again, so it decides nothing
    assert run([removed], "d3") == {"superseded": 1} and searchable(s3, cfg, id_)
    # 5. an upload processed while its object was being deleted (fetched first, row written after the tombstone):
    #    the row's sequencer is older than the tombstone's, so it stays hidden
    s3.delete_object(Bucket=b, Key=key)
    assert run([_event(b, key, "ObjectRemoved:Delete", "0D")], "d4") == {"deleted": 1}
    from lens.serve.events.results import Record
    from lens.serve.events.s3events import ObjectEvent

    p = processor(cfg, s3, tiny)
    late = ObjectEvent(b, key, etag2, None, 1, "0C", "ObjectCreated:Put")
    p.store.write_embeddings([Record(late, "tagged", tags=[{"label": "x"}], embedding=[0.0] * 256)],
                             tiny.info(), b)
    assert not searchable(s3, cfg, id_)


def test_a_versioned_buckets_delete_marker_deletes_and_removing_an_old_version_does_not(env, tiny):  # noqa: F811 - the env fixture
    cfg, s3, sqs = env
    b = cfg.bucket
    s3.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    run = lambda recs, mid: asyncio.run(processor(cfg, s3, tiny).process_messages([_message(recs, mid)])).counts  # noqa: E731
    v1 = s3.put_object(Bucket=b, Key="v.jpg", Body=images(1, seed=7)[0])["VersionId"]
    v2 = s3.put_object(Bucket=b, Key="v.jpg", Body=images(1, seed=8)[0])["VersionId"]
    s3.delete_object(Bucket=b, Key="v.jpg", VersionId=v1)  # an old version removed: the object is still there
    assert run([_event(b, "v.jpg", "ObjectRemoved:Delete", "0C", version=v1)], "m1") == {"superseded": 1}
    marker = s3.delete_object(Bucket=b, Key="v.jpg")["VersionId"]  # a delete marker: the object is gone
    assert v2 != marker
    assert run([_event(b, "v.jpg", "ObjectRemoved:DeleteMarkerCreated", "0D", version=marker)], "m2") == \
        {"deleted": 1}
    assert sidecar(s3, cfg, "v.jpg")["status"] == "deleted"
    assert _parts(s3, cfg)[1] == {f"s3://{b}/v.jpg": seq_value("0D")}


# -- EventBridge ----------------------------------------------------------------------------------------------
def _bridge(detail_type: str, bucket: str, key: str, **detail) -> str:
    return json.dumps({"version": "0", "id": str(uuid.uuid4()), "detail-type": detail_type, "source": "aws.s3",
                       "account": "123456789012", "time": "2026-12-03T00:00:00Z", "region": "us-east-1",
                       "resources": [f"arn:aws:s3:::{bucket}"],
                       "detail": {"version": "0", "bucket": {"name": bucket},
                                  "object": {"key": key, "size": 5, "etag": "b1946ac9", "sequencer": "617f0829"},
                                  **detail}})


def test_eventbridge_messages_of_each_shape_parse():
    from lens.serve.events.s3events import PoisonMessage, parse_message

    (c,) = parse_message(_bridge("Object Created", "bkt", "a b+c.jpg", reason="PutObject"))
    assert (c.bucket, c.key, c.etag, c.sequencer, c.removed) == ("bkt", "a b+c.jpg", "b1946ac9", "617f0829", False)
    (d,) = parse_message(_bridge("Object Deleted", "bkt", "a.jpg", reason="DeleteObject",
                                 **{"deletion-type": "Delete Marker Created"}))
    assert d.removed and d.event_name == "ObjectRemoved:DeleteMarkerCreated"
    assert parse_message(_bridge("Object Tags Added", "bkt", "a.jpg")) == []  # nothing to do, not poison
    with pytest.raises(PoisonMessage):
        parse_message(json.dumps({"source": "aws.s3", "detail-type": "Object Created", "detail": {"bucket": {}}}))


def test_setup_routes_s3_through_eventbridge_to_the_queue_and_the_consumer_tags_and_deletes(env, tiny):  # noqa: F811 - the env fixture
    from lens.serve.events.setup import clients, ensure_resources

    cfg, s3, sqs = env
    cfg = cfg.model_copy(update={"route": "eventbridge"})
    _, _, events = clients(events=True)
    changes = ensure_resources(cfg, s3, sqs, events=events)
    assert any("EventBridge rule" in c for c in changes) and any("notification to" in c for c in changes), changes
    # idempotent: moto stores a bucket's EventBridgeConfiguration but leaves it out of GET (AWS returns it), so
    # the bucket line repeats here; the rule, its target and the queue policy are not made again
    assert [c for c in ensure_resources(cfg, s3, sqs, events=events) if "sends its events" not in c] == []
    rule = events.describe_rule(Name=f"lens-{cfg.queue}")
    assert json.loads(rule["EventPattern"])["detail-type"] == ["Object Created", "Object Deleted"]
    assert s3.get_bucket_notification_configuration(Bucket=cfg.bucket).get("QueueConfigurations", []) == []
    s3.put_object(Bucket=cfg.bucket, Key="eb.jpg", Body=images(1, seed=9)[0])
    url = sqs.get_queue_url(QueueName=cfg.queue)["QueueUrl"]
    bodies = [m["Body"] for m in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                                     VisibilityTimeout=0).get("Messages", [])]
    assert any(json.loads(b).get("detail-type") == "Object Created" for b in bodies), bodies
    p = drain(cfg, s3, sqs, tiny)
    assert p.totals.get("tagged") == 1 and sidecar(s3, cfg, "eb.jpg")["status"] == "tagged"
    s3.delete_object(Bucket=cfg.bucket, Key="eb.jpg")
    p = drain(cfg, s3, sqs, tiny)
    assert p.totals.get("deleted") == 1 and sidecar(s3, cfg, "eb.jpg")["status"] == "deleted"

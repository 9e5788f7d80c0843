"""The Lambda-style handler against a real Lens HTTP API (Ray Serve) and moto's S3 on loopback."""

from __future__ import annotations

import json
import uuid

import pytest
from test_events import images, sidecar

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def lens_api(serve_cluster):
    from lens.serve.run import deploy
    from ray import serve

    port = int(serve_cluster.rsplit(":", 1)[1])
    doc = {"http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": "lens", "route_prefix": "/", "import_path": "lens.serve.app:build_app",
                             "args": {"pools": [{"model": {"name": "test_efficientnet", "weights": "random",
                                                           "backend": "onnx", "device": "cpu"}}]}}]}
    deploy(doc, where="lambda test")
    yield serve_cluster
    serve.delete("lens")


def _sqs_record(body: str) -> dict:
    return {"messageId": str(uuid.uuid4()), "receiptHandle": "rh", "body": body, "eventSource": "aws:sqs"}


def _s3_event(bucket: str, key: str, etag: str) -> dict:
    from urllib.parse import quote_plus

    return {"Records": [{"eventName": "ObjectCreated:Put", "s3": {
        "bucket": {"name": bucket}, "object": {"key": quote_plus(key), "eTag": etag, "size": 1}}}]}


def test_partial_batch_response_names_exactly_the_failed_records(lens_api, moto_endpoint, monkeypatch):
    import boto3
    from lens.serve.events.lambda_handler import handler

    s3 = boto3.client("s3")
    bucket = f"lambda-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    good, other = images(2, seed=11)
    etag = s3.put_object(Bucket=bucket, Key="in/a photo.jpg", Body=good)["ETag"].strip('"')
    etag2 = s3.put_object(Bucket=bucket, Key="in/gone.jpg", Body=other)["ETag"].strip('"')
    s3.delete_object(Bucket=bucket, Key="in/gone.jpg")
    records = [
        _sqs_record(json.dumps(_s3_event(bucket, "in/a photo.jpg", etag))),
        _sqs_record("this is not an S3 event"),
        _sqs_record(json.dumps(_s3_event(bucket, "in/gone.jpg", etag2))),
        _sqs_record(json.dumps({"Event": "s3:TestEvent"})),
    ]
    monkeypatch.setenv("LENS_API_URL", lens_api)
    monkeypatch.setenv("LENS_EVENTS_CONFIG", json.dumps({"bucket": bucket}))  # the function's source bucket
    out = handler({"Records": records}, None)
    assert out == {"batchItemFailures": [{"itemIdentifier": records[1]["messageId"]}]}
    from lens.serve.events.config import EventsConfig

    cfg = EventsConfig(bucket=bucket)
    rec = sidecar(s3, cfg, "in/a photo.jpg")
    assert rec["status"] == "tagged" and rec["model"] == "test_efficientnet" and len(rec["tags"]) == 5
    assert sidecar(s3, cfg, "in/gone.jpg")["status"] == "skipped"
    # The API going away is a retry, not a skip: every object record is named.
    monkeypatch.setenv("LENS_API_URL", "http://127.0.0.1:9")
    etag3 = s3.put_object(Bucket=bucket, Key="in/later.jpg", Body=other)["ETag"].strip('"')
    later = _sqs_record(json.dumps(_s3_event(bucket, "in/later.jpg", etag3)))
    assert handler({"Records": [later]}, None) == {"batchItemFailures": [{"itemIdentifier": later["messageId"]}]}
    with pytest.raises(s3.exceptions.NoSuchKey):  # nothing written for it: it will be retried
        sidecar(s3, cfg, "in/later.jpg")


def test_direct_s3_event(lens_api, moto_endpoint, monkeypatch):
    import boto3
    from lens.serve.events.lambda_handler import handler

    s3 = boto3.client("s3")
    bucket = f"lambda-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    etag = s3.put_object(Bucket=bucket, Key="x.jpg", Body=images(1)[0])["ETag"].strip('"')
    monkeypatch.setenv("LENS_API_URL", lens_api)
    monkeypatch.setenv("LENS_EVENTS_CONFIG", json.dumps({"bucket": bucket}))  # the function's source bucket
    assert handler(_s3_event(bucket, "x.jpg", etag), None)["processed"] == {"tagged": 1}
    from lens.serve.events.config import EventsConfig

    rec = sidecar(s3, EventsConfig(bucket=bucket), "x.jpg")
    assert rec["status"] == "tagged" and rec["etag"] == etag and len(rec["tags"]) == 5

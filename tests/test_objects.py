"""The event path's per-object client (serve/events/objects.py): obstore and boto3 give the same answers and the
same conditional-write rules against S3 (moto's server), from one task, many tasks of one loop, or many threads."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

CLIENTS = ["obstore", "boto3"]


@pytest.fixture
def bucket(moto_endpoint):
    from lens.serve.events.setup import clients

    s3, _ = clients()
    name = f"obj-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=name)
    return s3, name


run = asyncio.run


def io_for(s3, client: str, calls=None, executor=None):
    from lens.serve.events.objects import object_io

    io = object_io(s3, client, calls=calls, executor=executor)
    assert io.name == client
    return io


@pytest.mark.parametrize("client", CLIENTS)
def test_reads_and_conditional_writes_follow_s3s_rules(bucket, client):
    from lens.serve.events.objects import Changed, Missing

    s3, b = bucket
    io = io_for(s3, client)
    etag = s3.put_object(Bucket=b, Key="img.jpg", Body=b"x" * 1000)["ETag"]
    assert run(io.get(b, "img.jpg")) == (1000, b"x" * 1000)
    assert run(io.get(b, "img.jpg", if_match=etag.strip('"'))) == (1000, b"x" * 1000)  # as S3 events spell ETags
    assert run(io.get(b, "img.jpg", max_bytes=999)) == (1000, None)  # over the limit: the body is never read
    with pytest.raises(Changed):
        run(io.get(b, "img.jpg", if_match="0" * 32))  # overwritten since the event
    with pytest.raises(Missing):
        run(io.get(b, "gone.jpg"))
    # create-only, then compare-and-swap on the ETag read
    assert run(io.create(b, "side.json", b'{"v": 1}', "application/json")) is True
    assert run(io.create(b, "side.json", b'{"v": 2}', "application/json")) is False
    body, tag = run(io.read(b, "side.json"))
    assert body == b'{"v": 1}' and s3.head_object(Bucket=b, Key="side.json")["ContentType"] == "application/json"
    run(io.replace(b, "side.json", b'{"v": 3}', tag, "application/json"))
    with pytest.raises(Changed):
        run(io.replace(b, "side.json", b'{"v": 4}', tag, "application/json"))  # someone wrote in between
    assert s3.get_object(Bucket=b, Key="side.json")["Body"].read() == b'{"v": 3}'
    with pytest.raises(Missing):
        run(io.read(b, "no-side.json"))


@pytest.mark.parametrize("client", CLIENTS)
def test_a_version_is_read_as_it_was(bucket, client):
    from lens.serve.events.objects import Missing

    s3, b = bucket
    s3.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    v1 = s3.put_object(Bucket=b, Key="v.jpg", Body=b"one")["VersionId"]
    s3.put_object(Bucket=b, Key="v.jpg", Body=b"two")
    io = io_for(s3, client)
    assert run(io.get(b, "v.jpg", version_id=v1)) == (3, b"one") and run(io.get(b, "v.jpg"))[1] == b"two"
    s3.delete_object(Bucket=b, Key="v.jpg", VersionId=v1)
    with pytest.raises(Missing):
        run(io.get(b, "v.jpg", version_id=v1))


@pytest.mark.parametrize("client", CLIENTS)
def test_one_client_from_many_tasks_and_threads_gives_the_sequential_answers_and_one_create_wins(bucket, client):
    s3, b = bucket
    bodies = {f"k/{i}.bin": bytes([i]) * (100 + i) for i in range(24)}
    for k, v in bodies.items():
        s3.put_object(Bucket=b, Key=k, Body=v)
    io = io_for(s3, client, executor=ThreadPoolExecutor(8))
    sequential = [run(io.get(b, k)) for k in bodies]

    async def together(calls):
        return await asyncio.gather(*calls)

    # every request of one event loop at once (the consumer's case), then from 8 threads, each with its own loop
    assert run(together([io.get(b, k) for k in bodies])) == sequential
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda k: run(io.get(b, k)), bodies)) == sequential
        # 16 writers race for one sidecar: exactly one create succeeds, and its body is what S3 holds
        won = list(pool.map(lambda i: run(io.create(b, "race.json", f'{{"writer": {i}}}'.encode(),
                                                    "application/json")), range(16)))
    assert won.count(True) == 1
    assert s3.get_object(Bucket=b, Key="race.json")["Body"].read() == f'{{"writer": {won.index(True)}}}'.encode()
    # and 16 tasks of one loop race for another
    won = run(together([io.create(b, "race2.json", f'{{"writer": {i}}}'.encode(), "application/json")
                        for i in range(16)]))
    assert won.count(True) == 1
    assert s3.get_object(Bucket=b, Key="race2.json")["Body"].read() == f'{{"writer": {won.index(True)}}}'.encode()


def test_obstore_counts_its_requests_and_auto_picks_it_where_installed(bucket):
    from lens.serve.events.objects import object_io

    s3, b = bucket
    calls: Counter = Counter()
    io = object_io(s3, "auto", calls=calls)
    assert io.name == "obstore"  # installed with Lens
    s3.put_object(Bucket=b, Key="a.jpg", Body=b"a")
    run(io.get(b, "a.jpg"))
    run(io.create(b, "a.json", b"{}", "application/json"))
    assert calls == {"s3.GetObject": 1, "s3.PutObject": 1}
    # the store for a bucket is built once, in the bucket's own region (asked of S3 once: boto3 follows S3's
    # redirects to it, obstore would not)
    eu = f"eu-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=eu, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.put_object(Bucket=eu, Key="e.jpg", Body=b"eu")
    assert run(io.get(eu, "e.jpg")) == (2, b"eu") and io.store(eu) is io.store(eu)
    assert io._region_of(eu, io._session[0]) == "eu-west-1" and io._region_of(b, io._session[0]) == "us-east-1"


def test_obstore_sends_a_conditional_put_again_after_a_transport_failure_and_a_landed_first_one_reads_as_a_duplicate(
        bucket, monkeypatch):
    """A pooled connection the server had closed resets a PUT (seen against a keep-alive server under load); obstore
    does not resend a conditional PUT, so the client does, once: safe because the PUT is conditional."""
    import obstore
    from obstore.exceptions import GenericError

    from lens.serve.events.results import Record, ResultStore
    from lens.serve.events.s3events import ObjectEvent

    s3, b = bucket
    calls: Counter = Counter()
    io = io_for(s3, "obstore", calls=calls)
    real, attempts = obstore.put_async, []

    def flaky(landed_first: bool):
        async def put(store, key, body, **kw):
            attempts.append(key)
            if len(attempts) == 1:
                if landed_first:  # the request arrived and was written; its answer was lost
                    await real(store, key, body, **kw)
                raise GenericError("Generic S3 error: HTTP error: error sending request (connection reset by peer)")
            return await real(store, key, body, **kw)
        return put

    monkeypatch.setattr(obstore, "put_async", flaky(False))
    assert run(io.create(b, "side.json", b'{"v": 1}', "application/json")) is True
    assert attempts == ["side.json"] * 2 and calls["s3.PutObject"] == 2
    # the first attempt landed: the second is refused, and the sidecar write reads its own record as a duplicate
    attempts.clear()
    monkeypatch.setattr(obstore, "put_async", flaky(True))
    ev = ObjectEvent(bucket=b, key="img.jpg", etag="e1", version_id=None, size=1, sequencer=None,
                     event_name="ObjectCreated:Put")
    store = ResultStore(s3, "tags/", "emb/", objects=io)
    assert run(store.write(Record(ev, "skipped", reason="test"), {"model": "m"})) == "duplicate"
    assert len(attempts) == 2 and json.loads(s3.get_object(Bucket=b, Key="tags/img.jpg.json")["Body"].read())[
        "reason"] == "test"
    # a failure that persists is raised after the second attempt

    async def down(store, key, body, **kw):
        attempts.append(key)
        raise GenericError("connection refused")

    attempts.clear()
    monkeypatch.setattr(obstore, "put_async", down)
    with pytest.raises(GenericError):
        run(io.create(b, "never.json", b"{}", "application/json"))
    assert attempts == ["never.json"] * 2

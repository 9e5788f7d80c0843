"""`lens events` end to end: moto on loopback, the consumer on Ray Serve tagging through the model pool,
status and DLQ commands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port, interrupt, own_instance, ray_jobs, scrape_metrics, wait_healthy
from test_events import _record, images

from lens.serve.events.consumer import queue_depth

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def lens(*args, env):
    return subprocess.run([sys.executable, "-m", "lens.cli.main", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_lens_events_local_default(tmp_path, lens_cache, foreign_ray):
    import boto3

    moto_port, http_port, metrics_port = free_port(), free_port(), free_port()
    doc = yaml.safe_load((Path(__file__).parents[1] / "infra" / "events.yaml").read_text())
    tiny = {"name": "test_efficientnet", "weights": "random", "backend": "onnx", "device": "cpu"}
    doc["applications"][0]["args"]["pools"][0].update(model=tiny)  # the shipped sizes and niceness
    doc["applications"][1]["args"]["pool"].update(model=tiny)
    doc["applications"][1]["args"]["events"].update(wait_time_s=1, visibility_timeout_s=2, max_receive_count=2,
                                                    scale_interval_s=1)
    cfg = tmp_path / "events.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    # no load balancer in front here: skip Serve's 30 s ingress drain on stop
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "LENS_CACHE_DIR": str(lens_cache), "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "lens.cli.main", "events", "--config", str(cfg), "run", "--moto-port",
                             str(moto_port), "--port", str(http_port), "--metrics-port", str(metrics_port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    endpoint = f"http://127.0.0.1:{moto_port}"
    aws = env | {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
                 "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        wait_healthy(f"http://127.0.0.1:{http_port}/healthz", proc)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="local",
                          aws_secret_access_key="local")
        sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="local",
                           aws_secret_access_key="local")
        # versioned results: every sidecar PUT the deployed consumer makes is kept and counted
        s3.put_bucket_versioning(Bucket="lens-results", VersioningConfiguration={"Status": "Enabled"})
        keys = [f"uploads/{i}.jpg" for i in range(6)]
        etags = {k: s3.put_object(Bucket="lens-images", Key=k, Body=body)["ETag"].strip('"')
                 for k, body in zip(keys, images(6, seed=21))}
        # an undecodable upload among them: its own skipped sidecar, the batch it rode with unharmed
        s3.put_object(Bucket="lens-images", Key="uploads/broken.jpg", Body=b"not an image at all")
        url = sqs.get_queue_url(QueueName="lens-events")["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody="poison: not an S3 event")
        deadline = time.monotonic() + 120
        done = []
        while time.monotonic() < deadline:
            listed = s3.list_objects_v2(Bucket="lens-results", Prefix="lens-tags/").get("Contents", [])
            done = sorted(o["Key"] for o in listed)
            # the queue's own counter while waiting (`lens events status`, a process each, is checked once below)
            dlq_depth = queue_depth(sqs, sqs.get_queue_url(QueueName="lens-events-dlq")["QueueUrl"])["visible"]
            if len(done) == len(keys) + 1 and dlq_depth == 1:
                break
            time.sleep(0.25)
        assert done == sorted(f"lens-tags/{k}.json" for k in [*keys, "uploads/broken.jpg"])
        rec = json.loads(s3.get_object(Bucket="lens-results", Key="lens-tags/uploads/0.jpg.json")["Body"].read())
        assert rec["status"] == "tagged" and rec["model"] == "test_efficientnet" and len(rec["tags"]) == 5
        broken = json.loads(s3.get_object(Bucket="lens-results", Key="lens-tags/uploads/broken.jpg.json")["Body"].read())
        assert broken["status"] == "skipped" and broken["reason"].startswith("unsupported_media_type")
        st = json.loads(lens("events", "--config", str(cfg), "status", env=aws).stdout)
        assert st["dlq_depth"] == 1 and st["visible"] == 0
        listed = [json.loads(line) for line in lens("events", "--config", str(cfg), "dlq", "list",
                                                    env=aws).stdout.splitlines()]
        assert [m["body"] for m in listed] == ["poison: not an S3 event"]
        # moto has no StartMessageMoveTask: auto falls back to copying (body and attributes)
        assert json.loads(lens("events", "--config", str(cfg), "dlq", "redrive", env=aws).stdout) == {
            "redriven": 1, "method": "copy"}

        # at-least-once and out-of-order delivery, through the deployed consumer: uploads/0.jpg's event twice more;
        # uploads/1.jpg overwritten, then its old event delivered late
        from lens.serve.events.results import count_writes

        dup = json.dumps({"Records": [_record("lens-images", "uploads/0.jpg", etags["uploads/0.jpg"])]})
        sqs.send_message(QueueUrl=url, MessageBody=dup)
        sqs.send_message(QueueUrl=url, MessageBody=dup)
        new_etag = s3.put_object(Bucket="lens-images", Key="uploads/1.jpg", Body=images(1, seed=22)[0])["ETag"]
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(
            {"Records": [_record("lens-images", "uploads/1.jpg", etags["uploads/1.jpg"])]}))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            writes = count_writes(s3, "lens-results", "lens-tags/")
            if writes.get("lens-tags/uploads/1.jpg.json") == 2 and queue_depth(sqs, url) == {"visible": 0,
                                                                                            "in_flight": 0}:
                break
            time.sleep(0.25)
        redriven = 1  # the redriven poison message went round again: back in the DLQ, nothing written for it
        assert writes == {f"lens-tags/{k}.json": 2 if k == "uploads/1.jpg" else 1
                          for k in [*keys, "uploads/broken.jpg"]}, writes
        rec = json.loads(s3.get_object(Bucket="lens-results", Key="lens-tags/uploads/1.jpg.json")["Body"].read())
        assert rec["etag"] == new_etag.strip('"')
        deadline = time.monotonic() + 60
        while queue_depth(sqs, sqs.get_queue_url(QueueName="lens-events-dlq")["QueueUrl"])["visible"] != redriven:
            assert time.monotonic() < deadline, "the redriven poison message did not return to the DLQ"
            time.sleep(0.25)
        # every event-path metric the dashboard and alerts query is exported at run time
        from test_infra import used_metrics

        wanted = sorted(f"ray_{m}" for m in used_metrics() if m.startswith("lens_events_"))
        assert len(wanted) >= 5
        scrape_metrics(metrics_port, wanted)
        # the uploads went through the events' own pool, never the HTTP pool's batches (Ray exports every few
        # seconds: scraped until the 6 images and the redelivered ones are counted); and each pool's replica
        # runs at the niceness the config gives it (the HTTP pool first to the cores), the consumer at the bulk one
        deadline = time.monotonic() + 90
        while True:
            images_by_pool = {}
            for line in scrape_metrics(metrics_port, ["ray_lens_batch_size_sum"]).splitlines():
                if line.startswith("ray_lens_batch_size_sum{"):
                    pool = re.search(r'deployment="([^"]+)"', line).group(1)
                    images_by_pool[pool] = images_by_pool.get(pool, 0) + float(line.rsplit(" ", 1)[1])
            if images_by_pool.get("TaggerBulk", 0) >= len(keys) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert images_by_pool.get("TaggerBulk", 0) >= len(keys) and images_by_pool.get("Tagger", 0) == 0, \
            images_by_pool
        replicas = subprocess.run(["ps", "-eo", "sid=,ni=,args="], capture_output=True, text=True).stdout
        nice = {args.split(":")[-1].split(".")[0]: int(ni) for sid, ni, args in
                (line.split(None, 2) for line in replicas.splitlines() if line.split(None, 2)[2:])
                if int(sid) == proc.pid and args.startswith("ray::ServeReplica:lens")}
        assert nice.get("Tagger") == 0 and nice.get("TaggerBulk") == 19 and nice.get("EventConsumer") == 19, nice
        assert ray_jobs(foreign_ray) == []  # someone else's `ray start` cluster on the host: never joined
    finally:
        out = interrupt(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "created queue lens-events" in out and "shutting down Lens" in out
    own_instance(out, "lens serve")

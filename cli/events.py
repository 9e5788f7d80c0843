"""``lens events``: run the event consumer (locally on moto by default), backfill what is already in the bucket,
inspect the queues, redrive the DLQ."""

from __future__ import annotations

import json
import os
import sys

from lens.serve.events.app import EventsAppArgs
from lens.serve.events.consumer import queue_depth, queue_url
from lens.serve.events.setup import clients, ensure_resources
from lens.serve.run import BUILDER, EVENTS_BUILDER, load_serve_config

from lens.errors import ConfigError
from lens.runtime.config import ModelConfig, validate

__all__ = ["DEFAULT_EVENTS_CONFIG", "events_args", "run_events", "status", "dlq_list", "dlq_redrive",
           "start_local_aws"]

DEFAULT_EVENTS_CONFIG = {
    "proxy_location": "HeadOnly",
    "http_options": {"host": "127.0.0.1", "port": 8000},
    "applications": [
        # the HTTP pool at niceness 0 and the events' own pool at 19 (its default): interactive requests get the
        # cores first during an event burst (scripts/bench_priority.py); 1 + 0.5 CPUs leave 0.5 for a searcher
        {"name": "lens", "route_prefix": "/", "import_path": BUILDER,
         "args": {"pools": [{"name": "Tagger", "nice": 0}]}},
        {"name": "lens-events", "route_prefix": None, "import_path": EVENTS_BUILDER,
         "args": {"events": {"results_bucket": "lens-results"}, "pool": {"name": "TaggerBulk", "num_cpus": 0.5}}},
    ],
}


def events_args(doc: dict) -> EventsAppArgs:
    for app in doc.get("applications", []):
        if app.get("import_path") == EVENTS_BUILDER:
            return validate(EventsAppArgs, app.get("args") or {}, where=f"application {app.get('name')!r} args")
    raise ConfigError(f"the config has no application with import_path {EVENTS_BUILDER}")


def start_local_aws(port: int = 4566) -> str:
    """moto's S3/SQS server on 127.0.0.1 (the local default), and the env for boto3 to use it."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise ConfigError("no AWS account is configured (--aws with AWS_REGION/credentials, or AWS_ENDPOINT_URL) and "
                          "the local S3/SQS is not installed: pip install 'lens-vision[local]' to run on 127.0.0.1, or pass "
                          "--aws to use a real account") from None

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access-log line per S3/SQS call
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=os.environ.get("AWS_ACCESS_KEY_ID", "local"),
                      AWS_SECRET_ACCESS_KEY=os.environ.get("AWS_SECRET_ACCESS_KEY", "local"),
                      AWS_DEFAULT_REGION=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return endpoint


def run_events(doc: dict, *, aws: bool = False, moto_port: int = 4566, **serve_kw) -> None:
    """Deploy the tagging app and the consumer; on the local default, against moto on 127.0.0.1."""
    from lens.serve.run import run

    cfg = events_args(doc).events
    if not aws and not os.environ.get("AWS_ENDPOINT_URL"):
        endpoint = start_local_aws(moto_port)
        print(f"local S3/SQS (moto) at {endpoint}; export AWS_ENDPOINT_URL={endpoint} to use it", file=sys.stderr)
    for change in ensure_resources(cfg):
        print(f"  {change}", file=sys.stderr)
    print(f"consuming s3://{cfg.bucket} ObjectCreated events from {cfg.queue} (DLQ {cfg.dlq}); results under "
          f"{cfg.result_prefix}", file=sys.stderr)
    run(doc, **serve_kw)


def status(cfg) -> dict:
    s3, sqs = clients(cfg.region)
    main, dlq = queue_url(sqs, cfg.queue), queue_url(sqs, cfg.dlq)
    out = {"queue": cfg.queue, **queue_depth(sqs, main), "dlq": cfg.dlq, "dlq_depth": queue_depth(sqs, dlq)["visible"]}
    try:  # the consumer's own counters, if a Lens cluster is reachable
        import ray
        from ray import serve

        from lens.cluster import init_ray

        if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):  # only a cluster the user named: never start one
            init_ray(os.environ.get("RAY_ADDRESS"), what="lens events status", logging_level="ERROR")
            out |= serve.get_deployment_handle("EventConsumer", "lens-events").status.remote().result(timeout_s=10)
    except Exception as e:  # noqa: BLE001 - queue numbers are still useful without the consumer
        out["consumer"] = f"unavailable: {type(e).__name__}"
    return out


def dlq_list(cfg, limit: int = 10) -> list[dict]:
    """Peek at DLQ messages without consuming them (visibility 0)."""
    _, sqs = clients(cfg.region)
    url = queue_url(sqs, cfg.dlq)
    out = []
    resp = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=min(limit, 10), VisibilityTimeout=0,
                               AttributeNames=["ApproximateReceiveCount", "SentTimestamp"])
    for m in resp.get("Messages", []):
        out.append({"message_id": m["MessageId"], "receive_count": m["Attributes"].get("ApproximateReceiveCount"),
                    "body": m["Body"][:500]})
    return out


#: Error codes of an SQS endpoint without message move tasks (moto's server answers a bare 500 after botocore's
#: retries; other emulators name it): the copy path runs. On AWS a 500 is transient, and copying still redrives.
NO_MOVE_TASKS = {"UnsupportedOperation", "AWS.SimpleQueueService.UnsupportedOperation", "InvalidAction",
                 "NotImplemented", "InternalFailure", "InternalError", "UnknownOperationException", "500", "501"}


def dlq_redrive(cfg, limit: int | None = None, *, method: str = "auto", poll_s: float = 1.0) -> dict:
    """Move DLQ messages back to the main queue: ``{"redriven": N, "method": ...}``.

    ``move-task`` (and ``auto`` without ``limit``): SQS's own ``StartMessageMoveTask`` moves every message with its
    attributes, server side, and this waits until the task ends. ``copy`` (and ``auto`` with ``limit``, or where the
    endpoint has no move tasks): receive, send with the body *and* the message attributes, then delete — at least
    once, like SQS itself."""
    from botocore.exceptions import ClientError

    _, sqs = clients(cfg.region)
    src, dst = queue_url(sqs, cfg.dlq), queue_url(sqs, cfg.queue)
    if method == "move-task" or (method == "auto" and limit is None):
        try:
            return {"redriven": _move_task(sqs, src, dst, poll_s), "method": "move-task"}
        except ClientError as e:
            if method == "move-task" or e.response.get("Error", {}).get("Code") not in NO_MOVE_TASKS:
                raise
    return {"redriven": _copy(sqs, src, dst, limit), "method": "copy"}


def _arn(sqs, url: str) -> str:
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def _move_task(sqs, src: str, dst: str, poll_s: float) -> int:
    import time

    source = _arn(sqs, src)
    handle = sqs.start_message_move_task(SourceArn=source, DestinationArn=_arn(sqs, dst))["TaskHandle"]
    while True:
        task = next((t for t in sqs.list_message_move_tasks(SourceArn=source, MaxResults=10)["Results"]
                     if t.get("TaskHandle") == handle), None)
        if task is not None and task["Status"] != "RUNNING":
            if task["Status"] != "COMPLETED":
                raise ConfigError(f"the DLQ move task ended {task['Status']}: {task.get('FailureReason', '')}")
            return int(task.get("ApproximateNumberOfMessagesMoved", 0))
        time.sleep(poll_s)


def _copy(sqs, src: str, dst: str, limit: int | None) -> int:
    moved = 0
    while limit is None or moved < limit:
        want = 10 if limit is None else min(10, limit - moved)
        msgs = sqs.receive_message(QueueUrl=src, MaxNumberOfMessages=want, WaitTimeSeconds=1, VisibilityTimeout=30,
                                   MessageAttributeNames=["All"]).get("Messages", [])
        if not msgs:
            break
        entries = [{"Id": str(i), "MessageBody": m["Body"],
                    **({"MessageAttributes": m["MessageAttributes"]} if m.get("MessageAttributes") else {})}
                   for i, m in enumerate(msgs)]
        sent = sqs.send_message_batch(QueueUrl=dst, Entries=entries)
        ok = {e["Id"] for e in sent.get("Successful", [])}
        done = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs) if str(i) in ok]
        if done:
            sqs.delete_message_batch(QueueUrl=src, Entries=done)
        moved += len(done)
        if sent.get("Failed"):  # left in the DLQ (visible again after 30 s): say so rather than spin on them
            raise ConfigError(f"the main queue refused {len(sent['Failed'])} message(s): "
                              f"{sent['Failed'][0].get('Message', sent['Failed'][0].get('Code'))}")
    return moved


def pool_model(doc: dict) -> ModelConfig:
    """The model the event path tags with: the events application's own pool's, else that of the pool it names
    (``tagger_deployment`` of ``tagger_app``)."""
    args = events_args(doc)
    if args.pool is not None:
        return args.pool.model
    for app in doc.get("applications", []):
        if app.get("import_path") == BUILDER and app.get("name") == args.tagger_app:
            pools = (app.get("args") or {}).get("pools") or [{}]
            pool = next((p for p in pools if p.get("name", "Tagger") == args.tagger_deployment), pools[0])
            return validate(ModelConfig, pool.get("model") or {}, where=f"application {app.get('name')!r} pool")
    return ModelConfig()


def backfill(doc: dict, args) -> dict:
    from lens.serve.events.backfill import BackfillConfig, run_backfill

    cfg = validate(BackfillConfig, {"uri": args.uri, "batch_size": args.batch_size, "workers": args.workers,
                                    "address": args.address, "redo": args.redo, "nice": args.nice},
                   where="command line")
    return run_backfill(cfg, events_args(doc).events, pool_model(doc),
                        log=lambda m: print(m, file=sys.stderr, flush=True))


def main(args) -> int:
    doc = load_serve_config(args.config) if args.config else DEFAULT_EVENTS_CONFIG
    cfg = events_args(doc).events
    if args.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint_url
    if args.events_command in (None, "run"):
        from lens.serve.frontdoor import from_args

        run_events(doc, aws=args.aws, moto_port=args.moto_port, port=args.port, address=args.address,
                   proxy=args.proxy, frontdoor=from_args(args), metrics_port=args.metrics_port or None,
                   metrics_host=getattr(args, "metrics_host", "127.0.0.1"),
                   check_fit=not getattr(args, "skip_resource_check", False),
                   grace_s=getattr(args, "grace_period_s", 30.0))
    elif args.events_command == "backfill":
        print(json.dumps(backfill(doc, args)))
    elif args.events_command == "status":
        print(json.dumps(status(cfg), indent=2))
    elif args.events_command == "dlq" and args.dlq_command == "list":
        for m in dlq_list(cfg, args.limit):
            print(json.dumps(m))
    elif args.events_command == "dlq" and args.dlq_command == "redrive":
        print(json.dumps(dlq_redrive(cfg, args.limit, method=args.method)))
    return 0

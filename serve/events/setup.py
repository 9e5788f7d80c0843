"""Create (idempotently) what the event path needs: bucket, queue, DLQ with redrive, S3 notification.

The same boto3 calls run against AWS or moto's server (``AWS_ENDPOINT_URL``); each returns the list
of changes it made, so a second run prints nothing.
"""

from __future__ import annotations

import json
import logging

from .config import EventsConfig

__all__ = ["ensure_resources", "clients", "count_calls"]

logger = logging.getLogger("lens.events")


def clients(region: str | None = None, *, concurrency: int = 10):
    """boto3 S3 and SQS clients. Their connection pools hold ``concurrency`` + 8 connections: with botocore's default
    10 and 32 concurrent calls, the consumer opened and closed a TCP connection for most calls (11 % of its CPU in a
    profile). Checksums are computed only where the API requires them (botocore's newer default hashes every PUT
    body in Python)."""
    import boto3
    from botocore.config import Config

    config = Config(max_pool_connections=concurrency + 8, request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")
    session = boto3.session.Session(region_name=region)
    return session.client("s3", config=config), session.client("sqs", config=config)


def count_calls(client, counter) -> None:
    """Count every API call ``client`` makes in ``counter`` (a :class:`collections.Counter`), as
    ``service.Operation`` (``s3.GetObject``, ``sqs.ReceiveMessage``): what the event path costs in requests."""
    service = client.meta.service_model.service_name

    def before_call(model, **_) -> None:
        counter[f"{service}.{model.name}"] += 1

    client.meta.events.register("before-call", before_call)


def _same(attr: str, current: str | None, wanted: str) -> bool:
    """Compare queue attributes as AWS means them (JSON ones semantically, numbers as strings)."""
    if current is None:
        return False
    if attr == "RedrivePolicy":
        a, b = json.loads(current), json.loads(wanted)
        return a.get("deadLetterTargetArn") == b["deadLetterTargetArn"] and \
            str(a.get("maxReceiveCount")) == str(b["maxReceiveCount"])
    return current == wanted


def _has_statement(policy: str | None, statement: dict) -> bool:
    if not policy:
        return False
    return statement in json.loads(policy).get("Statement", [])


def _queue(sqs, name: str, attributes: dict, changes: list) -> tuple[str, str]:
    from botocore.exceptions import ClientError

    try:
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    except ClientError as e:
        if "NonExistentQueue" not in e.response["Error"]["Code"]:
            raise
        url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        changes.append(f"created queue {name}")
    else:
        current = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"]).get("Attributes", {})
        diff = {k: v for k, v in attributes.items() if not _same(k, current.get(k), v)}
        if diff:
            sqs.set_queue_attributes(QueueUrl=url, Attributes=diff)
            changes.append(f"updated queue {name}: {', '.join(sorted(diff))}")
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return url, arn


def ensure_resources(cfg: EventsConfig, s3=None, sqs=None, *, create_bucket: bool = True) -> list[str]:
    from botocore.exceptions import ClientError

    if s3 is None or sqs is None:
        s3, sqs = clients(cfg.region)
    changes: list[str] = []
    for bucket in dict.fromkeys(b for b in (*cfg.source_buckets, cfg.results_bucket) if b):
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError:
            if not create_bucket:
                raise
            region = s3.meta.region_name
            kw = {} if region in (None, "us-east-1") else {"CreateBucketConfiguration": {"LocationConstraint": region}}
            s3.create_bucket(Bucket=bucket, **kw)
            changes.append(f"created bucket {bucket}")

    _, dlq_arn = _queue(sqs, cfg.dlq, {"MessageRetentionPeriod": "1209600"}, changes)
    attrs = {
        "VisibilityTimeout": str(cfg.visibility_timeout_s),
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(cfg.max_receive_count)}),
    }
    url, arn = _queue(sqs, cfg.queue, attrs, changes)
    statement = {
        "Sid": "lens-s3-notifications", "Effect": "Allow", "Principal": {"Service": "s3.amazonaws.com"},
        "Action": "sqs:SendMessage", "Resource": arn,
        "Condition": {"ArnLike": {"aws:SourceArn": [f"arn:aws:s3:::{b}" for b in cfg.source_buckets]}}}
    policy = json.dumps({"Version": "2012-10-17", "Statement": [statement]})
    current = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"]).get("Attributes", {}).get("Policy")
    if not _has_statement(current, statement):
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": policy})
        changes.append(f"set queue policy on {cfg.queue} (S3 may send)")

    wanted = {"Id": "lens-object-created", "QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}
    for bucket in cfg.source_buckets:
        conf = s3.get_bucket_notification_configuration(Bucket=bucket)
        conf.pop("ResponseMetadata", None)
        queues = conf.get("QueueConfigurations", [])
        if not any(q.get("QueueArn") == arn and "s3:ObjectCreated:*" in q.get("Events", []) for q in queues):
            conf["QueueConfigurations"] = [q for q in queues if q.get("Id") != wanted["Id"]] + [wanted]
            s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=conf)
            changes.append(f"added ObjectCreated notification s3://{bucket} -> {cfg.queue}")
    return changes

"""Create (idempotently) what the event path needs: bucket, queue, DLQ with redrive, and the route of the S3
events to the queue: S3's notifications (``route: s3``, the default) or S3 -> EventBridge -> SQS (``route:
eventbridge``: the bucket sends its events to EventBridge, a rule forwards Object Created/Deleted to the queue).

The same boto3 calls run against AWS or moto's server (``AWS_ENDPOINT_URL``); each returns the list
of changes it made, so a second run prints nothing.
"""

from __future__ import annotations

import json
import logging

from .config import EventsConfig

__all__ = ["ensure_resources", "clients", "count_calls"]

logger = logging.getLogger("lens.events")


def clients(region: str | None = None, *, concurrency: int = 10, events: bool = False):
    """boto3 S3 and SQS clients. Their connection pools hold ``concurrency`` + 8 connections: with botocore's default
    10 and 32 concurrent calls, the consumer opened and closed a TCP connection for most calls (11 % of its CPU in a
    profile). Checksums are computed only where the API requires them (botocore's newer default hashes every PUT
    body in Python)."""
    import boto3
    from botocore.config import Config

    config = Config(max_pool_connections=concurrency + 8, request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")
    session = boto3.session.Session(region_name=region)
    out = session.client("s3", config=config), session.client("sqs", config=config)
    return (*out, session.client("events", config=config)) if events else out


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


def ensure_resources(cfg: EventsConfig, s3=None, sqs=None, *, create_bucket: bool = True, events=None) -> list[str]:
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
    if cfg.route == "eventbridge":
        _eventbridge_route(cfg, s3, events or clients(cfg.region, events=True)[2], sqs, url, arn, changes)
        return changes
    statement = {
        "Sid": "lens-s3-notifications", "Effect": "Allow", "Principal": {"Service": "s3.amazonaws.com"},
        "Action": "sqs:SendMessage", "Resource": arn,
        "Condition": {"ArnLike": {"aws:SourceArn": [f"arn:aws:s3:::{b}" for b in cfg.source_buckets]}}}
    _allow(sqs, url, cfg.queue, statement, "S3 may send", changes)

    wanted = {"Id": NOTIFICATION_ID, "QueueArn": arn, "Events": list(EVENTS)}
    for bucket in cfg.source_buckets:
        conf = s3.get_bucket_notification_configuration(Bucket=bucket)
        conf.pop("ResponseMetadata", None)
        queues = conf.get("QueueConfigurations", [])
        if not any(q.get("QueueArn") == arn and set(EVENTS) <= set(q.get("Events", [])) for q in queues):
            conf["QueueConfigurations"] = [q for q in queues if q.get("Id") != wanted["Id"]] + [wanted]
            s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=conf)
            changes.append(f"added ObjectCreated and ObjectRemoved notifications s3://{bucket} -> {cfg.queue}")
    return changes


#: the S3 notification events Lens consumes: uploads to tag, deletions to drop from search
EVENTS = ("s3:ObjectCreated:*", "s3:ObjectRemoved:*")
#: the Id of Lens's notification configuration on a source bucket (the S3 route)
NOTIFICATION_ID = "lens-object-created"


def _allow(sqs, url: str, name: str, statement: dict, why: str, changes: list) -> None:
    """Add ``statement`` to the queue's policy unless it is there (the policy's other statements are kept)."""
    current = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"]).get("Attributes", {}).get("Policy")
    if _has_statement(current, statement):
        return
    doc = json.loads(current) if current else {"Version": "2012-10-17", "Statement": []}
    doc["Statement"] = [s for s in doc.get("Statement", []) if s.get("Sid") != statement["Sid"]] + [statement]
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(doc)})
    changes.append(f"set queue policy on {name} ({why})")


def _eventbridge_route(cfg: EventsConfig, s3, events, sqs, url: str, arn: str, changes: list) -> None:
    """S3 -> EventBridge -> SQS: each source bucket sends its events to EventBridge, and one rule on the default
    bus forwards their ``Object Created`` and ``Object Deleted`` events to the queue."""
    for bucket in cfg.source_buckets:
        conf = s3.get_bucket_notification_configuration(Bucket=bucket)
        conf.pop("ResponseMetadata", None)
        queues = conf.get("QueueConfigurations", [])
        ours = [q for q in queues if q.get("Id") == NOTIFICATION_ID and q.get("QueueArn") == arn]
        if "EventBridgeConfiguration" not in conf or ours:
            conf["EventBridgeConfiguration"] = {}
            if ours:  # the S3 route's notification to this queue: every event would arrive twice
                conf["QueueConfigurations"] = [q for q in queues if q not in ours]
            s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=conf)
            changes.append(f"s3://{bucket} sends its events to EventBridge"
                           + (f" (its S3 notification to {cfg.queue} removed)" if ours else ""))
    rule = f"lens-{cfg.queue}"[:64]
    pattern = json.dumps({"source": ["aws.s3"], "detail-type": ["Object Created", "Object Deleted"],
                          "detail": {"bucket": {"name": sorted(cfg.source_buckets)}}}, sort_keys=True)
    try:
        current = events.describe_rule(Name=rule)
    except events.exceptions.ResourceNotFoundException:
        current = None
    if current is None or json.loads(current.get("EventPattern") or "{}") != json.loads(pattern) \
            or current.get("State") != "ENABLED":
        current = events.put_rule(Name=rule, EventPattern=pattern, State="ENABLED",
                                  Description="Lens: S3 object events of the source buckets to its queue")
        changes.append(f"EventBridge rule {rule}: Object Created/Deleted of {', '.join(cfg.source_buckets)}")
    rule_arn = current.get("RuleArn") or current["Arn"]
    targets = events.list_targets_by_rule(Rule=rule).get("Targets", [])
    if not any(t.get("Arn") == arn for t in targets):
        events.put_targets(Rule=rule, Targets=[{"Id": "lens-queue", "Arn": arn}])
        changes.append(f"EventBridge rule {rule} -> {cfg.queue}")
    statement = {"Sid": "lens-eventbridge", "Effect": "Allow", "Principal": {"Service": "events.amazonaws.com"},
                 "Action": "sqs:SendMessage", "Resource": arn, "Condition": {"ArnEquals": {"aws:SourceArn": rule_arn}}}
    _allow(sqs, url, cfg.queue, statement, "EventBridge may send", changes)

"""The event path: S3 object-created and object-removed events through SQS (S3 notifications, via SNS or via
EventBridge), tagged once in effect by the model pool of the online service, deletions turned into tombstones
(``app``: the Serve consumer; ``consumer``: the processor and poller; ``results``: sidecars, object tags, embedding
and tombstone parts; ``s3events``: parsing; ``setup``: buckets, queues, notifications, the EventBridge route;
``backfill``: what was in the bucket before, on Ray Data; ``lambda_handler``: the same processor behind AWS
Lambda)."""

"""The event path: S3 ObjectCreated notifications through SQS, tagged once in effect by the model pool of the
online service (``app``: the Serve consumer; ``consumer``: the processor and poller; ``results``: sidecars,
object tags and embedding parts; ``s3events``: parsing; ``setup``: buckets, queues, notifications; ``cli``:
``lens events``; ``lambda_handler``: the same processor behind AWS Lambda)."""

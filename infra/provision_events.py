#!/usr/bin/env python
"""Provision the event path on AWS with boto3, idempotently: the SQS queue and its DLQ (redrive policy),
the queue policy that lets S3 send, and the bucket's ObjectCreated/ObjectRemoved notification (or, with ``route:
eventbridge`` in the events config, the S3 -> EventBridge -> SQS route: that needs events:PutRule, PutTargets,
DescribeRule and ListTargetsByRule on the rule). Prints what it changed
(nothing on a second run).

    python infra/provision_events.py --config infra/events.yaml [--region eu-west-1] [--create-bucket]

Uses the normal AWS credential chain; set AWS_ENDPOINT_URL to aim it at moto instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).with_name("events.yaml")),
                    help="Serve config holding the lens-events application (its events: section is used)")
    ap.add_argument("--region", default=None, help="AWS region (default: the credential chain's)")
    ap.add_argument("--create-bucket", action="store_true", help="create the bucket if it does not exist")
    args = ap.parse_args()

    from lens.cli.events import events_args
    from lens.serve.events.setup import ensure_resources
    from lens.serve.run import load_serve_config

    cfg = events_args(load_serve_config(args.config)).events
    if args.region:
        cfg = cfg.model_copy(update={"region": args.region})
    changes = ensure_resources(cfg, create_bucket=args.create_bucket)
    for c in changes:
        print(c)
    if not changes:
        print("nothing to change")
    return 0


if __name__ == "__main__":
    sys.exit(main())

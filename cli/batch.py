"""``lens embed`` and ``lens shards``: argument handling for the bulk embedding job."""

from __future__ import annotations

import argparse
import json
import os
import sys

from lens.errors import LensError

__all__ = ["add_parsers", "config_from_args"]

_EMBED_FLAGS = {"input": "input", "output": "output", "input_format": "input_format", "id_column": "id_column",
                "image_column": "image_column", "top_k": "top_k", "batch_size": "batch_size",
                "workers": "workers", "gpus_per_worker": "gpus_per_worker", "cpus_per_worker": "cpus_per_worker",
                "files_per_shard": "files_per_shard", "address": "address"}


def config_from_args(args: argparse.Namespace):
    """An :class:`~lens.batch.config.EmbedConfig` from ``--config FILE`` (sections ``embed``, ``model``, ``decode``)
    with the command-line flags on top."""
    from lens.batch.config import EmbedConfig
    from lens.cli.args import configs_from_args

    from lens.runtime.config import read_config, validate

    data = read_config(args.config) if args.config else {}
    model, decode = configs_from_args(args, data)
    embed = dict(data.get("embed") or {})
    for key, attr in _EMBED_FLAGS.items():
        if getattr(args, attr, None) is not None:
            embed[key] = getattr(args, attr)
    if args.carry:
        embed["carry_columns"] = [c for c in args.carry.split(",") if c]
    embed.update(model=model, decode=decode)
    where = f"{args.config} and the command line" if args.config else "command line"
    for required in ("input", "output"):
        if not embed.get(required):
            raise LensError(f"--{required} is required (or `embed.{required}` in --config)", code="usage")
    return validate(EmbedConfig, embed, where=where)


def cmd_embed(args: argparse.Namespace) -> int:
    from lens.batch.job import run_embed

    cfg = config_from_args(args)
    if args.no_progress:
        os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    s = run_embed(cfg, log=log)
    log(f"lens embed: {s.input_rows} input rows = {s.embedded} embedded + {s.errors} errors "
        f"({s.shards_run} shard(s) run, {s.shards_skipped} already done); {s.rows_run} rows in "
        f"{s.run_seconds:.1f} s = {s.images_per_s:.1f} images/s; manifest: {s.manifest}")
    print(json.dumps(s.to_dict()))
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from lens.batch.pack import timed_progress
    from lens.batch.shards import make_shards

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    written = make_shards(args.input, args.output, rows_per_shard=args.rows_per_shard, ids=args.ids,
                          max_shard_bytes=int(args.max_shard_mb * 2**20), progress=timed_progress(log),
                          address=args.address, log=log)
    for w in written:
        print(json.dumps(w))
    skipped = sum(w["skipped"] for w in written)
    log(f"lens shards: {sum(w['rows'] for w in written)} images in {len(written)} shard(s) at {args.output}"
        + (f" ({skipped} already written by an earlier run)" if skipped else ""))
    return 0


def add_parsers(sub, add_model_args) -> None:
    p = sub.add_parser("embed", help="bulk-embed Parquet image shards (or an image folder) on Ray Data",
                       description="Embed every image of --input into Parquet shards at --output. Re-running "
                       "with the same --output resumes: completed input shards are skipped.")
    p.add_argument("--input", default=None, help="Parquet shards: DIR, FILE, GLOB or s3://bucket/prefix; or a "
                   "folder of image files")
    p.add_argument("--output", default=None, help="output DIR or s3://bucket/prefix")
    p.add_argument("--input-format", choices=["auto", "parquet", "images"], default=None,
                   help="default auto: Parquet if the input holds .parquet files, else image files")
    p.add_argument("--id-column", default=None, help="id column of the input shards (default id)")
    p.add_argument("--image-column", default=None, help="image bytes column (default image)")
    p.add_argument("--carry", default=None, metavar="COL,COL", help="input columns to copy to the output")
    p.add_argument("--top-k", type=int, default=None, help="tags stored per image (default 5)")
    p.add_argument("--batch-size", type=int, default=None, help="images per model call (default 32)")
    p.add_argument("--workers", type=int, default=None, help="model actors (default: automatic)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per model actor (default 0: CPU)")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs reserved per model actor (default 0.5 on CPU: one inference thread per actor; 1 on GPU)")
    p.add_argument("--files-per-shard", type=int, default=None, help="image-folder input: files per shard")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars")
    add_model_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("shards", help="pack a folder of images into Parquet shards (id, image, uri) for lens embed",
                       description="A Ray job: shards are written in parallel tasks (bounded in flight), atomically; "
                       "re-running with the same --output skips the shards already written.")
    p.add_argument("--input", required=True, help="folder (or s3:// prefix) of image files")
    p.add_argument("--output", required=True, help="folder (or s3:// prefix) for the shards")
    p.add_argument("--rows-per-shard", type=int, default=1000, help="images per shard at most (default 1000)")
    p.add_argument("--max-shard-mb", type=float, default=256.0, help="a shard closes at this size (default 256 MiB)")
    p.add_argument("--ids", choices=["relative", "uri"], default="relative",
                   help="each image's id: its path relative to --input (default), or its full URI (s3://bucket/key, "
                   "the id the event path gives an uploaded object); every shard also keeps the URI in a uri column")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=cmd_shards)

"""``lens train``'s flags, and the command."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_parsers", "config_from_args", "cmd_train"]

# TrainConfig field -> flag attribute
_FLAGS = {"data": "data", "output": "output", "name": "name", "mode": "mode", "val_data": "val_data",
          "val_fraction": "val_fraction", "batch_size": "train_batch_size", "epochs": "epochs", "lr": "lr",
          "dropout": "dropout", "label_smoothing": "label_smoothing", "patience": "patience",
          "recommended": "recommended", "dedup": "dedup", "dedup_threshold": "dedup_threshold",
          "target_precision": "target_precision", "seed": "seed", "overwrite": "overwrite",
          "id_column": "id_column", "feedback": "feedback", "image_column": "image_column", "label_column": "label_column",
          "workers": "workers", "use_gpu": "use_gpu", "unfreeze": "unfreeze", "test_data": "test_data",
          "test_fraction": "test_fraction", "feedback_index": "feedback_index", "finetune_epochs": "finetune_epochs", "backbone_lr_mult": "backbone_lr_mult",
          "cpus_per_worker": "cpus_per_worker", "checkpoint_storage": "checkpoint_storage", "address": "address",
          "max_failures": "max_failures"}


def config_from_args(args: argparse.Namespace):
    """A :class:`~lens.train.config.TrainConfig` from ``--config FILE`` (sections ``train``, ``model``, ``decode``)
    with the command-line flags on top; settings given either way count as explicit (``--recommended`` leaves
    them alone)."""
    from lens.cli.args import configs_from_args
    from lens.train.config import TrainConfig

    from lens.errors import LensError
    from lens.runtime.config import read_config, validate

    data = read_config(args.config) if args.config else {}
    model, decode = configs_from_args(args, data)
    train = dict(data.get("train") or {})
    for key, attr in _FLAGS.items():
        v = getattr(args, attr, None)
        if v is not None and v is not False:
            train[key] = v
    mlflow = {k: v for k, v in {"tracking_uri": getattr(args, "mlflow", None) or None,
                                "experiment": getattr(args, "mlflow_experiment", None),
                                "run_name": getattr(args, "mlflow_run_name", None)}.items() if v is not None}
    if getattr(args, "mlflow", None) is not None or mlflow:
        train["mlflow"] = dict(train.get("mlflow") or {}) | mlflow
    for required in ("data", "output"):
        if not train.get(required):
            raise LensError(f"--{required} is required (or `train.{required}` in --config)", code="usage")
    where = f"{args.config} and the command line" if args.config else "command line"
    return validate(TrainConfig, train | {"model": model, "decode": decode}, where=where)


def cmd_train(args: argparse.Namespace) -> int:
    from lens.train.job import run_train

    cfg = config_from_args(args)
    summary = run_train(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(summary))
    return 0


def add_parsers(sub, add_model_args) -> None:
    p = sub.add_parser(
        "train", help="train custom tags on a folder of your own classes; writes a model package",
        description="Train a classifier on --data (one sub-folder per class, or train/ and val/ folders of them, "
        "local or s3://; or Parquet with id, image and label columns) and write a model package to --output. "
        "Mode head (default) trains on the frozen backbone's embeddings in seconds; finetune trains the network "
        "on Ray Train. Serve the package with `lens tag --head PKG`, a Serve pool's model.heads, lens embed "
        "--head, or the event path.")
    p.add_argument("--data", default=None, help="training data: DIR or s3://bucket/prefix")
    p.add_argument("--output", default=None, help="package DIR or s3://bucket/prefix")
    p.add_argument("--name", default=None, help="package name, the key of its tags in answers (default: the "
                   "output's last path component)")
    p.add_argument("--mode", choices=["auto", "head", "finetune"], default=None,
                   help="auto (default): the head, and a fine-tune too on large sets (200+ images per class), "
                   "packaging the better on validation; head: seconds on a CPU; finetune: the network on Ray Train, "
                   "compared with the head on the test split")
    p.add_argument("--val-data", default=None, help="validation folder (default: DATA/val, or a split of DATA)")
    p.add_argument("--feedback", default=None, metavar="SINK", help="/v1/feedback parts (the app's feedback.sink): "
                   "items with a readable image id and a known class are added to the training split")
    p.add_argument("--val-fraction", type=float, default=None, help="held out per class for validation "
                   "(default 0.2; 0.05-0.5)")
    p.add_argument("--feedback-index", default=None, metavar="INDEX", help="with --feedback: the index the service "
                   "searched (feedback ids are looked up among its ids, never opened as paths)")
    p.add_argument("--test-data", default=None, help="test folder (default: DATA/test, else half of the validation "
                   "folder, else a split of DATA)")
    p.add_argument("--test-fraction", type=float, default=None, help="held out per class for the test split, where "
                   "accuracy is reported (default 0.2; 0.05-0.5)")
    p.add_argument("--train-batch-size", type=int, default=None, help="images per step (default 32; 8-64)")
    p.add_argument("--epochs", type=int, default=None, help="default 10 (5-50)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3; 1e-4 to 5e-3)")
    p.add_argument("--dropout", type=float, default=None, help="before the classifier (default 0.2; 0.0-0.5)")
    p.add_argument("--label-smoothing", type=float, default=None, help="default 0.1 (0.0-0.3)")
    p.add_argument("--patience", type=int, default=None, help="early stopping: epochs without a better "
                   "validation top-1 (default 5; 0 = off)")
    p.add_argument("--recommended", action="store_true", help="choose epochs, lr and dropout from the dataset "
                   "size (explicit flags win)")
    p.add_argument("--dedup", action="store_true", help="remove training images that nearly duplicate a "
                   "validation image (default: report them)")
    p.add_argument("--dedup-threshold", type=float, default=None, help="near-duplicate cosine (default 0.97)")
    p.add_argument("--target-precision", type=float, default=None, help="per-class thresholds reach this "
                   "validation precision (default 0.9)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--overwrite", action="store_true", help="replace a package already at --output")
    p.add_argument("--id-column", default=None, help="Parquet input: id column (default id)")
    p.add_argument("--image-column", default=None, help="Parquet input: image column (default image)")
    p.add_argument("--label-column", default=None, help="Parquet input: label column (default label)")
    g = p.add_argument_group("finetune")
    g.add_argument("--workers", type=int, default=None, help="Ray Train workers (default 1)")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    g.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs reserved per worker (default: the "
                   "cluster's CPUs less one, shared; the one left decodes and augments)")
    g.add_argument("--unfreeze", choices=["top", "all"], default=None, help="second phase: top blocks (default) "
                   "or the whole backbone")
    g.add_argument("--checkpoint-storage", default=None, metavar="PATH|s3://",
                   help="Ray Train checkpoints (shared storage on a multi-node cluster; default: a local temp dir)")
    g.add_argument("--max-failures", type=int, default=None, help="worker failures survived by resuming from the "
                   "last checkpoint (default 2); a failed job run again with the same --checkpoint-storage resumes "
                   "too")
    g.add_argument("--finetune-epochs", type=int, default=None, help="epochs of the whole network after its "
                   "classifier is trained on frozen features (default 5; 1-50)")
    g.add_argument("--backbone-lr-mult", type=float, default=None, help="the backbone learns at --lr x this "
                   "(default 0.1)")
    g = p.add_argument_group("MLflow")
    g.add_argument("--mlflow", nargs="?", const="", default=None, metavar="TRACKING_URI",
                   help="log the run to MLflow: settings, each epoch, metrics, the confusion matrix and the package "
                   "(default: MLFLOW_TRACKING_URI; e.g. --mlflow http://mlflow:5000)")
    g.add_argument("--mlflow-experiment", default=None, help="experiment (default lens-train)")
    g.add_argument("--mlflow-run-name", default=None, help="run name (default: the package's name and mode)")
    p.add_argument("--address", default=None, help="Ray cluster to run the embedding job and Ray Train on: auto, "
                   "ray://HOST:10001 or HOST:6379 (default: RAY_ADDRESS, else Lens's own local Ray)")
    add_model_args(p)
    p.set_defaults(func=cmd_train)

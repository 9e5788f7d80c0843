"""Examples in every ``--help``: a few complete command lines per command (shown under "examples:", and checked
by ``tests/test_cli.py`` to parse), and an example value for every flag that takes one.

Kept in one table, beside the parsers rather than inside them, so the examples of a command read as one list and
a new flag without an example fails the test instead of shipping bare.
"""

from __future__ import annotations

import argparse

__all__ = ["COMMAND_EXAMPLES", "FLAG_EXAMPLES", "add_examples", "leaf_parsers"]

#: command path -> complete command lines (each must parse)
COMMAND_EXAMPLES: dict[str, list[str]] = {
    "tag": ["lens tag photo.jpg", "lens tag --samples --top-k 3",
            "lens tag --model efficientnet_b3 --weights ./b3.safetensors --backend torch img/*.jpg"],
    "serve": ["lens serve", "lens serve --config infra/serve-cpu.yaml --port 8080",
              "lens serve --config infra/serve-gpu.yaml --address auto --proxy python"],
    "events": ["lens events", "lens events status", "lens events dlq list --limit 5"],
    "events run": ["lens events run", "lens events --config infra/events.yaml run --aws"],
    "events status": ["lens events status", "lens events --endpoint-url http://127.0.0.1:4566 status"],
    "events dlq": ["lens events dlq list --limit 20", "lens events dlq redrive"],
    "events backfill": ["lens events backfill s3://lens-images/", "lens events --config infra/events.yaml backfill "
                        "s3://my-images/2025/ --workers 8"],
    "embed": ["lens embed --input shards/ --output emb/",
              "lens embed --input s3://bucket/shards --output s3://bucket/emb --carry caption",
              "lens embed --input photos/ --output emb/ --gpus-per-worker 1 --address auto"],
    "shards": ["lens shards --input photos/ --output shards/",
               "lens shards --input s3://bucket/images --output s3://bucket/shards --ids uri --rows-per-shard 500"],
    "index build": ["lens index build --embeddings emb/ --output index/",
                    "lens index build --embeddings emb/ --embeddings s3://bucket/events/embeddings --output index/ "
                    "--index ivf-pq --target-recall 0.9",
                    "lens index build --embeddings s3://bucket/emb --output index/ --shards 4 --address auto"],
    "index search": ["lens index search --index index/ --image photo.jpg -k 5",
                     "lens index search --index index/ --id originals/coffee.png --param 32"],
    "index list": ["lens index list --index index/", "lens index list --index index/ --json"],
    "index show": ["lens index show --index index/", "lens index show --index index/ v-20261122T101500-ab12cd"],
    "index use": ["lens index use --index index/ v-20261122T101500-ab12cd"],
    "index prune": ["lens index prune --index index/ --keep 3"],
    "index delete": ["lens index delete --index index/ s3://photos/2024/a.jpg",
                     "lens index delete --index index/ --ids-file erasures.txt --reason 'request 1234'"],
    "index verify": ["lens index verify --index index/ --sample 200",
                     "lens index verify --embeddings s3://bucket/emb --sample 100 --seed 7"],
    "train": ["lens train --data my-classes/ --output heads/scenes",
              "lens train --data s3://bucket/labeled --output s3://bucket/models/ft --mode finetune --epochs 5",
              "lens train --data my-classes/ --output heads/v2 --feedback s3://bucket/feedback "
              "--feedback-index /data/index",
              "lens train --data my-classes/ --output s3://bucket/models/scenes --mlflow http://mlflow:5000"],
    "demo": ["lens demo", "lens demo --keep --port 8080", "lens demo --images 1000 --no-dashboard"],
    "drift profile": ["lens drift profile --embeddings emb/ --output ref.npz"],
    "drift report": ["lens drift report --reference emb/ --current s3://bucket/events/embeddings",
                     "lens drift report --reference ref.npz --current new-emb/ --plot drift.png --json"],
    "models package": ["lens models package --name lite0 --output pkg/lite0",
                       "lens models package --model efficientnet_b0 --weights b0.pth --name b0 --output pkg/b0"],
    "models push": ["lens models push pkg/b0 --registry s3://bucket/registry --why 'retrained on May data'",
                    "lens models push pkg/b0 --mlflow-model tagger --mlflow-alias champion"],
    "models list": ["lens models list --registry s3://bucket/registry", "lens models list b0"],
    "models show": ["lens models show b0@v3", "lens models show b0@stable"],
    "models verify": ["lens models verify b0@v3", "lens models verify 'b0@*'"],
    "models alias": ["lens models alias set b0 canary v4", "lens models alias clear b0 canary"],
    "models promote": ["lens models promote b0 v4 --why 'canary healthy for a day'"],
    "models rollback": ["lens models rollback b0 --why 'p95 doubled'"],
    "models rollout": ["lens models rollout start b0 v4 --steps 1,10,50,100 --bake-s 600",
                       "lens models rollout traffic b0 --weight 25", "lens models rollout status b0",
                       "lens models rollout abort b0 --why 'wrong labels'"],
    "models history": ["lens models history b0 --limit 20"],
    "models": ["lens models", "lens models list --registry models/"],
    "drift": ["lens drift report --reference emb/ --current new-emb/"],
    "index": ["lens index build --embeddings emb/ --output index/", "lens index list --index index/"],
}

#: flag -> an example value; "command path:flag" overrides it for one command
FLAG_EXAMPLES: dict[str, str] = {
    "--config": "infra/lens.yaml",
    "serve:--config": "infra/serve-cpu.yaml",
    "events:--config": "infra/events.yaml",
    "events run:--config": "infra/events.yaml",
    "--num-classes": "12",
    "--labels": "labels.txt",
    "--head": "s3://bucket/heads/scenes",
    "--host": "0.0.0.0",
    "--port": "8080",
    "--idle-timeout-s": "30",
    "--max-connections": "20000",
    "--admin-host": "0.0.0.0",
    "--metrics-port": "9090",
    "--moto-port": "4566",
    "--address": "auto or ray://head:10001",
    "--limit": "20",
    "embed:--input": "s3://bucket/shards",
    "embed:--output": "s3://bucket/emb",
    "--carry": "caption,url",
    "--files-per-shard": "500",
    "shards:--input": "s3://bucket/images",
    "shards:--output": "s3://bucket/shards",
    "--rows-per-shard": "500",
    "--max-shard-mb": "128",
    "--embeddings": "s3://bucket/emb",
    "index build:--output": "index/",
    "--target-recall": "0.9",
    "--shards": "4",
    "--seed": "7",
    "--index": "index/",
    "--image": "photo.jpg",
    "--id": "originals/coffee.png",
    "-k": "20",
    "--param": "32",
    "--weights": "./b3.safetensors or s3://bucket/b3.pth",
    "--data": "my-classes/ (one folder per class)",
    "train:--output": "heads/scenes",
    "--feedback": "s3://bucket/feedback",
    "--feedback-index": "/data/index",
    "--images": "1000",
    "--new-images": "24",
    "--workdir": "/tmp/lens-demo",
    "drift profile:--output": "ref.npz",
    "--components": "16",
    "--max-reference": "10000",
    "--reference": "emb/ or ref.npz",
    "--current": "s3://bucket/events/embeddings",
    "--window": "1000",
    "--alpha": "0.001",
    "--min-ks": "0.15",
    "--min-psi": "0.2",
    "--plot": "drift.png",
    "--name": "b0-products",
    "models package:--output": "pkg/b0",
    "--why": "'canary p95 doubled'",
    "--by": "alice",
    "--bake-s": "600",
    "--weight": "25",
    "--registry": "s3://bucket/registry",
    "--steps": "1,10,50,100",
}


def leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for every command and subcommand under ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield " ".join((*path, name)), sub
                yield from leaf_parsers(sub, (*path, name))


def _takes_value(action: argparse.Action) -> bool:
    return bool(action.option_strings) and action.nargs != 0 and not isinstance(action, argparse._HelpAction)


def add_examples(parser: argparse.ArgumentParser) -> None:
    """Append each flag's example value to its help, and each command's examples to its epilog."""
    for path, sub in leaf_parsers(parser):
        lines = COMMAND_EXAMPLES.get(path)
        if lines:
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
            sub.epilog = "examples:\n" + "\n".join(f"  {line}" for line in lines)
        for action in sub._actions:
            if not _takes_value(action) or action.choices:
                continue
            flag = action.option_strings[0]
            example = FLAG_EXAMPLES.get(f"{path}:{flag}") or FLAG_EXAMPLES.get(flag)
            if example and "e.g." not in (action.help or ""):
                action.help = f"{action.help or ''} (e.g. {example})".strip()

"""``lens models ...``: the model registry from the command line (push, list, show, verify, aliases, promote,
rollback, rollouts, history) and ``lens models package`` (a base model as a versionable package)."""

from __future__ import annotations

import argparse
import json
import time

from lens.cli.args import add_model_args, configs_from_args

from lens.errors import ConfigError
from lens.identity import identity_of
from lens.registry.store import Registry, default_registry, parse_model_ref

__all__ = ["add_parsers", "run"]


def _registry(args) -> Registry:
    root = args.registry or default_registry()
    if not root:
        raise ConfigError("no registry: pass --registry DIR|s3://bucket/prefix or set LENS_REGISTRY")
    return Registry(root)


def _print(args, obj, text: str) -> None:
    print(json.dumps(obj, indent=1, default=str) if args.json else text)


def _steps(value: str) -> tuple[float, ...]:
    if value.strip().lower() == "none":
        return ()
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"steps must be comma-separated percentages, got {value!r}") from None


def add_parsers(models: argparse.ArgumentParser) -> None:
    """Subcommands of ``lens models`` (which, without one, lists the supported architectures)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None, help="registry root: DIR or s3://bucket/prefix "
                        "(default $LENS_REGISTRY)")
    common.add_argument("--json", action="store_true", help="print JSON")
    common.add_argument("--why", default=None, help="reason recorded in the registry history")
    common.add_argument("--by", default=None, help="who (default user@host), recorded in the history")
    sub = models.add_subparsers(dest="models_command", metavar="{package,push,list,show,verify,alias,promote,"
                                "rollback,rollout,history}")

    p = sub.add_parser("package", help="write a `model` package from weights (default: the embedded Lite0)",
                       description="Example: lens models package --name tagger --output pkg/")
    add_model_args(p)
    p.add_argument("--name", required=True, help="the package's model name (its name in the registry)")
    p.add_argument("--output", required=True, help="package directory or s3:// prefix to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package at --output")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("push", parents=[common], help="copy a verified package in as a new immutable version",
                       description="Example: lens models push out/pets-head --registry models/")
    p.add_argument("package", help="package directory or s3:// prefix (lens train / lens models package)")
    p.add_argument("--name", default=None, help="model name in the registry (default: the package's name)")
    p.add_argument("--version", default=None, help="version name (default: v1, v2, ...)")
    p.add_argument("--mlflow-model", default=None, metavar="NAME", help="also (or, without a Lens registry, only) "
                   "register the package as a new version of this MLflow model (served as models:/NAME@ALIAS; e.g. tagger)")
    p.add_argument("--mlflow-alias", default=None, metavar="ALIAS", help="point this MLflow alias at the new "
                   "version (e.g. champion; default: none moves)")
    p.add_argument("--mlflow", default=None, metavar="TRACKING_URI", help="MLflow server (default "
                   "MLFLOW_TRACKING_URI)")
    p.add_argument("--mlflow-experiment", default="lens-models", help="experiment of the run that holds the "
                   "package's files (default lens-models)")

    p = sub.add_parser("list", parents=[common], help="models, their versions and aliases")
    p.add_argument("name", nargs="?", default=None, help="one model only")

    p = sub.add_parser("show", parents=[common], help="one version's manifest summary (NAME[@ALIAS|VERSION])")
    p.add_argument("ref", help="NAME (its stable alias) or NAME@ALIAS_OR_VERSION")

    p = sub.add_parser("verify", parents=[common], help="re-check every file of a version against its SHA-256")
    p.add_argument("ref", help="NAME[@ALIAS_OR_VERSION], or NAME@* for every version")

    p = sub.add_parser("alias", parents=[common], help="point an alias at a version, or clear it")
    p.add_argument("action", choices=["set", "clear"])
    p.add_argument("name", help="model name")
    p.add_argument("alias", help="alias (stable, canary or any name)")
    p.add_argument("version", nargs="?", default=None, help="version (for set)")

    p = sub.add_parser("promote", parents=[common], help="stable := the canary (or VERSION); ends a rollout")
    p.add_argument("name")
    p.add_argument("version", nargs="?", default=None)

    p = sub.add_parser("rollback", parents=[common],
                       help="drop a live canary; with none, return stable to its previous version")
    p.add_argument("name")

    p = sub.add_parser("rollout", parents=[common], help="start, steer, inspect or abort a canary rollout",
                       description="Example: lens models rollout start tagger v2 --steps 5,25,50,100 --bake-s 300 "
                       "--shadow 0.1")
    p.add_argument("action", choices=["start", "traffic", "status", "abort"])
    p.add_argument("name")
    p.add_argument("version", nargs="?", default=None, help="the candidate (start)")
    p.add_argument("--steps", type=_steps, default=(5.0, 25.0, 50.0, 100.0),
                   help="canary percentages, each held --bake-s; a last step of 100 promotes automatically "
                   "(default 5,25,50,100; 'none' with --weight for a manual canary)")
    p.add_argument("--bake-s", type=float, default=300.0, help="seconds each step must stay healthy (300)")
    p.add_argument("--weight", type=float, default=None, help="canary percent now (traffic; or start without "
                   "steps)")
    p.add_argument("--shadow", type=float, default=None, help="share 0..1 of requests mirrored to the other version "
                   "and compared (start default 0)")

    p = sub.add_parser("history", parents=[common], help="every registry change of a model, oldest first")
    p.add_argument("name")
    p.add_argument("--limit", type=int, default=50, help="most recent entries shown (default 50)")


def _push(args) -> int:
    """Into the Lens registry (``--registry``/``LENS_REGISTRY``), into MLflow's (``--mlflow-model``), or both."""
    if args.mlflow_alias and not args.mlflow_model:
        raise ConfigError("--mlflow-alias needs --mlflow-model NAME")
    if not args.mlflow_model or args.registry or default_registry():
        v = _registry(args).push(args.package, name=args.name, version=args.version, by=args.by, why=args.why)
        _print(args, {"name": v.name, "version": v.version, "uri": v.uri, "sha256": v.sha256},
               f"pushed {v.label} ({v.uri}, manifest sha256 {v.sha256[:12]}...)")
    if args.mlflow_model:
        from lens.registry.mlflow import register_package

        out = register_package(args.package, args.mlflow_model, alias=args.mlflow_alias,
                               experiment=args.mlflow_experiment, tracking_uri=args.mlflow, description=args.why)
        _print(args, {"mlflow": out}, f"registered in MLflow as {args.mlflow_model} version {out['version']} "
               f"({out['uri']}; run {out['run_id']}, manifest sha256 {out['sha256'][:12]}...)")
    return 0


def run(args) -> int:
    cmd = args.models_command
    if cmd == "package":
        from lens.registry.modelpack import package_model

        model_cfg, _ = configs_from_args(args)
        where = package_model(model_cfg, args.output, name=args.name, overwrite=args.overwrite)
        _print(args, {"package": where}, f"model package written to {where}")
        return 0
    if cmd == "push":
        return _push(args)
    reg = _registry(args)
    who = {"by": args.by, "why": args.why}
    if cmd == "list":
        names = [args.name] if args.name else reg.names()
        out = {n: {"versions": reg.versions(n), "aliases": {a: p["version"] for a, p in reg.aliases(n).items()}}
               for n in names}
        lines = []
        for n, d in out.items():
            aliases = ", ".join(f"{a} -> {v}" for a, v in sorted(d["aliases"].items())) or "no aliases"
            lines.append(f"{n}: {', '.join(d['versions']) or 'no versions'} ({aliases})")
        _print(args, out, "\n".join(lines) or f"no models in {reg.root}")
    elif cmd == "show":
        name, ref = parse_model_ref(args.ref)
        v = reg.resolve(name, ref)
        m = reg.manifest(name, v.version)
        aliases = [a for a, p in reg.aliases(name).items() if p["version"] == v.version]
        info = {"name": name, "version": v.version, "uri": v.uri, "sha256": v.sha256, "kind": m["kind"],
                "aliases": aliases, "model_identity": identity_of(m), "metrics": m.get("metrics"),
                "registry": m.get("registry"), "files": m.get("files")}
        ident = identity_of(m) or {}
        _print(args, info, f"{v.label} ({m['kind']}): {ident.get('model')} weights "
               f"{str(ident.get('weights_sha256'))[:12]}..., {len(m.get('files', {}))} files, aliases "
               f"{', '.join(aliases) or '-'}; pushed {m.get('registry', {}).get('pushed_at')} by "
               f"{m.get('registry', {}).get('pushed_by')}\n  {v.uri}")
    elif cmd == "verify":
        name, _, at = args.ref.partition("@")
        refs = reg.versions(name) if at == "*" else [parse_model_ref(args.ref)[1]]
        reports = [reg.verify(name, r) for r in refs]
        _print(args, reports, "\n".join(f"{name}@{r['version']}: ok, {r['files']} files match their SHA-256 "
                                        f"({r['seconds']}s)" for r in reports))
    elif cmd == "alias":
        if args.action == "set":
            if not args.version:
                raise ConfigError("alias set needs a VERSION")
            ptr = reg.set_alias(args.name, args.alias, args.version, **who)
            _print(args, ptr, f"{args.name}: {args.alias} -> {args.version}")
        else:
            reg.clear_alias(args.name, args.alias, **who)
            _print(args, {"cleared": args.alias}, f"{args.name}: {args.alias} cleared")
    elif cmd == "promote":
        ptr = reg.promote(args.name, args.version, **who)
        _print(args, ptr, f"{args.name}: stable -> {ptr['version']}")
    elif cmd == "rollback":
        ptr = reg.rollback(args.name, **who)
        _print(args, ptr, f"{args.name}: rolled back; stable -> {ptr.get('version')}")
    elif cmd == "rollout":
        _rollout(args, reg, who)
    elif cmd == "history":
        events = reg.history(args.name)[-args.limit:]
        _print(args, events, "\n".join(
            f"{e['at']} {e['action']:16} {e.get('alias') or ''} {e.get('version') or ''} by {e['by']}"
            + (f": {e['why']}" if e.get("why") else "") for e in events))
    return 0


def _rollout(args, reg: Registry, who: dict) -> None:
    if args.action == "start":
        if not args.version:
            raise ConfigError("rollout start needs the candidate VERSION")
        state = reg.start_rollout(args.name, args.version, steps=args.steps, bake_s=args.bake_s,
                                  shadow=args.shadow or 0.0, weight=args.weight, **who)
        _print(args, state, f"{args.name}: canary {args.version} at {state['weight']:g}% (steps "
               f"{', '.join(f'{s:g}' for s in state['steps']) or 'manual'}, bake {state['bake_s']:g}s, shadow "
               f"{state['shadow']:g})")
    elif args.action == "traffic":
        state = reg.set_traffic(args.name, weight=args.weight, shadow=args.shadow, **who)
        _print(args, state, f"{args.name}: canary {state['canary']} at {state['weight']:g}%, shadow "
               f"{state['shadow']:g}")
    elif args.action == "status":
        state = reg.rollout(args.name) or {"status": "none"}
        routing = reg.routing(args.name)
        since = time.time() - state.get("step_started", time.time())
        _print(args, state | {"routing": routing},
               f"{args.name}: {state['status']}; stable {routing['stable']}, canary {routing['canary'] or '-'} at "
               f"{routing['weight']:g}% (shadow {routing['shadow']:g}), step {state.get('step', '-')} for "
               f"{since:.0f}s; last decision: {json.dumps((state.get('last_decision') or {}).get('reason'))}")
    else:
        ptr = reg.rollback(args.name, **who)
        _print(args, ptr, f"{args.name}: rollout aborted; stable {ptr.get('version')}")

"""``lens index build``, ``search``, ``delete``, ``verify``, and the versions: ``list``, ``show``, ``use``,
``prune``."""

from __future__ import annotations

import argparse
import json
import sys

from lens.errors import LensError, ModelMismatchError

__all__ = ["add_parsers"]


def cmd_build(args: argparse.Namespace) -> int:
    from lens.index.build import BuildConfig, build_index

    from lens.runtime.config import validate

    data = {"embeddings": args.embeddings, "output": args.output, "index": args.index,
            "target_recall": args.target_recall, "k": args.k, "seed": args.seed, "opq": args.opq,
            "refine": args.refine, "refine_k_factor": args.refine_k_factor, "prefer": args.prefer, "shards": args.shards,
            "address": args.address, "int8_compat": args.int8_compat, "weights": args.weights,
            "calibration": args.calibration, "int8_holdout": args.int8_holdout}
    if args.memory_budget is not None:
        data["memory_budget"] = args.memory_budget
    if args.queries is not None:
        data["queries"] = args.queries
    cfg = validate(BuildConfig, data, where="command line")
    manifest = build_index(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    manifest = {k: v for k, v in manifest.items() if k != "recall"} | {
        "recall": {k: v for k, v in manifest["recall"].items() if k != "curve"}}
    print(json.dumps(manifest))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from lens.index.filters import parse_filter
    from lens.index.search import SearchService

    parse_filter(args.filter)  # checked before a model loads (as the HTTP API does); the searcher reads it again
    svc = SearchService(args.index)
    if args.id is not None:
        name, hits = svc.search_id(args.id, args.k, param=args.param, filter=args.filter)
    else:
        from lens.runtime.loading import config_for_identity, served_line
        from lens.runtime.predictor import Predictor

        # embed with the index's own model, backend and precision (not what auto would pick on this host); the
        # check below still refuses a mismatch (e.g. other weights given)
        int8 = {k: v for k, v in (("calibration", args.calibration), ("int8_holdout", args.int8_holdout)) if v}
        predictor = Predictor.from_config(config_for_identity(svc.identity, weights=args.weights, **int8))
        try:
            svc.check_model(predictor.info())
        except ModelMismatchError as e:
            if svc.identity.precision == "int8" and not args.calibration:
                raise ModelMismatchError(f"{e}; an index of int8 rows quantized with your own calibration set is "
                                         "searched with --calibration DIR (the same images)") from e
            raise
        query = predictor.identity()
        print(f"lens index search: query embedded with {query.model} on {served_line(predictor.model.served())}",
              file=sys.stderr)
        if (query.backend, query.precision) != (svc.identity.backend, svc.identity.precision) \
                and svc.identity.backend is not None:
            print(f"lens index search: warning: the index was embedded with {svc.identity.backend} "
                  f"{svc.identity.precision}; this host runs {query.backend} {query.precision}", file=sys.stderr)
        limit = predictor.preprocessor.limits.max_bytes
        try:
            with open(args.image, "rb") as f:
                data = f.read(limit + 1)  # one byte over is enough to reject it as too large
        except OSError as e:
            raise LensError(f"cannot read {args.image}: {e.strerror or e}", code="unreadable") from e
        (result,) = predictor.predict([data])
        if not result.ok:
            raise LensError(f"{args.image}: {result.message}", code=result.code)
        name, (hits,) = svc.search(result.embedding[None], args.k, param=args.param, filter=args.filter)
    print(json.dumps({"index_version": name, "results": [h.to_dict() for h in hits]}))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from lens.index.verify import verify_embeddings, verify_index

    if args.sample < 1:
        raise LensError(f"--sample must be at least 1, got {args.sample}", code="usage")
    log = lambda m: print(f"lens index verify: {m}", file=sys.stderr, flush=True)  # noqa: E731
    model = {"weights": args.weights} if args.weights else {}
    if args.index:
        report = verify_index(args.index, args.sample, seed=args.seed, log=log, **model)
    else:
        report = verify_embeddings(args.embeddings, args.sample, seed=args.seed, log=log, **model)
    for row in report.disagree:
        log(f"DISAGREES: {row['id']} (cosine {row['cosine']:.4f})")
    for row in report.unverifiable[:20]:
        log(f"not checked: {row['id']}: {row['reason']}")
    log(f"{report.checked} row(s) re-embedded, {len(report.disagree)} disagree, {len(report.unverifiable)} not "
        f"checked; min cosine {report.min_cosine}")
    print(json.dumps(report.to_dict()))
    if report.checked == 0:
        return 2
    return 0 if report.ok else 1


def cmd_delete(args: argparse.Namespace) -> int:
    """Erase ids from an index: a tombstone part under INDEX/tombstones/ (lens.tombstones) that every searcher of the
    index reads within its refresh_s and every later build of it drops."""
    from pathlib import Path

    from lens.index.store import current_version
    from lens.tombstones import TOMBSTONES_DIR, write_tombstones

    ids = list(args.ids)
    if args.ids_file:
        try:
            text = sys.stdin.read() if args.ids_file == "-" else Path(args.ids_file).read_text()
        except OSError as e:
            raise LensError(f"cannot read --ids-file {args.ids_file}: {e.strerror or e}", code="usage") from e
        ids += [line.strip() for line in text.splitlines() if line.strip()]
    ids = list(dict.fromkeys(i for i in ids if i.strip()))
    if not ids:
        raise LensError("no ids given: name them, or --ids-file FILE (one per line, - for stdin)", code="usage")
    if current_version(args.index) is None:
        raise LensError(f"{args.index} is not an index root (no CURRENT): lens index delete erases ids from the "
                        "index lens index build wrote there", code="usage")
    uri = write_tombstones(f"{args.index.rstrip('/')}/{TOMBSTONES_DIR}", ids, source="lens index delete",
                           reason=args.reason)
    print(json.dumps({"deleted": len(ids), "tombstones": uri}))
    print(f"lens index delete: {len(ids)} id(s) erased; searchers of {args.index} stop returning them within their "
          "refresh_s, and every later build drops them", file=sys.stderr)
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    from lens.index.store import list_versions, load_version, prune_versions, use_version

    if args.index_command == "list":
        rows = list_versions(args.index)
        if args.json:
            print(json.dumps(rows))
            return 0
        for r in rows:
            print(f"{'*' if r['current'] else ' '} {r['version']}  {r['created_at']}  {r['count']:>10,} vectors  "
                  f"{r['type']:<8}  recall {r['recall']}  {r['bytes'] / 1e6:,.1f} MB  {r['model']}"
                  + (f"  {r['shards']} shards" if r.get("shards", 1) > 1 else "")
                  + (f" ({r['model_version']})" if r["model_version"] else ""))
        if not rows:
            print(f"no versions in {args.index}", file=sys.stderr)
        return 0
    if args.index_command == "show":
        v = load_version(args.index if args.version is None else f"{args.index.rstrip('/')}/{args.version}",
                         verify=True)
        print(json.dumps({"version": v.name, "path": str(v.path)} | {k: val for k, val in v.manifest.items()
                                                                      if k != "files"} | {"files": v.manifest["files"]},
                         indent=1))
        return 0
    if args.index_command == "use":
        use_version(args.index, args.version)
        print(f"{args.index}: CURRENT -> {args.version} (verified); a running searcher swaps within its refresh_s")
        return 0
    removed = prune_versions(args.index, args.keep)
    print(json.dumps({"removed": removed}))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("index", help="build or query a FAISS similarity index from embedding shards")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="SUBCOMMAND")
    b = isub.add_parser("build", help="build, tune and persist a new index version (made CURRENT)")
    b.add_argument("--embeddings", action="append", required=True, metavar="PATH|s3://",
                   help="a lens embed output (or event embedding parts); repeat to combine")
    b.add_argument("--output", required=True, help="index root directory")
    b.add_argument("--index", choices=["auto", "flat", "hnsw", "ivf-flat", "ivf-pq"], default="auto",
                   help="index type (default auto: Flat below 20k vectors, else IVF-Flat when the vectors fit "
                   "--memory-budget (or HNSW with --prefer hnsw), else IVF-PQ); the search parameter is then tuned on "
                   "held-out queries to --target-recall")
    b.add_argument("--prefer", choices=["ivf-flat", "hnsw"], default="ivf-flat",
                   help="auto, where full vectors fit: ivf-flat (default; measured faster at the same recall, "
                   "benchmarks/index.json) or hnsw")
    b.add_argument("--memory-budget", default=None, help="e.g. 4GB (default), 512MiB")
    b.add_argument("--target-recall", type=float, default=0.95, help="recall@k the tuned index must reach (default 0.95)")
    b.add_argument("-k", type=int, default=10, help="k of the recall target (default 10)")
    b.add_argument("--queries", type=int, default=None, help="held-out tuning queries (default 500)")
    b.add_argument("--opq", action="store_true", help="ivf-pq: learn an OPQ rotation (slow to train)")
    b.add_argument("--refine", choices=["auto", "none", "fp16", "sq8", "sq6", "sq4"], default="auto",
                   help="ivf-pq: re-rank PQ's candidates with finer codes held in memory beside them (default auto: the "
                   "finest that fits --memory-budget; none: PQ only)")
    b.add_argument("--refine-k-factor", type=int, default=16,
                   help="ivf-pq with re-ranking: candidates re-ranked per result (default 16)")
    b.add_argument("--seed", type=int, default=0, help="seed of the training sample and held-out queries (default 0)")
    b.add_argument("--shards", type=int, default=1, help="IVF shards sharing one coarse quantizer, filled in "
                   "parallel Ray tasks, searched as one (default 1)")
    b.add_argument("--address", default=None, help="Ray cluster for --shards (default: RAY_ADDRESS or a local Ray)")
    b.add_argument("--int8-compat", action="store_true", help="fp32 embeddings: also measure whether int8 queries "
                   "(an int8 replica's) may search this index, by the int8 model's accuracy gate, and record it "
                   "(default: not measured; the index refuses them with 409)")
    b.add_argument("--weights", default=None, help="--int8-compat: the rows' model weights (default: the "
                   "embedded ones)")
    b.add_argument("--calibration", default=None, help="--int8-compat: the int8 model's calibration images, as "
                   "model.calibration (default: the bundled set)")
    b.add_argument("--int8-holdout", default=None, help="--int8-compat: the gate's held-out images, as "
                   "model.int8_holdout (default: crops of photos that never chose the int8 recipe)")
    b.set_defaults(func=cmd_build)
    s = isub.add_parser("search", help="query an index locally, by image or by id")
    s.add_argument("--index", required=True, help="index root (CURRENT) or a version directory")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--image", help="an image file, embedded with the index's model")
    g.add_argument("--id", help="an id in the index")
    s.add_argument("-k", type=int, default=10, help="neighbours returned (default 10)")
    s.add_argument("--param", type=int, default=None, help="nprobe / efSearch for this query")
    s.add_argument("--weights", default=None, help="weights of the index's model when not the embedded ones")
    s.add_argument("--filter", default=None, metavar="JSON", help="only items the filter matches, selected inside "
                   'the search (e.g. \'{"tags": "tabby"}\'; the language: the search how-to\'s Filtered search)')
    s.add_argument("--calibration", default=None, metavar="DIR", help="an int8 index: the calibration images its "
                   "rows' model was quantized with, as model.calibration (default: the bundled set)")
    s.add_argument("--int8-holdout", default=None, metavar="DIR", help="an int8 index: the accuracy gate's held-out "
                   "images, as model.int8_holdout (default: crops of photos that never chose the int8 recipe)")
    s.set_defaults(func=cmd_search)
    lst = isub.add_parser("list", help="versions under an index root, * marks CURRENT",
                          description="Example: lens index list --index /data/index")
    lst.add_argument("--index", required=True, help="index root")
    lst.add_argument("--json", action="store_true", help="one JSON object per version instead of a table")
    lst.set_defaults(func=cmd_versions)
    sh = isub.add_parser("show", help="one version's manifest, every checksum verified (default: CURRENT)")
    sh.add_argument("--index", required=True, help="index root")
    sh.add_argument("version", nargs="?", default=None)
    sh.set_defaults(func=cmd_versions)
    us = isub.add_parser("use", help="make a version CURRENT (verified first): roll an index back or forward",
                         description="Example: lens index use --index /data/index v-20261122T080000-ab12cd")
    us.add_argument("--index", required=True, help="index root")
    us.add_argument("version")
    us.set_defaults(func=cmd_versions)
    pr = isub.add_parser("prune", help="delete all but the newest --keep versions (never CURRENT) and leftovers")
    pr.add_argument("--index", required=True, help="index root")
    pr.add_argument("--keep", type=int, default=3, help="versions kept (default 3)")
    pr.set_defaults(func=cmd_versions)
    de = isub.add_parser(
        "delete", help="erase ids from an index: searchers stop returning them, later builds drop them",
        description="Writes a tombstone for each id under INDEX/tombstones/. Every searcher of the index stops "
        "returning them (results, lookups, thumbnails) within its refresh_s, and every later lens index build "
        "into INDEX drops their rows and counts them (manifest: deleted_dropped). An erasure holds: a row of a "
        "deleted id never comes back, whatever is embedded later. Example: lens index delete --index /data/index "
        "s3://photos/2024/a.jpg; lens index delete --index /data/index --ids-file erasures.txt")
    de.add_argument("--index", required=True, help="index root")
    de.add_argument("ids", nargs="*", metavar="ID", help="ids to erase")
    de.add_argument("--ids-file", default=None, metavar="FILE", help="one id per line, - for stdin (default: only "
                    "the ids named)")
    de.add_argument("--reason", default=None, help="recorded with the tombstones, e.g. a ticket or request id "
                    "(default: none)")
    de.set_defaults(func=cmd_delete)
    ve = isub.add_parser(
        "verify", help="re-embed a sample of stored rows from their source images; exit 1 if any disagree",
        description="Re-embeds --sample seeded random rows of an index (or of an embeddings folder) from their "
        "source images, with the model, backend and precision the rows record, and lists the rows whose stored "
        "vector disagrees (cosine < 0.999). Exit 0: all agree; 1: some disagree (rebuild them); 2: nothing could "
        "be checked. For CI or cron.")
    g = ve.add_mutually_exclusive_group(required=True)
    g.add_argument("--index", help="index root (its CURRENT version) or a version directory")
    g.add_argument("--embeddings", metavar="PATH|s3://", help="a lens embed output or event embedding parts")
    ve.add_argument("--sample", type=int, default=100, help="rows re-embedded (default 100)")
    ve.add_argument("--seed", type=int, default=0, help="which rows (default 0)")
    ve.add_argument("--weights", default=None, help="weights of the rows' model when not the embedded ones")
    ve.set_defaults(func=cmd_verify)

"""``lens drift profile`` (a reference profile from any embeddings) and ``lens drift report`` (two embedding sets
compared offline, the same test the replicas run online, with a plot)."""

from __future__ import annotations

import argparse
import json

import numpy as np

from lens.errors import ConfigError
from lens.identity import ModelIdentity
from lens.quality.drift import PROFILE_FILE, Profile, compare, profile_of, sample_embeddings

__all__ = ["add_parsers", "run"]


def add_parsers(sub) -> None:
    d = sub.add_parser("drift", help="reference profiles and offline drift reports",
                       description="Example: lens drift report --reference emb/ --current events/embeddings/ "
                       "--plot drift.png")
    dsub = d.add_subparsers(dest="drift_command", required=True)
    p = dsub.add_parser("profile", help="fit a reference profile on embeddings (lens embed output or parts)")
    p.add_argument("--embeddings", nargs="+", required=True, help="embedding locations (local or s3://)")
    p.add_argument("--output", required=True, help=f"profile file to write (or a directory: {PROFILE_FILE} in it)")
    p.add_argument("--components", type=int, default=32, help="PCA dimensions (32)")
    p.add_argument("--max-reference", type=int, default=5000, help="reference rows kept (5000, seeded sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference sample (default 0)")
    p = dsub.add_parser("report", help="test current embeddings against a reference (profile or embeddings)")
    p.add_argument("--reference", required=True, help="a drift profile, or embeddings to profile")
    p.add_argument("--current", required=True, help="embeddings to test")
    p.add_argument("--window", type=int, default=1000, help="current rows tested (a seeded sample; 500-1,000 "
                   "keeps the test about shifts that matter)")
    p.add_argument("--alpha", type=float, default=0.01, help="significance level (default 0.01)")
    p.add_argument("--min-ks", type=float, default=0.1, help="effect-size floor: largest KS distance (default 0.1)")
    p.add_argument("--min-psi", type=float, default=0.1, help="effect-size floor: PSI of the top-1 classes (default 0.1)")
    p.add_argument("--plot", default=None, help="PNG: the two samples on the first PCA components, and the "
                   "per-component KS distances")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults()


def _reference(uri: str) -> Profile:
    try:
        return Profile.load(uri)
    except ValueError:
        return profile_of(uri)


def run(args: argparse.Namespace) -> int:
    if args.drift_command == "profile":
        prof = profile_of(args.embeddings, max_rows=args.max_reference, seed=args.seed, components=args.components)
        out = args.output if args.output.endswith(".npz") else args.output.rstrip("/") + "/" + PROFILE_FILE
        where = prof.save(out)
        print(json.dumps({"profile": where} | prof.meta))
        return 0
    ref = _reference(args.reference)
    vecs, labels, identity = sample_embeddings(args.current, max_rows=args.window, seed=1)
    if ref.identity and identity:
        diff = ModelIdentity.from_dict(ref.identity).mismatch(ModelIdentity.from_dict(identity))
        if diff:
            raise ConfigError(f"the reference and the current embeddings come from different models (differ in "
                              f"{', '.join(diff)}): a drift test between them says nothing about the inputs")
    proj = ref.project(vecs)
    res = compare(ref, proj, labels or None, alpha=args.alpha, min_ks=args.min_ks, min_psi=args.min_psi)
    out = res.to_dict() | {"reference": args.reference, "current": args.current}
    if args.plot:
        _plot(ref, proj, res, args.plot)
        out["plot"] = args.plot
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        verdict = "DRIFT" if res.drift else "no drift"
        print(f"{verdict}: p {res.p_value:.3g} (embeddings {res.p_embedding:.3g}, classes {res.p_classes:.3g}); "
              f"largest KS distance {res.ks_max:.3f} (component {res.components[0][0]}), class PSI {res.psi:.3f}; "
              f"{res.window} current rows vs {len(ref.reference)} reference rows"
              + (f"; plot {args.plot}" if args.plot else ""))
    return 0


def _plot(ref: Profile, proj: np.ndarray, res, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'lens-vision[plots]' (or matplotlib)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.scatter(ref.reference[:, 0], ref.reference[:, 1], s=3, alpha=0.4, label="reference")
    a.scatter(proj[:, 0], proj[:, 1], s=3, alpha=0.4, label="current")
    a.set(xlabel="PC 1", ylabel="PC 2", title="Embeddings on the reference's first components")
    a.legend()
    k = ref.reference.shape[1]
    from lens.quality.drift import ks_2samp

    ds = [ks_2samp(ref.reference[:, j], proj[:, j])[0] for j in range(k)]
    b.bar(range(k), ds)
    b.set(xlabel="PCA component", ylabel="KS distance", title=f"{'drift' if res.drift else 'no drift'}: p "
          f"{res.p_value:.2g}, class PSI {res.psi:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)

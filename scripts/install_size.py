#!/usr/bin/env python
"""What each way of installing Lens puts in site-packages, in MB: the core (``pip install lens-vision``) and the
core with each extra, measured on the installed files of this environment's distributions (each requirement's
dependency closure, markers evaluated; a distribution counted once).

    python scripts/install_size.py        # prints the JSON, writes benchmarks/install.json

torch's CUDA build (what plain ``pip install torch`` brings, with its nvidia-* wheels) is most of every figure;
the ``largest`` list says so.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def _size(dist: metadata.Distribution) -> int:
    total = 0
    for f in dist.files or ():
        try:
            total += f.locate().stat().st_size
        except OSError:
            pass
    return total


def closure(requirements: list[str], project: str) -> dict[str, int]:
    """Installed distribution name -> bytes, for ``requirements`` and everything they require (each requested
    extra of each distribution expanded once)."""
    seen: dict[str, int] = {}
    expanded: set[tuple[str, str]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement this environment does not have
        key = canonicalize_name(dist.metadata["Name"])
        if key == canonicalize_name(project):
            continue  # the project's own extras are expanded by expand()
        seen.setdefault(key, _size(dist))
        for extra in ["", *sorted(req.extras)]:
            if (key, extra) in expanded:
                continue
            expanded.add((key, extra))
            for r in dist.requires or ():
                sub = Requirement(r)
                if (sub.marker is None and not extra) or (sub.marker is not None
                                                          and sub.marker.evaluate({"extra": extra})):
                    todo.append(sub)
    return seen


def expand(project: dict, extras: list[str]) -> list[str]:
    """The core dependencies plus each extra's, the project's self-references expanded."""
    out = list(project["dependencies"])
    todo, done = list(extras), set()
    while todo:
        e = todo.pop()
        if e in done:
            continue
        done.add(e)
        for r in project["optional-dependencies"][e]:
            req = Requirement(r)
            if canonicalize_name(req.name) == canonicalize_name(project["name"]):
                todo += list(req.extras)
            else:
                out.append(r)
    return out


def main() -> int:
    from machine import describe

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = closure(expand(project, []), project["name"])
    mb = lambda d: round(sum(d.values()) / 2**20, 1)  # noqa: E731
    out = {"machine": describe(), "distribution": project["name"]}
    out["core"] = {"mb": mb(core), "distributions": len(core),
                   "largest": [{"name": n, "mb": round(b / 2**20, 1)}
                               for n, b in sorted(core.items(), key=lambda kv: -kv[1])[:8]],
                   "without_torch_and_cuda_mb": mb({n: b for n, b in core.items()
                                                    if not (n.startswith("nvidia-") or n in ("torch", "triton"))})}
    # NNCF was a core dependency before it moved to the int8 extra: the core as it was, for the record
    before = closure(expand(project, []) + ["nncf>=2.13"], project["name"])
    out["core_with_nncf_before_mb"] = mb(before)
    out["extras"] = {}
    for extra in sorted(project["optional-dependencies"]):
        with_extra = closure(expand(project, [extra]), project["name"])
        added = {n: b for n, b in with_extra.items() if n not in core}
        out["extras"][extra] = {"mb": mb(with_extra), "adds_mb": mb(added),
                                "adds": sorted(added, key=lambda n: -added[n])[:10]}
    (ROOT / "benchmarks" / "install.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Lens's layers, read from the import graph of the source tree. Every import counts, module-level or inside a
function.

One import package, ``lens``; each top-level folder installs beneath it (``serve/`` as ``lens.serve`` ...) and is
one layer, or, in ``lens/``, one sub-package is one layer. From the bottom:

- ``core`` (``lens/`` root: errors, identity, storage, packages, the Ray start, fault points) imports no other layer;
- ``runtime`` (``lens.runtime``: decode, preprocess, backends, the predictor) builds on it, and beside it
  ``quality`` (``lens.quality``: drift, feedback) and ``client`` (``lens.client``: the HTTP client);
- ``registry`` (``lens.registry``: versions, aliases, base-model packages) on the runtime;
- ``batch`` and ``index`` beside each other on the runtime (both write drift profiles); ``serve`` above them
  (search uses ``index``, rollouts the registry), its event path ``serve.events`` above it (the Lambda handler
  calls the service through the client); ``train`` on ``batch`` and ``index``;
- ``cli`` (``lens.cli``: the command line and the demo) alone on top, the only code that imports every layer.

No import circles between modules, and no ``_private`` name imported from another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package it installs as (pyproject's package-dir)
FOLDERS = {"lens": "lens", "batch": "lens.batch", "index": "lens.index", "serve": "lens.serve", "train": "lens.train",
           "cli": "lens.cli"}
LAYER_FOLDERS = ("batch", "index", "serve", "train", "cli")

# layer -> the layers it may import (itself included)
ALLOWED = {
    "core": {"core"},
    "runtime": {"core", "runtime"},
    "registry": {"core", "runtime", "registry"},
    "quality": {"core", "quality"},
    "client": {"core", "client"},
    "batch": {"core", "runtime", "quality", "batch"},
    "index": {"core", "runtime", "quality", "index"},
    "serve": {"core", "runtime", "registry", "quality", "index", "serve"},
    "events": {"core", "runtime", "client", "serve", "events"},
    "train": {"core", "runtime", "registry", "quality", "batch", "index", "train"},
    "cli": set(),  # filled below: every layer
}
ALLOWED["cli"] = set(ALLOWED)
#: the order of the top-level folders, bottom first: an import from a folder to one above it runs back up
FOLDER_ORDER = ("lens", "batch", "index", "serve", "train", "cli")


def layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "lens" and len(parts) > 1 and parts[1] in LAYER_FOLDERS:
        parts = parts[1:]  # lens.serve.x reads as serve.x
    elif parts[0] == "lens":
        return {"runtime": "runtime", "registry": "registry", "quality": "quality", "client": "client",
                "app": "cli"}.get(parts[1] if len(parts) > 1 else "", "core")
    if parts[0] not in LAYER_FOLDERS:
        return None  # a third-party or standard module
    if parts[:2] == ["serve", "events"]:
        return "events"
    return parts[0]


def folder(module: str) -> str | None:
    """The top-level folder that holds ``module`` (``lens.serve.run`` and an old-style ``serve.run`` alike)."""
    parts = module.split(".")
    if parts[0] == "lens":
        if len(parts) > 1 and parts[1] == "app":
            return "lens"  # the CLI when it lived inside lens/
        return parts[1] if len(parts) > 1 and parts[1] in LAYER_FOLDERS else "lens"
    return parts[0] if parts[0] in LAYER_FOLDERS else None


def module_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [*FOLDERS[rel.parts[0]].split("."), *rel.with_suffix("").parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, the names imported from it) for every import in ``path``, relative imports resolved; ``from X
    import Y`` where ``X.Y`` is a module counts as an import of ``X.Y``."""
    module = module_of(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            names = [a.name for a in node.names]
            subs = [n for n in names if f"{name}.{n}" in MODULES]
            out += [(f"{name}.{n}", []) for n in subs]
            out.append((name, [n for n in names if n not in subs]))
    return out


def sources() -> list[Path]:
    return sorted(p for top in FOLDERS if (ROOT / top).is_dir() for p in (ROOT / top).rglob("*.py"))


MODULES = {module_of(p) for p in sources()}


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_goes_down_the_layers(path):
    module = module_of(path)
    mine = layer(module)
    wrong = sorted({m for m, _ in imports(path) if layer(m) is not None and layer(m) not in ALLOWED[mine]})
    assert not wrong, f"{module} ({mine}) imports {wrong}"


def folder_arrows() -> set[tuple[str, str]]:
    return {(folder(module_of(p)), folder(m)) for p in sources() for m, _ in imports(p)
            if folder(m) is not None and folder(m) != folder(module_of(p))}


def test_no_arrow_runs_back_up_between_the_top_level_folders():
    up = sorted((a, b) for a, b in folder_arrows() if FOLDER_ORDER.index(b) > FOLDER_ORDER.index(a))
    assert not up, f"imports from a folder to one above it: {up}"


def module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for p in sources():
        me = module_of(p)
        for m, _ in imports(p):
            # importing lens.a.b runs lens/a/__init__ first: an edge to each package on the way
            parts = m.split(".")
            for k in range(1, len(parts) + 1):
                target = ".".join(parts[:k])
                if target in MODULES and target != me and not me.startswith(target + "."):
                    graph[me].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_between_modules():
    assert not cycles(module_graph())


def test_no_private_name_is_imported_from_another_module():
    private = sorted({f"{module_of(p)} imports {m}.{n}" for p in sources() for m, names in imports(p)
                      for n in names if n.startswith("_") and not n.startswith("__") and m in MODULES})
    assert not private, "\n".join(private)


def test_the_layer_rules_have_no_cycle():
    def reaches(a: str, b: str, seen=()) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in ALLOWED[a] - {a})

    assert not any(reaches(a, a) for a in ALLOWED if a != "cli") and not any("cli" in ALLOWED[a] for a in ALLOWED
                                                                            if a != "cli")


def test_the_checker_sees_violations():
    assert layer("lens.serve.run") == "serve" and layer("lens.cli.main") == "cli" and layer("numpy") is None
    assert layer("lens.runtime.predictor") == "runtime" and layer("lens.errors") == "core"
    assert layer("serve.events.app") == "events" and folder("lens.app.cli") == "lens" and folder("serve.run") == "serve"
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

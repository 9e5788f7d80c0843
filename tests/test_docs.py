"""The manual stays honest: its generated pages match the code, every ``lens ...`` command line in it parses with
the real CLI parser, every knob it names exists in the typed configs, every metric it names is exported, and
``mkdocs build --strict`` passes (no broken link or anchor)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from docs_reference import exported_metrics  # noqa: E402 - scripts/ is not a package

#: generated from the code, or quoting it: not checked again
GENERATED = {"cli.md", "http-api.md", "metrics.md", "performance.md"}
#: dotted names in backticks that look like knobs but are not (with why)
NOT_KNOBS = {"versions.refused": "a field of the /v1/models answer"}
#: lens_* names in the manual that are not metrics (with why)
NOT_METRICS = {"lens_model": "the Parquet schema key earlier versions wrote", "lens_version": "a manifest field",
               "lens_32": "a benchmark series (32 connections)"}
FILE_SUFFIXES = (".safetensors", ".json", ".yaml", ".yml", ".py", ".md", ".parquet", ".faiss", ".npz", ".html",
                 ".png", ".txt", ".jpg", ".pth")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def shell_lines(text: str):
    """Lines of the bash/sh/console code blocks, continuation lines joined."""
    lang, buf = None, ""
    for line in text.split("\n"):
        if line.startswith("```"):
            lang = line[3:].strip() if lang is None else None
            continue
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        line = f"{buf} {line.strip()}" if buf else line
        buf = ""
        if line.rstrip().endswith("\\"):
            buf = line.rstrip()[:-1]
            continue
        yield line


def lens_commands(text: str) -> list[str]:
    out = []
    for line in shell_lines(text):
        for seg in re.split(r"&&|\|\||;|\|", re.sub(r"^\s*\$ ", "", line)):
            seg = re.sub(r"^\s*(\.venv/bin/)?", "", seg)
            if seg.startswith("lens "):
                out.append(" ".join(re.sub(r"\s+#.*$", "", seg).split()))
    return out


def parse_error(command: str) -> str | None:
    from lens.cli.main import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as e:
        if e.code:
            return err.getvalue().strip().splitlines()[-1]
    return None


def test_the_reference_pages_are_generated_from_the_code():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "docs_reference.py"), "--check"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_every_lens_command_line_in_the_manual_parses():
    commands = [(p.name, c) for p in pages() if p.name not in GENERATED for c in lens_commands(p.read_text())]
    assert len(commands) >= 30  # the recipes, how-to guides and runbook
    bad = [(name, c, e) for name, c in commands if (e := parse_error(c))]
    assert not bad, "\n".join(map(str, bad))


def test_the_command_checker_sees_a_wrong_flag():
    assert lens_commands("```bash\nlens embed --input a \\\n  --output b   # x\n```") == ["lens embed --input a --output b"]
    assert parse_error("lens embed --input a --output b") is None
    assert "unrecognized arguments" in parse_error("lens embed --input a --output b --no-such-flag")


def knob_paths() -> set[tuple[str, ...]]:
    paths: set[tuple[str, ...]] = set()

    def walk(d, pre=()):
        if isinstance(d, dict):
            for k, v in d.items():
                paths.add((*pre, k))
                walk(v, (*pre, k))
        elif isinstance(d, list):
            for x in d:
                walk(x, pre)

    walk(yaml.safe_load((ROOT / "infra" / "lens.yaml").read_text()))
    return paths


def is_module(parts: tuple[str, ...]) -> bool:
    """A dotted module path (``serve.events.app``, as the upgrade notes name the old ones), not a knob."""
    folder = ROOT / parts[0] / Path(*parts[1:2])
    return folder.is_dir() or folder.with_suffix(".py").is_file()


def unknown_knobs(text: str, paths: set[tuple[str, ...]]) -> set[str]:
    sections = {p[-1] for p in paths if any(len(q) > len(p) and q[: len(p)] == p for q in paths)}
    out = set()
    for name in re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)`", text):
        parts = tuple(name.split("."))
        if parts[0] not in sections or name.endswith(FILE_SUFFIXES) or name in NOT_KNOBS or is_module(parts):
            continue
        if not any(p[-len(parts):] == parts for p in paths):
            out.add(name)
    return out


def test_every_knob_the_manual_names_exists():
    paths = knob_paths()
    bad = {(p.name, k) for p in pages() if p.name not in GENERATED for k in unknown_knobs(p.read_text(), paths)}
    assert not bad, sorted(bad)
    assert unknown_knobs("set `model.precision` and `embed.actor_threads`", paths) == set()
    assert unknown_knobs("set `model.precisoin`", paths) == {"model.precisoin"}


def unknown_metrics(text: str, exported: set[str]) -> set[str]:
    out = set()
    for name in re.findall(r"(?<![\w/.-])(?:ray_)?lens_[a-z0-9_]+", text):
        base = name.removeprefix("ray_")
        if base in exported or re.sub(r"_(bucket|count|sum)$", "", base) in exported or base in NOT_METRICS:
            continue
        out.add(name)
    return out


def test_every_metric_the_manual_names_is_exported():
    exported = set(exported_metrics())
    assert len(exported) >= 20
    bad = {(p.name, m) for p in pages() for m in unknown_metrics(p.read_text(), exported)}
    assert not bad, sorted(bad)
    assert unknown_metrics("`ray_lens_request_latency_ms_bucket` and `lens_requests_totl`", exported) == {
        "lens_requests_totl"}


@pytest.mark.slow
def test_the_manual_builds_strictly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

"""`lens demo`, the README's first command, end to end on a small seed (moto + local Ray + Serve)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_lens_demo_runs_every_step_and_prints_its_summary(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # the demo starts its own moto
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    p = subprocess.run([sys.executable, "-m", "lens.cli", "demo", "--images", "40", "--new-images", "3",
                        "--workdir", str(tmp_path / "demo"), "--port", "0"],
                       capture_output=True, text=True, env=env, timeout=540, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert s["seeded_images"] == 47 and s["embed"]["embedded"] == 47 and s["embed"]["errors"] == 0
    assert s["index"]["count"] == 47
    assert s["events"]["tagged"] == 3 and s["events"]["example_search_top1"]["id"].startswith("s3://lens-images/")
    assert s["examples"]["tag coffee.png"][0][0] == "espresso"
    assert "=== Lens demo: done" in p.stderr
    assert (tmp_path / "demo" / "index" / "CURRENT").is_file()

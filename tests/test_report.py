"""The published figures are the benchmark JSON's: README.md's Performance block, its unmet-target list and
benchmarks/REPORT.md are exactly what scripts/report.py generates from benchmarks/*.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_and_report_are_generated_from_the_benchmark_json():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_every_unmet_target_is_listed_in_the_readme_status():
    readme = (ROOT / "README.md").read_text()
    status = readme.split("<!-- targets:begin -->", 1)[1].split("<!-- targets:end -->", 1)[0]
    for path in sorted((ROOT / "benchmarks").glob("*.json")):
        for name, met in json.loads(path.read_text()).get("targets", {}).items():
            assert met or f"`{name}` ({path.name})" in status, (path.name, name)

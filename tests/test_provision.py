"""infra/provision_events.py against moto: creates what is missing, then changes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_provisioning_is_idempotent(tmp_path, moto_endpoint):
    doc = yaml.safe_load((ROOT / "infra" / "events.yaml").read_text())
    doc["applications"][1]["args"]["events"].update(bucket="prov-bucket", queue="prov-q", dlq="prov-dlq")
    cfg = tmp_path / "events.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "infra" / "provision_events.py"), "--config",
                                     str(cfg), *a], capture_output=True, text=True, timeout=120)
    first = run("--create-bucket")
    assert first.returncode == 0, first.stderr
    assert "created bucket prov-bucket" in first.stdout and "created queue prov-dlq" in first.stdout
    assert "added ObjectCreated and ObjectRemoved notifications s3://prov-bucket" in first.stdout
    second = run()
    assert second.returncode == 0 and second.stdout.strip() == "nothing to change"

"""scripts/gpu_check.py (the one-command GPU check) run on CPU: every stage's code runs in the suite, so the GPU
run, when a GPU is lent, runs nothing untested. The fine-tuning stage's own lines run here with ``run_train``
recording its config (for CUDA and for CPU); the fine-tuning it starts is ``lens train --mode finetune``, which
``tests/test_train.py`` runs for real on CPU (a killed and resumed run among them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_of_the_gpu_check_runs_on_cpu_and_writes_one_json(tmp_path, lens_cache):
    out = tmp_path / "gpu-check.json"
    stages = "environment,correctness,decode,embed,serve"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--quick",
                        "--stages", stages, "--out", str(out)], capture_output=True, text=True, timeout=540,
                       env=dict(os.environ, LENS_CACHE_DIR=str(lens_cache), RAY_DATA_DISABLE_PROGRESS_BARS="1"))
    assert out.is_file(), p.stderr[-3000:]
    report = json.loads(out.read_text())
    failed = {k: v.get("error") for k, v in report["stages"].items() if not v["ok"]}
    assert p.returncode == 0 and report["ok"] and not failed, (failed, p.stderr[-3000:])
    s = report["stages"]
    assert list(s) == stages.split(",")
    assert s["correctness"]["checks"]["threads_equal_sequential"] and s["correctness"]["top1_agreement_vs_onnx_fp32"] >= 0.9
    assert s["decode"]["device_images_per_s"] > 0 and s["decode"]["cpu_one_thread_images_per_s"] > 0
    assert s["embed"]["job"]["served"]["backend"] == "torch" and s["embed"]["pipelined_loop"]["ok"] == s["embed"]["rows"]
    assert s["serve"]["images"] > 0 and s["serve"]["max_batch_seen"] >= 1 and s["serve"]["by_connections"][0]["statuses"]["200"]


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_finetune_stage_asks_for_one_short_epoch_with_amp_on_the_gpu(tmp_path, monkeypatch, device):
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    import lens.train.job

    seen = []
    monkeypatch.setattr(lens.train.job, "run_train", lambda cfg, log: seen.append(cfg) or {"mode": cfg.mode})
    out = gpu_check.finetune(device, True, tmp_path)
    (cfg,) = seen
    assert cfg.mode == "finetune" and cfg.finetune_epochs == 1 and cfg.use_gpu is (device == "cuda")
    assert cfg.model.device == device and out["amp"] is (device == "cuda") and out["summary"] == {"mode": "finetune"}
    assert sorted(p.name for p in (tmp_path / "scenes" / "train").iterdir()) == ["cat", "coffee", "rocket"]

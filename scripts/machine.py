"""What every benchmark JSON records about where and what it measured: the machine (CPUs, CPU model and the
vector/matrix instruction sets that decide int8 speed), and the commit of the code it ran (``dirty`` when the
working tree had uncommitted changes)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["describe"]


def describe(**extra) -> dict:
    from lens.runtime.openvino import cpu_flags

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            return ""

    model = ""
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "cpu_flags": cpu_flags(), "platform": platform.platform(),
            "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))
            } | extra

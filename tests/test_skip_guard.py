"""The skip guard (conftest.py) fails a run on any skip the README does not allow, at run time and at collection."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _run(tmp_path, source: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_throwaway.py").write_text(source)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           str(tmp_path / "test_throwaway.py")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(TESTS)})


def test_a_module_skipped_at_collection_fails_the_run(tmp_path):
    r = _run(tmp_path, 'import pytest\npytest.importorskip("no_such_module_for_lens")\n\n'
                       'def test_never():\n    assert True\n')
    assert r.returncode == 1 and "skipped without a reason the README allows" in r.stdout, r.stdout[-2000:]


def test_a_test_skipped_at_run_time_fails_the_run_and_a_pass_passes(tmp_path):
    r = _run(tmp_path, 'import pytest\n\ndef test_skips():\n    pytest.skip("not here")\n')
    assert r.returncode == 1 and "skipped without a reason the README allows" in r.stdout, r.stdout[-2000:]
    assert _run(tmp_path, "def test_ok():\n    assert True\n").returncode == 0

"""Lens runs in its own Ray unless told an address: with someone else's ``ray start --head`` on the host (the
``foreign_ray`` fixture), a command that starts Ray runs on a private local instance and leaves no driver in the
foreign cluster; ``--address auto`` joins it. Commands run from a working folder with relative paths, as a user
types them.

Every command that starts Ray is checked against the foreign cluster: ``lens shards`` and ``lens index build
--shards`` here; ``lens embed`` in tests/test_batch.py (the resume test), ``lens train`` in tests/test_train.py
(the fine-tune test: its embedding step starts Ray as a head run does, then Ray Train runs on it), ``lens serve``
in tests/test_serve_cli.py, ``lens events run`` in tests/test_events_cli.py and ``lens demo`` in
tests/test_demo.py. tests/test_layers.py checks that no
other module calls ``ray.init`` (every command goes through :func:`lens.cluster.init_ray`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import own_instance, ray_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "test_efficientnet", "--weights", "random", "--backend", "onnx"]


def lens(*args, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                                                                           "PYTHONPATH": str(ROOT)} | (env or {})
    return subprocess.run([sys.executable, "-m", "lens.cli.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=environ)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A working folder with photos in it: every command below gets relative paths."""
    from lens.runtime.samples import scene_dataset

    root = tmp_path_factory.mktemp("own-ray")
    scene_dataset(root / "data", train_per_class=6, val_per_class=2, seed=2,
                  scenes={"chelsea.png": "cat", "coffee.png": "coffee", "rocket.jpg": "rocket"})
    return root


def test_shards_and_a_sharded_index_build_run_on_their_own_ray(foreign_ray, work):
    r = lens("shards", "--input", "data", "--output", "shards", "--rows-per-shard", "10", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    own_instance(r.stderr, "lens shards")
    assert sorted(p.name for p in (work / "shards").glob("*.parquet")) == [f"part-{i:05d}.parquet" for i in range(3)]
    # a sharded build needs enough vectors to train IVF: seeded clustered vectors in the layout lens embed writes
    from test_index import clustered, write_part

    x = clustered(2000, 32, seed=4)
    write_part(work / "vectors" / "part-0.parquet", [f"v{i}" for i in range(len(x))], x)
    r = lens("index", "build", "--embeddings", "vectors", "--output", "idx", "--index", "ivf-flat", "--shards", "2",
             "--queries", "50", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    own_instance(r.stderr, "lens index build")
    assert (work / "idx" / "CURRENT").is_file()
    assert ray_jobs(foreign_ray) == []


def test_address_auto_joins_the_cluster_it_names(foreign_ray, work):
    r = lens("shards", "--input", "data", "--output", "shards-joined", "--address", "auto", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lens shards: joined the Ray cluster at auto" in r.stderr
    jobs = ray_jobs(foreign_ray, joined=True)
    assert len(jobs) == 1 and "shards-joined" in jobs[0]["Entrypoint"], jobs


def test_every_ray_start_goes_through_init_ray():
    """No module but lens/cluster.py calls ray.init: every command gets the own-instance rule."""
    import ast

    calls = []
    for pkg in ("lens", "batch", "index", "serve", "train"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init" \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray":
                    calls.append(str(path.relative_to(ROOT)))
    assert sorted(set(calls)) == ["lens/cluster.py"]

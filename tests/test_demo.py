"""`lens demo`, the README's first command, end to end on a small seed (moto + local Ray + Serve)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import own_instance, ray_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_lens_demo_runs_every_step_and_prints_its_summary(tmp_path, foreign_ray):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # the demo starts its own moto
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    p = subprocess.run([sys.executable, "-m", "lens.cli.main", "demo", "--images", "40", "--new-images", "3", "--deletes", "2",
                        "--workdir", str(tmp_path / "demo"), "--port", "0"],
                       capture_output=True, text=True, env=env, timeout=540, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-4000:]
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert s["seeded_images"] == 47 and s["embed"]["embedded"] == 47 and s["embed"]["errors"] == 0
    assert s["index"]["count"] == 47
    assert s["events"]["tagged"] == 3 and s["events"]["example_search_top1"]["id"].startswith("s3://lens-images/")
    # deleted from the bucket: gone from search (id lookups 404, no image search returns them), sidecars say so
    d = s["deletes"]
    assert d["deleted"] == 2 and d["returned_by_image_search"] == 0 and d["sidecar_status"] == ["deleted"], d
    assert s["examples"]["tag coffee.png"][0][0] == "espresso"
    assert s["custom_tags"]["classes"] == 8 and s["custom_tags"]["test_top1"] >= 0.75  # the test split chose nothing
    assert s["examples"]["custom tags of coffee.png"][0][0] == "coffee"  # the pool serves the trained head
    assert set(s["events"]["example_custom_tags"]) == {"scenes"}  # and the event path writes its tags
    assert "=== Lens demo: done" in p.stderr
    assert (tmp_path / "demo" / "index" / "CURRENT").is_file()
    # someone else's `ray start` cluster on the host: the demo ran on its own Ray and left no driver there
    own_instance(p.stderr, "lens demo")
    assert ray_jobs(foreign_ray) == []


def test_demo_workdir_empties_only_what_an_earlier_demo_made(tmp_path):
    from lens.cli.demo import MARKER, prepare_workdir

    from lens.errors import LensError

    fresh = prepare_workdir(tmp_path / "new")
    assert sorted(p.name for p in fresh.iterdir()) == [MARKER]
    (fresh / "index").mkdir()
    (fresh / "index" / "CURRENT").write_text("v-1")
    (fresh / "old.txt").write_text("from the last run")
    again = prepare_workdir(fresh)
    assert sorted(p.name for p in again.iterdir()) == [MARKER]  # an earlier demo's outputs are emptied ...

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(LensError, match="not made by lens demo"):
        prepare_workdir(mine)
    assert (mine / "thesis.tex").read_text() == "years of work"  # ... anything else is never touched
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (prepare_workdir(empty) / MARKER).is_file()


def test_lens_demo_refuses_a_directory_it_did_not_make_before_starting_anything(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    p = subprocess.run([sys.executable, "-m", "lens.cli.main", "demo", "--workdir", str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not made by lens demo" in p.stderr, p.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine" and p.stdout == ""

"""Bulk embedding (``lens embed``) on a real local Ray: equality with the online predictor, row accounting,
resume after SIGKILL, S3 through moto, and a two-node cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import encode, free_port, own_instance, random_rgb, ray_jobs

TINY = {"name": "test_efficientnet", "weights": "random", "backend": "onnx"}


def write_shard(path: Path, ids, blobs, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "image": pa.array(blobs, pa.binary()), **extra}), path)


def read_output(out: Path | str, kind: str = "embeddings", filesystem=None) -> pa.Table:
    """The rows of every committed part file, as listed by the manifest."""
    from lens.storage import Location

    loc = Location.parse(str(out))
    manifest = loc.read_json(loc.path("manifest.json"))
    files = manifest["files" if kind == "embeddings" else "error_files"]
    tables = [loc.read_table(loc.path(f)) for f in files]
    return pa.concat_tables(tables) if tables else None


def embed(tmp_path, input_, output, **kw):
    from lens.batch.config import EmbedConfig
    from lens.batch.job import run_embed

    cfg = EmbedConfig(input=str(input_), output=str(output), **kw)
    return run_embed(cfg, log=lambda *a: None)


def test_job_embeddings_equal_online_and_account_for_every_row(local_ray, tmp_path, photos, lite0_onnx):
    names = sorted(photos)
    # two shards: real photos, plus a corrupt image, a truncated JPEG and a null in the second
    write_shard(tmp_path / "in" / "a.parquet", names[:4], [photos[n] for n in names[:4]], src=["x"] * 4)
    bad = {"garbage": b"not an image at all", "truncated": photos["rocket.jpg"][:300], "null": None}
    write_shard(tmp_path / "in" / "sub" / "b.parquet", names[4:] + list(bad),
                [photos[n] for n in names[4:]] + list(bad.values()), src=["y"] * (len(names) - 4 + len(bad)))

    s = embed(tmp_path, tmp_path / "in", tmp_path / "out", carry_columns=("src",),
              model={"backend": "onnx", "device": "cpu"})
    assert (s.input_rows, s.embedded, s.errors) == (len(names) + 3, len(names), 3)

    table = read_output(tmp_path / "out")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 1280)
    assert sorted(table.column("id").to_pylist()) == names
    assert set(table.column("src").to_pylist()) == {"x", "y"}
    online = {n: r.embedding for n, r in zip(names, lite0_onnx.predict([photos[n] for n in names]))}
    for row_id, vec, tags in zip(table.column("id").to_pylist(), table.column("embedding").to_pylist(),
                                 table.column("tags").to_pylist()):
        v = np.asarray(vec, np.float32)
        assert float(v @ online[row_id]) >= 0.999, row_id
        assert len(tags) == 5 and tags[0]["score"] >= tags[-1]["score"]
    by_id = {i: t for i, t in zip(table.column("id").to_pylist(), table.column("tags").to_pylist())}
    assert by_id["coffee.png"][0]["label"] == "espresso"

    errors = read_output(tmp_path / "out", "errors")
    reasons = dict(zip(errors.column("id").to_pylist(), errors.column("error").to_pylist()))
    assert set(reasons) == set(bad)
    assert reasons["garbage"] == "unsupported_media_type" and reasons["null"] == "invalid_input"
    assert all(errors.column("message").to_pylist())

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows"] == len(names) and manifest["errors"] == 3 and manifest["input_rows"] == len(names) + 3
    assert manifest["model_identity"] == lite0_onnx.identity().to_dict()
    ident = manifest["model_identity"]
    assert ident["embed_dim"] == 1280 and ident["model"] == "tf_efficientnet_lite0" and ident["num_classes"] == 1000
    assert ident["weights_sha256"] == lite0_onnx.model.weights.sha256 and len(ident["labels_sha256"]) == 64
    assert [sh["key"] for sh in manifest["shards"]] == ["a", "sub__b"]
    # the pipeline GPU actors use (decode tasks feeding the model actors) writes the same rows and errors
    tasks = embed(tmp_path, tmp_path / "in", tmp_path / "out-tasks", carry_columns=("src",), decode_in_actors=False,
                  model={"backend": "onnx", "device": "cpu"})
    assert (tasks.embedded, tasks.errors) == (s.embedded, s.errors)
    fused = dict(zip(table.column("id").to_pylist(), table.column("embedding").to_pylist()))
    other = read_output(tmp_path / "out-tasks")
    for row_id, vec in zip(other.column("id").to_pylist(), other.column("embedding").to_pylist()):
        assert float(np.asarray(vec) @ np.asarray(fused[row_id])) >= 0.9999, row_id
    assert sorted(read_output(tmp_path / "out-tasks", "errors").column("id").to_pylist()) == sorted(bad)

    # the carried column reaches the index metadata, so search results return it
    from lens.index.build import BuildConfig, build_index
    from lens.index.search import SearchService

    build_index(BuildConfig(embeddings=[str(tmp_path / "out")], output=str(tmp_path / "idx"), queries=10),
                log=lambda *a: None)
    _, hits = SearchService(str(tmp_path / "idx")).search_id("coffee.png", 3)
    assert all(h.metadata["src"] in ("x", "y") and h.metadata["tags"] for h in hits)

    # a second run has nothing to do; a run with another model into the same output is refused
    again = embed(tmp_path, tmp_path / "in", tmp_path / "out", carry_columns=("src",),
                  model={"backend": "onnx", "device": "cpu"})
    assert (again.shards_run, again.shards_skipped, again.embedded) == (0, 2, len(names))
    from lens.errors import ConfigError

    with pytest.raises(ConfigError, match="different job"):
        embed(tmp_path, tmp_path / "in", tmp_path / "out", carry_columns=("src",), model=TINY)


def test_image_folder_input_and_make_shards(local_ray, tmp_path, rng):
    from lens.batch.shards import make_shards

    folder = tmp_path / "imgs"
    (folder / "d").mkdir(parents=True)
    for i in range(7):
        (folder / "d" / f"{i}.jpg").write_bytes(encode(random_rgb(rng), "JPEG"))
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")

    s = embed(tmp_path, folder, tmp_path / "out", model=TINY, files_per_shard=3)
    assert (s.shards, s.input_rows, s.embedded, s.errors) == (3, 8, 7, 1)
    ids = read_output(tmp_path / "out").column("id").to_pylist()
    assert sorted(ids) == sorted(f"d/{i}.jpg" for i in range(7))

    written = make_shards(str(folder), str(tmp_path / "shards"), rows_per_shard=3)
    assert [w["rows"] for w in written] == [3, 3, 2]
    s2 = embed(tmp_path, tmp_path / "shards", tmp_path / "out2", model=TINY)
    assert (s2.embedded, s2.errors) == (7, 1)
    assert sorted(read_output(tmp_path / "out2").column("id").to_pylist()) == sorted(ids + [])
    # every image keeps where it lives (lens shards' uri column; an image folder's files), so does the index
    for out in ("out", "out2"):
        t = read_output(tmp_path / out)
        assert [u for u in t.column("uri").to_pylist()] == [str(folder / i) for i in t.column("id").to_pylist()]
        assert json.loads((tmp_path / out / "manifest.json").read_text())["carry_columns"] == ["uri"]
    from lens.index.build import BuildConfig, build_index
    from lens.index.search import SearchService

    build_index(BuildConfig(embeddings=[str(tmp_path / "out2")], output=str(tmp_path / "idx"), queries=10),
                log=lambda *a: None)
    assert SearchService(str(tmp_path / "idx")).location_of("d/3.jpg") == str(folder / "d" / "3.jpg")
    # ids="uri": the id is the file's location, the scheme of the event path's s3:// ids
    written = make_shards(str(folder), str(tmp_path / "shards-uri"), ids="uri")
    t = pq.read_table(written[0]["path"])
    assert t.column("id").to_pylist() == t.column("uri").to_pylist() and str(folder / "d" / "0.jpg") in \
        t.column("id").to_pylist()


def test_lens_shards_is_a_resumable_ray_job_with_bounded_shards(local_ray, tmp_path, rng):
    from lens.batch.pack import plan_shards
    from lens.batch.shards import make_shards

    from lens.storage import Location

    # the plan: a shard closes at rows_per_shard files or before the file that would pass max_shard_bytes
    src, dst = Location.parse(str(tmp_path / "src")), Location.parse(str(tmp_path / "dst"))
    files = [(src.path(f"{i}.jpg"), n) for i, n in enumerate([10, 10, 10, 50, 200, 10, 10])]
    plans = plan_shards(files, src, dst, rows_per_shard=3, max_shard_bytes=60, ids="relative", prefix="p")
    assert [[f.rsplit("/", 1)[1] for f in p.files] for p in plans] == [
        ["0.jpg", "1.jpg", "2.jpg"], ["3.jpg"], ["4.jpg"], ["5.jpg", "6.jpg"]]
    assert plans[0].ids == ("0.jpg", "1.jpg", "2.jpg") and plans[2].bytes == 200

    folder = tmp_path / "imgs"
    blobs = {}
    for d in ("a", "b"):
        (folder / d).mkdir(parents=True)
        for i in range(9):
            blobs[f"{d}/{i}.jpg"] = encode(random_rgb(rng), "JPEG")
            (folder / d / f"{i}.jpg").write_bytes(blobs[f"{d}/{i}.jpg"])
    seen = []
    written = make_shards(str(folder), str(tmp_path / "shards"), rows_per_shard=4,
                          progress=lambda *a: seen.append(a))
    assert [w["rows"] for w in written] == [4, 4, 4, 4, 2] and not any(w["skipped"] for w in written)
    assert seen[-1] == (18, 18, 5, 0) and len(seen) == 5
    rows = [r for w in written for r in pq.read_table(w["path"]).to_pylist()]
    assert [r["id"] for r in rows] == sorted(blobs)  # every file once, in order
    assert all(r["image"] == blobs[r["id"]] and r["uri"] == str(folder / r["id"]) for r in rows)

    # resumable: a lost shard is rewritten, the rest skipped; a shard whose files changed is rewritten too
    Path(written[1]["path"]).unlink()
    (folder / "a" / "0.jpg").rename(folder / "a" / "0x.jpg")
    again = make_shards(str(folder), str(tmp_path / "shards"), rows_per_shard=4)
    assert [w["skipped"] for w in again] == [False, False, True, True, True]
    assert pq.read_table(again[0]["path"]).column("id").to_pylist() == ["a/0x.jpg", "a/1.jpg", "a/2.jpg", "a/3.jpg"]


def test_the_job_writes_a_drift_reference_profile_of_its_output(local_ray, tmp_path, rng):
    from lens.quality.drift import Profile

    blobs = [encode(random_rgb(rng), "JPEG") for _ in range(80)]
    write_shard(tmp_path / "in" / "a.parquet", [f"i{i}" for i in range(80)], blobs)
    s = embed(tmp_path, tmp_path / "in", tmp_path / "out", model=TINY)
    assert s.embedded == 80
    prof = Profile.load(str(tmp_path / "out"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert prof.identity == manifest["model_identity"] and prof.meta["rows"] == 80
    assert sum(prof.classes.values()) == 80 and prof.reference.shape == (80, 32)


def test_read_units_cut_shards_by_row_group_and_every_row_comes_out_once(local_ray, tmp_path, rng):
    from lens.batch.shards import InputShard, read_units

    units = read_units([InputShard("a", "a.parquet", 23, row_groups=(5, 5, 0, 5, 5, 3)),
                        InputShard("f", "x/0.jpg", 5, files=tuple(f"x/{i}.jpg" for i in range(5)))], 8)
    assert [(u.shard, u.row_groups, u.rows) for u in units[:3]] == [("a", (0, 1), 10), ("a", (3, 4), 10),
                                                                      ("a", (5,), 3)]
    assert [u.files for u in units[3:]] == [tuple(f"x/{i}.jpg" for i in range(5))]
    assert [len(u.files) for u in read_units([InputShard("f", "x", 5, files=tuple("abcde"))], 2)] == [2, 2, 1]

    # one shard of 23 rows in row groups of 5, read 8 rows (two row groups) per task, decoded 3 at a time
    ids = [f"img-{i:02d}" for i in range(23)]
    blobs = [encode(random_rgb(rng), "JPEG") for _ in ids]
    blobs[7] = b"broken"
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ids, "image": pa.array(blobs, pa.binary()), "n": list(range(23))}),
                   tmp_path / "in" / "s.parquet", row_group_size=5)
    s = embed(tmp_path, tmp_path / "in", tmp_path / "out", model=TINY, read_rows=8, decode_batch_size=3,
              carry_columns=("n",))
    assert (s.shards, s.input_rows, s.embedded, s.errors) == (1, 23, 22, 1)
    table = read_output(tmp_path / "out")
    assert sorted(table.column("id").to_pylist()) == [i for i in ids if i != "img-07"]
    assert all(ids[n] == i for i, n in zip(table.column("id").to_pylist(), table.column("n").to_pylist()))
    assert read_output(tmp_path / "out", "errors").column("id").to_pylist() == ["img-07"]


def test_decoder_records_unreadable_files_and_names_an_unreadable_parquet_file(tmp_path, rng):
    from lens.batch.shards import ReadUnit
    from lens.batch.stages import PIXELS, Decoder

    from lens.runtime.config import DecodeConfig
    from lens.runtime.preprocess import PreprocessConfig

    (tmp_path / "imgs").mkdir()
    for name in ("a.jpg", "c.jpg"):
        (tmp_path / "imgs" / name).write_bytes(encode(random_rgb(rng), "JPEG"))
    root = str(tmp_path / "imgs")
    prep = PreprocessConfig((3, 32, 32), "bilinear", (0.5,) * 3, (0.5,) * 3, 1.0).to_dict()
    dec = Decoder(root, prep, DecodeConfig(), "id", "image", (), batch_size=2)
    # b.jpg was listed, then deleted before the job read it: an error row, and the other rows are decoded
    unit = ReadUnit("files-0", f"{root}/a.jpg", files=tuple(f"{root}/{n}" for n in ("a.jpg", "b.jpg", "c.jpg")))
    out = pa.concat_tables(dec(pa.table({"unit": [json.dumps(unit.to_row())]})))
    assert out.column("id").to_pylist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert out.column("error").to_pylist() == ["", "unreadable", ""]
    assert "b.jpg" in out.column("message")[1].as_py()
    assert out.column(PIXELS).combine_chunks().to_numpy()[[0, 2]].any(axis=(1, 2, 3)).all()

    gone = ReadUnit("s", str(tmp_path / "gone.parquet"), row_groups=(0,), rows=1)
    with pytest.raises(OSError, match="gone.parquet"):
        list(Decoder(str(tmp_path), prep, DecodeConfig(), "id", "image", (), 2)(
            pa.table({"unit": [json.dumps(gone.to_row())]})))


def test_a_units_first_batch_is_small_and_its_read_errors_stay_with_their_rows(tmp_path, rng):
    """The first part of each unit comes after FIRST_BATCH_ROWS images, not a whole decode batch; the split keeps
    each unreadable file's error on its own row, and the same unit always splits the same way (a retry rewrites
    the same parts)."""
    from lens.batch.shards import ReadUnit
    from lens.batch.stages import FIRST_BATCH_ROWS, Decoder

    from lens.runtime.config import DecodeConfig
    from lens.runtime.preprocess import PreprocessConfig

    names = [f"{i}.jpg" for i in range(9)]
    (tmp_path / "imgs").mkdir()
    for name in names:
        if name != "5.jpg":  # listed, then gone before the job read it
            (tmp_path / "imgs" / name).write_bytes(encode(random_rgb(rng), "JPEG"))
    root = str(tmp_path / "imgs")
    prep = PreprocessConfig((3, 32, 32), "bilinear", (0.5,) * 3, (0.5,) * 3, 1.0).to_dict()
    unit = ReadUnit("files-0", f"{root}/0.jpg", files=tuple(f"{root}/{n}" for n in names))
    units = pa.table({"unit": [json.dumps(unit.to_row())]})
    batches = list(Decoder(root, prep, DecodeConfig(), "id", "image", (), batch_size=6)(units))
    assert FIRST_BATCH_ROWS == 4
    assert [b.num_rows for b in batches] == [4, 2, 3]
    out = pa.concat_tables(batches)
    assert out.column("id").to_pylist() == names
    assert [i for i, e in enumerate(out.column("error").to_pylist()) if e] == [5]
    again = list(Decoder(root, prep, DecodeConfig(), "id", "image", (), batch_size=6)(units))
    assert [b.column("id").to_pylist() for b in again] == [b.column("id").to_pylist() for b in batches]


def test_null_or_empty_ids_become_error_rows_never_ids(tmp_path, rng):
    from lens.batch.shards import ReadUnit
    from lens.batch.stages import Decoder

    from lens.runtime.config import DecodeConfig
    from lens.runtime.preprocess import PreprocessConfig

    jpeg = encode(random_rgb(rng), "JPEG")
    pq.write_table(pa.table({"id": ["a", None, "", "d"], "image": [jpeg] * 4}), tmp_path / "s.parquet")
    prep = PreprocessConfig((3, 32, 32), "bilinear", (0.5,) * 3, (0.5,) * 3, 1.0).to_dict()
    unit = ReadUnit("s", str(tmp_path / "s.parquet"), row_groups=(0,), rows=4)
    out = pa.concat_tables(Decoder(str(tmp_path), prep, DecodeConfig(), "id", "image", (), 4)(
        pa.table({"unit": [json.dumps(unit.to_row())]})))
    assert out.column("error").to_pylist() == ["", "invalid_id", "invalid_id", ""]
    assert "null or empty id" in out.column("message")[1].as_py()


def test_resume_after_sigkill_no_duplicates_nothing_missing(tmp_path, rng, foreign_ray):
    ids = []
    shards = 8
    for s in range(shards):
        shard_ids = [f"s{s:02d}-{i:03d}" for i in range(12)]
        write_shard(tmp_path / "in" / f"part-{s:02d}.parquet", shard_ids,
                    [encode(random_rgb(rng, 160, 120), "JPEG") for _ in shard_ids])
        ids += shard_ids
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lens.cli.main", "embed", "--input", str(tmp_path / "in"), "--output", str(out),
           "--model", "test_efficientnet", "--weights", "random", "--backend", "onnx", "--batch-size", "4",
           "--no-progress"]
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    # The driver SIGKILLs its process group (itself, its raylet and every worker) right after the third
    # shard commit: a machine lost at a known point of the job, not wherever a timer happens to land.
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, start_new_session=True,
                           env=env | {"LENS_CRASH_AT": "embed.after_commit:3"})
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    assert "killed at embed.after_commit (pass 3)" in first.stderr
    markers = out / "_lens" / "shards"
    done_before = len(list(markers.glob("*.json")))
    assert done_before == 3
    assert not (out / "manifest.json").exists()

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    # with someone else's `ray start` cluster on the host, lens embed ran on its own Ray, both times
    own_instance(second.stderr, "lens embed")
    assert ray_jobs(foreign_ray) == []
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["shards_skipped"] == 3 and summary["shards_run"] == shards - 3
    table = read_output(out)
    got = table.column("id").to_pylist()
    assert len(got) == len(set(got)), "duplicated rows after resume"
    assert sorted(got) == sorted(ids), "rows missing after resume"
    # nothing beyond the manifest's files is left in the output either (stale parts were removed)
    on_disk = sorted(str(p.relative_to(out)) for p in (out / "embeddings").rglob("*.parquet"))
    assert on_disk == sorted(json.loads((out / "manifest.json").read_text())["files"])


def test_s3_input_and_output_through_moto(tmp_path, rng, moto_endpoint):
    import boto3
    import ray

    # Ray's workers read S3 with the endpoint and credentials of their environment, as on a real cluster: start
    # this Ray after moto's variables are set.
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")

    from lens.storage import Location

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="lens-batch")
    ids = [f"img-{i}" for i in range(20)]
    for part in range(2):
        path = tmp_path / f"p{part}.parquet"
        sub = ids[part * 10 : (part + 1) * 10]
        write_shard(path, sub, [encode(random_rgb(rng), "PNG") for _ in sub])
        s3.upload_file(str(path), "lens-batch", f"in/p{part}.parquet")

    s = embed(tmp_path, "s3://lens-batch/in", "s3://lens-batch/out", model=TINY)
    assert (s.embedded, s.errors, s.shards) == (20, 0, 2)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="lens-batch", Prefix="out/")["Contents"]}
    assert "out/manifest.json" in keys and "out/_lens/shards/p0.json" in keys
    table = read_output("s3://lens-batch/out")
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    assert Location.parse("s3://lens-batch/out").read_json("lens-batch/out/manifest.json")["rows"] == 20
    again = embed(tmp_path, "s3://lens-batch/in", "s3://lens-batch/out", model=TINY)
    assert again.shards_skipped == 2 and again.embedded == 20
    ray.shutdown()


def test_two_node_cluster_places_actors_on_both_nodes(tmp_path, rng):
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    if ray.is_initialized():
        ray.shutdown()
    for s in range(4):
        shard_ids = [f"n{s}-{i}" for i in range(30)]
        write_shard(tmp_path / "in" / f"p{s}.parquet", shard_ids, [encode(random_rgb(rng), "JPEG") for _ in shard_ids])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": True, "dashboard_port": free_port()})
    cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        # two actors of 2 CPUs cannot share a 3-CPU node: Ray must place one on each (the third CPUs read)
        s = embed(tmp_path, tmp_path / "in", tmp_path / "out", model={**TINY, "num_threads": 1}, workers=2,
                  cpus_per_worker=2, decode_cpus=0.5)
        assert (s.embedded, s.errors) == (120, 0)
        got = read_output(tmp_path / "out").column("id").to_pylist()
        assert len(got) == len(set(got)) == 120
        actors = [a for a in list_actors(detail=True, limit=1000) if "Embedder" in (a.class_name or "")]
        assert len({a.node_id for a in actors}) == 2, [(a.class_name, a.node_id) for a in actors]
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_config_errors_are_clear(tmp_path):
    from lens.batch.config import EmbedConfig
    from lens.batch.job import plan_workers

    from lens.errors import ConfigError
    from lens.runtime.config import validate

    with pytest.raises(ConfigError, match="input and output must differ"):
        validate(EmbedConfig, {"input": "a", "output": "a/"})
    with pytest.raises(ConfigError, match="carry_columns"):
        validate(EmbedConfig, {"input": "a", "output": "b", "carry_columns": ["embedding"]})
    with pytest.raises(ConfigError, match="no input files"):
        embed(tmp_path, tmp_path / "nothing", tmp_path / "out", model=TINY)
    write_shard(tmp_path / "in" / "x.parquet", ["a"], [b"x"])
    with pytest.raises(ConfigError, match="has no column"):
        embed(tmp_path, tmp_path / "in", tmp_path / "out", model=TINY, image_column="pixels")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="need Parquet input"):
        embed(tmp_path, tmp_path / "imgs", tmp_path / "out", model=TINY, carry_columns=("src",))
    cfg = EmbedConfig(input="a", output="b", gpus_per_worker=0.5)
    with pytest.raises(ConfigError, match="GPU"):
        plan_workers(cfg, {"CPU": 8})
    assert plan_workers(cfg, {"CPU": 8, "GPU": 2}) == (4, {"num_gpus": 0.5, "num_cpus": 1.0})
    assert plan_workers(EmbedConfig(input="a", output="b", gpus_per_worker=1, cpus_per_worker=2),
                        {"CPU": 8, "GPU": 2}) == (2, {"num_gpus": 1, "num_cpus": 2.0})
    # CPU actors that decode too: one per CPU by default, all CPUs theirs
    assert EmbedConfig(input="a", output="b").fused and not cfg.fused
    assert plan_workers(EmbedConfig(input="a", output="b"), {"CPU": 16}) == (16, {"num_cpus": 1.0})
    assert plan_workers(EmbedConfig(input="a", output="b", cpus_per_worker=2), {"CPU": 5}) == (2, {"num_cpus": 2.0})
    with pytest.raises(ConfigError, match="more than the cluster's 2 CPUs"):
        plan_workers(EmbedConfig(input="a", output="b", workers=3), {"CPU": 2})
    # CPU actors fed by decode tasks: half the CPUs decode
    tasks = {"input": "a", "output": "b", "decode_in_actors": False}
    assert plan_workers(EmbedConfig(**tasks), {"CPU": 16}) == (16, {"num_cpus": 0.5})
    assert plan_workers(EmbedConfig(**tasks), {"CPU": 2}) == (2, {"num_cpus": 0.5})
    assert plan_workers(EmbedConfig(**tasks, cpus_per_worker=1), {"CPU": 2}) == (1, {"num_cpus": 1.0})
    with pytest.raises(ConfigError, match="leaves less than one"):
        plan_workers(EmbedConfig(**tasks, workers=3), {"CPU": 2})


def test_unit_rows_keep_every_slot_busy_to_the_end():
    from lens.batch.job import unit_rows
    from lens.batch.shards import InputShard, read_units

    assert unit_rows(3000, 4, 128) == 94  # small job: >= 8 units per slot
    assert unit_rows(3000, 8, 128) == 47
    assert unit_rows(1_000_000, 8, 128) == 128  # big job: read_rows
    assert unit_rows(5, 64, 128) == 1
    # units are whole row groups: 47 rows per unit with 64-row groups gives one group per unit
    shard = InputShard("s", "s.parquet", rows=500, row_groups=(64,) * 7 + (52,))
    units = read_units([shard], unit_rows(3000, 8, 128))
    assert [u.rows for u in units] == [64] * 7 + [52] and units[0].row_groups == (0,)
    assert [u.rows for u in read_units([shard], unit_rows(3000, 4, 128))] == [128, 128, 128, 116]


@pytest.mark.slow
def test_verify_finds_rows_holding_another_images_embedding(local_ray, tmp_path, rng):
    """`lens index verify` re-embeds a sample from the source images: a clean output and its index pass; two rows
    whose vectors were swapped (what a shared OpenVINO infer request did) are listed, exit 1, in the embeddings
    folder and in an index built from it."""
    from lens.cli import main as cli
    from lens.index.build import BuildConfig, build_index
    from lens.index.verify import verify_embeddings, verify_index

    ids = [f"img-{i:02d}" for i in range(24)]
    write_shard(tmp_path / "in" / "part-0.parquet", ids, [encode(random_rgb(rng, 96, 80), "JPEG") for _ in ids])
    from lens.runtime.config import ModelConfig

    s = embed(tmp_path, tmp_path / "in", tmp_path / "out", model=ModelConfig(**TINY))
    assert s.embedded == 24 and s.served["backend"] == "onnx" and s.served["backend_version"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["lens_version"] and manifest["served"]["precision"] == "fp32"
    assert manifest["model_identity"]["backend"] == "onnx" and manifest["model_identity"]["backend_version"]
    clean = verify_embeddings(str(tmp_path / "out"), 10, weights="random")
    assert clean.ok and clean.checked == 10 and clean.min_cosine > 0.9999
    build_index(BuildConfig(embeddings=[str(tmp_path / "out")], output=str(tmp_path / "idx"), index="flat"),
                log=lambda *a: None)
    assert verify_index(str(tmp_path / "idx"), 24, weights="random").ok

    # swap two rows' vectors, wherever their parts are
    parts = {f: pq.read_table(tmp_path / "out" / f) for f in manifest["files"]}
    where = {i: (f, r) for f, t in parts.items() for r, i in enumerate(t.column("id").to_pylist())}
    vec = {i: parts[f].column("embedding")[r].as_py() for i, (f, r) in where.items()}
    vec["img-03"], vec["img-17"] = vec["img-17"], vec["img-03"]
    for f, t in parts.items():
        emb = pa.array([vec[i] for i in t.column("id").to_pylist()], t.schema.field("embedding").type)
        pq.write_table(t.set_column(t.column_names.index("embedding"), "embedding", emb), tmp_path / "out" / f)
    bad = verify_embeddings(str(tmp_path / "out"), 24, weights="random")
    assert sorted(r["id"] for r in bad.disagree) == ["img-03", "img-17"] and bad.checked == 24
    build_index(BuildConfig(embeddings=[str(tmp_path / "out")], output=str(tmp_path / "idx2"), index="flat"),
                log=lambda *a: None)
    assert cli.main(["index", "verify", "--index", str(tmp_path / "idx2"), "--sample", "24", "--weights",
                     "random"]) == 1
    assert cli.main(["index", "verify", "--embeddings", str(tmp_path / "out"), "--sample", "24", "--weights",
                     "random"]) == 1
    assert cli.main(["index", "verify", "--index", str(tmp_path / "idx"), "--sample", "5", "--weights",
                     "random"]) == 0

"""Drift statistics on seeded data, profiles, the offline report, and labeled feedback (validation, durable parts,
training data) without Serve."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from lens.quality.drift import DriftMonitor, Profile, chi2_homogeneity, chi2_sf, compare, ks_2samp


def test_statistics_match_reference_values():
    # reference values of the distributions (from scipy.stats, which Lens now calls: a guard on the call, the
    # method chosen and the pooling around it)
    for x, df, want in [(3.0, 1, 0.08326451666355042), (30.0, 20, 0.06985366069940986),
                        (100.0, 80, 0.064570368921133), (0.5, 3, 0.9188914116546758)]:
        assert chi2_sf(x, df) == pytest.approx(want, rel=1e-9)
    rng = np.random.default_rng(0)
    d, p = ks_2samp(rng.normal(size=2000), rng.normal(0.1, size=500))
    assert d == pytest.approx(0.043) and p == pytest.approx(0.438, abs=0.01)  # the asymptotic law: 0.4381
    stat, p, df = chi2_homogeneity({"a": 100, "b": 50, "c": 3}, {"a": 40, "b": 60, "d": 2})
    assert df == 2 and stat == pytest.approx(17.316, abs=1e-3) and p < 1e-3  # c and d pooled into one class


def _world(seed=0, n=3000, d=64, shift=0.0, classes=("a", "b", "c", "d"), probs=(0.4, 0.3, 0.2, 0.1)):
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).normal(size=(8, d))
    z = rng.normal(size=(n, 8))
    z[:, 0] += shift
    x = z @ basis + 0.1 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = list(rng.choice(classes, size=n, p=probs))
    return x.astype(np.float32), labels


def test_no_drift_gives_high_p_values_and_a_shift_low_ones():
    ref, ref_labels = _world(seed=0)
    prof = Profile.fit(ref, ref_labels, components=16, seed=0)
    clean = [compare(prof, prof.project(_world(seed=s, n=500)[0]), _world(seed=s, n=500)[1]) for s in range(1, 41)]
    assert sum(r.drift for r in clean) <= 2  # alpha 0.01 and a size floor: about 0 of 40
    assert np.median([r.p_value for r in clean]) > 0.2
    x, labels = _world(seed=77, n=500, shift=0.8)
    shifted = compare(prof, prof.project(x), labels)
    assert shifted.drift and shifted.p_embedding < 1e-6 and shifted.ks_max > 0.2
    x, labels = _world(seed=78, n=500, probs=(0.1, 0.2, 0.3, 0.4))  # same images, other class mix
    moved = compare(prof, prof.project(x), labels)
    assert moved.drift and moved.p_classes < 1e-6 and moved.psi > 0.3


def test_a_tiny_shift_in_a_huge_window_is_significant_but_not_drift():
    ref, labels = _world(seed=0, n=5000)
    prof = Profile.fit(ref, labels, components=16, seed=0, max_reference=5000)
    x, lab = _world(seed=5, n=20000, shift=0.12)
    r = compare(prof, prof.project(x), lab)
    assert r.p_embedding < 0.01 and r.ks_max < 0.1 and not r.drift


def test_profile_round_trip_and_monitor_cadence(tmp_path):
    ref, labels = _world(seed=0)
    prof = Profile.fit(ref, labels, components=8, seed=3, identity={"model": "m", "weights_sha256": "w",
                                                                     "preprocess": {}, "embed_dim": 64})
    where = prof.save(str(tmp_path / "p" / "drift-profile.npz"))
    back = Profile.load(str(tmp_path / "p"))  # the directory holding it works too
    assert where.endswith("drift-profile.npz") and back.classes == prof.classes and back.identity == prof.identity
    np.testing.assert_array_equal(back.reference, prof.reference)
    with pytest.raises(ValueError, match="no drift profile"):
        Profile.load(str(tmp_path / "nothing"))
    mon = DriftMonitor(back, window=100, every=40)
    x, lab = _world(seed=9, n=220)
    results = []
    for e, l_ in zip(x, lab):
        mon.add(e, l_)
        r = mon.evaluate()
        if r is not None:
            results.append(r.window)
    assert results == [100] * 4  # a test at 100 images, then every 40: 140, 180, 220
    with pytest.raises(ValueError, match="at least 50"):
        DriftMonitor(back, window=10)


def _parts(path, x, labels, identity):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lens.identity import PARQUET_KEY

    path.mkdir(parents=True)
    dim = x.shape[1]
    for i in range(0, len(x), 400):
        t = pa.table({"id": [f"i{j}" for j in range(i, min(i + 400, len(x)))],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[i:i + 400].ravel()), dim),
                      "top1": labels[i:i + 400]}, metadata={PARQUET_KEY: json.dumps(identity).encode()})
        pq.write_table(t, path / f"part-{i:05d}.parquet")


def test_drift_cli_profile_and_report_with_a_plot(tmp_path, capsys):
    from lens.cli.main import main

    ident = {"model": "m", "weights_sha256": "w", "preprocess": {}, "embed_dim": 64}
    ref, labels = _world(seed=0, n=1200)
    _parts(tmp_path / "ref", ref, labels, ident)
    same, lab2 = _world(seed=1, n=1200)
    _parts(tmp_path / "same", same, lab2, ident)
    moved, lab3 = _world(seed=2, n=1200, shift=0.8)
    _parts(tmp_path / "moved", moved, lab3, ident)
    assert main(["drift", "profile", "--embeddings", str(tmp_path / "ref"), "--output", str(tmp_path / "prof"),
                 "--components", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["reference_rows"] == 1200
    assert main(["drift", "report", "--reference", str(tmp_path / "prof"), "--current", str(tmp_path / "same"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["drift"] is False
    assert main(["drift", "report", "--reference", str(tmp_path / "ref"), "--current", str(tmp_path / "moved"),
                 "--window", "600", "--plot", str(tmp_path / "d.png")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("DRIFT: p ") and "600 current rows" in out and (tmp_path / "d.png").stat().st_size > 5000
    _parts(tmp_path / "other", same, lab2, ident | {"weights_sha256": "x"})
    assert main(["drift", "report", "--reference", str(tmp_path / "prof"), "--current", str(tmp_path / "other")]) == 2
    assert "different models" in capsys.readouterr().err


# -- feedback ------------------------------------------------------------------------------------------
SHA = "a" * 64


@pytest.mark.parametrize("body,status,phrase", [
    ({"labels": ["cat"], "predicted": ["dog"]}, 400, "give the image's 'id' or 'sha256'"),
    ({"sha256": "xyz", "labels": ["cat"], "predicted": ["dog"]}, 400, "64 lowercase hex"),
    ({"sha256": SHA, "labels": [], "predicted": ["dog"]}, 400, "'labels' must be"),
    ({"sha256": SHA, "labels": ["cat"]}, 400, "'predicted' must be"),
    ({"sha256": SHA, "labels": ["cat"], "predicted": "dog", "extra": 1}, 400, "unknown field"),
    ({"sha256": SHA, "labels": ["cat"], "predicted": "dog", "predicted_at": "yesterday"}, 400, "unix time"),
    ({"items": [{"sha256": SHA, "labels": ["c"], "predicted": "d"}] * 3}, 413, "at most 2"),
    ({"items": [1]}, 400, "item 0 must be an object"),
])
def test_feedback_items_are_checked(body, status, phrase):
    from lens.serve.body import HttpError
    from lens.serve.config import FeedbackConfig
    from lens.serve.feedback import parse_feedback

    with pytest.raises(HttpError) as e:
        parse_feedback(body, FeedbackConfig(sink="x", max_items=2))
    assert e.value.status == status and phrase in e.value.message, e.value.message


def test_feedback_is_group_committed_and_a_failed_write_is_never_acknowledged(tmp_path):
    from lens.serve.config import FeedbackConfig
    from lens.serve.feedback import FeedbackSink, parse_feedback

    from lens.errors import OverloadedError
    from lens.quality.feedback import read_feedback

    class Counted:
        def __init__(self):
            self.rows = []

        def count(self, rows, vocabulary=None):
            self.rows += rows

    cfg = FeedbackConfig(sink=str(tmp_path / "fb"), flush_s=0.2)
    metrics = Counted()
    sink = FeedbackSink(cfg, metrics)
    items = [parse_feedback({"sha256": SHA, "labels": ["cat"], "predicted": [p], "version": "m@v1",
                             "predicted_at": 1.0}, cfg) for p in ("cat", "dog", "cat")]

    async def go():  # the three writes queue in one turn of the loop, before the flusher first runs: one part
        return await asyncio.gather(*(sink.write(rows) for rows in items))  # whatever flush_s and the machine

    parts = asyncio.run(go())
    assert len(set(parts)) == 1 and sink.parts == 1  # three requests, one part
    t = read_feedback(str(tmp_path / "fb"))
    assert t.num_rows == 3 and t.column("predicted").to_pylist() == [["cat"], ["dog"], ["cat"]]
    assert len(metrics.rows) == 3

    (tmp_path / "blocked").write_text("a file where the sink's directory should be")
    bad = FeedbackSink(FeedbackConfig(sink=str(tmp_path / "blocked" / "fb"), flush_s=0.05))

    async def fail():
        return await bad.write(items[0])

    with pytest.raises(OverloadedError, match="not stored"):
        asyncio.run(fail())


def test_feedback_joins_the_training_split(tmp_path):
    from lens.train.config import TrainConfig
    from lens.train.dataset import DatasetError, discover
    from PIL import Image

    from lens.quality.feedback import write_feedback_part
    from lens.runtime.config import ModelConfig
    from lens.storage import Location

    rng = np.random.default_rng(0)
    for cls in ("red", "blue"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    extra = tmp_path / "uploads" / "new.png"
    extra.parent.mkdir()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(extra)
    rows = [{"id": str(extra), "sha256": None, "labels": ["blue"], "predicted": ["red"], "version": None, "head": None,
             "predicted_at": None, "received_at": 2.0},
            {"id": str(tmp_path / "uploads" / "gone.png"), "sha256": None, "labels": ["red"], "predicted": ["red"],
             "version": None, "head": None, "predicted_at": None, "received_at": 2.0},
            {"id": None, "sha256": SHA, "labels": ["red"], "predicted": ["red"], "version": None, "head": None,
             "predicted_at": None, "received_at": 2.0},
            {"id": str(extra), "sha256": None, "labels": ["green"], "predicted": ["red"], "version": None,
             "head": None, "predicted_at": None, "received_at": 3.0}]
    # a client's feedback id naming a file outside any data folder: never opened (not an id the index holds)
    rows.insert(2, {"id": "/etc/passwd", "sha256": None, "labels": ["blue"], "predicted": ["red"], "version": None,
                    "head": None, "predicted_at": None, "received_at": 2.0})
    write_feedback_part(Location.parse(str(tmp_path / "fb")), rows[:4])
    # the index the service searched: it holds the uploads (ids that are absolute paths are their own locations)
    from lens.index.build import BuildConfig, build_index
    from test_index import clustered, write_part

    write_part(tmp_path / "emb" / "part-0.parquet", [str(extra), str(tmp_path / "uploads" / "gone.png")],
               clustered(2, 16, seed=0))
    build_index(BuildConfig(embeddings=[str(tmp_path / "emb")], output=str(tmp_path / "index"), index="flat"),
                log=lambda *a: None)
    cfg = TrainConfig(data=str(tmp_path / "data"), output=str(tmp_path / "out"), feedback=str(tmp_path / "fb"),
                      model=ModelConfig(name="test_efficientnet", weights="random"))
    with pytest.raises(DatasetError, match="--feedback needs --feedback-index"):
        discover(cfg)
    cfg = cfg.model_copy(update={"feedback_index": str(tmp_path / "index")})
    ds = discover(cfg)
    added = [e for e in ds.examples if e.id.startswith("feedback:")]
    assert [(e.label, e.split) for e in added] == [("blue", "train")]
    assert ds.report()["feedback"] == {"source": str(tmp_path / "fb"), "index": str(tmp_path / "index"), "items": 4,
                                       "added": 1, "skipped": {"no image id": 1, "image not readable": 1,
                                                               "id not in the index": 1}}
    rows.pop(2)
    write_feedback_part(Location.parse(str(tmp_path / "fb")), rows[3:])  # a later label for the same image wins
    ds = discover(cfg)
    assert not [e for e in ds.examples if e.id.startswith("feedback:")]
    assert ds.feedback["skipped"]["label is not a training class"] == 1

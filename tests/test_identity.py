"""One model identity, one serialisation in every artefact, and the files earlier versions wrote still read."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lens.identity import IDENTITY_KEY, LEGACY_PARQUET_KEY, PARQUET_KEY, ModelIdentity, identity_of

PRE = {"input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
       "crop_pct": 0.875, "crop_mode": "center"}
NOW = ModelIdentity(model="m", weights_sha256="ab" * 32, preprocess=PRE, embed_dim=8, num_classes=3,
                    labels_sha256="cd" * 32, precision="fp32")


def test_round_trip_and_what_is_compared():
    assert ModelIdentity.from_dict(NOW.to_dict()) == NOW
    assert ModelIdentity.from_dict({"model_identity": NOW.to_dict(), "other": 1}) == NOW
    other_labels = ModelIdentity.from_dict(NOW.to_dict() | {"labels_sha256": "ef" * 32, "num_classes": 5})
    assert NOW.mismatch(other_labels) == []  # a different head does not change the embedding
    assert NOW.mismatch(ModelIdentity.from_dict(NOW.to_dict() | {"weights_sha256": "00" * 32})) == ["weights_sha256"]
    assert NOW.mismatch(ModelIdentity.from_dict(NOW.to_dict() | {"embed_dim": 9})) == ["embed_dim"]
    with pytest.raises(ValueError, match="missing weights_sha256"):
        ModelIdentity.from_dict({"model": "m", "preprocess": PRE, "embed_dim": 8})


# What earlier versions wrote, verbatim in shape:
OLD_EMBED_MANIFEST = {"format": 1, "model": "m", "weights": "x", "weights_sha256": "ab" * 32, "num_classes": 3,
                      "preprocess": PRE, "dim": 8, "files": []}
OLD_JOB_FILE = {"format": 1, "model": "m", "weights_sha256": "ab" * 32, "num_classes": 3, "embed_dim": 8,
                "preprocess": PRE, "top_k": 5, "input": "in", "carry_columns": []}
OLD_INDEX_MANIFEST = {"dim": 8, "model": {"model": "m", "weights_sha256": "ab" * 32, "preprocess": PRE}}
OLD_PART_METADATA = {"model": "m", "weights": "x", "weights_sha256": "ab" * 32, "num_classes": 3, "embed_dim": 8,
                     "preprocess": PRE, "backend": "onnx", "device": "cpu", "pool": "Tagger",
                     "batching": {"max_batch_size": 16}}


@pytest.mark.parametrize("old", [OLD_EMBED_MANIFEST, OLD_JOB_FILE, OLD_INDEX_MANIFEST, OLD_PART_METADATA])
def test_every_earlier_shape_reads_as_the_same_identity(old):
    assert NOW.mismatch(ModelIdentity.from_dict(old)) == []


def _part(path, key: bytes, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.eye(4, 8, dtype=np.float32)
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(x.ravel()), 8)}, metadata={key: json.dumps(meta).encode()}), path)


def test_an_index_builds_from_old_and_new_parts_together_and_records_one_identity(tmp_path):
    from lens.index.build import BuildConfig, build_index
    from lens.index.source import EmbeddingSource
    from lens.index.store import load_version

    _part(tmp_path / "old" / "part-0.parquet", LEGACY_PARQUET_KEY, OLD_PART_METADATA)
    _part(tmp_path / "new" / "part-0.parquet", PARQUET_KEY, NOW.to_dict())
    assert EmbeddingSource(str(tmp_path / "old")).identity.mismatch(NOW) == []
    m = build_index(BuildConfig(embeddings=[str(tmp_path / "old"), str(tmp_path / "new")], output=str(tmp_path / "idx"),
                                queries=10), log=lambda *a: None)
    assert m["count"] == 4 and m["model_identity"]["embed_dim"] == 8
    # an index manifest written before model_identity is still understood
    v = load_version(tmp_path / "idx")
    v.manifest.pop("model_identity")
    v.manifest.update(OLD_INDEX_MANIFEST)
    assert v.identity.mismatch(NOW) == []


def test_resuming_a_job_whose_file_an_earlier_version_wrote(tmp_path):
    from lens.batch.ledger import Ledger

    from lens.errors import ConfigError
    from lens.storage import Location

    out = Location.parse(str(tmp_path / "out"))
    out.write_json(out.path("_lens", "job.json"), OLD_JOB_FILE)
    now = {"format": 1, "model_identity": NOW.to_dict(), "top_k": 5, "input": "in", "carry_columns": []}
    Ledger(out).claim(now)  # the same job: no refusal
    with pytest.raises(ConfigError, match="different job"):
        Ledger(out).claim(now | {"model_identity": NOW.to_dict() | {"weights_sha256": "00" * 32}})


def test_one_identity_key_written_and_the_earlier_identity_key_still_read(tmp_path):
    """Packages and drift profiles wrote ``identity`` before; every artefact now writes ``model_identity``."""
    import io

    from lens.quality.drift import Profile

    assert IDENTITY_KEY == "model_identity"
    assert identity_of({"model_identity": NOW.to_dict()}) == identity_of({"identity": NOW.to_dict()}) == NOW.to_dict()
    assert identity_of({"model": "m"}) is None
    rng = np.random.default_rng(0)
    prof = Profile.fit(rng.normal(size=(200, 16)).astype(np.float32), ["a", "b"] * 100, components=4, seed=0,
                       identity=NOW.to_dict())
    z = dict(np.load(io.BytesIO(prof.to_bytes())))
    header = json.loads(bytes(z["header"]).decode())
    assert header["model_identity"] == NOW.to_dict() and "identity" not in header
    header["identity"] = header.pop("model_identity")  # as an earlier version wrote it
    z["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **z)
    assert Profile.from_bytes(buf.getvalue()).identity == NOW.to_dict()


def test_int8_vectors_are_another_space_and_meet_float_ones_only_as_measured():
    from lens.identity import precision_compat, quantization_of, space_refusal

    gate = {"calibration_sha256": "c1" * 32, "nncf": "3.4.0", "holdout": "h", "holdout_sha256": "h1" * 32,
            "recall_at_10_vs_fp32_index": 0.95, "recall_at_10_vs_int8_index": 0.91, "served": "int8",
            "thresholds": {"min_recall_at_10": 0.93}}
    int8 = ModelIdentity.from_dict(NOW.to_dict() | {"precision": "int8", "backend": "openvino", "quantization": gate})
    assert int8.quantization == quantization_of(gate, "int8") and int8.quantization["min_recall_at_10"] == 0.93
    assert ModelIdentity.from_dict(NOW.to_dict() | {"quantization": gate}).quantization is None  # fp32 served
    other_cal = ModelIdentity.from_dict(int8.to_dict() | {"quantization": gate | {"calibration_sha256": "c2" * 32}})
    # one model, three spaces of outputs: every cache of model outputs keeps them apart
    keys = {NOW.outputs_key(), int8.outputs_key(), other_cal.outputs_key()}
    assert len(keys) == 3 and int8.mismatch(NOW) == [] and int8.space() == "int8" and NOW.space() == "float"
    assert ModelIdentity.from_dict(int8.to_dict()).outputs_key() == int8.outputs_key()

    # an int8 index records its own gate's figure for fp32 queries: 0.91 < 0.93, refused with the numbers
    c8 = precision_compat(int8)
    assert c8["float"]["recall_at_10"] == 0.91 and not c8["float"]["allowed"]
    assert "recall@10 0.91" in space_refusal(int8, c8, NOW)
    assert space_refusal(int8, c8, int8) is None
    assert "another int8 model" in space_refusal(int8, c8, other_cal)
    # an fp32 index: nothing measured -> refused; measured with this int8 model -> allowed for it alone
    assert precision_compat(NOW) == {} and "never measured" in space_refusal(NOW, {}, int8)
    c32 = precision_compat(NOW, int8)
    assert c32["int8"]["allowed"] and c32["int8"]["int8_model"] == int8.quantized_by()
    assert space_refusal(NOW, c32, int8) is None and space_refusal(NOW, c32, NOW) is None
    assert "another int8 model" in space_refusal(NOW, c32, other_cal)
    with pytest.raises(ValueError, match="same model|own model"):
        precision_compat(NOW, ModelIdentity.from_dict(int8.to_dict() | {"weights_sha256": "00" * 32}))

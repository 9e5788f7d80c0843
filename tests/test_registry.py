"""The model registry (local and moto S3), sticky routing, the rollout judge and the version watcher, without Serve."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from test_events import env  # noqa: F401 - the event path's bucket and queue fixture

from lens.package import PackageError, write_package
from lens.registry.store import Registry, RegistryError, parse_model_ref


def tiny_package(path, name="tagger", seed=0) -> str:
    """A small but real package (its files are checksummed like any other)."""
    blob = np.random.default_rng(seed).normal(size=64).astype(np.float32).tobytes()
    return write_package(str(path), {"model.safetensors": blob, "labels.json": b'["a", "b"]'},
                         {"kind": "model", "name": name, "labels": ["a", "b"],
                          "identity": {"model": "m", "weights_sha256": hashlib.sha256(blob).hexdigest(),
                                       "preprocess": {}, "embed_dim": 4}})


@pytest.fixture(params=["local", "s3"])
def registry(request, tmp_path):
    if request.param == "local":
        return Registry(str(tmp_path / "models"))
    request.getfixturevalue("moto_endpoint")
    import boto3

    bucket = f"reg-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return Registry(f"s3://{bucket}/models")


def test_push_alias_promote_rollback_and_history(registry, tmp_path):
    v1 = registry.push(tiny_package(tmp_path / "p1", seed=1), why="first", by="alice")
    v2 = registry.push(tiny_package(tmp_path / "p2", seed=2))
    v3 = registry.push(tiny_package(tmp_path / "p3", seed=3), version="2026-11-rc1")
    assert (v1.version, v2.version, v3.version) == ("v1", "v2", "2026-11-rc1")
    assert registry.names() == ["tagger"] and registry.versions("tagger") == ["v1", "v2", "2026-11-rc1"]
    with pytest.raises(RegistryError, match="immutable"):
        registry.push(tiny_package(tmp_path / "p4", seed=4), version="v2")
    for v in registry.versions("tagger"):
        assert registry.verify("tagger", v)["ok"]

    registry.set_alias("tagger", "stable", "v1", by="alice", why="launch")
    assert registry.resolve("tagger").version == "v1" and registry.resolve("tagger", "v2").version == "v2"
    registry.start_rollout("tagger", "v2", steps=(10, 100), bake_s=60, shadow=0.2)
    assert registry.routing("tagger") == {"stable": "v1", "canary": "v2", "weight": 10.0, "shadow": 0.2}
    registry.set_traffic("tagger", weight=40)
    assert registry.routing("tagger")["weight"] == 40.0
    registry.promote("tagger", why="healthy")
    assert registry.routing("tagger") == {"stable": "v2", "canary": None, "weight": 0.0, "shadow": 0.0}
    assert registry.rollout("tagger")["status"] == "promoted"

    # a live canary: rollback drops it, stable stays
    registry.start_rollout("tagger", "2026-11-rc1", steps=(), weight=50)
    registry.rollback("tagger", why="p95")
    assert registry.routing("tagger")["stable"] == "v2" and registry.alias("tagger", "canary") is None
    # no canary: rollback returns stable to the one before, twice
    registry.set_alias("tagger", "stable", "2026-11-rc1")
    assert registry.rollback("tagger", by="bob", why="bad tags")["version"] == "v2"
    assert registry.rollback("tagger")["version"] == "v1"
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback("tagger")

    hist = registry.history("tagger")
    actions = [e["action"] for e in hist]
    assert actions[:3] == ["push", "push", "push"] and actions.count("rollback") == 2
    first = hist[0]
    assert first["by"] == "alice" and first["why"] == "first" and first["at"]
    back = [e for e in hist if e["action"] == "rollback"][0]
    assert back["by"] == "bob" and back["why"] == "bad tags" and (back["was"], back["version"]) == ("2026-11-rc1", "v2")


def test_corrupt_version_is_refused_naming_the_file(registry, tmp_path):
    v = registry.push(tiny_package(tmp_path / "p1"))
    loc = registry.loc
    path = loc.path("tagger", v.version, "model.safetensors")
    data = bytearray(loc.read_bytes(path))
    data[10] ^= 0xFF
    loc.write_bytes(path, bytes(data))
    with pytest.raises(PackageError, match="model.safetensors does not match its checksum"):
        registry.verify("tagger", v.version, cache_dir=tmp_path / "cache")


def test_refusals_are_clear(tmp_path):
    reg = Registry(str(tmp_path / "models"))
    reg.push(tiny_package(tmp_path / "p1"))
    with pytest.raises(RegistryError, match="no version 'v9'.*versions: v1"):
        reg.resolve("tagger", "v9")
    with pytest.raises(RegistryError, match="no stable version"):
        reg.start_rollout("tagger", "v1")
    with pytest.raises(RegistryError, match="must match"):
        parse_model_ref("../etc@v1")
    with pytest.raises(RegistryError, match="rise within 0..100"):
        reg.set_alias("tagger", "stable", "v1") and None
        reg.start_rollout("tagger", "v1", steps=(50, 10))
    with pytest.raises(PackageError, match="not a Lens model package"):
        reg.push(str(tmp_path))
    assert parse_model_ref("tagger") == ("tagger", "stable")


# -- routing -------------------------------------------------------------------------------------------
class _P:
    def __init__(self, name):
        self.name = name

    def identity(self):
        from lens.identity import ModelIdentity

        return ModelIdentity(model="m", weights_sha256=self.name, preprocess={}, embed_dim=4)


def _slot(version):
    from lens.serve.versions import Slot

    from lens.registry.store import VersionRef

    return Slot(VersionRef("tagger", version, f"/r/{version}", version), _P(version))


def test_routing_is_sticky_proportional_and_monotone():
    from lens.serve.versions import Routing, route

    stable, canary = _slot("v1"), _slot("v2")
    images = [np.random.default_rng(i).bytes(256) for i in range(4000)]
    on = {}
    for w in (5.0, 25.0, 50.0):
        r = Routing(stable=stable, canary=canary, weight=w)
        picked = {i for i, im in enumerate(images) if route(im, r)[0] is canary}
        assert all(route(images[i], r)[0] is canary for i in picked)  # sticky: same bytes, same version
        assert abs(len(picked) / len(images) - w / 100) < 0.025, (w, len(picked))
        on[w] = picked
    assert on[5.0] <= on[25.0] <= on[50.0]  # an image on the canary stays there as the weight rises
    shadowed = [route(im, Routing(stable=stable, canary=canary, weight=0, shadow=0.1))[1] for im in images]
    assert abs(sum(s is canary for s in shadowed) / len(images) - 0.1) < 0.02
    assert route(images[0], Routing(stable=stable))[0] is stable


def test_search_finds_the_version_its_index_was_built_with():
    from lens.serve.versions import Routing

    r = Routing(stable=_slot("v2"), previous=_slot("v1"))
    assert r.for_identity(_slot("v1").identity.to_dict()).ref.version == "v1"
    assert r.for_identity(_slot("v2").identity.to_dict()).ref.version == "v2"
    assert r.for_identity(_slot("v0").identity.to_dict()) is None


def test_agreement_measures():
    from lens.serve.versions import agreement

    e = np.array([1.0, 0, 0], np.float32)
    same = agreement([{"label": "a"}, {"label": "b"}], [{"label": "a"}, {"label": "b"}], e, e)
    assert same == {"top1": 1.0, "overlap": 1.0, "cosine": 1.0}
    diff = agreement([{"label": "a"}, {"label": "b"}], [{"label": "b"}, {"label": "c"}], e,
                     np.array([0, 1.0, 0], np.float32))
    assert diff == {"top1": 0.0, "overlap": pytest.approx(1 / 3), "cosine": 0.0}


# -- the judge -----------------------------------------------------------------------------------------
def _window(**versions):
    from lens.serve.rollout import Window
    from lens.serve.versions import LATENCY_BOUNDS_MS

    w = Window()
    for v, (n, errors, ms, pairs, top1) in versions.items():
        hist = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        hist[int(np.searchsorted(LATENCY_BOUNDS_MS, ms))] = n
        w.add(v, {"requests": n, "errors": errors, "latency": hist, "pairs": pairs, "top1": top1 * pairs,
                  "overlap": top1 * pairs, "cosine": pairs})
    return w


STATE = {"canary": "v2", "stable": "v1", "weight": 25.0, "steps": [25.0, 100.0], "step": 0, "bake_s": 10.0,
         "step_started": 1000.0}


@pytest.mark.parametrize("canary,reason", [
    ((100, 5, 40, 0, 1.0), "5xx rate 0.050"),
    ((100, 0, 300, 0, 1.0), "p95 300 ms > 1.5 x stable 50 ms"),
    ((100, 0, 40, 50, 0.5), "top-1 agreement with stable 0.500"),
])
def test_judge_rolls_back_on_each_breach(canary, reason):
    from lens.serve.config import RolloutConfig
    from lens.serve.rollout import judge

    w = _window(v1=(300, 0, 50, 0, 0), v2=canary)
    d = judge(STATE, w, w, {}, RolloutConfig(), now=1001.0)
    assert d.action == "rollback" and reason in d.reason, d.reason
    assert d.numbers["last"]["canary"]["requests"] == 100


def test_judge_waits_advances_promotes_and_rolls_back_a_failed_load():
    from lens.serve.config import RolloutConfig
    from lens.serve.rollout import Window, judge

    cfg = RolloutConfig()
    healthy = _window(v1=(300, 0, 50, 0, 0), v2=(100, 1, 50, 30, 0.97))
    assert judge(STATE, healthy, healthy, {}, cfg, now=1005.0).action == "hold"  # still baking
    few = _window(v1=(300, 0, 50, 0, 0), v2=(5, 0, 50, 0, 0))
    assert judge(STATE, few, few, {}, cfg, now=1011.0).reason.startswith("waiting for 20")
    assert judge(STATE, healthy, healthy, {}, cfg, now=1011.0).action == "advance"
    last = dict(STATE, step=1, weight=100.0)
    assert judge(last, healthy, healthy, {}, cfg, now=1011.0).action == "promote"
    d = judge(STATE, Window(), Window(), {"v2": "model.safetensors does not match its checksum"}, cfg, now=1001.0)
    assert d.action == "rollback" and "failed to load" in d.reason
    few_errors = _window(v1=(300, 0, 50, 0, 0), v2=(10, 5, 50, 0, 0))  # below min_requests: not yet a rate
    assert judge(STATE, few_errors, few_errors, {}, cfg, now=1001.0).action == "hold"
    # a rollout that mirrors a shadow share passes no step before the agreement has min_shadow_pairs pairs
    shadowed = dict(STATE, shadow=0.5)
    few_pairs = _window(v1=(300, 0, 50, 0, 0), v2=(100, 0, 50, cfg.min_shadow_pairs - 1, 1.0))
    d = judge(shadowed, few_pairs, few_pairs, {}, cfg, now=1011.0)
    assert d.action == "hold" and d.reason == f"waiting for {cfg.min_shadow_pairs} shadow pairs", d.reason
    assert judge(dict(shadowed, step=1, weight=100.0), few_pairs, few_pairs, {}, cfg, now=1011.0).action == "hold"
    assert judge(shadowed, healthy, healthy, {}, cfg, now=1011.0).action == "advance"


# -- the watcher ---------------------------------------------------------------------------------------
def test_watcher_swaps_versions_refuses_a_corrupt_one_and_keeps_serving(tmp_path):
    from lens.serve.versions import VersionsConfig, VersionWatcher

    reg = Registry(str(tmp_path / "models"))
    for seed in (1, 2, 3):
        reg.push(tiny_package(tmp_path / f"p{seed}", seed=seed))
    reg.set_alias("tagger", "stable", "v1")
    loads, refused = [], []

    def load(vref):
        from lens.package import open_package

        open_package(vref.uri)  # checksums, as the replica's loader does
        loads.append(vref.version)
        return _P(vref.version)

    w = VersionWatcher(VersionsConfig(registry=str(tmp_path / "models"), model="tagger"), load,
                       on_load_failure=lambda v, why: refused.append((v, why)))
    assert w.routing.stable.ref.version == "v1" and not w.poll_once()
    reg.set_alias("tagger", "stable", "v2")
    assert w.poll_once() and w.routing.stable.ref.version == "v2" and w.routing.previous.ref.version == "v1"
    reg.start_rollout("tagger", "v3", steps=(), weight=30, shadow=0.5)
    assert w.poll_once() and (w.routing.canary.ref.version, w.routing.weight, w.routing.shadow) == ("v3", 30, 0.5)
    reg.rollback("tagger")  # drops the canary
    assert w.poll_once() and w.routing.canary is None and w.routing.weight == 0
    # a replica that never loaded v1: v1 corrupted, then made stable again: refused, v2 keeps serving
    fresh = VersionWatcher(VersionsConfig(registry=str(tmp_path / "models"), model="tagger"), load,
                           on_load_failure=lambda v, why: refused.append((v, why)))
    f = tmp_path / "models" / "tagger" / "v1" / "model.safetensors"
    f.write_bytes(bytes([f.read_bytes()[0] ^ 0xFF]) + f.read_bytes()[1:])
    with pytest.raises(PackageError, match="does not match its checksum"):  # alias set verifies first
        reg.set_alias("tagger", "stable", "v1")
    # the pointer written behind Lens's back (another tool; a file that rotted after its alias was set)
    reg.loc.write_json(reg.loc.path("tagger", "aliases", "stable.json"), dict(reg.alias("tagger", "stable"),
                                                                              version="v1"))
    fresh.poll_once()
    assert fresh.routing.stable.ref.version == "v2"
    assert refused and refused[-1][0] == "v1" and "model.safetensors does not match its checksum" in refused[-1][1]
    assert fresh.failed == {"v1": refused[-1][1]}
    assert not fresh.poll_once()  # not retried every poll until the registry moves
    assert loads == ["v1", "v2", "v3", "v2"]
    assert json.loads(Path(tmp_path / "models" / "tagger" / "aliases" / "stable.json").read_text())["version"] == "v1"


@pytest.mark.slow
def test_versions_are_recorded_in_identities_and_sidecars(env, lens_cache, tmp_path):  # noqa: F811 - the fixture
    """A registry version served by the real event consumer: its sidecar and embedding part name the version."""
    import io

    import pyarrow.parquet as pq
    from test_events import drain, images, sidecar

    from lens.identity import ModelIdentity
    from lens.registry.modelpack import package_model
    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor

    cfg, s3, sqs = env
    reg = Registry(str(tmp_path / "models"))
    tiny_cfg = ModelConfig(name="test_efficientnet", weights="random", backend="onnx", cache_dir=lens_cache)
    pkg = package_model(tiny_cfg, str(tmp_path / "pkg"), name="tagger")
    reg.push(pkg), reg.push(pkg)
    vref = reg.resolve("tagger", "v2")
    served = Predictor.from_config(ModelConfig(weights=vref.uri, backend="onnx", cache_dir=lens_cache))
    ident = served.identity()
    assert ident.version == "tagger@v2"
    again = ModelIdentity.from_dict({"model_identity": ident.to_dict()})
    assert again.version == "tagger@v2" and not again.mismatch(ModelIdentity.from_dict(ident.to_dict() | {"version": None}))

    s3.put_object(Bucket=cfg.bucket, Key="cats/one.jpg", Body=images(1)[0])
    drain(cfg, s3, sqs, served)
    side = sidecar(s3, cfg, "cats/one.jpg")
    assert side["status"] == "tagged" and side["version"] == "tagger@v2", side
    assert side["model_identity"]["version"] == "tagger@v2" and side["weights_sha256"] == ident.weights_sha256
    (part,) = s3.list_objects_v2(Bucket=cfg.bucket, Prefix=cfg.embeddings_prefix)["Contents"]
    table = pq.read_table(io.BytesIO(s3.get_object(Bucket=cfg.bucket, Key=part["Key"])["Body"].read()))
    from lens.identity import PARQUET_KEY

    assert json.loads(table.schema.metadata[PARQUET_KEY])["version"] == "tagger@v2"

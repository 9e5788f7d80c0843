"""The online tagging service on a real local Ray Serve, with a tiny real model (seeded random weights)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from conftest import encode, free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY = {"name": "test_efficientnet", "weights": "random", "backend": "onnx", "device": "cpu"}


@pytest.fixture(scope="module")
def cluster(lens_cache):
    port = free_port()
    ray.init(num_cpus=6, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"LENS_CACHE_DIR": str(lens_cache)}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def deploy(cluster, name: str, args: dict, **overrides) -> str:
    """Deploy one Lens application through the same path as `lens serve` (a Serve config document).

    Like `serve deploy`, a config replaces every application not in it, so each test's app
    replaces the previous one and the cluster never holds more than a couple of replicas."""
    from serve.run import deploy as deploy_doc

    args = {"pools": [{"name": "Tagger", "model": TINY, "num_cpus": 1} | args.pop("pool", {})]} | args
    deployment = {"name": args["pools"][0]["name"]} | overrides
    port = int(cluster.rsplit(":", 1)[1])
    doc = {"http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": name, "route_prefix": f"/{name}", "import_path": "serve.app:build_app",
                             "args": args, "deployments": [deployment]}]}
    deploy_doc(doc, where=f"test app {name}", timeout_s=300)
    return f"{cluster}/{name}"


def replicas(app: str, deployment: str = "Tagger") -> list[str]:
    """Names of the live replica actors of a deployment (Serve names them after app and deployment)."""
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(n["name"] for n in names if n["namespace"] == "serve" and "REPLICA" in n["name"]
                  and f"{app}#{deployment}#" in n["name"])


def handle(app: str, deployment: str = "Tagger"):
    return serve.get_deployment_handle(deployment, app)


def post(url, data: bytes, ctype="image/jpeg", headers: dict | None = None):
    return requests.post(url, data=data, headers={"Content-Type": ctype} | (headers or {}), timeout=60)


def images(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = rng.integers(0, 256, (96 + i % 7, 128 + i % 5, 3), dtype=np.uint8)
        out.append(encode(Image.fromarray(arr), "JPEG", quality=90))
    return out


async def _concurrent(url: str, bodies: list[bytes], ctype="image/jpeg"):
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async def one(body):
            async with s.post(url, data=body, headers={"Content-Type": ctype}) as r:
                return r.status, await r.json(), dict(r.headers)

        return await asyncio.gather(*(one(b) for b in bodies))


@pytest.fixture(scope="module")
def main_app(cluster):
    return deploy(cluster, "main", {}, max_ongoing_requests=64,
                  user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.05, "max_pending": 64})


def test_routes_and_errors(main_app, photos):
    jpeg = images(1)[0]
    r = post(f"{main_app}/v1/tag?top_k=3", jpeg)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "test_efficientnet" and len(body["tags"]) == 3 and body["latency_ms"] > 0
    assert set(body["tags"][0]) == {"label", "class_id", "score"}
    r = requests.post(f"{main_app}/v1/tag", files={"image": ("x.jpg", jpeg, "image/jpeg")}, timeout=60)
    assert r.status_code == 200 and len(r.json()["tags"]) == 5
    r = post(f"{main_app}/v1/embed", jpeg)
    assert r.status_code == 200 and r.json()["dim"] == 256 and len(r.json()["embedding"]) == 256
    r = requests.post(f"{main_app}/v1/tag:batch", timeout=60, files=[
        ("image", ("a.jpg", jpeg, "image/jpeg")), ("image", ("b.bin", b"garbage", "image/jpeg")),
        ("image", ("c.png", photos["coffee.png"], "image/png"))])
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1, 2]
    assert "tags" in results[0] and results[1]["status"] == 415 and "tags" in results[2]
    assert requests.get(f"{main_app}/healthz", timeout=30).json()["status"] == "ok"
    (info,) = requests.get(f"{main_app}/v1/models", timeout=30).json()["pools"]
    assert info["model"] == "test_efficientnet" and info["backend"] == "onnx" and info["device"] == "cpu"
    assert info["preprocess"]["input_size"] == [3, 160, 160] and info["weights_sha256"]
    r = post(f"{main_app}/v1/tag?top_k=0", jpeg)
    assert r.status_code == 400 and r.json()["error"] == "bad_request"


def test_malformed_corpus_gets_typed_errors_without_restarting_the_replica(main_app, photos):
    from test_decode import _png_header_only

    pid = handle("main").stats.remote().result()["pid"]
    jpeg = photos["rocket.jpg"]
    corpus = [
        (jpeg[: len(jpeg) // 2], "image/jpeg", 400),  # truncated
        (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "image/jpeg", 400),  # corrupt after valid magic
        (b"", "image/jpeg", 400),  # empty
        (b"%PDF-1.4 not an image", "image/jpeg", 415),  # wrong magic
        (b"hello", "text/plain", 415),  # wrong content type
        (_png_header_only(40_000, 40_000), "image/png", 413),  # decompression bomb
    ]
    for data, ctype, status in corpus:
        r = post(f"{main_app}/v1/tag", data, ctype)
        assert r.status_code == status, (ctype, status, r.text)
        assert r.json()["status"] == status and r.json()["message"]
    assert post(f"{main_app}/v1/tag", images(1)[0]).status_code == 200
    assert handle("main").stats.remote().result()["pid"] == pid


def test_64_in_flight_each_response_is_its_own_and_batches_form(main_app, tiny):
    bodies = images(64, seed=7)
    expected = [p.embedding for p in tiny.predict(bodies)]
    before = handle("main").stats.remote().result()
    results = asyncio.run(_concurrent(f"{main_app}/v1/embed", bodies))
    assert all(status == 200 for status, _, _ in results)
    got = np.array([body["embedding"] for _, body, _ in results], dtype=np.float32)
    sims = got @ np.stack(expected).T
    assert np.all(np.diag(sims) > 0.999)  # each response matches its own image ...
    assert np.all(sims.argmax(axis=1) == np.arange(64))  # ... and no other
    after = handle("main").stats.remote().result()
    assert after["images"] - before["images"] == 64
    assert after["max_batch_seen"] > 1 and after["batches"] - before["batches"] < 64


def test_every_error_has_the_lens_shape(main_app):
    jpeg = images(1)[0]
    cases = [
        (lambda: post(f"{main_app}/v1/tag?top_k=abc", jpeg), 400, "bad_request", "query parameter top_k: "),
        (lambda: post(f"{main_app}/v1/tag?top_k=500", jpeg), 400, "bad_request", "1..100"),
        (lambda: post(f"{main_app}/v1/tag?embedding=maybe", jpeg), 400, "bad_request", "query parameter embedding: "),
        (lambda: requests.get(f"{main_app}/v1/nope", timeout=30), 404, "not_found", "/v1/nope"),
        (lambda: requests.get(f"{main_app}/v1/tag", timeout=30), 405, "method_not_allowed", "GET"),
        (lambda: requests.delete(f"{main_app}/healthz", timeout=30), 405, "method_not_allowed", "DELETE"),
        (lambda: post(f"{main_app}/v1/search?k=x", jpeg), 400, "bad_request", "query parameter k: "),
    ]
    for call, status, code, phrase in cases:
        r = call()
        body = r.json()
        assert r.status_code == status and set(body) == {"error", "message", "status"}, r.text
        assert body["status"] == status and body["error"] == code and phrase in body["message"], r.text


def test_live_reconfigure_changes_batching_without_restart(cluster):
    app = deploy(cluster, "reconf", {}, user_config={"max_batch_size": 4, "batch_wait_timeout_s": 0.0,
                                                     "max_pending": 32})
    first = handle("reconf").stats.remote().result()
    assert first["batching"]["max_batch_size"] == 4
    deploy(cluster, "reconf", {}, user_config={"max_batch_size": 8, "batch_wait_timeout_s": 0.02,
                                               "max_pending": 32})
    second = handle("reconf").stats.remote().result()
    assert second["batching"] == {"max_batch_size": 8, "batch_wait_timeout_s": 0.02, "max_pending": 32}
    assert second["pid"] == first["pid"]  # same replica: reconfigure(), not a redeploy
    assert post(f"{app}/v1/tag", images(1)[0]).status_code == 200
    from lens.errors import ConfigError

    with pytest.raises(ConfigError, match="max_batch_size 128 > max_ongoing_requests 64"):
        deploy(cluster, "reconf", {}, max_ongoing_requests=64,
               user_config={"max_batch_size": 128, "batch_wait_timeout_s": 0.0, "max_pending": 256})


def test_backpressure_gives_503_with_retry_after_and_recovers(cluster):
    # A replica holds at most 4 images and a batch may wait 1 s to fill: a burst of 32 overflows.
    app = deploy(cluster, "bp", {}, max_ongoing_requests=64,
                 user_config={"max_batch_size": 4, "batch_wait_timeout_s": 1.0, "max_pending": 4})
    results = asyncio.run(_concurrent(f"{app}/v1/tag", images(32)))
    statuses = [s for s, _, _ in results]
    assert set(statuses) == {200, 503} and statuses.count(200) >= 4
    rejected = [(b, h) for s, b, h in results if s == 503]
    assert all(b["error"] == "overloaded" and h.get("Retry-After") == "1" for b, h in rejected)
    assert post(f"{app}/v1/tag", images(1)[0]).status_code == 200


def test_request_timeout_gives_504(cluster):
    # A 2000x1500 noise PNG takes far longer than 20 ms to read, decode and resize.
    from PIL import Image

    big = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)), "PNG")
    app = deploy(cluster, "slow", {"api": {"request_timeout_s": 0.02, "max_body_bytes": 32 * 1024 * 1024}})
    r = post(f"{app}/v1/tag", big, "image/png")
    assert r.status_code == 504, r.text
    assert r.json()["error"] == "timeout" and "0.02" in r.json()["message"]


def test_body_limit_with_and_without_content_length(cluster):
    app = deploy(cluster, "small", {"api": {"max_body_bytes": 2000}})
    r = post(f"{app}/v1/tag", b"\xff\xd8\xff" + b"\x00" * 5000)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"

    def chunked():
        for _ in range(10):
            yield b"\xff\xd8\xff" + b"\x00" * 997

    r = requests.post(f"{app}/v1/tag", data=chunked(), headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"


def test_api_keys(cluster, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\nk-0123456789abcdef\nk-fedcba9876543210\n")
    app = deploy(cluster, "auth", {"api": {"api_keys_file": str(keys), "api_keys_env": None}})
    jpeg = images(1)[0]
    assert post(f"{app}/v1/tag", jpeg).status_code == 401
    r = post(f"{app}/v1/tag", jpeg, headers={"Authorization": "Bearer wrong-key-0000000000"})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert post(f"{app}/v1/tag", jpeg, headers={"Authorization": "Bearer k-fedcba9876543210"}).status_code == 200
    assert post(f"{app}/v1/tag", jpeg, headers={"X-API-Key": "k-0123456789abcdef"}).status_code == 200


def test_docs_and_models_need_a_key_unless_public_and_bearer_takes_precedence(cluster, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("k-0123456789abcdef\n")
    app = deploy(cluster, "auth-docs", {"api": {"api_keys_file": str(keys), "api_keys_env": None}})
    good, bad = {"X-API-Key": "k-0123456789abcdef"}, {"X-API-Key": "wrong-key-00000000"}
    for path in ("/docs", "/redoc", "/openapi.json", "/v1/models"):
        r = requests.get(f"{app}{path}", timeout=30)
        assert r.status_code == 401 and r.json() == {
            "error": "unauthorized", "status": 401,
            "message": "missing or wrong API key (Authorization: Bearer KEY or X-API-Key)"}, (path, r.text)
        assert requests.get(f"{app}{path}", headers=good, timeout=30).status_code == 200, path
    assert "/v1/tag" in requests.get(f"{app}/openapi.json", headers=good, timeout=30).json()["paths"]
    assert requests.get(f"{app}/healthz", timeout=30).status_code == 200  # probes never need a key
    jpeg = images(1)[0]
    # Authorization, when sent, is the only credential read: a wrong Bearer fails even beside a good X-API-Key
    both_wrong_bearer = {"Authorization": "Bearer wrong-key-00000000"} | good
    assert post(f"{app}/v1/tag", jpeg, headers=both_wrong_bearer).status_code == 401
    assert post(f"{app}/v1/tag", jpeg, headers={"Authorization": "Bearer k-0123456789abcdef"} | bad).status_code == 200
    assert post(f"{app}/v1/tag", jpeg, headers={"Authorization": "Basic abc"} | good).status_code == 401

    app = deploy(cluster, "auth-public", {"api": {"api_keys_file": str(keys), "api_keys_env": None,
                                                  "public_docs": True}})
    assert requests.get(f"{app}/openapi.json", timeout=30).status_code == 200
    assert requests.get(f"{app}/v1/models", timeout=30).status_code == 200
    assert post(f"{app}/v1/tag", jpeg).status_code == 401  # the API itself still needs a key


def test_healthz_answers_503_quickly_while_a_deployment_cannot_be_placed_and_lens_refuses_such_a_config(
        cluster, tmp_path, tiny):
    from lens.errors import ConfigError
    from serve.run import deploy as deploy_doc

    root = _index_from(tmp_path, "idx-unplaced", ["a", "b", "c"], np.eye(3, tiny.embed_dim), tiny.info(),
                       index="flat")
    port = int(cluster.rsplit(":", 1)[1])
    args = {"pools": [{"name": "Tagger", "model": TINY, "num_cpus": 1}],
            "search": {"index": root, "num_cpus": 64}}  # this cluster has 6 CPUs
    doc = {"http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": "unplaced", "route_prefix": "/unplaced", "import_path": "serve.app:build_app",
                             "args": args}]}
    with pytest.raises(ConfigError, match=r"needs 65 CPUs \(Tagger 1 x 1, IndexSearcher 1 x 64\) but this Ray "
                                          r"cluster has 6"):
        deploy_doc(doc, where="test")
    deploy_doc(doc, where="test", check_fit=False, wait=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the ingress replica itself is up and answering
        t0 = time.monotonic()
        try:
            r = requests.get(f"{cluster}/unplaced/healthz", timeout=30)
        except requests.RequestException:
            r = None
        if r is not None and r.headers.get("content-type", "").startswith("application/json"):
            break
        time.sleep(1)
    assert r is not None and r.status_code == 503, r and r.text
    assert r.json()["error"] == "not_ready" and "index searcher" in r.json()["message"]
    assert time.monotonic() - t0 < 10  # health_timeout_s is 3 s: an answer, not a hang


def test_killed_replica_is_replaced_and_errors_stay_bounded(cluster):
    app = deploy(cluster, "kill", {}, num_replicas=2, health_check_period_s=1)
    bodies = images(8, seed=3)
    before = replicas("kill")
    assert len(before) == 2
    victim = before[0]
    ok = failed = 0
    t0 = time.monotonic()
    killed = False
    while time.monotonic() - t0 < 12:
        for status, _, _ in asyncio.run(_concurrent(f"{app}/v1/tag", bodies)):
            ok += status == 200
            failed += status != 200
        if not killed and time.monotonic() - t0 > 2:
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            killed = True
    assert killed and ok > 0 and failed / (ok + failed) < 0.2
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alive = replicas("kill")
        if len(alive) == 2 and victim not in alive:
            break
        time.sleep(1)
    else:
        pytest.fail("killed replica was not replaced")
    assert post(f"{app}/v1/tag", images(1)[0]).status_code == 200


def test_failing_health_check_replaces_the_replica(cluster):
    app = deploy(cluster, "health", {}, health_check_period_s=1, health_check_timeout_s=5)
    h = handle("health")
    old = h.recycle.remote("test").result()["pid"]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if h.stats.remote().result(timeout_s=10)["pid"] != old:
                break
        except Exception:  # noqa: BLE001 - the old replica may be going away
            pass
        time.sleep(1)
    else:
        pytest.fail("unhealthy replica was not replaced")
    assert requests.get(f"{app}/healthz", timeout=30).status_code == 200


def test_scale_from_zero_serves_the_first_request_after_warm_up(cluster):
    app = deploy(cluster, "zero", {}, autoscaling_config={
        "min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0,
        "downscale_delay_s": 600, "target_ongoing_requests": 1})
    assert replicas("zero") == []
    r = post(f"{app}/v1/tag", images(1)[0])
    assert r.status_code == 200, r.text
    info = handle("zero").info.remote().result()
    assert info["warmed_up"] is True and info["cold_start_s"] > 0


def test_two_pools_side_by_side_with_overflow(cluster):
    from serve.run import deploy as deploy_doc

    port = int(cluster.rsplit(":", 1)[1])
    small = {"model": TINY, "num_cpus": 1}
    doc = {"http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": "pools", "route_prefix": "/pools", "import_path": "serve.app:build_app",
                             "args": {"pools": [{"name": "First"} | small, {"name": "Second"} | small]},
                             "deployments": [{"name": "First", "user_config": {
                                 "max_batch_size": 4, "batch_wait_timeout_s": 1.0, "max_pending": 4}}]}]}
    deploy_doc(doc, where="test pools", timeout_s=300)
    app = f"{cluster}/pools"
    results = asyncio.run(_concurrent(f"{app}/v1/tag", images(24)))
    assert all(s == 200 for s, _, _ in results)  # First holds 4 at a time; the burst overflows to Second
    first = handle("pools", "First").stats.remote().result()["images"]
    second = handle("pools", "Second").stats.remote().result()["images"]
    assert first + second == 24 and second >= 1
    assert {p["pool"] for p in requests.get(f"{app}/v1/models", timeout=30).json()["pools"]} == {"First", "Second"}
    r = post(f"{app}/v1/tag?pool=Nope", images(1)[0])
    assert r.status_code == 400 and r.json()["error"] == "unknown_pool"


def _index_from(tmp_path, name: str, ids: list[str], vectors, model_info: dict, **kw) -> str:
    """An index root built from one embedding part written as the event path writes them."""
    import json as _json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from index.build import BuildConfig, build_index

    part = tmp_path / f"{name}-emb" / "part-0.parquet"
    part.parent.mkdir(parents=True, exist_ok=True)
    vectors = np.asarray(vectors, np.float32)
    pq.write_table(pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(vectors.ravel()), vectors.shape[1]), "top1": ["x"] * len(ids)},
        metadata={b"lens_model": _json.dumps(model_info).encode()}), part)
    build_index(BuildConfig(embeddings=[str(part.parent), *kw.pop("extra", [])], output=str(tmp_path / name),
                            queries=20, **kw), log=lambda *a: None)
    return str(tmp_path / name)


def test_search_routes_by_image_id_and_vector_with_delta_and_hot_swap(cluster, tmp_path, tiny):
    import json as _json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from index.build import BuildConfig, build_index

    bodies = images(30, seed=11)
    ids = [f"img-{i}" for i in range(30)]
    emb = np.stack([r.embedding for r in tiny.predict(bodies)])
    root = _index_from(tmp_path, "idx", ids, emb, tiny.info(), index="hnsw")
    events = tmp_path / "events"
    events.mkdir()
    app = deploy(cluster, "search", {"search": {"index": root, "refresh_s": 0.5, "delta_sources": [str(events)]}})

    r = post(f"{app}/v1/search?k=5", bodies[3])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["results"][0]["id"] == "img-3" and body["results"][0]["score"] > 0.99
    assert len(body["results"]) == 5 and body["index_version"].startswith("v-")
    first_version = body["index_version"]

    r = requests.get(f"{app}/v1/search/img-3?k=4", timeout=30)
    assert r.status_code == 200 and len(r.json()["results"]) == 4
    assert "img-3" not in [h["id"] for h in r.json()["results"]]
    assert requests.get(f"{app}/v1/search/nope", timeout=30).status_code == 404
    assert requests.get(f"{app}/v1/search/img-3?k=0", timeout=30).status_code == 400
    r = requests.get(f"{app}/v1/search/img-3?k=500", timeout=30)  # above the searcher's max_k (100)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request", r.text

    r = requests.post(f"{app}/v1/search:vector?k=3", json={"vector": emb[7].tolist()}, timeout=30)
    assert r.status_code == 200 and r.json()["results"][0]["id"] == "img-7"
    r = requests.post(f"{app}/v1/search:vector?k=2", json={"vectors": emb[:4].tolist()}, timeout=30)
    assert [hits[0]["id"] for hits in r.json()["results"]] == ids[:4]
    r = requests.post(f"{app}/v1/search:vector", json={"vector": [1.0, 2.0]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"] == "invalid_vector"
    # malformed vectors are refused at the ingress, before a handle, with no internals in the message
    for body in ({"vector": ["x"] * 1280}, {"vector": [True] * 256}, {"vectors": [[0.1] * 256, [0.1] * 3]},
                 {"vector": [[0.1]] * 256}, {"vectors": []}, {"vector": "0.1,0.2"}):
        r = requests.post(f"{app}/v1/search:vector", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"] == "invalid_vector", r.text
        assert "Error" not in r.json()["message"] and "pid" not in r.json()["message"], r.text
    nested = b"[" * 100_000 + b"]" * 100_000
    r = requests.post(f"{app}/v1/search:vector", data=nested, timeout=30)
    assert r.status_code == 400 and r.json()["error"] == "bad_request" and "nested" in r.json()["message"], r.text
    assert requests.post(f"{app}/v1/search:vector", data=b"{nope", timeout=30).status_code == 400
    assert post(f"{app}/v1/search", b"not an image").status_code in (400, 415)

    # an image tagged by the event path becomes searchable without a rebuild (delta) ...
    new = images(1, seed=99)[0]
    new_emb = tiny.predict([new])[0].embedding
    pq.write_table(pa.table({"id": ["s3://b/new.jpg"], "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(new_emb.astype(np.float32)), len(new_emb)), "top1": ["x"]},
        metadata={b"lens_model": _json.dumps(tiny.info()).encode()}), events / "part-new.parquet")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        top = post(f"{app}/v1/search?k=3", new).json()["results"][0]["id"]
        if top == "s3://b/new.jpg":
            break
        time.sleep(0.5)
    assert top == "s3://b/new.jpg"
    # ... and a new build (with the event parts merged) is swapped in, with the item once
    build_index(BuildConfig(embeddings=[str(tmp_path / "idx-emb"), str(events)], output=root, queries=20,
                            index="ivf-flat"), log=lambda *a: None)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = post(f"{app}/v1/search?k=5", new).json()
        if body["index_version"] != first_version:
            break
        time.sleep(0.5)
    assert body["index_version"] != first_version
    got = [h["id"] for h in body["results"]]
    assert got[0] == "s3://b/new.jpg" and got.count("s3://b/new.jpg") == 1


def test_search_refuses_an_index_built_with_another_model(cluster, tmp_path, tiny):
    info = tiny.info() | {"weights_sha256": "0" * 64}
    root = _index_from(tmp_path, "idx-other", ["a", "b", "c"], np.eye(3, tiny.embed_dim), info, index="flat")
    app = deploy(cluster, "search-mm", {"search": {"index": root}})
    r = post(f"{app}/v1/search", images(1)[0])
    assert r.status_code == 409 and r.json()["error"] == "model_mismatch", r.text
    # a query by vector or id does not involve the serving model
    assert requests.get(f"{app}/v1/search/a?k=2", timeout=30).status_code == 200

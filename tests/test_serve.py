"""The online tagging service on a real local Ray Serve, with a tiny real model (seeded random weights)."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import ray
import requests
from conftest import encode, wait_for
from ray import serve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY = {"name": "test_efficientnet", "weights": "random", "backend": "onnx", "device": "cpu"}


@pytest.fixture(scope="module")
def cluster(serve_cluster):
    """The session's shared Serve cluster (conftest); this module's applications are deleted when it ends."""
    yield serve_cluster
    for name in serve.status().applications:
        serve.delete(name)


def deploy(cluster, name: str, args: dict, **overrides) -> str:
    """Deploy one Lens application through the same path as `lens serve` (a Serve config document).

    Like `serve deploy`, a config replaces every application not in it, so each test's app
    replaces the previous one and the cluster never holds more than a couple of replicas."""
    from lens.serve.run import deploy as deploy_doc

    args = {"pools": [{"name": "Tagger", "model": TINY, "num_cpus": 1} | args.pop("pool", {})]} | args
    deployment = {"name": args["pools"][0]["name"]} | overrides
    port = int(cluster.rsplit(":", 1)[1])
    doc = {"http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": name, "route_prefix": f"/{name}", "import_path": "lens.serve.app:build_app",
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


def expect(r, status: int, error: str, phrase: str = "") -> dict:
    """The response is ``status`` with Lens's error body: exactly error, message and status, and the code named."""
    body = r.json()
    assert r.status_code == status and set(body) == {"error", "message", "status"}, r.text
    assert body["status"] == status and body["error"] == error and phrase in body["message"], r.text
    return body


class Burst:
    """``n`` concurrent requests sent from a background thread, so the test can act while they are in flight."""

    def __init__(self, url: str, bodies: list[bytes]) -> None:
        import threading

        self.results = None
        self._t = threading.Thread(target=lambda: setattr(self, "results", asyncio.run(_concurrent(url, bodies))))
        self._t.start()

    def join(self) -> list:
        self._t.join(120)
        assert self.results is not None, "burst did not finish"
        return self.results


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
def main_app(cluster, tiny_head):
    return deploy(cluster, "main", {"pool": {"model": TINY | {"heads": [tiny_head]}, "concurrent_batches": 2}},
                  max_ongoing_requests=64,
                  user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.05, "max_pending": 64})


def test_routes_and_errors(main_app, photos, tiny_head):
    jpeg = images(1)[0]
    r = post(f"{main_app}/v1/tag?top_k=3", jpeg)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "test_efficientnet" and len(body["tags"]) == 3 and body["latency_ms"] > 0
    assert set(body["tags"][0]) == {"label", "class_id", "score"}
    r = requests.post(f"{main_app}/v1/tag", files={"image": ("x.jpg", jpeg, "image/jpeg")}, timeout=60)
    assert r.status_code == 200 and len(r.json()["tags"]) == 5
    # phone uploads: HEIC (iPhones) and AVIF (Android), as raw bodies with their media types
    import io

    from PIL import Image

    for fmt, mime in (("HEIF", "image/heic"), ("AVIF", "image/avif")):
        buf = io.BytesIO()
        Image.open(io.BytesIO(jpeg)).save(buf, fmt, quality=90)
        r = requests.post(f"{main_app}/v1/tag?top_k=3", data=buf.getvalue(), headers={"Content-Type": mime},
                          timeout=60)
        assert r.status_code == 200 and len(r.json()["tags"]) == 3, (fmt, r.text)
    r = post(f"{main_app}/v1/embed", jpeg)
    assert r.status_code == 200 and r.json()["dim"] == 256 and len(r.json()["embedding"]) == 256
    r = requests.post(f"{main_app}/v1/tag:batch", timeout=60, files=[
        ("image", ("a.jpg", jpeg, "image/jpeg")), ("image", ("b.bin", b"garbage", "image/jpeg")),
        ("image", ("c.png", photos["coffee.png"], "image/png"))])
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1, 2]
    assert "tags" in results[0] and results[1]["status"] == 415 and "tags" in results[2]
    assert [t["label"] for t in results[0]["custom_tags"]["colours"]] in (["red", "green"], ["green", "red"])
    assert requests.get(f"{main_app}/healthz", timeout=30).json()["status"] == "ok"
    (info,) = requests.get(f"{main_app}/v1/models", timeout=30).json()["pools"]
    assert info["model"] == "test_efficientnet" and info["backend"] == "onnx" and info["device"] == "cpu"
    assert info["preprocess"]["input_size"] == [3, 160, 160] and info["weights_sha256"]
    r = post(f"{main_app}/v1/tag?top_k=0", jpeg)
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    # the pool serves the head on the same forward pass: its custom tags are the head applied to the embedding
    from lens.runtime.heads import load_head

    head = load_head(tiny_head)
    emb = np.asarray(post(f"{main_app}/v1/embed", jpeg).json()["embedding"], np.float32)
    custom = post(f"{main_app}/v1/tag", jpeg).json()["custom_tags"]
    (want,) = head.tags(emb[None])
    assert [t["label"] for t in custom["colours"]] == [t["label"] for t in want]  # blue is never above 1.01
    assert np.allclose([t["score"] for t in custom["colours"]], [t["score"] for t in want], atol=1e-4)
    assert info["heads"] == [head.info()]
    # custom_top_k: the head's best guesses, blue included, each marked whether it passed its threshold
    ranked = post(f"{main_app}/v1/tag?custom_top_k=3", jpeg).json()["custom_tags"]["colours"]
    probs = head.probabilities(emb[None])[0]
    assert [t["label"] for t in ranked] == [head.labels[i] for i in np.argsort(-probs)]
    assert {t["label"]: t["passed"] for t in ranked} == {"red": True, "green": True, "blue": False}
    r = requests.post(f"{main_app}/v1/tag:batch?custom_top_k=1", files=[("image", ("a.jpg", jpeg, "image/jpeg"))],
                      timeout=60)
    assert len(r.json()["results"][0]["custom_tags"]["colours"]) == 1, r.text
    r = post(f"{main_app}/v1/tag?custom_top_k=0", jpeg)
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    # what the pool runs, after auto and the int8 gate chose
    assert info["served"]["backend"] == "onnx" and info["served"]["precision"] == "fp32"


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


def test_48_in_flight_each_response_is_its_own_and_batches_form(main_app, tiny):
    bodies = images(48, seed=7)
    expected = [p.embedding for p in tiny.predict(bodies)]
    h = handle("main")
    # the model waits: all 48 are accepted, decoded and queued (below max_ongoing_requests 64, so the stats
    # and release calls still reach the replica)
    before = h.hold_batches.remote(True).result()
    try:
        burst = Burst(f"{main_app}/v1/embed", bodies)
        wait_for(lambda: (lambda st: st["in_flight"] == 48 and st["decoding"] == 0)(h.stats.remote().result()),
                 "48 requests did not all reach the replica")
    finally:
        h.hold_batches.remote(False).result()
    results = burst.join()
    assert all(status == 200 for status, _, _ in results)
    got = np.array([body["embedding"] for _, body, _ in results], dtype=np.float32)
    sims = got @ np.stack(expected).T
    assert np.all(np.diag(sims) > 0.999)  # each response matches its own image ...
    assert np.all(sims.argmax(axis=1) == np.arange(48))  # ... and no other
    after = h.stats.remote().result()
    assert after["images"] - before["images"] == 48
    # the first (held) batch, then the queued images in batches of up to max_batch_size (16). Ray's batch queue
    # takes each request a few event-loop turns after it leaves decoding, so the first batches after the release
    # may be partial; 48 images still take at most 6 model calls, where without batching they would take 48.
    sizes = after["recent_batch_sizes"][-(after["batches"] - before["batches"]):]
    assert sum(sizes) == 48 and max(sizes) <= 16 and len(sizes) <= 6, sizes
    # two batches ran on the model at once (the pool's concurrent_batches), and no more, each answer its own
    assert after["concurrent_batches"] == 2 and after["max_concurrent_seen"] == 2, after


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


def test_the_python_client_over_the_real_app(main_app, photos):
    from lens.client import AsyncLensClient, LensAPIError, LensClient

    lens = LensClient(main_app)
    assert lens.health()["status"] == "ok" and lens.models()["pools"][0]["pool"] == "Tagger"
    one = lens.tag(photos["coffee.png"], top_k=2, embedding=True)
    assert len(one["tags"]) == 2 and len(one["embedding"]) == one["model_identity"]["embed_dim"]
    assert "colours" in one["custom_tags"] and len(one["sha256"]) == 64
    batch = lens.tag_batch([photos["coffee.png"], b"junk", photos["rocket.jpg"]], top_k=1)
    assert [r.get("status") for r in batch["results"]] == [None, 415, None]
    assert lens.embed(photos["rocket.jpg"])["dim"] == len(one["embedding"])
    with pytest.raises(LensAPIError) as e:
        lens.tag(b"junk")
    assert e.value.http_status == 415 and e.value.code == "unsupported_media_type"
    with pytest.raises(LensAPIError) as e:
        lens.search(id="x")
    assert e.value.http_status == 404 and e.value.code == "search_not_configured"

    async def go():
        async with AsyncLensClient(main_app) as alens:
            return await asyncio.gather(*(alens.tag(photos[n], top_k=1) for n in sorted(photos)[:6]))

    answers = asyncio.run(go())
    assert len(answers) == 6 and all(a["tags"] for a in answers)


def test_a_lone_request_never_waits_for_a_batch_to_fill(cluster):
    # batch_wait_timeout_s is 5 s (the most allowed): a lone image goes to the model at once (the replica sets
    # the wait to 0 while no other image is decoding), counted by the replica as it decides
    app = deploy(cluster, "lone", {}, user_config={"max_batch_size": 8, "batch_wait_timeout_s": 5.0,
                                                   "max_pending": 32})
    h = handle("lone")
    for body in images(3, seed=5):
        r = requests.post(f"{app}/v1/tag", data=body, headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200, r.text
    st = h.stats.remote().result()
    assert st["batches"] == 3 and st["dispatch"] == {"at_once": 3, "held_open": 0}, st
    # eight at once: each batch closes once it holds the images in the replica (batch_limit), not after 5 s
    results = Burst(f"{app}/v1/tag", images(8, seed=6)).join()
    assert [status for status, _, _ in results] == [200] * 8
    after = h.stats.remote().result()
    assert after["images"] - st["images"] == 8


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
    # A replica holds at most 4 images; its model is held, so exactly 4 of a burst of 32 get in.
    app = deploy(cluster, "bp", {}, max_ongoing_requests=64,
                 user_config={"max_batch_size": 4, "batch_wait_timeout_s": 0.0, "max_pending": 4})
    h = handle("bp")
    h.hold_batches.remote(True).result()
    try:
        burst = Burst(f"{app}/v1/tag", images(32))
        wait_for(lambda: h.stats.remote().result()["overloaded"] == 28, "28 of 32 requests were not refused")
    finally:
        h.hold_batches.remote(False).result()
    results = burst.join()
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) == 4 and statuses.count(503) == 28
    for status, body, headers in results:
        if status == 503:
            assert body == {"error": "overloaded", "status": 503,
                            "message": "replica is at max_pending=4 images; retry later"} and headers["Retry-After"] == "1"
        else:
            assert len(body["tags"]) == 5
    assert post(f"{app}/v1/tag", images(1)[0]).status_code == 200


def test_request_timeout_gives_504(cluster):
    # the model is held, so the request cannot finish within request_timeout_s whatever the machine's speed
    app = deploy(cluster, "slow", {"api": {"request_timeout_s": 0.5}})
    h = handle("slow")
    h.hold_batches.remote(True).result()
    try:
        expect(post(f"{app}/v1/tag", images(1)[0]), 504, "timeout", "0.5")
    finally:
        h.hold_batches.remote(False).result()
    assert post(f"{app}/v1/tag", images(1)[0]).status_code == 200


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


def test_tag_batch_limits_items_total_bytes_and_each_image(cluster):
    app = deploy(cluster, "batch-limits", {"api": {"max_batch_items": 3, "max_batch_body_bytes": 60_000,
                                                   "max_body_bytes": 20_000}})
    small = images(4, seed=8)
    assert all(len(b) < 20_000 for b in small)

    def send(bodies):
        return requests.post(f"{app}/v1/tag:batch", files=[("image", (f"{i}.jpg", b, "image/jpeg"))
                                                            for i, b in enumerate(bodies)], timeout=60)

    r = send(small[:3])
    assert r.status_code == 200 and [x["index"] for x in r.json()["results"]] == [0, 1, 2], r.text
    assert all(len(x["tags"]) == 5 for x in r.json()["results"])
    expect(send(small), 400, "bad_request", "4 images in one request; the limit is 3")
    big = b"\xff\xd8\xff" + b"\x00" * 30_000
    expect(send([small[0], big]), 413, "image_too_large", "image 1 is")  # one image over max_body_bytes
    expect(send([big, big]), 413, "body_too_large")  # the whole body over max_batch_body_bytes
    r = send([b"\xff\xd8\xff" + b"\x00" * 19_000] * 3)  # 57 kB: within every limit, each image undecodable
    assert r.status_code == 200 and [x["status"] for x in r.json()["results"]] == [400, 400, 400], r.text


def test_api_keys(cluster, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\nk-0123456789abcdef\nk-fedcba9876543210\n")
    app = deploy(cluster, "auth", {"api": {"api_keys_file": str(keys), "api_keys_env": None}})
    jpeg = images(1)[0]
    expect(post(f"{app}/v1/tag", jpeg), 401, "unauthorized", "missing or wrong API key")
    expect(post(f"{app}/v1/tag", jpeg, headers={"Authorization": "Bearer wrong-key-0000000000"}), 401,
           "unauthorized")
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
    served = requests.get(f"{app}/openapi.json", headers=good, timeout=30).json()  # from the real app
    assert "image/jpeg" in served["paths"]["/v1/tag"]["post"]["requestBody"]["content"]
    assert served["paths"]["/v1/tag"]["post"]["responses"]["415"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"}
    assert requests.get(f"{app}/healthz", timeout=30).status_code == 200  # probes never need a key
    jpeg = images(1)[0]
    # Authorization, when sent, is the only credential read: a wrong Bearer fails even beside a good X-API-Key
    both_wrong_bearer = {"Authorization": "Bearer wrong-key-00000000"} | good
    expect(post(f"{app}/v1/tag", jpeg, headers=both_wrong_bearer), 401, "unauthorized")
    assert post(f"{app}/v1/tag", jpeg, headers={"Authorization": "Bearer k-0123456789abcdef"} | bad).status_code == 200
    expect(post(f"{app}/v1/tag", jpeg, headers={"Authorization": "Basic abc"} | good), 401, "unauthorized")

    app = deploy(cluster, "auth-public", {"api": {"api_keys_file": str(keys), "api_keys_env": None,
                                                  "public_docs": True}})
    assert requests.get(f"{app}/openapi.json", timeout=30).status_code == 200
    assert requests.get(f"{app}/v1/models", timeout=30).status_code == 200
    expect(post(f"{app}/v1/tag", jpeg), 401, "unauthorized")  # the API itself still needs a key


def test_healthz_answers_503_quickly_while_a_deployment_cannot_be_placed_and_lens_refuses_such_a_config(
        cluster, tmp_path, tiny):
    from lens.serve.run import deploy as deploy_doc

    from lens.errors import ConfigError

    root = _index_from(tmp_path, "idx-unplaced", ["a", "b", "c"], np.eye(3, tiny.embed_dim), tiny.info(),
                       index="flat")
    port = int(cluster.rsplit(":", 1)[1])
    args = {"pools": [{"name": "Tagger", "model": TINY, "num_cpus": 1}],
            "search": {"index": root, "num_cpus": 64}}  # this cluster has 2 CPUs
    doc = {"http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": "unplaced", "route_prefix": "/unplaced", "import_path": "lens.serve.app:build_app",
                             "args": args}]}
    with pytest.raises(ConfigError, match=r"needs 65 CPUs \(Tagger 1 x 1, IndexSearcher 1 x 64\) but this Ray "
                                          r"cluster has 2"):
        deploy_doc(doc, where="test")
    deploy_doc(doc, where="test", check_fit=False, wait=False)
    body = _first_json_health(f"{cluster}/unplaced/healthz")
    assert body == {"error": "not_ready", "status": 503, "message": body["message"]} and \
        "index searcher" in body["message"], body

    # a model pool that is not up yet (not placed: it can never warm up here) makes /healthz 503 the same way
    args = {"pools": [{"name": "First", "model": TINY, "num_cpus": 1},
                      {"name": "Later", "model": TINY, "num_cpus": 64}]}
    doc["applications"][0]["args"] = args
    deploy_doc(doc, where="test", check_fit=False, wait=False)
    body = _first_json_health(f"{cluster}/unplaced/healthz", lambda b: "model pools" in b["message"])
    assert body["error"] == "not_ready" and body["status"] == 503, body

    # one pool that cannot be placed (its replica would be the ingress too): --skip-resource-check gives it a
    # separate ingress, so /healthz answers 503 instead of nothing
    doc["applications"][0]["args"] = {"pools": [{"name": "Alone", "model": TINY, "num_cpus": 64}]}
    deploy_doc(doc, where="test", check_fit=False, wait=False)
    assert doc["applications"][0]["args"]["separate_ingress"] is True
    body = _first_json_health(f"{cluster}/unplaced/healthz", lambda b: "model pools" in b["message"])
    assert body["error"] == "not_ready" and body["status"] == 503, body


def _first_json_health(url: str, want=lambda body: True) -> dict:
    """The first JSON answer of ``url`` (once the ingress replica is up) that ``want`` accepts. A health check that
    hangs on the unplaced deployment never answers (each try gives up after 30 s; the test fails after 240 s):
    the JSON 503 naming what is not ready is the evidence that it answers instead of waiting."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            r = requests.get(url, timeout=30)
        except requests.RequestException:
            r = None
        if r is not None and r.headers.get("content-type", "").startswith("application/json") and want(r.json()):
            assert r.status_code == 503, r.text
            return r.json()
        time.sleep(0.2)
    pytest.fail(f"{url} never answered")


def test_killed_replica_is_replaced_and_errors_stay_bounded(cluster):
    app = deploy(cluster, "kill", {}, num_replicas=2, health_check_period_s=1)
    bodies = images(8, seed=3)
    before = replicas("kill")
    assert len(before) == 2
    victim = before[0]

    def round_() -> list[int]:
        return [status for status, _, _ in asyncio.run(_concurrent(f"{app}/v1/tag", bodies))]

    assert round_() == [200] * 8
    # killed between rounds (nothing in flight): only requests routed to it before Serve notices may fail
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    statuses = [s for _ in range(6) for s in round_()]
    assert statuses.count(200) >= len(statuses) - len(bodies), statuses
    assert set(statuses) <= {200, 500, 503}, statuses
    wait_for(lambda: (lambda alive: len(alive) == 2 and victim not in alive)(replicas("kill")),
             "killed replica was not replaced", timeout_s=90)
    assert round_() == [200] * 8


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
        time.sleep(0.2)
    else:
        pytest.fail("unhealthy replica was not replaced")
    assert requests.get(f"{app}/healthz", timeout=30).status_code == 200


def test_scale_from_zero_serves_the_first_request_after_warm_up(cluster):
    app = deploy(cluster, "zero", {}, autoscaling_config={
        "min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0,
        "downscale_delay_s": 600, "target_ongoing_requests": 1})
    assert replicas("zero") == []
    sent = time.time()
    r = post(f"{app}/v1/tag", images(1)[0])
    received = time.time()
    assert r.status_code == 200, r.text
    (replica,) = replicas("zero")
    info = handle("zero").info.remote().result()
    # the replica came up after the request was sent, warmed up before it answered, and answered this request
    assert sent < info["ready_at"] < received and info["warmed_up"] is True
    assert handle("zero").stats.remote().result()["images"] == 1


def test_two_pools_side_by_side_with_overflow(cluster):
    from lens.serve.run import deploy as deploy_doc

    port = int(cluster.rsplit(":", 1)[1])
    small = {"model": TINY, "num_cpus": 1}
    doc = {"http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": "pools", "route_prefix": "/pools", "import_path": "lens.serve.app:build_app",
                             "args": {"pools": [{"name": "First"} | small, {"name": "Second"} | small]},
                             "deployments": [{"name": "First", "user_config": {
                                 "max_batch_size": 4, "batch_wait_timeout_s": 1.0, "max_pending": 4}}]}]}
    deploy_doc(doc, where="test pools", timeout_s=300)
    app = f"{cluster}/pools"
    first = handle("pools", "First")
    first.hold_batches.remote(True).result()  # First takes 4 and is full; the other 20 must overflow to Second
    try:
        burst = Burst(f"{app}/v1/tag", images(24))
        wait_for(lambda: handle("pools", "Second").stats.remote().result()["images"] == 20,
                 "the burst did not overflow to the second pool")
    finally:
        first.hold_batches.remote(False).result()
    assert all(s == 200 for s, _, _ in burst.join())
    assert first.stats.remote().result()["images"] == 4 and first.stats.remote().result()["overloaded"] == 20
    assert {p["pool"] for p in requests.get(f"{app}/v1/models", timeout=30).json()["pools"]} == {"First", "Second"}
    r = post(f"{app}/v1/tag?pool=Nope", images(1)[0])
    assert r.status_code == 400 and r.json()["error"] == "unknown_pool"


def _index_from(tmp_path, name: str, ids: list[str], vectors, model_info: dict, **kw) -> str:
    """An index root built from one embedding part written as the event path writes them."""
    import json as _json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from lens.index.build import BuildConfig, build_index

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
    from lens.index.build import BuildConfig, build_index

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
    expect(requests.get(f"{app}/v1/search/nope", timeout=30), 404, "not_found", "no id 'nope'")
    expect(requests.get(f"{app}/v1/search/img-3?k=0", timeout=30), 400, "invalid_request",
           "k must be between 1 and 100, got 0")
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
    js = {"Content-Type": "application/json"}
    r = requests.post(f"{app}/v1/search:vector", data=nested, headers=js, timeout=30)
    assert r.status_code == 400 and r.json()["error"] == "bad_request" and "nested" in r.json()["message"], r.text
    expect(requests.post(f"{app}/v1/search:vector", data=b"{nope", headers=js, timeout=30), 400, "bad_request")
    # a JSON body only as application/json (a page of another origin can send text/plain without a preflight)
    expect(requests.post(f"{app}/v1/search:vector", data=b'{"vector": [0.1]}', timeout=30,
                         headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type", "application/json")
    expect(post(f"{app}/v1/search", b"not an image"), 415, "unsupported_media_type")

    # an image tagged by the event path becomes searchable without a rebuild (delta) ...
    new = images(1, seed=99)[0]
    new_emb = tiny.predict([new])[0].embedding
    pq.write_table(pa.table({"id": ["s3://b/new.jpg"], "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(new_emb.astype(np.float32)), len(new_emb)), "top1": ["x"]},
        metadata={b"lens_model": _json.dumps(tiny.info()).encode()}), events / "part-new.parquet")
    deadline = time.monotonic() + 120  # a failure bound: the loop ends when the delta answers
    while time.monotonic() < deadline:
        top = post(f"{app}/v1/search?k=3", new).json()["results"][0]["id"]
        if top == "s3://b/new.jpg":
            break
        time.sleep(0.2)
    assert top == "s3://b/new.jpg"
    # ... and a new build (with the event parts merged) is swapped in, with the item once
    rnd = np.random.default_rng(5).normal(size=(100, emb.shape[1])).astype(np.float32)  # 131 vectors: nlist 4
    rnd /= np.linalg.norm(rnd, axis=1, keepdims=True)
    (tmp_path / "rnd-emb").mkdir()
    pq.write_table(pa.table({"id": [f"rnd-{i}" for i in range(100)], "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(rnd.ravel()), rnd.shape[1]), "top1": ["x"] * 100},
        metadata={b"lens_model": _json.dumps(tiny.info()).encode()}), tmp_path / "rnd-emb" / "part-0.parquet")
    build_index(BuildConfig(embeddings=[str(tmp_path / "idx-emb"), str(events), str(tmp_path / "rnd-emb")],
                            output=root, queries=20, index="ivf-flat"), log=lambda *a: None)
    deadline = time.monotonic() + 120  # a failure bound: the loop ends when the new version answers
    while time.monotonic() < deadline:
        body = post(f"{app}/v1/search?k=5", new).json()
        if body["index_version"] != first_version:
            break
        time.sleep(0.2)
    assert body["index_version"] != first_version
    got = [h["id"] for h in body["results"]]
    assert got[0] == "s3://b/new.jpg" and got.count("s3://b/new.jpg") == 1

    # ?param= reaches the index: nprobe=1 of the IVF lists finds a few neighbours, nprobe=nlist all of them
    from lens.index.store import load_version, set_current

    v2 = load_version(root)
    nlist = v2.manifest["nlist"]
    assert v2.manifest["type"] == "ivf-flat" and nlist > 1
    q = {"vector": emb[0].tolist()}
    every = requests.post(f"{app}/v1/search:vector?k=100&param={nlist}", json=q, timeout=30).json()["results"]
    few = requests.post(f"{app}/v1/search:vector?k=100&param=1", json=q, timeout=30).json()["results"]
    assert len(every) == 100 and 1 <= len(few) < 100 and few[0]["id"] == every[0]["id"] == "img-0"
    expect(requests.post(f"{app}/v1/search:vector?param=0", json=q, timeout=30), 400, "bad_request", "param")

    # filters: by id prefix on each route (JSON in the query string, or in the vector body), through the client too
    from lens.client import LensClient

    lens = LensClient(app)
    only_rnd = {"id": {"prefix": "rnd-"}}
    r = requests.get(f"{app}/v1/search/img-3", params={"k": 5, "filter": _json.dumps(only_rnd)}, timeout=30)
    assert r.status_code == 200 and [h["id"][:4] for h in r.json()["results"]] == ["rnd-"] * 5, r.text
    hits = lens.search(bodies[3], k=4, filter=only_rnd)["results"]
    assert len(hits) == 4 and all(h["id"].startswith("rnd-") for h in hits)
    hits = lens.search(vector=emb[7].tolist(), k=3, filter={"not": only_rnd})["results"]
    assert hits[0]["id"] == "img-7" and not any(h["id"].startswith("rnd-") for h in hits)
    r = requests.post(f"{app}/v1/search:vector", json={"vector": emb[7].tolist(), "filter": {"colour": "red"}},
                      timeout=30)
    expect(r, 400, "invalid_filter", "no item has the field 'colour'")
    expect(requests.get(f"{app}/v1/search/img-3", params={"filter": "{nope"}, timeout=30), 400, "invalid_filter",
           "not JSON")

    # lens index delete: the searcher stops returning the ids within its refresh_s (a failure bound below)
    from lens.cli.main import main as lens_main

    assert lens_main(["index", "delete", "--index", root, "img-7", "s3://b/new.jpg"]) == 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and requests.get(f"{app}/v1/search/img-7", timeout=30).status_code != 404:
        time.sleep(0.2)
    expect(requests.get(f"{app}/v1/search/img-7", timeout=30), 404, "not_found")
    got = [h["id"] for h in requests.post(f"{app}/v1/search:vector?k=10", json={"vector": emb[7].tolist()},
                                          timeout=30).json()["results"]]
    assert len(got) == 10 and "img-7" not in got and "s3://b/new.jpg" not in got
    assert requests.get(f"{app}/v1/thumbnail/img-7", timeout=30).status_code == 404

    # a broken new version is refused: the searcher keeps serving the one it has and says why
    import shutil

    broken = v2.path.parent / "v-broken"
    shutil.copytree(v2.path, broken)
    index_file = next(p for p in broken.iterdir() if p.suffix == ".faiss")
    index_file.write_bytes(index_file.read_bytes()[:-64])
    set_current(v2.path.parent, broken.name)
    info = handle("search", "IndexSearcher").refresh.remote().result()
    assert info["index_version"] == v2.name and "v-broken" in info["refresh_error"], info
    assert post(f"{app}/v1/search?k=3", new).json()["index_version"] == v2.name


def test_search_refuses_an_index_built_with_another_model(cluster, tmp_path, tiny):
    info = tiny.info() | {"weights_sha256": "0" * 64}
    root = _index_from(tmp_path, "idx-other", ["a", "b", "c"], np.eye(3, tiny.embed_dim), info, index="flat")
    app = deploy(cluster, "search-mm", {"search": {"index": root}})
    r = post(f"{app}/v1/search", images(1)[0])
    assert r.status_code == 409 and r.json()["error"] == "model_mismatch", r.text
    # a query by vector or id does not involve the serving model
    assert requests.get(f"{app}/v1/search/a?k=2", timeout=30).status_code == 200


def test_feedback_needs_a_key_is_checked_and_stored_and_a_replica_detects_drift(cluster, tmp_path, tiny):
    """Labeled feedback and online drift on a real replica: traffic like the reference passes, a shifted one is
    flagged; feedback is authenticated, validated, and answered only once its Parquet part is written."""
    from PIL import Image

    from lens.quality.drift import Profile
    from lens.quality.feedback import read_feedback

    ref_images = images(200, seed=11)
    ref = tiny.predict(ref_images)
    # embeddings only: the tiny random model's near-uniform top-1 flips with thread count and batch size, so its
    # class mix is not a stable reference (the class test is covered on seeded data in test_drift.py)
    Profile.fit(np.stack([r.embedding for r in ref]), None, components=8,
                identity=tiny.identity()).save(str(tmp_path / "ref" / "drift-profile.npz"))
    keys = tmp_path / "keys.txt"
    keys.write_text("k-0123456789abcdef\n")
    app = deploy(cluster, "quality", {
        "pool": {"drift": {"reference": str(tmp_path / "ref"), "window": 50, "every": 25}},
        "api": {"api_keys_file": str(keys), "api_keys_env": None},
        "feedback": {"sink": str(tmp_path / "fb"), "flush_s": 0.2}})
    key = {"X-API-Key": "k-0123456789abcdef"}

    def drift_state():
        pools = requests.get(f"{app}/v1/models", headers=key, timeout=30).json()["pools"]
        return pools[0]["drift"].get("test_efficientnet", {}).get("last")

    answers = [post(f"{app}/v1/tag", b, headers=key).json() for b in images(60, seed=12)]
    assert all(len(a["sha256"]) == 64 and a["predicted_at"] > 1e9 for a in answers)
    clean = wait_for(drift_state, "a drift test on like-the-reference traffic", 30)
    assert clean["window"] == 50 and not clean["drift"], clean
    dark = [encode(Image.fromarray(np.full((96, 128, 3), v, np.uint8)), "JPEG") for v in range(5, 65)]
    for b in dark:
        assert post(f"{app}/v1/tag", b, headers=key).status_code == 200
    moved = wait_for(lambda: (s := drift_state()) and s["drift"] and s, "drift flagged on dark images", 30)
    assert moved["p_value"] < 0.01, moved

    items = [{"sha256": a["sha256"], "predicted_at": a["predicted_at"], "labels": ["label_3"],
              "predicted": [t["label"] for t in a["tags"]]} for a in answers[:3]]
    fb = f"{app}/v1/feedback"
    expect(requests.post(fb, json={"items": items}, timeout=30), 401, "unauthorized")
    expect(requests.post(fb, data=json.dumps({"items": items}), headers=key | {"Content-Type": "text/plain"},
                         timeout=30), 415, "unsupported_media_type")
    expect(requests.post(fb, json={"items": [{"sha256": "nope", "labels": ["x"], "predicted": ["y"]}]},
                         headers=key, timeout=30), 400, "invalid_feedback", "64 lowercase hex")
    r = requests.post(fb, json={"items": items}, headers=key, timeout=30)
    assert r.status_code == 200 and r.json()["stored"] == 3, r.text
    t = read_feedback(str(tmp_path / "fb"))  # durable before the answer
    assert t.num_rows == 3 and t.column("sha256").to_pylist() == [a["sha256"] for a in answers[:3]]



def test_a_drain_gate_turns_new_requests_into_json_503_and_serves_what_arrived_before(cluster, photos):
    """What `lens serve` does on SIGTERM before it stops Serve (serve/drain.py): once its application's gate is up,
    an ingress replica answers requests that arrived after it with a JSON 503 (retry elsewhere; /healthz too, so a
    load balancer takes the server out), serves those the front door took before it, and reports that it has
    nothing in flight."""
    import ray
    from lens.serve.drain import open_gates, wait_idle
    from lens.serve.frontdoor import RECEIVED_HEADER

    url = deploy(cluster, "drain", {})
    assert post(f"{url}/v1/tag", photos["rocket.jpg"]).status_code == 200
    (gate,) = open_gates(["drain"])
    body = wait_for(lambda: (r := post(f"{url}/v1/tag", photos["rocket.jpg"])).status_code == 503 and r.json(),
                    "the replica saw the gate", timeout_s=180)
    assert body["error"] == "draining"
    r = requests.get(f"{url}/healthz", timeout=30)
    assert r.status_code == 503 and r.json()["error"] == "draining" and r.headers["Retry-After"]
    opened_ms = int(ray.get(gate.state.remote())["opened_at"] * 1000)
    early = post(f"{url}/v1/tag", photos["rocket.jpg"], headers={RECEIVED_HEADER: str(opened_ms - 1)})
    assert early.status_code == 200, early.text  # the front door took it before the drain began
    assert wait_idle([gate], ["drain"], time.monotonic() + 60)
    serve.delete("drain")
    ray.kill(gate)

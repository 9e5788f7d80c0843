"""lens.client against a scripted loopback server: retries on 503 honouring Retry-After, no retry on 4xx,
connection errors, the request shapes, one client shared by threads (the real API is exercised in
tests/test_serve.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lens.client import AsyncLensClient, LensAPIError, LensClient


class Script:
    """Answers queued per request; records what arrived."""

    def __init__(self, answers):
        self.answers, self.seen = list(answers), []


@pytest.fixture
def server():
    script = Script([])

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            script.seen.append((self.command, self.path, dict(self.headers), body, time.monotonic()))
            if script.answers:
                status, payload, headers = script.answers.pop(0)
            else:  # nothing scripted: echo what arrived (the threads test compares answers with their requests)
                status, payload, headers = 200, {"path": self.path, "body": body.decode("latin-1")}, {}
            data = json.dumps(payload).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *a):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 128  # the threads test connects 64 at once: no SYN dropped by a 5-deep backlog

    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    httpd.shutdown()


BUSY = (503, {"error": "overloaded", "message": "retry later", "status": 503}, {"Retry-After": "1"})
OK = (200, {"model": "m", "tags": [{"label": "cat", "class_id": 1, "score": 0.9}]}, {})


def test_503_is_retried_after_retry_after_and_4xx_is_not(server):
    url, script = server
    script.answers = [BUSY, BUSY, OK]
    lens = LensClient(url, api_key="k-1", retries=3, backoff_s=0.01)
    assert lens.tag(b"\xff\xd8\xffjpeg", top_k=3, head="pets")["tags"][0]["label"] == "cat"
    times = [s[4] for s in script.seen]
    assert len(times) == 3 and times[1] - times[0] >= 1.0 and times[2] - times[1] >= 1.0  # Retry-After: 1 honoured
    method, path, headers, body, _ = script.seen[0]
    assert (method, path, body) == ("POST", "/v1/tag?top_k=3", b"\xff\xd8\xffjpeg")
    assert headers["Authorization"] == "Bearer k-1" and headers["serve_multiplexed_model_id"] == "pets"

    script.answers = [(415, {"error": "unsupported_media_type", "message": "not an image", "status": 415}, {})]
    with pytest.raises(LensAPIError) as e:
        lens.tag(b"junk")
    assert (e.value.code, e.value.http_status, e.value.message) == ("unsupported_media_type", 415, "not an image")
    assert len(script.seen) == 4  # no retry

    script.answers = [BUSY, BUSY]
    with pytest.raises(LensAPIError, match="retry later"):
        LensClient(url, retries=1, backoff_s=0.01).tag(b"x")


def test_request_shapes_and_the_async_client(server):
    url, script = server
    script.answers = [(200, {"results": []}, {})] * 3 + [(200, {"stored": 1}, {})] + [OK, BUSY, OK]
    lens = LensClient(url)
    lens.search(id="s3://b/k 1.jpg", k=5)
    lens.search(vector=[0.5, 1], k=2, param=8)
    lens.search(b"img")
    lens.feedback([{"sha256": "a" * 64, "labels": ["x"], "predicted": ["y"]}])
    assert [(m, p) for m, p, *_ in script.seen] == [
        ("GET", "/v1/search/s3://b/k%201.jpg?k=5"), ("POST", "/v1/search:vector?k=2&param=8"),
        ("POST", "/v1/search"), ("POST", "/v1/feedback")]
    assert json.loads(script.seen[1][3]) == {"vector": [0.5, 1.0]}
    with pytest.raises(ValueError, match="exactly one"):
        lens.search(b"img", id="x")

    async def go():
        async with AsyncLensClient(url, retries=2, backoff_s=0.01) as alens:
            first = await alens.tag(b"a")
            second = await alens.tag(b"b", embedding=True)  # a 503 first, then answered
            return first, second

    first, second = asyncio.run(go())
    assert first["model"] == second["model"] == "m"
    assert script.seen[-1][1] == "/v1/tag?embedding=true"


def test_an_unreachable_service_is_a_clear_error():
    with pytest.raises(LensAPIError) as e:
        LensClient("http://127.0.0.1:9", retries=1, backoff_s=0.01).health()
    assert e.value.code == "unreachable" and e.value.http_status == 503
    with pytest.raises(ValueError, match="http"):
        LensClient("127.0.0.1:8000")


def test_failover_answers_are_retried_and_feedback_only_when_nothing_was_stored(server):
    """A replica restarting, draining or lost shows up as 502/503/504 (HAProxy's page, in Lens's shape) or a
    reset connection: idempotent calls retry them all; feedback, which is not idempotent, only 503 (its answer
    when nothing was stored)."""
    url, script = server
    gateway = [(code, {"error": "unavailable", "message": "no replica", "status": code}, {}) for code in (502, 504)]
    script.answers = [*gateway, OK]
    lens = LensClient(url, retries=3, backoff_s=0.01)
    assert lens.tag(b"x")["model"] == "m" and len(script.seen) == 3
    script.answers = [gateway[0], BUSY, (200, {"results": []}, {})]
    assert lens.search(id="a") == {"results": []} and len(script.seen) == 6
    script.answers = [gateway[0]]
    with pytest.raises(LensAPIError) as e:
        lens.feedback([{"sha256": "a" * 64, "labels": ["x"], "predicted": ["y"]}])
    assert e.value.http_status == 502 and len(script.seen) == 7  # not retried: it may have been stored
    script.answers = [BUSY, (200, {"stored": 1}, {})]
    assert lens.feedback([{"sha256": "a" * 64, "labels": ["x"], "predicted": ["y"]}]) == {"stored": 1}

    async def go():
        script.answers = [gateway[1], OK]
        async with AsyncLensClient(url, retries=2, backoff_s=0.01) as alens:
            return await alens.tag(b"a")

    assert asyncio.run(go())["model"] == "m"


def test_one_client_shared_by_threads_gives_each_call_its_own_answer(server):
    """LensClient is one httpx connection pool: 8 threads calling through it at once get exactly the answers the
    same calls get one after another."""
    from concurrent.futures import ThreadPoolExecutor

    url, _ = server
    calls = [(f"image-{i}".encode(), i % 5 + 1) for i in range(64)]
    with LensClient(url) as lens:
        sequential = [lens.tag(body, top_k=k) for body, k in calls]
        with ThreadPoolExecutor(8) as pool:
            threaded = list(pool.map(lambda c: lens.tag(c[0], top_k=c[1]), calls))
    assert threaded == sequential
    assert [a["body"] for a in threaded] == [f"image-{i}" for i in range(64)]
    assert [a["path"] for a in threaded] == [f"/v1/tag?top_k={i % 5 + 1}" for i in range(64)]

    async def go():
        async with AsyncLensClient(url) as alens:
            return await asyncio.gather(*(alens.tag(body, top_k=k) for body, k in calls))

    assert asyncio.run(go()) == sequential

#!/usr/bin/env python
"""The Python client's own cost: lens.client (httpx for the blocking client, aiohttp for the asyncio one, one
tenacity retry policy for both) against the client it replaced (requests and aiohttp, a retry loop each); one JSON.

A loopback server (uvicorn + Starlette, in its own process) answers ``POST /v1/tag`` with a fixed tag answer of the
real API's shape after reading the body, so what is measured is the client: building the request, the connection
pool, reading and parsing the answer. Each mode runs the old and the new client in alternating rounds on the same
server (the median round is reported): one thread calling in a loop; 8 threads sharing one client; 32 concurrent
asyncio tasks sharing one client; and, to show why the asyncio client stays on aiohttp, aiohttp's and httpx's
asyncio clients alone on the same calls. The old client is ``lens/client.py`` as of the commit before the replacement,
read from git (``--old-rev``). Writes benchmarks/client.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from bench_serve import free_port  # noqa: E402
from machine import describe  # noqa: E402

ANSWER = {"model": "tf_efficientnet_lite0", "version": None, "sha256": "0" * 64, "predicted_at": 1.0,
          "tags": [{"label": f"label-{i}", "class_id": i, "score": 0.1} for i in range(5)], "custom_tags": {}}
SERVER = f'''
import json, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

BODY = {json.dumps(json.dumps(ANSWER))}.encode()

async def tag(request):
    await request.body()
    return Response(BODY, media_type="application/json")

uvicorn.run(Starlette(routes=[Route("/v1/tag", tag, methods=["POST"])]), host="127.0.0.1", port=int(sys.argv[1]),
            log_level="warning", access_log=False)
'''


def _old_client(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:lens/client.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_client.py"
    path.write_text(src.replace("from .errors import", "from lens.errors import"))
    spec = importlib.util.spec_from_file_location("old_client", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sync_rate(client, body: bytes, calls: int, threads: int) -> float:
    t0 = time.perf_counter()
    if threads == 1:
        for _ in range(calls):
            client.tag(body)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda _: client.tag(body), range(calls)))
    return calls / (time.perf_counter() - t0)


async def _async_rate(cls, url: str, body: bytes, calls: int, concurrency: int) -> float:
    async with cls(url) as client:
        await client.tag(body)  # the session and its first connection
        sem = asyncio.Semaphore(concurrency)

        async def one():
            async with sem:
                await client.tag(body)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(calls)))
        return calls / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=400, help="calls per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--body-kb", type=int, default=64, help="request body (a phone JPEG's order of size)")
    ap.add_argument("--old-rev", default="33bc5fe", help="git revision of the client replaced")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "client.json"))
    args = ap.parse_args()

    import lens.client as new

    old = _old_client(args.old_rev)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    url = f"http://127.0.0.1:{port}"
    body = os.urandom(args.body_kb * 1024)
    try:
        import requests

        for _ in range(600):  # the server is up once it answers (state, not a timer)
            try:
                requests.post(url + "/v1/tag", data=b"x", timeout=2)
                break
            except requests.ConnectionError:
                if server.poll() is not None:
                    raise SystemExit("the loopback server exited")
                time.sleep(0.05)
        modes: dict = {}
        for mode, threads in (("sync_1_thread", 1), ("sync_8_threads_one_client", 8)):
            rounds = {"old": [], "new": []}
            clients = {"old": old.LensClient(url), "new": new.LensClient(url)}
            for c in clients.values():
                c.tag(body)  # warm: a pooled connection
            for _ in range(args.rounds):
                for name, c in clients.items():
                    rounds[name].append(_sync_rate(c, body, args.calls, threads))
            modes[mode] = rounds
        rounds = {"old": [], "new": []}
        for _ in range(args.rounds):
            rounds["old"].append(asyncio.run(_async_rate(old.AsyncLensClient, url, body, args.calls, 32)))
            rounds["new"].append(asyncio.run(_async_rate(new.AsyncLensClient, url, body, args.calls, 32)))
        modes["async_32_tasks_one_client"] = rounds
        # why the asyncio client stays on aiohttp: the two transports alone, the same calls, no Lens code
        import aiohttp
        import httpx

        async def raw(make) -> float:
            async with make() as c:
                sem = asyncio.Semaphore(32)

                async def one():
                    async with sem:
                        if isinstance(c, httpx.AsyncClient):
                            (await c.post(url + "/v1/tag", content=body)).json()
                        else:
                            async with c.post(url + "/v1/tag", data=body) as r:
                                await r.json(content_type=None)

                await one()
                t0 = time.perf_counter()
                await asyncio.gather(*(one() for _ in range(args.calls)))
                return args.calls / (time.perf_counter() - t0)

        transports = {"aiohttp.ClientSession": [], "httpx.AsyncClient": []}
        for _ in range(args.rounds):
            transports["aiohttp.ClientSession"].append(asyncio.run(raw(aiohttp.ClientSession)))
            transports["httpx.AsyncClient"].append(asyncio.run(raw(httpx.AsyncClient)))
    finally:
        server.terminate()
        server.wait()
    out = {}
    for mode, r in modes.items():
        o, n = statistics.median(r["old"]), statistics.median(r["new"])
        out[mode] = {"old_calls_per_s": round(o, 1), "new_calls_per_s": round(n, 1), "new_vs_old": round(n / o, 3),
                     "old_rounds": [round(x, 1) for x in r["old"]], "new_rounds": [round(x, 1) for x in r["new"]]}
    import aiohttp
    import httpx

    summary = {"benchmark": "client", "machine": describe(), "body_bytes": len(body), "calls_per_round": args.calls,
               "rounds": args.rounds, "old": f"lens/client.py at {args.old_rev} (requests; aiohttp; a retry loop each)",
               "new": "lens/client.py (httpx; aiohttp; one tenacity retry policy)", "modes": out,
               "async_transports_32_tasks_calls_per_s": {k: round(statistics.median(v), 1)
                                                         for k, v in transports.items()},
               "versions": {"httpx": httpx.__version__, "aiohttp": aiohttp.__version__},
               "targets": {"new client no slower than the old (>= 0.95x, noise) in every mode":
                           all(m["new_vs_old"] >= 0.95 for m in out.values())}}
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

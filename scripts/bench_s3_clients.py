#!/usr/bin/env python
"""The event path's two per-object S3 requests through each candidate client, as the consumer makes them; prints
one JSON summary and writes benchmarks/s3-clients.json.

Each client runs in a fresh process of its own against the same moto server (its S3 app behind uvicorn, which
keeps connections open as AWS does; a process of its own, so its CPU is not counted): N objects, ``--concurrency``
at once from one event loop, each the image's GET and the sidecar's create-only PUT (``If-None-Match: *``). The
figure is that process's CPU per object (both requests), beside the wall time, and a check that the client's
create-only PUT is refused where an object exists (what the consumer's exactly-once rule needs):

* ``obstore`` — Lens's client (lens.serve.events.objects.ObstoreObjects: obstore's async calls, its own runtime);
* ``boto3`` — Lens's fallback (Boto3Objects: boto3 calls on a pool of threads, as the consumer runs them);
* ``aiobotocore`` — botocore on aiohttp. It pins botocore to a range older than the one Lens's other
  dependencies bring (aiobotocore 3.10.0: botocore < 1.43.118; Lens's environment has 1.44.x), so it cannot be
  installed beside Lens: ``--aiobotocore-python`` names the interpreter of a separate environment that has it
  (``python -m venv /tmp/aio && /tmp/aio/bin/pip install aiobotocore``); without one it is recorded as not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

SIDE = b'{"status": "tagged", "tags": [{"label": "tabby, tabby cat", "class_id": 281, "score": 0.5}]}'


async def _run(get, create, bucket: str, out_bucket: str, n: int, concurrency: int, tag: str) -> dict:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await get(bucket, f"img/{i % 50}.jpg")
            await create(out_bucket, f"{tag}/{i}.json", SIDE)

    await asyncio.gather(*(one(i) for i in range(20)))  # connections, stores, threads: warm
    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(20, 20 + n)))
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    refused = not await create(out_bucket, f"{tag}/20.json", SIDE)  # exists: the create-only PUT must be refused
    return {"cpu_ms_per_object": round(1000 * cpu / n, 3), "objects_per_s": round(n / wall, 1),
            "create_only_refused_where_an_object_exists": refused, "objects": n, "concurrency": concurrency}


def child_lens(client: str, bucket: str, out_bucket: str, n: int, concurrency: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from lens.serve.events.objects import object_io
    from lens.serve.events.setup import clients

    s3, _ = clients(concurrency=concurrency)
    io = object_io(s3, client, executor=ThreadPoolExecutor(concurrency + 4))
    assert io.name == client

    async def get(b, k):
        return await io.get(b, k)

    async def create(b, k, body):
        return await io.create(b, k, body, "application/json")

    return asyncio.run(_run(get, create, bucket, out_bucket, n, concurrency, client))


def child_aiobotocore(bucket: str, out_bucket: str, n: int, concurrency: int) -> dict:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session
    from botocore.exceptions import ClientError

    async def main() -> dict:
        cfg = AioConfig(max_pool_connections=concurrency, retries={"max_attempts": 3, "mode": "standard"})
        async with get_session().create_client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                                               config=cfg) as s3:
            async def get(b, k):
                r = await s3.get_object(Bucket=b, Key=k)
                async with r["Body"] as body:
                    return await body.read()

            async def create(b, k, body):
                try:
                    await s3.put_object(Bucket=b, Key=k, Body=body, ContentType="application/json", IfNoneMatch="*")
                except ClientError as e:
                    if e.response["Error"]["Code"] in ("PreconditionFailed", "412"):
                        return False
                    raise
                return True

            import aiobotocore
            import botocore

            return await _run(get, create, bucket, out_bucket, n, concurrency, "aiobotocore") | {
                "version": f"aiobotocore {aiobotocore.__version__}, botocore {botocore.__version__}"}

    return asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16, help="objects at once (events.concurrency's default)")
    ap.add_argument("--rounds", type=int, default=3, help="each client this many times, in turn; the median is kept")
    ap.add_argument("--aiobotocore-python", help="an interpreter whose environment has aiobotocore")
    ap.add_argument("--child", nargs=4, metavar=("CLIENT", "BUCKET", "OUT_BUCKET", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        client, bucket, out_bucket, n = args.child
        r = (child_aiobotocore(bucket, out_bucket, int(n), args.concurrency) if client == "aiobotocore"
             else child_lens(client, bucket, out_bucket, int(n), args.concurrency))
        print("RESULT " + json.dumps(r), flush=True)
        return

    from bench_events import KEEPALIVE_SERVER
    from bench_serve import free_port, jpeg_bodies
    from machine import describe

    port = free_port()
    env = os.environ | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    server = subprocess.Popen([sys.executable, "-c", KEEPALIVE_SERVER, str(port)], env=env)
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        for _ in range(200):
            try:
                s3.create_bucket(Bucket="images")
                break
            except Exception:  # noqa: BLE001 - the server is not up yet
                time.sleep(0.1)
        s3.create_bucket(Bucket="results")
        bodies = jpeg_bodies()
        for i in range(50):
            s3.put_object(Bucket="images", Key=f"img/{i}.jpg", Body=bodies[i % len(bodies)])
        runs = {"obstore": [sys.executable], "boto3": [sys.executable]}
        if args.aiobotocore_python:
            runs["aiobotocore"] = [args.aiobotocore_python]
        results: dict[str, list] = {k: [] for k in runs}
        for r in range(args.rounds):
            for client, python in runs.items():
                p = subprocess.run([*python, __file__, "--concurrency", str(args.concurrency), "--child", client,
                                    "images", "results", str(args.objects)], capture_output=True, text=True,
                                   env=env | {"PYTHONPATH": str(ROOT)}, timeout=600)
                line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"{client} failed:\n{p.stderr[-3000:]}")
                results[client].append(json.loads(line[len("RESULT "):]))
                s3_objects = s3.list_objects_v2(Bucket="results", Prefix=f"{client}/")
                for o in s3_objects.get("Contents", []):  # the next round writes the same keys afresh
                    s3.delete_object(Bucket="results", Key=o["Key"])
    finally:
        server.terminate()
        server.wait()

    def median(rows: list[dict]) -> dict:
        rows = sorted(rows, key=lambda x: x["cpu_ms_per_object"])
        return rows[len(rows) // 2] | {"rounds_cpu_ms_per_object": [x["cpu_ms_per_object"] for x in rows]}

    clients = {k: median(v) for k, v in results.items()}
    if "aiobotocore" not in clients:
        clients["aiobotocore"] = {"not_run": "no --aiobotocore-python: aiobotocore pins an older botocore than "
                                             "Lens's environment has, so it needs an environment of its own"}
    ob = clients["obstore"]["cpu_ms_per_object"]
    summary = {
        "benchmark": "s3-clients",
        "machine": describe(),
        "workload": {"objects": args.objects, "concurrency": args.concurrency, "rounds": args.rounds,
                     "requests_per_object": "GetObject of a bundled photograph (JPEG, 300x451 to 1000x872) + create-only PutObject of a sidecar",
                     "server": "moto's S3 app behind uvicorn (keep-alive), its own process on loopback"},
        "clients": clients,
        "ratios": {f"{k}_cpu_vs_obstore": round(v["cpu_ms_per_object"] / ob, 2)
                   for k, v in clients.items() if "cpu_ms_per_object" in v and k != "obstore"},
    }
    summary["targets"] = {"every client refuses a create-only PUT where an object exists": all(
        v["create_only_refused_where_an_object_exists"] for v in clients.values() if "cpu_ms_per_object" in v)}
    out = ROOT / "benchmarks" / "s3-clients.json"
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

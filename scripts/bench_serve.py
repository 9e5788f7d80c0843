#!/usr/bin/env python
"""Benchmark the online tagging service over HTTP on loopback; prints one JSON summary.

In one run, on the same machine:
* ceiling: the in-process pipelined loop (scripts/baselines.py: decode threads feeding model batches, all cores,
  no server) at its best batch size and thread count, on the backend the shipped profile serves (its ratio) and on
  every other installed fp32 backend (the ratio against the best loop); and the single-image latency in-process;
* the CPU bound, each round: cores / (decode + model), each in CPU seconds per image measured one thread at a
  time (decode + preprocess; the model and its top-k at the loop's best batch, one inference thread);
* floor: a naive Serve deployment of the same ONNX Runtime model: no batching, one image per call;
* Lens: the Serve app (one pool, HAProxy in front), closed-loop clients at
  1, 8, 32 and 64 connections with real JPEG bodies, then an open-loop overload at
  4x the measured throughput to show load shedding (503) with bounded latency.

Writes benchmarks/serve.json and benchmarks/serve.png.
"""

# (no `from __future__ import annotations`: FastAPI must see real types on the naive deployment)

import argparse
import asyncio
import io
import json
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from machine import describe  # noqa: E402 - after the path: the benchmarks' machine record


def free_port() -> int:
    """A TCP port free on loopback now (the benchmarks' servers each take one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg_bodies() -> list[bytes]:
    """The bundled real photographs, each as a quality-90 JPEG (300x451 up to 1000x872)."""
    from PIL import Image

    from lens.runtime.samples import sample_paths

    out = []
    for p in sample_paths():
        buf = io.BytesIO()
        Image.open(p).convert("RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# -- in-process ceiling ------------------------------------------------------------------------
def bench_ceiling(bodies: list[bytes], duration: float, backend: str = "onnx") -> dict:
    from baselines import best_pipelined, for_seconds

    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor

    predictor = Predictor.from_config(ModelConfig(backend=backend, device="cpu", max_batch_size=64))
    predictor.warmup()
    single = []
    for _ in range(3):
        for b in bodies:
            t0 = time.perf_counter()
            predictor.predict([b])
            single.append((time.perf_counter() - t0) * 1000)
    best = best_pipelined(predictor, lambda: for_seconds(bodies, duration))
    return {"loop": f"pipelined: decode threads feed {backend} batches (scripts/baselines.py)", "backend": backend,
            "images_per_s": best["images_per_s"], "best_batch": best["batch_size"],
            "best_decode_threads": best["decode_threads"], "points": best["points"],
            "single_image_latency_ms_p50": round(percentile(single, 50), 2), "_predictor": predictor}


def one_thread_predictor(backend: str, batch: int):
    """The model on ``backend`` with one inference thread, warmed up at ``batch``, for :func:`cpu_bound`."""
    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor

    pred = Predictor.from_config(ModelConfig(backend=backend, device="cpu", num_threads=1, max_batch_size=batch))
    pred.warmup(batch)
    return pred


def cpu_bound(pred, bodies: list[bytes], repeat: int = 3) -> dict:
    """What the cores could serve if a served image cost only its decode and its model: ``cores / (decode +
    model)``, each in CPU seconds per image measured one thread at a time in this (otherwise idle) process —
    decode + preprocess of each body, then the model and its top-k on batches of ``pred.max_batch_size`` (the
    loop's best) with one inference thread (:func:`one_thread_predictor`)."""
    batch, backend = pred.max_batch_size, pred.info()["backend"]
    decode, model = [], []
    for _ in range(repeat):
        t0 = time.process_time()
        crops = [pred.prepare(b) for b in bodies]
        decode.append((time.process_time() - t0) / len(bodies))
        x = np.stack([crops[i % len(crops)] for i in range(batch * max(1, 64 // batch))])
        t0 = time.process_time()
        for i in range(0, len(x), batch):
            logits, emb = pred.infer(x[i : i + batch])
            pred.postprocess(logits, emb)
        model.append((time.process_time() - t0) / len(x))
    d, m, cores = statistics.median(decode), statistics.median(model), os.cpu_count() or 1
    return {"cores": cores, "decode_ms": round(1000 * d, 2), "model_ms": round(1000 * m, 2), "batch": batch,
            "backend": backend, "images_per_s": round(cores / (d + m), 1)}


def ceiling_again(ceiling: dict, bodies: list[bytes], duration: float) -> float:
    """The ceiling's best point measured once more (one round, beside Lens's round)."""
    from baselines import for_seconds, pipelined

    return pipelined(ceiling["_predictor"], for_seconds(bodies, duration), batch_size=ceiling["best_batch"],
                     decode_threads=ceiling["best_decode_threads"])["images_per_s"]


def aggregate(rounds: list[list[dict]]) -> list[dict]:
    """Per connection count: the median of each figure over the rounds, the throughput of every round, spread."""
    out = []
    for points in zip(*rounds):
        tput = [p["throughput_rps"] for p in points]
        statuses: dict = {}
        for p in points:
            for k, v in p["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
        out.append({"connections": points[0]["connections"],
                    "throughput_rps": round(statistics.median(tput), 2),
                    "throughput_rps_rounds": tput, "spread": round((max(tput) - min(tput)) / statistics.median(tput), 3),
                    **{k: round(statistics.median(p[k] for p in points), 2) for k in ("p50_ms", "p95_ms", "p99_ms")},
                    "statuses": statuses})
    return out


# -- HTTP load ---------------------------------------------------------------------------------
async def _post(session, url: str, body: bytes, statuses: dict, lat: list) -> None:
    """One request: count its status; keep its latency if it succeeded (-1 = connection error)."""
    import aiohttp

    t0 = time.perf_counter()
    try:
        async with session.post(url, data=body, headers={"Content-Type": "image/jpeg"}) as r:
            await r.read()
            status = r.status
    except aiohttp.ClientError:
        status = -1
    statuses[status] = statuses.get(status, 0) + 1
    if status == 200:
        lat.append((time.perf_counter() - t0) * 1000)


async def closed_loop(url: str, bodies: list[bytes], conns: int, duration: float) -> dict:
    import aiohttp

    lat, statuses = [], {}
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as s:
        end = time.perf_counter() + duration

        async def worker(k: int):
            i = k
            while time.perf_counter() < end:
                await _post(s, url, bodies[i % len(bodies)], statuses, lat)
                i += 1

        t_start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(conns)))
        elapsed = time.perf_counter() - t_start
    return {"connections": conns, "throughput_rps": round(len(lat) / elapsed, 2),
            "p50_ms": round(percentile(lat, 50), 2), "p95_ms": round(percentile(lat, 95), 2),
            "p99_ms": round(percentile(lat, 99), 2), "statuses": {str(k): v for k, v in sorted(statuses.items())}}


async def open_loop(url: str, bodies: list[bytes], rate: float, duration: float, max_in_flight: int = 2000) -> dict:
    """Poisson arrivals at ``rate`` per second, whatever the service does (overload)."""
    import aiohttp

    lat, statuses = [], {}
    rng = random.Random(0)
    connector = aiohttp.TCPConnector(limit=max_in_flight)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as s:
        tasks, t_next, end, i = [], time.perf_counter(), time.perf_counter() + duration, 0
        while t_next < end:
            await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
            tasks.append(asyncio.create_task(_post(s, url, bodies[i % len(bodies)], statuses, lat)))
            i += 1
            t_next += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    sent = sum(statuses.values())
    return {"offered_rps": round(rate, 1), "sent": sent, "accepted": statuses.get(200, 0),
            "shed_503": statuses.get(503, 0), "other": sent - statuses.get(200, 0) - statuses.get(503, 0),
            "accepted_p50_ms": round(percentile(lat, 50), 2), "accepted_p99_ms": round(percentile(lat, 99), 2),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}}


# -- deployments -------------------------------------------------------------------------------
def start_serve():
    """Ray on every core and Serve as `lens serve` runs it (HAProxy mode, its front-door limits), on a free
    loopback port; returns the port and the front door's config."""
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    import ray
    from lens.serve.frontdoor import prepare
    from ray import serve

    frontdoor, runtime_env = prepare(None)
    port = free_port()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", runtime_env=runtime_env)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port, frontdoor



def deploy_naive(port: int):
    """Floor: the same ONNX Runtime model, one image per call, no batching, Serve's defaults otherwise."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="Naive", ray_actor_options={"num_cpus": os.cpu_count()},
                      logging_config={"enable_access_log": False})
    @serve.ingress(api)
    class Naive:
        def __init__(self):
            from lens.runtime.config import ModelConfig
            from lens.runtime.predictor import Predictor

            self.p = Predictor.from_config(ModelConfig(backend="onnx", device="cpu", num_threads=os.cpu_count()))

        @api.post("/v1/tag")
        async def tag(self, request: Request):
            (r,) = self.p.predict([await request.body()])  # decode + infer inline, one image at a time
            return JSONResponse({"tags": [t.to_dict() for t in r.tags]} if r.ok else r.to_dict(),
                                status_code=200 if r.ok else r.status)

    serve.run(Naive.bind(), name="naive", route_prefix="/naive")
    return f"http://127.0.0.1:{port}/naive/v1/tag"


def deploy_lens(port: int, model: dict | None = None) -> str:
    """The shipped CPU profile (infra/serve-cpu.yaml), with one fixed replica: this machine holds one;
    ``model`` changes the pool's model settings (the int8 run)."""
    import yaml
    from lens.serve.run import deploy

    doc = yaml.safe_load((ROOT / "infra" / "serve-cpu.yaml").read_text())
    doc["http_options"].update(host="127.0.0.1", port=port)
    if model:
        doc["applications"][0]["args"]["pools"][0]["model"].update(model)
    (dep,) = doc["applications"][0]["deployments"]
    dep.pop("autoscaling_config")
    dep["num_replicas"] = 1
    deploy(doc, where="bench")
    return f"http://127.0.0.1:{port}/v1/tag"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, key in (("Lens", "lens"), ("naive floor", "naive")):
        pts = summary[key]["by_connections"]
        c = [p["connections"] for p in pts]
        a.plot(c, [p["throughput_rps"] for p in pts], "o-", label=name)
        b.plot(c, [p["p50_ms"] for p in pts], "o-", label=f"{name} p50")
        b.plot(c, [p["p99_ms"] for p in pts], "x--", label=f"{name} p99")
    a.axhline(summary["ceiling"]["images_per_s"], color="grey", ls=":", label="in-process ceiling")
    a.set(xscale="log", xlabel="concurrent connections", ylabel="images/s", title="Throughput")
    b.set(xscale="log", yscale="log", xlabel="concurrent connections", ylabel="latency (ms)", title="Latency")
    a.legend()
    b.legend(fontsize=8)
    fig.suptitle(f"Lens online tagging, {summary['model']} on {summary['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per load point")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every load point (medians and spread reported)")
    ap.add_argument("--quick", action="store_true", help="4 s per load point")
    ap.add_argument("--out", default=str(ROOT / "benchmarks"), help="where serve.json and serve.png go")
    args = ap.parse_args()
    duration = 4.0 if args.quick else args.duration
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    bodies = jpeg_bodies()
    import yaml

    chosen = yaml.safe_load((ROOT / "infra" / "serve-cpu.yaml").read_text())[
        "applications"][0]["args"]["pools"][0]["model"]["backend"]  # the backend the shipped profile serves
    from baselines import installed_fp32_backends

    loops = {b: bench_ceiling(bodies, duration, b) for b in installed_fp32_backends()}
    ceiling = loops[chosen]

    import ray
    from ray import serve

    port, frontdoor = start_serve()
    conns = (1, 8, 32, 64)
    try:
        url = deploy_naive(port)
        asyncio.run(closed_loop(url, bodies, 4, 2))  # warm
        naive = aggregate([[asyncio.run(closed_loop(url, bodies, c, duration)) for c in conns]
                           for _ in range(args.rounds)])
        print("naive:", naive, file=sys.stderr)
        serve.delete("naive")
        url = deploy_lens(port)
        asyncio.run(closed_loop(url, bodies, 8, 2))  # warm
        rounds, ceilings, others, bounds = [], [], {b: [] for b in loops if b != chosen}, []
        one_thread = one_thread_predictor(chosen, ceiling["best_batch"])
        for r in range(args.rounds):  # each round: every backend's loop (Lens idle), then every Lens point
            bounds.append(cpu_bound(one_thread, bodies))
            ceilings.append(ceiling_again(ceiling, bodies, duration))
            for b in others:
                others[b].append(ceiling_again(loops[b], bodies, duration))
            rounds.append([asyncio.run(closed_loop(url, bodies, c, duration)) for c in conns])
            print(f"round {r + 1}: ceiling {ceilings[-1]}, lens {[p['throughput_rps'] for p in rounds[-1]]}",
                  file=sys.stderr)
        lens = aggregate(rounds)
        per_round_32 = [rnd[conns.index(32)]["throughput_rps"] / c for rnd, c in zip(rounds, ceilings)]
        per_round_bound = [rnd[conns.index(32)]["throughput_rps"] / b["images_per_s"] for rnd, b in zip(rounds, bounds)]
        best = max(p["throughput_rps"] for p in lens)
        # one load generator is one client address: keep its connections under the front door's per-client cap
        # (more are refused at accept by design), so the overload measures shedding, not the cap
        cap = frontdoor.max_conn_per_client or 2000
        overload = asyncio.run(open_loop(url, bodies, 4 * best, duration, max_in_flight=max(1, cap - 16)))
        probe = asyncio.run(closed_loop(url, bodies, 1, 2))
        healthy_after = set(probe["statuses"]) == {"200"}
        # the same service with OpenVINO int8 (built and gated here first, so the replica starts warm)
        from lens.runtime.config import ModelConfig
        from lens.runtime.loading import load_model

        int8 = {"backend": "openvino", "precision": "int8"}
        gate = load_model(ModelConfig(**int8)).quantization
        url = deploy_lens(port, int8)
        asyncio.run(closed_loop(url, bodies, 8, 2))  # warm
        lens_int8 = aggregate([[asyncio.run(closed_loop(url, bodies, c, duration)) for c in (8, 32)]
                               for _ in range(args.rounds)])
        print("lens int8:", lens_int8, file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()

    for b, loop in loops.items():
        loop.pop("_predictor")
        loop["images_per_s_first"] = loop["images_per_s"]  # the grid search's best point
        loop["images_per_s_rounds"] = ceilings if b == chosen else others[b]
        loop["images_per_s"] = round(statistics.median(loop["images_per_s_rounds"]), 2)
    best_backend = max(loops, key=lambda b: loops[b]["images_per_s"])
    per_round_best = [rnd[conns.index(32)]["throughput_rps"] / max(
        loops[b]["images_per_s_rounds"][i] for b in loops) for i, rnd in enumerate(rounds)]
    at = {p["connections"]: p for p in lens}
    naive_at = {p["connections"]: p for p in naive}
    summary = {
        "benchmark": "serve",
        "machine": describe(),
        "model": "tf_efficientnet_lite0",
        "bodies": {"count": len(bodies), "mean_bytes": int(statistics.mean(map(len, bodies)))},
        "seconds_per_point": duration,
        "rounds": args.rounds,
        "frontdoor": frontdoor.model_dump(),
        "ceiling": ceiling,
        "served_backend": chosen,
        "loops_by_backend": {b: {k: v for k, v in loop.items() if k != "points"} for b, loop in loops.items()},
        "best_backend_loop": best_backend,
        "lens": {"by_connections": lens, "overload_4x": overload, "healthy_after_overload": healthy_after},
        "naive": {"by_connections": naive},
        # cores / (decode + model) per image, in CPU seconds, measured in each round beside the loops
        "cpu_bound": {"rounds": bounds, "images_per_s": round(statistics.median(b["images_per_s"] for b in bounds), 1)},
        "lens_openvino_int8": {"by_connections": lens_int8, "served": gate["served"],
                               "gate": {k: gate[k] for k in ("top1_agreement", "top5_overlap", "mean_cosine",
                                                             "recall_at_10_vs_fp32_index", "passed")}},
        "ratios": {
            "int8_32_vs_fp32_32": round(lens_int8[1]["throughput_rps"] / at[32]["throughput_rps"], 2),
            "lens_32_vs_ceiling": round(statistics.median(per_round_32), 2),
            "lens_32_vs_ceiling_rounds": [round(x, 3) for x in per_round_32],
            "lens_32_vs_best_backend_loop": round(statistics.median(per_round_best), 2),
            "lens_32_vs_naive_32": round(at[32]["throughput_rps"] / naive_at[32]["throughput_rps"], 2),
            "lens_32_vs_cpu_bound": round(statistics.median(per_round_bound), 3),
            "lens_32_vs_cpu_bound_rounds": [round(x, 3) for x in per_round_bound],
            "lens_p50_at_1_minus_inprocess_ms": round(at[1]["p50_ms"] - ceiling["single_image_latency_ms_p50"], 2),
        },
    }
    summary["targets"] = {
        "lens_32 >= 0.7x ceiling": summary["ratios"]["lens_32_vs_ceiling"] >= 0.7,
        # (replaces "lens_32 >= 3x naive", set against an eager-torch floor: against the same ONNX model served
        # unbatched, batching on 2 cores is worth ~1.1-1.3x, and that figure stays in the ratios)
        "lens_32 >= 0.9x cores / (decode + model)": summary["ratios"]["lens_32_vs_cpu_bound"] >= 0.9,
        "p50 at 1 conn <= in-process + 15 ms": summary["ratios"]["lens_p50_at_1_minus_inprocess_ms"] <= 15,
        "overload sheds with 503 and nothing else fails": overload["shed_503"] > 0 and overload["other"] == 0,
        "healthy after overload": healthy_after,
        "served int8 >= 1.3x served fp32 (32 connections)": gate["served"] == "int8"
        and summary["ratios"]["int8_32_vs_fp32_32"] >= 1.3,
    }
    (out / "serve.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "serve.png")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

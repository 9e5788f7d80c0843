#!/usr/bin/env python
"""Benchmark the online tagging service over HTTP on loopback; prints one JSON summary.

In one run, on the same machine, for the model the shipped CPU profile serves (infra/serve-cpu.yaml: OpenVINO int8
where its gate passes) and the same backend in fp32:
* ceiling: the in-process pipelined loop (scripts/baselines.py: decode threads feeding model batches, no server)
  at its best batch size, decode threads and model lanes (one batch on every thread, or two at once on half the
  threads each), on the served model (its ratio), on fp32 and on every other installed fp32 backend (the ratio
  against the best loop); and the single-image latency in-process;
* the CPU bound, each round: cores / (decode + model), each in CPU seconds per image measured one thread at a
  time (decode + preprocess; the model and its top-k at the loop's best batch, one inference thread);
* floor: a naive Serve deployment of the served model: no batching, one image per call;
* Lens: the Serve app as shipped (one pool, HAProxy in front), closed-loop clients at 1, 8, 32 and 64
  connections with real JPEG bodies, then an open-loop overload at 4x the measured throughput to show load
  shedding (503) with bounded latency; beside it in each round, the same app in fp32 and the same app running
  one batch at a time (``concurrent_batches: 1``) at 32 connections.

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
def shipped_model() -> dict:
    """The model settings of the shipped CPU profile's pool (infra/serve-cpu.yaml): what Lens serves here."""
    import yaml

    doc = yaml.safe_load((ROOT / "infra" / "serve-cpu.yaml").read_text())
    return dict(doc["applications"][0]["args"]["pools"][0]["model"])


def predictor_for(model: dict, *, lanes: int = 1, threads: int | None = None, batch: int = 64):
    """``model`` (a pool's model settings) on CPU, built for ``lanes`` batches at once, each on ``threads``
    threads (default: its share of the cores; one lane on the runtimes' default threads)."""
    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor

    if threads is None and lanes > 1:
        threads = max(1, (os.cpu_count() or 1) // lanes)
    return Predictor.from_config(ModelConfig(**(model | {"device": "cpu"}), num_threads=threads, streams=lanes,
                                             max_batch_size=batch))


def bench_ceiling(bodies: list[bytes], duration: float, model: dict) -> dict:
    """The in-process pipelined loop on ``model`` at its best batch size, decode threads and model lanes (one
    batch on every thread, or two batches at once on half the threads each: what a replica can run)."""
    from baselines import best_pipelined, for_seconds

    by_lanes = {k: predictor_for(model, lanes=k) for k in (1, 2)}
    for pred in by_lanes.values():
        pred.warmup()
    predictor = by_lanes[1]
    single = []
    for _ in range(3):
        for b in bodies:
            t0 = time.perf_counter()
            predictor.predict([b])
            single.append((time.perf_counter() - t0) * 1000)
    best = best_pipelined(predictor, lambda: for_seconds(bodies, duration), batch_sizes=(8, 16), lanes=by_lanes)
    served = predictor.info().get("quantization", {}).get("served")
    return {"loop": "pipelined: decode threads feed model batches (scripts/baselines.py)",
            "model": f"{predictor.info()['backend']} {served or model.get('precision') or 'fp32'}",
            "images_per_s": best["images_per_s"], "best_batch": best["batch_size"],
            "best_decode_threads": best["decode_threads"], "best_lanes": best["lanes"], "points": best["points"],
            "single_image_latency_ms_p50": round(percentile(single, 50), 2), "_predictor": by_lanes[best["lanes"]]}


def one_thread_predictor(model: dict, batch: int):
    """``model`` with one inference thread, warmed up at ``batch``, for :func:`cpu_bound`."""
    pred = predictor_for(model, threads=1, batch=batch)
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
                     decode_threads=ceiling["best_decode_threads"], lanes=ceiling["best_lanes"])["images_per_s"]


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
    """Ray and Serve as `lens serve` runs them (HAProxy mode, its front-door limits), on a free loopback port;
    returns the port and the front door's config. Ray is given 4x the cores as logical CPUs, so the apps compared
    stay deployed side by side (each measured alone, the others idle) instead of being redeployed per round."""
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    import ray
    from lens.serve.frontdoor import prepare
    from ray import serve

    frontdoor, runtime_env = prepare(None)
    port = free_port()
    ray.init(address="local", num_cpus=4 * (os.cpu_count() or 1), include_dashboard=False, logging_level="ERROR",
             runtime_env=runtime_env)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port, frontdoor


def naive_app(model: dict):
    """Floor: the served model, one image per call, no batching, Serve's defaults otherwise."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI()
    cores = os.cpu_count()

    @serve.deployment(name="Naive", ray_actor_options={"num_cpus": cores},
                      logging_config={"enable_access_log": False})
    @serve.ingress(api)
    class Naive:
        def __init__(self):
            from lens.runtime.config import ModelConfig
            from lens.runtime.predictor import Predictor

            self.p = Predictor.from_config(ModelConfig(**(model | {"device": "cpu"}), num_threads=cores))

        @api.post("/v1/tag")
        async def tag(self, request: Request):
            (r,) = self.p.predict([await request.body()])  # decode + infer inline, one image at a time
            return JSONResponse({"tags": [t.to_dict() for t in r.tags]} if r.ok else r.to_dict(),
                                status_code=200 if r.ok else r.status)

    return Naive.bind()


def deploy_lens(port: int, variants: dict[str, dict]) -> dict[str, str]:
    """The shipped CPU profile (infra/serve-cpu.yaml), one fixed replica each, as one application per variant
    (``{name: {"model": {...}, "pool": {...}}}`` changes the pool's model settings or the pool's own), all in one
    Serve config; returns each variant's tag URL."""
    import copy

    import yaml
    from lens.serve.run import deploy

    base = yaml.safe_load((ROOT / "infra" / "serve-cpu.yaml").read_text())
    base["http_options"].update(host="127.0.0.1", port=port)
    apps, urls = [], {}
    for name, change in variants.items():
        app = copy.deepcopy(base["applications"][0])
        pool = app["args"]["pools"][0]
        pool["model"].update(change.get("model", {}))
        pool.update(change.get("pool", {}))
        (dep,) = app["deployments"]
        dep.pop("autoscaling_config")
        dep["num_replicas"] = 1
        app.update(name=name, route_prefix=f"/{name}")
        apps.append(app)
        urls[name] = f"http://127.0.0.1:{port}/{name}/v1/tag"
    deploy(base | {"applications": apps}, where="bench")
    return urls


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
    grid = duration / 2  # each point of the loops' grid search; their best is measured again in every round
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    bodies = jpeg_bodies()
    from baselines import installed_fp32_backends

    served = shipped_model()  # what the shipped profile serves (OpenVINO int8 where the gate passes)
    fp32 = served | {"precision": "fp32"}  # the same backend in fp32: the int8 ratio's baseline
    models = {"served": served, "fp32": fp32} | {
        f"{b} fp32": {"name": served["name"], "backend": b, "precision": "fp32"}
        for b in installed_fp32_backends() if b != fp32["backend"]}
    loops = {k: bench_ceiling(bodies, grid, m) for k, m in models.items()}
    ceiling = loops["served"]
    gate = ceiling["_predictor"].info().get("quantization") or {}

    import ray
    from ray import serve

    port, frontdoor = start_serve()
    conns = (1, 8, 32, 64)
    # the shipped profile as it is; the same pool in fp32; the same pool running one batch at a time
    variants = {"lens": {}, "fp32": {"model": {"precision": "fp32"}}, "one-batch": {"pool": {"concurrent_batches": 1}}}
    at_32 = {"fp32": (8, 32), "one-batch": (32,)}
    try:
        serve.run(naive_app(served), name="naive", route_prefix="/naive")
        url = f"http://127.0.0.1:{port}/naive/v1/tag"
        asyncio.run(closed_loop(url, bodies, 4, 2))  # warm
        naive = aggregate([[asyncio.run(closed_loop(url, bodies, c, duration)) for c in conns]
                           for _ in range(args.rounds)])
        print("naive:", naive, file=sys.stderr)
        serve.delete("naive")
        urls = deploy_lens(port, variants)
        for u in urls.values():
            asyncio.run(closed_loop(u, bodies, 8, 2))  # warm
        rounds, others = [], {k: [] for k in at_32}
        again: dict = {k: [] for k in loops}
        one_thread = {k: one_thread_predictor(models[k], loops[k]["best_batch"]) for k in ("served", "fp32")}
        bounds: dict = {k: [] for k in one_thread}
        for r in range(args.rounds):  # each round: the bounds and every loop (Lens idle), then every Lens point
            for k, pred in one_thread.items():
                bounds[k].append(cpu_bound(pred, bodies))
            for k, loop in loops.items():
                again[k].append(ceiling_again(loop, bodies, duration))
            rounds.append([asyncio.run(closed_loop(urls["lens"], bodies, c, duration)) for c in conns])
            for k, cs in at_32.items():
                others[k].append([asyncio.run(closed_loop(urls[k], bodies, c, duration)) for c in cs])
            print(f"round {r + 1}: ceiling {again['served'][-1]}, lens {[p['throughput_rps'] for p in rounds[-1]]}, "
                  + ", ".join(f"{k} {[p['throughput_rps'] for p in v[-1]]}" for k, v in others.items()),
                  file=sys.stderr)
        lens = aggregate(rounds)
        best = max(p["throughput_rps"] for p in lens)
        # one load generator is one client address: keep its connections under the front door's per-client cap
        # (more are refused at accept by design), so the overload measures shedding, not the cap
        cap = frontdoor.max_conn_per_client or 2000
        overload = asyncio.run(open_loop(urls["lens"], bodies, 4 * best, duration, max_in_flight=max(1, cap - 16)))
        probe = asyncio.run(closed_loop(urls["lens"], bodies, 1, 2))
        healthy_after = set(probe["statuses"]) == {"200"}
    finally:
        serve.shutdown()
        ray.shutdown()

    for k, loop in loops.items():
        loop.pop("_predictor")
        loop["images_per_s_first"] = loop["images_per_s"]  # the grid search's best point
        loop["images_per_s_rounds"] = again[k]
        loop["images_per_s"] = round(statistics.median(again[k]), 2)
    i32 = conns.index(32)

    def paired(served_rounds: list, base: list) -> list[float]:
        return [round(x / b, 3) for x, b in zip(served_rounds, base)]

    lens_32 = [rnd[i32]["throughput_rps"] for rnd in rounds]
    fp32_32 = [rnd[at_32["fp32"].index(32)]["throughput_rps"] for rnd in others["fp32"]]
    one_32 = [rnd[at_32["one-batch"].index(32)]["throughput_rps"] for rnd in others["one-batch"]]
    per_round = {
        "lens_32_vs_ceiling": paired(lens_32, again["served"]),
        "lens_32_vs_best_loop": paired(lens_32, [max(again[k][i] for k in loops) for i in range(len(rounds))]),
        "lens_32_vs_cpu_bound": paired(lens_32, [b["images_per_s"] for b in bounds["served"]]),
        "fp32_32_vs_cpu_bound": paired(fp32_32, [b["images_per_s"] for b in bounds["fp32"]]),
        "fp32_32_vs_ceiling": paired(fp32_32, again["fp32"]),
        "int8_32_vs_fp32_32": paired(lens_32, fp32_32),
        "two_batches_vs_one_32": paired(lens_32, one_32),
    }
    at = {p["connections"]: p for p in lens}
    naive_at = {p["connections"]: p for p in naive}
    summary = {
        "benchmark": "serve",
        "machine": describe(),
        "model": served["name"],
        "served_model": {k: served[k] for k in ("backend", "precision") if k in served} | {
            "served": gate.get("served", served.get("precision", "fp32"))},
        "bodies": {"count": len(bodies), "mean_bytes": int(statistics.mean(map(len, bodies)))},
        "seconds_per_point": duration,
        "rounds": args.rounds,
        "frontdoor": frontdoor.model_dump(),
        "ceiling": ceiling,
        "loops": loops,
        "lens": {"by_connections": lens, "overload_4x": overload, "healthy_after_overload": healthy_after},
        "lens_fp32": {"by_connections": aggregate(others["fp32"])},
        "lens_one_batch_at_a_time": {"by_connections": aggregate(others["one-batch"])},
        "naive": {"by_connections": naive, "model": "the served model, one image per call"},
        # cores / (decode + model) per image, in CPU seconds, measured in each round beside the loops
        "cpu_bound": {"rounds": bounds["served"],
                      "images_per_s": round(statistics.median(b["images_per_s"] for b in bounds["served"]), 1)},
        "cpu_bound_fp32": {"rounds": bounds["fp32"],
                           "images_per_s": round(statistics.median(b["images_per_s"] for b in bounds["fp32"]), 1)},
        "gate": {k: gate[k] for k in ("top1_agreement", "top5_overlap", "mean_cosine", "recall_at_10_vs_fp32_index",
                                      "passed") if k in gate},
        "ratios": {k: round(statistics.median(v), 3) for k, v in per_round.items()}
        | {f"{k}_rounds": v for k, v in per_round.items()}
        | {"lens_32_vs_naive_32": round(at[32]["throughput_rps"] / naive_at[32]["throughput_rps"], 2),
           "lens_p50_at_1_minus_inprocess_ms": round(at[1]["p50_ms"] - ceiling["single_image_latency_ms_p50"], 2)},
    }
    r = summary["ratios"]
    summary["targets"] = {
        "lens_32 >= 0.7x ceiling": r["lens_32_vs_ceiling"] >= 0.7,
        # (replaces "lens_32 >= 3x naive", set against an eager-torch floor: against the same model served
        # unbatched, batching on 2 cores is worth ~1.1-1.3x, and that figure stays in the ratios)
        "lens_32 >= 0.9x cores / (decode + model)": r["lens_32_vs_cpu_bound"] >= 0.9,
        "p50 at 1 conn <= in-process + 15 ms": r["lens_p50_at_1_minus_inprocess_ms"] <= 15,
        "overload sheds with 503 and nothing else fails": overload["shed_503"] > 0 and overload["other"] == 0,
        "healthy after overload": healthy_after,
        "served int8 >= 1.3x served fp32 (32 connections)": summary["served_model"]["served"] == "int8"
        and r["int8_32_vs_fp32_32"] >= 1.3,
    }
    (out / "serve.json").write_text(json.dumps(summary, indent=2))
    plot(summary, out / "serve.png")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

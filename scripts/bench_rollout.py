#!/usr/bin/env python
"""Benchmark model versions in serving: router overhead, breach-to-rollback time, rolling alias flip; one JSON.

In one run, on the same machine, the shipped CPU profile (infra/serve-cpu.yaml, one replica, HAProxy in front)
with the embedded Lite0 (ONNX Runtime), 32 closed-loop connections of real JPEGs:

* overhead: throughput of the pool with fixed weights (no router: the baseline) and of the same pool serving
  a registry version with a running rollout at 0 % canary (the canary loaded, the watcher polling, per-version
  counters reported to the controller), in interleaved rounds (the ratio is of their means), then at 1 %
  (every request hashed, a few on the canary);
* rollback: a canary whose model fails (non-finite outputs) at 25 % with the default rollout settings
  (``eval_interval_s`` 5, ``poll_s`` 2): seconds from its first failed request to the controller's rollback
  decision, and to the last request the replica routed to it;
* flip: ``stable`` moved to another version under load: seconds from the alias write until every answer comes
  from the new version, and the failed requests meanwhile (the target: none).

Writes benchmarks/rollout.json.
"""

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_serve import closed_loop, jpeg_bodies, start_serve  # noqa: E402
from machine import describe  # noqa: E402 - the benchmarks' machine record (scripts/machine.py)


def deploy(port: int, pool: dict) -> str:
    import yaml
    from lens.serve.run import deploy as deploy_doc

    doc = yaml.safe_load((ROOT / "infra" / "serve-cpu.yaml").read_text())
    doc["http_options"].update(host="127.0.0.1", port=port)
    doc["applications"][0]["args"]["pools"][0].update(pool)
    (dep,) = doc["applications"][0]["deployments"]
    dep.pop("autoscaling_config")
    dep["num_replicas"] = 1
    deploy_doc(doc, where="bench")
    return f"http://127.0.0.1:{port}"


async def traced_load(url: str, bodies: list[bytes], conns: int, until) -> list:
    """Closed-loop load until ``until()`` is true; every answer as (time, status, version)."""
    import aiohttp

    out: list = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns),
                                     timeout=aiohttp.ClientTimeout(total=120)) as s:
        async def worker(k: int):
            i = k
            while not until():
                try:
                    async with s.post(url + "/v1/tag", data=bodies[i % len(bodies)],
                                      headers={"Content-Type": "image/jpeg"}) as r:
                        body = await r.json(content_type=None)
                        out.append((time.monotonic(), r.status, body.get("version") if r.status == 200 else None))
                except aiohttp.ClientError:
                    out.append((time.monotonic(), -1, None))
                i += 1
                await asyncio.sleep(0)

        await asyncio.gather(*(worker(k) for k in range(conns)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per throughput point")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the two overhead configurations")
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bodies = jpeg_bodies()

    from lens.registry.modelpack import package_model
    from lens.registry.store import Registry
    from lens.runtime.config import ModelConfig

    work = Path(tempfile.mkdtemp(prefix="lens-bench-rollout-"))
    reg = Registry(str(work / "models"))
    cfg = ModelConfig(backend="torch", device="cpu")
    base = package_model(cfg, str(work / "base"), name="tagger")
    reg.push(base)  # v1
    reg.push(base)  # v2: the same weights, another version (the flip)

    def nan_bias(sd):
        sd = dict(sd)
        sd["classifier.bias"] = sd["classifier.bias"] * float("nan")
        return sd

    reg.push(package_model(cfg, str(work / "nan"), name="tagger", state_dict_hook=nan_bias))  # v3: fails
    reg.set_alias("tagger", "stable", "v1")
    versions = {"registry": reg.root, "model": "tagger"}

    import ray
    import requests
    from ray import serve

    port, _ = start_serve()

    conns = 32
    result: dict = {}
    try:
        def point(url: str) -> dict:
            asyncio.run(closed_loop(url + "/v1/tag", bodies, 8, 3))  # warm
            p = asyncio.run(closed_loop(url + "/v1/tag", bodies, conns, args.duration))
            print(p, file=sys.stderr)
            return p

        # interleaved rounds (fixed, 0 %, fixed, 0 %, ...), so drift of this shared machine hits both alike
        fixed_runs, canary_runs = [], []
        reg.start_rollout("tagger", "v2", steps=(), weight=0.0, why="bench: 0% canary")
        for _ in range(args.rounds):
            fixed_runs.append(point(deploy(port, {})))
            url = deploy(port, {"versions": versions})
            deadline = time.monotonic() + 120
            while requests.get(url + "/v1/models", timeout=10).json()["pools"][0]["versions"]["canary"] != "tagger@v2":
                assert time.monotonic() < deadline, "canary never loaded"
                time.sleep(0.5)
            canary_runs.append(point(url))
        reg.set_traffic("tagger", weight=1.0, why="bench: 1% canary")
        time.sleep(5)
        canary1 = point(url)
        reg.rollback("tagger", why="bench: end of overhead runs")
        fixed = sum(p["throughput_rps"] for p in fixed_runs) / len(fixed_runs)
        canary0 = sum(p["throughput_rps"] for p in canary_runs) / len(canary_runs)
        result["overhead"] = {
            "connections": conns, "duration_s": args.duration, "rounds": args.rounds,
            "fixed_weights": fixed_runs, "versions_0pct_canary": canary_runs, "versions_1pct_canary": canary1,
            "fixed_weights_rps": round(fixed, 2), "versions_0pct_canary_rps": round(canary0, 2),
            "ratio_0pct_vs_no_router": round(canary0 / fixed, 3),
            "ratio_1pct_vs_no_router": round(canary1["throughput_rps"] / fixed, 3),
        }
        print(result["overhead"], file=sys.stderr)

        # -- breach to rollback ---------------------------------------------------------------
        url = deploy(port, {"versions": versions})
        reg.start_rollout("tagger", "v3", steps=(), weight=25.0, why="bench: failing canary")

        deadline = time.monotonic() + 180
        while requests.get(url + "/v1/models", timeout=10).json()["pools"][0]["versions"]["canary"] != "tagger@v3":
            assert time.monotonic() < deadline, "canary never loaded"
            time.sleep(0.5)
        state = {"rolled_at": None}

        def until() -> bool:
            r = reg.rollout("tagger")
            if r["status"] == "rolled_back" and state["rolled_at"] is None:
                state["rolled_at"] = time.monotonic()
            return state["rolled_at"] is not None and time.monotonic() - state["rolled_at"] > 8

        trace = asyncio.run(traced_load(url, bodies, conns, until))
        fails = [t for t, status, _ in trace if status >= 500]
        first_fail = min(fails)
        last_canary = max(fails)
        decision = [e for e in reg.history("tagger") if e["action"] == "decision"][-1]["decision"]
        result["rollback"] = {
            "canary_weight_pct": 25.0, "eval_interval_s": 5.0, "poll_s": 2.0,
            "requests": len(trace), "failed_on_canary": len(fails),
            "breach_to_decision_s": round(state["rolled_at"] - first_fail, 2),
            "breach_to_last_canary_request_s": round(last_canary - first_fail, 2),
            "decision": {"action": decision["action"], "reason": decision["reason"]},
        }
        print(result["rollback"], file=sys.stderr)

        # -- rolling alias flip -----------------------------------------------------------------
        flips = []
        for target in ("v2", "v1"):
            t0 = {"t": None}
            start = time.monotonic()

            def until_flip(target=target, start=start, t0=t0) -> bool:
                now = time.monotonic()
                if t0["t"] is None and now - start > 3:
                    reg.set_alias("tagger", "stable", target, why="bench: flip")
                    t0["t"] = time.monotonic()
                return t0["t"] is not None and now - t0["t"] > 15

            trace = asyncio.run(traced_load(url, bodies, conns, until_flip))
            after = [(t, v) for t, status, v in trace if t >= t0["t"]]
            old_answers = [t for t, v in after if v != f"tagger@{target}"]
            flips.append({"to": target, "requests": len(trace),
                          "failed": sum(1 for _, status, _ in trace if status != 200),
                          "flip_s": round((max(old_answers) - t0["t"]) if old_answers else 0.0, 2)})
            print(flips[-1], file=sys.stderr)
        result["flip"] = flips
    finally:
        serve.shutdown()
        ray.shutdown()

    summary = {
        "machine": describe(),
        "model": "tf_efficientnet_lite0 (embedded ImageNet weights), ONNX Runtime, 1 replica",
        **result,
        "targets": {"router_overhead_0pct_canary_ge_0.95x": result["overhead"]["ratio_0pct_vs_no_router"] >= 0.95,
                    "flip_without_failed_requests": all(f["failed"] == 0 for f in result["flip"])},
    }
    (out / "rollout.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

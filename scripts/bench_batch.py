#!/usr/bin/env python
"""Benchmark bulk embedding (`lens embed` on Ray Data) against the in-process pipelined loop; prints JSON.

Makes a seeded shard set of camera-size JPEGs made from the bundled real photos, then, --repeat times in turn:
  - baselines: one process reading the shards, decode threads feeding batches to the model on all cores
    (scripts/baselines.py), at its best batch size and thread count, on every installed fp32 CPU backend
    (ONNX Runtime, and OpenVINO where installed);
  - job: `lens embed` as a user runs it (`backend: auto`: the faster CPU backend, measured once per machine and
    model and cached) on a fresh local Ray (read -> decode + model actors -> Parquet parts), in its own process,
    whose peak memory (RSS summed over the driver and every Ray process it started, sampled every 0.2 s) is
    recorded;
  - the job again on 4x the rows, to check that peak memory stays flat.
Ratios, each against the loops of the same round: against the loop on the backend the job ran (the fair one),
and against the best loop of any backend. Three measures of the job: its dataset execution (actor start-up
included), steady state (first part written to last) and the whole command (Ray start included). The round with
the median ratio (against the chosen backend) is reported, every round listed. The start-up phases (Ray start,
the driver's model load with auto's choice, the actors' start, the first block) are reported separately.
Writes benchmarks/batch.json.
"""

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from machine import describe  # noqa: E402 - the benchmarks' machine record (scripts/machine.py)

#: camera-size photos: long side 3,000-4,000 px (9-12 MP), as a phone or camera writes them
CAMERA_LONG_SIDE = (3000, 4000)
#: distinct camera-size JPEGs made (each ~0.1 s to encode); rows cycle through them under their own ids
CAMERA_DISTINCT = 150


def make_shards(dst: Path, rows: int, rows_per_shard: int, seed: int, camera: bool = False) -> None:
    import itertools

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lens.runtime.samples import augmented_jpegs

    dst.mkdir(parents=True, exist_ok=True)
    ids, blobs, n = [], [], 0
    if camera:
        distinct = [data for _, data, _ in augmented_jpegs(min(rows, CAMERA_DISTINCT), seed=seed,
                                                           long_side=CAMERA_LONG_SIDE)]
        items = ((f"camera-{i:06d}.jpg", data) for i, data in zip(range(rows), itertools.cycle(distinct)))
    else:
        items = ((name, data) for name, data, _ in augmented_jpegs(rows, seed=seed))
    for name, data in items:
        ids.append(name)
        blobs.append(data)
        if len(ids) == rows_per_shard:
            pq.write_table(pa.table({"id": ids, "image": pa.array(blobs, pa.binary())}),
                           dst / f"part-{n:05d}.parquet", compression="none", row_group_size=64)
            ids, blobs, n = [], [], n + 1
    if ids:
        pq.write_table(pa.table({"id": ids, "image": pa.array(blobs, pa.binary())}),
                       dst / f"part-{n:05d}.parquet", compression="none", row_group_size=64)


def baseline(shards: Path, batch_size: int, backend: str = "onnx") -> dict:
    """The pipelined loop over the shards' images on ``backend`` on all cores: its best configuration."""
    import pyarrow.parquet as pq
    from baselines import best_pipelined, pipelined

    from lens.runtime.config import ModelConfig
    from lens.runtime.predictor import Predictor

    pred = Predictor.from_config(ModelConfig(backend=backend, device="cpu", max_batch_size=64))
    pred.warmup(batch_size)

    def images(limit: int | None = None):
        n = 0
        for f in sorted(shards.glob("*.parquet")):
            for rb in pq.ParquetFile(f).iter_batches(batch_size=256, columns=["image"]):
                for b in rb.column("image").to_pylist():
                    if limit is not None and n >= limit:
                        return
                    n += 1
                    yield b

    # its best batch size and decode threads, found on the first 400 rows, then the whole set with them
    probe = best_pipelined(pred, lambda: images(400), batch_sizes=sorted({16, batch_size}))
    run = pipelined(pred, images(), batch_size=probe["batch_size"], decode_threads=probe["decode_threads"])
    return run | {"backend": backend, "rows": run["images"], "probe": probe["points"]}


class TreeMemory:
    """Peak of the summed RSS of this process and all its descendants, sampled in a thread; and the CPU seconds each
    of them used while sampled (the last sample of each process, by its name: where the cores went besides the
    model actors)."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._cpu: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                procs = [self.proc]
            for p in procs:
                try:
                    total += p.memory_info().rss
                    t = p.cpu_times()
                    name = _process_name(p)  # a worker's title says its actor once it has one
                    if p.pid in self._cpu and name in ("ray::IDLE", "default_worker.py", "?"):
                        name = self._cpu[p.pid][0]
                    self._cpu[p.pid] = (name, t.user + t.system)
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def cpu_by_name(self) -> dict[str, float]:
        """CPU seconds per process name, largest first."""
        out: dict[str, float] = {}
        for name, cpu in self._cpu.values():
            out[name] = out.get(name, 0.0) + cpu
        return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _process_name(p) -> str:
    """A Ray process by its role (``ray::MapWorker(...)``, ``raylet``, ``gcs_server``, ...), the driver as
    ``driver``."""
    import psutil

    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    if p.pid == os.getpid():
        return "driver"
    name = cmd[0] if cmd else p.name()
    if name.startswith("ray::"):
        return name.split(" ")[0]
    for part in cmd[:3]:
        base = os.path.basename(part)
        if base.endswith(".py") or base in ("raylet", "gcs_server"):
            return base
    return os.path.basename(name)


def child_job(shards: str, out: str, batch_size: int, workers: int | None, cpus_per_worker: float | None,
              extra: dict | None = None, backend: str = "auto", precision: str = "auto") -> None:
    import ray  # noqa: F401 - Ray's vendored psutil needs ray imported first
    from lens.batch.config import EmbedConfig
    from lens.batch.job import run_embed

    knobs = ({"cpus_per_worker": cpus_per_worker} if cpus_per_worker else {}) | (extra or {})
    cfg = EmbedConfig(input=shards, output=out, batch_size=batch_size, workers=workers,
                      model={"backend": backend, "device": "cpu", "precision": precision}, **knobs)
    with TreeMemory() as mem:
        summary = run_embed(cfg, log=lambda *a: None)
    config = {k: getattr(cfg, k) for k in ("batch_size", "workers", "actor_cpus", "fused", "actor_threads", "read_rows",
                                           "decode_batch_size", "decode_cpus", "block_mb")}
    print("RESULT " + json.dumps(summary.to_dict() | {"peak_rss_mb": round(mem.peak / 2**20), "config": config,
                                                      "cpu_s_by_process": mem.cpu_by_name()}), flush=True)


class _Noop:
    """An actor that does nothing: the floor of a Ray Data actor pipeline's start-up."""

    def __call__(self, batch):
        return batch


def child_floor(workers: int) -> None:
    """Ray's own fixed cost on this machine, as `lens embed` meets it: a new local Ray (started as Lens starts it),
    then a Ray Data dataset of one row per actor through a pool of ``workers`` actors that import and load nothing;
    seconds to Ray up, and from the dataset's start to its first output row."""
    import ray
    import ray.data
    from lens.cluster import init_ray

    t0 = time.perf_counter()
    init_ray(None, what="floor")
    t_ray = time.perf_counter()
    ray.data.DataContext.get_current().target_max_block_size = 1
    ds = ray.data.from_items([{"x": i} for i in range(workers)], override_num_blocks=workers)
    ds = ds.map_batches(_Noop, batch_size=None, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    t_run = time.perf_counter()
    first = None
    for _ in ds.iter_rows():
        first = first or time.perf_counter()
    ray.shutdown()
    print("RESULT " + json.dumps({"ray_start_s": round(t_ray - t0, 2), "actors": workers,
                                  "first_output_after_run_start_s": round(first - t_run, 2),
                                  "run_s": round(time.perf_counter() - t_run, 2)}), flush=True)


def run_child(args: list[str], what: str) -> dict:
    """This script run with ``args`` in its own process (a fresh Ray, as each job gets): the JSON of its RESULT
    line, or an error with the end of its output."""
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                       env=dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1"))
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{what} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def ray_floor(workers: int) -> dict:
    """:func:`child_floor` in its own process."""
    return run_child(["--child-floor", str(workers)], "floor run")


def child_scaling(shards: str, out: str, nodes: int, batch_size: int, knobs: dict | None = None,
                  backend: str = "auto") -> None:
    """`lens embed` on a local cluster of ``nodes`` nodes, each pinned to its own core (2 logical CPUs each):
    node i's raylet, and every worker it starts, inherit the affinity the process had when the node was added.
    The driver stays on core 0 with the head node, as a driver does on a real head node."""
    import ray
    from lens.batch.config import EmbedConfig
    from lens.batch.job import run_embed
    from ray.cluster_utils import Cluster

    os.sched_setaffinity(0, {0})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    for core in range(1, nodes):
        os.sched_setaffinity(0, {core})
        cluster.add_node(num_cpus=2)
    os.sched_setaffinity(0, {0})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        cfg = EmbedConfig(**(knobs or {}) | dict(input=shards, output=out, batch_size=batch_size,
                                                    address=cluster.address,
                                                    model={"backend": backend, "device": "cpu"}))
        summary = run_embed(cfg, log=lambda *a: None)
        nodes_used = len({n["NodeID"] for n in ray.nodes() if n["Alive"]})
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(summary.to_dict() | {"nodes": nodes_used}), flush=True)


def scaling(shards: Path, tmp: Path, args, rounds: int = 2) -> dict:
    """images/s on 1 node vs 2 nodes (one core each), alternating ``rounds`` times; the medians compared."""
    if (os.cpu_count() or 1) < 2:
        return {"skipped": "needs 2 cores"}
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for r in range(rounds):
        for nodes in (1, 2):
            runs[nodes].append(run_child(["--child-scaling", str(shards), str(tmp / f"scale-{nodes}-{r}"), str(nodes),
                                          "--batch-size", str(args.batch_size), "--backend", args.backend]
                                         + (["--knobs", args.knobs] if args.knobs else []), "scaling run"))
    med = {n: statistics.median(j["images_per_s"] for j in js) for n, js in runs.items()}
    return {"setup": "ray.cluster_utils local cluster on loopback; each node pinned to its own core (2 logical "
                     "CPUs); the same shards; images/s over the dataset execution",
            "images_per_s_1_node": [j["images_per_s"] for j in runs[1]],
            "images_per_s_2_nodes": [j["images_per_s"] for j in runs[2]],
            "model_actors_2_nodes": runs[2][-1]["breakdown"]["model_actors"],
            "ratio_2_vs_1": round(med[2] / med[1], 3)}


def run_job(shards: Path, out: Path, args) -> dict:
    cmd = ["--child-job", str(shards), str(out), "--batch-size", str(args.batch_size), "--backend", args.backend,
           "--precision", getattr(args, "precision", "auto")]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    if args.cpus_per_worker:
        cmd += ["--cpus-per-worker", str(args.cpus_per_worker)]
    if args.knobs:
        cmd += ["--knobs", args.knobs]
    return run_child(cmd, "job")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--rows-per-shard", type=int, default=500)
    ap.add_argument("--small-photos", action="store_true", help="long side 256-800 px instead of camera-size "
                    "(3,000-4,000 px) JPEGs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backend", default="auto", help="the job's backend (default auto, as `lens embed` runs)")
    ap.add_argument("--precision", default="auto", help="the job's precision (default auto: fp32 on CPU; int8: "
                    "scripts/bench_embed_int8.py compares the two)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--cpus-per-worker", type=float, default=None, help="default: lens embed's")
    ap.add_argument("--repeat", type=int, default=3, help="baseline/job pairs at --rows (median reported)")
    ap.add_argument("--quick", action="store_true", help="500 rows, one pair")
    ap.add_argument("--no-memory", action="store_true", help="skip the 4x run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "batch.json"))
    ap.add_argument("--child-job", nargs=2, metavar=("SHARDS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--knobs", default=None, help="JSON of other `lens embed` config fields for the job")
    ap.add_argument("--child-scaling", nargs=3, metavar=("SHARDS", "OUT", "NODES"), help=argparse.SUPPRESS)
    ap.add_argument("--no-scaling", action="store_true", help="skip the 1-node vs 2-node runs")
    ap.add_argument("--no-compare", action="store_true",
                    help="skip the run with decode tasks feeding the model actors (decode_in_actors: false)")
    ap.add_argument("--child-floor", type=int, metavar="WORKERS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_floor:
        return child_floor(args.child_floor)
    if args.child_scaling:
        return child_scaling(*args.child_scaling[:2], int(args.child_scaling[2]), args.batch_size,
                             json.loads(args.knobs) if args.knobs else None, args.backend)
    if args.child_job:
        return child_job(*args.child_job, args.batch_size, args.workers, args.cpus_per_worker,
                         json.loads(args.knobs) if args.knobs else None, args.backend, args.precision)
    rows = 500 if args.quick else args.rows
    if args.quick:
        args.repeat = 1

    with tempfile.TemporaryDirectory(prefix="lens-bench-batch-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_shards(tmp / "x1", rows, args.rows_per_shard, seed=0, camera=not args.small_photos)
        made_s = time.perf_counter() - t0
        # The machine is shared and noisy: every backend's loop and the job alternate `--repeat` times; the round
        # with the median ratio (against the loop on the backend the job chose) is reported, every round listed.
        from baselines import installed_fp32_backends

        backends = installed_fp32_backends()
        rounds = []
        for i in range(args.repeat):
            bases = {b: baseline(tmp / "x1", args.batch_size, b) for b in backends}
            job = run_job(tmp / "x1", tmp / f"out1-{i}", args)
            chosen = job["served"]["backend"]
            if chosen not in bases:  # a backend no loop ran (torch on CPU by request): measure it too
                bases[chosen] = baseline(tmp / "x1", args.batch_size, chosen)
            floor = ray_floor(job["breakdown"]["model_actors"])
            rounds.append({"bases": bases, "job": job, "chosen": chosen, "floor": floor,
                           "best": max(bases, key=lambda b: bases[b]["images_per_s"])})

        def ratios(job: dict, loop_ips: float) -> dict:
            return {"dataset": round(job["images_per_s"] / loop_ips, 3),
                    "steady": round(job["steady_images_per_s"] / loop_ips, 3),
                    "whole_job": round(job["rows_run"] / job["seconds"] / loop_ips, 3)}

        for r in rounds:
            r["vs_chosen"] = ratios(r["job"], r["bases"][r["chosen"]]["images_per_s"])
            r["vs_best"] = ratios(r["job"], r["bases"][r["best"]]["images_per_s"])
        rep = sorted(rounds, key=lambda r: r["vs_chosen"]["dataset"])[len(rounds) // 2]
        job, chosen = rep["job"], rep["chosen"]
        base = rep["bases"][chosen]
        base_median = statistics.median(r["bases"][r["chosen"]]["images_per_s"] for r in rounds)
        b = job["breakdown"]
        summary = {
            "benchmark": "batch",
            "machine": describe(python=platform.python_version()),
            "model": "tf_efficientnet_lite0 (embedded weights), CPU",
            "rows": rows, "rows_per_shard": args.rows_per_shard, "make_shards_s": round(made_s, 1),
            "photos": "small" if args.small_photos else "camera",
            "repeats": args.repeat,
            "job_backend": args.backend,
            "chosen_backend": chosen,
            "served": job["served"],
            "loops_by_backend": {bk: {"images_per_s_rounds": [r["bases"][bk]["images_per_s"] for r in rounds
                                                             if bk in r["bases"]],
                                      "images_per_s_median": statistics.median(
                                          r["bases"][bk]["images_per_s"] for r in rounds if bk in r["bases"])}
                                 for bk in rounds[0]["bases"]},
            "runs": [{"chosen": r["chosen"], "best_loop": r["best"],
                      "loops_images_per_s": {bk: v["images_per_s"] for bk, v in r["bases"].items()},
                      "job_images_per_s": r["job"]["images_per_s"],
                      "job_steady_images_per_s": r["job"]["steady_images_per_s"],
                      "job_whole_images_per_s": round(r["job"]["rows_run"] / r["job"]["seconds"], 1),
                      "vs_chosen": r["vs_chosen"], "vs_best": r["vs_best"],
                      "first_output_s": r["job"]["first_output_s"], "ray_floor": r["floor"]} for r in rounds],
            "baseline_pipelined": base,
            "job": job,
            "vs_chosen_backend_loop": rep["vs_chosen"],
            "vs_best_loop": rep["vs_best"] | {"backend": rep["best"]},
            # the start-up phases of the reported run, in order (seconds)
            "phases": {"ray_start_s": b["ray_start_s"],
                       "driver_model_load_s": b["driver_model_load_s"],
                       "first_actor_ready_after_run_start_s": b["first_actor_ready_s"],
                       # each model actor: its worker process's start (before or after the run's), process start
                       # to the actor's own start (Python, Ray, Ray Data and Lens imports; waiting for the task)
                       "actors": b["actors"],
                       "actor_model_load_max_s": b["actor_init_s_max"],
                       "first_output_after_run_start_s": b["to_first_output_s"],
                       "finish_s": b.get("finish_s"),
                       "not_embedding_s": round(job["seconds"] - b["run_s"] + b["to_first_output_s"], 2),
                       "whole_job_s": job["seconds"]},
            # Ray's own floor in the same round: a fresh Ray as Lens starts it, then an actor pool of the job's size
            # whose actors load nothing, to its first output row
            "ray_floor": rep["floor"],
        }
        floor = rep["floor"]
        fixed_floor = floor["ray_start_s"] + floor["first_output_after_run_start_s"]
        loop_s = rows / base["images_per_s"]
        summary["whole_job_bound"] = {
            "note": "the whole job's ratio if everything after Ray's floor ran at the loop's speed: rows at the "
                    "loop's images/s, plus Ray's start and an empty actor pool's first output (measured above)",
            "ray_floor_s": round(fixed_floor, 2),
            "ratio": round(loop_s / (loop_s + fixed_floor), 3),
        }
        if not args.no_compare:
            # the other pipeline shape on the same data: decode tasks feeding the model actors (what GPU actors use)
            other = copy.copy(args)
            other.knobs = json.dumps((json.loads(args.knobs) if args.knobs else {}) | {"decode_in_actors": False})
            tasks = run_job(tmp / "x1", tmp / "out-tasks", other)
            summary["job_decode_tasks"] = tasks
            summary["decode_tasks_vs_chosen_backend_loop"] = {
                "dataset": round(tasks["images_per_s"] / base_median, 3),
                "steady": round(tasks["steady_images_per_s"] / base_median, 3),
                "whole_job": round(tasks["rows_run"] / tasks["seconds"] / base_median, 3),
                "first_output_s": tasks["first_output_s"]}
        if not args.no_memory:
            make_shards(tmp / "x4", rows * 4, args.rows_per_shard, seed=1, camera=not args.small_photos)
            job4 = run_job(tmp / "x4", tmp / "out4", args)
            summary["job_4x_rows"] = job4
            summary["ratio_4x_rows_vs_chosen_backend_loop"] = round(job4["images_per_s"] / base_median, 3)
            # against the smallest 1x peak, the least favourable comparison
            summary["peak_rss_mb_1x_min"] = min(r["job"]["peak_rss_mb"] for r in rounds)
            summary["peak_memory_ratio_4x"] = round(job4["peak_rss_mb"] / summary["peak_rss_mb_1x_min"], 3)
            summary["target_memory_ratio"] = 1.5
        summary["first_output_after_ray_up_s"] = round(b["driver_model_load_s"] + b["to_first_output_s"], 2)
        summary["ray_floor_first_output_after_ray_up_s"] = floor["first_output_after_run_start_s"]
        if not args.no_scaling:
            summary["scaling"] = scaling(tmp / "x1", tmp, args)
        vs = summary["vs_chosen_backend_loop"]
        summary["targets"] = {
            "steady state >= 0.95x the loop on the chosen backend": vs["steady"] >= 0.95,
            "whole job (Ray start included) >= 0.75x the loop on the chosen backend": vs["whole_job"] >= 0.75,
            "first output within Ray's start + 3 s": summary["first_output_after_ray_up_s"] <= 3.0,
        }
        if "scaling" in summary and "ratio_2_vs_1" in summary["scaling"]:
            summary["targets"]["2 nodes >= 1.7x one node"] = summary["scaling"]["ratio_2_vs_1"] >= 1.7
        if "peak_memory_ratio_4x" in summary:
            summary["targets"]["peak memory at 4x rows <= 1.5x"] = summary["peak_memory_ratio_4x"] <= 1.5
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""``lens embed``: the bulk embedding job on Ray Data.

read units (Parquet row groups or image files) -> on CPU, model actors that read + decode (threads), embed and
write Parquet parts themselves; with GPU actors, read + decode CPU tasks -> model actors -> writer actors
-> the driver counts rows per input shard and commits each shard when all its rows are accounted for
(embedded + errors = input rows). Execution is streaming, so every stage runs at once and memory is bounded by
Ray Data's backpressure, not by the dataset size.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from lens import __version__
from lens.cluster import absolute, init_ray
from lens.errors import ConfigError
from lens.faults import crash_point
from lens.identity import ModelIdentity
from lens.runtime.loading import load_model, served_line
from lens.storage import Location

from .config import EmbedConfig
from .ledger import FORMAT, Ledger
from .shards import InputShard, discover_shards, output_carry, read_units

__all__ = ["EmbedSummary", "run_embed", "plan_workers"]

logger = logging.getLogger(__name__)


def _write_profile(out: Location) -> None:
    """The drift reference profile of this output (``drift-profile.npz`` beside the manifest), for serving to test
    live traffic against; a job too small for one (fewer than 64 rows) writes none."""
    from lens.quality.drift import PROFILE_FILE, profile_of

    try:
        profile = profile_of(out.uri)
    except ValueError as e:
        logger.info("no drift profile for %s: %s", out.uri, e)
        return
    out.write_bytes(out.path(PROFILE_FILE), profile.to_bytes())

#: memory a decode task may hold per image in flight (a 12 MP RGB decode is 36 MB; JPEG draft mode keeps most
#: photos far below that)
DECODE_BYTES_PER_IMAGE = 8 << 20
#: a decode worker process itself (Python, pyarrow, Pillow, numpy)
DECODE_WORKER_BYTES = 256 << 20


@dataclass
class EmbedSummary:
    output: str
    input_rows: int
    embedded: int
    errors: int
    shards: int
    shards_skipped: int
    shards_run: int
    rows_run: int
    seconds: float  # the whole job: discovery, model check, Ray start, run, manifest
    run_seconds: float  # the dataset's execution: first read to last shard committed
    images_per_s: float  # rows_run / run_seconds
    first_output_s: float  # run start to the first rows written: Ray's and the actors' start-up
    steady_images_per_s: float  # rows after the first part / time from the first part to the last
    manifest: str
    breakdown: dict = field(default_factory=dict)  # where the time went (see run_embed's log line)
    served: dict = field(default_factory=dict)  # what ran: backend, precision, release, auto's and the gate's say

    def to_dict(self) -> dict:
        return asdict(self)


def plan_workers(cfg: EmbedConfig, cluster: dict) -> tuple[int, dict]:
    """(actor pool size, per-actor resources) for the model stage, from the config and the cluster."""
    if cfg.uses_gpu:
        gpus = cluster.get("GPU", 0)
        if gpus < cfg.gpus_per_worker:
            raise ConfigError(f"gpus_per_worker={cfg.gpus_per_worker} but the Ray cluster has {gpus:g} GPU(s)")
        n = cfg.workers or max(1, int(gpus // cfg.gpus_per_worker))
        return n, {"num_gpus": cfg.gpus_per_worker, "num_cpus": cfg.actor_cpus}
    cpus = cluster.get("CPU", 1)
    if cfg.fused:  # the actors decode too: they may take every CPU
        if cfg.actor_cpus > cpus:
            raise ConfigError(f"cpus_per_worker={cfg.actor_cpus:g} is more than the cluster's {cpus:g} CPU(s)")
        if cfg.workers and cfg.workers * cfg.actor_cpus > cpus:
            raise ConfigError(f"workers={cfg.workers} x cpus_per_worker={cfg.actor_cpus:g} is more than the "
                              f"cluster's {cpus:g} CPUs: the job could not start")
        return cfg.workers or max(1, int(cpus // cfg.actor_cpus)), {"num_cpus": cfg.actor_cpus}
    if cpus < cfg.actor_cpus + 1:
        raise ConfigError(f"cpus_per_worker={cfg.actor_cpus:g} leaves no CPU for decoding on a cluster "
                          f"with {cpus:g} CPU(s)")
    if cfg.workers:
        if cfg.workers * cfg.actor_cpus > cpus - 1:
            raise ConfigError(f"workers={cfg.workers} x cpus_per_worker={cfg.actor_cpus:g} leaves less than "
                              f"one of the cluster's {cpus:g} CPUs to read and decode: the job could not start")
        return cfg.workers, {"num_cpus": cfg.actor_cpus}
    # The other half decodes. A fixed pool, not an autoscaling one: Ray Data's pool scaled 1 -> 2 -> 1 ... during
    # one job (5 actor start-ups in a 50 s run on 2 cores), each time with one actor idle or starting.
    return max(1, int((cpus / 2) // cfg.actor_cpus)), {"num_cpus": cfg.actor_cpus}


#: Read units per concurrent unit slot (model actors x actor_threads) at least, where ``read_rows`` allows.
UNITS_PER_SLOT = 8


def unit_rows(total_rows: int, slots: int, read_rows: int) -> int:
    """Rows per read unit: ``read_rows``, or fewer where the job is small for its pool. A job ends when its last unit
    does; with few units per slot, the slots that finish early sit idle while the slow ones (a busier node) work
    through a whole unit. On a 2-node cluster (3,000 rows, 8 slots; one run each of scripts/bench_batch.py's scaling
    child) 128-row units scaled 1.64x one node and 64-row units 1.79x; benchmarks/batch.json has the committed figure.
    On big jobs ``read_rows`` wins (fewer, larger reads and parts)."""
    return max(1, min(read_rows, math.ceil(total_rows / (UNITS_PER_SLOT * max(1, slots)))))


def _actor_model(cfg: EmbedConfig):
    """The model config the actors load: their device and thread count follow their resources."""
    update: dict = {}
    if cfg.uses_gpu:
        if cfg.model.device in ("auto", "cpu"):
            update["device"] = "cuda"
    else:
        update["device"] = "cpu"
        if cfg.model.num_threads is None and cfg.fused:
            # One inference thread per reserved CPU: the actor's other threads decode beside it.
            update["num_threads"] = max(1, math.ceil(cfg.actor_cpus))
        elif cfg.model.num_threads is None:
            # Decoding is ~1/5 of the CPU work per image and runs beside the model, so actors run twice the threads
            # they reserve. Single-threaded actors (the default) beat fewer multi-threaded ones when decoding shares
            # the cores: a descheduled thread stalls its whole intra-op pool, not the other actors. On 2 cores,
            # 2 actors x 1 thread ran 123-130 images/s where 1 actor x 2 threads ran 116 (12,000 rows).
            update["num_threads"] = max(1, math.ceil(2 * cfg.actor_cpus))
    update["max_batch_size"] = cfg.batch_size
    return cfg.model.model_copy(update=update)


def _identity(cfg: EmbedConfig, identity: ModelIdentity, carry: tuple[str, ...]) -> dict:
    return {
        "format": FORMAT,
        "model_identity": identity.to_dict(),
        "top_k": cfg.top_k,
        "input": cfg.input,
        "carry_columns": list(carry),
    }


def _build_dataset(cfg: EmbedConfig, in_loc: Location, fmt: str, pending: list[InputShard], model_info: dict,
                   carry: tuple[str, ...]):
    import ray.data

    from .stages import Embedder, PartWriter, UnitEmbedder, decode_units

    # Small blocks keep the stages streaming: a block is the unit handed from stage to stage, and one of Ray's
    # default 128 MiB would hold ~850 preprocessed images, which the model could not start on before all were
    # decoded. One decode batch per block: with 8 MiB blocks the first model batch waited for three decode
    # batches, and the first part came ~1.5 s later (scripts/bench_batch.py, 2 cores).
    _, h, w = model_info["preprocess"]["input_size"]
    block = cfg.block_mb * 2**20 if cfg.block_mb else max(1 << 20, cfg.decode_batch_size * h * w * 3 + (64 << 10))
    if cfg.fused:
        # The one stage emits only the parts' records (a few hundred bytes each); a block limit below one record
        # makes Ray Data hand each on as it is yielded rather than when its unit is done, so the driver commits
        # shards (and sees the first output) as parts are written. (A dataset copies the context when created.)
        block = 1
    ray.data.DataContext.get_current().target_max_block_size = int(block)
    size, resources = plan_workers(cfg, ray.cluster_resources())
    # One block per read unit, so one decode task (or actor call) per unit; the tasks read their rows themselves.
    rows = unit_rows(sum(s.rows for s in pending), size * (cfg.actor_threads if cfg.fused else 1), cfg.read_rows)
    units = read_units(pending, rows)
    ds = ray.data.from_items([{"unit": json.dumps(u.to_row())} for u in units], override_num_blocks=len(units))
    id_column = cfg.id_column if fmt == "parquet" else "id"
    decoder = {"input_uri": in_loc.uri, "preprocess": model_info["preprocess"], "decode": cfg.decode,
               "id_column": id_column, "image_column": cfg.image_column, "carry_columns": carry,
               "batch_size": cfg.decode_batch_size}
    writer = {"output": cfg.output, "id_column": id_column, "carry_columns": carry}
    model = {"model": _actor_model(cfg), "decode": cfg.decode, "top_k": cfg.top_k}
    if cfg.fused:
        # Each actor reads, decodes (decode_batch_size images per model call), embeds and writes its units, several
        # at once in threads: scripts/bench_batch.py measured this against decode tasks feeding the actors (see README).
        pool = ray.data.ActorPoolStrategy(size=size, max_concurrent_calls_per_actor=cfg.actor_threads,
                                          enable_true_multi_threading=True)
        return ds.map_batches(UnitEmbedder, batch_format="pyarrow", batch_size=None, compute=pool,
                              fn_constructor_kwargs={"decoder": decoder, **model, **writer}, **resources)
    # Decoding holds a few full-size images per row in memory; saying so also keeps Ray Data from fusing this
    # stage into the model actors (it fuses stages with identical resource requests), so the two overlap.
    ds = ds.map_batches(decode_units, batch_format="pyarrow", batch_size=None, num_cpus=cfg.decode_cpus,
                        memory=DECODE_WORKER_BYTES + cfg.decode_batch_size * DECODE_BYTES_PER_IMAGE,
                        fn_kwargs=decoder)
    pool = ray.data.ActorPoolStrategy(size=size)
    ds = ds.map_batches(Embedder, batch_format="pyarrow", batch_size=cfg.batch_size, compute=pool,
                        fn_constructor_kwargs=model, **resources)
    # Writers are a small pool of actors started with the pipeline (no CPU reserved: they wait on storage), not
    # tasks: a task needs a worker process, and on a busy machine starting one delayed the first part by ~1.5 s.
    # One writer per 8 model actors (a part of 32 rows is one PUT); each is one more process to start.
    return ds.map_batches(PartWriter, batch_format="pyarrow", batch_size=None, num_cpus=0,
                          compute=ray.data.ActorPoolStrategy(size=max(1, size // 8)),
                          fn_constructor_kwargs=writer)


def run_embed(cfg: EmbedConfig, *, log=print) -> EmbedSummary:
    """Embed every input shard not yet committed in ``cfg.output``; write the manifest when all are."""
    t0 = time.perf_counter()
    # local paths absolute before any Ray task sees them (a joined cluster's workers have another working folder)
    cfg = cfg.model_copy(update={"input": absolute(cfg.input), "output": absolute(cfg.output),
                                 "model": cfg.model.with_absolute_paths()})
    out = Location.parse(cfg.output)
    in_loc, fmt, shards = discover_shards(
        cfg.input, cfg.input_format, id_column=cfg.id_column, image_column=cfg.image_column,
        carry_columns=cfg.carry_columns, extensions=cfg.image_extensions, files_per_shard=cfg.files_per_shard)
    carry = output_carry(fmt, shards, cfg.id_column, cfg.image_column, tuple(cfg.carry_columns))
    ledger = Ledger(out)
    done = ledger.completed()
    pending = [s for s in shards if s.key not in done]
    t_discovered = time.perf_counter()
    if any(s.rows for s in pending):
        init_ray(cfg.address, log=log, what="lens embed")  # first: Ray's workers start while the driver loads the model
    t_ray = time.perf_counter()
    # The driver loads the model once: its checksum and preprocessing define the output, and on this node the
    # ONNX export is then cached for the actors. On CPU it loads it as the actors run it (their thread count),
    # so `auto` picks the runtime that is faster there.
    model = load_model(cfg.model.model_copy(update={"device": "cpu"}) if cfg.uses_gpu else _actor_model(cfg))
    info, identity = model.info(), model.identity()
    del model
    t_model = time.perf_counter()
    log(f"lens embed: model {identity.model}: {served_line(info['served'])}")
    if not cfg.uses_gpu and cfg.model.backend == "auto":
        # the driver's choice is the job's: every actor runs the backend the manifest names (on a cluster whose
        # nodes differ, auto could otherwise pick another backend on another CPU)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"backend": identity.backend})})
    ledger.claim(_identity(cfg, identity, carry))
    ledger.drop_manifest()  # present only when every shard is committed
    log(f"lens embed: {len(shards)} {fmt} shard(s), {sum(s.rows for s in shards)} rows; "
        f"{len(shards) - len(pending)} already done, {len(pending)} to run -> {out.uri}")

    counts: dict[str, int] = defaultdict(int)
    parts: dict[str, list[dict]] = defaultdict(list)
    by_key = {s.key: s for s in shards}
    for s in pending:
        ledger.reset(s.key)
        if s.rows == 0:
            done[s.key] = ledger.commit(s.key, in_loc.uri_of(s.path), 0, [])
    todo = [s for s in pending if s.rows > 0]
    rows_run = sum(s.rows for s in todo)
    t_run = time.perf_counter()
    first_out = last_out = None
    first_rows = 0
    stage = {"read_s": 0.0, "decode_s": 0.0, "model_s": 0.0, "write_s": 0.0, "commit_s": 0.0}
    actors: set[str] = set()
    if todo:
        ds = _build_dataset(cfg, in_loc, fmt, todo, info, carry)
        for rec in ds.iter_rows():
            now = time.perf_counter()
            if first_out is None:
                first_out, first_rows = now, rec["rows"]
            last_out = now
            key = rec["shard"]
            parts[key].append(rec)
            counts[key] += rec["rows"]
            for k in ("read_s", "decode_s", "model_s", "write_s"):
                stage[k] += rec.get(k) or 0.0
            actors.update(rec.get("actors") or ())
            shard = by_key[key]
            if counts[key] > shard.rows:
                raise RuntimeError(f"shard {key} produced {counts[key]} rows but has {shard.rows}")
            if counts[key] == shard.rows:
                tc = time.perf_counter()
                done[key] = ledger.commit(key, in_loc.uri_of(shard.path), shard.rows, parts.pop(key))
                stage["commit_s"] += time.perf_counter() - tc
                crash_point("embed.after_commit")
    run_s = time.perf_counter() - t_run
    missing = [s.key for s in shards if s.key not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) did not complete (their row counts changed while "
                           f"running?): {missing[:10]}")

    markers = [done[s.key] for s in shards]
    embedded = sum(m["embedded"] for m in markers)
    errors = sum(m["errors"] for m in markers)
    input_rows = sum(m["rows"] for m in markers)
    manifest = {
        "format": FORMAT,
        "lens_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model_identity": identity.to_dict(),
        "served": info["served"],
        "weights": info["weights"],
        "embedding": "L2-normalised float32; cosine similarity = inner product",
        "top_k": cfg.top_k,
        "input": cfg.input,
        "input_format": fmt,
        "id_column": cfg.id_column if fmt == "parquet" else "relative file path",
        "carry_columns": list(carry),
        "rows": embedded,
        "errors": errors,
        "input_rows": input_rows,
        "shards": markers,
        "files": [f for m in markers for f in m["files"]],
        "error_files": [f for m in markers for f in m["error_files"]],
    }
    ledger.write_manifest(manifest)
    _write_profile(out)
    if embedded + errors != input_rows:  # the markers each balance; this is a last guard
        raise RuntimeError(f"row accounting failed: {embedded} + {errors} != {input_rows}")
    elapsed = time.perf_counter() - t0
    breakdown = _breakdown(t0, t_discovered, t_ray, t_model, t_run, first_out, run_s, stage, actors, rows_run)
    breakdown["finish_s"] = round(elapsed - (t_run - t0) - run_s, 2)  # the manifest and the drift profile
    log("lens embed: where the time went: " + ", ".join(f"{k} {v}" for k, v in breakdown.items()
                                                        if not isinstance(v, list)))
    return EmbedSummary(output=out.uri, input_rows=input_rows, embedded=embedded, errors=errors,
                        shards=len(shards), shards_skipped=len(shards) - len(pending), shards_run=len(todo),
                        rows_run=rows_run, seconds=round(elapsed, 2), run_seconds=round(run_s, 2),
                        images_per_s=round(rows_run / run_s, 1) if rows_run and run_s > 0 else 0.0,
                        first_output_s=round(first_out - t_run, 2) if first_out else 0.0,
                        steady_images_per_s=round((rows_run - first_rows) / (last_out - first_out), 1)
                        if first_out and last_out > first_out else 0.0,
                        manifest=out.uri_of(out.path("manifest.json")), breakdown=breakdown, served=info["served"])


def _breakdown(t0: float, t_discovered: float, t_ray: float, t_model: float, t_run: float, first_out: float | None,
               run_s: float, stage: dict, actors: set[str], rows: int) -> dict:
    """Seconds from the job's start to each phase's end (driver), the model actors' start-up (each actor's own
    model load + warm-up, and when it was ready after the run started), and each stage's summed wall time (over
    every task or actor, so it can exceed the run's length when stages overlap)."""
    now_unix, now = time.time(), time.perf_counter()
    starts = []
    run_start_unix = now_unix - (now - t_run)
    for a in sorted(actors):
        _pid, init_s, ready_at, *more = a.split(":")
        start = {"init_s": float(init_s), "ready_after_run_start_s": round(float(ready_at) - run_start_unix, 2)}
        if len(more) == 2 and float(more[0]) > 0:  # the worker process's start, and its start-up + imports
            start["process_after_run_start_s"] = round(float(more[0]) - run_start_unix, 2)
            start["process_to_init_s"] = round(float(more[1]) - float(more[0]), 2)
        starts.append(start)
    return {
        "discover_s": round(t_discovered - t0, 2),
        "ray_start_s": round(t_ray - t_discovered, 2),
        "driver_model_load_s": round(t_model - t_ray, 2),
        "to_first_output_s": round(first_out - t_run, 2) if first_out else None,
        "run_s": round(run_s, 2),
        "model_actors": len(starts),
        "first_actor_ready_s": min((s["ready_after_run_start_s"] for s in starts), default=None),
        "actor_init_s_max": max((s["init_s"] for s in starts), default=None),
        **{f"{k}_total": round(v, 2) for k, v in stage.items()},
        "model_ms_per_image": round(1000 * stage["model_s"] / rows, 2) if rows else None,
        "decode_ms_per_image": round(1000 * stage["decode_s"] / rows, 2) if rows else None,
        "actors": starts,
    }

#!/usr/bin/env python
"""Write the benchmark figures into benchmarks/REPORT.md, the manual's Performance page (docs/performance.md)
and README.md from benchmarks/*.json, never by hand.

    python scripts/report.py          # regenerate them (bench_all.py calls this after running the benchmarks)
    python scripts/report.py --check  # exit 1 if any differs from what the JSON gives

README.md holds two generated blocks: the install sizes (``<!-- install:begin -->`` ... ``<!-- install:end -->``)
and the unmet-target list (``<!-- targets:begin -->`` ... ``<!-- targets:end -->``). Every number is read
from a JSON file a committed script wrote, and every machine line from what that JSON recorded.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
ORDER = ["model", "formats", "tag", "serve", "client", "failover", "events", "s3-clients", "priority", "priority-shipped",
         "deletes", "backfill", "batch", "embed-int8", "index", "filters", "shards", "train", "rollout", "drift", "gpu-check"]
SCRIPT = {n: f"scripts/bench_{n}.py" for n in ORDER} | {"embed-int8": "scripts/bench_embed_int8.py",
                                                        "s3-clients": "scripts/bench_s3_clients.py",
                                                        "priority-shipped": "scripts/bench_priority.py",
                                                        "gpu-check": "scripts/gpu_check.sh"}


def load(name: str) -> dict | None:
    p = BENCH / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def ok(flag: bool) -> str:
    return "met" if flag else "**not met**"


def n(x, digits: int = 1) -> str:
    """A number as the JSON has it, with thousands separators."""
    if x is None:
        return "–"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:,.{digits}f}"
    return f"{int(x):,}"


def targets_md(d: dict) -> list[str]:
    return [f"* target `{k}`: {ok(v)}" for k, v in d.get("targets", {}).items()]


def model_md(m: dict) -> list[str]:
    ips = m["images_per_s"]
    batches = list(next(iter(ips.values())))
    out = [f"Model runtime (`{SCRIPT['model']}`, `benchmarks/model.json|png`), {m['model']}, random inputs:", "",
           "| images/s | " + " | ".join(b.replace("_", " ") for b in batches) + " |",
           "|---|" + "---|" * len(batches)]
    for name, row in ips.items():
        out.append(f"| {name} | " + " | ".join(n(row[b]) for b in batches) + " |")
    r = m["ratios"]
    out += ["", f"* `auto` (here: {m['auto_backend_on_this_machine']}) vs torch eager at batch 8: "
                f"**{r['auto_vs_torch_eager_batch8']}×**."]
    for name, d in m["decode_preprocess"].items():
        ms = d["ms_per_image"]
        out.append(f"* decode + preprocess, {name} ({d['size']}, {n(d['bytes'])} bytes): Lens draft mode "
                   f"{ms['lens_draft']} ms vs full decode then resize {ms['full_decode_then_resize']} ms, "
                   f"**{d['draft_speedup_vs_full_decode_then_resize']}×**; same top-1: {d['same_top1']}.")
    c = m["cold_start"]
    out.append(f"* replica cold start with a warm cache (imports + load + warm-up, fresh process): ONNX "
               f"**{c['onnx']['total_s']} s**, torch {c['torch']['total_s']} s.")
    if "agreement_with_onnx_fp32" in m:
        r = m["ratios"]
        out.append(f"* CPU: {', '.join(m.get('cpu_flags', [])) or 'unknown flags'}. OpenVINO int8 vs ONNX Runtime fp32: "
                   + ", ".join(f"{b.replace('_', ' ')} **{v}×**" for b, v in r["openvino_int8_vs_onnxruntime_fp32"].items())
                   + "; OpenVINO fp32 vs ONNX Runtime fp32: "
                   + ", ".join(f"{b.replace('_', ' ')} {v}×" for b, v in r["openvino_fp32_vs_onnxruntime_fp32"].items())
                   + ".")
        for name, a in m["agreement_with_onnx_fp32"].items():
            out.append(f"* {name} against ONNX Runtime fp32 on {a['images']} real photos and augmented crops: top-1 "
                       f"agreement {a['top1_agreement']}, top-5 overlap {a['top5_overlap']}, embedding cosine mean "
                       f"{a['mean_cosine']} (5th percentile {a['p5_cosine']}), recall@10 against an fp32 index "
                       f"{a['recall_at_10_vs_fp32_index']}.")
        g = m["int8_gate"]
        out.append(f"* int8 accuracy gate ({g['images']} held-out crops, calibration on the other photos): "
                   f"{'passed' if g['passed'] else 'REFUSED'}, served {g['served']}; top-1 agreement "
                   f"{g['top1_agreement']}, top-5 overlap {g['top5_overlap']}, mean cosine {g['mean_cosine']}, "
                   f"recall@10 against an fp32 index {g['recall_at_10_vs_fp32_index']}.")
    ort = load("ort_int8")
    if ort is not None:
        best = max(ort["onnxruntime_int8"].items(), key=lambda kv: kv[1]["top1_agreement"])
        ips = ort["images_per_s_batch8"]
        out.append(f"* ONNX Runtime's static int8 (`scripts/bench_ort_int8.py`, `benchmarks/ort_int8.json`, CPU: "
                   f"{', '.join(ort.get('cpu_flags', []))}): its most accurate format, {best[0]}, "
                   f"{n(best[1]['images_per_s_batch8'])} images/s at batch 8 with top-1 agreement "
                   f"{best[1]['top1_agreement']}; OpenVINO int8 {n(ips['openvino_int8'])} images/s at "
                   f"{ort['openvino_int8_gate']['top1_agreement']} (ONNX Runtime fp32 {n(ips['onnxruntime_fp32'])}); "
                   "every format: " + "; ".join(f"{k} {v['top1_agreement']} at {n(v['images_per_s_batch8'])}/s"
                                               for k, v in ort["onnxruntime_int8"].items()) + ".")
    if "onnx_export" in m:
        out.append(f"* first load into an empty cache (torch build + ONNX export, fresh process): "
                   f"{m['onnx_export']['first_load_with_export_s']} s.")
    return out + targets_md(m)


def serve_md(s: dict) -> list[str]:
    c = s["ceiling"]
    lens = {p["connections"]: p for p in s["lens"]["by_connections"]}
    naive = {p["connections"]: p for p in s["naive"]["by_connections"]}
    fp32 = {p["connections"]: p for p in s["lens_fp32"]["by_connections"]}
    one = {p["connections"]: p for p in s["lens_one_batch_at_a_time"]["by_connections"]}
    m = s["served_model"]
    rounds = s.get("rounds", 1)
    out = [f"Online service (`{SCRIPT['serve']}`, `benchmarks/serve.json|png`): the shipped CPU profile "
           f"({m['backend']} {m.get('precision', 'fp32')}, served {m['served']}), {s['seconds_per_point']:g} s per "
           f"point, {rounds} round(s) of every point (medians; spread = (max - min) / median), the "
           f"{s['bodies']['count']} bundled photos as JPEG bodies (mean {n(s['bodies']['mean_bytes'])} "
           "bytes), closed-loop clients on loopback, HAProxy mode with the front-door limits `lens serve` applies.",
           "", "| connections | Lens images/s | spread | Lens p50 / p99 ms | fp32 images/s | one batch at a time "
           "images/s | floor images/s |", "|---|---|---|---|---|---|---|"]
    for k in sorted(lens):
        p = lens[k]
        out.append(f"| {k} | {n(p['throughput_rps'])} | {p.get('spread', '–')} | {n(p['p50_ms'])} / {n(p['p99_ms'])} | "
                   f"{n(fp32.get(k, {}).get('throughput_rps'))} | {n(one.get(k, {}).get('throughput_rps'))} | "
                   f"{n(naive.get(k, {}).get('throughput_rps'))} |")
    r = s["ratios"]
    o = s["lens"]["overload_4x"]
    b, bf = s["cpu_bound"], s["cpu_bound_fp32"]

    def bound(x: dict) -> str:
        return (f"decode + preprocess {', '.join(str(q['decode_ms']) for q in x['rounds'])} ms, the model and its "
                f"top-k at batch {x['rounds'][0]['batch']} on one thread {', '.join(str(q['model_ms']) for q in x['rounds'])}"
                f" ms: {n(x['images_per_s'])} images/s")

    out += ["",
            f"* Ceiling: {c['loop']} on the served model ({c['model']}), best at batch {c['best_batch']}, "
            f"{c['best_decode_threads']} decode threads, {c['best_lanes']} batch(es) on the model at once: "
            f"{n(c['images_per_s'])} images/s (measured again in each round: {c['images_per_s_rounds']}). Lens at 32 "
            f"connections: **{r['lens_32_vs_ceiling']}×** it (rounds {r['lens_32_vs_ceiling_rounds']}); against the "
            "best of every loop (" + ", ".join(f"{v['model']} {n(v['images_per_s'])}" for v in s["loops"].values())
            + f" images/s): **{r['lens_32_vs_best_loop']}×**.",
            f"* The CPU bound: {b['rounds'][0]['cores']} cores / (decode + model) per image, each in CPU seconds "
            f"measured one thread at a time in each round ({bound(b)}). Lens at 32 connections: "
            f"**{r['lens_32_vs_cpu_bound']}×** it (rounds {r['lens_32_vs_cpu_bound_rounds']}). The same app in fp32 "
            f"against fp32's bound ({bound(bf)}): **{r['fp32_32_vs_cpu_bound']}×** "
            f"(rounds {r['fp32_32_vs_cpu_bound_rounds']}).",
            f"* Two batches on the model at once (the default `concurrent_batches` on 2+ CPUs, one thread each) "
            f"against one batch at a time on both threads, same app, 32 connections: **{r['two_batches_vs_one_32']}×** "
            f"(rounds {r['two_batches_vs_one_32_rounds']}).",
            f"* int8 as shipped against the same app in fp32 (32 connections): **{r['int8_32_vs_fp32_32']}×** "
            f"(rounds {r['int8_32_vs_fp32_32_rounds']}; gate: " + ", ".join(f"{k} {v}" for k, v in s["gate"].items())
            + ").",
            f"* Floor: a Serve deployment of the served model without batching, one image per call: "
            f"Lens at 32 connections is **{r['lens_32_vs_naive_32']}×** it.",
            f"* 1 connection: p50 {lens[1]['p50_ms']} ms against {c['single_image_latency_ms_p50']} ms in-process "
            f"for one image (+{r['lens_p50_at_1_minus_inprocess_ms']} ms).",
            f"* Open-loop overload at 4× the measured throughput ({n(o['offered_rps'])} requests/s offered): "
            f"{n(o['shed_503'])} shed with 503, {n(o['accepted'])} accepted (p99 {n(o['accepted_p99_ms'])} ms), "
            f"{o['other']} other; healthy afterwards: {s['lens']['healthy_after_overload']}."]
    return out + targets_md(s)


def events_md(e: dict) -> list[str]:
    out = [f"Event path (`{SCRIPT['events']}`, `benchmarks/events.json`): {e['images']} real JPEGs put into the "
           f"bucket as fast as possible; S3/SQS: {e['s3_sqs']}.", "",
           f"* {e['results']} results ({e['tagged']} tagged); sidecar PUTs counted through bucket versioning: "
           f"{e.get('sidecar_writes', '–')}; embedding rows written: {e.get('embedding_rows_written', '–')}.",
           f"* the consumer's own CPU: **{e['consumer_cpu_ms_per_event']} ms per event** "
           f"({e['consumer_cpu_ms_per_event_less_idle']} ms less its idle polling, {e['consumer_idle_cpu_per_s']} "
           "CPU-s/s); the model runs in the pool's replicas and S3/SQS in moto's server, neither counted"
           + (f"; {e['tagger_calls']} calls to the model pool, {e['images_per_tagger_call']} images each (a poll's "
              "images in one call)." if "tagger_calls" in e else ".")
           if "consumer_cpu_ms_per_event" in e else "* consumer CPU per event: not measured in this run.",
           f"* S3/SQS requests per image: **{e['aws_calls_per_image_total']}** "
           f"({', '.join(f'{k} {v}' for k, v in e['aws_calls_per_image'].items())}); idle: "
           f"{', '.join(f'{k} {v}/s' for k, v in e['aws_calls_idle_per_s'].items()) or 'none'}."
           if "aws_calls_per_image" in e else "* S3/SQS requests per image: not counted in this run.",
           *([f"* the floor with boto3: the two requests every image needs, made as the consumer makes them from a "
              f"process with nothing else in it, against the same server: GetObject {e['boto3_floor_ms_per_image']['get_object_ms']} "
              f"ms + the sidecar's conditional PutObject {e['boto3_floor_ms_per_image']['put_object_ms']} ms = "
              f"**{e['boto3_floor_ms_per_image']['sum_ms']} ms** of CPU per image before any other work"
              + (f"; against moto's app behind a server that keeps connections open, as AWS does (moto's own answers "
                 f"every request with `Connection: close`), {ka['get_object_ms']} + {ka['put_object_ms']} = "
                 f"**{ka['sum_ms']} ms**." if (ka := e['boto3_floor_ms_per_image'].get('keep_alive')) else ".")]
             if "sum_ms" in e.get("boto3_floor_ms_per_image", {}) else []),
           *([f"* the same two requests through obstore (the consumer's per-object client in this run: "
              f"`{e.get('s3_client', '?')}`): {o['get_object_ms']} + {o['put_object_ms']} = **{o['sum_ms']} ms**"
              + (f"; keep-alive server {ko['sum_ms']} ms" if (ko := e['boto3_floor_ms_per_image'].get('keep_alive', {})
                                                                 .get('obstore')) else "") + "."]
             if (o := e.get("boto3_floor_ms_per_image", {}).get("obstore")) else []),
           *([f"* the same benchmark with the consumer's per-object requests on boto3 (`--s3-client boto3`, "
              f"`benchmarks/events-boto3.json`, same machine): **{b3['consumer_cpu_ms_per_event']} ms per event** "
              f"({b3['consumer_cpu_ms_per_event_less_idle']} ms less idle polling), {b3['s3_calls_per_image']} S3 "
              f"requests per image."] if (b3 := load("events-boto3")) and e.get("s3_client") == "obstore" else []),
           f"* {e['events_per_s']} events/s end to end against {e['online_rps_32_connections']} images/s online "
           f"in the same run ({e['ratios']['events_vs_online']}×; informational: moto's server shares the cores).",
           f"* put → result p50 {n(e['put_to_result_ms']['p50'])} ms, p95 {n(e['put_to_result_ms']['p95'])} ms "
           "(the whole burst queues)."]
    return out + targets_md(e)


def s3_clients_md(c: dict) -> list[str]:
    w = c["workload"]
    rows = [f"| {k} | {v['cpu_ms_per_object']} ({', '.join(map(str, v['rounds_cpu_ms_per_object']))}) | "
            f"{v['objects_per_s']} | {'yes' if v['create_only_refused_where_an_object_exists'] else '**no**'} | "
            f"{c['ratios'].get(f'{k}_cpu_vs_obstore', 1.0)}× |" if "cpu_ms_per_object" in v else
            f"| {k} | not run: {v.get('not_run', '?')} | | | |" for k, v in c["clients"].items()]
    return [f"The event path's per-object S3 clients (`{SCRIPT['s3-clients']}`, `benchmarks/s3-clients.json`): "
            f"{w['objects']} objects, {w['concurrency']} at once from one event loop, each a {w['requests_per_object']}; "
            f"{w['server']}; each client in a fresh process, {w['rounds']} rounds in turn (median).", "",
            "| client | CPU ms per object (rounds) | objects/s | create-only PUT refused where an object exists | "
            "CPU ÷ obstore's |", "|---|---|---|---|---|", *rows, ""] + targets_md(c)


def batch_md(b: dict) -> list[str]:
    job = b["job"]
    photos = ("camera-size JPEGs (long side 3,000-4,000 px, made from the bundled photos)"
              if b.get("photos") == "camera" else "seeded augmented copies of the bundled photos")
    chosen, vc, vb = b["chosen_backend"], b["vs_chosen_backend_loop"], b["vs_best_loop"]
    loops = ", ".join(f"{bk} {n(v['images_per_s_median'])}" for bk, v in b["loops_by_backend"].items())
    out = [f"Bulk embedding (`{SCRIPT['batch']}`, `benchmarks/batch.json`): {n(b['rows'])} {photos} "
           f"in {b['rows'] // b['rows_per_shard']} Parquet shards; `lens embed` with `backend: {b['job_backend']}` "
           f"(here it ran **{chosen}**). Baselines: the pipelined loop in one process (decode threads feeding "
           f"batches to the model on all cores) on every installed fp32 backend, each at its best batch size and "
           f"thread count (median images/s: {loops}). Loops and job alternate {b['repeats']} times; the round with "
           f"the median ratio is reported.",
           "", f"| `lens embed` (fresh local Ray) | images/s | vs the {chosen} loop (chosen) | "
               f"vs the best loop ({vb['backend']}) |", "|---|---|---|---|",
           f"| dataset execution (actor start-up included) | {n(job['images_per_s'])} | {vc['dataset']}× | "
           f"{vb['dataset']}× |",
           f"| steady state (first part written → last) | {n(job['steady_images_per_s'])} | **{vc['steady']}×** | "
           f"{vb['steady']}× |",
           f"| whole command (Ray start included) | {n(round(job['rows_run'] / job['seconds'], 1))} | "
           f"**{vc['whole_job']}×** | {vb['whole_job']}× |"]
    if "job_4x_rows" in b:
        j4 = b["job_4x_rows"]
        out.append(f"| dataset execution, {n(j4['rows_run'])} rows | {n(j4['images_per_s'])} | "
                   f"{b['ratio_4x_rows_vs_chosen_backend_loop']}× | |")
    auto = (b.get("served") or {}).get("backend_auto")
    if auto:
        out += ["", f"* `auto` picked {auto['picked']} from its cached one-second measurement of the model alone "
                    f"(batch 8, images/s: {auto.get('images_per_s_batch8')})."]
    else:
        out.append("")
    out.append("* every round, vs the chosen loop (dataset / steady / whole): "
               + "; ".join(f"{r['vs_chosen']['dataset']} / {r['vs_chosen']['steady']} / {r['vs_chosen']['whole_job']}"
                           for r in b["runs"]))
    p = b["phases"]
    out.append(f"* start-up phases (reported round): Ray start {p['ray_start_s']} s, the driver's model load "
               f"(with auto's choice) {p['driver_model_load_s']} s, first model actor ready "
               f"{p['first_actor_ready_after_run_start_s']} s after the run started (its model load + warm-up "
               f"{p['actor_model_load_max_s']} s), first output at {p['first_output_after_run_start_s']} s: "
               f"{b['first_output_after_ray_up_s']} s after Ray was up; {p['not_embedding_s']} s of the "
               f"{p['whole_job_s']} s command were not embedding"
               + (f" (the manifest and drift profile at the end: {p['finish_s']} s)" if p.get("finish_s") is not None
                  else "") + ".")
    starts = [a for a in p.get("actors") or [] if "process_to_init_s" in a]
    if starts:
        out.append("* the model actors' worker processes (reported round): "
                   + "; ".join((f"started {a['process_after_run_start_s']} s after the run started, "
                                if a["process_after_run_start_s"] >= 0 else
                                f"started {-a['process_after_run_start_s']} s before the run (with Ray or while the "
                                f"driver loaded the model), ")
                               + 
                               f"{a['process_to_init_s']} s from process start to the actor's own start (Python, Ray, "
                               f"Ray Data and Lens imports, waiting for its task), model load {a['init_s']} s, ready "
                               f"at {a['ready_after_run_start_s']} s" for a in starts) + ".")
    if b.get("ray_floor"):
        f, wb = b["ray_floor"], b["whole_job_bound"]
        out.append(f"* Ray's own floor in the same round (a fresh Ray started as Lens starts it, then a Ray Data pool "
                   f"of {f['actors']} actors that load nothing): Ray start {f['ray_start_s']} s, first output "
                   f"{f['first_output_after_run_start_s']} s after the dataset started. Lens's first output came "
                   f"{round(b['first_output_after_ray_up_s'] - f['first_output_after_run_start_s'], 2)} s after that "
                   f"floor's. With only that floor and the loop's speed, the whole command would be "
                   f"**{wb['ratio']}×** the loop ({wb['ray_floor_s']} s of floor on {n(b['rows'])} rows).")
    for name, what in (("batch-openvino", "OpenVINO by request (`--backend openvino`), CPU pinning off (what Lens "
                                          "runs)"),
                       ("history/batch-openvino-pinned", "OpenVINO before its CPU pinning was turned off")):
        ov = load(name)
        if ov:
            vo = ov["vs_chosen_backend_loop"]
            out.append(f"* {what} (`benchmarks/{name}.json`, {ov['repeats']} rounds, same data, commit "
                       f"{ov['machine']['commit'][:7]}): steady state **{vo['steady']}×**, whole command "
                       f"**{vo['whole_job']}×** the OpenVINO loop; every round (steady / whole): "
                       + "; ".join(f"{r['vs_chosen']['steady']} / {r['vs_chosen']['whole_job']}" for r in ov["runs"])
                       + f"; first output {ov['first_output_after_ray_up_s']} s after Ray was up (Ray's floor "
                       f"{ov['ray_floor_first_output_after_ray_up_s']} s); model {ov['job']['breakdown']['model_ms_per_image']} "
                       f"ms per image in the actors.")
    cpu = job.get("cpu_s_by_process")
    if cpu:
        out.append("* CPU seconds by process during the reported job: "
                   + ", ".join(f"{k} {v}" for k, v in list(cpu.items())[:8]) + ".")
    k = job["breakdown"]
    out.append(f"* per image (wall time in their tasks): decode {k['decode_ms_per_image']} ms, model "
               f"{k['model_ms_per_image']} ms; parts written in {k['write_s_total']} s and committed in "
               f"{k['commit_s_total']} s in all.")
    if "decode_tasks_vs_chosen_backend_loop" in b:
        t = b["decode_tasks_vs_chosen_backend_loop"]
        out.append(f"* pipeline shape: {'each model actor reads and decodes its rows in threads beside the model' if job.get('config', {}).get('fused') else 'decode tasks feed the model actors'} "
                   f"(the CPU default). The other shape on the same data, decode tasks feeding the model actors (what "
                   f"GPU actors use): dataset {t['dataset']}×, steady state {t['steady']}×, whole command "
                   f"{t['whole_job']}× the chosen backend's loop (median), first output {t['first_output_s']} s.")
    if b.get("scaling", {}).get("ratio_2_vs_1"):
        sc = b["scaling"]
        out.append(f"* scale-out: {sc['setup']}: 1 node {sc['images_per_s_1_node']} images/s, 2 nodes "
                   f"{sc['images_per_s_2_nodes']} ({sc['model_actors_2_nodes']} model actors): **{sc['ratio_2_vs_1']}×**.")
    if "peak_memory_ratio_4x" in b:
        out.append(f"* peak memory (RSS of the driver and every Ray process): {n(b['peak_rss_mb_1x_min'])} MB at "
                   f"{n(b['rows'])} rows (smallest run), {n(b['job_4x_rows']['peak_rss_mb'])} MB at 4× the rows: "
                   f"**{b['peak_memory_ratio_4x']}×**.")
    return out + targets_md(b)


def _index_table(part: dict) -> list[str]:
    out = ["| index | build s | bytes/vector | tuned | recall@10 (tuning) | recall@10 (held out) | q/s batch 1 | "
           "q/s batch 64 |", "|---|---|---|---|---|---|---|---|"]
    for kind, t in part["types"].items():
        tuned = f"{t['tuned']['param']}={t['tuned']['value']}" if t["tuned"]["param"] else "exact"
        out.append(f"| `{t['factory']}` | {t['build_s']} | {n(t['bytes_per_vector'])} | {tuned} | "
                   f"{t['recall_at_10_tuning']} | {t['recall_at_10']} | {n(t['qps_batch1'])} | {n(t['qps_batch64'])} |")
    sp, mb = part["speedup_at_recall_0.95_vs_flat_batch1"], part["memory_bound_choice"]
    out += ["", f"* fastest index at held-out recall@10 ≥ 0.95: {sp['type']}, "
                f"**{sp['ratio'] if sp['ratio'] is not None else '–'}×** exact Flat's queries/s at batch 1.",
            f"* IVF-PQ alone{' (no re-ranking)' if mb.get('refine') == 'none' else ''}, 1/8 of Flat's budget: "
            f"{mb['bytes_ratio_vs_flat']} of Flat's bytes per vector at held-out recall@10 {mb['recall_at_10']}."]
    qb = part.get("quarter_budget_choice")
    if qb:
        how = ("`--index auto` at 1/4 of Flat's budget" if qb["index"] == "auto" else
               "IVF-PQ with SQ6 re-ranking asked for by name (at this N the centroids and codebooks alone take a third "
               "of a 1/4 budget)")
        out.append(f"* {how}: `{qb['factory']}`, {qb['bytes_ratio_vs_flat']} of Flat's bytes per vector at held-out "
                   f"recall@10 **{qb['recall_at_10']}**; {n(qb['qps_batch1'])} q/s at batch 1 "
                   f"({qb['qps_batch1_vs_ivf_flat']}× IVF-Flat's), {n(qb['qps_batch64'])} at batch 64 "
                   f"({qb['qps_batch64_vs_ivf_flat']}×).")
    if "auto_where_both_fit" in part:
        a = part["auto_where_both_fit"]
        q = a["qps_batch1_at_recall_0.95"]
        split = (" (each operating point chosen on one half of the held-out queries, its q/s and recall measured "
                 "on the other)") if "chosen_on" in a else ""
        out.append(f"* `--index auto` where HNSW and IVF-Flat both fit picks **{a['auto_pick']}**; measured at held-out "
                   f"recall@10 ≥ 0.95 (batch 1){split}: HNSW {n(q['hnsw']) if q['hnsw'] else 'not reached'} q/s, "
                   f"IVF-Flat {n(q['ivf-flat']) if q['ivf-flat'] else 'not reached'} q/s.")
    return out


def index_md(i: dict) -> list[str]:
    syn, nd = i["synthetic"], i["near_duplicates"]
    out = [f"Similarity search (`{SCRIPT['index']}`, `benchmarks/index.json|png`). Synthetic: {n(syn['rows'])} × "
           f"{syn['dim']} seeded clustered vectors; queries: {syn['queries']}.", ""] + _index_table(syn)
    if "real" in i:
        real = i["real"]
        out += ["", f"Real embeddings: {real['images']} ({real['dim']}-d); queries: {real['queries']}.", ""]
        out += _index_table(real)
    out += ["", f"Near-duplicates on real photos: {nd['originals']} tiles of {nd['photos']} photos, each queried by "
                f"a cropped (≥ 60 %), possibly mirrored, colour-jittered, re-encoded copy: its tile is in the top 5 "
                f"for **{nd['top5_hit_rate']}** (top 1: {nd['top1_hit_rate']})."]
    ui = load("ui")
    if ui is not None:
        out += ["", f"Search page (`scripts/ui_screenshot.py`, `benchmarks/ui.json|png`, Chromium {ui['browser']}, "
                    f"{ui['index']}): {ui['query']} → first hit `{ui['hits'][0]['id']}`; page load "
                    f"{ui['page_load_s']} s, search with every thumbnail loaded {ui['search_with_thumbnails_s']} s, "
                    f"click-through {ui['click_through_with_thumbnails_s']} s, console errors: "
                    f"{len(ui['console_errors'])}."]
    return out + targets_md(i)


def shards_md(s: dict) -> list[str]:
    out = [f"Sharded index (`{SCRIPT['shards']}`, `benchmarks/shards.json`): {n(s['rows'])} × {s['dim']} seeded "
           f"clustered vectors, IVF-Flat built once as one index and once as 2 shards (filled by 2 Ray tasks on this "
           f"machine), searched the same way in-process; queries: {s['queries']}.", "",
           "| shards | build s | index bytes per shard | tuned | recall@10 (held out) | q/s batch 1 | q/s batch 64 |",
           "|---|---|---|---|---|---|---|"]
    for k, b in s["builds"].items():
        out.append(f"| {k} | {b['build_s']} | {', '.join(n(x) for x in b['shard_index_bytes'])} | "
                   f"{b['tuned']['param']}={b['tuned']['value']} | {b['recall_at_10']} | {n(b['qps_batch1'])} | "
                   f"{n(b['qps_batch64'])} |")
    r = s["ratios_2_vs_1"]
    out += ["", f"* 2 shards vs 1: largest shard **{r['largest_shard_bytes']}×** the memory, q/s {r['qps_batch1']}× "
                f"(batch 1) and {r['qps_batch64']}× (batch 64) on one machine (each query searches both shards in turn, "
                f"then merges), build {r['build_s']}× the time (each shard task reads all the vectors)."]
    return out + targets_md(s)


def train_md(t: dict) -> list[str]:
    d, st, loop = t["data"], t["settings"], t["plain_loop"]
    out = [f"Custom tags (`{SCRIPT['train']}`, `benchmarks/train.json|png`): two different sets of real photos, one "
           f"class per photo, {d['train_per_class']} training and {d['held_out_per_class']} held-out images per "
           f"class ({d['source']}). Validation chooses (epochs, thresholds, the best checkpoint); test only "
           f"measures. Fine-tuning: LP-FT, {st['finetune_epochs']} epochs, lr {st['lr']} for the classifier and "
           f"x{st['backbone_lr_mult']} for the backbone ({st['unfreeze']} blocks), batch {st['batch_size']}, "
           f"{st['workers']} Ray Train worker.", "",
           "| set | classes | k-NN (k=5) on Lite0 embeddings | head | fine-tune | best epoch | s per epoch |",
           "|---|---|---|---|---|---|---|"]
    for name, x in t["sets"].items():
        v = x["test_top1"]
        out.append(f"| {name} | {x['classes']} | {v['knn5_imagenet_embeddings']} | {v['head']} | "
                   f"**{v['finetune']}** | {x['best_epoch']} | {n(x['seconds_per_epoch'])} |")
    out += ["", "(test top-1; a best epoch of 0 would mean the classifier trained on frozen features was kept, no later "
                "epoch having beaten it on validation)", "",
            f"* head mode on 10,000 embeddings (10 epochs, batch 32): **{t['head_10k_embeddings_seconds']} s** "
            f"(median of 3).",
            f"* fine-tuning throughput: Ray Train {n(t['ray_train_images_per_s'])} images/s vs a plain "
            f"single-process timm loop {n(loop['images_per_s'])} images/s in the same run"
            + (f" (torch DataLoader, {loop['dataloader_workers']} workers: the fastest of "
               + ", ".join(f"{r['dataloader_workers']} → {n(r['images_per_s'])}" for r in loop["runs"]) + ")"
               if "runs" in loop else " (decoding inline)")
            + f": **{t['ratio_ray_train_vs_plain_loop']}×**."]
    return out + targets_md(t)


def tag_md(t: dict) -> list[str]:
    c = t["configs"]
    out = [f"`lens tag` whole runs (`{SCRIPT['tag']}`, `benchmarks/tag.json`), warm caches, {t['images']} augmented photo "
           f"JPEGs, median of {t['rounds']} alternating rounds; CPU flags {', '.join(t['machine']['cpu_flags'])}:", "",
           "| configuration | what ran | images/s (whole run) | start-up to first result (s) |", "|---|---|---|---|"]
    for name, row in c.items():
        ran = t["served"][name].split(" on ", 1)[-1]
        out.append(f"| {name} | {ran} | {n(row['images_per_s_whole_run'])} | {row['first_result_s']} |")
    out += ["", f"* int8 vs the faster fp32 ({t['fp32_baseline']}): **{t['ratio_int8_vs_fp32_whole_run']}×** the "
                f"whole-run rate, start-up {t['int8_first_result_minus_fp32_s']:+} s."]
    return out + targets_md(t)


def failover_md(f: dict) -> list[str]:
    def line(name: str, d: dict) -> str:
        fails = ", ".join(f"{k}: {v}" for k, v in d["failures"].items()) or "none"
        window = (f", all within {d['failure_window_s'][0]}..{d['failure_window_s'][1]} s of the kill"
                  if d["failure_window_s"] else "")
        return f"* {name}: {n(d['requests'])} requests, **{d['failed']} failed** ({fails}){window}."

    return [f"Replica loss under load (`{SCRIPT['failover']}`, `benchmarks/failover.json`): `lens serve` with two "
            f"replicas behind HAProxy, {f['clients_each']} closed-loop clients of each kind for {f['seconds']:g} s; "
            f"one replica's process SIGKILLed at {f['killed_at_s']} s (replaced by Serve: {f['replica_replaced']}).",
            "", line("`LensClient` (retries 502/503/504 and connection errors)", f["with_client_retries"]),
            line("plain HTTP, no retry", f["without_retries"])] + targets_md(f)


def rollout_md(r: dict) -> list[str]:
    o, rb = r["overhead"], r["rollback"]
    flips = "; ".join(f"to {f['to']}: {f['flip_s']} s, {f['failed']} failed of {n(f['requests'])}"
                      for f in r["flip"])
    p95 = lambda runs: " / ".join(n(x["p95_ms"]) for x in runs)  # noqa: E731
    return [f"Model versions (`{SCRIPT['rollout']}`, `benchmarks/rollout.json`): {r['model']}, "
            f"{o['connections']} connections of real JPEGs, {o['rounds']} interleaved rounds of {o['duration_s']:g} s.",
            "", "| same run | images/s (mean of rounds) | p95 ms per round |", "|---|---|---|",
            f"| baseline: fixed weights, no router | {n(o['fixed_weights_rps'])} | {p95(o['fixed_weights'])} |",
            f"| registry version, rollout at 0 % canary | {n(o['versions_0pct_canary_rps'])} | "
            f"{p95(o['versions_0pct_canary'])} |",
            f"| registry version, rollout at 1 % canary (every image hashed) | "
            f"{n(o['versions_1pct_canary']['throughput_rps'])} | {n(o['versions_1pct_canary']['p95_ms'])} |", "",
            f"* router overhead: 0 % canary **{o['ratio_0pct_vs_no_router']}×** the no-router baseline, 1 % "
            f"{o['ratio_1pct_vs_no_router']}×.",
            f"* a failing canary at {rb['canary_weight_pct']:g} % (eval every {rb['eval_interval_s']:g} s, replicas "
            f"poll every {rb['poll_s']:g} s): first failed request to the rollback decision **{rb['breach_to_decision_s']} s**, "
            f"to the last request routed to it **{rb['breach_to_last_canary_request_s']} s** "
            f"({rb['failed_on_canary']} of {n(rb['requests'])} requests failed on it; reason: {rb['decision']['reason']}).",
            f"* rolling alias flip under load (stable moved, the new version loaded beside the old, then swapped): {flips}."] \
        + targets_md(r)


def drift_md(d: dict) -> list[str]:
    c, cost = d["clean"], d["cost"]
    rows = []
    for shift, levels in d["shifts"].items():
        rows.append(f"| {shift.replace('_', ' ')} | " + " | ".join(
            f"{lv['level']:g}: **{lv['detection_rate']}** (KS {lv['median_ks_max']}, PSI {lv['median_psi']})"
            for lv in levels) + " |")
    return [f"Drift detection (`{SCRIPT['drift']}`, `benchmarks/drift.json|png`): {d['model']}; reference profile on "
            f"{d['profile']['reference_rows']} augmented crops of {len(d['photos']['reference'])} real photos "
            f"({d['profile']['components']} PCA components, {d['profile']['explained_variance']} of the variance); "
            f"windows of {d['window']}, alpha {d['alpha']}; {d['test']}.", "",
            f"* clean traffic (another seed, same photos): false-positive rate **{c['false_positive_rate']}** over "
            f"{c['windows']} windows (p-value 5th percentile {c['p_value_quantiles']['5']:.3g}).",
            *[f"* photos the reference never saw, {k.replace('_', ' ')}: false-positive rate "
              f"**{u['false_positive_rate']}** over {u['windows']} windows (median KS {u['median_ks_max']})."
              for k, u in d.get("unseen_photos", {}).items()],
            f"* detector cost: {cost['test_ms']} ms per test, {cost['detector_cpu_s']} s CPU for {n(cost['images'])} "
            f"images and {cost['tests']} tests against {cost['decode_and_embed_cpu_s']} s CPU decoding and embedding "
            f"them: **{round(100 * cost['fraction_of_serving_cpu'], 2)} %** of the serving CPU.", "",
            "Detection rate per shift and severity (median largest KS distance, median class PSI):", "",
            "| shift | severity 1 | severity 2 | severity 3 |", "|---|---|---|---|", *rows, ""] \
        + targets_md(d)


def deletes_md(d: dict) -> list[str]:
    x = d["deletes"]
    return [f"Deletions (`{SCRIPT['deletes']}`, `benchmarks/deletes.json`), on the demo's setup ({d['setup']}): "
            f"{x['deleted']} of {d['uploads']} uploaded images deleted from the bucket, each timed from its "
            "DeleteObject until its id lookup answers 404.", "",
            f"* delete → gone: p50 **{x['gone_p50_s']} s**, p95 **{x['gone_p95_s']} s**, max {x['gone_max_s']} s "
            f"(an addition in the same run: searchable {d['add_searchable_in_s']} s after its upload);",
            f"* afterwards, deleted images returned by an image search of each: {x['returned_by_image_search']}; "
            f"their sidecars: {', '.join(x['sidecar_status'])}."]


def filters_md(f: dict) -> list[str]:
    ix = f["index"]
    rows = [f"| {r['selectivity'] * 100:g} % | {n(r['rows_selected'])} | **{r['recall_at_10']}** | "
            f"{n(r['qps_batch'])} ({r['vs_unfiltered_batch']}×) | {n(r['qps_one_at_a_time'])} "
            f"({r['vs_unfiltered_one_at_a_time']}×) | {r['first_query_s']} | "
            f"{r['post_filter_top10']['mean_results']} / {r['post_filter_top10']['recall_at_10']} | "
            f"{r['post_filter_top100']['mean_results']} / {r['post_filter_top100']['recall_at_10']} |"
            for r in f["filtered"]]
    return [f"Filtered search (`{SCRIPT['filters']}`, `benchmarks/filters.json`): {n(f['n'])} vectors of dim "
            f"{f['dim']}, `lens index build`'s choice {ix['factory']} tuned to nprobe {ix['tuned']['value']} (held-out "
            f"recall@10 {ix['recall_unfiltered']} unfiltered); filters on a random group column keep 50 % to 0.1 % "
            f"of the rows; {f['queries']} held-out queries. Unfiltered: {n(f['unfiltered']['qps_batch'])} q/s as one "
            f"batch, {n(f['unfiltered']['qps_one_at_a_time'])} q/s one at a time.", "",
            "| kept | rows | recall@10 vs exact on the subset | q/s batch (vs unfiltered) | q/s one at a time "
            "(vs unfiltered) | a new filter's first query (s) | post-filter top-10: results / recall | "
            "post-filter top-100: results / recall |", "|---|---|---|---|---|---|---|---|", *rows, ""] + targets_md(f)


def backfill_md(b: dict) -> list[str]:
    m = b["median"]
    rows = [f"| {i + 1} | {r['embed_images_per_s']} ({r['embed_whole_s']} s) | {r['backfill_images_per_s']} "
            f"({r['backfill_whole_s']} s) | {r['backfill_backend']} |" for i, r in enumerate(b["rounds"])]
    return [f"Backfill (`{SCRIPT['backfill']}`, `benchmarks/backfill.json`): `lens events backfill` against `lens embed` "
            f"on the same {n(b['images'])} camera-size JPEGs in moto's S3, alternating, {len(b['rounds'])} rounds; "
            f"the backfill also writes a sidecar per image (a conditional PUT). Median: backfill "
            f"**{m['backfill_images_per_s']}** vs embed **{m['embed_images_per_s']}** images/s over each job's run: "
            f"**{b['ratio_backfill_vs_embed']}×**; whole commands {m['backfill_whole_s']} vs {m['embed_whole_s']} s.",
            "", "| round | lens embed images/s (whole command) | backfill images/s (whole command) | backend |",
            "|---|---|---|---|", *rows, ""] + targets_md(b)


def embed_int8_md(e: dict) -> list[str]:
    lines = []
    for d in (e, load("embed-int8-small")):
        if d is None:
            continue
        c, m = d["per_image_one_core"], d["machine"]
        rows = [f"| {i + 1} | {' then '.join(r['order'])} | {r['fp32']['dataset']} / {r['fp32']['steady']} / "
                f"{r['fp32']['whole_command']} | {r['int8']['dataset']} / {r['int8']['steady']} / "
                f"{r['int8']['whole_command']} | {r['int8_vs_fp32']['dataset']}× / {r['int8_vs_fp32']['steady']}× / "
                f"{r['int8_vs_fp32']['whole_command']}× |" for i, r in enumerate(d["rounds"])]
        name = "embed-int8" if d is e else "embed-int8-small"
        lines += [f"`lens embed --precision int8` against `lens embed` fp32 (`{SCRIPT['embed-int8']}`"
                  f"{' --small-photos' if d['photos'] == 'small' else ''}, `benchmarks/{name}.json`; "
                  f"{n(d['rows'])} {d['photos']} photos, CPU: {', '.join(m.get('cpu_flags') or [])}): fp32 ran "
                  f"{d['served']['fp32']['backend']} (auto's pick), int8 {d['served']['int8']['backend']} behind the "
                  f"gate. Median round: int8 **{d['int8_vs_fp32']['dataset']}×** fp32 (dataset images/s; steady "
                  f"{d['int8_vs_fp32']['steady']}×, whole command {d['int8_vs_fp32']['whole_command']}×). One core "
                  f"per image: decode + resize {c['decode_resize_ms']} ms, fp32 model {c['fp32_model_ms']} ms, int8 "
                  f"model {c['int8_model_ms']} ms ({c['model_only_int8_vs_fp32']}× alone): decode bounds the jobs' "
                  f"ratio at **{c['bound_int8_vs_fp32']}×**. int8 rows against fp32 rows of the same images: mean "
                  f"cosine {d['rows_int8_vs_fp32']['mean_cosine']} (5th percentile "
                  f"{d['rows_int8_vs_fp32']['p5_cosine']}).", "",
                  "| round | order | fp32 images/s (dataset / steady / whole) | int8 | int8 ÷ fp32 |",
                  "|---|---|---|---|---|", *rows, ""] + targets_md(d) + [""]
    g = e.get("int8_gate") or {}
    if g:
        lines.append(f"* the gate the int8 jobs ran under ({g.get('holdout')}): top-1 agreement "
                     f"{g.get('top1_agreement')}, top-5 overlap {g.get('top5_overlap')}, mean cosine "
                     f"{g.get('mean_cosine')}, recall@10 {g.get('recall_at_10_vs_fp32_index')} (int8 queries, fp32 "
                     f"index) and {g.get('recall_at_10_vs_int8_index')} (fp32 queries, int8 index).")
    return lines


def gpu_check_md(g: dict) -> list[str]:
    s = g["stages"]
    env = s.get("environment", {})
    lines = [f"GPU check (`{SCRIPT['gpu-check']}`, `benchmarks/gpu-check.json`) on {env.get('gpu', g['device'])}: "
             f"{'every stage passed' if g['ok'] else 'FAILED: ' + ', '.join(k for k, v in s.items() if not v['ok'])} "
             f"in {g['seconds']} s."]
    if s.get("serve", {}).get("ok"):
        pts = ", ".join(f"{p['connections']} connections {p['throughput_rps']} images/s (p50 {p['p50_ms']} ms, p99 "
                        f"{p['p99_ms']} ms)" for p in s["serve"]["by_connections"])
        lines.append(f"* Serve GPU pool: {pts}; batch sizes seen up to {s['serve']['max_batch_seen']}.")
    if s.get("embed", {}).get("ok"):
        lines.append(f"* `lens embed` on the GPU: {s['embed']['job']['images_per_s']} images/s, "
                     f"{s['embed']['job_vs_loop']}× the pipelined loop on the same GPU.")
    if s.get("decode", {}).get("ok"):
        d = s["decode"]
        lines.append(f"* decode on the device {d['device_images_per_s']} images/s against "
                     f"{d['cpu_all_cores_bound_images_per_s']} on all CPU cores ({d['device_vs_cpu_all_cores']}×).")
    if s.get("finetune", {}).get("ok"):
        lines.append(f"* fine-tuning with AMP: one short epoch in {s['finetune']['seconds']} s.")
    return lines


def formats_md(f: dict) -> list[str]:
    lines = [f"Decode + preprocess by format (`{SCRIPT['formats']}`, `benchmarks/formats.json`): {f['photo']}, "
             f"written by each format's own encoder, one image at a time on {f['threads']} thread; median of "
             f"{f['repeats']} rounds.", "",
             "| size | format | bytes | bits/px | decode + preprocess (ms) | vs JPEG | top-1 |", "|---|---|---|---|---|---|---|"]
    for size, s in f["sizes"].items():
        for fmt, r in s["formats"].items():
            lines.append(f"| {size} | {fmt} | {n(r['bytes'])} | {r['bits_per_pixel']} | {r['decode_preprocess_ms']} | "
                         f"{r['vs_jpeg']}× | {r['top1']} |")
    return lines + [""] + targets_md(f)


def priority_md(p: dict, name: str = "priority") -> list[str]:
    w = p["workload"]
    what = {"shared": "one pool: events share the HTTP pool's replicas and batches (before)",
            "separate": "the events' own pool, both at Ray's niceness 15",
            "separate_bulk19": "the events' own pool at niceness 19, HTTP pool at 15",
            "separate_http0_bulk19": "the events' own pool at 19, HTTP pool at 0 (**shipped**)",
            "separate_http0_bulk19_core_free": "the events' own pool at 19 with one core free of its threads, HTTP "
                                               "pool at 0"}
    rows = []
    for mode, r in p["modes"].items():
        a, d, ra = r["interactive_alone"], r["interactive_during_burst"], r["ratios"]
        rows.append(f"| {what.get(mode, mode)} | {a['p50_ms']} / {a['p99_ms']} | {d['p50_ms']} / {d['p99_ms']} "
                    f"({d['requests']} requests) | **{ra['interactive_p99_during_vs_alone']}×** | "
                    f"{r['burst_alone']['images_per_s']} | {r['burst_with_interactive']['images_per_s']} | "
                    f"**{ra['burst_speed_with_vs_alone']}×** | {r['sidecars']} / {r['sidecar_writes']} |")
    again = "" if name == "priority" else f"Again, a run of its own (`--modes {','.join(p['modes'])}`): "
    return [f"{again}Interactive requests during an event burst (`scripts/bench_priority.py`, `benchmarks/{name}.json`): "
            f"{w['interactive_connections']} HTTP connections, each posting a photo and waiting {w['think_s']} s, "
            f"alone for {w['interactive_alone_s']:g} s and during a burst of {n(w['burst_images'])} uploads; the "
            f"burst's speed alone and beside them (first put to last result, from the consumer's counters); "
            f"{w['backend']}, {w['threads_per_pool']} threads per pool; {w['s3_sqs']}, at niceness 15.", "",
            "| pools | interactive alone p50 / p99 (ms) | during the burst p50 / p99 (ms) | p99 during / alone | "
            "burst alone (images/s) | burst beside interactive (images/s) | burst speed ratio | sidecars / writes |",
            "|---|---|---|---|---|---|---|---|", *rows, ""] + targets_md(p)


def client_md(c: dict) -> list[str]:
    what = {"sync_1_thread": "blocking, one thread", "sync_8_threads_one_client": "blocking, 8 threads, one client",
            "async_32_tasks_one_client": "asyncio, 32 tasks, one client"}
    rows = [f"| {what.get(m, m)} | {r['old_calls_per_s']} | {r['new_calls_per_s']} | **{r['new_vs_old']}×** |"
            for m, r in c["modes"].items()]
    return [f"The Python client's own cost (`{SCRIPT['client']}`, `benchmarks/client.json`): {c['new']} against "
            f"{c['old']}, on a loopback server that answers a fixed tag answer; {n(c['body_bytes'])}-byte bodies, "
            f"{c['calls_per_round']} calls per round, median of {c['rounds']} alternating rounds.", "",
            "| mode | old (calls/s) | new (calls/s) | new vs old |", "|---|---|---|---|", *rows, "",
            "The asyncio transports alone, the same calls at 32 concurrent tasks: " + ", ".join(
                f"{k} {v} calls/s" for k, v in c.get("async_transports_32_tasks_calls_per_s", {}).items())
            + " (why `AsyncLensClient` stays on aiohttp).", ""] + targets_md(c)


RENDER = {"client": client_md, "formats": formats_md, "priority": priority_md,
          "priority-shipped": lambda d: priority_md(d, "priority-shipped"), "backfill": backfill_md, "filters": filters_md, "deletes": deletes_md, "model": model_md, "tag": tag_md, "serve": serve_md, "failover": failover_md, "events": events_md, "s3-clients": s3_clients_md, "batch": batch_md, "index": index_md,
          "shards": shards_md,
          "train": train_md, "rollout": rollout_md, "drift": drift_md, "embed-int8": embed_int8_md,
          "gpu-check": gpu_check_md}


def performance() -> str:
    parts = []
    for name in ORDER:
        d = load(name)
        if d is not None:
            parts.append("\n".join(RENDER[name](d)))
    return "\n\n".join(parts)


def unmet() -> list[str]:
    """Every unmet target of every committed run (``benchmarks/*.json``: the report's sections first, then the
    other runs, such as a second backend's; ``benchmarks/history/`` keeps runs of code since changed)."""
    out = []
    others = sorted(p.stem for p in BENCH.glob("*.json") if p.stem not in ORDER)
    for name in [*ORDER, *others]:
        d = load(name) or {}
        out += [f"`{k}` ({name}.json)" for k, v in d.get("targets", {}).items() if not v]
    return out


def targets_line() -> str:
    miss = unmet()
    if not miss:
        return "Every benchmark target is met in the committed runs (`benchmarks/*.json`)."
    return ("Benchmark targets not met in the committed runs (`benchmarks/*.json`): " + "; ".join(miss) + ".")


def machines_line() -> str:
    """Where each JSON says it was measured (never the machine that runs this script)."""
    groups: dict[str, list[str]] = {}
    for path in sorted(BENCH.glob("*.json")):
        m = json.loads(path.read_text()).get("machine") or {}
        desc = ", ".join(x for x in (f"{m['cpus']} CPUs" if m.get("cpus") else "", m.get("cpu_model") or "",
                                     " ".join(m.get("cpu_flags") or []) or "CPU flags not recorded",
                                     f"commit {m['commit'][:10]}" if m.get("commit") else "") if x)
        groups.setdefault(desc if m else "not recorded", []).append(path.stem)
    return "Machines, as each JSON records them: " + "; ".join(f"{d} ({', '.join(n)})" for d, n in groups.items())


def report() -> str:
    return ("# Lens benchmark report\n\nGenerated by `scripts/report.py` from `benchmarks/*.json` (each written by "
            f"the script named in its section). {machines_line()}.\n\n"
            + targets_line() + "\n\n" + with_plots(performance(), "`{n}.json`, ![{n}]({n}.png)") + "\n")


#: the benchmarks with a plot beside their JSON (their sections name ``benchmarks/NAME.json|png``)
PLOTS = ("serve", "index", "train", "model", "drift")


def with_plots(body: str, form: str) -> str:
    """``body`` with each ``benchmarks/NAME.json|png`` mention written as ``form`` says (REPORT.md shows the plot
    beside it; the manual, outside benchmarks/, names the file)."""
    for name in PLOTS:
        body = body.replace(f"`benchmarks/{name}.json|png`", form.format(n=name))
    return body


def _replace_block(text: str, name: str, body: str) -> str:
    pat = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pat.search(text):
        raise SystemExit(f"README.md has no <!-- {name}:begin --> ... <!-- {name}:end --> block")
    return pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def install_line() -> str:
    i = load("install")
    if i is None:
        return "Install sizes not measured yet (`python scripts/install_size.py`)."
    extras = ", ".join(f"`{k}` +{n(v['adds_mb'], 0)} MB" for k, v in i["extras"].items())
    big = ", ".join(f"{d['name']} {n(d['mb'], 0)}" for d in i["core"]["largest"][:4])
    return (f"Site-packages of `pip install {i['distribution']}`: **{n(i['core']['mb'], 0)} MB** in "
            f"{i['core']['distributions']} distributions ({n(i['core_with_nncf_before_mb'], 0)} MB before NNCF moved "
            f"to the `int8` extra), of which torch's CUDA build is most (largest: {big} MB); without torch, triton "
            f"and the nvidia-* wheels, {n(i['core']['without_torch_and_cuda_mb'], 0)} MB. Each extra adds: {extras} "
            f"(`benchmarks/install.json`, written by `scripts/install_size.py`).")


def readme(text: str) -> str:
    text = _replace_block(text, "install", install_line())
    return _replace_block(text, "targets", targets_line())


def docs_page() -> str:
    """docs/performance.md: how the figures are made, where (from the JSON), and the figures."""
    body = with_plots(performance(), "`benchmarks/{n}.json` (plot: `benchmarks/{n}.png`)")
    return ("<!-- generated by scripts/report.py from benchmarks/*.json: do not edit -->\n\n# Performance\n\n"
            "`make bench` (= `python scripts/bench_all.py`) runs every `scripts/bench_*.py`; each prints a JSON "
            "summary and writes `benchmarks/<name>.json`, with ratios against baselines measured in the same run "
            "(the strongest fair one: a pipelined loop on the same backend, not a serial one). Everything below is "
            "generated from those files by `scripts/report.py`, which also writes `benchmarks/REPORT.md` (with "
            "the plots); a test fails if either is out of date. Shared machines move figures from run to run: "
            "compare ratios, not absolutes, and re-run rather than trust one.\n\n"
            f"{machines_line()}.\n\n{targets_line()}\n\n{body}\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that both files are up to date")
    args = ap.parse_args()
    readme_path, report_path, docs_path = ROOT / "README.md", BENCH / "REPORT.md", ROOT / "docs" / "performance.md"
    start_path = ROOT / "docs" / "get-started.md"  # the install sizes again, for readers of the manual
    new_readme, new_report, new_docs = readme(readme_path.read_text()), report(), docs_page()
    new_start = _replace_block(start_path.read_text(), "install", install_line())
    files = ((readme_path, new_readme), (report_path, new_report), (docs_path, new_docs), (start_path, new_start))
    if args.check:
        stale = [str(p) for p, new in files if not p.is_file() or p.read_text() != new]
        if stale:
            print("out of date with benchmarks/*.json: " + ", ".join(stale) + " (run scripts/report.py)",
                  file=sys.stderr)
            return 1
        return 0
    for path, new in files:
        path.write_text(new)
    print(f"wrote {', '.join(str(p) for p, _ in files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

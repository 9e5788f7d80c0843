"""``lens demo``: the main job end to end on embedded defaults, on one machine, with no network.

moto's S3/SQS on 127.0.0.1 and a local Ray; real photographs (scikit-image's) plus seeded augmented copies
-> Parquet shards -> bulk embedding on Ray Data -> FAISS index -> the Serve app (tagging, search, event
consumer) -> new images uploaded to the bucket are tagged by the event path and become searchable -> example
tag and search requests over HTTP -> a summary. ``--keep`` leaves the service up until Ctrl-C.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

__all__ = ["run_demo", "prepare_workdir", "MARKER"]

DATA_BUCKET = "lens-demo-data"  # seed images, shards and bulk embeddings (no notifications)
#: Left in the work directory by every demo run; only a directory holding it is ever emptied by the next run.
MARKER = ".lens-demo-workdir"


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    """The demo's work directory, emptied of a previous demo run's outputs and marked as the demo's own.

    A missing or empty directory is created and marked. A directory holding the marker was written by an earlier
    demo run: its contents are removed (the marker says the demo owns it). Any other non-empty directory (or a
    file) is refused with :class:`~lens.errors.LensError`: the demo never deletes what it did not create.
    """
    from lens.errors import LensError

    work = Path(workdir).expanduser().resolve()
    if work.exists() and not work.is_dir():
        raise LensError(f"--workdir {work} is a file, not a directory", code="usage")
    if work.is_dir() and any(work.iterdir()):
        if not (work / MARKER).is_file():
            raise LensError(f"--workdir {work} is not empty and was not made by lens demo (no {MARKER}); "
                            "choose a new or empty directory", code="usage")
        for child in work.iterdir():
            if child.name == MARKER:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("This directory is lens demo's work directory: the next `lens demo --workdir` "
                               "run empties it.\n")
    return work


def _step(n: int, total: int, msg: str) -> float:
    print(f"[{n}/{total}] {msg}", file=sys.stderr, flush=True)
    return time.perf_counter()


def _wait(what: str, check, timeout_s: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def run_demo(*, images: int = 300, new_images: int = 12, workdir: str = "lens-demo", port: int = 8000,
             keep: bool = False, dashboard: bool = True, address: str | None = None, deletes: int = 6) -> dict:
    from lens.client import LensAPIError, LensClient
    from lens.runtime.samples import augmented_jpegs, sample_path

    total = 11
    summary: dict = {"steps_s": {}}
    work = prepare_workdir(workdir)
    t_all = time.perf_counter()

    # 1 -------------------------------------------------------------------------------------
    t = _step(1, total, "starting moto's S3/SQS on 127.0.0.1 and a local Ray")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    # Behind HAProxy, an ingress replica that is stopping stays reachable 30 s so load balancers can deregister
    # it; this throwaway local cluster has none, and the demo's shutdown would wait those 30 s for nothing.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    from lens.cli.events import DEFAULT_EVENTS_CONFIG, events_args, start_local_aws
    from lens.serve.frontdoor import port_or_free
    from lens.serve.frontdoor import prepare as prepare_frontdoor

    endpoint = start_local_aws(port_or_free(4566))
    import boto3

    from lens.cluster import init_ray

    # HAProxy's slow-client limits, with its stats/exporter ports wherever they are free on this host
    _, frontdoor = prepare_frontdoor(None)
    # log_to_driver=False: replica and worker logs stay in Ray's log files, the demo prints its own progress
    start = {"include_dashboard": dashboard, "dashboard_host": "127.0.0.1", "dashboard_port": port_or_free(8265)}
    ctx = init_ray(address, log=lambda m: print(f"    {m}", file=sys.stderr), what="lens demo", log_to_driver=False,
                   runtime_env=frontdoor, **start)
    dashboard_url = getattr(ctx, "dashboard_url", None) if dashboard else None
    if dashboard_url:
        summary["ray_dashboard"] = f"http://{dashboard_url}"
        print(f"    Ray dashboard: http://{dashboard_url} (jobs, actors, logs; --no-dashboard turns it off)",
              file=sys.stderr)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=DATA_BUCKET)
    summary["steps_s"]["start"] = round(time.perf_counter() - t, 1)

    # 2 -------------------------------------------------------------------------------------
    t = _step(2, total, f"seeding s3://{DATA_BUCKET}/images/ with real photos and {images} augmented copies")
    from lens.runtime.samples import SAMPLES

    seeded = 0
    for name in SAMPLES:
        s3.put_object(Bucket=DATA_BUCKET, Key=f"images/originals/{name}", Body=sample_path(name).read_bytes())
        seeded += 1
    for name, data, _ in augmented_jpegs(images, seed=0):
        s3.put_object(Bucket=DATA_BUCKET, Key=f"images/augmented/{name}", Body=data)
        seeded += 1
    summary["seeded_images"] = seeded
    summary["steps_s"]["seed"] = round(time.perf_counter() - t, 1)

    # 3 -------------------------------------------------------------------------------------
    t = _step(3, total, "packing them into Parquet shards (lens shards)")
    from lens.batch.shards import make_shards

    shards = make_shards(f"s3://{DATA_BUCKET}/images", f"s3://{DATA_BUCKET}/shards", rows_per_shard=100)
    summary["shards"] = len(shards)
    summary["steps_s"]["shards"] = round(time.perf_counter() - t, 1)

    # 4 -------------------------------------------------------------------------------------
    t = _step(4, total, "bulk embedding on Ray Data (lens embed)")
    from lens.batch.config import EmbedConfig
    from lens.batch.job import run_embed

    emb = run_embed(EmbedConfig(input=f"s3://{DATA_BUCKET}/shards", output=f"s3://{DATA_BUCKET}/embeddings"),
                    log=lambda m: print("    " + m, file=sys.stderr))
    summary["embed"] = {"rows": emb.input_rows, "embedded": emb.embedded, "errors": emb.errors,
                        "images_per_s": emb.images_per_s, "output": emb.output}
    summary["steps_s"]["embed"] = round(time.perf_counter() - t, 1)

    # 5 -------------------------------------------------------------------------------------
    t = _step(5, total, "building the FAISS index (lens index build)")
    from lens.index.build import BuildConfig, build_index

    index_dir = work / "index"
    man = build_index(BuildConfig(embeddings=[f"s3://{DATA_BUCKET}/embeddings"], output=str(index_dir),
                                  queries=100), log=lambda m: print("    " + m, file=sys.stderr))
    summary["index"] = {"path": str(index_dir), "version": man["version"], "type": man["type"],
                        "count": man["count"], "recall_at_10": man["recall"]["value"]}
    summary["steps_s"]["index"] = round(time.perf_counter() - t, 1)

    # 6 -------------------------------------------------------------------------------------
    t = _step(6, total, "training custom tags: 8 scene classes cut from the photos (lens train, head mode)")
    from lens.train.config import TrainConfig
    from lens.train.job import run_train

    from lens.runtime.samples import scene_dataset

    scene_dataset(work / "scenes", train_per_class=12, val_per_class=6, seed=0)  # val: 3 validation + 3 test
    head = run_train(TrainConfig(data=str(work / "scenes"), output=str(work / "packages" / "scenes")),
                     log=lambda m: print("    " + m, file=sys.stderr))
    summary["custom_tags"] = {"package": head["package"], "classes": head["classes"], "train": head["train"],
                              "val": head["val"], "test": head["test"], "test_top1": head["metrics"]["top1"],
                              "head_seconds": head["head_seconds"]}
    summary["steps_s"]["train"] = round(time.perf_counter() - t, 1)

    # 7 -------------------------------------------------------------------------------------
    t = _step(7, total, "starting the Serve app: tagging (ImageNet + custom tags) + search + the S3 event consumer")
    from lens.serve.events.setup import ensure_resources
    from lens.serve.run import deploy

    port = port_or_free(port)
    doc = copy.deepcopy(DEFAULT_EVENTS_CONFIG)
    doc["http_options"]["port"] = port
    cfg = events_args(doc).events
    emb_prefix = f"s3://{cfg.results_bucket}/{cfg.embeddings_prefix}"
    doc["applications"][0]["args"] = {"search": {"index": str(index_dir), "refresh_s": 1.0,
                                                 "delta_sources": [emb_prefix]},
                                      "pools": [{"name": "Tagger", "nice": 0, "model": {"heads": [head["package"]]}}]}
    events_app = doc["applications"][1]["args"]  # its own pool tags uploads with the same model and head
    events_app["pool"] = dict(events_app["pool"], model={"heads": [head["package"]]})
    for change in ensure_resources(cfg):
        print(f"    {change}", file=sys.stderr)
    deploy(doc, where="demo config")
    url = f"http://127.0.0.1:{port}"
    lens = LensClient(url, timeout_s=30)

    def healthy() -> bool:
        try:
            return lens.health()["status"] == "ok"
        except LensAPIError:
            return False

    _wait("the service", healthy, 120)
    summary["url"] = url
    summary["steps_s"]["serve"] = round(time.perf_counter() - t, 1)

    # 8 -------------------------------------------------------------------------------------
    t = _step(8, total, f"uploading {new_images} new images to s3://{cfg.bucket}/incoming/ "
                        "(S3 ObjectCreated -> SQS -> consumer)")
    new = list(augmented_jpegs(new_images, seed=1000))
    for name, data, _ in new:
        s3.put_object(Bucket=cfg.bucket, Key=f"incoming/{name}", Body=data)
    results_bucket = cfg.results_bucket or cfg.bucket

    def sidecars() -> int:
        got = s3.list_objects_v2(Bucket=results_bucket, Prefix=f"{cfg.result_prefix}incoming/").get("KeyCount", 0)
        return got if got >= new_images else 0

    _wait("the event path to tag every new image", sidecars, 180)
    tagged_s = time.perf_counter() - t
    probe_name, probe, _ = new[0]
    probe_id = f"s3://{cfg.bucket}/incoming/{probe_name}"

    def searchable():
        try:
            r = lens.search(probe, k=5)
        except LensAPIError:
            return None
        return r if r["results"] and r["results"][0]["id"] == probe_id else None

    found = _wait("a new image to become searchable (delta index)", searchable, 120)
    sidecar = json.loads(s3.get_object(Bucket=results_bucket,
                                       Key=f"{cfg.result_prefix}incoming/{probe_name}.json")["Body"].read())
    summary["events"] = {"uploaded": new_images, "tagged": new_images, "tagged_in_s": round(tagged_s, 1),
                         "searchable_in_s": round(time.perf_counter() - t, 1),
                         "example_sidecar": f"s3://{results_bucket}/{cfg.result_prefix}incoming/{probe_name}.json",
                         "example_tags": [x["label"] for x in sidecar["tags"][:3]],
                         "example_custom_tags": sidecar.get("custom_tags"),
                         "example_search_top1": found["results"][0]}
    summary["steps_s"]["events"] = round(time.perf_counter() - t, 1)

    # 9 -------------------------------------------------------------------------------------
    deletes = min(deletes, new_images)
    t = _step(9, total, f"deleting {deletes} of them from the bucket (S3 ObjectRemoved -> SQS -> tombstones)")
    summary["deletes"] = measure_deletes(s3, lens, cfg.bucket, [f"incoming/{name}" for name, _, _ in new[:deletes]],
                                         [data for _, data, _ in new[:deletes]], results_bucket, cfg.result_prefix)
    summary["steps_s"]["deletes"] = round(time.perf_counter() - t, 1)

    # 10 ------------------------------------------------------------------------------------
    t = _step(10, total, "example requests over HTTP")
    coffee = sample_path("coffee.png").read_bytes()
    tag = lens.tag(coffee, top_k=3, custom_top_k=3)  # the head's best guesses, each marked passed or not
    from PIL import Image

    cat = Image.open(sample_path("chelsea.png")).convert("RGB")
    crop = cat.crop((40, 20, cat.width - 30, cat.height - 10)).transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=85)
    search = lens.search(buf.getvalue(), k=3)
    by_id = lens.search(id="originals/coffee.png", k=3)
    thumb = lens.thumbnail(by_id["results"][0]["id"])  # what the search page shows, read from the bucket
    summary["ui"] = f"{url}/ui"
    summary["examples"] = {
        "tag coffee.png": [(x["label"], round(x["score"], 3)) for x in tag["tags"]],
        "custom tags of coffee.png": [(x["label"], round(x["score"], 3), "passed" if x["passed"] else "below threshold")
                                      for x in tag["custom_tags"]["scenes"]],
        "search with a cropped, mirrored cat": [(h["id"], round(h["score"], 3)) for h in search["results"]],
        "neighbours of originals/coffee.png": [(h["id"], round(h["score"], 3)) for h in by_id["results"]],
        "thumbnail of the first neighbour": f"{len(thumb):,} bytes of JPEG, read from S3 by the service",
    }
    summary["steps_s"]["examples"] = round(time.perf_counter() - t, 1)
    summary["total_s"] = round(time.perf_counter() - t_all, 1)

    # 11 ------------------------------------------------------------------------------------
    _step(11, total, "summary")
    _print_summary(summary, url, endpoint, cfg)
    if keep:
        print(f"\nLens is up at {url} (S3/SQS at {endpoint}); Ctrl-C to stop.", file=sys.stderr)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    return summary


def measure_deletes(s3, lens, bucket: str, keys: list[str], images: list[bytes], results_bucket: str,
                    result_prefix: str, timeout_s: float = 120) -> dict:
    """Delete ``keys`` from the bucket and time each one until the service stops returning it (its id lookup is a
    404); then check no image search returns them and their sidecars say ``deleted``. Delete -> gone seconds."""
    from lens.client import LensAPIError

    ids = {f"s3://{bucket}/{k}": k for k in keys}
    started: dict[str, float] = {}
    for id_, key in ids.items():
        started[id_] = time.perf_counter()
        s3.delete_object(Bucket=bucket, Key=key)
    gone: dict[str, float] = {}
    deadline = time.perf_counter() + timeout_s
    while len(gone) < len(ids) and time.perf_counter() < deadline:
        for id_ in [i for i in ids if i not in gone]:
            try:
                lens.search(id=id_, k=1)
            except LensAPIError as e:
                if e.http_status == 404:
                    gone[id_] = time.perf_counter() - started[id_]
        time.sleep(0.05)
    if len(gone) < len(ids):
        raise RuntimeError(f"{len(ids) - len(gone)} deleted images still searchable after {timeout_s:.0f} s")
    found = {h["id"] for data in images for h in lens.search(data, k=10)["results"]}
    if found & set(ids):
        raise RuntimeError(f"deleted images still returned by an image search: {sorted(found & set(ids))}")
    statuses = {json.loads(s3.get_object(Bucket=results_bucket, Key=f"{result_prefix}{k}.json")["Body"].read())
                ["status"] for k in keys}
    s = sorted(gone.values())
    return {"deleted": len(ids), "gone_p50_s": round(float(np.percentile(s, 50)), 2),
            "gone_p95_s": round(float(np.percentile(s, 95)), 2), "gone_max_s": round(s[-1], 2),
            "sidecar_status": sorted(statuses), "returned_by_image_search": 0}


def _print_summary(s: dict, url: str, endpoint: str, cfg) -> None:
    p = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    p("\n=== Lens demo: done in %.0f s ===" % s["total_s"])
    p(f"  seeded         {s['seeded_images']} images (7 real photos + augmented copies) in s3://{DATA_BUCKET}/images/")
    p(f"  shards         {s['shards']} Parquet shards in s3://{DATA_BUCKET}/shards/")
    e = s["embed"]
    p(f"  bulk embedding {e['rows']} rows = {e['embedded']} embedded + {e['errors']} errors, "
      f"{e['images_per_s']} images/s -> {e['output']}")
    i = s["index"]
    p(f"  index          {i['type']} over {i['count']} vectors, recall@10 {i['recall_at_10']} -> {i['path']}")
    c = s["custom_tags"]
    p(f"  custom tags    a head on {c['classes']} scene classes ({c['train']} train / {c['val']} val / {c['test']} "
      f"test images), test top-1 {c['test_top1']}, trained in {c['head_seconds']} s -> {c['package']}")
    ev = s["events"]
    p(f"  event path     {ev['uploaded']} uploads tagged in {ev['tagged_in_s']} s, searchable in "
      f"{ev['searchable_in_s']} s; e.g. {ev['example_sidecar']}: {', '.join(ev['example_tags'])}")
    d = s["deletes"]
    p(f"  deletes        {d['deleted']} images deleted from the bucket: gone from search in p50 {d['gone_p50_s']} s, "
      f"p95 {d['gone_p95_s']} s; sidecars {', '.join(d['sidecar_status'])}")
    for k, v in s["examples"].items():
        p(f"  {k}: {v}")
    p(f"  timings (s)    {s['steps_s']}")
    p("\n  try it (while the service is up, e.g. with --keep):")
    p(f"    {url}/ui     (the search page: drop an image, click a hit to search from it)")
    p(f"    {url}/docs   (the API, with Swagger's Try it out)   `serve status` (deployments and replicas)")
    if s.get("ray_dashboard"):
        p(f"    {s['ray_dashboard']}   (the Ray dashboard)")
    p(f"    curl -s --data-binary @photo.jpg -H 'Content-Type: image/jpeg' '{url}/v1/tag?top_k=5'")
    p(f"    curl -s --data-binary @photo.jpg -H 'Content-Type: image/jpeg' '{url}/v1/search?k=5'")
    p(f"    curl -s '{url}/v1/search/originals/coffee.png?k=5'")
    p(f"    AWS_ENDPOINT_URL={endpoint} lens events status")


def main(args) -> int:
    import ray
    from ray import serve

    prepare_workdir(args.workdir)  # refuses a directory the demo does not own before anything starts
    try:
        summary = run_demo(images=args.images, new_images=args.new_images, workdir=args.workdir, port=args.port,
                           keep=args.keep, dashboard=not args.no_dashboard, address=args.address,
                           deletes=args.deletes)
    finally:
        print("shutting down ...", file=sys.stderr)
        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001 - Serve may not have started
            pass
        ray.shutdown()
    print(json.dumps(summary))  # last, after anything Ray prints while shutting down
    return 0

"""The in-process baseline every Lens benchmark compares against: the strongest loop one process can run.

``pipelined`` decodes and preprocesses on a pool of threads while the model runs the previous batch, so the
decoder and ONNX Runtime overlap on all cores, with no server, no Ray and no serialisation in between: the
same predictor core (decode, preprocess, model, top-k) Lens runs, minus everything Lens adds around it.
``best_pipelined`` tries a few batch sizes and decode-thread counts (and, given predictors for them, several
batches on the model at once) and keeps the fastest.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np

__all__ = ["pipelined", "best_pipelined", "for_seconds", "installed_fp32_backends"]


def installed_fp32_backends() -> list[str]:
    """Every CPU backend this install can run the model on (fp32)."""
    import importlib.util

    return ["onnx"] + (["openvino"] if importlib.util.find_spec("openvino") else [])


def for_seconds(bodies: list[bytes], seconds: float) -> Iterator[bytes]:
    """``bodies`` round and round until ``seconds`` have passed (checked per item)."""
    end = time.perf_counter() + seconds
    for b in itertools.cycle(bodies):
        if time.perf_counter() >= end:
            return
        yield b


def pipelined(predictor, items: Iterable[bytes], *, batch_size: int, decode_threads: int, lanes: int = 1,
              prefetch_batches: int = 2, top_k: int = 5) -> dict:
    """Decode threads feed model batches; decoding of the next batches overlaps the model on this one. With
    ``lanes`` > 1, that many batches run on the model at once (a predictor built with ``streams=lanes`` and its
    share of the threads, as a Serve replica's ``concurrent_batches``)."""
    from lens.runtime.predictor import ItemError, top_k_tags

    def prepare(data: bytes):
        return predictor.prepare_many([data])[0]

    def model(arrays: list) -> None:
        logits, _ = predictor.infer(np.stack(arrays))
        top_k_tags(logits, predictor.model.labels, top_k)

    it = iter(items)
    pending: deque = deque()
    running: deque = deque()
    n = ok = batches = 0
    with ThreadPoolExecutor(decode_threads, thread_name_prefix="baseline-decode") as pool, \
            ThreadPoolExecutor(lanes, thread_name_prefix="baseline-model") as models:
        def fill() -> None:
            while len(pending) < batch_size * (prefetch_batches + lanes):
                try:
                    pending.append(pool.submit(prepare, next(it)))
                except StopIteration:
                    return

        t0 = time.perf_counter()
        fill()
        while pending:
            batch = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
            fill()  # the next batches decode while the model runs this one
            arrays = [a for a in batch if not isinstance(a, ItemError)]
            if arrays:
                running.append(models.submit(model, arrays))
            while len(running) >= lanes or (running and not pending):
                running.popleft().result()
            n += len(batch)
            ok += len(arrays)
            batches += 1
        seconds = time.perf_counter() - t0
    return {"images": n, "ok": ok, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 2),
            "batch_size": batch_size, "decode_threads": decode_threads, "lanes": lanes}


def best_pipelined(predictor, make_items, *, batch_sizes=(8, 16, 32), decode_threads=None, lanes=None) -> dict:
    """The fastest of ``pipelined`` over batch sizes and decode-thread counts (1 .. cores), and over model lanes
    where ``lanes`` maps a lane count to the predictor built for it; every point listed. ``make_items()`` returns
    a fresh iterable of encoded images for each point."""
    threads = decode_threads or sorted({1, max(1, (os.cpu_count() or 2) // 2), os.cpu_count() or 2})
    by_lanes = lanes or {1: predictor}
    points = [pipelined(p, make_items(), batch_size=bs, decode_threads=t, lanes=k)
              for k, p in by_lanes.items() for bs in batch_sizes for t in threads]
    best = max(points, key=lambda p: p["images_per_s"])
    return best | {"points": [{k: p[k] for k in ("lanes", "batch_size", "decode_threads", "images_per_s")}
                              for p in points]}

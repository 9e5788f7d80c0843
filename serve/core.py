"""The model pool's replica logic, wrapping the predictor core (see :mod:`serve.deployments`).

Each request's image is decoded and preprocessed on a thread pool as soon as it
arrives, so decoding overlaps the model; prepared arrays are gathered by
``@serve.batch`` and run on the model in one call on a dedicated thread, so the
event loop keeps accepting and decoding while the model is busy. The constructor
loads the model and warms it up, so a replica is healthy only once it is warm.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from ray import serve

from lens.config import validate
from lens.errors import ModelError, OverloadedError
from lens.predictor import ItemError, Predictor, top_k_tags

from .config import BatchingConfig, PoolConfig
from .metrics import TaggerMetrics

__all__ = ["TaggerCore"]

logger = logging.getLogger("lens.serve")


def _assigned_cpus() -> int:
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    except Exception:  # noqa: BLE001 - outside Ray (unit tests) there is no assignment
        cpus = 0
    return max(1, int(round(cpus))) if cpus else (os.cpu_count() or 1)


class TaggerCore:
    """Loads and warms the model in the constructor, so a replica is healthy only once it is warm."""

    def __init__(self, pool: dict) -> None:
        t0 = time.perf_counter()
        cfg = validate(PoolConfig, pool, where="Tagger args")
        cpus = _assigned_cpus()
        model_cfg = cfg.model
        if model_cfg.num_threads is None:  # match ONNX Runtime / torch threads to this replica's num_cpus
            model_cfg = model_cfg.model_copy(update={"num_threads": cpus})
        self.cfg = cfg
        self.predictor = Predictor.from_config(model_cfg, cfg.decode)
        self._decode_pool = ThreadPoolExecutor(cfg.decode_threads or cpus, thread_name_prefix="lens-decode")
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="lens-model")
        for bs in cfg.warmup_batch_sizes:
            self.predictor.warmup(bs)
        self.metrics = TaggerMetrics()
        self._in_flight = 0
        self._decoding = 0
        self._batches = self._images = self._max_batch_seen = 0
        self._overloaded = 0
        self._recent_batches: collections.deque = collections.deque(maxlen=64)  # sizes, newest last
        self._recycle_reason: str | None = None
        self._model_gate = asyncio.Event()  # cleared by hold_batches(): batches wait before the model
        self._model_gate.set()
        self.reconfigure(cfg.batching.model_dump())
        self.cold_start_s = time.perf_counter() - t0
        self.ready_at = time.time()
        self.metrics.cold_start.set(self.cold_start_s)
        info = self.predictor.info()
        # int8 asked for and refused by the accuracy gate: say it loudly (0 otherwise, so the series exists)
        self.metrics.int8_fallback.set(1 if info.get("quantization", {}).get("served") == "fp32" else 0)
        logger.info("replica of %s ready in %.2fs: %s on %s (%s), %d CPU(s)", cfg.name, self.cold_start_s,
                    info["model"], info["device"], info["backend"], cpus)

    # -- live knobs --------------------------------------------------------------------------
    def reconfigure(self, user_config: dict) -> None:
        # both bounds of max_batch_size are checked before deploying (BatchingConfig, serve.run.check_serve_config)
        batching = validate(BatchingConfig, user_config or {}, where="user_config")
        self._run_batch.set_max_batch_size(batching.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.predictor.max_batch_size = batching.max_batch_size
        self.batching = batching
        logger.info("batching: max_batch_size=%d batch_wait_timeout_s=%s", batching.max_batch_size,
                    batching.batch_wait_timeout_s)

    def check_health(self) -> None:
        if not self.predictor.warmed_up:
            raise RuntimeError("model not warmed up")
        if self._recycle_reason:
            raise RuntimeError(f"replica marked for replacement: {self._recycle_reason}")

    def recycle(self, reason: str = "operator request") -> dict:
        """Fail the next health check so Serve replaces this replica (after draining it)."""
        logger.warning("replica %s marked for replacement: %s", os.getpid(), reason)
        self._recycle_reason = reason
        return {"pid": os.getpid(), "recycling": True}

    async def hold_batches(self, hold: bool) -> dict:
        """Hold (or release) batches before the model: requests are still accepted, decoded and queued up to
        ``max_pending``. An operator's pause, and how tests fill a replica's queue without racing the model."""
        if hold:
            self._model_gate.clear()
        else:
            self._model_gate.set()
        logger.warning("replica %s: batches %s", os.getpid(), "held" if hold else "released")
        return self.stats()

    # -- requests ----------------------------------------------------------------------------
    def info(self) -> dict:
        return self.predictor.info() | {
            "pool": self.cfg.name,
            "cold_start_s": round(self.cold_start_s, 3),
            "ready_at": self.ready_at,
            "batching": self.batching.model_dump(),
        }

    async def tag(self, data: bytes, top_k: int = 5, embedding: bool = False) -> dict:
        """Tag one image: ``{"tags": [...], ["embedding": ndarray]}``. Raises :class:`OverloadedError` (queue
        full), the image's own error (a :class:`RequestFailed` with its code and status) or :class:`ModelError`."""
        if self._in_flight >= self.batching.max_pending:
            self._overloaded += 1
            self.metrics.errors.inc(tags={"kind": "overloaded"})
            raise OverloadedError(f"replica is at max_pending={self.batching.max_pending} images; retry later")
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        try:
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            self._decoding += 1
            try:
                prepared = (await loop.run_in_executor(self._decode_pool, self.predictor.prepare_many, [data]))[0]
            finally:
                self._decoding -= 1
            self.metrics.decode.observe((time.perf_counter() - t0) * 1000)
            if isinstance(prepared, ItemError):
                self.metrics.errors.inc(tags={"kind": prepared.code})
                raise prepared.to_error()
            # Adaptive wait: hold a batch open for up to batch_wait_timeout_s only while other images are
            # still decoding and will join it; a lone request goes to the model at once.
            self._run_batch.set_batch_wait_timeout_s(self.batching.batch_wait_timeout_s if self._decoding else 0.0)
            try:
                logits, emb = await self._run_batch((prepared, time.perf_counter()))
            except Exception as e:  # noqa: BLE001 - a failed model call fails its batch, never the replica
                logger.exception("model batch failed")
                self.metrics.errors.inc(tags={"kind": "model_error"})
                raise ModelError(f"{type(e).__name__}: {e}") from None
            out: dict = {"tags": [t.to_dict() for t in top_k_tags(logits[None], self.predictor.model.labels,
                                                                  top_k)[0]]}
            custom = self.predictor.custom_tags(emb[None], logits[None])
            if custom is not None:
                out["custom_tags"] = custom[0]
            if embedding:
                out["embedding"] = emb
            return out
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)  # both replaced by reconfigure() at start
    async def _run_batch(self, items: list[tuple[np.ndarray, float]]) -> list[tuple[np.ndarray, np.ndarray]]:
        await self._model_gate.wait()
        start = time.perf_counter()
        for _, enqueued in items:
            self.metrics.queue_wait.observe((start - enqueued) * 1000)
        self.metrics.batch_size.observe(len(items))
        self._batches += 1
        self._images += len(items)
        self._max_batch_seen = max(self._max_batch_seen, len(items))
        self._recent_batches.append(len(items))
        batch = np.stack([arr for arr, _ in items])
        loop = asyncio.get_running_loop()
        logits, emb = await loop.run_in_executor(self._model_thread, self.predictor.infer, batch)
        self.metrics.model.observe((time.perf_counter() - start) * 1000)
        return list(zip(logits, emb))

    def stats(self) -> dict:
        """Counters of this replica since start (also in the Prometheus metrics): for tests and debugging."""
        return {"pid": os.getpid(), "batches": self._batches, "images": self._images,
                "max_batch_seen": self._max_batch_seen, "in_flight": self._in_flight, "decoding": self._decoding,
                "overloaded": self._overloaded, "held": not self._model_gate.is_set(),
                "recent_batch_sizes": list(self._recent_batches),
                "batching": self.batching.model_dump()}

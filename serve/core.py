"""The model pool's replica logic, wrapping the predictor core (see :mod:`lens.serve.deployments`).

Each request's image is decoded and preprocessed on a thread pool as soon as it
arrives, so decoding overlaps the model; prepared arrays are gathered by
``serve.batch`` and each batch runs on the model in one call on a model thread, so
the event loop keeps accepting and decoding while the model is busy. A CPU replica
runs ``concurrent_batches`` batches at once (default 2 on 2+ CPUs), each on its
share of the replica's CPUs: on two cores, two one-thread batches keep both busy
where one two-thread batch leaves them waiting on each other. The constructor
loads the model and warms it up, so a replica is healthy only once it is warm.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from ray import serve

from lens.cluster import niceness
from lens.errors import ConfigError, ModelError, OverloadedError, RequestFailed
from lens.identity import ModelIdentity, identity_of
from lens.package import PackageError
from lens.quality.drift import DriftMonitor, Profile
from lens.registry.store import Registry, VersionRef, parse_model_ref
from lens.runtime.config import validate
from lens.runtime.decode import sniff_format
from lens.runtime.heads import Head, load_head
from lens.runtime.predictor import ItemError, Predictor, top_k_tags

from .config import BatchingConfig, PoolConfig, replica_cpus
from .logs import to_replica_log
from .metrics import DriftMetrics, InputMetrics, TaggerMetrics, VersionMetrics
from .versions import (
    Routing,
    Slot,
    VersionStats,
    VersionWatcher,
    agreement,
    check_versions_model,
    config_for_version,
    route,
)

__all__ = ["TaggerCore", "batch_limit"]

logger = logging.getLogger("lens.serve")


def _assigned_cpus() -> int:
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    except Exception:  # noqa: BLE001 - outside Ray (unit tests) there is no assignment
        cpus = 0
    return replica_cpus(cpus)


def batch_limit(max_batch_size: int, lanes: int, running: int, coming: int) -> int:
    """The size at which the batch being formed closes: ``coming`` (the images in the replica that can still join
    one: queued for a batch or decoding) spread over the model lanes free now, at most ``max_batch_size``. Serve's
    batch queue closes a batch at this size or at its wait timeout: one that holds everything the replica has
    goes to the model at once (eight closed-loop clients do not wait out the timeout for images that are not
    coming), two free lanes take half each, and under load (more images than a batch holds) it is
    ``max_batch_size``."""
    free = max(1, lanes - running)
    return max(1, min(max_batch_size, -(-coming // free)))


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (unit tests)
        return f"pid{os.getpid()}"


class TaggerCore:
    """Loads and warms the model in the constructor, so a replica is healthy only once it is warm.

    With ``versions:`` the model comes from the registry: a :class:`~lens.serve.versions.VersionWatcher` keeps the
    stable (and a rollout's canary) version loaded and swaps them without a restart; each request meets the
    version :func:`~lens.serve.versions.route` picks for its bytes."""

    def __init__(self, pool: dict, controller=None) -> None:
        to_replica_log()
        t0 = time.perf_counter()
        cfg = validate(PoolConfig, pool, where="Tagger args")
        cpus = _assigned_cpus()
        model_cfg = cfg.model_for(cpus)
        self.lanes = lanes = model_cfg.streams
        self.cfg = cfg
        self._model_cfg = model_cfg
        self.metrics = TaggerMetrics()
        self.version_metrics = VersionMetrics() if cfg.versions else None
        self.version_stats = VersionStats()
        self.input_metrics = InputMetrics()
        self._drift_profile = self._load_profile(cfg)
        self.drift_metrics = DriftMetrics() if self._drift_profile is not None else None
        self._monitors: dict[int, tuple[str, DriftMonitor | None]] = {}  # id(slot) -> (label, monitor or None)
        self._controller = controller
        self._replica = _replica_id()
        self._background: set = set()  # shadow comparisons in flight (a reference keeps each task alive)
        self.batching = cfg.batching
        if cfg.versions is None:
            self.watcher = None
            self._static = Routing(stable=Slot(None, self._new_predictor(model_cfg)))
        else:
            check_versions_model(cfg.model)
            self.watcher = VersionWatcher(cfg.versions, self._load_version, on_load_failure=self._load_failed,
                                          on_change=self._routing_changed)
            self._routing_changed(self.watcher.routing)
        self._decode_pool = ThreadPoolExecutor(cfg.decode_threads or cpus, thread_name_prefix="lens-decode")
        self._model_threads = ThreadPoolExecutor(lanes, thread_name_prefix="lens-model")
        # Serve's batch queue, made per replica: its bound on concurrent batches is set when it is made (sizes and
        # wait are live: reconfigure() sets them)
        self._run_batch = serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0,
                                      max_concurrent_batches=lanes)(self._batch)
        self._running = self._max_running = 0
        self.nice = self._model_threads.submit(niceness).result()  # the CPU niceness the model runs at
        self._in_flight = 0
        self._decoding = 0
        self._queued = 0  # decoded images waiting for a batch to start
        self._batches = self._images = self._max_batch_seen = 0
        self._overloaded = 0
        self._dispatched = {"at_once": 0, "held_open": 0}  # images sent to the model at once / with a wait for company
        self._recent_batches: collections.deque = collections.deque(maxlen=64)  # sizes, newest last
        self._recycle_reason: str | None = None
        self._model_gate = asyncio.Event()  # cleared by hold_batches(): batches wait before the model
        self._model_gate.set()
        self.reconfigure(cfg.batching.model_dump())
        if self.watcher is not None:
            self.watcher.start()
        self.cold_start_s = time.perf_counter() - t0
        self.ready_at = time.time()
        info = self.predictor.info()
        # int8 asked for and refused by the accuracy gate: say it loudly (0 otherwise, so the series exists)
        self._int8_fallback = 1 if info.get("quantization", {}).get("served") == "fp32" else 0
        self._refresh_gauges()
        threading.Thread(target=self._housekeeping, name="lens-gauges", daemon=True).start()
        logger.info("replica of %s ready in %.2fs: %s on %s (%s), %d CPU(s)", cfg.name, self.cold_start_s,
                    info["model"], info["device"], info["backend"], cpus)

    # -- versions ----------------------------------------------------------------------------
    @property
    def routing(self) -> Routing:
        return self.watcher.routing if self.watcher is not None else self._static

    @property
    def predictor(self) -> Predictor:
        """The stable version's predictor (what health, info and warm-up describe)."""
        return self.routing.stable.predictor

    def _new_predictor(self, model_cfg) -> Predictor:
        predictor = Predictor.from_config(model_cfg, self.cfg.decode)
        predictor.max_batch_size = self.batching.max_batch_size
        for bs in self.cfg.warmup_batch_sizes:
            predictor.warmup(bs)
        return predictor

    def _load_version(self, vref: VersionRef) -> Predictor:
        """Load a registry version (the model and head loaders verify every checksum of its package), check that
        what loads is what its manifest says, warm it up. Raises :class:`PackageError` naming the file or the field
        that does not match."""
        t0 = time.perf_counter()
        kind = vref.manifest["kind"]
        predictor = self._new_predictor(config_for_version(self._model_cfg, vref, kind))
        if kind != "head":  # a head's backbone is checked by the predictor (Head.check_backbone)
            claimed = ModelIdentity.from_dict(identity_of(vref.manifest) or {})
            diff = claimed.mismatch(predictor.identity())
            if diff:
                raise PackageError(f"{vref.label} ({vref.uri}): the loaded model differs from its manifest's identity "
                                   f"in {', '.join(diff)}; the package is inconsistent")
        logger.info("loaded %s (%s package, sha256 %s...) in %.2fs", vref.label, kind, vref.sha256[:12],
                    time.perf_counter() - t0)
        if self.version_metrics:
            self.version_metrics.loads.inc(tags={"version": vref.label, "outcome": "loaded"})
        return predictor

    def _load_failed(self, version: str, why: str) -> None:
        if self.version_metrics:
            self.version_metrics.loads.inc(tags={"version": f"{self.cfg.versions.model}@{version}",
                                                 "outcome": "refused"})

    def _routing_changed(self, routing: Routing) -> None:
        if self.version_metrics:
            self.version_metrics.refresh(routing)

    # -- drift -------------------------------------------------------------------------------
    @staticmethod
    def _load_profile(cfg: PoolConfig) -> Profile | None:
        if cfg.drift is None:
            return None
        try:
            return Profile.load(cfg.drift.reference)
        except (ValueError, OSError) as e:
            raise ConfigError(f"pool {cfg.name}: drift.reference: {e}") from None

    def _monitor(self, slot: Slot) -> DriftMonitor | None:
        """The drift window of ``slot``'s version; None when its embeddings are not comparable with the profile."""
        entry = self._monitors.get(id(slot))
        if entry is None:
            label = slot.label or slot.identity.model
            prof, d = self._drift_profile, self.cfg.drift
            ref = prof.identity
            diff = ModelIdentity.from_dict(ref).mismatch(slot.identity) if ref else []
            if diff:
                logger.warning("drift: %s is not monitored: the reference profile was made with another model "
                               "(differs in %s)", label, ", ".join(diff))
                entry = (label, None)
            else:
                entry = (label, DriftMonitor(prof, window=d.window, every=d.every, alpha=d.alpha, min_ks=d.min_ks,
                                             min_psi=d.min_psi))
            self._monitors[id(slot)] = entry
        return entry[1]

    def _drift_tests(self) -> None:
        for label, mon in list(self._monitors.values()):
            result = mon.evaluate() if mon is not None else None
            if result is not None:
                self.drift_metrics.record(label, result, mon.filled)
                if result.drift:
                    logger.warning("drift on %s: %s", label, result.to_dict())

    def _refresh_gauges(self) -> None:
        """Set every gauge again: Ray drops a gauge series not set for about two export intervals (20 s by
        default), so a value set once (cold start, int8 fallback, the versions served) would vanish from
        Prometheus, and an ``absent()`` alert would fire on a healthy replica."""
        self.metrics.cold_start.set(self.cold_start_s)
        self.metrics.int8_fallback.set(self._int8_fallback)
        self.metrics.in_flight.set(self._in_flight)
        if self.version_metrics is not None:
            self.version_metrics.refresh(self.routing)
        if self.drift_metrics is not None:
            self.drift_metrics.refresh()

    def _housekeeping(self) -> None:
        """Every second: run due drift tests, refresh the gauges (in flight among them: a Ray metric record costs
        tens of microseconds, too much for every request); with a rollout controller, send it this replica's
        per-version counters and refused loads."""
        v = self.cfg.versions
        while True:
            time.sleep(min(v.poll_s, 1.0) if v else 1.0)
            try:
                if self.drift_metrics is not None:
                    self._drift_tests()
                self._refresh_gauges()
                if v is not None and self._controller is not None:
                    self._controller.report.remote(v.registry, v.model, self._replica,
                                                   self.version_stats.snapshot(), dict(self.watcher.failed))
            except Exception:  # noqa: BLE001 - the controller restarting: report again next time
                logger.warning("housekeeping (gauges, rollout report) failed this time", exc_info=True)

    @serve.multiplexed(max_num_models_per_replica=16)
    async def _get_head(self, head_id: str) -> Head:
        """A custom head chosen per request (``serve_multiplexed_model_id`` header). The request names it only as
        ``NAME[@ALIAS_OR_VERSION]``: a name the operator allowed (``heads_allowed``), else a model of the pool's
        head registry. Never a path or a URI: nothing a client sends chooses what the replica reads or fetches.
        Loaded once per replica (LRU), every checksum verified, downloads capped (``max_head_bytes``)."""
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, self._load_head, head_id)

    def _load_head(self, head_id: str) -> Head:
        from lens.errors import LensError

        try:
            name, ref = parse_model_ref(head_id)
        except LensError:
            raise RequestFailed("a head is named NAME or NAME@VERSION (letters, digits, ._-; at most 64 "
                                "characters), never a path or a URI", code="bad_head_id", status=400) from None
        registry = self.cfg.head_registry or (self.cfg.versions.registry if self.cfg.versions else None)
        cache = self._model_cfg.cache_dir
        limits = {"max_bytes": self.cfg.max_head_bytes, "deadline_s": self.cfg.head_download_s}
        try:
            if name in self.cfg.heads_allowed and "@" not in head_id:
                return load_head(self.cfg.heads_allowed[name], cache_dir=cache, **limits)
            if registry is None:
                raise RequestFailed(f"unknown head {head_id!r}: this pool allows "
                                    f"{sorted(self.cfg.heads_allowed) or 'no heads'} and has no head registry",
                                    code="unknown_head", status=404)
            vref = Registry(registry).resolve(name, ref)
            return load_head(vref.uri, cache_dir=cache, **limits)
        except RequestFailed:
            raise
        except LensError as e:
            if e.code in ("unknown_version", "registry"):
                raise RequestFailed(f"unknown head {head_id!r}", code="unknown_head", status=404) from None
            # what went wrong stays in the server's log: a message could name registry paths or file details
            logger.warning("head %r cannot be loaded: %s", head_id, e.message)
            status = e.http_status if e.http_status in (413, 504) else 404
            raise RequestFailed(f"head {head_id!r} cannot be loaded ({e.code})", code="unknown_head",
                                status=status) from None
        except Exception as e:  # noqa: BLE001 - logged, answered without server details
            logger.warning("head %r cannot be loaded: %s: %s", head_id, type(e).__name__, e)
            raise RequestFailed(f"head {head_id!r} cannot be loaded", code="unknown_head", status=404) from None

    # -- live knobs --------------------------------------------------------------------------
    def reconfigure(self, user_config: dict) -> None:
        # both bounds of max_batch_size are checked before deploying (BatchingConfig, lens.serve.run.check_serve_config)
        batching = validate(BatchingConfig, user_config or {}, where="user_config")
        self._run_batch.set_max_batch_size(batching.max_batch_size)
        self._limit = batching.max_batch_size  # the size at which the next batch closes (see batch_limit)
        self._run_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        for slot in self.routing.slots():
            slot.predictor.max_batch_size = batching.max_batch_size
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
        r = self.routing
        versions = {} if self.watcher is None else {"versions": {
            "registry": self.cfg.versions.registry, "model": self.cfg.versions.model,
            "stable": r.stable.label, "canary": r.canary.label if r.canary else None, "weight": r.weight,
            "shadow": r.shadow, "previous": r.previous.label if r.previous else None,
            "refused": dict(self.watcher.failed)}}
        drift = {} if self.drift_metrics is None else {"drift": {
            label: {"window": mon.filled, "last": mon.last.to_dict() if mon.last else None}
            for label, mon in self._monitors.values() if mon is not None}}
        return self.predictor.info() | versions | drift | {
            "version": r.stable.label,
            "pool": self.cfg.name,
            "nice": self.nice,
            "replica": self._replica,
            "cold_start_s": round(self.cold_start_s, 3),
            "ready_at": self.ready_at,
            "batching": self.batching.model_dump(),
            "concurrent_batches": self.lanes,
            "model_threads": self._model_cfg.num_threads,
        }

    def vocabulary(self) -> dict:
        """Every class name this pool can answer (its versions' models, their packages' and heads') and the
        versions it holds: the only strings feedback metrics use as label values."""
        labels: set = set()
        versions: set = set()
        for slot in self.routing.slots():
            p = slot.predictor
            labels |= set(p.model.labels) | {lab for h in p.heads for lab in h.labels}
            if slot.label:
                versions.add(slot.label)
        return {"labels": sorted(labels), "versions": sorted(versions)}

    async def tag(self, data: bytes, top_k: int = 5, embedding: bool = False, identity: dict | None = None,
                  custom_top_k: int | None = None) -> dict:
        """Tag one image: ``{"tags", "version", ["custom_tags"], ["embedding", "model_identity"]}``. ``identity``
        (search): embed with the loaded version whose embeddings are comparable with it. ``custom_top_k``: each
        custom classifier's K best classes, marked passed or not (default: the pool's ``model.custom_top_k``, else
        the classes at or above their thresholds). Raises
        :class:`OverloadedError` (queue full), the image's own error (a :class:`RequestFailed` with its code and
        status) or :class:`ModelError`."""
        if self._in_flight >= self.batching.max_pending:
            self._overloaded += 1
            self.metrics.errors.inc(tags={"kind": "overloaded"})
            raise OverloadedError(f"replica is at max_pending={self.batching.max_pending} images; retry later")
        self.input_metrics.bytes.observe(len(data), tags={"format": sniff_format(data[:64]) or "unknown"})
        routing = self.routing
        if identity is not None:
            slot, mirror = routing.for_identity(identity), None
            if slot is None:
                raise RequestFailed("the index was built with a model version this pool no longer holds "
                                    f"({identity.get('version') or identity.get('weights_sha256', '?')[:12]}); "
                                    "rebuild the index with the serving version", code="model_mismatch",
                                    status=409)
        else:
            slot, mirror = route(data, routing)
        head_id = serve.get_multiplexed_model_id() if self._multiplexed() else ""
        head = await self._get_head(head_id) if head_id else None
        self._in_flight += 1  # its gauge is set by _housekeeping every second, off the request path
        t0 = time.perf_counter()
        failed = False
        try:
            logits, emb = await self._model_call(slot, data)
            out: dict = {"tags": [t.to_dict() for t in top_k_tags(logits[None], slot.predictor.model.labels,
                                                                  top_k)[0]],
                         "model": slot.identity.model, "version": slot.label}
            custom = slot.predictor.custom_tags(emb[None], logits[None], custom_top_k)
            if head is not None:
                diff = head.backbone.mismatch(slot.identity)
                if diff:
                    raise RequestFailed(f"head {head_id!r} was trained on another backbone than {slot.label or slot.identity.model} "
                                        f"(differs in {', '.join(diff)})", code="head_backbone_mismatch", status=409)
                custom = [dict(custom[0] if custom else {},
                               **{head.name: head.tags(emb[None], custom_top_k or slot.predictor.custom_top_k)[0]})]
                out["head"] = {"id": head_id, "name": head.name, "sha256": head.sha256}
            if custom is not None:
                out["custom_tags"] = custom[0]
            if embedding:
                out["embedding"] = emb
                out["model_identity"] = slot.identity.to_dict()
            # shadow work is shed first: a replica past half its queue bound answers, but mirrors nothing
            if mirror is not None and self._in_flight < self.batching.max_pending // 2:
                self._shadow(data, slot, mirror, out["tags"], emb, top_k)
            if self._drift_profile is not None and identity is None:  # search queries are not traffic
                mon = self._monitor(slot)
                if mon is not None:
                    mon.add(emb, out["tags"][0]["label"])
            return out
        except ModelError:
            failed = True
            raise
        finally:
            self._in_flight -= 1
            if slot.ref is not None:
                ms = (time.perf_counter() - t0) * 1000
                self.version_stats.request(slot.ref.version, ms, failed)
                self.version_metrics.request(slot.label, ms, failed)

    async def tag_many(self, items: list[bytes], top_k: int = 5, embedding: bool = False) -> list:
        """:meth:`tag` for several images in one call, each answered on its own: its result, or its error as an
        exception object (never raised for one image). The event consumer sends a poll's images this way, one
        handle call instead of one per image; they still join this replica's batches one by one."""
        return list(await asyncio.gather(*(self.tag(d, top_k, embedding) for d in items), return_exceptions=True))

    def _multiplexed(self) -> bool:
        try:
            serve.get_replica_context()
            return True
        except Exception:  # noqa: BLE001 - outside Serve (unit tests): no per-request heads
            return False

    async def _model_call(self, slot: Slot, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Decode on the thread pool, then join a batch of the same version: (logits, embedding) of one image."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        self._decoding += 1
        try:
            prepared = (await loop.run_in_executor(self._decode_pool, slot.predictor.prepare_many, [data]))[0]
        finally:
            self._decoding -= 1
        self.metrics.decode.observe((time.perf_counter() - t0) * 1000)
        if isinstance(prepared, ItemError):
            self.metrics.errors.inc(tags={"kind": prepared.code})
            raise prepared.to_error()
        # Adaptive wait: hold a batch open for up to batch_wait_timeout_s only while other images are
        # still decoding and will join it; a lone request goes to the model at once. And an adaptive size: the
        # batch closes once it holds what the replica has (see batch_limit), not at the timeout.
        wait = self.batching.batch_wait_timeout_s if self._decoding else 0.0
        self._dispatched["held_open" if wait else "at_once"] += 1
        self._queued += 1
        self._run_batch.set_batch_wait_timeout_s(wait)
        limit = batch_limit(self.batching.max_batch_size, self.lanes, self._running, self._queued + self._decoding)
        if limit != self._limit:  # Serve checks its bounds (and may log) on every set
            self._run_batch.set_max_batch_size(limit)
            self._limit = limit
        started = [False]  # set when its batch starts (it leaves the count of queued images then)
        try:
            result = await self._run_batch((prepared, time.perf_counter(), slot, started))
        except Exception as e:  # noqa: BLE001 - a failed model call fails its batch, never the replica
            logger.exception("model batch failed")
            self.metrics.errors.inc(tags={"kind": "model_error"})
            raise ModelError(f"{type(e).__name__}: {e}") from None
        finally:
            if not started[0]:  # cancelled (its client went away) before any batch took it
                self._queued -= 1
        if isinstance(result, ModelError):
            self.metrics.errors.inc(tags={"kind": "model_output_not_finite"})
            raise result
        return result

    def _shadow(self, data: bytes, slot: Slot, mirror: Slot, tags: list, emb: np.ndarray, top_k: int) -> None:
        """Run the image on the other version in the background and record how far the two agree (counted under
        the non-stable version). The answer has already gone; a failure here is counted, never raised."""
        candidate = mirror if slot is self.routing.stable else slot

        async def compare() -> None:
            try:
                logits2, emb2 = await self._model_call(mirror, data)
            except Exception as e:  # noqa: BLE001 - the mirror's failure is the candidate's error, not the caller's
                if mirror is candidate and candidate.ref is not None:
                    self.version_stats.request(candidate.ref.version, 0.0, True)
                logger.warning("shadow request on %s failed: %s", mirror.label, e)
                return
            tags2 = [t.to_dict() for t in top_k_tags(logits2[None], mirror.predictor.model.labels, top_k)[0]]
            a = agreement(tags, tags2, emb, emb2)
            if candidate.ref is not None:
                self.version_stats.pair(candidate.ref.version, a)
                self.version_metrics.pair(candidate.label, a)

        task = asyncio.get_running_loop().create_task(compare())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _batch(self, items: list[tuple[np.ndarray, float, Slot, list]]) -> list:
        """One batch formed by Serve's queue (``_run_batch``), at most ``concurrent_batches`` of them at once: one
        model call per version present in the batch; per item (logits, embedding), or a :class:`ModelError` for an
        item whose outputs are not finite (a diverged checkpoint)."""
        for item in items:
            item[3][0] = True
        self._queued -= len(items)
        self._running += 1  # it holds one of Serve's concurrent-batch slots from here (a lane, in batch_limit)
        self._max_running = max(self._max_running, self._running)
        try:
            await self._model_gate.wait()
            return await self._on_model(items)
        finally:
            self._running -= 1

    async def _on_model(self, items: list[tuple[np.ndarray, float, Slot, list]]) -> list:
        start = time.perf_counter()
        for _, enqueued, _, _ in items:
            self.metrics.queue_wait.observe((start - enqueued) * 1000)
        self.metrics.batch_size.observe(len(items))
        self._batches += 1
        self._images += len(items)
        self._max_batch_seen = max(self._max_batch_seen, len(items))
        self._recent_batches.append(len(items))
        loop = asyncio.get_running_loop()
        out: list = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (_, _, slot, _) in enumerate(items):
            groups.setdefault(id(slot), []).append(i)
        for idx in groups.values():
            predictor = items[idx[0]][2].predictor
            batch = np.stack([items[i][0] for i in idx])
            logits, emb = await loop.run_in_executor(self._model_threads, predictor.infer, batch)
            ok = np.isfinite(logits).all(axis=1) & np.isfinite(emb).all(axis=1)
            for j, i in enumerate(idx):
                out[i] = (logits[j], emb[j]) if ok[j] else ModelError(
                    f"the model ({items[i][2].label or predictor.name}) produced non-finite outputs for this image")
        self.metrics.model.observe((time.perf_counter() - start) * 1000)
        return out

    def stats(self) -> dict:
        """Counters of this replica since start (also in the Prometheus metrics): for tests and debugging."""
        return {"pid": os.getpid(), "batches": self._batches, "images": self._images,
                "max_batch_seen": self._max_batch_seen, "in_flight": self._in_flight, "decoding": self._decoding,
                "overloaded": self._overloaded, "held": not self._model_gate.is_set(),
                "recent_batch_sizes": list(self._recent_batches), "dispatch": dict(self._dispatched),
                "concurrent_batches": self.lanes, "max_concurrent_seen": self._max_running,
                "batching": self.batching.model_dump()}

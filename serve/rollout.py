"""Automatic canary rollouts: the judge (a pure function) and the controller deployment that applies it.

Every replica of a versioned pool reports its cumulative per-version counters (:class:`lens.serve.versions.
VersionStats`) and refused loads to one :class:`RolloutController` replica. Every ``eval_interval_s`` the
controller sums the replicas' increments into two windows for each model with a running rollout: the last
interval and the current step so far, and asks :func:`judge`:

* **rollback** at once when the canary failed to load on any replica, or, in either window with enough canary
  requests, its 5xx rate passes ``max_error_rate``, its p95 latency passes ``max_p95_ratio`` times the stable
  version's (and ``min_p95_delta_ms`` more), or its shadow agreement with stable (top-1) falls below
  ``min_top1_agreement``;
* **advance** to the plan's next weight once the step has baked ``bake_s`` with ``min_requests`` canary requests
  (and, when the rollout mirrors a shadow share, ``min_shadow_pairs`` compared answers: agreement is judged
  before any step passes, never skipped) and no breach; after the last step (100 %), **promote**: ``stable`` := the canary's version;
* otherwise **hold**.

A report that shows new canary errors or a refused load wakes the controller before its interval, so a failing
canary is judged within about a second of its first errors. Decisions are written to the registry (aliases,
``rollout.json``, the history), so replicas act on them within their ``poll_s``; each is logged with its numbers and exported as metrics. The registry is the only state: a
restarted controller picks the rollout up where it stands.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from ray import serve

from lens.registry.store import Registry
from lens.runtime.config import validate

from .config import RolloutConfig
from .logs import to_replica_log
from .metrics import RolloutMetrics
from .versions import LATENCY_BOUNDS_MS

__all__ = ["Window", "Decision", "judge", "RolloutController", "p95_ms"]

logger = logging.getLogger("lens.rollout")


def p95_ms(hist: list[int]) -> float | None:
    """The 95th percentile of a :data:`LATENCY_BOUNDS_MS` histogram (its bucket's upper bound)."""
    n = sum(hist)
    if not n:
        return None
    i = int(np.searchsorted(np.cumsum(hist), 0.95 * n))
    return float(LATENCY_BOUNDS_MS[i]) if i < len(LATENCY_BOUNDS_MS) else float(LATENCY_BOUNDS_MS[-1] * 2)


@dataclass
class Window:
    """Summed per-version counters over some span."""

    versions: dict = field(default_factory=dict)

    def add(self, version: str, delta: dict) -> None:
        e = self.versions.setdefault(version, {"requests": 0, "errors": 0, "latency": [0] * (len(LATENCY_BOUNDS_MS)
                                                                                            + 1),
                                               "pairs": 0, "top1": 0.0, "overlap": 0.0, "cosine": 0.0})
        for k in ("requests", "errors", "pairs", "top1", "overlap", "cosine"):
            e[k] += delta.get(k, 0)
        e["latency"] = [a + b for a, b in zip(e["latency"], delta.get("latency", []))]

    def summary(self, version: str | None) -> dict:
        e = self.versions.get(version) if version else None
        if not e:
            return {"requests": 0, "errors": 0, "error_rate": None, "p95_ms": None, "pairs": 0,
                    "top1_agreement": None, "overlap": None, "cosine": None}
        n, p = e["requests"], e["pairs"]
        return {"requests": n, "errors": e["errors"], "error_rate": round(e["errors"] / n, 4) if n else None,
                "p95_ms": p95_ms(e["latency"]), "pairs": p,
                "top1_agreement": round(e["top1"] / p, 4) if p else None,
                "overlap": round(e["overlap"] / p, 4) if p else None,
                "cosine": round(e["cosine"] / p, 4) if p else None}


@dataclass
class Decision:
    action: str  # hold | advance | promote | rollback
    reason: str
    numbers: dict

    def to_dict(self) -> dict:
        return {"action": self.action, "reason": self.reason, "numbers": self.numbers, "at": time.time()}


def _breach(canary: dict, stable: dict, stable_p95: float | None, cfg: RolloutConfig) -> str | None:
    if canary["requests"] >= cfg.min_requests and canary["error_rate"] is not None \
            and canary["error_rate"] > cfg.max_error_rate:
        return f"canary 5xx rate {canary['error_rate']:.3f} > {cfg.max_error_rate}"
    ref = stable["p95_ms"] or stable_p95
    if canary["requests"] >= cfg.min_requests and canary["p95_ms"] is not None and ref is not None \
            and canary["p95_ms"] > cfg.max_p95_ratio * ref and canary["p95_ms"] - ref > cfg.min_p95_delta_ms:
        return f"canary p95 {canary['p95_ms']:.0f} ms > {cfg.max_p95_ratio} x stable {ref:.0f} ms"
    if canary["pairs"] >= cfg.min_shadow_pairs and canary["top1_agreement"] is not None \
            and canary["top1_agreement"] < cfg.min_top1_agreement:
        return f"canary top-1 agreement with stable {canary['top1_agreement']:.3f} < {cfg.min_top1_agreement}"
    return None


def judge(state: dict, last: Window, step: Window, failures: dict[str, str], cfg: RolloutConfig, *,
          now: float, stable_p95: float | None = None) -> Decision:
    """What to do with a running rollout (see the module docstring). ``failures``: version -> why it was refused
    at load on some replica."""
    canary_v, stable_v = state["canary"], state["stable"]
    nums = {"weight": state["weight"], "step": state["step"],
            "last": {"canary": last.summary(canary_v), "stable": last.summary(stable_v)},
            "step_window": {"canary": step.summary(canary_v), "stable": step.summary(stable_v)}}
    if canary_v in failures:
        return Decision("rollback", f"canary {canary_v} failed to load: {failures[canary_v]}", nums)
    for name in ("last", "step_window"):
        why = _breach(nums[name]["canary"], nums[name]["stable"], stable_p95, cfg)
        if why:
            return Decision("rollback", why, nums)
    steps = state.get("steps") or []
    baked = now - state.get("step_started", now) >= state.get("bake_s", 0)
    sw = nums["step_window"]["canary"]
    enough_requests = sw["requests"] >= cfg.min_requests
    enough_pairs = not state.get("shadow") or sw["pairs"] >= cfg.min_shadow_pairs
    if steps and baked and enough_requests and enough_pairs:
        if state["step"] + 1 < len(steps):
            return Decision("advance", f"step {state['step']} healthy for {state['bake_s']:g}s", nums)
        if steps[-1] >= 100:
            return Decision("promote", f"healthy at {steps[-1]:g}% for {state['bake_s']:g}s", nums)
    wait = ("baking" if not baked else f"waiting for {cfg.min_requests} canary requests" if not enough_requests
            else f"waiting for {cfg.min_shadow_pairs} shadow pairs" if not enough_pairs else "manual")
    return Decision("hold", wait, nums)


@serve.deployment(name="RolloutController", num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
class RolloutController:
    """Collects the versioned pools' reports and drives running rollouts (one replica; state in the registry)."""

    def __init__(self, models: list[dict], rollout: dict | None = None) -> None:
        to_replica_log()
        self.cfg = validate(RolloutConfig, rollout or {}, where="rollout config")
        self.models = {(m["registry"], m["model"]): Registry(m["registry"]) for m in models}
        self._reports: dict[tuple, dict] = {}  # (registry, model, replica) -> {"at", "stats", "failures"}
        self._seen: dict[tuple, dict] = {}  # same key -> the stats at the last evaluation
        self._step_windows: dict[tuple, Window] = {}
        self._step_key: dict[tuple, tuple] = {}
        self._stable_p95: dict[tuple, float] = {}
        self.metrics = RolloutMetrics()
        self.decisions: list[dict] = []
        self._canary: dict[tuple, str] = {}
        self._last_rollback: dict[tuple, float] = {}  # (registry, model) -> the running rollout's canary version
        self._wake: asyncio.Event | None = None
        self._task = None

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def report(self, registry: str, model: str, replica: str, stats: dict, failures: dict) -> None:
        self._ensure_loop()
        key = (registry, model, replica)
        before = (self._reports.get(key) or {}).get("stats", {})
        self._reports[key] = {"at": time.time(), "stats": stats, "failures": failures}
        canary = self._canary.get((registry, model))
        if canary and (canary in failures or
                       stats.get(canary, {}).get("errors", 0) > before.get(canary, {}).get("errors", 0)):
            self._wake.set()  # a failing canary is judged now, not at the next interval

    async def status(self) -> dict:
        self._ensure_loop()
        return {"decisions": self.decisions[-50:], "replicas": len(self._reports)}

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.cfg.eval_interval_s)
                await asyncio.sleep(0.25)  # let the other replicas' reports of the same moment arrive
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            for key, reg in self.models.items():
                try:
                    await asyncio.to_thread(self.evaluate, key, reg)
                except Exception:  # noqa: BLE001 - one model's trouble never stops the others
                    logger.exception("rollout evaluation of %s failed", key[1])

    def _windows(self, key: tuple) -> tuple[Window, dict]:
        """The increments since the last evaluation, and refused loads, over fresh replicas of ``key``."""
        last, failures, now = Window(), {}, time.time()
        for rkey, rep in list(self._reports.items()):
            if rkey[:2] != key:
                continue
            if now - rep["at"] > self.cfg.stale_after_s:
                self._reports.pop(rkey, None)
                self._seen.pop(rkey, None)
                continue
            before = self._seen.get(rkey, {})
            for version, cur in rep["stats"].items():
                prev = before.get(version)
                delta = {k: cur[k] - (prev[k] if prev else 0) for k in ("requests", "errors", "pairs", "top1",
                                                                         "overlap", "cosine")}
                delta["latency"] = [a - b for a, b in zip(cur["latency"], prev["latency"] if prev else
                                                          [0] * len(cur["latency"]))]
                last.add(version, delta)
            self._seen[rkey] = rep["stats"]
            failures.update(rep["failures"])
        return last, failures

    def evaluate(self, key: tuple, reg: Registry) -> Decision | None:
        last, failures = self._windows(key)
        state = reg.rollout(key[1])
        name = key[1]
        stable_now = last.summary(state["stable"] if state else None)["p95_ms"]
        if stable_now is not None:
            self._stable_p95[key] = stable_now
        if key in self._last_rollback:  # gauges are set again every evaluation, or Ray drops them
            self.metrics.last_rollback.set(self._last_rollback[key], tags={"model": name})
        if not state or state.get("status") != "running":
            self._canary.pop(key, None)
            self.metrics.step.set(-1, tags={"model": name})
            return None
        self._canary[key] = state["canary"]
        step_id = (state["canary"], state["step"], state.get("step_started"))
        if self._step_key.get(key) != step_id:
            self._step_key[key] = step_id
            self._step_windows[key] = Window()
        step = self._step_windows[key]
        for version, e in last.versions.items():
            step.add(version, e)
        d = judge(state, last, step, failures, self.cfg, now=time.time(), stable_p95=self._stable_p95.get(key))
        canary = d.numbers["step_window"]["canary"]
        tags = {"model": name, "version": state["canary"]}
        self.metrics.step.set(state["step"], tags={"model": name})
        self.metrics.weight.set(state["weight"], tags=tags)
        if canary["top1_agreement"] is not None:
            self.metrics.agreement.set(canary["top1_agreement"], tags=tags)
        if canary["error_rate"] is not None:
            self.metrics.error_rate.set(canary["error_rate"], tags=tags)
        if d.action != "hold":
            self._apply(reg, name, state, d)
        return d

    def _apply(self, reg: Registry, name: str, state: dict, d: Decision) -> None:
        by = "lens rollout controller"
        logger.warning("rollout of %s@%s: %s (%s); numbers %s", name, state["canary"], d.action, d.reason,
                       d.numbers)
        self.metrics.decisions.inc(tags={"model": name, "decision": d.action})
        record = d.to_dict() | {"model": name, "canary": state["canary"]}
        self.decisions.append(record)
        if d.action == "rollback":
            self._last_rollback[(reg.root, name)] = time.time()
            self.metrics.last_rollback.set(self._last_rollback[(reg.root, name)], tags={"model": name})
            reg.update_rollout(name, dict(state, last_decision=record), action="decision", by=by, why=d.reason,
                               decision=record)
            reg.rollback(name, by=by, why=d.reason)
            self.metrics.weight.set(0, tags={"model": name, "version": state["canary"]})
        elif d.action == "promote":
            reg.update_rollout(name, dict(state, last_decision=record), action="decision", by=by, why=d.reason,
                               decision=record)
            reg.promote(name, state["canary"], by=by, why=d.reason)
            self.metrics.weight.set(0, tags={"model": name, "version": state["canary"]})
        elif d.action == "advance":
            step = state["step"] + 1
            new = dict(state, step=step, weight=state["steps"][step], step_started=time.time(), last_decision=record)
            reg.update_rollout(name, new, action="decision", by=by, why=d.reason, decision=record)
            self.metrics.weight.set(new["weight"], tags={"model": name, "version": state["canary"]})

"""Model versions inside a pool replica: which versions are loaded, and which one a request meets.

A pool with ``versions:`` names a model in the registry (:mod:`lens.registry.store`) instead of fixed weights. Each
replica runs a :class:`VersionWatcher` thread that reads the registry's routing (stable and canary aliases, the
canary weight and shadow share of a running rollout) every ``poll_s``, loads a version it does not hold yet
**beside** the ones serving (checksums and identity verified, then warmed up) and swaps the :class:`Routing`
snapshot in one assignment: requests never wait for a load and never meet a half-loaded model. A version that
fails to load is refused (a log line naming the file, a metric, and a report to the rollout controller, which
rolls the canary back); the replica keeps serving what it has.

Routing is sticky per image: the first 8 bytes of the image's BLAKE2b digest pick a bucket in 0..9999, and the
canary takes the buckets below ``weight * 100``; so the same image meets the same version while the weight
stands, and an image on the canary stays there as the weight rises. Another slice of the digest decides
whether the request is mirrored to the other version (shadow): answered from its own version, compared in
the background (top-1, tag-set overlap, embedding cosine).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from pydantic import Field, PositiveFloat

from lens.errors import ConfigError, LensError
from lens.identity import ModelIdentity
from lens.registry.store import CANARY, STABLE, Registry, VersionRef
from lens.runtime.config import ModelConfig, StrictModel
from lens.runtime.predictor import Predictor

__all__ = ["VersionsConfig", "Slot", "Routing", "VersionWatcher", "route", "agreement", "VersionStats",
           "LATENCY_BOUNDS_MS", "config_for_version"]

logger = logging.getLogger("lens.serve")

#: Latency histogram bounds (ms) of the per-version windows the rollout controller judges.
LATENCY_BOUNDS_MS = (5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000, 10000, 30000)


class VersionsConfig(StrictModel):
    """A pool serving a registry model by alias (``stable``), with a canary taken from the registry's rollout."""

    registry: str = Field(..., description="registry root (local directory or s3://bucket/prefix)")
    model: str = Field(..., description="model name in the registry")
    stable: str = Field(STABLE, description="alias (or a fixed version) that answers by default")
    canary: str | None = Field(CANARY, description="alias of the candidate that a running rollout sends a share "
                               "of traffic to; None: this pool never serves a canary")
    poll_s: PositiveFloat = Field(2.0, le=300, description="how often a replica reads the aliases and the rollout "
                                  "state (a moved alias is served within about this, plus the load time)")
    keep_previous: bool = Field(True, description="keep the previous stable version loaded after an alias moves, "
                                "for search queries against an index built with it (until the next move)")


@dataclass
class Slot:
    """One loaded version."""

    ref: VersionRef | None  # None: a pool with fixed weights (no registry)
    predictor: Predictor
    identity: ModelIdentity = field(init=False)

    def __post_init__(self) -> None:
        self.identity = self.predictor.identity()

    @property
    def label(self) -> str | None:
        return self.ref.label if self.ref else None


@dataclass(frozen=True)
class Routing:
    """What requests are routed by; replaced whole, never mutated."""

    stable: Slot
    canary: Slot | None = None
    weight: float = 0.0  # percent of traffic to the canary
    shadow: float = 0.0  # share of requests mirrored to the other version
    previous: Slot | None = None  # the stable before the last move (search against indexes built with it)

    def slots(self) -> list[Slot]:
        return [s for s in (self.stable, self.canary, self.previous) if s is not None]

    def for_identity(self, identity: dict) -> Slot | None:
        """The loaded version whose embeddings are comparable with ``identity`` (stable first), one in the same
        precision space (the same int8 model) before one in the other."""
        want = ModelIdentity.from_dict(identity)
        same = [s for s in self.slots() if not want.mismatch(s.identity)]
        return next((s for s in same if want.same_space(s.identity)), same[0] if same else None)


def _bucket(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def route(data: bytes, routing: Routing) -> tuple[Slot, Slot | None]:
    """The version that answers this image, and the one it is mirrored to (or None)."""
    canary = routing.canary
    if canary is None or (routing.weight <= 0 and routing.shadow <= 0):
        return routing.stable, None
    h = _bucket(data)
    slot = canary if (h % 10_000) < routing.weight * 100 else routing.stable
    mirror = None
    if routing.shadow > 0 and ((h >> 32) % 10_000) < routing.shadow * 10_000:
        mirror = routing.stable if slot is canary else canary
    return slot, mirror


def agreement(tags_a: list[dict], tags_b: list[dict], emb_a: np.ndarray, emb_b: np.ndarray) -> dict:
    """How far two versions agree on one image: same top-1, Jaccard of the top-k label sets, embedding cosine
    (embeddings are L2-normalised; different dimensions give cosine 0)."""
    a, b = [t["label"] for t in tags_a], [t["label"] for t in tags_b]
    top1 = float(bool(a and b and a[0] == b[0]))
    union = set(a) | set(b)
    overlap = len(set(a) & set(b)) / len(union) if union else 1.0
    cosine = float(np.dot(emb_a, emb_b)) if emb_a.shape == emb_b.shape else 0.0
    return {"top1": top1, "overlap": overlap, "cosine": cosine}


class VersionStats:
    """Cumulative per-version counters of one replica, reported to the rollout controller (which takes
    differences): requests, model errors (5xx), a latency histogram, and shadow agreement sums."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._v: dict[str, dict] = {}

    def _entry(self, version: str) -> dict:
        e = self._v.get(version)
        if e is None:
            e = self._v[version] = {"requests": 0, "errors": 0, "latency": [0] * (len(LATENCY_BOUNDS_MS) + 1),
                                    "pairs": 0, "top1": 0.0, "overlap": 0.0, "cosine": 0.0}
        return e

    def request(self, version: str, ms: float, error: bool) -> None:
        i = int(np.searchsorted(LATENCY_BOUNDS_MS, ms))
        with self._lock:
            e = self._entry(version)
            e["requests"] += 1
            e["errors"] += int(error)
            e["latency"][i] += 1

    def pair(self, version: str, agree: dict) -> None:
        """A shadow comparison; counted under the candidate (non-stable) version."""
        with self._lock:
            e = self._entry(version)
            e["pairs"] += 1
            for k in ("top1", "overlap", "cosine"):
                e[k] += agree[k]

    def snapshot(self) -> dict:
        with self._lock:
            return {v: dict(e, latency=list(e["latency"])) for v, e in self._v.items()}


def config_for_version(base: ModelConfig, vref: VersionRef, kind: str) -> ModelConfig:
    """The pool's model settings with a registry version's weights (``model``/``finetune``) or head added."""
    if kind == "head":
        return base.model_copy(update={"heads": tuple(base.heads) + (vref.uri,)})
    return base.model_copy(update={"weights": vref.uri})


class VersionWatcher:
    """Keeps a replica's :class:`Routing` in step with the registry (see the module docstring)."""

    def __init__(self, cfg: VersionsConfig, load: Callable[[VersionRef], Predictor], *,
                 on_load_failure: Callable[[str, str], None] | None = None,
                 on_change: Callable[[Routing], None] | None = None) -> None:
        self.cfg = cfg
        self.registry = Registry(cfg.registry)
        self._load = load
        self._on_load_failure = on_load_failure or (lambda version, why: None)
        self._on_change = on_change or (lambda routing: None)
        self.failed: dict[str, str] = {}  # version -> why it was refused (not retried until the registry moves)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.routing = self._initial()

    def _open(self, version: str) -> Slot:
        vref = self.registry.resolve(self.cfg.model, version)
        return Slot(vref, self._load(vref))

    def _initial(self) -> Routing:
        """The stable version, loaded before the replica takes traffic (a failure here fails the replica: there
        is nothing else to serve)."""
        want = self._wanted()
        stable = self._open(want["stable"])
        routing = Routing(stable=stable)
        if want["canary"]:
            try:
                routing = Routing(stable=stable, canary=self._open(want["canary"]), weight=want["weight"],
                                  shadow=want["shadow"])
            except Exception as e:  # noqa: BLE001 - a bad canary never stops the stable version serving
                self._refused(want["canary"], e)
        return routing

    def _wanted(self) -> dict:
        r = self.registry.routing(self.cfg.model)
        stable = r["stable"] if self.cfg.stable == STABLE else self.registry.resolve(self.cfg.model,
                                                                                     self.cfg.stable).version
        canary = r["canary"] if self.cfg.canary == CANARY else (
            self.registry.resolve(self.cfg.model, self.cfg.canary).version
            if self.cfg.canary and self.cfg.canary in self.registry.aliases(self.cfg.model) else None)
        if canary == stable:
            canary = None
        return {"stable": stable, "canary": canary, "weight": r["weight"] if canary else 0.0,
                "shadow": r["shadow"] if canary else 0.0}

    def _refused(self, version: str, e: Exception) -> None:
        why = e.message if isinstance(e, LensError) else f"{type(e).__name__}: {e}"
        self.failed[version] = why
        logger.error("version %s@%s refused at load; still serving %s: %s", self.cfg.model, version,
                     self.routing.stable.label if hasattr(self, "routing") else "nothing", why)
        self._on_load_failure(version, why)

    def _slot(self, version: str | None, current: Routing) -> Slot | None:
        """The loaded slot for ``version``: reused if loaded, else loaded now; None if absent or refused."""
        if version is None:
            return None
        for s in current.slots():
            if s.ref and s.ref.version == version:
                return s
        if version in self.failed:
            return None
        try:
            return self._open(version)
        except LensError as e:  # a corrupt or inconsistent package: refused until the registry names another
            self._refused(version, e)
        except Exception as e:  # noqa: BLE001 - transient (storage unreachable...): keep serving, retry next poll
            logger.warning("loading %s@%s failed, will retry: %s", self.cfg.model, version, e)
        return None

    def poll_once(self) -> bool:
        """Read the registry and move the routing if it changed; True when it did."""
        cur = self.routing
        try:
            want = self._wanted()
        except Exception as e:  # noqa: BLE001 - registry unreachable: keep serving, try again next poll
            logger.warning("registry %s not readable, routing unchanged: %s", self.cfg.registry, e)
            return False
        stable = self._slot(want["stable"], cur) or cur.stable  # a refused stable keeps the old one serving
        canary = self._slot(want["canary"], cur)
        previous = cur.previous
        if stable is not cur.stable and self.cfg.keep_previous:
            previous = cur.stable
        if previous is not None and previous in (stable, canary):
            previous = None
        new = Routing(stable=stable, canary=canary, weight=want["weight"] if canary else 0.0,
                      shadow=want["shadow"] if canary else 0.0, previous=previous)
        same = (new.stable is cur.stable and new.canary is cur.canary and new.weight == cur.weight
                and new.shadow == cur.shadow and new.previous is cur.previous)
        if same:
            return False
        self.routing = new  # one assignment: a request sees the old routing or the new one
        logger.info("routing of %s: stable %s, canary %s at %.1f%% (shadow %.0f%%)%s", self.cfg.model,
                    stable.label, canary.label if canary else "-", new.weight, new.shadow * 100,
                    f", previous {previous.label} kept for search" if previous else "")
        self._on_change(new)
        return True

    # -- the thread --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lens-versions", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.poll_s * random.uniform(0.8, 1.2)):  # jitter: replicas move apart
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failure
                logger.exception("version watcher poll failed")


def check_versions_model(model: ModelConfig) -> None:
    """A versioned pool takes its weights from the registry: fixed weights beside it are a mistake."""
    if model.weights is not None:
        raise ConfigError(f"a pool with versions: takes its weights from the registry; remove model.weights "
                          f"({model.weights})")

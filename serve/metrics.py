"""Operator metrics, exported on Ray's Prometheus endpoint through ``ray.serve.metrics``."""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

__all__ = ["IngressMetrics", "TaggerMetrics", "VersionMetrics", "RolloutMetrics", "DriftMetrics", "FeedbackMetrics",
           "EventMetrics"]

_LATENCY_MS = [1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000, 10000, 30000]
_STAGE_MS = [0.5, 1, 2, 3, 5, 8, 12, 20, 35, 50, 75, 100, 200, 500, 1000, 5000]
_BATCH = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256]


class IngressMetrics:
    def __init__(self) -> None:
        self.latency = Histogram(
            "lens_request_latency_ms", description="End-to-end request latency at the ingress.",
            boundaries=_LATENCY_MS, tag_keys=("route", "status"),
        )
        self.errors = Counter(
            "lens_request_errors_total", description="Requests that ended in an error, by kind.",
            tag_keys=("route", "kind"),
        )


class TaggerMetrics:
    """Per-replica metrics; Ray Serve adds the ``deployment`` (= pool), ``replica`` and ``application`` tags."""

    def __init__(self) -> None:
        self.batch_size = Histogram("lens_batch_size", description="Images per model call.", boundaries=_BATCH)
        self.queue_wait = Histogram(
            "lens_queue_wait_ms", description="Time a prepared image waits for its batch to start.",
            boundaries=_STAGE_MS)
        self.decode = Histogram("lens_decode_ms", description="Decode + preprocess time per image.",
                                boundaries=_STAGE_MS)
        self.model = Histogram("lens_model_ms", description="Model time per batch.", boundaries=_STAGE_MS)
        self.errors = Counter("lens_image_errors_total", description="Images rejected by the model pool, by kind.",
                              tag_keys=("kind",))
        self.cold_start = Gauge("lens_replica_cold_start_seconds",
                                description="Construct + load + warm-up time of a replica.")
        self.in_flight = Gauge("lens_replica_in_flight",
                               description="Requests inside this replica (decoding or waiting for a batch), sampled "
                               "every second.")
        self.int8_fallback = Gauge("lens_int8_fallback",
                                   description="1 when the pool asked for int8 but the accuracy gate refused it and "
                                   "fp32 serves; else 0.")


class VersionMetrics:
    """Per-version series of a pool serving registry versions (``version`` = ``name@version``)."""

    def __init__(self) -> None:
        self.errors = Counter("lens_version_errors_total", description="Model failures (5xx), by model version.",
                              tag_keys=("version",))
        self.latency = Histogram("lens_version_latency_ms", description="Decode + queue + model time per image, by "
                                 "model version (its _count: images answered).", boundaries=_LATENCY_MS,
                                 tag_keys=("version",))
        self.loads = Counter("lens_version_loads_total", description="Version loads by outcome (loaded, refused: "
                             "a corrupt or inconsistent package).", tag_keys=("version", "outcome"))
        self.role = Gauge("lens_version_serving", description="1 for each version a replica serves, by role "
                          "(stable, canary, previous); the canary's weight is lens_version_canary_weight.",
                          tag_keys=("version", "role"))
        self.weight = Gauge("lens_version_canary_weight", description="Percent of this replica's traffic routed to "
                            "the canary version.", tag_keys=("version",))
        self.agreement = Gauge("lens_version_shadow_agreement", description="Last shadow comparison's agreement of a "
                               "candidate version with stable, by measure (top1, overlap, cosine), smoothed.",
                               tag_keys=("version", "measure"))
        self._ema: dict = {}

    def request(self, version: str, ms: float, failed: bool) -> None:
        self.latency.observe(ms, tags={"version": version})
        if failed:
            self.errors.inc(tags={"version": version})

    def pair(self, version: str, agree: dict) -> None:
        for measure, value in agree.items():
            key = (version, measure)
            self._ema[key] = value if key not in self._ema else 0.95 * self._ema[key] + 0.05 * value
            self.agreement.set(self._ema[key], tags={"version": version, "measure": measure})

    def refresh(self, routing) -> None:
        """Set the gauges of the versions ``routing`` holds (Ray drops a gauge not set for ~20 s, so a version
        no longer loaded leaves the dashboard by itself)."""
        roles = (("stable", routing.stable), ("canary", routing.canary), ("previous", routing.previous))
        loaded = {s.label for _, s in roles if s is not None and s.label}
        for role, s in roles:
            if s is not None and s.label:
                self.role.set(1, tags={"version": s.label, "role": role})
        if routing.canary is not None and routing.canary.label:
            self.weight.set(routing.weight, tags={"version": routing.canary.label})
        for (version, measure), value in list(self._ema.items()):
            if version in loaded:
                self.agreement.set(value, tags={"version": version, "measure": measure})


class RolloutMetrics:
    """The rollout controller's view of running rollouts (one series per model)."""

    def __init__(self) -> None:
        self.weight = Gauge("lens_rollout_canary_weight", description="Percent of traffic sent to the canary.",
                            tag_keys=("model", "version"))
        self.step = Gauge("lens_rollout_step", description="Index of the rollout plan's current step (-1: none).",
                          tag_keys=("model",))
        self.decisions = Counter("lens_rollout_decisions_total", description="Rollout decisions taken (advance, "
                                 "promote, rollback).", tag_keys=("model", "decision"))
        self.last_rollback = Gauge("lens_rollout_last_rollback_timestamp_seconds",
                                   description="When the controller last rolled a canary back (0: never).",
                                   tag_keys=("model",))
        self.agreement = Gauge("lens_rollout_canary_agreement", description="Canary top-1 agreement with stable "
                               "over the current step's shadow pairs.", tag_keys=("model", "version"))
        self.error_rate = Gauge("lens_rollout_canary_error_rate", description="Canary 5xx rate over the current "
                                "step.", tag_keys=("model", "version"))


_BYTES = [1_000, 10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000, 10_000_000, 30_000_000]


class InputMetrics:
    """What arrives: encoded size by sniffed format (input telemetry: a shift in inputs shows here first)."""

    def __init__(self) -> None:
        self.bytes = Histogram("lens_input_bytes", description="Encoded image size by sniffed format (unknown: "
                               "not an accepted image).", boundaries=_BYTES, tag_keys=("format",))


class DriftMetrics:
    """Online drift tests of a pool's replicas, per model version."""

    def __init__(self) -> None:
        self.p_value = Gauge("lens_drift_p_value", description="p-value of the last drift test (overall, embedding, "
                             "classes).", tag_keys=("version", "test"))
        self.distance = Gauge("lens_drift_distance", description="Effect size of the last drift test: largest "
                              "per-component KS distance (ks_max) and class PSI (psi).", tag_keys=("version", "measure"))
        self.window = Gauge("lens_drift_window_images", description="Images in the drift window.",
                            tag_keys=("version",))
        self.detected = Gauge("lens_drift_detected", description="1 when the last drift test found drift.",
                              tag_keys=("version",))
        self.tests = Counter("lens_drift_tests_total", description="Drift tests run, by result (drift, ok).",
                             tag_keys=("version", "result"))
        self._last: dict = {}

    def record(self, version: str, result, window: int) -> None:
        self._last[version] = (result, window)
        self.tests.inc(tags={"version": version, "result": "drift" if result.drift else "ok"})
        self.refresh()

    def refresh(self) -> None:
        for version, (r, window) in list(self._last.items()):
            for test, p in (("overall", r.p_value), ("embedding", r.p_embedding), ("classes", r.p_classes)):
                self.p_value.set(p, tags={"version": version, "test": test})
            self.distance.set(r.ks_max, tags={"version": version, "measure": "ks_max"})
            self.distance.set(r.psi, tags={"version": version, "measure": "psi"})
            self.window.set(window, tags={"version": version})
            self.detected.set(1 if r.drift else 0, tags={"version": version})


_LAG_S = [1, 10, 60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400]


#: The label value of everything a metric does not know (client strings outside the served vocabulary)
OTHER = "other"


class FeedbackMetrics:
    """Labeled feedback: top-1 accuracy and per-class counts by model version, and label lag."""

    def __init__(self) -> None:
        self.items = Counter("lens_feedback_total", description="Feedback items by model version and outcome "
                             "(correct: the predicted top-1 is a true label).", tag_keys=("version", "outcome"))
        self.classes = Counter("lens_feedback_class_total", description="Per-class outcomes of feedback (tp, fp, fn "
                               "of the top-1 prediction), by model version.", tag_keys=("version", "label", "kind"))
        self.lag = Histogram("lens_feedback_label_lag_s", description="Time from an answer to its label arriving.",
                             boundaries=_LAG_S)

    def count(self, rows: list[dict], vocabulary: dict | None = None) -> None:
        """Count feedback rows. Labels and versions are clients' strings: only those in ``vocabulary`` (the
        served models' and heads' class names, the loaded versions) become label values; any other is counted as
        ``other``, so a client cannot grow the number of series (the cardinality is bounded by the classes)."""
        labels = (vocabulary or {}).get("labels") or set()
        versions = (vocabulary or {}).get("versions") or set()

        def known(value: str | None, allowed: set, missing: str) -> str:
            return missing if value is None else value if value in allowed else OTHER

        for r in rows:
            version = known(r.get("version"), versions, "unknown")
            top1 = known(r["predicted"][0], labels, OTHER)
            truth = {known(t, labels, OTHER) for t in r["labels"]}
            self.items.inc(tags={"version": version, "outcome": "correct" if top1 in truth else "wrong"})
            self.classes.inc(tags={"version": version, "label": top1, "kind": "tp" if top1 in truth else "fp"})
            for t in truth - {top1}:
                self.classes.inc(tags={"version": version, "label": t, "kind": "fn"})
            if r.get("predicted_at"):
                self.lag.observe(max(0.0, r["received_at"] - r["predicted_at"]))


_AGE_S = [0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]


class EventMetrics:
    """The event consumer: backlog, DLQ, message age at receipt, outcomes, poll loops."""

    def __init__(self) -> None:
        self.visible = Gauge("lens_events_queue_visible", description="Messages waiting in the SQS queue.")
        self.in_flight = Gauge("lens_events_queue_in_flight", description="Messages received, not yet deleted.")
        self.dlq = Gauge("lens_events_dlq_depth", description="Messages in the dead-letter queue.")
        self.age = Histogram("lens_events_message_age_s", description="Time from S3 event to its receipt.",
                             boundaries=_AGE_S)
        self.outcomes = Counter("lens_events_processed_total", description="Event outcomes (tagged, duplicate, "
                                "skipped_*, failed).", tag_keys=("outcome",))
        self.pollers = Gauge("lens_events_pollers", description="Concurrent poll loops.")

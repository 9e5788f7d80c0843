#!/usr/bin/env python
"""Writes infra/grafana/lens-dashboard.json (run after changing a panel; the JSON is committed).

Ray exports Lens's metrics (serve/metrics.py) with a ``ray_`` prefix; Ray Serve adds ``application``,
``deployment`` and ``replica`` labels.
"""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PANELS = [
    # (title, unit, [(expr, legend)])
    ("Requests/s by route and status", "reqps",
     [("sum by (route, status) (rate(ray_lens_request_latency_ms_count[1m]))", "{{route}} {{status}}")]),
    ("Latency p50 / p95 / p99 (ms)", "ms",
     [(f"histogram_quantile({q}, sum by (le) (rate(ray_lens_request_latency_ms_bucket[5m])))", f"p{int(q * 100)}")
      for q in (0.5, 0.95, 0.99)]),
    ("Errors/s by kind", "reqps",
     [("sum by (route, kind) (rate(ray_lens_request_errors_total[5m]))", "{{route}} {{kind}}"),
      ("sum by (kind) (rate(ray_lens_image_errors_total[5m]))", "image {{kind}}")]),
    ("Batch size (mean, p95)", "none",
     [("sum(rate(ray_lens_batch_size_sum[5m])) / sum(rate(ray_lens_batch_size_count[5m]))", "mean"),
      ("histogram_quantile(0.95, sum by (le) (rate(ray_lens_batch_size_bucket[5m])))", "p95")]),
    ("Stage time p95 (ms): decode, queue wait, model", "ms",
     [(f"histogram_quantile(0.95, sum by (le) (rate(ray_lens_{m}_bucket[5m])))", m)
      for m in ("decode_ms", "queue_wait_ms", "model_ms")]),
    ("Images in flight per replica", "none",
     [("sum by (deployment, replica) (ray_lens_replica_in_flight)", "{{deployment}} {{replica}}")]),
    ("Replicas by deployment", "none",
     [("sum by (deployment) (ray_serve_deployment_replica_healthy)", "{{deployment}}")]),
    ("Replica cold start (s)", "s",
     [("max by (deployment, replica) (ray_lens_replica_cold_start_seconds)", "{{deployment}} {{replica}}")]),
    ("int8 refused by the accuracy gate (1 = fp32 serves)", "none",
     [("max by (deployment) (ray_lens_int8_fallback)", "{{deployment}}")]),
    ("Requests/s by model version", "reqps",
     [("sum by (version) (rate(ray_lens_version_latency_ms_count[1m]))", "{{version}}")]),
    ("5xx rate by model version", "percentunit",
     [("sum by (version) (rate(ray_lens_version_errors_total[5m])) / "
       "clamp_min(sum by (version) (rate(ray_lens_version_latency_ms_count[5m])), 1e-9)", "{{version}}")]),
    ("Latency p95 by model version (ms)", "ms",
     [("histogram_quantile(0.95, sum by (le, version) (rate(ray_lens_version_latency_ms_bucket[5m])))",
       "{{version}}")]),
    ("Versions served (by role) and canary weight (%)", "none",
     [("max by (version, role) (ray_lens_version_serving) > 0", "{{version}} {{role}}"),
      ("max by (version) (ray_lens_version_canary_weight)", "{{version}} weight (replicas)"),
      ("max by (model, version) (ray_lens_rollout_canary_weight)", "{{model}} {{version}} weight (controller)")]),
    ("Shadow agreement with stable", "percentunit",
     [("avg by (version, measure) (ray_lens_version_shadow_agreement)", "{{version}} {{measure}}"),
      ("max by (model, version) (ray_lens_rollout_canary_agreement)", "{{model}} {{version}} top-1 (step)")]),
    ("Rollouts: step, decisions, canary 5xx, version loads", "none",
     [("max by (model) (ray_lens_rollout_step)", "{{model}} step"),
      ("sum by (model, decision) (increase(ray_lens_rollout_decisions_total[15m]))", "{{model}} {{decision}}"),
      ("max by (model, version) (ray_lens_rollout_canary_error_rate)", "{{model}} {{version}} canary 5xx rate"),
      ("sum by (version, outcome) (increase(ray_lens_version_loads_total[15m]))", "{{version}} load {{outcome}}"),
      ("max by (model) (time() - ray_lens_rollout_last_rollback_timestamp_seconds) / 60",
       "{{model}} minutes since rollback")]),
    ("SLO error-budget burn rate (1 = on budget)", "none",
     [("lens:availability_errors:ratio_rate1h / 0.001", "availability, 1h"),
      ("lens:availability_errors:ratio_rate6h / 0.001", "availability, 6h"),
      ("lens:latency_slow:ratio_rate1h / 0.01", "latency, 1h"),
      ("lens:latency_slow:ratio_rate6h / 0.01", "latency, 6h")]),
    ("Input: encoded size p50 / p95 by format (bytes)", "bytes",
     [(f"histogram_quantile({q}, sum by (le, format) (rate(ray_lens_input_bytes_bucket[5m])))",
       f"{{{{format}}}} p{int(q * 100)}") for q in (0.5, 0.95)]),
    ("Drift: p-value of the last test (alert below alpha)", "none",
     [("min by (version, test) (ray_lens_drift_p_value)", "{{version}} {{test}}")]),
    ("Drift: effect size, detected, window", "none",
     [("max by (version, measure) (ray_lens_drift_distance)", "{{version}} {{measure}}"),
      ("max by (version) (ray_lens_drift_detected)", "{{version}} detected"),
      ("max by (version) (ray_lens_drift_window_images)", "{{version}} window"),
      ("sum by (version, result) (increase(ray_lens_drift_tests_total[1h]))", "{{version}} tests {{result}} /h")]),
    ("Labeled feedback: top-1 accuracy by version (6h) and items/s", "percentunit",
     [("lens:feedback_accuracy:ratio_rate6h", "{{version}} accuracy"),
      ("sum by (version) (rate(ray_lens_feedback_total[5m]))", "{{version}} items/s")]),
    ("Feedback: worst per-class recall (1d)", "percentunit",
     [("bottomk(10, sum by (label) (increase(ray_lens_feedback_class_total{kind=\"tp\"}[1d])) / "
       "clamp_min(sum by (label) (increase(ray_lens_feedback_class_total{kind=~\"tp|fn\"}[1d])), 1))",
       "{{label}}")]),
    ("Feedback: label lag p50 / p95 (s)", "s",
     [(f"histogram_quantile({q}, sum by (le) (rate(ray_lens_feedback_label_lag_s_bucket[1h])))", f"p{int(q * 100)}")
      for q in (0.5, 0.95)]),
    ("Event queue: waiting, in flight, DLQ", "none",
     [("max(ray_lens_events_queue_visible)", "waiting"), ("max(ray_lens_events_queue_in_flight)", "in flight"),
      ("max(ray_lens_events_dlq_depth)", "DLQ")]),
    ("Event age at receipt p50 / p95 (s)", "s",
     [(f"histogram_quantile({q}, sum by (le) (rate(ray_lens_events_message_age_s_bucket[5m])))", f"p{int(q * 100)}")
      for q in (0.5, 0.95)]),
    ("Events/s by outcome", "ops",
     [("sum by (outcome) (rate(ray_lens_events_processed_total[5m]))", "{{outcome}}")]),
    ("Event poll loops", "none", [("max(ray_lens_events_pollers)", "pollers")]),
]


#: every series selector of a panel is narrowed to the chosen Ray cluster and namespace (KubeRay's PodMonitor
#: relabels the pod label ray.io/cluster to ``ray_io_cluster``; Prometheus adds ``namespace``). "All" matches series
#: without those labels too (one machine, no Kubernetes). Recording rules (``lens:...``) are left as written.
SCOPE = 'namespace=~"$namespace",ray_io_cluster=~"$cluster"'


def scoped(expr: str) -> str:
    import re

    def add(m: re.Match) -> str:
        inner = m.group(3)
        return f"{m.group(1)}{{{SCOPE}{',' + inner if inner else ''}}}"

    return re.sub(r"\b(ray_[a-z0-9_]+)(\{([^}]*)\})?", add, expr)


def _variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2, "includeAll": True,
            "allValue": ".*", "multi": True, "current": {"text": "All", "value": "$__all"}, "hide": 0, "sort": 1}


def dashboard() -> dict:
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title,
            "gridPos": {"x": 12 * (i % 2), "y": 8 * (i // 2), "w": 12, "h": 8},
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(65 + j), "expr": scoped(e), "legendFormat": leg}
                        for j, (e, leg) in enumerate(targets)],
        })
    return {
        "uid": "lens-overview", "title": "Lens", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "tags": ["lens", "ray"],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
            _variable("cluster", "Ray cluster", "label_values(ray_lens_replica_cold_start_seconds, ray_io_cluster)"),
            _variable("namespace", "Namespace", 'label_values(ray_lens_replica_cold_start_seconds'
                      '{ray_io_cluster=~"$cluster"}, namespace)')]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = ROOT / "infra" / "grafana" / "lens-dashboard.json"
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(out)

"""Every deployment artefact under infra/ is well-formed: Serve configs (standalone and embedded in the
RayService) pass Ray's own Serve schema, KubeRay manifests have the fields KubeRay requires, the RayJob's
commands parse with Lens's CLI, the IAM policy is least-privilege JSON, and the alert rules and dashboard
refer only to metrics Lens exports."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
sys.path.insert(0, str(ROOT / "scripts"))

from docs_reference import exported_metrics  # noqa: E402 - the one reading of serve/metrics.py (the manual's too)


def lens_metrics() -> set[str]:
    names = set(exported_metrics())
    assert len(names) >= 10
    return names


def used_metrics() -> set[str]:
    """Every Lens metric the Grafana dashboard and the Prometheus alert rules query."""
    dash = json.loads((INFRA / "grafana" / "lens-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    rules = yaml.safe_load((INFRA / "prometheus" / "lens-alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return set().union(*(referenced(e) for e in exprs))


def referenced(expr: str) -> set[str]:
    """Lens metric names in a PromQL expression (Ray's ray_ prefix and histogram suffixes removed)."""
    return {re.sub(r"_(bucket|count|sum)$", "", m) for m in re.findall(r"ray_(lens_[a-z0-9_]+)", expr)}


def check_pod_template(t: dict, where: str) -> None:
    containers = t["template"]["spec"]["containers"]
    assert containers and all(c.get("image") and c.get("name") for c in containers), where
    assert isinstance(t["rayStartParams"], dict), where


def check_cluster(spec: dict, where: str) -> None:
    check_pod_template(spec["headGroupSpec"], f"{where} head")
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        check_pod_template(g, f"{where} {g['groupName']}")
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]


@pytest.mark.parametrize("name", ["serve-cpu.yaml", "serve-gpu.yaml", "events.yaml"])
def test_standalone_serve_configs_pass_rays_schema(name):
    from lens.serve.config import AppArgs
    from lens.serve.events.app import EventsAppArgs
    from lens.serve.run import check_serve_config

    doc = yaml.safe_load((INFRA / name).read_text())
    check_serve_config(doc, where=name)  # raises ConfigError naming the field on any problem
    apps = {a["import_path"]: a for a in doc["applications"]}
    assert "lens.serve.app:build_app" in apps and len({a["name"] for a in doc["applications"]}) == len(apps)
    assert AppArgs.model_validate(apps["lens.serve.app:build_app"]["args"]).pools  # Lens's own validation of the args
    if name == "events.yaml":
        EventsAppArgs.model_validate(apps["lens.serve.events.app:build_events_app"]["args"])
    # and a broken copy is refused, so the check above is not vacuous
    bad = yaml.safe_load((INFRA / name).read_text())
    bad["applications"][0]["args"]["pools"][0]["num_cpus"] = "two"
    with pytest.raises(Exception, match="num_cpus"):
        check_serve_config(bad, where=name)


def test_rayservice_is_well_formed_and_its_serve_config_passes_rays_schema():
    from lens.serve.app import build_app  # noqa: F401 - the import path the config names exists
    from lens.serve.config import AppArgs
    from lens.serve.events.app import EventsAppArgs
    from lens.serve.run import check_serve_config

    doc = yaml.safe_load((INFRA / "kuberay" / "rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService" and doc["metadata"]["name"]
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    check_serve_config(serve_cfg, where="RayService serveConfigV2")
    apps = {a["import_path"]: a for a in serve_cfg["applications"]}
    AppArgs.model_validate(apps["lens.serve.app:build_app"]["args"])  # Lens's own validation of the args
    EventsAppArgs.model_validate(apps["lens.serve.events.app:build_events_app"]["args"])
    cluster = doc["spec"]["rayClusterConfig"]
    check_cluster(cluster, "RayService")
    gpu = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"][0]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] > 0 and cluster["enableInTreeAutoscaling"]


def test_rayjob_is_well_formed_and_its_commands_parse():
    from lens.cli.main import build_parser

    doc = yaml.safe_load((INFRA / "kuberay" / "rayjob-embed.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    check_cluster(doc["spec"]["rayClusterSpec"], "RayJob")
    commands = [c.strip() for c in doc["spec"]["entrypoint"].split("&&")]
    assert [c.split()[:2] for c in commands] == [["lens", "embed"], ["lens", "index"]]
    embed, index = (build_parser().parse_args(shlex.split(c)[1:]) for c in commands)
    assert (embed.command, index.command) == ("embed", "index")
    assert embed.input.startswith("s3://") and embed.output.startswith("s3://")
    assert embed.gpus_per_worker == 1 and embed.output in index.embeddings and index.output == "/data/index"


def test_iam_policy_is_least_privilege():
    policy = json.loads((INFRA / "iam-policy.json").read_text())
    assert policy["Version"] == "2012-10-17"
    for st in policy["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        assert st["Effect"] == "Allow" and st["Sid"]
        assert all(a != "*" and not a.endswith(":*") for a in actions), st["Sid"]
        assert all(r != "*" for r in resources), st["Sid"]


def test_alert_rules_are_valid_and_use_lens_metrics():
    known = lens_metrics()
    doc = yaml.safe_load((INFRA / "prometheus" / "lens-alerts.yaml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    records = {r["record"]: r["expr"] for r in rules if "record" in r}
    alerts = [r for r in rules if "alert" in r]
    assert len(records) + len(alerts) == len(rules)
    assert {r["alert"] for r in alerts} >= {"LensHighLatencyP95", "LensHighErrorRate", "LensEventQueueOld",
                                            "LensDeadLetterQueueNotEmpty", "LensAvailabilityBudgetBurnFast",
                                            "LensAvailabilityBudgetBurnSlow", "LensLatencyBudgetBurnFast",
                                            "LensLatencyBudgetBurnSlow", "LensInputDrift", "LensFeedbackAccuracyDrop"}
    for name, expr in records.items():
        assert re.fullmatch(r"lens:[a-z0-9_]+:[a-z0-9_]+", name), name
        assert expr.count("(") == expr.count(")") and referenced(expr) <= known and referenced(expr), name
    for r in alerts:
        assert r["expr"] and re.fullmatch(r"\d+[smh]", r["for"]) and r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"]
        assert r["expr"].count("(") == r["expr"].count(")"), r["alert"]
        # every recording rule an alert names exists; expanded, it queries only metrics Lens exports
        named = set(re.findall(r"lens:[a-z0-9_]+:[a-z0-9_]+", r["expr"]))
        assert named <= set(records), (r["alert"], named - set(records))
        used = referenced(r["expr"]).union(*(referenced(records[n]) for n in named))
        assert used and used <= known, (r["alert"], used - known)
        # each alert has its runbook section in the manual, and its runbook_url points there
        assert f"\n## {r['alert']}\n" in (ROOT / "docs" / "operations" / "runbook.md").read_text(), r["alert"]
        assert r["annotations"]["runbook_url"].endswith(f"/operations/runbook/#{r['alert'].lower()}"), r["alert"]


def test_dashboard_panels_use_exported_metrics():
    known = lens_metrics()
    dash = json.loads((INFRA / "grafana" / "lens-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(dash["panels"]) >= 10
    used = set().union(*(referenced(e) for e in exprs))
    assert used <= known, used - known
    # every metric Lens exports is on the dashboard
    assert known - used == set(), known - used
    # cluster and namespace variables, and every series selector scoped by them
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource", "cluster", "namespace"]
    selectors = [m for e in exprs for m in re.findall(r"ray_[a-z0-9_]+(?:\{[^}]*\})?", e)]
    assert selectors and all('namespace=~"$namespace",ray_io_cluster=~"$cluster"' in m for m in selectors), \
        [m for m in selectors if "$cluster" not in m][:3]


def test_train_rayjob_is_well_formed_and_its_command_parses():
    from lens.cli.main import build_parser
    from lens.cli.train import config_from_args

    doc = yaml.safe_load((INFRA / "kuberay" / "rayjob-train.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    check_cluster(doc["spec"]["rayClusterSpec"], "RayJob")
    args = build_parser().parse_args(shlex.split(doc["spec"]["entrypoint"])[1:])
    cfg = config_from_args(args)  # validated as `lens train` would
    assert args.command == "train" and cfg.mode == "finetune" and cfg.use_gpu and cfg.workers == 2
    assert cfg.data.startswith("s3://") and cfg.output.startswith("s3://")
    assert cfg.checkpoint_storage.startswith("s3://")  # shared: workers on other nodes resume from it


def _grants(policy: dict, action: str, arn: str, prefix: str | None = None) -> bool:
    """Whether an Allow statement gives ``action`` on ``arn`` (wildcards as IAM reads them), with a ListBucket
    ``s3:prefix`` condition, if any, admitting ``prefix``."""
    import fnmatch

    for st in policy["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if st["Effect"] != "Allow" or action not in actions or not any(fnmatch.fnmatchcase(arn, r) for r in resources):
            continue
        allowed = st.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if allowed is None or prefix is None or any(fnmatch.fnmatchcase(prefix, a) for a in allowed):
            return True
    return False


def test_the_iam_policy_covers_every_bucket_and_prefix_the_cluster_files_use():
    """The KubeRay manifests' commands and Serve config, read with Lens's own parsers, against the policy: every
    S3 prefix read can be listed and read, every prefix written can be written (and a checkpoint store pruned)."""
    import shlex

    from lens.cli.main import build_parser

    parser = build_parser()
    policy = json.loads((INFRA / "iam-policy.json").read_text())
    needs: list[tuple[str, str]] = []  # (uri, "read" | "write" | "checkpoints")
    for name in ("rayjob-embed.yaml", "rayjob-train.yaml"):
        doc = yaml.safe_load((INFRA / "kuberay" / name).read_text())
        for command in doc["spec"]["entrypoint"].split("&&"):
            a = parser.parse_args(shlex.split(command.strip())[1:])
            reads = [getattr(a, f, None) for f in ("input", "data")] + list(getattr(a, "embeddings", None) or [])
            needs += [(u, "read") for u in reads if u]
            needs += [(a.output, "write")]
            if getattr(a, "checkpoint_storage", None):
                needs += [(a.checkpoint_storage, "checkpoints")]
    service = yaml.safe_load((INFRA / "kuberay" / "rayservice.yaml").read_text())
    for app in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]:
        needs += [(u, "read") for u in ((app.get("args") or {}).get("search") or {}).get("delta_sources", [])]
    events = yaml.safe_load((INFRA / "events.yaml").read_text())["applications"][1]["args"]["events"]
    needs += [(f"s3://{events['bucket']}/", "read"),
              (f"s3://{events['results_bucket']}/{events['result_prefix']}", "write"),
              (f"s3://{events['results_bucket']}/{events['embeddings_prefix']}", "write")]
    s3 = [(u, how) for u, how in needs if u.startswith("s3://")]
    assert {u.split("/")[2] for u, _ in s3} >= {"lens-data", "lens-models", "lens-results", "lens-images"}
    want = {"read": ["s3:GetObject"], "write": ["s3:GetObject", "s3:PutObject"],
            "checkpoints": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]}
    missing = []
    for uri, how in s3:
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not _grants(policy, "s3:ListBucket", f"arn:aws:s3:::{bucket}", prefix):
            missing.append(f"s3:ListBucket {bucket} prefix {prefix!r}")
        for action in want[how]:
            if not _grants(policy, action, f"arn:aws:s3:::{bucket}/{prefix}some/object"):
                missing.append(f"{action} {uri}")
    assert not missing, missing
    # and the check is not vacuous: the policy before training's statements lacked these
    trimmed = dict(policy, Statement=[s for s in policy["Statement"] if "Model" not in s["Sid"]])
    assert not _grants(trimmed, "s3:PutObject", "arn:aws:s3:::lens-models/checkpoints/x")


def test_cluster_files_keep_the_image_s_baked_model_cache_and_no_deprecated_fields():
    """The image bakes the embedded model's ONNX export into LENS_CACHE_DIR (Dockerfile); a manifest setting it to a
    shared volume made every first replica export cold, under a lock on that volume. An operator may still set it
    on purpose; the shipped files do not."""
    assert "ENV LENS_CACHE_DIR=" in (ROOT / "Dockerfile").read_text()
    for path in sorted((INFRA / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            text = json.dumps(doc)
            assert "LENS_CACHE_DIR" not in text, path.name
            # KubeRay's deprecated (no-op since 1.1) RayService health thresholds
            assert "UnhealthySecondThreshold" not in text, path.name


def test_the_network_policy_keeps_the_dashboard_and_metrics_inside():
    doc = yaml.safe_load((INFRA / "kuberay" / "networkpolicy.yaml").read_text())
    assert doc["kind"] == "NetworkPolicy" and doc["spec"]["policyTypes"] == ["Ingress"]
    assert doc["spec"]["podSelector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    reachable_from_outside: set = set()
    for rule in doc["spec"]["ingress"]:
        sources = rule.get("from")
        inside = sources is not None and all(set(s) == {"podSelector"} for s in sources)
        if inside:
            continue
        ports = {p["port"] for p in rule.get("ports", [])}
        assert ports, f"a rule open to other namespaces on every port: {rule}"
        reachable_from_outside |= ports
    assert reachable_from_outside == {8000, 8080}
    # the scrape port is open only to the monitoring namespace, the API only to the ingress controller's
    for port, namespace in ((8080, "monitoring"), (8000, "ingress-nginx")):
        (rule,) = [r for r in doc["spec"]["ingress"] if any(p["port"] == port for p in r.get("ports", []))]
        assert [s["namespaceSelector"]["matchLabels"] for s in rule["from"]] == [
            {"kubernetes.io/metadata.name": namespace}], rule


def test_the_rayservice_front_door_applies_lens_s_limits():
    """On Kubernetes the front door's limits live in the Ingress every request crosses (KubeRay deploys Serve
    through Ray's dashboard, where `lens serve`'s HAProxy edit cannot hook in) and in Ray's own HAProxy settings:
    the same values as FrontDoorConfig's and the API's defaults, pointing at KubeRay's Serve service."""
    from lens.serve.config import ApiConfig
    from lens.serve.frontdoor import FrontDoorConfig

    fd, api = FrontDoorConfig(), ApiConfig()
    ing = yaml.safe_load((INFRA / "kuberay" / "ingress.yaml").read_text())
    service = yaml.safe_load((INFRA / "kuberay" / "rayservice.yaml").read_text())
    a = ing["metadata"]["annotations"]
    mib = int(a["nginx.ingress.kubernetes.io/proxy-body-size"].rstrip("m")) * 1024 * 1024
    assert mib == max(api.max_body_bytes, api.max_batch_body_bytes)
    assert a["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "on"
    assert int(a["nginx.ingress.kubernetes.io/limit-connections"]) == fd.max_conn_per_client
    serve_timeout = yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["request_timeout_s"]
    assert int(a["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > serve_timeout  # Lens's own 504 first
    assert a["nginx.ingress.kubernetes.io/proxy-next-upstream"] == "off"  # feedback is never replayed
    (path,) = ing["spec"]["rules"][0]["http"]["paths"]
    assert path["backend"]["service"] == {"name": f"{service['metadata']['name']}-serve-svc", "port": {"number": 8000}}
    spec = service["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for group in pods:
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_SERVE_HAPROXY_MAXCONN"] == str(fd.max_connections)
        assert env["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] == str(fd.idle_timeout_s)

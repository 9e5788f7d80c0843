"""`lens serve` as an operator runs it: a Serve config, HAProxy in front, Prometheus metrics, clean Ctrl-C."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest
import requests
import yaml
from conftest import free_port, interrupt, own_instance, ray_jobs, scrape_metrics, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_lens_serve_runs_a_config_exports_metrics_and_stops_cleanly(tmp_path, photos, tiny, foreign_ray):
    import numpy as np

    from lens.quality.drift import Profile
    from lens.runtime.samples import augmented_jpegs

    port, metrics_port = free_port(), free_port()
    doc = yaml.safe_load((__import__("pathlib").Path(__file__).parents[1] / "infra" / "serve-cpu.yaml").read_text())
    pool = doc["applications"][0]["args"]["pools"][0]
    pool["model"] = {"name": "test_efficientnet", "weights": "random", "backend": "onnx", "device": "cpu"}
    # the shipped CPU sizes, with search enabled, on this 2-core machine (the resource check is on)
    from lens.index.build import BuildConfig, build_index
    from test_index import write_part

    seeded = [b for _, b, _ in augmented_jpegs(12, seed=6, long_side=(128, 256))]
    vectors = np.stack([r.embedding for r in tiny.predict(seeded)])
    write_part(tmp_path / "emb" / "part-0.parquet", [f"img-{i}" for i in range(len(vectors))], vectors,
               model=tiny.identity().to_dict())
    build_index(BuildConfig(embeddings=[str(tmp_path / "emb")], output=str(tmp_path / "index"), index="flat"),
                log=lambda *a: None)
    doc["applications"][0]["args"]["search"] = {"index": str(tmp_path / "index"), "num_cpus": 0.5}
    # drift and feedback on, so their metrics are exported too
    jpegs = [b for _, b, _ in augmented_jpegs(80, seed=5, long_side=(128, 256))]
    ref = tiny.predict(jpegs)
    Profile.fit(np.stack([r.embedding for r in ref]), [r.tags[0].label for r in ref], components=8,
                identity=tiny.identity()).save(str(tmp_path / "drift-profile.npz"))
    pool["drift"] = {"reference": str(tmp_path / "drift-profile.npz"), "window": 50, "every": 10}
    doc["applications"][0]["args"]["feedback"] = {"sink": str(tmp_path / "feedback"), "flush_s": 0.2}
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen([sys.executable, "-m", "lens.cli.main", "serve", "--config", str(cfg), "--port", str(port),
                             "--metrics-port", str(metrics_port)], stdout=subprocess.PIPE,
                            # no load balancer in front here: skip Serve's 30 s ingress drain on stop
                            env=os.environ | {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"},
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/healthz", proc)
        for _ in range(5):
            r = requests.post(f"{url}/v1/tag", data=photos["rocket.jpg"], headers={"Content-Type": "image/jpeg"},
                              timeout=30)
            assert r.status_code == 200, r.text
        for b in jpegs[:55]:  # a full drift window
            last = requests.post(f"{url}/v1/tag", data=b, headers={"Content-Type": "image/jpeg"}, timeout=30).json()
        r = requests.post(f"{url}/v1/feedback", json={"sha256": last["sha256"], "predicted_at": last["predicted_at"],
                                                       "labels": ["x"], "predicted": [last["tags"][0]["label"]]},
                          timeout=30)
        assert r.status_code == 200 and r.json()["stored"] == 1, r.text
        r = requests.post(f"{url}/v1/tag", data=b"junk", headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type", r.text
        # Every serving metric the dashboard and alerts query is exported at run time (Ray exports every few
        # seconds); the events_ ones are checked by test_events_cli.
        from test_infra import used_metrics

        # (lens_version_* and lens_rollout_* exist only with registry versions: test_rollout checks those)
        wanted = sorted(f"ray_{m}" for m in used_metrics()
                        if not m.startswith(("lens_events_", "lens_version_", "lens_rollout_")))
        assert len(wanted) >= 8
        text = scrape_metrics(metrics_port, wanted)
        assert 'route="/v1/tag"' in text and 'status="415"' in text
        # Ray's exporter (Ray binds it to the node address) listens on loopback only, as HAProxy's admin ports do
        bound = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == metrics_port}
        assert bound and bound <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, bound
        assert ray_jobs(foreign_ray) == []  # someone else's `ray start` cluster on the host: never joined
        hits = requests.post(f"{url}/v1/search?k=3", data=seeded[3], headers={"Content-Type": "image/jpeg"},
                             timeout=30).json()["results"]
        assert hits[0]["id"] == "img-3" and hits[0]["score"] > 0.999
        served = requests.get(f"{url}/v1/models", timeout=30).json()["pools"][0]["served"]
        assert served["backend"] == "onnx" and served["precision"] == "fp32" and served["backend_version"]
    finally:
        out = interrupt(proc)
    assert proc.returncode == 0, out[-2000:]
    assert "shutting down Lens" in out
    own_instance(out, "lens serve")
    # the start-up line says what each pool runs, after auto and the int8 gate chose
    assert f"  pool Tagger (lens): test_efficientnet on onnx fp32 on cpu (onnx {served['backend_version']})" in out

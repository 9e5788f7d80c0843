"""`lens serve`'s HAProxy front door: slow clients get 408 while others are served, per-client connection cap,
admin ports on loopback, and SIGTERM drains the requests in flight."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from conftest import free_port, wait_for, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CAP = 170  # connections per client address: above the 150 slow clients + 1, below the cap test's 220


def test_template_edits_apply_to_rays_template_and_refuse_an_unknown_one():
    from lens.serve.frontdoor import FrontDoorConfig, edit_template
    from ray.serve._private import haproxy

    out = edit_template(haproxy.HAPROXY_CONFIG_TEMPLATE, FrontDoorConfig(header_timeout_s=7, max_conn_per_client=9))
    assert "timeout http-request 7s" in out and "option http-buffer-request" in out
    assert "bind *:" not in out and "bind :" not in out and "bind 127.0.0.1:{{ config.stats_port }}" in out
    assert "reject if { sc_conn_cur(0) gt 9 }" in out
    assert "sc_conn_cur" not in edit_template(haproxy.HAPROXY_CONFIG_TEMPLATE, FrontDoorConfig(max_conn_per_client=0))
    # non-ASCII header values answered by HAProxy in Lens's shape; its 502/503/504 pages are Lens's JSON 503
    assert "http-request return status 400 content-type application/json" in out and "req.hdrs -m reg" in out
    out = edit_template(haproxy.HAPROXY_CONFIG_TEMPLATE, FrontDoorConfig(), "/x/lens-503.http")
    assert all(f"errorfile {c} /x/lens-503.http" in out for c in (502, 503, 504)) and "error_file_path }}" not in out
    with pytest.raises(ValueError, match="no 'bind :{{ config.metrics_port }}'"):
        edit_template(haproxy.HAPROXY_CONFIG_TEMPLATE.replace("bind :{{ config.metrics_port }}", "bind x"),
                      FrontDoorConfig())


@pytest.fixture(scope="module")
def server(tmp_path_factory, lens_cache):
    tmp = tmp_path_factory.mktemp("frontdoor")
    doc = yaml.safe_load((Path(__file__).parents[1] / "infra" / "serve-cpu.yaml").read_text())
    pool = doc["applications"][0]["args"]["pools"][0]
    pool["model"] = {"name": "test_efficientnet", "weights": "random", "backend": "onnx", "device": "cpu"}
    pool["num_cpus"] = 1
    cfg = tmp / "serve.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    port, stats, exporter = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lens.cli.main", "serve", "--config", str(cfg), "--port", str(port), "--metrics-port", "0",
         "--header-timeout-s", "2", "--max-conn-per-client", str(CAP), "--stats-port", str(stats),
         "--exporter-port", str(exporter), "--grace-period-s", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=os.environ | {"LENS_CACHE_DIR": str(lens_cache), "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"})
    url = f"http://127.0.0.1:{port}"
    wait_healthy(f"{url}/healthz", proc)
    yield {"url": url, "port": port, "stats": stats, "exporter": exporter, "proc": proc}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _png(w=1600, h=1200, seed=0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_a_header_value_that_is_not_ascii_gets_a_json_400_without_a_key(server):
    """Ray's replica would fail decoding it (a text/plain 500, even on /healthz): HAProxy answers first."""
    import http.client

    for path, header in (("/healthz", "X-Request-Id"), ("/v1/tag", "serve_multiplexed_model_id")):
        conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
        conn.putrequest("POST" if path == "/v1/tag" else "GET", path)
        conn.putheader(header, b"caf\xe9-\xff")
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        r = conn.getresponse()
        body = r.read()
        conn.close()
        assert r.status == 400 and r.getheader("Content-Type") == "application/json", body
        assert json.loads(body) == {"error": "bad_header", "message": "header values must be ASCII", "status": 400}
    assert requests.get(f"{server['url']}/healthz", timeout=30).status_code == 200  # ASCII still passes


def test_admin_ports_are_the_configured_ones_on_loopback_only(server):
    import psutil

    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
    for port in (server["stats"], server["exporter"]):
        assert {ip for ip, p in listening if p == port} == {"127.0.0.1"}, (port, listening)
    assert requests.get(f"http://127.0.0.1:{server['stats']}/stats", timeout=10).status_code == 200
    assert "haproxy_" in requests.get(f"http://127.0.0.1:{server['exporter']}/metrics", timeout=10).text


def _stats_rows(stats_port: int) -> list[dict]:
    """HAProxy's stats CSV, one dict per proxy/server row."""
    import csv

    text = requests.get(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=10).text
    return list(csv.DictReader(text.lstrip("# ").splitlines()))


def _stats(stats_port: int, svname: str, field: str) -> int:
    """Sum of one column of HAProxy's stats CSV over the rows named ``svname`` (FRONTEND, BACKEND), its own
    stats proxy left out."""
    return sum(int(r[field] or 0) for r in _stats_rows(stats_port)
               if r["svname"] == svname and r["pxname"] != "stats")


def test_slow_clients_get_408_and_normal_clients_are_still_served(server):
    jpeg = _png(200, 150)
    slow = []
    for _ in range(150):  # each sends its request line a byte at a time, about three bytes a second
        s = socket.create_connection(("127.0.0.1", server["port"]))
        s.setblocking(False)
        slow.append(s)
    answered, replies, while_held = [], {}, 0
    deadline = time.monotonic() + 180  # a failure bound only: the loop ends when every slow client has its answer
    i = 0
    while len(replies) < len(slow):
        assert time.monotonic() < deadline, f"{len(slow) - len(replies)} slow clients never got an answer"
        line = b"POST /v1/tag HTTP/1.1\r\n"
        for n, s in enumerate(slow):
            if n in replies:
                continue
            try:
                data = s.recv(4096)  # HAProxy's answer, once the header timeout has passed
                replies[n] = data
                continue
            except BlockingIOError:
                pass
            except OSError:
                replies[n] = b""
                continue
            try:
                s.send(line[i % len(line): i % len(line) + 1])
            except OSError:
                pass
        i += 1
        held = len(replies) < len(slow)
        r = requests.post(f"{server['url']}/v1/tag", data=jpeg, headers={"Content-Type": "image/png"}, timeout=60)
        answered.append(r.status_code)
        while_held += held and not any(replies.values())  # answered while all 150 slow clients held a connection
        time.sleep(0.3)  # the attack's pace: a byte per round
    for s in slow:
        s.close()
    assert set(answered) == {200} and while_held >= 1, (answered, while_held)
    timed_out = [d for d in replies.values() if d.startswith(b"HTTP/1.1 408")]
    assert len(timed_out) == 150, list(replies.values())[:3]


def test_connections_over_the_per_client_cap_are_refused(server):
    stats = server["stats"]
    wait_for(lambda: _stats(stats, "FRONTEND", "scur") == 0, "no connection left open on the front door")
    denied = _stats(stats, "FRONTEND", "dcon")
    conns, refused = [], 0
    for _ in range(CAP + 50):
        try:
            conns.append(socket.create_connection(("127.0.0.1", server["port"])))
        except ConnectionResetError:  # HAProxy refused it at accept before the connect returned here
            refused += 1
    wait_for(lambda: _stats(stats, "FRONTEND", "dcon") - denied == 50 and _stats(stats, "FRONTEND", "scur") == CAP,
             "HAProxy holding the cap and refusing the rest")
    for s in conns:
        s.settimeout(0.5)
        try:
            refused += s.recv(1) == b""  # closed by HAProxy at accept
        except socket.timeout:
            pass  # open, waiting for a request
        except OSError:
            refused += 1
        s.close()
    assert refused == 50


def _forwarded(stats_port: int) -> int:
    """Sessions HAProxy has passed to the Serve backends so far (``stot`` of the BACKEND rows of its stats CSV)."""
    return _stats(stats_port, "BACKEND", "stot")


def _session_logs(proc) -> str:
    """The log folder of the Ray that `lens serve` (``proc``) started: its GCS names the session."""
    import psutil

    for p in psutil.Process(proc.pid).children(recursive=True):
        for arg in p.cmdline():
            if arg.startswith("--session-dir="):
                return os.path.join(arg.split("=", 1)[1], "logs")
    raise AssertionError("no Ray session under the lens serve process")


def _log_lines(folder: str, text: str) -> list[str]:
    import glob

    found = []
    for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, errors="replace") as f:
                found += [ln for ln in f if text in ln]
    return found


def _replicas_up(stats_port: int) -> list[str]:
    return [r["svname"] for r in _stats_rows(stats_port)
            if r["svname"].startswith("SERVE_REPLICA") and r["status"] == "UP"]


def test_a_client_that_leaves_mid_body_is_one_log_line_and_the_replica_serves_on(server):
    """Past HAProxy's first buffer the body streams to the replica; a client that hangs up there is Lens's one
    INFO line (a 499 in its metrics), never a traceback, and the replica goes on serving."""
    import socket

    logs = os.path.join(_session_logs(server["proc"]), "serve")  # the replicas' own log files
    line = "the client disconnected before its request was read"
    before = len(_log_lines(logs, line))
    # a replica serves HTTP itself once HAProxy has it UP (before that, Serve's fallback proxy answers)
    wait_for(lambda: _replicas_up(server["stats"]), "a replica UP in HAProxy")
    forwarded = _stats(server["stats"], "BACKEND", "stot")
    with socket.create_connection(("127.0.0.1", server["port"])) as s:  # promises 2 MB, sends 64 kB, hangs up
        s.sendall(b"POST /v1/tag HTTP/1.1\r\nHost: lens\r\nContent-Type: image/jpeg\r\n"
                  b"Content-Length: 2000000\r\n\r\n" + b"\xff\xd8\xff" + b"\x00" * 65536)
        # HAProxy drops a request whose client leaves before a replica has it (abortonclose): hang up once a
        # replica is reading this one
        wait_for(lambda: _stats(server["stats"], "BACKEND", "stot") > forwarded, "the request reaches a replica")
    wait_for(lambda: len(_log_lines(logs, line)) > before, "the replica logs the disconnect")
    assert len(_log_lines(logs, line)) == before + 1  # one line for one disconnect
    assert not _log_lines(logs, "ClientDisconnect"), "a traceback of the disconnect reached a log"
    r = requests.post(f"{server['url']}/v1/tag", data=_png(64, 48), headers={"Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text


def test_sigterm_under_load_drains_the_requests_in_flight(server):
    import aiohttp

    proc, body = server["proc"], _png()
    before = _forwarded(server["stats"])

    async def load():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            async def one():
                try:
                    async with s.post(f"{server['url']}/v1/tag", data=body,
                                      headers={"Content-Type": "image/png"}) as r:
                        return r.status, await r.json()  # a text/plain answer (a 404) fails here
                except aiohttp.ClientError as e:  # a reset or a refused connection
                    return type(e).__name__, None

            tasks = [asyncio.create_task(one()) for _ in range(48)]
            deadline = time.monotonic() + 300  # bounds the wait only: a loaded machine may take long to forward
            while (forwarded := await asyncio.to_thread(_forwarded, server["stats"])) < before + 48:  # all reached
                failed = [t.result()[0] for t in tasks if t.done() and t.result()[0] != 200]
                assert not failed, f"requests failed before all 48 reached the backend: {failed}"
                assert time.monotonic() < deadline, f"only {forwarded - before} of 48 requests reached the backend"
                await asyncio.sleep(0.05)
            os.kill(proc.pid, signal.SIGTERM)  # what Kubernetes and systemd send
            answered_before = sum(task.done() for task in tasks)  # the rest are in flight through the drain
            later = []  # requests that arrive during the drain: a JSON 503 to retry elsewhere, never a 404
            while not all(task.done() for task in tasks):
                later.append(await one())
            return await asyncio.gather(*tasks), answered_before, later

    results, answered_before, later = asyncio.run(load())
    statuses = [s for s, _ in results]
    assert statuses == [200] * 48, statuses
    assert later and all(s == 200 or (s == 503 and b["error"] in ("draining", "unavailable")) or isinstance(s, str)
                         for s, b in later), later[:5]
    assert all(len(b["tags"]) == 5 for _, b in results)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "draining requests in flight" in out and "grace period" not in out
    assert answered_before < 48, "no request was in flight when SIGTERM came"  # the drain really served some
    print(f"\n{48 - answered_before} of 48 requests in flight at SIGTERM, all answered 200")

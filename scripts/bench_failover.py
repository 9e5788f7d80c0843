#!/usr/bin/env python
"""SIGKILL a replica under load: what clients see, with and without LensClient's retries; one JSON.

`lens serve` runs the shipped CPU profile (HAProxy front door, the embedded Lite0 on ONNX Runtime) with two fixed
replicas of the pool. Closed-loop clients post the bundled photos: half through ``LensClient`` (its retries of
502/503/504 and connection errors), half with plain ``requests`` and no retry. A third of the way in, one replica's
process is killed with SIGKILL (what the OOM killer or a lost node does); Serve replaces it. Every answer is kept:
its status, whether the body was Lens's JSON, and when.

Targets (the security issue's probe): with the client's retries, 0 failed requests; without them, every failure is
a 502/503 in Lens's JSON shape (retryable), never Ray's text/plain page or a dropped connection. The second is
not met: on a keep-alive connection that already carried a request, HAProxy answers a server that died mid-request
by closing the client connection without a response or a log line (its documented signal that the request was
not processed and may be replayed: haproxy/haproxy#1109, #2375); failures are counted by their innermost cause.

    python scripts/bench_failover.py [--seconds 30] [--clients 8]

Writes benchmarks/failover.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench_serve import free_port  # noqa: E402 - scripts/bench_serve.py
from machine import describe  # noqa: E402 - the benchmarks' machine record (scripts/machine.py)

REPLICA = "ServeReplica:lens:Tagger"


def replica_pids() -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if REPLICA in cmd:
            out.append(p.pid)
    return sorted(out)


def start(tmp: Path, port: int) -> subprocess.Popen:
    import requests
    import yaml

    doc = yaml.safe_load((ROOT / "infra" / "serve-cpu.yaml").read_text())
    pool = doc["applications"][0]["args"]["pools"][0]
    pool["num_cpus"] = 0.75  # two replicas on a 2-core machine
    (dep,) = doc["applications"][0]["deployments"]
    dep.pop("autoscaling_config")
    dep["num_replicas"] = 2
    dep["health_check_period_s"] = 1
    cfg = tmp / "serve.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen([sys.executable, "-m", "lens.cli.main", "serve", "--config", str(cfg), "--port", str(port),
                             "--metrics-port", "0", "--stats-port", str(free_port()),
                             "--exporter-port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200 \
                    and len(replica_pids()) == 2:
                return proc
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"lens serve exited:\n{proc.stdout.read()[-3000:]}")
        time.sleep(1)
    raise SystemExit("lens serve did not become healthy with two replicas")


def _reason(e: BaseException) -> str:
    """The innermost cause of a ``requests`` failure (RemoteDisconnected, ConnectionResetError, BrokenPipeError...)."""
    while True:
        inner = e.__cause__ or e.__context__ or (e.args[0] if e.args and isinstance(e.args[0], BaseException) else None)
        if inner is None or inner is e:
            return type(e).__name__
        e = inner


def plain_client(url: str, bodies: list[bytes], stop: threading.Event, out: list, t0: float, k: int) -> None:
    import requests

    s = requests.Session()
    i = k
    while not stop.is_set():
        i += 1
        try:
            r = s.post(f"{url}/v1/tag", data=bodies[i % len(bodies)], headers={"Content-Type": "image/jpeg"},
                       timeout=60)
            try:  # Lens's shape: a JSON object naming the status
                is_json = r.headers.get("Content-Type", "").startswith("application/json") \
                    and r.json().get("status") == r.status_code
            except ValueError:
                is_json = False
            kind = "ok" if r.status_code == 200 else f"{r.status_code} {'json' if is_json else 'not json'}"
        except requests.RequestException as e:
            kind = f"connection error ({_reason(e)})"
        out.append((time.monotonic() - t0, kind))


def lens_client(url: str, bodies: list[bytes], stop: threading.Event, out: list, t0: float, k: int) -> None:
    from lens.client import LensAPIError, LensClient

    client = LensClient(url, retries=4, backoff_s=0.2, timeout_s=60)
    i = k
    while not stop.is_set():
        i += 1
        try:
            client.tag(bodies[i % len(bodies)])
            kind = "ok"
        except LensAPIError as e:
            kind = f"{e.http_status} {e.code}"
        except Exception as e:  # noqa: BLE001 - anything the client let through is a failure to count
            kind = f"error ({type(e).__name__})"
        out.append((time.monotonic() - t0, kind))


def summarise(rows: list, killed_at: float) -> dict:
    kinds = Counter(k for _, k in rows)
    failed = [(t, k) for t, k in rows if k != "ok"]
    return {"requests": len(rows), "ok": kinds.get("ok", 0), "failed": len(failed),
            "failures": dict(Counter(k for _, k in failed)),
            "failure_window_s": [round(min(t for t, _ in failed) - killed_at, 2),
                                 round(max(t for t, _ in failed) - killed_at, 2)] if failed else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="load duration; the kill comes at a third")
    ap.add_argument("--clients", type=int, default=8, help="clients of each kind")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "failover.json"))
    args = ap.parse_args()

    from bench_serve import jpeg_bodies

    bodies = jpeg_bodies()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="lens-bench-failover-") as tmp:
        proc = start(Path(tmp), port)
        try:
            stop, plain, lens = threading.Event(), [], []
            t0 = time.monotonic()
            threads = [threading.Thread(target=plain_client, args=(url, bodies, stop, plain, t0, k), daemon=True)
                       for k in range(args.clients)]
            threads += [threading.Thread(target=lens_client, args=(url, bodies, stop, lens, t0, k), daemon=True)
                        for k in range(args.clients)]
            for t in threads:
                t.start()
            time.sleep(args.seconds / 3)  # the load's own schedule (a benchmark, not a test)
            before = replica_pids()
            victim = before[0]
            killed_at = time.monotonic() - t0
            os.kill(victim, signal.SIGKILL)
            print(f"killed replica pid {victim} at {killed_at:.1f} s", file=sys.stderr)
            time.sleep(args.seconds * 2 / 3)
            stop.set()
            for t in threads:
                t.join(timeout=120)
            replaced = victim not in replica_pids() and len(replica_pids()) == 2
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    with_retries, without = summarise(lens, killed_at), summarise(plain, killed_at)
    retryable = {"502 json", "503 json"}
    out = {"benchmark": "failover", "machine": describe(), "seconds": args.seconds, "clients_each": args.clients,
           "killed_at_s": round(killed_at, 2), "replica_replaced": replaced,
           "with_client_retries": with_retries, "without_retries": without,
           "targets": {"with retries: 0 failed requests": with_retries["failed"] == 0,
                       "without retries: every failure a JSON 502/503": set(without["failures"]) <= retryable}}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

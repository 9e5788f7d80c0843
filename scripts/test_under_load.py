#!/usr/bin/env python
"""Run the test suite on a busy machine: CPU hogs keep every core busy for the whole run.

    python scripts/test_under_load.py                  # 4 hogs, the README's test command (make test)
    python scripts/test_under_load.py --hogs 4 -- .venv/bin/python -m pytest -q tests/test_serve.py

Each hog is a busy loop in its own session (``setsid``) at nice 0, started before the suite and stopped after it,
on failure too. The suite must pass like this: no test may synchronise on wall-clock time. Prints one JSON line
(hogs, seconds, exit code, load average seen) and exits with the suite's code; ``--out FILE`` keeps the JSON and
the suite's output beside it (``FILE.log``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

HOG = "while True: pass"


def start_hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", HOG], start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for h in hogs:
        try:
            os.killpg(h.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        h.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hogs", type=int, default=4, help="busy-loop processes (default 4)")
    ap.add_argument("--out", help="write the JSON summary here and the suite's output to OUT.log")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the suite command after -- (default: make test)")
    args = ap.parse_args()
    command = [c for c in args.command if c != "--"] or ["make", "test"]

    from machine import describe

    hogs = start_hogs(args.hogs)
    loads: list[float] = []
    done = threading.Event()

    def sample() -> None:  # what the machine's load was while the suite ran (a record, not a synchronisation)
        while not done.wait(30):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    try:
        log = open(f"{args.out}.log", "w") if args.out else None  # noqa: SIM115 - closed below
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        for line in proc.stdout:
            sys.stderr.write(line)
            if log:
                log.write(line)
            tail = (tail + [line.rstrip()])[-5:]
        code = proc.wait()
        if log:
            log.close()
    finally:
        done.set()
        stop_hogs(hogs)
    summary = {"hogs": args.hogs, "command": " ".join(command), "exit_code": code,
               "seconds": round(time.monotonic() - t0, 1), "load_average_1m": {
                   "min": min(loads, default=None), "max": max(loads, default=None),
                   "mean": round(sum(loads) / len(loads), 2) if loads else None},
               "last_lines": tail, "machine": describe()}
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())

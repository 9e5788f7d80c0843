"""Named crash points, for fault-injection tests of Lens's recovery paths.

``LENS_CRASH_AT="name[:n],..."`` makes the n-th pass (default: the first) through ``crash_point("name")`` kill
this process with SIGKILL, as a power cut or an OOM kill would: no ``finally``, no flush, no clean-up. A process
that leads its own process group (a job started in a new session) takes the whole group down, so Ray's raylet
and workers die with the driver, like a lost machine. Tests use it instead of a timed kill, which lands at a
different place on every run.

Unset (production), ``crash_point`` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["crash_point", "POINTS"]

#: Every crash point in Lens, and where it is.
POINTS = {
    "events.before_delete": "a poll's messages are processed (parts and sidecars written), not yet deleted",
    "events.before_sidecars": "a batch's embedding parts are written, its sidecars not yet",
    "embed.after_commit": "an input shard's embeddings are committed in the ledger",
    "backfill.after_batch": "the backfill driver has received a batch's outcome (its sidecars are written)",
    "train.after_checkpoint": "a fine-tuning epoch is reported with its checkpoint (rank 0 worker)",
}


def _parse(spec: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        name, _, n = item.partition(":")
        if name not in POINTS:
            raise ValueError(f"LENS_CRASH_AT names an unknown crash point {name!r}; known: {', '.join(POINTS)}")
        out[name] = int(n or 1)
    return out


_AT = _parse(os.environ.get("LENS_CRASH_AT"))
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    if not _AT or name not in _AT:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] < _AT[name]:
        return
    print(f"lens: LENS_CRASH_AT: killed at {name} (pass {_hits[name]})", file=sys.stderr, flush=True)
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)

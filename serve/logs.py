"""Lens's log lines in Serve's replica log files.

Ray Serve writes a replica's log (``logs/serve/replica_<app>_<deployment>_<id>.log``, with the replica's name on
every line) through the handlers it attaches to the ``ray.serve`` logger only; any other logger falls through to
Python's root logger, at WARNING. Lens's own INFO lines in a replica (a client that hung up, an ingress ready, a
search index swapped) were therefore never written anywhere. Every Lens deployment calls :func:`to_replica_log`
when it starts: the ``lens`` and ``index`` loggers then write at INFO through Serve's handlers.
"""

from __future__ import annotations

import logging

__all__ = ["to_replica_log", "LOGGERS"]

#: the loggers of Lens code that runs inside Serve replicas (``lens.serve``, ``lens.events``, ``lens.index.search`` ...)
LOGGERS = ("lens", "index")


def to_replica_log(level: int = logging.INFO) -> None:
    """Route :data:`LOGGERS` to the ``ray.serve`` logger's handlers in this process (idempotent)."""
    from ray.serve._private.constants import SERVE_LOGGER_NAME

    handlers = logging.getLogger(SERVE_LOGGER_NAME).handlers
    if not handlers:  # not in a Serve replica (Serve has not configured its logger): leave logging as it is
        return
    for name in LOGGERS:
        lg = logging.getLogger(name)
        lg.setLevel(level)
        for h in handlers:
            if h not in lg.handlers:
                lg.addHandler(h)
        lg.propagate = False  # one line per record: not again through the root logger's handlers

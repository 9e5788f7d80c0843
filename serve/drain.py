"""A clean stop under load: new requests get a JSON 503 (``Retry-After``), which clients retry elsewhere, while the
requests already in flight finish; only then does Serve stop.

Deleting a Serve application first (what a plain shutdown does) removes its route at once: every request that
arrives while the replicas finish their work gets the proxy's text/plain 404, which no client retries. Instead,
``lens serve`` starts a :class:`DrainGate` per HTTP application on SIGTERM. Each ingress replica polls its
application's gate (:class:`GateWatcher`, twice a second): once the gate is up it answers new requests 503 and
reports how many it still has in flight; ``lens serve`` waits until every replica has seen the gate and has none
left (or the grace period is over), then stops Serve.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["DrainGate", "GateWatcher", "gate_name", "NAMESPACE", "open_gates", "wait_idle"]

logger = logging.getLogger("lens.serve")

NAMESPACE = "lens"
POLL_S = 0.5


def gate_name(app: str) -> str:
    return f"lens-drain-{app}"


class DrainGate:
    """The drain state of one application: up or not, and each ingress replica's last report."""

    def __init__(self) -> None:
        self.opened_at = time.time()
        self.reports: dict[str, tuple[str, int, float]] = {}  # replica -> (deployment, in flight, when it said so)

    def report(self, replica: str, deployment: str, in_flight: int) -> bool:
        self.reports[replica] = (deployment, int(in_flight), time.time())
        return True

    def state(self) -> dict:
        return {"opened_at": self.opened_at, "reports": dict(self.reports)}


class GateWatcher:
    """In an ingress replica: polls its application's gate; ``draining`` turns true once the gate is up, and from
    then on the replica reports its requests in flight to it."""

    def __init__(self, app: str, deployment: str, replica: str, in_flight) -> None:
        self.app, self.deployment, self.replica, self._in_flight = app, deployment, replica, in_flight
        self.draining = False
        self.opened_at = float("inf")  # when the drain began (the gate's clock)
        threading.Thread(target=self._run, name="lens-drain-gate", daemon=True).start()

    def refuses(self, received_ms: str | None) -> bool:
        """Whether a request is answered 503: the drain is on and the request arrived after it began (by the front
        door's ``X-Lens-Received``; a request without it counts as arriving now). A request the front door took
        before the drain began is served, even if this replica has not started on it yet."""
        if not self.draining:
            return False
        try:
            return float(received_ms) / 1000.0 >= self.opened_at
        except (TypeError, ValueError):
            return True

    def _run(self) -> None:
        import ray

        gate = None
        while True:
            time.sleep(POLL_S)
            try:
                if gate is None:
                    gate = ray.get_actor(gate_name(self.app), namespace=NAMESPACE)
                    self.opened_at = ray.get(gate.state.remote(), timeout=5)["opened_at"]
                    self.draining = True
                    logger.warning("application %s is draining: new requests get 503", self.app)
                ray.get(gate.report.remote(self.replica, self.deployment, self._in_flight()), timeout=5)
            except ValueError:  # no gate: not draining
                continue
            except Exception:  # noqa: BLE001 - the gate going away with the cluster
                gate = None


def open_gates(app_names: list[str]) -> list:
    """Start a gate for each application (the replicas find them by name); returns their handles."""
    import ray

    cls = ray.remote(num_cpus=0)(DrainGate)
    return [cls.options(name=gate_name(n), namespace=NAMESPACE, get_if_exists=True).remote() for n in app_names]


def wait_idle(gates: list, app_names: list[str], deadline: float) -> bool:
    """Wait until, in each application, every running replica of the deployments that answer HTTP has reported,
    since its gate opened, that it has nothing in flight; False if ``deadline`` (monotonic) came first."""
    import ray
    from ray import serve

    while time.monotonic() < deadline:
        apps = serve.status().applications
        done = True
        for gate, app in zip(gates, app_names):
            st = ray.get(gate.state.remote(), timeout=10)
            fresh = [(d, n) for d, n, at in st["reports"].values() if at >= st["opened_at"]]
            status = apps.get(app)
            if status is None:
                continue
            running = {d: s.replica_states.get("RUNNING", 0) for d, s in status.deployments.items()}
            answering = {d for d, _ in fresh}
            if not answering and any(running.values()):
                done = False  # no ingress replica has seen the gate yet
            for d in answering:
                mine = [n for dd, n in fresh if dd == d]
                if len(mine) < running.get(d, 0) or any(mine):
                    done = False
        if done:
            return True
        time.sleep(POLL_S / 2)
    return False

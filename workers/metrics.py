"""Prometheus metrics of a worker: model server restarts, states and start-up times."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.exposition import generate_latest

from gateway.metrics import background_errors_counter
from gateway.records import State


class WorkerMetrics:
    """Every metric a worker exposes on its ``/metrics``."""

    def __init__(self) -> None:
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.restarts = Counter(
            "turnout_model_server_restarts", "Model servers restarted after a crash or failed health checks.",
            ["service", "deployment", "replica"], registry=r,
        )
        self.state = Gauge(
            "turnout_model_server_state", "1 for the state each hosted replica is in, 0 for the others.",
            ["service", "deployment", "replica", "state"], registry=r,
        )
        self.startup_seconds = Gauge(
            "turnout_model_server_startup_seconds", "Seconds from launch to ready (warm-up included) of the last start.",
            ["service", "deployment", "replica"], registry=r,
        )
        self.background_errors = background_errors_counter(r)

    def count_background_error(self, task: str) -> None:
        """One unexpected failure of a background loop (logged with its traceback, then retried)."""
        self.background_errors.labels(task).inc()

    def set_state(self, service: str, deployment: str, replica: int, state: State) -> None:
        """Mark ``state`` as the replica's current one."""
        for candidate in State:
            self.state.labels(service, deployment, str(replica), candidate.value).set(1 if candidate is state else 0)

    def forget(self, service: str, deployment: str, replica: int) -> None:
        """Drop a replica's series once a scale-down removed it (the series stay bounded by the replicas there are)."""
        for candidate in State:
            with contextlib.suppress(KeyError):
                self.state.remove(service, deployment, str(replica), candidate.value)
        for family in (self.restarts, self.startup_seconds):
            with contextlib.suppress(KeyError):
                family.remove(service, deployment, str(replica))

    def exposition(self) -> bytes:
        """Text exposition of every metric."""
        return generate_latest(self.registry)

"""Prometheus metrics of a gateway, on a registry of its own (so several apps can live in one process)."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import http1
from .records import Snapshot

# Model serving spans a fast tree (~1 ms) to a slow batch (~30 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Outcomes of a proxied request (the `outcome` label).
OK = "ok"
CLIENT_ERROR = "client_error"
MODEL_ERROR = "model_error"
UPSTREAM_ERROR = "upstream_error"
# Refused by the gateway because every connection to the deployment was busy: the model never saw
# it, so the guard does not count it either way.
OVERLOADED = "overloaded"

# What can change the route (the `trigger` label).
TRIGGERS = ("api", "guard", "alertmanager", "up", "canary")

__all__ = ["CONTENT_TYPE_LATEST", "GatewayMetrics", "DeploymentMetrics", "LATENCY_BUCKETS"]


class DeploymentMetrics:
    """The proxy's per-request series of one deployment of one service, as plain counters.

    Every proxied request touches these, so they skip prometheus_client's per-call lock and label
    lookup (about 4 µs a request, 8% of the proxy's CPU): the gateway is one thread, and
    :class:`_ProxyCollector` turns the counters into metric families only when /metrics is read.
    """

    __slots__ = ("service", "name", "key", "inflight", "by_code", "buckets", "duration_sum", "_upstream_errors")

    def __init__(self, metrics: GatewayMetrics, service: str, name: str) -> None:
        self.service = service
        self.name = name
        # The guard's traffic key, built once rather than per request.
        self.key = (service, name)
        self.inflight = 0
        # (code, outcome) → requests
        self.by_code: dict[tuple[int, str], int] = {}
        # Non-cumulative counts per latency bucket; the last one is +Inf.
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.duration_sum = 0.0
        self._upstream_errors = metrics.upstream_errors

    def observe(self, code: int, outcome: str, seconds: float) -> None:
        """Count one finished request."""
        key = (code, outcome)
        self.by_code[key] = self.by_code.get(key, 0) + 1
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def upstream_error(self, kind: str) -> None:
        """Count one failure to reach or hear from the model server."""
        self._upstream_errors.labels(self.service, self.name, kind).inc()


_BUCKET_LABELS = [floatToGoString(b) for b in (*LATENCY_BUCKETS, math.inf)]


class _ProxyCollector(Collector):
    """Exposes every :class:`DeploymentMetrics` as turnout_requests, _request_duration_seconds, _inflight_requests."""

    def __init__(self, deployments: dict[tuple[str, str], DeploymentMetrics]) -> None:
        self._deployments = deployments

    def describe(self) -> Iterable[Metric]:
        """Names only (lets the registry refuse a clash at registration)."""
        return self._families()

    def collect(self) -> Iterable[Metric]:
        """Current values."""
        return self._families()

    def _families(self) -> list[Metric]:
        requests = CounterMetricFamily(
            "turnout_requests", "Proxied prediction requests by service, deployment, status code and outcome.",
            labels=["service", "deployment", "code", "outcome"],
        )
        duration = HistogramMetricFamily(
            "turnout_request_duration_seconds",
            "Time from request arrival to the last response byte, per deployment.", labels=["service", "deployment"],
        )
        inflight = GaugeMetricFamily(
            "turnout_inflight_requests", "Requests being proxied right now, per deployment.", labels=["service", "deployment"]
        )
        for (service, name), dm in list(self._deployments.items()):
            for (code, outcome), count in list(dm.by_code.items()):
                requests.add_metric([service, name, str(code), outcome], count)
            cumulative = list(accumulate(dm.buckets))
            duration.add_metric([service, name], list(zip(_BUCKET_LABELS, cumulative)), dm.duration_sum)
            inflight.add_metric([service, name], dm.inflight)
        return [requests, duration, inflight]


class _ReplicaCollector(Collector):
    """Per-replica series of every deployment this process has sent requests to (bounded by the
    replicas deployments have): readiness as this process sees it, requests in flight, requests answered."""

    def __init__(self) -> None:
        # Set by GatewayMetrics.watch_replicas; until then the families are exposed empty.
        self.balancer: Any = None
        self.watcher: Any = None

    def describe(self) -> Iterable[Metric]:
        return self._families(describe=True)

    def collect(self) -> Iterable[Metric]:
        return self._families()

    def _families(self, describe: bool = False) -> list[Metric]:
        labels = ["service", "deployment", "replica"]
        ready = GaugeMetricFamily(
            "turnout_replica_ready", "1 while a replica is in this gateway's rotation, 0 while it is ejected.", labels=labels,
        )
        inflight = GaugeMetricFamily("turnout_replica_inflight", "Requests in flight to a replica from this gateway.", labels=labels)
        answered = CounterMetricFamily(
            "turnout_replica_requests", "Requests a replica answered or failed, as this gateway sent them.", labels=labels,
        )
        if not describe and self.balancer is not None:
            snapshots = self.watcher.snapshots
            for replicas in self.balancer.sets():
                snapshot = snapshots.get(replicas.service)
                if snapshot is None or replicas.deployment not in snapshot.deployments:
                    continue  # deleted: its series go
                replicas.in_rotation()  # brings back the replicas whose ejection is over
                for replica in replicas.replicas:
                    values = [replicas.service, replicas.deployment, replica.url]
                    ready.add_metric(values, 0 if replica.ejected_until else 1)
                    inflight.add_metric(values, replica.inflight)
                    answered.add_metric(values, replica.answered)
        return [ready, inflight, answered]


# Absolute differences between two versions' numeric outputs: from float noise to another answer.
SHADOW_DIFFERENCE_BUCKETS = (1e-9, 1e-6, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 100.0)
_DIFFERENCE_LABELS = [floatToGoString(b) for b in (*SHADOW_DIFFERENCE_BUCKETS, math.inf)]


def bucket_counts(bounds: tuple[float, ...], values: Iterable[float]) -> list[int]:
    """Non-cumulative counts of ``values`` per bucket of ``bounds`` (the last one is +Inf), as
    :class:`ShadowMetrics` adds them."""
    counts = [0] * (len(bounds) + 1)
    for value in values:
        counts[bisect_left(bounds, value)] += 1
    return counts


class ShadowMetrics:
    """The shadow series as plain counters, keyed by (service, deployment[, result or reason]).

    A dropped copy is counted on the client's path once per request while a shadow is frozen, and
    compared copies arrive in batches from the copier process: plain dict additions keep both cheap
    (prometheus_client's labels() lookup alone is about 3 µs); :class:`_ShadowCollector` exposes them.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.rows: dict[tuple[str, str, str], int] = {}
        self.dropped: dict[tuple[str, str, str], int] = {}
        # (service, deployment) → [non-cumulative bucket counts, sum]
        self.differences: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
        self.durations: dict[tuple[str, str], tuple[list[int], list[float]]] = {}

    def drop(self, service: str, name: str, reason: str, count: int = 1) -> None:
        """Copies not sent."""
        key = (service, name, reason)
        self.dropped[key] = self.dropped.get(key, 0) + count

    def add(self, into: dict[tuple[str, str, str], int], service: str, name: str, counts: Mapping[str, int]) -> None:
        """Add counts by result to ``requests`` or ``rows``."""
        for label, count in counts.items():
            if count:
                key = (service, name, label)
                into[key] = into.get(key, 0) + count

    @staticmethod
    def observe(into: dict[tuple[str, str], tuple[list[int], list[float]]], service: str, name: str, bounds: tuple[float, ...],
                counts: list[int], total: float) -> None:
        """Add a batch's bucket counts (from :func:`bucket_counts`) and sum to a histogram."""
        found = into.get((service, name))
        if found is None:
            found = into[(service, name)] = ([0] * (len(bounds) + 1), [0.0])
        buckets = found[0]
        for i, count in enumerate(counts):
            buckets[i] += count
        found[1][0] += total


class _ShadowCollector(Collector):
    """Exposes :class:`ShadowMetrics` as the turnout_shadow_* families."""

    def __init__(self, shadow: ShadowMetrics) -> None:
        self._shadow = shadow

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[Metric]:
        s = self._shadow
        requests = CounterMetricFamily(
            "turnout_shadow_requests", "Requests copied to a shadow, by how the two answers compared (agree, differ, "
            "shadow_error, primary_error, incomparable).", labels=["service", "deployment", "result"],
        )
        rows = CounterMetricFamily(
            "turnout_shadow_rows", "Prediction rows compared between the active and its shadow (agree or differ).",
            labels=["service", "deployment", "result"],
        )
        dropped = CounterMetricFamily(
            "turnout_shadow_dropped", "Copies for a shadow not sent (queue_full, too_large, body_not_held, shadow_down, "
            "copier_down).", labels=["service", "deployment", "reason"],
        )
        differences = HistogramMetricFamily(
            "turnout_shadow_abs_difference", "Absolute difference between the active's and the shadow's numeric outputs.",
            labels=["service", "deployment"],
        )
        durations = HistogramMetricFamily(
            "turnout_shadow_request_duration_seconds", "Time a shadow took to answer a copy (compare with "
            "turnout_request_duration_seconds of the active).", labels=["service", "deployment"],
        )
        for counter, counts in ((requests, s.requests), (rows, s.rows), (dropped, s.dropped)):
            for labels, count in list(counts.items()):
                counter.add_metric(list(labels), count)
        for histogram, histograms, names in ((differences, s.differences, _DIFFERENCE_LABELS),
                                             (durations, s.durations, _BUCKET_LABELS)):
            for where, (buckets, total) in list(histograms.items()):
                histogram.add_metric(list(where), list(zip(names, accumulate(buckets))), total[0])
        return [requests, rows, dropped, differences, durations]


def background_errors_counter(registry: CollectorRegistry) -> Counter:
    """``turnout_background_errors_total{task}``, the same series in gateways and workers (see ``loops``)."""
    return Counter(
        "turnout_background_errors", "Unexpected failures of a background task (each logged with its traceback, "
        "then retried), by task.", ["task"], registry=registry,
    )


class GatewayMetrics:
    """Every metric the gateway exposes on ``/metrics``."""

    def __init__(self) -> None:
        # The *_created series double the exposition and nothing here reads them.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._deployments: dict[tuple[str, str], DeploymentMetrics] = {}
        self._services: set[str] = set()
        r.register(_ProxyCollector(self._deployments))
        self._replicas = _ReplicaCollector()
        r.register(self._replicas)
        self.upstream_errors = Counter(
            "turnout_upstream_errors", "Failures to reach or hear from a model server, by kind.",
            ["service", "deployment", "kind"], registry=r,
        )
        self.generation = Gauge(
            "turnout_route_generation", "Generation of each service's route this gateway applies.", ["service"], registry=r,
        )
        self.active = Gauge(
            "turnout_active_deployment", "1 for the deployment receiving a service's traffic, 0 for the others.",
            ["service", "deployment"], registry=r,
        )
        self.ready = Gauge(
            "turnout_deployment_ready", "1 when a deployment is ready to serve (as this gateway sees it).",
            ["service", "deployment"], registry=r,
        )
        self.weight = Gauge(
            "turnout_route_weight", "Percent of a service's (unpinned) requests a deployment receives: 100 for the "
            "active without a split, the split's weight for a canary candidate and the rest for the active.",
            ["service", "deployment"], registry=r,
        )
        self.shadow = ShadowMetrics()
        r.register(_ShadowCollector(self.shadow))
        self.canary_running = Gauge(
            "turnout_canary_running", "1 while a service's canary plan runs (paused or ended: 0).", ["service"], registry=r,
        )
        self.canary_step_started = Gauge(
            "turnout_canary_step_started_timestamp_seconds", "When the running plan's current step began (Unix time).",
            ["service"], registry=r,
        )
        self.canary_step_seconds = Gauge(
            "turnout_canary_step_seconds", "How long each step of the service's plan holds its weight.", ["service"], registry=r,
        )
        self.store_up = Gauge("turnout_store_up", "1 while the route store (Redis) answers, 0 during an outage.", registry=r)
        self.store_errors = Counter(
            "turnout_store_errors", "Failed reads of the route store (each is retried; the last route keeps serving).", registry=r,
        )
        self.route_updates = Counter(
            "turnout_route_updates", "Snapshots applied by this gateway, by what caused the read.", ["source"], registry=r,
        )
        self.generation_regressions = Counter(
            "turnout_route_generation_regressions",
            "Reads whose route generation was below the one this gateway held (a Redis failover lost changes); "
            "the lower route is not applied, and the store's generation is lifted above the lost ones.",
            ["service"], registry=r,
        )
        self.switches = Counter(
            "turnout_switches", "Route changes applied through Turnout, by service and trigger.", ["service", "trigger"], registry=r,
        )
        self.rollbacks = Counter(
            "turnout_rollbacks", "Rollbacks to the previous deployment, by service and trigger.", ["service", "trigger"], registry=r,
        )
        self.replica_ejections = Counter(
            "turnout_replica_ejections", "Replicas taken out of this gateway's rotation after consecutive failures.",
            ["service", "deployment", "replica"], registry=r,
        )
        self.replica_retries = Counter(
            "turnout_replica_retries", "Requests sent to a second replica because the first could not be reached "
            "(nothing had been sent).", ["service", "deployment"], registry=r,
        )
        self.bad_requests = Counter(
            "turnout_bad_requests", "Client requests refused before routing (malformed, too large, too slow), by reason.",
            ["reason"], registry=r,
        )
        self.background_errors = background_errors_counter(r)
        self.replays = Counter(
            "turnout_replays",
            "Inputs the active deployment crashed on, replayed to the previous one, by service and verdict.",
            ["service", "verdict"], registry=r,
        )
        self.guard_leader = Gauge("turnout_guard_leader", "1 while this replica is the one whose guard decides.", registry=r)
        self.guard_paused = Gauge(
            "turnout_guard_paused", "1 while an operator has paused a service's guard.", ["service"], registry=r,
        )
        self.guard_latched = Gauge(
            "turnout_guard_latched", "1 after an automatic rollback of a service, until an operator acts.", ["service"],
            registry=r,
        )
        # Series exist at 0 from the start: a counter born at 1 hides its first increase from rate().
        for reason in http1.REASONS:
            self.bad_requests.labels(reason)

    def count_background_error(self, task: str) -> None:
        """One unexpected failure of a background loop (see :mod:`gateway.loops`)."""
        self.background_errors.labels(task).inc()

    def count_bad_request(self, reason: str) -> None:
        """One refused client request (see :class:`gateway.http1.BadRequests`)."""
        self.bad_requests.labels(reason).inc()

    def watch_replicas(self, balancer: Any, watcher: Any) -> None:
        """Expose the replicas of ``balancer`` (a :class:`gateway.balancer.Balancer`), skipping deployments
        the ``watcher``'s snapshots no longer hold."""
        self._replicas.balancer, self._replicas.watcher = balancer, watcher

    def deployment(self, service: str, name: str) -> DeploymentMetrics:
        """The bound metrics of one deployment of a service."""
        key = (service, name)
        found = self._deployments.get(key)
        if found is None:
            found = self._deployments[key] = DeploymentMetrics(self, service, name)
        return found

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Mirror a service's route and readiness gauges; deployments that disappeared drop their series."""
        service = snapshot.service
        if service not in self._services:
            self._services.add(service)
            for trigger in TRIGGERS:
                self.switches.labels(service, trigger)
                self.rollbacks.labels(service, trigger)
        self.generation.labels(service).set(snapshot.route.generation)
        route = snapshot.route
        # What the candidate really receives: nothing while it cannot serve (its share stays with the active).
        split = route.weight if route.candidate is not None and snapshot.serving(route.candidate) else 0.0
        for name in snapshot.deployments:
            self.active.labels(service, name).set(1 if name == route.active else 0)
            self.ready.labels(service, name).set(1 if snapshot.is_ready(name) else 0)
            self.weight.labels(service, name).set(100 - split if name == route.active else split if name == route.candidate else 0)
        plan = snapshot.plan
        running = plan is not None and plan.state == "running"
        self.canary_running.labels(service).set(1 if running else 0)
        self.canary_step_started.labels(service).set(plan.step_started_at if plan is not None and running else 0)
        self.canary_step_seconds.labels(service).set(plan.step_seconds if plan is not None else 0)
        for gauge in (self.active, self.ready, self.weight):
            for svc, name in list(gauge._metrics):
                if svc == service and name not in snapshot.deployments:
                    gauge.remove(svc, name)

    def forget_service(self, service: str) -> None:
        """A deleted service's gauges go (its counters stay: a rate must not see them drop)."""
        self._services.discard(service)
        for gauge in (self.active, self.ready, self.weight):
            for svc, name in list(gauge._metrics):
                if svc == service:
                    gauge.remove(svc, name)
        for gauge in (self.generation, self.guard_paused, self.guard_latched, self.canary_running, self.canary_step_started,
                      self.canary_step_seconds):
            if (service,) in gauge._metrics:
                gauge.remove(service)

    def exposition(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)

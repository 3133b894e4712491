"""Replicas of one deployment as this gateway process sees them: least-outstanding-requests balancing
with power of two choices, and passive outlier ejection, both after Envoy.

Envoy's ``LEAST_REQUEST`` load balancer picks two distinct healthy hosts at random and sends the request
to the one with fewer requests in flight; its outlier detection ejects a host after N consecutive
gateway failures (connect errors, resets, timeouts, 5xx) for a base time multiplied by the number of
times it was ejected, never more than a percentage of the cluster at once, and lets it back when the
time is up. In-flight counts and ejections are this process's own (every gateway process judges what
it sees), so nothing here touches the store.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_NEVER = math.inf


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """When a replica is ejected, and for how long."""

    # Consecutive failures (connect error, reset, timeout, 5xx) that eject a replica.
    consecutive_failures: int = 5
    # First ejection; each further one lasts this times the number of ejections so far.
    base_ejection: float = 10.0
    # Longest single ejection.
    max_ejection: float = 300.0
    # At most this share of a deployment's replicas are ejected at once (rounded down, so a deployment
    # of one replica is never ejected: there is nothing to send its traffic to instead).
    max_ejection_percent: int = 50


class Replica(Generic[T]):
    """One model-server process of a deployment: where it is, and what this process knows of it."""

    __slots__ = ("url", "target", "inflight", "answered", "failures", "ejected_until", "ejections")

    def __init__(self, url: str, target: T) -> None:
        self.url = url
        self.target = target
        self.inflight = 0
        self.answered = 0
        # Consecutive failures since the last success.
        self.failures = 0
        # Clock time until which it gets no requests (0: in rotation).
        self.ejected_until = 0.0
        self.ejections = 0

    def ejected(self, now: float) -> bool:
        """Out of rotation at ``now``."""
        return self.ejected_until > now


class ReplicaSet(Generic[T]):
    """The replicas of one deployment of one service, balanced and watched for outliers."""

    def __init__(self, service: str, deployment: str, policy: OutlierPolicy,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 round_robin: bool = False) -> None:
        self.service = service
        self.deployment = deployment
        self.policy = policy
        # In turn instead of the less busy of two (nginx's default; kept to compare against).
        self.round_robin = round_robin
        self._turn = 0
        self._clock = clock
        self._rng = rng or random.Random()
        self.replicas: list[Replica[T]] = []
        # The one replica of a deployment that has one (never ejected): picked without a draw.
        self.only: Replica[T] | None = None
        self._next_return = _NEVER
        # Replicas in rotation (all of them unless some are ejected), rebuilt when that changes.
        self._rotation: list[Replica[T]] = []

    def update(self, urls: Sequence[str], target_of: Callable[[str], T]) -> None:
        """Take the deployment's current replica URLs, keeping what is known of the ones that stay."""
        if [r.url for r in self.replicas] == list(urls):
            return
        known = {r.url: r for r in self.replicas}
        self.replicas = [known.get(url) or Replica(url, target_of(url)) for url in urls]
        self.only = self.replicas[0] if len(self.replicas) == 1 else None
        self._rebuild(self._clock())

    def _rebuild(self, now: float) -> None:
        self._rotation = [r for r in self.replicas if not r.ejected(now)]
        self._next_return = min((r.ejected_until for r in self.replicas if r.ejected(now)), default=_NEVER)

    def pick(self, avoid: Replica[T] | None = None) -> Replica[T] | None:
        """The replica for the next request (None when none can take it): the one with fewer requests in
        flight of two distinct ones drawn at random from those in rotation, never ``avoid``."""
        rotation = self._rotation
        if self._next_return != _NEVER and self._clock() >= self._next_return:
            self._return_due()
            rotation = self._rotation
        if avoid is not None:
            rotation = [r for r in rotation if r is not avoid]
        count = len(rotation)
        if count == 1:
            return rotation[0]
        if count == 0:
            return None
        if self.round_robin:
            self._turn += 1
            return rotation[self._turn % count]
        rng = self._rng
        first = rotation[int(rng.random() * count)]
        second = rotation[int(rng.random() * (count - 1))]
        if second is first:
            # Two distinct draws: the second comes from the others (the last one stands in for the first).
            second = rotation[count - 1]
        return first if first.inflight <= second.inflight else second

    def _return_due(self) -> None:
        now = self._clock()
        for replica in self.replicas:
            if 0 < replica.ejected_until <= now:
                replica.ejected_until = 0.0
                log.info("service %s deployment %s: replica %s back in rotation", self.service, self.deployment, replica.url)
        self._rebuild(now)

    def succeeded(self, replica: Replica[T]) -> None:
        """A request it answered (any status below 500, a model's own failure included: it is the
        version that is bad then, not the process)."""
        replica.failures = 0
        replica.answered += 1

    def failed(self, replica: Replica[T]) -> bool:
        """A gateway failure of the replica (it could not be reached, broke off, timed out or answered
        5xx); True when this ejected it."""
        replica.failures += 1
        replica.answered += 1
        if replica.failures < self.policy.consecutive_failures:
            return False
        now = self._clock()
        if replica.ejected(now):
            return False
        allowed = len(self.replicas) * self.policy.max_ejection_percent // 100
        if sum(1 for r in self.replicas if r.ejected(now)) >= allowed:
            return False
        replica.ejections += 1
        seconds = min(self.policy.base_ejection * replica.ejections, self.policy.max_ejection)
        replica.ejected_until = now + seconds
        replica.failures = 0
        self._rebuild(now)
        log.warning("service %s deployment %s: replica %s ejected for %.0f s after %d consecutive failures "
                    "(ejection %d)", self.service, self.deployment, replica.url, seconds,
                    self.policy.consecutive_failures, replica.ejections)
        return True

    def in_rotation(self) -> int:
        """How many replicas take requests now."""
        if self._next_return != _NEVER and self._clock() >= self._next_return:
            self._return_due()
        return len(self._rotation)


class Balancer(Generic[T]):
    """Every deployment's :class:`ReplicaSet` in this process, kept across route snapshots."""

    def __init__(self, policy: OutlierPolicy, target_of: Callable[[str], T],
                 clock: Callable[[], float] = time.monotonic, round_robin: bool = False) -> None:
        self.policy = policy
        self.round_robin = round_robin
        self._target_of = target_of
        self._clock = clock
        self._sets: dict[tuple[str, str], ReplicaSet[T]] = {}

    def replicas(self, service: str, deployment: str, urls: Sequence[str]) -> ReplicaSet[T]:
        """The deployment's replica set, brought up to date with its URLs."""
        key = (service, deployment)
        found = self._sets.get(key)
        if found is None:
            found = self._sets[key] = ReplicaSet(service, deployment, self.policy, self._clock, round_robin=self.round_robin)
        found.update(urls, self._target_of)
        return found

    def known(self, service: str, deployment: str) -> list[Replica[T]]:
        """The replicas this process has sent a deployment's requests to (none before its first request)."""
        found = self._sets.get((service, deployment))
        if found is None:
            return []
        found.in_rotation()  # brings back the replicas whose ejection is over
        return list(found.replicas)

    def sets(self) -> list[ReplicaSet[T]]:
        """Every replica set (for metrics and the admin API)."""
        return list(self._sets.values())

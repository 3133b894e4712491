"""Keeps each gateway's routing snapshots current: pub/sub for speed, polling as the truth, fail static."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from types import MappingProxyType

from .keys import SERVICE_CHANGED, SUBSCRIBED
from .loops import Loop, Loops
from .metrics import GatewayMetrics
from .records import DEFAULT_SERVICE, HistoryEntry, Snapshot, Who
from .store import Store, StoreUnavailable

log = logging.getLogger(__name__)

_RECONNECT_MIN = 0.05
_RECONNECT_MAX = 2.0
_WATCHER = Who(actor="turnout-gateway", client=None, trigger="failover")


class RouteWatcher:
    """Owns one :class:`Snapshot` per service; the hot path reads ``watcher.snapshots[service]`` and never awaits.

    One refresher task reads the store whenever it is told something changed: one service after an
    event naming it, every service (only the changed ones parsed, by fingerprint) on a poll tick, a
    (re-)subscription or a service created or deleted. Reads are serialized, so an older read never
    overtakes a newer one, and a snapshot with a lower route generation than the one held for its
    service is never applied. Each service's snapshot is swapped on its own.
    """

    def __init__(
        self,
        store: Store,
        metrics: GatewayMetrics,
        poll_interval: float = 1.0,
        loops: Loops | None = None,
        default_service: str = DEFAULT_SERVICE,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.loops = loops or Loops(metrics.count_background_error)
        self.default_service = default_service
        # Empty until the first successful read: the gateway answers 503, never a default backend.
        self.snapshots: Mapping[str, Snapshot] = MappingProxyType({})
        self.store_up: bool | None = None
        self._fingerprints: dict[str, str] = {}
        self._dirty = asyncio.Event()
        self._full = True
        self._pending: set[str] = set()
        self._pending_source = "initial"
        self._first = asyncio.Event()
        self._reconnect_delay = _RECONNECT_MIN
        self._loops: list[Loop] = []
        # Per service: (the store's generation, the higher one held here) awaiting a lift.
        self._regressions: dict[str, tuple[int, int]] = {}

    @property
    def snapshot(self) -> Snapshot | None:
        """The default service's snapshot (what the unprefixed endpoints serve)."""
        return self.snapshots.get(self.default_service)

    @property
    def ready(self) -> bool:
        """A first full read has succeeded."""
        return self._first.is_set()

    async def start(self) -> None:
        """Start the refresher, the subscriber and the poller."""
        self._mark_dirty("initial")
        self._loops = [
            self.loops.every("route-refresh", 0, self._refresh_once),
            self.loops.every("route-subscribe", 0, self._listen_once),
            self.loops.every("route-poll", self.poll_interval, self._poll_once),
        ]

    async def stop(self) -> None:
        """Cancel the background loops and wait for them."""
        await self.loops.cancel(*self._loops)
        self._loops = []

    async def wait_ready(self, timeout: float | None = None) -> Mapping[str, Snapshot]:
        """Wait until a first full read has been applied."""
        await asyncio.wait_for(self._first.wait(), timeout)
        return self.snapshots

    async def refresh(self, source: str = "manual", service: str | None = None) -> None:
        """Read the store now (one service, or all) and apply what it holds (used after this gateway
        changed something itself)."""
        if service is None:
            reading = await self.store.read_all(self._fingerprints)
            self._set_store_up(True)
            for name, (snapshot, fingerprint) in reading.changed.items():
                self._apply(snapshot, source, fingerprint)
            for gone in set(self.snapshots) - reading.services:
                self._remove(gone)
            self._first.set()
        else:
            snapshot = await self.store.read_snapshot(service=service)
            self._set_store_up(True)
            if await self.store.service_exists(service):
                self._apply(snapshot, source, None)
            else:
                self._remove(service)
        await self._lift_regressions()

    async def _lift_regressions(self) -> None:
        while self._regressions:
            service, (seen, held) = self._regressions.popitem()
            entry = HistoryEntry(
                action="generation_regressed", who=_WATCHER, result="applied", generation=held + 1,
                reason="the route store went back in generation (a Redis failover lost acknowledged changes, "
                       "or the service was deleted and created again unseen)",
                detail=f"the store held generation {seen}, this gateway {held}; the store's route is kept and "
                       f"re-stamped as generation {held + 1} so every gateway applies it",
                extra={"store_generation": seen, "held_generation": held},
            )
            # Only the first gateway to see it lifts (and writes the history line); the others find the
            # generation moved and simply read the lifted route.
            try:
                await self.store.lift_generation(seen, held, service=service, history=entry)
            except BaseException:
                self._regressions.setdefault(service, (seen, held))  # lifted on the next successful read
                raise
            self._fingerprints.pop(service, None)
            self._mark_dirty("lift", service)

    def _mark_dirty(self, source: str, service: str | None = None) -> None:
        self._pending_source = source
        if service is None:
            self._full = True
        else:
            self._pending.add(service)
        self._dirty.set()

    def _apply(self, snapshot: Snapshot, source: str, fingerprint: str | None = None) -> None:
        service = snapshot.service
        current = self.snapshots.get(service)
        if fingerprint is None:
            self._fingerprints.pop(service, None)  # the next poll parses this service once more
        else:
            self._fingerprints[service] = fingerprint
        if current is not None:
            if snapshot.route.generation < current.route.generation:
                # Reads are serialized, so this is no stale read: the store itself went back (a failover to
                # a replica that had not received the latest changes). Reported, not applied; the refresher
                # lifts the store's generation so the fleet converges and later changes are not ignored.
                self.metrics.generation_regressions.labels(service).inc()
                if snapshot.route.active is None:
                    # The store came back empty (a Redis without persistence restarted): nothing to converge
                    # on, so keep serving (fail-static) until someone sets a route there.
                    log.error("service %s: the store's route went back from generation %d (held here) to %d with "
                              "no active deployment; keeping the route held here", service,
                              current.route.generation, snapshot.route.generation)
                    return
                log.error(
                    "service %s: the store's route went back from generation %d (held here) to %d (active=%s): "
                    "a Redis failover lost changes. Not applied as is; the store's route is re-stamped as "
                    "generation %d (recorded in the history) so every gateway converges on it",
                    service, current.route.generation, snapshot.route.generation, snapshot.route.active,
                    current.route.generation + 1,
                )
                self._regressions[service] = (snapshot.route.generation, current.route.generation)
                return
            if snapshot == current:
                return
        snapshots = dict(self.snapshots)
        snapshots[service] = snapshot
        self.snapshots = MappingProxyType(snapshots)
        self.metrics.route_updates.labels(source).inc()
        self.metrics.apply_snapshot(snapshot)
        if current is None or current.route != snapshot.route:
            log.info(
                "service %s route generation %d: active=%s previous=%s (%s)",
                service, snapshot.route.generation, snapshot.route.active, snapshot.route.previous, source,
            )

    def _remove(self, service: str) -> None:
        if service not in self.snapshots:
            return
        snapshots = dict(self.snapshots)
        del snapshots[service]
        self.snapshots = MappingProxyType(snapshots)
        self._fingerprints.pop(service, None)
        self.metrics.forget_service(service)
        log.info("service %s deleted", service)

    def _set_store_up(self, up: bool, error: Exception | None = None) -> None:
        if not up:
            self.metrics.store_errors.inc()
        if up == self.store_up:
            return
        self.store_up = up
        self.metrics.store_up.set(1 if up else 0)
        if up:
            log.info("route store reachable")
        else:
            log.error("route store unreachable (%s); serving the last known routes", error)

    async def _refresh_once(self) -> None:
        await self._dirty.wait()
        self._dirty.clear()
        source, full, services = self._pending_source, self._full, self._pending
        self._full, self._pending = False, set()
        try:
            if full:
                await self.refresh(source)
            else:
                for service in sorted(services):
                    await self.refresh(source, service)
        except StoreUnavailable as exc:
            self._set_store_up(False, exc)
            self._requeue(source, full, services)
        except BaseException:
            self._requeue(source, full, services)  # read again once the loop's back-off is over
            raise

    def _requeue(self, source: str, full: bool, services: set[str]) -> None:
        if full:
            self._mark_dirty(source)
        for service in services:
            self._mark_dirty(source, service)
        self._dirty.clear()  # the poll or the next event wakes the refresher; no busy retry

    async def _poll_once(self) -> None:
        self._mark_dirty("poll")

    async def _listen_once(self) -> None:
        """One subscription, until it breaks; then wait a little longer each time before the next."""
        try:
            async for event in self.store.events():
                self._reconnect_delay = _RECONNECT_MIN
                kind, service = event.get("kind"), event.get("service")
                if kind == SUBSCRIBED:
                    # A (re)subscription may have missed messages: re-read everything.
                    self._mark_dirty("resubscribe")
                elif kind == SERVICE_CHANGED or not isinstance(service, str):
                    self._mark_dirty("event")
                else:
                    self._mark_dirty("event", service)
        except StoreUnavailable as exc:
            self._set_store_up(False, exc)
        await asyncio.sleep(self._reconnect_delay)
        self._reconnect_delay = min(self._reconnect_delay * 2, _RECONNECT_MAX)

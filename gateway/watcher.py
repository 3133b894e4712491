"""Keeps each gateway's routing snapshot current: pub/sub for speed, polling as the truth, fail static."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .keys import SUBSCRIBED
from .loops import Loop, Loops
from .metrics import GatewayMetrics
from .records import Snapshot
from .store import Store, StoreUnavailable

log = logging.getLogger(__name__)

_RECONNECT_MIN = 0.05
_RECONNECT_MAX = 2.0


class RouteWatcher:
    """Owns the current :class:`Snapshot`; the hot path reads ``watcher.snapshot`` and never awaits.

    One refresher task reads the store whenever it is told something changed (a published event,
    a poll tick, a re-subscription); reads are serialized, so an older read never overtakes a newer
    one, and a snapshot with a lower route generation than the one held is never applied.
    """

    def __init__(
        self,
        store: Store,
        metrics: GatewayMetrics,
        poll_interval: float = 1.0,
        on_change: Callable[[Snapshot | None, Snapshot], None] | None = None,
        loops: Loops | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.on_change = on_change
        self.loops = loops or Loops(metrics.count_background_error)
        # None until the first successful read: the gateway answers 503, never a default backend.
        self.snapshot: Snapshot | None = None
        self.store_up: bool | None = None
        self._dirty = asyncio.Event()
        self._pending_source = "initial"
        self._first = asyncio.Event()
        self._reconnect_delay = _RECONNECT_MIN
        self._loops: list[Loop] = []

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

    async def wait_ready(self, timeout: float | None = None) -> Snapshot:
        """Wait until a first snapshot has been read."""
        await asyncio.wait_for(self._first.wait(), timeout)
        assert self.snapshot is not None
        return self.snapshot

    async def refresh(self, source: str = "manual") -> Snapshot | None:
        """Read the store now and apply what it holds (used after this gateway changed the route itself)."""
        snapshot = await self.store.read_snapshot()
        self._set_store_up(True)
        self._apply(snapshot, source)
        return self.snapshot

    def _mark_dirty(self, source: str) -> None:
        self._pending_source = source
        self._dirty.set()

    def _apply(self, snapshot: Snapshot, source: str) -> None:
        current = self.snapshot
        if current is not None:
            if snapshot.route.generation < current.route.generation:
                log.warning(
                    "ignoring a route with generation %d older than the one held (%d)",
                    snapshot.route.generation, current.route.generation,
                )
                return
            if snapshot == current:
                return
        self.snapshot = snapshot
        self.metrics.route_updates.labels(source).inc()
        self.metrics.apply_snapshot(snapshot)
        if current is None or current.route != snapshot.route:
            log.info(
                "route generation %d: active=%s previous=%s (%s)",
                snapshot.route.generation, snapshot.route.active, snapshot.route.previous, source,
            )
        self._first.set()
        if self.on_change is not None:
            self.on_change(current, snapshot)

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
            log.error("route store unreachable (%s); serving the last known route", error)

    async def _refresh_once(self) -> None:
        await self._dirty.wait()
        self._dirty.clear()
        source = self._pending_source
        try:
            await self.refresh(source)
        except StoreUnavailable as exc:
            self._set_store_up(False, exc)
        except BaseException:
            self._mark_dirty(source)  # read again once the loop's back-off is over
            raise

    async def _poll_once(self) -> None:
        self._mark_dirty("poll")

    async def _listen_once(self) -> None:
        """One subscription, until it breaks; then wait a little longer each time before the next."""
        try:
            async for event in self.store.events():
                self._reconnect_delay = _RECONNECT_MIN
                # A (re)subscription may have missed messages: re-read everything.
                self._mark_dirty("resubscribe" if event.get("kind") == SUBSCRIBED else "event")
        except StoreUnavailable as exc:
            self._set_store_up(False, exc)
        await asyncio.sleep(self._reconnect_delay)
        self._reconnect_delay = min(self._reconnect_delay * 2, _RECONNECT_MAX)

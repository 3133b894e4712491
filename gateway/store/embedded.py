"""The embedded store: all state in this process, for one gateway process (``turnout up``/``demo`` without Redis)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType
from typing import Any

from ..keys import DEPLOYMENT_CHANGED, ROUTE_CHANGED, SUBSCRIBED
from ..records import Deployment, HistoryEntry, Route, Snapshot, encode_changes
from ..traffic import add_row
from .base import DEFAULT_HISTORY_MAX, RouteChange, Store


class EmbeddedStore(Store):
    """All state in this process: for a single gateway process (``turnout up``/``demo`` without Redis).

    Every method runs without awaiting in between its reads and writes, so on one event loop each
    is as atomic as the Redis scripts it mirrors.
    """

    def __init__(self, history_max: int = DEFAULT_HISTORY_MAX) -> None:
        self.history_max = history_max
        self._route = Route()
        self._deployments: dict[str, Deployment] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._history: deque[dict[str, Any]] = deque(maxlen=history_max)
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._stats: dict[str, dict[int, dict[int, int]]] = {}
        self._roles: dict[str, tuple[str, float]] = {}
        self._guard: dict[str, str] = {}
        self._seen: dict[str, float] = {}

    def _publish(self, kind: str, **fields: Any) -> None:
        message = {"kind": kind, **fields}
        for queue in self._subscribers:
            queue.put_nowait(message)

    def _live(self, name: str, now: float) -> bool:
        dep = self._deployments.get(name)
        if dep is not None and dep.external:
            return True
        lease = self._leases.get(name)
        return lease is not None and lease[1] > now

    async def read_snapshot(self) -> Snapshot:
        now = time.monotonic()
        return Snapshot(
            route=self._route,
            deployments=MappingProxyType(dict(self._deployments)),
            live=frozenset(n for n in self._deployments if self._live(n, now)),
        )

    async def set_route(
        self,
        active: str,
        previous: str | None,
        *,
        expected_generation: int | None = None,
        history: HistoryEntry | None = None,
    ) -> RouteChange:
        current = self._route
        if expected_generation is not None and expected_generation != current.generation:
            return RouteChange(False, current, "conflict")
        if active not in self._deployments:
            return RouteChange(False, current, "unknown")
        self._route = Route(active=active, previous=previous, generation=current.generation + 1, changed_at=time.time())
        if history is not None:
            self._history.appendleft(history.but(generation=self._route.generation).to_json())
        self._publish(ROUTE_CHANGED, generation=self._route.generation)
        return RouteChange(True, self._route)

    async def create_deployment(self, deployment: Deployment, *, history: HistoryEntry | None = None) -> bool:
        if deployment.name in self._deployments:
            return False
        self._deployments[deployment.name] = deployment
        if history is not None:
            self._history.appendleft(history.to_json())
        self._publish(DEPLOYMENT_CHANGED, name=deployment.name)
        return True

    async def update_deployment(self, name: str, *, owner: str | None = None, **changes: Any) -> bool:
        dep = self._deployments.get(name)
        if dep is None:
            return False
        if owner is not None:
            lease = self._leases.get(name)
            if lease is None or lease[0] != owner or lease[1] <= time.monotonic():
                return False
        # Round-trip through the stored form so both stores accept and return the same values.
        merged: dict[str, str | None] = {**dep.to_fields(), **encode_changes(changes)}
        self._deployments[name] = Deployment.from_fields({k: v for k, v in merged.items() if v is not None})
        self._publish(DEPLOYMENT_CHANGED, name=name)
        return True

    async def delete_deployment(
        self, name: str, *, force: bool = False, history: HistoryEntry | None = None
    ) -> str | None:
        if name not in self._deployments:
            return "unknown"
        if not force:
            if self._route.active == name:
                return "active"
            if self._route.previous == name:
                return "previous"
        if self._route.previous == name:
            self._route = Route(self._route.active, None, self._route.generation, self._route.changed_at)
        del self._deployments[name]
        self._leases.pop(name, None)
        if history is not None:
            self._history.appendleft(history.to_json())
        self._publish(DEPLOYMENT_CHANGED, name=name)
        return None

    async def claim(self, name: str, owner: str, ttl: float) -> bool:
        now = time.monotonic()
        lease = self._leases.get(name)
        if lease is not None and lease[0] != owner and lease[1] > now:
            return False
        newly_live = not self._live(name, now)
        self._leases[name] = (owner, now + ttl)
        if newly_live:
            self._publish(DEPLOYMENT_CHANGED, name=name)
        return True

    async def release(self, name: str, owner: str) -> None:
        lease = self._leases.get(name)
        if lease is not None and lease[0] == owner:
            del self._leases[name]
            self._publish(DEPLOYMENT_CHANGED, name=name)

    async def append_history(self, entry: HistoryEntry) -> None:
        self._history.appendleft(entry.to_json())

    async def read_history(self, offset: int = 0, limit: int = 50) -> tuple[list[HistoryEntry], int]:
        items = list(self._history)
        # Through JSON, as the Redis store: what a caller gets is what was stored, never a shared object.
        return [HistoryEntry.from_json(json.loads(json.dumps(e))) for e in items[offset : offset + limit]], len(items)

    async def add_stats(self, pending: Mapping[str, Mapping[int, Mapping[int, int]]], ttl: int = 180) -> None:
        oldest = int(time.time()) - ttl
        for deployment, per in pending.items():
            mine = self._stats.setdefault(deployment, {})
            for second, row in per.items():
                add_row(mine.setdefault(second, {}), row)
            for second in [s for s in mine if s < oldest]:
                del mine[second]

    async def read_stats(self, deployment: str, first_second: int, last_second: int) -> dict[int, int]:
        total: dict[int, int] = {}
        for second, row in self._stats.get(deployment, {}).items():
            if first_second <= second <= last_second:
                add_row(total, row)
        return total

    async def hold_role(self, role: str, owner: str, ttl: float) -> bool:
        now = time.monotonic()
        holder = self._roles.get(role)
        if holder is not None and holder[0] != owner and holder[1] > now:
            return False
        self._roles[role] = (owner, now + ttl)
        return True

    async def get_guard(self) -> dict[str, str]:
        return dict(self._guard)

    async def set_guard(self, **fields: str | None) -> None:
        for key, value in fields.items():
            if value is None:
                self._guard.pop(key, None)
            else:
                self._guard[key] = value

    async def first_time(self, token: str, ttl: float) -> bool:
        now = time.monotonic()
        for key in [k for k, until in self._seen.items() if until <= now]:
            del self._seen[key]
        if token in self._seen:
            return False
        self._seen[token] = now + ttl
        return True

    async def events(self) -> AsyncIterator[dict[str, Any]]:  # type: ignore[override]
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            yield {"kind": SUBSCRIBED}
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

"""The embedded store: all state in this process, for one gateway process (``turnout up``/``demo`` without Redis)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from ..keys import DEPLOYMENT_CHANGED, ROUTE_CHANGED, SERVICE_CHANGED, SUBSCRIBED
from ..records import (
    DEFAULT_SERVICE, Deployment, HistoryEntry, Plan, Route, ServiceConfig, Snapshot, encode_changes, replica_key,
)
from ..traffic import add_row
from .base import DEFAULT_HISTORY_MAX, Reading, RouteChange, StatsRows, Store


class _Service:
    """One service's state."""

    def __init__(self, name: str, config: ServiceConfig, history_max: int) -> None:
        self.name = name
        self.config = config
        self.route = Route()
        self.deployments: dict[str, Deployment] = {}
        self.leases: dict[str, tuple[str, float]] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=history_max)
        self.stats: dict[str, dict[int, dict[int, int]]] = {}
        self.guard: dict[str, str] = {}
        self.plan: Plan | None = None
        # Rises on every change: with the live set, the fingerprint a poll compares.
        self.version = 0

    def live(self, name: str, now: float) -> bool:
        dep = self.deployments.get(name)
        if dep is not None and dep.external:
            return True
        lease = self.leases.get(name)
        return lease is not None and lease[1] > now

    def snapshot(self, now: float) -> Snapshot:
        live = {n for n in self.deployments if self.live(n, now)}
        # The other replicas' leases (``name#index``) of deployments that still exist.
        live.update(k for k, (_, until) in self.leases.items() if until > now and k.partition("#")[0] in self.deployments)
        return Snapshot(
            route=self.route,
            deployments=MappingProxyType(dict(self.deployments)),
            live=frozenset(live),
            service=self.name,
            config=self.config,
            plan=self.plan,
        )


class EmbeddedStore(Store):
    """All state in this process: for a single gateway process (``turnout up``/``demo`` without Redis).

    Every method runs without awaiting in between its reads and writes, so on one event loop each
    is as atomic as the Redis scripts it mirrors.
    """

    def __init__(self, history_max: int = DEFAULT_HISTORY_MAX) -> None:
        self.history_max = history_max
        self._services: dict[str, _Service] = {DEFAULT_SERVICE: _Service(DEFAULT_SERVICE, ServiceConfig(), history_max)}
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._roles: dict[str, tuple[str, float]] = {}
        self._seen: dict[str, float] = {}

    def _publish(self, kind: str, **fields: Any) -> None:
        message = {"kind": kind, **fields}
        for queue in self._subscribers:
            queue.put_nowait(message)

    def _changed(self, svc: _Service, kind: str, **fields: Any) -> None:
        svc.version += 1
        self._publish(kind, service=svc.name, **fields)

    def _service(self, name: str) -> _Service | None:
        return self._services.get(name)

    # --- services ---------------------------------------------------------------------------
    async def list_services(self) -> list[str]:
        return sorted(self._services)

    async def create_service(self, name: str, config: ServiceConfig, *, history: HistoryEntry | None = None) -> bool:
        if name in self._services:
            return False
        svc = self._services[name] = _Service(name, config, self.history_max)
        if history is not None:
            svc.history.appendleft(history.to_json())
        self._changed(svc, SERVICE_CHANGED)
        return True

    async def delete_service(self, name: str, *, force: bool = False, history: HistoryEntry | None = None,
                             history_service: str = DEFAULT_SERVICE) -> str | None:
        svc = self._services.get(name)
        if svc is None:
            return "unknown"
        if name == DEFAULT_SERVICE:
            return "default"
        if svc.deployments and not force:
            return "not_empty"
        del self._services[name]
        keeper = self._services.get(history_service)
        if history is not None and keeper is not None:
            keeper.history.appendleft(history.to_json())
        self._publish(SERVICE_CHANGED, service=name)
        return None

    async def set_service_config(self, name: str, overrides: Mapping[str, Any | None], *,
                                 history: HistoryEntry | None = None) -> bool:
        svc = self._services.get(name)
        if svc is None:
            return False
        if history is not None:
            svc.history.appendleft(history.to_json())
        merged = {**svc.config.to_fields(), **{k: json.dumps(v) for k, v in overrides.items() if v is not None}}
        for key, value in overrides.items():
            if value is None:
                merged.pop(key, None)
        svc.config = ServiceConfig.from_fields(merged)
        self._changed(svc, SERVICE_CHANGED)
        return True

    async def read_all(self, known: Mapping[str, str]) -> Reading:
        now = time.monotonic()
        changed: dict[str, tuple[Snapshot, str]] = {}
        for name, svc in self._services.items():
            snapshot = svc.snapshot(now)
            fingerprint = f"{svc.version}:{','.join(sorted(snapshot.live))}"
            if known.get(name) != fingerprint:
                changed[name] = (snapshot, fingerprint)
        return Reading(frozenset(self._services), MappingProxyType(changed))

    # --- one service ------------------------------------------------------------------------
    async def service_exists(self, name: str) -> bool:
        return name in self._services

    async def read_snapshot(self, *, service: str = DEFAULT_SERVICE) -> Snapshot:
        svc = self._services.get(service)
        if svc is None:
            return Snapshot(Route(), service=service)
        return svc.snapshot(time.monotonic())

    async def set_route(
        self,
        active: str,
        previous: str | None,
        *,
        service: str = DEFAULT_SERVICE,
        expected_generation: int | None = None,
        history: HistoryEntry | None = None,
        plan: Plan | None = None,
    ) -> RouteChange:
        svc = self._services.get(service)
        if svc is None:
            return RouteChange(False, Route(), "no_service")
        current = svc.route
        if expected_generation is not None and expected_generation != current.generation:
            return RouteChange(False, current, "conflict")
        if active not in svc.deployments:
            return RouteChange(False, current, "unknown")
        svc.route = Route(active=active, previous=previous, generation=current.generation + 1, changed_at=time.time(),
                          shadow=current.shadow, shadow_percent=current.shadow_percent)
        if plan is not None:
            # Through the stored form, as the Redis store: what a reader gets is what was stored.
            svc.plan = Plan.from_json(plan.to_json())
        if history is not None:
            svc.history.appendleft(history.but(generation=svc.route.generation).to_json())
        self._changed(svc, ROUTE_CHANGED, generation=svc.route.generation)
        return RouteChange(True, svc.route)

    async def lift_generation(self, expected: int, floor: int, *, service: str = DEFAULT_SERVICE,
                              history: HistoryEntry | None = None) -> bool:
        svc = self._services.get(service)
        if svc is None or svc.route.generation != expected or floor < expected:
            return False
        svc.route = replace(svc.route, generation=floor + 1, changed_at=time.time())
        if history is not None:
            svc.history.appendleft(history.but(generation=svc.route.generation).to_json())
        self._changed(svc, ROUTE_CHANGED, generation=svc.route.generation)
        return True

    async def change_rollout(
        self, *, service: str = DEFAULT_SERVICE, split: tuple[str, float, str | None] | None | bool = False,
        plan: Plan | None = None, expected_generation: int | None = None, expected_revision: int | None = None,
        history: HistoryEntry | None = None, shadow: tuple[str, float] | None | bool = False,
    ) -> RouteChange:
        svc = self._services.get(service)
        if svc is None:
            return RouteChange(False, Route(), "no_service")
        current = svc.route
        if expected_generation is not None and expected_generation != current.generation:
            return RouteChange(False, current, "conflict")
        if expected_revision is not None and (svc.plan.revision if svc.plan else 0) != expected_revision:
            return RouteChange(False, current, "plan_conflict")
        if isinstance(split, tuple) and split[0] not in svc.deployments:
            return RouteChange(False, current, "unknown")
        if isinstance(shadow, tuple) and shadow[0] not in svc.deployments:
            return RouteChange(False, current, "unknown")
        if shadow is not False:
            name, percent = shadow if isinstance(shadow, tuple) else (None, 0.0)
            svc.route = current = replace(current, shadow=name, shadow_percent=float(percent))
        if split is not False:
            candidate, weight, sticky = split if isinstance(split, tuple) else (None, 0.0, None)
            svc.route = replace(current, generation=current.generation + 1, candidate=candidate, weight=float(weight),
                                sticky=sticky)
        if plan is not None:
            svc.plan = Plan.from_json(plan.to_json())
        if history is not None:
            svc.history.appendleft(history.but(generation=svc.route.generation).to_json())
        if split is not False:
            self._changed(svc, ROUTE_CHANGED, generation=svc.route.generation)
        else:
            self._changed(svc, SERVICE_CHANGED)
        return RouteChange(True, svc.route)

    async def create_deployment(
        self, deployment: Deployment, *, service: str = DEFAULT_SERVICE, history: HistoryEntry | None = None
    ) -> bool:
        svc = self._services.get(service)
        if svc is None or deployment.name in svc.deployments:
            return False
        svc.deployments[deployment.name] = deployment
        if history is not None:
            svc.history.appendleft(history.to_json())
        self._changed(svc, DEPLOYMENT_CHANGED, name=deployment.name)
        return True

    async def update_deployment(
        self, name: str, *, service: str = DEFAULT_SERVICE, owner: str | None = None, replica: int = 0,
        history: HistoryEntry | None = None, expect: Mapping[str, Any] | None = None, **changes: Any
    ) -> bool | None:
        svc = self._services.get(service)
        dep = svc.deployments.get(name) if svc is not None else None
        if svc is None or dep is None:
            return False
        if owner is not None:
            lease = svc.leases.get(replica_key(name, replica))
            if lease is None or lease[0] != owner or lease[1] <= time.monotonic():
                return False
        if expect is not None:
            stored = dep.to_fields()
            if any(stored.get(k) != v for k, v in encode_changes(expect, replica).items()):
                return None
        # Round-trip through the stored form so both stores accept and return the same values.
        merged: dict[str, str | None] = {**dep.to_fields(), **encode_changes(changes, replica)}
        svc.deployments[name] = Deployment.from_fields({k: v for k, v in merged.items() if v is not None})
        if history is not None:
            svc.history.appendleft(history.to_json())
        self._changed(svc, DEPLOYMENT_CHANGED, name=name)
        return True

    async def delete_deployment(
        self, name: str, *, service: str = DEFAULT_SERVICE, force: bool = False, history: HistoryEntry | None = None
    ) -> str | None:
        svc = self._services.get(service)
        if svc is None or name not in svc.deployments:
            return "unknown"
        if not force:
            if svc.route.active == name:
                return "active"
            if svc.route.previous == name:
                return "previous"
            if svc.route.candidate == name:
                return "candidate"
            if svc.route.shadow == name:
                return "shadow"
        if svc.route.previous == name:
            svc.route = replace(svc.route, previous=None)
        if svc.route.candidate == name:
            svc.route = replace(svc.route, candidate=None, weight=0.0, sticky=None)
        if svc.route.shadow == name:
            svc.route = replace(svc.route, shadow=None, shadow_percent=0.0)
        del svc.deployments[name]
        for key in [k for k in svc.leases if k.partition("#")[0] == name]:
            del svc.leases[key]
        if history is not None:
            svc.history.appendleft(history.to_json())
        self._changed(svc, DEPLOYMENT_CHANGED, name=name)
        return None

    async def claim(self, name: str, owner: str, ttl: float, *, service: str = DEFAULT_SERVICE, replica: int = 0,
                    taking: Mapping[str, Any] | None = None) -> bool:
        svc = self._services.get(service)
        if svc is None:
            return False
        now = time.monotonic()
        key = replica_key(name, replica)
        lease = svc.leases.get(key)
        if lease is not None and lease[0] != owner and lease[1] > now:
            return False
        newly_live = not svc.live(key, now)
        svc.leases[key] = (owner, now + ttl)
        if newly_live:
            dep = svc.deployments.get(name)
            if taking and dep is not None:
                merged: dict[str, str | None] = {**dep.to_fields(), **encode_changes(taking, replica)}
                svc.deployments[name] = Deployment.from_fields({k: v for k, v in merged.items() if v is not None})
            self._changed(svc, DEPLOYMENT_CHANGED, name=name)
        return True

    async def release(self, name: str, owner: str, *, service: str = DEFAULT_SERVICE, replica: int = 0) -> None:
        svc = self._services.get(service)
        key = replica_key(name, replica)
        lease = svc.leases.get(key) if svc is not None else None
        if svc is not None and lease is not None and lease[0] == owner:
            del svc.leases[key]
            self._changed(svc, DEPLOYMENT_CHANGED, name=name)

    async def append_history(self, entry: HistoryEntry, *, service: str = DEFAULT_SERVICE) -> None:
        svc = self._services.get(service)
        if svc is not None:
            svc.history.appendleft(entry.to_json())

    async def read_history(
        self, offset: int = 0, limit: int = 50, *, service: str = DEFAULT_SERVICE
    ) -> tuple[list[HistoryEntry], int]:
        svc = self._services.get(service)
        items = list(svc.history) if svc is not None else []
        # Through JSON, as the Redis store: what a caller gets is what was stored, never a shared object.
        return [HistoryEntry.from_json(json.loads(json.dumps(e))) for e in items[offset : offset + limit]], len(items)

    async def add_stats(self, pending: StatsRows, ttl: int = 180) -> None:
        oldest = int(time.time()) - ttl
        for (service, deployment), per in pending.items():
            svc = self._services.get(service)
            if svc is None:
                continue
            mine = svc.stats.setdefault(deployment, {})
            for second, row in per.items():
                add_row(mine.setdefault(second, {}), row)
            for second in [s for s in mine if s < oldest]:
                del mine[second]

    async def read_stats(
        self, deployment: str, first_second: int, last_second: int, *, service: str = DEFAULT_SERVICE
    ) -> dict[int, int]:
        total: dict[int, int] = {}
        svc = self._services.get(service)
        for second, row in (svc.stats.get(deployment, {}) if svc is not None else {}).items():
            if first_second <= second <= last_second:
                add_row(total, row)
        return total

    async def get_guard(self, *, service: str = DEFAULT_SERVICE) -> dict[str, str]:
        svc = self._services.get(service)
        return dict(svc.guard) if svc is not None else {}

    async def set_guard(self, *, service: str = DEFAULT_SERVICE, **fields: str | None) -> None:
        svc = self._services.get(service)
        if svc is None:
            return
        for key, value in fields.items():
            if value is None:
                svc.guard.pop(key, None)
            else:
                svc.guard[key] = value

    # --- the whole namespace ----------------------------------------------------------------
    async def hold_role(self, role: str, owner: str, ttl: float) -> bool:
        now = time.monotonic()
        holder = self._roles.get(role)
        if holder is not None and holder[0] != owner and holder[1] > now:
            return False
        self._roles[role] = (owner, now + ttl)
        return True

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

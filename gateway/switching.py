"""Switch and rollback: the checks, the compare-and-swap and the audit trail, shared by the admin API,
the guard and the Alertmanager webhook."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import errors
from .metrics import GatewayMetrics
from .records import ABORTED, DEFAULT_SERVICE, HistoryEntry, Plan, Route, Snapshot, State, Who
from .registry_sync import Job, RegistrySync
from .store import Store


@dataclass
class Outcome:
    """What came of a switch or rollback; ``status``/``error_code`` are what an HTTP caller answers."""

    applied: bool
    status: int
    message: str
    route: Route
    error_code: str | None = None
    entry: HistoryEntry | None = None
    job: Job | None = None

    def body(self) -> dict[str, Any]:
        """JSON answer."""
        route = {"active": self.route.active, "previous": self.route.previous, "generation": self.route.generation}
        if self.error_code is not None:
            return {"error_code": self.error_code, "message": self.message, "route": route}
        return {"applied": self.applied, "message": self.message, "route": route}


def describe_state(snapshot: Snapshot, name: str) -> str:
    """``"starting (12 s)"``, ``"failed: <reason>"``: a deployment's state as an operator needs it."""
    dep = snapshot.deployments[name]
    state = snapshot.effective_state(name)
    assert state is not None
    if state is State.STARTING and dep.started_at:
        return f"starting ({max(0, time.time() - dep.started_at):.0f} s)"
    if len(dep.members) > 1:
        ready = len(snapshot.serving(name))
        wanted = len(dep.members) if dep.external else dep.replicas
        held = next((m for m in dep.members[:wanted] if snapshot.member_state(dep, m) is not State.READY), None)
        # A reason's first line only (a failed start carries MLflow's traceback).
        why = (f"; replica {held.index} is {snapshot.member_state(dep, held).value}"
               + (f": {held.reason.splitlines()[0]}" if held.reason else "")) if held else ""
        return f"{state.value}: {ready} of {wanted} replicas ready, {dep.needed} needed{why}"
    if state is State.UNHEALTHY and dep.state is State.READY:
        return "unhealthy: no live worker holds it"
    return f"{state.value}: {dep.reason}" if dep.reason else state.value


class RouteControl:
    """Every route change goes through here."""

    def __init__(self, store: Store, metrics: GatewayMetrics, registry: RegistrySync) -> None:
        self.store = store
        self.metrics = metrics
        self.registry = registry

    async def switch(
        self, target: str, who: Who, *, service: str = DEFAULT_SERVICE, reason: str = "",
        expected_generation: int | None = None, force: bool = False, plan: Plan | None = None,
        evidence: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """Make ``target`` the service's active deployment; the current active becomes previous (``plan``:
        the canary plan as this switch leaves it, stored in the same step)."""
        snapshot = await self.store.read_snapshot(service=service)
        route = snapshot.route
        entry = self._entry(who, "switch", route.active, target, reason, force=force, evidence=evidence)
        if target not in snapshot.deployments:
            return await self._refuse(service, entry, route, 404, errors.RESOURCE_DOES_NOT_EXIST, f"no deployment named {target!r}")
        if expected_generation is not None and expected_generation != route.generation:
            return await self._refuse(
                service, entry, route, 409, errors.INVALID_STATE,
                f"the route is at generation {route.generation}, not {expected_generation}: someone changed it; re-read and retry",
            )
        if target == route.active:
            return Outcome(False, 200, f"{target} is already active", route)
        if not snapshot.is_ready(target) and not force:
            return await self._refuse(
                service, entry, route, 409, errors.INVALID_STATE,
                f"{target} is {describe_state(snapshot, target)}; wait until it is ready or use force",
                state=snapshot.effective_state(target).value,  # type: ignore[union-attr]
            )
        outcome = await self._apply(snapshot, entry, target, route.active, who, plan)
        if outcome.applied:
            retired = route.previous if route.previous not in (target, route.active) else None
            outcome.job = self.registry.submit(Job(
                outcome.route.generation,
                active=snapshot.deployments.get(target),
                previous=snapshot.deployments.get(route.active) if route.active else None,
                retired=snapshot.deployments.get(retired) if retired else None,
                reason=reason,
                service=service,
            ))
        return outcome

    async def rollback(
        self,
        who: Who,
        *,
        service: str = DEFAULT_SERVICE,
        reason: str = "",
        expected_generation: int | None = None,
        force: bool = False,
        only_if_active: str | None = None,
        evidence: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """Make previous active again; the rolled-back deployment is tagged and not kept as previous
        (re-promoting it takes an explicit switch)."""
        snapshot = await self.store.read_snapshot(service=service)
        route = snapshot.route
        entry = self._entry(who, "rollback", route.active, route.previous, reason, force=force, evidence=evidence)
        if only_if_active is not None and route.active != only_if_active:
            return await self._refuse(
                service, entry, route, 409, errors.INVALID_STATE,
                f"{only_if_active} is not the active deployment (active: {route.active}); nothing rolled back",
            )
        if expected_generation is not None and expected_generation != route.generation:
            return await self._refuse(
                service, entry, route, 409, errors.INVALID_STATE,
                f"the route is at generation {route.generation}, not {expected_generation}: someone changed it; re-read and retry",
            )
        previous = route.previous
        if previous is None or route.active is None:
            return await self._refuse(service, entry, route, 409, errors.INVALID_STATE, "there is no previous deployment to roll back to")
        if previous not in snapshot.deployments:
            return await self._refuse(service, entry, route, 409, errors.INVALID_STATE, f"previous deployment {previous!r} no longer exists")
        # A rollback needs the previous deployment able to serve, not its full min_ready: one replica
        # restarting must not take away the way back from a version that is failing.
        if not snapshot.serving(previous) and not force:
            return await self._refuse(
                service, entry, route, 409, errors.INVALID_STATE,
                f"previous deployment {previous} is {describe_state(snapshot, previous)}; not rolling back onto it (use force)",
                state=snapshot.effective_state(previous).value,  # type: ignore[union-attr]
            )
        outcome = await self._apply(snapshot, entry, previous, None, who)
        if outcome.applied:
            self.metrics.rollbacks.labels(service, who.trigger).inc()
            outcome.job = self.registry.submit(Job(
                outcome.route.generation,
                active=snapshot.deployments.get(previous),
                previous=None,
                rolled_back=snapshot.deployments.get(route.active),
                reason=reason or f"rolled back ({who.trigger})",
                service=service,
            ))
        return outcome

    def _entry(
        self, who: Who, action: str, source: str | None, target: str | None, reason: str,
        *, force: bool = False, evidence: Mapping[str, Any] | None = None,
    ) -> HistoryEntry:
        return HistoryEntry(action, who, source=source, target=target, reason=reason, forced=force,
                            evidence=dict(evidence) if evidence else None)

    async def _refuse(
        self, service: str, entry: HistoryEntry, route: Route, status: int, code: str, message: str, **extra: Any
    ) -> Outcome:
        record = entry.but(result="refused", detail=message, generation=route.generation, extra=extra)
        await self.store.append_history(record, service=service)
        return Outcome(False, status, message, route, error_code=code, entry=record)

    async def _apply(
        self, snapshot: Snapshot, entry: HistoryEntry, active: str, previous: str | None, who: Who,
        plan: Plan | None = None,
    ) -> Outcome:
        route, service = snapshot.route, snapshot.service
        record = entry.but(result="applied")
        if plan is None and snapshot.plan is not None and snapshot.plan.active:
            # A switch or rollback ends any split: a canary under way ends with it, aborted, in the same step.
            plan = snapshot.plan.but(state=ABORTED, outcome=f"ended by a {entry.action} to {active} ({who.trigger}, {who.actor})")
            record = record.but(detail=(record.detail + "; " if record.detail else "")
                                + f"ended the canary of {snapshot.plan.candidate} at {snapshot.plan.weight:g}%")
        change = await self.store.set_route(active, previous, service=service, expected_generation=route.generation,
                                            history=record, plan=plan)
        if not change.ok:
            why = {
                "conflict": f"the route changed concurrently (now generation {change.route.generation}, "
                            f"active {change.route.active}); re-read and retry",
                "no_service": f"service {service!r} no longer exists",
            }.get(change.refusal or "", f"deployment {active!r} no longer exists")
            return await self._refuse(service, entry, change.route, 409, errors.INVALID_STATE, why)
        self.metrics.switches.labels(service, who.trigger).inc()
        message = f"{active} is active (generation {change.route.generation})"
        return Outcome(True, 200, message, change.route, entry=record.but(generation=change.route.generation))

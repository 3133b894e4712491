"""The guard: roll back automatically when the active deployment breaches its error-rate or latency
threshold, judged on the traffic of every replica, decided by one leader replica at a time."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .loops import Loop, Loops
from .rollout import PlanRefused
from .metrics import GatewayMetrics
from .settings import Settings
from .store import Store, StoreUnavailable
from .records import DEFAULT_SERVICE, HistoryEntry, ServiceConfig, Snapshot, Who
from .switching import RouteControl
from .traffic import RELATIVE_ERROR, Figures, Traffic, figures_from_counts
from .watcher import RouteWatcher

log = logging.getLogger(__name__)

LEADER_ROLE = "guard"
GUARD_WHO = Who(actor="turnout-guard", client=None, trigger="guard")


@dataclass(frozen=True)
class Verdict:
    """One evaluation's result."""

    breach: bool
    why: str
    figures: Figures
    evidence: dict[str, Any]


def judge(settings: Settings, figures: Figures, baseline: Figures | None) -> Verdict:
    """Is the active deployment breaching? Pure function of the figures and the thresholds."""
    judged = figures.requests - figures.client_errors
    evidence: dict[str, Any] = {
        "window_seconds": settings.guard_window,
        "requests": figures.requests,
        "judged_requests": judged,
        "model_errors": figures.model_errors,
        "upstream_errors": figures.upstream_errors,
        "client_errors": figures.client_errors,
        "error_rate": round(figures.error_rate, 4),
        "error_rate_threshold": settings.guard_error_rate,
        "min_requests": settings.guard_min_requests,
        "p99_seconds": figures.p99,
        # The p99 is read from a sketch: within this fraction of a latency a request really had.
        "p99_relative_error": RELATIVE_ERROR,
        "p99_threshold_seconds": settings.guard_p99,
    }
    if baseline is not None:
        evidence["previous_error_rate_before_switch"] = round(baseline.error_rate, 4)
    if judged < settings.guard_min_requests:
        return Verdict(False, f"only {judged} requests in the window (minimum {settings.guard_min_requests})", figures, evidence)
    reasons = []
    limit = settings.guard_error_rate
    if baseline is not None and baseline.requests - baseline.client_errors >= settings.guard_min_requests:
        limit = max(limit, baseline.error_rate + settings.guard_error_rate)
    if figures.error_rate > limit:
        reasons.append(f"error rate {figures.error_rate:.1%} > {limit:.1%} over {judged} requests in {settings.guard_window:.0f} s")
    if settings.guard_p99 is not None and figures.p99 is not None and figures.p99 > settings.guard_p99:
        reasons.append(f"p99 {figures.p99 * 1000:.0f} ms (±{RELATIVE_ERROR:.0%}) > {settings.guard_p99 * 1000:.0f} ms")
    if reasons:
        return Verdict(True, "; ".join(reasons), figures, evidence)
    return Verdict(False, f"healthy: error rate {figures.error_rate:.1%}", figures, evidence)


class Guard:
    """Per replica: flushes traffic counters to the store; the leader replica also decides, service by
    service: a breach in one service never touches another."""

    def __init__(self, settings: Settings, store: Store, traffic: Traffic, control: RouteControl,
                 metrics: GatewayMetrics, loops: Loops | None = None, watcher: RouteWatcher | None = None) -> None:
        self.settings = settings
        self.store = store
        self.traffic = traffic
        self.control = control
        self.metrics = metrics
        self.watcher = watcher
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.leader = False
        # This replica's view of the last decision, per service.
        self.last: dict[str, dict[str, Any]] = {}
        self._held_generation: dict[str, int] = {}
        # Canary plans, driven by whichever replica leads (set when the app is built).
        self.rollouts: Any = None
        self.loops = loops or Loops(metrics.count_background_error)
        self._loops: list[Loop] = []

    async def start(self) -> None:
        """Start the flusher and the evaluator."""
        self._loops = [
            self.loops.every("guard-flush", self.settings.stats_flush_interval, self._flush_once),
            self.loops.every("guard-evaluate", self.settings.guard_interval, self._evaluate_once),
        ]

    async def stop(self) -> None:
        """Stop both, flushing what is left."""
        await self.loops.cancel(*self._loops)
        try:
            await self.flush()
        except StoreUnavailable:
            pass

    def settings_for(self, config: ServiceConfig) -> Settings:
        """The gateway's guard settings with a service's own overrides applied."""
        return self.settings.replace(**config.overrides) if config.overrides else self.settings

    def status(self, service: str, config: ServiceConfig | None = None, generation: int | None = None) -> dict[str, Any]:
        """For ``/admin/state``: a service's effective thresholds and this replica's view of the last
        decision — ``pending`` while that decision is about an older ``generation`` of the route."""
        s = self.settings_for(config) if config is not None else self.settings
        last = self.last.get(service, {})
        if not self.leader:
            # Only the leader looks; this replica's last view (from when it led, if ever) would be stale.
            last = {"status": "standby",
                    "detail": "another gateway replica's guard decides (turnout_guard_leader is 1 there)"}
        elif generation is not None and last.get("generation") != generation:
            last = {"status": "pending", "generation": generation,
                    "detail": f"generation {generation} is judged at the guard's next look (every {s.guard_interval:g} s)"}
        return {
            "enabled": s.guard_enabled,
            "this_replica_decides": self.leader,
            "window_seconds": s.guard_window,
            "error_rate_threshold": s.guard_error_rate,
            "min_requests": s.guard_min_requests,
            "p99_threshold_seconds": s.guard_p99,
            "bake_seconds": None if s.guard_always else s.guard_bake,
            "overrides": config.thresholds() if config is not None else {},
            **last,
        }

    # --- signals --------------------------------------------------------------------------
    async def flush(self) -> None:
        """Push this replica's counters to the store; on failure keep them for the next try."""
        pending = self.traffic.take_pending()
        if not pending:
            return
        try:
            await self.store.add_stats(pending, ttl=int(self.settings.guard_window * 2 + 60))
        except StoreUnavailable:
            self.traffic.restore_pending(pending)
            raise

    async def _flush_once(self) -> None:
        try:
            await self.flush()
        except StoreUnavailable as exc:
            log.debug("could not flush traffic counters: %s", exc)

    async def figures(self, deployment: str, *, service: str = DEFAULT_SERVICE, end: float | None = None,
                      window: float | None = None, since: float | None = None) -> Figures:
        """Every replica's traffic of a deployment over the window ending at ``end`` (default: now),
        not before ``since``."""
        end_second = int(end if end is not None else time.time())
        first = end_second - int(window or self.settings.guard_window) + 1
        if since is not None:
            first = max(first, int(since))
        return figures_from_counts(await self.store.read_stats(deployment, first, end_second, service=service))

    # --- decision -------------------------------------------------------------------------
    async def _evaluate_once(self) -> None:
        interval = self.settings.guard_interval
        try:
            self.leader = await self.store.hold_role(LEADER_ROLE, self.id, max(3.0, 3 * interval))
            self.metrics.guard_leader.set(1 if self.leader else 0)
            if self.leader:
                await self.evaluate()
        except StoreUnavailable as exc:
            self.leader = False
            log.debug("guard cannot reach the store: %s", exc)

    async def _services(self) -> dict[str, Snapshot]:
        if self.watcher is not None and self.watcher.ready:
            return dict(self.watcher.snapshots)
        return {name: await self.store.read_snapshot(service=name) for name in await self.store.list_services()}

    async def evaluate(self) -> None:
        """One round by the leader: each service whose guard is armed is judged on its own."""
        for service, seen in sorted((await self._services()).items()):
            s = self.settings_for(seen.config)
            route = seen.route
            if self.rollouts is not None and seen.plan is not None and seen.plan.active:
                # A plan is driven whatever the guard's own state: it was asked for explicitly, and its gate
                # judges the candidate (the guard goes on judging the active below).
                try:
                    await self.rollouts.drive(service, await self.store.read_snapshot(service=service))
                except PlanRefused as exc:
                    # An operator changed the plan in between: the next look starts from what is stored.
                    log.info("canary plan of service %s: %s", service, exc.message)
            if route.active is None:
                self.last[service] = {"generation": route.generation, "status": "idle", "detail": "no active deployment"}
                continue
            if not s.guard_enabled:
                self.last[service] = {"generation": route.generation, "status": "disabled"}
                continue
            age = time.time() - route.changed_at if route.changed_at else float("inf")
            if not s.guard_always and age > s.guard_bake:
                self.last[service] = {"generation": route.generation, "status": "disarmed",
                                      "detail": f"bake period of {s.guard_bake:.0f} s after the last switch is over"}
                continue
            await self.evaluate_service(service, s)

    async def evaluate_service(self, service: str, s: Settings) -> None:
        """Judge one service's active deployment: roll back, hold or do nothing."""
        snapshot: Snapshot = await self.store.read_snapshot(service=service)
        route = snapshot.route
        state = await self.store.get_guard(service=service)
        if state.get("latched") and state.get("latched_generation") != str(route.generation):
            # The route moved since the guard acted: an operator acted, the latch lifts.
            await self.store.set_guard(service=service, latched=None, latched_generation=None)
            state = await self.store.get_guard(service=service)
        self.metrics.guard_paused.labels(service).set(1 if state.get("paused") else 0)
        self.metrics.guard_latched.labels(service).set(1 if state.get("latched") else 0)
        if route.active is None:
            self.last[service] = {"generation": route.generation, "status": "idle", "detail": "no active deployment"}
            return
        if state.get("paused"):
            self.last[service] = {"generation": route.generation, "status": "paused", "detail": state.get("paused")}
            return
        if state.get("latched"):
            self.last[service] = {"generation": route.generation, "status": "latched", "detail": state["latched"]}
            return
        # Only traffic since the switch judges the active deployment: requests pinned to it while it was
        # previewed (a tester probing its edge cases) are not its record as the active one.
        figures = await self.figures(route.active, service=service, window=s.guard_window, since=route.changed_at or None)
        baseline = None
        if s.guard_compare_previous and route.previous and route.changed_at:
            baseline = await self.figures(route.previous, service=service, end=route.changed_at, window=s.guard_window)
        verdict = judge(s, figures, baseline)
        last = self.last[service] = {"generation": route.generation, "status": "armed", "active": route.active,
                                     "detail": verdict.why,
                                     "error_rate": round(figures.error_rate, 4), "requests": figures.requests}
        if not verdict.breach:
            return
        previous = route.previous
        if previous is None or not snapshot.serving(previous):
            why = "there is no previous deployment" if previous is None else f"previous deployment {previous} is not ready"
            self.last[service] = {**last, "status": "holding", "detail": f"{verdict.why}; holding: {why}"}
            if self._held_generation.get(service) != route.generation:
                # Recorded once per route generation; counting goes on.
                self._held_generation[service] = route.generation
                await self.store.append_history(HistoryEntry(
                    "rollback", GUARD_WHO, result="held", source=route.active, target=previous,
                    generation=route.generation, reason=verdict.why, detail=f"not rolling back: {why}",
                    evidence=verdict.evidence,
                ), service=service)
            return
        outcome = await self.control.rollback(
            GUARD_WHO, service=service, reason=f"guard: {verdict.why}", expected_generation=route.generation,
            only_if_active=route.active, evidence=verdict.evidence,
        )
        if outcome.applied:
            await self.store.set_guard(
                service=service,
                latched=f"rolled back {route.active} at generation {outcome.route.generation}: {verdict.why}",
                latched_generation=str(outcome.route.generation),
            )
            self.metrics.guard_latched.labels(service).set(1)
            self.last[service] = {"generation": outcome.route.generation, "status": "latched",
                                  "detail": f"rolled back {route.active}: {verdict.why}"}
            log.warning("guard rolled back %s in service %s → %s: %s", route.active, service, previous, verdict.why)
        else:
            log.info("guard rollback of %s in service %s not applied: %s", route.active, service, outcome.message)

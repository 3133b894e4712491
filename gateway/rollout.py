"""Canary rollouts: a plan of weight steps for a candidate deployment, each judged *against the active
deployment* (the baseline) over the same seconds, ending promoted or aborted.

The plan lives in the store (``records.Plan``): any gateway replica serves its status, operators change
it through any replica, and the guard's leader drives it (a new leader continues from the store). Every
write is conditional on the plan's revision and the route's generation, so the leader and an operator
never overwrite each other, and a weight change is a route generation every replica applies alike.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import errors
from .metrics import GatewayMetrics
from .records import ABORTED, PAUSED, PROMOTED, RUNNING, HistoryEntry, Plan, Snapshot, Who
from .registry_sync import Job
from .settings import Settings
from .store import Store
from .switching import Outcome, RouteControl, describe_state
from .traffic import RELATIVE_ERROR, Figures

log = logging.getLogger(__name__)

MAX_STEPS = 20
# Latency differences below this are the sketch's and the host's noise, never a breach of the ratio (a
# 2 ms baseline against a 3.5 ms candidate is not "1.75× slower" in any sense an operator means).
LATENCY_NOISE = 0.005
# An RFC 9110 field name; a few that say nothing about a user are refused as sticky keys.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")
_NOT_STICKY = frozenset({"host", "content-length", "content-type", "transfer-encoding", "connection", "expect", "te",
                         "upgrade", "keep-alive", "trailer", "content-encoding", "accept", "accept-encoding",
                         "x-turnout-deployment", "x-turnout-generation", "x-turnout-service"})

Figurer = Callable[[str, str, float], Awaitable[Figures]]


class PlanRefused(Exception):
    """A plan change that cannot apply: an HTTP status, an MLflow error code and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


# A breach of latency alone must be seen on this many looks in a row (one per guard interval): a p99 of a
# few milliseconds jumps with the host's load, and one noisy window must not abort a healthy candidate.
# Failures abort at the first look.
LATENCY_LOOKS = 3
# A p99 means little below this many requests (of 50, it is the slowest one): the latency comparison
# waits for this sample on both sides.
LATENCY_SAMPLE = 100
# How sure the gate must be that a failure rate is over its bound before it aborts: the excess over the
# bound, in standard errors of the difference (3: about one in 700 for a single look at two equal
# versions; the gate looks every second, so a smaller margin aborted equal versions most of the time).
Z = 3.0


@dataclass(frozen=True)
class GateVerdict:
    """One look of the relative gate: ``breach``, ``pass`` (both sides have their sample and nothing is
    breached) or ``waiting`` (a sample is still short); ``latency_only`` when only latency is breached."""

    status: str
    why: str
    evidence: dict[str, Any]
    latency_only: bool = False


def _over(rate: float, n: int, bound: float, other: tuple[float, int] | None = None) -> bool:
    """Whether a failure rate observed over ``n`` requests is over ``bound`` (plus ``other``'s rate, observed
    over its own sample) beyond sampling noise: by more than :data:`Z` standard errors of the difference."""
    variance = rate * (1 - rate) / n
    limit = bound
    if other is not None:
        other_rate, other_n = other
        variance += other_rate * (1 - other_rate) / other_n
        limit += other_rate
    excess = rate - limit
    return excess > 0 and excess > Z * math.sqrt(variance)


def gate(candidate: Figures, baseline: Figures, plan: Plan, s: Settings) -> GateVerdict:
    """Judge the candidate against the baseline over the same window. Pure: figures and thresholds in."""
    c_judged, b_judged = candidate.judged, baseline.judged
    evidence: dict[str, Any] = {
        "candidate": {"deployment": plan.candidate, "judged_requests": c_judged, "failures": candidate.failures,
                      "error_rate": round(candidate.error_rate, 4), "p99_seconds": candidate.p99},
        "baseline": {"deployment": plan.baseline, "judged_requests": b_judged, "failures": baseline.failures,
                     "error_rate": round(baseline.error_rate, 4), "p99_seconds": baseline.p99},
        "max_error_rate_increase": plan.max_error_rate_increase,
        "max_latency_ratio": plan.max_latency_ratio,
        "min_requests": plan.min_requests,
        "absolute_error_rate": s.guard_error_rate,
        "absolute_p99_seconds": s.guard_p99,
        "p99_relative_error": RELATIVE_ERROR,
    }
    reasons, slow = [], []
    if c_judged >= plan.min_requests:
        # The guard's own thresholds are a floor: a candidate breaching them fails whatever the baseline does.
        if _over(candidate.error_rate, c_judged, s.guard_error_rate):
            reasons.append(f"candidate error rate {candidate.error_rate:.2%} > absolute {s.guard_error_rate:.2%} "
                           f"over {c_judged} requests")
        if s.guard_p99 is not None and candidate.p99 is not None and candidate.p99 > s.guard_p99 \
                and c_judged >= LATENCY_SAMPLE:
            slow.append(f"candidate p99 {candidate.p99 * 1000:.0f} ms > absolute {s.guard_p99 * 1000:.0f} ms")
    if c_judged >= plan.min_requests and b_judged >= plan.min_requests:
        if _over(candidate.error_rate, c_judged, plan.max_error_rate_increase, (baseline.error_rate, b_judged)):
            reasons.append(f"candidate error rate {candidate.error_rate:.2%} > baseline {baseline.error_rate:.2%} "
                           f"+ {plan.max_error_rate_increase:.2%} ({c_judged} and {b_judged} requests)")
        if candidate.p99 is not None and baseline.p99 is not None and min(c_judged, b_judged) >= LATENCY_SAMPLE:
            bound = baseline.p99 * plan.max_latency_ratio
            if candidate.p99 > bound and candidate.p99 - baseline.p99 > LATENCY_NOISE:
                slow.append(f"candidate p99 {candidate.p99 * 1000:.1f} ms > baseline {baseline.p99 * 1000:.1f} ms "
                            f"× {plan.max_latency_ratio:g}")
    if reasons or slow:
        return GateVerdict("breach", "; ".join(reasons + slow), evidence, latency_only=not reasons)
    if c_judged < plan.min_requests or b_judged < plan.min_requests:
        return GateVerdict("waiting", f"sample: candidate {c_judged}, baseline {b_judged} judged requests "
                           f"(needs {plan.min_requests} each)", evidence)
    return GateVerdict("pass", f"candidate {candidate.error_rate:.1%} errors vs baseline {baseline.error_rate:.1%}"
                       + (f", p99 {candidate.p99 * 1000:.1f} vs {baseline.p99 * 1000:.1f} ms"
                          if candidate.p99 is not None and baseline.p99 is not None else ""), evidence)


def check_steps(steps: Sequence[float]) -> tuple[float, ...]:
    """The steps, if each is a weight in (0, 100] and each is above the one before; else ``ValueError``."""
    if not 1 <= len(steps) <= MAX_STEPS:
        raise ValueError(f"give 1 to {MAX_STEPS} steps, got {len(steps)}")
    for weight in steps:
        if not 0 < weight < 100:
            # At 100 % the baseline gets nothing to be compared with: passing the last step promotes.
            raise ValueError(f"each step is a weight in percent, above 0 and below 100 (passing the last step "
                             f"promotes); got {weight!r}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"steps must increase: {', '.join(f'{w:g}' for w in steps)}")
    return tuple(float(w) for w in steps)


def check_sticky(header: str | None) -> str | None:
    """The sticky header's name in lower case, if it is a header that can name a user; else ``ValueError``."""
    if header is None:
        return None
    if not _TOKEN.fullmatch(header):
        raise ValueError(f"sticky_header must be an HTTP header name (letters, digits, '-', ...): {header!r}")
    if header.lower() in _NOT_STICKY:
        raise ValueError(f"sticky_header {header!r} says nothing about who is asking; use a header such as X-User-Id")
    return header.lower()


class Rollouts:
    """Starts, changes and drives canary plans; one per gateway process (the guard's leader drives)."""

    def __init__(self, settings: Settings, store: Store, control: RouteControl, metrics: GatewayMetrics,
                 figures: Figurer, settings_for: Callable[[Snapshot], Settings]) -> None:
        self.settings = settings
        self.store = store
        self.control = control
        self.metrics = metrics
        self._figures = figures
        self._settings_for = settings_for
        # The leader's last look at each service's gate (the admin API computes its own for any replica).
        self.last: dict[str, GateVerdict] = {}
        # Consecutive looks at which only latency was breached, per service.
        self._slow_looks: dict[str, int] = {}

    # --- what an operator asks ----------------------------------------------------------------
    async def start(self, service: str, candidate: str, steps: Sequence[float], step_seconds: float, who: Who, *,
                    sticky: str | None = None, max_error_rate_increase: float = 0.01, max_latency_ratio: float = 1.5,
                    min_requests: int = 50, reason: str = "") -> Plan:
        """Begin a plan: the candidate takes the first step's weight at once."""
        snapshot = await self.store.read_snapshot(service=service)
        route, current = snapshot.route, snapshot.plan
        entry = HistoryEntry("canary_start", who, source=route.active, target=candidate, reason=reason)
        try:
            steps = check_steps(steps)
            sticky = check_sticky(sticky)
        except ValueError as exc:
            await self._refuse(service, entry, route.generation, str(exc), 400, errors.INVALID_PARAMETER_VALUE)
        if current is not None and current.active:
            await self._refuse(service, entry, route.generation,
                               f"a canary of {current.candidate} is {current.state} in service {service!r}; "
                               "promote or abort it first")
        if candidate not in snapshot.deployments:
            await self._refuse(service, entry, route.generation, f"service {service!r} has no deployment named {candidate!r}",
                               404, errors.RESOURCE_DOES_NOT_EXIST)
        if route.active is None:
            await self._refuse(service, entry, route.generation, "there is no active deployment to compare the candidate with; "
                               "switch to one first")
        if candidate == route.active:
            await self._refuse(service, entry, route.generation, f"{candidate} is already the active deployment")
        if not snapshot.is_ready(candidate):
            await self._refuse(service, entry, route.generation, f"{candidate} is {describe_state(snapshot, candidate)}; "
                               "wait until it is ready")
        now = time.time()
        plan = Plan(
            candidate=candidate, baseline=route.active, steps=steps, step_seconds=step_seconds,  # type: ignore[arg-type]
            max_error_rate_increase=max_error_rate_increase, max_latency_ratio=max_latency_ratio,
            min_requests=min_requests, sticky=sticky, state=RUNNING, step=0, step_started_at=now, started_at=now,
            started_by=who.actor, revision=(current.revision if current else 0) + 1,
        )
        entry = entry.but(detail=f"steps {', '.join(f'{w:g}%' for w in steps)} of {step_seconds:g} s"
                          + (f", sticky on {sticky}" if sticky else ""), extra={"weight": steps[0]})
        change = await self.store.change_rollout(
            service=service, split=(candidate, steps[0], sticky), plan=plan, expected_generation=route.generation,
            expected_revision=current.revision if current else 0, history=entry,
        )
        if not change.ok:
            raise PlanRefused(409, errors.INVALID_STATE, _conflict(change.refusal))
        log.info("canary of %s in service %s started at %g%%", candidate, service, steps[0])
        return plan

    async def pause(self, service: str, who: Who, reason: str = "") -> Plan:
        """Hold the current weight (the gate still aborts on a breach)."""
        snapshot, plan = await self._running(service, "canary_pause", who, reason, (RUNNING,))
        paused = plan.but(state=PAUSED, remaining=plan.left(time.time()))
        await self._write(service, snapshot, plan, paused, HistoryEntry(
            "canary_pause", who, target=plan.candidate, reason=reason, detail=f"held at {plan.weight:g}%"))
        return paused

    async def resume(self, service: str, who: Who, reason: str = "") -> Plan:
        """Go on with the step from where it was paused."""
        snapshot, plan = await self._running(service, "canary_resume", who, reason, (PAUSED,))
        left = plan.remaining if plan.remaining is not None else plan.step_seconds
        resumed = plan.but(state=RUNNING, remaining=None, step_started_at=time.time() - (plan.step_seconds - left))
        await self._write(service, snapshot, plan, resumed, HistoryEntry(
            "canary_resume", who, target=plan.candidate, reason=reason, detail=f"at {plan.weight:g}%, {left:.0f} s left"))
        return resumed

    async def promote(self, service: str, who: Who, reason: str = "", gate_view: GateVerdict | None = None) -> Outcome:
        """Make the candidate active now (the baseline becomes previous, the alias moves)."""
        snapshot, plan = await self._running(service, "canary_promote", who, reason, (RUNNING, PAUSED))
        done = plan.but(state=PROMOTED, outcome=reason or f"promoted by {who.actor}",
                        gate=gate_view.evidence if gate_view else plan.gate)
        outcome = await self.control.switch(plan.candidate, who, service=service, reason=reason or "canary promoted",
                                            expected_generation=snapshot.route.generation, plan=done,
                                            evidence=gate_view.evidence if gate_view else None)
        if not outcome.applied:
            raise PlanRefused(outcome.status, outcome.error_code or errors.INVALID_STATE, outcome.message)
        log.info("canary of %s in service %s promoted", plan.candidate, service)
        return outcome

    async def abort(self, service: str, who: Who, reason: str = "", verdict: GateVerdict | None = None) -> Plan:
        """Send the candidate nothing more, at once; an automatic abort (``verdict``) also tags the
        candidate in the registry and latches the service's guard, as a rollback does."""
        snapshot, plan = await self._running(service, "canary_abort", who, reason, (RUNNING, PAUSED))
        why = verdict.why if verdict else (reason or f"aborted by {who.actor}")
        done = plan.but(state=ABORTED, outcome=why, gate=verdict.evidence if verdict else plan.gate)
        entry = HistoryEntry("canary_abort", who, source=plan.candidate, target=plan.baseline, reason=reason or why,
                             detail=f"weight {plan.weight:g}% → 0 at step {plan.step + 1} of {len(plan.steps)}",
                             evidence=verdict.evidence if verdict else None)
        change = await self.store.change_rollout(
            service=service, split=None, plan=done, expected_revision=plan.revision, history=entry,
        )
        if not change.ok:
            raise PlanRefused(409, errors.INVALID_STATE, _conflict(change.refusal))
        self.metrics.rollbacks.labels(service, who.trigger).inc()
        if verdict is not None or who.trigger == "alertmanager":
            await self.store.set_guard(service=service, latched=f"canary of {plan.candidate} aborted: {why}",
                                       latched_generation=str(change.route.generation))
            self.metrics.guard_latched.labels(service).set(1)
        self.control.registry.submit(Job(
            change.route.generation, active=snapshot.deployments.get(plan.baseline),
            previous=snapshot.deployments.get(snapshot.route.previous) if snapshot.route.previous else None,
            rolled_back=snapshot.deployments.get(plan.candidate), reason=f"canary aborted: {why}", service=service,
        ))
        log.warning("canary of %s in service %s aborted: %s", plan.candidate, service, why)
        return done

    async def _running(self, service: str, action: str, who: Who, reason: str,
                       states: tuple[str, ...]) -> tuple[Snapshot, Plan]:
        snapshot = await self.store.read_snapshot(service=service)
        plan = snapshot.plan
        if plan is None or plan.state not in states:
            message = (f"no canary is {' or '.join(states)} in service {service!r}"
                       + (f" (the last one, of {plan.candidate}, is {plan.state})" if plan is not None else ""))
            await self._refuse(service, HistoryEntry(action, who, reason=reason), snapshot.route.generation, message)
        assert plan is not None
        return snapshot, plan

    async def _write(self, service: str, snapshot: Snapshot, plan: Plan, new: Plan, entry: HistoryEntry,
                     weight: float | None = None) -> None:
        split = (new.candidate, weight, new.sticky) if weight is not None else False
        change = await self.store.change_rollout(service=service, split=split, plan=new, expected_revision=plan.revision,
                                                 history=entry)
        if not change.ok:
            raise PlanRefused(409, errors.INVALID_STATE, _conflict(change.refusal))

    async def _refuse(self, service: str, entry: HistoryEntry, generation: int, message: str, status: int = 409,
                      code: str = errors.INVALID_STATE) -> None:
        await self.store.append_history(entry.but(result="refused", detail=message, generation=generation), service=service)
        raise PlanRefused(status, code, message)

    # --- what the leader does every guard interval ---------------------------------------------
    async def look(self, service: str, plan: Plan, now: float | None = None) -> GateVerdict:
        """The gate over the current step's last guard window (both sides over the same seconds)."""
        s = self._settings_for(await self.store.read_snapshot(service=service))
        now = time.time() if now is None else now
        # The whole step: at low traffic a shorter window may never hold the minimum sample.
        since = plan.step_started_at
        window = max(1.0, now - since)
        candidate = await self._figures(service, plan.candidate, since)
        baseline = await self._figures(service, plan.baseline, since)
        verdict = gate(candidate, baseline, plan, s)
        verdict.evidence["window_seconds"] = round(window, 1)
        return verdict

    async def drive(self, service: str, snapshot: Snapshot) -> None:
        """One step of a running plan: abort on a breach, move to the next weight (or promote) when the
        step's time is up and the gate passes, else hold."""
        plan = snapshot.plan
        if plan is None or not plan.active:
            return
        route = snapshot.route
        who = Who("turnout-canary", None, "canary")
        gone = [n for n in (plan.baseline, plan.candidate) if n not in snapshot.deployments]
        if gone:
            await self._end_stale(service, plan, f"{' and '.join(gone)} was deleted during the plan")
            return
        if route.active != plan.baseline or (plan.state == RUNNING and route.candidate != plan.candidate):
            # The route moved outside the plan (a switch ends the split and marks the plan; this is a leftover).
            await self._end_stale(service, plan, f"the route changed outside the plan (active {route.active}, "
                                  f"candidate {route.candidate})")
            return
        verdict = await self.look(service, plan)
        self.last[service] = verdict
        slow = self._slow_looks[service] = self._slow_looks.get(service, 0) + 1 if verdict.latency_only else 0
        if verdict.status == "breach" and (not verdict.latency_only or slow >= LATENCY_LOOKS):
            self._slow_looks.pop(service, None)
            if verdict.latency_only:
                verdict.evidence["latency_breached_looks"] = slow
            await self.abort(service, who, verdict=verdict)
            return
        if verdict.status == "breach":
            return  # latency breached, not yet for long enough: neither abort nor move on
        if plan.state != RUNNING or plan.left(time.time()) > 0:
            return
        if verdict.status != "pass":
            return  # the step's time is up but a sample is short: it holds until the gate can judge
        if plan.step + 1 < len(plan.steps):
            weight = plan.steps[plan.step + 1]
            moved = plan.but(step=plan.step + 1, step_started_at=time.time(), gate=verdict.evidence)
            await self._write(service, snapshot, plan, moved, HistoryEntry(
                "canary_step", who, source=plan.baseline, target=plan.candidate, reason=verdict.why,
                detail=f"step {plan.step + 2} of {len(plan.steps)}: {plan.weight:g}% → {weight:g}%",
                evidence=verdict.evidence, extra={"weight": weight}), weight=weight)
            log.info("canary of %s in service %s: step %d, %g%%", plan.candidate, service, plan.step + 2, weight)
            return
        await self.promote(service, who, reason=f"every step passed: {verdict.why}", gate_view=verdict)

    async def _end_stale(self, service: str, plan: Plan, why: str) -> None:
        done = plan.but(state=ABORTED, outcome=why)
        await self.store.change_rollout(service=service, plan=done, expected_revision=plan.revision, history=HistoryEntry(
            "canary_abort", Who("turnout-canary", None, "canary"), source=plan.candidate, reason=why))


def _conflict(refusal: str | None) -> str:
    return {
        "plan_conflict": "the plan changed concurrently (another operator or the guard's leader); re-read and retry",
        "conflict": "the route changed concurrently; re-read and retry",
        "unknown": "the candidate deployment no longer exists",
        "no_service": "the service no longer exists",
    }.get(refusal or "", f"not applied ({refusal})")

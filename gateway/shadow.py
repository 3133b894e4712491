"""Shadow traffic: a copy of a share of a service's requests goes to a shadow deployment after the
active one answered, off the client's path, and the two answers are compared prediction by prediction.

The client never waits for the shadow: a request is offered once its own answer is complete, into a
bounded queue (by count and by bytes) that a few workers drain; a full queue drops the copy and counts
it. What is compared is MLflow's JSON answer in each of its forms (``{"predictions": [...]}``, its
dict-of-lists and list-of-dicts forms, a bare list): labels and strings must be equal (class flips are
counted by ``from → to`` pair), numbers may differ by a tolerance (absolute and relative differences
are kept for percentiles).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .attribution import HeadBuilder, Replay
from .balancer import ReplicaSet
from .metrics import GatewayMetrics
from .upstream import NOTHING_SENT, UpstreamError, UpstreamPool

log = logging.getLogger(__name__)

# Results of one mirrored request (the ``result`` label of turnout_shadow_requests_total).
AGREE, DIFFER, SHADOW_ERROR, PRIMARY_ERROR, INCOMPARABLE = "agree", "differ", "shadow_error", "primary_error", "incomparable"
RESULTS = (AGREE, DIFFER, SHADOW_ERROR, PRIMARY_ERROR, INCOMPARABLE)
# Why a copy was not sent (the ``reason`` label of turnout_shadow_dropped_total).
QUEUE_FULL, TOO_LARGE, NOT_HELD = "queue_full", "too_large", "body_not_held"
DROP_REASONS = (QUEUE_FULL, TOO_LARGE, NOT_HELD, "shadow_down")
# Kept per shadow for the report: the most recent differences and latencies (exact percentiles), the
# most frequent class flips, the last disagreeing examples.
KEPT_VALUES = 10_000
TOP_FLIPS = 10
_FLIPS_KEPT = 200
EXAMPLES = 20
EXAMPLE_BYTES = 1000
# Answers are compared up to this size (the active's is held whole only up to it too): parsing and
# comparing runs on the gateway's event loop, so its cost per copy must stay small.
MAX_ANSWER = 64 * 1024
# More rows than this in one answer are not compared (counted incomparable), for the same reason.
MAX_ROWS = 5000
# Why a copy was not sent: the shadow refused connections just now (it is retried after a pause that
# doubles up to SHADOW_DOWN_MAX seconds; a dead shadow must not cost a connection attempt per request).
SHADOW_DOWN = "shadow_down"
SHADOW_DOWN_MAX = 30.0


@dataclass
class Comparison:
    """Two answers to the same request, compared."""

    result: str
    rows_agree: int = 0
    rows_differ: int = 0
    flips: Counter[str] = field(default_factory=Counter)
    abs_differences: list[float] = field(default_factory=list)
    rel_differences: list[float] = field(default_factory=list)


def _is_number(value: Any) -> bool:
    return isinstance(value, float)


def _is_label(value: Any) -> bool:
    # Integers are class labels in MLflow's answers (a classifier's 0/1/2); floats are scores and values.
    return isinstance(value, str | bool | int) or value is None


def rows_of(answer: Any) -> list[Any] | None:
    """The prediction rows of an MLflow JSON answer, in whichever of its forms; None if it is none of them."""
    if isinstance(answer, dict) and set(answer) == {"predictions"}:
        answer = answer["predictions"]
    if isinstance(answer, list):
        return answer
    if isinstance(answer, dict) and answer and all(isinstance(v, list) for v in answer.values()):
        lengths = {len(v) for v in answer.values()}
        if len(lengths) != 1:
            return None
        names = list(answer)
        return [dict(zip(names, values)) for values in zip(*answer.values())]
    return None


def _leaves(a: Any, b: Any) -> Iterator[tuple[Any, Any]] | None:
    """Pairs of scalars at the same place in two rows; None when the rows are not shaped alike."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return None
        pairs = [_leaves(a[k], b[k]) for k in sorted(a)]
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return None
        pairs = [_leaves(x, y) for x, y in zip(a, b)]
    else:
        return iter([(a, b)])
    if any(p is None for p in pairs):
        return None
    return (pair for p in pairs for pair in p)  # type: ignore[union-attr]


def compare(primary_status: int, primary: bytes | None, shadow_status: int | None, shadow: bytes | None,
            tolerance: float) -> Comparison:
    """Compare the active's and the shadow's answers to one request. Numbers agree within ``tolerance``
    relative to the larger magnitude (absolutely below 1)."""
    if primary_status != 200:
        return Comparison(PRIMARY_ERROR)
    if shadow_status != 200:
        return Comparison(SHADOW_ERROR)
    if primary is None or shadow is None or len(primary) > MAX_ANSWER or len(shadow) > MAX_ANSWER:
        return Comparison(INCOMPARABLE)
    try:
        first = rows_of(json.loads(primary))
        second = rows_of(json.loads(shadow))
    except (ValueError, RecursionError):
        return Comparison(INCOMPARABLE)
    if first is None or second is None or len(first) != len(second) or len(first) > MAX_ROWS:
        return Comparison(INCOMPARABLE)
    out = Comparison(AGREE)
    for a, b in zip(first, second):
        pairs = _leaves(a, b)
        if pairs is None:
            return Comparison(INCOMPARABLE)
        same = True
        for x, y in pairs:
            if isinstance(x, int | float) and isinstance(y, int | float) and not isinstance(x, bool) and not isinstance(y, bool) \
                    and (_is_number(x) or _is_number(y)):
                if not (math.isfinite(x) and math.isfinite(y)):
                    # Infinities agree only with the same infinity, NaN only with NaN; no difference is kept.
                    if not (x == y or (math.isnan(x) and math.isnan(y))):
                        same = False
                    continue
                diff = abs(x - y)
                scale = max(1.0, abs(x), abs(y))
                out.abs_differences.append(diff)
                out.rel_differences.append(diff / max(abs(x), abs(y)) if max(abs(x), abs(y)) > 0 else 0.0)
                if not diff <= tolerance * scale:
                    same = False
            elif x != y:
                same = False
                if _is_label(x) and _is_label(y):
                    out.flips[f"{x} → {y}"] += 1
        if same:
            out.rows_agree += 1
        else:
            out.rows_differ += 1
    if out.rows_differ:
        out.result = DIFFER
    return out


def percentiles(values: Any, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict[str, float] | None:
    """Exact percentiles (linear interpolation between closest ranks, as numpy's default) and the max."""
    ordered = sorted(values)
    if not ordered:
        return None
    out = {}
    for q in qs:
        pos = q * (len(ordered) - 1)
        low, high = math.floor(pos), math.ceil(pos)
        out[f"p{q * 100:g}"] = ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
    out["max"] = ordered[-1]
    return out


class Report:
    """What one shadow has shown in this gateway process since it was (last) turned on."""

    def __init__(self, service: str, name: str, active: str) -> None:
        self.service, self.name, self.active = service, name, active
        self.since = time.time()
        self.results: Counter[str] = Counter()
        self.rows: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.flips: Counter[str] = Counter()
        self.abs_differences: deque[float] = deque(maxlen=KEPT_VALUES)
        self.rel_differences: deque[float] = deque(maxlen=KEPT_VALUES)
        self.latency = {"active": deque(maxlen=KEPT_VALUES), "shadow": deque(maxlen=KEPT_VALUES)}
        self.examples: deque[dict[str, Any]] = deque(maxlen=EXAMPLES)

    def add(self, comparison: Comparison, primary_seconds: float, shadow_seconds: float | None) -> None:
        """Count one compared request."""
        self.results[comparison.result] += 1
        self.rows["agree"] += comparison.rows_agree
        self.rows["differ"] += comparison.rows_differ
        self.flips.update(comparison.flips)
        if len(self.flips) > _FLIPS_KEPT:
            # Bounded memory: keep the most frequent pairs (rare ones may be undercounted after this).
            self.flips = Counter(dict(self.flips.most_common(_FLIPS_KEPT // 2)))
        self.abs_differences.extend(comparison.abs_differences)
        self.rel_differences.extend(comparison.rel_differences)
        self.latency["active"].append(primary_seconds)
        if shadow_seconds is not None:
            self.latency["shadow"].append(shadow_seconds)

    def view(self) -> dict[str, Any]:
        """The report as the admin API serves it."""
        compared = self.results[AGREE] + self.results[DIFFER]
        rows = self.rows["agree"] + self.rows["differ"]
        mirrored = sum(self.results.values())
        return {
            "service": self.service, "shadow": self.name, "active": self.active, "since": self.since,
            "scope": "this gateway replica", "mirrored": mirrored, "results": dict(self.results),
            "dropped": dict(self.dropped),
            "agreement": {"requests": self.results[AGREE] / compared if compared else None,
                          "rows": self.rows["agree"] / rows if rows else None,
                          "rows_compared": rows, "rows_differ": self.rows["differ"]},
            "flips": [{"from_to": pair, "rows": n, "share_of_rows": n / rows if rows else None}
                      for pair, n in self.flips.most_common(TOP_FLIPS)],
            "numeric": {"values_compared": len(self.abs_differences), "abs_difference": percentiles(self.abs_differences),
                        "rel_difference": percentiles(self.rel_differences)},
            "latency_seconds": {side: percentiles(values, (0.5, 0.99)) for side, values in self.latency.items()},
            "error_rates": {"active": self.results[PRIMARY_ERROR] / mirrored if mirrored else None,
                            "shadow": self.results[SHADOW_ERROR] / mirrored if mirrored else None},
            "examples": list(self.examples),
        }


@dataclass(frozen=True, slots=True)
class ShadowTarget:
    """Where a service's shadow copies go while a snapshot lasts (built once per snapshot)."""

    service: str
    name: str
    active: str
    percent: float
    replicas: ReplicaSet[Any]


@dataclass
class _Copy:
    target: ShadowTarget
    replay: Replay
    primary_status: int
    primary: bytes | None
    primary_seconds: float


def _clip(data: bytes | None) -> str | None:
    if data is None:
        return None
    text = data[:EXAMPLE_BYTES].decode("utf-8", "replace")
    return text + ("…" if len(data) > EXAMPLE_BYTES else "")


class Shadows:
    """The shadow copies of one gateway process: offered by the proxy, sent by a few workers, compared."""

    def __init__(self, pool: UpstreamPool, metrics: GatewayMetrics, build_head: HeadBuilder, *, concurrency: int = 4,
                 queue: int = 256, queue_bytes: int = 16 * 1024 * 1024, max_body: int = 256 * 1024,
                 timeout: float = 5.0, tolerance: float = 1e-6, keep_bodies: bool = True,
                 rand: Callable[[], float] = random.random) -> None:
        self.pool = pool
        self.metrics = metrics
        self.build_head = build_head
        self.concurrency = concurrency
        self.max_queue = queue
        self.max_queue_bytes = queue_bytes
        self.max_body = max_body
        self.timeout = timeout
        self.tolerance = tolerance
        self.keep_bodies = keep_bodies
        self._rand = rand
        self._queue: deque[_Copy] = deque()
        self._queued_bytes = 0
        self._wake: asyncio.Event | None = None
        self._workers: list[asyncio.Task[None]] = []
        self.reports: dict[tuple[str, str], Report] = {}
        # Per shadow: (until when copies are not sent, the last pause) after it refused connections.
        self._down: dict[tuple[str, str], tuple[float, float]] = {}

    def report(self, target: ShadowTarget) -> Report:
        """The report of a shadow (a new one when it now shadows another active deployment)."""
        key = (target.service, target.name)
        found = self.reports.get(key)
        if found is None or found.active != target.active:
            found = self.reports[key] = Report(target.service, target.name, target.active)
        return found

    def reset(self, service: str, name: str | None = None) -> None:
        """Forget a service's reports (a shadow turned on afresh starts a new one)."""
        for key in [k for k in self.reports if k[0] == service and (name is None or k[1] == name)]:
            del self.reports[key]

    def discard(self, service: str) -> None:
        """Drop a service's copies still waiting (its shadow was turned off: they are nobody's business now)."""
        kept = deque(c for c in self._queue if c.target.service != service)
        self._queue = kept
        self._queued_bytes = sum(len(c.replay.body) for c in kept)

    def wanted(self, target: ShadowTarget) -> bool:
        """Whether this request falls in the shadow's share (drawn before anything is built for a copy)."""
        return self._rand() * 100 < target.percent

    def offer(self, target: ShadowTarget, replay: Replay, primary_status: int, primary: bytes | None,
              primary_seconds: float) -> None:
        """A request of the shadow's share the active deployment answered: send a copy to the shadow, later."""
        size = len(replay.body)
        if size > self.max_body:
            self.drop(target, TOO_LARGE)
            return
        down = self._down.get((target.service, target.name))
        if down is not None and time.monotonic() < down[0]:
            self.drop(target, SHADOW_DOWN)
            return
        if len(self._queue) >= self.max_queue or self._queued_bytes + size > self.max_queue_bytes:
            self.drop(target, QUEUE_FULL)
            return
        self._queue.append(_Copy(target, replay, primary_status, primary, primary_seconds))
        self._queued_bytes += size
        if self._wake is None:
            self._start()
        self._wake.set()  # type: ignore[union-attr]

    def drop(self, target: ShadowTarget, reason: str) -> None:
        """A request of the shadow's share that was not copied, counted."""
        self.metrics.shadow_dropped.labels(target.service, target.name, reason).inc()
        self.report(target).dropped[reason] += 1

    def _start(self) -> None:
        self._wake = asyncio.Event()
        self._workers = [asyncio.get_running_loop().create_task(self._work(), name=f"shadow-{i}")
                         for i in range(self.concurrency)]

    async def _work(self) -> None:
        assert self._wake is not None
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            copy = self._queue.popleft()
            self._queued_bytes -= len(copy.replay.body)
            try:
                await self._send(copy)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("service %s: shadow copy to %s", copy.target.service, copy.target.name)

    async def _send(self, copy: _Copy) -> None:
        target = copy.target
        replicas = target.replicas
        replica = replicas.only or replicas.pick()
        status: int | None = None
        answer: bytes | None = None
        loop = asyncio.get_running_loop()
        started = loop.time()
        if replica is not None:
            replica.inflight += 1
            try:
                r = copy.replay
                head = self.build_head(r.headers, r.query, r.remote, r.scheme, replica.target, len(r.body))
                upstream = await self.pool.request(replica.target.host, replica.target.port, head, r.body,
                                                   deadline=started + self.timeout)
                try:
                    status = upstream.status
                    if upstream.small(MAX_ANSWER):
                        answer = await upstream.read()
                finally:
                    upstream.release()
                self._down.pop((target.service, target.name), None)
            except UpstreamError as exc:
                # Broken off or timed out, even after its head: the shadow failed this copy.
                status, answer = None, None
                log.debug("service %s: shadow %s: %s", target.service, target.name, exc)
                if exc.kind in NOTHING_SENT:
                    key = (target.service, target.name)
                    pause = min(self._down.get(key, (0.0, 0.5))[1] * 2, SHADOW_DOWN_MAX)
                    self._down[key] = (time.monotonic() + pause, pause)
            finally:
                replica.inflight -= 1
        elapsed = loop.time() - started if status is not None else None
        comparison = compare(copy.primary_status, copy.primary, status, answer, self.tolerance)
        self._count(copy, comparison, status, answer, elapsed)

    def _count(self, copy: _Copy, comparison: Comparison, status: int | None, answer: bytes | None,
               elapsed: float | None) -> None:
        target, m = copy.target, self.metrics
        m.shadow_requests.labels(target.service, target.name, comparison.result).inc()
        if comparison.rows_agree:
            m.shadow_rows.labels(target.service, target.name, "agree").inc(comparison.rows_agree)
        if comparison.rows_differ:
            m.shadow_rows.labels(target.service, target.name, "differ").inc(comparison.rows_differ)
        histogram = m.shadow_abs_difference.labels(target.service, target.name)  # finite values only
        for diff in comparison.abs_differences:
            histogram.observe(diff)
        if elapsed is not None:
            m.shadow_duration.labels(target.service, target.name).observe(elapsed)
        report = self.report(target)
        report.add(comparison, copy.primary_seconds, elapsed)
        if comparison.result in (DIFFER, SHADOW_ERROR, INCOMPARABLE):
            example: dict[str, Any] = {"time": time.time(), "result": comparison.result, "shadow_status": status,
                                       "rows_differ": comparison.rows_differ}
            if self.keep_bodies:
                # Labels can be anything the model returns: a few, and only when bodies may be kept.
                example["flips"] = dict(comparison.flips.most_common(TOP_FLIPS))
            if self.keep_bodies:
                example.update(request=_clip(copy.replay.body), active_answer=_clip(copy.primary),
                               shadow_answer=_clip(answer))
            report.examples.append(example)

    def queued(self) -> int:
        """Copies waiting to be sent."""
        return len(self._queue)

    async def close(self) -> None:
        """Stop the workers (copies still queued are dropped: they were never the client's)."""
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        self._queue.clear()
        self._queued_bytes = 0
        self._wake = None

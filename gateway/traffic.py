"""Recent traffic per deployment, in one-second buckets: counts by outcome and a latency histogram.

The proxy records every finished request here (a few list operations, no I/O). The admin API reads
this replica's recent figures from it; the guard flushes the buckets to Redis so that a decision sees
the traffic of every replica.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .metrics import CLIENT_ERROR, LATENCY_BUCKETS, MODEL_ERROR, OK, UPSTREAM_ERROR

OUTCOMES = (OK, CLIENT_ERROR, MODEL_ERROR, UPSTREAM_ERROR)
_OUTCOME_INDEX = {name: i for i, name in enumerate(OUTCOMES)}
# Latency histogram upper bounds in seconds; the last bucket is everything slower.
BOUNDS: tuple[float, ...] = (*LATENCY_BUCKETS, math.inf)
_WIDTH = len(OUTCOMES) + len(BOUNDS)
HISTORY_SECONDS = 120


@dataclass(frozen=True, slots=True)
class Figures:
    """Traffic of one deployment over a window."""

    requests: int
    ok: int
    client_errors: int
    model_errors: int
    upstream_errors: int
    p50: float | None
    p99: float | None

    @property
    def failures(self) -> int:
        """Requests that count against the model (never the client's own errors)."""
        return self.model_errors + self.upstream_errors

    @property
    def error_rate(self) -> float:
        """Failures over requests judged (client errors excluded); 0 without traffic."""
        judged = self.requests - self.client_errors
        return self.failures / judged if judged > 0 else 0.0

    def as_dict(self) -> dict[str, float | int | None]:
        """JSON form."""
        return {
            "requests": self.requests,
            "ok": self.ok,
            "client_errors": self.client_errors,
            "model_errors": self.model_errors,
            "upstream_errors": self.upstream_errors,
            "error_rate": round(self.error_rate, 6),
            "p50_seconds": self.p50,
            "p99_seconds": self.p99,
        }


def figures_from_counts(counts: Sequence[int]) -> Figures:
    """Figures from one row of summed counters (outcomes, then latency buckets)."""
    ok, client, model, upstream = counts[: len(OUTCOMES)]
    hist = counts[len(OUTCOMES) :]
    return Figures(ok + client + model + upstream, ok, client, model, upstream, quantile(hist, 0.5), quantile(hist, 0.99))


def quantile(hist: Sequence[int], q: float) -> float | None:
    """Quantile from bucket counts, interpolated within the bucket (as Prometheus's histogram_quantile)."""
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(hist):
        if count and seen + count >= rank:
            lower = BOUNDS[i - 1] if i > 0 else 0.0
            upper = BOUNDS[i]
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return BOUNDS[-2]


def empty_row() -> list[int]:
    """A zeroed counter row."""
    return [0] * _WIDTH


def bucket_index(seconds: float) -> int:
    """Column of the latency bucket for a duration (the first bound ≥ it, as Prometheus's ``le``)."""
    return len(OUTCOMES) + min(bisect_left(BOUNDS, seconds), len(BOUNDS) - 1)


class Traffic:
    """Per-deployment rows of counters keyed by the second they happened in."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # deployment → second → counter row
        self._rows: dict[str, dict[int, list[int]]] = {}
        # Increments not yet flushed to the shared store: deployment → second → row.
        self._pending: dict[str, dict[int, list[int]]] = {}
        self._second = 0

    def record(self, deployment: str, outcome: str, seconds: float) -> None:
        """Count one finished request."""
        second = int(self._clock())
        if second != self._second:
            # Once per second: forget what no window reaches (and what no flusher took).
            self._second = second
            self._trim(second)
        col_outcome = _OUTCOME_INDEX[outcome]
        col_latency = bucket_index(seconds)
        for table in (self._rows, self._pending):
            per = table.get(deployment)
            if per is None:
                per = table[deployment] = {}
            row = per.get(second)
            if row is None:
                row = per[second] = empty_row()
            row[col_outcome] += 1
            row[col_latency] += 1

    def local(self, deployment: str, window: float) -> Figures:
        """This replica's figures for a deployment over the last ``window`` seconds."""
        now = int(self._clock())
        self._trim(now)
        total = empty_row()
        for second, row in self._rows.get(deployment, {}).items():
            if second > now - window:
                for i, v in enumerate(row):
                    total[i] += v
        return figures_from_counts(total)

    def take_pending(self) -> dict[str, dict[int, list[int]]]:
        """Increments since the last call (for the flush to Redis); the caller owns the result."""
        pending, self._pending = self._pending, {}
        return pending

    def restore_pending(self, pending: dict[str, dict[int, list[int]]]) -> None:
        """Put back increments a failed flush could not deliver (merged with newer ones)."""
        for deployment, per in pending.items():
            mine = self._pending.setdefault(deployment, {})
            for second, row in per.items():
                current = mine.get(second)
                if current is None:
                    mine[second] = row
                else:
                    for i, v in enumerate(row):
                        current[i] += v

    def deployments(self) -> Iterable[str]:
        """Deployments seen recently."""
        return list(self._rows)

    def _trim(self, now: int) -> None:
        oldest = now - HISTORY_SECONDS
        for table in (self._rows, self._pending):
            for per in table.values():
                for second in [s for s in per if s < oldest]:
                    del per[second]

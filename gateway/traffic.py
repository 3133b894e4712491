"""Recent traffic per deployment, in one-second buckets: counts by outcome and a latency sketch.

The proxy records every finished request here (a few dict operations, no I/O). The admin API reads
this replica's recent figures from it; the guard flushes the buckets to Redis so that a decision sees
the traffic of every replica.

Latency is kept as a DDSketch-style sketch (buckets whose bounds grow by a constant factor), not in
the Prometheus histogram's coarse buckets: interpolating inside a 1-2.5 s bucket made a steady 1.5 s
latency read as a p99 of 2.485 s. Any quantile read from the sketch is within ``RELATIVE_ERROR`` of a
latency some request really had. Rows are sparse (column → count): requests cluster in few buckets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .metrics import CLIENT_ERROR, MODEL_ERROR, OK, UPSTREAM_ERROR

OUTCOMES = (OK, CLIENT_ERROR, MODEL_ERROR, UPSTREAM_ERROR)
_OUTCOME_INDEX = {name: i for i, name in enumerate(OUTCOMES)}
HISTORY_SECONDS = 120

# The sketch: bucket k > 0 holds latencies in (MIN_SECONDS·γ^(k-1), MIN_SECONDS·γ^k]; bucket 0 all up
# to MIN_SECONDS. Answering a bucket's 2·MIN·γ^k/(γ+1) is within RELATIVE_ERROR of any value in it.
RELATIVE_ERROR = 0.02
_GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)
_LOG_GAMMA = math.log(_GAMMA)
MIN_SECONDS = 1e-4
_MAX_BUCKET = math.ceil(math.log(3600 / MIN_SECONDS) / _LOG_GAMMA)
# Row columns: outcomes first, latency buckets from here on (room left for more outcomes).
LATENCY_BASE = 16

Row = dict[int, int]


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
    def judged(self) -> int:
        """Requests that say something about the model (client errors excluded)."""
        return self.requests - self.client_errors

    @property
    def error_rate(self) -> float:
        """Failures over requests judged; 0 without traffic."""
        return self.failures / self.judged if self.judged > 0 else 0.0

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
            "latency_relative_error": RELATIVE_ERROR,
        }


def latency_column(seconds: float) -> int:
    """Row column of the sketch bucket holding a duration."""
    if seconds <= MIN_SECONDS:
        return LATENCY_BASE
    return LATENCY_BASE + min(_MAX_BUCKET, math.ceil(math.log(seconds / MIN_SECONDS) / _LOG_GAMMA))


def bucket_value(column: int) -> float:
    """The latency a sketch bucket stands for (within RELATIVE_ERROR of everything in it)."""
    k = column - LATENCY_BASE
    if k <= 0:
        return MIN_SECONDS
    return 2 * MIN_SECONDS * _GAMMA**k / (_GAMMA + 1)


def quantile(row: Mapping[int, int], q: float) -> float | None:
    """The q-quantile of the latencies in a row (nearest rank), None without any."""
    buckets = sorted((c, n) for c, n in row.items() if c >= LATENCY_BASE and n > 0)
    total = sum(n for _, n in buckets)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for column, count in buckets:
        seen += count
        if seen >= rank:
            return bucket_value(column)
    return bucket_value(buckets[-1][0])


def figures_from_counts(row: Mapping[int, int]) -> Figures:
    """Figures from one row of summed counters (outcomes and latency buckets)."""
    ok, client, model, upstream = (row.get(i, 0) for i in range(len(OUTCOMES)))
    return Figures(ok + client + model + upstream, ok, client, model, upstream, quantile(row, 0.5), quantile(row, 0.99))


def add_row(total: Row, row: Mapping[int, int]) -> None:
    """Add ``row``'s counters into ``total``."""
    for column, count in row.items():
        total[column] = total.get(column, 0) + count


# A deployment of a service: (service, deployment).
Key = tuple[str, str]


class Traffic:
    """Per-deployment rows of counters keyed by the second they happened in."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # (service, deployment) → second → counter row
        self._rows: dict[Key, dict[int, Row]] = {}
        # Increments not yet flushed to the shared store: (service, deployment) → second → row.
        self._pending: dict[Key, dict[int, Row]] = {}
        self._second = 0

    def record(self, deployment: Key, outcome: str, seconds: float) -> None:
        """Count one finished request."""
        second = int(self._clock())
        if second != self._second:
            # Once per second: forget what no window reaches (and what no flusher took).
            self._second = second
            self._trim(second)
        col_outcome = _OUTCOME_INDEX[outcome]
        col_latency = latency_column(seconds)
        for table in (self._rows, self._pending):
            per = table.get(deployment)
            if per is None:
                per = table[deployment] = {}
            row = per.get(second)
            if row is None:
                row = per[second] = {}
            row[col_outcome] = row.get(col_outcome, 0) + 1
            row[col_latency] = row.get(col_latency, 0) + 1

    def local(self, deployment: Key, window: float) -> Figures:
        """This replica's figures for a deployment over the last ``window`` seconds."""
        now = int(self._clock())
        self._trim(now)
        total: Row = {}
        for second, row in self._rows.get(deployment, {}).items():
            if second > now - window:
                add_row(total, row)
        return figures_from_counts(total)

    def take_pending(self) -> dict[Key, dict[int, Row]]:
        """Increments since the last call (for the flush to Redis); the caller owns the result."""
        pending, self._pending = self._pending, {}
        return pending

    def restore_pending(self, pending: dict[Key, dict[int, Row]]) -> None:
        """Put back increments a failed flush could not deliver (merged with newer ones)."""
        for deployment, per in pending.items():
            mine = self._pending.setdefault(deployment, {})
            for second, row in per.items():
                add_row(mine.setdefault(second, {}), row)

    def deployments(self) -> Iterable[Key]:
        """Deployments seen recently."""
        return list(self._rows)

    def _trim(self, now: int) -> None:
        oldest = now - HISTORY_SECONDS
        for table in (self._rows, self._pending):
            for per in table.values():
                for second in [s for s in per if s < oldest]:
                    del per[second]

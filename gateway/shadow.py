"""Shadow traffic: a copy of a share of a service's requests goes to a shadow deployment after the
active one answered, off the client's path, and the two answers are compared prediction by prediction.

The client never waits for the shadow: a request is offered once its own answer is complete, handed to
a copier process (``gateway.shadow_copier``) that sends it and compares the answers off the gateway's
interpreter, within a bound by count and by bytes; beyond it the copy is dropped and counted. What is compared is MLflow's JSON answer in each of its forms (``{"predictions": [...]}``, its
dict-of-lists and list-of-dicts forms, a bare list): labels and strings must be equal (class flips are
counted by ``from → to`` pair), numbers may differ by a tolerance (absolute and relative differences
are kept for percentiles).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import pickle
import random
import struct
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .attribution import Replay
from .balancer import ReplicaSet
from .metrics import LATENCY_BUCKETS, SHADOW_DIFFERENCE_BUCKETS, GatewayMetrics
from .upstream import UpstreamPool

log = logging.getLogger(__name__)

# Results of one mirrored request (the ``result`` label of turnout_shadow_requests_total).
AGREE, DIFFER, SHADOW_ERROR, PRIMARY_ERROR, INCOMPARABLE = "agree", "differ", "shadow_error", "primary_error", "incomparable"
RESULTS = (AGREE, DIFFER, SHADOW_ERROR, PRIMARY_ERROR, INCOMPARABLE)
# Why a copy was not sent (the ``reason`` label of turnout_shadow_dropped_total).
QUEUE_FULL, TOO_LARGE, NOT_HELD = "queue_full", "too_large", "body_not_held"
# The copier process was lost with copies it held, or is being restarted (COPIER_RESTART seconds later).
COPIER_DOWN = "copier_down"
COPIER_RESTART = 1.0
# Seconds the copier has to exit once the gateway closes its pipe.
COPIER_STOP = 2.0
# Kept per shadow for the report: the most recent differences and latencies (exact percentiles), the
# most frequent class flips, the last disagreeing examples.
KEPT_VALUES = 10_000
TOP_FLIPS = 10
_FLIPS_KEPT = 200
EXAMPLES = 20
EXAMPLE_BYTES = 1000
# Answers are compared up to this size (the active's is held whole only up to it too): the copier's
# work per copy stays small, so a few huge answers do not starve the rest of the share.
MAX_ANSWER = 64 * 1024
# More rows than this in one answer are not compared (counted incomparable), for the same reason.
MAX_ROWS = 5000
# Why a copy was not sent: the shadow refused connections just now (it is retried after a pause that
# doubles up to SHADOW_DOWN_MAX seconds; a dead shadow must not cost a connection attempt per request).
SHADOW_DOWN = "shadow_down"
SHADOW_DOWN_MAX = 30.0
DROP_REASONS = (QUEUE_FULL, TOO_LARGE, NOT_HELD, SHADOW_DOWN, COPIER_DOWN)


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
        self.latency: dict[str, deque[float]] = {"active": deque(maxlen=KEPT_VALUES), "shadow": deque(maxlen=KEPT_VALUES)}
        self.examples: deque[dict[str, Any]] = deque(maxlen=EXAMPLES)

    def merge(self, tally: Tally) -> None:
        """Add what the copier counted since its last report."""
        self.results.update(tally.results)
        self.rows["agree"] += tally.rows_agree
        self.rows["differ"] += tally.rows_differ
        self.dropped.update(tally.dropped)
        self.flips.update(tally.flips)
        if len(self.flips) > _FLIPS_KEPT:
            # Bounded memory: keep the most frequent pairs (rare ones may be undercounted after this).
            self.flips = Counter(dict(self.flips.most_common(_FLIPS_KEPT // 2)))
        self.abs_differences.extend(tally.abs_differences)
        self.rel_differences.extend(tally.rel_differences)
        self.latency["active"].extend(tally.active_seconds)
        self.latency["shadow"].extend(tally.shadow_seconds)
        self.examples.extend(tally.examples)

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


@dataclass(slots=True)
class Tally:
    """What the copier process saw of one shadow (for one active, one epoch) since it last reported."""

    results: Counter[str] = field(default_factory=Counter)
    rows_agree: int = 0
    rows_differ: int = 0
    flips: Counter[str] = field(default_factory=Counter)
    abs_differences: list[float] = field(default_factory=list)
    rel_differences: list[float] = field(default_factory=list)
    active_seconds: list[float] = field(default_factory=list)
    shadow_seconds: list[float] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)
    # Copies finished (compared or dropped) and their bytes: they free room under the gateway's bound.
    done: int = 0
    done_bytes: int = 0
    # Histogram buckets of all the differences and shadow latencies (the lists above keep only the last
    # KEPT_VALUES), filled in by the copier when it reports.
    difference_counts: list[int] = field(default_factory=list)
    difference_sum: float = 0.0
    duration_counts: list[int] = field(default_factory=list)
    duration_sum: float = 0.0

    def add(self, comparison: Comparison, primary_seconds: float, shadow_seconds: float | None) -> None:
        """Count one compared request."""
        self.results[comparison.result] += 1
        self.rows_agree += comparison.rows_agree
        self.rows_differ += comparison.rows_differ
        self.flips.update(comparison.flips)
        self.abs_differences.extend(comparison.abs_differences)
        self.rel_differences.extend(comparison.rel_differences)
        self.active_seconds.append(primary_seconds)
        if shadow_seconds is not None:
            self.shadow_seconds.append(shadow_seconds)


@dataclass(frozen=True, slots=True)
class ShadowTarget:
    """Where a service's shadow copies go while a snapshot lasts (built once per snapshot)."""

    service: str
    name: str
    active: str
    percent: float
    replicas: ReplicaSet[Any]


# Messages between the gateway and its copier process: a length, then a pickle. Both ends are this
# program (the gateway starts the copier and owns both pipes), so unpickling trusts nothing foreign.
_LENGTH = struct.Struct("<I")


def frame(message: Any) -> bytes:
    """One message, ready for the pipe."""
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message from the pipe (IncompleteReadError at its end)."""
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(size))


class Shadows:
    """The shadow copies of one gateway process: drawn and offered by the proxy, sent and compared by a
    copier process, counted here.

    Sending a copy, reading the shadow's answer and comparing the two costs about 1.6 times a whole
    proxied request in interpreter work; on the gateway's event loop (or a thread of its process, which
    shares the interpreter lock) that came straight off the clients' throughput. So the gateway only
    pickles the copy into a pipe (a few µs) and a child process, started when the first copy is offered,
    does the rest on another core and reports counts back in batches. Copies not yet reported done are
    bounded by count and bytes; beyond that, and while the shadow or the copier is down, copies are
    dropped and counted before anything is built for them.
    """

    def __init__(self, pool: UpstreamPool, metrics: GatewayMetrics, *, concurrency: int = 4, queue: int = 256,
                 queue_bytes: int = 16 * 1024 * 1024, max_body: int = 256 * 1024, timeout: float = 5.0,
                 tolerance: float = 1e-6, keep_bodies: bool = True, rand: Callable[[], float] = random.random) -> None:
        self.max_queue = queue
        self.max_queue_bytes = queue_bytes
        self.max_body = max_body
        self.config = {"concurrency": concurrency, "timeout": timeout, "tolerance": tolerance, "keep_bodies": keep_bodies,
                       "connect": pool.timeouts.connect, "keepalive": pool.keepalive}
        self._counts = metrics.shadow
        self._rand = rand
        self.reports: dict[tuple[str, str], Report] = {}
        # Copies handed to the copier and not reported done yet: per (service, shadow, active, epoch) as the
        # copier reports them, in all, and their bytes.
        self._outstanding: dict[tuple[str, str, str, int], int] = {}
        self._waiting = 0
        self._waiting_bytes = 0
        # A report's epoch: turning a shadow on afresh starts a new one; late counts of the old go to metrics only.
        self._epochs: dict[str, int] = {}
        # Per shadow: until when (monotonic, the same clock in both processes) it is paused after refusing connections.
        self._down: dict[tuple[str, str], float] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._starting: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: list[bytes] = []
        self._batch: list[tuple[Any, ...]] = []
        self._ready = asyncio.Event()
        self._restart_at = 0.0
        self._closing = False

    def report(self, service: str, name: str, active: str) -> Report:
        """The report of a shadow (a new one when it now shadows another active deployment)."""
        key = (service, name)
        found = self.reports.get(key)
        if found is None or found.active != active:
            found = self.reports[key] = Report(service, name, active)
        return found

    def reset(self, service: str, name: str | None = None) -> None:
        """Forget a service's reports (a shadow turned on afresh starts a new one)."""
        self._epochs[service] = self._epochs.get(service, 0) + 1
        for key in [k for k in self.reports if k[0] == service and (name is None or k[1] == name)]:
            del self.reports[key]

    def discard(self, service: str) -> None:
        """Drop a service's copies still waiting (its shadow was turned off: they are nobody's business now)."""
        self._send_batch()  # the copies offered before it are discarded with the rest
        if self._proc is not None or self._pending:
            self._write(frame(("discard", service)))

    def wanted(self, target: ShadowTarget) -> bool:
        """Whether this request falls in the shadow's share and can be copied now. Drawn before anything is
        built for a copy; a copy that cannot be taken (queue full, shadow or copier down) is counted here."""
        if self._rand() * 100 >= target.percent:
            return False
        if self._waiting >= self.max_queue:
            self.drop(target, QUEUE_FULL)
            return False
        if self._down or self._restart_at:
            now = time.monotonic()
            if now < self._down.get((target.service, target.name), 0.0):
                self.drop(target, SHADOW_DOWN)
                return False
            if self._proc is None and now < self._restart_at:
                self.drop(target, COPIER_DOWN)
                return False
        return True

    def offer(self, target: ShadowTarget, replay: Replay, primary_status: int, primary: bytes | None,
              primary_seconds: float) -> None:
        """A request of the shadow's share the active deployment answered: send a copy to the shadow, later."""
        size = len(replay.body)
        if size > self.max_body:
            self.drop(target, TOO_LARGE)
            return
        size += len(primary) if primary is not None else 0
        if self._waiting >= self.max_queue or self._waiting_bytes + size > self.max_queue_bytes:
            self.drop(target, QUEUE_FULL)
            return
        replicas = target.replicas
        replica = replicas.only or replicas.pick()
        t = replica.target if replica is not None else None
        key = (target.service, target.name, target.active, self._epochs.get(target.service, 0))
        batch = self._batch
        batch.append((
            "copy", *key,
            (t.host, t.port, t.host_header, t.path) if t is not None else None,
            replay.headers, replay.query, replay.remote, replay.scheme, replay.body,
            primary_status, primary, primary_seconds, size,
        ))
        if len(batch) == 1:
            # One pickle and one write for every copy offered in this turn of the loop: under load many
            # requests finish per turn, and a write per copy cost more than the pickling.
            asyncio.get_running_loop().call_soon(self._send_batch)
        self._outstanding[key] = self._outstanding.get(key, 0) + 1
        self._waiting += 1
        self._waiting_bytes += size

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, []
        if batch:
            self._write(frame(("copies", batch)))

    def drop(self, target: ShadowTarget, reason: str, count: int = 1) -> None:
        """A request of the shadow's share that was not copied, counted."""
        self._counts.drop(target.service, target.name, reason, count)
        self.report(target.service, target.name, target.active).dropped[reason] += count

    def queued(self) -> int:
        """Copies handed to the copier and not done yet (waiting or in flight)."""
        return self._waiting

    # --- the copier process -------------------------------------------------------------------
    def warm(self) -> None:
        """Start the copier now if it is not running (a shadow was turned on): it takes about a second to
        start, during which copies wait under the bound and beyond it are dropped."""
        if self._proc is None and self._starting is None and not self._closing and time.monotonic() >= self._restart_at:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # a snapshot applied outside the gateway's loop (a unit test): the first copy starts it
            self._starting = loop.create_task(self._start(), name="shadow-copier")

    async def ready(self, timeout: float = 10.0) -> bool:
        """Start the copier if needed and wait until it listens (False: it did not within ``timeout``)."""
        self.warm()
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _write(self, data: bytes) -> None:
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            # The pipe's transport buffers what the copier has not read yet; the bound above keeps it small.
            proc.stdin.write(data)
            return
        self._pending.append(data)
        self.warm()

    async def _start(self) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.shadow_copier", json.dumps(self.config),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                # Its own session: a Ctrl-C at the terminal is the gateway's to handle (it closes the pipe).
                start_new_session=True,
            )
        except OSError:
            log.exception("cannot start the shadow copier")
            self._lost()
            return
        if self._closing:
            proc.kill()
            await proc.wait()
            return
        self._proc = proc
        assert proc.stdin is not None
        for data in self._pending:
            proc.stdin.write(data)
        self._pending.clear()
        self._reader = asyncio.get_running_loop().create_task(self._read(proc), name="shadow-copier-reader")

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                message = await read_frame(proc.stdout)
                # The copier says hello (an empty report) once it reads its pipe.
                self._ready.set()
                self._apply(message)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        code = await proc.wait()
        if not self._closing:
            log.error("the shadow copier exited (%s); %d copies it held are lost, a new one starts in %g s",
                      code, self._waiting, COPIER_RESTART)
            self._lost()

    def _lost(self) -> None:
        """The copier is gone: what it held is dropped and counted; another starts after a pause."""
        for (service, name, active, epoch), count in self._outstanding.items():
            if count > 0:
                self._counts.drop(service, name, COPIER_DOWN, count)
                if epoch == self._epochs.get(service, 0):
                    self.report(service, name, active).dropped[COPIER_DOWN] += count
        self._outstanding.clear()
        self._waiting = self._waiting_bytes = 0
        self._pending.clear()
        self._batch.clear()
        self._proc = self._starting = self._reader = None
        self._ready.clear()
        self._restart_at = time.monotonic() + COPIER_RESTART
        if not self._closing:
            # Restart it then even if no copy comes to ask: the log promised it, and a shadow report should
            # not wait for traffic to learn the copier is back.
            try:
                asyncio.get_running_loop().call_later(COPIER_RESTART, self.warm)
            except RuntimeError:
                pass  # no loop: the next copy starts it

    def _apply(self, message: tuple[list[tuple[tuple[str, str, str, int], Tally]], dict[tuple[str, str], float]]) -> None:
        """Counts from the copier: metrics always, the report only while its epoch lasts."""
        tallies, down = message
        counts = self._counts
        for key, tally in tallies:
            service, name, active, epoch = key
            self._outstanding[key] = self._outstanding.get(key, 0) - tally.done
            self._waiting -= tally.done
            self._waiting_bytes -= tally.done_bytes
            counts.add(counts.requests, service, name, tally.results)
            counts.add(counts.rows, service, name, {"agree": tally.rows_agree, "differ": tally.rows_differ})
            counts.add(counts.dropped, service, name, tally.dropped)
            if tally.results:
                counts.observe(counts.differences, service, name, SHADOW_DIFFERENCE_BUCKETS, tally.difference_counts,
                               tally.difference_sum)
            if tally.shadow_seconds:
                counts.observe(counts.durations, service, name, LATENCY_BUCKETS, tally.duration_counts, tally.duration_sum)
            if epoch == self._epochs.get(service, 0) and (tally.results or tally.dropped):
                self.report(service, name, active).merge(tally)
        for key, until in down.items():
            if until:
                self._down[key] = until
            else:
                self._down.pop(key, None)
        if self._restart_at and self._proc is not None:
            self._restart_at = 0.0

    async def close(self) -> None:
        """Stop the copier (copies it still holds are dropped: they were never the client's)."""
        self._closing = True
        if self._starting is not None and not self._starting.done():
            await asyncio.gather(self._starting, return_exceptions=True)
        proc = self._proc
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), COPIER_STOP)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        self._proc = self._starting = self._reader = None
        self._ready.clear()
        self._pending.clear()
        self._batch.clear()
        self._outstanding.clear()
        self._waiting = self._waiting_bytes = 0

"""One gateway process among several (``turnout gateway --processes N``): its plain exposition served to
its siblings on a unix socket, and ``/metrics`` answered with the sum over every process.

Why a merge at scrape time rather than prometheus_client's multiprocess mode: that mode needs its
environment before prometheus_client is imported, writes an mmap file on every observation (a cost on
each proxied request, which the gateway's plain-counter collectors exist to avoid), and does not cover
custom collectors such as ``_ProxyCollector`` or ``_ShadowCollector`` in :mod:`gateway.metrics`. Here the
hot path pays nothing: a scrape, a few times a minute, fetches the siblings' expositions concurrently
under one short deadline and adds them up.

The parent (:mod:`gateway.processes`) gives every run a private directory (mode 0700) holding one socket
per process, ``p{index}.sock``; a process removes its own socket before binding it and when it stops,
the parent removes a dead process's, and the whole directory when the run ends. A sibling that does not
answer in time is skipped, logged and counted in ``turnout_sibling_scrape_errors_total{reason}``: a
scrape never hangs on it.

How each family is merged (by sample name and labels; a family not named below is summed):

* counters, histograms, summaries: summed;
* gauges that count things (``turnout_inflight_requests``, ``turnout_replica_inflight``): summed;
* gauges mirroring state every process reads from the same store (the route, readiness, the guard's and
  canary's state, the guard's leadership): the maximum, so one process still catching up on a switch
  never shows as 0.5 of a deployment or doubles a weight;
* gauges that are one process's own view, where the worst one matters (``turnout_replica_ready``: a
  replica any process holds out of rotation; ``turnout_store_up``: a process that cannot reach Redis):
  the minimum.

Two families exist only in the merged answer: ``turnout_gateway_processes`` (processes whose metrics it
sums) and ``turnout_process_requests_total{process}`` (each process's proxied requests, to see how evenly
the kernel spreads connections).

A process that dies takes its counts with it (nothing is kept across a SIGKILL): the sums drop by its
share until its successor counts again, and Prometheus reads the drop as a counter reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .metrics import GatewayMetrics

log = logging.getLogger(__name__)

# Seconds a scrape waits for its siblings' expositions, all fetched at once: far below Prometheus's
# default scrape timeout (10 s), well above what a busy sibling's event loop takes to answer.
SIBLING_DEADLINE = 1.0

MAX = "max"
MIN = "min"
SUM = "sum"
GAUGE_MERGE = {
    "turnout_route_generation": MAX,
    "turnout_active_deployment": MAX,
    "turnout_deployment_ready": MAX,
    "turnout_route_weight": MAX,
    "turnout_canary_running": MAX,
    "turnout_canary_step_started_timestamp_seconds": MAX,
    "turnout_canary_step_seconds": MAX,
    "turnout_guard_leader": MAX,
    "turnout_guard_paused": MAX,
    "turnout_guard_latched": MAX,
    "turnout_replica_ready": MIN,
    "turnout_store_up": MIN,
}

_SOCKET = re.compile(r"p(\d+)\.sock")


@dataclass(frozen=True)
class ProcessSlot:
    """Which process of a run this one is, and the run's directory."""

    run_dir: Path
    index: int


def socket_path(run_dir: Path, index: int) -> Path:
    """Where process ``index`` of a run serves its own exposition."""
    return run_dir / f"p{index}.sock"


def _combine(rule: str, old: float, new: float) -> float:
    if rule == MAX:
        return max(old, new)
    if rule == MIN:
        return min(old, new)
    return old + new


class _Merged:
    """Metric families as collected, for :func:`generate_latest` (which only calls ``collect``)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge(processes: dict[int, Iterable[Metric]]) -> bytes:
    """One exposition from several processes' metric families (index → families), merged by the rules above."""
    # family name → (type, help, (sample name, sorted labels) → [labels as first seen, value]), in the order first seen.
    merged: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], list[Any]]]] = {}
    per_process: dict[int, float] = {}
    for index, families in processes.items():
        requests = 0.0
        for family in families:
            entry = merged.get(family.name)
            if entry is None:
                entry = merged[family.name] = (family.type, family.documentation, {})
            rule = GAUGE_MERGE.get(family.name, SUM) if family.type == "gauge" else SUM
            samples = entry[2]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                found = samples.get(key)
                if found is None:
                    samples[key] = [sample.labels, sample.value]
                else:
                    found[1] = _combine(rule, found[1], sample.value)
                if sample.name == "turnout_requests_total":
                    requests += sample.value
        per_process[index] = requests
    out = []
    for name, (kind, documentation, samples) in merged.items():
        family = Metric(name, documentation, kind)
        for (sample_name, _), (labels, value) in samples.items():
            family.add_sample(sample_name, labels, value)
        out.append(family)
    answered = Metric("turnout_gateway_processes", "Gateway processes whose metrics this answer sums (the one "
                      "answering and every sibling that answered in time).", "gauge")
    answered.add_sample("turnout_gateway_processes", {}, len(processes))
    out.append(answered)
    by_process = Metric("turnout_process_requests", "Proxied requests per gateway process (turnout gateway "
                        "--processes).", "counter")
    for index, requests in sorted(per_process.items()):
        by_process.add_sample("turnout_process_requests_total", {"process": str(index)}, requests)
    out.append(by_process)
    return generate_latest(_Merged(out))  # type: ignore[arg-type]


class Siblings:
    """This process's place in a run of several: serves its own exposition, answers /metrics for all."""

    def __init__(self, slot: ProcessSlot, metrics: GatewayMetrics, deadline: float = SIBLING_DEADLINE) -> None:
        self._merging: asyncio.Future[bytes] | None = None
        self.run_dir = slot.run_dir
        self.index = slot.index
        self.path = socket_path(slot.run_dir, slot.index)
        self.metrics = metrics
        self.deadline = deadline
        self.errors = Counter(
            "turnout_sibling_scrape_errors", "Sibling gateway processes a /metrics answer had to leave out, by reason "
            "(timeout, unreachable, invalid).", ["reason"], registry=metrics.registry,
        )
        for reason in ("timeout", "unreachable", "invalid"):
            self.errors.labels(reason)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Serve this process's own exposition on its socket (a stale one, from a process before it, goes first)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        # A burst of scrapes on every process at once opens that many connections here: the default backlog
        # (100) refused the rest at once and those answers summed fewer processes.
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: _ExpositionProtocol(self.metrics), str(self.path), backlog=1024
        )

    async def stop(self) -> None:
        """Stop serving and remove the socket."""
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def sibling_paths(self) -> dict[int, Path]:
        """The other processes' sockets present now (a dead one's is gone once the parent noticed)."""
        found = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.run_dir):
                match = _SOCKET.fullmatch(entry.name)
                if match and int(match.group(1)) != self.index:
                    found[int(match.group(1))] = Path(entry.path)
        return found

    async def exposition(self) -> bytes:
        """The sum over this process and every sibling that answers within the deadline. Scrapes that arrive
        while one is being merged share its answer: /metrics needs no token, and a burst of concurrent
        scrapes each fetching every sibling left siblings out (counters that went down: false resets)."""
        if self._merging is None or self._merging.done():
            self._merging = asyncio.ensure_future(self._merge())
        return await asyncio.shield(self._merging)

    async def _merge(self) -> bytes:
        paths = self.sibling_paths()
        texts = await asyncio.gather(*(self._fetch(index, path) for index, path in paths.items()))
        processes: dict[int, Iterable[Metric]] = {self.index: list(self.metrics.registry.collect())}
        for index, text in zip(paths, texts):
            if text is None:
                continue
            try:
                processes[index] = list(text_string_to_metric_families(text))
            except ValueError as exc:
                self._failed(index, "invalid", exc)
        return merge(dict(sorted(processes.items())))

    async def _fetch(self, index: int, path: Path) -> str | None:
        try:
            async with asyncio.timeout(self.deadline):
                reader, writer = await asyncio.open_unix_connection(str(path))
                try:
                    data = await reader.read()
                finally:
                    writer.close()
        except TimeoutError as exc:
            self._failed(index, "timeout", exc)
            return None
        except OSError as exc:
            self._failed(index, "unreachable", exc)
            return None
        if not data:
            self._failed(index, "unreachable", EOFError("closed without an exposition"))
            return None
        return data.decode()

    def _failed(self, index: int, reason: str, exc: BaseException) -> None:
        self.errors.labels(reason).inc()
        log.warning("/metrics leaves out gateway process %d (%s: %s)", index, reason, str(exc) or type(exc).__name__)


class _ExpositionProtocol(asyncio.Protocol):
    """Writes this process's plain exposition to whoever connects, then closes."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.WriteTransport subclasses, but they write.
        transport.write(self.metrics.exposition())  # type: ignore[attr-defined]
        transport.close()

"""Whose fault is a crash inside the model: the new version's, or the input's.

``mlflow models serve`` answers every exception raised inside ``predict`` with the same HTTP 400
("Encountered an unexpected error while evaluating the model"), whether the model is broken or the
client sent something no model can take (NaN, null or blank cells that scikit-learn refuses). The
message cannot tell them apart; the previous version can. When the active deployment crashes on a
small input, a copy is replayed to the service's previous deployment (warm and idle after a switch),
off the client's path: if the previous version rejects it too (any 4xx), the input is to blame and
the request counts as ``client_error``; if it answers, the new version regressed (``model_error``).
The request is counted once, when the verdict is in (at most a replay's deadline later). Without a
ready previous deployment, with too many replays in flight, or if the replay fails, the crash counts
against the model, as before.
"""

from __future__ import annotations

import asyncio
import random
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .metrics import CLIENT_ERROR, MODEL_ERROR, DeploymentMetrics, GatewayMetrics
from .upstream import UpstreamError, UpstreamPool
from .watcher import RouteWatcher

log = logging.getLogger(__name__)

# Replays in flight at most per gateway process; beyond it a crash counts against the model at once.
MAX_IN_FLIGHT = 16
# A replay's whole exchange (a crash is answered in milliseconds; this bounds a stuck server).
REPLAY_TIMEOUT = 5.0
# Larger answers from the previous deployment are not read (a 4xx error body is small).
MAX_ANSWER = 64 * 1024

# Verdicts (the ``verdict`` label of turnout_replays_total).
INPUT = "input"  # the previous version rejected it too: the client's fault
MODEL = "model"  # the previous version answered: the new version's fault
UNKNOWN = "unknown"  # the replay failed: counted against the model
SKIPPED = "skipped"  # too many replays in flight: counted against the model


@dataclass(frozen=True, slots=True)
class Replay:
    """What is needed to send a request again: its headers as received, query, client and body."""

    headers: Sequence[tuple[bytes, bytes]]
    query: bytes
    remote: bytes
    scheme: bytes
    body: bytes


Record = Callable[[DeploymentMetrics, int, str, float], None]
HeadBuilder = Callable[..., bytes]


class Attribution:
    """Replays inputs the active deployment crashed on to the previous one, and records the verdict."""

    def __init__(self, watcher: RouteWatcher, pool: UpstreamPool, metrics: GatewayMetrics, record: Record,
                 target_of: Callable[[str], object], build_head: HeadBuilder, enabled: bool = True) -> None:
        self.watcher = watcher
        self.pool = pool
        self.metrics = metrics
        self.record = record
        self.target_of = target_of
        self.build_head = build_head
        self.enabled = enabled
        self.in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def take(self, dm: DeploymentMetrics, code: int, elapsed: float, replay: Replay) -> bool:
        """Start judging a crash of the active deployment (or of a canary's candidate); False if it counts
        against the model now."""
        if not self.enabled:
            return False
        snapshot = self.watcher.snapshots.get(dm.service)
        if snapshot is None:
            return False
        route = snapshot.route
        if route.active == dm.name:
            previous = route.previous
        elif route.candidate == dm.name:
            # A canary's candidate is judged against the active, over the same inputs: a crash the active
            # has too is the input's, as it is for the active itself (else the same bad input would count
            # against the candidate only, and abort an identical model).
            previous = route.active
        else:
            return False
        if previous is None:
            return False
        urls = snapshot.serving(previous)
        if not urls:
            return False
        if self.in_flight >= MAX_IN_FLIGHT:
            self.metrics.replays.labels(dm.service, SKIPPED).inc()
            return False
        self.in_flight += 1
        # Any replica of the previous version can judge the input (replays are rare: no balancing needed).
        url = random.choice(urls)
        task = asyncio.get_running_loop().create_task(self._judge(dm, code, elapsed, replay, previous, url))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _judge(self, dm: DeploymentMetrics, code: int, elapsed: float, replay: Replay, previous: str,
                     url: str) -> None:
        verdict = UNKNOWN
        try:
            target = self.target_of(url)
            head = self.build_head(replay.headers, replay.query, replay.remote, replay.scheme, target, len(replay.body))
            loop = asyncio.get_running_loop()
            upstream = await self.pool.request(target.host, target.port, head, replay.body,  # type: ignore[attr-defined]
                                               deadline=loop.time() + REPLAY_TIMEOUT)
            try:
                status = upstream.status
                if upstream.small(MAX_ANSWER):
                    await upstream.read()
            finally:
                upstream.release()
            verdict = INPUT if 400 <= status < 500 else MODEL
        except UpstreamError as exc:
            log.info("service %s: replaying a crash of %s to %s failed: %s", dm.service, dm.name, previous, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("service %s: replaying a crash of %s to %s", dm.service, dm.name, previous)
        finally:
            self.in_flight -= 1
            self.metrics.replays.labels(dm.service, verdict).inc()
            self.record(dm, code, CLIENT_ERROR if verdict == INPUT else MODEL_ERROR, elapsed)

    async def close(self) -> None:
        """Wait for the replays in flight (each bounded by its deadline)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

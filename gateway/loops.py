"""The one owner of background loops: each runs its step again and again; a failure nobody expected is
logged with its traceback at ERROR, counted in ``turnout_background_errors_total{task}``, backed off
and retried, never left to end the loop in silence; a loop failing for long makes ``/health`` say so;
stopping cancels and awaits loops in the reverse order of their start.

Expected outages (the store is unreachable) are each component's own business: its step handles
them (fail-static, ``turnout_store_up``) and the loop goes on at its pace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# A loop that keeps failing is retried after its interval (at least 0.1 s) doubled per failure, up to
# this: a loop recovers within seconds of its cause going away, and logs at most this often meanwhile.
MAX_BACKOFF = 5.0
# /health reports a loop that has failed for longer than this many of its intervals (at least 10 s).
UNHEALTHY_AFTER_INTERVALS = 5
MIN_UNHEALTHY_SECONDS = 10.0
# A task still running this long after its cancellation swallowed it, and is cancelled again: redis-py's
# asyncio client can lose a cancellation that lands while it opens a connection (seen with uvloop on about
# one cancel in twenty within the first 10 ms of a pub/sub subscription), which left a gateway that failed
# to bind its port waiting for its route subscriber forever.
RECANCEL_AFTER = 1.0


@dataclass
class Loop:
    """One background loop and how it fares."""

    name: str
    interval: float
    step: Callable[[], Awaitable[None]]
    task: asyncio.Task[None] | None = None
    failing_since: float | None = None
    failures: int = 0
    last_error: str = ""

    def unhealthy_for(self, now: float) -> float:
        """Seconds this loop has been failing beyond what a transient error explains (0 if healthy)."""
        if self.failing_since is None:
            return 0.0
        grace = max(MIN_UNHEALTHY_SECONDS, self.interval * UNHEALTHY_AFTER_INTERVALS)
        return max(0.0, now - self.failing_since - grace)


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it to end, cancelling it again each RECANCEL_AFTER while it goes on."""
    task.cancel()
    while not (await asyncio.wait({task}, timeout=RECANCEL_AFTER))[0]:
        log.warning("background task %s went on after it was cancelled: cancelling it again", task.get_name())
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class Loops:
    """Background loops of one process (gateway or worker)."""

    def __init__(self, count_error: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._count_error = count_error
        self._clock = clock
        self.loops: list[Loop] = []

    def every(self, name: str, interval: float, step: Callable[[], Awaitable[None]], *, wait_first: bool = True) -> Loop:
        """Run ``step`` every ``interval`` seconds (``interval`` 0: again as soon as it returns, for a
        step that waits for its own work, e.g. an event or a queue)."""
        loop = Loop(name, interval, step)
        loop.task = asyncio.create_task(self._run(loop, wait_first), name=name)
        self.loops.append(loop)
        return loop

    async def cancel(self, *loops: Loop) -> None:
        """Stop the given loops (all, by default) in the reverse order of their start, and wait for them."""
        chosen = [lp for lp in reversed(self.loops) if not loops or lp in loops]
        for loop in chosen:
            if loop.task is not None:
                await cancel_and_wait(loop.task)
            self.loops.remove(loop)

    def failing(self) -> list[str]:
        """A line for each loop failing for longer than a transient error explains (for ``/health``)."""
        now = self._clock()
        return [
            f"background task {lp.name} has failed for {now - lp.failing_since:.0f} s: {lp.last_error}"
            for lp in self.loops if lp.failing_since is not None and lp.unhealthy_for(now) > 0
        ]

    async def _run(self, loop: Loop, wait_first: bool) -> None:
        if wait_first and loop.interval:
            await asyncio.sleep(loop.interval)
        while True:
            try:
                await loop.step()
            except Exception as exc:  # the point of this owner: nothing ends a loop unnoticed
                loop.failures += 1
                loop.last_error = f"{type(exc).__name__}: {exc}"
                if loop.failing_since is None:
                    loop.failing_since = self._clock()
                log.error("background task %s failed (%d in a row); retrying", loop.name, loop.failures, exc_info=True)
                if self._count_error is not None:
                    self._count_error(loop.name)
                await asyncio.sleep(min(MAX_BACKOFF, max(loop.interval, 0.1) * 2 ** min(loop.failures, 8)))
                continue
            if loop.failing_since is not None:
                log.warning("background task %s works again after %d failures", loop.name, loop.failures)
                loop.failing_since, loop.failures, loop.last_error = None, 0, ""
            if loop.interval:
                await asyncio.sleep(loop.interval)

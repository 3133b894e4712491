"""Steady prediction traffic through a gateway, at a fixed rate whatever the answers' latency (each
request its own task), counted per phase and per deployment: the demo's traffic, and the tests' and
benchmarks' too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

IRIS_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


@dataclass
class Phase:
    """Requests sent while one phase of a story ran."""

    name: str
    served: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Result:
    """One answer: which deployment (of which service) and generation gave it, with what status."""

    deployment: str | None
    generation: int
    status: int
    at: float
    service: str | None = None


class LoadGenerator:
    """``rate`` requests per second, round-robin over ``urls``, each with the body ``body(n)`` gives."""

    def __init__(self, urls: list[str], rate: float, body: Callable[[int], bytes], *,
                 content_type: str = "application/json", timeout: float = 30.0,
                 on_result: Callable[[LoadGenerator, Result], None] | None = None) -> None:
        self.urls = urls
        self.rate = rate
        self.body = body
        self.content_type = content_type
        self.timeout = timeout
        self.on_result = on_result
        self.phases: list[Phase] = []
        self.phase = self.begin("warm-up")
        self.results: list[Result] = []
        # When each route generation (and each change of deployment) was first seen in an answer.
        self.generation_seen: dict[int, float] = {}
        self.deployment_seen: list[tuple[float, str]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def begin(self, name: str) -> Phase:
        """Start counting a new phase."""
        self.phase = Phase(name)
        self.phases.append(self.phase)
        return self.phase

    def total(self) -> int:
        """Requests answered or failed so far, over every phase."""
        return sum(sum(p.served.values()) + p.failed for p in self.phases)

    async def start(self) -> None:
        """Start sending."""
        self._task = asyncio.create_task(self._run(), name="load")

    async def stop(self) -> None:
        """Stop sending and wait for the last answers."""
        self._stop.set()
        if self._task is not None:
            await self._task

    async def __aenter__(self) -> LoadGenerator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        interval = 1 / self.rate
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            in_flight: set[asyncio.Task[None]] = set()
            next_at = time.monotonic()
            n = 0
            while not self._stop.is_set():
                url = self.urls[n % len(self.urls)]
                task = asyncio.create_task(self._one(session, url, self.body(n), self.phase))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                n += 1
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await asyncio.gather(*in_flight)

    async def _one(self, session: aiohttp.ClientSession, url: str, body: bytes, phase: Phase) -> None:
        try:
            async with session.post(url + "/invocations", data=body, headers={"Content-Type": self.content_type}) as resp:
                answer = await resp.read()
                status = resp.status
                dep = resp.headers.get("X-Turnout-Deployment")
                gen = int(resp.headers.get("X-Turnout-Generation", "0") or 0)
                service = resp.headers.get("X-Turnout-Service")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            phase.failed += 1
            phase.failures.append(repr(exc))
            return
        now = time.monotonic()
        result = Result(dep, gen, status, now, service)
        self.results.append(result)
        self.generation_seen.setdefault(gen, now)
        if dep is not None and (not self.deployment_seen or self.deployment_seen[-1][1] != dep):
            self.deployment_seen.append((now, dep))
        if status == 200:
            phase.served[dep or "?"] = phase.served.get(dep or "?", 0) + 1
        else:
            phase.failed += 1
            if len(phase.failures) < 5:
                phase.failures.append(f"{status} from {dep}: {answer[:200].decode(errors='replace')}")
        if self.on_result is not None:
            self.on_result(self, result)

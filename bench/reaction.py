"""Rollback reaction: from fault onset (the active deployment starts failing 30%) to the route change."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp

from bench import targets
from bench.common import percentile
from bench.switching import AUTH, stack

SETTINGS = {
    "default": {},
    "fast": {"TURNOUT_GUARD_WINDOW": "10", "TURNOUT_GUARD_INTERVAL": "0.25", "TURNOUT_STATS_FLUSH_INTERVAL": "0.1"},
}


async def open_loop(session: aiohttp.ClientSession, urls: list[str], rate: float, stop: asyncio.Event,
                    headers: Callable[[int], dict[str, str]] | None = None,
                    statuses: Counter[int] | None = None) -> None:
    """Predictions at ``rate`` per second whatever the answers take (open loop), to each of ``urls`` in
    turn, until ``stop``; request i carries ``headers(i)`` too, and its status is counted in ``statuses``
    (0: no answer)."""
    interval = 1 / rate
    pending: set[asyncio.Task[Any]] = set()
    next_at = time.monotonic()

    def done(task: asyncio.Task[Any]) -> None:
        pending.discard(task)
        failed = task.cancelled() or task.exception() is not None
        if not failed:
            task.result().release()
        if statuses is not None:
            statuses[0 if failed else task.result().status] += 1

    for i in itertools.count():
        if stop.is_set():
            break
        extra = headers(i) if headers is not None else {}
        task = asyncio.create_task(session.post(urls[i % len(urls)] + "/invocations", data=b'{"inputs": [[1, 2, 3, 4]]}',
                                                headers={"Content-Type": "application/json", **extra}))
        pending.add(task)
        task.add_done_callback(done)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.gather(*pending, return_exceptions=True)


async def _measure(url: str, green: str, rate: float, runs: int) -> list[float]:
    times = []
    async with aiohttp.ClientSession() as s, aiohttp.ClientSession(headers=AUTH) as admin:
        stop = asyncio.Event()
        loader = asyncio.create_task(open_loop(s, [url], rate, stop))
        for run_index in range(runs):
            # A fresh name per run (same server): the guard's window must not remember the last run's fault.
            name = f"green-{run_index}"
            async with admin.post(url + "/admin/deployments", json={"name": name, "url": green}) as r:
                assert r.status == 201, await r.text()
            async with admin.post(url + "/admin/switch", json={"target": name}) as r:
                assert r.status == 200, await r.text()
            await asyncio.sleep(1.5)
            async with s.get(url + "/health") as r:
                assert (await r.json()).get("active") == name, "the healthy deployment was rolled back before the fault"
            async with s.post(green + "/fault?ratio=0.3") as r:
                assert r.status == 200
            onset = time.monotonic()
            while time.monotonic() - onset < 60:
                async with s.get(url + "/health") as r:
                    if (await r.json()).get("active") == "blue":
                        times.append(time.monotonic() - onset)
                        break
                await asyncio.sleep(0.005)
            async with s.post(green + "/fault?ratio=0") as r:
                assert r.status == 200
            async with admin.post(url + "/admin/guard", json={"paused": False}) as r:
                assert r.status == 200
            await asyncio.sleep(0.5)
        stop.set()
        await loader
    return times


def run(quick: bool = False) -> dict[str, Any]:
    """Both rates under the default and the fast guard settings."""
    runs = 3 if quick else 5
    out: dict[str, Any] = {}
    for name, env in SETTINGS.items():
        for rate in (20, 200):
            with stack(1, extra_env=env) as st:
                times = asyncio.run(_measure(st["urls"][0], st["backends"]["green"], rate, runs))
            out[f"{name} guard, {rate} req/s"] = {"runs": len(times), "p50_s": percentile(times, 0.5), "max_s": max(times)}
    target = out["default guard, 200 req/s"]["p50_s"] <= targets.REACTION_P50_SECONDS
    return {"results": out, "target_met": target}


def table(result: dict[str, Any]) -> list[str]:
    """Markdown for RESULTS.md."""
    lines = ["### Rollback reaction (fault onset: the active deployment starts failing 30% → route back on previous)", "",
             "| guard setting | runs | p50 s | max s |", "|---|---:|---:|---:|"]
    for key, r in result["results"].items():
        lines.append(f"| {key} | {r['runs']} | {r['p50_s']:.2f} | {r['max_s']:.2f} |")
    lines.append("\nDefault: 30 s window, 1 s evaluation, 250 ms counter flush, ≥ 20 judged requests, 5% error rate. "
                 "Fast: 10 s window, 0.25 s evaluation, 100 ms flush. "
                 f"Target ≤ {targets.REACTION_P50_SECONDS:g} s p50 at 200 req/s with defaults: {'met' if result['target_met'] else 'NOT met'} "
                 "(Flagger's defaults take about 5 minutes).")
    return lines

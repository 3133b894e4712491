"""Memory and steadiness: gateway RSS idle and under minutes of load with 100 switches; open sockets bounded."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import aiohttp

from bench import targets
from bench.common import rss_mb
from bench.switching import AUTH, stack


def open_sockets(pid: int) -> int:
    """Sockets the process holds (clients, upstream pool, Redis)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


async def _load(url: str, pid: int, seconds: float, switches: int, concurrency: int) -> dict[str, Any]:
    samples: list[tuple[float, float, int]] = []
    stop = asyncio.Event()
    counts = {"requests": 0, "failures": 0}

    async def client() -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                try:
                    async with s.post(url + "/invocations", data=b'{"inputs": [[1, 2, 3, 4]]}',
                                      headers={"Content-Type": "application/json"}) as r:
                        await r.read()
                        counts["requests"] += 1
                        counts["failures"] += r.status != 200
                except aiohttp.ClientError:
                    counts["failures"] += 1

    async def sampler(started: float) -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - started, rss_mb(pid), open_sockets(pid)))
            await asyncio.sleep(1)

    async def switcher() -> None:
        async with aiohttp.ClientSession(headers=AUTH) as admin:
            for i in range(switches):
                await asyncio.sleep(seconds / (switches + 1))
                async with admin.post(url + "/admin/switch", json={"target": "green" if i % 2 == 0 else "blue"}) as r:
                    await r.read()

    started = time.monotonic()
    tasks = [asyncio.create_task(client()) for _ in range(concurrency)] + [asyncio.create_task(sampler(started))]
    await switcher()
    await asyncio.sleep(max(0.0, seconds - (time.monotonic() - started)))
    stop.set()
    await asyncio.gather(*tasks)
    after_first_minute = [s for s in samples if s[0] >= min(60.0, seconds / 5)]
    return {
        "seconds": seconds, "switches": switches, **counts,
        "rss_at_1_min_mb": after_first_minute[0][1],
        "rss_end_mb": samples[-1][1],
        "rss_max_mb": max(s[1] for s in samples),
        "sockets_max": max(s[2] for s in samples),
        "sockets_end": samples[-1][2],
        # RSS at each whole minute: the trend, not just two ends, says whether anything accumulates.
        "rss_by_minute_mb": [
            next(rss for t, rss, _ in samples if t >= minute * 60) for minute in range(1, int(seconds // 60) + 1)
            if any(t >= minute * 60 for t, _, _ in samples)
        ],
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Idle RSS, then load (5 minutes; 1 with --quick) with 100 switches."""
    seconds = 60.0 if quick else 300.0
    with stack(1) as st:
        pid = st["procs"][0].pid
        time.sleep(2)
        idle = rss_mb(pid)
        loaded = asyncio.run(_load(st["urls"][0], pid, seconds, 100, concurrency=16))
    growth = loaded["rss_end_mb"] - loaded["rss_at_1_min_mb"]
    return {
        "idle_rss_mb": idle, **loaded, "growth_mb": growth,
        # Sockets: 16 clients + a pool of up to 16 per upstream (two, blue and green) + Redis and listeners.
        "target_met": (loaded["rss_max_mb"] <= targets.MEMORY_MAX_RSS_MB and growth <= targets.MEMORY_MAX_GROWTH_MB
                       and loaded["sockets_max"] <= 16 + 2 * 16 + 12),
    }


def table(result: dict[str, Any]) -> list[str]:
    """Markdown for RESULTS.md."""
    r = result
    return [
        f"### Memory and steadiness ({r['seconds']:.0f} s of load from 16 clients, {r['switches']} switches)", "",
        "| idle RSS MB | RSS at 1 min | RSS at end | max RSS | growth 1 min → end | max open sockets | requests | failures |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['idle_rss_mb']:.1f} | {r['rss_at_1_min_mb']:.1f} | {r['rss_end_mb']:.1f} | {r['rss_max_mb']:.1f} | "
        f"{r['growth_mb']:+.1f} | {r['sockets_max']} | {r['requests']} | {r['failures']} |",
        "",
        "RSS at each minute (MB): " + ", ".join(f"{v:.1f}" for v in r.get("rss_by_minute_mb", [])) + ".",
        "",
        f"Target ≤ {targets.MEMORY_MAX_RSS_MB:g} MB, no growth between minute 1 and the end, bounded sockets: {'met' if r['target_met'] else 'NOT met'}.",
    ]

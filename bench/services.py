"""Many services on one gateway (200 × blue/green, next to the one-service figures in the same run):
instructions per proxied request, switch propagation to 4 replicas, idle RSS, and what a poll (a full
re-read of every service) costs the event loop."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

from bench import targets
from bench.common import HERE, ROOT, free_port, percentile, private_redis, process, rss_mb
from bench.instructions import count
from bench.switching import _propagation, _setup_route, blue_green, service_names, stack

SERVICES = 200


def instructions(requests: int) -> dict[str, Any]:
    """Instructions per request to one service's endpoint, with 1 and with 200 services on the gateway."""
    port = free_port()
    backend = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    with process([sys.executable, str(HERE / "fast_backend.py"), str(port)], backend + "/ping"):
        for path in ("fast", "aiohttp"):
            one = count(ROOT, backend, path == "fast", requests, setup=blue_green(1), path="/models/s000/invocations")
            many = count(ROOT, backend, path == "fast", requests, setup=blue_green(SERVICES), path="/models/s123/invocations")
            out[path] = {"one_service": one, f"{SERVICES}_services": many, "ratio": many / one}
    met = all(v["ratio"] <= targets.SERVICES_CPU_VS_ONE for v in out.values())
    return {"requests": requests, "paths": out, "target_met": met}


def propagation(switches: int) -> dict[str, Any]:
    """A switch in a random one of 200 services → all 4 replicas serve it (pub/sub), and RSS while idle."""
    out: dict[str, Any] = {}
    for services in (0, SERVICES):
        with stack(4, services=services) as s:
            time.sleep(3)  # idle: the first reads are done, the loops settle
            rss = [rss_mb(p.pid) for p in s["procs"]]
            delays = asyncio.run(_propagation(s["urls"], switches, 0.05, service_names(services) or None))
        out[f"{services or 1} service{'s' if services else ''}"] = {
            "switches": len(delays), "p50_ms": percentile(delays, 0.5) * 1000, "p99_ms": percentile(delays, 0.99) * 1000,
            "max_ms": max(delays) * 1000, "idle_rss_mb": max(rss),
        }
    many = out[f"{SERVICES} services"]
    return {"results": out, "target_met": many["p99_ms"] <= targets.PROPAGATION_P99_MS
            and many["idle_rss_mb"] <= targets.SERVICES_IDLE_RSS_MB}


async def _poll_cost(redis_url: str, polls: int) -> dict[str, Any]:
    from gateway.metrics import GatewayMetrics
    from gateway.store import RedisStore
    from gateway.watcher import RouteWatcher

    store = RedisStore.from_url(redis_url, "turnout")
    watcher = RouteWatcher(store, GatewayMetrics())
    try:
        await watcher.refresh("initial")
        assert len(watcher.snapshots) == SERVICES + 1, sorted(watcher.snapshots)[:5]

        async def measure(changed_every_time: bool) -> tuple[list[float], list[float]]:
            cpu, wall = [], []
            for _ in range(polls):
                if changed_every_time:
                    watcher._fingerprints.clear()  # as if every service had changed since the last poll
                c0, w0 = time.process_time(), time.perf_counter()
                await watcher.refresh("poll")
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
            return cpu, wall

        unchanged = await measure(False)
        all_changed = await measure(True)
    finally:
        await store.close()
    return {
        name: {"loop_cpu_ms_median": statistics.median(cpu) * 1000, "loop_cpu_ms_p99": percentile(cpu, 0.99) * 1000,
               "wall_ms_median": statistics.median(wall) * 1000}
        for name, (cpu, wall) in (("nothing changed", unchanged), ("every service changed", all_changed))
    }


def poll_cost(polls: int) -> dict[str, Any]:
    """CPU the gateway's event loop spends on one poll of 200 services (a poll runs once a second)."""
    with private_redis() as redis:
        asyncio.run(_setup_route(redis.url, {"blue": "http://127.0.0.1:9", "green": "http://127.0.0.1:9"}, SERVICES))
        result = asyncio.run(_poll_cost(redis.url, polls))
    per_second = result["nothing changed"]["loop_cpu_ms_median"]  # poll interval 1 s: ms per poll = ms per s
    return {"results": result, "target_met": per_second < targets.SERVICES_POLL_LOOP_MS_PER_S}


def run(quick: bool = False) -> dict[str, Any]:
    """Every measurement."""
    return {
        "instructions": instructions(800 if quick else 2000),
        "propagation": propagation(30 if quick else 100),
        "poll": poll_cost(20 if quick else 100),
    }


def table(result: dict[str, Any]) -> list[str]:
    """Markdown for RESULTS.md."""
    ins = result["instructions"]
    lines = [f"### {SERVICES} services × 2 deployments on one gateway, next to one service", "",
             "| path | instructions/request, 1 service | with 200 services | ratio |", "|---|---:|---:|---:|"]
    for path, v in ins["paths"].items():
        lines.append(f"| {path} | {v['one_service']:,.0f} | {v[f'{SERVICES}_services']:,.0f} | {v['ratio']:.3f}× |")
    lines.append(f"\nCallgrind, {ins['requests']} requests to one service's `/models/{{service}}/invocations`. "
                 f"Target ≤ {targets.SERVICES_CPU_VS_ONE}×: {'met' if ins['target_met'] else 'NOT met'}.")
    p = result["propagation"]
    lines += ["", "| services | switches | propagation p50 ms | p99 ms | max ms | idle RSS MB (largest of 4 replicas) |",
              "|---|---:|---:|---:|---:|---:|"]
    for key, r in p["results"].items():
        lines.append(f"| {key} | {r['switches']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} | {r['idle_rss_mb']:.1f} |")
    lines.append(f"\n4 replicas, each switch in a random service. Targets p99 ≤ {targets.PROPAGATION_P99_MS:.0f} ms, "
                 f"idle RSS ≤ {targets.SERVICES_IDLE_RSS_MB:.0f} MB: {'met' if p['target_met'] else 'NOT met'}.")
    poll = result["poll"]
    lines += ["", "| poll of 200 services | loop CPU ms (median) | loop CPU ms (p99) | wall ms (median) |", "|---|---:|---:|---:|"]
    for key, r in poll["results"].items():
        lines.append(f"| {key} | {r['loop_cpu_ms_median']:.2f} | {r['loop_cpu_ms_p99']:.2f} | {r['wall_ms_median']:.2f} |")
    lines.append(f"\nOne poll a second (`TURNOUT_POLL_INTERVAL`): the loop's CPU per poll is its cost per second. "
                 f"Redis fingerprints each service inside one script, so an unchanged service is never sent or "
                 f"parsed. Target < {targets.SERVICES_POLL_LOOP_MS_PER_S:.0f} ms/s: {'met' if poll['target_met'] else 'NOT met'}.")
    return lines

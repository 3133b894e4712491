"""Replicas of one deployment behind one gateway process: throughput as replicas are added (latency-bound
stand-ins that serve one request at a time, like one MLflow process each), tail latency with one slow
replica under least-request and under round-robin balancing, and gateway CPU per request with 8
replicas against 1 — each comparison measured side by side in one run."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from bench import targets
from bench.common import BODY, HERE, ROOT, free_port, process, wrk
from bench.instructions import count as count_instructions
from bench.proxy_overhead import _route, gateway_in_front_of

DELAY_MS = 20.0


@contextlib.contextmanager
def backends(delays_ms: list[float]) -> Iterator[list[str]]:
    """One latency-bound stand-in per delay."""
    with contextlib.ExitStack() as stack:
        urls = []
        for delay in delays_ms:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            stack.enter_context(process([sys.executable, str(HERE / "serial_backend.py"), str(port), str(delay)], url + "/ping"))
            urls.append(url)
        yield urls


def scaling(seconds: int) -> dict[str, Any]:
    """Requests per second with N replicas at 2N connections, against N times the one-replica figure."""
    out: dict[str, Any] = {}
    for count in (1, 2, 4, 8):
        with backends([DELAY_MS] * count) as urls, gateway_in_front_of(urls) as (url, _):
            wrk(url + "/invocations", BODY, connections=2 * count, seconds=1)  # warm-up
            result = wrk(url + "/invocations", BODY, connections=2 * count, seconds=seconds)
        out[str(count)] = {"rps": result.rps, "p99_ms": result.p99_ms, "errors": result.errors}
    single = out["1"]["rps"]
    for count, row in out.items():
        row["vs_n_times_one"] = row["rps"] / (int(count) * single)
    met = all(row["vs_n_times_one"] >= targets.REPLICAS_SCALING and row["errors"] == 0 for row in out.values())
    return {"delay_ms": DELAY_MS, "replicas": out, "target_met": met}


def one_slow(seconds: int) -> dict[str, Any]:
    """Four replicas, one ten times slower: latency under least-request and round-robin balancing."""
    out: dict[str, Any] = {}
    with backends([DELAY_MS, DELAY_MS, DELAY_MS, 10 * DELAY_MS]) as urls:
        for balance in ("least_request", "round_robin"):
            with gateway_in_front_of(urls, TURNOUT_BALANCE=balance) as (url, _):
                wrk(url + "/invocations", BODY, connections=6, seconds=1)
                result = wrk(url + "/invocations", BODY, connections=6, seconds=seconds)
            out[balance] = {"rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "errors": result.errors}
    ratio = out["least_request"]["p99_ms"] / out["round_robin"]["p99_ms"]
    return {"connections": 6, "balances": out, "p99_ratio": ratio, "target_met": ratio <= targets.REPLICAS_SLOW_P99_RATIO}


def _eight_urls(backend: str) -> list[str]:
    """Eight replica URLs that all lead to ``backend``'s port (the stand-in listens on every loopback address)."""
    port = backend.rsplit(":", 1)[1]
    return [f"http://127.0.0.{i + 1}:{port}" for i in range(8)]


def _route_to(replicas: int) -> Any:
    """An instructions ``setup``: blue, active, with ``replicas`` URLs to the backend."""
    async def setup(namespace: str, backend: str, action: str) -> None:
        await _route(namespace, _eight_urls(backend)[:replicas] if replicas > 1 else backend, action)
    return setup


def cpu(requests: int) -> dict[str, Any]:
    """Instructions per proxied request with 8 replicas against 1, on both paths (callgrind: exact, so the
    balancer's own cost shows whatever the machine's load). The 8 replica URLs (127.0.0.1 … 127.0.0.8)
    lead to one fast stand-in."""
    port = free_port()
    backend = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    with process([sys.executable, str(HERE / "fast_backend.py"), str(port), "0.0.0.0"], backend + "/ping"):
        for path in ("fast", "aiohttp"):
            one = count_instructions(ROOT, backend, path == "fast", requests, setup=_route_to(1))
            eight = count_instructions(ROOT, backend, path == "fast", requests, setup=_route_to(8))
            out[path] = {"one_replica": one, "eight_replicas": eight, "ratio": eight / one}
    met = all(v["ratio"] <= targets.REPLICAS_CPU_8_VS_1 for v in out.values())
    return {"requests": requests, "paths": out, "target_met": met}


def run(quick: bool = False) -> dict[str, Any]:
    """All three measurements."""
    seconds = 4 if quick else 10
    return {"scaling": scaling(seconds), "one_slow": one_slow(seconds), "cpu": cpu(800 if quick else 2000)}


def table(result: dict[str, Any]) -> list[str]:
    """Markdown for RESULTS.md."""
    s, slow, c = result["scaling"], result["one_slow"], result["cpu"]
    lines = [
        f"### Replicas — throughput as replicas are added (stand-ins serving one request at a time, {s['delay_ms']:g} ms each; 2N connections)",
        "",
        "| replicas | req/s | p99 ms | vs N × one replica | errors |",
        "|---:|---:|---:|---:|---:|",
    ]
    for count, row in s["replicas"].items():
        lines.append(f"| {count} | {row['rps']:.0f} | {row['p99_ms']:.1f} | {row['vs_n_times_one']:.3f}× | {row['errors']} |")
    lines += [
        "",
        f"Target ≥ {targets.REPLICAS_SCALING}× of N times one replica, no errors: {'met' if s['target_met'] else 'NOT met'}.",
        "",
        f"### Replicas — one of four ten times slower ({slow['connections']} connections)",
        "",
        "| balancing | req/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|",
    ]
    for balance, row in slow["balances"].items():
        lines.append(f"| {balance} | {row['rps']:.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']} |")
    lines += [
        "",
        f"least_request p99 / round_robin p99: **{slow['p99_ratio']:.2f}** (target ≤ {targets.REPLICAS_SLOW_P99_RATIO}): "
        f"{'met' if slow['target_met'] else 'NOT met'}.",
        "",
        "### Replicas — instructions per proxied request, 8 replicas against 1 (callgrind; 8 URLs to one fast stand-in)",
        "",
        "| path | 1 replica | 8 replicas | ratio |",
        "|---|---:|---:|---:|",
    ]
    for path, row in c["paths"].items():
        lines.append(f"| {path} | {row['one_replica']:,.0f} | {row['eight_replicas']:,.0f} | {row['ratio']:.3f}× |")
    lines += ["", f"Target ≤ {targets.REPLICAS_CPU_8_VS_1}× on both paths: {'met' if c['target_met'] else 'NOT met'}."]
    return lines

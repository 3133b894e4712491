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
from bench.common import BODY, HERE, cpu_seconds, free_port, process, wrk
from bench.proxy_overhead import gateway_in_front_of

DELAY_MS = 20.0


@contextlib.contextmanager
def backends(delays_ms: list[float]) -> Iterator[list[str]]:
    """One stand-in per delay (0: the fast backend, as much throughput as it has)."""
    with contextlib.ExitStack() as stack:
        urls = []
        for delay in delays_ms:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            script = [str(HERE / "fast_backend.py"), str(port)] if delay == 0 else [str(HERE / "serial_backend.py"), str(port), str(delay)]
            stack.enter_context(process([sys.executable, *script], url + "/ping"))
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


def cpu(seconds: int) -> dict[str, Any]:
    """Gateway CPU per proxied request with 8 replicas against 1 (32 connections). The 8 replica URLs
    (127.0.0.1 … 127.0.0.8) lead to one fast stand-in, so the model servers' capacity and their share of
    the two cores stay the same: the difference is the gateway's balancing alone."""
    out: dict[str, Any] = {}
    port = free_port()
    with process([sys.executable, str(HERE / "fast_backend.py"), str(port), "0.0.0.0"], f"http://127.0.0.1:{port}/ping"):
        for count in (1, 8):
            out[str(count)] = _cpu_with([f"http://127.0.0.{i + 1}:{port}" for i in range(count)], seconds)
    ratio = out["8"]["cpu_us_per_request"] / out["1"]["cpu_us_per_request"]
    return {"replicas": out, "ratio": ratio, "target_met": ratio <= targets.REPLICAS_CPU_8_VS_1}


def _cpu_with(urls: list[str], seconds: int) -> dict[str, Any]:
    with gateway_in_front_of(urls) as (url, procs):
        wrk(url + "/invocations", BODY, connections=32, seconds=1)
        before = cpu_seconds(procs[0].pid)
        result = wrk(url + "/invocations", BODY, connections=32, seconds=seconds)
        used = cpu_seconds(procs[0].pid) - before
    return {"rps": result.rps, "cpu_us_per_request": used / max(1, result.requests) * 1e6, "errors": result.errors}


def run(quick: bool = False) -> dict[str, Any]:
    """All three measurements."""
    seconds = 4 if quick else 10
    return {"scaling": scaling(seconds), "one_slow": one_slow(seconds), "cpu": cpu(seconds)}


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
        "### Replicas — gateway CPU per request, 8 replica URLs against 1 (all to one fast stand-in, 32 connections)",
        "",
        "| replicas | req/s | gateway CPU µs/req | errors |",
        "|---:|---:|---:|---:|",
    ]
    for count, row in c["replicas"].items():
        lines.append(f"| {count} | {row['rps']:.0f} | {row['cpu_us_per_request']:.1f} | {row['errors']} |")
    lines += ["", f"8 / 1: **{c['ratio']:.3f}×** (target ≤ {targets.REPLICAS_CPU_8_VS_1}×): {'met' if c['target_met'] else 'NOT met'}."]
    return lines

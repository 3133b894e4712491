"""Proxy overhead: direct vs Turnout's gateway vs nginx, side by side in one run.

(a) in front of a fast backend: requests/s and CPU-µs per request of one proxy process;
(b) in front of a real ``mlflow models serve``: added p50/p99 at 1 connection, throughput at 8.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import targets
from bench.common import (
    BIN, BODY, HERE, IRIS_ROW, cpu_seconds, free_port, nginx, nginx_worker_pid, process, wrk,
)

REDIS_URL = "redis://127.0.0.1:6379/0"


async def _route(namespace: str, url: str | list[str], action: str) -> None:
    from gateway.records import Deployment, State
    from gateway.store import RedisStore

    store = RedisStore.from_url(REDIS_URL, namespace)
    urls = [url] if isinstance(url, str) else url
    try:
        if action == "set":
            await store.create_deployment(Deployment(name="blue", url=urls[0], urls=tuple(urls) if len(urls) > 1 else (),
                                                     state=State.READY, external=True))
            await store.set_route("blue", None)
        else:
            await store.drop_namespace()
    finally:
        await store.close()


@contextlib.contextmanager
def gateway_in_front_of(backend_url: str | list[str], processes: int = 1, *, args: tuple[str, ...] = (),
                        **settings: str) -> Iterator[tuple[str, list[Any]]]:
    """``turnout gateway`` process(es) on the shared Redis (private namespace) routed to ``backend_url`` (a
    list: the replicas of one deployment); ``processes`` of them side by side with --reuse-port, each given
    ``args`` too."""
    namespace = f"turnout-bench-{uuid.uuid4().hex[:8]}"
    asyncio.run(_route(namespace, backend_url, "set"))
    port = free_port()
    args = (str(BIN / "turnout"), "gateway", "--port", str(port), "--log-level", "WARNING", *args)
    if processes > 1:
        args += ("--reuse-port",)
    try:
        with contextlib.ExitStack() as stack:
            procs = [
                stack.enter_context(process(list(args), f"http://127.0.0.1:{port}/health",
                                            TURNOUT_REDIS_URL=REDIS_URL, TURNOUT_NAMESPACE=namespace, **settings))
                for _ in range(processes)
            ]
            yield f"http://127.0.0.1:{port}", procs
    finally:
        asyncio.run(_route(namespace, backend_url, "clear"))


def _measure(url: str, body: str, pids: list[int], connections: int, seconds: float) -> dict[str, float]:
    before = sum(cpu_seconds(p) for p in pids)
    result = wrk(url + "/invocations", body, connections=connections, seconds=seconds)
    cpu = sum(cpu_seconds(p) for p in pids) - before
    return {
        "rps": result.rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "errors": result.errors,
        "requests": result.requests,
        "cpu_us_per_request": (cpu / result.requests * 1e6) if pids and result.requests else 0.0,
    }


def fast_backend(seconds: float, rounds: int) -> dict[str, Any]:
    """(a): throughput and CPU per request in front of a fast aiohttp+uvloop backend."""
    port = free_port()
    backend = f"http://127.0.0.1:{port}"
    out: dict[str, list[dict[str, float]]] = {
        "direct": [], "gateway": [], "gateway_aiohttp_only": [], "gateway_x2_reuseport": [], "nginx": [],
    }
    with process([sys.executable, str(HERE / "fast_backend.py"), str(port)], backend + "/ping"):
        nginx_port = free_port()
        with nginx(f"127.0.0.1:{port}", nginx_port) as ngx, gateway_in_front_of(backend) as (gw, gw_procs), \
                gateway_in_front_of(backend, TURNOUT_FAST_PATH="false") as (gwa, gwa_procs), \
                gateway_in_front_of(backend, processes=2) as (gw2, gw2_procs):
            for _ in range(rounds):
                out["direct"].append(_measure(backend, BODY, [], 32, seconds))
                if ngx is not None:
                    out["nginx"].append(_measure(f"http://127.0.0.1:{nginx_port}", BODY, [nginx_worker_pid(ngx)], 32, seconds))
                out["gateway"].append(_measure(gw, BODY, [p.pid for p in gw_procs], 32, seconds))
                out["gateway_aiohttp_only"].append(_measure(gwa, BODY, [p.pid for p in gwa_procs], 32, seconds))
                out["gateway_x2_reuseport"].append(_measure(gw2, BODY, [p.pid for p in gw2_procs], 32, seconds))
    summary = {name: _mean(runs) for name, runs in out.items() if runs}
    result: dict[str, Any] = {"runs": out, "summary": summary}
    if "nginx" in summary:
        result["gateway_vs_nginx_rps"] = summary["gateway"]["rps"] / summary["nginx"]["rps"]
        result["target_met"] = result["gateway_vs_nginx_rps"] >= targets.GATEWAY_VS_NGINX_RPS
    else:
        result["nginx_missing"] = "nginx not installed (apt-get install nginx-light); the nginx column is skipped"
    return result


def mlflow_backend(seconds: float, rounds: int) -> dict[str, Any]:
    """(b): added latency at 1 connection and throughput at 8, in front of a real ``mlflow models serve``."""
    from tests.mlflow_support import build_registry, model_server

    with tempfile.TemporaryDirectory() as tmp:
        registry = build_registry(Path(tmp))
        with model_server(registry, f"models:/{registry.model_name}/1") as backend:
            host_port = backend.removeprefix("http://")
            nginx_port = free_port()
            out: dict[str, dict[str, list[dict[str, float]]]] = {
                "c1": {"direct": [], "gateway": [], "nginx": []},
                "c8": {"direct": [], "gateway": [], "nginx": []},
            }
            with nginx(host_port, nginx_port) as ngx, gateway_in_front_of(backend) as (gw, gw_procs):
                paths = {"direct": (backend, []), "gateway": (gw, [p.pid for p in gw_procs])}
                if ngx is not None:
                    paths["nginx"] = (f"http://127.0.0.1:{nginx_port}", [nginx_worker_pid(ngx)])
                names = list(paths)
                for i in range(rounds):
                    # The model server's own speed drifts over a run (±5%): each round starts with a
                    # different path so no path always measures it at the same moment.
                    order = names[i % len(names):] + names[: i % len(names)]
                    for conns, key in ((1, "c1"), (8, "c8")):
                        for name in order:
                            url, pids = paths[name]
                            out[key][name].append(_measure(url, IRIS_ROW, pids, conns, seconds))
    summary = {key: {name: _median(runs) for name, runs in per.items() if runs} for key, per in out.items()}
    c1 = summary["c1"]
    result: dict[str, Any] = {"runs": out, "summary": summary}
    # Each figure compares a path with the direct call of the same round (measured minutes apart at
    # most), then takes the median over rounds: the model server's drift cancels out pairwise.
    result["added_p50_ms"] = _paired(out["c1"], "gateway", "p50_ms", lambda a, b: a - b)
    result["added_p99_ms"] = _paired(out["c1"], "gateway", "p99_ms", lambda a, b: a - b)
    result["throughput_vs_direct_c8"] = _paired(out["c8"], "gateway", "rps", lambda a, b: a / b)
    if "nginx" in c1:
        result["nginx_added_p50_ms"] = _paired(out["c1"], "nginx", "p50_ms", lambda a, b: a - b)
        result["nginx_throughput_vs_direct_c8"] = _paired(out["c8"], "nginx", "rps", lambda a, b: a / b)
    result["target_met"] = (result["added_p50_ms"] <= targets.MLFLOW_ADDED_P50_MS
                            and result["throughput_vs_direct_c8"] >= targets.MLFLOW_THROUGHPUT_VS_DIRECT)
    return result


def _mean(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}


def _paired(
    runs: dict[str, list[dict[str, float]]], path: str, figure: str, compare: Callable[[float, float], float],
    baseline: str = "direct",
) -> float:
    """Median over rounds of ``compare(path's figure, baseline's figure)`` within each round."""
    return statistics.median(compare(p[figure], d[figure]) for p, d in zip(runs[path], runs[baseline]))


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per figure, the median over rounds: one disturbed round (a GC pause, a neighbour) does not decide."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def run(quick: bool = False) -> dict[str, Any]:
    """Both parts; ``quick`` shortens each measurement."""
    seconds, rounds = (3, 1) if quick else (8, 2)
    return {
        "fast_backend": fast_backend(seconds, rounds),
        "mlflow_backend": mlflow_backend(2, 3) if quick else mlflow_backend(3, 7),
    }


def table(result: dict[str, Any]) -> list[str]:
    """Markdown lines for RESULTS.md."""
    fb, mb = result["fast_backend"], result["mlflow_backend"]
    s = fb["summary"]
    lines = [
        "### Proxy overhead — fast backend (wrk, 32 connections, ~1 KB JSON)",
        "",
        "| path | req/s | p50 ms | p99 ms | proxy CPU µs/req | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("direct", "nginx", "gateway", "gateway_aiohttp_only", "gateway_x2_reuseport"):
        if name in s:
            r = s[name]
            cpu = f"{r['cpu_us_per_request']:.0f}" if name != "direct" else "—"
            lines.append(f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {cpu} | {r['errors']:.0f} |")
    lines.append(
        "\n`gateway_aiohttp_only` is the same gateway with `TURNOUT_FAST_PATH=false` (every request through "
        "aiohttp's request objects); `gateway_x2_reuseport` is two fast-path processes sharing the port."
    )
    if "gateway_vs_nginx_rps" in fb:
        verdict = "met" if fb["target_met"] else "NOT met"
        lines.append(f"\nGateway / nginx throughput: **{fb['gateway_vs_nginx_rps']:.2f}×** "
                     f"(target ≥ {targets.GATEWAY_VS_NGINX_RPS}×: {verdict}).")
    else:
        lines.append(f"\n{fb['nginx_missing']}")
    lines += [
        "",
        "### Proxy overhead — real `mlflow models serve` (one-row iris JSON; medians over rounds in rotating order)",
        "",
        "| path | p50 ms (1 conn) | p99 ms (1 conn) | req/s (8 conns) |",
        "|---|---:|---:|---:|",
    ]
    for name in ("direct", "nginx", "gateway"):
        if name in mb["summary"]["c1"]:
            c1, c8 = mb["summary"]["c1"][name], mb["summary"]["c8"][name]
            lines.append(f"| {name} | {c1['p50_ms']:.2f} | {c1['p99_ms']:.2f} | {c8['rps']:.0f} |")
    verdict = "met" if mb["target_met"] else "NOT met"
    lines.append(
        f"\nGateway adds **{mb['added_p50_ms']:.3f} ms** at p50 (target ≤ {targets.MLFLOW_ADDED_P50_MS} ms) and keeps "
        f"**{mb['throughput_vs_direct_c8']:.3f}×** of direct throughput at 8 connections "
        f"(target ≥ {targets.MLFLOW_THROUGHPUT_VS_DIRECT}×): {verdict}."
    )
    if "nginx_added_p50_ms" in mb:
        lines.append(
            f"nginx, same rounds: adds {mb['nginx_added_p50_ms']:.3f} ms at p50, keeps "
            f"{mb['nginx_throughput_vs_direct_c8']:.3f}× of direct throughput. Both figures are medians of "
            "per-round differences against the direct call of the same round."
        )
    return lines


if __name__ == "__main__":
    import json

    res = run(quick="--quick" in sys.argv)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "runs"} for k, v in res.items()}, indent=2))

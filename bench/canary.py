"""Canary rollouts: what a split costs a request, and how fast a failing candidate is cut off.

(1) Instructions per proxied request (callgrind, as ``bench.instructions``) through a route split 50/50
    with sticky hashing on ``X-User-Id``, against the same route without a split: the same requests (each
    with its own user among ``USERS``) to the same two deployments, side by side, on both request paths.
(2) Abort reaction: two gateway processes sharing one namespace on the machine's Redis, default guard
    settings, 200 req/s carrying ``X-User-Id``. A canary of a healthy candidate runs for a full guard
    window; then the candidate answers 500 to every request from a known instant; the figure is the time
    until every gateway replica serves the route generation of the abort (weight 0).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections import Counter
from typing import Any

import aiohttp

from bench import targets
from bench.common import HERE, ROOT, free_port, percentile, process
from bench.instructions import count, scoring_request
from bench.reaction import open_loop
from bench.switching import AUTH, blue_green, serving, stack

USERS = 4096
SPLIT = ("green", 50.0, "x-user-id")
RATE = 200.0
REPLICAS = 2
WEIGHTS = (10.0, 50.0)
MIN_REQUESTS = 50
# How often the reaction is polled on each replica's /health (the figures' resolution).
POLL = 0.005


def cpu(requests: int) -> dict[str, Any]:
    """Instructions per request, plain route against a 50/50 sticky split, on both paths. Blue at
    127.0.0.1 and green at 127.0.0.2: one fast stand-in, two upstreams of the gateway's."""
    port = free_port()
    backend = f"http://127.0.0.1:{port}"
    sent = [scoring_request(headers=b"X-User-Id: user-%06d\r\n" % i) for i in range(USERS)]
    out: dict[str, Any] = {}
    with process([sys.executable, str(HERE / "fast_backend.py"), str(port), "0.0.0.0"], backend + "/ping"):
        for path in ("fast", "aiohttp"):
            answered: dict[str, Counter[str]] = {"plain": Counter(), "split": Counter()}
            plain = count(ROOT, backend, path == "fast", requests, setup=blue_green(apart=True), sent=sent,
                          answered=answered["plain"])
            split = count(ROOT, backend, path == "fast", requests, setup=blue_green(split=SPLIT, apart=True), sent=sent,
                          answered=answered["split"])
            # The split must have split (and the plain route not): else the ratio compares nothing.
            assert set(answered["plain"]) == {"blue"}, answered
            green_share = answered["split"]["green"] / requests
            assert 0.4 < green_share < 0.6 and set(answered["split"]) == {"blue", "green"}, answered
            out[path] = {"plain": plain, "split": split, "ratio": split / plain, "green_share": green_share}
    met = all(v["ratio"] <= targets.CANARY_SPLIT_CPU_RATIO for v in out.values())
    return {"requests": requests, "users": USERS, "paths": out, "target_met": met}


async def _abort_once(s: aiohttp.ClientSession, admin: aiohttp.ClientSession, urls: list[str], green: str, name: str,
                      weight: float, healthy: float, statuses: Counter[int]) -> dict[str, Any]:
    """One canary of ``name`` (at ``green``): healthy for ``healthy`` s, then failing; the reaction."""
    async with admin.post(urls[0] + "/admin/deployments", json={"name": name, "url": green}) as r:
        assert r.status == 201, await r.text()
    async with admin.post(urls[0] + "/admin/canary", json={
            "candidate": name, "steps": [weight], "step_seconds": 3600, "min_requests": MIN_REQUESTS,
            "sticky_header": "X-User-Id"}) as r:
        assert r.status == 201, await r.text()
    async with s.get(urls[0] + "/health") as r:
        started = (await r.json())["generation"]  # the replica that answered has applied the split
    await asyncio.wait_for(serving(s, urls, started, time.perf_counter(), interval=POLL), 10)
    await asyncio.sleep(healthy)
    async with admin.get(urls[0] + "/admin/canary") as r:
        view = (await r.json())["canary"]
    if view["state"] != "running":
        return {"false_abort": view["outcome"]}
    before = statuses.copy()
    async with s.post(green + "/fault?ratio=1&status=500") as r:
        assert r.status == 200
    onset = time.perf_counter()
    # The abort is the route's next generation (nothing else writes it): weight 0 where it is applied.
    seen = await asyncio.wait_for(serving(s, urls, started + 1, onset, interval=POLL), 60)
    failed = sum(n - before[status] for status, n in statuses.items() if status != 200)
    async with admin.get(urls[0] + "/admin/canary") as r:
        view = (await r.json())["canary"]
    async with s.get(urls[0] + "/health") as r:
        health = await r.json()
    assert view["state"] == "aborted" and health["active"] == "blue", (view, health)
    async with s.post(green + "/fault?ratio=0") as r:
        assert r.status == 200
    return {"seconds": max(seen), "spread_ms": (max(seen) - min(seen)) * 1000, "client_failures": failed,
            "why": view["outcome"], "candidate_judged": view["last_gate"]["candidate"]["judged_requests"]}


async def _reaction(urls: list[str], green: str, runs: int, healthy: float) -> dict[str, Any]:
    statuses: Counter[int] = Counter()
    out: dict[str, list[dict[str, Any]]] = {f"{w:g}%": [] for w in WEIGHTS}
    false_aborts: list[str] = []
    async with aiohttp.ClientSession() as s, aiohttp.ClientSession(headers=AUTH) as admin:
        stop = asyncio.Event()
        loader = asyncio.create_task(open_loop(s, urls, RATE, stop, headers=lambda i: {"X-User-Id": f"user-{i % 100_000}"},
                                               statuses=statuses))
        attempt = 0
        # The weights take turns, so both see the same host over the same minutes.
        for _ in range(runs):
            for weight in WEIGHTS:
                for _ in range(3):
                    # A fresh candidate per run: its cohort and its counters start clean.
                    attempt += 1
                    run = await _abort_once(s, admin, urls, green, f"green-{attempt}", weight, healthy, statuses)
                    if "false_abort" not in run:
                        out[f"{weight:g}%"].append(run)
                        break
                    false_aborts.append(run["false_abort"])
                await asyncio.sleep(1.0)
        stop.set()
        await loader
    return {"runs": out, "false_aborts": false_aborts, "statuses": {str(k): v for k, v in sorted(statuses.items())}}


def reaction(runs: int, healthy: float) -> dict[str, Any]:
    """p50 and max of fault onset → every replica on the abort's generation, per weight, default settings."""
    with stack(REPLICAS, extra_env={}, shared=True) as st:
        measured = asyncio.run(_reaction(st["urls"], st["backends"]["green"], runs, healthy))
    summary = {}
    for weight, rows in measured["runs"].items():
        times = [r["seconds"] for r in rows]
        summary[weight] = {
            "runs": len(rows), "p50_s": percentile(times, 0.5) if times else float("nan"),
            "max_s": max(times, default=float("nan")), "max_spread_ms": max((r["spread_ms"] for r in rows), default=0.0),
            "client_failures_median": statistics.median(r["client_failures"] for r in rows) if rows else 0,
        }
    met = all(v["runs"] >= runs and v["p50_s"] <= targets.CANARY_ABORT_P50_SECONDS for v in summary.values())
    return {"rate": RATE, "replicas": REPLICAS, "healthy_seconds": healthy, "summary": summary, **measured,
            "target_met": met}


def run(quick: bool = False) -> dict[str, Any]:
    """Both measurements."""
    from gateway.settings import Settings

    # Healthy for a full guard window (plus a little): the gate then weighs the failures against a
    # window of good answers, as in a step that has run a while; quick: just past the minimum sample.
    healthy = 5.0 if quick else Settings().guard_window + 2
    return {"cpu": cpu(800 if quick else 2000), "reaction": reaction(2 if quick else 5, healthy)}


def table(result: dict[str, Any]) -> list[str]:
    """Markdown for RESULTS.md."""
    c, r = result["cpu"], result["reaction"]
    lines = [
        "### Canary — instructions per proxied request, 50/50 sticky split against a plain route (callgrind)",
        "",
        "| path | plain route | 50/50 split, sticky on X-User-Id | ratio | answered by green (split) |",
        "|---|---:|---:|---:|---:|",
    ]
    for path, row in c["paths"].items():
        lines.append(f"| {path} | {row['plain']:,.0f} | {row['split']:,.0f} | {row['ratio']:.3f}× "
                     f"| {row['green_share']:.1%} |")
    lines += [
        "",
        f"{c['requests']} one-row JSON requests over 8 keep-alive connections, each with its own `X-User-Id` "
        f"(among {c['users']}), the same requests through both routes; blue at 127.0.0.1 and green at 127.0.0.2, "
        f"one fast stand-in. Target ≤ {targets.CANARY_SPLIT_CPU_RATIO}× on both paths: "
        f"{'met' if c['target_met'] else 'NOT met'}.",
        "",
        "### Canary — abort reaction (the candidate starts answering 500 → every gateway replica on weight 0)",
        "",
        "| canary weight | runs | p50 s | max s | replicas apart, max ms | failed client requests per abort (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for weight, row in r["summary"].items():
        lines.append(f"| {weight} | {row['runs']} | {row['p50_s']:.2f} | {row['max_s']:.2f} | {row['max_spread_ms']:.0f} "
                     f"| {row['client_failures_median']:.0f} |")
    first = next((rows[0] for rows in r["runs"].values() if rows), None)
    verdict = (f" The first run's verdict: “{first['why']}” ({first['candidate_judged']} judged candidate requests)."
               if first else "")
    lines += [
        "",
        f"{r['replicas']} gateway processes on one Redis namespace (127.0.0.1:6379), {r['rate']:g} req/s taking turns "
        f"between them, each with an `X-User-Id`; default settings (guard interval 1 s, counter flush 0.25 s, "
        f"window 30 s, poll 1 s), `min_requests` {MIN_REQUESTS}. Each run: a fresh candidate at its weight, healthy "
        f"for {r['healthy_seconds']:g} s, then answering 500 to every request from a known instant (the fault's "
        "answer); the time runs until the last replica's `/health` shows the abort's route generation "
        f"(polled every {POLL * 1000:g} ms).{verdict} Healthy candidates aborted before the fault (the run "
        f"retried with a fresh one): {len(r['false_aborts'])}"
        + (f" ({'; '.join(f'“{why}”' for why in r['false_aborts'])})" if r["false_aborts"] else "")
        + f". Target p50 ≤ {targets.CANARY_ABORT_P50_SECONDS:g} s at every weight: "
        f"{'met' if r['target_met'] else 'NOT met'}.",
    ]
    return lines

"""Redis Sentinel failover: from SIGKILL of the primary to the first admin switch that succeeds through the
new one, next to the sentinels' ``down-after-milliseconds`` that bounds it, and the predictions lost meanwhile.

A private primary, one replica and three sentinels (quorum 2); two gateway processes on the
``redis+sentinel://`` URL in front of two fast stand-ins (blue, green); open-loop predictions through both
gateways and a switch through them every 50 ms all along. Each trial kills the primary, waits for the first
switch answered 200 (the old primary is dead, so it went through the new one), then brings the killed server
back as a replica and waits until it is in sync before the next trial.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import BIN, HERE, free_port, percentile, process
from bench.reaction import open_loop
from bench.switching import AUTH, TOKEN
from gateway.records import Deployment, State
from gateway.store import RedisStore
from tests.support import sentinel_cluster

DOWN_AFTER_MS = (1000, 3000)


async def _switches(admin: aiohttp.ClientSession, urls: list[str], stop: asyncio.Event,
                    answers: list[tuple[float, float, int]]) -> None:
    for i in itertools.count():
        if stop.is_set():
            return
        status = 0
        # Timed by when the attempt began: one sent before the kill may be answered just after it.
        began = time.monotonic()
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with admin.post(urls[i % len(urls)] + "/admin/switch",
                                  json={"target": "green" if i % 2 else "blue", "reason": "bench"}) as resp:
                await resp.read()
                status = resp.status
        answers.append((began, time.monotonic(), status))
        await asyncio.sleep(0.05)


async def _trials(cluster: Any, urls: list[str], trials: int) -> list[dict[str, Any]]:
    out = []
    statuses: Counter[int] = Counter()
    answers: list[tuple[float, float, int]] = []
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as s, aiohttp.ClientSession(headers=AUTH, timeout=timeout) as admin:
        tasks = [asyncio.create_task(open_loop(s, urls, 200, stop, statuses=statuses)),
                 asyncio.create_task(_switches(admin, urls, stop, answers))]
        await asyncio.sleep(2)
        for _ in range(trials):
            dead = cluster.primary()
            before = Counter(statuses)
            killed = time.monotonic()
            dead.stop()
            promoted = None
            while True:
                if promoted is None and cluster.primary_port() != dead.port:
                    promoted = time.monotonic()
                # The first attempt begun after the kill that succeeded, timed by its answer.
                switched = next((end for began, end, status in answers if began > killed and status == 200), None)
                if switched is not None and promoted is not None:
                    break
                if time.monotonic() - killed > 60:
                    raise RuntimeError("no switch succeeded within 60 s of the kill")
                await asyncio.sleep(0.01)
            during = Counter(statuses)
            during.subtract(before)
            refused = Counter(status for began, end, status in answers if killed < began and end < switched)
            out.append({"kill_to_switch_s": switched - killed, "kill_to_promotion_s": promoted - killed,
                        "predictions": sum(during.values()), "predictions_failed": sum(n for st, n in during.items() if st != 200),
                        "switches_refused": dict(refused)})
            # The killed server returns (empty) as a replica; the next trial starts from a synced pair.
            dead.start(replica_of=cluster.primary_port())
            await asyncio.to_thread(cluster.wait_in_sync, 60)
            await asyncio.sleep(1)
        stop.set()
        await asyncio.gather(*tasks)
    failed = sum(n for status, n in statuses.items() if status != 200)
    return [{**t, "all_predictions": sum(statuses.values()), "all_failed": failed} for t in out]


async def _setup(url: str, namespace: str, blue: str, green: str) -> None:
    store = RedisStore.from_url(url, namespace)
    try:
        for name, backend in (("blue", blue), ("green", green)):
            await store.create_deployment(Deployment(name=name, url=backend, state=State.READY, external=True))
        await store.set_route("blue", None)
    finally:
        await store.close()


def measure(down_after_ms: int, trials: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir, sentinel_cluster(Path(workdir), down_after_ms) as cluster, \
            contextlib.ExitStack() as stack:
        backends = []
        for _ in range(2):
            port = free_port()
            stack.enter_context(process([sys.executable, str(HERE / "fast_backend.py"), str(port)],
                                        f"http://127.0.0.1:{port}/ping"))
            backends.append(f"http://127.0.0.1:{port}")
        namespace = f"bench-sentinel-{free_port()}"
        asyncio.run(_setup(cluster.url, namespace, *backends))
        urls = []
        for _ in range(2):
            port = free_port()
            stack.enter_context(process(
                [str(BIN / "turnout"), "gateway", "--port", str(port), "--log-level", "WARNING"],
                f"http://127.0.0.1:{port}/health",
                TURNOUT_REDIS_URL=cluster.url, TURNOUT_NAMESPACE=namespace, TURNOUT_ADMIN_TOKEN=TOKEN,
                TURNOUT_REGISTRY_SYNC="false",
            ))
            urls.append(f"http://127.0.0.1:{port}")
        runs = asyncio.run(_trials(cluster, urls, trials))
    switch = [r["kill_to_switch_s"] for r in runs]
    return {
        "down_after_ms": down_after_ms, "trials": runs,
        "kill_to_switch_p50_s": percentile(switch, 0.5), "kill_to_switch_max_s": max(switch),
        "predictions_failed": sum(r["predictions_failed"] for r in runs),
        "all_failed": runs[-1]["all_failed"], "all_predictions": runs[-1]["all_predictions"],
        "target_met": runs[-1]["all_failed"] == 0,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Three trials per down-after setting (quick: one, at 1000 ms only)."""
    settings = DOWN_AFTER_MS[:1] if quick else DOWN_AFTER_MS
    return {"settings": [measure(ms, 1 if quick else 3) for ms in settings]}


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        "### Redis Sentinel failover — SIGKILL of the primary to the first admin switch through the new one",
        "",
        "| down-after-milliseconds | trial | kill → sentinels name a new primary | kill → first switch answered 200 "
        "| switches refused meanwhile (503) | predictions meanwhile | failed |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setting in result["settings"]:
        for i, t in enumerate(setting["trials"], 1):
            refused = sum(n for status, n in t["switches_refused"].items() if status != 200)
            lines.append(f"| {setting['down_after_ms']} | {i} | {t['kill_to_promotion_s']:.2f} s | "
                         f"{t['kill_to_switch_s']:.2f} s | {refused} | {t['predictions']} | {t['predictions_failed']} |")
    lines += [""]
    for setting in result["settings"]:
        lines.append(
            f"- down-after {setting['down_after_ms']} ms: first successful switch **{setting['kill_to_switch_p50_s']:.2f} s** "
            f"after the kill at the median (max {setting['kill_to_switch_max_s']:.2f} s); predictions failed over the whole "
            f"run: **{setting['all_failed']}** of {setting['all_predictions']} (target 0): "
            f"{'met' if setting['target_met'] else 'NOT met'}."
        )
    lines += [
        "",
        "A private primary, one replica and three sentinels (quorum 2, failover-timeout 10 s) on this machine; two "
        "gateway processes on the `redis+sentinel://` URL, 200 predictions/s through them (open loop) and a switch "
        "every 50 ms throughout. The time is bounded below by down-after-milliseconds (the sentinels must see the "
        "primary silent that long), then the vote, the promotion and the next switch attempt; predictions never "
        "wait on Redis (each gateway serves the route it holds).",
    ]
    return lines

"""Switch propagation (1, 2, 4 replicas; with pub/sub cut) and zero-drop switching under load."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp

from bench import targets
from bench.common import HERE, free_port, gateway_args, percentile, private_redis, process
from bench.proxy_overhead import REDIS_URL

TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def service_names(count: int) -> list[str]:
    """The extra services a stack holds: ``s000``, ``s001``, ..."""
    return [f"s{i:03d}" for i in range(count)]


async def _setup_route(redis_url: str, backends: dict[str, str], services: int = 0, namespace: str = "turnout",
                       split: tuple[str, float, str | None] | None = None,
                       shadow: tuple[str, float] | None = None) -> None:
    """blue (active) and green in the default service, and in each of ``services`` more; with ``split``
    (candidate, weight, sticky header), the default service's route divides its requests so; with
    ``shadow`` (deployment, percent), that share of them is copied to the shadow."""
    from gateway.records import Deployment, ServiceConfig, State
    from gateway.store import RedisStore

    store = RedisStore.from_url(redis_url, namespace)
    for service in ["default", *service_names(services)]:
        if service != "default":
            await store.create_service(service, ServiceConfig())
        for name, url in backends.items():
            await store.create_deployment(Deployment(name=name, url=url, state=State.READY, external=True), service=service)
        await store.set_route("blue", None, service=service)
    if split is not None:
        route = await store.get_route()
        assert (await store.change_rollout(split=split, expected_generation=route.generation)).ok
    if shadow is not None:
        route = await store.get_route()
        assert (await store.change_rollout(shadow=shadow, expected_generation=route.generation)).ok
    await store.close()


def blue_green(services: int = 0, split: tuple[str, float, str | None] | None = None, apart: bool = False,
               shadow: tuple[str, float] | None = None, green: str | None = None) -> Any:
    """An instructions ``setup`` (bench.instructions.count): ``_setup_route`` on the shared Redis to the
    backend — with ``apart``, green at 127.0.0.2 (the same stand-in, listening on every loopback
    address, but another upstream of the gateway's); ``green``: at that URL instead — and the namespace
    dropped afterwards."""
    async def setup(namespace: str, backend: str, action: str) -> None:
        from gateway.store import drop_namespace

        if action == "set":
            other = green or (backend.replace("127.0.0.1", "127.0.0.2") if apart else backend)
            await _setup_route(REDIS_URL, {"blue": backend, "green": other}, services, namespace, split, shadow)
        else:
            await drop_namespace(REDIS_URL, namespace)
    return setup


@contextlib.contextmanager
def stack(replicas: int, cut: int = 0, reuse_port: bool = False, extra_env: dict[str, str] | None = None,
          services: int = 0, shared: bool = False) -> Iterator[dict[str, Any]]:
    """A private Redis, blue and green fast backends, and gateway replicas; ``cut`` of them cannot subscribe.
    ``shared``: the machine's Redis (127.0.0.1:6379) in a private namespace, dropped afterwards, instead."""
    with contextlib.ExitStack() as stack_:
        if shared:
            from gateway.store import drop_namespace

            assert not cut, "cutting pub/sub needs a Redis of our own"
            redis_url, namespace = REDIS_URL, f"turnout-bench-{uuid.uuid4().hex[:8]}"
            stack_.callback(lambda: asyncio.run(drop_namespace(redis_url, namespace)))
        else:
            redis_url, namespace = stack_.enter_context(private_redis()).url, "turnout"
        backends = {}
        for name in ("blue", "green"):
            port = free_port()
            stack_.enter_context(process([sys.executable, str(HERE / "fast_backend.py"), str(port)], f"http://127.0.0.1:{port}/ping"))
            backends[name] = f"http://127.0.0.1:{port}"
        asyncio.run(_setup_route(redis_url, backends, services, namespace))
        if cut:
            import redis

            client = redis.Redis.from_url(redis_url)
            # A user allowed every command but no pub/sub channel: its SUBSCRIBE is refused, polling remains.
            client.execute_command("ACL", "SETUSER", "cut", "on", ">cut", "~*", "resetchannels", "+@all")
            client.close()
        urls, procs = [], []
        shared_port = free_port()
        for i in range(replicas):
            port = shared_port if reuse_port else free_port()
            url = redis_url.replace("redis://", "redis://cut:cut@") if i >= replicas - cut else redis_url
            env = {"TURNOUT_REDIS_URL": url, "TURNOUT_NAMESPACE": namespace, "TURNOUT_ADMIN_TOKEN": TOKEN,
                   "TURNOUT_GUARD_ENABLED": "false"}
            if reuse_port:
                env["TURNOUT_REUSE_PORT"] = "true"
            if extra_env is not None:
                env = {**env, **extra_env, "TURNOUT_GUARD_ENABLED": "true"}
            procs.append(stack_.enter_context(process(gateway_args(port), f"http://127.0.0.1:{port}/health", **env)))
            urls.append(f"http://127.0.0.1:{port}")
        yield {"urls": urls, "procs": procs, "redis": redis_url, "backends": backends}


async def serving(probe: aiohttp.ClientSession, urls: list[str], generation: int, since: float,
                  health_path: str = "/health", interval: float = 0.0) -> list[float]:
    """Seconds from ``since`` (``time.perf_counter()``) until each replica's ``health_path`` reports
    ``generation`` or a later one, polled every ``interval`` (0: back to back)."""
    async def until_seen(url: str) -> float:
        while True:
            async with probe.get(url + health_path) as r:
                if (await r.json()).get("generation", -1) >= generation:
                    return time.perf_counter() - since
            if interval:
                await asyncio.sleep(interval)

    return list(await asyncio.gather(*(until_seen(u) for u in urls)))


async def _propagation(urls: list[str], switches: int, jitter: float, services: list[str] | None = None) -> list[float]:
    """Seconds from the admin call's response until every replica reports the new generation; with
    ``services``, each switch flips one of them chosen at random (``/admin/services/{s}/switch``, seen
    on ``/models/{s}/health``), else the default service."""
    async with aiohttp.ClientSession(headers=AUTH) as admin, aiohttp.ClientSession() as probe:
        delays = []
        flips: dict[str | None, int] = {}
        for _ in range(switches):
            service = random.choice(services) if services else None
            flips[service] = flips.get(service, 0) + 1
            target = "green" if flips[service] % 2 == 1 else "blue"
            admin_path = f"/admin/services/{service}/switch" if service else "/admin/switch"
            health_path = f"/models/{service}/health" if service else "/health"
            async with admin.post(urls[0] + admin_path, json={"target": target}) as resp:
                generation = (await resp.json())["route"]["generation"]
            answered = time.perf_counter()
            seen = await asyncio.wait_for(serving(probe, urls, generation, answered, health_path), 10)
            delays.append(max(seen))
            # A random gap, so switches do not fall at one fixed phase of the poll cycle.
            await asyncio.sleep(random.uniform(0.005, jitter))
        return delays


def propagation(switches: int) -> dict[str, Any]:
    """p50/p99 for 1, 2 and 4 replicas, and with one replica's pub/sub cut (poll interval 1 s)."""
    out: dict[str, Any] = {}
    for replicas, cut in ((1, 0), (2, 0), (4, 0), (2, 1)):
        with stack(replicas, cut) as s:
            delays = asyncio.run(_propagation(s["urls"], switches if not cut else max(20, switches // 5), 1.0 if cut else 0.05))
        key = f"{replicas} replicas" + (", one without pub/sub" if cut else "")
        out[key] = {"switches": len(delays), "p50_ms": percentile(delays, 0.5) * 1000,
                    "p99_ms": percentile(delays, 0.99) * 1000, "max_ms": max(delays) * 1000}
    fast = [v for k, v in out.items() if "without" not in k]
    cut = out["2 replicas, one without pub/sub"]
    return {"results": out, "target_met": all(v["p99_ms"] <= targets.PROPAGATION_P99_MS for v in fast)
            and cut["max_ms"] <= targets.PROPAGATION_POLL_ONLY_MAX_MS}


async def _zero_drop(urls: list[str], seconds: float, flips: int, concurrency: int,
                     restart: Any = None) -> dict[str, Any]:
    counts = {"ok": 0, "non_2xx": 0, "socket_errors": 0}
    errors: list[str] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        async with aiohttp.ClientSession() as s:
            url = urls[i % len(urls)] + "/invocations"
            while not stop.is_set():
                try:
                    async with s.post(url, data=b'{"inputs": [[1, 2, 3, 4]]}', headers={"Content-Type": "application/json"}) as r:
                        await r.read()
                        counts["ok" if r.status == 200 else "non_2xx"] += 1
                        if r.status != 200 and len(errors) < 5:
                            errors.append(f"{r.status}")
                except aiohttp.ClientError as exc:
                    counts["socket_errors"] += 1
                    if len(errors) < 5:
                        errors.append(repr(exc))

    async def flipper() -> None:
        async with aiohttp.ClientSession(headers=AUTH) as admin:
            for i in range(flips):
                await asyncio.sleep(seconds / (flips + 1))
                async with admin.post(urls[0] + "/admin/switch", json={"target": "green" if i % 2 == 0 else "blue"}) as r:
                    assert r.status == 200, await r.text()
                if restart is not None and i == flips // 2:
                    restart()

    tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
    await flipper()
    await asyncio.sleep(seconds / (flips + 1))
    stop.set()
    await asyncio.gather(*tasks)
    total = sum(counts.values())
    return {**counts, "requests": total, "flips": flips, "first_errors": errors}


def zero_drop(seconds: float, flips: int) -> dict[str, Any]:
    """100 flips under steady load; then the same with one of two SO_REUSEPORT replicas restarted mid-run."""
    with stack(1) as s:
        plain = asyncio.run(_zero_drop(s["urls"], seconds, flips, concurrency=16))
    with stack(2, reuse_port=True) as s:
        victim = s["procs"][1]

        def restart() -> None:
            victim.send_signal(signal.SIGTERM)

        with_restart = asyncio.run(_zero_drop(s["urls"][:1], seconds, flips, concurrency=16, restart=restart))
    return {
        "flips_only": plain,
        "with_replica_sigterm": with_restart,
        "target_met": plain["requests"] >= targets.ZERO_DROP_MIN_REQUESTS and plain["non_2xx"] + plain["socket_errors"] == 0,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Both scenarios."""
    return {
        "propagation": propagation(30 if quick else 100),
        "zero_drop": zero_drop(10 if quick else 40, 100),
    }


def table(result: dict[str, Any]) -> list[str]:
    """Markdown for RESULTS.md."""
    p = result["propagation"]
    lines = ["### Switch propagation (admin call answered → every replica reports the new generation)", "",
             "| replicas | switches | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for key, r in p["results"].items():
        lines.append(f"| {key} | {r['switches']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} |")
    lines.append(f"\nTarget p99 ≤ 10 ms with pub/sub, bounded by the 1 s poll interval without: "
                 f"{'met' if p['target_met'] else 'NOT met'}.")
    z = result["zero_drop"]
    lines += ["", "### Zero-drop switching (16 concurrent clients, route flipped 100 times)", "",
              "| run | requests | non-2xx | socket errors |", "|---|---:|---:|---:|"]
    for key in ("flips_only", "with_replica_sigterm"):
        r = z[key]
        lines.append(f"| {key.replace('_', ' ')} | {r['requests']} | {r['non_2xx']} | {r['socket_errors']} |")
    lines.append(f"\nTarget 0 failures out of ≥ 20,000 requests (flips only): {'met' if z['target_met'] else 'NOT met'}.")
    if z["with_replica_sigterm"]["first_errors"]:
        lines.append(f"Errors with a replica SIGTERMed (SO_REUSEPORT pair): {z['with_replica_sigterm']['first_errors']}.")
    return lines

"""Route propagation between replicas and fail-static behaviour, against real Redis servers."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from gateway.metrics import GatewayMetrics
from gateway.records import Deployment, Route, Snapshot, State
from gateway.store import RedisStore
from gateway.store import EmbeddedStore
from gateway.watcher import RouteWatcher
from tests.support import backend_app, eventually, free_port, history, private_redis, serve_app


def dep(name: str, url: str) -> Deployment:
    return Deployment(name=name, url=url, state=State.READY, external=True)


async def backend_of(session: aiohttp.ClientSession, url: str) -> str | int:
    async with session.post(url + "/invocations", json={}) as resp:
        return resp.headers.get("X-Backend") or resp.status


async def test_pubsub_propagates_a_switch_to_every_replica(redis_store_factory: Any, gateway_factory: Any) -> None:
    """Polling is set to a minute, so only pub/sub can deliver the switch to the two replicas in time."""
    async with serve_app(backend_app("blue")) as blue, serve_app(backend_app("green")) as green:
        admin = redis_store_factory()
        await admin.create_deployment(dep("blue", blue))
        await admin.create_deployment(dep("green", green))
        await admin.set_route("blue", None)
        replicas = [await gateway_factory(redis_store_factory(), poll_interval=60) for _ in range(2)]
        async with aiohttp.ClientSession() as s:
            for url in replicas:
                await eventually(lambda url=url: serves(s, url, "blue"), timeout=5)
            await admin.set_route("green", "blue")
            for url in replicas:
                await eventually(lambda url=url: serves(s, url, "green"), timeout=2)


async def serves(session: aiohttp.ClientSession, url: str, name: str) -> bool:
    return await backend_of(session, url) == name


async def metric_is(session: aiohttp.ClientSession, url: str, name: str, value: float) -> bool:
    return await _metric_value(session, url, name) == value


async def test_polling_recovers_a_missed_message(redis_store_factory: Any) -> None:
    """A change whose message never arrives (written without PUBLISH) is picked up by the poll."""
    store: RedisStore = redis_store_factory()
    await store.create_deployment(dep("blue", "http://127.0.0.1:1"))
    watcher = RouteWatcher(store, GatewayMetrics(), poll_interval=0.2)
    await watcher.start()
    try:
        await watcher.wait_ready(5)
        await store.client.hset(store.keys.service("default").route, mapping={"active": "blue", "generation": 5})
        await eventually(lambda: watcher.snapshot and watcher.snapshot.route.generation == 5, timeout=3)
    finally:
        await watcher.stop()


async def test_lower_generation_is_never_applied() -> None:
    watcher = RouteWatcher(EmbeddedStore(), GatewayMetrics())
    newer = Snapshot(route=Route("green", "blue", 7))
    older = Snapshot(route=Route("blue", None, 3))
    watcher._apply(newer, "test")
    watcher._apply(older, "test")
    assert watcher.snapshot is newer


async def test_redis_outage_keeps_serving_and_reconnects(gateway_factory: Any) -> None:
    """Redis dies while traffic flows: no request fails; it comes back empty; a newer route is applied."""
    async with serve_app(backend_app("blue")) as blue, serve_app(backend_app("green")) as green:
        with private_redis() as server:
            admin = RedisStore.from_url(server.url, "t")
            await admin.create_deployment(dep("blue", blue))
            await admin.set_route("blue", None)
            # Slow polling: after the restart the change must arrive by re-subscription and pub/sub.
            url = await gateway_factory(RedisStore.from_url(server.url, "t"), poll_interval=30)
            statuses: list[int | str] = []
            stop = asyncio.Event()

            async def traffic() -> None:
                async with aiohttp.ClientSession() as s:
                    while not stop.is_set():
                        try:
                            statuses.append(await backend_of(s, url))
                        except aiohttp.ClientError as exc:
                            statuses.append(repr(exc))
                        await asyncio.sleep(0.005)

            async with aiohttp.ClientSession() as s:
                await eventually(lambda: serves(s, url, "blue"), timeout=5)
                load = asyncio.create_task(traffic())
                await asyncio.sleep(0.3)
                server.stop()
                await eventually(lambda: metric_is(s, url, "turnout_store_up", 0.0), timeout=10)
                await asyncio.sleep(1.0)
                served_during_outage = len(statuses)
                server.start()
                # The restarted Redis is empty (generation 0): the gateway keeps its route meanwhile.
                await admin.create_deployment(dep("blue", blue))
                await admin.create_deployment(dep("green", green))
                await eventually(lambda: metric_is(s, url, "turnout_store_up", 1.0), timeout=10)
                await admin.set_route("blue", None)
                await admin.set_route("green", "blue")
                await eventually(lambda: statuses and statuses[-1] == "green", timeout=5)
                stop.set()
                await load
            await admin.close()
    assert served_during_outage > 20
    failures = [s for s in statuses if s not in ("blue", "green")]
    assert failures == [], failures[:5]


async def _metric_value(session: aiohttp.ClientSession, url: str, name: str) -> float | None:
    async with session.get(url + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


async def test_gateway_started_while_redis_down_serves_503_until_it_reads_a_route(gateway_factory: Any) -> None:
    port = free_port()
    url = await gateway_factory(RedisStore.from_url(f"redis://127.0.0.1:{port}/0", "t"), poll_interval=0.2)
    async with serve_app(backend_app("blue")) as blue, aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(url + "/invocations", json={}) as resp:
                assert resp.status == 503
                assert "not read a route" in (await resp.json())["message"]
            await asyncio.sleep(0.1)
        async with s.get(url + "/health") as resp:
            assert resp.status == 503
        from tests.support import RedisServer

        server = RedisServer(port)
        server.start()
        try:
            admin = RedisStore.from_url(server.url, "t")
            await admin.create_deployment(dep("blue", blue))
            await admin.set_route("blue", None)
            await eventually(lambda: serves(s, url, "blue"), timeout=10)
            await admin.close()
        finally:
            server.stop()


async def test_a_record_from_a_newer_release_reads_as_not_ready_and_breaks_nothing(redis_store: Any) -> None:
    """A deployment state this release does not know (and a number it cannot read) must not stop the
    route from being read: that deployment is simply not ready."""
    await redis_store.create_deployment(Deployment(name="blue", url="http://127.0.0.1:9", state=State.READY, external=True))
    await redis_store.set_route("blue", None)
    await redis_store.client.hset(redis_store.keys.service("default").deployment("blue"), mapping={"state": "hibernating", "ready_at": "soon"})
    snapshot = await redis_store.read_snapshot()
    assert snapshot.deployments["blue"].state is State.UNKNOWN
    assert not snapshot.is_ready("blue") and snapshot.route.active == "blue"


async def test_a_loop_that_fails_unexpectedly_logs_counts_keeps_going_and_recovers(
    gateway_factory: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store answers with an error that is not an outage (an ACL refusing the snapshot script):
    the refresh loop logs it with its traceback, counts it, /health says so once it lasts, and the
    loop picks up the route as soon as the permission is back."""
    import logging

    caplog.set_level(logging.ERROR, logger="gateway.loops")
    with private_redis() as redis:
        admin = RedisStore.from_url(redis.url, "acl")
        await admin.create_deployment(Deployment(name="blue", url="http://127.0.0.1:9", state=State.READY, external=True))
        await admin.create_deployment(Deployment(name="green", url="http://127.0.0.1:9", state=State.READY, external=True))
        await admin.set_route("blue", None)
        await admin.client.execute_command("ACL", "SETUSER", "gw", "on", ">pw", "~*", "&*", "+@all")
        url = await gateway_factory(redis_url=f"redis://gw:pw@127.0.0.1:{redis.port}/0", namespace="acl", poll_interval=0.1)
        gateway = gateway_factory.gateways[-1]
        from gateway.app import LOOPS, WATCHER

        watcher, loops = gateway.app[WATCHER], gateway.app[LOOPS]
        await eventually(lambda: watcher.snapshot is not None and watcher.snapshot.route.active == "blue", timeout=5)
        await admin.client.execute_command("ACL", "SETUSER", "gw", "-evalsha", "-eval")
        await admin.set_route("green", "blue")
        refresh = next(lp for lp in loops.loops if lp.name == "route-refresh")
        await eventually(lambda: refresh.failures >= 2, timeout=10)
        assert watcher.snapshot.route.active == "blue", "the last route keeps serving"
        assert any("route-refresh" in r.getMessage() and r.exc_info for r in caplog.records)
        async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as resp:
            assert 'turnout_background_errors_total{task="route-refresh"}' in await resp.text()
        import gateway.loops as loops_module

        monkeypatch.setattr(loops_module, "MIN_UNHEALTHY_SECONDS", 0.0)  # no need to wait out the grace here

        async def unhealthy() -> bool:
            async with aiohttp.ClientSession() as s, s.get(url + "/health") as resp:
                return resp.status == 503 and "route-refresh" in (await resp.json())["message"]

        await eventually(unhealthy, timeout=10)
        await admin.client.execute_command("ACL", "SETUSER", "gw", "+@all")
        await eventually(lambda: watcher.snapshot.route.active == "green", timeout=15)
        assert refresh.failing_since is None
        await admin.close()


async def test_a_route_that_went_back_in_generation_is_reported_restamped_once_and_later_switches_apply(
    redis_store_factory: Any,
) -> None:
    """What a Sentinel failover that lost acknowledged switches looks like to two gateways: the store's
    route is back at generation 1 while they hold 3. Each reports it; one history line; the store's route
    is re-stamped above what they held, they converge on it, and the next switch is applied."""
    admin: RedisStore = redis_store_factory()
    for name in ("blue", "green"):
        await admin.create_deployment(dep(name, "http://127.0.0.1:1"))
    for name, previous in (("blue", None), ("green", "blue"), ("blue", "green")):
        assert (await admin.set_route(name, previous)).ok
    watchers = [RouteWatcher(redis_store_factory(), GatewayMetrics(), poll_interval=0.1) for _ in range(2)]
    for watcher in watchers:
        await watcher.start()
    try:
        for watcher in watchers:
            await watcher.wait_ready(5)
            await eventually(lambda watcher=watcher: watcher.snapshot.route.generation == 3, timeout=5)
        # The failover kept generation 1 (blue → green lost): written without an event, as a replica would hold it.
        await admin.client.hset(admin.keys.service("default").route, mapping={"active": "blue", "generation": 1})
        await admin.client.hdel(admin.keys.service("default").route, "previous")
        for watcher in watchers:
            await eventually(lambda watcher=watcher: watcher.snapshot.route.generation == 4, timeout=5)
            assert watcher.snapshot.route.active == "blue" and watcher.snapshot.route.previous is None
        reported = [w.metrics.generation_regressions.labels("default")._value.get() for w in watchers]
        assert sum(reported) >= 1, reported  # a gateway that read only after the re-stamp saw nothing wrong
        entries = [e for e in await history(admin) if e["action"] == "generation_regressed"]
        assert len(entries) == 1, entries
        assert entries[0]["generation"] == 4 and entries[0]["store_generation"] == 1 and entries[0]["held_generation"] == 3
        assert (await admin.read_snapshot()).route.generation == 4
        # Later switches outrank everything lost.
        assert (await admin.set_route("green", "blue")).route.generation == 5
        for watcher in watchers:
            await eventually(lambda watcher=watcher: watcher.snapshot.route.active == "green", timeout=5)
    finally:
        for watcher in watchers:
            await watcher.stop()


async def test_a_store_that_came_back_empty_is_reported_and_the_held_route_keeps_serving() -> None:
    store = EmbeddedStore()
    await store.create_deployment(dep("blue", "http://127.0.0.1:1"))
    await store.set_route("blue", None)
    watcher = RouteWatcher(store, GatewayMetrics())
    await watcher.refresh()
    # The route is gone (an empty Redis): generation 0, nothing active.
    store._services["default"].route = Route()
    await watcher.refresh(service="default")
    assert watcher.snapshot.route == Route("blue", None, 1, watcher.snapshot.route.changed_at)
    assert watcher.metrics.generation_regressions.labels("default")._value.get() == 1
    assert (await store.read_snapshot()).route.generation == 0, "nothing to re-stamp: the store is left alone"
async def test_a_task_that_swallows_its_cancellation_is_cancelled_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py can lose a cancellation while it connects: stopping a loop must not wait for it forever."""
    from gateway import loops

    monkeypatch.setattr(loops, "RECANCEL_AFTER", 0.05)
    swallowed = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.append(True)
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        await asyncio.sleep(3600)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await loops.cancel_and_wait(task)
    assert swallowed == [True] and task.cancelled()

"""The guard against real backends: rolls back on real breaches, never on noise, client errors or low traffic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.guard import judge
from gateway.records import Deployment, State
from gateway.settings import Settings
from gateway.store import EmbeddedStore, Store
from gateway.traffic import Figures
from tests.support import FAILURES, SEEN, Load, backend_app, eventually, history, serve_app

FAST_GUARD = {"guard_window": 5.0, "guard_interval": 0.2, "guard_min_requests": 20, "stats_flush_interval": 0.1}


async def add(store: Store, name: str, url: str, state: State = State.READY) -> None:
    await store.create_deployment(Deployment(name=name, url=url, state=state, external=True))


async def switch(url: str, target: str) -> None:
    async with aiohttp.ClientSession() as s, s.post(url + "/admin/switch", json={"target": target}) as resp:
        assert resp.status == 200, await resp.text()


async def route_active(store: Store) -> str | None:
    return (await store.read_snapshot()).route.active


async def blue_active_green_deployed(backends: dict[str, Any]) -> EmbeddedStore:
    """An embedded store routing to blue, with green deployed next to it."""
    store = EmbeddedStore()
    await add(store, "blue", backends["blue"])
    await add(store, "green", backends["green"])
    await store.set_route("blue", None)
    return store


@pytest.fixture
async def backends() -> AsyncIterator[dict[str, Any]]:
    blue, green = backend_app("blue"), backend_app("green")
    async with serve_app(blue) as blue_url, serve_app(green) as green_url:
        yield {"blue": blue_url, "green": green_url, "blue_app": blue, "green_app": green}


async def test_rolls_back_a_deployment_failing_30_percent(backends: dict[str, Any], gateway_factory: Any) -> None:
    store = await blue_active_green_deployed(backends)
    backends["green_app"][FAILURES]["ratio"] = 0.3
    url = await gateway_factory(store, **FAST_GUARD)
    async with Load([url], rate=100) as load:
        await asyncio.sleep(0.5)
        await switch(url, "green")
        switched_at = len(load.results)
        await eventually(lambda: _is_active(store, "blue"), timeout=10)
        await asyncio.sleep(0.5)
    after_switch = load.results[switched_at:]
    failures = [r for r in after_switch if r.status != 200]
    assert failures and all(r.deployment == "green" for r in failures), "clients see errors only from green, only until the rollback"
    assert (load.results[-1].deployment, load.results[-1].status) == ("blue", 200)
    entries = await history(store)
    rollback = next(e for e in entries if e["action"] == "rollback" and e["result"] == "applied")
    assert rollback["trigger"] == "guard" and rollback["from"] == "green" and rollback["to"] == "blue"
    evidence = rollback["evidence"]
    assert evidence["error_rate"] > 0.05 and evidence["judged_requests"] >= 20 and evidence["window_seconds"] == 5.0
    guard = await store.get_guard()
    assert "rolled back green" in guard["latched"]
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as resp:
        text = await resp.text()
    assert 'turnout_rollbacks_total{service="default",trigger="guard"} 1.0' in text and 'turnout_switches_total{service="default",trigger="guard"} 1.0' in text
    # Each crash was replayed to blue, which answered it: green's regression, not the input's fault.
    assert 'turnout_replays_total{service="default",verdict="model"}' in text
    assert 'turnout_replays_total{service="default",verdict="input"}' not in text


async def _is_active(store: Store, name: str) -> bool:
    return await route_active(store) == name


async def _no_rollback_during(store: Store, seconds: float) -> None:
    for _ in range(int(seconds / 0.1)):
        assert await route_active(store) == "green", (await history(store))[:3]
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(("rate", "ratio", "why"), [(10, 0.1, "below the minimum sample"), (60, 0.02, "steady 2% errors")])
async def test_no_rollback_on_low_traffic_or_low_error_rate(
    backends: dict[str, Any], gateway_factory: Any, rate: float, ratio: float, why: str
) -> None:
    store = await blue_active_green_deployed(backends)
    # 'below the minimum': ~10 requests in the window against a minimum of 20.
    settings = {**FAST_GUARD, "guard_window": 1.0} if rate == 10 else FAST_GUARD
    url = await gateway_factory(store, **settings)
    await switch(url, "green")
    backends["green_app"][FAILURES]["ratio"] = ratio
    async with Load([url], rate=rate) as load:
        await _no_rollback_during(store, 3.0)
    assert any(r.status != 200 for r in load.results), f"the backend did fail ({why})"


async def test_client_errors_never_roll_back(backends: dict[str, Any], gateway_factory: Any) -> None:
    store = await blue_active_green_deployed(backends)
    url = await gateway_factory(store, **FAST_GUARD)
    await switch(url, "green")

    async def flood() -> None:
        async with aiohttp.ClientSession() as s:
            for _ in range(150):
                async with s.post(url + "/invocations?mode=status&code=400", data=b"{}") as resp:
                    assert resp.status == 400
                async with s.post(url + "/invocations", data=b"hello", headers={"Content-Type": "text/plain"}) as resp:
                    await resp.read()
                await asyncio.sleep(0.005)

    await asyncio.gather(flood(), _no_rollback_during(store, 3.0))


async def test_previous_not_ready_holds_and_records_why(backends: dict[str, Any], gateway_factory: Any) -> None:
    store = await blue_active_green_deployed(backends)
    url = await gateway_factory(store, **FAST_GUARD)
    await switch(url, "green")
    await store.update_deployment("blue", state=State.UNHEALTHY, reason="oom")
    backends["green_app"][FAILURES]["ratio"] = 0.5
    async with Load([url], rate=100):

        async def held() -> bool:
            entries = await history(store)
            return any(e["result"] == "held" for e in entries)

        await eventually(held, timeout=10)
        await _no_rollback_during(store, 1.0)
    entries = await history(store)
    hold = next(e for e in entries if e["result"] == "held")
    assert "previous deployment blue is not ready" in hold["detail"] and hold["evidence"]["error_rate"] > 0.05
    assert sum(e["result"] == "held" for e in entries) == 1, "a hold is recorded once per route generation"


async def test_two_replicas_aggregate_and_roll_back_once_real_redis(
    backends: dict[str, Any], gateway_factory: Any, redis_store_factory: Any
) -> None:
    store = redis_store_factory()
    await add(store, "blue", backends["blue"])
    await add(store, "green", backends["green"])
    await store.set_route("blue", None)
    backends["green_app"][FAILURES]["ratio"] = 0.3
    # Each replica alone sees ~12 requests per 5 s window: under the minimum of 20 on its own.
    settings = {**FAST_GUARD, "guard_min_requests": 20}
    urls = [await gateway_factory(redis_store_factory(), **settings) for _ in range(2)]
    await switch(urls[0], "green")
    async with Load(urls, rate=5):
        await eventually(lambda: _is_active(store, "blue"), timeout=20)
        await asyncio.sleep(1.0)
    entries = await history(store)
    applied = [e for e in entries if e["action"] == "rollback" and e["result"] == "applied"]
    assert len(applied) == 1 and applied[0]["trigger"] == "guard"
    assert applied[0]["evidence"]["judged_requests"] >= 20


async def test_leader_dies_another_replica_takes_over_real_redis(
    backends: dict[str, Any], gateway_factory: Any, redis_store_factory: Any
) -> None:
    store = redis_store_factory()
    await add(store, "blue", backends["blue"])
    await store.set_route("blue", None)
    urls = [await gateway_factory(redis_store_factory(), **FAST_GUARD) for _ in range(2)]

    async def leaders() -> list[bool]:
        out = []
        async with aiohttp.ClientSession() as s:
            for url in urls:
                async with s.get(url + "/admin/guard") as resp:
                    out.append((await resp.json())["this_replica_decides"])
        return out

    await eventually(lambda: _one_leader(leaders), timeout=10)
    first = (await leaders()).index(True)
    async with aiohttp.ClientSession() as s, s.get(urls[1 - first] + "/admin/guard") as resp:
        # The replica that does not decide says so instead of showing a view it never took.
        assert (await resp.json())["status"] == "standby"
    await gateway_factory.gateways[first].stop()
    survivor = urls[1 - first]
    urls[:] = [survivor]
    # The lease is 3 s (3 × the interval, at least 3 s): the survivor decides within it and a tick.
    await eventually(lambda: _one_leader(leaders), timeout=6)


async def _one_leader(leaders: Any) -> bool:
    return (await leaders()).count(True) == 1


async def test_alertmanager_webhook_rolls_back_once(backends: dict[str, Any], gateway_factory: Any) -> None:
    store = await blue_active_green_deployed(backends)
    url = await gateway_factory(store, guard_enabled=False)
    await switch(url, "green")

    def payload(status: str, deployment: str, starts: str = "2026-11-29T10:00:00Z") -> dict[str, Any]:
        return {"version": "4", "status": status, "receiver": "turnout", "groupKey": "{}", "alerts": [{
            "status": status, "labels": {"alertname": "TurnoutHighErrorRatio", "turnout_action": "rollback",
                                         "deployment": deployment, "severity": "page"},
            "annotations": {"summary": "green error ratio 31%"}, "startsAt": starts, "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus/graph", "fingerprint": "abc123"}]}

    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/admin/alerts", json=payload("firing", "blue")) as resp:
            body = await resp.json()
            assert resp.status == 200 and body["results"][0]["action"] == "refused"
        assert await route_active(store) == "green", "an alert about a deployment that is not active changes nothing"
        async with s.post(url + "/admin/alerts", json=payload("firing", "green", "2026-11-29T10:05:00Z")) as resp:
            assert (await resp.json())["results"][0]["action"] == "rolled_back"
        assert await route_active(store) == "blue"
        for status in ("firing", "resolved"):
            async with s.post(url + "/admin/alerts", json=payload(status, "green", "2026-11-29T10:05:00Z")) as resp:
                assert (await resp.json())["results"][0]["action"] == "ignored"
        async with s.post(url + "/admin/alerts", json={"version": "3", "alerts": []}) as resp:
            assert resp.status == 400
    entries = await history(store)
    applied = [e for e in entries if e["action"] == "rollback" and e["result"] == "applied"]
    assert len(applied) == 1 and applied[0]["trigger"] == "alertmanager" and applied[0]["reason"] == "green error ratio 31%"
    assert (await store.get_guard())["latched"]


async def test_pause_and_resume_through_the_admin_api(backends: dict[str, Any], gateway_factory: Any) -> None:
    store = await blue_active_green_deployed(backends)
    url = await gateway_factory(store, **FAST_GUARD)
    await switch(url, "green")
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/admin/guard", json={"paused": True, "reason": "load test"}) as resp:
            assert resp.status == 200 and "load test" in (await resp.json())["paused"]
    backends["green_app"][FAILURES]["ratio"] = 0.5
    async with Load([url], rate=100):
        await _no_rollback_during(store, 2.0)
        async with aiohttp.ClientSession() as s, s.post(url + "/admin/guard", json={"paused": False}) as resp:
            assert resp.status == 200
        await eventually(lambda: _is_active(store, "blue"), timeout=10)


def test_judge_rules() -> None:
    s = Settings(guard_min_requests=20, guard_error_rate=0.05, guard_p99=0.5)

    def fig(requests: int, model: int, client: int = 0, p99: float | None = 0.01) -> Figures:
        return Figures(requests, requests - model - client, client, model, 0, 0.01, p99)

    assert not judge(s, fig(10, 5), None).breach, "below the minimum sample"
    assert not judge(s, fig(100, 2), None).breach, "2% < 5%"
    assert judge(s, fig(100, 10), None).breach
    assert not judge(s, fig(200, 0, client=150), None).breach, "client errors are never the model's fault"
    assert judge(s, fig(100, 0, p99=0.9), None).breach and "p99" in judge(s, fig(100, 0, p99=0.9), None).why
    noisy_before = fig(100, 8)
    assert not judge(s, fig(100, 10), noisy_before).breach, "an already-noisy model needs to get worse by the threshold"
    assert judge(s, fig(100, 20), noisy_before).breach


def test_latency_sketch_quantiles_are_within_two_percent_of_a_real_latency() -> None:
    """The guard's p99 is read from log-scale buckets: within 2% of a latency some request had, unlike
    interpolation inside the Prometheus histogram's buckets (1.5 s used to read as 2.485 s)."""
    import math
    import random

    from gateway.traffic import RELATIVE_ERROR, Traffic

    rng = random.Random(11)
    for distribution in ([1.5] * 500, [rng.lognormvariate(-3, 1.2) for _ in range(5000)], [0.00005, 0.0002, 12.0, 700.0]):
        traffic = Traffic(clock=lambda: 1000.0)
        for seconds in distribution:
            traffic.record("blue", "ok", seconds)
        figures = traffic.local("blue", 60)
        ordered = sorted(distribution)
        for q, estimate in ((0.5, figures.p50), (0.99, figures.p99)):
            exact = ordered[max(0, math.ceil(q * len(ordered)) - 1)]
            assert estimate is not None
            assert abs(estimate - exact) <= RELATIVE_ERROR * exact + 1e-4, (q, estimate, exact)


@pytest.mark.parametrize(("threshold", "rolls_back"), [(2.0, False), (1.0, True)])
async def test_a_steady_1_5_s_model_is_judged_on_its_real_p99(
    backends: dict[str, Any], gateway_factory: Any, threshold: float, rolls_back: bool
) -> None:
    store = await blue_active_green_deployed(backends)
    url = await gateway_factory(store, **{**FAST_GUARD, "guard_window": 10.0, "guard_min_requests": 10},
                                guard_p99=threshold, read_timeout=5)
    await switch(url, "green")
    async with aiohttp.ClientSession() as s:

        async def slow() -> None:
            async with s.post(url + "/invocations?mode=slow&delay=1.5", json={}) as resp:
                await resp.read()

        for _ in range(2):
            await asyncio.gather(*(slow() for _ in range(8)))
        await asyncio.sleep(1.0)  # a few evaluations after the last request was counted
    active = await route_active(store)
    assert (active == "blue") is rolls_back, f"p99 threshold {threshold} s: active is {active}"
    entries = await history(store)
    if rolls_back:
        evidence = next(e for e in entries if e["action"] == "rollback")["evidence"]
        assert 1.47 <= evidence["p99_seconds"] <= 1.53 and evidence["p99_relative_error"] == 0.02


async def test_failures_while_previewed_do_not_count_after_the_switch(backends: dict[str, Any], gateway_factory: Any) -> None:
    """An operator probes green's edge cases through its pinned endpoint (failures there), then switches
    to it: the guard judges green on what it does as the active deployment, not on the probing."""
    store = await blue_active_green_deployed(backends)
    url = await gateway_factory(store, **FAST_GUARD)
    async with aiohttp.ClientSession() as s:
        for _ in range(40):
            async with s.post(url + "/deployments/green/invocations?mode=status&code=500", json={}) as resp:
                assert resp.status == 500
    await asyncio.sleep(1.1)  # the probing ends in an earlier second than the switch
    await switch(url, "green")
    async with Load([url], rate=60) as load:
        await _no_rollback_during(store, 3.0)
    assert load.results and all(r.status == 200 for r in load.results)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "aiohttp"])
@pytest.mark.parametrize("replay", [True, False], ids=["replayed", "not-replayed"])
async def test_crashes_on_inputs_the_previous_version_rejects_too_are_the_clients(
    backends: dict[str, Any], gateway_factory: Any, fast_path: bool, replay: bool
) -> None:
    """Every request crashes inside green's predict, and inside blue's too (an input no version takes):
    replayed to blue, they are the client's errors and green stays. Without the replay they would
    roll green back, which is what the not-replayed run shows."""
    store = await blue_active_green_deployed(backends)
    url = await gateway_factory(store, **FAST_GUARD, fast_path=fast_path, replay_crashes=replay)
    await switch(url, "green")
    async with aiohttp.ClientSession() as s:
        for _ in range(60):
            async with s.post(url + "/invocations?mode=crash", json={"inputs": [[float("inf")]]}) as resp:
                assert resp.status == 400
            await asyncio.sleep(0.01)
        if replay:
            await _no_rollback_during(store, 1.5)
            async with s.get(url + "/metrics") as resp:
                text = await resp.text()
            assert 'turnout_replays_total{service="default",verdict="input"} 60.0' in text
            assert 'turnout_requests_total{code="400",deployment="green",outcome="client_error",service="default"} 60.0' in text
            assert len(backends["blue_app"][SEEN]) == 60, "each crash was replayed to blue once"
        else:
            await eventually(lambda: _is_active(store, "blue"), timeout=10)

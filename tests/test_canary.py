"""Canary rollouts: the split (accuracy, sticky cohorts that only ever move forward), the relative gate,
plans that promote or abort themselves, survive their leader, and refuse bad input — through real
gateways on both request paths, against stand-in model servers and real Redis."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import GUARD, PROXY
from gateway.proxy import Split
from gateway.records import ABORTED, PROMOTED, RUNNING, Deployment, Plan, State
from gateway.rollout import gate
from gateway.settings import Settings
from gateway.store import EmbeddedStore
from gateway.traffic import Figures
from tests.support import eventually, history, serve_app

TOKEN = "canary-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Fast looks so a test waits seconds, not minutes.
FAST = {"guard_interval": 0.2, "stats_flush_interval": 0.1, "poll_interval": 0.2, "admin_token": TOKEN}


@pytest.fixture(params=["fast", "aiohttp"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    return request.param == "fast"


def model(name: str, *, fail_every: int = 0, delay: float = 0.0) -> web.Application:
    """A stand-in model server naming itself; every ``fail_every``-th request fails (500), deterministically."""
    seen = 0

    async def invocations(request: web.Request) -> web.Response:
        nonlocal seen
        await request.read()
        seen += 1
        if delay:
            await asyncio.sleep(delay)
        if fail_every and seen % fail_every == 0:
            return web.json_response({"error_code": "INTERNAL_ERROR", "message": "boom"}, status=500)
        return web.json_response({"predictions": [name]})

    app = web.Application()
    app.router.add_post("/invocations", invocations)
    return app


async def two_deployments(store: Any, blue: str, green: str) -> None:
    for name, url in (("blue", blue), ("green", green)):
        assert await store.create_deployment(Deployment(name=name, url=url, state=State.READY, external=True))
    assert (await store.set_route("blue", None)).ok


def applied(gateway: Any) -> int | None:
    """The route generation a gateway serves now (None before its first read)."""
    snapshot = gateway.app[PROXY].watcher.snapshots.get("default")
    return snapshot.route.generation if snapshot is not None else None


async def send(session: aiohttp.ClientSession, url: str, count: int, *, key: str | None = None,
               concurrency: int = 16) -> Counter[str]:
    """``count`` predictions; which deployment answered each (by the X-Turnout-Deployment header)."""
    answers: Counter[str] = Counter()
    headers = {"X-User-Id": key} if key is not None else {}
    left = count

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url + "/invocations", json={"inputs": [[1]]}, headers=headers) as resp:
                await resp.read()
                answers[f"{resp.status} {resp.headers.get('X-Turnout-Deployment')}"] += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return answers


async def steady(session: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> Counter[str]:
    """Predictions one after another until ``stop``; which deployment answered each."""
    answers: Counter[str] = Counter()
    while not stop.is_set():
        async with session.post(url + "/invocations", json={"inputs": [[1]]}) as resp:
            await resp.read()
            answers[f"{resp.status} {resp.headers.get('X-Turnout-Deployment')}"] += 1
        await asyncio.sleep(0.005)
    return answers


# --- the split as a unit ---------------------------------------------------------------------------
class _Stub:
    def __init__(self, name: str) -> None:
        self.service, self.name = "svc", name


def test_sticky_buckets_are_stable_uniform_and_only_move_forward() -> None:
    active, candidate = _Stub("blue"), _Stub("green")
    keys = [f"user-{i}".encode() for i in range(20_000)]
    at = {w: Split(active, candidate, w, "x-user-id") for w in (0, 1, 10, 50, 99.5, 100)}  # type: ignore[arg-type]
    on = {w: {k for k in keys if split.pick(k) is candidate} for w, split in at.items()}
    assert on[0] == set() and on[100] == set(keys)
    for weight in (1, 10, 50, 99.5):
        assert abs(len(on[weight]) / len(keys) * 100 - weight) < 1.0, (weight, len(on[weight]))
    assert on[1] <= on[10] <= on[50] <= on[99.5], "raising the weight only moves keys to the candidate"
    # The same on every replica and process: nothing but the key, the service and the candidate decides.
    again = Split(_Stub("blue"), _Stub("green"), 10, "x-user-id")  # type: ignore[arg-type]
    assert {k for k in keys if again.pick(k).name == "green"} == on[10]
    # Another rollout (another candidate) draws another cohort.
    other = Split(active, _Stub("red"), 10, "x-user-id")  # type: ignore[arg-type]
    assert len({k for k in keys if other.pick(k).name == "red"} & on[10]) < 0.2 * len(on[10])


def test_without_a_key_the_draw_is_random_and_exact_at_the_ends() -> None:
    active, candidate = _Stub("blue"), _Stub("green")
    random.seed(3)
    for weight, low, high in ((0, 0, 0), (10, 9.0, 11.0), (100, 100, 100)):
        split = Split(active, candidate, weight, None)  # type: ignore[arg-type]
        share = sum(split.pick(None) is candidate for _ in range(20_000)) / 200
        assert low <= share <= high, (weight, share)


# --- the relative gate as a pure function ---------------------------------------------------------------
def figures(requests: int, failures: int, p99: float = 0.01) -> Figures:
    return Figures(requests=requests, ok=requests - failures, client_errors=0, model_errors=failures,
                   upstream_errors=0, p50=p99 / 2, p99=p99)


PLAN = Plan(candidate="green", baseline="blue", steps=(10.0, 50.0), step_seconds=60, min_requests=50)


@pytest.mark.parametrize(("candidate", "baseline", "status", "words"), [
    (figures(100, 20), figures(900, 0), "breach", "candidate error rate 20.00% > baseline 0.00% + 1.00% (100 and 900"),
    (figures(100, 3), figures(900, 27), "pass", "3.0% errors vs baseline 3.0%"),
    (figures(100, 4), figures(900, 27), "pass", ""),
    # 5 % against 3 % over a hundred requests is sampling noise; over thousands it is not.
    (figures(100, 5), figures(900, 27), "pass", ""),
    (figures(5000, 300), figures(5000, 150), "breach", "> baseline 3.00% + 1.00%"),
    (figures(100, 0, p99=0.2), figures(900, 0, p99=0.1), "breach", "p99 200.0 ms > baseline 100.0 ms × 1.5"),
    (figures(100, 0, p99=0.14), figures(900, 0, p99=0.1), "pass", ""),
    # Below the noise floor a ratio means nothing: 3 ms against 1 ms is not a breach.
    (figures(100, 0, p99=0.003), figures(900, 0, p99=0.001), "pass", ""),
    # A p99 of 60 requests is their slowest one: not compared.
    (figures(60, 0, p99=0.2), figures(900, 0, p99=0.1), "pass", ""),
    (figures(40, 20), figures(900, 0), "waiting", "needs 50 each"),
    (figures(100, 0), figures(30, 0), "waiting", "baseline 30"),
    # The guard's own threshold is a floor: a candidate as bad as a bad baseline still fails at 10 %.
    (figures(1000, 100), figures(9000, 900), "breach", "absolute 5.00%"),
    (figures(1000, 100), figures(10, 1), "breach", "absolute 5.00%"),
])
def test_the_relative_gate(candidate: Figures, baseline: Figures, status: str, words: str) -> None:
    verdict = gate(candidate, baseline, PLAN, Settings())
    assert verdict.status == status and words in verdict.why, verdict.why
    assert verdict.evidence["candidate"]["judged_requests"] == candidate.judged
    assert verdict.latency_only == (status == "breach" and "error rate" not in verdict.why)


# --- through the gateway -----------------------------------------------------------------------------
async def test_split_accuracy_on_both_paths(gateway_factory: Any, fast_path: bool) -> None:
    async with serve_app(model("blue")) as blue, serve_app(model("green")) as green:
        store = EmbeddedStore()
        await two_deployments(store, blue, green)
        url = await gateway_factory(store, fast_path=fast_path, **FAST)
        async with aiohttp.ClientSession() as s:
            # 20k requests at 10 % (±1 point); none and all at the ends, exactly.
            for weight, count, low, high in ((0, 2000, 0, 0), (10, 20_000, 1800, 2200), (100, 2000, 2000, 2000)):
                route = await store.get_route()
                change = await store.change_rollout(split=("green", weight, None), expected_generation=route.generation)
                assert change.ok
                await eventually(lambda: applied(gateway_factory.gateways[-1]) == change.route.generation)
                answers = await send(s, url, count, concurrency=32)
                assert set(answers) <= {"200 blue", "200 green"}, answers
                assert low <= answers["200 green"] <= high, (weight, answers)


async def test_sticky_keys_stay_put_on_two_gateways_and_only_move_forward(
    gateway_factory: Any, redis_store_factory: Any, fast_path: bool,
) -> None:
    async with serve_app(model("blue")) as blue, serve_app(model("green")) as green:
        store = redis_store_factory()
        await two_deployments(store, blue, green)
        urls = [await gateway_factory(redis_store_factory(), fast_path=fast_path, **FAST) for _ in range(2)]
        keys = [f"user-{i}" for i in range(1000)]
        placed: list[dict[str, str]] = []
        async with aiohttp.ClientSession() as s:
            for weight in (10, 30, 60):
                route = await store.get_route()
                change = await store.change_rollout(split=("green", weight, "x-user-id"), expected_generation=route.generation)
                assert change.ok
                for gateway in gateway_factory.gateways:
                    await eventually(lambda g=gateway: applied(g) == change.route.generation)
                where: dict[str, str] = {}
                for url in urls:
                    for key in keys:
                        async with s.post(url + "/invocations", json={"inputs": [[1]]}, headers={"X-User-Id": key}) as resp:
                            await resp.read()
                            got = resp.headers["X-Turnout-Deployment"]
                            assert where.setdefault(key, got) == got, f"{key} answered by both at {weight}%"
                placed.append(where)
                share = sum(d == "green" for d in where.values()) / 10
                assert weight - 4 <= share <= weight + 4, (weight, share)
        for before, after in zip(placed, placed[1:]):
            assert not [k for k in keys if before[k] == "green" and after[k] == "blue"], "a key moved back"


async def start(session: aiohttp.ClientSession, url: str, **body: Any) -> tuple[int, Any]:
    async with session.post(url + "/admin/canary", json={"candidate": "green", **body}) as resp:
        return resp.status, await resp.json()


async def plan_of(store: Any) -> Plan:
    plan = (await store.read_snapshot()).plan
    assert plan is not None
    return plan


async def ended(store: Any, timeout: float = 30) -> Plan:
    async def check() -> Plan | None:
        plan = (await store.read_snapshot()).plan
        return plan if plan is not None and not plan.active else None

    return await eventually(check, timeout=timeout, interval=0.05)


async def test_a_healthy_candidate_promotes_itself_without_a_client_error(gateway_factory: Any, fast_path: bool) -> None:
    async with serve_app(model("blue")) as blue, serve_app(model("green")) as green:
        store = EmbeddedStore()
        await two_deployments(store, blue, green)
        url = await gateway_factory(store, fast_path=fast_path, **FAST)
        async with aiohttp.ClientSession(headers=AUTH) as s:
            load = asyncio.create_task(send(s, url, 4000, concurrency=4))
            code, answer = await start(s, url, steps=[20, 50], step_seconds=1, min_requests=20, reason="v2")
            assert code == 201 and answer["canary"]["state"] == "running" and answer["canary"]["weight"] == 20, answer
            plan = await ended(store)
            answers = await load
        assert plan.state == PROMOTED, plan
        route = await store.get_route()
        assert (route.active, route.previous, route.candidate) == ("green", "blue", None)
        assert set(answers) == {"200 blue", "200 green"}, answers
        actions = [(e["action"], e["result"]) for e in reversed(await history(store))]
        assert actions[-3:] == [("canary_start", "applied"), ("canary_step", "applied"), ("switch", "applied")], actions


async def test_a_failing_candidate_is_aborted_within_two_seconds_of_the_minimum_sample(
    gateway_factory: Any, fast_path: bool,
) -> None:
    async with serve_app(model("blue")) as blue, serve_app(model("green", fail_every=5)) as green:
        store = EmbeddedStore()
        await two_deployments(store, blue, green)
        url = await gateway_factory(store, fast_path=fast_path, **FAST)
        green_seen: list[float] = []

        async with aiohttp.ClientSession(headers=AUTH) as s:
            code, _ = await start(s, url, steps=[50], step_seconds=600, min_requests=50)
            assert code == 201

            async def traffic() -> None:
                while True:
                    async with s.post(url + "/invocations", json={"inputs": [[1]]}) as resp:
                        await resp.read()
                        if resp.headers.get("X-Turnout-Deployment") == "green":
                            green_seen.append(time.monotonic())
                    await asyncio.sleep(0.004)

            task = asyncio.create_task(traffic())
            try:
                plan = await ended(store, timeout=60)
                aborted_at = time.monotonic()
            finally:
                task.cancel()
        assert plan.state == ABORTED and "error rate" in plan.outcome, plan
        # Green's 50th answer completed the sample (blue gets as many at 50 %); the abort follows within 2 s.
        assert len(green_seen) >= 50 and aborted_at - green_seen[49] < 2.0, aborted_at - green_seen[49]
        route = await store.get_route()
        assert (route.active, route.candidate) == ("blue", None)
        guard = await store.get_guard()
        assert "canary of green aborted" in guard["latched"]
        entry = next(e for e in await history(store) if e["action"] == "canary_abort")
        assert entry["evidence"]["candidate"]["error_rate"] >= 0.15 and entry["evidence"]["baseline"]["failures"] == 0


async def test_as_bad_as_the_baseline_is_not_aborted_but_slower_than_the_ratio_is(gateway_factory: Any) -> None:
    # Both fail one request in 33 (3 %): the relative gate lets the candidate through.
    async with serve_app(model("blue", fail_every=33)) as blue, serve_app(model("green", fail_every=33)) as green:
        store = EmbeddedStore()
        await two_deployments(store, blue, green)
        url = await gateway_factory(store, **FAST)
        async with aiohttp.ClientSession(headers=AUTH) as s:
            load = asyncio.create_task(send(s, url, 3000, concurrency=4))
            code, _ = await start(s, url, steps=[50], step_seconds=1.5, min_requests=60)
            assert code == 201
            plan = await ended(store, timeout=60)
            await load
        assert plan.state == PROMOTED, plan.outcome
    # 40 ms against a few: more than 1.5× the baseline's p99.
    async with serve_app(model("blue")) as blue, serve_app(model("green", delay=0.04)) as green:
        store = EmbeddedStore()
        await two_deployments(store, blue, green)
        url = await gateway_factory(store, **FAST)
        async with aiohttp.ClientSession(headers=AUTH) as s:
            load = asyncio.create_task(send(s, url, 3000, concurrency=8))
            code, _ = await start(s, url, steps=[50], step_seconds=60, min_requests=30)
            assert code == 201
            plan = await ended(store, timeout=60)
            load.cancel()
        assert plan.state == ABORTED and "p99" in plan.outcome, plan.outcome


async def test_a_plan_survives_its_leader(gateway_factory: Any, redis_store_factory: Any) -> None:
    async with serve_app(model("blue")) as blue, serve_app(model("green")) as green:
        store = redis_store_factory()
        await two_deployments(store, blue, green)
        urls = [await gateway_factory(redis_store_factory(), **FAST) for _ in range(2)]
        gateways = list(gateway_factory.gateways)
        await eventually(lambda: sum(g.app[GUARD].leader for g in gateways) == 1, timeout=10)
        leader = next(i for i, g in enumerate(gateways) if g.app[GUARD].leader)
        survivor = urls[1 - leader]
        async with aiohttp.ClientSession(headers=AUTH) as s:
            stop = asyncio.Event()
            load = asyncio.create_task(steady(s, survivor, stop))
            code, _ = await start(s, survivor, steps=[20, 40, 60], step_seconds=1.5, min_requests=20)
            assert code == 201
            await asyncio.sleep(0.5)
            await gateways[leader].stop()
            plan = await ended(store, timeout=60)
            stop.set()
            answers = await load
        assert plan.state == PROMOTED, plan.outcome
        assert set(answers) <= {"200 blue", "200 green"}, answers
        steps = [e for e in await history(store) if e["action"] == "canary_step"]
        assert len(steps) == 2, steps


async def test_bad_canary_requests_are_refused_and_write_nothing(gateway_factory: Any) -> None:
    async with serve_app(model("blue")) as blue, serve_app(model("green")) as green:
        store = EmbeddedStore()
        await two_deployments(store, blue, green)
        await store.create_deployment(Deployment(name="cold", model_uri="models:/m/1"))
        url = await gateway_factory(store, **FAST)
        generation = (await store.get_route()).generation
        async with aiohttp.ClientSession(headers=AUTH) as s:
            cases = [
                ({"steps": [0, 50], "step_seconds": 1}, 400, "above 0 and below 100"),
                ({"steps": [10, 101], "step_seconds": 1}, 400, "below 100"),
                ({"steps": [10, 100], "step_seconds": 1}, 400, "passing the last step promotes"),
                ({"steps": [10], "step_seconds": 1, "sticky_header": "X-Turnout-Deployment"}, 400, "says nothing"),
                ({"steps": [-5], "step_seconds": 1}, 400, "above 0"),
                ({"steps": [50, 25], "step_seconds": 1}, 400, "steps must increase"),
                ({"steps": [10, 10], "step_seconds": 1}, 400, "steps must increase"),
                ({"steps": [], "step_seconds": 1}, 400, "steps"),
                ({"steps": [10], "step_seconds": 0}, 400, "step_seconds"),
                ({"steps": [10], "step_seconds": 1, "sticky_header": "Host"}, 400, "says nothing about who is asking"),
                ({"steps": [10], "step_seconds": 1, "sticky_header": "X User"}, 400, "HTTP header name"),
                ({"steps": [10], "step_seconds": 1, "max_latency_ratio": 0.5}, 400, "max_latency_ratio"),
                ({"steps": [10], "step_seconds": 1, "colour": "red"}, 400, "colour"),
                ({"candidate": "cold", "steps": [10], "step_seconds": 1}, 409, "cold is starting"),
                ({"candidate": "nope", "steps": [10], "step_seconds": 1}, 404, "no deployment named 'nope'"),
                ({"candidate": "blue", "steps": [10], "step_seconds": 1}, 409, "already the active deployment"),
            ]
            for body, status, words in cases:
                code, answer = await start(s, url, **body)
                assert code == status and words in answer["message"], (body, answer)
            assert (await store.get_route()).generation == generation and (await store.read_snapshot()).plan is None
            # One plan at a time; the actions need one.
            for action in ("pause", "resume", "promote", "abort"):
                async with s.post(url + f"/admin/canary/{action}", json={}) as resp:
                    answer = await resp.json()
                    assert resp.status == 409 and "no canary" in answer["message"], answer
            code, _ = await start(s, url, steps=[10], step_seconds=600)
            assert code == 201
            code, answer = await start(s, url, steps=[10], step_seconds=600)
            assert code == 409 and "a canary of green is running" in answer["message"], answer
            async with s.post(url + "/admin/canary/resume", json={}) as resp:
                assert resp.status == 409 and "no canary is paused" in (await resp.json())["message"]
            async with s.post(url + "/admin/canary/pause", json={"reason": "lunch"}) as resp:
                view = (await resp.json())["canary"]
                assert resp.status == 200 and view["state"] == "paused" and view["weight"] == 10, view
            async with s.delete(url + "/admin/deployments/green") as resp:
                assert resp.status == 409 and "abort the canary first" in (await resp.json())["message"]
            async with s.post(url + "/admin/canary/abort", json={"reason": "changed my mind"}) as resp:
                view = (await resp.json())["canary"]
                assert resp.status == 200 and view["state"] == "aborted" and view["outcome"] == "changed my mind", view
        refused = [e for e in await history(store) if e["result"] == "refused"]
        assert {e["action"] for e in refused} >= {"canary_start", "canary_pause", "canary_abort", "undeploy"}
        # Every refusal the plan logic judged is there (bodies that fail the schema never reach it).
        starts = [e["detail"] for e in refused if e["action"] == "canary_start"]
        assert any("steps must increase" in d for d in starts) and any("no deployment named 'nope'" in d for d in starts)


async def test_a_switch_or_an_alert_during_a_plan_ends_it(gateway_factory: Any) -> None:
    async with serve_app(model("blue")) as blue, serve_app(model("green")) as green:
        store = EmbeddedStore()
        await two_deployments(store, blue, green)
        url = await gateway_factory(store, **FAST)
        async with aiohttp.ClientSession(headers=AUTH) as s:
            assert (await start(s, url, steps=[10], step_seconds=600))[0] == 201
            async with s.post(url + "/admin/switch", json={"target": "green", "reason": "enough"}) as resp:
                assert resp.status == 200
            plan = await plan_of(store)
            assert plan.state == ABORTED and "ended by a switch to green" in plan.outcome, plan
            assert (await store.get_route()).candidate is None
            async with s.post(url + "/admin/switch", json={"target": "blue"}) as resp:
                assert resp.status == 200
            assert (await start(s, url, steps=[10], step_seconds=600))[0] == 201
            alert = {"version": "4", "status": "firing", "receiver": "turnout", "groupKey": "g", "alerts": [{
                "status": "firing", "labels": {"alertname": "GreenBad", "turnout_action": "rollback"},
                "annotations": {"summary": "green is bad"}, "startsAt": "2026-12-01T00:00:00Z", "fingerprint": "f1"}]}
            async with s.post(url + "/admin/alerts", json=alert) as resp:
                answer = await resp.json()
                assert answer["results"][0]["action"] == "canary_aborted", answer
        plan = await plan_of(store)
        route = await store.get_route()
        assert plan.state == ABORTED and (route.active, route.candidate) == ("blue", None)


async def test_rollout_writes_are_conditional_in_every_store(any_store: Any) -> None:
    store = any_store
    for name in ("blue", "green"):
        await store.create_deployment(Deployment(name=name, url="http://h:1", state=State.READY, external=True))
    await store.set_route("blue", None)
    plan = Plan(candidate="green", baseline="blue", steps=(10.0,), step_seconds=5, revision=1)
    change = await store.change_rollout(split=("green", 10.0, "x-user-id"), plan=plan, expected_revision=0,
                                        expected_generation=1)
    assert change.ok and change.route.generation == 2
    snapshot = await store.read_snapshot()
    assert (snapshot.route.candidate, snapshot.route.weight, snapshot.route.sticky) == ("green", 10.0, "x-user-id")
    assert snapshot.plan == plan and snapshot.route.active == "blue"
    assert (await store.change_rollout(plan=plan.but(), expected_revision=0)).refusal == "plan_conflict"
    assert (await store.change_rollout(split=("green", 20.0, None), expected_generation=1)).refusal == "conflict"
    assert (await store.change_rollout(split=("nope", 20.0, None))).refusal == "unknown"
    # A plan-only change keeps the route's generation; a switch ends the split.
    assert (await store.change_rollout(plan=plan.but(state="paused"), expected_revision=1)).ok
    assert (await store.read_snapshot()).route.generation == 2
    assert (await store.set_route("green", "blue", plan=plan.but(state=PROMOTED, revision=5))).ok
    snapshot = await store.read_snapshot()
    assert snapshot.route.candidate is None and snapshot.plan is not None and snapshot.plan.state == PROMOTED
    assert await store.delete_deployment("blue", force=True) is None
    assert RUNNING == "running"


async def test_latency_alone_must_persist_for_three_looks_failures_abort_at_once() -> None:
    from gateway.metrics import GatewayMetrics
    from gateway.records import Who
    from gateway.registry_sync import RegistrySync
    from gateway.rollout import LATENCY_LOOKS, Rollouts
    from gateway.switching import RouteControl

    store = EmbeddedStore()
    await two_deployments(store, "http://127.0.0.1:1", "http://127.0.0.1:2")
    metrics = GatewayMetrics()

    async def record(entry: Any, service: str) -> None:
        await store.append_history(entry, service=service)

    control = RouteControl(store, metrics, RegistrySync("production", record, enabled=False))
    green = {"p99": 0.2, "failures": 0}

    async def figures_of(service: str, deployment: str, since: float) -> Figures:
        if deployment == "green":
            return figures(100, green["failures"], p99=green["p99"])
        return figures(900, 0, p99=0.1)

    rollouts = Rollouts(Settings(), store, control, metrics, figures_of, lambda snapshot: Settings())
    await rollouts.start("default", "green", [10], 600, Who("ops", None, "api"), min_requests=50)

    async def look() -> str:
        await rollouts.drive("default", await store.read_snapshot())
        return (await plan_of(store)).state

    # Slow, then one normal look (the count starts again), then slow for LATENCY_LOOKS looks in a row.
    assert [await look() for _ in range(LATENCY_LOOKS - 1)] == ["running"] * (LATENCY_LOOKS - 1)
    green["p99"] = 0.1
    assert await look() == "running"
    green["p99"] = 0.2
    assert [await look() for _ in range(LATENCY_LOOKS)] == ["running"] * (LATENCY_LOOKS - 1) + ["aborted"]
    plan = await plan_of(store)
    assert "p99 200.0 ms > baseline 100.0 ms" in plan.outcome and plan.gate["latency_breached_looks"] == LATENCY_LOOKS
    # Failures abort at the first look.
    await store.set_guard(latched=None, latched_generation=None)
    green.update(p99=0.1, failures=30)
    await rollouts.start("default", "green", [10], 600, Who("ops", None, "api"), min_requests=50)
    assert await look() == "aborted"


async def test_a_candidate_crash_the_active_shares_is_the_inputs_not_the_candidates(gateway_factory: Any) -> None:
    from tests.test_replicas import named_backend

    # Both versions crash (MLflow's 400 from inside predict) on every input: bad input, not a bad candidate.
    async with serve_app(named_backend("blue", status=400)) as blue, serve_app(named_backend("green", status=400)) as green:
        store = EmbeddedStore()
        await two_deployments(store, blue, green)
        url = await gateway_factory(store, **FAST)
        async with aiohttp.ClientSession(headers=AUTH) as s:
            assert (await start(s, url, steps=[50], step_seconds=600, min_requests=20))[0] == 201
            answers = await send(s, url, 300, concurrency=4)
            await asyncio.sleep(1.0)
            async with s.get(url + "/metrics") as resp:
                exposition = await resp.text()
            plan = await plan_of(store)
        assert answers["400 green"] > 50, answers
        assert plan.state == RUNNING, plan.outcome
        replays = next(line for line in exposition.splitlines()
                       if line.startswith('turnout_replays_total{service="default",verdict="input"}'))
        assert float(replays.split()[-1]) >= answers["400 green"], replays

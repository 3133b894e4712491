"""Replicas of a deployment: least-outstanding-requests balancing (power of two choices) and passive
outlier ejection, as a unit with a fake clock and through the gateway on both request paths."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.balancer import OutlierPolicy, ReplicaSet
from gateway.classify import MODEL_CRASH_MESSAGE
from gateway.records import Deployment, HistoryEntry, State, Who, cleared
from gateway.store import EmbeddedStore
from gateway.local import free_port
from tests.support import serve_app


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def replica_set(count: int, clock: Clock, **policy: Any) -> ReplicaSet[str]:
    replicas: ReplicaSet[str] = ReplicaSet("svc", "blue", OutlierPolicy(**policy), clock, random.Random(7))
    replicas.update([f"http://h{i}:1" for i in range(count)], lambda url: url)
    return replicas


# --- the balancer as a unit -------------------------------------------------------------------------
def test_power_of_two_choices_prefers_the_replica_with_fewer_requests_in_flight() -> None:
    replicas = replica_set(3, Clock())
    busy = replicas.replicas[0]
    busy.inflight = 10
    picks = Counter(replicas.pick().url for _ in range(3000))  # type: ignore[union-attr]
    # The busy one wins only when both draws are... never: two distinct draws always include a less busy one.
    assert picks[busy.url] == 0, picks
    assert min(picks[r.url] for r in replicas.replicas[1:]) > 1200, picks


def test_two_choices_spread_evenly_when_all_are_idle() -> None:
    replicas = replica_set(4, Clock())
    picks = Counter(replicas.pick().url for _ in range(4000))  # type: ignore[union-attr]
    assert all(800 < picks[r.url] < 1200 for r in replicas.replicas), picks


def test_round_robin_takes_replicas_in_turn_whatever_their_load() -> None:
    replicas: ReplicaSet[str] = ReplicaSet("svc", "blue", OutlierPolicy(), Clock(), round_robin=True)
    replicas.update(["http://a:1", "http://b:1", "http://c:1"], lambda url: url)
    replicas.replicas[0].inflight = 50
    picks = [replicas.pick().url for _ in range(6)]  # type: ignore[union-attr]
    assert sorted(Counter(picks).values()) == [2, 2, 2] and picks[:3] != picks[1:4]


def test_consecutive_failures_eject_and_the_replica_comes_back_after_the_base_time() -> None:
    clock = Clock()
    replicas = replica_set(4, clock, consecutive_failures=3, base_ejection=10)
    sick = replicas.replicas[1]
    assert not replicas.failed(sick) and not replicas.failed(sick)
    replicas.succeeded(sick)  # a success resets the count
    assert not replicas.failed(sick) and not replicas.failed(sick)
    assert replicas.failed(sick), "the third consecutive failure ejects"
    assert replicas.in_rotation() == 3
    assert all(replicas.pick() is not sick for _ in range(200))
    clock.now += 9.9
    assert replicas.in_rotation() == 3
    clock.now += 0.2
    assert replicas.in_rotation() == 4 and any(replicas.pick() is sick for _ in range(200))


def test_a_repeated_ejection_lasts_longer_up_to_the_maximum() -> None:
    clock = Clock()
    replicas = replica_set(2, clock, consecutive_failures=1, base_ejection=10, max_ejection=25)
    sick = replicas.replicas[0]
    lengths = []
    for _ in range(4):
        assert replicas.failed(sick)
        start = clock.now
        while replicas.in_rotation() < 2:
            clock.now += 1
        lengths.append(clock.now - start)
    assert lengths == [10, 20, 25, 25]


def test_never_more_than_the_max_ejection_percent_and_never_a_lone_replica() -> None:
    clock = Clock()
    replicas = replica_set(4, clock, consecutive_failures=1, max_ejection_percent=50)
    results = [replicas.failed(r) for r in replicas.replicas]
    assert results == [True, True, False, False] and replicas.in_rotation() == 2
    alone = replica_set(1, clock, consecutive_failures=1)
    assert not alone.failed(alone.replicas[0]) and alone.in_rotation() == 1


def test_new_urls_keep_what_is_known_of_the_replicas_that_stay() -> None:
    clock = Clock()
    replicas = replica_set(3, clock, consecutive_failures=1)
    kept = replicas.replicas[2]
    kept.inflight = 4
    replicas.update(["http://h2:1", "http://h9:1"], lambda url: url)
    assert replicas.replicas[0] is kept and kept.inflight == 4 and [r.url for r in replicas.replicas] == ["http://h2:1", "http://h9:1"]


# --- through the gateway, on both request paths -------------------------------------------------------
@pytest.fixture(params=["fast", "aiohttp"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    return request.param == "fast"


def named_backend(name: str, delay: float = 0.0, status: int = 200) -> web.Application:
    """A stand-in model server that says which replica answered (after ``delay``); with status 400 it
    answers as MLflow does when the model raised inside predict."""

    async def invocations(request: web.Request) -> web.Response:
        await request.read()
        if delay:
            await asyncio.sleep(delay)
        if status == 400:
            return web.json_response({"error_code": "BAD_REQUEST", "message": f"{MODEL_CRASH_MESSAGE}: ValueError",
                                      "stack_trace": "Traceback ..."}, status=400)
        return web.json_response({"predictions": [name]}, status=status)

    app = web.Application()
    app.router.add_post("/invocations", invocations)
    return app


async def external(store: EmbeddedStore, name: str, urls: list[str]) -> None:
    await store.create_deployment(Deployment(name=name, url=urls[0], urls=tuple(urls), state=State.READY, external=True))


async def predict(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.post(url + "/invocations", json={"inputs": [[1]]}) as resp:
        body = await resp.json()
        return resp.status, body["predictions"][0] if resp.status == 200 else body.get("message", "")


async def test_a_slow_replica_gets_fewer_requests(gateway_factory: Any, fast_path: bool) -> None:
    async with serve_app(named_backend("a")) as a, serve_app(named_backend("b")) as b, \
            serve_app(named_backend("slow", delay=0.2)) as slow:
        store = EmbeddedStore()
        await external(store, "blue", [a, b, slow])
        await store.set_route("blue", None)
        url = await gateway_factory(store, fast_path=fast_path)
        async with aiohttp.ClientSession() as session:
            # 12 clients in parallel for 60 requests each: the slow replica holds its requests longer, so
            # it is the busier of almost every pair it is drawn in.
            async def client() -> list[str]:
                return [(await predict(session, url))[1] for _ in range(30)]

            answers = Counter(name for names in await asyncio.gather(*(client() for _ in range(12))) for name in names)
    assert sum(answers.values()) == 360
    assert answers["slow"] * 4 < min(answers["a"], answers["b"]), answers


async def test_a_dead_replica_costs_no_request_and_is_ejected(gateway_factory: Any, fast_path: bool) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: every connect is refused
    async with serve_app(named_backend("a")) as a, serve_app(named_backend("b")) as b:
        store = EmbeddedStore()
        await external(store, "blue", [a, dead, b])
        await store.set_route("blue", None)
        url = await gateway_factory(store, fast_path=fast_path, outlier_consecutive_failures=2)
        async with aiohttp.ClientSession() as session:
            results = [await predict(session, url) for _ in range(60)]
            async with session.get(url + "/metrics") as resp:
                metrics = await resp.text()
            async with session.get(url + "/admin/deployments/blue") as resp:
                view = await resp.json()
    # A refused connection sent nothing, so the request went to another replica: no client saw it.
    assert all(status == 200 for status, _ in results), results
    assert f'turnout_replica_ejections_total{{deployment="blue",replica="{dead}",service="default"}} 1.0' in metrics, metrics
    assert f'turnout_replica_ready{{deployment="blue",replica="{dead}",service="default"}} 0.0' in metrics
    assert 'turnout_replica_retries_total{deployment="blue",service="default"}' in metrics
    states = {r["url"]: r["state"] for r in view["replicas"]}
    assert states == {a: "ready", dead: "ejected", b: "ready"}, view["replicas"]


async def test_replicas_answering_5xx_are_ejected_but_a_model_failure_is_not(gateway_factory: Any, fast_path: bool) -> None:
    async with serve_app(named_backend("ok")) as ok, serve_app(named_backend("broken", status=503)) as broken, \
            serve_app(named_backend("crash", status=400)) as crash, serve_app(named_backend("ok2")) as ok2:
        store = EmbeddedStore()
        await external(store, "blue", [ok, broken, crash, ok2])
        await store.set_route("blue", None)
        url = await gateway_factory(store, fast_path=fast_path, outlier_consecutive_failures=3, replay_crashes=False)
        async with aiohttp.ClientSession() as session:
            statuses = Counter([(await predict(session, url))[0] for _ in range(120)])
            async with session.get(url + "/metrics") as resp:
                metrics = await resp.text()
    # Three 503s eject it (a 503 is the process failing, not the model); the replica whose model raised
    # keeps its place: that is the version's failure, the guard's business.
    assert statuses[503] == 3, statuses
    assert f'turnout_replica_ready{{deployment="blue",replica="{broken}",service="default"}} 0.0' in metrics
    assert f'turnout_replica_ready{{deployment="blue",replica="{crash}",service="default"}} 1.0' in metrics
    assert statuses[400] > 20, statuses


async def test_admin_and_cli_take_several_urls(gateway_factory: Any) -> None:
    from tests.test_admin import run_cli

    async with serve_app(named_backend("a")) as a, serve_app(named_backend("b")) as b:
        store = EmbeddedStore()
        url = await gateway_factory(store, admin_token="t0ken-1")
        headers = {"Authorization": "Bearer t0ken-1"}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.post(url + "/admin/deployments", json={"name": "blue", "urls": [a, a + "/"]}) as resp:
                assert resp.status == 400 and "given twice" in (await resp.json())["message"]
            async with session.post(url + "/admin/deployments", json={"name": "blue", "urls": [a, "http://h:99999"]}) as resp:
                assert resp.status == 400 and "bad port" in (await resp.json())["message"]
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(None, lambda: run_cli(url, "deploy", "blue", f"{a},{b}", token="wrong"))
        assert out.returncode == 1 and "refused (401)" in out.stderr

        def cli(*args: str) -> Any:
            return run_cli(url, *args, token="t0ken-1")

        out = await loop.run_in_executor(None, lambda: cli("deploy", "blue", f"{a},{b}"))
        assert out.returncode == 0, out.stderr
        out = await loop.run_in_executor(None, lambda: cli("switch", "blue"))
        assert out.returncode == 0, out.stderr
        async with aiohttp.ClientSession() as session:
            answers = Counter([(await predict(session, url))[1] for _ in range(40)])
        assert set(answers) == {"a", "b"}, answers
        out = await loop.run_in_executor(None, lambda: cli("status"))
        assert "2 replicas" in out.stdout and a in out.stdout and b in out.stdout and "answered" in out.stdout, out.stdout
    dep = (await store.read_snapshot()).deployments["blue"]
    assert dep.url == a and dep.urls == (a, b)


async def test_replica_urls_survive_the_redis_store(redis_store: Any) -> None:
    await redis_store.create_deployment(Deployment(name="blue", url="http://a:1", urls=("http://a:1", "http://b:2"),
                                                   state=State.READY, external=True))
    assert (await redis_store.read_snapshot()).serving("blue") == ("http://a:1", "http://b:2")
    await redis_store.create_deployment(Deployment(name="green", url="http://c:3", state=State.READY, external=True))
    assert (await redis_store.read_snapshot()).serving("green") == ("http://c:3",)


# --- worker-served replicas in the store (embedded, fakeredis and the real server) --------------------
async def test_each_replica_has_its_own_fields_lease_and_liveness(any_store: Any) -> None:
    store = any_store
    await store.create_deployment(Deployment(name="blue", model_uri="models:/m/1", replicas=3, min_ready=2))
    snapshot = await store.read_snapshot()
    dep = snapshot.deployments["blue"]
    assert [m.index for m in dep.members] == [0, 1, 2] and dep.needed == 2
    assert snapshot.effective_state("blue") is State.STARTING and not snapshot.is_ready("blue")

    # Each replica is leased on its own: two workers may host replicas of one deployment.
    assert await store.claim("blue", "w1", 30, replica=0)
    assert await store.claim("blue", "w2", 30, replica=1)
    assert not await store.claim("blue", "w1", 30, replica=1), "w2 holds replica 1"
    # A worker writes only the replica it holds.
    assert await store.update_deployment("blue", owner="w1", replica=0, state=State.READY, url="http://h1:5000")
    assert not await store.update_deployment("blue", owner="w1", replica=1, state=State.READY, url="http://x:1")
    assert await store.update_deployment("blue", owner="w2", replica=1, state=State.READY, url="http://h2:5000",
                                         worker="w2", restarts=2)
    snapshot = await store.read_snapshot()
    dep = snapshot.deployments["blue"]
    assert snapshot.live == frozenset({"blue", "blue#1"})
    assert dep.url == "http://h1:5000" and dep.state is State.READY, "replica 0 keeps the fields a deployment always had"
    assert dep.members[1].url == "http://h2:5000" and dep.members[1].worker == "w2" and dep.members[1].restarts == 2
    assert dep.members[2].state is State.STARTING and dep.members[2].url is None
    assert snapshot.serving("blue") == ("http://h1:5000", "http://h2:5000")
    assert snapshot.is_ready("blue") and snapshot.effective_state("blue") is State.READY, "2 of 3 ready, 2 needed"

    # A replica whose worker died is not served, and the deployment drops below min_ready.
    await store.release("blue", "w2", replica=1)
    snapshot = await store.read_snapshot()
    assert snapshot.member_state(snapshot.deployments["blue"], snapshot.deployments["blue"].members[1]) is State.UNHEALTHY
    assert snapshot.serving("blue") == ("http://h1:5000",) and not snapshot.is_ready("blue")

    # Scaling down makes the removed replica draining (not served) until its worker removes its fields.
    assert await store.claim("blue", "w2", 30, replica=1)
    assert await store.update_deployment("blue", replicas=1, min_ready=None)
    snapshot = await store.read_snapshot()
    dep = snapshot.deployments["blue"]
    assert [snapshot.member_state(dep, m) for m in dep.members] == [State.READY, State.DRAINING]
    assert snapshot.serving("blue") == ("http://h1:5000",) and snapshot.is_ready("blue")
    assert await store.update_deployment("blue", owner="w2", replica=1, **cleared(1))
    assert [m.index for m in (await store.read_snapshot()).deployments["blue"].members] == [0]

    # Deleting the deployment takes every replica's lease with it.
    await store.update_deployment("blue", replicas=2)
    await store.update_deployment("blue", owner="w2", replica=1, state=State.STARTING)
    assert await store.delete_deployment("blue") is None
    await store.create_deployment(Deployment(name="blue", model_uri="models:/m/2", replicas=2))
    assert await store.claim("blue", "w3", 30, replica=1), "the old lease went with the old deployment"


async def test_a_scale_and_its_history_entry_are_one_step(any_store: Any) -> None:
    store = any_store
    await store.create_deployment(Deployment(name="blue", model_uri="models:/m/1"))
    entry = HistoryEntry("scale", Who("ops", None, "api"), target="blue", detail="replicas 1 → 3")
    assert await store.update_deployment("blue", history=entry, replicas=3)
    assert (await store.read_snapshot()).deployments["blue"].replicas == 3
    entries, _ = await store.read_history()
    assert entries[0].action == "scale" and entries[0].detail == "replicas 1 → 3"
    assert not await store.update_deployment("gone", history=entry, replicas=3)
    assert (await store.read_history())[1] == 1, "no entry for a change that did not apply"


def test_a_record_from_a_newer_release_or_a_stray_field_reads_safely() -> None:
    dep = Deployment.from_fields({"name": "b", "replicas": "x", "min_ready": "-1", "r1.state": "ready", "r1.url": "http://a:1",
                                  "r99.state": "ready", "r1.colour": "red", "rx.state": "ready", "r0.state": "ready"})
    assert dep.replicas == 1 and dep.min_ready is None
    assert [(m.index, m.state) for m in dep.members] == [(0, State.STARTING), (1, State.READY)], "r1 drains, r99 is out of bounds"
    assert Deployment.from_fields(dep.to_fields()) == dep



# --- scaling through the admin API and the CLI ---------------------------------------------------------
async def test_scaling_through_the_admin_api_and_the_cli_and_every_refusal(gateway_factory: Any) -> None:
    from tests.test_admin import run_cli

    store = EmbeddedStore()
    url = await gateway_factory(store, admin_token="t0ken-1")
    loop = asyncio.get_running_loop()

    def cli(*args: str) -> Any:
        return run_cli(url, *args, token="t0ken-1")

    out = await loop.run_in_executor(None, lambda: cli("deploy", "blue", "models:/iris/1", "--replicas", "3", "--min-ready", "2"))
    assert out.returncode == 0, out.stderr
    dep = (await store.read_snapshot()).deployments["blue"]
    assert (dep.replicas, dep.min_ready, dep.needed) == (3, 2, 2)
    out = await loop.run_in_executor(None, lambda: cli("scale", "blue", "5", "--reason", "black friday", "--json"))
    assert out.returncode == 0, out.stderr
    assert '"desired_replicas": 5' in out.stdout and '"min_ready": 2' in out.stdout, out.stdout
    entry = (await store.read_history())[0][0]
    assert (entry.action, entry.target, entry.reason, entry.detail) == (
        "scale", "blue", "black friday", "replicas 3 → 5, min_ready 2 → 2")

    headers = {"Authorization": "Bearer t0ken-1"}
    async with aiohttp.ClientSession(headers=headers) as s:
        async def put(path: str, body: Any) -> tuple[int, Any]:
            async with s.put(url + path, json=body) as resp:
                return resp.status, await resp.json()

        refusals = [
            ("/admin/deployments/blue", {}, 400, "give replicas"),
            ("/admin/deployments/blue", {"replicas": 0}, 400, "replicas"),
            ("/admin/deployments/blue", {"replicas": 65}, 400, "replicas"),
            ("/admin/deployments/blue", {"replicas": "2"}, 400, "replicas"),
            ("/admin/deployments/blue", {"replicas": None}, 400, "null"),
            ("/admin/deployments/blue", {"replicas": 1, "min_ready": 2}, 400, "min_ready (2) cannot exceed replicas (1)"),
            ("/admin/deployments/blue", {"min_ready": 6}, 400, "min_ready (6) cannot exceed replicas (5)"),
            ("/admin/deployments/blue", {"urls": ["http://a:1"]}, 409, "served by workers"),
            ("/admin/deployments/blue", {"urls": ["http://a:1"], "replicas": 2}, 400, "goes alone"),
            ("/admin/deployments/nope", {"replicas": 2}, 404, "no deployment named 'nope'"),
            ("/admin/services/nope/deployments/blue", {"replicas": 2}, 404, "no service named 'nope'"),
        ]
        for path, body, status, message in refusals:
            code, answer = await put(path, body)
            assert (code, answer["error_code"] is not None) == (status, True) and message in answer["message"], (body, answer)
        dep = (await store.read_snapshot()).deployments["blue"]
        assert (dep.replicas, dep.min_ready) == (5, 2), "no refused change wrote anything"
        entries = (await store.read_history())[0]
        assert [e.result for e in entries].count("applied") == 2, "no refused change applied"
        # Refusals the handler judged (not malformed bodies) are in the history, as refused switches are.
        refused = sorted(e.detail for e in entries if e.result == "refused")
        assert [d.split(":")[0].split(" (")[0] for d in refused] == [
            "deployment 'blue' is served by workers", "min_ready", "min_ready",
            "service 'default' has no deployment named 'nope'"], refused

        # min_ready null goes back to "all of them".
        code, view = await put("/admin/deployments/blue", {"min_ready": None})
        assert code == 200 and view["min_ready"] == 5, view
        # An external deployment is scaled by its URLs; replicas are refused for it.
        async with s.post(url + "/admin/deployments", json={"name": "ext", "urls": ["http://a:1", "http://b:2"]}) as resp:
            assert resp.status == 201
        code, answer = await put("/admin/deployments/ext", {"replicas": 3})
        assert code == 409 and "urls" in answer["message"], answer
        code, view = await put("/admin/deployments/ext", {"urls": ["http://a:1", "http://b:2", "http://c:3"]})
        assert code == 200 and view["desired_replicas"] == 3 and [r["url"] for r in view["replicas"]] == [
            "http://a:1", "http://b:2", "http://c:3"], view
        async with s.post(url + "/admin/deployments", json={"name": "x", "url": "http://a:1", "replicas": 2}) as resp:
            answer = await resp.json()
            assert resp.status == 400 and "replicas and min_ready are for a model_uri deployment" in answer["message"], answer
        async with s.post(url + "/admin/deployments", json={"name": "y", "model_uri": "models:/m/1", "replicas": 2,
                                                              "min_ready": 3}) as resp:
            assert resp.status == 400 and "cannot exceed" in (await resp.json())["message"]
    out = await loop.run_in_executor(None, lambda: cli("scale", "blue", "0"))
    assert out.returncode == 2 and "0 is not in the range 1<=x<=64" in out.stderr, out.stderr
    out = await loop.run_in_executor(None, lambda: cli("scale", "nope", "2"))
    assert out.returncode == 1 and "no deployment named 'nope'" in out.stderr + out.stdout, out.stderr


# --- what an independent tester broke ------------------------------------------------------------------
async def test_taking_a_lease_resets_what_the_last_owner_reported_in_the_same_step(any_store: Any) -> None:
    store = any_store
    await store.create_deployment(Deployment(name="blue", model_uri="models:/m/1", replicas=2))
    assert await store.claim("blue", "dead", 0.2, replica=1)
    assert await store.update_deployment("blue", owner="dead", replica=1, state=State.READY, url="http://gone:1")
    await asyncio.sleep(0.3)  # the dead worker's lease lapses
    taking = {"state": State.STARTING, "url": None, "worker": "alive", "reason": "taken"}
    assert await store.claim("blue", "alive", 30, replica=1, taking=taking)
    snapshot = await store.read_snapshot()
    member = snapshot.deployments["blue"].members[1]
    assert (member.state, member.url, member.worker) == (State.STARTING, None, "alive")
    assert snapshot.serving("blue") == (), "the gone server is never served once the lease is taken"
    # Renewing a lease one holds changes nothing.
    assert await store.update_deployment("blue", owner="alive", replica=1, state=State.READY, url="http://new:1")
    assert await store.claim("blue", "alive", 30, replica=1, taking=taking)
    assert (await store.read_snapshot()).serving("blue") == ("http://new:1",)


async def test_a_conditional_scale_never_loses_a_concurrent_one(any_store: Any) -> None:
    store = any_store
    await store.create_deployment(Deployment(name="blue", model_uri="models:/m/1", replicas=4, min_ready=1))
    read = {"replicas": 4, "min_ready": 1}
    assert await store.update_deployment("blue", expect=read, replicas=2, min_ready=1)
    assert await store.update_deployment("blue", expect=read, replicas=4, min_ready=3) is None, "it read 4 replicas"
    assert await store.update_deployment("gone", expect=read, replicas=2) is False
    dep = (await store.read_snapshot()).deployments["blue"]
    assert (dep.replicas, dep.min_ready) == (2, 1)
    assert await store.update_deployment("blue", expect={"replicas": 2, "min_ready": None}, min_ready=None) is None


async def test_a_heartbeat_renews_every_lease_while_a_server_is_slow_to_stop() -> None:
    from gateway.settings import Settings
    from workers.supervisor import Hosted, Worker

    store = EmbeddedStore()
    await store.create_deployment(Deployment(name="blue", model_uri="models:/m/1", replicas=2))
    worker = Worker(Settings(lease_ttl=5.0), store, worker_id="w1")
    stuck = asyncio.Event()

    class SlowToStop(Hosted):
        async def stop(self, reason: str) -> None:
            await stuck.wait()

    kept = Hosted(worker, "default", "blue", "models:/m/1", 0)
    gone = SlowToStop(worker, "default", "gone", "models:/m/1", 0)
    worker.hosted = {kept.unit: kept, gone.unit: gone}
    assert await store.claim("blue", "w1", 0.5)
    snapshots = {"default": await store.read_snapshot()}
    # 'gone' was deleted: its server stops in the background; blue's lease is renewed meanwhile.
    await asyncio.wait_for(worker._heartbeat(snapshots), 2)
    assert gone.unit not in worker.hosted and kept.unit in worker.hosted
    await asyncio.sleep(0.6)
    assert "blue" in (await store.read_snapshot()).live, "renewed for the lease TTL, not the half second"
    stuck.set()
    await asyncio.gather(*worker._drains)


async def test_a_rollback_needs_one_ready_replica_of_previous_not_all(gateway_factory: Any) -> None:
    store = EmbeddedStore()
    await store.create_deployment(Deployment(name="blue", model_uri="models:/m/1", replicas=2))
    await external(store, "green", ["http://127.0.0.1:1"])
    for index, url in ((0, "http://127.0.0.1:2"), (1, "http://127.0.0.1:3")):
        assert await store.claim("blue", "w", 30, replica=index)
        assert await store.update_deployment("blue", owner="w", replica=index, state=State.READY, url=url)
    await store.set_route("green", "blue")
    await store.update_deployment("blue", owner="w", replica=1, state=State.UNHEALTHY, reason="model server exited\nTraceback...")
    url = await gateway_factory(store, admin_token="t0ken-1")
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer t0ken-1"}) as s:
        async with s.post(url + "/admin/switch", json={"target": "blue"}) as resp:
            answer = await resp.json()
            assert resp.status == 409 and answer["message"].endswith(
                "1 of 2 replicas ready, 2 needed; replica 1 is unhealthy: model server exited; wait until it is ready or use force"
            ), answer
        async with s.post(url + "/admin/rollback", json={}) as resp:
            assert resp.status == 200, await resp.text()
    assert (await store.get_route()).active == "blue"

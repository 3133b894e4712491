"""Many services behind one gateway: each has its own route, traffic, guard and history, and nothing
done to one ever reaches another; the default service reads the previous release's keys as they are."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.records import Deployment, ServiceConfig, State
from gateway.store import RedisStore, Store
from tests.support import FAILURES, ROOT, SEEN, Load, backend_app, eventually, history, serve_app
from tests.test_guard import FAST_GUARD

ADMIN = {"X-Turnout-Actor": "tester"}

# A route's view without a canary split.
NO_SPLIT = {"candidate": None, "weight": None, "sticky_header": None}


@pytest.fixture
async def backends() -> AsyncIterator[dict[str, Any]]:
    """Four backends: blue and green of the default service, blue and green of loans (same names)."""
    apps = {key: backend_app(key) for key in ("blue", "green", "loans-blue", "loans-green")}
    async with serve_app(apps["blue"]) as a, serve_app(apps["green"]) as b, \
            serve_app(apps["loans-blue"]) as c, serve_app(apps["loans-green"]) as d:
        yield {"urls": dict(zip(apps, (a, b, c, d))), "apps": apps}


async def two_services(store: Store, backends: dict[str, Any]) -> None:
    """default and loans, each with blue (active) and green deployed."""
    urls = backends["urls"]
    assert await store.create_service("loans", ServiceConfig())
    for service, prefix in (("default", ""), ("loans", "loans-")):
        for name in ("blue", "green"):
            dep = Deployment(name=name, url=urls[prefix + name], state=State.READY, external=True)
            assert await store.create_deployment(dep, service=service)
        await store.set_route("blue", None, service=service)


async def admin(url: str, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.request(method, url + path, json=body, headers=ADMIN, **kwargs) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


async def metrics(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as resp:
        return await resp.text()


async def test_switching_one_service_leaves_the_other_untouched_real_redis(
    backends: dict[str, Any], gateway_factory: Any, redis_store_factory: Any
) -> None:
    store = redis_store_factory()
    await two_services(store, backends)
    urls = [await gateway_factory(redis_store_factory(), poll_interval=30.0) for _ in range(2)]
    default_before = await store.get_route()
    targets = [urls[0], urls[1], urls[0] + "/models/loans", urls[1] + "/models/loans"]
    async with Load(targets, rate=80) as load:
        await asyncio.sleep(0.5)
        status, body = await admin(urls[0], "POST", "/admin/services/loans/switch", {"target": "green"})
        assert status == 200, body
        assert body["route"]["generation"] == 2

        async def both_replicas_serve_loans_green() -> bool:
            recent = [r for r in load.results[-20:] if r.service == "loans"]
            return len(recent) >= 8 and all(r.deployment == "green" for r in recent)

        await eventually(both_replicas_serve_loans_green, timeout=5)
        status, body = await admin(urls[1], "POST", "/admin/services/loans/rollback", {"reason": "back"})
        assert status == 200 and body["route"]["active"] == "blue", body
        await asyncio.sleep(0.5)
    # Every default answer came from the default service's blue, at its first generation, on both replicas.
    default = [r for r in load.results if r.service == "default"]
    loans = [r for r in load.results if r.service == "loans"]
    assert len(default) > 40 and len(loans) > 40
    assert {(r.deployment, r.generation, r.status) for r in default} == {("blue", 1, 200)}
    assert {r.deployment for r in loans} == {"blue", "green"} and all(r.status == 200 for r in loans)
    assert await store.get_route() == default_before
    assert [e["action"] for e in await history(store)] == [], "the default service's history saw nothing"
    loans_history = [e.to_json() for e in (await store.read_history(0, 10, service="loans"))[0]]
    assert [e["action"] for e in loans_history] == ["rollback", "switch"]
    # Each backend only ever saw requests of its own service.
    apps = backends["apps"]
    assert apps["green"][SEEN] == [] and apps["loans-green"][SEEN] != []
    for url in urls:
        text = await metrics(url)
        assert 'turnout_route_generation{service="default"} 1.0' in text
        assert 'turnout_route_generation{service="loans"} 3.0' in text
        assert 'turnout_active_deployment{deployment="blue",service="loans"} 1.0' in text
        assert 'deployment="green",outcome="ok",service="default"' not in text


async def test_the_guard_rolls_back_one_service_only(backends: dict[str, Any], gateway_factory: Any,
                                                     redis_store_factory: Any) -> None:
    store = redis_store_factory()
    await two_services(store, backends)
    url = await gateway_factory(redis_store_factory(), **FAST_GUARD)
    # Both services run green, same name; loans' green fails 30%, default's green 2% (under 5%).
    backends["apps"]["loans-green"][FAILURES]["ratio"] = 0.3
    backends["apps"]["green"][FAILURES]["ratio"] = 0.02
    for prefix in ("", "/services/loans"):
        status, body = await admin(url, "POST", f"/admin{prefix}/switch", {"target": "green"})
        assert status == 200, body
    async with Load([url, url + "/models/loans"], rate=120) as load:
        async def loans_rolled_back() -> bool:
            return (await store.get_route(service="loans")).active == "blue"

        await eventually(loans_rolled_back, timeout=15)
        await asyncio.sleep(2.0)  # several more guard rounds over the default service's traffic
    assert (await store.get_route()).active == "green", "the default service was never judged on loans' failures"
    assert any(r.status != 200 and r.service == "default" for r in load.results), "default's green did fail, a little"
    assert not [e for e in await history(store) if e["action"] == "rollback"]
    loans = [e.to_json() for e in (await store.read_history(0, 20, service="loans"))[0]]
    rollback = next(e for e in loans if e["action"] == "rollback")
    assert rollback["trigger"] == "guard" and rollback["evidence"]["error_rate"] > 0.05
    assert (await store.get_guard(service="loans"))["latched"] and not (await store.get_guard()).get("latched")
    text = await metrics(url)
    assert 'turnout_rollbacks_total{service="loans",trigger="guard"} 1.0' in text
    assert 'turnout_guard_latched{service="default"} 0.0' in text and 'turnout_guard_latched{service="loans"} 1.0' in text


async def test_per_service_thresholds_override_the_gateway_s(backends: dict[str, Any], gateway_factory: Any) -> None:
    from gateway.store import EmbeddedStore

    store = EmbeddedStore()
    await two_services(store, backends)
    url = await gateway_factory(store, **FAST_GUARD)
    # loans tolerates up to 50% failures; the default service keeps the gateway's 5%.
    status, body = await admin(url, "POST", "/admin/services/loans/guard",
                               {"thresholds": {"error_rate": 0.5}, "reason": "noisy model"})
    assert status == 200 and body["overrides"] == {"error_rate": 0.5}, body
    status, body = await admin(url, "GET", "/admin/services/loans/state")
    assert body["guard"]["error_rate_threshold"] == 0.5 and body["guard"]["overrides"] == {"error_rate": 0.5}, body["guard"]
    for prefix in ("", "/services/loans"):
        assert (await admin(url, "POST", f"/admin{prefix}/switch", {"target": "green"}))[0] == 200
    for key in ("green", "loans-green"):
        backends["apps"][key][FAILURES]["ratio"] = 0.3
    async with Load([url, url + "/models/loans"], rate=120):
        async def default_rolled_back() -> bool:
            return (await store.get_route()).active == "blue"

        await eventually(default_rolled_back, timeout=15)
        await asyncio.sleep(1.5)
    assert (await store.get_route(service="loans")).active == "green"
    loans = [e.to_json() for e in (await store.read_history(0, 20, service="loans"))[0]]
    assert "guard_configure" in [e["action"] for e in loans] and not [e for e in loans if e["action"] == "rollback"]
    # null goes back to the gateway's threshold.
    status, body = await admin(url, "POST", "/admin/services/loans/guard", {"thresholds": {"error_rate": None}})
    assert status == 200 and body["overrides"] == {}, body


async def test_alertmanager_acts_on_the_service_its_alert_names(backends: dict[str, Any], gateway_factory: Any) -> None:
    from gateway.store import EmbeddedStore

    store = EmbeddedStore()
    await two_services(store, backends)
    url = await gateway_factory(store, guard_enabled=False)
    for prefix in ("", "/services/loans"):
        assert (await admin(url, "POST", f"/admin{prefix}/switch", {"target": "green"}))[0] == 200

    def payload(labels: dict[str, str], starts: str) -> dict[str, Any]:
        return {"version": "4", "status": "firing", "alerts": [{
            "status": "firing", "labels": {"alertname": "TurnoutActiveDeploymentFailing", "turnout_action": "rollback",
                                           "deployment": "green", **labels},
            "annotations": {"summary": "green fails"}, "startsAt": starts, "fingerprint": starts}]}

    status, body = await admin(url, "POST", "/admin/alerts", payload({"service": "loans"}, "2026-12-01T10:00:00Z"))
    assert status == 200 and body["results"][0]["action"] == "rolled_back", body
    assert (await store.get_route(service="loans")).active == "blue" and (await store.get_route()).active == "green"
    status, body = await admin(url, "POST", "/admin/alerts", payload({}, "2026-12-01T10:01:00Z"))
    assert body["results"][0]["action"] == "rolled_back", body
    assert (await store.get_route()).active == "blue"
    status, body = await admin(url, "POST", "/admin/alerts", payload({"service": "nope"}, "2026-12-01T10:02:00Z"))
    assert status == 200 and body["results"][0]["action"] == "refused" and "nope" in body["results"][0]["detail"], body


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "aiohttp"])
async def test_data_plane_per_service(backends: dict[str, Any], gateway_factory: Any, fast_path: bool) -> None:
    from gateway.store import EmbeddedStore

    store = EmbeddedStore()
    await two_services(store, backends)
    url = await gateway_factory(store, fast_path=fast_path)
    row = b'{"inputs": [[1, 2, 3, 4]]}'
    json_type = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        for path, service, backend in (
            ("/invocations", "default", "blue"),
            ("/deployments/green/invocations", "default", "green"),
            ("/models/default/invocations", "default", "blue"),
            ("/models/loans/invocations", "loans", "loans-blue"),
            ("/models/loans/deployments/green/invocations", "loans", "loans-green"),
        ):
            async with s.post(url + path, data=row, headers=json_type) as resp:
                assert resp.status == 200, (path, await resp.text())
                assert resp.headers["X-Turnout-Service"] == service and resp.headers["X-Backend"] == backend, path
        for path, why in (
            ("/models/nope/invocations", "no service named 'nope'"),
            ("/models/nope/deployments/blue/invocations", "no service named 'nope'"),
            ("/models/loans/deployments/nope/invocations", "no deployment named 'nope'"),
            ("/models/a%2Fb/invocations", "no service named"),
        ):
            async with s.post(url + path, data=row, headers=json_type) as resp:
                body = await resp.json()
                assert resp.status == 404 and body["error_code"] == "RESOURCE_DOES_NOT_EXIST", (path, body)
                assert why in body["message"], (path, body)
                if "service named" in why:
                    assert "default" in body["message"] and "loans" in body["message"], "it names the services that exist"
        async with s.get(url + "/models/loans/health") as resp:
            assert resp.status == 200 and (await resp.json())["service"] == "loans"
        async with s.get(url + "/models/nope/health") as resp:
            assert resp.status == 404 and "services: default, loans" in (await resp.json())["message"]
    await store.update_deployment("blue", service="loans", state=State.UNHEALTHY, reason="oom")
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/models/loans/health") as resp:
            assert resp.status == 503
        async with s.get(url + "/health") as resp:
            assert resp.status == 200, "the gateway is ready: one service's trouble is not the gateway's"
        async with s.post(url + "/invocations", data=row, headers=json_type) as resp:
            assert resp.status == 200


BAD_NAMES = ["", "x" * 64, "a/b", "a:b", "a{b}", "two words", "admin", "models", "services", "-lead", "é", "loans\n", "lo\nans"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
async def test_bad_service_names_are_refused_and_write_nothing(
    name: str, gateway_factory: Any, redis_store: RedisStore
) -> None:
    url = await gateway_factory(redis_store)
    before = sorted(await redis_store.client.keys(redis_store.keys.pattern))
    status, body = await admin(url, "POST", "/admin/services", {"name": name})
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", body
    assert "name" in body["message"], body
    assert sorted(await redis_store.client.keys(redis_store.keys.pattern)) == before
    assert await redis_store.list_services() == ["default"]


@pytest.mark.parametrize("name", ["a:b", "a{b}", "x" * 64, "admin"], ids=repr)
async def test_bad_service_names_in_paths(name: str, gateway_factory: Any) -> None:
    from urllib.parse import quote

    url = await gateway_factory()
    status, body = await admin(url, "GET", f"/admin/services/{quote(name, safe='')}/state")
    assert status == 400 and "invalid service name" in body["message"], body
    status, body = await admin(url, "POST", f"/admin/services/{quote(name, safe='')}/switch", {"target": "blue"})
    assert status == 400, body


async def test_service_lifecycle_real_redis(backends: dict[str, Any], gateway_factory: Any, redis_store: RedisStore) -> None:
    url = await gateway_factory(redis_store)
    status, body = await admin(url, "POST", "/admin/services", {"name": "loans", "guard": {"error_rate": 0.1}})
    assert status == 201 and body["name"] == "loans" and body["guard"]["overrides"] == {"error_rate": 0.1}, body
    assert (await admin(url, "POST", "/admin/services", {"name": "loans"}))[0] == 409
    status, body = await admin(url, "POST", "/admin/services/loans/deployments",
                               {"name": "blue", "url": backends["urls"]["loans-blue"]})
    assert status == 201, body
    assert (await admin(url, "POST", "/admin/services/loans/switch", {"target": "blue"}))[0] == 200
    status, body = await admin(url, "GET", "/admin/services")
    assert [(s["name"], s["route"]["active"], s["health"]) for s in body["services"]] == [
        ("default", None, "no route"), ("loans", "blue", "ready")]
    async with aiohttp.ClientSession() as s, s.post(url + "/models/loans/invocations", json={"inputs": [[1]]}) as resp:
        assert resp.status == 200
    status, body = await admin(url, "DELETE", "/admin/services/loans")
    assert status == 409 and "still has deployments" in body["message"], body
    assert (await admin(url, "DELETE", "/admin/services/default?force=true"))[0] == 409
    status, body = await admin(url, "DELETE", "/admin/services/loans?force=true&reason=retired")
    assert status == 200, body
    keys = await redis_store.client.keys(f"{redis_store.keys.namespace}:svc:loans:*")
    assert keys == [], "every key of the service went with it"
    async with aiohttp.ClientSession() as s, s.post(url + "/models/loans/invocations", json={"inputs": [[1]]}) as resp:
        assert resp.status == 404
    text = await metrics(url)  # its gauges go; its counters stay, so a rate over them never sees a drop
    assert 'turnout_route_generation{service="loans"}' not in text and 'turnout_active_deployment{deployment="blue",service="loans"}' not in text
    assert 'turnout_requests_total{code="200",deployment="blue",outcome="ok",service="loans"} 1.0' in text
    entries = await history(redis_store)
    assert entries[0]["action"] == "service_delete" and entries[0]["service"] == "loans" and entries[0]["reason"] == "retired"
    assert (await admin(url, "DELETE", "/admin/services/loans"))[0] == 404
    # A re-created service starts empty, at generation 0.
    assert (await admin(url, "POST", "/admin/services", {"name": "loans"}))[0] == 201
    status, body = await admin(url, "GET", "/admin/services/loans/state")
    assert body["route"] == {"active": None, "previous": None, "generation": 0, **NO_SPLIT} and body["deployments"] == []


async def test_the_previous_release_s_keys_are_read_as_they_are(
    gateway_factory: Any, redis_store: RedisStore, backends: dict[str, Any]
) -> None:
    """Keys written by the release before services (recorded through its own admin API, see
    tests/record_legacy_layout.py) serve as the default service: no migration, nothing rewritten."""
    recorded = json.loads((ROOT / "tests" / "fixtures" / "legacy_layout.json").read_text())["keys"]
    client, ns = redis_store.client, redis_store.keys.namespace
    for name, key in recorded.items():
        real = name.replace("{ns}", ns)
        value = key["value"]
        if key["type"] == "hash":
            if "url" in value:  # point the recorded deployments at live backends
                value = {**value, "url": backends["urls"][value["name"]]}
            await client.hset(real, mapping=value)
        elif key["type"] == "set":
            await client.sadd(real, *value)
        elif key["type"] == "list":
            await client.rpush(real, *value)
    url = await gateway_factory(redis_store, poll_interval=30.0)
    async with aiohttp.ClientSession() as s, s.post(url + "/invocations", json={"inputs": [[1]]}) as resp:
        assert resp.status == 200 and resp.headers["X-Turnout-Deployment"] == "green"
        assert resp.headers["X-Turnout-Generation"] == "4" and resp.headers["X-Turnout-Service"] == "default"
    status, body = await admin(url, "GET", "/admin/state")
    assert body["route"] == {"active": "green", "previous": "blue", "generation": 4, **NO_SPLIT}
    green = next(d for d in body["deployments"] if d["name"] == "green")
    assert green["mlflow"]["name"] == "iris" and green["state"] == "ready"
    assert body["guard"]["paused"] == "paused by recorder: maintenance"
    status, body = await admin(url, "GET", "/admin/history?limit=100")
    assert body["total"] == 10 and [e["action"] for e in body["entries"]][:3] == ["guard_pause", "undeploy", "switch"]
    assert body["entries"][3]["result"] == "refused" and body["entries"][-1]["to"] == "blue"
    # A change through the new gateway lands in the same keys, where an old replica would read it.
    status, body = await admin(url, "POST", "/admin/rollback", {"reason": "after the upgrade"})
    assert status == 200 and body["route"]["generation"] == 5
    assert await client.hgetall(f"{ns}:route") | {"changed_at": "x"} == {
        "active": "blue", "generation": "5", "changed_at": "x"}
    assert json.loads((await client.lrange(f"{ns}:history", 0, 0))[0])["action"] == "rollback"
    assert await client.keys(f"{ns}:svc:*") == [], "the default service wrote nothing new"
    # An old replica's change, announced the old way (no service in the message), is picked up at once.
    await client.hset(f"{ns}:route", mapping={"active": "green", "previous": "blue", "generation": "6"})
    await client.publish(f"{ns}:events", json.dumps({"kind": "route", "generation": 6}))

    async def green_again() -> bool:
        async with aiohttp.ClientSession() as s, s.post(url + "/invocations", json={"inputs": [[1]]}) as resp:
            return resp.headers.get("X-Turnout-Deployment") == "green"

    await eventually(green_again, timeout=3)


async def test_cli_services_and_the_service_option(backends: dict[str, Any], gateway_factory: Any) -> None:
    import subprocess

    from gateway.store import EmbeddedStore
    from tests.support import BIN, child_env

    store = EmbeddedStore()
    await two_services(store, backends)
    url = await gateway_factory(store, admin_token="t0ken")
    loop = asyncio.get_running_loop()

    async def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        environment = child_env(TURNOUT_URL=url, TURNOUT_ADMIN_TOKEN="t0ken", **env)
        return await loop.run_in_executor(None, lambda: subprocess.run(
            [str(BIN / "turnout"), *args], env=environment, capture_output=True, text=True, timeout=30))

    out = await cli("services")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["SERVICE", "ACTIVE", "PREVIOUS"]
    assert any(line.startswith("default (default)") and " blue " in line for line in lines), out.stdout
    assert any(line.startswith("loans") and " blue " in line for line in lines), out.stdout
    out = await cli("switch", "-s", "loans", "green", "--reason", "loans v2")
    assert out.returncode == 0 and "green is active (generation 2)" in out.stdout, out.stdout + out.stderr
    # Every command the CLI suggests names the service, so pasting it acts on the same one.
    assert "roll back with `turnout rollback -s loans`" in out.stdout, out.stdout
    out = await cli("deploy", "-s", "loans", "red", "models:/iris/1")
    assert "`turnout status -s loans`, then `turnout switch -s loans red`" in out.stdout, out.stdout + out.stderr
    out = await cli("undeploy", "-s", "loans", "red")
    assert "deleted red from service loans" in out.stdout, out.stdout + out.stderr
    assert (await store.get_route()).active == "blue" and (await store.get_route(service="loans")).active == "green"
    out = await cli("guard", "--error-rate", "0.2", TURNOUT_SERVICE="loans")
    assert out.returncode == 0, out.stderr
    assert (await store.read_snapshot(service="loans")).config.thresholds() == {"error_rate": 0.2}
    out = await cli("status", "--service", "loans")
    assert "active=green" in out.stdout and "error_rate=0.2" in out.stdout, out.stdout
    out = await cli("status", "-s", "nope")
    assert out.returncode == 1 and "no service named 'nope'" in out.stderr
    out = await cli("services", "create", "a:b")
    assert out.returncode == 1 and "invalid service name" in out.stderr
    out = await cli("services", "create", "fraud")
    assert out.returncode == 0 and "turnout deploy -s fraud" in out.stdout
    out = await cli("services", "delete", "loans")
    assert out.returncode == 1 and "still has deployments" in out.stderr
    out = await cli("services", "delete", "loans", "--force", "--reason", "retired")
    assert out.returncode == 0 and await store.list_services() == ["default", "fraud"]

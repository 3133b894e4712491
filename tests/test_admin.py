"""The admin API and the CLI: security, race-free switching, refusals recorded, registry sync."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.records import Deployment, State
from gateway.store import RedisStore
from gateway.store import EmbeddedStore, Store
from tests.support import backend_app, BIN, child_env, eventually, exchange, history, serve_app

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def add(store: Store, name: str, url: str, state: State = State.READY, **kw: Any) -> None:
    await store.create_deployment(Deployment(name=name, url=url, state=state, external=True, **kw))


@pytest.fixture
async def admin(gateway_factory: Any) -> AsyncIterator[dict[str, Any]]:
    """A gateway with a token, blue active and green deployed (both real backends)."""
    async with serve_app(backend_app("blue")) as blue, serve_app(backend_app("green")) as green:
        store = EmbeddedStore()
        await add(store, "blue", blue)
        await add(store, "green", green)
        await store.set_route("blue", None)
        url = await gateway_factory(store, admin_token=TOKEN)
        async with aiohttp.ClientSession(headers=AUTH) as session:
            yield {"url": url, "store": store, "s": session, "blue": blue, "green": green}


async def post(s: aiohttp.ClientSession, url: str, body: Any, **kw: Any) -> tuple[int, Any]:
    async with s.post(url, json=body, **kw) as resp:
        return resp.status, await resp.json()


MUTATIONS: list[tuple[str, str, Any]] = [
    ("POST", "/admin/switch", {"target": "green"}),
    ("POST", "/admin/rollback", {}),
    ("POST", "/admin/deployments", {"name": "red", "url": "http://127.0.0.1:1"}),
    ("DELETE", "/admin/deployments/green", None),
]


@pytest.mark.parametrize(("method", "path", "body"), MUTATIONS, ids=[m[1] + ":" + m[0] for m in MUTATIONS])
async def test_auth_matrix_on_every_mutating_route(admin: dict[str, Any], method: str, path: str, body: Any) -> None:
    url, store = admin["url"], admin["store"]
    before = (await store.read_snapshot(), (await store.read_history())[1])
    data = json.dumps(body).encode() if body is not None else None
    json_ct = {"Content-Type": "application/json"}
    cases = [
        ({**json_ct}, 401, "UNAUTHENTICATED"),
        ({**json_ct, "Authorization": "Bearer wrong"}, 401, "UNAUTHENTICATED"),
        ({**json_ct, "Authorization": f"Basic {TOKEN}"}, 401, "UNAUTHENTICATED"),
        ({**json_ct, **AUTH, "Origin": "https://evil.example"}, 403, "PERMISSION_DENIED"),
    ]
    if body is not None:
        cases.append(({"Content-Type": "text/plain", **AUTH}, 415, "BAD_REQUEST"))
    async with aiohttp.ClientSession() as s:
        for headers, status, code in cases:
            async with s.request(method, url + path, data=data, headers=headers) as resp:
                assert resp.status == status, (headers, await resp.text())
                assert (await resp.json())["error_code"] == code
                if status == 401:
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await store.read_snapshot(), (await store.read_history())[1]) == before, "a refused request changed state"
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url + path, data=data, headers={**json_ct, **AUTH}) as resp:
            assert resp.status in (200, 201, 409), await resp.text()


async def test_reads_need_the_token_too(admin: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/admin/state", "/admin/history", "/admin/deployments", "/admin/openapi.json"):
            async with s.get(admin["url"] + path) as resp:
                assert resp.status == 401


async def test_without_token_only_loopback_clients(gateway_factory: Any) -> None:
    url = await gateway_factory(EmbeddedStore())
    async with aiohttp.ClientSession() as s, s.get(url + "/admin/state") as resp:
        assert resp.status == 200, "loopback clients may use a token-less admin API"
    from gateway.http1 import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.1.2.3") and not is_loopback("::ffff:10.1.2.3") and not is_loopback(None)


async def test_a_token_that_is_not_utf8_is_refused_not_a_crash(admin: dict[str, Any]) -> None:
    raw = (b"GET /admin/state HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \xff\xfe\x80token\r\n"
           b"Connection: close\r\n\r\n")
    ((status, headers, body),) = await exchange(admin["url"], raw, 1, until_close=True)
    assert status == 401 and json.loads(body)["error_code"] == "UNAUTHENTICATED"
    assert headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("host", "status"),
    [("localhost", 200), ("localhost:8080", 200), ("127.0.0.1:1", 200), ("[::1]:8080", 200),
     ("evil.example", 403), ("evil.example:8080", 403), ("127.0.0.1.evil.example", 403), ("localhost.evil", 403)],
)
async def test_without_a_token_only_requests_addressed_to_localhost_are_answered(
    gateway_factory: Any, host: str, status: int
) -> None:
    """A web page that rebinds its own host name to 127.0.0.1 reaches a loopback listener, but its
    requests still name that host: the token-less admin API refuses them (reads included)."""
    url = await gateway_factory(EmbeddedStore())
    raw = f"GET /admin/state HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    ((got, _, body),) = await exchange(url, raw, 1, until_close=True)
    assert got == status, body
    if status == 403:
        assert "localhost" in json.loads(body)["message"]


async def test_the_admin_listener_serves_only_the_admin_api(gateway_factory: Any) -> None:
    from tests.support import free_port

    admin_port = free_port()
    url = await gateway_factory(EmbeddedStore(), admin_token=TOKEN, admin_port=admin_port)
    admin_url = f"http://127.0.0.1:{admin_port}"
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.get(admin_url + "/admin/state") as resp:
            assert resp.status == 200
        async with s.get(admin_url + "/ping") as resp:
            assert resp.status == 200
        for path, method in (("/invocations", "POST"), ("/metrics", "GET"), ("/health", "GET"),
                             ("/deployments/blue/invocations", "POST")):
            async with s.request(method, admin_url + path, json={}) as resp:
                assert resp.status == 404, path
                assert (await resp.json())["error_code"] == "ENDPOINT_NOT_FOUND"
        async with s.get(url + "/admin/state") as resp:
            assert resp.status == 404, "the data-plane port has no admin API when it has its own"


async def test_behind_a_trusted_proxy_the_forwarded_client_is_recorded(gateway_factory: Any) -> None:
    from gateway.http1 import client_address
    from ipaddress import ip_network

    trusted = [ip_network("10.0.0.0/8"), ip_network("127.0.0.1/32")]
    assert client_address("127.0.0.1", ["203.0.113.9"], trusted) == "203.0.113.9"
    assert client_address("127.0.0.1", ["127.0.0.1, 198.51.100.1, 10.1.1.1"], trusted) == "198.51.100.1"
    assert client_address("192.0.2.1", ["127.0.0.1"], trusted) == "192.0.2.1", "an untrusted peer's header proves nothing"
    assert client_address("127.0.0.1", [], trusted) == "127.0.0.1"
    assert client_address("127.0.0.1", ["10.2.2.2"], trusted) == "10.2.2.2"
    assert client_address("127.0.0.1", ["203.0.113.9"], []) == "127.0.0.1"

    async with serve_app(backend_app("blue")) as blue:
        store = EmbeddedStore()
        await add(store, "blue", blue)
        url = await gateway_factory(store, admin_token=TOKEN, trusted_proxies="127.0.0.1/32, ::1/128")
        async with aiohttp.ClientSession(headers=AUTH) as s:
            status, _ = await post(s, url + "/admin/switch", {"target": "blue"}, headers={"X-Forwarded-For": "203.0.113.9"})
            assert status == 200
            async with s.get(url + "/admin/history") as resp:
                entry = (await resp.json())["entries"][0]
    assert entry["client"] == "203.0.113.9"


def test_trusted_proxies_must_be_networks() -> None:
    from gateway.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="trusted_proxies"):
        Settings(trusted_proxies="10.0.0.0/8, not-a-network")


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"target": "green", "colour": "red"}', 400, "colour: Extra inputs are not permitted"),
        (b'{"target": 7}', 400, "target: Input should be a valid string"),
        (b'{"target": "green", "force": "yes"}', 400, "force: Input should be a valid boolean"),
        (b'{"target": "green", "expected_generation": -1}', 400, "expected_generation"),
        (b'{"target": "no such"}', 400, "target: invalid deployment name 'no such': use 1-63 letters"),
        # A trailing newline would end up inside the X-Turnout-Deployment response header.
        (b'{"target": "green\\n"}', 400, "target: invalid deployment name 'green\\n'"),
        (b'{"target": "nosuch"}', 404, "no deployment named 'nosuch'"),
        (b'{"target": "green", "reason": "' + b"x" * 70_000 + b'"}', 413, "limited to"),
        (b"[" * 30_000 + b"]" * 30_000, 400, "nested too deeply"),
        (b'{"target": "green", "target": "blue"}', 400, "malformed JSON: key 'target' appears more than once"),
    ],
)
async def test_bad_switch_bodies_get_precise_errors_and_change_nothing(
    admin: dict[str, Any], body: bytes, status: int, fragment: str
) -> None:
    store = admin["store"]
    before = await store.read_snapshot()
    async with admin["s"].post(admin["url"] + "/admin/switch", data=body, headers={"Content-Type": "application/json"}) as resp:
        answer = await resp.json()
        assert resp.status == status, answer
    assert fragment in answer["message"] and answer["error_code"]
    assert (await store.read_snapshot()).route == before.route


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("PUT", "/admin/switch", "POST"),
    ("GET", "/admin/rollback", "POST"),
    ("PATCH", "/admin/deployments/green", "DELETE, GET, HEAD, PUT"),
    ("POST", "/admin/services/default/history", "GET, HEAD"),
])
async def test_a_wrong_method_on_an_admin_path_gets_405_naming_the_right_ones(
    admin: dict[str, Any], method: str, path: str, allow: str
) -> None:
    async with admin["s"].request(method, admin["url"] + path, json={}) as resp:
        answer = await resp.json()
        assert (resp.status, resp.headers["Allow"]) == (405, allow), answer
    assert f"accepts {allow}, not {method}" in answer["message"]


async def test_an_admin_body_that_stops_arriving_gets_408_and_changes_nothing(gateway_factory: Any) -> None:
    store = EmbeddedStore()
    await add(store, "blue", "http://127.0.0.1:1")
    await add(store, "green", "http://127.0.0.1:1")
    url = await gateway_factory(store, admin_token=TOKEN, client_timeout=0.5)
    head = (f"POST /admin/switch HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 40\r\n\r\n{\"target\"").encode()
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"stopped arriving for 0.5 s" in answer
    assert (await store.read_snapshot()).route.active is None


async def test_switch_and_rollback_with_history(admin: dict[str, Any]) -> None:
    s, url = admin["s"], admin["url"]
    status, body = await post(s, url + "/admin/switch", {"target": "green", "reason": "v2 is better"},
                              headers={"X-Turnout-Actor": "alice"})
    assert status == 200 and body["route"] == {"active": "green", "previous": "blue", "generation": 2}
    await eventually(lambda: _serves(s, url, "green"), timeout=3)
    status, body = await post(s, url + "/admin/rollback", {"reason": "latency"})
    assert status == 200 and body["route"] == {"active": "blue", "previous": None, "generation": 3}
    status, body = await post(s, url + "/admin/rollback", {})
    assert status == 409 and "no previous deployment" in body["message"]
    async with s.get(url + "/admin/history?limit=2") as resp:
        page = await resp.json()
    assert page["total"] == 3 and page["next_offset"] == 2
    refused, rolled = page["entries"]
    assert refused["result"] == "refused" and refused["action"] == "rollback"
    assert rolled["action"] == "rollback" and rolled["from"] == "green" and rolled["to"] == "blue"
    assert rolled["generation"] == 3 and rolled["reason"] == "latency" and rolled["client"] == "127.0.0.1"
    async with s.get(url + "/admin/history?offset=2") as resp:
        (switched,) = (await resp.json())["entries"]
    assert switched["actor"] == "alice" and switched["from"] == "blue" and switched["to"] == "green"
    assert switched["result"] == "applied" and switched["trigger"] == "api"
    async with s.get(url + "/metrics") as resp:
        text = await resp.text()
    assert 'turnout_switches_total{service="default",trigger="api"} 2.0' in text and 'turnout_rollbacks_total{service="default",trigger="api"} 1.0' in text


async def _serves(s: aiohttp.ClientSession, url: str, name: str) -> bool:
    async with s.post(url + "/invocations", json={}) as resp:
        return resp.headers.get("X-Turnout-Deployment") == name


async def test_switch_to_starting_refused_then_accepted_forced_recorded(admin: dict[str, Any]) -> None:
    s, url, store = admin["s"], admin["url"], admin["store"]
    await store.update_deployment("green", state=State.STARTING, started_at=1.0)
    status, body = await post(s, url + "/admin/switch", {"target": "green"})
    assert status == 409 and "green is starting" in body["message"] and "wait until it is ready or use force" in body["message"]
    await store.update_deployment("green", state=State.READY)
    status, body = await post(s, url + "/admin/switch", {"target": "green"})
    assert status == 200
    await store.update_deployment("blue", state=State.FAILED, reason="oom")
    status, body = await post(s, url + "/admin/switch", {"target": "blue", "force": True, "reason": "drill"})
    assert status == 200 and body["route"]["active"] == "blue"
    entries = await history(store)
    assert entries[0]["forced"] is True and entries[0]["result"] == "applied"
    assert entries[2]["result"] == "refused" and entries[2]["state"] == "starting"


@pytest.mark.parametrize(("url", "fragment"), [
    ("http://127.0.0.1:99999", "bad port (1-65535)"),
    ("http://127.0.0.1:0", "bad port (1-65535)"),
    ("http://127.0.0.1:http", "bad port (1-65535)"),
    ("http://127.0.0.1:5000/?model=a", "no user, query or fragment"),
    ("https://127.0.0.1:5000", "not an http://host[:port][/path] URL"),
    ("http://127.0.0.1:5000,", "not an http://host[:port][/path] URL"),
])
async def test_a_deployment_url_the_gateway_could_not_reach_is_refused(admin: dict[str, Any], url: str, fragment: str) -> None:
    status, body = await post(admin["s"], admin["url"] + "/admin/deployments", {"name": "red", "url": url})
    assert status == 400 and fragment in body["message"], body
    assert "red" not in (await admin["store"].read_snapshot()).deployments


async def test_deploy_and_undeploy_rules(admin: dict[str, Any]) -> None:
    s, url = admin["s"], admin["url"]
    status, body = await post(s, url + "/admin/deployments", {"name": "red", "model_uri": "models:/iris/3"})
    assert status == 201 and body["state"] in ("starting", "unhealthy") and body["model_uri"] == "models:/iris/3"
    status, body = await post(s, url + "/admin/deployments", {"name": "red", "url": "http://127.0.0.1:9"})
    assert status == 409 and body["error_code"] == "RESOURCE_ALREADY_EXISTS"
    status, body = await post(s, url + "/admin/deployments", {"name": "red\n", "url": "http://127.0.0.1:9"})
    assert status == 400 and "invalid deployment name" in body["message"]
    status, body = await post(s, url + "/admin/deployments", {"name": "x", "url": "http://h:1", "model_uri": "models:/a/1"})
    assert status == 400 and "exactly one of model_uri, url and urls" in body["message"]
    await post(s, url + "/admin/switch", {"target": "green"})
    for name, fragment in (("green", "is the active deployment"), ("blue", "rollback target")):
        async with s.delete(url + f"/admin/deployments/{name}") as resp:
            assert resp.status == 409 and fragment in (await resp.json())["message"]
    async with s.delete(url + "/admin/deployments/blue?force=true&reason=cleanup") as resp:
        assert resp.status == 200
    async with s.get(url + "/admin/state") as resp:
        state = await resp.json()
    assert state["route"]["previous"] is None and {d["name"] for d in state["deployments"]} == {"green", "red"}
    async with s.delete(url + "/admin/deployments/nope") as resp:
        assert resp.status == 404


async def test_state_shows_route_deployments_and_traffic(admin: dict[str, Any]) -> None:
    s, url = admin["s"], admin["url"]
    for _ in range(5):
        async with s.post(url + "/invocations", json={}) as resp:
            assert resp.status == 200
    async with s.get(url + "/admin/state") as resp:
        state = await resp.json()
    assert state["route"] == {"active": "blue", "previous": None, "generation": 1, "candidate": None, "weight": None,
                              "sticky_header": None}
    blue = next(d for d in state["deployments"] if d["name"] == "blue")
    assert blue["role"] == "active" and blue["state"] == "ready" and blue["traffic"]["requests"] == 5
    assert blue["traffic"]["error_rate"] == 0 and blue["traffic"]["p99_seconds"] > 0


async def test_twenty_concurrent_switches_one_wins_real_redis(redis_store_factory: Any, gateway_factory: Any) -> None:
    store: RedisStore = redis_store_factory()
    async with serve_app(backend_app("blue")) as blue, serve_app(backend_app("green")) as green:
        await add(store, "blue", blue)
        await add(store, "green", green)
        await store.set_route("blue", None)
        # Two replicas take the calls, as two operators' scripts would hit two gateways.
        urls = [await gateway_factory(redis_store_factory(), admin_token=TOKEN) for _ in range(2)]
        async with aiohttp.ClientSession(headers=AUTH) as s:
            results = await asyncio.gather(*(
                post(s, urls[i % 2] + "/admin/switch",
                     {"target": "green", "expected_generation": 1, "reason": f"script {i}"})
                for i in range(20)
            ))
    statuses = sorted(status for status, _ in results)
    assert statuses.count(200) == 1 and statuses.count(409) == 19, statuses
    assert [b["applied"] for st, b in results if st == 200] == [True]
    entries = await history(store)
    total = len(entries)
    assert total == 20, "one applied switch and nineteen refused attempts, each recorded"
    assert sum(e["result"] == "applied" for e in entries) == 1
    refused_reasons = sorted(e["reason"] for e in entries if e["result"] == "refused")
    assert len(refused_reasons) == 19 and all(r.startswith("script ") for r in refused_reasons)


def run_cli(url: str, *args: str, token: str = TOKEN) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "turnout"), *args], env=child_env(TURNOUT_URL=url, TURNOUT_ADMIN_TOKEN=token),
        capture_output=True, text=True, timeout=30,
    )


async def test_cli_as_a_user_drives_it(admin: dict[str, Any]) -> None:
    url = admin["url"]
    loop = asyncio.get_running_loop()

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return await loop.run_in_executor(None, lambda: run_cli(url, *args))

    out = await cli("status")
    assert out.returncode == 0, out.stderr
    assert "route: active=blue" in out.stdout and "NAME" in out.stdout and "green" in out.stdout
    out = await cli("switch", "green", "--reason", "ship v2")
    assert out.returncode == 0 and "green is active (generation 2)" in out.stdout and "turnout rollback" in out.stdout
    out = await cli("switch", "blue", "--expect-generation", "1")
    assert out.returncode == 1 and "refused (409)" in out.stderr and "generation 2, not 1" in out.stderr
    out = await cli("rollback", "--reason", "p99 up")
    assert out.returncode == 0 and "blue is active" in out.stdout
    out = await cli("history", "--json")
    entries = json.loads(out.stdout)["entries"]
    assert [e["action"] for e in entries[:3]] == ["rollback", "switch", "switch"]
    assert entries[0]["reason"] == "p99 up" and "@" in entries[0]["actor"]
    out = await cli("history")
    assert "rollback" in out.stdout and "refused" in out.stdout
    out = await cli("status", "--json")
    assert json.loads(out.stdout)["route"]["active"] == "blue"
    out = await cli("deploy", "red", "models:/iris/1")
    assert out.returncode == 0 and "created red" in out.stdout
    out = await cli("undeploy", "blue")
    assert out.returncode == 1 and "is the active deployment" in out.stderr
    bad = await loop.run_in_executor(None, lambda: subprocess.run(
        [str(BIN / "turnout"), "status"], env=child_env(TURNOUT_URL=url, TURNOUT_ADMIN_TOKEN="nope"),
        capture_output=True, text=True, timeout=30))
    assert bad.returncode == 1 and "refused (401)" in bad.stderr
    gone = await loop.run_in_executor(None, lambda: run_cli("http://127.0.0.1:9", "status"))
    assert gone.returncode == 1 and "cannot reach the gateway" in gone.stderr
    typo = await loop.run_in_executor(None, lambda: run_cli("localhost:8080", "status"))
    assert typo.returncode == 1 and "must look like http://host:port" in typo.stderr and "Traceback" not in typo.stderr


async def test_the_replica_that_answers_a_change_serves_it_at_once(redis_store_factory: Any, gateway_factory: Any) -> None:
    """A prediction sent right after the admin API answered a switch goes to the new deployment on the
    same gateway, and right after the very first switch of a fresh stack it is not a 503."""
    store = redis_store_factory()
    async with serve_app(backend_app("blue")) as blue, serve_app(backend_app("green")) as green:
        await add(store, "blue", blue)
        await add(store, "green", green)
        url = await gateway_factory(store, admin_token=TOKEN, poll_interval=30.0)
        async with aiohttp.ClientSession(headers=AUTH) as s:
            for n, target in enumerate(["blue", "green"] * 15):
                status, _ = await post(s, url + "/admin/switch", {"target": target})
                assert status == 200
                async with s.post(url + "/invocations", json={}) as resp:
                    assert resp.status == 200, (n, await resp.text())
                    assert resp.headers["X-Turnout-Deployment"] == target, n


async def test_the_guard_view_right_after_a_switch_says_it_is_pending_not_stale(admin: dict[str, Any]) -> None:
    s, url = admin["s"], admin["url"]

    async def leading() -> bool:
        async with s.get(url + "/admin/guard") as resp:
            view = await resp.json()
        # Until this replica leads, its guard does not look at all and says so.
        return view["this_replica_decides"] or view["status"] != "standby"

    await eventually(leading, timeout=10)
    status, body = await post(s, url + "/admin/switch", {"target": "green"})
    assert status == 200
    generation = body["route"]["generation"]
    async with s.get(url + "/admin/guard") as resp:
        guard = await resp.json()
    # Before the guard's next look it must not report its view of the previous generation.
    assert (guard["status"], guard["generation"]) in {("pending", generation), ("armed", generation)}, guard

    async def judged() -> bool:
        async with s.get(url + "/admin/guard") as resp:
            view = await resp.json()
        return view["status"] == "armed" and view["active"] == "green" and view["generation"] == generation

    await eventually(judged, timeout=10)
    out = await asyncio.get_running_loop().run_in_executor(None, lambda: run_cli(url, "guard"))
    assert "None" not in out.stdout and "paused: -" in out.stdout, out.stdout

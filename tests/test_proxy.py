"""The data plane against real backends on real sockets."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.records import Deployment, State
from gateway.store import EmbeddedStore
from tests.support import (
    SEEN,
    answer,
    backend_app,
    eventually,
    free_port,
    raw_request,
    scripted_backend,
    serve_app,
)


async def add(store: EmbeddedStore, name: str, url: str, state: State = State.READY) -> None:
    await store.create_deployment(Deployment(name=name, url=url, state=state, external=True))


@pytest.fixture(params=["fast", "aiohttp"])
def gw(request: pytest.FixtureRequest, gateway_factory: Any) -> Any:
    """``gateway_factory`` on one request path: every test here runs with the fast path on and off."""

    async def start(store: Any, **settings: Any) -> str:
        return await gateway_factory(store, fast_path=request.param == "fast", **settings)

    return start


@pytest.fixture
async def backends() -> AsyncIterator[dict[str, Any]]:
    """Two backends, blue and green, each with a record of the requests it saw."""
    blue, green = backend_app("blue"), backend_app("green")
    async with serve_app(blue) as blue_url, serve_app(green) as green_url:
        yield {"blue": blue_url, "green": green_url, "blue_app": blue, "green_app": green}


@pytest.fixture
async def routed(backends: dict[str, Any], gw: Any) -> AsyncIterator[dict[str, Any]]:
    """A gateway on the embedded store with blue active and green deployed."""
    store = EmbeddedStore()
    await add(store, "blue", backends["blue"])
    await add(store, "green", backends["green"])
    await store.set_route("blue", None)
    url = await gw(store, read_timeout=0.5, max_body_bytes=200_000)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        await _wait_health(session, url)
        yield {"url": url, "store": store, "session": session, **backends}


async def _wait_health(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(200):
        async with session.get(url + "/health") as resp:
            if resp.status == 200:
                return
        await asyncio.sleep(0.02)
    raise AssertionError("gateway never became healthy")


async def _metrics(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/metrics") as resp:
        return await resp.text()


async def test_forwards_to_active_with_turnout_headers(routed: dict[str, Any]) -> None:
    s, url = routed["session"], routed["url"]
    async with s.post(url + "/invocations", json={"inputs": [[1, 2]]}) as resp:
        body = await resp.json()
        assert resp.status == 200
        assert resp.headers["X-Turnout-Deployment"] == "blue"
        assert resp.headers["X-Turnout-Generation"] == "1"
        assert resp.headers["X-Backend"] == "blue"
    assert body["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert body["headers"]["X-Forwarded-Proto"] == "http"
    assert body["headers"]["Host"] == routed["blue"].removeprefix("http://")


async def test_pinned_route_and_unknown_deployment(routed: dict[str, Any]) -> None:
    s, url = routed["session"], routed["url"]
    async with s.post(url + "/deployments/green/invocations", json={}) as resp:
        assert resp.status == 200 and resp.headers["X-Backend"] == "green"
        assert resp.headers["X-Turnout-Deployment"] == "green"
    async with s.post(url + "/deployments/nope/invocations", json={}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error_code"] == "RESOURCE_DOES_NOT_EXIST"


async def test_request_hop_by_hop_headers_are_stripped(routed: dict[str, Any]) -> None:
    body = b'{"inputs": [[1]]}'
    request = (
        b"POST /invocations?x=1 HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Connection: close, X-Hop-Named\r\nX-Hop-Named: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        b"Upgrade: h2c\r\nProxy-Authorization: Basic Zm9v\r\nProxy-Foo: bar\r\nX-Forwarded-For: 10.0.0.1\r\n"
        b"X-Keep: kept\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    head, raw = await raw_request(routed["url"], request)
    assert head.startswith(b"HTTP/1.1 200"), head
    seen = {k.lower(): v for k, v in json.loads(raw)["headers"].items()}
    for hop in ("x-hop-named", "keep-alive", "te", "upgrade", "proxy-authorization", "proxy-foo"):
        assert hop not in seen, hop
    assert "connection" not in seen, "HTTP/1.1 keep-alive needs no Connection header upstream"
    assert seen["x-keep"] == "kept"
    assert seen["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"


async def test_response_hop_by_hop_headers_are_stripped(gw: Any) -> None:
    payload = b'{"predictions": [1]}'
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive, X-Hop-Named\r\n"
        b"X-Hop-Named: secret\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nTrailer: X-T\r\n"
        b"Upgrade: h2c\r\nX-Model: kept\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
    )
    async with scripted_backend(lambda request, n: (response, None)) as (backend_url, received):
        store = EmbeddedStore()
        await add(store, "blue", backend_url)
        await store.set_route("blue", None)
        url = await gw(store)
        async with aiohttp.ClientSession() as s:
            await _wait_health(s, url)
            async with s.post(url + "/invocations", data=b"{}", headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 200
                assert await resp.read() == payload
                names = {k.lower() for k in resp.headers}
                assert resp.headers["X-Model"] == "kept"
    for hop in ("x-hop-named", "keep-alive", "proxy-authenticate", "trailer", "upgrade"):
        assert hop not in names, hop
    assert received and received[0].headers["x-forwarded-for"] == "127.0.0.1"


async def test_gzip_response_passes_byte_identical(routed: dict[str, Any]) -> None:
    s, url = routed["session"], routed["url"]
    async with s.post(routed["blue"] + "/invocations?mode=gzip", json={}) as direct:
        expected = await direct.read()
    async with s.post(url + "/invocations?mode=gzip", json={}) as resp:
        got = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip"
        assert int(resp.headers["Content-Length"]) == len(got)
    assert got == expected
    assert json.loads(gzip.decompress(got))["predictions"][:3] == [0, 1, 2]


async def test_gzip_request_body_is_not_touched(routed: dict[str, Any]) -> None:
    s, url = routed["session"], routed["url"]
    compressed = gzip.compress(b'{"inputs": [[1, 2, 3]]}')
    async with s.post(url + "/invocations", data=compressed, headers={"Content-Encoding": "gzip"}) as resp:
        body = await resp.json()
    import hashlib

    assert body["length"] == len(compressed)
    assert body["sha256"] == hashlib.sha256(compressed).hexdigest()
    assert body["headers"]["Content-Encoding"] == "gzip"


async def test_streamed_bodies_both_ways(routed: dict[str, Any]) -> None:
    """A chunked upload and a chunked download larger than the small-body threshold pass intact."""
    s, url = routed["session"], routed["url"]
    routed["store"]  # noqa: B018 - the fixture sets max_body_bytes=200_000

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(15):
            yield b"a" * 10_000

    async with s.post(url + "/invocations", data=chunks()) as resp:
        body = await resp.json()
        assert resp.status == 200
    assert body["length"] == 150_000
    assert body["headers"].get("Transfer-Encoding") == "chunked"
    async with s.post(url + "/invocations?mode=big&size=3000000", data=b"{}") as resp:
        data = await resp.read()
    assert len(data) == 3_000_000 and set(data) == {ord("z")}


async def test_413_for_declared_and_for_streamed_oversize_bodies(routed: dict[str, Any]) -> None:
    s, url = routed["session"], routed["url"]
    blue_seen = routed["blue_app"][SEEN]
    before = len(blue_seen)
    async with s.post(url + "/invocations", data=b"x" * 200_001) as resp:
        assert resp.status == 413
        assert (await resp.json())["error_code"] == "RESOURCE_EXHAUSTED"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(30):
            yield b"b" * 10_000

    async with s.post(url + "/invocations", data=chunks()) as resp:
        assert resp.status == 413
        assert "200000 bytes" in (await resp.json())["message"]
    await asyncio.sleep(0.1)
    assert len(blue_seen) == before, "the backend must never see a complete oversize request"


async def test_502_when_upstream_refuses(gw: Any) -> None:
    store = EmbeddedStore()
    await add(store, "gone", f"http://127.0.0.1:{free_port()}")
    await store.set_route("gone", None)
    url = await gw(store)
    async with aiohttp.ClientSession() as s:
        await _wait_health(s, url)
        async with s.post(url + "/invocations", json={}) as resp:
            assert resp.status == 502
            error = await resp.json()
            assert error["error_code"] == "TEMPORARILY_UNAVAILABLE" and "refused" in error["message"]
            assert resp.headers["X-Turnout-Deployment"] == "gone"
        text = await _metrics(s, url)
    assert 'turnout_upstream_errors_total{deployment="gone",kind="connect_refused",service="default"} 1.0' in text
    assert 'turnout_requests_total{code="502",deployment="gone",outcome="upstream_error",service="default"} 1.0' in text


async def test_502_when_upstream_resets(routed: dict[str, Any]) -> None:
    s, url = routed["session"], routed["url"]
    async with s.post(url + "/invocations?mode=abort", json={}) as resp:
        assert resp.status == 502
    assert 'kind="reset"' in await _metrics(s, url)


async def test_504_when_upstream_is_too_slow(routed: dict[str, Any]) -> None:
    s, url = routed["session"], routed["url"]
    async with s.post(url + "/invocations?mode=slow&delay=2", json={}) as resp:
        assert resp.status == 504
        assert (await resp.json())["error_code"] == "DEADLINE_EXCEEDED"
    assert 'kind="read_timeout"' in await _metrics(s, url)


async def test_503_when_active_not_ready_or_no_route(gw: Any, backends: dict[str, Any]) -> None:
    store = EmbeddedStore()
    url = await gw(store)
    async with aiohttp.ClientSession() as s:
        await asyncio.sleep(0.1)
        async with s.post(url + "/invocations", json={}) as resp:
            assert resp.status == 503
            assert "no deployment is active" in (await resp.json())["message"]
        async with s.get(url + "/health") as resp:
            assert resp.status == 503
        await add(store, "blue", backends["blue"], state=State.STARTING)
        await store.set_route("blue", None)

        async def starting() -> bool:
            async with s.post(url + "/invocations", json={}) as resp:
                return resp.status == 503 and "is starting" in (await resp.json())["message"]

        await eventually(starting, timeout=5)
        await store.update_deployment("blue", state=State.READY)
        await _wait_health(s, url)
        async with s.post(url + "/invocations", json={}) as resp:
            assert resp.status == 200


async def test_model_and_client_errors_are_told_apart(routed: dict[str, Any]) -> None:
    s, url = routed["session"], routed["url"]
    for mode in ("crash", "status&code=500", "status&code=400", "status&code=415"):
        async with s.post(url + f"/invocations?mode={mode}", json={}) as resp:
            assert resp.status in (400, 415, 500)
    text = await _metrics(s, url)
    assert 'turnout_requests_total{code="400",deployment="blue",outcome="model_error",service="default"} 1.0' in text
    assert 'turnout_requests_total{code="500",deployment="blue",outcome="model_error",service="default"} 1.0' in text
    assert 'turnout_requests_total{code="400",deployment="blue",outcome="client_error",service="default"} 1.0' in text
    assert 'turnout_requests_total{code="415",deployment="blue",outcome="client_error",service="default"} 1.0' in text


async def test_inflight_request_finishes_on_old_deployment(routed: dict[str, Any]) -> None:
    s, url, store = routed["session"], routed["url"], routed["store"]

    async def slow() -> tuple[int, str, str]:
        async with s.post(url + "/invocations?mode=slow&delay=0.3", json={}) as resp:
            return resp.status, resp.headers["X-Backend"], resp.headers["X-Turnout-Generation"]

    task = asyncio.create_task(slow())
    await asyncio.sleep(0.1)
    await store.set_route("green", "blue")
    await asyncio.sleep(0.05)
    async with s.post(url + "/invocations", json={}) as resp:
        assert resp.headers["X-Backend"] == "green" and resp.headers["X-Turnout-Generation"] == "2"
    assert await task == (200, "blue", "1")


async def test_client_disconnect_is_not_an_upstream_failure(routed: dict[str, Any]) -> None:
    s, url = routed["session"], routed["url"]
    with pytest.raises(asyncio.TimeoutError):
        async with aiohttp.ClientSession() as impatient:
            await impatient.post(url + "/invocations?mode=slow&delay=0.4", json={}, timeout=aiohttp.ClientTimeout(total=0.1))
    await asyncio.sleep(0.5)
    text = await _metrics(s, url)
    assert "turnout_upstream_errors_total{" not in text
    assert 'outcome="upstream_error"' not in text
    assert 'turnout_inflight_requests{deployment="blue",service="default"} 0.0' in text


async def test_a_request_the_upstream_received_is_never_sent_twice(gw: Any) -> None:
    """The model server takes a request on a kept-alive connection and closes it without answering: it
    may have run the prediction, so the gateway answers 502 and does not send it again (a POST is not
    replayable once written); the next request gets a fresh connection."""

    def close_second(request: Any, n: int) -> tuple[bytes, float | None]:
        if (request.connection, request.on_connection) == (1, 2):
            return b"", 0.0
        return answer(200, request.id.encode()), None

    async with scripted_backend(close_second) as (backend, seen):
        store = EmbeddedStore()
        await add(store, "blue", backend)
        await store.set_route("blue", None)
        url = await gw(store, upstream_keepalive=30)
        async with aiohttp.ClientSession() as s:
            await _wait_health(s, url)
            statuses = []
            for n in range(3):
                async with s.post(url + "/invocations", data=b"{}", headers={"X-Id": f"r{n}"}) as resp:
                    statuses.append((resp.status, await resp.read()))
    assert statuses[0] == (200, b"r0") and statuses[2] == (200, b"r2")
    assert statuses[1][0] == 502 and b"upstream closed the connection" in statuses[1][1]
    assert [(r.id, r.connection) for r in seen] == [("r0", 1), ("r1", 1), ("r2", 2)]


async def test_own_endpoints(routed: dict[str, Any]) -> None:
    s, url = routed["session"], routed["url"]
    async with s.get(url + "/ping") as resp:
        assert resp.status == 200
    async with s.get(url + "/health") as resp:
        assert (await resp.json()) == {"status": "ready", "active": "blue", "generation": 1}
    async with s.get(url + "/version") as resp:
        assert resp.status == 200 and (await resp.text())
    async with s.get(url + "/invocations") as resp:
        assert resp.status == 405
        assert (await resp.json())["error_code"] == "ENDPOINT_NOT_FOUND"
    async with s.get(url + "/nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["error_code"] == "ENDPOINT_NOT_FOUND"


async def test_a_reused_connection_times_out_on_its_own_deadline_not_an_earlier_longer_one() -> None:
    """The upstream read timer is armed lazily; a shorter deadline on a reused connection must still fire."""
    from gateway.upstream import Timeouts, UpstreamError, UpstreamPool

    async with serve_app(backend_app("blue")) as url:
        host, port = url.removeprefix("http://").split(":")
        pool = UpstreamPool(Timeouts(read=30.0, total=60.0), keepalive=30.0)
        await pool.start()
        try:
            head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
            first = await pool.request(host, int(port), head, b"{}")
            await first.read()
            first.release()  # the connection goes back with a timer armed ~30 s out
            pool.timeouts = Timeouts(read=0.3, total=60.0)
            slow = b"POST /invocations?mode=slow&delay=5 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(UpstreamError) as caught:
                await pool.request(host, int(port), slow, b"{}")
            assert caught.value.kind == "read_timeout"
            assert loop.time() - started < 3, "the 0.3 s deadline fired, not the 30 s one armed earlier"
        finally:
            await pool.close()


class _FakeTransport:
    """Records what the upstream client asks of its socket."""

    def __init__(self) -> None:
        self.paused = False
        self.closed = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:
        pass


async def test_a_connection_paused_for_a_client_that_vanished_is_pooled_reading_again() -> None:
    """A large answer completing in the read that pauses the socket, then the client vanishes: the
    connection goes back to the pool, and must read the next answer (else that client waits for a 504)."""
    from gateway.upstream import Timeouts, UpstreamPool, UpstreamResponse, _Connection

    loop = asyncio.get_running_loop()
    pool = UpstreamPool(Timeouts(), keepalive=30.0)
    await pool.start()
    key = ("127.0.0.1", 1)
    pool._slots[key] = asyncio.Semaphore(1)
    await pool._slots[key].acquire()
    conn = _Connection(loop)
    transport = _FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    body = b"z" * 300_000
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert conn.complete and transport.paused, "the body outgrew the read buffer in the read that completed it"
    UpstreamResponse(conn, pool, key, loop.time() + 60).release()  # unread: the client went away
    try:
        assert pool._take_idle(key) is conn, "a complete, framed answer leaves the connection reusable"
        assert not transport.paused, "a pooled connection reads"
    finally:
        await pool.close()

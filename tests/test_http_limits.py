"""The data plane's safety rules, over both request paths (fast path on, and aiohttp only), against
clients and model servers that misbehave: no answer ever reaches the wrong client, every wait on a
peer has a deadline, and hostile heads are bounded."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from gateway.app import POOL
from gateway.records import Deployment, State
from gateway.store import EmbeddedStore
from tests.support import (
    SEEN, RawConnection, answer, backend_app, eventually, exchange, post, scripted_backend, serve_app,
)

PATHS = ["fast", "aiohttp"]


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> str:
    """Which request path the gateway under test relays on."""
    return str(request.param)


@pytest.fixture
def gateway_to(gateway_factory: Any, path: str) -> Callable[..., Any]:
    """``url = await gateway_to(backend_url, **settings)``: a gateway on ``path`` with one ready deployment."""

    async def start(backend: str, **settings: Any) -> str:
        store = EmbeddedStore()
        await store.create_deployment(Deployment(name="blue", url=backend, state=State.READY, external=True))
        await store.set_route("blue", None)
        url = await gateway_factory(store, fast_path=path == "fast", **settings)

        async def healthy() -> bool:
            async with aiohttp.ClientSession() as s, s.get(url + "/health") as resp:
                return resp.status == 200

        await eventually(healthy, timeout=5)
        start.gateway = gateway_factory.gateways[-1]  # type: ignore[attr-defined]
        return url

    return start


@pytest.fixture
async def echo_backend() -> AsyncIterator[str]:
    """The test backend (modes: echo, slow, big, status, ...)."""
    async with serve_app(backend_app("blue")) as url:
        yield url


def echo_id(request: Any, n: int) -> tuple[bytes, float | None]:
    """Script: answer 200 with the client's X-Id as the body."""
    return answer(200, request.id.encode(), "Content-Type: text/plain"), None


async def metrics(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as resp:
        return await resp.text()


# --- 1xx and stale bytes: an answer never reaches the wrong client --------------------------------

async def test_clients_with_expect_100_continue_each_get_their_own_answer(gateway_to: Any) -> None:
    def interim_first(request: Any, n: int) -> tuple[bytes, float | None]:
        interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n"
        return answer(200, request.id.encode(), interim=interim), None

    async with scripted_backend(interim_first) as (backend, seen):
        # One upstream connection: every client below goes through the same pooled connection.
        url = await gateway_to(backend, upstream_max_connections=1)
        a = await RawConnection.open(url)
        body = b'{"inputs": [[1, 2]]}'
        a.send(post("/invocations", b"", "Expect: 100-continue", "X-Id: client-a").replace(
            b"Content-Length: 0", b"Content-Length: %d" % len(body)))
        (interim,) = await a.responses(1)
        assert interim[0] == 100, "the gateway answers Expect itself"
        a.send(body)
        final = (await a.responses(2))[1]
        assert (final[0], final[2]) == (200, b"client-a")
        for client in ("client-b", "client-c"):
            (got,) = await exchange(url, post("/invocations", b"{}", f"X-Id: {client}"), 1)
            assert (got[0], got[2]) == (200, client.encode()), got
        a.send(post("/invocations", b"{}", "X-Id: client-a-again"))
        again = (await a.responses(3))[2]
        assert again[2] == b"client-a-again"
        a.close()
    assert [r.id for r in seen] == ["client-a", "client-b", "client-c", "client-a-again"]
    assert all("expect" not in r.headers for r in seen), "Expect is never forwarded"


async def test_bytes_a_model_server_sends_unasked_never_reach_the_next_client(gateway_to: Any) -> None:
    stale = answer(200, b"STALE")

    def with_trailing_garbage(request: Any, n: int) -> tuple[bytes, float | None]:
        # A broken server that answers twice: the second answer arrives while the connection is idle.
        return answer(200, request.id.encode()) + (stale if n == 1 else b""), None

    async with scripted_backend(with_trailing_garbage) as (backend, _):
        url = await gateway_to(backend, upstream_max_connections=1)
        (first,) = await exchange(url, post("/invocations", b"{}", "X-Id: one"), 1)
        assert first[2] == b"one"
        await asyncio.sleep(0.1)
        for client in ("two", "three"):
            (got,) = await exchange(url, post("/invocations", b"{}", f"X-Id: {client}"), 1)
            assert (got[0], got[2]) == (200, client.encode()), got


@pytest.mark.parametrize("head", [
    "x-filler: " + "a" * 100_000,
    "\r\n".join(f"x-h{i}: v" for i in range(300)),
], ids=["huge-head", "too-many-headers"])
async def test_a_model_server_with_an_endless_response_head_gets_a_502(gateway_to: Any, head: str) -> None:
    def endless(request: Any, n: int) -> tuple[bytes, float | None]:
        if request.id == "bad":
            return answer(200, b"late", head), None
        return answer(200, request.id.encode()), None

    async with scripted_backend(endless) as (backend, _):
        url = await gateway_to(backend, upstream_max_connections=1)
        (bad,) = await exchange(url, post("/invocations", b"{}", "X-Id: bad"), 1)
        assert bad[0] == 502 and b"upstream response" in bad[2], bad
        (good,) = await exchange(url, post("/invocations", b"{}", "X-Id: good"), 1)
        assert (good[0], good[2]) == (200, b"good"), good


async def test_a_small_answer_broken_off_before_the_client_saw_it_gets_a_json_502(gateway_to: Any) -> None:
    def broken(request: Any, n: int) -> tuple[bytes, float | None]:
        if request.id == "broken":
            # Promises 100 bytes, sends 14, closes: nothing has reached the client yet.
            return b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"predictions"', 0.05
        return answer(200, request.id.encode()), None

    async with scripted_backend(broken) as (backend, _):
        url = await gateway_to(backend)
        client = await RawConnection.open(url)
        try:
            client.send(post("/invocations", b"{}", "X-Id: broken"))
            (got,) = await client.responses(1)
            assert got[0] == 502 and json.loads(got[2])["error_code"] == "TEMPORARILY_UNAVAILABLE", got
            # The client's own connection is intact: its next request is served on it.
            client.send(post("/invocations", b"{}", "X-Id: next"))
            _, got = await client.responses(2)
            assert (got[0], got[2]) == (200, b"next"), got
        finally:
            client.close()
        assert 'turnout_upstream_errors_total{deployment="blue",kind="reset",service="default"} 1.0' in await metrics(url)


async def test_a_deployment_record_with_an_unusable_url_gets_a_502_not_a_crash(gateway_to: Any) -> None:
    # Written around the admin API's checks (by hand, or by another release): the gateway still answers.
    url = await gateway_to("http://127.0.0.1:99999")
    for _ in range(2):
        (got,) = await exchange(url, post("/invocations", b"{}"), 1)
        assert got[0] == 502 and b"bad port" in got[2], got


async def test_a_streamed_body_right_after_a_500_that_closed_the_connection_succeeds(gateway_to: Any) -> None:
    def like_uvicorn(request: Any, n: int) -> tuple[bytes, float | None]:
        if request.id == "crash":
            # uvicorn's answer to an unhandled exception: a 500 without Connection: close, then it closes.
            return answer(500, b"Internal Server Error", "content-type: text/plain; charset=utf-8"), 0.3
        return answer(200, request.id.encode() + b":%d" % len(request.body)), None

    async with scripted_backend(like_uvicorn) as (backend, _):
        url = await gateway_to(backend)
        for attempt in range(5):
            (crashed,) = await exchange(url, post("/invocations", b"{}", "X-Id: crash"), 1)
            assert crashed[0] == 500
            chunked = (b"POST /invocations HTTP/1.1\r\nHost: gw\r\nX-Id: after\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            (got,) = await exchange(url, chunked, 1)
            assert (got[0], got[2]) == (200, b"after:11"), (attempt, got)
            big = post("/invocations", b"x" * 100_000, "X-Id: big")
            (got,) = await exchange(url, big, 1)
            assert (got[0], got[2]) == (200, b"big:100000"), (attempt, got)
            # A small one right after the 500, with no pause: the 500's connection is never reused.
            (crashed,) = await exchange(url, post("/invocations", b"{}", "X-Id: crash"), 1)
            (got,) = await exchange(url, post("/invocations", b"{}", "X-Id: small"), 1)
            assert (crashed[0], got[0], got[2]) == (500, 200, b"small:2"), (attempt, got)


async def test_a_prediction_without_content_type_is_refused_not_forwarded(gateway_to: Any) -> None:
    async with scripted_backend(echo_id) as (backend, seen):
        url = await gateway_to(backend)
        untyped = b"POST /invocations HTTP/1.1\r\nHost: gw\r\nX-Id: untyped\r\nContent-Length: 2\r\n\r\n{}"
        pinned = untyped.replace(b"/invocations", b"/deployments/blue/invocations")
        answers = await exchange(url, untyped + pinned + post("/invocations", b"{}", "X-Id: typed"), 3)
        assert [a[0] for a in answers] == [415, 415, 200]
        assert "Content-Type" in json.loads(answers[0][2])["message"]
        assert 'turnout_bad_requests_total{reason="missing_content_type"} 2.0' in await metrics(url)
    assert [r.id for r in seen] == ["typed"]


# --- deadlines on every wait ---------------------------------------------------------------------

async def test_stalled_clients_cannot_starve_the_others(gateway_to: Any, echo_backend: str) -> None:
    url = await gateway_to(echo_backend, upstream_max_connections=2, upstream_pool_timeout=0.3, client_timeout=1.5)
    pool = gateway_to.gateway.app[POOL]
    stalled = []
    for _ in range(2):
        conn = await RawConnection.open(url)
        conn.send(b"POST /invocations HTTP/1.1\r\nHost: gw\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        stalled.append(conn)
    await eventually(lambda: pool.open_connections() == 2, timeout=5)
    (refused,) = await exchange(url, post("/invocations", b"{}"), 1)
    assert refused[0] == 503, refused
    assert json.loads(refused[2])["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert "capacity" in json.loads(refused[2])["message"]
    for conn in stalled:
        # The stalled clients are dropped with a 408 once their body stops for the client timeout.
        answers = await conn.until_closed(timeout=10)
        assert [status for status, _, _ in answers] == [408]
        conn.close()
    (served,) = await exchange(url, post("/invocations", b"{}"), 1)
    assert served[0] == 200
    text = await metrics(url)
    assert 'outcome="overloaded"' in text and 'code="503"' in text
    assert 'turnout_bad_requests_total{reason="body_timeout"} 2.0' in text


async def test_requests_waiting_for_a_pool_slot_get_the_connections_that_come_free(gateway_to: Any, echo_backend: str) -> None:
    # Five times more concurrent requests than connections, to a fast model server: each waits far less
    # than the pool timeout, so none may be refused while connections keep coming free.
    url = await gateway_to(echo_backend, upstream_max_connections=4, upstream_pool_timeout=0.5)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=20)) as session:
        async def one(i: int) -> int:
            async with session.post(url + "/invocations", data=b"{}", headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(400)))
    assert set(statuses) == {200}, sorted(set(statuses))


async def test_a_client_that_stops_reading_its_answer_releases_the_model_server(gateway_to: Any, echo_backend: str) -> None:
    url = await gateway_to(echo_backend, upstream_max_connections=1, upstream_pool_timeout=0.2, client_timeout=1.0)
    reader = await RawConnection.open(url)
    reader.send(post("/invocations?mode=big&size=50000000", b"{}"))  # and never reads

    async def others_served() -> bool:
        (got,) = await exchange(url, post("/invocations", b"{}"), 1)
        return got[0] == 200

    await eventually(others_served, timeout=15, interval=0.3)
    reader.close()


async def test_a_trickling_head_is_refused_at_the_header_timeout(gateway_to: Any, echo_backend: str) -> None:
    url = await gateway_to(echo_backend, header_timeout=0.5)
    conn = await RawConnection.open(url)

    async def trickle() -> None:
        conn.send(b"POST /invocations HTTP/1.1\r\nHost: gw\r\n")
        for _ in range(600):  # a minute of one byte every 0.1 s, never finishing the head
            conn.send(b"X")
            await asyncio.sleep(0.1)

    task = asyncio.create_task(trickle())
    try:
        answers = await conn.until_closed(timeout=10)
    finally:
        task.cancel()
    assert [status for status, _, _ in answers] == [408]
    assert json.loads(answers[0][2])["error_code"] == "DEADLINE_EXCEEDED"
    assert 'turnout_bad_requests_total{reason="header_timeout"} 1.0' in await metrics(url)


@pytest.mark.parametrize("spacing", [b": ", b":", b":   "], ids=["usual", "no-space", "extra-spaces"])
async def test_a_head_begun_behind_a_complete_request_in_one_read_has_the_header_timeout(
    gateway_to: Any, echo_backend: str, spacing: bytes
) -> None:
    url = await gateway_to(echo_backend, header_timeout=0.5)
    first = (b"POST /invocations HTTP/1.1\r\nHost" + spacing + b"gw\r\nContent-Type" + spacing
             + b"application/json\r\nContent-Length" + spacing + b"2\r\n\r\n{}")
    conn = await RawConnection.open(url)
    try:
        conn.send(first + post("/invocations", b"{}")[:30])  # one write: the second head never finishes
        answers = await conn.until_closed(timeout=10)
    finally:
        conn.close()
    assert [status for status, _, _ in answers] == [200, 408], answers


async def test_a_pipelined_pair_in_one_read_leaves_no_head_timer_behind(gateway_to: Any, echo_backend: str) -> None:
    url = await gateway_to(echo_backend, header_timeout=0.3)
    conn = await RawConnection.open(url)
    try:
        conn.send(post("/invocations", b"{}") * 2)
        assert [status for status, _, _ in await conn.responses(2)] == [200, 200]
        # Idle, between requests: only the keep-alive timeout may close it, never a 408.
        assert await conn.stays_open(1.0)
    finally:
        conn.close()


async def test_a_connection_that_never_speaks_is_closed(gateway_to: Any, echo_backend: str) -> None:
    url = await gateway_to(echo_backend, header_timeout=0.5)
    conn = await RawConnection.open(url)
    assert await conn.until_closed(timeout=10) == []


async def test_a_small_body_that_stops_arriving_gets_408(gateway_to: Any, echo_backend: str) -> None:
    url = await gateway_to(echo_backend, client_timeout=0.5)
    conn = await RawConnection.open(url)
    conn.send(post("/invocations", b"x" * 100)[:-90])  # the head and 10 of 100 bytes
    answers = await conn.until_closed(timeout=10)
    assert [status for status, _, _ in answers] == [408]


async def test_idle_keep_alive_connections_are_closed_busy_ones_are_not(gateway_to: Any, echo_backend: str) -> None:
    url = await gateway_to(echo_backend, keepalive_timeout=0.5)
    idle = await RawConnection.open(url)
    idle.send(post("/invocations", b"{}"))
    await idle.responses(1)
    busy = asyncio.create_task(exchange(url, post("/invocations?mode=slow&delay=3", b"{}"), 1))
    assert await idle.until_closed(timeout=10)
    assert not busy.done()
    ((status, _, _),) = await busy
    assert status == 200


# --- bounded heads, malformed requests -----------------------------------------------------------

@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ([f"X-Big-{i}: {'a' * 1000}" for i in range(100)], 431),  # 100 kB of headers
        ([f"X-H-{i}: v" for i in range(129)], 431),  # more fields than max_headers (with Host, Content-*)
        ([f"X-H-{i}: v" for i in range(120)], 200),
        (["X-Long: " + "a" * 9000], 431),  # one line over 8190 bytes
        ([f"X-Big-{i}: {'a' * 1000}" for i in range(60)], 200),  # 60 kB: under max_head_bytes
    ],
    ids=["100x1kB", "132-fields", "123-fields", "9kB-line", "60x1kB"],
)
async def test_head_limits(gateway_to: Any, echo_backend: str, extra: list[str], status: int) -> None:
    url = await gateway_to(echo_backend)
    answers = await exchange(url, post("/invocations", b"{}", *extra), 1, until_close=status != 200)
    assert answers[0][0] == status, answers[0]
    if status == 431:
        assert json.loads(answers[0][2])["error_code"] == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /invocations HTTP/1.1\nHost: gw\nContent-Length: 2\n\n{}",
        b"POST /invocations HTTP/1.1\rHost: gw\rContent-Length: 2\r\r{}",
        b"POST /invocations HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"POST /invocations HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /invocations HTTP/1.1\r\nHost gw\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the plain port
        b"POST /invocations HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /invocations HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["bare-LF", "bare-CR", "two-lengths", "length-and-chunked", "no-colon", "tls", "no-host", "two-hosts"],
)
async def test_malformed_requests_get_400_at_once(gateway_to: Any, echo_backend: str, raw: bytes) -> None:
    # A long header timeout: the answer must come from the parser, not from a deadline.
    url = await gateway_to(echo_backend, header_timeout=60)
    answers = await exchange(url, raw, 1, until_close=True, timeout=5)
    assert [status for status, _, _ in answers] == [400], answers


@pytest.mark.parametrize(("raw", "status", "fragment"), [
    (b"POST /invocations HTTP/2.0\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
     505, "HTTP/2.0 is not supported"),
    (b"POST /invocations HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\nContent-Type: application/json\r\n\r\n"
     b"2\r\n{}\r\n0\r\n\r\n", 501, "transfer coding 'gzip, chunked' is not supported"),
    (b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n\r\n", 405, "OPTIONS * is not served"),
    (b"CONNECT 127.0.0.1:6379 HTTP/1.1\r\nHost: gw\r\n\r\n", 405, "CONNECT 127.0.0.1:6379 is not served"),
    (b"POST /invocations HTTP/1.1\r\nHost: gw\r\nExpect: teapot\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
     417, "unknown expectation 'teapot'"),
], ids=["http2-line", "gzip-coding", "options-star", "connect", "unknown-expect"])
async def test_requests_the_gateway_does_not_serve_get_a_precise_json_answer_never_forwarded(
    gateway_to: Any, raw: bytes, status: int, fragment: str
) -> None:
    async with scripted_backend(echo_id) as (backend, seen):
        url = await gateway_to(backend)
        conn = await RawConnection.open(url)
        try:
            conn.send(raw)
            (got, *_) = await conn.responses(1)
        finally:
            conn.close()
    assert got[0] == status and got[1]["content-type"].startswith("application/json"), got
    assert fragment in json.loads(got[2])["message"], got
    if status == 405:
        assert got[1]["allow"] == "POST", got
    assert not seen, "never reaches the model server"


async def test_a_chunk_size_that_breaks_mid_body_ends_the_request(gateway_to: Any, echo_backend: str) -> None:
    url = await gateway_to(echo_backend, upstream_max_connections=1, upstream_pool_timeout=0.3)
    conn = await RawConnection.open(url)
    conn.send(b"POST /invocations HTTP/1.1\r\nHost: gw\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await eventually(lambda: gateway_to.gateway.app[POOL].open_connections() == 1, timeout=5)
    conn.send(b"zz\r\nnot a chunk\r\n")
    answers = await conn.until_closed(timeout=5)
    assert [status for status, _, _ in answers] == [400]
    # The model server's connection was given back: the next client is served.
    (served,) = await exchange(url, post("/invocations", b"{}"), 1)
    assert served[0] == 200


async def test_bad_requests_are_counted_and_logged_in_one_rate_limited_line(
    gateway_to: Any, echo_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = await gateway_to(echo_backend)
    caplog.set_level(logging.DEBUG)
    await asyncio.gather(*(exchange(url, b"POST /invocations HTTP/1.1\nHost: gw\n\n", 1, until_close=True)
                           for _ in range(30)))
    assert 'turnout_bad_requests_total{reason="malformed"} 30.0' in await metrics(url)
    lines = [r for r in caplog.records if r.name == "gateway.bad_requests"]
    assert 1 <= len(lines) <= 11 and all(r.levelno == logging.INFO and "\n" not in r.getMessage() for r in lines)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "no tracebacks for a client's mistake"


async def test_a_dead_model_server_is_logged_in_a_few_lines_and_counted_in_full(
    gateway_to: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.local import free_port

    url = await gateway_to(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    caplog.set_level(logging.INFO)
    for _ in range(40):
        (got,) = await exchange(url, post("/invocations", b"{}"), 1)
        assert got[0] == 502
    assert 'turnout_upstream_errors_total{deployment="blue",kind="connect_refused",service="default"} 40.0' in await metrics(url)
    lines = [r for r in caplog.records if r.name == "gateway.proxy" and "connection refused" in r.getMessage()]
    assert 1 <= len(lines) <= 10, len(lines)


async def test_upgrade_requests_are_answered_as_plain_requests(gateway_to: Any) -> None:
    async with scripted_backend(echo_id) as (backend, seen):
        url = await gateway_to(backend)
        upgrade = post("/invocations", b"{}", "X-Id: up", "Connection: Upgrade", "Upgrade: websocket")
        (got,) = await exchange(url, upgrade, 1)
        assert (got[0], got[2]) == (200, b"up")
        # Pipelined after a normal request, on one connection.
        both = await exchange(url, post("/invocations", b"{}", "X-Id: first") + upgrade.replace(b"X-Id: up", b"X-Id: second"), 2)
        assert [(s, b) for s, _, b in both] == [(200, b"first"), (200, b"second")]
        h2c = post("/invocations", b"{}", "X-Id: h2c", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c",
                   "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA")
        (got,) = await exchange(url, h2c, 1)
        assert (got[0], got[2]) == (200, b"h2c")
    assert all("upgrade" not in r.headers for r in seen)


# --- HTTP/1.0, half-close, pipelining ------------------------------------------------------------

async def test_an_http10_streamed_answer_ends_with_the_connection(gateway_to: Any, echo_backend: str) -> None:
    url = await gateway_to(echo_backend)
    request = post("/invocations?mode=big&size=300000", b"{}", "Connection: keep-alive", version="1.0")
    answers = await exchange(url, request + post("/invocations", b"{}", version="1.0"), 1, until_close=True)
    assert len(answers) == 1 and answers[0][0] == 200
    assert len(answers[0][2]) == 300000 and set(answers[0][2]) == {ord("z")}


async def test_a_half_closed_client_gets_its_answers(gateway_to: Any, echo_backend: str) -> None:
    url = await gateway_to(echo_backend)
    for requests in (1, 3):
        conn = await RawConnection.open(url)
        conn.send(b"".join(post("/invocations", b"{}" * (n + 1)) for n in range(requests)))
        conn.half_close()
        answers = await conn.until_closed(timeout=10)
        assert [(s, json.loads(b)["length"]) for s, _, b in answers] == [(200, 2 * (n + 1)) for n in range(requests)]


async def test_pipelined_requests_are_answered_in_order(gateway_to: Any, echo_backend: str) -> None:
    url = await gateway_to(echo_backend)
    bodies = [b"{}" * n for n in range(1, 6)] + [b"x" * 70_000]
    answers = await exchange(url, b"".join(post("/invocations", b) for b in bodies), len(bodies))
    assert [json.loads(body)["length"] for _, _, body in answers] == [len(b) for b in bodies]


async def test_a_pipelining_client_that_never_reads_is_held_back_then_dropped(gateway_to: Any) -> None:
    """A client pipelines hundreds of requests with large answers and never reads: the gateway takes no
    more requests than the socket buffers can hold answers for (its memory stays bounded), and drops
    the connection once the client has not read for the client timeout."""
    import socket

    app = backend_app("blue")
    async with serve_app(app) as backend:
        url = await gateway_to(backend, client_timeout=1.0)
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (host, int(port)))
        # 400 requests, each answered with ~60 KB: 24 MB of answers nobody reads.
        requests = b"".join(post("/invocations?pad=60000", b"{}") for _ in range(400))
        try:
            await asyncio.wait_for(loop.sock_sendall(sock, requests), 5)
        except (TimeoutError, ConnectionError):
            pass  # the gateway stopped reading: exactly what it should do

        await asyncio.sleep(2.5)  # the client timeout (1 s) passes with the client not reading
        seen = len(app[SEEN])
        assert seen < 100, f"{seen} of 400 requests were relayed for a client that read nothing"
        # Reading now gets what the kernel still holds, then the end: the gateway dropped the connection.
        received, ended = 0, False
        while not ended:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5)
            except ConnectionError:
                ended = True
                break
            ended = data == b""
            received += len(data)
        assert len(app[SEEN]) == seen, "nothing more was relayed once the connection was dropped"
        assert received < seen * 61_000
        sock.close()

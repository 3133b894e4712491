"""The fast path (Turnout's own HTTP/1.1 handler) against aiohttp's path, on real sockets, byte for byte."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.app import FAST
from gateway.records import Deployment, State
from gateway.store import EmbeddedStore
from tests.support import Message, Responses, backend_app, exchange, post, serve_app

@pytest.fixture
async def both(gateway_factory: Any) -> AsyncIterator[dict[str, Any]]:
    """One backend behind two gateways: the fast path on, and off (aiohttp only)."""
    backend = backend_app("blue")
    async with serve_app(backend) as backend_url:
        store = EmbeddedStore()
        await store.create_deployment(Deployment(name="blue", url=backend_url, state=State.READY, external=True))
        await store.set_route("blue", None)
        fast = await gateway_factory(store, max_body_bytes=200_000)
        handler = gateway_factory.gateways[-1].app[FAST]
        plain = await gateway_factory(store, max_body_bytes=200_000, fast_path=False)
        yield {"fast": fast, "plain": plain, "backend": backend, "handler": handler}


CASES = [
    post("/invocations", b'{"inputs": [[1, 2, 3, 4]]}'),
    post("/invocations?mode=echo&x=%20y", b'{"inputs": []}', "X-Forwarded-For: 10.0.0.7"),
    post("/deployments/blue/invocations", b'{"inputs": [[1]]}'),
    post("/deployments/nope/invocations", b"{}"),
    post("/invocations?mode=crash", b"{}"),
    post("/invocations?mode=status&code=503", b"{}"),
    post("/invocations?mode=gzip", b"{}", "Accept-Encoding: gzip"),
    post("/invocations", gzip.compress(b'{"inputs": [[5, 6]]}'), "Content-Encoding: gzip"),
    post("/invocations", b"{}", "Connection: keep-alive, X-Secret", "X-Secret: 1", "Keep-Alive: timeout=5"),
    post("/invocations", b"x" * 70_000),  # over the small-body limit: aiohttp streams it
    post("/invocations", b"x" * 300_000),  # over max_body_bytes: 413
    post("/invocations", b"{}", "Expect: 100-continue"),
    post("/invocations", b"{}", "X-Long: " + "a" * 9000),  # a head past aiohttp's line limit
    post("/invocations", b"{}", version="1.0"),
    b"POST /invocations HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"POST /invocations HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /invocations HTTP/1.1\r\nHost gw\r\n\r\n",
    b"GET /invocations HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n",
]
# Headers that legitimately differ: each server stamps its own Date/Server; aiohttp says
# "application/json; charset=utf-8" for some of its own errors.
_VARIABLE = {"date", "server", "content-type", "connection", "keep-alive"}


@pytest.mark.parametrize("raw", CASES, ids=lambda raw: raw.split(b"\r\n")[0].decode()[:60] + f" [{len(raw)}]")
async def test_fast_path_answers_as_aiohttp_does(both: dict[str, Any], raw: bytes) -> None:
    # HTTP/1.0 and a malformed head end with the server closing the connection.
    until_close = b"HTTP/1.0" in raw or b"Host gw" in raw
    fast = (await exchange(both["fast"], raw, 1, until_close=until_close))[0]
    plain = (await exchange(both["plain"], raw, 1, until_close=until_close))[0]
    assert fast[0] == plain[0], (fast, plain)
    assert {k: v for k, v in fast[1].items() if k not in _VARIABLE} == {
        k: v for k, v in plain[1].items() if k not in _VARIABLE
    }
    assert fast[2] == plain[2]


async def test_one_connection_moves_to_aiohttp_at_a_request_boundary(both: dict[str, Any]) -> None:
    data = (
        post("/invocations", b'{"n": 1}')
        + b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n"
        + post("/invocations", b'{"n": 22}')
    )
    first, health, last = await exchange(both["fast"], data, 3)
    assert (first[0], health[0], last[0]) == (200, 200, 200)
    assert json.loads(first[2])["length"] == 8 and json.loads(last[2])["length"] == 9
    assert json.loads(health[2])["status"] == "ready"
    assert first[1]["x-turnout-deployment"] == last[1]["x-turnout-deployment"] == "blue"


async def test_pipelined_predictions_are_answered_in_order(both: dict[str, Any]) -> None:
    bodies = [b"{}" * n for n in range(1, 6)]
    answers = await exchange(both["fast"], b"".join(post("/invocations", b) for b in bodies), len(bodies))
    assert [json.loads(body)["length"] for _, _, body in answers] == [len(b) for b in bodies]


async def test_a_body_split_across_packets_is_waited_for(both: dict[str, Any]) -> None:
    raw = post("/invocations", b'{"inputs": [[1, 2, 3, 4]]}')
    host, port = both["fast"].removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    for i in range(0, len(raw), 7):
        writer.write(raw[i : i + 7])
        await writer.drain()
        await asyncio.sleep(0.005)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_connection_close_is_honoured(both: dict[str, Any]) -> None:
    # exchange() reads until the server closes: a connection kept open would time out here.
    (answer,) = await exchange(both["fast"], post("/invocations", b"{}", "Connection: close"), 1, until_close=True)
    assert answer[0] == 200 and answer[1]["connection"] == "close"


async def test_fast_path_requests_are_counted(both: dict[str, Any]) -> None:
    await exchange(both["fast"], post("/invocations", b"{}") * 3, 3)
    async with aiohttp.ClientSession() as session, session.get(both["fast"] + "/metrics") as resp:
        text = await resp.text()
    assert 'turnout_requests_total{code="200",deployment="blue",outcome="ok",service="default"} 3.0' in text
    assert 'turnout_inflight_requests{deployment="blue",service="default"} 0.0' in text


async def test_predictions_stay_on_the_fast_path_until_another_request_moves_the_connection(
    both: dict[str, Any],
) -> None:
    handler = both["handler"]
    host, port = both["fast"].removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    collected = Responses()

    async def answer(request: bytes) -> Message:
        writer.write(request)
        wanted = len(collected.done) + 1
        while len(collected.done) < wanted:
            collected.parser.feed_data(await asyncio.wait_for(reader.read(65536), 10))
        return collected.done[-1]

    try:
        for _ in range(3):
            assert (await answer(post("/invocations", b"{}")))[0] == 200
            assert len(handler.connections) == 1, "the prediction was relayed by the fast path"
        assert (await answer(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n"))[0] == 200
        assert handler.connections == set(), "the connection now belongs to aiohttp"
        assert (await answer(post("/invocations", b"{}")))[0] == 200
    finally:
        writer.close()

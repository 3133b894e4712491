"""Randomised correlation test: many concurrent clients, each request tagged with a unique id, through
both request paths, mixing keep-alive, pipelining, chunked and large bodies, large answers, HTTP/1.0,
Expect: 100-continue, half-closes and aborts at every stage. Every answer a client reads must be its
own, and nothing may fail that the client's own abort does not explain."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from gateway.records import Deployment, State
from gateway.store import EmbeddedStore
from tests.support import RawConnection, backend_app, eventually, post, serve_app

CLIENTS = 24
ROUNDS = 25


class Client:
    """One simulated client: its id counter, what it checked, and any answer that was not its own."""

    def __init__(self, url: str, number: int, rng: random.Random) -> None:
        self.url = url
        self.number = number
        self.rng = rng
        self.sent = 0
        self.checked = 0
        self.problems: list[str] = []

    def new_id(self) -> str:
        self.sent += 1
        return f"c{self.number}-r{self.sent}"

    def request(self, rid: str, body: bytes, query: str = "", *extra: str, version: str = "1.1") -> bytes:
        return post("/invocations" + query, body, f"X-Id: {rid}", *extra, version=version)

    def check(self, rid: str, answer: tuple[int, dict[str, str], bytes], length: int) -> None:
        status, headers, body = answer
        try:
            data = json.loads(body)
            ok = status == 200 and data["headers"].get("X-Id") == rid and data["length"] == length
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok and headers.get("x-turnout-deployment") == "blue":
            self.checked += 1
        else:
            self.problems.append(f"{rid}: got {status} {body[:120]!r}")

    def body(self) -> bytes:
        return b"{}" if self.rng.random() < 0.5 else b'{"inputs": [' + b"1," * self.rng.randint(1, 500) + b"1]}"

    # --- scenarios ----------------------------------------------------------------------------
    async def keep_alive(self) -> None:
        conn = await RawConnection.open(self.url)
        try:
            for n in range(self.rng.randint(1, 4)):
                rid, body = self.new_id(), self.body()
                query = "?mode=slow&delay=0.02" if self.rng.random() < 0.3 else ""
                conn.send(self.request(rid, body, query))
                self.check(rid, (await conn.responses(n + 1))[n], len(body))
        finally:
            conn.close()

    async def pipelined(self) -> None:
        conn = await RawConnection.open(self.url)
        try:
            sent = []
            for _ in range(self.rng.randint(2, 5)):
                rid, body = self.new_id(), self.body() if self.rng.random() < 0.8 else b"x" * 80_000
                sent.append((rid, len(body)))
                conn.send(self.request(rid, body, "?pad=200000" if self.rng.random() < 0.2 else ""))
            answers = await conn.responses(len(sent))
            for (rid, length), got in zip(sent, answers):
                self.check(rid, got, length)
        finally:
            conn.close()

    async def chunked(self) -> None:
        conn = await RawConnection.open(self.url)
        try:
            rid = self.new_id()
            conn.send(f"POST /invocations HTTP/1.1\r\nHost: gw\r\nX-Id: {rid}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            total = 0
            for _ in range(self.rng.randint(1, 4)):
                part = b"a" * self.rng.randint(1, 30_000)
                total += len(part)
                conn.send(b"%x\r\n%b\r\n" % (len(part), part))
                await asyncio.sleep(self.rng.random() * 0.01)
            conn.send(b"0\r\n\r\n")
            self.check(rid, (await conn.responses(1))[0], total)
        finally:
            conn.close()

    async def large(self) -> None:
        conn = await RawConnection.open(self.url)
        try:
            rid, body = self.new_id(), b"y" * self.rng.randint(65_000, 300_000)
            conn.send(self.request(rid, body, "?pad=%d" % self.rng.randint(0, 400_000)))
            self.check(rid, (await conn.responses(1))[0], len(body))
        finally:
            conn.close()

    async def http10(self) -> None:
        conn = await RawConnection.open(self.url)
        try:
            rid, body = self.new_id(), self.body()
            conn.send(self.request(rid, body, "?pad=100000" if self.rng.random() < 0.5 else "", "Connection: keep-alive",
                                   version="1.0"))
            # With a length the answer may keep the connection; without one it ends with it.
            self.check(rid, (await conn.responses(1, timeout=20))[0], len(body))
        finally:
            conn.close()

    async def expect_continue(self) -> None:
        conn = await RawConnection.open(self.url)
        try:
            rid, body = self.new_id(), self.body()
            # A slow answer: a model server that sent its own 100 would send it well before the answer.
            conn.send(self.request(rid, b"", "?mode=slow&delay=0.02", "Expect: 100-continue").replace(b"Content-Length: 0", b"Content-Length: %d" % len(body)))
            (interim,) = await conn.responses(1)
            if interim[0] != 100:
                self.problems.append(f"{rid}: expected 100 Continue, got {interim[0]}")
                return
            conn.send(body)
            self.check(rid, (await conn.responses(2))[1], len(body))
        finally:
            conn.close()

    async def half_close(self) -> None:
        conn = await RawConnection.open(self.url)
        try:
            sent = []
            for _ in range(self.rng.randint(1, 3)):
                rid, body = self.new_id(), self.body()
                sent.append((rid, len(body)))
                conn.send(self.request(rid, body))
            conn.half_close()
            answers = await conn.until_closed(timeout=20)
            if len(answers) != len(sent):
                self.problems.append(f"half-close: {len(answers)} answers to {len(sent)} requests")
            for (rid, length), got in zip(sent, answers):
                self.check(rid, got, length)
        finally:
            conn.close()

    async def abort(self) -> None:
        """Reset the connection at some stage of an exchange: its own request fails, nobody else's."""
        conn = await RawConnection.open(self.url)
        rid = self.new_id()
        stage = self.rng.choice(["head", "body", "waiting", "reading"])
        body = b"b" * 200_000
        request = self.request(rid, body, "?mode=slow&delay=0.05&pad=300000")
        if stage == "head":
            conn.send(request[: self.rng.randint(1, 40)])
        elif stage == "body":
            conn.send(request[: len(request) - 100_000])
        else:
            conn.send(request)
            if stage == "reading":
                await conn.reader.read(1000)
        await asyncio.sleep(self.rng.random() * 0.05)
        conn.abort()

    async def run(self, rounds: int) -> None:
        scenarios: list[Callable[[], Awaitable[None]]] = [
            self.keep_alive, self.keep_alive, self.pipelined, self.chunked, self.large, self.http10,
            self.expect_continue, self.half_close, self.abort, self.abort,
        ]
        for _ in range(rounds):
            scenario = self.rng.choice(scenarios)
            try:
                await scenario()
            except (AssertionError, ConnectionError, TimeoutError) as exc:
                self.problems.append(f"{scenario.__name__}: {exc!r}")


@pytest.fixture(params=["fast", "aiohttp"])
async def gateway(request: pytest.FixtureRequest, gateway_factory: Any) -> AsyncIterator[str]:
    async with serve_app(backend_app("blue")) as backend:
        store = EmbeddedStore()
        await store.create_deployment(Deployment(name="blue", url=backend, state=State.READY, external=True))
        await store.set_route("blue", None)
        # Few upstream connections, kept briefly: requests reuse and recycle them as hard as possible.
        url = await gateway_factory(store, fast_path=request.param == "fast", upstream_max_connections=8,
                                    upstream_pool_timeout=30, upstream_keepalive=0.2)

        async def healthy() -> bool:
            async with aiohttp.ClientSession() as s, s.get(url + "/health") as resp:
                return resp.status == 200

        await eventually(healthy, timeout=5)
        yield url


async def test_every_client_reads_only_its_own_answers(gateway: str) -> None:
    seed = random.randrange(1 << 30)
    clients = [Client(gateway, n, random.Random(seed + n)) for n in range(CLIENTS)]
    await asyncio.gather(*(c.run(ROUNDS) for c in clients))
    problems = [p for c in clients for p in c.problems]
    assert problems == [], f"seed {seed}: {problems[:10]}"
    assert sum(c.checked for c in clients) > CLIENTS * ROUNDS // 2, "most exchanges were checked"
    async with aiohttp.ClientSession() as s, s.get(gateway + "/metrics") as resp:
        text = await resp.text()
    assert 'outcome="upstream_error"' not in text, "a client's abort is never the model server's failure"

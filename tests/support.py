"""Helpers shared by the tests: free ports, servers on real sockets, waiting for conditions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httptools
from aiohttp import web

from gateway.loadgen import LoadGenerator
from gateway.local import free_port, processes_with_env  # noqa: F401 - shared with the demo and bench

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@contextlib.asynccontextmanager
async def serve_app(app: web.Application, port: int | None = None) -> AsyncIterator[str]:
    """Run an aiohttp app on a real socket; yields its base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1, auto_decompress=False)
    await runner.setup()
    port = port or free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def eventually(
    check: Callable[[], Awaitable[Any]] | Callable[[], Any], timeout: float = 10.0, interval: float = 0.02
) -> Any:
    """Poll ``check`` until it returns something truthy; fail with its last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        last = result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last value: {last!r})")
        await asyncio.sleep(interval)


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Block until something accepts connections on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child process: the venv's bin first (mlflow needs uvicorn on PATH)."""
    # mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI into this process: children get it only when asked.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNOUT_") and k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["DO_NOT_TRACK"] = "true"
    env.update(extra)
    return env


class RedisServer:
    """A private redis-server we may stop and restart (the shared one must never be disturbed)."""

    def __init__(self, port: int, workdir: Path | None = None) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        # Where a replica writes the primary's snapshot during a full sync (not the current directory).
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, replica_of: int | None = None) -> None:
        """Start (or restart) on the same port, empty (or as a replica of the server at ``replica_of``)."""
        replica = ["--replicaof", "127.0.0.1", str(replica_of)] if replica_of is not None else []
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--repl-diskless-sync-delay", "0", *(["--dir", str(self.workdir)] if self.workdir else []), *replica],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        """Kill it: clients see their connections drop."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@contextlib.contextmanager
def private_redis() -> Iterator[RedisServer]:
    """A private Redis for the duration of a test."""
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


class SentinelCluster:
    """A private Redis primary, one replica and three sentinels (quorum 2), each on its own port: a
    Sentinel deployment we may fail over, by command or by killing the primary."""

    MASTER = "turnout"

    def __init__(self, workdir: Path, down_after_ms: int = 1000) -> None:
        self.workdir = workdir
        self.down_after_ms = down_after_ms
        self.servers = []
        for name in ("a", "b"):
            (workdir / name).mkdir(exist_ok=True)  # each server its own: both may write a dump.rdb
            self.servers.append(RedisServer(free_port(), workdir / name))
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL of database 0 of this cluster's primary."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.MASTER}/0"

    def start(self) -> None:
        """Primary, then replica, then the sentinels; returns once the sentinels see the replica."""
        primary, replica = self.servers
        primary.start()
        replica.start(replica_of=primary.port)
        for i, port in enumerate(self.sentinel_ports):
            # A sentinel rewrites its configuration file: each gets its own, in the test's directory.
            conf = self.workdir / f"sentinel-{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.MASTER} 10000\n"
                f"sentinel parallel-syncs {self.MASTER} 1\n"
            )
            self.sentinels.append(subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.sentinel_ports:
            wait_port(port)
        self.wait_in_sync()

    def wait_in_sync(self, timeout: float = 30) -> None:
        """Until every running replica is in sync with the primary, every sentinel sees it as a healthy
        replica and knows the two other sentinels: what a failover (and its vote) needs."""
        deadline = time.monotonic() + timeout
        while True:
            primary = self.primary_port()
            replicas = [s.port for s in self.servers if s.proc is not None and s.port != primary]
            synced = all("master_link_status:up" in self.info(port, "replication") for port in replicas)
            if synced and all(self._sees(port, replicas) for port in self.sentinel_ports):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the Sentinel cluster did not settle within {timeout} s")
            time.sleep(0.1)

    def _sees(self, sentinel: int, replicas: list[int]) -> bool:
        healthy = set()
        for entry in self.sentinel(sentinel, "SENTINEL", "REPLICAS", self.MASTER):
            fields = entry if isinstance(entry, dict) else dict(zip(entry[::2], entry[1::2]))
            if "down" not in str(fields.get("flags", "")) and "disconnected" not in str(fields.get("flags", "")):
                healthy.add(int(fields["port"]))
        return set(replicas) <= healthy and len(self.sentinel(sentinel, "SENTINEL", "SENTINELS", self.MASTER)) == 2

    def sentinel(self, port: int, *command: str) -> Any:
        """One command to one sentinel (redis-py's sync client: test code outside any event loop)."""
        import redis

        with redis.Redis(port=port, decode_responses=True, socket_timeout=2) as client:
            return client.execute_command(*command)

    def info(self, port: int, section: str) -> str:
        """A data server's INFO section, as text."""
        import redis

        with redis.Redis(port=port, decode_responses=True, socket_timeout=2) as client:
            return "\n".join(f"{k}:{v}" for k, v in client.info(section).items())

    def primary_port(self) -> int:
        """The port the sentinels name as the primary now."""
        _host, port = self.sentinel(self.sentinel_ports[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER)
        return int(port)

    def primary(self) -> RedisServer:
        """The server the sentinels name as the primary now."""
        port = self.primary_port()
        return next(s for s in self.servers if s.port == port)

    def failover(self) -> None:
        """SENTINEL FAILOVER: a planned switch of the primary (the old one becomes a replica)."""
        self.sentinel(self.sentinel_ports[0], "SENTINEL", "FAILOVER", self.MASTER)

    def stop(self) -> None:
        """Every process of the cluster, killed."""
        for proc in self.sentinels:
            proc.kill()
            proc.wait()
        self.sentinels = []
        for server in self.servers:
            server.stop()


@contextlib.contextmanager
def sentinel_cluster(workdir: Path, down_after_ms: int = 1000) -> Iterator[SentinelCluster]:
    """A private Sentinel-managed Redis for the duration of a test or benchmark."""
    cluster = SentinelCluster(workdir, down_after_ms)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


SEEN = web.AppKey("seen", list)


FAILURES = web.AppKey("failures", dict)


def backend_app(name: str, fail_ratio: float = 0.0) -> web.Application:
    """A fast test backend speaking the scoring protocol; ``?mode=`` selects a behaviour, ``?pad=N``
    makes the echo N bytes longer.

    ``fail_ratio`` (changeable later through ``app[FAILURES]["ratio"]``) makes that share of requests
    fail like a crashing MLflow model (HTTP 400 with a stack trace), spread evenly.
    """
    import gzip
    import hashlib

    app = web.Application(client_max_size=1024**3)
    app[SEEN] = []
    app[FAILURES] = {"ratio": fail_ratio, "count": 0, "credit": 0.0}

    async def invocations(request: web.Request) -> web.StreamResponse:
        mode = request.query.get("mode", "echo")
        hasher = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_any():
            hasher.update(chunk)
            length += len(chunk)
        headers = {"X-Backend": name}
        app[SEEN].append(dict(request.headers))
        failures = app[FAILURES]
        failures["credit"] += failures["ratio"]
        if failures["credit"] >= 1.0:
            failures["credit"] -= 1.0
            failures["count"] += 1
            mode = "crash"
        if mode == "slow":
            await asyncio.sleep(float(request.query.get("delay", "1")))
        if mode == "gzip":
            payload = gzip.compress(json.dumps({"predictions": list(range(200))}).encode())
            return web.Response(body=payload, headers={**headers, "Content-Encoding": "gzip", "Content-Type": "application/json"})
        if mode == "big":
            size = int(request.query["size"])
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            block = b"z" * 65536
            sent = 0
            while sent < size:
                part = block[: min(len(block), size - sent)]
                await response.write(part)
                sent += len(part)
            await response.write_eof()
            return response
        if mode == "status":
            code = int(request.query["code"])
            return web.json_response({"error_code": "X", "message": "asked for it"}, status=code, headers=headers)
        if mode == "crash":
            return web.json_response(
                {
                    "error_code": "BAD_REQUEST",
                    "message": "Encountered an unexpected error while evaluating the model. Verify that ...",
                    "stack_trace": "Traceback ...",
                },
                status=400,
                headers=headers,
            )
        if mode == "abort":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(1)
        body = {"backend": name, "length": length, "sha256": hasher.hexdigest(), "headers": dict(request.headers)}
        if "pad" in request.query:
            body["pad"] = "p" * int(request.query["pad"])  # a large answer that still says whose it is
        return web.json_response(body, headers=headers)

    app.router.add_post("/invocations", invocations)
    return app


async def raw_request(url: str, request: bytes) -> tuple[bytes, bytes]:
    """Send exact request bytes, read one response (until the server closes); returns (head, body)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


Message = tuple[int, dict[str, str], bytes]


class Responses:
    """llhttp callbacks collecting whole responses read off a raw socket (1xx interim ones included)."""

    def __init__(self) -> None:
        self.done: list[Message] = []
        self.headers: dict[str, str] = {}
        self.body = b""
        self.started = False
        self.parser = httptools.HttpResponseParser(self)

    def feed(self, data: bytes) -> None:
        """Parse more bytes."""
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.started = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self.headers, self.body))
        self.headers, self.body, self.started = {}, b"", False

    def finish(self) -> None:
        """The server closed: a response whose body ran until the close is complete now."""
        if self.started and self.headers:
            self.on_message_complete()


async def exchange(url: str, data: bytes, responses: int, *, until_close: bool = False, timeout: float = 10) -> list[Message]:
    """Write ``data`` on one connection and read ``responses`` whole responses (or until the server closes)."""
    conn = await RawConnection.open(url)
    try:
        conn.send(data)
        if until_close:
            await conn.until_closed(timeout)
        else:
            await conn.responses(responses, timeout)
    finally:
        conn.close()
    return conn.parsed.done


def post(path: str, body: bytes, *extra: str, version: str = "1.1") -> bytes:
    """A raw POST with a Content-Length."""
    lines = [f"POST {path} HTTP/{version}", "Host: gw", "Content-Type: application/json", *extra,
             f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class RawConnection:
    """One client socket driven byte by byte: what a hostile or broken client does."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parsed = Responses()
        self.eof = False

    @classmethod
    async def open(cls, url: str) -> RawConnection:
        """Connect to ``http://host:port``."""
        host, port = url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        """Write bytes (no waiting for the peer to take them)."""
        self.writer.write(data)

    async def _read(self, timeout: float) -> None:
        chunk = await asyncio.wait_for(self.reader.read(65536), timeout)
        if not chunk:
            self.eof = True
            self.parsed.finish()
        else:
            self.parsed.feed(chunk)

    async def responses(self, count: int, timeout: float = 10) -> list[Message]:
        """Read until ``count`` responses (1xx included) arrived in all; fails on a close or a timeout."""
        deadline = time.monotonic() + timeout
        while len(self.parsed.done) < count:
            if self.eof:
                raise AssertionError(f"closed after {len(self.parsed.done)} of {count} responses")
            await self._read(max(0.01, deadline - time.monotonic()))
        return self.parsed.done

    async def until_closed(self, timeout: float = 10) -> list[Message]:
        """Read until the server closes the connection (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            try:
                await self._read(max(0.01, deadline - time.monotonic()))
            except ConnectionResetError:
                self.eof = True
        return self.parsed.done

    async def stays_open(self, seconds: float) -> bool:
        """True when the server neither closed nor sent anything for ``seconds``."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), seconds)
        except TimeoutError:
            return True
        if data:
            self.parsed.feed(data)
        else:
            self.eof = True
        return False

    def half_close(self) -> None:
        """shutdown(SHUT_WR): the request is complete, the client still reads."""
        self.writer.write_eof()

    def close(self) -> None:
        """Close the socket."""
        self.writer.close()

    def abort(self) -> None:
        """Reset the connection (RST), as a crashed client would."""
        transport = self.writer.transport
        transport.abort()


class _Request:
    """One request a scripted backend received."""

    def __init__(self, connection: int = 0, on_connection: int = 0) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = b""
        # Which connection (numbered from 1 in the order they were opened) and its how-manieth request.
        self.connection = connection
        self.on_connection = on_connection

    @property
    def id(self) -> str:
        """The client's X-Id header (tests tag every request with one)."""
        return self.headers.get("x-id", "")


Script = Callable[[_Request, int], tuple[bytes, float | None]]


@contextlib.asynccontextmanager
async def scripted_backend(script: Script) -> AsyncIterator[tuple[str, list[_Request]]]:
    """A model server that answers each request with raw bytes of the test's choosing: ``script(request,
    n)`` (n counts requests over all connections) returns the bytes and, if not None, the seconds after
    which the server stops reading and closes that connection (as uvicorn does after a 500)."""
    received: list[_Request] = []
    connections = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        number = connections[0]
        done: list[_Request] = []
        current = [_Request(number, 1)]

        class Callbacks:
            def on_url(self, url: bytes) -> None:
                current[0].url += url

            def on_header(self, name: bytes, value: bytes) -> None:
                current[0].headers[name.decode().lower()] = value.decode("latin-1")

            def on_body(self, body: bytes) -> None:
                current[0].body += body

            def on_message_complete(self) -> None:
                done.append(current[0])
                current[0] = _Request(number, current[0].on_connection + 1)

        parser = httptools.HttpRequestParser(Callbacks())
        with contextlib.suppress(ConnectionError, httptools.HttpParserError):
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                parser.feed_data(data)
                close_after = None
                while done:
                    request = done.pop(0)
                    received.append(request)
                    answer, close_after = script(request, len(received))
                    writer.write(answer)
                    if close_after is not None:
                        break
                if close_after is not None:
                    await asyncio.sleep(close_after)
                    break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.close()
        await server.wait_closed()


def answer(status: int, body: bytes, *headers: str, interim: bytes = b"") -> bytes:
    """A raw response with a Content-Length (``interim``: 1xx responses sent before it)."""
    lines = [f"HTTP/1.1 {status} X", *headers, f"Content-Length: {len(body)}"]
    return interim + ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def history(store: Any, limit: int = 100, service: str = "default") -> list[dict[str, Any]]:
    """A service's history entries, newest first, in their JSON form (as the admin API serves them)."""
    entries, _ = await store.read_history(0, limit, service=service)
    return [entry.to_json() for entry in entries]


def Load(urls: list[str], rate: float, body: Any = None) -> LoadGenerator:  # noqa: N802 - reads as the class it builds
    """Steady JSON traffic (``async with Load([url], rate=100) as load:``), every answer in ``load.results``."""
    payload = json.dumps(body if body is not None else {"inputs": [[1, 2, 3, 4]]}).encode()
    return LoadGenerator(urls, rate, body=lambda n: payload)

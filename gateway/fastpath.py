"""The data plane's own HTTP/1.1 connection handler: plain prediction requests skip aiohttp's request objects.

Every client connection on the data-plane port starts here. A request that is ``POST /invocations``
or ``POST /deployments/{name}/invocations`` over HTTP/1.1, framed by a Content-Length within the
small-body limit and without Expect or Upgrade (nearly every scoring request), is parsed by llhttp
and relayed between the sockets by the proxy's own parts. The first request that is anything else
(the admin API, /metrics, a chunked or large body, HTTP/1.0, a malformed head) hands the
connection, with every byte not yet consumed, to aiohttp, which serves it from then on exactly as
it would have from the start. Both paths share routing, metrics, traffic and the upstream pool.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import time
from collections.abc import Callable, Sequence

import httptools

from . import errors
from .classify import classify
from .metrics import CLIENT_ERROR, UPSTREAM_ERROR
from .proxy import (
    CLIENT_CLOSED,
    DEPLOYMENT_HEADER,
    GENERATION_HEADER,
    SMALL_BODY,
    Proxy,
    Refusal,
    build_request_head,
    upstream_header_pairs,
)
from .upstream import UpstreamError, UpstreamResponse

log = logging.getLogger(__name__)

# A head longer than this goes to aiohttp, which enforces its own limits (8190 bytes per line) and
# answers them; scoring requests' heads are a few hundred bytes.
MAX_HEAD = 8190
# Idle keep-alive connections are closed after this long (aiohttp's default too).
KEEPALIVE_TIMEOUT = 75.0
# Pipelined bytes buffered while a request is in flight before the socket stops being read.
_PIPELINE_HIGH_WATER = 2 * SMALL_BODY + MAX_HEAD

_PINNED_PREFIX = b"/deployments/"
_INVOCATIONS = b"/invocations"
_NOT_OURS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}
_JSON = (b"Content-Type", b"application/json")
_DEPLOYMENT = DEPLOYMENT_HEADER.encode()
_GENERATION = GENERATION_HEADER.encode()


def response_head(status: int, headers: Sequence[tuple[bytes, bytes]], length: int | None, keep_alive: bool) -> bytes:
    """Status line and headers; ``length`` None frames the body as chunked."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    if status >= 200 and status not in (204, 304):
        lines.append(b"Content-Length: %d\r\n" % length if length is not None else b"Transfer-Encoding: chunked\r\n")
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class _DateHeader:
    """The Date header of the gateway's own responses, formatted once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def __call__(self) -> tuple[bytes, bytes]:
        now = int(time.time())
        if now != self._second:
            self._second, self._value = now, email.utils.formatdate(now, usegmt=True).encode()
        return (b"Date", self._value)


class _Head:
    """llhttp callbacks for one request head."""

    __slots__ = ("url", "headers", "done")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.done = True


class FastPath:
    """Protocol factory for the data-plane listener; tracks its connections so shutdown can drain them."""

    def __init__(self, proxy: Proxy, max_body_bytes: int) -> None:
        self.proxy = proxy
        self.small_body = min(SMALL_BODY, max_body_bytes)
        # aiohttp's protocol factory (the runner's server), bound once the runner is set up.
        self.fallback: Callable[[], asyncio.Protocol] | None = None
        self.connections: set[_ServerConnection] = set()
        self.closing = False
        self.date = _DateHeader()
        self._sweeper: asyncio.Task[None] | None = None

    def __call__(self) -> asyncio.Protocol:
        return _ServerConnection(self, asyncio.get_running_loop())

    def start(self) -> None:
        """Start closing idle keep-alive connections."""
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="fastpath-keepalive")

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections, let requests in flight finish (up to ``timeout`` s), then close the rest."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(conn.busy for conn in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            cutoff = loop.time() - KEEPALIVE_TIMEOUT
            for conn in list(self.connections):
                if not conn.busy and conn.last_active < cutoff:
                    conn.close()


class _ServerConnection(asyncio.Protocol):
    """One client connection, until it closes or is handed to aiohttp."""

    def __init__(self, fast: FastPath, loop: asyncio.AbstractEventLoop) -> None:
        self.fast = fast
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.remote = b"unknown"
        self.busy = False
        self.last_active = loop.time()
        self._task: asyncio.Task[None] | None = None
        self._eof = False
        self._reading_paused = False
        self._can_write = asyncio.Event()
        self._can_write.set()

    # --- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.remote = str(peer[0]).encode("latin-1")
        self.fast.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.last_active = self.loop.time()
        if self.busy:
            if len(self.buffer) > _PIPELINE_HIGH_WATER and not self._reading_paused and self.transport is not None:
                self.transport.pause_reading()
                self._reading_paused = True
            return
        self._next()

    def eof_received(self) -> bool:
        self._eof = True
        # Keep the socket open for writing while a response is on its way; else close it.
        return self.busy

    def connection_lost(self, exc: Exception | None) -> None:
        self.fast.connections.discard(self)
        self._can_write.set()
        if self._task is not None and not self._task.done():
            # The client went away: stop waiting for its answer (recorded as 499).
            self._task.cancel()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # --- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Close once buffered output is sent."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close now."""
        if self.transport is not None:
            self.transport.abort()

    def _hand_off(self) -> None:
        """Give the connection, with every byte not yet consumed, to aiohttp for the rest of its life."""
        transport = self.transport
        fallback = self.fast.fallback
        self.fast.connections.discard(self)
        if transport is None or transport.is_closing():
            return
        if fallback is None:
            transport.abort()
            return
        data, self.buffer = bytes(self.buffer), bytearray()
        handler = fallback()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if data:
            handler.data_received(data)  # type: ignore[attr-defined]

    # --- requests ---------------------------------------------------------------------------
    def _next(self) -> None:
        """Start the request at the front of the buffer, once its head (and body) arrived."""
        buf = self.buffer
        if not buf or self.transport is None or self.transport.is_closing():
            return
        if self.fast.closing:
            self.close()
            return
        if not buf.startswith(b"POST "):
            if len(buf) >= 5 or not b"POST ".startswith(buf):
                self._hand_off()
            return
        end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._hand_off()
            return
        head_length = end + 4
        head = _Head()
        parser = httptools.HttpRequestParser(head)
        try:
            parser.feed_data(bytes(buf[:head_length]))
        except httptools.HttpParserError:
            self._hand_off()  # aiohttp answers malformed requests with its precise 400
            return
        if not head.done or parser.get_http_version() != "1.1":
            self._hand_off()
            return
        path, _, query = head.url.partition(b"?")
        pinned: str | None = None
        if path != _INVOCATIONS:
            name = path[len(_PINNED_PREFIX) : -len(_INVOCATIONS)]
            if (
                not path.startswith(_PINNED_PREFIX) or not path.endswith(_INVOCATIONS) or not name
                or b"/" in name or b"%" in name or not name.isascii()
            ):
                self._hand_off()
                return
            pinned = name.decode("ascii")
        length: int | None = None
        for name, value in head.headers:
            lowered = name.lower()
            if lowered == b"content-length":
                if length is not None or not value.isdigit():
                    self._hand_off()
                    return
                length = int(value)
            elif lowered in _NOT_OURS:
                self._hand_off()
                return
        if length is None or length > self.fast.small_body:
            self._hand_off()
            return
        total = head_length + length
        if len(buf) < total:
            return  # the body is still arriving
        body = bytes(buf[head_length:total])
        del buf[:total]
        self.busy = True
        self._task = self.loop.create_task(
            self._serve(pinned, query, head.headers, body, parser.should_keep_alive())
        )

    async def _serve(
        self, pinned: str | None, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes, keep_alive: bool
    ) -> None:
        keep_alive = keep_alive and not self._eof
        try:
            keep_alive = await self._relay(pinned, query, headers, body, keep_alive)
        except asyncio.CancelledError:
            return  # the connection is gone
        except Exception:
            log.exception("unexpected failure while relaying a request")
            self.abort()
            return
        finally:
            self._task = None
            self.busy = False
        if not keep_alive or self._eof or self.fast.closing:
            self.close()
            return
        self.last_active = self.loop.time()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        self._next()

    async def _relay(
        self, pinned: str | None, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes, keep_alive: bool
    ) -> bool:
        """Answer one request; returns whether the connection may carry another."""
        proxy = self.fast.proxy
        chosen = proxy.choose(pinned)
        if isinstance(chosen, Refusal):
            tags = [(k.encode(), v.encode()) for k, v in chosen.tags().items()]
            self._write_own(chosen.status, chosen.body(), tags, keep_alive)
            return keep_alive
        name, target = chosen.name, chosen.target
        tags = [(_DEPLOYMENT, name.encode()), (_GENERATION, chosen.generation.encode())]
        dm, started = proxy.begin(name)
        code, outcome = CLIENT_CLOSED, CLIENT_ERROR
        try:
            head = build_request_head(headers, query, self.remote, b"http", target, len(body))
            try:
                upstream = await proxy.pool.request(target.host, target.port, head, body)
            except UpstreamError as exc:
                code, outcome = (504 if exc.is_timeout else 502), UPSTREAM_ERROR
                proxy.upstream_failed(dm, exc)
                status, error = errors.upstream_error(exc, name)
                self._write_own(status, error, tags, keep_alive)
                return keep_alive
            try:
                code, outcome = await self._respond(upstream, tags, keep_alive)
            except UpstreamError as exc:
                # The head already went to the client: all we can do is cut the response short.
                code, outcome = 502, UPSTREAM_ERROR
                proxy.upstream_failed(dm, exc, "response broken off: ")
                self.abort()
                return False
            finally:
                upstream.release()
            return keep_alive
        finally:
            proxy.end(dm, started, code, outcome)

    async def _respond(
        self, upstream: UpstreamResponse, tags: list[tuple[bytes, bytes]], keep_alive: bool
    ) -> tuple[int, str]:
        transport = self.transport
        assert transport is not None
        status = upstream.status
        headers = upstream_header_pairs(upstream) + tags
        length = upstream.length
        if upstream.small(SMALL_BODY):
            body = await upstream.read()
            transport.write(response_head(status, headers, len(body), keep_alive) + body)
            return status, classify(status, body if status >= 400 else None)
        transport.write(response_head(status, headers, length, keep_alive))
        async for chunk in upstream.iter_chunks():
            transport.write(chunk if length is not None else b"%x\r\n%b\r\n" % (len(chunk), chunk))
            if not self._can_write.is_set():
                await self._can_write.wait()
        if length is None:
            transport.write(b"0\r\n\r\n")
        return status, classify(status, None)

    def _write_own(self, status: int, body: bytes, tags: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        """A response the gateway makes itself (MLflow's JSON error shape)."""
        if self.transport is not None:
            headers = [_JSON, self.fast.date(), *tags]
            self.transport.write(response_head(status, headers, len(body), keep_alive) + body)


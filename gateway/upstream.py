"""A lean pooled HTTP/1.1 client for talking to model servers.

aiohttp's ClientSession costs about 110 µs of CPU per proxied request (measured), most of the
gateway's budget. This client does only what a reverse proxy needs: keep-alive connections on
asyncio protocols, responses parsed by llhttp (httptools, as uvicorn uses), bodies streamed in
both directions with back-pressure, and every failure reported as one :class:`UpstreamError` kind.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass

import httptools

from .flow import FlowControl
from .loops import Loop, Loops

log = logging.getLogger(__name__)

Headers = Sequence[tuple[bytes, bytes]]

# Pause reading from the upstream once this much response body waits for a slow client.
_READ_HIGH_WATER = 256 * 1024
# A model server's response head is a few hundred bytes; one that keeps sending header lines is
# broken or hostile, and would otherwise grow the gateway's memory until the read timeout.
MAX_RESPONSE_HEAD = 64 * 1024
MAX_RESPONSE_HEADERS = 256


def _head_overflows(data: bytes, room: int) -> bool:
    """Whether the response head does not end within the first ``room`` bytes of ``data`` (only asked
    once a response has outgrown the head limit, so the body that follows a small head still fits)."""
    return room < 0 or data.find(b"\r\n\r\n", 0, room + 4) < 0


class UpstreamError(Exception):
    """A request that could not be completed by the upstream; ``kind`` names the failure for metrics."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def is_timeout(self) -> bool:
        """Timeouts map to 504 (a full pool to 503, everything else to 502)."""
        return self.kind.endswith("timeout")


# The kind of a request refused because every connection to the upstream is busy: the model server
# never saw it, so it is the gateway's overload, not the model's failure.
POOL_FULL = "pool_full"
# Every replica of the deployment is ejected (a gateway-side refusal, like a full pool).
NO_REPLICA = "no_replica"
# Failures after which the request provably never left the gateway: it may go to another replica.
NOTHING_SENT = frozenset({POOL_FULL, "connect_timeout", "connect_refused", "connect_error"})


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Waits on an upstream, in seconds: a free pool slot, connect, each read or write, the whole request."""

    connect: float = 2.0
    read: float = 60.0
    total: float = 120.0
    pool: float = 1.0


class _Connection(FlowControl):
    """One keep-alive connection; carries at most one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        # In the pool: any byte that arrives now belongs to no request, so the connection is spoiled.
        self.idle = False
        self._reading_paused = False
        self._reset_message()
        self._lost = False
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._wait_timeout = 0.0
        self._wait_kind = ""

    def _reset_message(self) -> None:
        if self._reading_paused:
            # Paused while a slow client held back the last body: the next response must be read.
            self._reading_paused = False
            if self.transport is not None:
                self.transport.resume_reading()
        self.status = 0
        self._head_bytes = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: bytes | None = None
        # The response says where its body ends (Content-Length or chunked), else the close does.
        self.framed = False
        self.headers_done = False
        self.complete = False
        self.error: UpstreamError | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._until_close = False
        self._interim = False
        self.keep_alive = False
        # Set when we stopped sending a request body midway: the connection is out of step.
        self.truncated = False
        # Set when bytes followed the end of the response: the connection is out of step.
        self.overrun = False

    # --- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.idle:
            # Nothing was asked: a stale or unsolicited answer must never reach the next request.
            self.close()
            return
        if not self.headers_done:
            # Checked per read, before llhttp buffers it (one comparison while the head is small).
            before = self._head_bytes
            self._head_bytes += len(data)
            if self._head_bytes > MAX_RESPONSE_HEAD and _head_overflows(data, MAX_RESPONSE_HEAD - before):
                self._fail(UpstreamError("protocol", f"upstream response head exceeds {MAX_RESPONSE_HEAD} bytes"))
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("protocol", "upstream tried to upgrade the connection"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError("protocol", f"malformed response from upstream: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._lost = True
        self._disarm()
        if not self.complete and self.error is None:
            if self.headers_done and self._until_close:
                # A body delimited by the connection's end is complete when the connection ends.
                self.complete = True
                self._wake()
            else:
                self._fail(UpstreamError("reset", "upstream closed the connection"))

    # --- httptools callbacks ----------------------------------------------------------------
    # Bytes after the end of the response (a second answer nobody asked for) are parsed by llhttp in
    # the same read; every callback ignores them, and the connection is not reused.
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            self.overrun = True
            return
        self.headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-length":
            self.content_length = value
            self.framed = True
        elif lowered == b"transfer-encoding":
            self.framed = True

    def on_headers_complete(self) -> None:
        if self.complete:
            self.overrun = True
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): consumed here, never taken as the
            # response (101 never gets here: llhttp reports it as an upgrade, a protocol error).
            self._interim = True
            return
        if len(self.headers) > MAX_RESPONSE_HEADERS:
            self._fail(UpstreamError("protocol", f"upstream response has more than {MAX_RESPONSE_HEADERS} headers"))
            return
        self.status = status
        # llhttp only answers this reliably before the message completes.
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        self._until_close = not self.framed
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self.overrun = True
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _READ_HIGH_WATER and not self._reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def on_message_complete(self) -> None:
        if self.complete:
            self.overrun = True
            return
        if self._interim:
            self._interim = False
            self.headers = []
            self.content_length = None
            self.framed = False
            return
        self.complete = True
        self._wake()

    # --- helpers ----------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        """Still open and not mid-message."""
        return not self._lost and self.transport is not None and not self.transport.is_closing()

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout: float, kind: str) -> None:
        """Wait for the next parser event or failure, at most ``timeout`` seconds."""
        if self.error is not None:
            raise self.error
        loop = self.loop
        deadline = loop.time() + timeout
        self._deadline, self._wait_timeout, self._wait_kind = deadline, timeout, kind
        # A lazy timer, as aiohttp's keep-alive timer: armed once and moved only when it would fire
        # too late. Arming and cancelling one per wait cost 1.6 µs a request with uvloop.
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._on_timer)
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        if self.error is not None:
            raise self.error

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nothing waits: stay disarmed until the next wait
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        self._fail(UpstreamError(self._wait_kind, f"upstream did not answer within {self._wait_timeout:.3g} s"))

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def write(self, data: bytes, timeout: float) -> None:
        """Send bytes, waiting (at most ``timeout`` s) while the upstream does not take them."""
        if not self.usable:
            raise self.error or UpstreamError("reset", "upstream closed the connection")
        assert self.transport is not None
        self.transport.write(data)
        if not self.writable:
            if not await self.drained(timeout):
                self.close()
                raise UpstreamError("write_timeout", f"upstream did not take the request body within {timeout:.3g} s")
            if self.error is not None:
                raise self.error

    def take_chunk(self) -> bytes:
        """Everything buffered so far, resuming the socket if it was paused."""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        """Abort the connection; it will not be reused."""
        self._lost = True
        self._disarm()
        if self.transport is not None:
            self.transport.abort()


class UpstreamResponse:
    """Status, headers and a body to read whole or stream; :meth:`release` must be called once."""

    __slots__ = ("status", "headers", "length", "_conn", "_pool", "_key", "_deadline", "_timeouts", "_released")

    def __init__(self, conn: _Connection, pool: UpstreamPool, key: tuple[str, int], deadline: float) -> None:
        self.status = conn.status
        self.headers: list[tuple[bytes, bytes]] = conn.headers
        raw = conn.content_length
        # The body's declared length, or None when it is chunked or runs until the connection closes.
        self.length = int(raw) if raw is not None and raw.isdigit() else None
        self._conn = conn
        self._pool = pool
        self._key = key
        self._deadline = deadline
        self._released = False

    @property
    def complete(self) -> bool:
        """The whole body has arrived."""
        return self._conn.complete

    def small(self, limit: int) -> bool:
        """Read whole rather than streamed: already complete, or declared no longer than ``limit``."""
        return self._conn.complete or (self.length is not None and self.length <= limit)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (already de-chunked)."""
        conn = self._conn
        while True:
            if conn._chunks:
                yield conn.take_chunk()
                continue
            if conn.complete:
                return
            await conn._wait(self._pool._read_wait(self._deadline), "read_timeout")

    async def read(self) -> bytes:
        """The whole body."""
        if self._conn.complete:
            return self._conn.take_chunk()
        parts = [chunk async for chunk in self.iter_chunks()]
        return b"".join(parts)

    def release(self) -> None:
        """Return the connection to the pool if the exchange completed cleanly, else close it."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        # Not after a 5xx either: uvicorn (under mlflow models serve) answers an unhandled exception with
        # a 500 and then closes without saying so, and the next request would race that close.
        reusable = (
            conn.complete and conn.error is None and not conn.truncated and not conn.overrun
            and conn.framed and conn.usable and conn.keep_alive and conn.status < 500
        )
        self._pool._put_back(self._key, conn, reusable)


class UpstreamPool:
    """Keep-alive connections per (host, port), bounded, with idle ones closed before the server does.

    The rules that keep one client's answer from ever reaching another: a connection goes back to
    the pool only after its response was read completely with consistent framing and its reading
    resumed; a byte arriving while it is idle spoils it; a request whose body streams (and so
    cannot be replayed) always gets a fresh connection; a request held whole may use a pooled one
    and is retried once on a fresh one if the pooled one proves closed before any answer.
    """

    def __init__(self, timeouts: Timeouts, keepalive: float = 2.0, max_per_host: int = 256,
                 loops: Loops | None = None) -> None:
        self.timeouts = timeouts
        self.keepalive = keepalive
        self.max_per_host = max_per_host
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        # Requests waiting for a slot, per upstream: while there are any, a finished connection is not idled.
        self._waiting: dict[tuple[str, int], int] = {}
        self.loops = loops or Loops()
        self._reaper: Loop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def open_connections(self) -> int:
        """Connections currently open (busy or idle), for the steadiness benchmark and metrics."""
        return sum(self.max_per_host - s._value for s in self._slots.values())

    async def start(self) -> None:
        """Start the idle-connection reaper."""
        self._loop = asyncio.get_running_loop()
        self._reaper = self.loops.every("upstream-reaper", self.keepalive / 2, self._reap_once)

    async def close(self) -> None:
        """Stop the reaper and close every idle connection (busy ones close when released)."""
        self._closed = True
        if self._reaper is not None:
            await self.loops.cancel(self._reaper)
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    async def _reap_once(self) -> None:
        self._reap()

    def _reap(self) -> None:
        assert self._loop is not None
        cutoff = self._loop.time() - self.keepalive
        for key, conns in self._idle.items():
            keep = [c for c in conns if c.idle_since > cutoff and c.usable]
            for conn in conns:
                if conn not in keep:
                    conn.close()
                    self._slots[key].release()
            conns[:] = keep

    def _remaining(self, deadline: float, limit: float) -> float:
        """``limit``, or less when the whole request's deadline is nearer; raises once it passed."""
        loop = self._loop or asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise UpstreamError("total_timeout", "upstream request exceeded the total timeout")
        return min(limit, remaining)

    def _read_wait(self, deadline: float) -> float:
        return self._remaining(deadline, self.timeouts.read)

    def _take_idle(self, key: tuple[str, int]) -> _Connection | None:
        """A pooled keep-alive connection still fit to use, if any (no coroutine on the hot path)."""
        idle = self._idle.get(key)
        if not idle:
            return None
        assert self._loop is not None
        cutoff = self._loop.time() - self.keepalive
        while idle:
            conn = idle.pop()
            if conn.usable and conn.idle_since > cutoff:
                conn.idle = False
                return conn
            conn.close()
            self._slots[key].release()
        return None

    def _evict_idle(self, key: tuple[str, int]) -> None:
        """Close one idle connection so a fresh one can take its slot."""
        idle = self._idle.get(key)
        if idle:
            idle.pop(0).close()
            self._slots[key].release()

    async def _connect(self, key: tuple[str, int], deadline: float) -> _Connection:
        """A new connection, once a slot under ``max_per_host`` is free (waiting at most the pool timeout)."""
        loop = self._loop or asyncio.get_running_loop()
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = asyncio.Semaphore(self.max_per_host)
        if slots.locked():
            self._evict_idle(key)
        pool_wait = self._remaining(deadline, self.timeouts.pool)
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            async with asyncio.timeout(pool_wait):
                await slots.acquire()
        except TimeoutError:
            raise UpstreamError(
                POOL_FULL,
                f"all {self.max_per_host} connections to {key[0]}:{key[1]} stayed busy for {pool_wait:.3g} s",
            ) from None
        finally:
            self._waiting[key] -= 1
        connect_wait = self._remaining(deadline, self.timeouts.connect)
        try:
            async with asyncio.timeout(connect_wait):
                _, conn = await loop.create_connection(lambda: _Connection(loop), key[0], key[1])
        except BaseException as exc:
            slots.release()
            if isinstance(exc, TimeoutError):
                raise UpstreamError("connect_timeout", f"could not connect to {key[0]}:{key[1]} within {connect_wait:.3g} s") from None
            if isinstance(exc, ConnectionRefusedError):
                raise UpstreamError("connect_refused", f"connection refused by {key[0]}:{key[1]}") from None
            if isinstance(exc, OSError):
                raise UpstreamError("connect_error", f"cannot connect to {key[0]}:{key[1]}: {exc.strerror or exc}") from None
            raise
        return conn

    def _put_back(self, key: tuple[str, int], conn: _Connection, reusable: bool) -> None:
        if reusable and not self._closed and not self._waiting.get(key):
            # llhttp is at a message boundary here, ready for the next response on this connection.
            conn._reset_message()
            assert self._loop is not None
            conn.idle_since = self._loop.time()
            conn.idle = True
            self._idle.setdefault(key, []).append(conn)
        else:
            # Closed, also when a request waits for a slot: its slot goes to that request (which connects
            # afresh) rather than idling for whoever arrives next while the waiter times out.
            conn.close()
            self._slots[key].release()

    async def request(
        self,
        host: str,
        port: int,
        head: bytes,
        body: bytes | AsyncIterable[bytes],
        *,
        chunked: bool = False,
        deadline: float | None = None,
    ) -> UpstreamResponse:
        """Send one request and return once the final response head arrived (1xx are consumed).

        ``head`` is the request line and headers, ending in a blank line, framing the body as the
        client did: a Content-Length, or (``chunked``) Transfer-Encoding: chunked for a body streamed
        in chunk framing. ``deadline`` (loop time) bounds the whole exchange; default: now plus the
        total timeout.
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.timeouts.total
        key = (host, port)
        # A streamed body never rides a connection that may have died idle. Nothing is ever retried: a
        # model server that got the request may have run it before the connection broke (a POST is not
        # replayable once written, as in Go's http.Transport); the idle keep-alive (2 s) stays under
        # uvicorn's 5 s so the server does not close a pooled connection under a request.
        conn = (self._take_idle(key) if isinstance(body, bytes) else None) or await self._connect(key, deadline)
        try:
            if isinstance(body, bytes):
                if len(body) < 65536:
                    await conn.write(head + body, self._read_wait(deadline))
                else:
                    await conn.write(head, self._read_wait(deadline))
                    await conn.write(body, self._read_wait(deadline))
            else:
                await conn.write(head, self._read_wait(deadline))
                await self._send_stream(conn, body, chunked, deadline)
            while not conn.headers_done:
                await conn._wait(self._read_wait(deadline), "read_timeout")
        except BaseException:
            # Failed, cancelled, or the client's body stream failed: the connection is mid-message.
            self._put_back(key, conn, False)
            raise
        return UpstreamResponse(conn, self, key, deadline)

    async def _send_stream(self, conn: _Connection, body: AsyncIterable[bytes], chunked: bool, deadline: float) -> None:
        async for chunk in body:
            if not chunk:
                continue
            await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk, self._read_wait(deadline))
            if conn.headers_done:
                # The upstream answered before reading everything (e.g. its own 413): stop sending.
                conn.truncated = True
                return
        if chunked:
            await conn.write(b"0\r\n\r\n", self._read_wait(deadline))

"""The data plane's own HTTP/1.1 connection handler: plain prediction requests skip aiohttp's request objects.

Every client connection on the data-plane port starts here. A request that is a ``POST`` to a scoring
endpoint (``[/models/{service}]/invocations`` or ``[/models/{service}]/deployments/{name}/invocations``) over HTTP/1.1, framed by a Content-Length within the
small-body limit and without Expect or Upgrade (nearly every scoring request), is parsed by llhttp
and relayed between the sockets by the proxy's own parts. The first request that is anything else
(the admin API, /metrics, a chunked or large body, HTTP/1.0, Upgrade, a malformed or oversized head)
hands the connection, with every byte not yet consumed, to aiohttp's handler (``aiohttp_handler``),
which serves it from then on under the same limits. Both paths share routing, metrics, traffic and
the upstream pool.

Every wait on the client has a deadline, kept by one lazily moved timer per connection: a new
connection owes a complete head within ``header_timeout`` of its first byte (a new connection, of
its opening), a small body must keep arriving within ``client_timeout``, an idle keep-alive
connection closes after ``keepalive_timeout``, a client that stops reading its answer is dropped
after ``client_timeout``, and ``total_timeout`` bounds a whole exchange from the head's first byte.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httptools

from . import errors
from .classify import classify
from .flow import FlowControl
from .http1 import (
    BODY_TIMEOUT, HEADER_TIMEOUT, MAX_LINE_BYTES, NOT_READING, BadRequests, DateHeader, RequestHead, ServerLimits,
    plausible_partial_head, refusal, response_head,
)
from .attribution import Replay
from .metrics import CLIENT_ERROR, MODEL_ERROR, OVERLOADED, UPSTREAM_ERROR
from .proxy import (
    CLIENT_CLOSED,
    SMALL_BODY,
    Proxy,
    Refusal,
    Split,
    Unanswered,
    build_request_head,
    read_small,
    scoring_path,
    upstream_header_pairs,
)
from .upstream import POOL_FULL, UpstreamError, UpstreamResponse

log = logging.getLogger(__name__)

# A head longer than this goes to aiohttp, which bounds each line to 8190 bytes and the whole head to
# max_head_bytes; scoring requests' heads are a few hundred bytes.
MAX_HEAD = MAX_LINE_BYTES
# Pipelined bytes buffered while a request is in flight before the socket stops being read.
_PIPELINE_HIGH_WATER = 2 * SMALL_BODY + MAX_HEAD

_NOT_OURS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
_JSON = (b"Content-Type", b"application/json")
# Recorded for a client that stopped reading its answer (the response was cut off).
CLIENT_TIMEOUT = 408


class _ClientStalled(Exception):
    """The client stopped reading its answer for longer than the client timeout."""


class FastPath:
    """Protocol factory for the data-plane listener; tracks its connections so shutdown can drain them."""

    def __init__(self, proxy: Proxy, limits: ServerLimits, bad_requests: BadRequests) -> None:
        self.proxy = proxy
        self.limits = limits
        self.bad_requests = bad_requests
        self.small_body = min(SMALL_BODY, proxy.max_body_bytes)
        # aiohttp's protocol factory (guarded handlers), bound once the runner is set up.
        self.fallback: Callable[[], asyncio.Protocol] | None = None
        self.connections: set[_ServerConnection] = set()
        self.closing = False
        self.date = DateHeader()

    def __call__(self) -> asyncio.Protocol:
        return _ServerConnection(self, asyncio.get_running_loop())

    def begin_drain(self) -> None:
        """Answer no new request: idle connections close now, busy ones after their response."""
        self.closing = True
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()

    def busy(self) -> int:
        """Requests being relayed right now."""
        return sum(1 for conn in self.connections if conn.busy)

    def abort_all(self) -> None:
        """Drop every connection still open (the drain's time is up)."""
        for conn in list(self.connections):
            conn.abort()


class _ServerConnection(FlowControl):
    """One client connection, until it closes or is handed to aiohttp."""

    def __init__(self, fast: FastPath, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.fast = fast
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.remote = b"unknown"
        self.busy = False
        self._task: asyncio.Task[None] | None = None
        self._eof = False
        self._reading_paused = False
        # Loop time of the first byte of the request being received (None while idle or busy).
        self._head_started: float | None = None
        self._awaiting_body = False
        self._last_data = 0.0
        self._idle_since = 0.0
        self._requests = 0
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.remote = str(peer[0]).encode("latin-1")
        self.fast.connections.add(self)
        now = self.loop.time()
        # A new connection owes its first head within the header timeout.
        self._head_started = self._last_data = now
        self._timer = self.loop.call_at(now + self.fast.limits.header_timeout, self._on_timer)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.busy:
            if len(self.buffer) > _PIPELINE_HIGH_WATER and not self._reading_paused and self.transport is not None:
                self.transport.pause_reading()
                self._reading_paused = True
            return
        now = self.loop.time()
        self._last_data = now
        if self._head_started is None:
            self._head_started = now
        self._next()
        if not self.busy and self.buffer and self.transport is not None:
            # A request that did not arrive in one read: make sure its deadline is watched.
            self._arm(self._receiving_due())

    def eof_received(self) -> bool:
        self._eof = True
        # Keep the socket open for writing while a response is on its way; else close it.
        return self.busy

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.fast.connections.discard(self)
        self._disarm()
        if self._task is not None and not self._task.done():
            # The client went away: stop waiting for its answer (recorded as 499).
            self._task.cancel()

    # --- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Close once buffered output is sent."""
        self._disarm()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close now."""
        self._disarm()
        if self.transport is not None:
            self.transport.abort()

    def _hand_off(self) -> None:
        """Give the connection, with every byte not yet consumed, to aiohttp for the rest of its life."""
        transport = self.transport
        fallback = self.fast.fallback
        self.fast.connections.discard(self)
        self._disarm()
        if transport is None or transport.is_closing():
            return
        if fallback is None:
            transport.abort()
            return
        data, self.buffer = bytes(self.buffer), bytearray()
        handler = fallback()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._head_started is not None and data:
            # The head's deadline runs from its first byte, not from the hand-off.
            handler.continue_head(self._head_started)  # type: ignore[attr-defined]
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if data:
            handler.data_received(data)  # type: ignore[attr-defined]
        if self._eof and not handler.eof_received():  # type: ignore[attr-defined]
            transport.close()

    # --- the one timer: head, body, idle ----------------------------------------------------
    def _arm(self, due: float) -> None:
        timer = self._timer
        if timer is None or timer.when() > due:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(due, self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _receiving_due(self) -> float:
        """When the request being received runs out of time: its head, or the next piece of its body."""
        limits = self.fast.limits
        assert self._head_started is not None
        if self._awaiting_body:
            return min(self._last_data + limits.client_timeout, self._head_started + limits.total_timeout)
        return self._head_started + limits.header_timeout

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        limits = self.fast.limits
        now = self.loop.time()
        if self.busy:
            # The relay keeps its own deadlines; look again later.
            due = now + limits.header_timeout
        elif self._head_started is not None:
            due = self._receiving_due()
            if now >= due:
                if not self.buffer and self._requests == 0:
                    self.close()  # connected and said nothing: no one to answer
                else:
                    self._refuse(BODY_TIMEOUT if self._awaiting_body else HEADER_TIMEOUT)
                return
        else:
            due = self._idle_since + limits.keepalive_timeout
            if now >= due:
                self.close()
                return
        self._timer = self.loop.call_at(due, self._on_timer)

    def _refuse(self, reason: str) -> None:
        self.fast.bad_requests.record(reason, self.remote.decode("latin-1"))
        if self.transport is not None:
            self.transport.write(refusal(reason, self.fast.limits))
        self.close()

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
            if len(buf) > MAX_HEAD or not plausible_partial_head(buf):
                self._hand_off()  # aiohttp answers an oversized or malformed head precisely
            elif self._eof:
                self.close()
            return
        head_length = end + 4
        head = RequestHead()
        parser = httptools.HttpRequestParser(head)
        try:
            parser.feed_data(bytes(buf[:head_length]))
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # HttpParserUpgrade is not an HttpParserError. aiohttp declines an upgrade and answers the
            # request; it also answers a malformed request with its precise 400.
            self._hand_off()
            return
        if not head.done or parser.get_http_version() != "1.1" or len(head.headers) > self.fast.limits.max_headers:
            self._hand_off()
            return
        path, _, query = head.url.partition(b"?")
        where = scoring_path(path)
        if where is None:
            self._hand_off()
            return
        length: int | None = None
        typed = False
        hosts = 0
        for name, value in head.headers:
            lowered = name.lower()
            if lowered == b"content-length":
                if length is not None or not value.isdigit():
                    self._hand_off()
                    return
                length = int(value)
            elif lowered == b"content-type":
                typed = True
            elif lowered == b"host":
                hosts += 1
            elif lowered in _NOT_OURS:
                self._hand_off()
                return
        # An HTTP/1.1 request without exactly one Host is malformed (RFC 9112 §3.2): aiohttp answers 400.
        if length is None or length > self.fast.small_body or hosts != 1:
            self._hand_off()
            return
        total = head_length + length
        if len(buf) < total:
            self._awaiting_body = True  # the body is still arriving
            if self._eof:
                self.close()
            return
        body = bytes(buf[head_length:total])
        del buf[:total]
        started = self._head_started if self._head_started is not None else self.loop.time()
        self._head_started = None
        self._awaiting_body = False
        self._requests += 1
        self.busy = True
        self._task = self.loop.create_task(
            self._serve(where, query, head.headers, body, parser.should_keep_alive(), started, typed)
        )

    async def _serve(
        self, where: tuple[str | None, str | None], query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
        keep_alive: bool, started: float, typed: bool,
    ) -> None:
        try:
            keep_alive = await self._relay(where, query, headers, body, keep_alive, started, typed)
            if keep_alive and not self.writable and not await self.drained(self.fast.limits.client_timeout):
                # Pipelining without reading: no next request is taken before these answers are read,
                # so the answers waiting here stay within the transport's high-water mark.
                self.fast.bad_requests.record(NOT_READING, self.remote.decode("latin-1"),
                                              f"answers unread for {self.fast.limits.client_timeout:g} s")
                self.abort()
                return
        except asyncio.CancelledError:
            return  # the connection is gone
        except Exception:
            log.exception("unexpected failure while relaying a request")
            self.abort()
            return
        finally:
            self._task = None
            self.busy = False
        if not keep_alive or self.fast.closing or (self._eof and not self.buffer):
            self.close()
            return
        self._idle_since = self.loop.time()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        if self.buffer:
            # Pipelined: the next request's deadline runs from now.
            self._head_started = self._last_data = self._idle_since
            self._next()
            if not self.busy and self.buffer and self.transport is not None:
                self._arm(self._receiving_due())
        else:
            # Usually a no-op: the timer is already due sooner and will look again then.
            self._arm(self._idle_since + self.fast.limits.keepalive_timeout)

    def _keep_alive(self, asked: bool) -> bool:
        """Whether the answer about to be written may leave the connection open."""
        return asked and not self.fast.closing and not (self._eof and not self.buffer)

    async def _relay(
        self, where: tuple[str | None, str | None], query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
        keep_alive: bool, started: float, typed: bool,
    ) -> bool:
        """Answer one request; returns whether the connection may carry another."""
        proxy = self.fast.proxy
        chosen = proxy.choose(*where) if typed else proxy.untyped(self.remote.decode("latin-1"))
        if isinstance(chosen, Refusal):
            tags = [(k.encode(), v.encode()) for k, v in chosen.tags().items()]
            keep_alive = self._keep_alive(keep_alive)
            self._write_own(chosen.status, chosen.body(), tags, keep_alive)
            return keep_alive
        if type(chosen) is Split:
            chosen = chosen.pick_from(headers)
        name = chosen.name
        tags = chosen.raw_tags
        dm = chosen.dm
        begun = proxy.begin(dm)
        code, outcome = CLIENT_CLOSED, CLIENT_ERROR
        deadline = started + self.fast.limits.total_timeout
        replica = None
        try:
            remote = self.remote
            try:
                replica, upstream = await proxy.send(
                    chosen, lambda target: build_request_head(headers, query, remote, b"http", target, len(body)), body,
                    deadline=deadline,
                )
            except UpstreamError as exc:
                status, error = errors.upstream_error(exc, name)
                code, outcome = status, (OVERLOADED if exc.kind == POOL_FULL else UPSTREAM_ERROR)
                proxy.upstream_failed(dm, exc)
                keep_alive = self._keep_alive(keep_alive)
                self._write_own(status, error, tags, keep_alive)
                return keep_alive
            try:
                keep_alive = self._keep_alive(keep_alive)
                code, outcome, answer = await self._respond(upstream, tags, keep_alive, deadline)
            except Unanswered as exc:
                status, error = errors.upstream_error(exc, name)
                code, outcome = status, UPSTREAM_ERROR
                proxy.upstream_failed(dm, exc, "answer broken off: ")
                self._write_own(status, error, tags, keep_alive)
                return keep_alive
            except UpstreamError as exc:
                # The head already went to the client: all we can do is cut the response short.
                code, outcome = 502, UPSTREAM_ERROR
                proxy.upstream_failed(dm, exc, "response broken off: ")
                self.abort()
                return False
            except _ClientStalled:
                code, outcome = CLIENT_TIMEOUT, CLIENT_ERROR
                self.abort()
                return False
            finally:
                upstream.release()
            if chosen.shadow is not None and proxy.shadows.wanted(chosen.shadow):
                proxy.mirror(chosen.shadow, Replay(headers, query, remote, b"http", body), code, answer,
                             self.loop.time() - begun)
            return keep_alive
        finally:
            if replica is not None:
                proxy.release(chosen.replicas, replica, code, outcome)
            if code == 400 and outcome == MODEL_ERROR and where[1] is None:
                proxy.end(dm, begun, code, outcome, Replay(headers, query, self.remote, b"http", body))
            else:
                proxy.end(dm, begun, code, outcome)

    async def _respond(
        self, upstream: UpstreamResponse, tags: list[tuple[bytes, bytes]], keep_alive: bool, deadline: float
    ) -> tuple[int, str, bytes | None]:
        """Relay the answer; also returns its body when it was small enough to be held whole."""
        transport = self.transport
        assert transport is not None
        status = upstream.status
        headers = upstream_header_pairs(upstream) + tags
        length = upstream.length
        if upstream.small(SMALL_BODY):
            body = await read_small(upstream)
            transport.write(response_head(status, headers, len(body), keep_alive) + body)
            return status, classify(status, body if status >= 400 else None), body
        transport.write(response_head(status, headers, length, keep_alive))
        async for chunk in upstream.iter_chunks():
            transport.write(chunk if length is not None else b"%x\r\n%b\r\n" % (len(chunk), chunk))
            if not self.writable:
                timeout = min(self.fast.limits.client_timeout, deadline - self.loop.time())
                if not await self.drained(timeout):
                    raise _ClientStalled()
        if length is None:
            transport.write(b"0\r\n\r\n")
        return status, classify(status, None), None

    def _write_own(self, status: int, body: bytes, tags: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        """A response the gateway makes itself (MLflow's JSON error shape)."""
        if self.transport is not None:
            headers = [_JSON, self.fast.date(), *tags]
            self.transport.write(response_head(status, headers, len(body), keep_alive) + body)

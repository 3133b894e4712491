"""The data plane: forward ``/invocations`` to the active (or a named) deployment, streaming both ways."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.streams import StreamReader

from . import errors
from .classify import classify
from .metrics import CLIENT_ERROR, UPSTREAM_ERROR, GatewayMetrics
from .records import Snapshot
from .traffic import Traffic
from .upstream import UpstreamError, UpstreamPool, UpstreamResponse
from .watcher import RouteWatcher

log = logging.getLogger(__name__)

# Bodies up to this size are read whole (one write upstream, one response object back); larger
# ones stream, so a 50 MB batch never sits in the gateway's memory.
SMALL_BODY = 64 * 1024

# Hop-by-hop headers (RFC 9110 §7.6.1) never cross the proxy, in either direction; neither do the
# headers a Connection header names, nor any Proxy-* header.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
# Request headers the gateway writes itself.
_REQUEST_OWNED = frozenset({b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto"})
# Response headers aiohttp derives from the body it sends.
_RESPONSE_OWNED = frozenset({b"content-length"})

DEPLOYMENT_HEADER = "X-Turnout-Deployment"
GENERATION_HEADER = "X-Turnout-Generation"

# A client that went away mid-request: logged as 499 (nginx's convention), never an upstream fault.
CLIENT_CLOSED = 499


@dataclass(frozen=True, slots=True)
class Target:
    """Where a deployment's URL points, pre-encoded for the request head."""

    host: str
    port: int
    host_header: bytes
    path: bytes


def parse_target(url: str) -> Target:
    """Split a deployment URL (``http://host:port[/prefix]``) into what the upstream client needs."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"deployment URL must be http://host:port, got {url!r}")
    port = parts.port or 80
    return Target(
        host=parts.hostname,
        port=port,
        host_header=parts.netloc.encode("latin-1"),
        path=(parts.path.rstrip("/") + "/invocations").encode("latin-1"),
    )


def _dropped(headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]) -> frozenset[bytes]:
    """Hop-by-hop names plus whatever the Connection header lists."""
    named = [
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    ]
    return HOP_BY_HOP.union(named) if named else HOP_BY_HOP


def request_head(request: web.Request, target: Target, length: int | None) -> bytes:
    """The upstream request line and headers: hop-by-hop stripped, X-Forwarded-* set, framing ours."""
    raw = request.raw_headers
    drop = _dropped(raw)
    lines = [b"POST ", target.path]
    if request.query_string:
        lines += [b"?", request.raw_path.partition("?")[2].encode("latin-1")]
    lines += [b" HTTP/1.1\r\nHost: ", target.host_header, b"\r\n"]
    forwarded_for = []
    for name, value in raw:
        lowered = name.lower()
        if lowered in drop or lowered in _REQUEST_OWNED or lowered.startswith(b"proxy-"):
            if lowered == b"x-forwarded-for":
                forwarded_for.append(value)
            continue
        lines += [name, b": ", value, b"\r\n"]
    forwarded_for.append((request.remote or "unknown").encode("latin-1"))
    lines += [b"X-Forwarded-For: ", b", ".join(forwarded_for), b"\r\n"]
    lines += [b"X-Forwarded-Proto: ", request.scheme.encode("latin-1"), b"\r\n"]
    if length is None:
        lines.append(b"Transfer-Encoding: chunked\r\n\r\n")
    else:
        lines += [b"Content-Length: ", str(length).encode(), b"\r\n\r\n"]
    return b"".join(lines)


def response_headers(upstream: UpstreamResponse, deployment: str, generation: str) -> list[tuple[str, str]]:
    """Upstream response headers minus hop-by-hop ones, plus Turnout's own."""
    out = []
    named: list[bytes] = []
    for name, value in upstream.headers:
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in _RESPONSE_OWNED or lowered.startswith(b"proxy-"):
            if lowered == b"connection":
                named += [token.strip().lower() for token in value.split(b",")]
            continue
        out.append((name.decode("latin-1"), value.decode("latin-1")))
    if named:
        # Rare (uvicorn sends no Connection header on keep-alive): drop what it names.
        out = [(n, v) for n, v in out if n.lower().encode("latin-1") not in named]
    out.append((DEPLOYMENT_HEADER, deployment))
    out.append((GENERATION_HEADER, generation))
    return out


async def _limited(content: StreamReader, limit: int) -> AsyncIterator[bytes]:
    """Stream a request body, failing as soon as it grows past ``limit`` (chunked bodies have no length)."""
    total = 0
    async for chunk in content.iter_any():
        total += len(chunk)
        if total > limit:
            raise errors.BodyTooLarge(limit)
        yield chunk


class _ClientGone(Exception):
    """The client disconnected; nothing more can be sent to it."""


class Proxy:
    """Request handlers of the data plane."""

    def __init__(
        self, watcher: RouteWatcher, pool: UpstreamPool, metrics: GatewayMetrics, traffic: Traffic, max_body_bytes: int
    ) -> None:
        self.watcher = watcher
        self.pool = pool
        self.metrics = metrics
        self.traffic = traffic
        self.max_body_bytes = max_body_bytes
        self._targets: dict[str, Target] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _target(self, url: str) -> Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) > 1024:
                self._targets.clear()
            target = self._targets[url] = parse_target(url)
        return target

    async def invocations(self, request: web.Request) -> web.StreamResponse:
        """``POST /invocations``: the active deployment of the snapshot current when the request arrived."""
        snapshot = self.watcher.snapshot
        if snapshot is None:
            return errors.error_response(
                503, errors.TEMPORARILY_UNAVAILABLE, "the gateway has not read a route yet; retry shortly"
            )
        name = snapshot.route.active
        if name is None:
            return errors.error_response(503, errors.TEMPORARILY_UNAVAILABLE, "no deployment is active yet")
        return await self._forward(request, snapshot, name)

    async def pinned(self, request: web.Request) -> web.StreamResponse:
        """``POST /deployments/{name}/invocations``: one named deployment, e.g. green before the flip."""
        snapshot = self.watcher.snapshot
        name = request.match_info["name"]
        if snapshot is None:
            return errors.error_response(
                503, errors.TEMPORARILY_UNAVAILABLE, "the gateway has not read a route yet; retry shortly"
            )
        if name not in snapshot.deployments:
            return errors.error_response(404, errors.RESOURCE_DOES_NOT_EXIST, f"no deployment named {name!r}")
        return await self._forward(request, snapshot, name)

    async def _forward(self, request: web.Request, snapshot: Snapshot, name: str) -> web.StreamResponse:
        generation = str(snapshot.route.generation)
        tags = {DEPLOYMENT_HEADER: name, GENERATION_HEADER: generation}
        dep = snapshot.deployments.get(name)
        if dep is None or dep.url is None or not snapshot.is_ready(name):
            state = snapshot.effective_state(name)
            detail = "is unknown" if state is None else f"is {state.value}" + (f": {dep.reason}" if dep and dep.reason else "")
            return errors.error_response(
                503, errors.TEMPORARILY_UNAVAILABLE, f"deployment {name!r} {detail}", headers=tags, deployment=name
            )
        target = self._target(dep.url)

        # Frame the upstream body as the client framed it; refuse an announced oversize body unread.
        length = request.content_length
        body: bytes | AsyncIterator[bytes]
        if length is not None and length > self.max_body_bytes:
            return errors.body_too_large_response(self.max_body_bytes, tags)
        if length is not None and length <= SMALL_BODY:
            content = request.content
            if content.is_eof():
                # The whole body came with the head (the usual case): take it without read()'s loop.
                body = content.read_nowait()
            else:
                try:
                    body = await request.read()
                except ConnectionError:
                    return web.Response(status=CLIENT_CLOSED)
        elif length is not None or request.body_exists:
            body = _limited(request.content, self.max_body_bytes)
        else:
            body, length = b"", 0

        dm = self.metrics.deployment(name)
        # Cached: on Python 3.11 every get_running_loop() is a getpid() system call.
        loop = self._loop or self._bind_loop()
        started = loop.time()
        dm.inflight += 1
        code, outcome = 0, CLIENT_ERROR
        try:
            try:
                upstream = await self.pool.request(
                    target.host, target.port, request_head(request, target, length), body, chunked=length is None
                )
            except UpstreamError as exc:
                code, outcome = (504 if exc.is_timeout else 502), UPSTREAM_ERROR
                dm.upstream_error(exc.kind)
                log.warning("deployment %s: %s", name, exc)
                return errors.upstream_error_response(exc, name, tags)
            except errors.BodyTooLarge as exc:
                code = 413
                return errors.body_too_large_response(exc.limit, tags)
            except ConnectionError:
                code = CLIENT_CLOSED
                return web.Response(status=CLIENT_CLOSED)
            try:
                code, outcome, response = await self._respond(request, upstream, name, generation)
            except UpstreamError as exc:
                # Headers already went to the client: all we can do is cut the response short.
                code, outcome = 502, UPSTREAM_ERROR
                dm.upstream_error(exc.kind)
                log.warning("deployment %s: response broken off: %s", name, exc)
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=502)
            except _ClientGone:
                code, outcome = CLIENT_CLOSED, CLIENT_ERROR
                return web.Response(status=CLIENT_CLOSED)
            finally:
                upstream.release()
            return response
        finally:
            elapsed = loop.time() - started
            dm.inflight -= 1
            dm.observe(code, outcome, elapsed)
            self.traffic.record(name, outcome, elapsed)

    async def _respond(
        self, request: web.Request, upstream: UpstreamResponse, name: str, generation: str
    ) -> tuple[int, str, web.StreamResponse]:
        status = upstream.status
        headers = response_headers(upstream, name, generation)
        raw_length = upstream.content_length
        length = int(raw_length) if raw_length is not None and raw_length.isdigit() else None
        if upstream.complete or (length is not None and length <= SMALL_BODY):
            body = await upstream.read()
            return status, classify(status, body if status >= 400 else None), web.Response(
                status=status, body=body, headers=headers
            )
        response = web.StreamResponse(status=status, headers=headers)
        if length is not None:
            response.content_length = length
        try:
            await response.prepare(request)
            async for chunk in upstream.iter_chunks():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError as exc:
            raise _ClientGone() from exc
        return status, classify(status, None), response

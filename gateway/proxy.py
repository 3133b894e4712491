"""The data plane: forward ``/invocations`` to the active (or a named) deployment, streaming both ways."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader

from . import errors
from .aiohttp_handler import HEAD_STARTED, abandon_body
from .attribution import Attribution, Replay
from .balancer import Balancer, OutlierPolicy, Replica, ReplicaSet
from .classify import classify
from .http1 import BODY_TIMEOUT, MALFORMED, MISSING_CONTENT_TYPE, BadRequests, LogBudget, ServerLimits
from .metrics import CLIENT_ERROR, MODEL_ERROR, OVERLOADED, UPSTREAM_ERROR, DeploymentMetrics, GatewayMetrics
from .records import DEFAULT_SERVICE, Snapshot
from .shadow import NOT_HELD, Shadows, ShadowTarget
from .traffic import Traffic
from .upstream import NO_REPLICA, NOTHING_SENT, POOL_FULL, UpstreamError, UpstreamPool, UpstreamResponse
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
# Request headers the gateway writes itself. Expect is answered by the gateway (100 Continue before
# it reads the body) and never forwarded: the upstream's own 100 would otherwise arrive too.
_REQUEST_OWNED = frozenset({b"host", b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-proto"})
# Response headers aiohttp derives from the body it sends.
_RESPONSE_OWNED = frozenset({b"content-length"})

SERVICE_HEADER = "X-Turnout-Service"
DEPLOYMENT_HEADER = "X-Turnout-Deployment"
GENERATION_HEADER = "X-Turnout-Generation"
# How many services an unknown-service 404 names.
_SERVICES_NAMED = 5
# Cached answers to "where does this request go", per (service, pinned deployment).
_CHOICES_KEPT = 4096

_MODELS = b"/models/"
_PINNED = b"/deployments/"
_INVOCATIONS = b"/invocations"


def scoring_path(path: bytes) -> tuple[str | None, str | None] | None:
    """(service or None for the default one, pinned deployment or None) of a scoring path, or None
    if it is not one: ``/invocations``, ``/deployments/{name}/invocations``,
    ``/models/{service}/invocations``, ``/models/{service}/deployments/{name}/invocations``."""
    service: str | None = None
    if path.startswith(_MODELS):
        rest = path[len(_MODELS) - 1:]
        end = rest.find(b"/", 1)
        if end < 0:
            return None
        raw = rest[1:end]
        if not _plain(raw):
            return None
        service, path = raw.decode("ascii"), rest[end:]
    if path == _INVOCATIONS:
        return service, None
    if path.startswith(_PINNED) and path.endswith(_INVOCATIONS):
        raw = path[len(_PINNED): -len(_INVOCATIONS)]
        if _plain(raw):
            return service, raw.decode("ascii")
    return None


def _plain(segment: bytes) -> bool:
    """A path segment that is a name as written (no escapes, slashes or non-ASCII)."""
    return bool(segment) and segment.isascii() and b"/" not in segment and b"%" not in segment

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
    if parts.username is not None or parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(f"deployment URL takes no user, query or fragment: {url!r}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port is None:
        port = 80
    elif not 1 <= port <= 65535:
        raise ValueError(f"deployment URL has a bad port (1-65535): {url!r}")
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


def build_request_head(
    raw: Sequence[tuple[bytes, bytes]], query: bytes, remote: bytes, scheme: bytes, target: Target, length: int | None
) -> bytes:
    """The upstream request line and headers: hop-by-hop stripped, X-Forwarded-* set, framing ours."""
    drop = _dropped(raw)
    lines = [b"POST ", target.path]
    if query:
        lines += [b"?", query]
    lines += [b" HTTP/1.1\r\nHost: ", target.host_header, b"\r\n"]
    forwarded_for = []
    for name, value in raw:
        lowered = name.lower()
        if lowered in drop or lowered in _REQUEST_OWNED or lowered.startswith(b"proxy-"):
            if lowered == b"x-forwarded-for":
                forwarded_for.append(value)
            continue
        lines += [name, b": ", value, b"\r\n"]
    forwarded_for.append(remote)
    lines += [b"X-Forwarded-For: ", b", ".join(forwarded_for), b"\r\n"]
    lines += [b"X-Forwarded-Proto: ", scheme, b"\r\n"]
    if length is None:
        lines.append(b"Transfer-Encoding: chunked\r\n\r\n")
    else:
        lines += [b"Content-Length: ", str(length).encode(), b"\r\n\r\n"]
    return b"".join(lines)


def request_head(request: web.Request, target: Target, length: int | None) -> bytes:
    """:func:`build_request_head` for a request aiohttp parsed."""
    return build_request_head(
        request.raw_headers,
        request.raw_path.partition("?")[2].encode("latin-1"),
        (request.remote or "unknown").encode("latin-1"),
        request.scheme.encode("latin-1"),
        target,
        length,
    )


def upstream_header_pairs(upstream: UpstreamResponse) -> list[tuple[bytes, bytes]]:
    """Upstream response headers minus hop-by-hop ones (and those its Connection header names)."""
    out = []
    named: list[bytes] = []
    for name, value in upstream.headers:
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in _RESPONSE_OWNED or lowered.startswith(b"proxy-"):
            if lowered == b"connection":
                named += [token.strip().lower() for token in value.split(b",")]
            continue
        out.append((name, value))
    if named:
        # Rare (uvicorn sends no Connection header on keep-alive): drop what it names.
        out = [(n, v) for n, v in out if n.lower() not in named]
    return out


def response_headers(upstream: UpstreamResponse, tags: dict[str, str]) -> list[tuple[str, str]]:
    """Upstream response headers minus hop-by-hop ones, plus Turnout's own."""
    out = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in upstream_header_pairs(upstream)]
    out.extend(tags.items())
    return out


@dataclass(frozen=True, slots=True)
class Refusal:
    """A prediction request the gateway answers itself, before any model server is involved."""

    status: int
    error_code: str
    message: str
    deployment: str | None = None
    generation: str | None = None
    service: str | None = None

    def tags(self) -> dict[str, str]:
        """The X-Turnout-* headers of what was chosen."""
        out = {SERVICE_HEADER: self.service} if self.service is not None else {}
        if self.deployment is not None and self.generation is not None:
            out[DEPLOYMENT_HEADER] = self.deployment
            out[GENERATION_HEADER] = self.generation
        return out

    def body(self) -> bytes:
        """MLflow's error shape."""
        extra = {"deployment": self.deployment} if self.deployment is not None and self.status == 503 else {}
        return errors.error_body(self.error_code, self.message, **extra)

    def response(self) -> web.Response:
        """As an aiohttp response."""
        return web.Response(status=self.status, body=self.body(), content_type="application/json", headers=self.tags())


NO_CONTENT_TYPE = Refusal(
    415, errors.BAD_REQUEST,
    "the request has no Content-Type header; send application/json, text/csv or application/vnd.apache.parquet",
)


class Choice:
    """Where requests go while a service's snapshot lasts: the deployment, its generation, its replicas,
    its pre-encoded headers and its metrics (built once per snapshot, not per request)."""

    __slots__ = ("service", "name", "generation", "replicas", "dm", "raw_tags", "_tags", "shadow")

    def __init__(self, service: str, name: str, generation: str, replicas: ReplicaSet[Target], dm: DeploymentMetrics) -> None:
        # Where copies of the requests it answers go (only the active deployment of an unpinned request has one).
        self.shadow: ShadowTarget | None = None
        self.service = service
        self.name = name
        self.generation = generation
        # Which replica serves a request is decided per request (in-flight counts change all the time).
        self.replicas = replicas
        self.dm = dm
        self._tags = {SERVICE_HEADER: service, DEPLOYMENT_HEADER: name, GENERATION_HEADER: generation}
        # The same headers as bytes, for the fast path's response heads.
        self.raw_tags = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self._tags.items()]

    def tags(self) -> dict[str, str]:
        """The X-Turnout-* headers of every answer to it."""
        return self._tags


# A split's share is decided in basis points: 10 % is buckets 0-999 of 10,000.
_BUCKETS = 10_000


class Split:
    """A service's requests divided between its active deployment and a candidate while a snapshot lasts.

    With a sticky header, a request's bucket is a hash of that header's value (salted with the service
    and the candidate, so each rollout draws its own cohort): the same on every gateway and process, and
    monotone, since a key is on the candidate exactly when its bucket is below the weight, so raising the
    weight only moves keys from the active to the candidate. Without the header (or its value) the draw
    is random.
    """

    __slots__ = ("active", "candidate", "threshold", "sticky", "sticky_raw", "_salt", "_random")

    def __init__(self, active: Choice, candidate: Choice, weight: float, sticky: str | None) -> None:
        self.active = active
        self.candidate = candidate
        self.threshold = round(weight * _BUCKETS / 100)
        self.sticky = sticky
        self.sticky_raw = sticky.encode("latin-1") if sticky else None
        self._salt = f"{candidate.service}\0{candidate.name}\0".encode()
        self._random = random.random

    def bucket(self, key: bytes | None) -> int:
        """Where a request falls in [0, 10,000): by its sticky key when it has one, else at random."""
        if key is None:
            return int(self._random() * _BUCKETS)
        digest = hashlib.blake2b(self._salt + key, digest_size=8).digest()
        return int.from_bytes(digest, "big") % _BUCKETS

    def pick(self, key: bytes | None) -> Choice:
        """The deployment for a request with this sticky key (None: none given)."""
        return self.candidate if self.bucket(key) < self.threshold else self.active

    def pick_from(self, headers: Sequence[tuple[bytes, bytes]]) -> Choice:
        """:meth:`pick` with the key read from raw request headers (the fast path's)."""
        wanted = self.sticky_raw
        key = None
        if wanted is not None:
            for name, value in headers:
                if len(name) == len(wanted) and name.lower() == wanted:
                    key = value.strip() or None
                    break
        return self.pick(key)


class _ClientStalled(Exception):
    """The client stopped sending its body for longer than the client timeout."""


class _ClientBody:
    """A streamed request body: each read bounded by the client timeout and the request's deadline,
    the total by ``max_body_bytes`` (chunked bodies have no length to check up front)."""

    def __init__(self, content: StreamReader, limit: int, timeout: float, deadline: float,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.content = content
        self.limit = limit
        self.timeout = timeout
        self.deadline = deadline
        self.loop = loop
        self.total = 0

    async def next(self) -> bytes:
        """The next piece (b"" at the end)."""
        wait = min(self.timeout, self.deadline - self.loop.time())
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                chunk = await self.content.readany()
        except TimeoutError:
            raise _ClientStalled() from None
        self.total += len(chunk)
        if self.total > self.limit:
            raise errors.BodyTooLarge(self.limit)
        return chunk

    async def stream(self, first: bytes) -> AsyncIterator[bytes]:
        """``first``, then the rest as it arrives."""
        chunk = first
        while chunk:
            yield chunk
            chunk = await self.next()


class Unanswered(UpstreamError):
    """The upstream broke off a small answer before the client got any of it: the gateway can still
    answer with an error of its own instead of cutting the connection."""

    @classmethod
    def of(cls, exc: UpstreamError) -> Unanswered:
        """The same failure, marked as one the client has not seen yet."""
        return cls(exc.kind, str(exc))


async def read_small(upstream: UpstreamResponse) -> bytes:
    """A small answer's whole body, read before anything is sent to the client."""
    try:
        return await upstream.read()
    except UpstreamError as exc:
        raise Unanswered.of(exc) from exc


class _ClientGone(Exception):
    """The client disconnected or stopped reading; nothing more can be sent to it."""


class Proxy:
    """Request handlers of the data plane."""

    def __init__(
        self, watcher: RouteWatcher, pool: UpstreamPool, metrics: GatewayMetrics, traffic: Traffic, max_body_bytes: int,
        limits: ServerLimits, bad_requests: BadRequests, default_service: str = DEFAULT_SERVICE, *,
        replay_crashes: bool = True, outliers: OutlierPolicy | None = None, round_robin: bool = False,
        shadows: Shadows | None = None,
    ) -> None:
        self.watcher = watcher
        self.default_service = default_service
        self.pool = pool
        self.metrics = metrics
        self.traffic = traffic
        self.max_body_bytes = max_body_bytes
        self.limits = limits
        self.bad_requests = bad_requests
        self._targets: dict[str, Target] = {}
        self._choices: dict[tuple[str, str | None], tuple[Snapshot, Choice | Refusal | Split]] = {}
        self._failure_log = LogBudget("upstream failures", level=logging.WARNING, logger=log)
        self.balancer: Balancer[Target] = Balancer(outliers or OutlierPolicy(), self._target, round_robin=round_robin)
        metrics.watch_replicas(self.balancer, watcher)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.attribution = Attribution(watcher, pool, metrics, self._record, self._target, build_request_head,
                                       enabled=replay_crashes)
        self.shadows = shadows or Shadows(pool, metrics)

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

    def choose(self, service: str | None = None, pinned: str | None = None) -> Choice | Refusal | Split:
        """The active deployment (or the ``pinned`` one) of a service's current snapshot (the default
        service's when None), if it can take a request."""
        if service is None:
            service = self.default_service
        snapshot = self.watcher.snapshots.get(service)
        if snapshot is None:
            return self.unknown_service(service)
        # Snapshots are immutable and replaced whole: the answer holds until the service's next one.
        key = (service, pinned)
        cached = self._choices.get(key)
        if cached is not None and cached[0] is snapshot:
            return cached[1]
        chosen = self._choose(snapshot, service, pinned)
        if len(self._choices) >= _CHOICES_KEPT:
            # Pinned names come from clients: keep the cache bounded.
            self._choices.clear()
        self._choices[key] = (snapshot, chosen)
        return chosen

    def _choose(self, snapshot: Snapshot, service: str, pinned: str | None) -> Choice | Refusal | Split:
        if pinned is None:
            name = snapshot.route.active
            if name is None:
                return Refusal(503, errors.TEMPORARILY_UNAVAILABLE, f"no deployment is active in service {service!r} yet",
                               service=service)
            route = snapshot.route
            active = self._choice_of(snapshot, service, name)
            if isinstance(active, Choice):
                active.shadow = self._shadow_of(snapshot, service, name)
            if route.candidate is not None and route.weight > 0 and route.candidate != name:
                candidate = self._choice_of(snapshot, service, route.candidate)
                # A candidate that cannot take requests (not ready, deleted) gets none: its share stays
                # with the active rather than failing clients.
                if isinstance(active, Choice) and isinstance(candidate, Choice):
                    return Split(active, candidate, route.weight, route.sticky)
            return active
        if pinned not in snapshot.deployments:
            return Refusal(404, errors.RESOURCE_DOES_NOT_EXIST, f"service {service!r} has no deployment named {pinned!r}",
                           service=service)
        return self._choice_of(snapshot, service, pinned)

    def _choice_of(self, snapshot: Snapshot, service: str, name: str) -> Choice | Refusal:
        """A deployment of a snapshot as requests' destination, if it can take them (503 if not)."""
        generation = str(snapshot.route.generation)
        dep = snapshot.deployments.get(name)
        # Requests go to whichever replicas are ready now: once a deployment took over, one ready replica is
        # enough to serve (its min_ready gates a switch, not traffic), and a scale-up or a restart of one
        # replica never interrupts it.
        serving = snapshot.serving(name)
        if dep is None or not serving:
            state = snapshot.effective_state(name)
            detail = "is unknown" if state is None else f"is {state.value}" + (f": {dep.reason}" if dep and dep.reason else "")
            return Refusal(503, errors.TEMPORARILY_UNAVAILABLE, f"deployment {name!r} {detail}", name, generation, service)
        try:
            replicas = self.balancer.replicas(service, name, serving)
        except ValueError as exc:
            # A record written around the admin API's checks: the model server cannot be reached.
            return Refusal(502, errors.TEMPORARILY_UNAVAILABLE, f"deployment {name!r}: {exc}", name, generation, service)
        return Choice(service, name, generation, replicas, self.metrics.deployment(service, name))

    def _shadow_of(self, snapshot: Snapshot, service: str, active: str) -> ShadowTarget | None:
        route = snapshot.route
        name = route.shadow
        if name is None or name == active or route.shadow_percent <= 0:
            return None
        serving = snapshot.serving(name)
        if not serving:
            return None
        try:
            replicas = self.balancer.replicas(service, name, serving)
        except ValueError:
            return None
        self.shadows.warm()
        return ShadowTarget(service, name, active, route.shadow_percent, replicas)

    def mirror(self, shadow: ShadowTarget, replay: Replay | None, status: int, answer: bytes | None, seconds: float) -> None:
        """Offer a copy of a request of the shadow's share (drawn by ``shadows.wanted``) the active answered
        (``replay`` None: its body was streamed, not held)."""
        if replay is None:
            self.shadows.drop(shadow, NOT_HELD)
        else:
            self.shadows.offer(shadow, replay, status, answer, seconds)

    def unknown_service(self, service: str) -> Refusal:
        """404 naming the services there are (503 before the gateway has read any)."""
        if not self.watcher.ready:
            return Refusal(503, errors.TEMPORARILY_UNAVAILABLE, "the gateway has not read a route yet; retry shortly")
        names = sorted(self.watcher.snapshots)
        listed = ", ".join(names[:_SERVICES_NAMED]) + (f" and {len(names) - _SERVICES_NAMED} more" if len(names) > _SERVICES_NAMED else "")
        return Refusal(404, errors.RESOURCE_DOES_NOT_EXIST, f"no service named {service!r} (services: {listed})")

    async def send(
        self, chosen: Choice, head_for: Callable[[Target], bytes], body: bytes | AsyncIterator[bytes], *,
        chunked: bool = False, deadline: float,
    ) -> tuple[Replica[Target], UpstreamResponse]:
        """Send a request to the replica the balancer picks and return once its answer's head arrived.
        A request that never left the gateway (no connection, or every connection busy) is tried once
        more on another replica; nothing that may have reached a model server is ever sent twice. The
        replica's in-flight count stays raised until :meth:`release`."""
        replicas = chosen.replicas
        replica = replicas.only or replicas.pick()
        if replica is None:
            raise UpstreamError(NO_REPLICA, f"no replica of deployment {chosen.name!r} is in rotation (all ejected)")
        retried = False
        while True:
            target = replica.target
            replica.inflight += 1
            try:
                upstream = await self.pool.request(
                    target.host, target.port, head_for(target), body, chunked=chunked, deadline=deadline,
                )
            except UpstreamError as exc:
                replica.inflight -= 1
                if exc.kind != POOL_FULL:
                    self._replica_failed(replicas, replica)
                if not retried and exc.kind in NOTHING_SENT:
                    other = replicas.pick(avoid=replica)
                    if other is not None:
                        self.metrics.replica_retries.labels(chosen.service, chosen.name).inc()
                        retried, replica = True, other
                        continue
                raise
            except BaseException:
                # The client's side failed (its body stalled, broke or was too large): not the replica's doing.
                replica.inflight -= 1
                raise
            return replica, upstream

    def _replica_failed(self, replicas: ReplicaSet[Target], replica: Replica[Target]) -> None:
        if replicas.failed(replica):
            self.metrics.replica_ejections.labels(replicas.service, replicas.deployment, replica.url).inc()

    def release(self, replicas: ReplicaSet[Target], replica: Replica[Target], code: int, outcome: str) -> None:
        """A request :meth:`send` placed is over: the replica answered, failed, or the client went away."""
        replica.inflight -= 1
        if outcome == UPSTREAM_ERROR or (code >= 500 and outcome != OVERLOADED):
            self._replica_failed(replicas, replica)
        elif code not in (CLIENT_CLOSED, 408):
            replicas.succeeded(replica)

    def begin(self, dm: DeploymentMetrics) -> float:
        """Count a request in flight; returns its start time, which :meth:`end` needs."""
        dm.inflight += 1
        # Cached: on Python 3.11 every get_running_loop() is a getpid() system call.
        loop = self._loop or self._bind_loop()
        return loop.time()

    def end(self, dm: DeploymentMetrics, started: float, code: int, outcome: str, replay: Replay | None = None) -> None:
        """Count a finished request (metrics and the guard's traffic figures); a crash of the active
        deployment with its ``replay`` is counted once the previous deployment has judged the input."""
        assert self._loop is not None
        elapsed = self._loop.time() - started
        dm.inflight -= 1
        if replay is not None and code == 400 and outcome == MODEL_ERROR and self.attribution.take(dm, code, elapsed, replay):
            return
        self._record(dm, code, outcome, elapsed)

    def _record(self, dm: DeploymentMetrics, code: int, outcome: str, elapsed: float) -> None:
        dm.observe(code, outcome, elapsed)
        if outcome != OVERLOADED:
            self.traffic.record(dm.key, outcome, elapsed)

    def upstream_failed(self, dm: DeploymentMetrics, exc: UpstreamError, when: str = "") -> None:
        """Count and log a failure to reach or hear from a model server (a model server that is down fails
        every request: the log keeps to a few lines per ten seconds, the metric counts them all)."""
        dm.upstream_error(exc.kind)
        if self._failure_log.allow():
            log.warning("service %s deployment %s: %s%s", dm.service, dm.name, when, exc)

    def untyped(self, peer: object) -> Refusal:
        """The answer to a prediction request without Content-Type (counted as a bad request)."""
        self.bad_requests.record(MISSING_CONTENT_TYPE, peer)
        return NO_CONTENT_TYPE

    async def invocations(self, request: web.Request) -> web.StreamResponse:
        """``POST [/models/{service}]/invocations`` and ``POST [/models/{service}]/deployments/{name}/invocations``:
        the active (or the named) deployment of the service's snapshot current when the request arrived."""
        info = request.match_info
        if "Content-Type" in request.headers:
            chosen = self.choose(info.get("service"), info.get("name"))
        else:
            chosen = self.untyped(request.remote)
        if isinstance(chosen, Refusal):
            return chosen.response()
        if type(chosen) is Split:
            key = request.headers.get(chosen.sticky) if chosen.sticky else None
            chosen = chosen.pick(key.strip().encode("utf-8", "surrogateescape") or None if key else None)
        return await self._forward(request, chosen)  # type: ignore[arg-type]

    async def _forward(self, request: web.Request, chosen: Choice) -> web.StreamResponse:
        name = chosen.name
        tags = chosen.tags()
        loop = self._loop or self._bind_loop()
        deadline = request[HEAD_STARTED] + self.limits.total_timeout

        # Frame the upstream body as the client framed it; refuse an announced oversize body unread.
        length = request.content_length
        body: bytes | AsyncIterator[bytes]
        if length is not None and length > self.max_body_bytes:
            return errors.body_too_large_response(self.max_body_bytes, tags)
        try:
            if length is not None and length <= SMALL_BODY:
                content = request.content
                if content.is_eof():
                    # The whole body came with the head (the usual case): take it without read()'s loop.
                    body = content.read_nowait()
                else:
                    async with asyncio.timeout(max(0.0, min(self.limits.client_timeout, deadline - loop.time()))):
                        body = await request.read()
            elif length is not None or request.body_exists:
                # The first piece arrives before an upstream connection is taken, so a client that sends
                # only a head holds nothing of the model server's.
                reader = _ClientBody(request.content, self.max_body_bytes, self.limits.client_timeout, deadline, loop)
                body = reader.stream(await reader.next())
            else:
                body, length = b"", 0
        except (_ClientStalled, TimeoutError):
            return self._client_refused(request, BODY_TIMEOUT, tags)
        except HttpProcessingError as exc:
            return self._client_refused(request, MALFORMED, tags, str(exc.message))
        except errors.BodyTooLarge as exc:
            return errors.body_too_large_response(exc.limit, tags)
        except ConnectionError:
            return web.Response(status=CLIENT_CLOSED)

        dm = chosen.dm
        started = self.begin(dm)
        code, outcome = 0, CLIENT_ERROR
        replica: Replica[Target] | None = None
        try:
            try:
                replica, upstream = await self.send(
                    chosen, lambda target: request_head(request, target, length), body, chunked=length is None,
                    deadline=deadline,
                )
            except UpstreamError as exc:
                status, error = errors.upstream_error(exc, name)
                code, outcome = status, (OVERLOADED if exc.kind == POOL_FULL else UPSTREAM_ERROR)
                self.upstream_failed(dm, exc)
                return web.Response(status=status, body=error, content_type="application/json", headers=tags)
            except errors.BodyTooLarge as exc:
                code = 413
                return errors.body_too_large_response(exc.limit, tags)
            except _ClientStalled:
                code = 408
                return self._client_refused(request, BODY_TIMEOUT, tags)
            except HttpProcessingError as exc:
                code = 400
                return self._client_refused(request, MALFORMED, tags, str(exc.message))
            except ConnectionError:
                code = CLIENT_CLOSED
                return web.Response(status=CLIENT_CLOSED)
            try:
                code, outcome, response, answer = await self._respond(request, upstream, tags, deadline)
            except Unanswered as exc:
                code, outcome = errors.upstream_error(exc, name)[0], UPSTREAM_ERROR
                self.upstream_failed(dm, exc, "answer broken off: ")
                return errors.upstream_error_response(exc, name, tags)
            except UpstreamError as exc:
                # Headers already went to the client: all we can do is cut the response short.
                code, outcome = 502, UPSTREAM_ERROR
                self.upstream_failed(dm, exc, "response broken off: ")
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=502)
            except _ClientGone:
                code, outcome = CLIENT_CLOSED, CLIENT_ERROR
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=CLIENT_CLOSED)
            finally:
                upstream.release()
            if chosen.shadow is not None and self.shadows.wanted(chosen.shadow):
                self.mirror(chosen.shadow, Replay(
                    request.raw_headers, request.raw_path.partition("?")[2].encode("latin-1"),
                    (request.remote or "unknown").encode("latin-1"), request.scheme.encode("latin-1"), body,
                ) if isinstance(body, bytes) else None, code, answer, loop.time() - started)
            return response
        finally:
            if replica is not None:
                self.release(chosen.replicas, replica, code, outcome)
            if code == 400 and outcome == MODEL_ERROR and isinstance(body, bytes) and "name" not in request.match_info:
                self.end(dm, started, code, outcome, Replay(
                    request.raw_headers, request.raw_path.partition("?")[2].encode("latin-1"),
                    (request.remote or "unknown").encode("latin-1"), request.scheme.encode("latin-1"), body,
                ))
            else:
                self.end(dm, started, code, outcome)

    def _client_refused(self, request: web.Request, reason: str, tags: dict[str, str], detail: str = "") -> web.Response:
        """The client's body broke off, stalled or broke its framing: 408/400, and the connection closes."""
        self.bad_requests.record(reason, request.remote, detail)
        if reason == BODY_TIMEOUT:
            response = errors.error_response(
                408, errors.DEADLINE_EXCEEDED, f"the request body stopped arriving for {self.limits.client_timeout:g} s",
                headers=tags,
            )
        else:
            response = errors.error_response(400, errors.BAD_REQUEST, f"malformed request body: {detail}", headers=tags)
        response.force_close()
        abandon_body(request)
        return response

    async def _respond(
        self, request: web.Request, upstream: UpstreamResponse, tags: dict[str, str], deadline: float
    ) -> tuple[int, str, web.StreamResponse, bytes | None]:
        """Relay the answer; also returns its body when it was small enough to be held whole."""
        status = upstream.status
        headers = response_headers(upstream, tags)
        length = upstream.length
        if upstream.small(SMALL_BODY):
            body = await read_small(upstream)
            return status, classify(status, body if status >= 400 else None), web.Response(
                status=status, body=body, headers=headers
            ), body
        response = web.StreamResponse(status=status, headers=headers)
        if length is not None:
            response.content_length = length
        elif request.version < HttpVersion11:
            # HTTP/1.0 has no chunked framing: the body ends when the connection does.
            response.force_close()
        loop = self._loop or self._bind_loop()
        try:
            await response.prepare(request)
            async for chunk in upstream.iter_chunks():
                # A write waits only while the client is not reading: bounded like every wait on a peer.
                async with asyncio.timeout(max(0.0, min(self.limits.client_timeout, deadline - loop.time()))):
                    await response.write(chunk)
            await response.write_eof()
        except (ConnectionError, TimeoutError) as exc:
            raise _ClientGone() from exc
        return status, classify(status, None), response, None

"""The admin API under ``/admin/``: services, and per service its state, deployments, switch, rollback,
guard and history — authenticated, browser-proof and strictly validated; every change and refusal goes
into the service's history."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import Any, TypeVar

import pydantic
from aiohttp import web

from . import errors
from .admin_models import (
    AlertmanagerPayload, CreateDeployment, CreateService, GuardRequest, GuardThresholds, RollbackRequest,
    CanaryAction, CanaryRequest, ScaleDeployment, ShadowRequest, SwitchRequest, check_min_ready, openapi_document,
)
from .records import GUARD_FIELDS, Deployment, HistoryEntry, ServiceConfig, Snapshot, State, Who, check_service_name
from .settings import Settings, SettingsError
from .store import Store, StoreUnavailable, replication_notes
from .aiohttp_handler import abandon_body
from .balancer import Balancer
from .rollout import PlanRefused, Rollouts
from .shadow import Shadows
from .guard import Guard
from .http1 import client_address, is_loopback
from .switching import RouteControl, describe_state
from .traffic import Traffic
from .watcher import RouteWatcher

log = logging.getLogger(__name__)

# Admin bodies are small JSON documents.
MAX_ADMIN_BODY = 64 * 1024
ACTOR_HEADER = "X-Turnout-Actor"
TRAFFIC_WINDOW = 60.0

M = TypeVar("M", bound=pydantic.BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminError(Exception):
    """A request the admin API refuses, with its status and MLflow error code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json")


def _loopback_host(host: str | None) -> bool:
    """A Host header that names this machine by a loopback name or address (with or without a port).

    Without a token the admin API trusts loopback clients; a web page in the operator's browser is one
    too, reached through DNS rebinding under a foreign host name. Only loopback names are accepted.
    """
    if not host:
        return False
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    return name in ("localhost", "localhost.") or is_loopback(name)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: ``{"target": "a", "target": "b"}`` is ambiguous (parsers
    disagree on which wins), so it is refused rather than read as the last one."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"key {repeated!r} appears more than once")
    return out


def _with_replication(response: web.StreamResponse, notes: list[bool]) -> web.StreamResponse:
    """Say in a change's JSON answer whether a Redis replica acknowledged it (only where the store waits for
    replicas: behind Sentinel an acknowledged change that no replica holds is lost if the primary dies)."""
    if not notes or not isinstance(response, web.Response) or response.content_type != "application/json":
        return response
    replicated = all(notes)
    response.headers["Turnout-Replicated"] = "yes" if replicated else "no"
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        body = json.loads(response.text or "")
        if isinstance(body, dict):
            body["replicated"] = replicated
            if not replicated:
                body["replication_warning"] = ("no Redis replica acknowledged this change in time: if the primary "
                                               "fails before it replicates, the change is lost")
            response.text = json.dumps(body)
    return response


class Admin:
    """Request handlers of the admin API."""

    def __init__(
        self, settings: Settings, store: Store, watcher: RouteWatcher, traffic: Traffic, control: RouteControl,
        guard: Guard, balancer: Balancer[Any], rollouts: Rollouts, shadows: Shadows,
    ) -> None:
        self.settings = settings
        self.shadows = shadows
        self.rollouts = rollouts
        self.store = store
        self.watcher = watcher
        self.traffic = traffic
        self.control = control
        self.guard = guard
        self.balancer = balancer
        self._token = settings.admin_token.encode() if settings.admin_token else None
        self._trusted = settings.trusted_networks()
        self._openapi = json.dumps(openapi_document())

    def routes(self) -> list[web.AbstractRouteDef]:
        """Every admin route (mounted on the data-plane app or a separate listener). Each per-service
        resource answers under ``/admin/services/{service}/``, and under ``/admin/`` for the default service."""
        out = [
            web.get("/admin/services", self._wrap(self.list_services)),
            web.post("/admin/services", self._wrap(self.create_service, mutation=True), expect_handler=errors.expect_handler),
            web.get("/admin/services/{service:[^/]+}", self._wrap(self.get_service)),
            web.delete("/admin/services/{service:[^/]+}", self._wrap(self.delete_service, mutation=True, body=False)),
            web.post("/admin/alerts", self._wrap(self.alerts, mutation=True), expect_handler=errors.expect_handler),
            web.get("/admin/openapi.json", self._wrap(self.openapi)),
        ]
        for prefix in ("/admin", "/admin/services/{service:[^/]+}"):
            out += [
                web.get(prefix + "/state", self._wrap(self.state)),
                web.get(prefix + "/deployments", self._wrap(self.list_deployments)),
                web.post(prefix + "/deployments", self._wrap(self.create_deployment, mutation=True), expect_handler=errors.expect_handler),
                web.get(prefix + "/deployments/{name}", self._wrap(self.get_deployment)),
                web.put(prefix + "/deployments/{name}", self._wrap(self.scale_deployment, mutation=True), expect_handler=errors.expect_handler),
                web.delete(prefix + "/deployments/{name}", self._wrap(self.delete_deployment, mutation=True, body=False)),
                web.post(prefix + "/switch", self._wrap(self.switch, mutation=True), expect_handler=errors.expect_handler),
                web.post(prefix + "/rollback", self._wrap(self.rollback, mutation=True), expect_handler=errors.expect_handler),
                web.get(prefix + "/shadow", self._wrap(self.shadow)),
                web.post(prefix + "/shadow", self._wrap(self.start_shadow, mutation=True), expect_handler=errors.expect_handler),
                web.delete(prefix + "/shadow", self._wrap(self.stop_shadow, mutation=True, body=False)),
                web.get(prefix + "/canary", self._wrap(self.canary)),
                web.post(prefix + "/canary", self._wrap(self.start_canary, mutation=True), expect_handler=errors.expect_handler),
                web.post(prefix + "/canary/{action:pause|resume|promote|abort}", self._wrap(self.change_canary, mutation=True),
                         expect_handler=errors.expect_handler),
                web.get(prefix + "/history", self._wrap(self.history)),
                web.get(prefix + "/guard", self._wrap(self.guard_state)),
                web.post(prefix + "/guard", self._wrap(self.guard_change, mutation=True), expect_handler=errors.expect_handler),
            ]
        return out + self._method_fallbacks(out)

    @staticmethod
    def _method_fallbacks(routes: list[web.AbstractRouteDef]) -> list[web.AbstractRouteDef]:
        """A ``405`` naming the allowed methods for every admin path, ahead of the gateway's catch-all 404."""
        allowed: dict[str, list[str]] = {}
        for route in routes:
            assert isinstance(route, web.RouteDef)
            allowed.setdefault(route.path, []).append(route.method)

        def refuse(methods: list[str]) -> Handler:
            methods = sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()))

            async def method_not_allowed(request: web.Request) -> web.Response:
                return errors.error_response(
                    405, errors.BAD_REQUEST, f"{request.path} accepts {', '.join(methods)}, not {request.method}",
                    headers={"Allow": ", ".join(methods)},
                )

            return method_not_allowed

        return [web.route("*", path, refuse(methods)) for path, methods in allowed.items()]

    # --- checks every admin request passes ---------------------------------------------------
    def _wrap(self, handler: Handler, *, mutation: bool = False, body: bool = True) -> Handler:
        @functools.wraps(handler)
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                self.authorize(request)
                if mutation and body:
                    self._require_json(request)
                if not mutation:
                    return await handler(request)
                with replication_notes() as notes:
                    response = await handler(request)
                return _with_replication(response, notes)
            except AdminError as exc:
                response = errors.error_response(exc.status, exc.code, exc.message, headers=exc.headers)
                if exc.status == 408:
                    # The rest of a stalled body must not be read as the next request: close at once.
                    response.force_close()
                    abandon_body(request)
                return response
            except StoreUnavailable as exc:
                outcome = "" if exc.uncertain else "; nothing was changed"
                return errors.error_response(503, errors.TEMPORARILY_UNAVAILABLE, f"the route store is unreachable ({exc}){outcome}")
            except ConnectionError:
                # The client went away mid-request: nobody to answer, nothing to log.
                return web.Response(status=499)

        return wrapped

    def client(self, request: web.Request) -> str | None:
        """The client's address: the peer, or behind a trusted proxy the address it forwarded."""
        return client_address(request.remote, request.headers.getall("X-Forwarded-For", []), self._trusted)

    def authorize(self, request: web.Request) -> None:
        """Token (constant-time), loopback-only without one, and no browser-originated requests."""
        if self._token is None:
            if not is_loopback(self.client(request)):
                raise AdminError(
                    403, errors.PERMISSION_DENIED,
                    "no admin token is configured, so the admin API answers loopback clients only; set TURNOUT_ADMIN_TOKEN",
                )
            if not _loopback_host(request.host):
                raise AdminError(
                    403, errors.PERMISSION_DENIED,
                    "no admin token is configured, so the admin API answers only requests addressed to localhost "
                    "(Host header); set TURNOUT_ADMIN_TOKEN",
                )
        else:
            header = request.headers.get("Authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not given:
                raise AdminError(401, errors.UNAUTHENTICATED, "missing bearer token (Authorization: Bearer <token>)",
                                 {"WWW-Authenticate": 'Bearer realm="turnout"'})
            # aiohttp decodes header bytes that are not UTF-8 as surrogates: compare the original bytes.
            if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), self._token):
                raise AdminError(401, errors.UNAUTHENTICATED, "wrong bearer token",
                                 {"WWW-Authenticate": 'Bearer realm="turnout", error="invalid_token"'})
        if "Origin" in request.headers:
            raise AdminError(403, errors.PERMISSION_DENIED, "browser requests (with an Origin header) cannot use the admin API")

    def _require_json(self, request: web.Request) -> None:
        if request.content_type != "application/json":
            raise AdminError(415, errors.BAD_REQUEST, f"Content-Type must be application/json, not {request.content_type or 'missing'}")

    async def _parse(self, request: web.Request, model: type[M]) -> M:
        length = request.content_length
        if length is not None and length > MAX_ADMIN_BODY:
            raise AdminError(413, errors.RESOURCE_EXHAUSTED, f"admin request bodies are limited to {MAX_ADMIN_BODY} bytes")
        raw = bytearray()
        timeout = self.settings.client_timeout
        try:
            # A body that stops arriving holds the request, like any wait on a peer: bounded.
            async with asyncio.timeout(timeout):
                async for chunk in request.content.iter_any():
                    raw += chunk
                    if len(raw) > MAX_ADMIN_BODY:
                        raise AdminError(
                            413, errors.RESOURCE_EXHAUSTED, f"admin request bodies are limited to {MAX_ADMIN_BODY} bytes"
                        )
        except TimeoutError:
            raise AdminError(408, errors.DEADLINE_EXCEEDED, f"the request body stopped arriving for {timeout:g} s") from None
        try:
            data = json.loads(raw, object_pairs_hook=_unique_keys)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AdminError(400, errors.BAD_REQUEST, f"malformed JSON: {exc}") from None
        except RecursionError:
            raise AdminError(400, errors.BAD_REQUEST, "malformed JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise AdminError(400, errors.BAD_REQUEST, "the body must be a JSON object")
        try:
            return model.model_validate(data)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg'].removeprefix('Value error, ')}"
                for err in exc.errors()
            )
            raise AdminError(400, errors.INVALID_PARAMETER_VALUE, problems) from None

    async def _apply_here(self, service: str | None = None) -> None:
        """Read the store once more before answering a change: this replica then serves what it just
        answered (pub/sub would bring it a moment later; a prediction sent right after the answer must
        not meet the old route). A failed read changes nothing: the watcher catches up."""
        with contextlib.suppress(StoreUnavailable):
            await self.watcher.refresh("admin", service)

    async def _service(self, request: web.Request) -> str:
        """The service a request is about: named in its path, else the default one; 404 if unknown."""
        name = request.match_info.get("service", self.settings.default_service)
        try:
            check_service_name(name)
        except ValueError as exc:
            raise AdminError(400, errors.INVALID_PARAMETER_VALUE, str(exc)) from None
        if not await self.store.service_exists(name):
            raise AdminError(404, errors.RESOURCE_DOES_NOT_EXIST,
                             f"no service named {name!r}; create it with POST /admin/services (turnout services create)")
        return name

    def _who(self, request: web.Request) -> Who:
        actor = request.headers.get(ACTOR_HEADER, "").strip()[:100] or "anonymous"
        return Who(actor=actor, client=self.client(request), trigger="api")

    # --- reads --------------------------------------------------------------------------------
    def _deployment_view(self, snapshot: Snapshot, dep: Deployment) -> dict[str, Any]:
        state = snapshot.effective_state(dep.name)
        route = snapshot.route
        role = ("active" if dep.name == route.active else "previous" if dep.name == route.previous
                else "candidate" if dep.name == route.candidate else None)
        return {
            "name": dep.name,
            "role": role,
            "state": state.value if state else None,
            "state_detail": describe_state(snapshot, dep.name),
            "reason": dep.reason,
            "url": dep.url,
            "model_uri": dep.model_uri,
            "external": dep.external,
            "worker": dep.worker,
            "mlflow": {"name": dep.mlflow_name, "version": dep.mlflow_version, "alias": dep.mlflow_alias},
            "warmup": dep.warmup,
            "restarts": dep.restarts,
            "started_at": dep.started_at,
            "ready_at": dep.ready_at,
            "traffic": {"window_seconds": TRAFFIC_WINDOW, "scope": "this gateway replica",
                        **self.traffic.local((snapshot.service, dep.name), TRAFFIC_WINDOW).as_dict()},
            "desired_replicas": len(dep.members) if dep.external else dep.replicas,
            "min_ready": dep.needed,
            "ready_replicas": len(snapshot.serving(dep.name)),
            "replicas": self._replicas_view(snapshot, dep),
        }

    def _replicas_view(self, snapshot: Snapshot, dep: Deployment) -> list[dict[str, Any]]:
        """Each replica: where it is, its state (``ejected`` while this gateway keeps it out of rotation),
        who hosts it, and what this gateway sent it."""
        seen = {r.url: r for r in self.balancer.known(snapshot.service, dep.name)}
        out = []
        for member in dep.members:
            state = snapshot.member_state(dep, member)
            replica = seen.get(member.url) if member.url else None
            ejected = replica is not None and replica.ejected_until > 0 and state is State.READY
            out.append({
                "index": member.index,
                "url": member.url,
                "state": "ejected" if ejected else state.value,
                "reason": member.reason,
                "worker": member.worker,
                "restarts": member.restarts,
                "inflight": replica.inflight if replica else 0,
                "answered": replica.answered if replica else 0,
                "ejections": replica.ejections if replica else 0,
            })
        return out

    async def state(self, request: web.Request) -> web.Response:
        """``GET /admin/[services/{service}/]state``."""
        service = await self._service(request)
        snapshot = await self.store.read_snapshot(service=service)
        route = snapshot.route
        applied = self.watcher.snapshots.get(service)
        return _json({
            "service": service,
            "route": {"active": route.active, "previous": route.previous, "generation": route.generation,
                      "candidate": route.candidate, "weight": route.weight if route.candidate else None,
                      "sticky_header": route.sticky},
            "deployments": [self._deployment_view(snapshot, d) for d in sorted(snapshot.deployments.values(), key=lambda d: d.name)],
            "guard": await self._guard_view(snapshot),
            "canary": await self._canary_view(snapshot),
            "shadow": self._shadow_view(snapshot),
            "gateway": {
                "applied_generation": applied.route.generation if applied else None,
                "store_up": self.watcher.store_up,
            },
        })

    async def list_deployments(self, request: web.Request) -> web.Response:
        """``GET /admin/[services/{service}/]deployments``."""
        snapshot = await self.store.read_snapshot(service=await self._service(request))
        return _json([self._deployment_view(snapshot, d) for d in sorted(snapshot.deployments.values(), key=lambda d: d.name)])

    async def get_deployment(self, request: web.Request) -> web.Response:
        """``GET /admin/[services/{service}/]deployments/{name}``."""
        service = await self._service(request)
        snapshot = await self.store.read_snapshot(service=service)
        dep = snapshot.deployments.get(request.match_info["name"])
        if dep is None:
            raise AdminError(404, errors.RESOURCE_DOES_NOT_EXIST,
                             f"service {service!r} has no deployment named {request.match_info['name']!r}")
        return _json(self._deployment_view(snapshot, dep))

    async def history(self, request: web.Request) -> web.Response:
        """``GET /admin/[services/{service}/]history?offset=&limit=``, newest first."""
        service = await self._service(request)
        offset = self._int_query(request, "offset", 0, 0, 10**9)
        limit = self._int_query(request, "limit", 50, 1, 1000)
        entries, total = await self.store.read_history(offset, limit, service=service)
        next_offset = offset + len(entries) if offset + len(entries) < total else None
        return _json({"entries": [e.to_json() for e in entries], "total": total, "offset": offset, "limit": limit,
                      "next_offset": next_offset})

    @staticmethod
    def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
        raw = request.query.get(name)
        if raw is None:
            return default
        # isascii: str.isdigit() also accepts '²', which int() rejects.
        if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
            raise AdminError(400, errors.INVALID_PARAMETER_VALUE, f"{name} must be an integer from {low} to {high}")
        return int(raw)

    async def openapi(self, request: web.Request) -> web.Response:
        """``GET /admin/openapi.json``."""
        return web.Response(text=self._openapi, content_type="application/json")

    # --- services -----------------------------------------------------------------------------
    def _service_view(self, snapshot: Snapshot, guard: dict[str, str]) -> dict[str, Any]:
        route = snapshot.route
        active = route.active
        return {
            "name": snapshot.service,
            "default": snapshot.service == self.settings.default_service,
            "route": {"active": active, "previous": route.previous, "generation": route.generation},
            "health": "ready" if snapshot.is_ready(active) else ("no route" if active is None else "active not ready"),
            "deployments": len(snapshot.deployments),
            "guard": {"paused": guard.get("paused") or None, "latched": guard.get("latched") or None,
                      "overrides": snapshot.config.thresholds()},
        }

    async def list_services(self, request: web.Request) -> web.Response:
        """``GET /admin/services``: every service with its route, health and guard."""
        views = []
        for name in await self.store.list_services():
            snapshot = await self.store.read_snapshot(service=name)
            views.append(self._service_view(snapshot, await self.store.get_guard(service=name)))
        return _json({"services": views})

    async def get_service(self, request: web.Request) -> web.Response:
        """``GET /admin/services/{service}``."""
        service = await self._service(request)
        snapshot = await self.store.read_snapshot(service=service)
        return _json(self._service_view(snapshot, await self.store.get_guard(service=service)))

    async def create_service(self, request: web.Request) -> web.Response:
        """``POST /admin/services``: ``{"name": ..., "guard": {...thresholds}}``."""
        body = await self._parse(request, CreateService)
        overrides = self._overrides(body.guard)
        config = ServiceConfig(MappingProxyType({k: v for k, v in overrides.items() if v is not None}), time.time())
        entry = HistoryEntry("service_create", self._who(request), extra={"service": body.name})
        if not await self.store.create_service(body.name, config, history=entry):
            raise AdminError(409, errors.RESOURCE_ALREADY_EXISTS, f"a service named {body.name!r} already exists")
        await self._apply_here()
        snapshot = await self.store.read_snapshot(service=body.name)
        return _json(self._service_view(snapshot, {}), 201)

    async def delete_service(self, request: web.Request) -> web.Response:
        """``DELETE /admin/services/{service}?force=true``: refused while it has deployments unless forced."""
        service = await self._service(request)
        force = self._bool_query(request, "force")
        if service == self.settings.default_service:
            refusal: str | None = "default"
        else:
            # The service's own history goes with it: the default service's history keeps the record.
            entry = HistoryEntry("service_delete", self._who(request), forced=force, extra={"service": service},
                                 reason=request.query.get("reason", "")[:1000])
            refusal = await self.store.delete_service(service, force=force, history=entry,
                                                      history_service=self.settings.default_service)
        if refusal == "default":
            raise AdminError(409, errors.INVALID_STATE, f"{service!r} is the default service; it cannot be deleted")
        if refusal == "not_empty":
            raise AdminError(409, errors.INVALID_STATE,
                             f"service {service!r} still has deployments; delete them first, or use force")
        if refusal == "unknown":
            raise AdminError(404, errors.RESOURCE_DOES_NOT_EXIST, f"no service named {service!r}")
        await self._apply_here()
        return _json({"deleted": service})

    @staticmethod
    def _bool_query(request: web.Request, name: str) -> bool:
        raw = request.query.get(name, "false").lower()
        if raw not in ("true", "false", "1", "0"):
            raise AdminError(400, errors.INVALID_PARAMETER_VALUE, f"{name} must be true or false")
        return raw in ("true", "1")

    # --- changes ------------------------------------------------------------------------------
    async def create_deployment(self, request: web.Request) -> web.Response:
        """``POST /admin/[services/{service}/]deployments``: a model URI for a worker to serve, or the URL
        of an external server."""
        service = await self._service(request)
        body = await self._parse(request, CreateDeployment)
        who = self._who(request)
        now = time.time()
        urls = tuple(url.rstrip("/") for url in body.urls) if body.urls else (body.url.rstrip("/"),) if body.url else ()
        if urls:
            # Someone else runs it: nothing here can prove it ready, so it is trusted as ready (a replica
            # that fails is ejected by each gateway on its own).
            dep = Deployment(
                name=body.name, url=urls[0], urls=urls if len(urls) > 1 else (), external=True, state=State.READY,
                reason="external server (not supervised by a Turnout worker)", created_at=now,
                mlflow_name=body.mlflow_name, mlflow_version=body.mlflow_version,
            )
        else:
            dep = Deployment(name=body.name, model_uri=body.model_uri, state=State.STARTING,
                             reason="waiting for a worker to claim it", created_at=now, replicas=body.replicas or 1,
                             min_ready=body.min_ready)
        detail = " ".join(urls) or f"{body.model_uri}" + (f" × {dep.replicas} replicas" if dep.replicas > 1 else "")
        entry = HistoryEntry("deploy", who, target=body.name, detail=detail)
        if not await self.store.create_deployment(dep, service=service, history=entry):
            raise AdminError(409, errors.RESOURCE_ALREADY_EXISTS,
                             f"service {service!r} already has a deployment named {body.name!r}")
        await self._apply_here(service)
        snapshot = await self.store.read_snapshot(service=service)
        view = self._deployment_view(snapshot, snapshot.deployments[body.name]) if body.name in snapshot.deployments else dep.to_fields()
        return _json(view, 201)

    async def scale_deployment(self, request: web.Request) -> web.Response:
        """``PUT /admin/[services/{service}/]deployments/{name}``: its replicas and min_ready (an external
        one's urls). Workers warm new replicas before they take requests and drain removed ones."""
        service = await self._service(request)
        name = request.match_info["name"]
        body = await self._parse(request, ScaleDeployment)
        who = self._who(request)
        snapshot = await self.store.read_snapshot(service=service)
        dep = snapshot.deployments.get(name)
        entry = HistoryEntry("scale", who, target=name, reason=body.reason)

        async def refuse(status: int, code: str, message: str) -> AdminError:
            # Every refused attempt is in the history, as refused switches and deletes are.
            await self.store.append_history(entry.but(result="refused", detail=message), service=service)
            return AdminError(status, code, message)

        if dep is None:
            raise await refuse(404, errors.RESOURCE_DOES_NOT_EXIST, f"service {service!r} has no deployment named {name!r}")
        changes: dict[str, Any] = {}
        if body.urls is not None:
            if not dep.external:
                raise await refuse(409, errors.INVALID_STATE,
                                   f"deployment {name!r} is served by workers: scale it with replicas, not urls")
            urls = tuple(url.rstrip("/") for url in body.urls)
            changes = {"url": urls[0], "urls": urls if len(urls) > 1 else None}
            expect = {"url": dep.url, "urls": dep.urls or None}
            detail = f"urls {' '.join(dep.urls or (dep.url or '',))} → {' '.join(urls)}"
        else:
            if dep.external:
                raise await refuse(409, errors.INVALID_STATE, f"deployment {name!r} is an external server: give its "
                                   "replicas' urls (PUT with {\"urls\": [...]}) instead of replicas or min_ready")
            replicas = body.replicas if body.replicas is not None else dep.replicas
            min_ready = body.min_ready if "min_ready" in body.model_fields_set else dep.min_ready
            try:
                check_min_ready(replicas, min_ready)
            except ValueError as exc:
                raise await refuse(400, errors.INVALID_PARAMETER_VALUE, str(exc)) from None
            changes = {"replicas": replicas, "min_ready": min_ready}
            expect = {"replicas": dep.replicas, "min_ready": dep.min_ready}
            shown = lambda n: "all" if n is None else str(n)
            detail = f"replicas {dep.replicas} → {replicas}, min_ready {shown(dep.min_ready)} → {shown(min_ready)}"
        # Conditional on what was read: two scales at once never lose one or record a wrong "from".
        updated = await self.store.update_deployment(name, service=service, history=entry.but(detail=detail),
                                                     expect=expect, **changes)
        if updated is None:
            raise await refuse(409, errors.INVALID_STATE, f"deployment {name!r} was scaled concurrently; re-read and retry")
        if not updated:
            raise AdminError(404, errors.RESOURCE_DOES_NOT_EXIST, f"service {service!r} has no deployment named {name!r}")
        await self._apply_here(service)
        snapshot = await self.store.read_snapshot(service=service)
        if name not in snapshot.deployments:
            raise AdminError(404, errors.RESOURCE_DOES_NOT_EXIST, f"service {service!r} has no deployment named {name!r}")
        return _json(self._deployment_view(snapshot, snapshot.deployments[name]))

    async def delete_deployment(self, request: web.Request) -> web.Response:
        """``DELETE /admin/[services/{service}/]deployments/{name}?force=true&reason=``: refused while
        active or previous unless forced."""
        service = await self._service(request)
        name = request.match_info["name"]
        force = self._bool_query(request, "force")
        reason = request.query.get("reason", "")[:1000]
        who = self._who(request)
        entry = HistoryEntry("undeploy", who, source=name, reason=reason, forced=force)
        refusal = await self.store.delete_deployment(name, service=service, force=force, history=entry)
        if refusal == "unknown":
            raise AdminError(404, errors.RESOURCE_DOES_NOT_EXIST, f"service {service!r} has no deployment named {name!r}")
        if refusal is not None:
            message = f"{name} is the {refusal} deployment" + {
                "active": "; switch traffic elsewhere first, or use force",
                "candidate": " of a traffic split; abort the canary first (turnout abort), or use force",
                "shadow": " of the service; stop shadowing first (turnout shadow --off), or use force",
            }.get(refusal, " (the rollback target); use force to delete it anyway")
            await self.store.append_history(entry.but(result="refused", detail=message), service=service)
            raise AdminError(409, errors.INVALID_STATE, message)
        await self._apply_here(service)
        return _json({"deleted": name, "service": service})

    async def switch(self, request: web.Request) -> web.Response:
        """``POST /admin/[services/{service}/]switch``."""
        service = await self._service(request)
        body = await self._parse(request, SwitchRequest)
        outcome = await self.control.switch(
            body.target, self._who(request), service=service, reason=body.reason,
            expected_generation=body.expected_generation, force=body.force,
        )
        if outcome.applied:
            await self._apply_here(service)
        return _json({**outcome.body(), "service": service}, outcome.status)

    async def rollback(self, request: web.Request) -> web.Response:
        """``POST /admin/[services/{service}/]rollback``."""
        service = await self._service(request)
        body = await self._parse(request, RollbackRequest)
        outcome = await self.control.rollback(
            self._who(request), service=service, reason=body.reason, expected_generation=body.expected_generation,
            force=body.force,
        )
        if outcome.applied:
            await self._apply_here(service)
        return _json({**outcome.body(), "service": service}, outcome.status)

    # --- canary -------------------------------------------------------------------------------
    async def _canary_view(self, snapshot: Snapshot) -> dict[str, Any] | None:
        """The plan as an operator reads it, with the gate's live figures (computed here, on any replica)."""
        plan = snapshot.plan
        if plan is None:
            return None
        now = time.time()
        view: dict[str, Any] = {
            "candidate": plan.candidate, "baseline": plan.baseline, "state": plan.state,
            "step": plan.step + 1, "steps": list(plan.steps), "weight": plan.weight if plan.active else 0.0,
            "step_seconds": plan.step_seconds, "seconds_left": round(plan.left(now), 1) if plan.active else None,
            "sticky_header": plan.sticky, "started_at": plan.started_at, "started_by": plan.started_by,
            "gate": {"max_error_rate_increase": plan.max_error_rate_increase, "max_latency_ratio": plan.max_latency_ratio,
                     "min_requests": plan.min_requests},
            "outcome": plan.outcome or None,
        }
        if plan.active:
            verdict = await self.rollouts.look(snapshot.service, plan, now)
            view["live"] = {"status": verdict.status, "detail": verdict.why, **verdict.evidence}
        elif plan.gate:
            view["last_gate"] = dict(plan.gate)
        return view

    async def canary(self, request: web.Request) -> web.Response:
        """``GET /admin/[services/{service}/]canary``."""
        service = await self._service(request)
        snapshot = await self.store.read_snapshot(service=service)
        return _json({"service": service, "canary": await self._canary_view(snapshot)})

    async def start_canary(self, request: web.Request) -> web.Response:
        """``POST /admin/[services/{service}/]canary``: start a plan (the first step's weight applies at once)."""
        service = await self._service(request)
        body = await self._parse(request, CanaryRequest)
        try:
            await self.rollouts.start(
                service, body.candidate, body.steps, body.step_seconds, self._who(request), sticky=body.sticky_header,
                max_error_rate_increase=body.max_error_rate_increase, max_latency_ratio=body.max_latency_ratio,
                min_requests=body.min_requests, reason=body.reason,
            )
        except PlanRefused as exc:
            raise AdminError(exc.status, exc.code, exc.message) from None
        await self._apply_here(service)
        snapshot = await self.store.read_snapshot(service=service)
        return _json({"service": service, "canary": await self._canary_view(snapshot)}, 201)

    async def change_canary(self, request: web.Request) -> web.Response:
        """``POST /admin/[services/{service}/]canary/{pause,resume,promote,abort}``."""
        service = await self._service(request)
        action = request.match_info["action"]
        body = await self._parse(request, CanaryAction)
        who = self._who(request)
        r = self.rollouts
        act = {"pause": r.pause, "resume": r.resume, "promote": r.promote, "abort": r.abort}[action]
        try:
            await act(service, who, body.reason)
        except PlanRefused as exc:
            raise AdminError(exc.status, exc.code, exc.message) from None
        await self._apply_here(service)
        snapshot = await self.store.read_snapshot(service=service)
        return _json({"service": service, "canary": await self._canary_view(snapshot)})

    # --- shadow -------------------------------------------------------------------------------
    def _shadow_view(self, snapshot: Snapshot) -> dict[str, Any] | None:
        route = snapshot.route
        if route.shadow is None:
            return None
        report = self.shadows.reports.get((snapshot.service, route.shadow))
        return {"deployment": route.shadow, "percent": route.shadow_percent, "active": route.active,
                "state": snapshot.effective_state(route.shadow).value if route.shadow in snapshot.deployments else None,
                "report": report.view() if report is not None and report.active == route.active else None}

    async def shadow(self, request: web.Request) -> web.Response:
        """``GET /admin/[services/{service}/]shadow``: the shadow and how its answers compare (this replica)."""
        service = await self._service(request)
        snapshot = await self.store.read_snapshot(service=service)
        return _json({"service": service, "shadow": self._shadow_view(snapshot)})

    async def start_shadow(self, request: web.Request) -> web.Response:
        """``POST /admin/[services/{service}/]shadow``: copy a share of requests to a ready deployment."""
        service = await self._service(request)
        body = await self._parse(request, ShadowRequest)
        snapshot = await self.store.read_snapshot(service=service)
        route, name = snapshot.route, body.deployment
        entry = HistoryEntry("shadow_on", self._who(request), source=route.active, target=name, reason=body.reason,
                             detail=f"{body.percent:g}% of requests copied", extra={"percent": body.percent})
        if name not in snapshot.deployments:
            message = f"service {service!r} has no deployment named {name!r}"
            await self.store.append_history(entry.but(result="refused", detail=message, generation=route.generation),
                                            service=service)
            raise AdminError(404, errors.RESOURCE_DOES_NOT_EXIST, message)
        why = ("it is the active deployment" if name == route.active
               else f"it is {describe_state(snapshot, name)}; wait until it is ready" if not snapshot.is_ready(name) else None)
        if why:
            message = f"cannot shadow {name}: {why}"
            await self.store.append_history(entry.but(result="refused", detail=message, generation=route.generation),
                                            service=service)
            raise AdminError(409, errors.INVALID_STATE, message)
        change = await self.store.change_rollout(service=service, shadow=(name, body.percent), history=entry)
        if not change.ok:
            raise AdminError(409, errors.INVALID_STATE, f"not applied ({change.refusal})")
        if route.shadow != name:
            self.shadows.reset(service)
        await self._apply_here(service)
        # Copies go through a helper process of each gateway: answer once this one's listens.
        await self.shadows.ready()
        return _json({"service": service, "shadow": self._shadow_view(await self.store.read_snapshot(service=service))})

    async def stop_shadow(self, request: web.Request) -> web.Response:
        """``DELETE /admin/[services/{service}/]shadow?reason=``: stop copying (the last report stays readable
        until the next shadow starts)."""
        service = await self._service(request)
        snapshot = await self.store.read_snapshot(service=service)
        entry = HistoryEntry("shadow_off", self._who(request), target=snapshot.route.shadow,
                             reason=request.query.get("reason", "")[:1000])
        if snapshot.route.shadow is None:
            message = f"service {service!r} has no shadow"
            await self.store.append_history(entry.but(result="refused", detail=message), service=service)
            raise AdminError(409, errors.INVALID_STATE, message)
        change = await self.store.change_rollout(service=service, shadow=None, history=entry)
        if not change.ok:
            raise AdminError(409, errors.INVALID_STATE, f"not applied ({change.refusal})")
        self.shadows.discard(service)
        await self._apply_here(service)
        report = self.shadows.reports.get((service, snapshot.route.shadow))
        return _json({"service": service, "shadow": None, "stopped": snapshot.route.shadow,
                      "report": report.view() if report is not None else None})

    # --- guard and alerts ---------------------------------------------------------------------
    async def _guard_view(self, snapshot: Snapshot) -> dict[str, Any]:
        shared = await self.store.get_guard(service=snapshot.service)
        return {**self.guard.status(snapshot.service, snapshot.config, snapshot.route.generation),
                "paused": shared.get("paused") or None, "latched": shared.get("latched") or None}

    async def guard_state(self, request: web.Request) -> web.Response:
        """``GET /admin/[services/{service}/]guard``."""
        snapshot = await self.store.read_snapshot(service=await self._service(request))
        return _json(await self._guard_view(snapshot))

    def _overrides(self, thresholds: GuardThresholds) -> dict[str, Any]:
        """The guard settings a request sets (None: back to the gateway's own), proven valid."""
        changes = {GUARD_FIELDS[name]: getattr(thresholds, name) for name in thresholds.model_fields_set}
        try:
            self.settings.replace(**{k: v for k, v in changes.items() if v is not None})
        except SettingsError as exc:
            raise AdminError(400, errors.INVALID_PARAMETER_VALUE, str(exc)) from None
        return changes

    async def guard_change(self, request: web.Request) -> web.Response:
        """``POST /admin/[services/{service}/]guard``: ``{"paused": true|false, "reason": ..., "thresholds":
        {...}}``; resuming also lifts the latch; a threshold set to null goes back to the gateway's own."""
        service = await self._service(request)
        body = await self._parse(request, GuardRequest)
        who = self._who(request)
        if body.thresholds.model_fields_set:
            changes = self._overrides(body.thresholds)
            entry = HistoryEntry("guard_configure", who, reason=body.reason,
                                 extra={"thresholds": {name: getattr(body.thresholds, name) for name in body.thresholds.model_fields_set}})
            if not await self.store.set_service_config(service, changes, history=entry):
                raise AdminError(404, errors.RESOURCE_DOES_NOT_EXIST, f"no service named {service!r}")
        if body.paused is True:
            await self.store.set_guard(service=service,
                                       paused=f"paused by {who.actor}" + (f": {body.reason}" if body.reason else ""))
        elif body.paused is False:
            await self.store.set_guard(service=service, paused=None, latched=None, latched_generation=None)
        if body.paused is not None:
            await self.store.append_history(
                HistoryEntry("guard_pause" if body.paused else "guard_resume", who, reason=body.reason), service=service,
            )
            self.guard.metrics.guard_paused.labels(service).set(1 if body.paused else 0)
            if not body.paused:
                self.guard.metrics.guard_latched.labels(service).set(0)
        await self._apply_here(service)
        snapshot = await self.store.read_snapshot(service=service)
        return _json(await self._guard_view(snapshot))

    async def alerts(self, request: web.Request) -> web.Response:
        """``POST /admin/alerts``: Alertmanager's webhook. A firing alert labelled
        ``turnout_action="rollback"`` rolls back, in the service of its ``service`` label (the default
        service without one), the deployment in its ``deployment`` label if that is active (else the
        active one when it names none); repeats and resolved alerts act at most once."""
        # Alertmanager's model ignores fields Turnout does not use (it is not ``Strict``).
        body = await self._parse(request, AlertmanagerPayload)
        if body.version != "4":
            raise AdminError(400, errors.INVALID_PARAMETER_VALUE, f"unsupported Alertmanager payload version {body.version!r} (need 4)")
        results = []
        for alert in body.alerts:
            labels = alert.labels
            name = labels.get("alertname", "alert")
            if labels.get("turnout_action") != "rollback":
                results.append({"alert": name, "action": "ignored", "detail": "no turnout_action=rollback label"})
                continue
            if alert.status != "firing":
                results.append({"alert": name, "action": "ignored", "detail": f"alert is {alert.status}"})
                continue
            service = labels.get("service") or self.settings.default_service
            if not await self.store.service_exists(service):
                results.append({"alert": name, "action": "refused", "detail": f"no service named {service!r}"})
                continue
            identity = alert.fingerprint or json.dumps(labels, sort_keys=True)
            if not await self.store.first_time(f"alert:{identity}:{alert.startsAt}", ttl=24 * 3600):
                results.append({"alert": name, "action": "ignored", "detail": "already acted on this alert"})
                continue
            who = Who(actor=f"alertmanager:{name}", client=self.client(request), trigger="alertmanager")
            reason = alert.annotations.get("summary") or alert.annotations.get("description") or f"alert {name} fired"
            plan = (await self.store.read_snapshot(service=service)).plan
            named = labels.get("deployment") or None
            if plan is not None and plan.active and named in (None, plan.candidate):
                # During a canary the rollback is the canary's: the candidate gets no more traffic.
                try:
                    await self.rollouts.abort(service, who, reason)
                except PlanRefused as exc:
                    results.append({"alert": name, "service": service, "action": "refused", "detail": exc.message})
                    continue
                await self._apply_here(service)
                results.append({"alert": name, "service": service, "action": "canary_aborted",
                                "detail": f"canary of {plan.candidate} aborted: {reason}"})
                continue
            outcome = await self.control.rollback(
                who, service=service, reason=reason, only_if_active=labels.get("deployment") or None,
                evidence={"alert": name, "labels": labels, "startsAt": alert.startsAt},
            )
            if outcome.applied:
                await self._apply_here(service)
                await self.store.set_guard(
                    service=service,
                    latched=f"rolled back by alert {name} at generation {outcome.route.generation}: {reason}",
                    latched_generation=str(outcome.route.generation),
                )
            results.append({"alert": name, "service": service,
                            "action": "rolled_back" if outcome.applied else "refused", "detail": outcome.message})
        # 200 even when nothing was done: Alertmanager would otherwise resend a notification we judged.
        return _json({"processed": len(body.alerts), "results": results})

"""The gateway application: ``create_app(settings)`` wires store → watcher → proxy → metrics, plus the admin API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from . import __version__, errors
from .admin import Admin
from .aiohttp_handler import Drain, on_response_prepare
from .balancer import OutlierPolicy
from .rollout import Rollouts
from .shadow import Shadows
from .siblings import ProcessSlot, Siblings
from .fastpath import FastPath
from .guard import Guard
from .http1 import BadRequests, ServerLimits
from .loops import Loops
from .metrics import CONTENT_TYPE_LATEST, GatewayMetrics
from .proxy import SMALL_BODY, Proxy
from .registry_sync import RegistrySync
from .settings import Settings
from .store import Store, create_store
from .switching import RouteControl
from .traffic import Traffic
from .upstream import Timeouts, UpstreamPool
from .watcher import RouteWatcher

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", GatewayMetrics)
TRAFFIC = web.AppKey("traffic", Traffic)
WATCHER = web.AppKey("watcher", RouteWatcher)
POOL = web.AppKey("pool", UpstreamPool)
PROXY = web.AppKey("proxy", Proxy)
REGISTRY = web.AppKey("registry", RegistrySync)
CONTROL = web.AppKey("control", RouteControl)
ADMIN = web.AppKey("admin", Admin)
GUARD = web.AppKey("guard", Guard)
FAST = web.AppKey("fast", FastPath)
LOOPS = web.AppKey("loops", Loops)
LIMITS = web.AppKey("limits", ServerLimits)
BAD_REQUESTS = web.AppKey("bad_requests", BadRequests)
# Only in one process of several (turnout gateway --processes N): /metrics answers for all of them.
SIBLINGS = web.AppKey("siblings", Siblings)


DRAIN = web.AppKey("drain", Drain)


def limits_from(settings: Settings) -> ServerLimits:
    """What clients are allowed, on both request paths."""
    return ServerLimits(
        header_timeout=settings.header_timeout, keepalive_timeout=settings.keepalive_timeout,
        client_timeout=settings.client_timeout, total_timeout=settings.total_timeout,
        max_headers=settings.max_headers, max_head_bytes=settings.max_head_bytes,
    )

Context = Callable[[web.Application], AsyncIterator[None]]


def create_app(settings: Settings, *, store: Store | None = None, slot: ProcessSlot | None = None) -> web.Application:
    """Build the gateway; ``store`` lets tests and ``turnout up`` share one store object (not closed here);
    ``slot`` makes it one process of several, whose /metrics sums them all."""
    # Small bodies are read whole; larger ones stream and are counted against max_body_bytes.
    app = web.Application(client_max_size=SMALL_BODY)
    app[SETTINGS] = settings
    app[STORE] = store or create_store(settings)
    app[METRICS] = metrics = GatewayMetrics()
    app[TRAFFIC] = traffic = Traffic()
    app[LOOPS] = loops = Loops(metrics.count_background_error)
    app[WATCHER] = watcher = RouteWatcher(app[STORE], metrics, poll_interval=settings.poll_interval, loops=loops,
                                          default_service=settings.default_service)
    app[POOL] = pool = UpstreamPool(
        Timeouts(connect=settings.connect_timeout, read=settings.read_timeout, total=settings.total_timeout,
                 pool=settings.upstream_pool_timeout),
        keepalive=settings.upstream_keepalive,
        max_per_host=settings.upstream_max_connections,
        loops=loops,
    )
    app[LIMITS] = limits = limits_from(settings)
    app[BAD_REQUESTS] = bad_requests = BadRequests(metrics.count_bad_request)
    app[DRAIN] = Drain()
    app.on_response_prepare.append(on_response_prepare)
    app[PROXY] = proxy = Proxy(watcher, pool, metrics, traffic, settings.max_body_bytes, limits, bad_requests,
                               settings.default_service, replay_crashes=settings.replay_crashes,
                               outliers=OutlierPolicy(
                                   consecutive_failures=settings.outlier_consecutive_failures,
                                   base_ejection=settings.outlier_base_ejection,
                                   max_ejection_percent=settings.outlier_max_ejection_percent,
                               ), round_robin=settings.balance == "round_robin",
                               shadows=Shadows(pool, metrics, concurrency=settings.shadow_concurrency,
                                               queue=settings.shadow_queue, max_body=settings.shadow_max_body,
                                               timeout=settings.shadow_timeout, tolerance=settings.shadow_tolerance,
                                               keep_bodies=settings.shadow_keep_bodies))
    store = app[STORE]
    app[REGISTRY] = registry = RegistrySync(
        settings.registry_alias, lambda entry, service: store.append_history(entry, service=service),
        settings.registry_sync, loops=loops,
    )
    app[CONTROL] = control = RouteControl(app[STORE], metrics, registry)
    app[GUARD] = guard = Guard(settings, app[STORE], traffic, control, metrics, loops=loops, watcher=watcher)
    guard.rollouts = rollouts = Rollouts(
        settings, app[STORE], control, metrics,
        figures=lambda service, deployment, since: guard.figures(deployment, service=service, since=since),
        settings_for=lambda snapshot: guard.settings_for(snapshot.config),
    )
    app[ADMIN] = admin = Admin(settings, app[STORE], watcher, traffic, control, guard, proxy.balancer, rollouts,
                               proxy.shadows)

    # Started in this order, stopped in reverse.
    app.cleanup_ctx.append(_store_ctx(owned=store is None))
    app.cleanup_ctx.append(_pool_ctx)
    app.cleanup_ctx.append(_registry_ctx)
    app.cleanup_ctx.append(_watcher_ctx)
    app.cleanup_ctx.append(_guard_ctx)
    if slot is not None:
        # Started and stopped by gateway.server around the listeners: a process shows to its siblings
        # only while it listens.
        app[SIBLINGS] = Siblings(slot, metrics)
    if settings.fast_path:
        app[FAST] = FastPath(proxy, limits, bad_requests)

    # Bound methods, not wrappers that look the proxy up: one coroutine less on every request. The
    # unprefixed scoring endpoints are the default service's.
    for prefix in ("", "/models/{service:[^/]+}"):
        app.router.add_post(prefix + "/invocations", proxy.invocations, expect_handler=errors.expect_handler)
        app.router.add_post(prefix + "/deployments/{name}/invocations", proxy.invocations,
                            expect_handler=errors.expect_handler)
    app.router.add_get("/models/{service:[^/]+}/health", service_health)
    app.router.add_get("/ping", ping)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics_endpoint)
    if settings.admin_port is None:
        app.router.add_routes(admin.routes())
    # Catch-alls instead of a middleware, so the hot path pays nothing for MLflow-shaped 404/405s.
    for prefix in ("", "/models/{service:[^/]+}"):
        app.router.add_route("*", prefix + "/invocations", errors.method_not_allowed)
        app.router.add_route("*", prefix + "/deployments/{name}/invocations", errors.method_not_allowed)
    app.router.add_route("*", "/{tail:.*}", errors.not_found)
    return app


def create_admin_app(app: web.Application) -> web.Application:
    """The admin API alone (and ``/ping``), for its own listener (``TURNOUT_ADMIN_PORT``); it shares the
    gateway's objects, whose lifetimes the gateway app owns."""
    admin_app = web.Application(client_max_size=SMALL_BODY)
    admin_app.on_response_prepare.append(on_response_prepare)
    admin_app.router.add_routes(app[ADMIN].routes())
    admin_app.router.add_get("/ping", ping)
    admin_app.router.add_route("*", "/{tail:.*}", errors.not_found)
    return admin_app


def _store_ctx(owned: bool) -> Context:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        if owned:
            await app[STORE].close()

    return ctx


async def _pool_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[POOL].start()
    yield
    await app[PROXY].attribution.close()
    await app[PROXY].shadows.close()
    await app[POOL].close()


async def _registry_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[REGISTRY].start()
    yield
    await app[REGISTRY].close()


async def _watcher_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[WATCHER].start()
    yield
    await app[WATCHER].stop()


async def _guard_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[GUARD].start()
    yield
    await app[GUARD].stop()


async def ping(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.Response(text="\n", content_type="application/json")


async def health(request: web.Request) -> web.Response:
    """The gateway's readiness: it has read its routes and no background task is stuck failing. A
    gateway that serves only its default service (a single-model install) is as ready as that service."""
    failing = request.app[LOOPS].failing()
    if failing:
        return errors.error_response(503, errors.INTERNAL_ERROR, "; ".join(failing))
    watcher = request.app[WATCHER]
    if not watcher.ready:
        return errors.error_response(503, errors.TEMPORARILY_UNAVAILABLE, "no route read yet")
    services = sorted(watcher.snapshots)
    default = request.app[SETTINGS].default_service
    if services == [default]:
        return _service_readiness(watcher, default, named=False)
    return web.Response(text=json.dumps({"status": "ready", "services": len(services)}), content_type="application/json")


async def service_health(request: web.Request) -> web.Response:
    """``GET /models/{service}/health``: one service's readiness (its active deployment is ready)."""
    if not request.app[WATCHER].ready:
        return errors.error_response(503, errors.TEMPORARILY_UNAVAILABLE, "no route read yet")
    service = request.match_info["service"]
    if service not in request.app[WATCHER].snapshots:
        # The same answer as a prediction to an unknown service: it names the services there are.
        return request.app[PROXY].unknown_service(service).response()
    return _service_readiness(request.app[WATCHER], service)


def _service_readiness(watcher: RouteWatcher, service: str, named: bool = True) -> web.Response:
    snapshot = watcher.snapshots.get(service)
    if snapshot is None:
        return errors.error_response(404, errors.RESOURCE_DOES_NOT_EXIST, f"no service named {service!r}")
    active = snapshot.route.active
    if active is None:
        return errors.error_response(503, errors.TEMPORARILY_UNAVAILABLE, f"service {service!r} has no active deployment")
    # Ready while the active deployment has a replica to serve (its min_ready gates switches, not serving).
    if not snapshot.serving(active):
        state = snapshot.effective_state(active)
        return errors.error_response(
            503, errors.TEMPORARILY_UNAVAILABLE,
            f"active deployment {active!r} of service {service!r} is {state.value if state else 'unknown'}",
        )
    body = {"status": "ready", **({"service": service} if named else {}), "active": active,
            "generation": snapshot.route.generation}
    return web.Response(text=json.dumps(body), content_type="application/json")


async def version(request: web.Request) -> web.Response:
    """Turnout's version, as plain text (as MLflow's own ``/version``)."""
    return web.Response(text=__version__)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus exposition of this process's metrics, or of every gateway process of a run summed."""
    siblings = request.app.get(SIBLINGS)
    body = request.app[METRICS].exposition() if siblings is None else await siblings.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

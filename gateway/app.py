"""The gateway application: ``create_app(settings)`` wires store → watcher → proxy → metrics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from aiohttp import web

from . import __version__, errors
from .metrics import CONTENT_TYPE_LATEST, GatewayMetrics
from .proxy import SMALL_BODY, Proxy
from .settings import Settings
from .store import Store, create_store
from .upstream import Timeouts, UpstreamPool
from .watcher import RouteWatcher

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
METRICS = web.AppKey("metrics", GatewayMetrics)
WATCHER = web.AppKey("watcher", RouteWatcher)
POOL = web.AppKey("pool", UpstreamPool)
PROXY = web.AppKey("proxy", Proxy)


def create_app(settings: Settings, *, store: Store | None = None) -> web.Application:
    """Build the gateway; ``store`` lets tests and ``turnout up`` share one store object (not closed here)."""
    app = web.Application(
        # Small bodies are read whole; larger ones stream and are counted against max_body_bytes.
        client_max_size=SMALL_BODY,
    )
    app[SETTINGS] = settings
    app[METRICS] = GatewayMetrics()
    app.cleanup_ctx.append(_store_ctx(store))
    app.cleanup_ctx.append(_pool_ctx)
    app.cleanup_ctx.append(_watcher_ctx)
    app.router.add_post("/invocations", _invocations)
    app.router.add_post("/deployments/{name}/invocations", _pinned)
    app.router.add_get("/ping", ping)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    # Catch-alls instead of a middleware, so the hot path pays nothing for MLflow-shaped 404/405s.
    app.router.add_route("*", "/invocations", errors.method_not_allowed)
    app.router.add_route("*", "/deployments/{name}/invocations", errors.method_not_allowed)
    app.router.add_route("*", "/{tail:.*}", errors.not_found)
    return app


def _store_ctx(given: Store | None):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        store = given or create_store(app[SETTINGS])
        app[STORE] = store
        yield
        if given is None:
            await store.close()

    return ctx


async def _pool_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    pool = UpstreamPool(
        Timeouts(connect=s.connect_timeout, read=s.read_timeout, total=s.total_timeout),
        keepalive=s.upstream_keepalive,
        max_per_host=s.upstream_max_connections,
    )
    await pool.start()
    app[POOL] = pool
    yield
    await pool.close()


async def _watcher_ctx(app: web.Application) -> AsyncIterator[None]:
    watcher = RouteWatcher(app[STORE], app[METRICS], poll_interval=app[SETTINGS].poll_interval)
    app[WATCHER] = watcher
    app[PROXY] = Proxy(watcher, app[POOL], app[METRICS], app[SETTINGS].max_body_bytes)
    await watcher.start()
    yield
    await watcher.stop()


async def _invocations(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY].invocations(request)


async def _pinned(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY].pinned(request)


async def ping(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.Response(text="\n", content_type="application/json")


async def health(request: web.Request) -> web.Response:
    """Readiness: a route is known and its active deployment is ready."""
    snapshot = request.app[WATCHER].snapshot
    if snapshot is None:
        return errors.error_response(503, errors.TEMPORARILY_UNAVAILABLE, "no route read yet")
    active = snapshot.route.active
    if active is None:
        return errors.error_response(503, errors.TEMPORARILY_UNAVAILABLE, "no active deployment")
    if not snapshot.is_ready(active):
        state = snapshot.effective_state(active)
        return errors.error_response(
            503, errors.TEMPORARILY_UNAVAILABLE, f"active deployment {active!r} is {state.value if state else 'unknown'}"
        )
    body = {"status": "ready", "active": active, "generation": snapshot.route.generation}
    return web.Response(text=json.dumps(body), content_type="application/json")


async def version(request: web.Request) -> web.Response:
    """Turnout's version, as plain text (as MLflow's own ``/version``)."""
    return web.Response(text=__version__)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition of this process's metrics."""
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

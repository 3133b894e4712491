"""Running the gateway: signals → startup → serve → one graceful drain → shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from .aiohttp_handler import GuardedRequestHandler
from .app import BAD_REQUESTS, DRAIN, FAST, LIMITS, SIBLINGS, create_admin_app, create_app
from .settings import Settings
from .siblings import ProcessSlot
from .store import Store

log = logging.getLogger(__name__)

# What the runners' own cleanup may still wait for, once the drain is over (they wait up to twice this).
_CLEANUP_GRACE = 0.5


def install_event_loop_policy() -> None:
    """Use uvloop where installed: about 20% more proxied requests per CPU-second."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class _Listener(web.BaseSite):
    """A TCP listener whose connections start on ``factory`` (the fast path, or a guarded aiohttp handler)."""

    def __init__(self, runner: web.BaseRunner, factory: Callable[[], asyncio.Protocol], host: str, port: int,
                 reuse_port: bool) -> None:
        super().__init__(runner)
        self._factory = factory
        self._host = host
        self._port = port
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self._server = await asyncio.get_running_loop().create_server(
            self._factory, self._host, self._port, backlog=self._backlog, reuse_port=self._reuse_port or None
        )


def _guarded(runner: web.AppRunner, app: web.Application) -> Callable[[], GuardedRequestHandler]:
    """aiohttp's connection handlers for ``runner``'s app, held to the gateway ``app``'s limits."""
    server = runner.server
    assert server is not None
    loop = asyncio.get_running_loop()
    limits, bad_requests, drain = app[LIMITS], app[BAD_REQUESTS], app[DRAIN]

    def make() -> GuardedRequestHandler:
        # auto_decompress=False: aiohttp would otherwise gunzip request bodies while the
        # Content-Encoding header still goes upstream, corrupting every compressed prediction request.
        return GuardedRequestHandler(server, loop=loop, limits=limits, bad_requests=bad_requests, drain=drain,
                                     access_log=None, auto_decompress=False)

    return make


class Gateway:
    """A started gateway process: its app(s), runners and listeners. :meth:`stop` undoes :func:`start_gateway`."""

    def __init__(self, settings: Settings, app: web.Application, runner: web.AppRunner,
                 admin_runner: web.AppRunner | None) -> None:
        self.settings = settings
        self.app = app
        self.runner = runner
        self.admin_runner = admin_runner
        self.sites: list[web.BaseSite] = []
        self._stopped = False

    @property
    def runners(self) -> list[web.AppRunner]:
        """The admin runner (if any) first: it is stopped first."""
        return [r for r in (self.admin_runner, self.runner) if r is not None]

    def _handlers(self) -> list[web.RequestHandler]:
        return [h for r in self.runners if r.server is not None for h in r.server.connections]

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let requests in flight finish (up to ``timeout``, default the shutdown
        timeout) with ``Connection: close``, drop what is left, then close everything in reverse order."""
        if self._stopped:
            return
        self._stopped = True
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        fast = self.app.get(FAST)
        # 1. Stop accepting: every listener closes; established connections stay.
        for site in self.sites:
            await site.stop()
        # 2. Take no new request: idle connections close now, answers still owed say Connection: close.
        self.app[DRAIN].active = True
        if fast is not None:
            fast.begin_drain()
        handlers = self._handlers()
        for handler in handlers:
            handler.close()  # an idle one stops waiting for a request; a busy one closes after its answer
        # 3. Wait for the requests in flight on both paths at once, until the one deadline.
        drains = [asyncio.ensure_future(h.shutdown(timeout)) for h in handlers]
        while loop.time() < deadline and ((fast is not None and fast.busy()) or not all(d.done() for d in drains)):
            await asyncio.sleep(0.05)
        # 4. Time is up: drop whatever is still open.
        for d in drains:
            d.cancel()
        await asyncio.gather(*drains, return_exceptions=True)
        for handler in self._handlers():
            if handler.transport is not None:
                handler.transport.abort()
        if fast is not None:
            fast.abort_all()
        # 5. Undo startup in reverse: the admin runner, then the gateway's cleanup contexts (guard,
        # watcher, registry sync, upstream pool, store); nothing is left for them to wait on.
        for runner in self.runners:
            await runner.cleanup()
        siblings = self.app.get(SIBLINGS)
        if siblings is not None:
            await siblings.stop()


async def start_gateway(settings: Settings, *, store: Store | None = None, slot: ProcessSlot | None = None) -> Gateway:
    """Start listening; the caller owns the returned gateway and calls ``stop()`` to drain and stop
    (``slot``: as one process of several, see :mod:`gateway.processes`)."""
    app = create_app(settings, store=store, slot=slot)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=_CLEANUP_GRACE, auto_decompress=False)
    await runner.setup()
    admin_runner: web.AppRunner | None = None
    gateway = Gateway(settings, app, runner, None)
    try:
        guarded = _guarded(runner, app)
        fast = app.get(FAST)
        if fast is not None:
            fast.fallback = guarded
        listeners = [_Listener(runner, fast or guarded, settings.host, settings.port, settings.reuse_port)]
        if settings.admin_port is not None:
            admin_runner = gateway.admin_runner = web.AppRunner(
                create_admin_app(app), access_log=None, shutdown_timeout=_CLEANUP_GRACE
            )
            await admin_runner.setup()
            listeners.append(_Listener(admin_runner, _guarded(admin_runner, app), settings.admin_host or settings.host,
                                       settings.admin_port, settings.reuse_port))
        for site in listeners:
            await site.start()
            gateway.sites.append(site)
        siblings = app.get(SIBLINGS)
        if siblings is not None:
            await siblings.start()
    except BaseException:
        await gateway.stop(0)
        raise
    log.info("gateway listening on http://%s:%d", settings.host, settings.port)
    admin_where = (f"http://{settings.admin_host or settings.host}:{settings.admin_port}/admin/"
                   if settings.admin_port is not None else "/admin/ on the same port")
    if settings.admin_token:
        log.info("admin API at %s (bearer token required)", admin_where)
    else:
        log.warning("admin API at %s has no token (TURNOUT_ADMIN_TOKEN): it answers loopback clients only", admin_where)
    return gateway


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT only set the flag; the main coroutine does the shutdown."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def serve(settings: Settings, *, slot: ProcessSlot | None = None, stop: asyncio.Event | None = None,
                on_ready: Callable[[], None] | None = None) -> None:
    """Run one gateway process until SIGTERM/SIGINT (or ``stop`` is set), then drain in-flight requests and
    exit; ``on_ready`` is called once it listens."""
    stop = stop or asyncio.Event()
    stop_on_signals(stop)
    gateway = await start_gateway(settings, slot=slot)
    if on_ready is not None:
        on_ready()
    await stop.wait()
    log.info("draining in-flight requests (up to %.0f s)", settings.shutdown_timeout)
    await gateway.stop()
    log.info("gateway stopped")

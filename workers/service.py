"""Running a worker as a process: signals → start → serve /metrics → stop on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from gateway.server import stop_on_signals
from gateway.settings import Settings
from gateway.store import Store, create_store

from .supervisor import Worker

log = logging.getLogger(__name__)

WORKER = web.AppKey("worker", Worker)


def create_metrics_app(worker: Worker) -> web.Application:
    """``/metrics`` (Prometheus) and ``/health`` (hosted deployments and their states) of one worker."""
    app = web.Application()
    app[WORKER] = worker
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/health", _health)
    return app


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[WORKER].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _health(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    states = {h.label: (h.state.value if h.state else "claimed") for h in worker.hosted.values()}
    failing = worker.loops.failing()
    body = {"worker": worker.id, "deployments": states, **({"failing": failing} if failing else {})}
    return web.Response(text=json.dumps(body), status=503 if failing else 200, content_type="application/json")


async def run_worker(settings: Settings, store: Store | None = None, stop: asyncio.Event | None = None) -> None:
    """Host deployments until SIGTERM/SIGINT (or ``stop``), then stop every model server and exit."""
    if stop is None:
        stop = asyncio.Event()
        stop_on_signals(stop)
    own_store = store is None
    store = store or create_store(settings)
    worker = Worker(settings, store)
    runner: web.AppRunner | None = None
    try:
        await worker.start()
        if settings.worker_metrics_port is not None:
            runner = web.AppRunner(create_metrics_app(worker), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, settings.model_host, settings.worker_metrics_port).start()
        await stop.wait()
        log.info("worker %s stopping its model servers", worker.id)
    finally:
        if runner is not None:
            await runner.cleanup()
        await worker.stop()
        if own_store:
            await store.close()
    log.info("worker stopped")

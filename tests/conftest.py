"""Fixtures: stores (embedded, fakeredis, the real Redis under a private namespace), backends, gateways."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.store import RedisStore, drop_namespace
from gateway.settings import Settings
from gateway.server import Gateway, start_gateway
from gateway.store import EmbeddedStore, Store
from tests.support import BIN, backend_app, child_env, free_port, serve_app, wait_port

# The machine's shared Redis; tests only ever touch keys under their own random namespace.
REDIS_URL = os.environ.get("TURNOUT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def new_namespace() -> str:
    """A namespace no other test (or run) uses."""
    return f"turnout-test-{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def gateway_subprocess(*args: str, port: int | None = None, **env: str) -> AsyncIterator[dict[str, Any]]:
    """``turnout gateway ARGS`` as a real process on the real Redis (private namespace, removed afterwards),
    its default service routed to blue, a local test backend; yields its ``proc``, ``url``, ``port``,
    ``store`` and ``backend`` once something listens on its port (a free one unless given). ``env`` adds
    ``TURNOUT_*`` variables (logging at WARNING unless given)."""
    from gateway.records import Deployment, State

    namespace = new_namespace()
    store = RedisStore.from_url(REDIS_URL, namespace)
    port = port or free_port()
    try:
        async with serve_app(backend_app("blue")) as blue:
            await store.create_deployment(Deployment(name="blue", url=blue, state=State.READY, external=True))
            await store.set_route("blue", None)
            proc = subprocess.Popen(
                [str(BIN / "turnout"), "gateway", "--port", str(port), *args],
                env=child_env(TURNOUT_REDIS_URL=REDIS_URL, TURNOUT_NAMESPACE=namespace,
                              **{"TURNOUT_LOG_LEVEL": "WARNING", **env}),
                stderr=subprocess.PIPE,
            )
            try:
                wait_port(port)
                yield {"proc": proc, "url": f"http://127.0.0.1:{port}", "port": port, "store": store, "backend": blue}
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
    finally:
        await store.close()
        await drop_namespace(REDIS_URL, namespace)


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisStore]:
    """A store on the real Redis server, in a private namespace removed afterwards."""
    namespace = new_namespace()
    store = RedisStore.from_url(REDIS_URL, namespace)
    try:
        yield store
    finally:
        await store.close()
        await drop_namespace(REDIS_URL, namespace)


@pytest.fixture
async def redis_store_factory() -> AsyncIterator[Callable[[str | None], RedisStore]]:
    """Several stores on one namespace of the real Redis (one per simulated replica)."""
    namespace = new_namespace()
    stores: list[RedisStore] = []

    def make(url: str | None = None) -> RedisStore:
        store = RedisStore.from_url(url or REDIS_URL, namespace)
        stores.append(store)
        return store

    make.namespace = namespace  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for store in stores:
            await store.close()
        await drop_namespace(REDIS_URL, namespace)


@pytest.fixture(params=["embedded", "fakeredis", "redis"])
async def any_store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Each store implementation, for contract tests."""
    if request.param == "embedded":
        yield EmbeddedStore()
        return
    if request.param == "fakeredis":
        import fakeredis

        client = fakeredis.FakeAsyncRedis(decode_responses=True)
        store = RedisStore(client, new_namespace())
        yield store
        await client.aclose()
        return
    namespace = new_namespace()
    real = RedisStore.from_url(REDIS_URL, namespace)
    yield real
    await real.close()
    await drop_namespace(REDIS_URL, namespace)


@pytest.fixture
async def gateway_factory() -> AsyncIterator[Callable[..., Any]]:
    """Start gateways on real sockets: ``url = await gateway_factory(store, **settings)``."""
    gateways: list[Gateway] = []

    async def start(store: Store | None = None, **settings: Any) -> str:
        port = settings.pop("port", None) or free_port()
        gateway = await start_gateway(Settings(port=port, **settings), store=store)
        gateways.append(gateway)
        start.gateways = gateways  # type: ignore[attr-defined]
        return f"http://127.0.0.1:{port}"

    try:
        yield start
    finally:
        for gateway in reversed(gateways):
            await gateway.stop()


@pytest.fixture(scope="session")
def mlflow_registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A sqlite MLflow registry with iris v1 and v2 (alias ``champion`` → 2), built once per session."""
    from tests.mlflow_support import build_registry

    return build_registry(tmp_path_factory.mktemp("mlflow"))

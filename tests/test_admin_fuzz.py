"""Schema-driven fuzz of the admin API (schemathesis over its own OpenAPI document): no 5xx, and a
rejected request never changes state."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from gateway.admin_models import openapi_document
from gateway.records import Deployment, State
from gateway.server import start_gateway
from gateway.settings import Settings
from gateway.store import EmbeddedStore
from tests.support import free_port

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

schema = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    """A gateway on its own event loop in a thread, so schemathesis's synchronous calls can reach it."""
    loop = asyncio.new_event_loop()
    port = free_port()
    started = threading.Event()
    stop: dict[str, Any] = {}

    async def main() -> None:
        store = EmbeddedStore()
        for name in ("blue", "green"):
            await store.create_deployment(Deployment(name=name, url="http://127.0.0.1:9", state=State.READY, external=True))
        await store.set_route("blue", None)
        gateway = await start_gateway(Settings(port=port, admin_token=TOKEN, registry_sync=False), store=store)
        stop["event"] = asyncio.Event()
        started.set()
        await stop["event"].wait()
        await gateway.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(stop["event"].set)
    thread.join(10)


def observable_state(url: str) -> tuple[Any, int]:
    state = requests.get(url + "/admin/state", headers=AUTH, timeout=5).json()
    history = requests.get(url + "/admin/history?limit=1", headers=AUTH, timeout=5).json()
    # Refusals are recorded in the history by design: compare the route and the deployments.
    changing = (state["route"], sorted((d["name"], d["state"], d["url"], d["model_uri"]) for d in state["deployments"]))
    return changing, history["total"]


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_admin_api_never_fails_and_rejections_change_nothing(case: Any, gateway_url: str) -> None:
    before, _ = observable_state(gateway_url)
    response = case.call(base_url=gateway_url, headers=AUTH, timeout=10)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    if response.status_code >= 400:
        after, _ = observable_state(gateway_url)
        assert after == before, (case.method, case.formatted_path, case.body, response.status_code, response.text)
        # aiohttp's HTTP parser answers requests it cannot parse (400, plain text) before any handler
        # runs; everything that reaches the admin API gets MLflow's error shape.
        try:
            body = response.json()
        except ValueError:
            assert response.status_code == 400, (response.status_code, response.text)
        else:
            assert {"error_code", "message"} <= set(body), body

"""Switches and rollbacks move the registry alias and tag versions, with real model servers and a sqlite registry."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from gateway.records import Deployment, ServiceConfig, State
from gateway.store import EmbeddedStore
from tests.mlflow_support import Registry, model_server
from tests.support import eventually, history

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def servers(mlflow_registry: Registry) -> Iterator[dict[str, str]]:
    with model_server(mlflow_registry, "models:/iris/1") as v1, model_server(mlflow_registry, "models:/iris/2") as v2:
        yield {"1": v1, "2": v2}


async def test_alias_follows_switch_and_rollback_and_tags_say_why(
    mlflow_registry: Registry, servers: dict[str, str], gateway_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_registry.tracking_uri)
    client = MlflowClient(mlflow_registry.tracking_uri)
    store = EmbeddedStore()
    for name, version in (("blue", "1"), ("green", "2")):
        await store.create_deployment(Deployment(
            name=name, url=servers[version], state=State.READY, external=True, mlflow_name="iris", mlflow_version=version,
        ))
    await store.set_route("blue", None)
    url = await gateway_factory(store, registry_alias="prod")

    def alias_version() -> str | None:
        try:
            return str(client.get_model_version_by_alias("iris", "prod").version)
        except Exception:  # noqa: BLE001 - "no such alias" yet
            return None

    def tags(version: str) -> dict[str, str]:
        return dict(client.get_model_version("iris", version).tags)

    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/admin/switch", json={"target": "green", "reason": "v2 wins offline eval"}) as resp:
            assert resp.status == 200
        await eventually(lambda: alias_version() == "2" and tags("1").get("turnout.status") == "previous"
                         and tags("2").get("turnout.status") == "active", timeout=20)
        assert tags("2")["turnout.generation"] == "2"
        async with s.post(url + "/invocations", data=b'{"inputs": [[1, 2, 3, 4]]}',
                          headers={"Content-Type": "application/json"}) as resp:
            assert resp.status in (200, 400)
        async with s.post(url + "/admin/rollback", json={"reason": "p99 doubled"}) as resp:
            assert resp.status == 200
        await eventually(lambda: alias_version() == "1" and tags("2").get("turnout.status") == "rolled_back"
                         and tags("1").get("turnout.status") == "active", timeout=20)
    assert tags("2")["turnout.reason"] == "p99 doubled" and tags("2")["turnout.generation"] == "3"
    assert tags("1")["turnout.status"] == "active"


async def test_registry_failure_never_blocks_a_switch_and_is_recorded(
    gateway_factory: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    # A registry that cannot answer: the switch still applies, the failure is in the history.
    # (set_tracking_uri, because the session's registry fixture set one that outranks the variable)
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/missing-dir/x.db")
    store = EmbeddedStore()
    # In a service of its own: the failure belongs in that service's history, not the default one's.
    await store.create_service("loans", ServiceConfig())
    for name, version in (("blue", "1"), ("green", "2")):
        await store.create_deployment(Deployment(
            name=name, url="http://127.0.0.1:9", state=State.READY, external=True, mlflow_name="iris", mlflow_version=version,
        ), service="loans")
    await store.set_route("blue", None, service="loans")
    url = await gateway_factory(store)
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/admin/services/loans/switch", json={"target": "green"}) as resp:
            assert resp.status == 200 and (await resp.json())["route"]["active"] == "green"

    async def failure_recorded() -> bool:
        entries = await history(store, service="loans")
        return any(e["action"] == "registry_sync" and e["result"] == "failed" and e.get("retry") for e in entries)

    try:
        await eventually(failure_recorded, timeout=30)
    finally:
        mlflow.set_tracking_uri(previous_uri)
    assert not [e for e in await history(store) if e["action"] == "registry_sync"]

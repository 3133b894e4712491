"""``turnout worker`` against real ``mlflow models serve`` processes, a real sqlite registry and real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from gateway.records import Deployment, Snapshot, State
from gateway.store import RedisStore, drop_namespace
from tests.conftest import REDIS_URL, new_namespace
from tests.mlflow_support import Registry
from tests.support import BIN, eventually, free_port, processes_with_env

pytestmark = pytest.mark.slow

ROW = b'{"dataframe_split": {"columns": ["sepal_length", "sepal_width", "petal_length", "petal_width"], "data": [[6.7, 3.0, 5.2, 2.3]]}}'


class WorkerProcess:
    """A ``turnout worker`` child in a private namespace; ``marker`` finds every process it started."""

    def __init__(self, registry: Registry, namespace: str, *args: str, redis_url: str = REDIS_URL) -> None:
        tag = uuid.uuid4().hex
        # Inherited by everything the worker starts: the process table tells whose a process is.
        self.marker = f"TURNOUT_TEST_WORKER={tag}"
        env = {**registry.env, "TURNOUT_REDIS_URL": redis_url, "TURNOUT_NAMESPACE": namespace, "TURNOUT_TEST_WORKER": tag}
        self.proc = subprocess.Popen(
            [str(BIN / "turnout"), "worker", "--lease-ttl", "3", "--health-interval", "0.5",
             "--restart-backoff", "0.2", "--max-start-attempts", "2", "--stop-timeout", "5", *args],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def children(self) -> list[tuple[int, str]]:
        """Every live process this worker started (directly or not), except the worker itself."""
        return [(pid, cmd) for pid, cmd in processes_with_env(self.marker) if pid != self.proc.pid]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(30)


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    ns = new_namespace()
    yield ns
    await drop_namespace(REDIS_URL, ns)


@pytest.fixture
async def store(namespace: str) -> AsyncIterator[RedisStore]:
    s = RedisStore.from_url(REDIS_URL, namespace)
    yield s
    await s.close()


@pytest.fixture
def workers(mlflow_registry: Registry, namespace: str) -> Iterator[Any]:
    """Start workers: ``workers(*args)``; each is killed (and its processes checked gone) afterwards."""
    started: list[WorkerProcess] = []

    def start(*args: str) -> WorkerProcess:
        w = WorkerProcess(mlflow_registry, namespace, *args)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop(signal.SIGKILL)
    deadline = time.monotonic() + 20
    while any(w.children() for w in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    for w in started:
        for pid, _ in w.children():
            os.kill(pid, signal.SIGKILL)


async def states(store: RedisStore) -> dict[str, tuple[State | None, str]]:
    snapshot = await store.read_snapshot()
    return {name: (snapshot.effective_state(name), dep.reason) for name, dep in snapshot.deployments.items()}


async def wait_state(store: RedisStore, name: str, *wanted: State, timeout: float = 90) -> Snapshot:
    async def check() -> Snapshot | None:
        snapshot = await store.read_snapshot()
        return snapshot if snapshot.effective_state(name) in wanted else None

    try:
        return await eventually(check, timeout=timeout, interval=0.1)
    except AssertionError:
        raise AssertionError(f"{name} never reached {wanted}: {await states(store)}") from None


async def predict(session: aiohttp.ClientSession, url: str) -> int:
    async with session.post(url + "/invocations", data=ROW, headers={"Content-Type": "application/json"}) as resp:
        await resp.read()
        return resp.status


async def test_worker_hosts_versions_restarts_crashes_and_stops_cleanly(
    workers: Any, store: RedisStore, gateway_factory: Any
) -> None:
    w = workers("-d", "blue=models:/iris/1", "-d", "green=models:/iris@champion", "-d", "bad=models:/iris/99")
    blue = (await wait_state(store, "blue", State.READY)).deployments["blue"]
    green = (await wait_state(store, "green", State.READY)).deployments["green"]
    assert (blue.mlflow_name, blue.mlflow_version, blue.mlflow_alias) == ("iris", "1", None)
    assert (green.mlflow_name, green.mlflow_version, green.mlflow_alias) == ("iris", "2", "champion")
    assert "input example" in blue.reason and blue.ready_at and blue.started_at

    # A model URI that does not exist ends failed, with MLflow's error, after the configured attempts.
    bad = (await wait_state(store, "bad", State.FAILED, timeout=120)).deployments["bad"]
    assert "gave up after 2 failed starts" in bad.reason and "iris" in bad.reason, bad.reason

    # Both serve predictions through the gateway (pinned), and the active one through /invocations.
    await store.set_route("green", None)
    url = await gateway_factory(RedisStore.from_url(REDIS_URL, store.keys.namespace), poll_interval=0.2)
    async with aiohttp.ClientSession() as s:
        await eventually(lambda: _healthy(s, url), timeout=10)
        assert await predict(s, url + "/deployments/blue") == 200
        assert await predict(s, url + "/deployments/green") == 200

        # kill -9 blue's uvicorn: blue goes unhealthy, is restarted and ready again; green never stops.
        blue_port = blue.url.rsplit(":", 1)[1]  # type: ignore[union-attr]
        victims = [pid for pid, cmd in w.children() if "uvicorn" in cmd and f"--port {blue_port}" in cmd]
        assert victims, w.children()
        green_statuses: list[int] = []
        stop = asyncio.Event()

        async def green_traffic() -> None:
            while not stop.is_set():
                green_statuses.append(await predict(s, url))
                await asyncio.sleep(0.02)

        traffic = asyncio.create_task(green_traffic())
        os.kill(victims[0], signal.SIGKILL)
        await wait_state(store, "blue", State.UNHEALTHY, State.STARTING, timeout=15)
        restarted = (await wait_state(store, "blue", State.READY)).deployments["blue"]
        assert restarted.restarts == 1 and restarted.url != blue.url or restarted.ready_at != blue.ready_at
        assert await predict(s, url + "/deployments/blue") == 200
        stop.set()
        await traffic
    assert green_statuses and set(green_statuses) == {200}

    # SIGTERM: every model server of this worker is gone afterwards, by the process table.
    assert len([c for _, c in w.children() if "uvicorn" in c]) == 2
    assert w.stop(signal.SIGTERM) == 0
    assert w.children() == []
    assert (await states(store))["blue"][0] is State.STOPPED


async def _healthy(session: aiohttp.ClientSession, url: str) -> bool:
    async with session.get(url + "/health") as resp:
        return resp.status == 200


async def test_sigkilled_worker_leaves_no_model_server(workers: Any, store: RedisStore) -> None:
    port = free_port()
    w = workers("-d", "blue=models:/iris/1", "--worker-metrics-port", str(port))
    await wait_state(store, "blue", State.READY)
    # Its own /health (a probe's target) names what it hosts, by service/name#replica.
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/health") as resp:
        body = await resp.json()
        assert resp.status == 200 and body["deployments"] == {"default/blue": "ready"}, body
    assert any("uvicorn" in c for _, c in w.children())
    w.stop(signal.SIGKILL)
    await eventually(lambda: w.children() == [], timeout=15)
    # Its lease lapses: gateways see the deployment as not ready within the lease TTL.
    await wait_state(store, "blue", State.UNHEALTHY, timeout=10)


async def test_two_workers_share_claimable_deployments_and_take_over(workers: Any, store: RedisStore) -> None:
    for name, uri in (("a", "models:/iris/1"), ("b", "models:/iris/2"), ("c", "models:/iris@champion")):
        assert await store.create_deployment(Deployment(name=name, model_uri=uri))
    first, second = workers("--claim"), workers("--claim")
    for name in "abc":
        await wait_state(store, name, State.READY)
    snapshot = await store.read_snapshot()
    owners = {name: snapshot.deployments[name].worker for name in "abc"}
    servers = [c for w in (first, second) for _, c in w.children() if "uvicorn" in c]
    assert len(servers) == 3, "each deployment is hosted exactly once"
    # Kill the worker hosting 'a': its deployments move to the survivor.
    # A worker's id is "<host>-<pid>-<random>": the record itself says which process hosts 'a'
    # (matching the model server's port in the process table picked the wrong worker now and then).
    victim = first if f"-{first.proc.pid}-" in (owners["a"] or "") else second
    assert f"-{victim.proc.pid}-" in (owners["a"] or ""), owners
    survivor = second if victim is first else first
    victim.stop(signal.SIGKILL)
    moved = [n for n in "abc" if owners[n] == owners["a"]]
    for name in moved:
        await wait_state(store, name, State.STARTING, State.UNHEALTHY, timeout=15)

    async def all_on_survivor() -> bool:
        snapshot = await store.read_snapshot()
        return all(
            snapshot.effective_state(n) is State.READY and snapshot.deployments[n].worker != owners["a"] for n in "abc"
        )

    await eventually(all_on_survivor, timeout=150, interval=0.2)
    await eventually(lambda: victim.children() == [], timeout=15)
    assert len([c for _, c in survivor.children() if "uvicorn" in c]) == 3


async def test_worker_hosts_deployments_of_named_services(workers: Any, store: RedisStore) -> None:
    """``--deployment SERVICE/NAME=URI`` creates the service and hosts it; ``--claim --services`` takes only
    those services' deployments."""
    from gateway.records import ServiceConfig

    assert await store.create_service("fraud", ServiceConfig())
    assert await store.create_deployment(Deployment(name="other", model_uri="models:/iris/2"), service="fraud")
    worker = workers("--deployment", "loans/served=models:/iris/1", "--claim", "--services", "loans")

    async def loans_served_ready() -> bool:
        snapshot = await store.read_snapshot(service="loans")
        return snapshot.effective_state("served") is State.READY

    await eventually(loans_served_ready, timeout=120, interval=0.2)
    assert await store.list_services() == ["default", "fraud", "loans"]
    assert (await store.read_snapshot()).deployments == {}, "nothing landed in the default service"
    assert await store.create_deployment(Deployment(name="later", model_uri="models:/iris@champion"), service="loans")

    async def later_ready() -> bool:
        return (await store.read_snapshot(service="loans")).effective_state("later") is State.READY

    await eventually(later_ready, timeout=120, interval=0.2)
    fraud = await store.read_snapshot(service="fraud")
    assert fraud.deployments["other"].worker is None and "other" not in fraud.live, "fraud is not among --services"
    assert len([c for _, c in worker.children() if "uvicorn" in c]) == 2

"""Redis Sentinel, for real: a primary, a replica and three sentinels behind two gateways and a worker,
failed over by SENTINEL FAILOVER and by SIGKILL of the primary under traffic and a loop of switches."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.records import Deployment, State
from gateway.store import RedisStore
from gateway.loadgen import IRIS_COLUMNS
from tests.conftest import new_namespace
from tests.support import BIN, Load, backend_app, child_env, eventually, free_port, sentinel_cluster, serve_app, wait_port
from tests.test_worker import WorkerProcess, wait_state

pytestmark = pytest.mark.slow

TOKEN = "sentinel-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IRIS_ROW = {"dataframe_split": {"columns": IRIS_COLUMNS, "data": [[6.7, 3.0, 5.2, 2.3]]}}
POLL = 0.5


@contextlib.contextmanager
def gateway(url: str, namespace: str, log: Path) -> Iterator[str]:
    """A ``turnout gateway`` process on the Sentinel URL, logging to ``log``; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "turnout"), "gateway", "--port", str(port), "--poll-interval", str(POLL)],
        env=child_env(TURNOUT_REDIS_URL=url, TURNOUT_NAMESPACE=namespace, TURNOUT_ADMIN_TOKEN=TOKEN,
                      TURNOUT_LOG_LEVEL="INFO", TURNOUT_REGISTRY_SYNC="false"),
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def generation(s: aiohttp.ClientSession, url: str) -> int | None:
    """The route generation a gateway applies (its /metrics gauge)."""
    async with s.get(url + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith('turnout_route_generation{service="default"}'):
                return int(float(line.rsplit(" ", 1)[1]))
    return None


class Background:
    """A loop (``_run``) that runs for the length of an ``async with`` block."""

    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Switcher(Background):
    """Switches blue ⇄ green through the gateways in turn, as fast as answers come; keeps every answer."""

    def __init__(self, session: aiohttp.ClientSession, urls: list[str]) -> None:
        self.session, self.urls = session, urls
        self.answers: list[tuple[float, int, dict[str, Any]]] = []

    async def _run(self) -> None:
        for i in itertools.count():
            url = self.urls[i % len(self.urls)]
            with contextlib.suppress(aiohttp.ClientConnectionError, TimeoutError):
                async with self.session.post(url + "/admin/switch", json={"target": "green" if i % 2 else "blue",
                                                                           "reason": "failover test"}) as resp:
                    text = await resp.text()
                    try:
                        body = json.loads(text)
                    except ValueError:
                        body = {"text": text}
                    self.answers.append((time.monotonic(), resp.status, body))
            await asyncio.sleep(0.1)

    def replicated(self) -> bool:
        """Whether a switch was applied and acknowledged by a replica."""
        return any(status == 200 and body.get("replicated") is True for _, status, body in self.answers)

    def ok_since(self, t: float) -> bool:
        """Whether a switch succeeded after ``t``."""
        return any(at > t and status == 200 for at, status, _ in self.answers)


class Watch(Background):
    """Reads every gateway's applied generation all along: none may ever go down."""

    def __init__(self, session: aiohttp.ClientSession, urls: list[str]) -> None:
        self.session, self.urls = session, urls
        self.seen: dict[str, list[int]] = {u: [] for u in urls}

    async def _run(self) -> None:
        while True:
            for url in self.urls:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    gen = await generation(self.session, url)
                    if gen is not None:
                        self.seen[url].append(gen)
            await asyncio.sleep(0.05)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Any]:
    with sentinel_cluster(tmp_path) as c:
        yield c


async def test_gateways_and_a_worker_ride_out_failovers_by_command_and_by_sigkill(
    cluster: Any, mlflow_registry: Any, tmp_path: Path,
) -> None:
    namespace = new_namespace()
    store = RedisStore.from_url(cluster.url, namespace, wait_timeout=0.5)
    worker = WorkerProcess(mlflow_registry, namespace, "-d", "blue=models:/iris/1", "--lease-ttl", "10",
                           redis_url=cluster.url)
    try:
        async with serve_app(backend_app("green")) as green:
            assert await store.create_deployment(Deployment(name="green", url=green, state=State.READY, external=True))
            await wait_state(store, "blue", State.READY, timeout=120)
            assert (await store.set_route("blue", None)).ok
            with gateway(cluster.url, namespace, tmp_path / "one.log") as one, \
                    gateway(cluster.url, namespace, tmp_path / "two.log") as two:
                urls = [one, two]
                async with aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=10)) as s:
                    for url in urls:
                        await eventually(lambda url=url: generation(s, url), timeout=15)
                    # Two switchers at once, as two operators (or an operator and the guard): changes in flight
                    # on several connections when the primary moves.
                    async with Load(urls, rate=40, body=IRIS_ROW) as load, Switcher(s, urls) as switcher, \
                            Switcher(s, urls[::-1]), Watch(s, urls) as watch:
                        # With the replica in sync, changes are acknowledged by it.
                        await eventually(switcher.replicated, timeout=10)

                        # 1. The primary killed: no write can succeed until the sentinels agree it is down.
                        dead = cluster.primary()
                        killed = time.monotonic()
                        dead.stop()
                        await eventually(lambda: cluster.primary_port() != dead.port, timeout=30)
                        await eventually(lambda: switcher.ok_since(killed), timeout=30)

                        # 2. It returns, empty, as a replica of the new primary; then a planned failover back.
                        dead.start(replica_of=cluster.primary_port())
                        cluster.wait_in_sync()
                        second = cluster.primary_port()
                        planned = time.monotonic()
                        cluster.failover()
                        await eventually(lambda: cluster.primary_port() != second, timeout=30)
                        await eventually(lambda: switcher.ok_since(planned), timeout=30)
                        # Traffic flows a while after the last failover, on both gateways.
                        served = len(load.results)
                        await eventually(lambda: len(load.results) >= served + 40, timeout=15)

                    # Every gateway converges on the store's route within a poll (plus a read) of the last switch.
                    async def converged() -> bool:
                        route = (await store.read_snapshot()).route
                        return all([await generation(s, u) == route.generation for u in urls])

                    await eventually(converged, timeout=POLL * 2 + 5)
                    scrapes = []
                    for u in urls:
                        async with s.get(u + "/metrics") as resp:
                            scrapes += [line for line in (await resp.text()).splitlines()
                                        if line.startswith(("turnout_requests_total", "turnout_upstream_errors_total"))]

        statuses = Counter(r.status for r in load.results)
        failed = Counter((r.status, r.deployment) for r in load.results if r.status != 200)
        assert statuses == {200: len(load.results)}, f"failed predictions: {failed}, first: {load.phase.failures}; {scrapes}"
        codes = Counter(status for _, status, _ in switcher.answers)
        # Admin writes fail cleanly while no primary is known (503 with a message); a 409 only when a
        # gateway lifted the generation after a failover lost changes, under the switch's feet.
        assert set(codes) <= {200, 409, 503}, codes
        refused = [body for _, status, body in switcher.answers if status == 503]
        assert refused and all("route store is unreachable" in body["message"] for body in refused), refused[:3]
        assert any(at > killed and status == 503 for at, status, _ in switcher.answers), "the kill made no switch fail"
        assert all("changed concurrently" in body["message"] for _, status, body in switcher.answers if status == 409)
        applied = [body for _, status, body in switcher.answers if status == 200 and body["applied"]]
        assert all(isinstance(body.get("replicated"), bool) for body in applied), applied[:3]
        # No gateway's generation ever went down.
        for url, gens in watch.seen.items():
            assert gens == sorted(gens), (url, [g for g, h in zip(gens, gens[1:]) if h < g])
        # The worker kept its lease through both failovers: blue is still ready on the new primary.
        assert (await store.read_snapshot()).effective_state("blue") is State.READY
    except AssertionError:
        for log in sorted(tmp_path.glob("*.log")):  # what the gateways said, for whoever reads the failure
            print(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-60:]))
        raise
    finally:
        worker.stop()
        await store.drop_namespace()
        await store.close()


async def test_admin_writes_answer_503_with_no_primary_then_work_again_without_a_restart(cluster: Any, tmp_path: Path) -> None:
    namespace = new_namespace()
    store = RedisStore.from_url(cluster.url, namespace, wait_timeout=0.5)
    try:
        async with serve_app(backend_app("blue")) as blue:
            for name in ("blue", "green"):
                assert await store.create_deployment(Deployment(name=name, url=blue, state=State.READY, external=True))
            assert (await store.set_route("blue", None)).ok
            with gateway(cluster.url, namespace, tmp_path / "gateway.log") as url:
                async with aiohttp.ClientSession(headers=AUTH) as s:
                    await eventually(lambda: generation(s, url), timeout=15)
                    async with s.post(url + "/admin/switch", json={"target": "green"}) as resp:
                        body = await resp.json()
                        assert resp.status == 200 and body["replicated"] is True and resp.headers["Turnout-Replicated"] == "yes", body
                    # Every server of the primary's kind gone: no new primary can be found.
                    for server in cluster.servers:
                        server.stop()
                    async with s.post(url + "/admin/switch", json={"target": "blue"}) as resp:
                        body = await resp.json()
                        assert resp.status == 503 and "route store is unreachable" in body["message"], body
                    # Predictions keep flowing on the cached route (fail-static).
                    async with s.post(url + "/invocations", json={"inputs": [[1]]}) as resp:
                        assert resp.status == 200
                    # The old primary returns (empty: nothing on disk), the sentinels keep naming it.
                    primary = next(srv for srv in cluster.servers if srv.port == cluster.primary_port())
                    primary.start()

                    async def created() -> bool:
                        async with s.post(url + "/admin/deployments", json={"name": "blue", "url": blue}) as resp:
                            return resp.status in (201, 409)

                    await eventually(created, timeout=30, interval=0.3)
                    async with s.post(url + "/admin/switch", json={"target": "blue"}) as resp:
                        body = await resp.json()
                        # No replica left: the change is applied and says it is not known to be replicated.
                        assert resp.status == 200 and body["replicated"] is False and body["replication_warning"], body
    finally:
        with contextlib.suppress(Exception):
            await store.drop_namespace()
        await store.close()

"""The worker: host deployments as warm model servers, prove them ready, keep them alive, report to the store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from gateway.loops import Loops
from gateway.records import (
    Deployment, HistoryEntry, ServiceConfig, Snapshot, State, Who, cleared, parse_specs, replica_key,
)
from gateway.settings import Settings
from gateway.store import Store, StoreUnavailable

from . import registry
from .metrics import WorkerMetrics
from .model_server import ModelServer, PortRange, server_env

log = logging.getLogger(__name__)

# A server that stays ready this long has recovered: its next crash starts the backoff afresh.
_STABLE_AFTER = 60.0
_BACKOFF_CAP = 30.0
_UNHEALTHY_CHECKS_BEFORE_RESTART = 3
# One slow /ping (a big batch on a one-core server, a loaded host) is not a sick server: the replica
# leaves rotation after this many failed checks in a row (as a Kubernetes readiness probe's threshold).
_FAILED_CHECKS_BEFORE_UNHEALTHY = 2

T = TypeVar("T")


class LeaseLost(Exception):
    """This worker no longer holds the deployment (another worker took it, or it was deleted)."""


# Which replica of which deployment: (service, deployment, replica index).
Unit = tuple[str, str, int]


class Hosted:
    """One replica of a deployment this worker hosts: its model server and the lifecycle loop that keeps it warm."""

    def __init__(self, worker: Worker, service: str, name: str, model_uri: str, index: int = 0) -> None:
        self.worker = worker
        self.service = service
        self.name = name
        self.index = index
        self.model_uri = model_uri
        self.state: State | None = None
        self.server: ModelServer | None = None
        self.restarts = 0
        self.task: asyncio.Task[None] | None = None
        self.draining = False

    @property
    def unit(self) -> Unit:
        """(service, deployment, replica)."""
        return (self.service, self.name, self.index)

    @property
    def label(self) -> str:
        """``service/name`` (``service/name#index`` for a replica after the first) for logs."""
        return f"{self.service}/{replica_key(self.name, self.index)}"

    async def set_state(self, state: State, reason: str, **fields: object) -> None:
        """Write the replica's state (fenced by this worker's lease); log and count only transitions."""
        ok = await self.worker.store.update_deployment(
            self.name, service=self.service, owner=self.worker.id, replica=self.index, state=state, reason=reason,
            updated_at=time.time(), **fields,
        )
        if not ok:
            raise LeaseLost(self.label)
        if state is not self.state:
            log.info("deployment %s: %s — %s", self.label, state.value, reason)
            self.worker.metrics.set_state(self.service, self.name, self.index, state)
        self.state = state

    async def run(self) -> None:
        """Resolve, launch, prove ready, watch, restart; give up after too many failed starts."""
        w = self.worker
        s = w.settings
        info = await w.in_registry_thread(registry.resolve, self.model_uri)
        example = await w.in_registry_thread(registry.serving_example, self.model_uri)
        warmup = "model's input example" if example else None
        if example is None and w.sample_payload is not None:
            example, warmup = w.sample_payload, "configured sample payload"
        await self.set_state(
            State.STARTING,
            "resolving and launching",
            model_uri=self.model_uri,
            worker=w.id,
            mlflow_name=info.name,
            mlflow_version=info.version,
            mlflow_alias=info.alias,
            warmup=warmup or "/ping only (no input example, no sample payload configured)",
        )
        failures = 0
        crashes = 0
        while True:
            port = w.ports.allocate()
            url = f"http://{w.advertise_host}:{port}"
            started = time.monotonic()
            server = await self._launch(port)
            await self.set_state(
                State.STARTING,
                f"launched on port {port} (attempt {failures + 1} of {s.max_start_attempts})",
                url=url,
                started_at=time.time(),
            )
            problem = await self._until_ready(server, f"http://{s.model_host}:{port}", example)
            if problem is not None:
                await self._discard(server)
                failures += 1
                if failures >= s.max_start_attempts:
                    await self.set_state(State.FAILED, f"gave up after {failures} failed starts: {problem}", url=None)
                    return
                delay = min(s.restart_backoff * 2 ** (failures - 1), _BACKOFF_CAP)
                await self.set_state(State.STARTING, f"start {failures} failed ({problem}); retrying in {delay:.0f} s")
                await asyncio.sleep(delay)
                continue
            failures = 0
            startup = time.monotonic() - started
            w.metrics.startup_seconds.labels(self.service, self.name, str(self.index)).set(startup)
            detail = f"warm-up with the {warmup} succeeded" if warmup else "answered /ping (no warm-up request: the model has no input example)"
            await self.set_state(State.READY, f"ready {startup:.1f} s after launch; {detail}", ready_at=time.time())
            ready_since = time.monotonic()
            why = await self._watch(server, f"http://{s.model_host}:{port}")
            crashes = 1 if time.monotonic() - ready_since > _STABLE_AFTER else crashes + 1
            delay = min(s.restart_backoff * 2 ** (crashes - 1), _BACKOFF_CAP)
            self.restarts += 1
            w.metrics.restarts.labels(self.service, self.name, str(self.index)).inc()
            await self.set_state(State.UNHEALTHY, f"{why}; restarting in {delay:.0f} s", restarts=self.restarts)
            await self._discard(server)
            await asyncio.sleep(delay)

    async def _launch(self, port: int) -> ModelServer:
        w = self.worker
        server = ModelServer(self.model_uri, w.settings.model_host, port, w.child_env)
        pgid = await server.start()
        self.server = server
        w.watch_group(pgid)
        return server

    async def _discard(self, server: ModelServer) -> None:
        await server.stop(self.worker.settings.stop_timeout)
        if server.pgid is not None:
            self.worker.unwatch_group(server.pgid)
        self.worker.ports.release(server.port)
        if self.server is server:
            self.server = None

    async def _until_ready(self, server: ModelServer, url: str, example: str | None) -> str | None:
        """None once /ping answers and the warm-up prediction succeeds; else why not."""
        session = self.worker.session
        deadline = time.monotonic() + self.worker.settings.start_timeout
        while time.monotonic() < deadline:
            if server.exited:
                return f"mlflow models serve exited with status {server.proc.returncode}: {server.tail() or '(no output)'}"  # type: ignore[union-attr]
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(url + "/ping", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return await self._warm_up(url, example)
            await asyncio.sleep(0.25)
        return f"not ready within {self.worker.settings.start_timeout:.0f} s: {server.tail(4) or '(no output)'}"

    async def _warm_up(self, url: str, example: str | None) -> str | None:
        if example is None:
            return None
        timeout = aiohttp.ClientTimeout(total=self.worker.settings.start_timeout)
        try:
            async with self.worker.session.post(
                url + "/invocations", data=example.encode(), headers={"Content-Type": "application/json"}, timeout=timeout
            ) as resp:
                body = await resp.text()
                if resp.status == 200:
                    return None
                return f"warm-up prediction answered {resp.status}: {body[:300]}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return f"warm-up prediction failed: {exc!r}"

    async def _watch(self, server: ModelServer, url: str) -> str:
        """Health-check until the server dies or fails several checks in a row; returns why."""
        interval = self.worker.settings.health_interval
        exit_wait = asyncio.ensure_future(server.wait_exit())
        failed = 0
        try:
            while True:
                done, _ = await asyncio.wait({exit_wait}, timeout=interval)
                if done:
                    return f"model server exited (status {exit_wait.result()}): {server.tail(4) or '(no output)'}"
                problem = await self._ping(url, interval)
                if problem is None:
                    if self.state is State.UNHEALTHY:
                        await self.set_state(State.READY, "health check passes again")
                    failed = 0
                    continue
                failed += 1
                if failed >= _UNHEALTHY_CHECKS_BEFORE_RESTART:
                    return f"health check failed {failed} times in a row ({problem})"
                if failed >= _FAILED_CHECKS_BEFORE_UNHEALTHY:
                    await self.set_state(State.UNHEALTHY, f"health check failed {failed} times in a row: {problem}")
        finally:
            exit_wait.cancel()

    async def _ping(self, url: str, timeout: float) -> str | None:
        try:
            async with self.worker.session.get(url + "/ping", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return None if resp.status == 200 else f"/ping answered {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return f"/ping failed: {type(exc).__name__}"

    async def stop(self, reason: str) -> None:
        """Cancel the lifecycle, stop the server, say so in the record (if still ours)."""
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.server is not None:
            await self._discard(self.server)
        with contextlib.suppress(LeaseLost, StoreUnavailable):
            await self.set_state(State.STOPPED, reason, url=None)

    async def drain(self, replicas: int) -> None:
        """Leave after a scale-down: say ``draining`` (every gateway stops sending it new requests), wait
        for its in-flight requests to finish, then stop the server and remove the replica's record."""
        w = self.worker
        s = w.settings
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        server = self.server
        serving = server is not None and not server.exited and self.state in (State.READY, State.UNHEALTHY)
        await self.set_state(State.DRAINING, f"scaled down to {replicas} replica(s): taking no new requests"
                             + ("; waiting for requests in flight" if serving else ""))
        if serving and server is not None:
            # Gateways stop choosing it at once (pub/sub) or within their poll interval; their idle
            # connections to it close after the upstream keep-alive; what stays open carries requests.
            await asyncio.sleep(s.drain_grace)
            deadline = time.monotonic() + s.drain_timeout
            while time.monotonic() < deadline and not server.exited and established(server.port) > 0:
                await asyncio.sleep(0.2)
            left = 0 if server.exited else established(server.port)
            if left:
                log.warning("deployment %s: %d connection(s) still open after %.0f s of draining; stopping it anyway",
                            self.label, left, s.drain_timeout)
        if server is not None:
            await self._discard(server)
        with contextlib.suppress(StoreUnavailable):
            # The replica's fields go (the deployment no longer has it), then its lease.
            await w.store.update_deployment(self.name, service=self.service, owner=w.id, replica=self.index,
                                            **cleared(self.index))
            await w.store.release(self.name, w.id, service=self.service, replica=self.index)
        w.metrics.forget(self.service, self.name, self.index)
        log.info("deployment %s: drained and stopped", self.label)


def established(port: int) -> int:
    """TCP connections established to ``port`` on this host (Linux): a draining model server's requests
    in flight, once the gateways closed their idle connections to it."""
    count = 0
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            # local_address is HEXIP:HEXPORT; state 01 is ESTABLISHED.
            if len(parts) > 3 and parts[1].endswith(wanted) and parts[3] == "01":
                count += 1
    return count


class Worker:
    """Hosts deployments (static ones from settings, plus claimable ones with ``claim``) on one machine."""

    def __init__(self, settings: Settings, store: Store, *, worker_id: str | None = None) -> None:
        self.settings = settings
        self.store = store
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.static = parse_specs([settings.deployments], settings.default_service)
        self.ports = PortRange.parse(settings.model_host, settings.model_ports)
        self.advertise_host = settings.advertise_host or settings.model_host
        self.child_env = server_env(os.environ, self.id)
        self.metrics = WorkerMetrics()
        self.sample_payload = Path(settings.warmup_payload).read_text() if settings.warmup_payload else None
        self.hosted: dict[Unit, Hosted] = {}
        # When each replica this worker could claim was first seen unheld (it leaves a second replica of a
        # deployment it already hosts to other workers for a round, so replicas spread over hosts).
        self._unheld_since: dict[Unit, float] = {}
        self._drains: set[asyncio.Task[None]] = set()
        # One thread for MLflow's (blocking) client: concurrent first imports of mlflow deadlocked.
        self._registry_thread = ThreadPoolExecutor(1, thread_name_prefix="mlflow-registry")
        self.session: aiohttp.ClientSession
        self._watchdog: asyncio.subprocess.Process | None = None
        self.loops = Loops(self.metrics.count_background_error)

    async def in_registry_thread(self, func: Callable[[str], T], arg: str) -> T:
        """Run a blocking MLflow call off the event loop, one at a time."""
        return await asyncio.get_running_loop().run_in_executor(self._registry_thread, func, arg)

    # --- the watchdog that outlives a SIGKILLed worker -------------------------------------------
    async def _start_watchdog(self) -> None:
        self._watchdog = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "workers.watchdog", str(self.settings.stop_timeout),
            stdin=asyncio.subprocess.PIPE, start_new_session=True,
            cwd=str(Path(__file__).resolve().parent.parent),
        )

    def watch_group(self, pgid: int) -> None:
        """Tell the watchdog to kill this group if the worker dies."""
        self._tell_watchdog(f"add {pgid}\n")

    def unwatch_group(self, pgid: int) -> None:
        """The group is gone; the watchdog can forget it."""
        self._tell_watchdog(f"del {pgid}\n")

    def _tell_watchdog(self, line: str) -> None:
        if self._watchdog is not None and self._watchdog.stdin is not None:
            self._watchdog.stdin.write(line.encode())

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the watchdog, register static deployments, begin heartbeats (and claiming)."""
        # No idle keep-alive connections to model servers: a draining one counts its open connections.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        await self._start_watchdog()
        for (service, name), uri in self.static.items():
            if not await self.store.service_exists(service):
                # A worker named a service nobody created yet: create it (as the admin API would).
                await self.store.create_service(service, ServiceConfig(created_at=time.time()), history=HistoryEntry(
                    "service_create", Who(self.id, None, "worker"), target=service, reason="named by a worker's --deployment",
                ))
            created = await self.store.create_deployment(
                Deployment(name=name, model_uri=uri, state=State.STARTING, reason="registered by a worker", created_at=time.time(),
                           replicas=self.settings.replicas),
                service=service,
            )
            if not created:
                await self.store.update_deployment(name, service=service, model_uri=uri)
        await self._claim_round(await self._read())
        self.loops.every("worker-heartbeat", self.settings.lease_ttl / 3, self._heartbeat_once)
        log.info("worker %s hosting %s%s", self.id, sorted(h.label for h in self.hosted.values()) or "nothing yet",
                 " and claiming unheld deployments" if self.settings.claim else "")

    async def stop(self) -> None:
        """Undo start in reverse: stop heartbeats, stop every server (in parallel), release leases, stop the watchdog."""
        await self.loops.cancel()
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)
        hosted = list(self.hosted.values())
        await asyncio.gather(*(h.stop("worker stopped") for h in hosted), return_exceptions=True)
        for h in hosted:
            with contextlib.suppress(StoreUnavailable):
                await self.store.release(h.name, self.id, service=h.service, replica=h.index)
        self.hosted.clear()
        if self._watchdog is not None:
            assert self._watchdog.stdin is not None
            self._watchdog.stdin.close()
            await self._watchdog.wait()
        await self.session.close()
        self._registry_thread.shutdown(wait=False, cancel_futures=True)

    async def _host(self, service: str, name: str, model_uri: str, index: int) -> None:
        hosted = Hosted(self, service, name, model_uri, index)
        # The restart counter exists from the start (at 0), so dashboards show it before any crash.
        self.metrics.restarts.labels(service, name, str(index))
        self.hosted[hosted.unit] = hosted
        hosted.task = asyncio.create_task(self._run_hosted(hosted), name=f"deployment-{service}-{name}-{index}")

    async def _run_hosted(self, hosted: Hosted) -> None:
        key = hosted.unit
        try:
            await hosted.run()
        except LeaseLost:
            log.warning("deployment %s: no longer ours (deleted or claimed elsewhere); stopping its server", hosted.label)
            if hosted.server is not None:
                await hosted._discard(hosted.server)
            self.hosted.pop(key, None)
        except StoreUnavailable as exc:
            # The lifecycle cannot record states; the claim round restarts it once the store is back.
            log.error("deployment %s: store unavailable (%s); will resume", hosted.label, exc)
            if hosted.server is not None:
                await hosted._discard(hosted.server)
            self.hosted.pop(key, None)
        except Exception as exc:
            # A bug must not leave a server unwatched: stop it and say why in the record.
            log.exception("deployment %s: lifecycle crashed", hosted.label)
            if hosted.server is not None:
                await hosted._discard(hosted.server)
            with contextlib.suppress(LeaseLost, StoreUnavailable):
                await hosted.set_state(State.FAILED, f"worker error: {exc!r}", url=None)

    async def _read(self) -> dict[str, Snapshot]:
        """Every service's snapshot (a worker reads them all, a few times per lease period)."""
        return {name: snapshot for name, (snapshot, _) in (await self.store.read_all({})).changed.items()}

    def _claims(self, service: str) -> bool:
        wanted = self.settings.claimed_services()
        return self.settings.claim and (not wanted or service in wanted)

    async def _claim_round(self, snapshots: dict[str, Snapshot]) -> None:
        """Take every replica of a static deployment we can, and with ``claim`` every unheld replica of a
        deployment that has a model URI (of the services in ``--services``, or of every service)."""
        wanted: dict[Unit, str] = {}
        for (service, name), uri in self.static.items():
            dep = snapshots[service].deployments.get(name) if service in snapshots else None
            for index in range(dep.replicas if dep is not None else 1):
                wanted[(service, name, index)] = uri
        now = time.monotonic()
        unheld: set[Unit] = set()
        for service, snapshot in snapshots.items():
            for name, dep in snapshot.deployments.items():
                if dep.external:
                    continue
                await self._forget_stale(service, snapshot, dep)
                if not (dep.model_uri and self._claims(service)):
                    continue
                for index in range(dep.replicas):
                    unit = (service, name, index)
                    if replica_key(name, index) in snapshot.live or unit in self.hosted:
                        continue
                    unheld.add(unit)
                    self._unheld_since.setdefault(unit, now)
                    wanted.setdefault(unit, dep.model_uri)
        self._unheld_since = {u: t for u, t in self._unheld_since.items() if u in unheld}
        # Spread: a replica of a deployment this worker already hosts is left to other workers for a
        # heartbeat round or two (they claim every lease_ttl/3 too), so a worker that hosts none of it
        # gets there first; static deployments are this worker's own and are not spread.
        patience = self.settings.lease_ttl / 2
        taken_now: set[tuple[str, str]] = set()
        for unit, uri in sorted(wanted.items()):
            service, name, index = unit
            snapshot = snapshots.get(service)
            if unit in self.hosted or snapshot is None or name not in snapshot.deployments:
                continue
            if (service, name) not in self.static:
                mine = any(h.service == service and h.name == name for h in self.hosted.values())
                # At most one more replica of a deployment it already hosts per round, and only once the
                # others had their chance: replicas spread instead of landing on whoever looked first.
                if mine and (now - self._unheld_since.get(unit, now) < patience or (service, name) in taken_now):
                    continue
            # The record still says what the last owner reported (ready, at its URL): taking the lease
            # resets that in the same step, so no gateway sends a request to a server that is gone.
            taking = {"state": State.STARTING, "url": None, "worker": self.id, "updated_at": time.time(),
                      "reason": f"taken by worker {self.id}; launching"}
            if await self.store.claim(name, self.id, self.settings.lease_ttl, service=service, replica=index, taking=taking):
                self._unheld_since.pop(unit, None)
                taken_now.add((service, name))
                await self._host(service, name, snapshot.deployments[name].model_uri or uri, index)

    async def _forget_stale(self, service: str, snapshot: Snapshot, dep: Deployment) -> None:
        """Remove what a dead worker left of a replica a scale-down removed (nobody holds it: nobody drains it)."""
        for member in dep.members[dep.replicas:]:
            key = replica_key(dep.name, member.index)
            if key not in snapshot.live and (service, dep.name, member.index) not in self.hosted:
                await self.store.update_deployment(dep.name, service=service, replica=member.index, **cleared(member.index))

    async def _heartbeat_once(self) -> None:
        try:
            snapshots = await self._read()
            await self._heartbeat(snapshots)
            await self._claim_round(snapshots)
        except StoreUnavailable as exc:
            log.warning("store unavailable (%s); leases may lapse until it is back", exc)

    async def _heartbeat(self, snapshots: dict[str, Snapshot]) -> None:
        """Renew every lease; stop what was deleted or taken by another worker, drain what a scale-down removed."""
        for unit, hosted in list(self.hosted.items()):
            service, name, index = unit
            snapshot = snapshots.get(service)
            dep = snapshot.deployments.get(name) if snapshot is not None else None
            if dep is None or not await self.store.claim(name, self.id, self.settings.lease_ttl, service=service, replica=index):
                log.info("deployment %s: %s; stopping its server", hosted.label, "deleted" if dep is None else "lease lost")
                self.hosted.pop(unit, None)
                # In the background: a server slow to stop must not hold up renewing the other leases (they
                # would lapse, and another worker would restart replicas that are serving).
                self._background(hosted.stop("deployment deleted" if dep is None else "lease lost"), f"stop-{hosted.label}")
            elif index >= dep.replicas and not hosted.draining:
                hosted.draining = True
                self._background(self._drain(hosted, dep.replicas), f"drain-{hosted.label}")

    def _background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, hosted: Hosted, replicas: int) -> None:
        try:
            await hosted.drain(replicas)
        except LeaseLost:
            if hosted.server is not None:
                await hosted._discard(hosted.server)
        finally:
            self.hosted.pop(hosted.unit, None)

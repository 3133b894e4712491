"""Mirror route changes into the MLflow registry: move an alias to the active version, tag versions with
their Turnout status. Never blocks a switch: jobs run in the background, failures are retried and
recorded in the history."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .loops import Loop, Loops
from .records import DEFAULT_SERVICE, Deployment, HistoryEntry, Who

log = logging.getLogger(__name__)

STATUS_TAG = "turnout.status"
REASON_TAG = "turnout.reason"
GENERATION_TAG = "turnout.generation"
CHANGED_TAG = "turnout.changed_at"

_RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
REGISTRY_WHO = Who(actor="turnout-registry-sync", client=None, trigger="registry")


@dataclass
class Job:
    """What one route change means for the registry."""

    generation: int
    active: Deployment | None
    previous: Deployment | None
    rolled_back: Deployment | None = None
    # The former previous deployment, whose role this change ended (it stays deployed, in no role).
    retired: Deployment | None = None
    reason: str = ""
    # The service whose route changed: a failure is recorded in its history.
    service: str = DEFAULT_SERVICE
    attempts: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def describe(self) -> str:
        """One line for logs and history."""
        def v(d: Deployment | None) -> str:
            return f"{d.mlflow_name}/{d.mlflow_version}" if d and d.mlflow_name else "-"

        return f"generation {self.generation}: active {v(self.active)}, previous {v(self.previous)}, rolled back {v(self.rolled_back)}"


def apply_job(job: Job, alias: str) -> None:
    """The blocking registry calls for one job (idempotent: a retry repeats them harmlessly)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def tag(dep: Deployment | None, status: str, reason: str = "") -> None:
        if dep is None or not dep.mlflow_name or not dep.mlflow_version:
            return
        # The status tag last: once it reads the new value, the others are there too.
        tags = {GENERATION_TAG: str(job.generation), CHANGED_TAG: now}
        if reason:
            tags[REASON_TAG] = reason[:4000]
        tags[STATUS_TAG] = status
        for key, value in tags.items():
            client.set_model_version_tag(dep.mlflow_name, dep.mlflow_version, key, value)

    # Most important first: where the alias points, then what each version is now.
    active = job.active
    if active is not None and active.mlflow_name and active.mlflow_version:
        client.set_registered_model_alias(active.mlflow_name, alias, active.mlflow_version)
    tag(active, "active")
    tag(job.rolled_back, "rolled_back", job.reason or "rolled back")
    if job.previous is not None and (job.rolled_back is None or job.previous.name != job.rolled_back.name):
        tag(job.previous, "previous")
    tag(job.retired, "inactive")


class RegistrySync:
    """A background queue of registry jobs, applied in order on one thread, with retries."""

    def __init__(self, alias: str, record: Callable[[HistoryEntry, str], Awaitable[None]], enabled: bool = True,
                 loops: Loops | None = None) -> None:
        self.alias = alias
        self.enabled = enabled
        self._record = record
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mlflow-registry-sync")
        self.loops = loops or Loops()
        self._loop: Loop | None = None

    async def start(self) -> None:
        """Start the job runner."""
        self._loop = self.loops.every("registry-sync", 0, self._next_job)

    async def close(self) -> None:
        """Stop the runner (pending jobs are dropped; the next switch re-applies the whole state)."""
        if self._loop is not None:
            await self.loops.cancel(self._loop)
        self._thread.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: Job) -> Job | None:
        """Queue a job if any deployment in it is a registered model version."""
        if not self.enabled:
            return None
        if not any(d is not None and d.mlflow_name for d in (job.active, job.previous, job.rolled_back)):
            return None
        self._queue.put_nowait(job)
        return job

    async def _next_job(self) -> None:
        """Take one job and apply it, retrying MLflow's failures on a schedule."""
        loop = asyncio.get_running_loop()
        job = await self._queue.get()
        try:
            while True:
                job.attempts += 1
                try:
                    await loop.run_in_executor(self._thread, apply_job, job, self.alias)
                except Exception as exc:  # MLflow raises many types (HTTP, sqlite, ...): all are retried
                    final = job.attempts > len(_RETRY_DELAYS)
                    log.warning("registry sync failed (%s), attempt %d: %s", job.describe(), job.attempts, exc)
                    await self._record_safely(HistoryEntry(
                        "registry_sync", REGISTRY_WHO, result="failed", generation=job.generation,
                        detail=f"{job.describe()}: {exc}",
                        extra={"retry": None if final else f"in {_RETRY_DELAYS[job.attempts - 1]:.0f} s"},
                    ), job.service)
                    if final:
                        break
                    await asyncio.sleep(_RETRY_DELAYS[job.attempts - 1])
                    continue
                log.info("registry synced: %s (alias %r)", job.describe(), self.alias)
                break
        finally:
            job.done.set()

    async def _record_safely(self, entry: HistoryEntry, service: str) -> None:
        try:
            await self._record(entry, service)
        except ConnectionError as exc:
            log.error("could not record a registry failure in the history: %s", exc)

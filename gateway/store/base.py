"""The store interface: where services, their routes, deployment records, worker leases, history and
shared counters live.

Every per-service method takes the service as the keyword ``service`` (default: ``default``, the
service of every single-model install), so code that knows one route reads as it always did.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from ..records import DEFAULT_SERVICE, Deployment, HistoryEntry, Plan, Route, ServiceConfig, Snapshot

DEFAULT_HISTORY_MAX = 10_000

# A service's counters: (service, deployment) → second → sparse row (see ``traffic``).
StatsRows = Mapping[tuple[str, str], Mapping[int, Mapping[int, int]]]


# Seconds a change on a Sentinel-managed primary waits for a replica's acknowledgement (WAIT 1).
DEFAULT_WAIT_TIMEOUT = 0.5

_REPLICATION: ContextVar[list[bool] | None] = ContextVar("turnout_replication", default=None)


@contextlib.contextmanager
def replication_notes() -> Iterator[list[bool]]:
    """Collect, for each change the store makes inside the block, whether a replica acknowledged it (a
    store without replicas to wait for notes nothing)."""
    notes: list[bool] = []
    token = _REPLICATION.set(notes)
    try:
        yield notes
    finally:
        _REPLICATION.reset(token)


def note_replicated(acknowledged: bool) -> None:
    """A store made a change: whether a replica holds it (heard by the enclosing ``replication_notes``)."""
    notes = _REPLICATION.get()
    if notes is not None:
        notes.append(acknowledged)


class StoreUnavailable(ConnectionError):
    """The backing store cannot be reached; callers keep their last known state. ``uncertain``: a change
    was sent and its answer lost, so it may have been made."""

    def __init__(self, message: str, *, uncertain: bool = False) -> None:
        super().__init__(message)
        self.uncertain = uncertain


@dataclass(frozen=True, slots=True)
class RouteChange:
    """Outcome of a compare-and-swap on a route."""

    ok: bool
    route: Route
    # Why it did not apply: "conflict" (generation moved), "unknown" (target not a deployment) or
    # "no_service" (the service does not exist).
    refusal: str | None = None


@dataclass(frozen=True, slots=True)
class Reading:
    """A full read of every service: the services there are, and a snapshot of those that changed."""

    services: frozenset[str]
    # Services whose data differs from the fingerprint the caller held, with their new fingerprint.
    changed: Mapping[str, tuple[Snapshot, str]]


class Store(abc.ABC):
    """Where the services' routes, deployment records, worker leases and histories live."""

    history_max: int = DEFAULT_HISTORY_MAX

    # --- services ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def list_services(self) -> list[str]:
        """Every service's name, ``default`` always among them, sorted."""

    @abc.abstractmethod
    async def create_service(self, name: str, config: ServiceConfig, *, history: HistoryEntry | None = None) -> bool:
        """Add a service (and ``history`` to its history, in the same step); False if it exists."""

    @abc.abstractmethod
    async def delete_service(self, name: str, *, force: bool = False, history: HistoryEntry | None = None,
                             history_service: str = DEFAULT_SERVICE) -> str | None:
        """Remove a service with everything it holds, appending ``history`` to ``history_service``'s history
        in the same step. None on success, else why not: "unknown", "default" (the default service
        stays) or "not_empty" (it has deployments; ``force`` removes them)."""

    @abc.abstractmethod
    async def set_service_config(self, name: str, overrides: Mapping[str, Any | None], *,
                                 history: HistoryEntry | None = None) -> bool:
        """Change a service's guard overrides (None removes one) and append ``history`` to its history, in
        one step; False if the service does not exist."""

    @abc.abstractmethod
    async def read_all(self, known: Mapping[str, str]) -> Reading:
        """Every service, and a snapshot of each whose fingerprint is not the one in ``known`` (the
        poll: a gateway holding 200 services parses only what changed)."""

    # --- one service ------------------------------------------------------------------------
    @abc.abstractmethod
    async def read_snapshot(self, *, service: str = DEFAULT_SERVICE) -> Snapshot:
        """The service's route, every deployment and which are live, read atomically (an unknown
        service reads as an empty one)."""

    @abc.abstractmethod
    async def service_exists(self, name: str) -> bool:
        """Whether the service exists."""

    async def get_route(self, *, service: str = DEFAULT_SERVICE) -> Route:
        """The current route of a service."""
        return (await self.read_snapshot(service=service)).route

    @abc.abstractmethod
    async def set_route(
        self,
        active: str,
        previous: str | None,
        *,
        service: str = DEFAULT_SERVICE,
        expected_generation: int | None = None,
        history: HistoryEntry | None = None,
        plan: Plan | None = None,
    ) -> RouteChange:
        """Atomically point the service's traffic at ``active``: applies only if the generation still
        equals ``expected_generation`` (when given) and ``active`` is a known deployment; on success the
        generation rises by one, any split ends, ``plan`` (when given) is stored, ``history`` (with the
        new generation filled in) is appended and the change is published, all in one step."""

    @abc.abstractmethod
    async def lift_generation(self, expected: int, floor: int, *, service: str = DEFAULT_SERVICE,
                              history: HistoryEntry | None = None) -> bool:
        """A gateway held generation ``floor`` but the store's route went back to ``expected`` (a failover
        lost acknowledged changes): raise the route's generation to ``floor + 1``, its content unchanged,
        so every gateway applies what the store now holds and later changes outrank all that was lost.
        Applies only while the generation is still ``expected``; ``history`` is appended and the change
        published in the same step."""

    @abc.abstractmethod
    async def change_rollout(
        self, *, service: str = DEFAULT_SERVICE, split: tuple[str, float, str | None] | None | bool = False,
        plan: Plan | None = None, expected_generation: int | None = None, expected_revision: int | None = None,
        history: HistoryEntry | None = None, shadow: tuple[str, float] | None | bool = False,
    ) -> RouteChange:
        """Change a service's split, its canary plan and/or its shadow in one step: ``split`` is (candidate,
        weight percent, sticky header or None), None to end the split, False to leave it; a split change
        raises the generation (the active's ``changed_at`` stays); ``shadow`` is (deployment, percent),
        None to stop shadowing or False to leave it. Applies only while the generation equals
        ``expected_generation`` and the stored plan's revision equals ``expected_revision`` (0: no plan)
        when given; refusals: "conflict", "plan_conflict", "unknown" (candidate), "no_service"."""

    @abc.abstractmethod
    async def create_deployment(
        self, deployment: Deployment, *, service: str = DEFAULT_SERVICE, history: HistoryEntry | None = None
    ) -> bool:
        """Add a deployment record (and ``history``, in the same step); False if the name is taken
        (or the service does not exist)."""

    @abc.abstractmethod
    async def update_deployment(
        self, name: str, *, service: str = DEFAULT_SERVICE, owner: str | None = None, replica: int = 0,
        history: HistoryEntry | None = None, expect: Mapping[str, Any] | None = None, **changes: Any
    ) -> bool | None:
        """Change fields of an existing record (a replica's own fields, such as its state, of ``replica``)
        and append ``history``, in one step; with ``owner``, only while that worker holds the replica's lease.
        With ``expect`` (field → value, None: absent), only while the record still has those values: None
        when it does not (changed concurrently), False when the record (or lease) is gone."""

    @abc.abstractmethod
    async def delete_deployment(
        self, name: str, *, service: str = DEFAULT_SERVICE, force: bool = False, history: HistoryEntry | None = None
    ) -> str | None:
        """Remove a record and its lease (and append ``history``, in the same step). Returns None on
        success, else why not: "unknown", "active", "previous" or "candidate" (the latter three only
        without ``force``). A forced delete of the previous deployment clears ``previous``, of the
        candidate the split."""

    @abc.abstractmethod
    async def claim(self, name: str, owner: str, ttl: float, *, service: str = DEFAULT_SERVICE, replica: int = 0,
                    taking: Mapping[str, Any] | None = None) -> bool:
        """Take or renew the hosting lease of a replica of ``name`` for ``owner``; False if another owner holds
        it. A lease newly taken applies ``taking`` (the replica's fields) to the record in the same step."""

    @abc.abstractmethod
    async def release(self, name: str, owner: str, *, service: str = DEFAULT_SERVICE, replica: int = 0) -> None:
        """Drop ``owner``'s lease of a replica of ``name`` if it still holds it."""

    @abc.abstractmethod
    async def append_history(self, entry: HistoryEntry, *, service: str = DEFAULT_SERVICE) -> None:
        """Record an event that changed nothing (a refused or failed attempt)."""

    @abc.abstractmethod
    async def read_history(
        self, offset: int = 0, limit: int = 50, *, service: str = DEFAULT_SERVICE
    ) -> tuple[list[HistoryEntry], int]:
        """A page of a service's history entries, newest first, and the total held."""

    @abc.abstractmethod
    async def add_stats(self, pending: StatsRows, ttl: int = 180) -> None:
        """Add this replica's traffic counters to the shared ones."""

    @abc.abstractmethod
    async def read_stats(
        self, deployment: str, first_second: int, last_second: int, *, service: str = DEFAULT_SERVICE
    ) -> dict[int, int]:
        """Every replica's counters of a deployment summed over [first_second, last_second] (sparse row)."""

    @abc.abstractmethod
    async def get_guard(self, *, service: str = DEFAULT_SERVICE) -> dict[str, str]:
        """The guard's shared state for a service (paused, latched)."""

    @abc.abstractmethod
    async def set_guard(self, *, service: str = DEFAULT_SERVICE, **fields: str | None) -> None:
        """Change a service's guard state fields (None removes one)."""

    # --- the whole namespace ----------------------------------------------------------------
    @abc.abstractmethod
    async def hold_role(self, role: str, owner: str, ttl: float) -> bool:
        """Take or renew a singleton role (e.g. guard evaluator) for ``owner``; False if another holds it."""

    @abc.abstractmethod
    async def first_time(self, token: str, ttl: float) -> bool:
        """True the first time ``token`` is seen within ``ttl`` seconds (deduplicates notifications)."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[dict[str, Any]]:
        """Change notifications as they are published (each names its ``service``), starting with
        ``{"kind": "subscribed"}`` once listening (anything before it was missed); raises
        :class:`StoreUnavailable` when the feed breaks."""

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` if the store cannot be reached."""

    async def close(self) -> None:
        """Release connections."""

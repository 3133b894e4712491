"""The store interface: where the route, deployment records, worker leases, history and shared counters live."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..records import Deployment, HistoryEntry, Route, Snapshot

DEFAULT_HISTORY_MAX = 10_000


class StoreUnavailable(ConnectionError):
    """The backing store cannot be reached; callers keep their last known state."""


@dataclass(frozen=True, slots=True)
class RouteChange:
    """Outcome of a compare-and-swap on the route."""

    ok: bool
    route: Route
    # Why it did not apply: "conflict" (generation moved) or "unknown" (target not a deployment).
    refusal: str | None = None


class Store(abc.ABC):
    """Where the route, deployment records, worker leases and the history live."""

    history_max: int = DEFAULT_HISTORY_MAX

    @abc.abstractmethod
    async def read_snapshot(self) -> Snapshot:
        """The route, every deployment and which are live, read atomically."""

    async def get_route(self) -> Route:
        """The current route."""
        return (await self.read_snapshot()).route

    @abc.abstractmethod
    async def set_route(
        self,
        active: str,
        previous: str | None,
        *,
        expected_generation: int | None = None,
        history: HistoryEntry | None = None,
    ) -> RouteChange:
        """Atomically point traffic at ``active``: applies only if the generation still equals
        ``expected_generation`` (when given) and ``active`` is a known deployment; on success the
        generation rises by one, ``history`` (with the new generation filled in) is appended and
        the change is published, all in one step."""

    @abc.abstractmethod
    async def create_deployment(self, deployment: Deployment, *, history: HistoryEntry | None = None) -> bool:
        """Add a deployment record (and ``history``, in the same step); False if the name is taken."""

    @abc.abstractmethod
    async def update_deployment(self, name: str, *, owner: str | None = None, **changes: Any) -> bool:
        """Change fields of an existing record; with ``owner``, only while that worker holds its lease."""

    @abc.abstractmethod
    async def delete_deployment(
        self, name: str, *, force: bool = False, history: HistoryEntry | None = None
    ) -> str | None:
        """Remove a record and its lease (and append ``history``, in the same step). Returns None on
        success, else why not: "unknown", "active" or "previous" (the latter two only without
        ``force``). A forced delete of the previous deployment clears ``previous``."""

    @abc.abstractmethod
    async def claim(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew the hosting lease of ``name`` for ``owner``; False if another owner holds it."""

    @abc.abstractmethod
    async def release(self, name: str, owner: str) -> None:
        """Drop ``owner``'s lease of ``name`` if it still holds it."""

    @abc.abstractmethod
    async def append_history(self, entry: HistoryEntry) -> None:
        """Record an event that changed nothing (a refused or failed attempt)."""

    @abc.abstractmethod
    async def read_history(self, offset: int = 0, limit: int = 50) -> tuple[list[HistoryEntry], int]:
        """A page of history entries, newest first, and the total held."""

    @abc.abstractmethod
    async def add_stats(self, pending: Mapping[str, Mapping[int, Mapping[int, int]]], ttl: int = 180) -> None:
        """Add this replica's traffic counters (deployment → second → sparse row) to the shared ones."""

    @abc.abstractmethod
    async def read_stats(self, deployment: str, first_second: int, last_second: int) -> dict[int, int]:
        """Every replica's counters of a deployment summed over [first_second, last_second] (sparse row)."""

    @abc.abstractmethod
    async def hold_role(self, role: str, owner: str, ttl: float) -> bool:
        """Take or renew a singleton role (e.g. guard evaluator) for ``owner``; False if another holds it."""

    @abc.abstractmethod
    async def get_guard(self) -> dict[str, str]:
        """The guard's shared state."""

    @abc.abstractmethod
    async def set_guard(self, **fields: str | None) -> None:
        """Change guard state fields (None removes one)."""

    @abc.abstractmethod
    async def first_time(self, token: str, ttl: float) -> bool:
        """True the first time ``token`` is seen within ``ttl`` seconds (deduplicates notifications)."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[dict[str, Any]]:
        """Change notifications as they are published, starting with ``{"kind": "subscribed"}`` once
        listening (anything before it was missed); raises :class:`StoreUnavailable` when the feed breaks."""

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` if the store cannot be reached."""

    async def close(self) -> None:
        """Release connections."""

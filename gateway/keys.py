"""Every Redis key name and every published message format, in one place."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Message kinds published on the events channel.
ROUTE_CHANGED = "route"
DEPLOYMENT_CHANGED = "deployment"
# Not published: yielded locally by a subscription once it listens (anything earlier was missed).
SUBSCRIBED = "subscribed"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one namespace (``TURNOUT_NAMESPACE``)."""

    namespace: str

    @property
    def route(self) -> str:
        """Hash: active, previous, generation, changed_at."""
        return f"{self.namespace}:route"

    @property
    def deployments(self) -> str:
        """Set of deployment names."""
        return f"{self.namespace}:deployments"

    @property
    def deployment_prefix(self) -> str:
        """What :meth:`deployment` puts before a name (the snapshot script builds the keys from it)."""
        return f"{self.namespace}:deployment:"

    def deployment(self, name: str) -> str:
        """Hash: one deployment record (see ``records.Deployment``)."""
        return self.deployment_prefix + name

    @property
    def lease_prefix(self) -> str:
        """What :meth:`lease` puts before a name."""
        return f"{self.namespace}:lease:"

    def lease(self, name: str) -> str:
        """String with a TTL: the id of the worker hosting ``name``; its expiry frees the deployment."""
        return self.lease_prefix + name

    @property
    def history(self) -> str:
        """List of JSON history entries, newest first, trimmed to a bound."""
        return f"{self.namespace}:history"

    def stats(self, deployment: str, second: int) -> str:
        """Hash with a TTL: every replica's traffic counters of one deployment in one second (columns as
        in ``traffic``; 'stats2' since latency moved to a sketch, so older gateways' rows never mix in)."""
        return f"{self.namespace}:stats2:{deployment}:{second}"

    @property
    def guard(self) -> str:
        """Hash: the guard's shared state (paused, latched, last decision)."""
        return f"{self.namespace}:guard"

    def lease_of(self, role: str) -> str:
        """String with a TTL: which replica holds a singleton role (e.g. the guard's evaluator)."""
        return f"{self.namespace}:role:{role}"

    def seen(self, token: str) -> str:
        """Marker with a TTL: a notification already acted upon (Alertmanager repeats them)."""
        return f"{self.namespace}:seen:{token}"

    @property
    def events(self) -> str:
        """Pub/sub channel announcing every change (messages: :func:`encode_event`)."""
        return f"{self.namespace}:events"

    @property
    def pattern(self) -> str:
        """Glob matching every key of this namespace (for cleanup in tests and tools)."""
        return f"{self.namespace}:*"


def encode_event(kind: str, **fields: Any) -> str:
    """A change notification: ``{"kind": "route", "generation": 7}`` or ``{"kind": "deployment", "name": "blue"}``."""
    return json.dumps({"kind": kind, **fields}, separators=(",", ":"))


_GENERATION_MARK = 8_642_097_531


def route_event_parts() -> tuple[str, str]:
    """:func:`encode_event` of a route change split around its generation, for a script that knows the
    generation only once it has written it: ``head + str(generation) + tail``."""
    head, tail = encode_event(ROUTE_CHANGED, generation=_GENERATION_MARK).split(str(_GENERATION_MARK))
    return head, tail


def decode_event(raw: str | bytes) -> dict[str, Any]:
    """Parse a change notification; a malformed one decodes to an empty dict (it still triggers a re-read)."""
    try:
        value = json.loads(raw)
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}

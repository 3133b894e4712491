"""Every Redis key name and every published message format, in one place.

One namespace (``TURNOUT_NAMESPACE``) holds several services. The service named ``default`` keeps the
key layout of releases that knew a single route (``{ns}:route``, ``{ns}:deployment:{name}``, ...), so
an upgrade reads the route it finds, with no migration; every other service lives under
``{ns}:svc:{service}:``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Message kinds published on the events channel (every one names its service).
ROUTE_CHANGED = "route"
DEPLOYMENT_CHANGED = "deployment"
SERVICE_CHANGED = "service"
# Not published: yielded locally by a subscription once it listens (anything earlier was missed).
SUBSCRIBED = "subscribed"

# The service whose keys are the single-route layout of earlier releases.
LEGACY_SERVICE = "default"

# Suffixes of a service's keys after its prefix (scripts that discover services build keys from them).
_ROUTE, _DEPLOYMENTS, _DEPLOYMENT, _LEASE, _CONFIG, _PLAN = (
    ":route", ":deployments", ":deployment:", ":lease:", ":config", ":plan")


@dataclass(frozen=True, slots=True)
class ServiceKeys:
    """Key names of one service."""

    prefix: str

    @property
    def route(self) -> str:
        """Hash: active, previous, generation, changed_at."""
        return self.prefix + _ROUTE

    @property
    def deployments(self) -> str:
        """Set of deployment names."""
        return self.prefix + _DEPLOYMENTS

    @property
    def deployment_prefix(self) -> str:
        """What :meth:`deployment` puts before a name (scripts build the keys from it)."""
        return self.prefix + _DEPLOYMENT

    def deployment(self, name: str) -> str:
        """Hash: one deployment record (see ``records.Deployment``)."""
        return self.deployment_prefix + name

    @property
    def lease_prefix(self) -> str:
        """What :meth:`lease` puts before a name."""
        return self.prefix + _LEASE

    def lease(self, name: str) -> str:
        """String with a TTL: the id of the worker hosting ``name``; its expiry frees the deployment."""
        return self.lease_prefix + name

    @property
    def config(self) -> str:
        """Hash: the service's own settings (guard threshold overrides), see ``records.ServiceConfig``."""
        return self.prefix + _CONFIG

    @property
    def history(self) -> str:
        """List of JSON history entries, newest first, trimmed to a bound."""
        return f"{self.prefix}:history"

    def stats(self, deployment: str, second: int) -> str:
        """Hash with a TTL: every replica's traffic counters of one deployment in one second (columns as
        in ``traffic``; 'stats2' since latency moved to a sketch, so older gateways' rows never mix in)."""
        return f"{self.prefix}:stats2:{deployment}:{second}"

    @property
    def guard(self) -> str:
        """Hash: the guard's shared state for this service (paused, latched)."""
        return f"{self.prefix}:guard"

    @property
    def plan(self) -> str:
        """String: the service's canary plan as JSON (``records.Plan``), kept after it ends until the next."""
        return self.prefix + _PLAN


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one namespace (``TURNOUT_NAMESPACE``)."""

    namespace: str

    def service(self, name: str) -> ServiceKeys:
        """The keys of one service."""
        if name == LEGACY_SERVICE:
            return ServiceKeys(self.namespace)
        return ServiceKeys(f"{self.namespace}:svc:{name}")

    @property
    def services(self) -> str:
        """Set of service names (the legacy ``default`` service exists whether listed or not)."""
        return f"{self.namespace}:services"

    def layout(self) -> list[str]:
        """How scripts that discover services build their keys: the legacy service's name and prefix, the
        prefix before any other service's name, and the suffixes of route, deployments, a deployment, a
        lease, the config and the plan."""
        return [LEGACY_SERVICE, self.namespace, f"{self.namespace}:svc:", _ROUTE, _DEPLOYMENTS, _DEPLOYMENT, _LEASE, _CONFIG,
                _PLAN]

    def lease_of(self, role: str) -> str:
        """String with a TTL: which replica holds a singleton role (e.g. the guard's evaluator)."""
        return f"{self.namespace}:role:{role}"

    def change(self, token: str) -> str:
        """String with a TTL: the answer of a change already made (a resent change returns it, see redis_store)."""
        return f"{self.namespace}:change:{token}"

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
    """A change notification: ``{"kind": "route", "service": "iris", "generation": 7}``,
    ``{"kind": "deployment", "service": "iris", "name": "blue"}`` or ``{"kind": "service", "service": "iris"}``."""
    return json.dumps({"kind": kind, **fields}, separators=(",", ":"))


_GENERATION_MARK = 8_642_097_531


def route_event_parts(service: str) -> tuple[str, str]:
    """:func:`encode_event` of a route change split around its generation, for a script that knows the
    generation only once it has written it: ``head + str(generation) + tail``."""
    head, tail = encode_event(ROUTE_CHANGED, service=service, generation=_GENERATION_MARK).split(str(_GENERATION_MARK))
    return head, tail


def decode_event(raw: str | bytes) -> dict[str, Any]:
    """Parse a change notification; a malformed one decodes to an empty dict (it still triggers a re-read)."""
    try:
        value = json.loads(raw)
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}

"""The routing state as immutable values: the route, deployment records and the snapshot a gateway serves from."""

from __future__ import annotations

import enum
import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any


# Deployment names appear in URLs, Redis keys and metric labels: keep them plain.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_name(name: str) -> str:
    """The name, if it is a valid deployment name; else ``ValueError`` saying what is allowed."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid deployment name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


# The service every single-model install uses (its keys are the layout earlier releases wrote).
DEFAULT_SERVICE = "default"
# Service names appear in URLs next to these words and in Redis keys: none of them may be a service.
RESERVED_SERVICE_NAMES = frozenset({
    "admin", "deployments", "health", "invocations", "metrics", "models", "openapi.json", "ping", "services", "svc",
    "version",
})


def check_service_name(name: str) -> str:
    """The name, if it is a valid service name; else ``ValueError`` saying what is allowed."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid service name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if name.lower() in RESERVED_SERVICE_NAMES:
        raise ValueError(f"invalid service name {name!r}: it is reserved (reserved: {', '.join(sorted(RESERVED_SERVICE_NAMES))})")
    return name


def parse_specs(items: Iterable[str], default_service: str = DEFAULT_SERVICE) -> dict[tuple[str, str], str]:
    """``["blue=models:/iris/1", "loans/green=models:/loans@champion"]`` (items may hold comma-separated
    lists) → (service, name) → URI; a spec without ``SERVICE/`` belongs to ``default_service``."""
    out: dict[tuple[str, str], str] = {}
    for item in items:
        for spec in filter(None, (part.strip() for part in item.split(","))):
            target, sep, uri = spec.partition("=")
            if not sep or not uri.strip():
                raise ValueError(f"deployment {spec!r} must be [SERVICE/]NAME=MODEL_URI")
            service, slash, name = target.strip().rpartition("/")
            key = (check_service_name(service) if slash else default_service, check_name(name))
            if key in out:
                raise ValueError(f"deployment {target.strip()!r} given twice")
            out[key] = uri.strip()
    return out


class State(str, enum.Enum):
    """Lifecycle of a deployment, as its worker reports it."""

    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    STOPPED = "stopped"
    FAILED = "failed"
    # A replica removed by a scale-down: it takes no new requests and stops once its in-flight ones are done.
    DRAINING = "draining"
    # A state this release does not know (written by a newer one): read safely as not ready.
    UNKNOWN = "unknown"

    @classmethod
    def _missing_(cls, value: object) -> State:
        return cls.UNKNOWN


# Most replicas one deployment may have (per-replica fields, leases and metric series are bounded by it).
MAX_REPLICAS = 64


def replica_key(name: str, index: int) -> str:
    """How a replica is named in its lease and the live set: the deployment's name for the first one (the
    key a single-replica deployment always had), ``name#index`` for the others ('#' is never in a name)."""
    return name if index == 0 else f"{name}#{index}"


@dataclass(frozen=True, slots=True)
class Member:
    """One replica of a deployment as its worker reports it."""

    index: int
    url: str | None = None
    state: State = State.STARTING
    reason: str = ""
    worker: str | None = None
    restarts: int = 0
    started_at: float | None = None
    ready_at: float | None = None
    updated_at: float | None = None


# Fields each replica has for itself. The first replica keeps them as the deployment's own fields (the
# layout a single-replica deployment always had); replica i > 0 stores them as ``r{i}.{field}``.
MEMBER_FIELDS = frozenset({"url", "state", "reason", "worker", "restarts", "started_at", "ready_at", "updated_at"})
_MEMBER_FIELD = re.compile(r"r([1-9][0-9]?)\.([a-z_]+)")


def _decode(name: str, raw: str) -> Any:
    """A stored field's value (None when this release cannot read it: left out rather than failing a snapshot)."""
    if name == "state":
        return State(raw)
    if name == "external":
        return raw == "1"
    if name == "urls":
        return tuple(raw.split())
    if name in ("restarts", "replicas"):
        return int(raw) if raw.isdigit() else None
    if name == "min_ready":
        return int(raw) if raw.isdigit() else None
    if name in ("started_at", "ready_at", "created_at", "updated_at"):
        try:
            return float(raw)
        except ValueError:
            return None
    return raw


@dataclass(frozen=True, slots=True)
class Route:
    """The pointer: which deployment gets traffic, which one a rollback returns to, and its fencing generation."""

    active: str | None = None
    previous: str | None = None
    generation: int = 0
    # When the active deployment last changed (wall clock): starts the guard's bake period.
    changed_at: float = field(default=0.0, compare=False)
    # A split: this share (percent) of requests goes to ``candidate`` instead of the active; with
    # ``sticky`` (a lower-case header name) the share is chosen by a hash of that header's value.
    candidate: str | None = None
    weight: float = 0.0
    sticky: str | None = None
    # A shadow: this share (percent) of the requests the active answered is copied to ``shadow``.
    shadow: str | None = None
    shadow_percent: float = 0.0

    @classmethod
    def from_fields(cls, data: Mapping[str, str]) -> Route:
        """From the stored hash (a weight this release cannot read is no split rather than a failed read)."""
        def percent(name: str) -> float:
            try:
                value = min(max(float(data.get(name, 0.0)), 0.0), 100.0)
            except ValueError:
                return 0.0
            return value if math.isfinite(value) else 0.0

        weight = percent("weight")
        return cls(
            active=data.get("active") or None,
            previous=data.get("previous") or None,
            generation=int(data.get("generation", 0)),
            changed_at=float(data.get("changed_at", 0.0)),
            candidate=data.get("candidate") or None,
            weight=weight if math.isfinite(weight) else 0.0,
            sticky=data.get("sticky") or None,
            shadow=data.get("shadow") or None,
            shadow_percent=percent("shadow_percent"),
        )

    def split(self) -> str:
        """``"10% to green (sticky on x-user-id)"`` or ``""`` when there is no split."""
        if self.candidate is None:
            return ""
        return f"{self.weight:g}% to {self.candidate}" + (f" (sticky on {self.sticky})" if self.sticky else "")


# Plan states: a plan runs (or is paused) until it ends promoted or aborted.
RUNNING, PAUSED, PROMOTED, ABORTED = "running", "paused", "promoted", "aborted"


@dataclass(frozen=True, slots=True)
class Plan:
    """A canary rollout of one service: steps of weights, each held for ``step_seconds`` and judged
    against the active deployment (the baseline) over the same seconds."""

    candidate: str
    baseline: str
    steps: tuple[float, ...]
    step_seconds: float
    max_error_rate_increase: float = 0.01
    max_latency_ratio: float = 1.5
    min_requests: int = 50
    sticky: str | None = None
    state: str = RUNNING
    # Index of the step being held, and when it began (wall clock, so every gateway and a new leader agree).
    step: int = 0
    step_started_at: float = 0.0
    # While paused: seconds of the step that were left.
    remaining: float | None = None
    started_at: float = 0.0
    started_by: str = ""
    # Why it ended (promoted or aborted), and the gate's last view.
    outcome: str = ""
    gate: Mapping[str, Any] | None = None
    # Rises on every write: writes are conditional on it (the leader and an operator never overwrite each other).
    revision: int = 0

    @property
    def active(self) -> bool:
        """Running or paused (not ended)."""
        return self.state in (RUNNING, PAUSED)

    @property
    def weight(self) -> float:
        """The weight of the step being held."""
        return self.steps[min(self.step, len(self.steps) - 1)]

    def left(self, now: float) -> float:
        """Seconds left in the current step."""
        if self.remaining is not None:
            return self.remaining
        return max(0.0, self.step_started_at + self.step_seconds - now)

    def but(self, **changes: Any) -> Plan:
        """A copy with some fields changed and the revision raised (unless given)."""
        return replace(self, **{"revision": self.revision + 1, **changes})

    def to_json(self) -> str:
        """The stored form."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["steps"] = list(self.steps)
        data["gate"] = dict(self.gate) if self.gate else None
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | None) -> Plan | None:
        """Inverse of :meth:`to_json`; None for nothing, or for a plan this release cannot read."""
        if not raw:
            return None
        try:
            data = json.loads(raw)
            known = {f.name for f in fields(cls)}
            kwargs = {k: v for k, v in data.items() if k in known}
            kwargs["steps"] = tuple(float(w) for w in kwargs.get("steps", ()))
            plan = cls(**kwargs)
        except (ValueError, TypeError):
            return None
        return plan if plan.steps else None


@dataclass(frozen=True, slots=True)
class Deployment:
    """One named model server: where it is, what it serves and whether it is ready."""

    name: str
    url: str | None = None
    # An external deployment served by several processes: every replica's URL (``url`` is the first, so
    # a gateway of an earlier release still reaches one of them).
    urls: tuple[str, ...] = ()
    model_uri: str | None = None
    state: State = State.STARTING
    reason: str = ""
    external: bool = False
    worker: str | None = None
    mlflow_name: str | None = None
    mlflow_version: str | None = None
    mlflow_alias: str | None = None
    warmup: str = ""
    started_at: float | None = None
    ready_at: float | None = None
    created_at: float | None = None
    updated_at: float | None = None
    restarts: int = 0
    # Model-server processes a worker-served deployment should have, and how many must be ready before
    # it may take over (None: all of them).
    replicas: int = 1
    min_ready: int | None = None
    # Replicas after the first, as their workers report them (including ones draining after a scale-down).
    extra: tuple[Member, ...] = ()

    def to_fields(self) -> dict[str, str]:
        """Flat string fields for storage; unset values are left out."""
        encoded = encode_changes({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        for member in self.extra:
            encoded.update(encode_changes({k: getattr(member, k) for k in MEMBER_FIELDS}, replica=member.index))
        return {k: v for k, v in encoded.items() if v is not None}

    @classmethod
    def from_fields(cls, data: Mapping[str, str]) -> Deployment:
        """Inverse of :meth:`to_fields`; unknown fields are ignored so old gateways read newer records."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            raw = data.get(f.name)
            if raw is not None and f.name != "extra":
                value = _decode(f.name, raw)
                if value is not None:
                    kwargs[f.name] = value
        members: dict[int, dict[str, Any]] = {}
        for key, raw in data.items():
            match = _MEMBER_FIELD.fullmatch(key)
            if match and match.group(2) in MEMBER_FIELDS and int(match.group(1)) < MAX_REPLICAS:
                value = _decode(match.group(2), raw)
                if value is not None:
                    members.setdefault(int(match.group(1)), {})[match.group(2)] = value
        if members:
            kwargs["extra"] = tuple(Member(index=i, **members[i]) for i in sorted(members))
        if kwargs.get("replicas", 1) < 1:
            kwargs["replicas"] = 1
        return cls(**kwargs)

    @property
    def members(self) -> tuple[Member, ...]:
        """Every replica: the wanted ones (a missing one as ``starting``: no worker has claimed it yet),
        then any still draining after a scale-down. An external deployment's replicas are its URLs."""
        if self.external:
            return tuple(Member(i, url, self.state, self.reason) for i, url in enumerate(self.urls or ((self.url,) if self.url else ())))
        first = Member(0, self.url, self.state, self.reason, self.worker, self.restarts, self.started_at, self.ready_at,
                       self.updated_at)
        known = {m.index: m for m in self.extra}
        wanted = [known.pop(i, None) or Member(i, reason="waiting for a worker to host it") for i in range(1, self.replicas)]
        return (first, *wanted, *known.values())

    @property
    def needed(self) -> int:
        """Ready replicas it needs to take over traffic."""
        if self.external:
            return 1
        return max(1, min(self.min_ready or self.replicas, self.replicas))

    def with_changes(self, **changes: Any) -> Deployment:
        """A copy with some fields changed."""
        return replace(self, **changes)


_FIELD_NAMES = frozenset(f.name for f in fields(Deployment))


def encode_changes(changes: Mapping[str, Any], replica: int = 0) -> dict[str, str | None]:
    """Stored string form of some record fields (a replica's own fields under its ``r{i}.`` prefix when
    ``replica`` > 0); None means "remove the field"."""
    out: dict[str, str | None] = {}
    for name, value in changes.items():
        if name not in _FIELD_NAMES or name == "extra":
            raise ValueError(f"unknown deployment field {name!r}")
        key = f"r{replica}.{name}" if replica and name in MEMBER_FIELDS else name
        if value is None:
            out[key] = None
        elif isinstance(value, State):
            out[key] = value.value
        elif isinstance(value, bool):
            out[key] = "1" if value else "0"
        elif isinstance(value, tuple):
            out[key] = " ".join(value) if value else None
        else:
            out[key] = str(value)
    return out


def cleared(replica: int) -> dict[str, None]:
    """Changes that remove every field of a replica (once it has drained and stopped)."""
    return {name: None for name in MEMBER_FIELDS} if replica else {}


# Guard settings a service may set for itself: the threshold's name in the API → the gateway-wide
# setting it overrides (the store keeps the setting's name).
GUARD_FIELDS = {
    "enabled": "guard_enabled", "window_seconds": "guard_window", "error_rate": "guard_error_rate",
    "min_requests": "guard_min_requests", "p99_seconds": "guard_p99", "bake_seconds": "guard_bake",
    "always": "guard_always",
}
GUARD_OVERRIDES = tuple(GUARD_FIELDS.values())
_API_NAMES = {setting: api for api, setting in GUARD_FIELDS.items()}
_OVERRIDE_TYPES: dict[str, type] = {
    "guard_enabled": bool, "guard_window": float, "guard_error_rate": float, "guard_min_requests": int,
    "guard_p99": float, "guard_bake": float, "guard_always": bool,
}


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """What a service sets for itself: guard thresholds that override the gateway-wide ones."""

    overrides: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    created_at: float | None = None

    def thresholds(self) -> dict[str, Any]:
        """The overrides under their API names (``error_rate``, ``window_seconds``, ...)."""
        return {_API_NAMES[name]: value for name, value in self.overrides.items()}

    def to_fields(self) -> dict[str, str]:
        """Flat string fields for storage."""
        out = {name: json.dumps(value) for name, value in self.overrides.items()}
        if self.created_at is not None:
            out["created_at"] = repr(self.created_at)
        return out

    @classmethod
    def from_fields(cls, data: Mapping[str, str]) -> ServiceConfig:
        """Inverse of :meth:`to_fields`; a value this release cannot read is left out (inherited)."""
        overrides: dict[str, Any] = {}
        for name in GUARD_OVERRIDES:
            raw = data.get(name)
            if raw is None:
                continue
            try:
                value = json.loads(raw)
            except ValueError:
                continue
            kind = _OVERRIDE_TYPES[name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
                overrides[name] = value
        created = data.get("created_at")
        try:
            created_at = float(created) if created is not None else None
        except ValueError:
            created_at = None
        return cls(MappingProxyType(overrides), created_at)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the data plane needs of one service, read at one instant and replaced whole."""

    route: Route
    deployments: Mapping[str, Deployment] = field(default_factory=lambda: MappingProxyType({}))
    # Replicas (by :func:`replica_key`) whose hosting worker holds a live lease; external deployments
    # count as live.
    live: frozenset[str] = frozenset()
    service: str = DEFAULT_SERVICE
    config: ServiceConfig = field(default_factory=ServiceConfig)
    # The service's canary rollout (running, paused, or the last one that ended), if any.
    plan: Plan | None = None

    def member_state(self, dep: Deployment, member: Member) -> State:
        """A replica's state as the gateway should treat it: one past the wanted count is draining, a
        ready one whose worker died is unhealthy."""
        if dep.external:
            return dep.state
        if member.index >= dep.replicas and member.state is not State.STOPPED:
            return State.DRAINING
        if member.state is State.READY and (member.url is None or replica_key(dep.name, member.index) not in self.live):
            return State.UNHEALTHY
        return member.state

    def serving(self, name: str | None) -> tuple[str, ...]:
        """Where the deployment's requests may go now: the URLs of its ready replicas (none while it has none)."""
        dep = self.deployments.get(name) if name is not None else None
        if dep is None:
            return ()
        return tuple(m.url for m in dep.members if m.url and self.member_state(dep, m) is State.READY)

    def is_ready(self, name: str | None) -> bool:
        """True when the deployment may take over traffic: at least its ``min_ready`` replicas are ready
        and their workers alive."""
        dep = self.deployments.get(name) if name is not None else None
        return dep is not None and len(self.serving(name)) >= dep.needed

    def effective_state(self, name: str) -> State | None:
        """The deployment's state as the gateway should treat it: ``ready`` when :meth:`is_ready`, else
        what holds its wanted replicas back (starting before unhealthy before failed)."""
        dep = self.deployments.get(name)
        if dep is None:
            return None
        if self.is_ready(name):
            return State.READY
        states = {self.member_state(dep, m) for m in dep.members[: 1 if dep.external else dep.replicas]}
        for state in (State.STARTING, State.UNHEALTHY, State.FAILED, State.STOPPED, State.DRAINING):
            if state in states:
                return state
        return State.UNHEALTHY if State.READY in states else State.UNKNOWN


def now_iso() -> str:
    """UTC timestamp for history entries, to the millisecond."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class Who:
    """Who asked, from where, through what (``api``, ``guard``, ``alertmanager``, ``up``, ``registry``)."""

    actor: str
    client: str | None
    trigger: str


# JSON keys of a history entry that are fields of :class:`HistoryEntry` (the rest go to ``extra``).
_ENTRY_KEYS = frozenset({"time", "actor", "client", "trigger", "action", "result", "from", "to", "generation",
                         "reason", "detail", "forced", "evidence"})


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One line of the audit history: a change, or an attempt that changed nothing (and why)."""

    action: str  # deploy, undeploy, switch, rollback, guard_pause, guard_resume, registry_sync
    who: Who
    result: str = "applied"  # applied, refused, held, failed
    source: str | None = None
    target: str | None = None
    generation: int | None = None
    reason: str = ""
    detail: str = ""
    forced: bool = False
    evidence: Mapping[str, Any] | None = None
    # Fields particular to one action (a refused switch's target state, a registry retry's delay, ...).
    extra: Mapping[str, Any] = field(default_factory=dict)
    time: str = field(default_factory=now_iso)

    def but(self, **changes: Any) -> HistoryEntry:
        """A copy with some fields changed (an attempt that turned out refused, a generation now known)."""
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The stored and served form."""
        out: dict[str, Any] = {
            "time": self.time, "actor": self.who.actor, "client": self.who.client, "trigger": self.who.trigger,
            "action": self.action, "result": self.result, "from": self.source, "to": self.target,
            "generation": self.generation, "reason": self.reason, "detail": self.detail,
        }
        if self.forced:
            out["forced"] = True
        if self.evidence:
            out["evidence"] = dict(self.evidence)
        out.update({k: v for k, v in self.extra.items() if k not in _ENTRY_KEYS})
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HistoryEntry:
        """Inverse of :meth:`to_json`; tolerant of entries older releases wrote (missing fields)."""
        generation = data.get("generation")
        evidence = data.get("evidence")
        return cls(
            action=str(data.get("action") or ""),
            who=Who(str(data.get("actor") or ""), data.get("client"), str(data.get("trigger") or "")),
            result=str(data.get("result") or ""),
            source=data.get("from"),
            target=data.get("to"),
            generation=generation if isinstance(generation, int) else None,
            reason=str(data.get("reason") or ""),
            detail=str(data.get("detail") or ""),
            forced=bool(data.get("forced")),
            evidence=evidence if isinstance(evidence, Mapping) else None,
            extra={k: v for k, v in data.items() if k not in _ENTRY_KEYS},
            time=str(data.get("time") or ""),
        )

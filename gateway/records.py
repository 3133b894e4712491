"""The routing state as immutable values: the route, deployment records and the snapshot a gateway serves from."""

from __future__ import annotations

import enum
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
    if not NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid deployment name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def parse_specs(items: Iterable[str]) -> dict[str, str]:
    """``["blue=models:/iris/1", "green=models:/iris@champion"]`` (items may hold comma-separated lists) → name → URI."""
    out: dict[str, str] = {}
    for item in items:
        for spec in filter(None, (part.strip() for part in item.split(","))):
            name, sep, uri = spec.partition("=")
            if not sep or not uri.strip():
                raise ValueError(f"deployment {spec!r} must be NAME=MODEL_URI")
            name = check_name(name.strip())
            if name in out:
                raise ValueError(f"deployment {name!r} given twice")
            out[name] = uri.strip()
    return out


class State(str, enum.Enum):
    """Lifecycle of a deployment, as its worker reports it."""

    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    STOPPED = "stopped"
    FAILED = "failed"
    # A state this release does not know (written by a newer one): read safely as not ready.
    UNKNOWN = "unknown"

    @classmethod
    def _missing_(cls, value: object) -> State:
        return cls.UNKNOWN


@dataclass(frozen=True, slots=True)
class Route:
    """The pointer: which deployment gets traffic, which one a rollback returns to, and its fencing generation."""

    active: str | None = None
    previous: str | None = None
    generation: int = 0
    # When the route last changed (wall clock): starts the guard's bake period.
    changed_at: float = field(default=0.0, compare=False)


@dataclass(frozen=True, slots=True)
class Deployment:
    """One named model server: where it is, what it serves and whether it is ready."""

    name: str
    url: str | None = None
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

    def to_fields(self) -> dict[str, str]:
        """Flat string fields for storage; unset values are left out."""
        encoded = encode_changes({f.name: getattr(self, f.name) for f in fields(self)})
        return {k: v for k, v in encoded.items() if v is not None}

    @classmethod
    def from_fields(cls, data: Mapping[str, str]) -> Deployment:
        """Inverse of :meth:`to_fields`; unknown fields are ignored so old gateways read newer records."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            raw = data.get(f.name)
            if raw is None:
                continue
            if f.name == "state":
                kwargs[f.name] = State(raw)
            elif f.name == "external":
                kwargs[f.name] = raw == "1"
            elif f.name == "restarts":
                kwargs[f.name] = int(raw) if raw.isdigit() else 0
            elif f.name in ("started_at", "ready_at", "created_at", "updated_at"):
                # A value this release cannot read is left out rather than failing the whole snapshot.
                try:
                    kwargs[f.name] = float(raw)
                except ValueError:
                    continue
            else:
                kwargs[f.name] = raw
        return cls(**kwargs)

    def with_changes(self, **changes: Any) -> Deployment:
        """A copy with some fields changed."""
        return replace(self, **changes)


_FIELD_NAMES = frozenset(f.name for f in fields(Deployment))


def encode_changes(changes: Mapping[str, Any]) -> dict[str, str | None]:
    """Stored string form of some record fields; None means "remove the field"."""
    out: dict[str, str | None] = {}
    for key, value in changes.items():
        if key not in _FIELD_NAMES:
            raise ValueError(f"unknown deployment field {key!r}")
        if value is None:
            out[key] = None
        elif isinstance(value, State):
            out[key] = value.value
        elif isinstance(value, bool):
            out[key] = "1" if value else "0"
        else:
            out[key] = str(value)
    return out


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the data plane needs, read at one instant and replaced whole."""

    route: Route
    deployments: Mapping[str, Deployment] = field(default_factory=lambda: MappingProxyType({}))
    # Deployments whose hosting worker holds a live lease; external ones count as live.
    live: frozenset[str] = frozenset()

    def is_ready(self, name: str | None) -> bool:
        """True when the deployment exists, reports ready, and its worker is alive."""
        if name is None:
            return False
        dep = self.deployments.get(name)
        return dep is not None and dep.url is not None and dep.state is State.READY and name in self.live

    def effective_state(self, name: str) -> State | None:
        """The state as the gateway should treat it: a ready deployment whose worker died is unhealthy."""
        dep = self.deployments.get(name)
        if dep is None:
            return None
        if dep.state is State.READY and name not in self.live:
            return State.UNHEALTHY
        return dep.state


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

"""Turnout's settings: one frozen object, read from flags, then ``TURNOUT_*`` variables, then defaults."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, get_args, get_type_hints

from .records import MAX_REPLICAS, check_service_name

ENV_PREFIX = "TURNOUT_"
# Gateway processes under one parent at most: each holds its own upstream and Redis connections.
MAX_PROCESSES = 256


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


# Which commands a setting concerns: its flag is generated for those (``turnout up`` takes all).
GATEWAY = "gateway"
WORKER = "worker"
BOTH = "both"


def _doc(text: str, *, scope: str = GATEWAY, **kwargs: Any) -> Any:
    """A dataclass field whose help text and scope live next to its default."""
    return field(metadata={"doc": text, "scope": scope}, **kwargs)


@dataclass(frozen=True)
class Settings:
    """Everything a gateway or worker process is configured with."""

    redis_url: str | None = _doc(
        "Redis URL holding the route, deployments and history (redis://, rediss://, unix://, or "
        "redis+sentinel://HOST:26379,HOST2:26379/MASTER/DB for a Sentinel-managed primary); unset = embedded "
        "in-process store.",
        scope=BOTH, default=None,
    )
    namespace: str = _doc("Key prefix in Redis, so several Turnout installations share one server.", scope=BOTH, default="turnout")
    redis_wait_timeout: float = _doc(
        "With a redis+sentinel:// URL: seconds each change waits for a replica to acknowledge it (Redis WAIT); "
        "the admin API's answer says whether one did. 0 = do not wait. Below 2 (the store's socket timeout).",
        scope=BOTH, default=0.5,
    )
    default_service: str = _doc(
        "Service answering the unprefixed endpoints (/invocations, /admin/...) and NAME=URI worker deployments.",
        scope=BOTH, default="default",
    )
    host: str = _doc("Address the gateway's data plane listens on.", default="127.0.0.1")
    port: int = _doc("Port of the data plane.", default=8080)
    reuse_port: bool = _doc("Bind with SO_REUSEPORT so several gateway processes share the port.", default=False)
    processes: str = _doc(
        "Gateway processes serving the port(s) under one supervising parent (SO_REUSEPORT; /metrics sums them all): "
        "a number, or auto for one per CPU; more than 1 needs Redis.", default="1",
    )
    fast_path: bool = _doc(
        "Relay plain prediction requests on Turnout's own HTTP/1.1 handler (off: every request goes through aiohttp).",
        default=True,
    )
    admin_token: str | None = _doc(
        "Bearer token of the admin API; unset = the admin API answers loopback clients only.", default=None
    )
    admin_host: str | None = _doc("Address of the separate admin listener (default: host).", default=None)
    admin_port: int | None = _doc(
        "Port of a separate admin listener; unset = the admin API shares the data-plane port.", default=None
    )
    history_max: int = _doc("History entries kept in the store (oldest dropped first).", default=10_000)
    registry_alias: str = _doc("MLflow registry alias moved to the active version on every switch and rollback.", default="production")
    registry_sync: bool = _doc("Move the alias and tag versions in the MLflow registry on switches.", default=True)
    guard_enabled: bool = _doc("Roll back automatically on breaches (the Alertmanager webhook works either way).", default=True)
    guard_window: float = _doc("Seconds of traffic (all replicas) each guard decision looks at.", default=30.0)
    guard_error_rate: float = _doc("Model-failure rate of the active deployment above which it is rolled back.", default=0.05)
    guard_min_requests: int = _doc("Requests (excluding client errors) needed in the window before the guard judges.", default=20)
    guard_p99: float | None = _doc("p99 latency in seconds above which the active deployment is rolled back; unset = off.", default=None)
    guard_interval: float = _doc("Seconds between guard evaluations (by one leader replica).", default=1.0)
    guard_bake: float = _doc("Seconds after each switch during which the guard is armed.", default=600.0)
    guard_always: bool = _doc("Keep the guard armed at all times, not only during the bake period.", default=False)
    guard_compare_previous: bool = _doc(
        "Also require the error rate to exceed the previous deployment's rate before the switch by the threshold.",
        default=False,
    )
    replay_crashes: bool = _doc(
        "Replay an input the active deployment crashed on (MLflow's 400 from inside predict) to the previous "
        "deployment; when that one rejects it too, count the crash as the client's error, not the model's.",
        default=True,
    )
    stats_flush_interval: float = _doc("Seconds between flushes of this replica's traffic counters to Redis.", default=0.25)
    poll_interval: float = _doc("Seconds between full re-reads of the route (pub/sub is the fast path).", default=1.0)
    header_timeout: float = _doc(
        "Seconds a client has to send a whole request head, from its first byte (a new connection: from opening); 408 after.",
        default=10.0,
    )
    keepalive_timeout: float = _doc("Seconds an idle keep-alive client connection stays open.", default=75.0)
    client_timeout: float = _doc(
        "Seconds the gateway waits for a client to send more of its body (408 after) or to take more of its answer.",
        default=30.0,
    )
    max_headers: int = _doc("Most header fields a request may have (431 above).", default=128)
    max_head_bytes: int = _doc("Largest request head (request line and headers) accepted, in bytes (431 above).", default=64 * 1024)
    trusted_proxies: str = _doc(
        "Comma-separated CIDRs of load balancers in front of the gateway: from these peers, the client address "
        "is taken from X-Forwarded-For (for the admin API's loopback check and the history).",
        default="",
    )
    balance: str = _doc(
        "How a gateway process spreads a deployment's requests over its replicas: least_request (the less busy of two "
        "drawn at random, Envoy's default) or round_robin (in turn, whatever their load).", default="least_request",
    )
    shadow_concurrency: int = _doc("Shadow copies a gateway process's copier sends at once (off the clients' path).", default=4)
    shadow_queue: int = _doc(
        "Shadow copies handed to the copier and not done yet (waiting or in flight), at most (beyond it, and beyond "
        "16 MiB of bodies, copies are dropped and counted).",
        default=256,
    )
    shadow_max_body: int = _doc("Largest request body copied to a shadow, in bytes (larger ones are counted, not copied).",
                                default=256 * 1024)
    shadow_timeout: float = _doc("Seconds a shadow has to answer a copy (then it counts as shadow_error).", default=5.0)
    shadow_tolerance: float = _doc(
        "Numbers in the two answers agree when they differ by at most this, relative to the larger (absolutely below 1).",
        default=1e-6,
    )
    shadow_keep_bodies: bool = _doc(
        "Keep truncated request and answer bodies of the last disagreements for turnout compare (false: counts only).",
        default=True,
    )
    outlier_consecutive_failures: int = _doc(
        "Consecutive failures (connect error, reset, timeout, 5xx) after which a replica leaves this gateway's "
        "rotation; a model's own failures (MLflow's 400 crash) never count.", default=5,
    )
    outlier_base_ejection: float = _doc(
        "Seconds a replica stays out of rotation after its first ejection; each further one lasts that many times longer "
        "(at most 300 s).", default=10.0,
    )
    outlier_max_ejection_percent: int = _doc(
        "Most replicas of a deployment out of rotation at once, in percent, rounded down (a lone replica is never ejected).",
        default=50,
    )
    connect_timeout: float = _doc("Seconds to open an upstream connection.", default=2.0)
    read_timeout: float = _doc(
        "Seconds to wait for the upstream's response head, between body chunks, and for it to take the request body.",
        default=60.0,
    )
    total_timeout: float = _doc("Seconds one proxied request may take in all, from the first byte of its head.", default=120.0)
    upstream_keepalive: float = _doc(
        "Seconds an idle upstream connection is kept; shorter than uvicorn's 5 s so it never closes under us.",
        default=2.0,
    )
    upstream_max_connections: int = _doc(
        "Connections per model server at most; a request finding them all busy waits upstream_pool_timeout, then gets 503.",
        default=256,
    )
    upstream_pool_timeout: float = _doc(
        "Seconds a request waits for a free connection to a model server whose connections are all busy (503 after).",
        default=1.0,
    )
    max_body_bytes: int = _doc("Largest request body accepted, counted as it streams (413 above).", default=100 * 1024 * 1024)
    shutdown_timeout: float = _doc("Seconds SIGTERM waits for in-flight requests before closing them.", default=30.0)
    log_level: str = _doc("Python logging level.", scope=BOTH, default="INFO")
    # --- worker -------------------------------------------------------------------------------
    deployments: str = _doc(
        "Deployments a worker hosts: [SERVICE/]NAME=MODEL_URI, comma-separated (or --deployment, repeatable); "
        "without SERVICE/, the default service's.", scope=WORKER, default=""
    )
    claim: bool = _doc("Worker also hosts deployments created through the store that no live worker holds.", scope=WORKER, default=False)
    services: str = _doc(
        "Services a --claim worker takes deployments of, comma-separated; empty = every service.", scope=WORKER, default="",
    )
    model_host: str = _doc("Address the worker's model servers listen on.", scope=WORKER, default="127.0.0.1")
    advertise_host: str | None = _doc("Host the gateway uses to reach model servers (default: model_host).", scope=WORKER, default=None)
    model_ports: str = _doc("Port range for model servers; ports already taken are skipped.", scope=WORKER, default="5001-5999")
    health_interval: float = _doc("Seconds between health checks of a ready model server.", scope=WORKER, default=2.0)
    lease_ttl: float = _doc(
        "Seconds a worker's claim on a deployment outlives its last heartbeat (gateways then see it not ready).",
        scope=WORKER, default=5.0,
    )
    start_timeout: float = _doc("Seconds a model server may take from launch to a successful warm-up.", scope=WORKER, default=120.0)
    max_start_attempts: int = _doc("Failed starts in a row before a deployment is marked failed.", scope=WORKER, default=3)
    restart_backoff: float = _doc("First delay before restarting a crashed server; doubles per crash, up to 30 s.", scope=WORKER, default=1.0)
    stop_timeout: float = _doc("Seconds a model server may drain on stop before it is killed.", scope=WORKER, default=10.0)
    replicas: int = _doc(
        "Replicas (model-server processes) of each deployment a worker registers from --deployment; the admin API and "
        "turnout scale change them later.", scope=WORKER, default=1,
    )
    drain_grace: float = _doc(
        "Seconds a replica removed by a scale-down keeps its server up after saying it is draining, before it waits "
        "for its requests in flight: every gateway has stopped choosing it by then (they re-read within poll_interval).",
        scope=WORKER, default=3.0,
    )
    drain_timeout: float = _doc(
        "Most seconds a draining replica waits for its requests in flight (its open connections) before its server stops.",
        scope=WORKER, default=60.0,
    )
    worker_metrics_port: int | None = _doc("Port of the worker's /metrics and /health; unset = not served.", scope=WORKER, default=None)
    warmup_payload: str | None = _doc(
        "JSON file used as the warm-up request for models logged without an input example.", scope=WORKER, default=None
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            # float("nan") and float("inf") parse, and NaN compares false with every bound below.
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingsError(f"{f.name} must be a finite number, got {value!r}")
        for name in (
            "poll_interval", "connect_timeout", "read_timeout", "total_timeout", "upstream_keepalive",
            "header_timeout", "keepalive_timeout", "client_timeout", "upstream_pool_timeout",
            "health_interval", "lease_ttl", "start_timeout", "restart_backoff", "stop_timeout",
            "guard_window", "guard_interval", "guard_bake", "stats_flush_interval", "outlier_base_ejection",
            "drain_timeout", "shadow_timeout",
        ):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 < self.guard_error_rate <= 1:
            raise SettingsError(f"guard_error_rate must be in (0, 1], got {self.guard_error_rate!r}")
        if self.guard_p99 is not None and self.guard_p99 <= 0:
            raise SettingsError("guard_p99 must be positive (or unset)")
        if self.balance not in ("least_request", "round_robin"):
            raise SettingsError(f"balance must be least_request or round_robin, got {self.balance!r}")
        if not 0 <= self.shadow_tolerance < 1:
            raise SettingsError(f"shadow_tolerance must be in [0, 1), got {self.shadow_tolerance!r}")
        if self.drain_grace < 0:
            raise SettingsError(f"drain_grace must be 0 or more, got {self.drain_grace!r}")
        if not 1 <= self.replicas <= MAX_REPLICAS:
            raise SettingsError(f"replicas must be 1-{MAX_REPLICAS}, got {self.replicas!r}")
        if not 0 <= self.outlier_max_ejection_percent <= 100:
            raise SettingsError(f"outlier_max_ejection_percent must be 0-100, got {self.outlier_max_ejection_percent!r}")
        for name in ("max_body_bytes", "upstream_max_connections", "max_start_attempts", "history_max", "guard_min_requests",
                     "max_headers", "max_head_bytes", "outlier_consecutive_failures", "shadow_concurrency", "shadow_queue",
                     "shadow_max_body"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive, got {getattr(self, name)!r}")
        try:
            self.trusted_networks()
        except ValueError as exc:
            raise SettingsError(f"trusted_proxies: {exc}") from None
        try:
            check_service_name(self.default_service)
            for name in self.claimed_services():
                check_service_name(name)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        if not 0 <= self.redis_wait_timeout < 2:
            raise SettingsError(f"redis_wait_timeout must be at least 0 and below 2 seconds, got {self.redis_wait_timeout!r}")
        if self.redis_url:
            from .store.connect import check_url

            try:
                check_url(self.redis_url)
            except ValueError as exc:
                raise SettingsError(f"redis_url: {exc}") from None
        if not self.namespace or any(c in self.namespace for c in " {}:"):
            raise SettingsError(f"namespace must be a non-empty word without spaces, braces or colons: {self.namespace!r}")
        count = self.process_count()
        if count > 1 and not self.redis_url:
            raise SettingsError(
                f"processes={self.processes} needs Redis (--redis-url or TURNOUT_REDIS_URL): with the embedded store "
                "each gateway process would keep a route, history and guard of its own"
            )
        if count > 1 and self.port == 0:
            raise SettingsError("processes above 1 need a fixed port (port 0 would give each process a different one)")
        if self.admin_port is not None and self.admin_port == self.port and self.port != 0:
            # With SO_REUSEPORT both listeners would bind, and the kernel would split connections between the
            # data plane and the admin API at random.
            raise SettingsError(f"admin_port must differ from port ({self.port}); leave it unset to serve the "
                                "admin API on the data-plane port")
        for name in ("port", "admin_port", "worker_metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise SettingsError(f"{name} out of range: {value}")

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings: explicit overrides (flags) win over ``TURNOUT_*`` variables, which win over defaults."""
        env = os.environ if env is None else env
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, hints[f.name], raw)
        for key, value in (overrides or {}).items():
            if key not in hints:
                raise SettingsError(f"unknown setting {key!r}")
            if value is not None:
                values[key] = value
        return cls(**values)

    def process_count(self) -> int:
        """``processes`` as a number: ``auto`` is one per CPU (raises ``SettingsError`` on anything else)."""
        raw = str(self.processes).strip().lower()
        if raw == "auto":
            return os.cpu_count() or 1
        if not (raw.isascii() and raw.isdigit()):
            raise SettingsError(f"processes must be a number or auto, got {self.processes!r}")
        count = int(raw)
        if not 1 <= count <= MAX_PROCESSES:
            raise SettingsError(f"processes must be 1-{MAX_PROCESSES} or auto, got {self.processes!r}")
        return count

    def claimed_services(self) -> frozenset[str]:
        """``services`` parsed (empty: every service)."""
        return frozenset(part.strip() for part in self.services.split(",") if part.strip())

    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``trusted_proxies`` parsed (raises ``ValueError`` naming a bad entry)."""
        return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in self.trusted_proxies.split(",") if part.strip())

    def replace(self, **changes: Any) -> Settings:
        """A copy with some settings changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def reference(cls) -> list[tuple[str, str, str]]:
        """(environment variable, default, meaning) for every setting, for docs and ``--help``."""
        return [
            (ENV_PREFIX + f.name.upper(), repr(f.default), f.metadata.get("doc", ""))
            for f in fields(cls)
        ]


def base_type(hint: Any) -> type:
    """``int`` for ``int | None``, ``bool`` for ``bool``: the one concrete type a setting holds."""
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _parse(name: str, hint: Any, raw: str) -> Any:
    """Convert one environment string to the field's type, naming the variable on failure."""
    kind = base_type(hint)
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if kind in (int, float):
            return kind(raw)
    except ValueError:
        raise SettingsError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}") from None
    return raw

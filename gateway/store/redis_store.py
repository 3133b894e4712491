"""The production store: Redis, with every multi-key change done by one Lua script so it is never half-written.

Every key name and message format comes from ``keys``; the scripts get them as KEYS and ARGV. The
snapshot script builds deployment keys from a prefix (their names come from a set), so the store needs
a single Redis (or a Sentinel-managed primary), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from ..keys import DEPLOYMENT_CHANGED, SUBSCRIBED, Keys, decode_event, encode_event, route_event_parts
from ..records import Deployment, HistoryEntry, Route, Snapshot, encode_changes
from .base import DEFAULT_HISTORY_MAX, RouteChange, Store, StoreUnavailable

# KEYS: route, deployments. ARGV: deployment key prefix, lease key prefix (the names come from the set).
# Returns {route hash, {{name, record hash, live}...}}.
_SNAPSHOT = """
local route = redis.call('HGETALL', KEYS[1])
local names = redis.call('SMEMBERS', KEYS[2])
local deps = {}
for i, name in ipairs(names) do
  local record = redis.call('HGETALL', ARGV[1] .. name)
  local live = redis.call('EXISTS', ARGV[2] .. name)
  deps[i] = {name, record, live}
end
return {route, deps}
"""

# KEYS: route, deployments, history. ARGV: expected generation or '', active, previous or '',
# history entry JSON or '', history bound, events channel, now, route event head and tail (the
# message is head .. generation .. tail, as keys.route_event_parts defines).
# Returns {applied 0/1, generation, active, previous, refusal}.
_SET_ROUTE = """
local gen = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
local function current(refusal)
  return {0, gen, redis.call('HGET', KEYS[1], 'active') or '', redis.call('HGET', KEYS[1], 'previous') or '', refusal}
end
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= gen then return current('conflict') end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 0 then return current('unknown') end
gen = gen + 1
redis.call('HSET', KEYS[1], 'active', ARGV[2], 'generation', gen, 'changed_at', ARGV[7])
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], 'previous') else redis.call('HSET', KEYS[1], 'previous', ARGV[3]) end
if ARGV[4] ~= '' then
  local entry = cjson.decode(ARGV[4])
  entry['generation'] = gen
  redis.call('LPUSH', KEYS[3], cjson.encode(entry))
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
end
redis.call('PUBLISH', ARGV[6], ARGV[8] .. gen .. ARGV[9])
return {1, gen, ARGV[2], ARGV[3], ''}
"""

# Appends ARGV[i] (a JSON entry, or '') to the history list KEYS[k], trimmed to ARGV[i+1] entries.
_HISTORY = """
local function record(key, entry, bound)
  if entry ~= '' then
    redis.call('LPUSH', key, entry)
    redis.call('LTRIM', key, 0, tonumber(bound) - 1)
  end
end
"""

# KEYS: deployments, record, history. ARGV: name, record fields JSON, channel, message, history entry, bound.
_CREATE = _HISTORY + """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
for k, v in pairs(cjson.decode(ARGV[2])) do redis.call('HSET', KEYS[2], k, v) end
redis.call('SADD', KEYS[1], ARGV[1])
record(KEYS[3], ARGV[5], ARGV[6])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# KEYS: record, lease. ARGV: owner or '', changes JSON (null = remove), channel, message.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
for k, v in pairs(cjson.decode(ARGV[2])) do
  if v == cjson.null then redis.call('HDEL', KEYS[1], k) else redis.call('HSET', KEYS[1], k, v) end
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# KEYS: route, deployments, record, lease, history. ARGV: name, force '1'/'0', channel, message,
# history entry, bound. Deleting the previous deployment (forced) clears previous; the active one stays
# named in the route (the gateway answers 503 for it) until an operator switches.
_DELETE = _HISTORY + """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then return 'unknown' end
local active = redis.call('HGET', KEYS[1], 'active')
local previous = redis.call('HGET', KEYS[1], 'previous')
if ARGV[2] ~= '1' then
  if active == ARGV[1] then return 'active' end
  if previous == ARGV[1] then return 'previous' end
end
if previous == ARGV[1] then redis.call('HDEL', KEYS[1], 'previous') end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('SREM', KEYS[2], ARGV[1])
record(KEYS[5], ARGV[5], ARGV[6])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return ''
"""

# KEYS: lease. ARGV: owner, ttl ms, channel, message. Publishes only when the deployment becomes live.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if not holder then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return 1
"""

# KEYS: role. ARGV: owner, ttl ms.
_HOLD_ROLE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: lease. ARGV: owner, channel, message.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return 1
"""


@contextlib.contextmanager
def _unavailable_on(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn the given errors into the store's one error type, :class:`StoreUnavailable`."""
    # redis-py can swallow a cancellation that lands mid-command (returning, or raising a
    # ConnectionError instead); a background loop would then never stop. The cancellation wins.
    task = asyncio.current_task()
    try:
        yield
    except kinds as exc:
        if task is not None and task.cancelling():
            raise asyncio.CancelledError() from exc
        raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


def _unavailable_on_connection_errors() -> contextlib.AbstractContextManager[None]:
    """redis-py's connection failures mean the store is unavailable."""
    return _unavailable_on(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


class RedisStore(Store):
    """Route, deployments, leases and history in Redis, changes announced on one pub/sub channel."""

    def __init__(self, client: aioredis.Redis, namespace: str, history_max: int = DEFAULT_HISTORY_MAX) -> None:
        self.client = client
        self.keys = Keys(namespace)
        self.history_max = history_max
        self._snapshot = client.register_script(_SNAPSHOT)
        self._set_route = client.register_script(_SET_ROUTE)
        self._create = client.register_script(_CREATE)
        self._update = client.register_script(_UPDATE)
        self._delete = client.register_script(_DELETE)
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)
        self._hold_role = client.register_script(_HOLD_ROLE)

    @classmethod
    def from_url(cls, url: str, namespace: str, history_max: int = DEFAULT_HISTORY_MAX) -> RedisStore:
        """A store on a blocking pool (waits for a free connection rather than failing) with async retries."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=32,
            timeout=2,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=2,
            health_check_interval=10,
            # The asyncio Retry: the sync one silently does nothing here (redis-py #2179).
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        )
        return cls(aioredis.Redis(connection_pool=pool), namespace, history_max)

    def _deployment_event(self, name: str) -> str:
        return encode_event(DEPLOYMENT_CHANGED, name=name)

    async def ping(self) -> None:
        with _unavailable_on_connection_errors():
            await self.client.ping()

    async def read_snapshot(self) -> Snapshot:
        with _unavailable_on_connection_errors():
            raw_route, raw_deps = await self._snapshot(
                keys=[self.keys.route, self.keys.deployments], args=[self.keys.deployment_prefix, self.keys.lease_prefix]
            )
        route_fields = _pairs(raw_route)
        route = Route(
            active=route_fields.get("active") or None,
            previous=route_fields.get("previous") or None,
            generation=int(route_fields.get("generation", 0)),
            changed_at=float(route_fields.get("changed_at", 0.0)),
        )
        deployments: dict[str, Deployment] = {}
        live: set[str] = set()
        for name, record, is_live in raw_deps:
            if not record:
                continue
            dep = Deployment.from_fields({**_pairs(record), "name": name})
            deployments[name] = dep
            if is_live or dep.external:
                live.add(name)
        return Snapshot(route=route, deployments=MappingProxyType(deployments), live=frozenset(live))

    async def set_route(
        self,
        active: str,
        previous: str | None,
        *,
        expected_generation: int | None = None,
        history: HistoryEntry | None = None,
    ) -> RouteChange:
        args = [
            "" if expected_generation is None else str(expected_generation),
            active,
            previous or "",
            json.dumps(history.to_json()) if history is not None else "",
            str(self.history_max),
            self.keys.events,
            repr(time.time()),
            *route_event_parts(),
        ]
        with _unavailable_on_connection_errors():
            applied, gen, cur_active, cur_previous, refusal = await self._set_route(
                keys=[self.keys.route, self.keys.deployments, self.keys.history], args=args
            )
        route = Route(active=cur_active or None, previous=cur_previous or None, generation=int(gen),
                      changed_at=float(args[6]) if applied else 0.0)
        return RouteChange(bool(applied), route, refusal or None)

    def _history_args(self, history: HistoryEntry | None) -> list[str]:
        return [json.dumps(history.to_json()) if history is not None else "", str(self.history_max)]

    async def create_deployment(self, deployment: Deployment, *, history: HistoryEntry | None = None) -> bool:
        name = deployment.name
        with _unavailable_on_connection_errors():
            created = await self._create(
                keys=[self.keys.deployments, self.keys.deployment(name), self.keys.history],
                args=[name, json.dumps(deployment.to_fields()), self.keys.events, self._deployment_event(name),
                      *self._history_args(history)],
            )
        return bool(created)

    async def update_deployment(self, name: str, *, owner: str | None = None, **changes: Any) -> bool:
        encoded = encode_changes(changes)
        with _unavailable_on_connection_errors():
            updated = await self._update(
                keys=[self.keys.deployment(name), self.keys.lease(name)],
                args=[owner or "", json.dumps(encoded), self.keys.events, self._deployment_event(name)],
            )
        return bool(updated)

    async def delete_deployment(
        self, name: str, *, force: bool = False, history: HistoryEntry | None = None
    ) -> str | None:
        with _unavailable_on_connection_errors():
            refusal = await self._delete(
                keys=[self.keys.route, self.keys.deployments, self.keys.deployment(name), self.keys.lease(name),
                      self.keys.history],
                args=[name, "1" if force else "0", self.keys.events, self._deployment_event(name),
                      *self._history_args(history)],
            )
        return refusal or None

    async def claim(self, name: str, owner: str, ttl: float) -> bool:
        with _unavailable_on_connection_errors():
            ok = await self._claim(
                keys=[self.keys.lease(name)],
                args=[owner, str(max(1, int(ttl * 1000))), self.keys.events, self._deployment_event(name)],
            )
        return bool(ok)

    async def release(self, name: str, owner: str) -> None:
        with _unavailable_on_connection_errors():
            await self._release(
                keys=[self.keys.lease(name)], args=[owner, self.keys.events, self._deployment_event(name)]
            )

    async def append_history(self, entry: HistoryEntry) -> None:
        with _unavailable_on_connection_errors():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.lpush(self.keys.history, json.dumps(entry.to_json()))
                pipe.ltrim(self.keys.history, 0, self.history_max - 1)
                await pipe.execute()

    async def read_history(self, offset: int = 0, limit: int = 50) -> tuple[list[HistoryEntry], int]:
        with _unavailable_on_connection_errors():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.lrange(self.keys.history, offset, offset + limit - 1)
                pipe.llen(self.keys.history)
                raw, total = await pipe.execute()
        return [HistoryEntry.from_json(json.loads(item)) for item in raw], int(total)

    async def add_stats(self, pending: Mapping[str, Mapping[int, Mapping[int, int]]], ttl: int = 180) -> None:
        with _unavailable_on_connection_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                for deployment, per in pending.items():
                    for second, row in per.items():
                        key = self.keys.stats(deployment, second)
                        for column, count in row.items():
                            if count:
                                pipe.hincrby(key, str(column), count)
                        pipe.expire(key, ttl)
                await pipe.execute()

    async def read_stats(self, deployment: str, first_second: int, last_second: int) -> dict[int, int]:
        with _unavailable_on_connection_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                for second in range(first_second, last_second + 1):
                    pipe.hgetall(self.keys.stats(deployment, second))
                rows = await pipe.execute()
        total: dict[int, int] = {}
        for row in rows:
            for column, count in row.items():
                if column.isdigit() and count.lstrip("-").isdigit():
                    total[int(column)] = total.get(int(column), 0) + int(count)
        return total

    async def hold_role(self, role: str, owner: str, ttl: float) -> bool:
        with _unavailable_on_connection_errors():
            return bool(await self._hold_role(keys=[self.keys.lease_of(role)], args=[owner, str(max(1, int(ttl * 1000)))]))

    async def get_guard(self) -> dict[str, str]:
        with _unavailable_on_connection_errors():
            return await self.client.hgetall(self.keys.guard)

    async def set_guard(self, **fields: str | None) -> None:
        with _unavailable_on_connection_errors():
            async with self.client.pipeline(transaction=True) as pipe:
                to_set = {k: v for k, v in fields.items() if v is not None}
                if to_set:
                    pipe.hset(self.keys.guard, mapping=to_set)
                to_delete = [k for k, v in fields.items() if v is None]
                if to_delete:
                    pipe.hdel(self.keys.guard, *to_delete)
                await pipe.execute()

    async def first_time(self, token: str, ttl: float) -> bool:
        with _unavailable_on_connection_errors():
            return bool(await self.client.set(self.keys.seen(token), "1", nx=True, px=max(1, int(ttl * 1000))))

    async def events(self) -> AsyncIterator[dict[str, Any]]:  # type: ignore[override]
        pubsub = self.client.pubsub()
        try:
            # Any failure of the feed (lost connection, or e.g. an ACL refusing the channel) means
            # "no pub/sub right now": the watcher retries and polling carries the route meanwhile.
            with _unavailable_on(redis.exceptions.RedisError, OSError):
                await pubsub.subscribe(self.keys.events)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # Only Redis's confirmation proves we listen (a refusal arrives instead of it).
                        yield {"kind": SUBSCRIBED}
                    elif message["type"] == "message":
                        yield decode_event(message["data"])
        finally:
            # Closing a subscription whose connection already broke can raise again; it is gone either way.
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await pubsub.aclose()

    async def drop_namespace(self) -> None:
        """Delete every key of this store's namespace (never FLUSHALL: the server may be shared)."""
        with _unavailable_on_connection_errors():
            async for key in self.client.scan_iter(match=self.keys.pattern, count=500):
                await self.client.delete(key)

    async def close(self) -> None:
        await self.client.aclose()
        await self.client.connection_pool.disconnect()


async def drop_namespace(url: str, namespace: str) -> None:
    """Delete every key of ``namespace`` on the Redis at ``url`` (tests, benchmarks and the demo clean up so)."""
    store = RedisStore.from_url(url, namespace)
    try:
        await store.drop_namespace()
    finally:
        await store.close()


"""The production store: Redis, with every multi-key change done by one Lua script so it is never half-written.

Every key name and message format comes from ``keys``; the scripts get them as KEYS and ARGV. The
scripts that read deployments build their keys from a prefix (names come from a set), and the full
read discovers services, so the store needs a single Redis (or a Sentinel-managed primary), not
Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.sentinel import MasterNotFoundError, SentinelConnectionPool

from ..keys import (
    DEPLOYMENT_CHANGED, LEGACY_SERVICE, SERVICE_CHANGED, SUBSCRIBED, Keys, ServiceKeys, decode_event, encode_event,
    route_event_parts,
)
from ..records import (
    DEFAULT_SERVICE, Deployment, HistoryEntry, Plan, Route, ServiceConfig, Snapshot, encode_changes, replica_key,
)
from .base import (
    DEFAULT_HISTORY_MAX, DEFAULT_WAIT_TIMEOUT, Reading, RouteChange, StatsRows, Store, StoreUnavailable, note_replicated,
)
from .connect import is_sentinel, redis_client

# Replica i > 0 of a deployment keeps its fields as r{i}.{field} and its lease under lease:{name}#{i}
# (records.replica_key). The indices of the replicas a record holds fields for: both reads and deletes
# find their leases from them.
_REPLICAS = """
local function replica_indices(record)
  local out = {}
  for i = 1, #record, 2 do
    local index = string.match(record[i], '^r(%d+)%.state$')
    if index then out[#out + 1] = tonumber(index) end
  end
  table.sort(out)
  return out
end
"""

# Reads one service: KEYS route, deployments, config, plan; ARGV deployment prefix, lease prefix.
# Returns {route hash, {{name, record hash, live, {indices of other live replicas}}...} sorted by name,
# config hash, plan JSON or false}.
_READ_SERVICE = _REPLICAS + """
local function read(route_key, deployments_key, config_key, dep_prefix, lease_prefix, plan_key)
  local names = redis.call('SMEMBERS', deployments_key)
  table.sort(names)
  local deps = {}
  for i, name in ipairs(names) do
    local record = redis.call('HGETALL', dep_prefix .. name)
    local live = {}
    for _, index in ipairs(replica_indices(record)) do
      if redis.call('EXISTS', lease_prefix .. name .. '#' .. index) == 1 then live[#live + 1] = index end
    end
    deps[i] = {name, record, redis.call('EXISTS', lease_prefix .. name), live}
  end
  return {redis.call('HGETALL', route_key), deps, redis.call('HGETALL', config_key), redis.call('GET', plan_key)}
end
"""

_SNAPSHOT = _READ_SERVICE + """
return read(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], KEYS[4])
"""

# The poll: KEYS services set. ARGV: the layout (keys.Keys.layout: legacy name, legacy prefix, service
# prefix, route/deployments/deployment/lease/config/plan suffixes), then "service fingerprint" lines the caller
# holds. Returns {every service's name, space-separated; {{service, fingerprint, data}...} for those whose
# fingerprint moved}.
_READ_ALL = _READ_SERVICE + """
local legacy, legacy_prefix, svc_prefix = ARGV[1], ARGV[2], ARGV[3]
local route_s, deps_s, dep_s, lease_s, config_s, plan_s = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local known = {}
for svc, fingerprint in string.gmatch(ARGV[10], '(%S+) (%S+)') do known[svc] = fingerprint end
local names = redis.call('SMEMBERS', KEYS[1])
table.insert(names, legacy)
table.sort(names)
local all, changed = {}, {}
local last = nil
for _, svc in ipairs(names) do
  if svc ~= last then
    last = svc
    all[#all + 1] = svc
    local p = (svc == legacy) and legacy_prefix or (svc_prefix .. svc)
    local data = read(p .. route_s, p .. deps_s, p .. config_s, p .. dep_s, p .. lease_s, p .. plan_s)
    local fingerprint = redis.sha1hex(cjson.encode(data))
    if known[svc] ~= fingerprint then changed[#changed + 1] = {svc, fingerprint, data} end
  end
end
return {table.concat(all, ' '), changed}
"""

# Whether ARGV[i] names an existing service: the legacy one always exists, others are in KEYS[k].
_EXISTS = """
local function exists(services_key, name, legacy)
  return name == legacy or redis.call('SISMEMBER', services_key, name) == 1
end
"""

# Appends ARGV[i] (a JSON entry, or '') to the history list KEYS[k], trimmed to ARGV[i+1] entries. Every
# script decodes what it can fail on before its first write: Redis does not undo a failed script's writes.
_HISTORY = """
local function record(key, entry, bound)
  if entry ~= '' then
    redis.call('LPUSH', key, entry)
    redis.call('LTRIM', key, 0, tonumber(bound) - 1)
  end
end
"""

# KEYS: route, deployments, history, services, plan. ARGV: expected generation or '', active, previous or
# '', history entry JSON or '', history bound, events channel, now, route event head and tail (the
# message is head .. generation .. tail, as keys.route_event_parts defines), service, legacy service,
# the plan's new JSON or '' (unchanged). A switch ends any split. Returns {applied 0/1, generation,
# active, previous, refusal}.
_SET_ROUTE = _EXISTS + """
if not exists(KEYS[4], ARGV[10], ARGV[11]) then return {0, 0, '', '', 'no_service'} end
local gen = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
local function current(refusal)
  return {0, gen, redis.call('HGET', KEYS[1], 'active') or '', redis.call('HGET', KEYS[1], 'previous') or '', refusal}
end
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= gen then return current('conflict') end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 0 then return current('unknown') end
-- Everything that can fail (decoding) before the first write: Redis does not undo a script's writes.
local entry = nil
if ARGV[4] ~= '' then entry = cjson.decode(ARGV[4]) end
if ARGV[12] ~= '' then cjson.decode(ARGV[12]) end
gen = gen + 1
redis.call('HSET', KEYS[1], 'active', ARGV[2], 'generation', gen, 'changed_at', ARGV[7])
redis.call('HDEL', KEYS[1], 'candidate', 'weight', 'sticky')
if ARGV[12] ~= '' then redis.call('SET', KEYS[5], ARGV[12]) end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], 'previous') else redis.call('HSET', KEYS[1], 'previous', ARGV[3]) end
if entry ~= nil then
  entry['generation'] = gen
  redis.call('LPUSH', KEYS[3], cjson.encode(entry))
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
end
redis.call('PUBLISH', ARGV[6], ARGV[8] .. gen .. ARGV[9])
return {1, gen, ARGV[2], ARGV[3], ''}
"""

# KEYS: route, history. ARGV: expected generation, new generation, history entry JSON or '', history bound,
# events channel, now, route event head and tail. Returns 1 when applied.
_LIFT = _HISTORY + """
if tonumber(redis.call('HGET', KEYS[1], 'generation') or '0') ~= tonumber(ARGV[1]) then return 0 end
local entry = nil
if ARGV[3] ~= '' then entry = cjson.decode(ARGV[3]) end
redis.call('HSET', KEYS[1], 'generation', ARGV[2], 'changed_at', ARGV[6])
if entry ~= nil then
  entry['generation'] = tonumber(ARGV[2])
  record(KEYS[2], cjson.encode(entry), ARGV[4])
end
redis.call('PUBLISH', ARGV[5], ARGV[7] .. ARGV[2] .. ARGV[8])
return 1
"""

# KEYS: deployments, record, history, services. ARGV: name, record fields JSON, channel, message,
# history entry, bound, service, legacy service.
_CREATE = _EXISTS + _HISTORY + """
if not exists(KEYS[4], ARGV[7], ARGV[8]) then return 0 end
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end
local fields = cjson.decode(ARGV[2])
redis.call('DEL', KEYS[2])
for k, v in pairs(fields) do redis.call('HSET', KEYS[2], k, v) end
redis.call('SADD', KEYS[1], ARGV[1])
record(KEYS[3], ARGV[5], ARGV[6])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# KEYS: record, the replica's lease, history. ARGV: owner or '', changes JSON (null = remove), channel,
# message, history entry, bound, expected field values JSON or '' (null = absent).
_UPDATE = _HISTORY + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[7] ~= '' then
  for k, v in pairs(cjson.decode(ARGV[7])) do
    local current = redis.call('HGET', KEYS[1], k)
    if v == cjson.null then
      if current then return -1 end
    elseif current ~= v then return -1 end
  end
end
local changes = cjson.decode(ARGV[2])
for k, v in pairs(changes) do
  if v == cjson.null then redis.call('HDEL', KEYS[1], k) else redis.call('HSET', KEYS[1], k, v) end
end
record(KEYS[3], ARGV[5], ARGV[6])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# KEYS: route, deployments, history, services, plan. ARGV: expected generation or '', expected plan
# revision or '' (0: no plan), route change ('split', 'unsplit' or 'keep'), candidate, weight, sticky
# header or '', the plan's new JSON or '' (unchanged), history entry or '', bound, channel, now, route
# event head and tail, service, legacy service, service event message, shadow change ('' none, 'set',
# 'clear'), shadow deployment, shadow percent. A split's weight changes the
# generation (every gateway applies the same split for the same generation) but not changed_at (the
# active deployment's bake period and guard window go on). Returns {applied 0/1, generation, refusal}.
_ROLLOUT = _EXISTS + """
if not exists(KEYS[4], ARGV[14], ARGV[15]) then return {0, 0, 'no_service'} end
local gen = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= gen then return {0, gen, 'conflict'} end
if ARGV[2] ~= '' then
  local raw = redis.call('GET', KEYS[5])
  local revision = 0
  if raw then revision = tonumber(cjson.decode(raw)['revision'] or 0) end
  if revision ~= tonumber(ARGV[2]) then return {0, gen, 'plan_conflict'} end
end
if ARGV[3] == 'split' and redis.call('SISMEMBER', KEYS[2], ARGV[4]) == 0 then return {0, gen, 'unknown'} end
if ARGV[17] == 'set' and redis.call('SISMEMBER', KEYS[2], ARGV[18]) == 0 then return {0, gen, 'unknown'} end
local entry = nil
if ARGV[8] ~= '' then entry = cjson.decode(ARGV[8]) end
if ARGV[7] ~= '' then cjson.decode(ARGV[7]) end
if ARGV[3] ~= 'keep' then
  gen = gen + 1
  redis.call('HSET', KEYS[1], 'generation', gen)
  if ARGV[3] == 'split' then
    redis.call('HSET', KEYS[1], 'candidate', ARGV[4], 'weight', ARGV[5])
    if ARGV[6] == '' then redis.call('HDEL', KEYS[1], 'sticky') else redis.call('HSET', KEYS[1], 'sticky', ARGV[6]) end
  else
    redis.call('HDEL', KEYS[1], 'candidate', 'weight', 'sticky')
  end
end
if ARGV[7] ~= '' then redis.call('SET', KEYS[5], ARGV[7]) end
if ARGV[17] == 'set' then redis.call('HSET', KEYS[1], 'shadow', ARGV[18], 'shadow_percent', ARGV[19]) end
if ARGV[17] == 'clear' then redis.call('HDEL', KEYS[1], 'shadow', 'shadow_percent') end
if entry ~= nil then
  entry['generation'] = gen
  redis.call('LPUSH', KEYS[3], cjson.encode(entry))
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[9]) - 1)
end
if ARGV[3] ~= 'keep' then
  redis.call('PUBLISH', ARGV[10], ARGV[12] .. gen .. ARGV[13])
else
  redis.call('PUBLISH', ARGV[10], ARGV[16])
end
return {1, gen, ''}
"""

# KEYS: route, deployments, record, lease, history. ARGV: name, force '1'/'0', channel, message,
# history entry, bound. Deleting the previous deployment (forced) clears previous; the active one stays
# named in the route (the gateway answers 503 for it) until an operator switches.
_DELETE = _HISTORY + _REPLICAS + """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then return 'unknown' end
local active = redis.call('HGET', KEYS[1], 'active')
local previous = redis.call('HGET', KEYS[1], 'previous')
local candidate = redis.call('HGET', KEYS[1], 'candidate')
if ARGV[2] ~= '1' then
  if active == ARGV[1] then return 'active' end
  if previous == ARGV[1] then return 'previous' end
  if candidate == ARGV[1] then return 'candidate' end
  if redis.call('HGET', KEYS[1], 'shadow') == ARGV[1] then return 'shadow' end
end
if candidate == ARGV[1] then redis.call('HDEL', KEYS[1], 'candidate', 'weight', 'sticky') end
if redis.call('HGET', KEYS[1], 'shadow') == ARGV[1] then redis.call('HDEL', KEYS[1], 'shadow', 'shadow_percent') end
if previous == ARGV[1] then redis.call('HDEL', KEYS[1], 'previous') end
for _, index in ipairs(replica_indices(redis.call('HGETALL', KEYS[3]))) do redis.call('DEL', KEYS[4] .. '#' .. index) end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('SREM', KEYS[2], ARGV[1])
record(KEYS[5], ARGV[5], ARGV[6])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return ''
"""

# KEYS: services, config, history. ARGV: name, config fields JSON, channel, message, history entry,
# bound, legacy service.
_CREATE_SERVICE = _HISTORY + """
if ARGV[1] == ARGV[7] or redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end
local fields = cjson.decode(ARGV[2])
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
for k, v in pairs(fields) do redis.call('HSET', KEYS[2], k, v) end
record(KEYS[3], ARGV[5], ARGV[6])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# KEYS: services, route, deployments, config, history, guard, history to record in, plan. ARGV: name, force,
# channel, message, deployment prefix, lease prefix, legacy service, history entry, bound.
_DELETE_SERVICE = _HISTORY + _REPLICAS + """
if ARGV[1] == ARGV[7] then return 'default' end
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 'unknown' end
local names = redis.call('SMEMBERS', KEYS[3])
if #names > 0 and ARGV[2] ~= '1' then return 'not_empty' end
for _, name in ipairs(names) do
  for _, index in ipairs(replica_indices(redis.call('HGETALL', ARGV[5] .. name))) do
    redis.call('DEL', ARGV[6] .. name .. '#' .. index)
  end
  redis.call('DEL', ARGV[5] .. name, ARGV[6] .. name)
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[8])
redis.call('SREM', KEYS[1], ARGV[1])
record(KEYS[7], ARGV[8], ARGV[9])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return ''
"""

# KEYS: services, config, history. ARGV: name, legacy service, changes JSON (null = remove), channel,
# message, history entry, bound.
_SET_CONFIG = _EXISTS + _HISTORY + """
if not exists(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
local changes = cjson.decode(ARGV[3])
for k, v in pairs(changes) do
  if v == cjson.null then redis.call('HDEL', KEYS[2], k) else redis.call('HSET', KEYS[2], k, v) end
end
record(KEYS[3], ARGV[6], ARGV[7])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# KEYS: lease, record. ARGV: owner, ttl ms, channel, message, changes JSON or ''. Publishes only when the
# deployment becomes live; a lease newly taken also applies the changes to the record (a new owner's
# replica is not the ready server the last owner reported, in the same step).
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if not holder then
  if ARGV[5] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then
    for k, v in pairs(cjson.decode(ARGV[5])) do
      if v == cjson.null then redis.call('HDEL', KEYS[2], k) else redis.call('HSET', KEYS[2], k, v) end
    end
  end
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
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
    except StoreUnavailable:
        raise  # already said (a ConnectionError, hence an OSError: it would lose what it says otherwise)
    except kinds as exc:
        if task is not None and task.cancelling():
            raise asyncio.CancelledError() from exc
        raise StoreUnavailable(_brief(exc)) from exc
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


def _brief(exc: BaseException) -> str:
    """What went wrong, in a line: redis-py's "no master found" lists every sentinel's client repr."""
    if isinstance(exc, MasterNotFoundError):
        return str(exc).split(" : ", 1)[0] + " (no sentinel named a reachable primary)"
    return str(exc) or type(exc).__name__


def _before_sending(exc: BaseException) -> bool:
    """Whether a connection error happened before a command could reach Redis (no connection was made)."""
    text = str(exc)
    return isinstance(exc, MasterNotFoundError) or "connecting to" in text or "No connection available" in text


def _unavailable_on_connection_errors() -> contextlib.AbstractContextManager[None]:
    """redis-py's connection failures mean the store is unavailable; so does a primary demoted to a
    read-only replica in a failover (until the client finds the new one)."""
    return _unavailable_on(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                           redis.exceptions.ReadOnlyError, OSError)


def _json(value: Any) -> str:
    """JSON for a script to decode: lone surrogates (undecodable bytes in a header, say, as aiohttp and
    json.loads carry them) become U+FFFD, which Lua's cjson can decode."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "replace").decode("utf-8")


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def _snapshot(service: str, raw_route: list[Any], raw_deps: list[Any], raw_config: list[Any],
              raw_plan: str | None = None) -> Snapshot:
    """A service's snapshot from what the read scripts return."""
    route = Route.from_fields(_pairs(raw_route))
    deployments: dict[str, Deployment] = {}
    live: set[str] = set()
    for name, record, is_live, *others in raw_deps:
        if not record:
            continue
        dep = Deployment.from_fields({**_pairs(record), "name": name})
        deployments[name] = dep
        if is_live or dep.external:
            live.add(name)
        for index in others[0] if others else ():
            live.add(replica_key(name, int(index)))
    return Snapshot(route=route, deployments=MappingProxyType(deployments), live=frozenset(live), service=service,
                    config=ServiceConfig.from_fields(_pairs(raw_config)), plan=Plan.from_json(raw_plan or None))


# How long a change's answer is kept for a resend of the same change (redis-py resends a command whose
# connection broke, after reconnecting; a failover takes seconds).
_CHANGE_MEMORY_MS = 60_000


def _once(script: str) -> str:
    """A changing script made safe to run twice: its last KEYS entry names where its answer is kept, and a
    second run with the same key returns that answer instead of changing anything again. redis-py resends
    a command when the connection breaks before the answer arrives (a primary demoted in a failover drops
    its clients); run twice, a switch would answer "conflict" to itself and a create "already exists"."""
    return (
        "local change_key = KEYS[#KEYS]\n"
        "local done = redis.call('GET', change_key)\n"
        "if done then return cjson.decode(done) end\n"
        "local function change()\n" + script + "\nend\n"
        "local answer = change()\n"
        f"redis.call('SET', change_key, cjson.encode(answer), 'PX', {_CHANGE_MEMORY_MS})\n"
        "return answer\n"
    )


class RedisStore(Store):
    """Services, routes, deployments, leases and histories in Redis, changes announced on one pub/sub channel."""

    def __init__(self, client: aioredis.Redis, namespace: str, history_max: int = DEFAULT_HISTORY_MAX) -> None:
        self.client = client
        self.keys = Keys(namespace)
        self.history_max = history_max
        self.wait_timeout = 0.0
        self._followed = 0.0
        register = client.register_script
        self._snapshot, self._read_all = register(_SNAPSHOT), register(_READ_ALL)
        # Every script run through _change (it appends the key its answer is kept under).
        once = [register(_once(text)) for text in (_SET_ROUTE, _CREATE, _UPDATE, _DELETE, _ROLLOUT, _LIFT,
                                                   _CREATE_SERVICE, _DELETE_SERVICE, _SET_CONFIG)]
        (self._set_route, self._create, self._update, self._delete, self._rollout, self._lift,
         self._create_service, self._delete_service, self._set_config) = once
        self._claim, self._release, self._hold_role = register(_CLAIM), register(_RELEASE), register(_HOLD_ROLE)

    @classmethod
    def from_url(cls, url: str, namespace: str, history_max: int = DEFAULT_HISTORY_MAX,
                 wait_timeout: float = DEFAULT_WAIT_TIMEOUT) -> RedisStore:
        """A store for any of Turnout's Redis URL forms (see ``connect``). On a Sentinel-managed primary,
        each change waits up to ``wait_timeout`` seconds for a replica to acknowledge it (0: no wait)."""
        store = cls(redis_client(url), namespace, history_max)
        if is_sentinel(url):
            store.wait_timeout = wait_timeout
        return store

    async def _follow_primary(self) -> None:
        """Behind Sentinel, ask the sentinels which server is the primary before a change or a poll. redis-py
        asks only when it opens a connection, so after a planned failover its pooled connections keep
        writing to the old primary, which accepts writes until the sentinels demote it (seconds later) and
        then loses them; when the answer moved, idle connections are dropped and the next command goes to
        the new primary."""
        pool = self.client.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            self._followed = time.monotonic()
            with _unavailable_on_connection_errors():
                await pool.get_master_address()

    async def _follow_primary_lately(self) -> None:
        """``_follow_primary`` at most once a second, for frequent writes (leases, counters): a worker's
        lease renewals written to a demoted primary are lost, and its deployments go unhealthy."""
        if time.monotonic() - self._followed >= 1.0:
            await self._follow_primary()

    async def _change(self, script: Any, keys: list[str], args: list[Any], wait: bool = True) -> Any:
        """Run a changing script; with replicas to wait for (and ``wait``), WAIT on the same connection and
        note the answer for the admin API (Sentinel replication is asynchronous: an acknowledged change that
        no replica holds is lost if the primary dies now)."""
        await self._follow_primary()
        keys = [*keys, self.keys.change(uuid.uuid4().hex)]
        try:
            if not self.wait_timeout or not wait:
                return await script(keys=keys, args=args)
            async with self.client.pipeline(transaction=False) as pipe:
                await script(keys=keys, args=args, client=pipe)
                pipe.execute_command("WAIT", 1, max(1, int(self.wait_timeout * 1000)))
                result, acks = await pipe.execute()
        except redis.exceptions.ResponseError as exc:
            # A change that wrote nothing (a refusal) on a primary demoted a moment ago, then WAIT there.
            if "replica" not in str(exc).lower():
                raise
            raise StoreUnavailable("the Redis primary changed during the change (a failover)") from exc
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            if _before_sending(exc):
                raise  # the callers' _unavailable_on_connection_errors: certain that nothing was changed
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError() from exc
            raise StoreUnavailable(f"{_brief(exc)}; the change was sent but its answer was lost, so it may have "
                                   "been made: read the route or the history before retrying",
                                   uncertain=True) from exc
        note_replicated(int(acks) >= 1)
        return result

    def _sk(self, service: str) -> ServiceKeys:
        return self.keys.service(service)

    def _history_args(self, history: HistoryEntry | None) -> list[str]:
        return [_json(history.to_json()) if history is not None else "", str(self.history_max)]

    async def ping(self) -> None:
        with _unavailable_on_connection_errors():
            await self.client.ping()

    # --- services ---------------------------------------------------------------------------
    async def list_services(self) -> list[str]:
        with _unavailable_on_connection_errors():
            names = await self.client.smembers(self.keys.services)
        return sorted({*names, LEGACY_SERVICE})

    async def service_exists(self, name: str) -> bool:
        if name == LEGACY_SERVICE:
            return True
        with _unavailable_on_connection_errors():
            return bool(await self.client.sismember(self.keys.services, name))

    async def create_service(self, name: str, config: ServiceConfig, *, history: HistoryEntry | None = None) -> bool:
        sk = self._sk(name)
        with _unavailable_on_connection_errors():
            created = await self._change(self._create_service,
                keys=[self.keys.services, sk.config, sk.history],
                args=[name, json.dumps(config.to_fields()), self.keys.events, encode_event(SERVICE_CHANGED, service=name),
                      *self._history_args(history), LEGACY_SERVICE],
            )
        return bool(created)

    async def delete_service(self, name: str, *, force: bool = False, history: HistoryEntry | None = None,
                             history_service: str = DEFAULT_SERVICE) -> str | None:
        sk = self._sk(name)
        with _unavailable_on_connection_errors():
            refusal = await self._change(self._delete_service,
                keys=[self.keys.services, sk.route, sk.deployments, sk.config, sk.history, sk.guard,
                      self._sk(history_service).history, sk.plan],
                args=[name, "1" if force else "0", self.keys.events, encode_event(SERVICE_CHANGED, service=name),
                      sk.deployment_prefix, sk.lease_prefix, LEGACY_SERVICE, *self._history_args(history)],
            )
        return refusal or None

    async def set_service_config(self, name: str, overrides: Mapping[str, Any | None], *,
                                 history: HistoryEntry | None = None) -> bool:
        changes = {k: (None if v is None else json.dumps(v)) for k, v in overrides.items()}
        sk = self._sk(name)
        with _unavailable_on_connection_errors():
            applied = await self._change(self._set_config,
                keys=[self.keys.services, sk.config, sk.history],
                args=[name, LEGACY_SERVICE, json.dumps(changes), self.keys.events, encode_event(SERVICE_CHANGED, service=name),
                      *self._history_args(history)],
            )
        return bool(applied)

    async def read_all(self, known: Mapping[str, str]) -> Reading:
        # Names and fingerprints travel as one string each way (service names hold no spaces): a poll
        # of 200 unchanged services is then a few kilobytes, not 800 protocol elements to parse.
        known_arg = "\n".join(f"{service} {fingerprint}" for service, fingerprint in known.items())
        await self._follow_primary()
        with _unavailable_on_connection_errors():
            names, rows = await self._read_all(keys=[self.keys.services], args=[*self.keys.layout(), known_arg])
        changed = {service: (_snapshot(service, *data), fingerprint) for service, fingerprint, data in rows}
        return Reading(frozenset(names.split()), MappingProxyType(changed))

    # --- one service ------------------------------------------------------------------------
    async def read_snapshot(self, *, service: str = DEFAULT_SERVICE) -> Snapshot:
        sk = self._sk(service)
        await self._follow_primary_lately()
        with _unavailable_on_connection_errors():
            raw = await self._snapshot(keys=[sk.route, sk.deployments, sk.config, sk.plan],
                                       args=[sk.deployment_prefix, sk.lease_prefix])
        return _snapshot(service, *raw)

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
        sk = self._sk(service)
        now = time.time()
        args = [
            "" if expected_generation is None else str(expected_generation),
            active,
            previous or "",
            _json(history.to_json()) if history is not None else "",
            str(self.history_max),
            self.keys.events,
            repr(now),
            *route_event_parts(service),
            service,
            LEGACY_SERVICE,
            plan.to_json() if plan is not None else "",
        ]
        with _unavailable_on_connection_errors():
            applied, gen, cur_active, cur_previous, refusal = await self._change(self._set_route,
                keys=[sk.route, sk.deployments, sk.history, self.keys.services, sk.plan], args=args
            )
        route = Route(active=cur_active or None, previous=cur_previous or None, generation=int(gen),
                      changed_at=now if applied else 0.0)
        return RouteChange(bool(applied), route, refusal or None)

    async def lift_generation(self, expected: int, floor: int, *, service: str = DEFAULT_SERVICE,
                              history: HistoryEntry | None = None) -> bool:
        if floor < expected:
            return False
        sk = self._sk(service)
        with _unavailable_on_connection_errors():
            applied = await self._change(self._lift, keys=[sk.route, sk.history], args=[
                str(expected), str(floor + 1), _json(history.to_json()) if history is not None else "",
                str(self.history_max), self.keys.events, repr(time.time()), *route_event_parts(service),
            ])
        return bool(applied)

    async def change_rollout(
        self, *, service: str = DEFAULT_SERVICE, split: tuple[str, float, str | None] | None | bool = False,
        plan: Plan | None = None, expected_generation: int | None = None, expected_revision: int | None = None,
        history: HistoryEntry | None = None, shadow: tuple[str, float] | None | bool = False,
    ) -> RouteChange:
        sk = self._sk(service)
        mode = "keep" if split is False else "unsplit" if split is None else "split"
        shadow_mode = "" if shadow is False else "clear" if shadow is None else "set"
        shadow_name, shadow_percent = shadow if isinstance(shadow, tuple) else ("", 0.0)
        candidate, weight, sticky = split if isinstance(split, tuple) else ("", 0.0, None)
        args = [
            "" if expected_generation is None else str(expected_generation),
            "" if expected_revision is None else str(expected_revision),
            mode, candidate, repr(float(weight)), sticky or "",
            plan.to_json() if plan is not None else "",
            *self._history_args(history),
            self.keys.events, repr(time.time()), *route_event_parts(service), service, LEGACY_SERVICE,
            encode_event(SERVICE_CHANGED, service=service), shadow_mode, shadow_name, repr(float(shadow_percent)),
        ]
        with _unavailable_on_connection_errors():
            applied, gen, refusal = await self._change(self._rollout,
                keys=[sk.route, sk.deployments, sk.history, self.keys.services, sk.plan], args=args,
            )
        return RouteChange(bool(applied), Route(generation=int(gen)), refusal or None)

    def _deployment_event(self, service: str, name: str) -> str:
        return encode_event(DEPLOYMENT_CHANGED, service=service, name=name)

    async def create_deployment(
        self, deployment: Deployment, *, service: str = DEFAULT_SERVICE, history: HistoryEntry | None = None
    ) -> bool:
        name, sk = deployment.name, self._sk(service)
        with _unavailable_on_connection_errors():
            created = await self._change(self._create,
                keys=[sk.deployments, sk.deployment(name), sk.history, self.keys.services],
                args=[name, _json(deployment.to_fields()), self.keys.events, self._deployment_event(service, name),
                      *self._history_args(history), service, LEGACY_SERVICE],
            )
        return bool(created)

    async def update_deployment(
        self, name: str, *, service: str = DEFAULT_SERVICE, owner: str | None = None, replica: int = 0,
        history: HistoryEntry | None = None, expect: Mapping[str, Any] | None = None, **changes: Any
    ) -> bool | None:
        encoded = encode_changes(changes, replica)
        sk = self._sk(service)
        with _unavailable_on_connection_errors():
            updated = await self._change(self._update,
                keys=[sk.deployment(name), sk.lease(replica_key(name, replica)), sk.history],
                args=[owner or "", _json(encoded), self.keys.events, self._deployment_event(service, name),
                      *self._history_args(history), _json(encode_changes(expect, replica)) if expect is not None else ""],
                # A worker's own state reports (owner given) repeat every health check: not worth a wait each.
                wait=owner is None,
            )
        return None if updated == -1 else bool(updated)

    async def delete_deployment(
        self, name: str, *, service: str = DEFAULT_SERVICE, force: bool = False, history: HistoryEntry | None = None
    ) -> str | None:
        sk = self._sk(service)
        with _unavailable_on_connection_errors():
            refusal = await self._change(self._delete,
                keys=[sk.route, sk.deployments, sk.deployment(name), sk.lease(name), sk.history],
                args=[name, "1" if force else "0", self.keys.events, self._deployment_event(service, name),
                      *self._history_args(history)],
            )
        return refusal or None

    async def claim(self, name: str, owner: str, ttl: float, *, service: str = DEFAULT_SERVICE, replica: int = 0,
                    taking: Mapping[str, Any] | None = None) -> bool:
        sk = self._sk(service)
        await self._follow_primary_lately()
        with _unavailable_on_connection_errors():
            ok = await self._claim(
                keys=[sk.lease(replica_key(name, replica)), sk.deployment(name)],
                args=[owner, str(max(1, int(ttl * 1000))), self.keys.events, self._deployment_event(service, name),
                      _json(encode_changes(taking, replica)) if taking else ""],
            )
        return bool(ok)

    async def release(self, name: str, owner: str, *, service: str = DEFAULT_SERVICE, replica: int = 0) -> None:
        with _unavailable_on_connection_errors():
            await self._release(
                keys=[self._sk(service).lease(replica_key(name, replica))], args=[owner, self.keys.events, self._deployment_event(service, name)]
            )

    async def append_history(self, entry: HistoryEntry, *, service: str = DEFAULT_SERVICE) -> None:
        key = self._sk(service).history
        with _unavailable_on_connection_errors():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.lpush(key, _json(entry.to_json()))
                pipe.ltrim(key, 0, self.history_max - 1)
                await pipe.execute()

    async def read_history(
        self, offset: int = 0, limit: int = 50, *, service: str = DEFAULT_SERVICE
    ) -> tuple[list[HistoryEntry], int]:
        key = self._sk(service).history
        with _unavailable_on_connection_errors():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.lrange(key, offset, offset + limit - 1)
                pipe.llen(key)
                raw, total = await pipe.execute()
        return [HistoryEntry.from_json(json.loads(item)) for item in raw], int(total)

    async def add_stats(self, pending: StatsRows, ttl: int = 180) -> None:
        await self._follow_primary_lately()
        with _unavailable_on_connection_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                for (service, deployment), per in pending.items():
                    sk = self._sk(service)
                    for second, row in per.items():
                        key = sk.stats(deployment, second)
                        for column, count in row.items():
                            if count:
                                pipe.hincrby(key, str(column), count)
                        pipe.expire(key, ttl)
                await pipe.execute()

    async def read_stats(
        self, deployment: str, first_second: int, last_second: int, *, service: str = DEFAULT_SERVICE
    ) -> dict[int, int]:
        sk = self._sk(service)
        with _unavailable_on_connection_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                for second in range(first_second, last_second + 1):
                    pipe.hgetall(sk.stats(deployment, second))
                rows = await pipe.execute()
        total: dict[int, int] = {}
        for row in rows:
            for column, count in row.items():
                if column.isdigit() and count.lstrip("-").isdigit():
                    total[int(column)] = total.get(int(column), 0) + int(count)
        return total

    async def get_guard(self, *, service: str = DEFAULT_SERVICE) -> dict[str, str]:
        with _unavailable_on_connection_errors():
            return await self.client.hgetall(self._sk(service).guard)

    async def set_guard(self, *, service: str = DEFAULT_SERVICE, **fields: str | None) -> None:
        key = self._sk(service).guard
        with _unavailable_on_connection_errors():
            async with self.client.pipeline(transaction=True) as pipe:
                to_set = {k: v for k, v in fields.items() if v is not None}
                if to_set:
                    pipe.hset(key, mapping=to_set)
                to_delete = [k for k, v in fields.items() if v is None]
                if to_delete:
                    pipe.hdel(key, *to_delete)
                await pipe.execute()

    # --- the whole namespace ----------------------------------------------------------------
    async def hold_role(self, role: str, owner: str, ttl: float) -> bool:
        await self._follow_primary_lately()
        with _unavailable_on_connection_errors():
            return bool(await self._hold_role(keys=[self.keys.lease_of(role)], args=[owner, str(max(1, int(ttl * 1000)))]))

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
                pool = self.client.connection_pool
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        if isinstance(pool, SentinelConnectionPool) and pubsub.connection is not None \
                                and pool.master_address not in (None, (pubsub.connection.host, pubsub.connection.port)):
                            # A poll learned the primary moved: subscribe there (the watcher then re-reads all),
                            # not on the old one, which may stay up as a replica and hear nothing more.
                            raise redis.exceptions.ConnectionError("the Redis primary moved (Sentinel failover)")
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
        pool = self.client.connection_pool
        await pool.disconnect()
        sentinels = getattr(pool, "sentinel_manager", None)
        if sentinels is not None:
            await sentinels.aclose()


async def drop_namespace(url: str, namespace: str) -> None:
    """Delete every key of ``namespace`` on the Redis at ``url`` (tests, benchmarks and the demo clean up so)."""
    store = RedisStore.from_url(url, namespace)
    try:
        await store.drop_namespace()
    finally:
        await store.close()

"""Redis clients from Turnout's URL forms: ``redis://`` / ``rediss://`` / ``unix://`` for one server, and
``redis+sentinel://`` for a Sentinel-managed primary.

The Sentinel form lists the sentinels, then the master's name and the database::

    redis+sentinel://[[user]:password@]host1:26379,host2:26379/mymaster[/db][?option=value...]

The user and password are the data servers' (the primary and its replicas); options:
``sentinel_username`` and ``sentinel_password`` (when the sentinels require their own), ``ssl=true``
(TLS to the data servers). Sentinels default to port 26379.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
_SENTINEL_OPTIONS = {"sentinel_username", "sentinel_password", "ssl"}


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    ssl: bool = False


def is_sentinel(url: str) -> bool:
    """Whether a Redis URL names a Sentinel-managed primary."""
    return url.lower().startswith(SENTINEL_SCHEME + "://")


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse a ``redis+sentinel://`` URL; ValueError says what is wrong with it (never echoing a password)."""
    parts = urlsplit(url)
    if parts.scheme.lower() != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    sentinels = []
    items = hosts.split(",")
    for number, item in enumerate(items, 1):
        try:
            sentinels.append(_host_port(item.strip()))
        except ValueError as exc:
            # Never the text itself: a password holding "/", "?" or "#" ends the host list early, and its
            # first part would then be shown as a host.
            hint = (" (a password holding / ? # @ or : must be percent-encoded: %2F %3F %23 %40 %3A)"
                    if "@" in url else "")
            raise ValueError(f"sentinel {number} of {len(items)} {exc}{hint}") from None
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(f"{SENTINEL_SCHEME}:// URL needs /MASTER_NAME[/DB] after the sentinels, e.g. "
                         f"{SENTINEL_SCHEME}://host1:26379,host2:26379/mymaster/0")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ValueError(f"the database in a {SENTINEL_SCHEME}:// URL must be a number, got {path[1]!r}")
        db = int(path[1])
    # Not parse_qs: it reads "+" as a space, and a password may hold a "+".
    one = {}
    for item in filter(None, parts.query.split("&")):
        key, _, value = item.partition("=")
        one[unquote(key)] = unquote(value)
    unknown = sorted(set(one) - _SENTINEL_OPTIONS)
    if unknown:
        raise ValueError(f"unknown {SENTINEL_SCHEME}:// URL option(s): {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(_SENTINEL_OPTIONS))})")
    ssl = one.get("ssl", "false").lower()
    if ssl not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"ssl in a {SENTINEL_SCHEME}:// URL must be true or false, got {ssl!r}")
    return SentinelURL(
        sentinels=tuple(sentinels), master=path[0], db=db, username=username, password=password,
        sentinel_username=one.get("sentinel_username") or None, sentinel_password=one.get("sentinel_password") or None,
        ssl=ssl in ("true", "1", "yes"),
    )


def _host_port(item: str) -> tuple[str, int]:
    if not item:
        raise ValueError("is empty (sentinels are HOST[:PORT], comma-separated)")
    if item.startswith("["):  # [IPv6]:port
        host, closed, rest = item[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError("is not [IPv6-ADDRESS]:PORT")
        port_text = rest[1:]
    else:
        host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError("has no host")
    if not port_text and not item.endswith(":"):
        return unquote(host), SENTINEL_PORT
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError("has an invalid port (1-65535)")
    return unquote(host), int(port_text)


def check_url(url: str) -> None:
    """Raise ValueError when a Redis URL cannot be used (checked at start-up, not at the first command)."""
    if is_sentinel(url):
        parse_sentinel_url(url)
        return
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"a Redis URL starts with redis://, rediss://, unix:// or {SENTINEL_SCHEME}://, got {scheme or 'no scheme'}://")


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel discovery with the blocking pool's manners: a burst waits for a free connection (up to
    ``timeout``) instead of failing at ``max_connections``."""

    async def release(self, connection: Any) -> None:
        """A connection to a server that is no longer the primary is closed on its way back to the pool
        (redis-py closes only the idle ones when it learns of a failover; one busy then would go on
        writing to the old primary, which accepts writes until the sentinels demote it, then loses them)."""
        if self.master_address is not None and (connection.host, connection.port) != self.master_address:
            await connection.disconnect()
        await super().release(connection)


# What every Turnout connection uses: short deadlines (a store that does not answer in 2 s is down, and
# the data plane is fail-static meanwhile), a few quick retries and a periodic health check.
_CONNECTION = dict(
    decode_responses=True,
    socket_connect_timeout=2,
    socket_timeout=2,
    health_check_interval=10,
    # The asyncio Retry: the sync one silently does nothing here (redis-py #2179).
    retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
)
_POOL: dict[str, Any] = dict(max_connections=32, timeout=2)


def redis_client(url: str) -> aioredis.Redis:
    """A client for any of Turnout's Redis URL forms, on a blocking pool (waits for a free connection)."""
    if not is_sentinel(url):
        return aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(url, **_POOL, **_CONNECTION))
    parsed = parse_sentinel_url(url)
    sentinel = Sentinel(
        list(parsed.sentinels),
        # One try per sentinel, half a second each: redis-py's default retries (with back-off) made a
        # stalled sentinel cost 15 s per question, and the next sentinel is the retry.
        sentinel_kwargs={"username": parsed.sentinel_username, "password": parsed.sentinel_password,
                         "socket_connect_timeout": 0.5, "socket_timeout": 0.5, "decode_responses": True,
                         "retry": Retry(NoBackoff(), 0)},
    )
    return sentinel.master_for(
        parsed.master, redis_class=aioredis.Redis, connection_pool_class=_BlockingSentinelPool,
        db=parsed.db, username=parsed.username, password=parsed.password, ssl=parsed.ssl,
        # After a failover the first connection to the new primary proves itself with a PING.
        check_connection=True, **_POOL, **_CONNECTION,
    )

"""Where Turnout's state lives: the :class:`Store` interface, the embedded store and the Redis store."""

from __future__ import annotations

from ..settings import Settings
from .base import DEFAULT_HISTORY_MAX, RouteChange, Store, StoreUnavailable, replication_notes
from .embedded import EmbeddedStore
from .redis_store import RedisStore, drop_namespace

__all__ = ["DEFAULT_HISTORY_MAX", "EmbeddedStore", "RedisStore", "RouteChange", "Store", "StoreUnavailable", "create_store", "drop_namespace",
           "replication_notes"]


def create_store(settings: Settings) -> Store:
    """Redis when a URL is configured, the embedded store otherwise."""
    if settings.redis_url:
        return RedisStore.from_url(settings.redis_url, settings.namespace, settings.history_max, settings.redis_wait_timeout)
    return EmbeddedStore(settings.history_max)

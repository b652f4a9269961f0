"""Stores: one Protocol each (``base``), backends in memory, Redis and SQL, opened from URLs.

The factories are the one place a URL picks a backend::

    registry = open_registry_store("sqlite:///.aegis/aegis.db")   # or postgresql+psycopg://...
    keys = open_key_store("postgresql+psycopg://aegis@db:5432/aegis")
    replay = open_replay_store("redis://cache:6379/0", clock=clock, prefix="aegis:")
    revocation = open_revocation_store("memory://", clock=clock)

The SQL factories migrate the database to the newest revision first. A URL of any other kind is a
``ConfigError`` naming the setting; an unreachable database is ``Unavailable`` with the store's code.
"""

from __future__ import annotations

from aegis.clock import Clock
from aegis.errors import ConfigError
from aegis.stores.base import KeyStore, RegistryStore, ReplayStore, RevocationStore
from aegis.stores.memory import MemoryReplayStore, MemoryRevocationStore
from aegis.stores.redis import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    RedisReplayStore,
    RedisRevocationStore,
)
from aegis.stores.sql.keys import SqlKeyStore
from aegis.stores.sql.migrate import upgrade as _upgrade
from aegis.stores.sql.registry import SqlRegistryStore

__all__ = [
    "KeyStore",
    "MemoryReplayStore",
    "MemoryRevocationStore",
    "RedisReplayStore",
    "RedisRevocationStore",
    "RegistryStore",
    "ReplayStore",
    "RevocationStore",
    "SqlKeyStore",
    "SqlRegistryStore",
    "open_key_store",
    "open_registry_store",
    "open_replay_store",
    "open_revocation_store",
]

#: What selects an in-process store; ``memory://`` is the spelling the configuration uses.
_MEMORY = ("memory", "memory://")
_REDIS = ("redis://", "rediss://", "unix://")


def open_registry_store(sql_url: str) -> SqlRegistryStore:
    """Open (and migrate) the registry database."""
    _upgrade(sql_url)
    return SqlRegistryStore(sql_url)


def open_key_store(sql_url: str) -> SqlKeyStore:
    """Open (and migrate) the database that holds the signing keys."""
    _upgrade(sql_url, code="key_store_unavailable")
    return SqlKeyStore(sql_url)


def open_replay_store(
    url: str,
    *,
    clock: Clock,
    prefix: str = "aegis:",
    timeout: float = DEFAULT_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> ReplayStore:
    """``memory://`` (one process) or ``redis://HOST:PORT/DB`` (shared by every replica); the
    timeouts bound each Redis reply and connect (``stores.redis_timeout``, ``..._connect_timeout``)."""
    if url in _MEMORY:
        return MemoryReplayStore(clock)
    if url.startswith(_REDIS):
        return RedisReplayStore.from_url(
            url, clock=clock, prefix=prefix, timeout=timeout, connect_timeout=connect_timeout
        )
    raise ConfigError("stores.replay: use memory:// or redis://HOST:PORT/DB", key="stores.replay")


def open_revocation_store(
    url: str,
    *,
    clock: Clock,
    prefix: str = "aegis:",
    timeout: float = DEFAULT_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> RevocationStore:
    """``memory://`` (one process) or ``redis://HOST:PORT/DB`` (shared by every replica); the
    timeouts as for :func:`open_replay_store`."""
    if url in _MEMORY:
        return MemoryRevocationStore(clock)
    if url.startswith(_REDIS):
        return RedisRevocationStore.from_url(
            url, clock=clock, prefix=prefix, timeout=timeout, connect_timeout=connect_timeout
        )
    raise ConfigError(
        "stores.revocation: use memory:// or redis://HOST:PORT/DB", key="stores.revocation"
    )

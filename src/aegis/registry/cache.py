"""A short-lived read cache of registry records for the hot path (token endpoint, gateway).

Entries live ``ttl`` seconds (default 0.25 s), so a suspension written by any process, on any
replica, is seen everywhere within that bound without a notification channel. Misses always read
the store (nothing negative is cached), so a newly registered agent is usable at once. A store
failure is never hidden: it propagates as ``Unavailable`` and the caller fails closed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from aegis.clock import Clock
from aegis.stores.base import RegistryStore
from aegis.types import Agent, Client, Tenant

__all__ = ["RegistryCache"]

T = TypeVar("T")
_MAX_ENTRIES = 100_000


class RegistryCache:
    def __init__(self, store: RegistryStore, *, clock: Clock, ttl: float = 0.25) -> None:
        self._store = store
        self._clock = clock
        self._ttl = ttl
        self._agents: dict[str, tuple[float, Agent]] = {}
        self._clients: dict[str, tuple[float, Client]] = {}
        self._tenants: dict[str, tuple[float, Tenant]] = {}

    def _get(self, table: dict[str, tuple[float, T]], key: str, load: Callable[[str], T]) -> T:
        now = self._clock.monotonic()
        hit = table.get(key)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        value = load(key)  # NotFound and Unavailable propagate
        if len(table) >= _MAX_ENTRIES:
            table.clear()
        table[key] = (now, value)
        return value

    def agent(self, agent_id: str) -> Agent:
        return self._get(self._agents, agent_id, self._store.get_agent)

    def client(self, client_id: str) -> Client:
        return self._get(self._clients, client_id, self._store.get_client)

    def tenant(self, tenant_id: str) -> Tenant:
        return self._get(self._tenants, tenant_id, self._store.get_tenant)

    def invalidate(self) -> None:
        """Forget everything (this process just wrote to the registry)."""
        self._agents.clear()
        self._clients.clear()
        self._tenants.clear()

"""A short-lived read cache of registry records for the hot path (token endpoint, gateway).

Entries live ``ttl`` seconds (default 0.25 s), so a suspension written by any process, on any
replica, is seen everywhere within that bound without a notification channel. Misses always read
the store (nothing negative is cached), so a newly registered agent is usable at once. A store
failure is never hidden: it propagates as ``Unavailable`` and the caller fails closed.

On an event loop, use the ``*_async`` readers: a miss is read on the cache's own reader threads, so
a slow or stalled database (a PostgreSQL round trip, a lock, a host gone) holds only the calls that
need that record, never the loop and every other call on it. Concurrent misses for one record
share one read, unless it began more than ``ttl`` before the caller came (then the caller starts
another: a slow read must not hand out a record older than an entry may be); a caller waits at
most :data:`READ_BUDGET` seconds and then fails closed with ``registry_unavailable``, while the
read goes on and fills the cache if it completes. An entry's age counts from when its read
began, and a read that began before :meth:`invalidate` is not cached.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

from aegis.clock import Clock
from aegis.errors import Unavailable
from aegis.stores.base import RegistryStore
from aegis.types import Agent, Client, Tenant

__all__ = ["READ_BUDGET", "RegistryCache"]

T = TypeVar("T")
_MAX_ENTRIES = 100_000
#: Seconds an ``*_async`` caller waits for a registry read before it fails closed (the store's
#: own bound, PostgreSQL's statement timeout of 2 s, plus a margin for a queue of reads).
READ_BUDGET: Final = 3.0
#: Reader threads per cache: as many records read at once while the store is slow.
_READERS: Final = 4


class RegistryCache:
    def __init__(self, store: RegistryStore, *, clock: Clock, ttl: float = 0.25) -> None:
        self._store = store
        self._clock = clock
        self._ttl = ttl
        self._agents: dict[str, tuple[float, Agent]] = {}
        self._clients: dict[str, tuple[float, Client]] = {}
        self._tenants: dict[str, tuple[float, Tenant]] = {}
        #: Bumped by :meth:`invalidate`: a read that began under an older generation is not kept.
        self._generation = 0
        #: Reads under way for ``*_async`` callers, by (loop, table, key, generation), with the
        #: time each began: one read per record at a time.
        self._inflight: dict[
            tuple[asyncio.AbstractEventLoop, int, str, int], tuple[float, asyncio.Future[Any]]
        ] = {}
        self._readers: ThreadPoolExecutor | None = None
        self._readers_lock = threading.Lock()

    def _put(self, table: dict[str, tuple[float, T]], key: str, born: float, value: T) -> None:
        if len(table) >= _MAX_ENTRIES:
            table.clear()
        table[key] = (born, value)

    def _get(self, table: dict[str, tuple[float, T]], key: str, load: Callable[[str], T]) -> T:
        now = self._clock.monotonic()
        hit = table.get(key)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        generation = self._generation
        value = load(key)  # NotFound and Unavailable propagate
        if generation == self._generation:
            self._put(table, key, now, value)
        return value

    async def _get_async(
        self, table: dict[str, tuple[float, T]], key: str, load: Callable[[str], T]
    ) -> T:
        born = self._clock.monotonic()
        hit = table.get(key)
        if hit is not None and born - hit[0] < self._ttl:
            return hit[1]
        loop, generation = asyncio.get_running_loop(), self._generation
        # A read begun before an invalidate() is not joined: it may predate this process's write.
        flight = (loop, id(table), key, generation)
        under_way = self._inflight.get(flight)
        # A read that began more than ttl before this call may have read the record before a
        # change this call must see (a suspension, on any replica): like an entry that old, it
        # is not used; a new read replaces it for later callers.
        if under_way is not None and born - under_way[0] < self._ttl:
            read = under_way[1]
        else:
            read = loop.run_in_executor(self._reader_pool(), load, key)
            entry = self._inflight[flight] = (born, read)

            def landed(done: asyncio.Future[Any]) -> None:
                if self._inflight.get(flight) is entry:
                    del self._inflight[flight]
                fine = not done.cancelled() and done.exception() is None
                if fine and generation == self._generation:
                    self._put(table, key, born, done.result())

            read.add_done_callback(landed)
        try:
            # shield: a caller that gives up (or is cancelled) leaves the read to the others.
            value: T = await asyncio.wait_for(asyncio.shield(read), READ_BUDGET)
        except TimeoutError:
            raise Unavailable(
                f"the registry did not answer within {READ_BUDGET:g} s; call refused",
                code="registry_unavailable",
            ) from None
        return value  # NotFound and Unavailable propagate from the read

    def _reader_pool(self) -> ThreadPoolExecutor:
        with self._readers_lock:
            if self._readers is None:
                self._readers = ThreadPoolExecutor(_READERS, thread_name_prefix="aegis-registry")
            return self._readers

    async def agent_async(self, agent_id: str) -> Agent:
        return await self._get_async(self._agents, agent_id, self._store.get_agent)

    async def client_async(self, client_id: str) -> Client:
        return await self._get_async(self._clients, client_id, self._store.get_client)

    async def tenant_async(self, tenant_id: str) -> Tenant:
        return await self._get_async(self._tenants, tenant_id, self._store.get_tenant)

    def agent(self, agent_id: str) -> Agent:
        return self._get(self._agents, agent_id, self._store.get_agent)

    def client(self, client_id: str) -> Client:
        return self._get(self._clients, client_id, self._store.get_client)

    def tenant(self, tenant_id: str) -> Tenant:
        return self._get(self._tenants, tenant_id, self._store.get_tenant)

    def agent_from_store(self, agent_id: str) -> Agent:
        """The agent as the store holds it now, past any cached copy (for a check that must see
        a change committed a moment ago)."""
        return self._store.get_agent(agent_id)

    def tenant_from_store(self, tenant_id: str) -> Tenant:
        """The tenant as the store holds it now (see :meth:`agent_from_store`)."""
        return self._store.get_tenant(tenant_id)

    def client_from_store(self, client_id: str) -> Client:
        """The client as the store holds it now (see :meth:`agent_from_store`)."""
        return self._store.get_client(client_id)

    def invalidate(self) -> None:
        """Forget everything (this process just wrote to the registry), and what reads under
        way would bring back."""
        self._generation += 1
        self._agents.clear()
        self._clients.clear()
        self._tenants.clear()

    def close(self) -> None:
        """Stop the reader threads (a read under way finishes on its own)."""
        with self._readers_lock:
            readers, self._readers = self._readers, None
        if readers is not None:
            readers.shutdown(wait=False)

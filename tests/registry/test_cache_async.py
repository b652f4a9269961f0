"""The registry cache's readers for event loops: a miss is read on the cache's own threads, so a
slow store holds only the calls that need that record; concurrent misses share one read; a caller
waits at most READ_BUDGET and fails closed; a read that began before invalidate() is neither kept
nor joined. The store is the real SQLite registry store; ``Gated`` only holds its reads back."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from aegis.clock import SystemClock
from aegis.errors import NotFound, Unavailable
from aegis.registry import cache as cache_module
from aegis.registry.cache import RegistryCache
from aegis.stores import open_registry_store
from aegis.stores.sql.registry import SqlRegistryStore
from aegis.types import Agent, AgentStatus, Environment, Tenant, TenantStatus
from tests.support.loop import Ticker


class Gated(SqlRegistryStore):
    """The SQLite registry store, whose ``get_agent`` waits while ``gate`` is closed (before it
    reads, or with ``late`` after it read: an answer that is delivered late) and counts the reads
    that reached it."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gate = threading.Event()
        self.gate.set()
        self.reads = 0
        self.late = False

    def get_agent(self, agent_id: str) -> Agent:
        self.reads += 1
        if self.late:
            agent = super().get_agent(agent_id)
            self.gate.wait(10)
            return agent
        self.gate.wait(10)
        return super().get_agent(agent_id)


@pytest.fixture
def store(tmp_path: Path) -> Gated:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    open_registry_store(url).close()  # migrated
    gated = Gated(url)
    now = time.time()
    gated.create_tenant(Tenant("acme", "Acme", TenantStatus.ACTIVE, now))
    gated.create_environment(Environment("acme", "prod", now))
    gated.create_agent(_agent(now))
    return gated


def _agent(now: float, status: AgentStatus = AgentStatus.ACTIVE) -> Agent:
    return Agent(
        id="finance-agent", tenant_id="acme", env="prod", display_name="Finance",
        owner="alice@example.com", status=status, created_at=now, updated_at=now,
    )  # fmt: skip


async def test_a_stalled_read_holds_only_its_callers_and_fails_closed_within_the_budget(
    store: Gated, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_module, "READ_BUDGET", 0.3)
    # An entry's age counts from when its read began: 1 s keeps it fresh past the stall here.
    cache = RegistryCache(store, clock=SystemClock(), ttl=1.0)
    try:
        async with Ticker() as loop_ran:
            store.gate.clear()  # the database stops answering
            started = time.monotonic()
            with pytest.raises(Unavailable) as refused:
                await cache.agent_async("finance-agent")
            waited = time.monotonic() - started
        assert refused.value.code == "registry_unavailable"
        assert 0.3 <= waited < 1.0
        assert loop_ran.ticks >= 15  # the loop went on serving while the read waited
        # The tenant is another record: read on another thread, answered at once.
        assert (await cache.tenant_async("acme")).id == "acme"
        store.gate.set()  # the database answers again; the read under way fills the cache
        for _ in range(100):
            if store.reads == 1 and cache._agents:
                break
            await asyncio.sleep(0.01)
        assert (await cache.agent_async("finance-agent")).id == "finance-agent"
        assert store.reads == 1
    finally:
        store.gate.set()
        cache.close()


async def test_concurrent_misses_for_one_record_share_one_read(store: Gated) -> None:
    cache = RegistryCache(store, clock=SystemClock())
    try:
        store.gate.clear()
        waiting = [asyncio.ensure_future(cache.agent_async("finance-agent")) for _ in range(20)]
        await asyncio.sleep(0.05)
        store.gate.set()
        agents = await asyncio.gather(*waiting)
        assert {a.id for a in agents} == {"finance-agent"}
        assert store.reads == 1
    finally:
        cache.close()


async def test_a_read_begun_before_invalidate_is_not_kept(store: Gated) -> None:
    """This process suspends the agent while a read of the active record is under way: the record
    that read brings back answers the call that asked before the write, and nobody after it."""
    cache = RegistryCache(store, clock=SystemClock(), ttl=1.0)
    try:
        store.gate.clear()
        store.late = True
        before = asyncio.ensure_future(cache.agent_async("finance-agent"))
        await asyncio.sleep(0.05)  # read (active), not yet delivered
        store.update_agent(_agent(time.time(), AgentStatus.SUSPENDED))
        cache.invalidate()
        store.gate.set()
        assert (await before).status is AgentStatus.ACTIVE
        assert not cache._agents
        assert (await cache.agent_async("finance-agent")).status is AgentStatus.SUSPENDED
    finally:
        store.gate.set()
        cache.close()


async def test_a_read_begun_before_invalidate_is_not_joined(store: Gated) -> None:
    """Calls after this process's write must not wait for, and take, a read that began before
    it: they read again."""
    cache = RegistryCache(store, clock=SystemClock())
    try:
        store.gate.clear()
        before = asyncio.ensure_future(cache.agent_async("finance-agent"))
        await asyncio.sleep(0.05)
        assert store.reads == 1
        # The read is parked inside the store; the write lands, then the cache is told.
        store.update_agent(_agent(time.time(), AgentStatus.SUSPENDED))
        cache.invalidate()
        after = asyncio.ensure_future(cache.agent_async("finance-agent"))
        await asyncio.sleep(0.05)
        assert store.reads == 2  # a read of its own, not the one under way
        store.gate.set()
        await before
        assert (await after).status is AgentStatus.SUSPENDED
        assert (await cache.agent_async("finance-agent")).status is AgentStatus.SUSPENDED
    finally:
        store.gate.set()
        cache.close()


async def test_not_found_propagates_and_is_not_cached(store: Gated) -> None:
    cache = RegistryCache(store, clock=SystemClock())
    try:
        with pytest.raises(NotFound):
            await cache.client_async("no-such-client")
        assert not cache._clients
    finally:
        cache.close()


async def test_a_read_older_than_the_ttl_is_not_joined(store: Gated) -> None:
    """Another replica suspends the agent while a slow read of the active record is under way.
    A call that comes more than ttl after that read began must not take its answer (an entry
    that old would not be used either): it reads again and sees the suspension."""
    cache = RegistryCache(store, clock=SystemClock(), ttl=0.1)
    try:
        store.gate.clear()
        store.late = True
        before = asyncio.ensure_future(cache.agent_async("finance-agent"))
        young = asyncio.ensure_future(cache.agent_async("finance-agent"))  # at once: joins
        await asyncio.sleep(0.05)  # read (active), not yet delivered
        assert store.reads == 1
        store.update_agent(_agent(time.time(), AgentStatus.SUSPENDED))  # elsewhere: no invalidate
        await asyncio.sleep(0.1)
        late = asyncio.ensure_future(cache.agent_async("finance-agent"))
        for _ in range(200):  # the late call's own read reaches the store
            if store.reads == 2:
                break
            await asyncio.sleep(0.01)
        assert store.reads == 2
        store.gate.set()
        assert (await before).status is AgentStatus.ACTIVE
        assert (await young).status is AgentStatus.ACTIVE  # asked before the write
        assert (await late).status is AgentStatus.SUSPENDED
    finally:
        store.gate.set()
        cache.close()

"""Backends for the store contract suites: every test runs once per backend of its Protocol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from aegis.clock import FrozenClock
from aegis.stores import (
    ReplayStore,
    RevocationStore,
    open_key_store,
    open_registry_store,
    open_replay_store,
    open_revocation_store,
)
from aegis.stores.redis import RedisReplayStore
from aegis.stores.sql.keys import SqlKeyStore
from aegis.stores.sql.registry import SqlRegistryStore

SQL_BACKENDS = ["sqlite", "postgresql"]
FAST_BACKENDS = ["memory", "redis"]

#: Redis reply and connect timeouts for tests of atomicity under load. The stores' own 0.25 s is a latency budget:
#: on a starved CI machine a hundred concurrent calls can miss it and fail closed, which is
#: correct behaviour but not what those tests measure.
PATIENT_TIMEOUT = 2.0


@pytest.fixture(params=SQL_BACKENDS)
def sql_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty (never migrated) database of each SQL backend."""
    fixture = "sqlite_url" if request.param == "sqlite" else "empty_pg_url"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture(params=SQL_BACKENDS)
def store_url(request: pytest.FixtureRequest) -> str:
    """A fresh database of each SQL backend, for this test alone (PostgreSQL's comes migrated)."""
    fixture = "sqlite_url" if request.param == "sqlite" else "fresh_pg_url"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
def registry(store_url: str) -> Iterator[SqlRegistryStore]:
    store = open_registry_store(store_url)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def key_store(store_url: str) -> Iterator[SqlKeyStore]:
    store = open_key_store(store_url)
    try:
        yield store
    finally:
        store.close()


@dataclass
class Fast:
    """A replay or revocation backend with a way to let time pass for it."""

    kind: str
    clock: FrozenClock
    url: str
    prefix: str

    async def pass_time(self, seconds: float) -> None:
        """Move the frozen clock; Redis expires keys on its own clock, so also wait for real."""
        self.clock.advance(seconds)
        if self.kind == "redis":
            await asyncio.sleep(seconds)


@pytest.fixture(params=FAST_BACKENDS)
def fast(request: pytest.FixtureRequest, frozen_clock: FrozenClock) -> Fast:
    if request.param == "memory":
        return Fast("memory", frozen_clock, "memory://", "")
    url: str = request.getfixturevalue("redis_url")
    prefix: str = request.getfixturevalue("redis_prefix")
    return Fast("redis", frozen_clock, url, prefix)


@pytest.fixture
async def replay(fast: Fast) -> AsyncIterator[ReplayStore]:
    store = open_replay_store(fast.url, clock=fast.clock, prefix=fast.prefix)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def revocation(fast: Fast) -> AsyncIterator[RevocationStore]:
    store = open_revocation_store(fast.url, clock=fast.clock, prefix=fast.prefix)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def patient_replay(fast: Fast) -> AsyncIterator[ReplayStore]:
    """The replay backend with a generous Redis timeout (see :data:`PATIENT_TIMEOUT`)."""
    store: ReplayStore
    if fast.kind == "redis":
        store = RedisReplayStore.from_url(
            fast.url,
            clock=fast.clock,
            prefix=fast.prefix,
            timeout=PATIENT_TIMEOUT,
            connect_timeout=PATIENT_TIMEOUT,
        )
    else:
        store = open_replay_store(fast.url, clock=fast.clock)
    try:
        yield store
    finally:
        await store.close()

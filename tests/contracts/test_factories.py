"""The package face of ``aegis.stores``: its export list and the URL factories."""

from __future__ import annotations

from pathlib import Path

import pytest

import aegis.stores
from aegis.clock import FrozenClock
from aegis.errors import ConfigError, ReplayDetected
from aegis.stores import (
    MemoryReplayStore,
    MemoryRevocationStore,
    RedisReplayStore,
    RedisRevocationStore,
    open_key_store,
    open_registry_store,
    open_replay_store,
    open_revocation_store,
)
from aegis.stores.sql.migrate import HEAD, current_revision


def test_all_is_sorted_and_complete() -> None:
    exported = aegis.stores.__all__
    assert exported == sorted(exported)
    public = {
        name
        for name, value in vars(aegis.stores).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("aegis.stores")
    }
    assert set(exported) == public


@pytest.mark.parametrize("url", ["memory", "memory://"])
async def test_memory_urls(url: str, frozen_clock: FrozenClock) -> None:
    replay = open_replay_store(url, clock=frozen_clock)
    revocation = open_revocation_store(url, clock=frozen_clock)
    assert isinstance(replay, MemoryReplayStore)
    assert isinstance(revocation, MemoryRevocationStore)
    await replay.consume("dpop", "j", frozen_clock.now() + 60)
    with pytest.raises(ReplayDetected):
        await replay.consume("dpop", "j", frozen_clock.now() + 60)


async def test_redis_urls(redis_url: str, redis_prefix: str, frozen_clock: FrozenClock) -> None:
    replay = open_replay_store(redis_url, clock=frozen_clock, prefix=redis_prefix)
    revocation = open_revocation_store(redis_url, clock=frozen_clock, prefix=redis_prefix)
    try:
        assert isinstance(replay, RedisReplayStore)
        assert isinstance(revocation, RedisRevocationStore)
        await replay.consume("dpop", "j", frozen_clock.now() + 60)
        await revocation.check("j", ["agent:a"], frozen_clock.now())
    finally:
        await replay.close()
        await revocation.close()


@pytest.mark.parametrize("url", ["", "memcached://x", "http://redis:6379", "memory:/"])
def test_other_store_urls_are_config_errors(url: str, frozen_clock: FrozenClock) -> None:
    with pytest.raises(ConfigError) as replay:
        open_replay_store(url, clock=frozen_clock)
    assert replay.value.details == {"key": "stores.replay"}
    with pytest.raises(ConfigError) as revocation:
        open_revocation_store(url, clock=frozen_clock)
    assert revocation.value.details == {"key": "stores.revocation"}


def test_sql_factories_migrate_first(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nested' / 'aegis.db'}"
    assert current_revision(url) is None
    open_key_store(url).close()
    assert current_revision(url) == HEAD
    registry = open_registry_store(url)
    try:
        assert registry.list_tenants() == []
    finally:
        registry.close()

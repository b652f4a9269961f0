"""A PostgreSQL that stalls (here: a lock another session holds on a table) turns a registry or
policy read into ``*_unavailable`` within the stores' statement timeout, instead of holding the
gateway's call (and, as the reads are synchronous, its event loop) until the lock goes. Schema
changes are exempt: a replica starting while another migrates waits for it."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from aegis.clock import SystemClock
from aegis.errors import Unavailable
from aegis.policy.store import SqlPolicyStore
from aegis.registry.cache import RegistryCache
from aegis.stores import open_registry_store
from aegis.stores.sql.engine import HOT_PATH_STATEMENT_TIMEOUT, SCHEMA_LOCK_KEY
from aegis.stores.sql.registry import SqlRegistryStore
from tests.support.loop import Ticker

pytestmark = pytest.mark.postgres


def _dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _locker(url: str) -> psycopg.Connection:
    """A session whose locks the server ends after 6 s, so a store without a timeout makes the
    test fail (its read answers late) rather than hang."""
    conn = psycopg.connect(_dsn(url))
    conn.execute("SET idle_in_transaction_session_timeout = '6s'")
    return conn


def test_a_read_behind_a_held_lock_is_unavailable_in_bounded_time(fresh_pg_url: str) -> None:
    store = open_registry_store(fresh_pg_url)
    try:
        with _locker(fresh_pg_url) as locker:
            locker.execute("LOCK TABLE agents IN ACCESS EXCLUSIVE MODE")  # held until rollback
            started = time.monotonic()
            with pytest.raises(Unavailable) as refused:
                store.get_agent("any-agent")
            waited = time.monotonic() - started
            locker.rollback()
        assert refused.value.code == "registry_unavailable"
        assert SqlRegistryStore.statement_timeout is not None
        assert SqlRegistryStore.statement_timeout <= waited < SqlRegistryStore.statement_timeout + 2
        with pytest.raises(Exception, match="does not exist"):  # the lock gone, reads answer
            store.get_agent("any-agent")
    finally:
        store.close()


def test_a_policy_read_behind_a_held_lock_is_unavailable_in_bounded_time(
    fresh_pg_url: str,
) -> None:
    store = SqlPolicyStore(fresh_pg_url)
    try:
        assert store.active("t1", "prod") is None
        with _locker(fresh_pg_url) as locker:
            locker.execute("LOCK TABLE policy_activations IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(Unavailable) as refused:
                store.active("t1", "prod")
            waited = time.monotonic() - started
            locker.rollback()
        assert refused.value.code == "policy_unavailable"
        assert HOT_PATH_STATEMENT_TIMEOUT <= waited < HOT_PATH_STATEMENT_TIMEOUT + 2
        assert store.active("t1", "prod") is None  # the lock gone, reads answer
    finally:
        store.close()


def test_a_schema_change_waits_out_another_replicas_migration(fresh_pg_url: str) -> None:
    """The schema lock is held longer than the statement timeout; opening the store waits for it
    (the lock's wait is exempt from the timeout) and then works."""
    hold = HOT_PATH_STATEMENT_TIMEOUT + 1.0
    with psycopg.connect(_dsn(fresh_pg_url)) as migrating:
        migrating.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        started = time.monotonic()
        release = threading.Timer(hold, migrating.rollback)
        release.start()
        try:
            store = SqlPolicyStore(fresh_pg_url)
        finally:
            release.join()
        waited = time.monotonic() - started
    try:
        assert waited >= hold - 0.1
        assert store.active("t1", "prod") is None
    finally:
        store.close()


async def test_a_stalled_registry_read_leaves_the_event_loop_serving(fresh_pg_url: str) -> None:
    """Through the cache's readers for event loops (what the gateway's subject check uses): the
    call behind the lock fails closed within the statement timeout, and meanwhile the loop keeps
    running everything else."""
    store = open_registry_store(fresh_pg_url)
    cache = RegistryCache(store, clock=SystemClock())
    try:
        async with Ticker() as loop_ran:
            with _locker(fresh_pg_url) as locker:
                locker.execute("LOCK TABLE agents IN ACCESS EXCLUSIVE MODE")
                started = time.monotonic()
                with pytest.raises(Unavailable) as refused:
                    await cache.agent_async("any-agent")
                waited = time.monotonic() - started
                locker.rollback()
        assert refused.value.code == "registry_unavailable"
        assert HOT_PATH_STATEMENT_TIMEOUT <= waited < HOT_PATH_STATEMENT_TIMEOUT + 1
        assert loop_ran.ticks >= 100  # about 200 in 2 s: the loop was never held
    finally:
        cache.close()
        store.close()

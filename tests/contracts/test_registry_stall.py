"""A PostgreSQL that stalls (here: a lock another session holds on the agents table) turns a
registry read into ``registry_unavailable`` within the store's statement timeout, instead of
holding the gateway's call (and, as the read is synchronous, its event loop) until the lock goes."""

from __future__ import annotations

import time

import psycopg
import pytest

from aegis.errors import Unavailable
from aegis.stores import open_registry_store
from aegis.stores.sql.registry import SqlRegistryStore

pytestmark = pytest.mark.postgres


def test_a_read_behind_a_held_lock_is_unavailable_in_bounded_time(fresh_pg_url: str) -> None:
    store = open_registry_store(fresh_pg_url)
    dsn = fresh_pg_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(dsn) as locker:
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

"""Fixtures shared by every test package: databases, Redis and a frozen clock.

PostgreSQL and Redis are real servers. When one cannot be reached the fixture fails with the reason
and the address it tried: a missing server is a broken test environment, never a skipped test.
Override the addresses with ``AEGIS_TEST_PG`` (a SQLAlchemy URL of a database this user may create
databases from) and ``AEGIS_TEST_REDIS``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy.engine import make_url

from aegis.clock import FrozenClock
from aegis.stores.sql.migrate import upgrade

PG_ADMIN_URL = os.environ.get("AEGIS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AEGIS_TEST_REDIS", "redis://127.0.0.1:6379/0")

#: The instant a frozen clock starts at (2023-11-14T22:13:20Z).
FROZEN_START = 1_700_000_000.0


def _pg_admin() -> psycopg.Connection[tuple[object, ...]]:
    url = make_url(PG_ADMIN_URL)
    try:
        return psycopg.connect(
            host=url.host,
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            dbname=url.database,
            autocommit=True,
            connect_timeout=3,
        )
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is unreachable at {url.render_as_string(hide_password=True)} "
            f"(set AEGIS_TEST_PG or start the server): {exc}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit connection to the maintenance database, to create and drop test databases."""
    conn = _pg_admin()
    try:
        yield conn
    finally:
        conn.close()


def _database(admin: psycopg.Connection[tuple[object, ...]], template: str | None = None) -> str:
    name = f"aegis_test_{secrets.token_hex(6)}"
    clause = f' TEMPLATE "{template}"' if template else ""
    admin.execute(f'CREATE DATABASE "{name}"{clause}')
    return name


def _url(name: str) -> str:
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _drop(admin: psycopg.Connection[tuple[object, ...]], name: str) -> None:
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url(pg_admin: psycopg.Connection[tuple[object, ...]]) -> Iterator[str]:
    """A fresh PostgreSQL database migrated to HEAD, shared by the whole session (for tests that
    write ids of their own); dropped at the end."""
    name = _database(pg_admin)
    try:
        upgrade(_url(name))
        yield _url(name)
    finally:
        _drop(pg_admin, name)


@pytest.fixture(scope="session")
def _pg_scratch(pg_admin: psycopg.Connection[tuple[object, ...]]) -> Iterator[str]:
    """The database behind :func:`fresh_pg_url`: migrated once, emptied before each test."""
    name = _database(pg_admin)
    try:
        upgrade(_url(name))
        yield name
    finally:
        _drop(pg_admin, name)


@pytest.fixture
def fresh_pg_url(_pg_scratch: str) -> str:
    """A PostgreSQL database migrated to HEAD with every table empty, for this test alone.

    Emptying (TRUNCATE, tens of milliseconds) is much faster than creating a database per test.
    Triggers are suspended for it (``session_replication_role``), since the events table refuses
    TRUNCATE; the lock timeout turns a connection some earlier test left open into a clear
    failure instead of a hang.
    """
    url = make_url(PG_ADMIN_URL)
    with psycopg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        dbname=_pg_scratch,
        autocommit=True,
        connect_timeout=3,
    ) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT quote_ident(tablename) FROM pg_tables "
                "WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
            )
        ]
        conn.execute("SET lock_timeout = '5s'")
        conn.execute("SET session_replication_role = replica")
        conn.execute(f"TRUNCATE {', '.join(map(str, tables))} RESTART IDENTITY CASCADE")
    return _url(_pg_scratch)


@pytest.fixture
def empty_pg_url(pg_admin: psycopg.Connection[tuple[object, ...]]) -> Iterator[str]:
    """A new, empty (never migrated) PostgreSQL database for this test alone; dropped after it."""
    name = _database(pg_admin)
    try:
        yield _url(name)
    finally:
        _drop(pg_admin, name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database file for this test alone."""
    return f"sqlite:///{tmp_path / 'aegis.db'}"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis server the tests use; checked once per session."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis is unreachable at {REDIS_URL} (set AEGIS_TEST_REDIS or start the server): {exc}",
            pytrace=False,
        )
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted after the test."""
    prefix = f"aegis-test:{secrets.token_hex(8)}:"
    yield prefix
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def frozen_clock() -> FrozenClock:
    """A clock that stands still at :data:`FROZEN_START` until a test moves it."""
    return FrozenClock(FROZEN_START)

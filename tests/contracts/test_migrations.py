"""Migrations: ``upgrade`` reaches HEAD, is idempotent, and builds exactly ``schema.METADATA``."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from aegis.errors import ConfigError, Unavailable
from aegis.stores import open_key_store, open_registry_store
from aegis.stores.sql.engine import make_engine
from aegis.stores.sql.migrate import HEAD, MIGRATIONS, current_revision, upgrade
from aegis.stores.sql.schema import METADATA
from aegis.types import Tenant, TenantStatus


@pytest.fixture
def engine(sql_url: str) -> Iterator[Engine]:
    eng = make_engine(sql_url)
    try:
        yield eng
    finally:
        eng.dispose()


def test_head_is_the_newest_revision_file() -> None:
    assert HEAD == "0002"
    revisions = sorted(p.name.split("_")[0] for p in (MIGRATIONS / "versions").glob("[0-9]*.py"))
    assert revisions[-1] == HEAD


def test_an_empty_database_has_no_revision(sql_url: str) -> None:
    assert current_revision(sql_url) is None


def test_upgrade_reaches_head_and_is_idempotent(sql_url: str) -> None:
    upgrade(sql_url)
    assert current_revision(sql_url) == HEAD
    store = open_registry_store(sql_url)
    try:
        tenant = Tenant("acme", "Acme", TenantStatus.ACTIVE, 1.0)
        store.create_tenant(tenant)
        upgrade(sql_url)  # again, with data in place
        upgrade(store.engine)  # and through an engine the caller keeps
        assert current_revision(store.engine) == HEAD
        assert store.list_tenants() == [tenant]
    finally:
        store.close()
    open_key_store(sql_url).close()  # both factories migrate; the second finds nothing to do
    assert current_revision(sql_url) == HEAD


def test_migrated_schema_matches_metadata(sql_url: str, engine: Engine) -> None:
    upgrade(engine)
    inspector = inspect(engine)
    tables = set(inspector.get_table_names()) - {"alembic_version"}
    assert tables == set(METADATA.tables)
    for name, table in METADATA.tables.items():
        columns = {c["name"]: c for c in inspector.get_columns(name)}
        assert set(columns) == {c.name for c in table.columns}, name
        for column in table.columns:
            assert columns[column.name]["nullable"] == column.nullable, f"{name}.{column.name}"
        pk = inspector.get_pk_constraint(name)["constrained_columns"]
        assert set(pk) == {c.name for c in table.primary_key.columns}, name
        indexes = {i["name"]: i["column_names"] for i in inspector.get_indexes(name)}
        for index in table.indexes:
            assert indexes.get(index.name) == [c.name for c in index.columns], index.name
    # And Alembic's own comparison (types, foreign keys, indexes) finds nothing to migrate.
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), METADATA)
    assert diff == []


def test_events_triggers_are_installed(sql_url: str, engine: Engine) -> None:
    upgrade(engine)
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            names = conn.execute(
                text("SELECT tgname FROM pg_trigger WHERE tgrelid = 'events'::regclass")
            ).scalars()
        else:
            names = conn.execute(
                text(
                    "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'events'"
                )
            ).scalars()
        found = set(names)
    assert found == (
        {"events_append_only", "events_no_truncate"}
        if engine.dialect.name == "postgresql"
        else {"events_no_update", "events_no_delete"}
    )


@pytest.mark.parametrize("operation", [upgrade, current_revision])
def test_an_unreachable_database_is_unavailable(operation: object) -> None:
    assert callable(operation)
    with pytest.raises(Unavailable) as info:
        operation("postgresql+psycopg://postgres@127.0.0.1:1/none")
    assert info.value.code == "registry_unavailable"


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite:///"])
def test_an_in_memory_sqlite_database_is_refused(url: str) -> None:
    """Every pooled connection would see its own empty database: the schema migrated on one
    connection would be missing on the next, and writes would be lost when it closed."""
    with pytest.raises(ConfigError, match="SQLite needs a file") as info:
        open_registry_store(url)
    assert info.value.details == {"key": "database.url"}
    with pytest.raises(ConfigError, match="SQLite needs a file"):
        make_engine(url)


@pytest.mark.parametrize("url", ["mysql://db/aegis", "postgresql://db/aegis", "sqlite://x.db"])
def test_an_unsupported_database_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_key_store(url)
    assert info.value.code == "config_invalid"
    assert info.value.details == {"key": "database.url"}


def test_a_database_from_a_newer_version_is_refused(sql_url: str, engine: Engine) -> None:
    """A schema this code does not know is not used: it would be read and written wrongly."""
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    for open_store, code in (
        (open_registry_store, "registry_unavailable"),
        (open_key_store, "key_store_unavailable"),
    ):
        with pytest.raises(Unavailable, match="does not know") as info:
            open_store(sql_url)
        assert info.value.code == code
    assert current_revision(sql_url) == "9999"


def test_an_unreachable_database_is_key_store_unavailable_for_the_key_store() -> None:
    with pytest.raises(Unavailable) as info:
        open_key_store("postgresql+psycopg://postgres@127.0.0.1:1/none")
    assert info.value.code == "key_store_unavailable"


def test_upgrades_in_one_process_do_not_overlap(empty_pg_url: str) -> None:
    """Threads of one process upgrading at once (a registry and a key store opened together)."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait(10)
            upgrade(empty_pg_url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert current_revision(empty_pg_url) == HEAD


def test_replicas_starting_together_all_migrate(empty_pg_url: str) -> None:
    """Several processes running ``upgrade`` on one empty PostgreSQL database at the same time
    (replicas of one deployment starting together) all succeed; the schema is created once."""
    script = "import sys; from aegis.stores.sql.migrate import upgrade; upgrade(sys.argv[1])"
    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", script, empty_pg_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outcomes = [(p.wait(60), p.communicate()[1].decode()[-400:]) for p in replicas]
    assert outcomes == [(0, "")] * 3
    assert current_revision(empty_pg_url) == HEAD


def test_a_0001_database_with_clients_upgrades_keeping_them(sql_url: str, engine: Engine) -> None:
    """0002 adds the client's own revocation mark: existing clients get 0 (no token of theirs was
    refused by a client mark before) and stay readable through the store."""
    from alembic import command

    from aegis.stores.sql.migrate import _config

    command.upgrade(_config(engine), "0001")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tenants (id, display_name, status, created_at)"
                " VALUES ('acme', 'Acme', 'active', 1)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO agents (id, tenant_id, env, display_name, owner, status, created_at,"
                " updated_at, roles, allowed_scopes, attributes, jwks, tokens_not_before)"
                " VALUES ('a1', 'acme', 'prod', 'A', 'o@example.com', 'active', 1, 1, '[]', '[]',"
                " '{}', '[]', 0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO clients (client_id, agent_id, auth_method, created_at, active, secrets,"
                " dpop_bound) VALUES ('a1.c', 'a1', 'client_secret_basic', 1, true, '[]', false)"
            )
        )
    upgrade(engine)
    assert current_revision(engine) == HEAD
    store = open_registry_store(sql_url)
    try:
        client = store.get_client("a1.c")
        assert (client.agent_id, client.active, client.tokens_not_before) == ("a1", True, 0.0)
    finally:
        store.close()

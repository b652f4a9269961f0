"""Retention on SQLite and PostgreSQL, and PostgreSQL's append-only audit tables (real server)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import insert, text
from sqlalchemy.exc import DBAPIError

from aegis.audit.checkpoint import Checkpointer, jwks_resolver, sign_checkpoint
from aegis.audit.log import AuditLog
from aegis.audit.retention import prune
from aegis.audit.sql_tables import AUDIT_CHECKPOINTS
from aegis.audit.verify import verify_export
from aegis.clock import FrozenClock, random_bytes
from aegis.crypto.keyring import KeyRing
from aegis.errors import EvidenceError
from tests.audit.conftest import ISSUER, dumps, export_text, fill, loads
from tests.crypto.fakes import MemoryKeyStore


@pytest.fixture
def pg_log(fresh_pg_url: str, clock: FrozenClock) -> Iterator[AuditLog]:
    audit = AuditLog(fresh_pg_url, clock=clock)
    yield audit
    audit.close()


def _aged_log(log: AuditLog, keyring: KeyRing, clock: FrozenClock) -> Checkpointer:
    cp = Checkpointer(log, keyring, issuer=ISSUER, clock=clock)
    fill(log, 4)
    cp.checkpoint()  # at 4
    fill(log, 3, start=4)
    cp.checkpoint()  # at 7
    clock.advance(86400)
    fill(log, 3, start=7)  # 8-10 are young
    return cp


def _prune_and_verify(
    log: AuditLog, cp: Checkpointer, keyring: KeyRing, clock: FrozenClock
) -> None:
    result = prune(log, before=clock.now() - 3600)
    assert (result.upto, result.deleted) == (7, 7)
    assert prune(log, before=clock.now() - 3600).deleted == 0  # idempotent
    assert log.count() == 3 and log.verify_chain().ok
    fill(log, 2, start=10)
    lines = export_text(cp)
    assert loads(lines[1])["type"] == "base"
    summary = verify_export(lines, jwks_resolver(keyring.jwks()))
    assert (summary.first_seq, summary.last_seq, summary.records) == (8, 12, 5)
    # The base must match the signed checkpoint at the prune point.
    base = loads(lines[1])
    base["compact_range"][0] = "00" * 32
    lines[1] = dumps(base)
    with pytest.raises(EvidenceError, match="checkpoint_mismatch"):
        verify_export(lines, jwks_resolver(keyring.jwks()))


def test_prune_on_sqlite_keeps_what_remains_verifiable(
    log: AuditLog, keyring: KeyRing, clock: FrozenClock
) -> None:
    cp = _aged_log(log, keyring, clock)
    _prune_and_verify(log, cp, keyring, clock)


def test_a_fully_pruned_log_continues_its_chain(
    log: AuditLog, keyring: KeyRing, clock: FrozenClock
) -> None:
    cp = Checkpointer(log, keyring, issuer=ISSUER, clock=clock)
    fill(log, 3)
    cp.checkpoint()
    clock.advance(10)
    assert prune(log, before=clock.now()).deleted == 3
    report = log.verify_chain()  # nothing left: pruned up to the newest checkpoint, intact
    assert report.ok and report.records == 0, report
    fill(log, 1, start=3)
    assert log.verify_chain().ok and next(iter(log.records()))["n"] == 3
    assert verify_export(export_text(cp), jwks_resolver(keyring.jwks())).first_seq == 4


@pytest.mark.postgres
def test_postgres_refuses_update_delete_and_truncate(
    pg_log: AuditLog, keyring: KeyRing, clock: FrozenClock
) -> None:
    cp = Checkpointer(pg_log, keyring, issuer=ISSUER, clock=clock)
    fill(pg_log, 3)
    cp.checkpoint()
    for statement in (
        "UPDATE audit_records SET record = '{}' WHERE seq = 2",
        "DELETE FROM audit_records WHERE seq = 3",
        "TRUNCATE audit_records",
        "UPDATE audit_checkpoints SET root_hash = repeat('0', 64)",
        "DELETE FROM audit_checkpoints",
        "DELETE FROM audit_tree_nodes",
        "TRUNCATE audit_tree_nodes",
        # The prune setting alone does not open a way past: only up to a checkpoint size, and
        # only the whole prefix up to it (a record in the middle stays).
        "SELECT set_config('aegis.audit_prune_upto', '2', true); DELETE FROM audit_records WHERE seq = 1",
        "SELECT set_config('aegis.audit_prune_upto', '3', true); DELETE FROM audit_records WHERE seq = 2",
        "SELECT set_config('aegis.audit_prune_upto', '3', true); "
        "DELETE FROM audit_records WHERE seq IN (2, 3)",
        # The setting cleared by the statement itself, before a statement trigger reads it.
        "SELECT set_config('aegis.audit_prune_upto', '3', true); DELETE FROM audit_records "
        "WHERE seq = 2 RETURNING set_config('aegis.audit_prune_upto', '', true)",
        # Temporary tables standing in for the checkpoints and records the triggers read.
        "CREATE TEMP TABLE audit_checkpoints (tree_size bigint) ON COMMIT DROP; "
        "CREATE TEMP TABLE audit_records (seq bigint) ON COMMIT DROP; "
        "INSERT INTO pg_temp.audit_checkpoints VALUES (999999); "
        "SELECT set_config('aegis.audit_prune_upto', '999999', true); "
        "DELETE FROM public.audit_records WHERE seq >= 2",
        "SELECT aegis_audit_prune(2)",
    ):
        with (
            pytest.raises(DBAPIError, match=r"append-only|only up to a signed checkpoint"),
            pg_log.engine.begin() as conn,
        ):
            conn.exec_driver_sql(statement)
    assert pg_log.count() == 3 and pg_log.verify_chain().ok


@pytest.mark.postgres
def test_prune_on_postgres_is_the_one_way_past_the_trigger(
    pg_log: AuditLog, keyring: KeyRing, clock: FrozenClock
) -> None:
    cp = _aged_log(pg_log, keyring, clock)
    _prune_and_verify(pg_log, cp, keyring, clock)
    with pg_log.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM audit_checkpoints")).scalar() == 2


@pytest.mark.postgres
def test_postgres_appends_and_exports(
    pg_log: AuditLog, keyring: KeyRing, clock: FrozenClock
) -> None:
    cp = Checkpointer(pg_log, keyring, issuer=ISSUER, clock=clock)
    fill(pg_log, 6)
    cp.checkpoint()
    fill(pg_log, 2, start=6)
    assert verify_export(export_text(cp), jwks_resolver(keyring.jwks())).records == 8
    AuditLog(pg_log.engine, clock=clock)  # installing the triggers again is harmless


@pytest.mark.postgres
def test_an_insert_only_role_appends_and_prunes_but_cannot_delete(
    pg_log: AuditLog, keyring: KeyRing, clock: FrozenClock, fresh_pg_url: str
) -> None:
    import secrets

    from sqlalchemy.engine import make_url

    role = f"aegis_app_{secrets.token_hex(4)}"
    cp = Checkpointer(pg_log, keyring, issuer=ISSUER, clock=clock)
    fill(pg_log, 3)
    cp.checkpoint()
    tables = "audit_records, audit_tree_nodes, audit_checkpoints"
    with pg_log.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f"GRANT SELECT, INSERT ON {tables} TO {role}")
        conn.exec_driver_sql(f"GRANT EXECUTE ON FUNCTION aegis_audit_prune(bigint) TO {role}")
    app_url = make_url(fresh_pg_url).set(username=role).render_as_string(hide_password=False)
    app_log = AuditLog(app_url, clock=clock)  # starts without owning the DDL
    try:
        fill(app_log, 2, start=3)
        for statement in (
            "DELETE FROM audit_records WHERE seq = 5",
            "UPDATE audit_records SET kind = 'x'",
        ):
            with (
                pytest.raises(DBAPIError, match="permission denied"),
                app_log.engine.begin() as conn,
            ):
                conn.exec_driver_sql(statement)
        clock.advance(10)
        assert prune(app_log, before=clock.now()).deleted == 3  # the sanctioned path, as owner
        assert app_log.count() == 2 and app_log.verify_chain().ok
    finally:
        app_log.close()
        with pg_log.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("damage", "refused"),
    [
        (
            [
                "DROP TRIGGER audit_records_append_only ON audit_records",
                "ALTER TABLE audit_checkpoints DISABLE TRIGGER audit_checkpoints_append_only",
            ],
            ["DELETE FROM audit_records WHERE seq = 3", "DELETE FROM audit_checkpoints"],
        ),
        # Set to fire for replication only: enabled, and never firing in an ordinary session.
        (
            [
                f"ALTER TABLE audit_records ENABLE REPLICA TRIGGER {trigger}"
                for trigger in ("audit_records_append_only", "audit_records_prune_prefix")
            ],
            ["UPDATE audit_records SET record = replace(record, 'allow', 'deny') WHERE seq = 2"],
        ),
    ],
    ids=["dropped-or-disabled", "replica-only"],
)
def test_a_trigger_that_would_not_fire_is_installed_again_at_start(
    pg_log: AuditLog,
    keyring: KeyRing,
    clock: FrozenClock,
    fresh_pg_url: str,
    damage: list[str],
    refused: list[str],
) -> None:
    fill(pg_log, 3)
    Checkpointer(pg_log, keyring, issuer=ISSUER, clock=clock).checkpoint()
    with pg_log.engine.begin() as conn:
        for statement in damage:
            conn.exec_driver_sql(statement)
    restarted = AuditLog(fresh_pg_url, clock=clock)  # the guard function's marker is still there
    try:
        for statement in refused:
            with (
                pytest.raises(DBAPIError, match="append-only"),
                restarted.engine.begin() as conn,
            ):
                conn.exec_driver_sql(statement)
        assert restarted.count() == 3 and restarted.verify_chain().ok
    finally:
        restarted.close()


@pytest.mark.postgres
def test_an_upgrade_the_app_role_cannot_install_says_to_start_as_owner(
    pg_log: AuditLog, clock: FrozenClock, fresh_pg_url: str
) -> None:
    """Triggers of an older version and a role that may only read and append: refused with the
    way out (start once as the owner, which upgrades them), and the owner's start does."""
    import secrets

    from sqlalchemy.engine import make_url

    from aegis.errors import Unavailable

    role = f"aegis_app_{secrets.token_hex(4)}"
    tables = "audit_records, audit_tree_nodes, audit_checkpoints"
    with pg_log.engine.begin() as conn:
        conn.exec_driver_sql(
            "COMMENT ON FUNCTION aegis_audit_records_guard() IS 'aegis audit append-only v1'"
        )
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f"GRANT SELECT, INSERT ON {tables} TO {role}")
    app_url = make_url(fresh_pg_url).set(username=role).render_as_string(hide_password=False)
    try:
        with pytest.raises(Unavailable, match="once as the tables' owner"):
            AuditLog(app_url, clock=clock)
        AuditLog(fresh_pg_url, clock=clock).close()  # the owner upgrades them
        AuditLog(app_url, clock=clock).close()  # and the role starts
    finally:
        with pg_log.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")


@pytest.mark.parametrize("token", ["not-a-jws", "forged"])
def test_a_checkpoint_row_written_outside_aegis_is_no_prune_point(
    log: AuditLog, keyring: KeyRing, clock: FrozenClock, token: str
) -> None:
    """The database knows only that a checkpoint row of a size exists; a role that may insert
    into the table could write one (garbage, or signed with another key) to have records no
    signature ever covered deleted. Retention checks the row is one this log signed first."""
    cp = Checkpointer(log, keyring, issuer=ISSUER, clock=clock)
    fill(log, 3)
    cp.checkpoint()
    fill(log, 4, start=3)
    head = cp.tree.sync()
    if token == "forged":
        other = KeyRing(MemoryKeyStore(), random_bytes(32), clock)
        other.ensure_initialized()
        token = sign_checkpoint(other, issuer=ISSUER, head=head, now=clock.now())
    row = {"tree_size": head.size, "time": clock.now(), "root_hash": head.root.hex(),
           "chain_hash": head.chain_hash, "token": token}  # fmt: skip
    with log.engine.begin() as conn:
        conn.execute(insert(AUDIT_CHECKPOINTS), [row])
    clock.advance(10)
    with pytest.raises(EvidenceError, match="not one this log signed"):
        prune(log, before=clock.now(), verify=cp.verify_stored)
    assert log.count() == 7
    if token == "not-a-jws":  # the table was tampered with: checkpointing says so and stops
        with pytest.raises(EvidenceError, match="written outside Aegis"):
            cp.checkpoint()
        return
    fill(log, 1, start=7)
    real = cp.checkpoint()  # a signed one at 8: that one prunes
    clock.advance(10)
    assert real.tree_size == 8
    assert prune(log, before=clock.now(), verify=cp.verify_stored).deleted == 8

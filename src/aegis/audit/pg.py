"""Append-only audit tables on PostgreSQL: triggers that refuse UPDATE, DELETE and TRUNCATE.

``audit_records``, ``audit_tree_nodes`` and ``audit_checkpoints`` refuse every UPDATE and TRUNCATE,
and every DELETE but one kind: the rows of ``audit_records`` up to a signed checkpoint, deleted by
the prune function :data:`PRUNE_FUNCTION` (``aegis_audit_prune(upto)``), which is what retention
calls. The function sets the transaction-local setting ``aegis.audit_prune_upto`` that the row
trigger checks, and the trigger admits only rows with ``seq <= upto`` where a checkpoint of exactly
``upto`` leaves exists. The setting is only a transaction-local value, which a role with DELETE
rights could set (or clear) by hand, so a statement-level trigger judges every DELETE by the rows
it removed (a transition table): the highest must be a checkpoint's size and no row at or below it
may remain. Whatever remains still starts right after a signed tree head and still verifies.
Nothing else (no ``UPDATE``, no ``DELETE`` of a later row or of a row in the middle, no
``TRUNCATE``) gets past. The functions run with a fixed ``search_path`` and name their tables by
schema, so a temporary table cannot stand in for one.

Triggers stop anyone who can write the tables, owner included, from quietly editing the trail;
privileges narrow it further: let a separate role own the tables (it creates them on first start)
and grant the application role ``SELECT, INSERT`` on them and ``EXECUTE`` on the prune function,
which runs as its owner (``SECURITY DEFINER``). A superuser can still disable triggers, which is why
the trail is also hash-chained, Merkle-hashed and checkpointed under the signing key.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from aegis.errors import Unavailable

__all__ = ["PRUNE_FUNCTION", "install_append_only"]

PRUNE_FUNCTION: Final = "aegis_audit_prune"

_DDL: Final = """
CREATE OR REPLACE FUNCTION aegis_audit_refuse() RETURNS trigger
SET search_path = {schema}, pg_temp AS $$
BEGIN
  RAISE EXCEPTION 'the audit log is append-only: %% on %% is refused', TG_OP, TG_TABLE_NAME;
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION aegis_audit_records_guard() RETURNS trigger
SET search_path = {schema}, pg_temp AS $$
DECLARE
  upto text := current_setting('aegis.audit_prune_upto', true);
BEGIN
  IF TG_OP = 'DELETE' AND upto IS NOT NULL AND upto <> '' THEN
    IF OLD.seq <= upto::bigint
       AND EXISTS (SELECT 1 FROM {schema}.audit_checkpoints WHERE tree_size = upto::bigint) THEN
      RETURN OLD;
    END IF;
  END IF;
  RAISE EXCEPTION 'the audit log is append-only: %% on %% is refused', TG_OP, TG_TABLE_NAME;
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION aegis_audit_records_prefix() RETURNS trigger
SET search_path = {schema}, pg_temp AS $$
DECLARE
  upto bigint;
BEGIN
  -- Judged by the rows the statement deleted, not by any setting: they must be the whole
  -- prefix up to a signed checkpoint.
  SELECT max(seq) INTO upto FROM gone;
  IF upto IS NULL THEN
    RETURN NULL;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM {schema}.audit_checkpoints WHERE tree_size = upto)
     OR EXISTS (SELECT 1 FROM {schema}.audit_records WHERE seq <= upto) THEN
    RAISE EXCEPTION 'the audit log is append-only: records are pruned only as a whole prefix '
      'up to a signed checkpoint';
  END IF;
  RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION aegis_audit_prune(upto bigint) RETURNS bigint
SECURITY DEFINER SET search_path = {schema}, pg_temp AS $$
DECLARE
  n bigint;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM {schema}.audit_checkpoints WHERE tree_size = upto) THEN
    RAISE EXCEPTION 'audit records may be pruned only up to a signed checkpoint';
  END IF;
  PERFORM set_config('aegis.audit_prune_upto', upto::text, true);
  DELETE FROM {schema}.audit_records WHERE seq <= upto;
  GET DIAGNOSTICS n = ROW_COUNT;
  PERFORM set_config('aegis.audit_prune_upto', '', true);
  RETURN n;
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE TRIGGER audit_records_append_only BEFORE UPDATE OR DELETE ON audit_records
  FOR EACH ROW EXECUTE FUNCTION aegis_audit_records_guard();
CREATE OR REPLACE TRIGGER audit_records_no_truncate BEFORE TRUNCATE ON audit_records
  FOR EACH STATEMENT EXECUTE FUNCTION aegis_audit_refuse();
CREATE OR REPLACE TRIGGER audit_records_prune_prefix AFTER DELETE ON audit_records
  REFERENCING OLD TABLE AS gone
  FOR EACH STATEMENT EXECUTE FUNCTION aegis_audit_records_prefix();
CREATE OR REPLACE TRIGGER audit_tree_nodes_append_only BEFORE UPDATE OR DELETE ON audit_tree_nodes
  FOR EACH ROW EXECUTE FUNCTION aegis_audit_refuse();
CREATE OR REPLACE TRIGGER audit_tree_nodes_no_truncate BEFORE TRUNCATE ON audit_tree_nodes
  FOR EACH STATEMENT EXECUTE FUNCTION aegis_audit_refuse();
CREATE OR REPLACE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE
  ON audit_checkpoints FOR EACH ROW EXECUTE FUNCTION aegis_audit_refuse();
CREATE OR REPLACE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
  FOR EACH STATEMENT EXECUTE FUNCTION aegis_audit_refuse();
ALTER TABLE audit_records ENABLE TRIGGER audit_records_append_only;
ALTER TABLE audit_records ENABLE TRIGGER audit_records_no_truncate;
ALTER TABLE audit_records ENABLE TRIGGER audit_records_prune_prefix;
ALTER TABLE audit_tree_nodes ENABLE TRIGGER audit_tree_nodes_append_only;
ALTER TABLE audit_tree_nodes ENABLE TRIGGER audit_tree_nodes_no_truncate;
ALTER TABLE audit_checkpoints ENABLE TRIGGER audit_checkpoints_append_only;
ALTER TABLE audit_checkpoints ENABLE TRIGGER audit_checkpoints_no_truncate;
REVOKE ALL ON FUNCTION aegis_audit_prune(bigint) FROM PUBLIC;
COMMENT ON FUNCTION aegis_audit_records_guard() IS '{marker}';
"""

#: The triggers :data:`_DDL` creates; all of them, enabled, on the tables of this schema.
_TRIGGERS: Final = (
    "audit_records_append_only", "audit_records_no_truncate", "audit_records_prune_prefix",
    "audit_tree_nodes_append_only",
    "audit_tree_nodes_no_truncate", "audit_checkpoints_append_only",
    "audit_checkpoints_no_truncate",
)  # fmt: skip

#: Written as the guard function's comment; a database that carries it is left as it is, so a role
#: that may only INSERT and SELECT (not the tables' owner) starts without touching the DDL.
_MARKER: Final = "aegis audit append-only v3"


def install_append_only(engine: Engine) -> None:
    """Create or refresh the functions and triggers (idempotent; PostgreSQL only, else a no-op).

    An advisory lock serialises replicas starting together: concurrent ``CREATE OR REPLACE`` of
    one function can otherwise fail with "tuple concurrently updated"."""
    if engine.dialect.name != "postgresql":
        return
    with engine.begin() as conn:
        if _installed(conn):
            return
        older = _marker(conn)
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('aegis_audit_ddl'))"))
        schema = conn.execute(text("SELECT quote_ident(current_schema())")).scalar()
        if schema is None:
            raise RuntimeError("no current schema: set the connection's search_path")
        ddl = _DDL.replace("{marker}", _MARKER).replace("{schema}", str(schema))
        try:
            conn.exec_driver_sql(ddl)
        except DBAPIError as exc:
            if older is None or not str(older).startswith(_MARKER.rsplit(" ", 1)[0]):
                raise
            # An upgrade run by a role that may only read and append: say what to do.
            raise Unavailable(
                f"the audit log's append-only triggers are an older version ({older}) and this "
                "database role may not replace them: start this Aegis version once as the "
                "tables' owner, which upgrades them",
                code="audit_unavailable",
            ) from exc


def _marker(conn: Connection) -> str | None:
    """The comment on this schema's guard function (the installed version), if any."""
    found = conn.execute(
        text(
            "SELECT obj_description(p.oid, 'pg_proc') FROM pg_proc p "
            "WHERE p.proname = 'aegis_audit_records_guard' "
            "AND p.pronamespace = "
            "(SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
        )
    ).scalar()
    return None if found is None else str(found)


def _installed(conn: Connection) -> bool:
    """Whether this schema's guard function carries the marker and every trigger is on its
    table, firing in every session (``O``rigin or ``A``lways). A dropped or disabled trigger,
    one set to fire only for replication (``ENABLE REPLICA``: never in an ordinary session),
    or a second Aegis schema in the database, whose functions live elsewhere, is installed
    again, not taken as present."""
    marker = _marker(conn)
    if marker != _MARKER:
        return False
    enabled = conn.execute(
        text(
            "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON t.tgrelid = c.oid "
            "WHERE c.relnamespace = "
            "(SELECT oid FROM pg_namespace WHERE nspname = current_schema()) "
            "AND NOT t.tgisinternal "
            "AND t.tgenabled IN ('O', 'A') AND t.tgname = ANY(:names)"
        ),
        {"names": list(_TRIGGERS)},
    ).scalar()
    return enabled == len(_TRIGGERS)

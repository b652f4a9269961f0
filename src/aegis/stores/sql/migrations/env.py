"""Alembic environment: the engine is handed in by aegis.stores.sql.migrate."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from aegis.stores.sql.schema import METADATA

#: pg_advisory_xact_lock key: replicas starting together migrate one after another; the later
#: ones find the schema at head and do nothing, instead of failing on tables that now exist.
MIGRATION_LOCK_KEY = 0x6165676973  # "aegis"

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    context.configure(
        connection=connection,
        target_metadata=METADATA,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    context.run_migrations()

"""Alembic environment: the engine is handed in by aegis.stores.sql.migrate."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from aegis.stores.sql.engine import SCHEMA_LOCK_KEY
from aegis.stores.sql.schema import METADATA

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
    context.configure(
        connection=connection,
        target_metadata=METADATA,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    context.run_migrations()

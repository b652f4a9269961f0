"""Alembic environment: the engine is handed in by aegis.stores.sql.migrate."""

from __future__ import annotations

from alembic import context

from aegis.stores.sql.engine import lock_schema
from aegis.stores.sql.schema import METADATA

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    lock_schema(connection)
    context.configure(
        connection=connection,
        target_metadata=METADATA,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    context.run_migrations()

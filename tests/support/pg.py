"""Plain SQL on a scratch PostgreSQL database, outside Aegis (triggers a test adds and drops)."""

from __future__ import annotations

import psycopg
from sqlalchemy.engine import make_url


def run_sql(url: str, sql: str) -> None:
    """Run ``sql`` (several statements allowed) on the database of ``url``, autocommitted."""
    u = make_url(url)
    with psycopg.connect(host=u.host, port=u.port or 5432, user=u.username, dbname=u.database,
                         autocommit=True, connect_timeout=3) as conn:  # fmt: skip
        conn.execute(sql)  # type: ignore[arg-type]

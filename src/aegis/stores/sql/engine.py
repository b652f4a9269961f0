"""SQLAlchemy engines for the embedded default (SQLite, WAL mode) and PostgreSQL (psycopg 3).

Engines are made with ``hide_parameters=True``: a driver error's text would otherwise quote every
bound value of the failed statement (encrypted private keys, client secret and admin key hashes),
and that text travels as the ``__cause__`` of the errors the stores raise, into logs and reports.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Connection, Engine, MetaData, create_engine, event, text

from aegis.errors import ConfigError

__all__ = [
    "HOT_PATH_STATEMENT_TIMEOUT",
    "PG_TCP",
    "SCHEMA_LOCK_KEY",
    "create_tables",
    "lock_schema",
    "lock_transaction",
    "make_engine",
]

#: ``pg_advisory_xact_lock`` key of every schema change: the migrations, and the stores that
#: create their own tables. Replicas starting together change the schema one after another; the
#: later ones find it done and change nothing.
SCHEMA_LOCK_KEY: Final = 0x6165676973  # "aegis"


def _wal(cur: Any) -> None:
    """Put a SQLite database in WAL mode (kept in the file, so set once). Switching needs the
    database to itself, and SQLite answers "database is locked" at once, without waiting on
    busy_timeout, while another process opening the same new file switches it too (replicas
    starting together): retried for up to five seconds."""
    for attempt in range(50):
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or attempt == 49:
                raise
            time.sleep(0.1)


def lock_transaction(conn: Connection, key: int) -> None:
    """Serialise the transaction just begun on ``conn`` with every other one that takes ``key``
    (any process): PostgreSQL, a transaction-level advisory lock; SQLite, ``BEGIN IMMEDIATE``,
    the database's write lock (waiting out ``busy_timeout``). Call it before the transaction's
    first statement."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def lock_schema(conn: Connection) -> None:
    """Make the transaction just begun on ``conn`` the only one changing the schema until it ends.

    Two processes that both find a table missing would otherwise both create it and the later
    ``CREATE TABLE`` fails. PostgreSQL: :data:`SCHEMA_LOCK_KEY` (DDL is transactional there, so
    the lock is held until the tables are committed). SQLite: the Python driver runs DDL outside
    any transaction unless one was begun explicitly; ``BEGIN IMMEDIATE`` takes the database's
    write lock (waiting out ``busy_timeout``) and makes the check and the DDL one transaction.
    Call it before the first statement of the transaction. Waiting for the lock, and the schema
    change, are exempt from the engine's ``statement_timeout``: a replica that starts while
    another migrates waits for it instead of failing."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SET LOCAL statement_timeout = 0"))
    lock_transaction(conn, SCHEMA_LOCK_KEY)


def create_tables(metadata: MetaData, engine: Engine) -> None:
    """Create those of ``metadata``'s tables that do not exist yet, in one transaction that holds
    the schema lock (:func:`lock_schema`): replicas starting together all start, the later ones
    finding the tables made. SQLAlchemy errors propagate; each store reports them with its own
    code."""
    with engine.begin() as conn:
        lock_schema(conn)
        metadata.create_all(conn, checkfirst=True)


#: ``statement_timeout`` (seconds) of the stores the gateway reads on its calls' path (registry,
#: policy): a stalled database becomes their ``*_unavailable`` after at most this long.
HOT_PATH_STATEMENT_TIMEOUT: Final = 2.0

#: libpq's TCP settings for every PostgreSQL connection: a database host that vanishes (no reset,
#: no answer) is noticed within seconds, as an error the stores turn into ``*_unavailable``,
#: instead of after the kernel's retransmission timeout (about a quarter of an hour), during which
#: a caller would simply wait. ``tcp_user_timeout`` bounds unacknowledged data (milliseconds);
#: keepalives find dead idle pooled connections.
PG_TCP: Final = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
    "tcp_user_timeout": 5000,
}


def make_engine(url: str, *, statement_timeout: float | None = None) -> Engine:
    """An engine for ``url``; ``ConfigError`` naming ``database.url`` for any other kind of URL.

    ``statement_timeout`` (seconds, PostgreSQL): the server cancels any statement running longer,
    a lock wait included, and the store reports it unavailable. Set by the stores the gateway
    reads on every call; not by those whose long scans or schema changes may rightly take longer.
    """
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if path.split("?")[0] in ("", ":memory:") or "mode=memory" in path:
            # Each connection would get its own empty database: the migration would run on one
            # and the stores would read another, and no transaction would be visible to others.
            raise ConfigError(
                "database.url: SQLite needs a file: use sqlite:///PATH, not an in-memory database",
                key="database.url",
            )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            hide_parameters=True,
            connect_args={"timeout": 5.0, "check_same_thread": False},
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=5000")
            _wal(cur)
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    if url.startswith("postgresql+psycopg://"):
        connect_args: dict[str, Any] = {"connect_timeout": 3, **PG_TCP}
        if statement_timeout is not None:
            connect_args["options"] = f"-c statement_timeout={round(statement_timeout * 1000)}"
        return create_engine(
            url,
            hide_parameters=True,
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=10,
            connect_args=connect_args,
        )
    raise ConfigError(
        "database.url: use sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB",
        key="database.url",
    )

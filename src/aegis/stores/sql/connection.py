"""Connections, transactions and error translation shared by the SQL stores.

``atomic()`` is a real transaction: writes inside it commit together or not at all, and nested
``atomic()`` blocks join the outer one. The current transaction is held in a context variable, so
concurrent callers (threads of a pool, tasks) never share one. Driver errors are translated here,
at this one boundary: integrity errors become ``Conflict``, values the database refuses
``InvalidRequest``, everything else ``Unavailable``.

Values are checked before they are written, identically on every backend: a NUL character in a
text column (PostgreSQL text cannot hold one), a string longer than its column (PostgreSQL enforces
the length, SQLite would silently keep it), a lone surrogate anywhere (not encodable as UTF-8; JSON
parsing produces them from ``"\ud800"``) or a NaN or infinite number (SQLite turns NaN into NULL,
PostgreSQL keeps it, and a NaN ``tokens_not_before`` would never be later than a token's ``iat``)
is ``InvalidRequest`` naming the field. A record that one backend would accept is never refused by
another, and bad input is never reported as an outage.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from sqlalchemy import Connection, Engine, Row, String, Table, insert, select, update
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from aegis.errors import Conflict, InvalidRequest, NotFound, Unavailable
from aegis.stores.sql.engine import lock_transaction, make_engine

__all__ = ["SqlBase", "check_values", "storable"]


def storable(key: str) -> bool:
    """Whether a lookup key could be stored at all. One that could not (NUL, a lone surrogate)
    names no record: lookups answer NotFound or nothing, instead of a driver error that differs
    per backend (PostgreSQL refuses NUL, and no driver can encode a lone surrogate)."""
    return "\x00" not in key and _unstorable(key) is None


def _unstorable(value: Any) -> str | None:
    """Why a value, or anything nested in a JSON value, cannot be stored; None if it can."""
    if isinstance(value, float):
        return None if math.isfinite(value) else "must not hold NaN or infinity"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must be valid Unicode text (it holds a lone surrogate)"
        return None
    if isinstance(value, dict):
        items: list[Any] = [*value.keys(), *value.values()]
        return next((r for r in map(_unstorable, items) if r is not None), None)
    if isinstance(value, list | tuple):
        return next((r for r in map(_unstorable, value) if r is not None), None)
    return None


def check_values(table: Table, values: dict[str, Any], what: str) -> None:
    """Refuse values that some backend could not store exactly (see the module docstring)."""
    for name, value in values.items():
        reason = _unstorable(value)
        if reason is not None:
            raise InvalidRequest(f"{what} {name} {reason}", field=name)
        column_type = table.c[name].type
        if not isinstance(value, str) or not isinstance(column_type, String):
            continue
        if "\x00" in value:
            raise InvalidRequest(f"{what} {name} must not contain NUL characters", field=name)
        if column_type.length is not None and len(value) > column_type.length:
            raise InvalidRequest(
                f"{what} {name} is longer than {column_type.length} characters", field=name
            )


def _translate(exc: SQLAlchemyError, unavailable_code: str) -> Exception:
    if isinstance(exc, IntegrityError):
        return Conflict("the record already exists or references a missing one")
    if isinstance(exc, DataError):
        return InvalidRequest("a value does not fit its database column")
    return Unavailable("the database is unreachable or failed", code=unavailable_code)


class _Transaction:
    """The connection of the current ``atomic()`` block and the first write that failed in it."""

    __slots__ = ("conn", "failure")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.failure: Exception | None = None


class SqlBase:
    """Connection handling shared by the SQL stores.

    A statement that fails inside ``atomic()`` dooms the whole block, on every backend: PostgreSQL
    aborts the transaction at the first error while SQLite would carry on and commit the rest, so
    the stricter behaviour is the contract. Later statements in the block raise ``Conflict``, and
    leaving the block re-raises the first failure even if the caller caught it; it rolls back.
    """

    unavailable_code = "registry_unavailable"
    #: PostgreSQL ``statement_timeout`` (seconds) of an engine made from a URL; None: none.
    statement_timeout: float | None = None

    def __init__(self, engine: Engine | str) -> None:
        self.engine = (
            make_engine(engine, statement_timeout=self.statement_timeout)
            if isinstance(engine, str)
            else engine
        )
        self._tx: ContextVar[_Transaction | None] = ContextVar(
            f"aegis_sql_{id(self)}", default=None
        )
        #: The advisory lock of this store's ``atomic()`` blocks (one per store class).
        self._lock_key = zlib.crc32(f"aegis:{type(self).__name__}".encode())

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """One transaction for a read-modify-write of this store's records, serialised with
        every other ``atomic()`` block on the same database (any process): each one reads the
        rows it rewrites, and without the serialisation a write committed between another
        block's read and its write is lost (an agent edit overlapping a quarantine would write
        the agent back active). PostgreSQL: a transaction-level advisory lock per store class;
        SQLite: ``BEGIN IMMEDIATE`` (the database's write lock). Single statements outside a
        block take no such lock."""
        with self._begin(serialised=True):
            yield

    @contextlib.contextmanager
    def _begin(self, *, serialised: bool) -> Iterator[None]:
        if self._tx.get() is not None:
            yield  # join the outer transaction
            return
        try:
            with self.engine.begin() as conn:
                if serialised:
                    lock_transaction(conn, self._lock_key)
                tx = _Transaction(conn)
                token = self._tx.set(tx)
                try:
                    yield
                finally:
                    self._tx.reset(token)
                if tx.failure is not None:  # swallowed by the caller: still roll back
                    raise tx.failure
        except SQLAlchemyError as exc:
            raise _translate(exc, self.unavailable_code) from exc

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Connection]:
        tx = self._tx.get()
        if tx is None:
            with self._begin(serialised=False):
                tx = self._tx.get()
                assert tx is not None
                yield tx.conn
            return
        if tx.failure is not None:
            raise Conflict(
                "an earlier write in this transaction failed; it can only be rolled back"
            ) from tx.failure
        try:
            yield tx.conn
        except SQLAlchemyError as exc:
            tx.failure = _translate(exc, self.unavailable_code)
            raise tx.failure from exc

    def _one(self, table: Table, key: Any, col: str, what: str) -> Row[Any]:
        if isinstance(key, str) and not storable(key):
            raise NotFound(f"{what} {key!r} does not exist")
        with self._connection() as conn:
            row = conn.execute(select(table).where(table.c[col] == key)).first()
        if row is None:
            raise NotFound(f"{what} {key!r} does not exist")
        return row

    def _insert(self, table: Table, values: dict[str, Any], what: str) -> None:
        check_values(table, values, what)
        with self._connection() as conn:
            conn.execute(insert(table).values(**values))

    def _update(self, table: Table, col: str, key: Any, values: dict[str, Any], what: str) -> None:
        check_values(table, values, what)
        if isinstance(key, str) and not storable(key):
            raise NotFound(f"{what} {key!r} does not exist")
        with self._connection() as conn:
            result = conn.execute(update(table).where(table.c[col] == key).values(**values))
            if result.rowcount == 0:
                raise NotFound(f"{what} {key!r} does not exist")

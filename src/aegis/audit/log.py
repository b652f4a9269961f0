"""The audit log: an append-only SHA-256 hash chain of canonical JSON records (tamper-evident).

Each row stores ``prev_hash`` and ``hash = sha256(prev_hash || canonical_json(record))`` (hex, the
previous hash as its 64 ASCII characters), so changing, removing or reordering any row breaks every
hash after it; :meth:`AuditLog.verify_chain` walks the table and reports the first bad position.

:meth:`AuditLog.append` returns only after the row is committed, so a caller that appends before it
answers (the gateway) never answers for a decision that left no record. An append that cannot be
written raises ``Unavailable(audit_unavailable)``: the caller fails closed. Appends are linear: a
lock orders them inside one process, and the unique ``seq`` key orders them across processes.

SQLite runs in WAL mode with ``synchronous=FULL`` for this engine (a commit survives power loss, not
only a process crash). On PostgreSQL the audit tables refuse UPDATE, DELETE and TRUNCATE by trigger
(:mod:`aegis.audit.pg`); the only way past is the prune function, up to a signed checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Connection, Engine, event, func, insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from aegis.audit.pg import install_append_only
from aegis.audit.sql_tables import AUDIT_CHECKPOINTS, AUDIT_RECORDS, METADATA
from aegis.clock import Clock
from aegis.errors import Unavailable
from aegis.stores.sql.engine import create_tables, make_engine
from aegis.telemetry.metrics import AUDIT_BATCH_RECORDS

__all__ = ["GENESIS_HASH", "AuditLog", "ChainReport", "canonical_json", "record_hash"]

#: ``prev_hash`` of the first record.
GENESIS_HASH: Final = "0" * 64
_MAX_RETRIES: Final = 8
#: ``pg_advisory_xact_lock`` key every PostgreSQL append holds until its commit ("auditapp"):
#: replicas append one after the other instead of racing for the next ``seq`` (a replica that
#: lost the race had to read the tail back while the winner, its tail cached, won again).
_APPEND_LOCK: Final = 0x6175646974617070
#: PostgreSQL ``statement_timeout`` of the appending connection (ms): a stalled table (a lock
#: held elsewhere) refuses calls with ``audit_unavailable`` instead of holding them, and every
#: call queued behind them, without end. The lock wait above counts.
_APPEND_TIMEOUT_MS: Final = 3000
#: A writer connection idle this long (seconds) is checked before use: one the database dropped
#: while idle (a restart, a failover) is replaced rather than failing the first batch after.
_IDLE_CHECK: Final = 1.0
#: Records the writer thread appends in one statement at most (6 parameters each, well inside
#: SQLite's 999 bound parameters of older builds); more waiting are the next batch's.
_MAX_BATCH: Final = 128
#: Seconds the writer thread of :meth:`AuditLog.append_async` waits for work before it leaves.
_WRITER_IDLE: Final = 5.0

#: A record waiting for the writer thread: its canonical body, kind, and who waits for it.
_Waiting = tuple[str, str, asyncio.AbstractEventLoop, "asyncio.Future[tuple[int, str]]"]


def _resolve(done: list[tuple[asyncio.Future[Any], Any]]) -> None:
    """On the waiting loop: resolve each future with its ``(seq, hash)`` or the batch's error."""
    for future, result in done:
        if future.done():  # the caller was cancelled; its record is committed all the same
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def canonical_json(record: dict[str, Any]) -> str:
    """Sorted keys, no insignificant whitespace, UTF-8 text; NaN and Infinity are refused.

    A string holding a lone surrogate (JSON ``"\\ud800"`` from a caller) has no UTF-8 form: such
    a record is written with every non-ASCII character escaped instead, which is still its one
    canonical text (the same record always gives the same text), so it cannot fail its own write
    or the batch it shares."""
    text = json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    if not text.isascii() and _SURROGATE.search(text):
        text = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text


_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _kind_of(record: str) -> Any:
    """The ``kind`` a stored record's text names (None when it names none or is not JSON). Read
    as written (a lone surrogate included): the hash already binds the text."""
    try:
        body = json.loads(record)
    except ValueError:
        return None
    return body.get("kind") if isinstance(body, dict) else None


def record_hash(prev_hash: str, canonical: str) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The result of walking the chain. ``first_bad`` is the ``seq`` of the first row whose position,
    ``prev_hash``, ``hash`` or ``kind`` is wrong, or None when the whole chain verifies."""

    records: int
    first_bad: int | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad is None


def _durable_sqlite(dbapi_conn: Any, _record: Any) -> None:
    # After make_engine's pragmas (WAL, synchronous=NORMAL): an audit commit must reach the disk.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()


def _read_tail(conn: Connection) -> tuple[int, str]:
    """``(seq, hash)`` of the last record, where the next one continues the chain."""
    last = conn.execute(
        select(AUDIT_RECORDS.c.seq, AUDIT_RECORDS.c.hash)
        .order_by(AUDIT_RECORDS.c.seq.desc())
        .limit(1)
    ).first()
    return (int(last[0]), str(last[1])) if last else _pruned_tail(conn)


def _pruned_tail(conn: Connection) -> tuple[int, str]:
    """Where the chain continues when the table is empty: after the last checkpoint (every record
    was pruned up to it), or from the genesis."""
    row = conn.execute(
        select(AUDIT_CHECKPOINTS.c.tree_size, AUDIT_CHECKPOINTS.c.chain_hash)
        .order_by(AUDIT_CHECKPOINTS.c.tree_size.desc())
        .limit(1)
    ).first()
    return (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)


#: SQLite: a record at or below the newest checkpoint's tree size is refused, as a collision is.
#: Pruning stops at a checkpoint and keeps every record after the newest one, so with the
#: ``seq`` primary key every position a stale writer could take is refused. Only checkpoints
#: within the log count (a row written into the checkpoint table claiming more records than
#: there are is the checkpointer's to refuse, and must not stop every append).
_SQLITE_GUARD: Final = """
CREATE TRIGGER IF NOT EXISTS audit_records_after_checkpoints BEFORE INSERT ON audit_records
WHEN NEW.seq <= (
  SELECT COALESCE(MAX(tree_size), 0) FROM audit_checkpoints
  WHERE tree_size <= COALESCE((SELECT MAX(seq) FROM audit_records), tree_size)
)
BEGIN SELECT RAISE(ABORT, 'aegis: an audit record at or below a signed checkpoint'); END
"""


def _install_sqlite_guard(engine: Engine) -> None:
    if engine.dialect.name == "sqlite":
        with engine.begin() as conn:
            conn.exec_driver_sql(_SQLITE_GUARD)


def _unavailable(exc: BaseException) -> Unavailable:
    return Unavailable("the audit log cannot be written; call refused", code="audit_unavailable")


_SESSION_ENDED: Final = frozenset({"57P01", "57P02", "57P03", "57P05"})


def _connection_lost(exc: BaseException, dbapi: Any) -> bool:
    """Whether a driver error is a lost connection: no SQLSTATE from the server, class 08, or
    the server ending the session (57P01 admin shutdown, as ``pg_terminate_backend``, a fast
    restart or a failover do; 57P02 crash shutdown; 57P03 cannot connect now; 57P05 idle
    session timeout); not an answer such as a statement timeout (57014) or a constraint."""
    if not isinstance(exc, dbapi.OperationalError | dbapi.InterfaceError):
        return False
    state = getattr(exc, "sqlstate", None)
    return state is None or str(state).startswith("08") or state in _SESSION_ENDED


class AuditLog:
    """An audit log in a SQL database (SQLite embedded, PostgreSQL shared by replicas)."""

    def __init__(self, engine: Engine | str, *, clock: Clock) -> None:
        self._engine = make_engine(engine) if isinstance(engine, str) else engine
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine, "connect", _durable_sqlite)
        self._clock = clock
        self._lock = threading.Lock()
        #: ``(seq, hash)`` of the last record this instance committed, so that an append needs no
        #: read first on SQLite. Another writer (process or replica) that appended since makes the
        #: insert collide on the ``seq`` primary key; the tail is then read again and the append
        #: retried. A prune may have freed the position after a stale tail, which then no longer
        #: collides: on SQLite a trigger refuses a record at or below a checkpoint's tree size
        #: (pruning stops at a checkpoint, and every record past the newest one is kept), and on
        #: PostgreSQL the tail is read under the append lock for every batch. So a stale tail can
        #: delay an append but never fork or skip the chain.
        self._tail: tuple[int, str] | None = None
        # The multi-row INSERT of each batch size, in the engine's own dialect and parameter
        # style (compiled on first use, see ``_statement``); the driver's error classes.
        self._inserts: dict[int, tuple[str, list[str] | None]] = {}
        self._dbapi: Any = self._engine.dialect.loaded_dbapi
        self._raw: Any = None
        self._raw_used = 0.0  # clock.monotonic() of the writer connection's last batch
        self._serialised = self._engine.dialect.name == "postgresql"
        self._tail_sql = str(
            select(AUDIT_RECORDS.c.seq, AUDIT_RECORDS.c.hash)
            .order_by(AUDIT_RECORDS.c.seq.desc())
            .limit(1)
            .compile(dialect=self._engine.dialect, compile_kwargs={"literal_binds": True})
        )
        # Records waiting for the writer thread (``_pending``, under ``_wake``), and whether that
        # thread is running; see :meth:`append_async`.
        self._wake = threading.Condition(threading.Lock())
        self._pending: list[_Waiting] = []
        self._writer_running = False
        #: Loops that will wake the writer thread once their current pass has run (see
        #: :meth:`append_async`), and whether :meth:`close` was called (an idle writer leaves).
        self._kicks: set[asyncio.AbstractEventLoop] = set()
        self._closed = False
        self._thread: threading.Thread | None = None  # the latest writer thread started
        try:
            create_tables(METADATA, self._engine)
            install_append_only(self._engine)
            _install_sqlite_guard(self._engine)
        except Exception as exc:
            if isinstance(engine, str):  # ours: no connection outlives a log that never started
                self._engine.dispose()
            if isinstance(exc, SQLAlchemyError):
                raise _unavailable(exc) from exc
            raise

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        with self._wake:  # an idle writer thread leaves now rather than after its idle wait
            self._closed = True
            self._wake.notify()
        with self._lock:
            self._drop_writer()
        self._engine.dispose()

    def append(self, kind: str, record: dict[str, Any]) -> tuple[int, str]:
        """Append one record durably; return its ``(seq, hash)``."""
        return self._append_batch([canonical_json({**record, "kind": kind})], [kind])[0]

    def _writer(self) -> Any:
        """The DBAPI connection appends are written on, checked out of the engine's pool once and
        kept (under ``_lock``): the engine's connect hooks ran on it (WAL, ``synchronous=FULL``),
        and a bare INSERT on it costs a quarter of the same through a SQLAlchemy ``Connection``
        per batch. On SQLite it is in autocommit mode, so a batch is one statement, atomic and
        durable by itself: one driver call, not BEGIN, INSERT and COMMIT (each of which hands
        the GIL to the event loop and waits to take it back). On PostgreSQL a batch is one
        transaction holding :data:`_APPEND_LOCK`, under :data:`_APPEND_TIMEOUT_MS`. Any error but
        a lost race drops it; the next append takes a fresh one, as does one after the
        connection sat idle and no longer answers."""
        idle = self._clock.monotonic() - self._raw_used
        if self._serialised and self._raw is not None and idle > _IDLE_CHECK:
            try:
                cursor = self._raw.cursor()
                try:
                    cursor.execute("SELECT 1")
                finally:
                    cursor.close()
                self._raw.rollback()
            except Exception:  # dropped while idle: a fresh one below
                self._drop_writer()
        if self._raw is None:
            raw = self._engine.raw_connection()
            driver: Any = raw.driver_connection
            if self._engine.dialect.name == "sqlite":
                driver.isolation_level = None  # no implicit BEGIN: each statement commits
            elif self._serialised:
                cursor = raw.cursor()
                try:
                    cursor.execute(f"SET statement_timeout = {_APPEND_TIMEOUT_MS}")
                finally:
                    cursor.close()
                raw.commit()
            elif hasattr(driver, "autocommit"):
                driver.autocommit = True
            self._raw = raw
        self._raw_used = self._clock.monotonic()
        return self._raw

    def _statement(self, rows: int) -> tuple[str, list[str] | None]:
        """The INSERT of ``rows`` records and, for positional drivers, its parameters' order
        (``seq_m0``, ``time_m0``, …); compiled once per batch size."""
        known = self._inserts.get(rows)
        if known is None:
            columns = [c.name for c in AUDIT_RECORDS.c]
            many = insert(AUDIT_RECORDS).values([dict.fromkeys(columns)] * rows)
            compiled = many.compile(dialect=self._engine.dialect)
            known = self._inserts[rows] = (str(compiled), compiled.positiontup)
        return known

    def _drop_writer(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            with contextlib.suppress(Exception):
                raw.invalidate()  # closes the DBAPI connection rather than pooling it again

    def _append_batch(self, bodies: list[str], kinds: list[str]) -> list[tuple[int, str]]:
        """Append records in order in one transaction (one commit, one disk wait)."""
        now = self._clock.now()
        dbapi = self._dbapi
        with self._lock:
            reconnected = False
            for _ in range(_MAX_RETRIES):
                reused, committing = self._raw is not None, False
                try:
                    raw = self._writer()
                    if self._serialised:
                        # Held until the commit: no other replica appends in between, so a tail
                        # read here is the tail the insert continues.
                        self._locked_tail(raw)
                    if self._tail is None:
                        with self._engine.connect() as conn:
                            self._tail = _read_tail(conn)
                    seq, prev = self._tail
                    params: dict[str, Any] = {}
                    out = []
                    for i, (body, kind) in enumerate(zip(bodies, kinds, strict=True)):
                        seq, digest = seq + 1, record_hash(prev, body)
                        params[f"seq_m{i}"], params[f"time_m{i}"] = seq, now
                        params[f"kind_m{i}"], params[f"record_m{i}"] = kind, body
                        params[f"prev_hash_m{i}"], params[f"hash_m{i}"] = prev, digest
                        out.append((seq, digest))
                        prev = digest
                    sql, order = self._statement(len(bodies))
                    cursor = raw.cursor()
                    try:
                        cursor.execute(sql, params if order is None else [params[k] for k in order])
                    finally:
                        cursor.close()
                    committing = True
                    raw.commit()  # nothing to do in autocommit mode; commits where there is none
                    self._tail = out[-1]
                    AUDIT_BATCH_RECORDS.observe(len(out))
                    return out
                except (IntegrityError, dbapi.IntegrityError):
                    # Another writer took this position: read the new tail and retry.
                    self._tail = None
                    self._rollback()
                    continue
                except (SQLAlchemyError, dbapi.Error) as exc:
                    # The commit may or may not have happened: read the tail back next time.
                    self._tail = None
                    self._drop_writer()
                    if committing and self._committed(out[-1]):
                        # The reply was lost, not the commit: the records are in the log, and
                        # their calls must not be refused as if unrecorded.
                        self._tail = out[-1]
                        AUDIT_BATCH_RECORDS.observe(len(out))
                        return out
                    if (
                        self._serialised
                        and reused
                        and not committing
                        and not reconnected
                        and _connection_lost(exc, dbapi)
                    ):
                        # The database dropped the kept connection (a restart, a failover)
                        # before this batch's commit was sent, so nothing of it was written:
                        # once more on a fresh connection rather than refusing its calls.
                        reconnected = True
                        continue
                    raise _unavailable(exc) from exc
                except BaseException:
                    # Anything else (a bug, a cancellation): the connection may hold an open
                    # transaction, and on PostgreSQL the append lock with it, which would stall
                    # every replica's appends; it is closed, and the tail read back next time.
                    self._tail = None
                    self._drop_writer()
                    raise
        raise Unavailable("the audit log is contended; call refused", code="audit_unavailable")

    def _committed(self, last: tuple[int, str]) -> bool:
        """Whether the batch ending with ``last`` is in the log (its commit's reply was lost),
        asked on a fresh connection; False when that cannot be told either. On PostgreSQL the
        append lock is taken first: the lost transaction holds it until its commit is done, and
        a look before that would not see the rows yet."""
        try:
            with self._engine.begin() as conn:
                if self._serialised:
                    conn.exec_driver_sql(f"SET LOCAL statement_timeout = {_APPEND_TIMEOUT_MS}")
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_APPEND_LOCK})")
                stored = conn.execute(
                    select(AUDIT_RECORDS.c.hash).where(AUDIT_RECORDS.c.seq == last[0])
                ).scalar_one_or_none()
        except SQLAlchemyError:
            return False
        return stored == last[1]

    def _locked_tail(self, raw: Any) -> None:
        """Take :data:`_APPEND_LOCK` in the writer's transaction and read the tail there, the
        one the insert continues: a tail this instance remembers may be stale and its next
        position freed by a prune, which no collision would then reveal. (The table is empty
        only once every record was pruned: the tail is then read after the checkpoint, below.)"""
        cursor = raw.cursor()
        try:
            cursor.execute(f"SELECT pg_advisory_xact_lock({_APPEND_LOCK})")
            cursor.execute(self._tail_sql)
            row = cursor.fetchone()
            self._tail = (int(row[0]), str(row[1])) if row is not None else None
        finally:
            cursor.close()

    def _rollback(self) -> None:
        try:
            if self._raw is not None:
                self._raw.rollback()
        except Exception:  # a connection that cannot roll back is not used again
            self._drop_writer()

    async def append_async(self, kind: str, record: dict[str, Any]) -> tuple[int, str]:
        """:meth:`append` without blocking the event loop, with group commit: the record goes to
        this log's writer thread, which writes everything that queued up while its previous
        commit was in flight in one statement. Each caller still returns only once its own
        record is committed (or fails closed with ``audit_unavailable`` when its batch failed).

        A waiting writer is woken once per pass of the event loop, after the pass's other ready
        callbacks, rather than once per record: the calls decided in the same pass share one
        commit. On a busy core, waking it per record made nearly every batch one record long,
        and the wake-ups and GIL hand-overs cost the loop more than the commits did.

        One long-lived thread hands results back with ``call_soon_threadsafe``; a default-executor
        hop per batch (``asyncio.to_thread``) costs about as much again in wake-ups and futures as
        the append's own work. The thread starts on the first append and leaves after
        :data:`_WRITER_IDLE` seconds without one."""
        body = canonical_json({**record, "kind": kind})
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, str]] = loop.create_future()
        with self._wake:
            self._pending.append((body, kind, loop, future))
            if self._writer_running:
                if loop not in self._kicks:  # the first record of this pass of the loop
                    self._kicks.add(loop)
                    loop.call_soon(self._kick, loop)
            else:
                writer = threading.Thread(target=self._write_loop, name="aegis-audit", daemon=True)
                try:
                    writer.start()
                except RuntimeError as exc:  # no thread to be had: refuse, leave nothing queued
                    self._pending.pop()
                    raise _unavailable(exc) from exc
                self._writer_running, self._thread = True, writer
        return await future

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._wake:
            self._kicks.discard(loop)
            self._wake.notify()

    def _write_loop(self) -> None:
        """The writer thread: take everything pending, append it as one batch, deliver; leave
        when idle. Should the thread itself fail, no caller is left waiting for it."""
        batch: list[_Waiting] = []
        try:
            while True:
                with self._wake:
                    idle_until = time.monotonic() + _WRITER_IDLE
                    while not self._pending:  # a kick may find the batch already taken
                        left = idle_until - time.monotonic()
                        if self._closed or left <= 0:
                            self._writer_running = False
                            return
                        self._wake.wait(left)
                    batch = self._pending[:_MAX_BATCH]
                    del self._pending[:_MAX_BATCH]
                self._write(batch)
                batch = []
        except BaseException as exc:
            with self._wake:
                self._writer_running = False
                stranded, self._pending = batch + self._pending, []
            self._deliver(stranded, _unavailable(exc))
            raise

    def _write(self, batch: list[_Waiting]) -> None:
        outcome: list[tuple[int, str]] | Exception
        try:
            outcome = self._append_batch([b for b, _, _, _ in batch], [k for _, k, _, _ in batch])
        except Exception as exc:  # every waiter fails closed with the same error
            outcome = exc if isinstance(exc, Unavailable) else _unavailable(exc)
        self._deliver(batch, outcome)

    @staticmethod
    def _deliver(batch: list[_Waiting], outcome: list[tuple[int, str]] | Exception) -> None:
        """Hand each waiter its ``(seq, hash)``, or the batch's error, on its own event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        for i, (_, _, loop, future) in enumerate(batch):
            result = outcome if isinstance(outcome, Exception) else outcome[i]
            by_loop.setdefault(loop, []).append((future, result))
        for loop, done in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits
                loop.call_soon_threadsafe(_resolve, done)

    def count(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(AUDIT_RECORDS)).scalar_one())

    def records(self, *, kind: str | None = None) -> Iterator[dict[str, Any]]:
        """Every record in chain order (decoded), optionally of one kind."""
        query = select(AUDIT_RECORDS.c.record).order_by(AUDIT_RECORDS.c.seq)
        if kind is not None:
            query = query.where(AUDIT_RECORDS.c.kind == kind)
        with self._engine.connect() as conn:
            for (text,) in conn.execute(query):
                yield json.loads(text)

    def verify_chain(self) -> ChainReport:
        """Recompute every hash in order; report the first position that does not verify.

        After a prune the walk starts at the first remaining record, whose ``prev_hash`` must be
        the chain head that the signed checkpoint at the prune point recorded."""
        with self._engine.connect() as conn:
            first = conn.execute(select(func.min(AUDIT_RECORDS.c.seq))).scalar()
            # An empty table is a log pruned up to its newest checkpoint (the chain continues
            # from there, as appends do), or one never written.
            start = _pruned_tail(conn)[0] if first is None else int(first) - 1
            prev = GENESIS_HASH
            if start:
                head = conn.execute(
                    select(AUDIT_CHECKPOINTS.c.chain_hash).where(
                        AUDIT_CHECKPOINTS.c.tree_size == start
                    )
                ).scalar()
                if head is None:
                    return ChainReport(0, 1, "records before this position are missing")
                prev = head
        # Checkpoints recorded the chain head at their size: a chain recomputed after an edit,
        # or cut short below a checkpoint, disagrees with them (records after the newest
        # checkpoint have no such witness; checkpoint signatures are checked by export
        # verification, which holds the keys).
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(AUDIT_CHECKPOINTS.c.tree_size, AUDIT_CHECKPOINTS.c.chain_hash)
            )
            witnessed = {int(size): str(head) for size, head in rows}
        expected, count = start + 1, 0
        query = select(
            AUDIT_RECORDS.c.seq,
            AUDIT_RECORDS.c.kind,
            AUDIT_RECORDS.c.record,
            AUDIT_RECORDS.c.prev_hash,
            AUDIT_RECORDS.c.hash,
        ).order_by(AUDIT_RECORDS.c.seq)
        with self._engine.connect() as conn:
            for seq, kind, body, prev_hash, digest in conn.execute(query):
                count += 1
                if seq != expected:
                    return ChainReport(count, expected, "a record is missing at this position")
                if prev_hash != prev:
                    return ChainReport(count, seq, "prev_hash does not match the previous record")
                if record_hash(prev_hash, body) != digest:
                    return ChainReport(count, seq, "the record does not match its hash")
                # The kind column is outside the hash, and what records(kind=...) and the
                # sinks read: it must say what the hashed record says.
                if _kind_of(body) != kind:
                    return ChainReport(count, seq, "the kind column does not match the record")
                if seq in witnessed and witnessed[seq] != digest:
                    return ChainReport(
                        count, seq, "the chain head differs from the checkpoint at this size"
                    )
                prev, expected = digest, expected + 1
        beyond = [size for size in witnessed if size >= expected]
        if beyond:
            return ChainReport(
                count, expected, f"records up to the checkpoint at {max(beyond)} are missing"
            )
        return ChainReport(count, None)

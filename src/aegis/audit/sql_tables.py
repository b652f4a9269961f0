"""SQL table of the audit log (SQLAlchemy Core): one append-only, hash-chained row per record.

The table has its own :class:`~sqlalchemy.MetaData` and is created idempotently by
:class:`aegis.audit.log.AuditLog` (``create_all`` with ``checkfirst``), so the audit log can live in
the registry's database or in one of its own. ``seq`` is the primary key and has no gaps: a writer
inserts ``seq = last + 1`` with ``prev_hash`` = the last row's ``hash``, so two writers racing for
the same position (two replicas on one PostgreSQL) collide on the key and one retries; the chain
therefore stays linear across processes, not only inside one.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import Column, Float, Index, Integer, MetaData, String, Table, Text

__all__ = ["AUDIT_RECORDS", "METADATA"]

METADATA: Final = MetaData()

AUDIT_RECORDS: Final = Table(
    "audit_records",
    METADATA,
    #: Position in the chain, from 1, without gaps.
    Column("seq", Integer, primary_key=True, autoincrement=False),
    #: When the record was appended (unix seconds, the injected clock).
    Column("time", Float, nullable=False),
    #: The record kind, e.g. ``gateway.decision`` (also inside ``record``; here for queries).
    Column("kind", String(64), nullable=False),
    #: The canonical JSON of the record: sorted keys, no whitespace, UTF-8.
    Column("record", Text, nullable=False),
    #: Hex SHA-256 of the previous row (64 zeros for the first row).
    Column("prev_hash", String(64), nullable=False),
    #: Hex SHA-256 of ``prev_hash || record``.
    Column("hash", String(64), nullable=False, unique=True),
    Index("ix_audit_records_time", "time"),
)

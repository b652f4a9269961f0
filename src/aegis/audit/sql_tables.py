"""SQL table of the audit log (SQLAlchemy Core): one append-only, hash-chained row per record.

The table has its own :class:`~sqlalchemy.MetaData` and is created idempotently by
:class:`aegis.audit.log.AuditLog` (``create_all`` with ``checkfirst``), so the audit log can live in
the registry's database or in one of its own. ``seq`` is the primary key and has no gaps: a writer
inserts ``seq = last + 1`` with ``prev_hash`` = the last row's ``hash``, so two writers racing for
the same position (two replicas on one PostgreSQL) collide on the key and one retries; the chain
therefore stays linear across processes, not only inside one.

Beside it, two more append-only tables: ``audit_tree_nodes`` holds the hash of every perfect
subtree of the RFC 9162 Merkle tree over the records (leaf ``seq`` is leaf index ``seq - 1``), so a
proof reads O(log n) rows; ``audit_checkpoints`` holds the signed tree heads. Neither holds record
content, and pruning (:mod:`aegis.audit.retention`) leaves both in place.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

__all__ = ["AUDIT_CHECKPOINTS", "AUDIT_RECORDS", "AUDIT_TREE_NODES", "METADATA"]

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

AUDIT_TREE_NODES: Final = Table(
    "audit_tree_nodes",
    METADATA,
    #: 0 for leaf hashes; a node at ``level`` covers leaves ``[idx * 2**level, (idx + 1) * 2**level)``.
    Column("level", Integer, nullable=False, autoincrement=False),
    Column("idx", BigInteger, nullable=False, autoincrement=False),
    #: SHA-256 leaf hash (0x00 prefix) or node hash (0x01 prefix), 32 bytes.
    Column("hash", LargeBinary(32), nullable=False),
    PrimaryKeyConstraint("level", "idx", name="pk_audit_tree_nodes"),
)

AUDIT_CHECKPOINTS: Final = Table(
    "audit_checkpoints",
    METADATA,
    #: Number of records (leaves) the checkpoint covers.
    Column("tree_size", BigInteger, primary_key=True, autoincrement=False),
    Column("time", Float, nullable=False),
    #: Hex RFC 9162 root hash of the first ``tree_size`` records.
    Column("root_hash", String(64), nullable=False),
    #: Hex hash-chain head (``hash`` of record ``tree_size``).
    Column("chain_hash", String(64), nullable=False),
    #: The compact JWS (``typ aegis-checkpoint+jwt``) signed with the key ring.
    Column("token", Text, nullable=False),
)

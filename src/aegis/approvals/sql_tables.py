"""SQL table of approval requests (SQLAlchemy Core), with its own :class:`~sqlalchemy.MetaData`.

:class:`aegis.approvals.store.SqlApprovalStore` creates it idempotently (``create_all`` with
``checkfirst``) in the configured database, so pending requests survive a restart and are shared
by every gateway replica on one PostgreSQL. ``open_digest`` holds the call digest only while the
request is open (recording, pending, approving or approved) and is NULL afterwards; its unique
index is what makes "the same call while one is open gets the same id" hold across processes (NULLs
never collide).
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import Column, Float, Index, Integer, MetaData, String, Table, Text

__all__ = ["APPROVAL_REQUESTS", "METADATA"]

METADATA: Final = MetaData()

APPROVAL_REQUESTS: Final = Table(
    "approval_requests",
    METADATA,
    Column("id", String(64), primary_key=True),
    #: recording | pending | approving | approved | denied | expired | used
    Column("state", String(16), nullable=False),
    #: The call digest while the request is open, else NULL (unique: one open request per call).
    Column("open_digest", String(80), nullable=True, unique=True),
    Column("digest", String(80), nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("env", String(64), nullable=False),
    Column("agent_id", String(128), nullable=False),
    Column("agent_owner", String(256), nullable=False),
    Column("tool", String(256), nullable=False),
    Column("grp", String(256), nullable=False),
    Column("channel", String(256), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("decided_at", Float, nullable=True),
    Column("decided_by", String(256), nullable=True),
    Column("override_expires_at", Float, nullable=True),
    Column("notify_state", String(16), nullable=False),
    Column("notify_attempts", Integer, nullable=False),
    #: Everything else (method, path, redacted parameters, rules, chain, reasons, decision
    #: reason and channel, last delivery error) as canonical JSON.
    Column("body", Text, nullable=False),
    Index("ix_approval_requests_state", "state", "expires_at"),
)

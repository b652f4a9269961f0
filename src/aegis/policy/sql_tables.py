"""SQL tables of the policy store (content-addressed versions, per-scope activations).

Their own :class:`~sqlalchemy.MetaData`, so they can be folded into the Alembic migrations as one
unit; until then :class:`aegis.policy.store.SqlPolicyStore` creates them idempotently.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import Column, Float, Index, Integer, MetaData, String, Table, Text

__all__ = ["METADATA", "POLICY_ACTIVATIONS", "POLICY_VERSIONS"]

METADATA: Final = MetaData()

#: Every validated document ever stored, keyed by its content address ``sha256:<64 hex>``.
POLICY_VERSIONS: Final = Table(
    "policy_versions",
    METADATA,
    Column("version", String(71), primary_key=True),
    Column("name", String(64), nullable=False),
    #: The canonical JSON that hashes to ``version`` (re-checked on every read).
    Column("document", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_policy_versions_name", "name"),
)

#: Append-only activation history; the newest row per (tenant, env) is the active version.
POLICY_ACTIVATIONS: Final = Table(
    "policy_activations",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant", String(64), nullable=False),
    Column("env", String(64), nullable=False),
    Column("version", String(71), nullable=False),
    Column("activated_at", Float, nullable=False),
    Column("actor", String(256), nullable=False),
    Index("ix_policy_activations_scope", "tenant", "env", "id"),
)

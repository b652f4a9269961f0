"""SQL tables of the registry and the signing-key store (SQLAlchemy Core).

Times are float epoch seconds; lists and mappings are JSON. The Alembic migrations in
``migrations/versions`` create exactly these tables; a test checks they agree.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
)

__all__ = [
    "ADMIN_KEYS",
    "AGENTS",
    "CLIENTS",
    "ENVIRONMENTS",
    "EVENTS",
    "METADATA",
    "SIGNING_KEYS",
    "TENANTS",
]

METADATA: Final = MetaData()

TENANTS: Final = Table(
    "tenants",
    METADATA,
    Column("id", String(64), primary_key=True),
    Column("display_name", String(256), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
)

ENVIRONMENTS: Final = Table(
    "environments",
    METADATA,
    Column("tenant_id", String(64), ForeignKey("tenants.id"), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
)

AGENTS: Final = Table(
    "agents",
    METADATA,
    Column("id", String(64), primary_key=True),
    Column("tenant_id", String(64), ForeignKey("tenants.id"), nullable=False),
    Column("env", String(64), nullable=False),
    Column("display_name", String(256), nullable=False),
    Column("owner", String(320), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("roles", JSON, nullable=False),
    Column("allowed_scopes", JSON, nullable=False),
    Column("software_version", String(128)),
    Column("model", String(128)),
    Column("attributes", JSON, nullable=False),
    Column("jwks", JSON, nullable=False),
    Column("tokens_not_before", Float, nullable=False),
    Index("ix_agents_tenant_env", "tenant_id", "env"),
)

CLIENTS: Final = Table(
    "clients",
    METADATA,
    Column("client_id", String(128), primary_key=True),
    Column("agent_id", String(64), ForeignKey("agents.id"), nullable=False),
    Column("auth_method", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("active", Boolean, nullable=False),
    Column("secrets", JSON, nullable=False),
    Column("dpop_bound", Boolean, nullable=False),
    Column("tls_san_uri", String(2048)),
    #: Tokens of this client issued before this instant are invalid (the client was disabled).
    Column("tokens_not_before", Float, nullable=False, server_default="0"),
    Index("ix_clients_agent", "agent_id"),
)

ADMIN_KEYS: Final = Table(
    "admin_keys",
    METADATA,
    Column("key_id", String(64), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("role", String(16), nullable=False),
    Column("hash", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked", Boolean, nullable=False),
)

EVENTS: Final = Table(
    "events",
    METADATA,
    Column("id", String(64), primary_key=True),
    Column("at", Float, nullable=False),
    Column("type", String(64), nullable=False),
    Column("actor", String(256), nullable=False),
    Column("subject", String(256), nullable=False),
    Column("tenant_id", String(64)),
    Column("data", JSON, nullable=False),
    Index("ix_events_at", "at"),
)

SIGNING_KEYS: Final = Table(
    "signing_keys",
    METADATA,
    Column("kid", String(64), primary_key=True),
    Column("alg", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("public_jwk", JSON, nullable=False),
    Column("private_blob", LargeBinary),
    Column("created_at", Float, nullable=False),
    Column("activated_at", Float),
    Column("retired_at", Float),
    Column("remove_after", Float),
)

"""SQL tables of the internal CA (RFC 5280 serials and revocations), with their own MetaData.

Kept apart from the registry tables so the PKI can be folded into the Alembic migrations on its
own; until then :class:`aegis.pki.store.CertificateStore` creates them idempotently.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import Column, Float, Index, MetaData, String, Table

__all__ = ["BOOTSTRAP_TOKENS", "CERTIFICATES", "METADATA"]

METADATA: Final = MetaData()

#: Every certificate the CA issued. ``serial`` is the lowercase hex serial number.
CERTIFICATES: Final = Table(
    "pki_certificates",
    METADATA,
    Column("serial", String(40), primary_key=True),
    Column("agent_id", String(64), nullable=False),
    Column("tenant_id", String(64), nullable=False),
    Column("env", String(64), nullable=False),
    Column("spiffe_id", String(2048), nullable=False),
    #: Subject key identifier (hex) of the issuing intermediate: which CRL lists this serial.
    Column("issuer_ski", String(64), nullable=False),
    Column("x5t_s256", String(64), nullable=False),
    Column("not_before", Float, nullable=False),
    Column("not_after", Float, nullable=False),
    Column("issued_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
    Column("revocation_reason", String(64), nullable=True),
    #: The OAuth client whose credentials enrolled the certificate (None: a bootstrap token, an
    #: operator, the CA's own process): disabling that client ends it, as it ends its tokens.
    Column("enrolled_by", String(128), nullable=True),
    Index("ix_pki_certificates_agent", "agent_id"),
    Index("ix_pki_certificates_not_after", "not_after"),
)

#: The revoked certificates alone (a partial index): the gateway reads their count and latest
#: time every second to notice a revocation made anywhere (``revocation_mark``).
REVOKED_INDEX: Final = Index(
    "ix_pki_certificates_revoked",
    CERTIFICATES.c.revoked_at,
    postgresql_where=CERTIFICATES.c.revoked_at.is_not(None),
    sqlite_where=CERTIFICATES.c.revoked_at.is_not(None),
)

#: One-time enrolment tokens, stored only as a keyed hash.
BOOTSTRAP_TOKENS: Final = Table(
    "pki_bootstrap_tokens",
    METADATA,
    Column("token_hash", String(128), primary_key=True),
    Column("agent_id", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float, nullable=True),
)

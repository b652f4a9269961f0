"""Small value types shared by every layer: registry records, key records and statuses.

These are plain frozen dataclasses: stores persist them, services return them, and nothing here
talks to a database or the network. Change a record with :func:`dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "AdminKey",
    "AdminRole",
    "Agent",
    "AgentStatus",
    "Client",
    "ClientAuthMethod",
    "ClientSecret",
    "Environment",
    "Event",
    "KeyState",
    "SigningKeyRecord",
    "Tenant",
    "TenantStatus",
]


class AgentStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    QUARANTINED = "quarantined"
    RETIRED = "retired"


class TenantStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


class ClientAuthMethod(StrEnum):
    """Token endpoint authentication methods (RFC 6749 §2.3, RFC 7523, RFC 8705)."""

    CLIENT_SECRET_BASIC = "client_secret_basic"
    CLIENT_SECRET_POST = "client_secret_post"
    PRIVATE_KEY_JWT = "private_key_jwt"
    TLS_CLIENT_AUTH = "tls_client_auth"
    SELF_SIGNED_TLS_CLIENT_AUTH = "self_signed_tls_client_auth"


class KeyState(StrEnum):
    """Signing key life cycle: published before it signs, published after it stops signing."""

    NEXT = "next"
    ACTIVE = "active"
    RETIRED = "retired"
    #: Past its overlap: kept without its private key, out of the JWKS and verifying nothing, so
    #: that what it signed (attestations, audit checkpoints) can still be checked.
    ARCHIVED = "archived"


class AdminRole(StrEnum):
    ADMIN = "admin"  # everything
    OPERATOR = "operator"  # registry and key operations, no admin-key management
    AUDITOR = "auditor"  # read-only


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    display_name: str
    status: TenantStatus
    created_at: float


@dataclass(frozen=True, slots=True)
class Environment:
    tenant_id: str
    name: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Agent:
    """One agent identity. ``id`` is unique across the whole registry."""

    id: str
    tenant_id: str
    env: str
    display_name: str
    #: The accountable human (an e-mail address); required.
    owner: str
    status: AgentStatus
    created_at: float
    updated_at: float
    roles: tuple[str, ...] = ()
    #: The scopes this agent may ever hold; token requests are narrowed to these.
    allowed_scopes: tuple[str, ...] = ()
    software_version: str | None = None
    model: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    #: Registered public JWKs (private_key_jwt assertions, DPoP, delegation grants).
    jwks: tuple[dict[str, Any], ...] = ()
    #: Tokens issued before this instant are invalid (suspend, quarantine, retire, key loss).
    tokens_not_before: float = 0.0


@dataclass(frozen=True, slots=True)
class ClientSecret:
    """A stored secret: only its keyed hash, never the secret."""

    hash: str
    created_at: float
    #: None while current; set when rotated away, after which it stops working.
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Client:
    """An OAuth client bound to exactly one agent."""

    client_id: str
    agent_id: str
    auth_method: ClientAuthMethod
    created_at: float
    active: bool = True
    secrets: tuple[ClientSecret, ...] = ()
    #: Always issue DPoP-bound tokens to this client; a request without a proof is refused.
    dpop_bound: bool = False
    #: For tls_client_auth: the SAN URI the client certificate must carry.
    tls_san_uri: str | None = None
    #: Tokens issued to this client before this instant are invalid (it was disabled).
    tokens_not_before: float = 0.0


@dataclass(frozen=True, slots=True)
class AdminKey:
    key_id: str
    name: str
    role: AdminRole
    hash: str
    created_at: float
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class Event:
    """A lifecycle event for the audit log (agent suspended, secret rotated, key rotated ...)."""

    id: str
    at: float
    type: str
    actor: str
    subject: str
    tenant_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SigningKeyRecord:
    """A token-signing key as stored: the private key only as an encrypted blob."""

    kid: str
    alg: str
    state: KeyState
    public_jwk: dict[str, Any]
    #: AES-GCM ciphertext of the raw private key (see aegis.crypto.keyring); None for HSM keys.
    private_blob: bytes | None
    created_at: float
    activated_at: float | None = None
    retired_at: float | None = None
    #: After this instant a retired key is dropped from the JWKS and the store.
    remove_after: float | None = None

"""The one Aegis error tree, and the table that maps each stable code to its HTTP face.

    AegisError                      every error Aegis raises on purpose
     ├── ConfigError                a setting is missing or wrong (names the key)
     ├── InvalidRequest             the caller sent something malformed (400)
     ├── NotFound / Conflict        registry and admin API lookups and writes
     ├── ClientAuthError            OAuth client authentication failed (401, RFC 6749 §5.2)
     ├── GrantError                 the grant itself is refused (400, RFC 6749 §5.2)
     ├── TokenError                 an access token or signed object failed verification (401)
     │    └── ReplayDetected        a single-use proof was seen before
     ├── AccessDenied               authenticated, but not permitted (403)
     ├── PolicyError                a policy document or evaluation failed (deny, never allow)
     ├── EvidenceError              audit evidence (export, proof, checkpoint) does not verify
     └── Unavailable                a dependency is down: a denial with a ``*_unavailable`` code

Every instance carries a stable ``code``; :data:`CODES` maps the code to its HTTP status, the OAuth
``error`` value used on the wire, whether a retry may help, and the reason label for metrics.
Messages are lowercase, say what failed and what to fix, and never contain a secret or a whole token.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "CODES",
    "REFUSAL_FIELD",
    "AccessDenied",
    "AegisError",
    "ClientAuthError",
    "ConfigError",
    "Conflict",
    "ErrorSpec",
    "EvidenceError",
    "GrantError",
    "InvalidRequest",
    "NotFound",
    "PolicyError",
    "ReplayDetected",
    "TokenError",
    "Unavailable",
    "refusal_mark",
    "spec_for",
]

#: The field on every answer the gateway writes itself (a refusal, or its own error after
#: forwarding): :func:`refusal_mark` of the request's ``Authorization``. The upstream never
#: sees that field (every door removes the credentials), so a tool cannot answer in the
#: gateway's name: an agent that took a tool's Aegis-shaped 503 for the gateway's would send a
#: POST the tool had already acted on again.
REFUSAL_FIELD: Final = "x-aegis-refusal"


def refusal_mark(authorization: str) -> str:
    """The :data:`REFUSAL_FIELD` value for a request sent with ``authorization``."""
    digest = hashlib.sha256(b"aegis-refusal\x00" + authorization.encode("utf-8", "replace"))
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    """How one error code looks from outside."""

    status: int
    #: The value of the ``error`` member in OAuth-style bodies and ``WWW-Authenticate``.
    oauth_error: str
    #: Whether the same request may succeed later without being changed.
    retryable: bool = False


_S = ErrorSpec

#: The single table of stable codes. Adding a code means adding a row here; tests check that every
#: code raised anywhere in the package is in this table.
CODES: dict[str, ErrorSpec] = {
    # configuration and input
    "config_invalid": _S(500, "server_error"),
    "invalid_request": _S(400, "invalid_request"),
    "not_found": _S(404, "not_found"),
    "conflict": _S(409, "conflict"),
    "payload_too_large": _S(413, "invalid_request"),
    "method_not_allowed": _S(405, "invalid_request"),
    "request_timeout": _S(408, "invalid_request", retryable=True),
    # OAuth token endpoint (RFC 6749 §5.2)
    "invalid_client": _S(401, "invalid_client"),
    "invalid_grant": _S(400, "invalid_grant"),
    "invalid_scope": _S(400, "invalid_scope"),
    "invalid_target": _S(400, "invalid_target"),
    "unauthorized_client": _S(400, "unauthorized_client"),
    "unsupported_grant_type": _S(400, "unsupported_grant_type"),
    "unsupported_token_type": _S(400, "unsupported_token_type"),
    "rate_limited": _S(429, "slow_down", retryable=True),
    # an agent holds as many MCP sessions as gateway.mcp_sessions_per_agent allows
    "mcp_session_limit": _S(429, "slow_down", retryable=True),
    # token and signature verification
    "invalid_token": _S(401, "invalid_token"),
    "malformed_token": _S(401, "invalid_token"),
    "token_too_large": _S(401, "invalid_token"),
    "unsupported_algorithm": _S(401, "invalid_token"),
    "invalid_token_type": _S(401, "invalid_token"),
    "unknown_key": _S(401, "invalid_token"),
    "forbidden_header": _S(401, "invalid_token"),
    "invalid_signature": _S(401, "invalid_token"),
    "token_expired": _S(401, "invalid_token"),
    "token_not_yet_valid": _S(401, "invalid_token"),
    "token_issued_in_future": _S(401, "invalid_token"),
    "invalid_issuer": _S(401, "invalid_token"),
    "invalid_audience": _S(401, "invalid_token"),
    "missing_claim": _S(401, "invalid_token"),
    "invalid_claim": _S(401, "invalid_token"),
    "token_revoked": _S(401, "invalid_token"),
    "replay_detected": _S(401, "invalid_token"),
    "invalid_dpop_proof": _S(401, "invalid_dpop_proof"),
    "use_dpop_nonce": _S(401, "use_dpop_nonce", retryable=True),
    # subject state and authorization
    "agent_inactive": _S(403, "access_denied"),
    "client_inactive": _S(403, "access_denied"),
    "tenant_inactive": _S(403, "access_denied"),
    "tenant_mismatch": _S(403, "access_denied"),
    "insufficient_scope": _S(403, "insufficient_scope"),
    "access_denied": _S(403, "access_denied"),
    "forbidden": _S(403, "forbidden"),
    "unauthenticated": _S(401, "unauthenticated"),
    # policy
    "policy_invalid": _S(400, "invalid_request"),
    "policy_error": _S(403, "access_denied"),
    "approval_needed": _S(403, "approval_needed"),
    # human approvals and one-time override tokens (docs/approvals.md)
    "approval_not_found": _S(404, "not_found"),
    "approval_decided": _S(409, "conflict"),
    "approval_expired": _S(403, "access_denied"),
    "approval_denied": _S(403, "access_denied"),
    "approval_unbindable": _S(403, "access_denied"),
    "approver_unknown": _S(403, "forbidden"),
    "approver_not_in_group": _S(403, "forbidden"),
    "approver_not_in_tenant": _S(403, "forbidden"),
    "self_approval_forbidden": _S(403, "forbidden"),
    "callback_unsigned": _S(401, "unauthenticated"),
    "callback_signature_invalid": _S(401, "unauthenticated"),
    "callback_stale": _S(401, "unauthenticated"),
    "override_invalid": _S(403, "access_denied"),
    "override_expired": _S(403, "access_denied"),
    "override_used": _S(403, "access_denied"),
    "override_digest_mismatch": _S(403, "access_denied"),
    "override_agent_mismatch": _S(403, "access_denied"),
    # delegation chains: parent-agent grants and RFC 8693 token exchange
    "parent_signature_invalid": _S(401, "invalid_grant"),
    "parent_expired": _S(401, "invalid_grant"),
    "grant_replayed": _S(401, "invalid_grant"),
    "scope_widened": _S(403, "access_denied"),
    "delegation_too_deep": _S(403, "access_denied"),
    "delegation_cycle": _S(403, "access_denied"),
    "parent_inactive": _S(403, "access_denied"),
    # transport identity: internal CA, X.509-SVIDs, mTLS (RFC 5280, RFC 8705, SPIFFE)
    "cert_required": _S(401, "invalid_client"),
    "tls_handshake_failed": _S(400, "invalid_request"),
    "cert_expired": _S(401, "invalid_client"),
    "cert_not_yet_valid": _S(401, "invalid_client"),
    "cert_revoked": _S(401, "invalid_client"),
    "cert_untrusted": _S(401, "invalid_client"),
    "cert_invalid": _S(401, "invalid_client"),
    "cert_wrong_usage": _S(401, "invalid_client"),
    "spiffe_id_invalid": _S(401, "invalid_client"),
    "cert_agent_mismatch": _S(403, "access_denied"),
    "cert_token_mismatch": _S(401, "invalid_token"),
    "csr_invalid": _S(400, "invalid_request"),
    "ca_unavailable": _S(503, "temporarily_unavailable", retryable=True),
    # dependencies (fail closed)
    "replay_store_unavailable": _S(503, "temporarily_unavailable", retryable=True),
    "revocation_store_unavailable": _S(503, "temporarily_unavailable", retryable=True),
    "registry_unavailable": _S(503, "temporarily_unavailable", retryable=True),
    # a tokens_not_before mark moved a moment ago: what is issued now would be refused for it
    "credentials_settling": _S(503, "temporarily_unavailable", retryable=True),
    "key_store_unavailable": _S(503, "temporarily_unavailable", retryable=True),
    "policy_unavailable": _S(503, "temporarily_unavailable", retryable=True),
    "audit_unavailable": _S(503, "temporarily_unavailable", retryable=True),
    # audit evidence: exports, Merkle proofs and signed checkpoints (docs/audit.md)
    "evidence_invalid": _S(422, "invalid_request"),
    "invalid_proof": _S(422, "invalid_request"),
    "approvals_unavailable": _S(503, "temporarily_unavailable", retryable=True),
    "server_error": _S(500, "server_error"),
}


def spec_for(code: str) -> ErrorSpec:
    """Return the spec of ``code``; an unknown code is a server error, never a success."""
    return CODES.get(code, CODES["server_error"])


class AegisError(Exception):
    """Base of every error Aegis raises on purpose.

    ``code`` is stable and documented; ``message`` is for humans and must never contain secrets.
    ``details`` holds small, non-secret, JSON-serialisable facts (a config key, a claim name).
    """

    default_code = "server_error"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.code = code or self.default_code
        if self.code not in CODES:  # a programming error: keep it loud in tests
            raise ValueError(f"unknown error code {self.code!r}; add it to aegis.errors.CODES")
        self.message = message
        self.details = details

    @property
    def spec(self) -> ErrorSpec:
        return CODES[self.code]

    @property
    def status(self) -> int:
        return self.spec.status

    def to_dict(self) -> dict[str, Any]:
        """The JSON body Aegis answers with (admin API and gateway)."""
        return {"code": self.code, "message": self.message, **self.details}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class ConfigError(AegisError):
    """A configuration value is missing or wrong; ``key`` names it."""

    default_code = "config_invalid"


class InvalidRequest(AegisError):
    default_code = "invalid_request"


class NotFound(AegisError):
    default_code = "not_found"


class Conflict(AegisError):
    default_code = "conflict"


class ClientAuthError(AegisError):
    """OAuth client authentication failed (RFC 6749 §5.2 ``invalid_client``)."""

    default_code = "invalid_client"


class GrantError(AegisError):
    """The token request is understood but refused (``invalid_grant``, ``invalid_scope`` ...)."""

    default_code = "invalid_grant"


class TokenError(AegisError):
    """A token, proof or other signed object failed verification."""

    default_code = "invalid_token"


class ReplayDetected(TokenError):
    """A single-use identifier (``jti``) was presented a second time."""

    default_code = "replay_detected"


class AccessDenied(AegisError):
    default_code = "access_denied"


class PolicyError(AegisError):
    """A policy could not be loaded or evaluated. At run time this is a deny, never an allow."""

    default_code = "policy_error"


class EvidenceError(AegisError):
    """Audit evidence does not verify: a damaged export, a bad proof, a forged checkpoint."""

    default_code = "evidence_invalid"


class Unavailable(AegisError):
    """A dependency (replay store, registry, policy, key store) cannot answer: fail closed."""

    default_code = "server_error"

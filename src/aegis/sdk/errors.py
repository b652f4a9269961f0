"""What an agent sees when Aegis says no: one typed exception per kind of refusal.

    AegisClientError                 every refusal or failure the SDK reports
     ├── InvalidRequestError         the request was malformed (400)
     ├── ClientAuthenticationError   the agent's credentials were refused (invalid_client, cert_*)
     ├── GrantRefusedError           the token request was understood but refused (scope, target)
     ├── TokenRejectedError          the access token or its proof was refused (401)
     │    ├── TokenExpiredError      ... because it expired (the SDK refreshes once, then raises)
     │    ├── ReplayDetectedError    ... because a single-use proof was seen before (never retried)
     │    └── DpopProofError         ... because the DPoP proof was refused
     ├── DelegationError             a parent-agent grant or chain was refused
     ├── AccessDeniedError           authenticated, but not permitted (403)
     │    └── ApprovalRequiredError  a human must approve this call first
     │         ├── ApprovalDeniedError   ... and said no, or the request expired
     │         └── ApprovalTimeoutError  ... and did not answer in time
     ├── RateLimitedError            too many attempts (429)
     ├── ServiceUnavailableError     a dependency is down (503 ``*_unavailable``): fail closed
     └── ServerError                 anything else, including codes this SDK does not know

Every instance carries the server's stable ``code``, the HTTP ``status`` and, when the gateway
decided the call, its ``decision_id`` (the key to the audit record). The server's codes and their
HTTP faces live in :data:`aegis.errors.CODES`; :func:`error_class` maps each one here.
"""

from __future__ import annotations

from typing import Any, Final

from aegis.errors import CODES

__all__ = [
    "AccessDeniedError",
    "AegisClientError",
    "ApprovalDeniedError",
    "ApprovalRequiredError",
    "ApprovalTimeoutError",
    "ClientAuthenticationError",
    "DelegationError",
    "DpopProofError",
    "GrantRefusedError",
    "InvalidRequestError",
    "RateLimitedError",
    "ReplayDetectedError",
    "ServerError",
    "ServiceUnavailableError",
    "TokenExpiredError",
    "TokenRejectedError",
    "error_class",
]


class AegisClientError(Exception):
    """A refusal or failure reported by Aegis (or by the SDK on its behalf)."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int | None = None,
        decision_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.decision_id = decision_id
        self.details = details or {}

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later unchanged (from the server's code table)."""
        spec = CODES.get(self.code)
        return spec.retryable if spec is not None else False

    def __str__(self) -> str:
        where = f", decision {self.decision_id}" if self.decision_id else ""
        return f"{self.code}: {self.message}{where}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, "
            f"decision_id={self.decision_id!r})"
        )


class InvalidRequestError(AegisClientError):
    pass


class ClientAuthenticationError(AegisClientError):
    pass


class GrantRefusedError(AegisClientError):
    pass


class TokenRejectedError(AegisClientError):
    pass


class TokenExpiredError(TokenRejectedError):
    pass


class ReplayDetectedError(TokenRejectedError):
    pass


class DpopProofError(TokenRejectedError):
    pass


class DelegationError(AegisClientError):
    pass


class AccessDeniedError(AegisClientError):
    pass


class ApprovalRequiredError(AccessDeniedError):
    """``approval_needed``: ``approval_id`` and ``status_url`` say where to wait, when known."""

    @property
    def approval_id(self) -> str | None:
        value = self.details.get("approval_id")
        return value if isinstance(value, str) else None

    @property
    def status_url(self) -> str | None:
        value = self.details.get("status_url")
        return value if isinstance(value, str) else None


class ApprovalDeniedError(ApprovalRequiredError):
    pass


class ApprovalTimeoutError(ApprovalRequiredError):
    pass


class RateLimitedError(AegisClientError):
    pass


class ServiceUnavailableError(AegisClientError):
    pass


class ServerError(AegisClientError):
    pass


#: Codes whose class is not implied by their HTTP status.
_BY_CODE: Final[dict[str, type[AegisClientError]]] = {
    "token_expired": TokenExpiredError,
    "replay_detected": ReplayDetectedError,
    "invalid_dpop_proof": DpopProofError,
    "use_dpop_nonce": DpopProofError,
    "approval_needed": ApprovalRequiredError,
    "approval_denied": ApprovalDeniedError,
    "approval_expired": ApprovalDeniedError,
    "rate_limited": RateLimitedError,
    "invalid_client": ClientAuthenticationError,
    "unauthenticated": ClientAuthenticationError,
    "parent_signature_invalid": DelegationError,
    "parent_expired": DelegationError,
    "grant_replayed": DelegationError,
    "scope_widened": DelegationError,
    "delegation_too_deep": DelegationError,
    "delegation_cycle": DelegationError,
    "parent_inactive": DelegationError,
    "invalid_grant": GrantRefusedError,
    "invalid_scope": GrantRefusedError,
    "invalid_target": GrantRefusedError,
    "unauthorized_client": GrantRefusedError,
    "unsupported_grant_type": GrantRefusedError,
    "unsupported_token_type": GrantRefusedError,
}
#: The OAuth ``error`` value of the remaining codes decides, then the status.
_BY_OAUTH: Final[dict[str, type[AegisClientError]]] = {
    "invalid_client": ClientAuthenticationError,
    "invalid_token": TokenRejectedError,
    "invalid_request": InvalidRequestError,
    "access_denied": AccessDeniedError,
    "insufficient_scope": AccessDeniedError,
    "forbidden": AccessDeniedError,
    "temporarily_unavailable": ServiceUnavailableError,
}
_BY_STATUS: Final[dict[int, type[AegisClientError]]] = {
    400: InvalidRequestError,
    401: TokenRejectedError,
    403: AccessDeniedError,
    404: InvalidRequestError,
    409: InvalidRequestError,
    413: InvalidRequestError,
    429: RateLimitedError,
    503: ServiceUnavailableError,
}


def error_class(code: str, status: int | None = None) -> type[AegisClientError]:
    """The exception class for a server ``code``; an unknown code falls back on ``status``."""
    if code in _BY_CODE:
        return _BY_CODE[code]
    if code.endswith("_unavailable"):
        return ServiceUnavailableError
    spec = CODES.get(code)
    if spec is not None:
        return _BY_OAUTH.get(spec.oauth_error) or _BY_STATUS.get(spec.status, ServerError)
    if code.startswith("cert_"):
        return ClientAuthenticationError
    return _BY_STATUS.get(status or 500, ServerError)

"""The Aegis agent SDK: credentials, cached and refreshed tokens, DPoP proofs, delegation, typed
errors and an ``httpx.Auth`` (sync and async). See docs/sdk.md."""

from __future__ import annotations

from aegis.sdk.approvals import OVERRIDE_HEADER, ApprovalPolicy
from aegis.sdk.auth import AegisAuth
from aegis.sdk.cache import CachedToken, TokenCache, TokenKey
from aegis.sdk.client import AgentClient
from aegis.sdk.credentials import Certificate, ClientSecret, Credential, PrivateKey
from aegis.sdk.errors import (
    AccessDeniedError,
    AegisClientError,
    ApprovalDeniedError,
    ApprovalRequiredError,
    ApprovalTimeoutError,
    ClientAuthenticationError,
    DelegationError,
    DpopProofError,
    GrantRefusedError,
    InvalidRequestError,
    RateLimitedError,
    ReplayDetectedError,
    ServerError,
    ServiceUnavailableError,
    TokenExpiredError,
    TokenRejectedError,
    error_class,
)
from aegis.sdk.policy import policy_dry_run
from aegis.sdk.proofs import DpopSigner
from aegis.sdk.renewing import RenewingCertificate
from aegis.sdk.retry import RetryPolicy
from aegis.sdk.revocation import InvalidCrl, ServerRevocations

__all__ = [
    "OVERRIDE_HEADER",
    "AccessDeniedError",
    "AegisAuth",
    "AegisClientError",
    "AgentClient",
    "ApprovalDeniedError",
    "ApprovalPolicy",
    "ApprovalRequiredError",
    "ApprovalTimeoutError",
    "CachedToken",
    "Certificate",
    "ClientAuthenticationError",
    "ClientSecret",
    "Credential",
    "DelegationError",
    "DpopProofError",
    "DpopSigner",
    "GrantRefusedError",
    "InvalidCrl",
    "InvalidRequestError",
    "PrivateKey",
    "RateLimitedError",
    "RenewingCertificate",
    "ReplayDetectedError",
    "RetryPolicy",
    "ServerError",
    "ServerRevocations",
    "ServiceUnavailableError",
    "TokenCache",
    "TokenExpiredError",
    "TokenKey",
    "TokenRejectedError",
    "error_class",
    "policy_dry_run",
]

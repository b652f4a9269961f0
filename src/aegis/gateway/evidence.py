"""Evidence of one decision (ARCHITECTURE.md step 10): the facts gathered while deciding, the audit
record built from them, span attributes (``aegis.telemetry.names``), refusal counters and the
``WWW-Authenticate`` / ``DPoP-Nonce`` / ``Retry-After`` headers of a refusal (RFC 9449 §7.1, §8;
RFC 6750 §3; RFC 9110 §10.2.3).

The audit record names who, what, when and the outcome; it never holds a token, a proof or a
secret: token and proof appear only by ``jti``, the request only by its digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from aegis.errors import AegisError
from aegis.gateway.auth import Scheme, challenge
from aegis.gateway.context import CallContext
from aegis.gateway.names import name_keys, query_key
from aegis.policy.decision import Decision, SanitizeObligation
from aegis.policy.input import AuthMethod
from aegis.policy.obligations import mask_text
from aegis.telemetry import names
from aegis.telemetry.metrics import (
    APPROVAL_NEEDED,
    EXPIRED_TOKEN_REJECTIONS,
    FAILED_SIGNATURE_VERIFICATIONS,
    REPLAY_ATTEMPTS,
)
from aegis.tokens.claims import AccessToken
from aegis.tokens.dpop import DpopVerifier

__all__ = [
    "ANSWERED_DETAILS",
    "EvidenceFacts",
    "Result",
    "answer_details",
    "audit_record",
    "count_refusal",
    "refusal_headers",
]

_SIGNATURE_CODES = frozenset({"invalid_signature", "parent_signature_invalid"})
#: Error details a refusal repeats to the caller (an approval the agent can poll); all others
#: stay in the audit record only.
ANSWERED_DETAILS = ("approval_id", "status_url", "approval_state", "expires_at")


def answer_details(exc: AegisError) -> dict[str, Any]:
    return {k: exc.details[k] for k in ANSWERED_DETAILS if k in exc.details}


@dataclass(frozen=True, slots=True)
class Result:
    """What the front door does: forward (``allowed``) or answer ``status`` with ``code``."""

    decision_id: str
    action: str
    status: int
    code: str | None
    message: str
    #: Headers for the caller's response (challenges, decision id, attestation).
    headers: dict[str, str] = field(default_factory=dict)
    #: Identity headers for the upstream (only on an allowed call).
    upstream_headers: dict[str, str] = field(default_factory=dict)
    obligations: tuple[SanitizeObligation, ...] = ()
    #: The sanitized JSON body to forward instead of the original, when obligations changed it.
    body: Any = None
    body_changed: bool = False
    #: Whether the call passes with an approval's override token: only the request fields the
    #: approval is bound to (``aegis.approvals.model.is_bound``) may then reach the upstream.
    approved: bool = False
    #: On an allowed call of an MCP route, who holds the sessions it opens (its agent, tenant
    #: and environment; ``Pipeline.claim_session``).
    session_holder: str | None = None
    #: On an allowed ``tools/list`` of an MCP route, whether the answer may name a tool: one
    #: this agent's call of would be denied whatever it sends is left out (the reverse proxy).
    listed: Callable[[Any], bool] | None = None
    #: Facts for the caller's error body (:data:`ANSWERED_DETAILS`), e.g. the approval id.
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        return self.action in ("allow", "sanitize") and self.status == 200


@dataclass(slots=True)
class EvidenceFacts:
    """What the pipeline learnt, step by step; filled in as far as the call got."""

    decision_id: str
    time: float
    scheme: Scheme | None = None
    token: AccessToken | None = None
    auth_method: AuthMethod | None = None
    proof_jti: str | None = None
    verified: bool = False
    jti_seen: bool | None = None
    chain_validated: bool = False
    chain: tuple[str, ...] = ()
    decision: Decision | None = None
    #: The approval whose override token let the call through, if one did.
    approval_id: str | None = None
    #: Whether the call's DPoP proof was refused as seen before (not its single-use token).
    proof_replayed: bool = False
    error: AegisError | None = None
    #: For an allowed ``tools/list`` of an MCP route: ``Result.listed``.
    listed: Callable[[Any], bool] | None = None
    #: ``(step index, seconds)`` of each pipeline step this call ran, recorded at its end.
    step_times: list[tuple[int, float]] = field(default_factory=list)

    @property
    def agent_id(self) -> str | None:
        return self.token.agent_id if self.token is not None else None

    @property
    def policy_version(self) -> str | None:
        return self.decision.policy_version if self.decision is not None else None

    def reason(self, result: Result) -> str:
        if result.code is not None:
            return result.code
        if self.decision is not None and self.decision.reasons:
            return self.decision.reasons[0]
        return "allowed"

    def span_attributes(self, result: Result) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            names.DECISION_ID: self.decision_id,
            names.VERIFICATION_RESULT: self.verified,
            names.PARENT_CHAIN_VALIDATED: self.chain_validated,
            names.DECISION: result.action,
            names.DECISION_REASON: self.reason(result),
        }
        if self.jti_seen is not None:
            attrs[names.JTI_SEEN] = self.jti_seen
        if self.agent_id is not None:
            attrs[names.AGENT_ID] = self.agent_id
        if self.policy_version is not None:
            attrs[names.POLICY_VERSION] = self.policy_version
        return attrs


def count_refusal(exc: AegisError) -> None:
    """The dedicated counters; every refusal is also in ``aegis_decisions_total``."""
    if exc.code in _SIGNATURE_CODES:
        FAILED_SIGNATURE_VERIFICATIONS.inc()
    elif exc.code == "replay_detected":
        REPLAY_ATTEMPTS.inc()
    elif exc.code == "token_expired":
        EXPIRED_TOKEN_REJECTIONS.inc()
    elif exc.code == "approval_needed":
        APPROVAL_NEEDED.inc()


def refusal_headers(
    exc: AegisError, scheme: Scheme | None, dpop: DpopVerifier, *, proof_replayed: bool = False
) -> dict[str, str]:
    """The answer fields of a refusal. A replayed DPoP proof is challenged as a bad proof
    (RFC 9449 §4.3: its ``jti`` must be new), not a bad token: the client needs a new proof,
    not a new token."""
    headers: dict[str, str] = {"cache-control": "no-store"}
    if exc.status == 401:
        oauth_error = "invalid_dpop_proof" if proof_replayed else exc.spec.oauth_error
        headers["www-authenticate"] = challenge(exc.code, scheme, oauth_error)
    if exc.code == "use_dpop_nonce" and dpop.nonces is not None:
        headers["dpop-nonce"] = dpop.nonces.issue()
    if exc.spec.retryable and exc.status == 503:
        headers["retry-after"] = "1"
    return headers


def audit_record(
    ctx: CallContext, facts: EvidenceFacts, result: Result, digest: str, attestation: str | None
) -> dict[str, Any]:
    token, decision = facts.token, facts.decision
    redacted, patterns = _hidden(decision)
    return {
        "decision_id": facts.decision_id,
        "time": facts.time,
        "tool": ctx.route.tool,
        "tenant": ctx.route.tenant,
        "env": ctx.route.env,
        "method": ctx.method,
        # What policy masks is kept out of the record too (a card number in the path of a
        # call refused for it): the record is append-only and shipped to SIEMs.
        "path": mask_text(ctx.path, patterns) if patterns else ctx.path,
        "client": ctx.client,
        "peer": ctx.peer.spiffe_id if ctx.peer is not None else None,
        "peer_serial": ctx.peer.serial if ctx.peer is not None else None,
        "agent_id": facts.agent_id,
        "client_id": token.client_id if token is not None else None,
        "token_jti": token.jti if token is not None else None,
        "proof_jti": facts.proof_jti,
        "auth_method": facts.auth_method,
        "verified": facts.verified,
        "jti_seen": facts.jti_seen,
        "chain": list(facts.chain),
        # The end user the chain acts for: the verified token's claim (the token service set it
        # from the verified chain, and step 6 checks they agree), so every record of the chain,
        # allowed or refused, names the human behind it.
        "origin_user": token.claims.get("origin_user") if token is not None else None,
        # A refused chain is audited as it was presented (issuer, subject, jti, scope per link).
        "chain_presented": facts.error.details.get("chain") if facts.error is not None else None,
        "action": result.action,
        "status": result.status,
        "code": result.code,
        "reason": result.message,
        "policy_version": facts.policy_version,
        "rule_ids": list(decision.rule_ids) if decision is not None else [],
        "approval_id": result.details.get("approval_id") or facts.approval_id,
        "shadow": decision.shadow.to_dict()
        if decision is not None and decision.shadow is not None
        else None,
        "request_digest": digest,
        "attestation": attestation,
        # docs/audit.md: scopes, every reason, the risk score (set by anomaly detection when it
        # runs), trace and correlation ids, and query parameters as digests, never their values.
        "scopes": list(token.scopes) if token is not None else [],
        "reasons": list(decision.reasons) if decision is not None else [],
        "risk_score": None,
        "trace_id": _trace_id(),
        "correlation_id": _correlation_id(ctx),
        "params": _param_digests(ctx.query, redacted, patterns),
    }


_MAX_PARAMS = 32
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/")


def _trace_id() -> str | None:
    span = trace.get_current_span().get_span_context()
    return f"{span.trace_id:032x}" if span.is_valid else None


def _correlation_id(ctx: CallContext) -> str | None:
    """The caller's ``x-correlation-id`` (or ``x-request-id``), kept only if it looks like an id."""
    value = ctx.header("x-correlation-id") or ctx.header("x-request-id")
    if value is None or not 0 < len(value) <= 128 or not set(value) <= _ID_CHARS:
        return None
    return value


def _hidden(decision: Decision | None) -> tuple[frozenset[str], tuple[str, ...]]:
    """What the decision's obligations (either target) keep from sight: the names it redacts
    (the last key of each ``redact`` path, as lenient servers file a parameter:
    :func:`~aegis.gateway.names.query_key`) and its mask patterns."""
    if decision is None or not decision.obligations:
        return frozenset(), ()
    obligations = decision.obligations
    redacted = frozenset(
        query_key(o.path.rsplit(".", 1)[-1]) for o in obligations if o.kind == "redact" and o.path
    )
    patterns = tuple(sorted({o.pattern for o in obligations if o.kind == "mask" and o.pattern}))
    return redacted, patterns


def _param_digests(
    query: tuple[tuple[str, str], ...], redacted: frozenset[str], patterns: tuple[str, ...]
) -> dict[str, str]:
    """Data minimisation: each query parameter by name with a SHA-256 digest of its value, or
    ``redacted`` when policy redacts a field of that name (however a lenient server reads the
    name: ``SSN``, ``ssn[]``) or a mask finds something in it: a digest of a card number or an
    SSN is found again by trying every candidate."""
    out: dict[str, str] = {}
    for name, value in query[:_MAX_PARAMS]:
        masked = bool(patterns) and (
            mask_text(name, patterns) != name or mask_text(value, patterns) != value
        )
        hidden = "*" in redacted or bool(name_keys(name) & redacted) or masked
        shown = mask_text(name[:64], patterns) if patterns else name[:64]
        digest = "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()
        out.setdefault(shown, "redacted" if hidden else digest)
    return out

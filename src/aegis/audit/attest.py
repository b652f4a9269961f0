"""Decision attestations: compact JWS (RFC 7515) signed with Ed25519 (RFC 8037) by the key ring.

An attestation says, under the gateway's signing key, which agent called which tool when, under
which policy version, with which outcome, over which request (a SHA-256 digest of method, URL and
body) and which single-use proof. It travels to the upstream and back to the caller in the
``x-aegis-attestation`` header and is stored in the audit record, so either side can later prove
what the gateway decided. Anyone verifies it with the JWKS at ``/.well-known/jwks.json``: header
``typ: aegis-attestation+jwt``, ``kid`` of the active key, ``alg`` the key ring's signing alg.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Final

from aegis.crypto.jws import encode_segment, sign_compact
from aegis.crypto.keyring import KeyRing
from aegis.tokens.verifier import VerifyRules

__all__ = [
    "ATTESTATION_CLAIMS",
    "ATTESTATION_TYP",
    "Attester",
    "attestation_rules",
    "request_digest",
]

ATTESTATION_TYP: Final = "aegis-attestation+jwt"
#: Claims every attestation carries (``agent_id`` and ``jti`` may be null for an unverified caller).
ATTESTATION_CLAIMS: Final = (
    "iss",
    "iat",
    "decision_id",
    "agent_id",
    "tool",
    "policy_version",
    "decision",
    "request_digest",
    "jti",
)


def request_digest(
    method: str, url: str, body_digest: str, headers: Sequence[tuple[str, str]] = ()
) -> str:
    """``sha256:<hex>`` over ``METHOD \\n URL \\n body digest \\n fields``: what the decision
    was about. ``fields`` is the compact JSON of the request fields the upstream acts on as
    ``[name, value]`` pairs (:func:`aegis.approvals.model.bound_headers`: every field but the
    credentials, tracing, transport and proxy fields, ordered by name): two requests that differ
    in a field a policy decides on, or in how the body is read, never share a digest."""
    fields = json.dumps(headers, ensure_ascii=False, separators=(",", ":"))
    text = f"{method.upper()}\n{url}\n{body_digest}\n{fields}"
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def attestation_rules(issuer: str) -> VerifyRules:
    """How a verifier checks an attestation with :func:`aegis.tokens.verifier.verify_jwt`."""
    return VerifyRules(
        typ=ATTESTATION_TYP,
        issuer=issuer,
        audience=None,
        required=frozenset({"iss", "iat", "decision_id", "decision", "request_digest"}),
        leeway=float("inf"),
    )


class Attester:
    """Signs attestations with the key ring's active key (rotations are picked up per call)."""

    def __init__(self, keyring: KeyRing, *, issuer: str) -> None:
        self._keyring = keyring
        self._issuer = issuer
        self._headers: dict[str, str] = {}

    def sign(
        self,
        *,
        decision_id: str,
        agent_id: str | None,
        tool: str,
        timestamp: float,
        policy_version: str | None,
        decision: str,
        request_digest: str,
        jti: str | None,
    ) -> str:
        """Raises ``Unavailable(key_store_unavailable)`` if there is no active key (fail closed)."""
        key = self._keyring.signing_key()
        header = self._headers.get(key.kid)
        if header is None:
            alg = self._keyring.settings.signing_alg
            header = encode_segment({"alg": alg, "typ": ATTESTATION_TYP, "kid": key.kid})
            self._headers = {key.kid: header}
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "iat": int(timestamp),
            "decision_id": decision_id,
            "agent_id": agent_id,
            "tool": tool,
            "policy_version": policy_version,
            "decision": decision,
            "request_digest": request_digest,
            "jti": jti,
        }
        return sign_compact(header, claims, key.sign)

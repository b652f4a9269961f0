"""One-time override tokens: compact JWS (RFC 7515, Ed25519 per RFC 8037) from the Aegis key ring.

An approved request yields one override token, header ``typ: aegis-override+jwt``, claims
``iss, sub (agent id), iat, exp, jti, approval_id, request_digest, tool, tenant, env``. The ``jti``
is derived from the approval id (``ovr:<approval id>``) and ``exp`` from the decision time, so
minting it again (each status poll) gives the same single use and never a longer life. The gateway
verifies it with :func:`aegis.tokens.verifier.verify_jwt` (allow-listed algorithms, our keys only,
exact ``typ`` and ``iss``), then checks the binding to the call and spends the ``jti`` in the
replay store. The token alone is not a credential: the agent still presents its own access token
and proof, and the token only lifts the ``approval_needed`` of exactly the call it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from aegis.approvals.model import ApprovalRequest
from aegis.crypto.jws import encode_segment, sign_compact
from aegis.crypto.keyring import KeyRing
from aegis.errors import AegisError, TokenError
from aegis.tokens.verifier import VerifyRules, verify_jwt

__all__ = [
    "OVERRIDE_CLAIMS",
    "OVERRIDE_HEADER",
    "OVERRIDE_REPLAY_NAMESPACE",
    "OVERRIDE_TYP",
    "Override",
    "OverrideTokens",
]

OVERRIDE_TYP: Final = "aegis-override+jwt"
#: The request header an agent retries with. ``x-aegis-*`` fields never reach an upstream.
OVERRIDE_HEADER: Final = "x-aegis-override"
OVERRIDE_REPLAY_NAMESPACE: Final = "override"
OVERRIDE_CLAIMS: Final = frozenset(
    {"iss", "sub", "iat", "exp", "jti", "approval_id", "request_digest", "tool", "tenant", "env"}
)
_MAX_BYTES: Final = 4096


@dataclass(frozen=True, slots=True)
class Override:
    """A verified override token's claims."""

    approval_id: str
    agent_id: str
    request_digest: str
    jti: str
    exp: float


class OverrideTokens:
    """Mints and verifies override tokens with the key ring (rotations picked up per call)."""

    def __init__(self, keyring: KeyRing, *, issuer: str, leeway: float = 5.0) -> None:
        self._keyring, self._issuer = keyring, issuer
        self.rules = VerifyRules(
            typ=OVERRIDE_TYP,
            issuer=issuer,
            audience=None,
            leeway=leeway,
            required=OVERRIDE_CLAIMS,
            max_lifetime=3600.0,
            max_bytes=_MAX_BYTES,
        )

    def mint(self, req: ApprovalRequest) -> str:
        if req.state != "approved" or req.decided_at is None or req.override_expires_at is None:
            raise AegisError("only an approved request has an override", code="approval_decided")
        key = self._keyring.signing_key()
        alg = self._keyring.settings.signing_alg
        header = encode_segment({"alg": alg, "typ": OVERRIDE_TYP, "kid": key.kid})
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "sub": req.agent_id,
            "iat": int(req.decided_at),
            "exp": int(req.override_expires_at),
            "jti": f"ovr:{req.id}",
            "approval_id": req.id,
            "request_digest": req.digest,
            "tool": req.tool,
            "tenant": req.tenant,
            "env": req.env,
        }
        return sign_compact(header, claims, key.sign)

    def verify(self, token: str, *, now: float) -> Override:
        """Signature, ``typ``, issuer and lifetime; raises ``override_invalid`` or
        ``override_expired`` (the binding to the call is the caller's check)."""
        try:
            jws = verify_jwt(token, self._keyring.public_key, self.rules, now)
        except TokenError as exc:
            if exc.code == "token_expired":
                raise AegisError(
                    "the override token has expired; ask for a new approval",
                    code="override_expired",
                ) from None
            raise AegisError(
                f"the override token is not valid ({exc.code})", code="override_invalid"
            ) from None
        c = jws.payload
        values = (c["approval_id"], c["sub"], c["request_digest"], c["jti"])
        if not all(isinstance(v, str) for v in values) or c["jti"] != f"ovr:{c['approval_id']}":
            raise AegisError("the override token's claims are malformed", code="override_invalid")
        return Override(c["approval_id"], c["sub"], c["request_digest"], c["jti"], float(c["exp"]))

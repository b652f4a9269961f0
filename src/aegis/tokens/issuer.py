"""Minting Aegis access tokens (RFC 9068 JWT profile) with the key ring's active Ed25519 key."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from aegis.clock import Clock, new_id
from aegis.crypto.jws import MAX_TOKEN_BYTES, encode_segment, sign_compact
from aegis.crypto.keyring import KeyRing
from aegis.errors import AegisError, TokenError, Unavailable
from aegis.tokens.claims import join_scopes
from aegis.tokens.verifier import ACCESS_TOKEN_TYP
from aegis.types import Agent, Client

__all__ = ["IssuedToken", "TokenIssuer", "refuse_changed", "refuse_unsettled"]


def refuse_changed(read_at: float, checked: Client, client: Client, agent: Agent) -> None:
    """Raise ``Unavailable`` (``credentials_settling``) when a client whose credentials were
    checked against ``checked`` (read at ``read_at``) has changed since, as ``client`` and
    ``agent`` are read now: a secret stopped, a key removed, the client disabled while the
    request was under way must not be issued on."""
    if client != checked or max(agent.tokens_not_before, client.tokens_not_before) > read_at:
        raise Unavailable(
            "the client's credentials changed while they were checked; ask again",
            code="credentials_settling",
            retry_after=1,
        )


def refuse_unsettled(
    not_before: float, now: float, what: str = "a token", *, whole_seconds: bool = True
) -> None:
    """Raise ``Unavailable`` (``credentials_settling``, 503, ``retry_after`` seconds) while
    ``not_before``, the subject's ``tokens_not_before`` mark (its agent's, its client's), is
    ahead of ``now`` in whole seconds: token ``iat`` values are whole seconds, so what is issued
    now would read as issued before the mark and be refused for it. A return to active sets
    the mark to its instant, a key removal a registry-cache lifetime ahead: the wait is a
    second or two. Never a later ``iat``: a mark set meanwhile (a suspension) must reach every
    token issued before it. ``whole_seconds`` False: what is issued records ``now`` exactly
    (certificates, bootstrap tokens)."""
    issued_at = math.floor(now) if whole_seconds else now
    if issued_at < not_before:
        wait = max(1, math.ceil(not_before - issued_at))
        raise Unavailable(
            f"the agent's or client's credentials changed a moment ago; {what} issued now "
            f"would be refused for it: ask again in {wait} s",
            code="credentials_settling",
            retry_after=wait,
        )


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    claims: dict[str, Any]
    expires_in: int


class TokenIssuer:
    """Signs access tokens. The header is cached per signing key; only the payload varies."""

    def __init__(self, keyring: KeyRing, *, issuer: str, clock: Clock) -> None:
        self._keyring = keyring
        self.issuer = issuer
        self._clock = clock
        self._header_cache: tuple[str, str] | None = None  # (kid, encoded header)

    def _header(self, kid: str) -> str:
        cached = self._header_cache
        if cached is not None and cached[0] == kid:
            return cached[1]
        alg = self._keyring.settings.signing_alg
        segment = encode_segment({"alg": alg, "typ": ACCESS_TOKEN_TYP, "kid": kid})
        self._header_cache = (kid, segment)
        return segment

    def issue(
        self,
        *,
        agent_id: str,
        client_id: str,
        tenant: str,
        env: str,
        scopes: tuple[str, ...],
        audience: tuple[str, ...],
        lifetime: int,
        cnf: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        not_before: float = 0.0,
        expires_by: float | None = None,
    ) -> IssuedToken:
        """``not_before``: the subject's ``tokens_not_before`` marks (its agent's and client's)
        as this issuer reads them; while they are ahead of ``iat`` nothing is issued
        (:func:`refuse_unsettled`). A token service whose registry cache has not yet seen a mark
        issues as it is, and the token is refused: what the mark ended stays ended.
        ``expires_by``: an instant the token must not outlive (the user token a delegated one
        acts for), judged at the instant the token is issued; none is issued past it."""
        # Never mint what the verifier refuses: aud must be one non-empty string or a non-empty
        # list of them (RFC 7519 §4.1.3; AccessToken.from_claims), and join_scopes refuses scopes
        # that would not split back into themselves.
        if not audience or not all(isinstance(a, str) and a for a in audience):
            raise ValueError("an access token needs one or more non-empty audience strings")
        key = self._keyring.signing_key()
        # The ring keeps a retired key published for max_token_lifetime + leeway only: a longer
        # token would outlive its key and fail later for no visible reason. Cap it here too.
        lifetime = min(lifetime, int(self._keyring.settings.max_token_lifetime))
        refuse_unsettled(not_before, self._clock.now())
        now = int(self._clock.now())
        exp = now + lifetime
        if expires_by is not None:
            exp = min(exp, math.floor(expires_by))
            if exp <= now:
                raise TokenError(
                    "the user's token this chain acts for has expired; the user must sign in again",
                    code="parent_expired",
                )
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": agent_id,
            "aud": audience[0] if len(audience) == 1 else list(audience),
            "exp": exp,
            "iat": now,
            "nbf": now,
            "jti": new_id(),
            "client_id": client_id,
            "scope": join_scopes(scopes),
            "tenant": tenant,
            "env": env,
            "agent_id": agent_id,
        }
        if cnf:
            claims["cnf"] = cnf
        if extra:
            claims.update({k: v for k, v in extra.items() if k not in claims})
        token = sign_compact(self._header(key.kid), claims, key.sign)
        if len(token) > MAX_TOKEN_BYTES:
            # Every verifier (Aegis's own included) refuses it: never hand one out.
            raise AegisError(
                f"the token would be {len(token)} bytes, over the {MAX_TOKEN_BYTES} a token may "
                "be; ask for fewer scopes (scope=...)",
                code="invalid_scope",
            )
        return IssuedToken(token, claims, lifetime)

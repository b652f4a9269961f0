"""End-user subject tokens from configured external issuers (RFC 7519, RFC 8693 §4.4 ``may_act``).

An agent may act on behalf of a user by exchanging the user's JWT (``subject_token``) for its own
delegated token. Trust is configuration only: each issuer is named with its keys inline or in a
file read once at start-up. A key is never fetched at request time, and never from a URL or key
carried in the token (``jku``, ``x5u``, ``jwk`` are refused by :func:`verify_jwt`).

RFC 8693 §4.4: "The may_act claim makes a statement that one party is authorized to become the
actor and act on behalf of another party." When present, the exchanging agent (its id or client
id) must be its ``sub``; with ``require_may_act`` (the default) a token without it is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from aegis.config import DelegationSettings, ExternalIssuer
from aegis.crypto.keys import PublicKey, public_key_from_jwk
from aegis.errors import AegisError, ConfigError, TokenError
from aegis.tokens.claims import split_scopes
from aegis.tokens.verifier import VerifyRules, verify_jwt

__all__ = [
    "DelegationSettings",
    "ExternalIssuer",
    "ExternalTrust",
    "UserIdentity",
    "load_trust",
    "verify_user_token",
]

_USER_ALGS = frozenset({"EdDSA", "Ed25519", "ES256"})


@dataclass(frozen=True, slots=True)
class ExternalTrust:
    issuer: str
    tenant: str
    keys: dict[str, PublicKey]
    rules: VerifyRules
    require_may_act: bool
    scope_claim: str | None


@dataclass(frozen=True, slots=True)
class UserIdentity:
    sub: str
    #: None when the issuer's tokens do not narrow scopes.
    scopes: tuple[str, ...] | None
    #: The user token's ``exp``: nothing minted from it outlives it.
    exp: float


def load_trust(settings: ExternalIssuer, *, base_dir: Path, default_audience: str) -> ExternalTrust:
    """Import the issuer's keys once; raises ``ConfigError`` naming the bad setting."""
    key = "delegation.external_issuers"
    jwks = settings.jwks
    if settings.jwks_file is not None:
        path = Path(settings.jwks_file)
        path = path if path.is_absolute() else base_dir / path
        try:
            jwks = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{key}: cannot read JWK Set file {path}", key=key) from exc
    members = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(members, list) or not members:
        raise ConfigError(f"{key}: the JWK Set of {settings.issuer} has no keys", key=key)
    keys: dict[str, PublicKey] = {}
    try:
        for jwk in members:
            public = public_key_from_jwk(
                {k: v for k, v in jwk.items() if k not in ("kid", "use", "alg")}
            )
            keys[str(jwk.get("kid", public.kid))] = public
    except (AegisError, AttributeError) as exc:
        raise ConfigError(
            f"{key}: a key of {settings.issuer} is not a public EC or OKP JWK", key=key
        ) from exc
    if len(keys) == 1:
        keys[""] = next(iter(keys.values()))
    rules = VerifyRules(
        typ=settings.typ.lower(),
        typ_required=False,
        kid_required=len(members) > 1,
        issuer=settings.issuer,
        audience=settings.audience or default_audience,
        algs=_USER_ALGS,
        required=frozenset({"iss", "sub", "aud", "exp", "iat"}),
        max_lifetime=float(settings.max_lifetime),
    )
    return ExternalTrust(
        settings.issuer,
        settings.tenant,
        keys,
        rules,
        settings.require_may_act,
        settings.scope_claim,
    )


def verify_user_token(
    token: str,
    trust: ExternalTrust,
    *,
    actors: tuple[str, ...],
    now: float,
    actor_issuer: str | None = None,
) -> UserIdentity:
    """Verify the user's token and that one of ``actors`` may act for the user. A ``may_act``
    naming an issuer (RFC 8693 §4.4: ``iss`` with ``sub``) must name ``actor_issuer``, the
    issuer that knows the actors by these ids: ``{"iss": "https://idp", "sub": "finance"}`` is
    the identity provider's own ``finance``, not Aegis's agent of that name."""
    claims = verify_jwt(token, trust.keys.get, trust.rules, now).payload
    sub = claims["sub"]
    if not isinstance(sub, str) or not sub or len(sub) > 256:
        raise TokenError(
            "the user token's sub must be a short string", code="invalid_claim", claim="sub"
        )
    may_act = claims.get("may_act")
    if may_act is None:
        if trust.require_may_act:
            raise TokenError(
                "the user token names no authorized actor (may_act); the issuer must add one",
                code="access_denied",
            )
    elif not isinstance(may_act, dict) or may_act.get("sub") not in actors:
        raise TokenError(
            "this agent is not listed in the user token's may_act", code="access_denied"
        )
    elif "iss" in may_act and may_act["iss"] != actor_issuer:
        raise TokenError(
            "the user token's may_act names an actor of another issuer "
            f"({str(may_act['iss'])[:128]!r}); it must name this token service or no issuer",
            code="access_denied",
        )
    scopes = None
    if trust.scope_claim is not None:
        scopes = split_scopes(claims.get(trust.scope_claim))
    exp = float(claims["exp"])
    if exp <= now:
        # The verification's leeway forgives clock skew in judging a token; a token minted from
        # it would outlive the user's authority, however short its own life.
        raise TokenError(
            "the user token has expired; get a fresh one from its issuer", code="token_expired"
        )
    return UserIdentity(sub, scopes, exp)

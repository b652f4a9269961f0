"""Access token claims (RFC 9068 profile plus Aegis claims), typed after verification."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from aegis.errors import TokenError

__all__ = ["AccessToken", "join_scopes", "split_scopes"]

#: The confirmation methods (RFC 7800 ``cnf`` members) the doors check.
_CHECKED_CNF: Final = frozenset({"jkt", "x5t#S256"})


def split_scopes(value: Any) -> tuple[str, ...]:
    """RFC 6749 §3.3: a space-delimited list of scope tokens."""
    if value is None:
        return ()
    if not isinstance(value, str):
        raise TokenError("claim 'scope' must be a string", code="invalid_claim", claim="scope")
    return tuple(filter(None, value.split(" ")))  # runs of spaces give no empty scope


def join_scopes(scopes: tuple[str, ...] | list[str]) -> str:
    """The ``scope`` claim for ``scopes``; the inverse of :func:`split_scopes`.

    Raises ``ValueError`` for an empty scope or one holding a space: joined, ``"a b"`` would come
    back as the two scopes ``a`` and ``b``, granting a scope nobody granted (RFC 6749 §3.3: scope
    tokens are delimited by spaces and contain none)."""
    joined = " ".join(scopes)
    if scopes and ("" in scopes or joined.count(" ") != len(scopes) - 1):
        raise ValueError("a scope must be non-empty and contain no space")
    return joined


def _audiences(value: Any) -> tuple[str, ...]:
    """RFC 7519 §4.1.3: ``aud`` is one string or an array of strings.

    Checked here as well as in the verifier because a verifier built with ``audience=None``
    leaves the audience to the caller, and a number or object must not become a tuple."""
    if isinstance(value, str) and value:
        return (value,)
    if isinstance(value, list) and value and all(isinstance(a, str) and a for a in value):
        return tuple(value)
    raise TokenError(
        "claim 'aud' must be a string or a list of strings", code="invalid_claim", claim="aud"
    )


def _str(claims: dict[str, Any], name: str) -> str:
    value = claims[name]
    if not isinstance(value, str) or not value:
        raise TokenError(
            f"claim {name!r} must be a non-empty string", code="invalid_claim", claim=name
        )
    return value


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A verified access token. Build only from claims whose signature was checked."""

    sub: str
    agent_id: str
    client_id: str
    tenant: str
    env: str
    jti: str
    iat: float
    exp: float
    aud: tuple[str, ...]
    scopes: tuple[str, ...]
    cnf: dict[str, Any] | None
    single_use: bool
    claims: dict[str, Any]

    @classmethod
    def from_claims(cls, claims: dict[str, Any]) -> AccessToken:
        aud = _audiences(claims.get("aud"))
        cnf = claims.get("cnf")
        if cnf is not None and not isinstance(cnf, dict):
            raise TokenError("claim 'cnf' must be an object", code="invalid_claim", claim="cnf")
        if cnf is not None and (unknown := set(cnf) - _CHECKED_CNF):
            # A confirmation method no check here reads (jwk, x5t with SHA-1, ...) would leave
            # the token bound in its issuer's mind and unbound at every door: refused instead.
            raise TokenError(
                f"claim 'cnf' names a confirmation method Aegis does not check: "
                f"{sorted(unknown)[:4]!r}; only jkt (RFC 9449) and x5t#S256 (RFC 8705)",
                code="invalid_claim",
                claim="cnf",
            )
        single_use = claims.get("single_use", False)
        if not isinstance(single_use, bool):
            raise TokenError(
                "claim 'single_use' must be a boolean", code="invalid_claim", claim="single_use"
            )
        token = cls(
            sub=_str(claims, "sub"),
            agent_id=_str(claims, "agent_id"),
            client_id=_str(claims, "client_id"),
            tenant=_str(claims, "tenant"),
            env=_str(claims, "env"),
            jti=_str(claims, "jti"),
            iat=float(claims["iat"]),
            exp=float(claims["exp"]),
            aud=aud,
            scopes=split_scopes(claims.get("scope")),
            cnf=cnf,
            single_use=single_use,
            claims=claims,
        )
        if token.sub != token.agent_id:
            raise TokenError(
                "claims 'sub' and 'agent_id' disagree", code="invalid_claim", claim="sub"
            )
        return token

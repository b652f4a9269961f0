"""Parent-agent delegation grants: compact JWS (RFC 7515) mini-tokens, ``typ: aegis-delegation+jwt``.

A grant is how a parent agent hands part of its authority to one child agent for a short while. It
is signed with the parent's *own* registered key (Ed25519 or P-256), so the token service and every
gateway can check that the parent really meant it:

==============  ====================================================================================
``iss``         the parent agent id (or the token service itself for a user-rooted first link)
``sub``         the child agent id; only this agent may exchange the grant
``aud``         the token service (its issuer URL)
``iat/exp``     ``exp - iat`` at most :data:`MAX_GRANT_LIFETIME` (5 minutes)
``jti``         single use: the token service consumes it once (replay namespace ``delegation_grant``)
``scope``       a subset of what the parent holds
``tools``       the tools the child may call (exact names, ``*`` for any)
``max_depth``   how many further links the child may add below itself (0: it may not re-delegate)
``parent_chain`` digest of the links the parent itself holds (:func:`chain_digest`), binding the
                grant to one exact prefix so links cannot be spliced, reordered or dropped
==============  ====================================================================================

A *chain* travels as its links joined by ``~`` (``link0~link1~...``), the compact form carried in the
``parent_agent`` claim of an exchanged access token and presented as the ``subject_token``.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

from aegis.clock import new_id
from aegis.crypto.jws import MAX_TOKEN_BYTES, encode_segment, sign_compact
from aegis.crypto.keys import Ed25519SigningKey, PublicKey, b64u_encode, public_key_from_jwk
from aegis.errors import AegisError, TokenError
from aegis.tokens.claims import join_scopes, split_scopes
from aegis.tokens.verifier import DEFAULT_LEEWAY, VerifyRules, verify_jwt
from aegis.types import Agent

__all__ = [
    "ANY_TOOL",
    "CHAIN_SEPARATOR",
    "DELEGATION_TYP",
    "GRANT_ALGS",
    "MAX_GRANT_LIFETIME",
    "Grant",
    "PrefixDigest",
    "agent_key_resolver",
    "chain_digest",
    "forget_verified_links",
    "grant_rules",
    "mint_grant",
    "split_chain",
    "verify_agent_grant",
    "verify_grant",
]

DELEGATION_TYP: Final = "aegis-delegation+jwt"
#: A grant lives at most this long (seconds); the token service refuses longer ones.
MAX_GRANT_LIFETIME: Final = 300.0
#: Parent keys are agent keys: Ed25519 (both identifiers, RFC 9864) or P-256.
GRANT_ALGS: Final = frozenset({"EdDSA", "Ed25519", "ES256"})
GRANT_CLAIMS: Final = frozenset(
    {"iss", "sub", "aud", "iat", "exp", "jti", "scope", "tools", "max_depth", "parent_chain"}
)
CHAIN_SEPARATOR: Final = "~"
ANY_TOOL: Final = "*"
_MAX_TOOLS: Final = 64


class Grant(NamedTuple):
    """One verified link. Build only through :func:`verify_grant`. Immutable (a named tuple: built
    once per link on every cold verification, about three times cheaper than a frozen dataclass)."""

    token: str
    iss: str
    sub: str
    jti: str
    iat: float
    exp: float
    scopes: tuple[str, ...]
    tools: tuple[str, ...]
    max_depth: int
    parent_chain: str
    #: For a user-rooted first link (issued by the token service): the end user and their issuer.
    origin_user: str | None = None
    origin_issuer: str | None = None
    #: ... and when the user's token expires: nothing in the chain outlives it.
    origin_exp: float | None = None

    def summary(self) -> dict[str, Any]:
        """Non-secret facts for logs and error details (never the token itself)."""
        return {
            "iss": self.iss,
            "sub": self.sub,
            "jti": self.jti,
            "scope": join_scopes(self.scopes),
        }


def chain_digest(links: Sequence[str]) -> str:
    """SHA-256 (base64url) of the compact chain ``links`` (the empty chain for a root parent)."""
    return b64u_encode(hashlib.sha256(CHAIN_SEPARATOR.join(links).encode("ascii")).digest())


class PrefixDigest:
    """:func:`chain_digest` of a chain that grows one link at a time: ``value()`` after ``n`` calls
    to ``add`` equals ``chain_digest(links[:n])``, each link hashed once instead of once per later
    link (SHA-256 state is copied by ``digest``, never finalized)."""

    __slots__ = ("_empty", "_hash")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._empty = True

    def value(self) -> str:
        return b64u_encode(self._hash.digest())

    def add(self, link: str) -> None:
        if not self._empty:
            self._hash.update(CHAIN_SEPARATOR.encode("ascii"))
        self._hash.update(link.encode("ascii"))
        self._empty = False


def split_chain(chain: str, *, max_links: int) -> list[str]:
    """Split a compact chain; refuses empty links and chains longer than ``max_links``."""
    if not isinstance(chain, str) or not chain:
        raise TokenError("the delegation chain is empty", code="malformed_token")
    if len(chain) > (max_links + 1) * MAX_TOKEN_BYTES:
        raise TokenError("the delegation chain is too large", code="token_too_large")
    links = chain.split(CHAIN_SEPARATOR)
    if any(not link for link in links):
        raise TokenError("the delegation chain has an empty link", code="malformed_token")
    if len(links) > max_links:
        raise TokenError(
            f"the delegation chain has {len(links)} links; at most {max_links} are allowed",
            code="delegation_too_deep",
        )
    return links


def mint_grant(
    key: Ed25519SigningKey,
    *,
    parent: str,
    child: str,
    audience: str,
    scopes: Sequence[str],
    tools: Sequence[str],
    max_depth: int,
    parent_links: Sequence[str] = (),
    now: float,
    lifetime: int = 300,
    alg: str = "EdDSA",
    extra: dict[str, Any] | None = None,
) -> str:
    """Sign a grant from ``parent`` to ``child`` (SDK and tests).

    ``parent_links`` is the chain the parent itself holds (the ``parent_agent`` claim of its own
    token, split), empty for a parent acting on its own authority. Returns the compact grant only;
    present ``~``-joined ``parent_links + [grant]`` as the ``subject_token``.
    """
    # Milliseconds: marks (a return to active) are exact instants, and a grant signed just after
    # one, in the same second, must not read as signed before it. Only Aegis reads grants.
    iat = math.floor(now * 1000) / 1000
    claims: dict[str, Any] = {
        **(extra or {}),
        "iss": parent,
        "sub": child,
        "aud": audience,
        "iat": iat,
        "exp": int(now) + lifetime,
        "jti": new_id(),
        "scope": join_scopes(list(scopes)),
        "tools": list(tools),
        "max_depth": max_depth,
        "parent_chain": chain_digest(parent_links),
    }
    header = encode_segment({"alg": alg, "typ": DELEGATION_TYP, "kid": key.kid})
    return sign_compact(header, claims, key.sign)


@functools.lru_cache(maxsize=64)
def grant_rules(audience: str, *, leeway: float = DEFAULT_LEEWAY) -> VerifyRules:
    """Rules for a grant; ``leeway=math.inf`` re-verifies structure and signature only."""
    return VerifyRules(
        typ=DELEGATION_TYP,
        issuer=None,  # the issuer selects the key: it is checked by the resolver's owner
        audience=audience,
        algs=GRANT_ALGS,
        leeway=leeway,
        required=GRANT_CLAIMS,
        max_lifetime=MAX_GRANT_LIFETIME,
    )


_key_cache: dict[tuple[str, ...], dict[str, PublicKey]] = {}
#: Links whose signature and claims verified, by (exact compact link, audience, signer id, signer
#: key material). A hit is exactly what re-verifying with the signer's current keys would return
#: (verification is deterministic), and a rotated or removed key changes the material, so it misses.
#: Only successes are kept; time, state and narrowing checks are the caller's, on every call.
_verified: dict[tuple[str, str, str, tuple[str, ...]], Grant] = {}
MAX_VERIFIED_LINKS: Final = 4096


def _key_material(agent: Agent) -> tuple[str, ...]:
    material: list[str] = []
    for jwk in agent.jwks:
        get = jwk.get
        material += (str(get("kid", "")), str(get("x", "")), str(get("y", "")))
    return tuple(material)


def agent_key_resolver(agent: Agent) -> Callable[[str], PublicKey | None]:
    """Resolve a ``kid`` among the agent's *current* registered keys (registered kid or RFC 7638
    thumbprint). Keys never come from the token. Imports are cached by the exact key material."""
    return _resolver(agent, _key_material(agent))


def _resolver(agent: Agent, cache_key: tuple[str, ...]) -> Callable[[str], PublicKey | None]:
    """:func:`agent_key_resolver` for key material the caller has already read from ``agent``."""
    keys = _key_cache.get(cache_key)
    if keys is None:
        keys = {}
        for jwk in agent.jwks:
            key = public_key_from_jwk({k: v for k, v in jwk.items() if k != "kid"})
            keys[str(jwk.get("kid", key.kid))] = key
            keys.setdefault(key.kid, key)
        if len(_key_cache) >= 4096:
            _key_cache.clear()
        _key_cache[cache_key] = keys
    return keys.get


_SIGNATURE_CODES: Final = frozenset(
    {"invalid_signature", "unknown_key", "unsupported_algorithm", "forbidden_header"}
)
_TIME_CODES: Final = frozenset({"token_expired", "token_not_yet_valid", "token_issued_in_future"})


def verify_grant(
    token: str,
    resolve_key: Callable[[str], PublicKey | None],
    *,
    issuer: str,
    audience: str,
    now: float,
    leeway: float = DEFAULT_LEEWAY,
) -> Grant:
    """Verify one grant strictly through :func:`verify_jwt` with the parent's keys only.

    ``issuer`` is the agent whose keys ``resolve_key`` serves; the grant's ``iss`` must name it.
    Raises ``parent_signature_invalid``, ``parent_expired`` or another typed :class:`TokenError`.
    """
    try:
        jws = verify_jwt(token, resolve_key, grant_rules(audience, leeway=leeway), now)
    except AegisError as exc:
        if exc.code in _SIGNATURE_CODES:
            raise TokenError(
                f"the parent grant is not signed by a registered key of {issuer}",
                code="parent_signature_invalid",
            ) from exc
        if exc.code in _TIME_CODES:
            raise TokenError(
                "the parent grant has expired or is not valid yet; ask the parent for a new one",
                code="parent_expired",
            ) from exc
        raise
    claims = jws.payload
    if claims["iss"] != issuer:
        raise TokenError(
            "the grant's iss is not the signing agent", code="parent_signature_invalid"
        )
    return _grant_from_claims(token, claims)


def verify_agent_grant(token: str, signer: Agent, *, audience: str) -> Grant:
    """:func:`verify_grant` of a link signed by agent ``signer``, structure and signature only
    (``leeway=inf``: the chain checks time), memoized per link and per signer key material."""
    material = _key_material(signer)
    memo_key = (token, audience, signer.id, material)
    grant = _verified.get(memo_key)
    if grant is None:
        grant = verify_grant(
            token,
            _resolver(signer, material),
            issuer=signer.id,
            audience=audience,
            now=0.0,
            leeway=math.inf,
        )
        if len(_verified) >= MAX_VERIFIED_LINKS:
            _verified.clear()
        _verified[memo_key] = grant
    return grant


def forget_verified_links() -> None:
    """Drop every memoized link (benchmarks measuring the cold path, tests)."""
    _verified.clear()


def _grant_from_claims(token: str, claims: dict[str, Any]) -> Grant:
    def bad(name: str, what: str) -> TokenError:
        return TokenError(f"grant claim {name!r} {what}", code="invalid_claim", claim=name)

    iss, sub, parent_chain = claims["iss"], claims["sub"], claims["parent_chain"]
    for name, value in (("iss", iss), ("sub", sub), ("parent_chain", parent_chain)):
        if type(value) is not str or not value:
            raise bad(name, "must be a non-empty string")
    tools = claims["tools"]
    if type(tools) is not list or not 0 < len(tools) <= _MAX_TOOLS:
        raise bad("tools", f"must list 1-{_MAX_TOOLS} tool names")
    for tool in tools:
        if type(tool) is not str or not tool:
            raise bad("tools", f"must list 1-{_MAX_TOOLS} tool names")
    depth = claims["max_depth"]
    if type(depth) is not int or not 0 <= depth <= 16:  # JSON gives exact types; bool is refused
        raise bad("max_depth", "must be a whole number from 0 to 16")
    origin = claims.get("origin_user")
    origin_iss = claims.get("origin_iss")
    if origin is not None and not (isinstance(origin, str) and isinstance(origin_iss, str)):
        raise bad("origin_user", "must be a string with origin_iss")
    iat, exp = float(claims["iat"]), float(claims["exp"])
    if not (math.isfinite(iat) and math.isfinite(exp)) or exp <= iat:
        raise bad("exp", "must be after iat")
    origin_exp: float | None = None
    if origin is not None:
        # A link signed before the user's expiry was carried has none: its own exp, which the
        # token service set no later than the user's, bounds the chain instead.
        raw = claims.get("origin_exp", exp)
        try:
            origin_exp = float(raw) if type(raw) in (int, float) else math.nan
        except OverflowError:  # an integer no float holds
            origin_exp = math.nan
        if not math.isfinite(origin_exp) or origin_exp < exp:
            raise bad("origin_exp", "must be a number no earlier than exp")
    return Grant(
        token,
        iss,
        sub,
        claims["jti"],
        iat,
        exp,
        split_scopes(claims["scope"]),
        tuple(dict.fromkeys(tools)),
        depth,
        parent_chain,
        origin,
        origin_iss if origin is not None else None,
        origin_exp,
    )

"""The one verification entry point for every signed JWT Aegis accepts (RFC 7519, RFC 8725).

Every component that checks a token, proof, grant or attestation calls :func:`verify_jwt` with the
rules for that kind of object; access tokens go through :class:`AccessTokenVerifier`. Order matters
and is fixed: structure and size, algorithm allowlist, no key-carrying headers, ``typ``, key by
``kid`` from *our* resolver only, signature, and only then the claims. A claim is never read from a
token whose signature has not been checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aegis.clock import Clock
from aegis.crypto.jws import KEY_CARRYING_HEADERS, MAX_TOKEN_BYTES, ParsedJWS, parse_compact
from aegis.crypto.keys import Ed25519PublicKey, PublicKey
from aegis.errors import TokenError
from aegis.tokens.claims import AccessToken

__all__ = [
    "ACCESS_TOKEN_CLAIMS",
    "ACCESS_TOKEN_TYP",
    "DEFAULT_LEEWAY",
    "ED25519_ALGS",
    "MAX_KID_LENGTH",
    "MAX_VERIFIED_TOKENS",
    "AccessTokenVerifier",
    "VerifyRules",
    "verify_jwt",
]

#: ``alg`` values accepted for Ed25519 keys: the polymorphic ``EdDSA`` (RFC 8037) and the
#: fully-specified ``Ed25519`` (RFC 9864). Comparison is exact: ``eddsa`` or ``NONE`` are refused.
ED25519_ALGS: Final = frozenset({"EdDSA", "Ed25519"})
#: Default clock skew allowed on ``exp``, ``nbf`` and ``iat`` (seconds).
DEFAULT_LEEWAY: Final = 30.0
MAX_KID_LENGTH: Final = 128
_JUDGED_MAX: Final = 1024
#: Distinct accepted access tokens whose parsed form one verifier remembers (cleared when full).
MAX_VERIFIED_TOKENS: Final = 4096
#: RFC 9068 §2.1: access tokens carry ``typ: at+jwt``.
ACCESS_TOKEN_TYP: Final = "at+jwt"
#: RFC 9068 §2.2 plus the Aegis claims every access token must carry.
ACCESS_TOKEN_CLAIMS: Final = frozenset(
    {"iss", "sub", "aud", "exp", "iat", "jti", "client_id", "tenant", "env", "agent_id"}
)


@dataclass(frozen=True, slots=True)
class VerifyRules:
    """What one kind of token must look like. One instance per kind, built once."""

    #: Accepted ``typ`` values, compared case-insensitively with any ``application/`` prefix removed.
    typ: str
    #: Exact ``iss``; None only for objects whose issuer the caller checks itself.
    issuer: str | None
    #: A value ``aud`` must equal or contain; None when the caller checks the audience itself.
    audience: str | None
    algs: frozenset[str] = ED25519_ALGS
    leeway: float = DEFAULT_LEEWAY
    required: frozenset[str] = frozenset({"iss", "exp", "iat", "jti"})
    #: Refuse tokens whose ``exp - iat`` exceeds this (defence in depth against minting bugs).
    max_lifetime: float | None = None
    max_bytes: int = MAX_TOKEN_BYTES
    #: Key-carrying headers allowed for this kind (only DPoP proofs carry their own ``jwk``).
    allowed_key_headers: frozenset[str] = field(default_factory=frozenset)
    #: When false, a missing ``typ`` is accepted (RFC 7523 client assertions); a present one
    #: must still match.
    typ_required: bool = True
    #: When false, a missing ``kid`` is passed to the resolver as ``""`` (a client with one key).
    kid_required: bool = True
    #: Header segments already judged under these rules, mapped to their ``(alg, kid)``. Headers
    #: repeat across every token one key signs; a miss runs :func:`_judge_header`, only passing
    #: headers are stored, and the entry is keyed by the exact segment text, so the cache changes
    #: no outcome. Not part of the rules' identity.
    _judged: dict[str, tuple[str, str]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )


def _norm_typ(value: str) -> str:
    # ASCII only: str.lower() maps some non-ASCII letters (KELVIN SIGN) onto ASCII ones.
    if not value.isascii():
        return ""
    value = value.lower()
    return value[12:] if value.startswith("application/") else value


#: Times beyond this (about year 33658) are refused: they cannot be a real instant, and an integer
#: too large for a float would raise OverflowError in the comparisons below.
_MAX_TIME: Final = 1e12


#: A JSON NumericDate (RFC 7519 §2) is an exact int or float: JSON gives no subclasses, and bool
#: (a subclass of int) is refused.
_NUMBER_TYPES: Final = frozenset({int, float})


def verify_jwt(
    token: str, resolve_key: Callable[[str], PublicKey | None], rules: VerifyRules, now: float
) -> ParsedJWS:
    """Verify ``token`` under ``rules``; return it parsed. Raises :class:`TokenError`."""
    jws = parse_compact(token, max_bytes=rules.max_bytes)
    segment = token[: token.index(".")]
    judged = rules._judged.get(segment)
    if judged is None:
        judged = _judge_header(jws.header, rules)
        if len(rules._judged) >= _JUDGED_MAX:
            rules._judged.clear()
        rules._judged[segment] = judged
    alg, kid = judged
    key = resolve_key(kid)
    if key is None:
        raise TokenError("no published key has this kid", code="unknown_key")
    if alg not in key.algs:
        raise TokenError("algorithm does not match the key type", code="unsupported_algorithm")
    key.verify(jws.signing_input, jws.signature)
    check_claims(jws.payload, rules, now)
    return jws


def _judge_header(header: dict[str, Any], rules: VerifyRules) -> tuple[str, str]:
    """The header checks, in order: algorithm allowlist, key-carrying headers, ``typ``, ``kid``.

    A pure function of the header and the rules; returns ``(alg, kid)`` or raises."""
    alg = header["alg"]
    if alg not in rules.algs:
        raise TokenError("signature algorithm not allowed", code="unsupported_algorithm")
    for name in KEY_CARRYING_HEADERS.intersection(header):
        if name not in rules.allowed_key_headers:
            raise TokenError(f"header {name!r} is not accepted", code="forbidden_header")
    typ = header.get("typ")
    if (typ is not None or rules.typ_required) and (
        not isinstance(typ, str) or _norm_typ(typ) != rules.typ
    ):
        raise TokenError(f"token type must be {rules.typ}", code="invalid_token_type")
    kid = header.get("kid")
    if kid is None and not rules.kid_required:
        kid = ""
    elif not isinstance(kid, str) or not kid or len(kid) > MAX_KID_LENGTH:
        raise TokenError("header kid is missing or invalid", code="unknown_key")
    return alg, kid


def check_times(claims: dict[str, Any], rules: VerifyRules, now: float) -> None:
    """The time-dependent checks of :func:`check_claims` (``exp``, ``nbf``, ``iat`` against
    ``now``), on time claims already known to be NumericDates. Everything else ``check_claims``
    checks is a function of the claims and the rules alone, so a token that passed it whole
    under the same rules needs only this at a later ``now``."""
    leeway = rules.leeway
    exp = claims.get("exp")
    # RFC 7519 §4.1.4: "MUST NOT be accepted for processing" on or after exp (plus skew).
    if exp is not None and now >= exp + leeway:
        raise TokenError("token has expired; request a new one", code="token_expired")
    nbf = claims.get("nbf")
    if nbf is not None and now + leeway < nbf:
        raise TokenError("token is not valid yet", code="token_not_yet_valid")
    iat = claims.get("iat")
    if iat is not None and iat > now + leeway:
        raise TokenError(
            "token was issued in the future; check clocks", code="token_issued_in_future"
        )


def check_claims(claims: dict[str, Any], rules: VerifyRules, now: float) -> None:
    """Registered-claim checks (RFC 7519 §4.1) after the signature has been verified."""
    get = claims.get
    for name in rules.required:
        if get(name) is None:
            raise TokenError(
                f"required claim {name!r} is missing", code="missing_claim", claim=name
            )
    # Each time claim: a NumericDate within +/- _MAX_TIME (inlined: this is the hot path).
    exp, nbf, iat = get("exp"), get("nbf"), get("iat")
    if exp is not None and (type(exp) not in _NUMBER_TYPES or not -_MAX_TIME <= exp <= _MAX_TIME):
        raise TokenError("claim 'exp' must be a number", code="invalid_claim", claim="exp")
    if nbf is not None and (type(nbf) not in _NUMBER_TYPES or not -_MAX_TIME <= nbf <= _MAX_TIME):
        raise TokenError("claim 'nbf' must be a number", code="invalid_claim", claim="nbf")
    if iat is not None and (type(iat) not in _NUMBER_TYPES or not -_MAX_TIME <= iat <= _MAX_TIME):
        raise TokenError("claim 'iat' must be a number", code="invalid_claim", claim="iat")
    check_times(claims, rules, now)
    if (
        rules.max_lifetime is not None
        and exp is not None
        and iat is not None
        and exp - iat > rules.max_lifetime
    ):
        raise TokenError(
            "token lifetime exceeds the allowed maximum", code="invalid_claim", claim="exp"
        )
    if rules.issuer is not None and claims.get("iss") != rules.issuer:
        raise TokenError("token issuer is not trusted here", code="invalid_issuer")
    if rules.audience is not None:
        aud = claims.get("aud")
        if isinstance(aud, str):
            ok = aud == rules.audience
        elif isinstance(aud, list):
            ok = rules.audience in aud and all(isinstance(a, str) for a in aud)
        else:
            ok = False
        if not ok:
            raise TokenError(
                "token audience does not include this service", code="invalid_audience"
            )
    jti = claims.get("jti")
    if jti is not None and (not isinstance(jti, str) or not 0 < len(jti) <= 256):
        raise TokenError(
            "claim 'jti' must be a non-empty string", code="invalid_claim", claim="jti"
        )


class AccessTokenVerifier:
    """Verifies Aegis access tokens (RFC 9068 profile) against the key ring."""

    def __init__(
        self,
        resolve_key: Callable[[str], PublicKey | None],
        *,
        issuer: str,
        audience: str | None,
        clock: Clock,
        leeway: float = DEFAULT_LEEWAY,
        max_lifetime: float = 3600.0,
        algs: frozenset[str] = ED25519_ALGS,
    ) -> None:
        self._resolve = resolve_key
        self._clock = clock
        self.rules = VerifyRules(
            typ=ACCESS_TOKEN_TYP,
            issuer=issuer,
            audience=audience,
            algs=algs,
            leeway=leeway,
            required=ACCESS_TOKEN_CLAIMS,
            max_lifetime=max_lifetime,
        )

        #: Tokens that passed every check once, by their exact text: what parsing them gave
        #: (alg, kid, the parsed JWS, the typed claims), the rules they passed and the key whose
        #: signature check they passed. An agent sends the same token on every call for minutes,
        #: and parsing, the signature check and the claim checks other than time are pure
        #: functions of the text, the key and the rules. So on every use the key is resolved
        #: again from the ring; the signature is verified again unless that key is the one it
        #: verified with (same object or same key bytes: a key removed, retired past its overlap
        #: or replaced under the same kid is a fresh verification or a refusal); the time claims
        #: are checked again at the current time; a rules object replaced since is a miss. As
        #: Envoy's jwt_authn cache of verified tokens. Only accepted tokens are kept (an attacker
        #: cannot fill it without our signature), and it is bounded.
        self._verified: dict[
            str, tuple[str, str, ParsedJWS, AccessToken, VerifyRules, PublicKey]
        ] = {}

    def verify(self, token: str) -> AccessToken:
        now = self._clock.now()
        # Only an exact str is looked up (anything else is refused by the parser below).
        hit = self._verified.get(token) if type(token) is str else None
        if hit is not None and hit[4] is self.rules:
            alg, kid, jws, access, rules, verified_with = hit
            key = self._resolve(kid)
            if key is None:
                raise TokenError("no published key has this kid", code="unknown_key")
            if not _same_key(key, verified_with):
                if alg not in key.algs:
                    raise TokenError(
                        "algorithm does not match the key type", code="unsupported_algorithm"
                    )
                key.verify(jws.signing_input, jws.signature)
                self._verified[token] = (alg, kid, jws, access, rules, key)
            check_times(jws.payload, rules, now)
            return access
        used: list[PublicKey] = []  # the very key the signature verified with, not a re-read

        def resolve(kid: str) -> PublicKey | None:
            key = self._resolve(kid)
            if key is not None:
                used.append(key)
            return key

        jws = verify_jwt(token, resolve, self.rules, now)
        access = AccessToken.from_claims(jws.payload)
        judged = self.rules._judged.get(token[: token.index(".")])
        if judged is not None and len(used) == 1:
            if len(self._verified) >= MAX_VERIFIED_TOKENS:
                self._verified.clear()
            self._verified[token] = (*judged, jws, access, self.rules, used[0])
        return access


def _same_key(key: PublicKey, known: PublicKey) -> bool:
    """Whether ``key`` is the key ``known`` was: the same object, or an Ed25519 key with the same
    32 bytes (the ring builds new key objects each time it reloads)."""
    if key is known:
        return True
    return (
        type(key) is Ed25519PublicKey and type(known) is Ed25519PublicKey and key.raw == known.raw
    )

"""The header caches change no outcome: per segment text, per rules object, bounded."""

from __future__ import annotations

import dataclasses

import pytest

from aegis.crypto.jws import _header_cache, encode_segment, parse_compact, sign_compact
from aegis.crypto.keys import Ed25519SigningKey
from aegis.errors import TokenError
from aegis.tokens.verifier import _JUDGED_MAX, VerifyRules, verify_jwt

KEY = Ed25519SigningKey.generate()
T0 = 1_800_000_000
CLAIMS = {"iss": "i", "exp": T0 + 60, "iat": T0, "jti": "j"}
RULES = VerifyRules(typ="at+jwt", issuer="i", audience=None)


def _token(**header: object) -> str:
    segment = encode_segment({"alg": "EdDSA", "typ": "at+jwt", "kid": KEY.kid, **header})
    return sign_compact(segment, CLAIMS, KEY.sign)


def _code(token: str, rules: VerifyRules) -> str | None:
    try:
        verify_jwt(token, {KEY.kid: KEY.public}.get, rules, T0)
    except TokenError as exc:
        return exc.code
    return None


def test_a_header_judged_under_one_rules_is_judged_again_under_another() -> None:
    token = _token()
    assert _code(token, RULES) is None
    strict_typ = VerifyRules(typ="dpop+jwt", issuer="i", audience=None)
    assert _code(token, strict_typ) == "invalid_token_type"
    no_eddsa = VerifyRules(typ="at+jwt", issuer="i", audience=None, algs=frozenset({"ES256"}))
    assert _code(token, no_eddsa) == "unsupported_algorithm"
    # And back: the first rules still accept it.
    assert _code(token, RULES) is None


def test_replace_gives_fresh_rules_with_their_own_judgement() -> None:
    token = _token()
    assert _code(token, RULES) is None
    other = dataclasses.replace(RULES, typ="jwt")
    assert other._judged == {}
    assert _code(token, other) == "invalid_token_type"


def test_refused_headers_are_not_cached() -> None:
    rules = VerifyRules(typ="at+jwt", issuer="i", audience=None)
    token = _token(jku="https://evil.example/jwks")
    for _ in range(3):
        assert _code(token, rules) == "forbidden_header"
    assert rules._judged == {}


def test_the_cache_does_not_widen_equality_or_hash() -> None:
    a = VerifyRules(typ="at+jwt", issuer="i", audience=None)
    b = VerifyRules(typ="at+jwt", issuer="i", audience=None)
    assert _code(_token(), a) is None
    assert a == b and hash(a) == hash(b)
    assert "_judged" not in repr(a)


def test_both_caches_stay_bounded_and_correct_past_their_size() -> None:
    rules = VerifyRules(typ="at+jwt", issuer="i", audience=None)
    for i in range(_JUDGED_MAX + 10):
        assert _code(_token(n=i), rules) is None
        assert len(rules._judged) <= _JUDGED_MAX
    assert len(_header_cache) <= 1024
    assert _code(_token(n=0, crit=["n"]), rules) == "forbidden_header"


def test_each_parse_gets_its_own_header() -> None:
    """A caller editing the header it was given must not change the next parse of that segment."""
    token = _token(seen=1)
    first = parse_compact(token)
    assert first.header == parse_compact(token).header
    first.header["kid"] = "attacker"
    first.header["alg"] = "none"
    del first.header["typ"]
    again = parse_compact(token).header
    assert again == {"alg": "EdDSA", "typ": "at+jwt", "kid": KEY.kid, "seen": 1}
    assert _code(token, RULES) is None


def test_headers_with_nested_values_are_not_shared_either() -> None:
    """A DPoP-style header carries a jwk object; editing it must not leak into later parses."""
    jwk = Ed25519SigningKey.generate().public.to_jwk()
    token = _token(jwk=jwk)
    first = parse_compact(token)
    first.header["jwk"]["x"] = KEY.public.to_jwk()["x"]
    assert parse_compact(token).header["jwk"] == jwk


def test_a_damaged_header_segment_is_still_refused_after_a_cached_one() -> None:
    token = _token(seen=2)
    parse_compact(token)
    with pytest.raises(TokenError) as err:
        parse_compact(token.replace("eyJ", "eyK", 1))
    assert err.value.code == "malformed_token"

"""Cross-checks with joserfc, and properties (Hypothesis) of the parser, claims and base64url.

joserfc is an independent JOSE implementation: tokens we mint must verify with it against our
published JWKS, and tokens it signs with our key must verify with ours. joserfc warns that
``EdDSA`` is deprecated by RFC 9864; the warning is caught only around its own calls.
"""

from __future__ import annotations

import base64
import json
import warnings
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet, OKPKey

from aegis.clock import FrozenClock, random_bytes
from aegis.crypto.jws import encode_segment, parse_compact, sign_compact
from aegis.crypto.keyring import KeyRing, KeyRingSettings
from aegis.crypto.keys import Ed25519SigningKey, b64u_decode, b64u_encode
from aegis.errors import TokenError
from aegis.tokens.issuer import TokenIssuer
from aegis.tokens.verifier import AccessTokenVerifier, VerifyRules, verify_jwt
from tests.crypto.fakes import MemoryKeyStore

ISS = "https://aegis.example"
AUD = "https://payments.example"
T0 = 1_800_000_000


def _ring(alg: str = "EdDSA") -> tuple[FrozenClock, KeyRing]:
    clock = FrozenClock(T0)
    ring = KeyRing(MemoryKeyStore(), random_bytes(32), clock, KeyRingSettings(signing_alg=alg))
    ring.ensure_initialized()
    return clock, ring


def _jose(call: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="EdDSA is deprecated")
        return call(*args, **kwargs)


@pytest.mark.parametrize("alg", ["EdDSA", "Ed25519"])
def test_tokens_we_mint_verify_with_joserfc_against_our_jwks(alg: str) -> None:
    clock, ring = _ring(alg)
    issued = TokenIssuer(ring, issuer=ISS, clock=clock).issue(
        agent_id="agent-1",
        client_id="client-1",
        tenant="acme",
        env="prod",
        scopes=("payments:read", "payments:write"),
        audience=(AUD, "https://other.example"),
        lifetime=300,
        cnf={"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"},
    )
    keys = KeySet.import_key_set(ring.jwks())
    decoded = _jose(jose_jwt.decode, issued.token, keys, algorithms=[alg])
    assert decoded.claims == issued.claims
    assert decoded.header == {"alg": alg, "typ": "at+jwt", "kid": ring.signing_key().kid}


def test_joserfc_refuses_our_token_after_tampering() -> None:
    clock, ring = _ring()
    token = (
        TokenIssuer(ring, issuer=ISS, clock=clock)
        .issue(
            agent_id="a",
            client_id="c",
            tenant="t",
            env="e",
            scopes=(),
            audience=(AUD,),
            lifetime=60,
        )
        .token
    )
    h, _, s = token.split(".")
    forged = f"{h}.{encode_segment({'sub': 'admin'})}.{s}"
    with pytest.raises(Exception, match="signature"):
        _jose(jose_jwt.decode, forged, KeySet.import_key_set(ring.jwks()), algorithms=["EdDSA"])


@pytest.mark.parametrize("alg", ["EdDSA", "Ed25519"])
@pytest.mark.parametrize("typ", ["at+jwt", "application/at+jwt", "AT+JWT"])
def test_tokens_joserfc_signs_with_our_key_verify_with_ours(alg: str, typ: str) -> None:
    clock, ring = _ring()
    ours = ring.signing_key()
    key = OKPKey.import_key({**ours.private_jwk(), "kid": ours.kid})
    claims = {
        "iss": ISS,
        "sub": "agent-1",
        "aud": [AUD],
        "exp": T0 + 300,
        "iat": T0,
        "jti": "j-1",
        "client_id": "client-1",
        "tenant": "acme",
        "env": "prod",
        "agent_id": "agent-1",
        "scope": "payments:read",
    }
    header = {"alg": alg, "typ": typ, "kid": ours.kid}
    token = _jose(jose_jwt.encode, header, claims, key, algorithms=[alg])
    verifier = AccessTokenVerifier(ring.public_key, issuer=ISS, audience=AUD, clock=clock)
    verified = verifier.verify(token)
    assert verified.claims == claims
    assert verified.scopes == ("payments:read",)


def test_joserfc_signature_with_a_foreign_key_is_refused_by_ours() -> None:
    clock, ring = _ring()
    stranger = Ed25519SigningKey.generate()
    key = OKPKey.import_key(stranger.private_jwk())
    header = {"alg": "EdDSA", "typ": "at+jwt", "kid": ring.signing_key().kid}
    token = _jose(jose_jwt.encode, header, {"iss": ISS}, key, algorithms=["EdDSA"])
    verifier = AccessTokenVerifier(ring.public_key, issuer=ISS, audience=AUD, clock=clock)
    with pytest.raises(TokenError) as err:
        verifier.verify(token)
    assert err.value.code == "invalid_signature"


# -- properties -------------------------------------------------------------------------------

_SIGNER = Ed25519SigningKey.generate()
_RULES = VerifyRules(
    typ="at+jwt",
    issuer=ISS,
    audience=AUD,
    required=frozenset({"iss", "exp", "iat", "jti"}),
)
_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_json = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    extra=st.dictionaries(
        st.text(max_size=10).filter(lambda k: k not in {"iss", "aud", "exp", "iat", "nbf", "jti"}),
        _json,
        max_size=6,
    ),
    lifetime=st.integers(min_value=1, max_value=3600),
    jti=st.text(min_size=1, max_size=64),
)
def test_claim_sets_round_trip(extra: dict[str, Any], lifetime: int, jti: str) -> None:
    claims = {"iss": ISS, "aud": AUD, "iat": T0, "exp": T0 + lifetime, "jti": jti, **extra}
    header = encode_segment({"alg": "EdDSA", "typ": "at+jwt", "kid": _SIGNER.kid})
    try:
        json.dumps(claims, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return  # lone surrogates cannot be encoded as UTF-8: nothing to mint
    token = sign_compact(header, claims, _SIGNER.sign)
    jws = verify_jwt(token, {_SIGNER.kid: _SIGNER.public}.get, _RULES, T0)
    assert jws.payload == claims


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(max_size=300)
    | st.text(alphabet="eyJhbGciOiJFZERTQSJ9.-_+/= \n", max_size=300)
    | st.lists(st.binary(max_size=60), min_size=0, max_size=5).map(
        lambda parts: ".".join(b64u_encode(p) for p in parts)
    )
)
def test_arbitrary_text_only_ever_raises_token_error(text: str) -> None:
    resolve = {_SIGNER.kid: _SIGNER.public, "": _SIGNER.public}.get
    with pytest.raises(TokenError):
        verify_jwt(text, resolve, _RULES, T0)


@settings(max_examples=300, deadline=None)
@given(header=_json, payload=_json, sig=st.binary(max_size=70))
def test_arbitrary_json_segments_only_ever_raise_token_error(
    header: Any, payload: Any, sig: bytes
) -> None:
    def enc(value: Any) -> str:
        return b64u_encode(json.dumps(value).encode())

    token = f"{enc(header)}.{enc(payload)}.{b64u_encode(sig)}"
    with pytest.raises(TokenError):
        verify_jwt(token, {_SIGNER.kid: _SIGNER.public}.get, _RULES, T0)


@given(st.binary(max_size=200))
def test_b64u_round_trips(data: bytes) -> None:
    text = b64u_encode(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert b64u_decode(text) == data
    assert text == base64.urlsafe_b64encode(data).decode().rstrip("=")


@given(st.binary(min_size=1, max_size=200), st.integers(min_value=1, max_value=15))
def test_b64u_refuses_noncanonical_trailing_bits(data: bytes, bits: int) -> None:
    text = b64u_encode(data)
    rem = len(text) % 4
    if rem == 0:
        return
    unused = 0xF if rem == 2 else 0x3
    if not bits & unused:
        return
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    variant = text[:-1] + alphabet[alphabet.index(text[-1]) | (bits & unused)]
    assert variant != text
    with pytest.raises(ValueError, match="not canonical base64url"):
        b64u_decode(variant)


@given(
    st.binary(min_size=1, max_size=100), st.sampled_from(["=", "==", "+", "/", " ", "\n", ".", "é"])
)
def test_b64u_refuses_padding_and_foreign_characters(data: bytes, junk: str) -> None:
    text = b64u_encode(data)
    for variant in (text + junk, junk + text, text[:1] + junk + text[1:]):
        with pytest.raises(ValueError, match="not canonical base64url"):
            b64u_decode(variant)


@given(
    st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", max_size=80
    )
)
def test_b64u_accepts_exactly_the_canonical_strings(text: str) -> None:
    try:
        data = b64u_decode(text)
    except ValueError:
        # Refused: either an impossible length or non-zero unused bits.
        padded = text + "=" * (-len(text) % 4)
        assert len(text) % 4 == 1 or b64u_encode(base64.urlsafe_b64decode(padded)) != text
        return
    assert b64u_encode(data) == text


def test_parse_compact_returns_the_exact_signing_input() -> None:
    token = (
        TokenIssuer(_ring()[1], issuer=ISS, clock=FrozenClock(T0))
        .issue(
            agent_id="a",
            client_id="c",
            tenant="t",
            env="e",
            scopes=(),
            audience=(AUD,),
            lifetime=60,
        )
        .token
    )
    jws = parse_compact(token)
    assert jws.signing_input == token.rsplit(".", 1)[0].encode()

"""RFC 8037 Appendix A: Ed25519 JWKs, the RFC 7638 thumbprint and the example JWS."""

from __future__ import annotations

import pytest

from aegis.crypto.jws import parse_compact
from aegis.crypto.keys import (
    Ed25519PublicKey,
    Ed25519SigningKey,
    b64u_decode,
    b64u_encode,
    jwk_thumbprint,
    public_key_from_jwk,
)
from aegis.errors import TokenError
from tests.crypto.conftest import load_vectors

A = load_vectors("rfc8037.json")


def test_a1_private_jwk_imports_and_exports_unchanged() -> None:
    key = Ed25519SigningKey.from_jwk(A["private_jwk"])
    assert key.private_jwk() == A["private_jwk"]


def test_a2_public_jwk_is_derived_from_the_private_key() -> None:
    key = Ed25519SigningKey.from_jwk(A["private_jwk"])
    assert key.public.to_jwk() == A["public_jwk"]
    imported = public_key_from_jwk(A["public_jwk"])
    assert imported.to_jwk() == A["public_jwk"]


def test_a3_thumbprint() -> None:
    assert jwk_thumbprint(A["public_jwk"]) == A["rfc7638_thumbprint"]
    # The kid Aegis assigns is that thumbprint, for the imported and the derived key alike.
    assert public_key_from_jwk(A["public_jwk"]).kid == A["rfc7638_thumbprint"]
    assert Ed25519SigningKey.from_jwk(A["private_jwk"]).kid == A["rfc7638_thumbprint"]


def test_a4_jws_verifies() -> None:
    h, p, s = A["jws"].split(".")
    key = public_key_from_jwk(A["public_jwk"])
    key.verify(f"{h}.{p}".encode("ascii"), b64u_decode(s))
    assert b64u_decode(p).decode() == A["payload"]
    # The RFC's payload is plain text, not a JSON object: the JWT parser refuses it by design.
    with pytest.raises(TokenError) as err:
        parse_compact(A["jws"])
    assert err.value.code == "malformed_token"


def test_a4_signing_reproduces_the_jws_byte_for_byte() -> None:
    key = Ed25519SigningKey.from_jwk(A["private_jwk"])
    h = b64u_encode(b'{"alg":"EdDSA"}')
    p = b64u_encode(A["payload"].encode())
    signing_input = f"{h}.{p}"
    token = f"{signing_input}.{b64u_encode(key.sign(signing_input.encode('ascii')))}"
    assert token == A["jws"]


def test_a4_tampered_signature_is_refused() -> None:
    h, p, s = A["jws"].split(".")
    sig = bytearray(b64u_decode(s))
    sig[0] ^= 1
    key = Ed25519PublicKey(b64u_decode(A["public_jwk"]["x"]))
    with pytest.raises(TokenError) as err:
        key.verify(f"{h}.{p}".encode("ascii"), bytes(sig))
    assert err.value.code == "invalid_signature"


def test_private_jwk_with_mismatched_x_is_refused() -> None:
    from aegis.errors import InvalidRequest

    other = Ed25519SigningKey.generate().public.to_jwk()["x"]
    with pytest.raises(InvalidRequest):
        Ed25519SigningKey.from_jwk({**A["private_jwk"], "x": other})


def test_public_import_refuses_the_private_jwk() -> None:
    from aegis.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        public_key_from_jwk(A["private_jwk"])

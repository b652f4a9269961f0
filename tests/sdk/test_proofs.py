"""The SDK's DPoP proofs pass the gateway's own verifier (aegis.tokens.dpop), for ordinary and for
awkward URLs, methods and nonces: the payload is assembled by hand, so it is checked here against
the real parser and verifier, never against itself."""

from __future__ import annotations

import pytest

from aegis.clock import FrozenClock
from aegis.crypto.jws import parse_compact
from aegis.crypto.keys import Ed25519SigningKey
from aegis.sdk.proofs import DpopSigner, htu_of
from aegis.tokens.dpop import DpopVerifier, access_token_hash
from tests.pki.fakes import MemoryReplayStore

T0 = 1_800_000_000.0
TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhIn0.c2ln"


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("POST", "https://gw.example.com/payments/transfer"),
        ("get", "https://gw.example.com/crm/customers/42?expand=cards#top"),
        ("PATCH", "http://127.0.0.1:8443/a%20b/%7Euser"),
        ("POST", 'https://gw.example.com/quote"and\\backslash'),
        ("PUT", "https://gw.example.com/ünïcødé/路径"),
        ("M-SEARCH", "https://gw.example.com/"),
    ],
)
def test_proofs_verify_with_the_gateway_verifier(method: str, url: str) -> None:
    clock = FrozenClock(T0)
    key = Ed25519SigningKey.generate()
    signer = DpopSigner(key, clock=clock)
    verifier = DpopVerifier(MemoryReplayStore(), clock=clock)
    proof = signer.proof(method, url, access_token=TOKEN, nonce='n"1\\')
    checked = verifier.verify(proof, method=method, url=url, access_token=TOKEN, jkt=signer.jkt)
    assert checked.jkt == signer.jkt
    claims = parse_compact(proof).payload
    assert claims["htm"] == method.upper()
    assert claims["htu"] == htu_of(url)
    assert claims["iat"] == int(T0)
    assert claims["ath"] == access_token_hash(TOKEN)
    assert claims["nonce"] == 'n"1\\'
    assert set(claims) == {"jti", "htm", "htu", "iat", "ath", "nonce"}


def test_every_proof_is_new_and_the_header_carries_only_the_public_key() -> None:
    key = Ed25519SigningKey.generate()
    signer = DpopSigner(key)
    proofs = [signer.proof("POST", "https://gw.example.com/x") for _ in range(50)]
    assert len({parse_compact(p).payload["jti"] for p in proofs}) == 50
    header = parse_compact(proofs[0]).header
    assert header["typ"] == "dpop+jwt" and header["alg"] == "EdDSA"
    assert "d" not in header["jwk"]
    assert "ath" not in parse_compact(proofs[0]).payload


def test_a_proof_for_one_url_is_refused_for_another() -> None:
    from aegis.errors import TokenError

    clock = FrozenClock(T0)
    signer = DpopSigner(Ed25519SigningKey.generate(), clock=clock)
    verifier = DpopVerifier(MemoryReplayStore(), clock=clock)
    proof = signer.proof("POST", "https://gw.example.com/payments/transfer")
    with pytest.raises(TokenError) as err:
        verifier.verify(proof, method="POST", url="https://gw.example.com/payments/refund")
    assert err.value.code == "invalid_dpop_proof"

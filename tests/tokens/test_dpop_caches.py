"""The DPoP verifier's record of judged proof headers saves parsing only: every proof is still
signature-checked with the header's key, bound to ``cnf.jkt`` and checked for htm, htu, iat and ath;
refused headers are never recorded, and the alg allowlist is read on every proof."""

from __future__ import annotations

import pytest

from aegis.clock import FrozenClock
from aegis.crypto.keys import Ed25519SigningKey, b64u_encode
from aegis.errors import TokenError
from aegis.stores.memory import MemoryReplayStore
from aegis.tokens.dpop import MAX_CACHED_KEYS, DpopVerifier
from tests.gateway.helpers import jkt_of, mint_proof

NOW = 1_800_000_000.0
URL = "https://gw.example.com/tools/pay"
TOKEN = "header.payload.signature"
KEY = Ed25519SigningKey.generate()


@pytest.fixture
def verifier() -> DpopVerifier:
    clock = FrozenClock(NOW)
    return DpopVerifier(MemoryReplayStore(clock), clock=clock)


def _verify(verifier: DpopVerifier, proof: str, *, jkt: str | None = None, url: str = URL) -> str:
    try:
        verifier.verify(proof, method="POST", url=url, access_token=TOKEN, jkt=jkt or jkt_of(KEY))
    except TokenError as exc:
        return exc.message
    return "ok"


def _proof(iat: float = NOW, **claims: object) -> str:
    return mint_proof(KEY, "POST", URL, token=TOKEN, iat=iat, **claims)


def test_a_known_header_does_not_spare_the_signature(verifier: DpopVerifier) -> None:
    assert _verify(verifier, _proof()) == "ok"
    assert len(verifier._judged) == 1
    h, p, s = _proof().split(".")
    other = _proof(htu="https://evil.example/x").split(".")[1]
    assert "signature" in _verify(verifier, f"{h}.{other}.{s}")  # payload swapped under a sig
    assert "signature" in _verify(verifier, f"{h}.{p}.{b64u_encode(bytes(64))}")
    thief = Ed25519SigningKey.generate()  # signs, but the header names KEY's jwk
    signing_input = f"{h}.{p}"
    stolen = f"{signing_input}.{b64u_encode(thief.sign(signing_input.encode()))}"
    assert "signature" in _verify(verifier, stolen)


def test_a_known_header_is_still_bound_and_checked_per_proof(verifier: DpopVerifier) -> None:
    assert _verify(verifier, _proof()) == "ok"
    other = jkt_of(Ed25519SigningKey.generate())
    assert "bound to" in _verify(verifier, _proof(), jkt=other)
    assert "htu" in _verify(verifier, _proof(), url="https://gw.example.com/tools/other")
    assert "iat is too old" in _verify(verifier, _proof(iat=NOW - 61))
    assert "ath" in _verify(verifier, _proof(ath=b64u_encode(bytes(32))))
    assert _verify(verifier, _proof()) == "ok"


def test_refused_headers_are_refused_every_time_and_never_recorded(
    verifier: DpopVerifier,
) -> None:
    private = {**KEY.public.to_jwk(), "d": b64u_encode(KEY.seed())}
    bad = [
        mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW, header={"typ": "jwt"}),
        mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW, header={"jwk": private}),
        mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW, header={"jku": "https://e.example"}),
        mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW, header={"alg": "ES256"}),
    ]
    for _ in range(3):
        for proof in bad:
            assert _verify(verifier, proof) != "ok"
    assert verifier._judged == {}


def test_the_alg_allowlist_is_read_on_every_proof(verifier: DpopVerifier) -> None:
    assert _verify(verifier, _proof()) == "ok"
    verifier.algs = frozenset({"ES256"})
    assert "alg is not one of" in _verify(verifier, _proof())


def test_the_record_is_bounded(verifier: DpopVerifier) -> None:
    for i in range(MAX_CACHED_KEYS + 3):
        proof = mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW, header={"n": i})
        assert _verify(verifier, proof) == "ok"
        assert len(verifier._judged) <= MAX_CACHED_KEYS

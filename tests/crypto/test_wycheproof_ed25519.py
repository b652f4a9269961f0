"""All 151 Wycheproof Ed25519 cases through Ed25519PublicKey.verify (libsodium), one test each."""

from __future__ import annotations

from typing import Any

import pytest

from aegis.crypto.keys import Ed25519PublicKey, public_key_from_jwk
from aegis.errors import TokenError
from tests.crypto.conftest import load_vectors

_DATA = load_vectors("wycheproof/ed25519_test.json")
_CASES = [
    pytest.param(group, case, id=f"tc{case['tcId']}-{case['result']}")
    for group in _DATA["testGroups"]
    for case in group["tests"]
]


def test_the_file_has_all_151_cases() -> None:
    assert len(_CASES) == _DATA["numberOfTests"] == 151
    results = [c.values[1]["result"] for c in _CASES]
    assert results.count("valid") == 88
    assert results.count("invalid") == 63


@pytest.mark.parametrize(("group", "case"), _CASES)
def test_ed25519_verify(group: dict[str, Any], case: dict[str, Any]) -> None:
    key = Ed25519PublicKey(bytes.fromhex(group["publicKey"]["pk"]))
    # The vector's JWK form imports strictly to the same key.
    assert (
        public_key_from_jwk({k: v for k, v in group["publicKeyJwk"].items() if k != "kid"}).to_jwk()
        == key.to_jwk()
    )
    msg, sig = bytes.fromhex(case["msg"]), bytes.fromhex(case["sig"])
    if case["result"] == "valid":
        key.verify(msg, sig)
    else:
        with pytest.raises(TokenError) as err:
            key.verify(msg, sig)
        assert err.value.code == "invalid_signature"

"""Wycheproof ``json_web_key_test.json`` against strict public-key import.

Every case is a key set; Aegis imports keys one at a time (agent keys, DPoP ``jwk``, client
assertion keys) with :func:`public_key_from_jwk`, which accepts only OKP/Ed25519 and EC/P-256
public keys usable for signatures. A set is refused when any of its keys is refused.

All 26 cases come out refused. For the "invalid" ones that is Wycheproof's verdict (symmetric,
RSA, ROCA, wrong alg for the curve, point off the curve, wrong curve, wrong kty, ``use: enc``).
The "valid" ones are RSA and HMAC key sets: Aegis accepts neither algorithm family, so refusing
them is deliberate. Out of scope: key-set level rules (duplicate ``kid``, mixed public/private
sets), since Aegis never imports a foreign key set; its own kids are RFC 7638 thumbprints.
"""

from __future__ import annotations

from typing import Any

import pytest

from aegis.crypto.keys import public_key_from_jwk
from aegis.errors import InvalidRequest
from tests.crypto.conftest import load_vectors

_DATA = load_vectors("wycheproof/json_web_key_test.json")
_CASES = [
    pytest.param(group, case, id=f"tc{case['tcId']}-{group['comment']}-{case['comment']}")
    for group in _DATA["testGroups"]
    for case in group["tests"]
]
#: The P-256 key Wycheproof modifies in the EC cases; unmodified, it must import.
_BASE_EC = {
    "kty": "EC",
    "crv": "P-256",
    "alg": "ES256",
    "use": "sig",
    "x": "04N0xi21hshyvBp7I167sbE_bXqyqkAPfefdklMO7wY",
    "y": "UI8exy-C06a7DUnjIdENkxeFtHM4-l_41LqEw9nVgmw",
}


def test_file_has_every_case() -> None:
    assert len(_CASES) == _DATA["numberOfTests"] == 26


def test_the_unmodified_ec_key_imports() -> None:
    assert public_key_from_jwk(_BASE_EC).algs == frozenset({"ES256"})


def _refused(jwk: dict[str, Any]) -> bool:
    try:
        public_key_from_jwk(jwk)
    except InvalidRequest:
        return True
    return False


@pytest.mark.parametrize(("group", "case"), _CASES)
def test_key_set_is_refused(group: dict[str, Any], case: dict[str, Any]) -> None:
    keyset = group.get("public") or group["private"]
    assert any(_refused(jwk) for jwk in keyset["keys"])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"alg": "ES521"}, "alg"),
        ({"alg": "ES224"}, "alg"),
        ({"use": "enc"}, "use"),
        ({"key_ops": ["encrypt"]}, "key_ops"),
        ({"y": "UI8exy-C06a7DUnjIdENkxeFtHM4-l_41LqEw9nVgnw"}, "curve"),
        ({"crv": "P-384"}, "crv"),
        ({"kty": "RSA"}, "kty"),
        ({"d": "yy49oPcINGK2ps0LmtxpB6UTEOiITghHBif6wDqmJ3c"}, "private"),
    ],
)
def test_each_wycheproof_modification_alone_is_refused(change: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        public_key_from_jwk({**_BASE_EC, **change})
    assert reason in err.value.message


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": ["OKP"], "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
        {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
            "alg": ["EdDSA"],
        },
        {"kty": "OKP", "crv": ["Ed25519"], "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
        {"kty": "OKP", "crv": "Ed25519", "x": 5},
        {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
            "key_ops": "verify",
        },
        {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURp"},
        {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHUR"},
        {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo="},
        {"kty": "OKP", "crv": "X25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
        {"kty": "oct", "k": "AAAA"},
        [],
        "not a jwk",
    ],
    ids=[
        "kty-list",
        "alg-list",
        "crv-list",
        "x-number",
        "key_ops-string",
        "x-noncanonical-bits",
        "x-short",
        "x-padded",
        "x25519",
        "oct",
        "array",
        "string",
    ],
)
def test_malformed_jwks_raise_invalid_request_only(jwk: Any) -> None:
    with pytest.raises(InvalidRequest):
        public_key_from_jwk(jwk)


def test_key_ops_with_verify_is_accepted() -> None:
    assert public_key_from_jwk({**_BASE_EC, "key_ops": ["verify"]}).algs == frozenset({"ES256"})

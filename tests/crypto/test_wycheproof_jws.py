"""Wycheproof ``json_web_signature_test.json`` against the strict parser, the algorithm gate and
the ES256 key.

Aegis verifies compact JWTs signed with EdDSA/Ed25519 (our tokens) or ES256 (agent-held keys);
every case in the file goes through :func:`verify_jwt` and must come out as ``TokenError``.
Beyond that, each case is checked at the layer it targets:

* **ES256** (groups ``es256``, ``SpecialCaseEs256``): the signature verdict of
  :class:`P256PublicKey` must equal Wycheproof's, case by case.
* **Algorithm confusion** (HS256 with the EC key's kid, ``none`` in any case, RS/PS headers, an
  embedded ``jwk``): the header is refused at the algorithm or header gate, before any key
  lookup, with the exact code.
* **base64** group: our strict base64url decoder refuses exactly the damaged segments.
* **Keys** in the groups: RSA, symmetric, P-521 and encryption-only keys are refused on import.

Out of scope, asserted refused but not checked further:

* RSA PKCS#1 v1.5 and PSS padding cases (``rs*``, ``ps*``, ``rfc7520`` RSA): Aegis implements no
  RSA, so these never reach a signature check.
* HMAC verification (``hs256``, ``base64``, ``rfc7520`` Figure 35): no symmetric algorithm is
  accepted; the MAC bytes are never computed.
* ES512/P-521 (``rfc7520`` Figure 27) and JSON serialization (case 17): not supported.
* "valid" cases whose payload is not a JSON object (``foo``, ``Test``, empty): a JWT payload is a
  JSON object (RFC 7519 §7.2 step 10), so the parser refuses them as ``malformed_token``; for
  ES256 the signature itself is still shown to verify.
* Cases 372 and 373, marked valid because some libraries skip a stray ``?``: our decoder is
  strict and refuses them, deliberately.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from aegis.crypto.jws import parse_compact
from aegis.crypto.keys import PublicKey, b64u_decode, public_key_from_jwk
from aegis.errors import InvalidRequest, TokenError
from aegis.tokens.verifier import VerifyRules, verify_jwt
from tests.crypto.conftest import load_vectors

_DATA = load_vectors("wycheproof/json_web_signature_test.json")
_NOW = 1_800_000_000.0
#: Lenient rules: only the structure, algorithm allowlist and signature are under test here.
_RULES = VerifyRules(
    typ="jwt",
    issuer=None,
    audience=None,
    algs=frozenset({"EdDSA", "Ed25519", "ES256"}),
    required=frozenset(),
    typ_required=False,
    kid_required=False,
)
_ES256_GROUPS = {"es256", "SpecialCaseEs256"}
#: tcIds with at least one segment our strict base64url decoder refuses (base64 group).
_BAD_BASE64 = {360, 361, 362, 363, 364, 365, 366, 368, 369, 371, 372, 373, 374, 375}


def _group_key(group: dict[str, Any]) -> PublicKey | None:
    jwk = group.get("public")
    if jwk is None:
        return None
    try:
        return public_key_from_jwk({k: v for k, v in jwk.items() if k != "kid"})
    except InvalidRequest:
        return None


_CASES = [
    pytest.param(group, case, id=f"tc{case['tcId']}-{group['comment']}-{case['comment']}")
    for group in _DATA["testGroups"]
    for case in group["tests"]
]


def test_file_has_every_case() -> None:
    assert len(_CASES) == _DATA["numberOfTests"] == 401


@pytest.mark.parametrize(("group", "case"), _CASES)
def test_every_case_is_refused_as_a_jwt(group: dict[str, Any], case: dict[str, Any]) -> None:
    key = _group_key(group)
    with pytest.raises(TokenError):
        verify_jwt(case["jws"], lambda kid: key, _RULES, _NOW)


def _header(segment: str) -> dict[str, Any] | None:
    try:
        value = json.loads(b64u_decode(segment))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


_GATE_CASES = [
    p
    for p in _CASES
    if len(p.values[1]["jws"].split(".")) == 3
    and _header(p.values[1]["jws"].split(".")[0]) is not None
]


@pytest.mark.parametrize(("group", "case"), _GATE_CASES)
def test_header_gate(group: dict[str, Any], case: dict[str, Any]) -> None:
    """Put a JSON payload in place of the vector's so the header alone decides."""
    h, _, s = case["jws"].split(".")
    header = _header(h)
    assert header is not None
    token = f"{h}.e30.{s or 'AA'}"
    key = _group_key(group)
    if any(not _decodes(seg) for seg in (h, s or "AA")):
        expected = "malformed_token"
    elif header["alg"] not in _RULES.algs:
        expected = "unsupported_algorithm"
    elif "jwk" in header:
        expected = "forbidden_header"
    elif key is None:
        expected = "unknown_key"  # the group's key was refused on import (wrong use/key_ops)
    else:
        expected = "invalid_signature"  # the payload was replaced
    looked_up: list[str] = []

    def resolve(kid: str) -> PublicKey | None:
        looked_up.append(kid)
        return key

    with pytest.raises(TokenError) as err:
        verify_jwt(token, resolve, _RULES, _NOW)
    assert err.value.code == expected
    if expected not in ("invalid_signature", "unknown_key"):
        assert looked_up == []  # refused before any key was looked up


def _decodes(segment: str) -> bool:
    try:
        b64u_decode(segment)
    except ValueError:
        return False
    return True


_ES256_CASES = [p for p in _CASES if p.values[0]["comment"] in _ES256_GROUPS]


@pytest.mark.parametrize(("group", "case"), _ES256_CASES)
def test_es256_signature_verdict(group: dict[str, Any], case: dict[str, Any]) -> None:
    key = _group_key(group)
    assert key is not None
    parts = case["jws"].split(".")
    if case["result"] == "valid":
        h, p, s = parts
        key.verify(f"{h}.{p}".encode("ascii"), b64u_decode(s))
        assert _header(h) == {"alg": "ES256", "kid": "kid-ec-sign"}
        return
    # Invalid: refused either structurally (segments) or by the signature check.
    if len(parts) != 3 or not all(parts) or not all(_decodes(x) for x in parts):
        if len(parts) == 3:  # a JSON payload, so only the damaged segment can be the reason
            parts[1] = "e30" if parts[1] else ""
        with pytest.raises(TokenError) as err:
            parse_compact(".".join(parts))
        assert err.value.code == "malformed_token"
        return
    h, p, s = parts
    header = _header(h)
    assert header is not None
    if header.get("alg") != "ES256" or "jwk" in header:
        return  # the algorithm/header gate (test_header_gate) is what refuses these
    with pytest.raises(TokenError) as err:
        key.verify(f"{h}.{p}".encode("ascii"), b64u_decode(s))
    assert err.value.code == "invalid_signature"


_B64_CASES = [p for p in _CASES if p.values[0]["comment"] == "base64"]


@pytest.mark.parametrize(("group", "case"), _B64_CASES)
def test_strict_base64url(group: dict[str, Any], case: dict[str, Any]) -> None:
    segments = case["jws"].split(".")
    refused = not all(_decodes(s) for s in segments)
    assert refused == (case["tcId"] in _BAD_BASE64)
    if refused:
        # Every case the decoder refuses is invalid in Wycheproof, except 372/373 (see above).
        assert case["result"] == "invalid" or case["tcId"] in {372, 373}
        with pytest.raises(TokenError) as err:
            parse_compact(case["jws"])
        assert err.value.code == "malformed_token"


_KEY_GROUPS = [
    pytest.param(g, id=f"{g['comment']}-tc{g['tests'][0]['tcId']}")
    for g in _DATA["testGroups"]
    if "public" in g
]


@pytest.mark.parametrize("group", _KEY_GROUPS)
def test_group_public_key_import(group: dict[str, Any]) -> None:
    jwk = group["public"]
    accepted = jwk.get("kty") == "EC" and jwk.get("crv") == "P-256" and jwk.get("use") == "sig"
    if accepted:
        assert public_key_from_jwk(jwk).algs == frozenset({"ES256"})
    else:
        with pytest.raises(InvalidRequest):
            public_key_from_jwk(jwk)


@pytest.mark.parametrize(
    "group", [g for g in _DATA["testGroups"] if "private" in g and "public" not in g]
)
def test_symmetric_keys_are_refused(group: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        public_key_from_jwk(group["private"])

"""Override tokens: minted from the key ring, verified strictly, each forgery with its own code."""

from __future__ import annotations

import dataclasses
import json

import pytest

from aegis.approvals.model import ApprovalRequest, call_digest
from aegis.approvals.override import OVERRIDE_TYP, OverrideTokens
from aegis.crypto.jws import encode_segment, sign_compact
from aegis.crypto.keys import Ed25519SigningKey, b64u_decode, b64u_encode
from aegis.errors import AegisError
from tests.approvals.conftest import Setup, held


def _approved(s: Setup) -> ApprovalRequest:
    now = s.clock.now()
    call = held()
    return ApprovalRequest(
        id="apr_test", state="approved", tenant="acme", env="prod", agent_id="payer",
        agent_owner="owner@example.com", tool="payments", method="POST", path="/payments/charge",
        digest=call_digest(call), parameters={}, rule_ids=("pay-large",), group="finance",
        channel="slack", created_at=now, expires_at=now + 600, decision_id="d",
        decided_at=now, decided_by="carol@example.com", override_expires_at=now + 120,
    )  # fmt: skip


def _code(s: Setup, token: str) -> str:
    with pytest.raises(AegisError) as info:
        s.service.overrides.verify(token, now=s.clock.now())
    return info.value.code


def test_mint_and_verify_round_trip(setup: Setup) -> None:
    req = _approved(setup)
    token = setup.service.overrides.mint(req)
    header = json.loads(b64u_decode(token.split(".")[0]))
    assert header["typ"] == OVERRIDE_TYP
    assert header["kid"] == setup.services.keyring.signing_key().kid
    ov = setup.service.overrides.verify(token, now=setup.clock.now())
    assert (ov.approval_id, ov.agent_id, ov.request_digest) == (req.id, "payer", req.digest)
    assert ov.jti == "ovr:apr_test"
    # Minted again later: the same jti and expiry, so a second fetch is no second use.
    setup.clock.advance(30)
    assert setup.service.overrides.mint(req) == token


def test_only_approved_requests_have_an_override(setup: Setup) -> None:
    with pytest.raises(AegisError) as info:
        setup.service.overrides.mint(dataclasses.replace(_approved(setup), state="pending"))
    assert info.value.code == "approval_decided"


def test_tampered_digest_breaks_the_signature(setup: Setup) -> None:
    head, payload, sig = setup.service.overrides.mint(_approved(setup)).split(".")
    claims = json.loads(b64u_decode(payload))
    claims["request_digest"] = "sha256:" + "00" * 32
    forged = f"{head}.{b64u_encode(json.dumps(claims).encode())}.{sig}"
    assert _code(setup, forged) == "override_invalid"


def test_expired_override(setup: Setup) -> None:
    token = setup.service.overrides.mint(_approved(setup))
    setup.clock.advance(120 + setup.config.tokens.leeway)
    assert _code(setup, token) == "override_expired"


def test_access_token_is_not_an_override(setup: Setup) -> None:
    at = setup.services.issuer.issue(
        agent_id="payer", client_id="c", tenant="acme", env="prod", scopes=(),
        audience=("aegis-gateway",), lifetime=60,
    ).token  # fmt: skip
    assert _code(setup, at) == "override_invalid"


def test_foreign_key_and_foreign_issuer_are_refused(setup: Setup) -> None:
    req = _approved(setup)
    other = OverrideTokens(setup.services.keyring, issuer="https://elsewhere.example")
    assert _code(setup, other.mint(req)) == "override_invalid"
    stranger = Ed25519SigningKey.generate()
    payload = json.loads(b64u_decode(setup.service.overrides.mint(req).split(".")[1]))
    header = encode_segment({"alg": "EdDSA", "typ": OVERRIDE_TYP, "kid": stranger.kid})
    assert _code(setup, sign_compact(header, payload, stranger.sign)) == "override_invalid"


def test_jti_must_belong_to_the_approval(setup: Setup) -> None:
    key = setup.services.keyring.signing_key()
    payload = json.loads(b64u_decode(setup.service.overrides.mint(_approved(setup)).split(".")[1]))
    payload["jti"] = "ovr:apr_other"
    header = encode_segment({"alg": "EdDSA", "typ": OVERRIDE_TYP, "kid": key.kid})
    assert _code(setup, sign_compact(header, payload, key.sign)) == "override_invalid"

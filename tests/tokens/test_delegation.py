"""Parent-agent grants: minting, strict verification with the parent's registered keys only."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from aegis.clock import FrozenClock, new_id
from aegis.crypto.jws import encode_segment, parse_compact, sign_compact
from aegis.crypto.keys import Ed25519SigningKey, b64u_encode, public_key_from_jwk
from aegis.errors import TokenError
from aegis.registry.cache import RegistryCache
from aegis.registry.service import AgentSpec, RegistryService
from aegis.tokens.delegation import (
    DELEGATION_TYP,
    agent_key_resolver,
    chain_digest,
    mint_grant,
    split_chain,
    verify_grant,
)
from tests.pki.fakes import MemoryRegistryStore

ISSUER = "https://aegis.example"
T0 = 1_800_000_000.0

PARENT = Ed25519SigningKey.generate()


def _mint(key: Ed25519SigningKey = PARENT, **over: Any) -> str:
    args: dict[str, Any] = {
        "parent": "orchestrator",
        "child": "finance",
        "audience": ISSUER,
        "scopes": ("payments:read",),
        "tools": ("pay_invoice",),
        "max_depth": 2,
        "now": T0,
    }
    args.update(over)
    return mint_grant(key, **args)


def _verify(token: str, keys: Any = None, now: float = T0 + 1) -> Any:
    resolve = keys or {PARENT.kid: PARENT.public}.get
    return verify_grant(token, resolve, issuer="orchestrator", audience=ISSUER, now=now)


def _raw(header: dict[str, Any], claims: dict[str, Any], key: Ed25519SigningKey = PARENT) -> str:
    return sign_compact(encode_segment(header), claims, key.sign)


def _claims(**over: Any) -> dict[str, Any]:
    claims = parse_compact(_mint()).payload
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def test_mint_and_verify_round_trip() -> None:
    token = _mint(parent_links=["a.b.c"])
    jws = parse_compact(token)
    assert jws.header == {"alg": "EdDSA", "typ": DELEGATION_TYP, "kid": PARENT.kid}
    grant = _verify(token)
    assert (grant.iss, grant.sub, grant.scopes, grant.tools) == (
        "orchestrator",
        "finance",
        ("payments:read",),
        ("pay_invoice",),
    )
    assert grant.max_depth == 2
    assert grant.exp - grant.iat == 300
    assert grant.parent_chain == chain_digest(["a.b.c"]) != chain_digest([])
    assert "token" not in grant.summary()
    assert grant.summary()["jti"] == grant.jti


def test_extra_claims_never_override_the_standard_ones() -> None:
    token = _mint(extra={"sub": "admin", "scope": "*", "max_depth": 9, "note": "x"})
    grant = _verify(token)
    assert grant.sub == "finance"
    assert grant.scopes == ("payments:read",)
    assert grant.max_depth == 2


def test_grant_signed_by_another_agents_key_is_refused() -> None:
    other = Ed25519SigningKey.generate()
    with pytest.raises(TokenError) as exc:
        _verify(_mint(other))  # the other agent's kid is not among the parent's keys
    assert exc.value.code == "parent_signature_invalid"
    forged = _raw({"alg": "EdDSA", "typ": DELEGATION_TYP, "kid": PARENT.kid}, _claims(), other)
    with pytest.raises(TokenError) as exc:
        _verify(forged)  # claims the parent's kid, signed by another key
    assert exc.value.code == "parent_signature_invalid"


def test_grant_naming_another_issuer_is_refused() -> None:
    with pytest.raises(TokenError) as exc:
        _verify(_mint(parent="payments"))
    assert exc.value.code == "parent_signature_invalid"


@pytest.mark.parametrize(
    ("now", "code"),
    [(T0 + 300 + 30, "parent_expired"), (T0 - 31, "parent_expired")],
)
def test_grant_time_window(now: float, code: str) -> None:
    with pytest.raises(TokenError) as exc:
        _verify(_mint(), now=now)
    assert exc.value.code == code


def test_grant_lifetime_is_capped_at_five_minutes() -> None:
    with pytest.raises(TokenError) as exc:
        _verify(_mint(lifetime=301))
    assert exc.value.code == "invalid_claim"


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ({"alg": "none", "typ": DELEGATION_TYP, "kid": PARENT.kid}, "parent_signature_invalid"),
        ({"alg": "HS256", "typ": DELEGATION_TYP, "kid": PARENT.kid}, "parent_signature_invalid"),
        ({"alg": "EdDSA", "typ": "at+jwt", "kid": PARENT.kid}, "invalid_token_type"),
        ({"alg": "EdDSA", "kid": PARENT.kid}, "invalid_token_type"),
        (
            {"alg": "EdDSA", "typ": DELEGATION_TYP, "kid": PARENT.kid, "jku": "https://x"},
            "parent_signature_invalid",
        ),
        ({"alg": "EdDSA", "typ": DELEGATION_TYP}, "parent_signature_invalid"),
    ],
)
def test_header_rules(header: dict[str, Any], code: str) -> None:
    with pytest.raises(TokenError) as exc:
        _verify(_raw(header, _claims()))
    assert exc.value.code == code


@pytest.mark.parametrize(
    ("over", "code"),
    [
        ({"aud": "https://elsewhere.example"}, "invalid_audience"),
        ({"jti": None}, "missing_claim"),
        ({"parent_chain": None}, "missing_claim"),
        ({"tools": []}, "invalid_claim"),
        ({"tools": "pay_invoice"}, "invalid_claim"),
        ({"max_depth": -1}, "invalid_claim"),
        ({"max_depth": True}, "invalid_claim"),
        ({"scope": ["payments:read"]}, "invalid_claim"),
        ({"origin_user": "alice"}, "invalid_claim"),  # without origin_iss
        # The user's expiry: a number, and never before the link's own.
        (
            {"origin_user": "alice", "origin_iss": "https://idp", "origin_exp": "never"},
            "invalid_claim",
        ),
        ({"origin_user": "alice", "origin_iss": "https://idp", "origin_exp": T0}, "invalid_claim"),
        (
            {"origin_user": "alice", "origin_iss": "https://idp", "origin_exp": True},
            "invalid_claim",
        ),
        # No float holds it: a typed refusal, not an OverflowError (a 500).
        (
            {"origin_user": "alice", "origin_iss": "https://idp", "origin_exp": 10**400},
            "invalid_claim",
        ),
    ],
)
def test_claim_rules(over: dict[str, Any], code: str) -> None:
    header = {"alg": "EdDSA", "typ": DELEGATION_TYP, "kid": PARENT.kid}
    with pytest.raises(TokenError) as exc:
        _verify(_raw(header, _claims(**over)))
    assert exc.value.code == code


def test_es256_parent_key() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    nums = private.public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64u_encode(nums.x.to_bytes(32, "big")),
        "y": b64u_encode(nums.y.to_bytes(32, "big")),
    }
    public = public_key_from_jwk(jwk)

    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(private.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    header = encode_segment({"alg": "ES256", "typ": DELEGATION_TYP, "kid": public.kid})
    token = sign_compact(header, _claims(), sign)
    assert _verify(token, {public.kid: public}.get).sub == "finance"


def test_resolver_uses_registered_kid_and_thumbprint_and_follows_rotation() -> None:
    clock = FrozenClock(T0)
    store = MemoryRegistryStore()
    registry = RegistryService(store, clock=clock, pepper=b"p" * 32)
    cache = RegistryCache(store, clock=clock, ttl=0.0)
    key = Ed25519SigningKey.generate()
    registry.register_agent(
        AgentSpec(
            "orchestrator",
            "acme",
            "prod",
            "o@example.com",
            jwks=({**key.public.to_jwk(), "kid": "orch-2026"},),
        ),
        actor="test",
    )
    agent = cache.agent("orchestrator")
    resolve = agent_key_resolver(agent)
    assert resolve("orch-2026") is not None
    assert resolve(key.kid) is not None
    token = _raw({"alg": "EdDSA", "typ": DELEGATION_TYP, "kid": "orch-2026"}, _claims(), key)
    assert verify_grant(token, resolve, issuer="orchestrator", audience=ISSUER, now=T0).sub
    # Rotating the parent's registered key away ends its old grants at once.
    registry.update_agent(
        "orchestrator", actor="test", jwks=(Ed25519SigningKey.generate().public.to_jwk(),)
    )
    with pytest.raises(TokenError) as exc:
        verify_grant(
            token,
            agent_key_resolver(cache.agent("orchestrator")),
            issuer="orchestrator",
            audience=ISSUER,
            now=T0,
        )
    assert exc.value.code == "parent_signature_invalid"


def test_split_chain_bounds() -> None:
    assert split_chain("a.b.c~d.e.f", max_links=2) == ["a.b.c", "d.e.f"]
    for bad, code in [("", "malformed_token"), ("a.b.c~", "malformed_token")]:
        with pytest.raises(TokenError) as exc:
            split_chain(bad, max_links=4)
        assert exc.value.code == code
    with pytest.raises(TokenError) as exc:
        split_chain("~".join(["a.b.c"] * 5), max_links=4)
    assert exc.value.code == "delegation_too_deep"


def test_chain_digest_is_order_sensitive() -> None:
    a, b = f"{new_id()}.x.y", f"{new_id()}.x.y"
    assert chain_digest([a, b]) != chain_digest([b, a]) != chain_digest([a])


def test_a_user_rooted_link_without_the_users_expiry_is_bounded_by_its_own() -> None:
    """A root link signed before the user's expiry was carried: its exp, which the token service
    set no later than the user's, bounds the chain instead."""
    header = {"alg": "EdDSA", "typ": DELEGATION_TYP, "kid": PARENT.kid}
    user = {"origin_user": "alice", "origin_iss": "https://idp"}
    grant = _verify(_raw(header, _claims(**user)))
    assert grant.origin_exp == grant.exp
    later = grant.exp + 600
    assert _verify(_raw(header, _claims(**user, origin_exp=later))).origin_exp == later
    assert _verify(_raw(header, _claims())).origin_exp is None

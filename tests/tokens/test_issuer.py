"""TokenIssuer mints only what AccessTokenVerifier accepts, and the claims come back unchanged."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis.clock import FrozenClock, random_bytes
from aegis.crypto.keyring import KeyRing
from aegis.tokens.claims import join_scopes, split_scopes
from aegis.tokens.issuer import TokenIssuer
from aegis.tokens.verifier import AccessTokenVerifier
from tests.crypto.fakes import MemoryKeyStore

ISS = "https://aegis.example"
AUD = "https://payments.example"
T0 = 1_800_000_000

_CLOCK = FrozenClock(T0)
_RING = KeyRing(MemoryKeyStore(), random_bytes(32), _CLOCK)
_RING.ensure_initialized()
_ISSUER = TokenIssuer(_RING, issuer=ISS, clock=_CLOCK)


def _issue(**over: Any) -> Any:
    args: dict[str, Any] = {
        "agent_id": "agent-1",
        "client_id": "client-1",
        "tenant": "acme",
        "env": "prod",
        "scopes": ("payments:read",),
        "audience": (AUD,),
        "lifetime": 300,
    }
    args.update(over)
    return _ISSUER.issue(**args)


@pytest.mark.parametrize(
    "scopes",
    [("payments:read admin",), ("a", "b c"), ("",), ("a", ""), (" ",), ("a ",), (" a",)],
    ids=repr,
)
def test_scopes_that_would_not_split_back_are_not_minted(scopes: tuple[str, ...]) -> None:
    """Joined naively, ("a", "b c") becomes "a b c": a token granting c, which nobody granted."""
    with pytest.raises(ValueError, match="scope"):
        _issue(scopes=scopes)


@pytest.mark.parametrize("audience", [(), ("",), (AUD, "")], ids=repr)
def test_an_audience_the_verifier_refuses_is_not_minted(audience: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="audience"):
        _issue(audience=audience)


def test_no_scopes_mint_an_empty_scope_claim() -> None:
    issued = _issue(scopes=())
    assert issued.claims["scope"] == ""
    verifier = AccessTokenVerifier(_RING.public_key, issuer=ISS, audience=AUD, clock=_CLOCK)
    assert verifier.verify(issued.token).scopes == ()


#: RFC 6749 §3.3 scope-token characters: %x21 / %x23-5B / %x5D-7E.
_SCOPE = st.text(
    alphabet=st.sampled_from([chr(c) for c in (0x21, *range(0x23, 0x5C), *range(0x5D, 0x7F))]),
    min_size=1,
    max_size=20,
)


def _encodable(text: str) -> bool:
    """Lone surrogates cannot be UTF-8 encoded: nothing can be minted from them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_NAME = st.text(min_size=1, max_size=30).filter(_encodable)


@settings(max_examples=150, deadline=None)
@given(
    agent_id=_NAME,
    client_id=_NAME,
    tenant=_NAME,
    env=_NAME,
    scopes=st.lists(_SCOPE, max_size=6).map(tuple),
    audience=st.lists(_NAME, min_size=1, max_size=4).map(tuple),
    lifetime=st.integers(min_value=1, max_value=3600),
    jkt=st.none() | st.text(alphabet="ABCDEFabcdef0123456789-_", min_size=43, max_size=43),
)
def test_minted_tokens_verify_to_the_same_claims(
    agent_id: str,
    client_id: str,
    tenant: str,
    env: str,
    scopes: tuple[str, ...],
    audience: tuple[str, ...],
    lifetime: int,
    jkt: str | None,
) -> None:
    cnf = {"jkt": jkt} if jkt else None
    issued = _issue(
        agent_id=agent_id,
        client_id=client_id,
        tenant=tenant,
        env=env,
        scopes=scopes,
        audience=audience,
        lifetime=lifetime,
        cnf=cnf,
    )
    verifier = AccessTokenVerifier(
        _RING.public_key, issuer=ISS, audience=audience[-1], clock=_CLOCK
    )
    token = verifier.verify(issued.token)
    assert token.claims == issued.claims
    assert (token.sub, token.agent_id, token.client_id, token.tenant, token.env) == (
        agent_id,
        agent_id,
        client_id,
        tenant,
        env,
    )
    assert token.aud == audience
    assert token.scopes == scopes
    assert token.cnf == cnf
    assert token.exp - token.iat == lifetime


@given(st.lists(st.text(alphabet="ab \t", max_size=4), max_size=5))
def test_join_scopes_either_round_trips_or_refuses(scopes: list[str]) -> None:
    try:
        joined = join_scopes(scopes)
    except ValueError:
        assert "" in scopes or any(" " in s for s in scopes)
        return
    assert split_scopes(joined) == tuple(scopes)

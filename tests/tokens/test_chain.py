"""Gateway re-verification of delegation chains: every link, every agent, every narrowing; nested
``act`` entries grant nothing."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis.crypto.keys import Ed25519SigningKey
from aegis.errors import AegisError
from aegis.tokens.chain import Chain, verify_chain, verify_links
from aegis.tokens.claims import AccessToken
from aegis.tokens.delegation import CHAIN_SEPARATOR, mint_grant
from aegis.types import AgentStatus
from tests.support.delegation import ISSUER, T0, Handle, World


async def three_hops(w: World) -> tuple[Handle, Handle, Handle]:
    orch, fin, pay = w.agent("orchestrator"), w.agent("finance"), w.agent("payments")
    await w.exchange(fin, w.grant(orch, fin))
    await w.exchange(pay, w.grant(fin, pay, scopes=("payments:write",), max_depth=1))
    return orch, fin, pay


def check(w: World, token: AccessToken | None, **kw: Any) -> Chain:
    assert token is not None
    return verify_chain(token, cache=w.cache, rules=w.rules, now=w.clock.now(), **kw)


def refused(w: World, token: AccessToken | None, **kw: Any) -> AegisError:
    with pytest.raises(AegisError) as exc:
        check(w, token, **kw)
    return exc.value


def reissue(w: World, token: AccessToken | None, **changes: Any) -> AccessToken:
    """A token the token service signed with changed claims (what a minting bug could produce)."""
    assert token is not None
    c = {**token.claims, **changes}
    standard = ("iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id", "scope", "tenant")
    extra = {k: v for k, v in c.items() if k not in standard and k not in ("env", "agent_id")}
    issued = w.issuer.issue(
        agent_id=c["sub"],
        client_id=c["client_id"],
        tenant=c["tenant"],
        env=c["env"],
        scopes=tuple(c["scope"].split()),
        audience=(c["aud"],),
        lifetime=300,
        extra={k: v for k, v in extra.items() if v is not None},
    )
    return w.verifier.verify(issued.token)


async def test_valid_chain_shapes_the_policy_input() -> None:
    w = World()
    _, fin, pay = await three_hops(w)
    chain = check(w, pay.token, tool="pay_invoice")
    assert chain.policy_input() == {
        "agents": ["orchestrator", "finance", "payments"],
        "parent": "finance",
        "depth": 2,
        "origin_user": None,
    }
    assert check(w, fin.token).policy_input()["parent"] == "orchestrator"
    w.clock.advance(250)  # the grants have expired; the token (and its chain) lives on
    assert check(w, pay.token).depth == 2


def test_a_token_without_delegation_is_its_own_chain() -> None:
    w = World()
    w.agent("solo")
    issued = w.issuer.issue(
        agent_id="solo",
        client_id="solo.x",
        tenant="acme",
        env="prod",
        scopes=("payments:read",),
        audience=("aegis-gateway",),
        lifetime=300,
    )
    chain = check(w, w.verifier.verify(issued.token), tool="anything")
    assert (chain.agents, chain.parent, chain.depth) == (("solo",), None, 0)


async def test_forged_nested_act_changes_nothing() -> None:
    w = World()
    _, _, pay = await three_hops(w)
    assert pay.token is not None
    honest = check(w, pay.token)
    forged_act = {"sub": "payments", "act": {"sub": "root-admin", "act": {"sub": "ceo"}}}
    forged = check(w, reissue(w, pay.token, act=forged_act))
    assert dataclasses.replace(forged, grants=()) == dataclasses.replace(honest, grants=())
    # Nested entries naming an inactive agent do not matter either: they are never read.
    w.agent("ghost")
    w.registry.set_agent_status("ghost", AgentStatus.RETIRED, actor="test")
    ghost = {"sub": "payments", "act": {"sub": "ghost"}}
    assert check(w, reissue(w, pay.token, act=ghost)).agents == honest.agents
    # An act without a verified chain grants nothing: it is refused outright.
    bare = reissue(w, pay.token, parent_agent=None, delegation_depth=None, tools=None)
    assert refused(w, bare).code == "invalid_claim"


async def test_claims_must_agree_with_the_verified_chain() -> None:
    w = World()
    _, fin, pay = await three_hops(w)
    cases = {
        "outer act is another agent": {"act": {"sub": "finance"}},
        "depth understated": {"delegation_depth": 1},
        "origin invented": {"origin_user": "alice@example.com"},
        "chain of another agent": {"parent_agent": CHAIN_SEPARATOR.join(fin.links)},
    }
    for name, changes in cases.items():
        assert refused(w, reissue(w, pay.token, **changes)).code == "invalid_claim", name
    widened = reissue(w, pay.token, scope="payments:write payments:read")
    assert refused(w, widened).code == "scope_widened"


async def test_spliced_or_truncated_chains_are_refused() -> None:
    w = World()
    _, _, pay = await three_hops(w)
    first, second = pay.links
    for bad in (second, f"{second}~{first}"):
        err = refused(w, reissue(w, pay.token, parent_agent=bad, delegation_depth=1))
        assert err.code == "parent_signature_invalid"


async def test_current_keys_and_states_are_used(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aegis")
    w = World()
    _, _, pay = await three_hops(w)
    w.registry.update_agent("finance", actor="t", allowed_scopes=("payments:read",))
    assert refused(w, pay.token).code == "scope_widened"
    w.registry.update_agent("finance", actor="t", allowed_scopes=("payments:write",))
    assert check(w, pay.token).depth == 2
    new_key = Ed25519SigningKey.generate()
    w.registry.update_agent("finance", actor="t", jwks=(new_key.public.to_jwk(),))
    err = refused(w, pay.token)
    assert err.code == "parent_signature_invalid"
    assert [link["sub"] for link in err.details["chain"]] == ["finance", "payments"]
    event = [r for r in caplog.records if r.getMessage() == "delegation.rejected"][-1]
    assert event.aegis_fields["stage"] == "gateway"  # type: ignore[attr-defined]
    assert event.aegis_fields["agent"] == "payments"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("agent", "status", "code"),
    [
        ("finance", AgentStatus.RETIRED, "parent_inactive"),
        ("orchestrator", AgentStatus.SUSPENDED, "parent_inactive"),
        ("payments", AgentStatus.QUARANTINED, "agent_inactive"),
    ],
)
async def test_every_agent_in_the_chain_must_be_active(
    agent: str, status: AgentStatus, code: str
) -> None:
    w = World()
    _, _, pay = await three_hops(w)
    w.registry.set_agent_status(agent, status, actor="test")
    assert refused(w, pay.token).code == code


async def test_a_suspension_kills_grants_signed_before_it() -> None:
    w = World()
    _, _, pay = await three_hops(w)
    w.clock.advance(1)
    w.registry.set_agent_status("finance", AgentStatus.SUSPENDED, actor="test")
    w.registry.set_agent_status("finance", AgentStatus.ACTIVE, actor="test")
    assert refused(w, pay.token).code == "parent_inactive"


@pytest.mark.parametrize("suspended", ["finance", "payments"])
async def test_a_suspension_kills_grants_received_before_it(suspended: str) -> None:
    """A grant an agent holds ends with its other credentials: once reactivated it cannot use a
    grant it received before (exchanging it, or a token minted from it), whoever signed it."""
    w = World()
    orch, fin, pay = w.agent("orchestrator"), w.agent("finance"), w.agent("payments")
    held_by_fin = w.grant(orch, fin)
    await w.exchange(fin, held_by_fin)
    held_by_pay = w.grant(fin, pay, scopes=("payments:write",), max_depth=1)
    await w.exchange(pay, held_by_pay)
    w.clock.advance(1)
    w.registry.set_agent_status(suspended, AgentStatus.SUSPENDED, actor="test")
    w.registry.set_agent_status(suspended, AgentStatus.ACTIVE, actor="test")
    w.clock.advance(1)
    expected = "token_revoked" if suspended == "payments" else "parent_inactive"
    if suspended == "payments":
        # The token minted from it before is refused by its iat; one minted now from the old
        # grant (a token service that let it through) by the chain check.
        again = reissue(w, pay.token)
        assert refused(w, again).code == expected
    else:
        assert refused(w, pay.token).code == expected


async def test_tools_and_depth_limits_at_the_gateway() -> None:
    w = World()
    _, _, pay = await three_hops(w)
    assert refused(w, pay.token, tool="drop_tables").code == "insufficient_scope"
    strict = dataclasses.replace(w.rules, max_depth=1)
    assert pay.token is not None
    with pytest.raises(AegisError) as exc:
        verify_chain(pay.token, cache=w.cache, rules=strict, now=w.clock.now())
    assert exc.value.code == "delegation_too_deep"


async def test_cross_tenant_link_is_refused_at_the_gateway() -> None:
    w = World()
    _, _, pay = await three_hops(w)
    agent = w.cache.agent("finance")
    w.store.update_agent(dataclasses.replace(agent, tenant_id="globex"))
    assert refused(w, pay.token).code == "tenant_mismatch"


SCOPES = ("a", "b", "c", "d")
hops = st.lists(st.sets(st.sampled_from(SCOPES), min_size=1), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(scope_path=hops)
def test_scopes_only_narrow(scope_path: list[set[str]]) -> None:
    """verify_links accepts a chain exactly when every link's scopes are within the previous."""
    w = World()
    agents = [w.agent(f"n{i}", scopes=SCOPES) for i in range(len(scope_path) + 1)]
    links: list[str] = []
    for i, scopes in enumerate(scope_path):
        links.append(
            mint_grant(
                agents[i].key,
                parent=agents[i].id,
                child=agents[i + 1].id,
                audience=ISSUER,
                scopes=sorted(scopes),
                tools=("t",),
                max_depth=8 - i,
                parent_links=links,
                now=w.clock.now(),
            )
        )
    narrows = all(b <= a for a, b in itertools.pairwise(scope_path))
    if not narrows:
        with pytest.raises(AegisError) as exc:
            verify_links(links, cache=w.cache, rules=w.rules, tenant="acme", env="prod", at=T0)
        assert exc.value.code == "scope_widened"
        return
    chain = verify_links(links, cache=w.cache, rules=w.rules, tenant="acme", env="prod", at=T0)
    assert set(chain.grants[-1].scopes) == scope_path[-1]
    assert chain.agents == tuple(a.id for a in agents)


async def test_memoized_links_follow_the_signers_current_keys() -> None:
    """Verified links are memoized per signer key material: a hit equals re-verifying with the
    registry's current keys, a forged link is never remembered."""
    w = World()
    _, fin, pay = await three_hops(w)
    assert check(w, pay.token).depth == 2  # both links are memoized now
    registered, other = fin.key.public.to_jwk(), Ed25519SigningKey.generate().public.to_jwk()
    w.registry.update_agent("finance", actor="t", jwks=(other,))
    assert refused(w, pay.token).code == "parent_signature_invalid"
    w.registry.update_agent("finance", actor="t", jwks=(registered,))
    assert check(w, pay.token).depth == 2
    intruder = Ed25519SigningKey.generate()
    forged = mint_grant(
        intruder, parent="finance", child="payments", audience=ISSUER, scopes=("payments:write",),
        tools=("pay_invoice",), max_depth=0, parent_links=pay.links[:1], now=w.clock.now(),
    )  # fmt: skip
    # The finance key's own header (its kid), so only the signature differs.
    kid_header, rest = pay.links[1].partition(".")[0], forged.partition(".")[2]
    token = reissue(w, pay.token, parent_agent=f"{pay.links[0]}~{kid_header}.{rest}")
    for _ in range(2):
        assert refused(w, token).code == "parent_signature_invalid"


async def test_a_token_minted_from_an_expired_chain_is_refused_at_the_gateway() -> None:
    """What a minting bug could produce: a fresh token over a chain whose last grant expired."""
    w = World()
    _, _, pay = await three_hops(w)
    assert check(w, pay.token).depth == 2
    w.clock.advance(3600)
    err = refused(w, reissue(w, pay.token))
    assert err.code == "parent_expired"
    assert [link["sub"] for link in err.details["chain"]] == ["finance", "payments"]
    # The same token, kept past its grant by more than the longest token lifetime.
    w.clock.advance(w.rules.max_token_lifetime)
    assert refused(w, pay.token).code == "parent_expired"


async def test_a_cyclic_chain_is_refused_at_the_gateway() -> None:
    w = World()
    orch, fin, _ = await three_hops(w)
    back = mint_grant(
        fin.key, parent="finance", child="orchestrator", audience=ISSUER,
        scopes=("payments:write",), tools=("pay_invoice",), max_depth=0,
        parent_links=fin.links, now=w.clock.now(),
    )  # fmt: skip
    assert fin.token is not None
    token = reissue(
        w, fin.token, sub="orchestrator", client_id=orch.client_id, scope="payments:write",
        parent_agent=CHAIN_SEPARATOR.join([*fin.links, back]), delegation_depth=2,
        act={"sub": "orchestrator", "act": {"sub": "finance", "act": {"sub": "orchestrator"}}},
    )  # fmt: skip
    err = refused(w, token)
    assert err.code == "delegation_cycle"
    assert [(link["iss"], link["sub"]) for link in err.details["chain"]] == [
        ("orchestrator", "finance"), ("finance", "orchestrator")
    ]  # fmt: skip

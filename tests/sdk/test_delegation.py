"""Acting for a parent: the parent signs a grant with its own key, the child exchanges it at the
real token endpoint (RFC 8693) and calls through the gateway, whose policy wants that parent."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from aegis.crypto.keys import Ed25519SigningKey
from aegis.sdk import (
    AccessDeniedError,
    AgentClient,
    DelegationError,
    GrantRefusedError,
    PrivateKey,
)
from aegis.tokens.delegation import CHAIN_SEPARATOR
from tests.sdk.conftest import Stack

pytestmark = pytest.mark.slow
GW_AUD = "aegis-gateway"


@pytest.fixture(scope="module")
def orchestrator(stack: Stack) -> Iterator[AgentClient]:
    _, client = stack.key_agent("orchestrator", exact=True)
    with client:
        yield client


def test_child_acting_for_the_orchestrator_is_allowed(
    stack: Stack, orchestrator: AgentClient
) -> None:
    finance_id, finance = stack.key_agent("finance")
    grant = orchestrator.delegate(
        finance_id, scopes=["finance:read"], tools=["finance.report"], me="orchestrator"
    )
    with (
        finance,
        finance.client(
            stack.gateway, audience=GW_AUD, scope="finance:read", on_behalf_of=grant
        ) as http,
    ):
        resp = http.get("/finance/report")
        again = http.get("/finance/report")  # the exchanged token is cached: no new exchange
    assert resp.status_code == 200, resp.text
    assert again.status_code == 200
    token = finance.token(GW_AUD, "finance:read", on_behalf_of=grant)
    assert token.claims["act"] == {"sub": finance_id, "act": {"sub": "orchestrator"}}
    assert token.claims["parent_agent"] == grant
    assert token.token_type == "DPoP"


def test_without_the_parent_the_same_call_is_denied(stack: Stack) -> None:
    _, finance = stack.key_agent("finance-alone")
    http = finance.client(stack.gateway, audience=GW_AUD, scope="finance:read")
    with finance, http, pytest.raises(AccessDeniedError) as err:
        http.get("/finance/report")
    assert err.value.decision_id is not None


def test_a_forged_parent_grant_is_refused_at_exchange(stack: Stack) -> None:
    """The child signs a grant naming the orchestrator with its own key: not the parent's key."""
    finance_id, client_id, key, _ = stack.register("forger")
    finance = AgentClient(stack.url, PrivateKey(client_id, key))
    forged = finance.delegate(
        finance_id, scopes=["finance:read"], tools=["finance.report"], me="orchestrator"
    )
    with finance, pytest.raises(DelegationError) as err:
        finance.token(GW_AUD, "finance:read", on_behalf_of=forged)
    assert err.value.code == "parent_signature_invalid"
    assert err.value.status == 400  # RFC 8693 §2.2.2 invalid_request, the code in the description


def test_a_grant_is_exchanged_once(stack: Stack, orchestrator: AgentClient) -> None:
    finance_id, finance = stack.key_agent("once")
    grant = orchestrator.delegate(
        finance_id, scopes=["finance:read"], tools=["finance.report"], me="orchestrator"
    )
    with finance:
        finance.token(GW_AUD, "finance:read", on_behalf_of=grant)
        finance.tokens.clear()
        with pytest.raises(DelegationError) as err:
            finance.token(GW_AUD, "finance:read", on_behalf_of=grant)
    assert err.value.code == "grant_replayed"


def test_a_child_cannot_widen_what_it_was_granted(stack: Stack, orchestrator: AgentClient) -> None:
    finance_id, finance = stack.key_agent("widen")
    grant = orchestrator.delegate(
        finance_id, scopes=["finance:read"], tools=["finance.report"], me="orchestrator"
    )
    with finance, pytest.raises(GrantRefusedError) as err:
        finance.token(GW_AUD, "finance:read payments:write", on_behalf_of=grant)
    assert err.value.code == "invalid_scope"


def test_two_calls_at_once_on_a_new_grant_exchange_it_once(
    stack: Stack, orchestrator: AgentClient
) -> None:
    """The grant is single use: the second caller waits for the token the first fetches,
    where exchanging it too failed its call (grant_replayed)."""
    finance_id, finance = stack.key_agent("finance-at-once")
    grant = orchestrator.delegate(
        finance_id, scopes=["finance:read"], tools=["finance.report"], me="orchestrator"
    )

    async def both() -> list[int]:
        async with (
            finance,
            finance.async_client(
                stack.gateway, audience=GW_AUD, scope="finance:read", on_behalf_of=grant
            ) as http,
        ):
            answers = await asyncio.gather(*(http.get("/finance/report") for _ in range(2)))
            return [a.status_code for a in answers]

    assert asyncio.run(both()) == [200, 200]


def test_two_hops_extend_the_chain(stack: Stack, orchestrator: AgentClient) -> None:
    finance_id, finance = stack.key_agent("middle")
    ledger_id, ledger = stack.key_agent("ledger")
    first = orchestrator.delegate(
        finance_id, scopes=["finance:read"], tools=["finance.report"], max_depth=1,
        me="orchestrator",
    )  # fmt: skip
    second = finance.delegate(
        ledger_id, scopes=["finance:read"], tools=["finance.report"], under=first
    )
    assert second.split(CHAIN_SEPARATOR)[0] == first
    with (
        finance,
        ledger,
        ledger.client(
            stack.gateway, audience=GW_AUD, scope="finance:read", on_behalf_of=second
        ) as http,
    ):
        resp = http.get("/finance/report")
    assert resp.status_code == 200, resp.text
    token = ledger.token(GW_AUD, "finance:read", on_behalf_of=second)
    assert token.claims["delegation_depth"] == 2


def test_delegation_needs_the_agent_key(stack: Stack) -> None:
    from aegis.sdk import ClientSecret, InvalidRequestError

    agent = AgentClient(stack.url, ClientSecret("c", "s"), dpop_key=Ed25519SigningKey.generate())
    with agent, pytest.raises(InvalidRequestError):
        agent.delegate("x", scopes=["a"], tools=["t"], me="y")

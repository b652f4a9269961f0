"""A grant signed just after its parent (or its child) returned to active, in the same second,
is exchanged: a return sets the mark to its instant, and grants carry their ``iat`` to the
millisecond (only Aegis reads them). One signed before the return stays refused."""

from __future__ import annotations

import asyncio

import pytest

from aegis.errors import AegisError
from aegis.types import AgentStatus
from tests.support.delegation import T0, World


@pytest.mark.parametrize("returned", ["orchestrator", "finance"])
def test_a_grant_signed_after_a_return_is_exchanged(returned: str) -> None:
    w = World()
    parent, child = w.agent("orchestrator"), w.agent("finance")
    w.clock.set(T0 + 5.0)
    w.registry.set_agent_status(returned, AgentStatus.SUSPENDED, actor="t", reason="x")
    w.clock.set(T0 + 5.2)
    before = w.grant(parent, child)  # signed while suspended
    w.clock.set(T0 + 5.3)
    w.registry.set_agent_status(returned, AgentStatus.ACTIVE, actor="t", reason="ok")
    w.clock.set(T0 + 5.6)
    after = w.grant(parent, child)
    w.clock.set(T0 + 20)
    asyncio.run(w.exchange(child, after))
    with pytest.raises(AegisError) as info:
        asyncio.run(w.exchange(child, before))
    assert info.value.details.get("reason", info.value.code) in ("parent_inactive", "token_revoked")


def test_a_token_exchanged_in_the_second_its_grant_was_signed_is_good_without_leeway() -> None:
    """Grants carry milliseconds and tokens whole seconds: with `tokens.leeway: 0` a token
    exchanged in the same second as its grant must not read as issued before the grant."""
    from dataclasses import replace

    from aegis.tokens.chain import verify_chain

    w = World()
    w.rules = replace(w.rules, leeway=0.0)
    w.exchanger.rules = w.rules
    orch, fin = w.agent("orchestrator"), w.agent("finance")
    w.clock.set(T0 + 10.5)
    grant = w.grant(orch, fin)
    w.clock.set(T0 + 10.6)
    asyncio.run(w.exchange(fin, grant))
    w.clock.set(T0 + 10.7)
    assert fin.token is not None
    assert verify_chain(fin.token, cache=w.cache, rules=w.rules, now=w.clock.now()).depth == 1

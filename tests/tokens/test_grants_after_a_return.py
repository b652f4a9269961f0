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

"""MCP sessions through the gateway with the SDK (``aegis.sdk.mcp``): the ``mcp`` SDK's client
sends each message with the agent's token and a fresh proof, is retried as any SDK call is (a DPoP
nonce, a dependency down), and gets a refusal as a JSON-RPC error on the refused call only."""

from __future__ import annotations

import httpx2
import pytest
from mcp.shared.exceptions import MCPError

from aegis.gateway.mcp import REFUSED
from aegis.sdk import AgentClient, ApprovalPolicy, RetryPolicy
from aegis.sdk.mcp import McpAuth, mcp_session
from tests.sdk.conftest import APPROVER, Stack, deleted

pytestmark = pytest.mark.slow

GW_AUD = "aegis-gateway"


async def test_a_session_calls_allowed_tools_and_is_refused_the_rest(stack: Stack) -> None:
    agent_id, agent = stack.key_agent("mcp-caller")
    deleted.clear()
    with agent:
        async with mcp_session(agent, f"{stack.gateway}/mcp", audience=GW_AUD) as session:
            found = await session.call_tool("search", {"query": "aegis"})
            with pytest.raises(MCPError) as refused:
                await session.call_tool("delete_repo", {"name": "main"})
            again = await session.call_tool("search", {"query": "again"})
    assert found.content[0].text == "found aegis"
    assert again.content[0].text == "found again"
    assert refused.value.code == REFUSED
    assert refused.value.data["code"] == "access_denied"
    assert deleted == []
    record = next(
        r for r in stack.audit.records(kind="gateway.decision")
        if r["decision_id"] == refused.value.data["decision_id"]
    )  # fmt: skip
    assert (record["tool"], record["agent_id"], record["action"]) == (
        "repo.delete_repo",
        agent_id,
        "deny",
    )


async def test_a_dpop_nonce_is_fetched_and_the_message_sent_again(stack: Stack) -> None:
    _, agent = stack.key_agent("mcp-nonce")
    with agent:
        async with mcp_session(agent, f"{stack.nonce_gateway}/mcp", audience=GW_AUD) as session:
            found = await session.call_tool("search", {"query": "nonce"})
    assert found.content[0].text == "found nonce"


async def test_a_dependency_down_is_retried_then_reported_on_the_call(stack: Stack) -> None:
    agent_id, client = stack.key_agent("mcp-outage")
    retry = RetryPolicy(unavailable_attempts=1, backoff_base=0.01, backoff_max=0.05)
    agent = AgentClient(stack.url, client.credential, retry=retry)
    refused: list[BaseException] = []
    with agent:
        try:
            async with mcp_session(agent, f"{stack.dead_gateway}/mcp", audience=GW_AUD):
                pass
        except* MCPError as group:  # initialize is refused, in the client's task group
            refused.extend(group.exceptions)
    assert refused
    error = refused[0]
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, MCPError)
    assert error.data["code"] == "replay_store_unavailable"
    # initialize, sent twice: once, and once more after the backoff.
    outage = [
        r for r in stack.audit.records(kind="gateway.decision")
        if r["agent_id"] == agent_id and r["code"] == "replay_store_unavailable"
    ]  # fmt: skip
    assert len(outage) == 2


def _deciding_agent(
    stack: Stack, name: str, *, approve: bool
) -> tuple[str, AgentClient, list[str]]:
    """An agent whose ``asleep`` is where the human decides its pending request (once): the
    agent's id and client, and the approval ids decided."""
    from aegis.approvals.wiring import approvals_for

    agent_id, agent = stack.key_agent(name)
    agent.approvals = ApprovalPolicy(timeout=3, poll_initial=0.01, poll_max=0.05)
    service, decided = approvals_for(stack.srv.services), []

    async def asleep(seconds: float) -> None:
        if decided:
            return
        pending = [r for r in await service.list_requests("pending") if r.agent_id == agent_id]
        assert len(pending) == 1
        await service.decide(
            pending[0].id, via="cli", credential=APPROVER, approve=approve, reason="test"
        )
        decided.append(pending[0].id)

    agent.asleep = asleep
    return agent_id, agent, decided


async def test_an_approved_call_is_sent_once_more_with_its_override(stack: Stack) -> None:
    agent_id, agent, decided = _deciding_agent(stack, "mcp-refunder", approve=True)
    with agent:
        async with mcp_session(agent, f"{stack.gateway}/mcp", audience=GW_AUD) as session:
            refunded = await session.call_tool("refund", {"amount": 40})
    assert refunded.content[0].text == "refunded 40"
    assert len(decided) == 1
    records = [
        r for r in stack.audit.records(kind="gateway.decision")
        if r["agent_id"] == agent_id and r["tool"] == "repo.refund"
    ]  # fmt: skip
    assert [(r["action"], r["approval_id"]) for r in records] == [
        ("approval_needed", decided[0]),
        ("allow", decided[0]),
    ]


async def test_a_denied_approval_fails_the_call_only(stack: Stack) -> None:
    _, agent, decided = _deciding_agent(stack, "mcp-denied", approve=False)
    with agent:
        async with mcp_session(agent, f"{stack.gateway}/mcp", audience=GW_AUD) as session:
            with pytest.raises(MCPError) as refused:
                await session.call_tool("refund", {"amount": 40})
            # The session goes on.
            after = await session.call_tool("search", {"query": "after"})
    assert refused.value.data["code"] == "approval_needed"
    assert refused.value.data["approval_id"] == decided[0]
    assert after.content[0].text == "found after"


async def test_credentials_never_travel_in_cleartext_or_on_a_sync_client(stack: Stack) -> None:
    _, agent = stack.key_agent("mcp-hygiene")
    with agent:
        with pytest.raises(ValueError, match="https"):
            async with mcp_session(agent, "http://gw.example.com/mcp"):
                pass
        auth = McpAuth(agent, agent.key(GW_AUD, None, None, None))
        with httpx2.Client(auth=auth) as http, pytest.raises(TypeError, match="async"):
            http.get(f"{stack.gateway}/mcp")

"""``approval_needed`` through the SDK against the real gateway and approval service: the SDK waits,
polls the status URL with its own token and a fresh proof, and retries exactly once with the
override; a denial or no decision in time is raised and the call is not sent again.

The human decides while the SDK waits: the SDK's injected ``sleep`` is where the test approves
(or denies) through the approval service, as an approver using the CLI would."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from aegis.sdk import (
    OVERRIDE_HEADER,
    AgentClient,
    ApprovalDeniedError,
    ApprovalPolicy,
    ApprovalTimeoutError,
)
from tests.sdk.conftest import APPROVER, Stack

pytest.importorskip("aegis.gateway.approval_gate")
pytestmark = pytest.mark.slow
GW_AUD = "aegis-gateway"
BODY = {"amount": 250_000, "account": "GB1234567890"}


def _decider(stack: Stack, agent_id: str, *, approve: bool | None) -> Callable[[float], None]:
    """A ``sleep`` that, on its first call, decides the agent's pending request (None: never)."""
    from aegis.approvals.wiring import approvals_for

    service = approvals_for(stack.srv.services)
    decided: list[str] = []

    def sleep(seconds: float) -> None:
        if approve is None or decided:
            return
        pending = asyncio.run(service.list_requests("pending"))
        mine = [r for r in pending if r.agent_id == agent_id]
        assert len(mine) == 1, pending
        asyncio.run(service.decide(mine[0].id, via="cli", credential=APPROVER, approve=approve,
                                   reason="test"))  # fmt: skip
        decided.append(mine[0].id)

    return sleep


def _sent(http: httpx.Client) -> list[httpx.Headers]:
    seen: list[httpx.Headers] = []
    http.event_hooks["request"].append(lambda r: seen.append(r.headers.copy()))
    return seen


def _agent(stack: Stack, name: str, approve: bool | None) -> tuple[str, AgentClient]:
    agent_id, agent = stack.key_agent(name)
    agent.sleep = _decider(stack, agent_id, approve=approve)
    agent.approvals = ApprovalPolicy(timeout=3, poll_initial=0.01, poll_max=0.05)
    return agent_id, agent


def test_approved_call_is_retried_once_with_the_override(stack: Stack) -> None:
    agent_id, agent = _agent(stack, "treasurer", approve=True)
    with agent, agent.client(stack.gateway, audience=GW_AUD, scope="payments:write") as http:
        sent = _sent(http)
        resp = http.post("/treasury/transfer", json=BODY)
    assert resp.status_code == 200, resp.text
    assert [OVERRIDE_HEADER in h for h in sent] == [False, True]
    assert sent[0]["dpop"] != sent[1]["dpop"]
    seen = stack.upstream.seen[-1]["headers"]
    assert seen["x-aegis-agent-id"] == agent_id
    assert OVERRIDE_HEADER not in seen  # x-aegis-* never reaches the tool


def test_the_override_serves_one_call_only(stack: Stack) -> None:
    _, agent = _agent(stack, "twice", approve=True)
    with agent, agent.client(stack.gateway, audience=GW_AUD, scope="payments:write") as http:
        sent = _sent(http)
        assert http.post("/treasury/transfer", json=BODY).status_code == 200
        override = sent[-1][OVERRIDE_HEADER]
        token = agent.token(GW_AUD, "payments:write")
        assert agent.signer is not None
        url = f"{stack.gateway}/treasury/transfer"
        again = httpx.post(url, json=BODY, headers={
            "Authorization": f"DPoP {token.access_token}", OVERRIDE_HEADER: override,
            "DPoP": agent.signer.proof("POST", url, access_token=token.access_token),
        })  # fmt: skip
    assert again.status_code == 403
    assert again.json()["code"] == "override_used"


def test_a_denied_approval_is_raised_and_not_retried(stack: Stack) -> None:
    _, agent = _agent(stack, "refused", approve=False)
    with agent, agent.client(stack.gateway, audience=GW_AUD, scope="payments:write") as http:
        sent = _sent(http)
        with pytest.raises(ApprovalDeniedError) as err:
            http.post("/treasury/transfer", json={**BODY, "amount": 250_001})
    assert len(sent) == 1
    assert err.value.approval_id is not None
    assert err.value.decision_id is not None


def test_no_decision_in_time_is_a_timeout_and_nothing_is_sent(stack: Stack) -> None:
    _, agent = _agent(stack, "waiting", approve=None)
    agent.approvals = ApprovalPolicy(timeout=0.3, poll_initial=0.01, poll_max=0.05)
    with agent, agent.client(stack.gateway, audience=GW_AUD, scope="payments:write") as http:
        sent = _sent(http)
        with pytest.raises(ApprovalTimeoutError) as err:
            http.post("/treasury/transfer", json={**BODY, "amount": 250_002})
    assert len(sent) == 1
    assert err.value.code == "approval_needed"


async def test_async_flow_waits_and_retries_once_with_the_override(stack: Stack) -> None:
    from aegis.approvals.wiring import approvals_for

    agent_id, agent = stack.key_agent("async-treasurer")
    service = approvals_for(stack.srv.services)

    async def asleep(seconds: float) -> None:
        pending = [r for r in await service.list_requests("pending") if r.agent_id == agent_id]
        for req in pending:
            await service.decide(req.id, via="cli", credential=APPROVER, approve=True)

    agent.asleep = asleep
    agent.approvals = ApprovalPolicy(timeout=3, poll_initial=0.01, poll_max=0.05)
    async with (
        agent,
        agent.async_client(stack.gateway, audience=GW_AUD, scope="payments:write") as http,
    ):
        seen: list[bool] = []

        async def record(request: httpx.Request) -> None:
            seen.append(OVERRIDE_HEADER in request.headers)

        http.event_hooks["request"].append(record)
        resp = await http.post("/treasury/transfer", json={**BODY, "amount": 250_003})
    assert resp.status_code == 200, resp.text
    assert seen == [False, True]

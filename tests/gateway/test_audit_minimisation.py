"""What policy keeps from the upstream stays out of the evidence too: the append-only audit log is
shipped to SIEMs, and an unsalted digest of a card number or an SSN is found again by trying every
candidate. A call refused because a sanitize rule cannot rewrite its path or query, and a call
held for approval under a rule that redacts, leave none of it in clear or as a digest."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pytest

from tests.gateway.conftest import (
    GW,
    Agent,
    Env,
    activate,
    approval_gated,
    dpop_headers,
    make_ctx,
)

CARD, SSN = "4111111111111111", "078-05-1120"


def _policy(obligation: str, *extra: str) -> str:
    return "\n".join((
        "apiVersion: aegis/v1", "kind: Policy", "metadata: {name: hidden}", "spec:", "  rules:",
        "    - {id: hide, action: sanitize, reason: hidden, match: {tools: [payments]},",
        f"       obligations: [{obligation}]}}", *extra,
    ))  # fmt: skip


def _digest(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()


async def _refused(
    env: Env, agent: Agent, path: str = "/payments/charge", query: str = ""
) -> dict[str, Any]:
    """The record of a call the door cannot sanitize (refused ``policy_error``)."""
    ctx = make_ctx(dpop_headers(agent, agent.token(), path=path), body={"amount": 5}, path=path)
    if query:
        name, _, value = query.partition("=")
        ctx = dataclasses.replace(ctx, url=f"{GW}{path}?{query}", query=((name, value),))
    result = await env.pipeline.run(ctx)
    assert result.code == "policy_error", result
    return next(r for r in env.audit.records(kind="gateway.decision")
                if r["decision_id"] == result.decision_id)  # fmt: skip


@pytest.mark.parametrize("name", ["ssn", "SSN", "Ssn", "ssn[]", "t.ssn"])
async def test_a_parameter_read_as_a_redacted_member_is_recorded_redacted(
    env: Env, name: str
) -> None:
    activate(env, _policy("{kind: redact, target: request, path: ssn}"))
    record = await _refused(env, Agent(env), query=f"{name}=078051120")
    assert record["params"] == {name: "redacted"}


async def test_a_masked_value_is_kept_out_of_the_path_and_the_parameters(env: Env) -> None:
    activate(env, _policy("{kind: mask, target: request, pattern: card_number}"))
    agent = Agent(env)
    in_path = await _refused(env, agent, path=f"/payments/cards/{CARD}")
    assert CARD not in in_path["path"] and in_path["path"].endswith("1111")
    in_query = await _refused(env, agent, query=f"pan={CARD}")
    assert in_query["params"] == {"pan": "redacted"}
    assert _digest(CARD) not in str(in_query)


async def test_a_call_held_for_approval_is_recorded_as_it_will_be_forwarded(env: Env) -> None:
    held = ("    - {id: pay-large, action: approval_needed, reason: large payment,"
            " match: {tools: [payments]},\n"
            "       when: {path: request.body.amount, gt: 1000},"
            " approval: {group: finance, expires_in: 600}}")  # fmt: skip
    activate(env, _policy("{kind: redact, target: request, path: ssn}", held))
    with approval_gated(env) as (pipeline, service):
        agent = Agent(env)
        body = {"amount": 5000, "ssn": SSN}
        result = await pipeline.run(make_ctx(dpop_headers(agent, agent.token()), body=body))
        assert result.code == "approval_needed", result
        approval_id = result.details["approval_id"]
        requested = next(iter(env.audit.records(kind="approval.requested")))
        assert SSN not in str(requested) and requested["parameters"]["ssn"] == "[REDACTED]"
        assert (await service.get(approval_id)).parameters["ssn"] == "[REDACTED]"
        # The approval is still bound to the bytes received: approved, that call passes, and
        # its ssn is redacted on the way.
        await service.decide(approval_id, via="cli", credential="carol@example.com", approve=True)
        override = (await service.status(approval_id, agent.id))["override_token"]
        headers = [*dpop_headers(agent, agent.token()), ("x-aegis-override", override)]
        passed = await pipeline.run(make_ctx(headers, body=body))
        assert passed.allowed and passed.body["ssn"] == "[REDACTED]", passed

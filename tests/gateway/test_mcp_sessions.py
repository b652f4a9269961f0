"""MCP sessions held for the agent that opened them, in process (the pipeline) and at the gRPC
ext_authz door: only an allowed call holds a session, a session is held by its id whatever route
or upstream spelling it comes by, and two fields joined by a proxy never read as a fresh id."""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from google.rpc import code_pb2

from aegis.approvals import ApprovalService
from aegis.gateway.context import Route
from aegis.gateway.pipeline import Pipeline
from aegis.telemetry.metrics import REGISTRY
from tests.gateway.conftest import (
    PAY,
    Agent,
    Env,
    activate,
    approval_gated,
    dpop_headers,
    gateway_app,
    make_ctx,
)
from tests.gateway.harness import exchange, gateway_here, signed_call
from tests.gateway.helpers import mint_proof
from tests.gateway.test_ext_authz_grpc import check, denied
from tests.gateway.test_mcp import MCP_ROUTE, POLICY, stub  # noqa: F401  (the ext_authz fixture)

ONLY_OWNER = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: repo-owner-only}
spec:
  rules:
    - {id: owner, action: allow, reason: the owner only, match: {tools: [repo], agent: {ids: [owner]}}}
"""
LISTING = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}


def _route(host: str | None = None, upstream: str = "http://127.0.0.1:9") -> Route:
    return dataclasses.replace(
        PAY, path_prefix="/mcp", upstream=upstream, tool="repo", host=host, mcp=True
    )


async def _call(env: Env, agent: Agent, sid: str, route: Route | None = None) -> str | None:
    """A tools/list naming session ``sid``: None if allowed, else the refusal's code."""
    route = route or _route()
    token = agent.token()
    proof = mint_proof(agent.key, "POST", f"https://{route.host or 'gw.example.com'}/mcp",
                       token=token)  # fmt: skip
    ctx = make_ctx(
        [("authorization", f"DPoP {token}"), ("dpop", proof), ("mcp-session-id", sid)],
        body=LISTING, route=route, path="/mcp",
    )  # fmt: skip
    result = await env.pipeline.run(ctx)
    return None if result.allowed else result.code


async def test_a_call_refused_by_policy_holds_no_session(env: Env) -> None:
    activate(env, ONLY_OWNER)
    owner, intruder = Agent(env, "owner"), Agent(env, "intruder")
    sid = secrets.token_hex(16)
    assert await _call(env, intruder, sid) == "access_denied"
    assert await _call(env, owner, sid) is None  # the intruder's refused call held nothing
    assert await _call(env, intruder, sid) == "access_denied"  # policy first, as for any call


async def test_refused_calls_cannot_fill_the_store(env: Env) -> None:
    activate(env, ONLY_OWNER)
    owner, intruder = Agent(env, "owner"), Agent(env, "intruder")
    env.services.replay._claims._max = 5  # type: ignore[attr-defined]  # stands for 1,000,000
    for _ in range(5):
        assert await _call(env, intruder, secrets.token_hex(16)) == "access_denied"
    assert await _call(env, owner, secrets.token_hex(16)) is None


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("http://mcp.internal:8000", "http://MCP.internal:8000"),
        ("http://mcp.internal", "http://mcp.internal:80"),
        ("http://mcp-a.internal", "http://mcp-alias.internal"),
    ],
)
async def test_a_session_is_held_by_its_id_whatever_route_it_comes_by(
    env: Env, first: str, second: str
) -> None:
    activate(env, POLICY)
    owner, other = Agent(env, "owner"), Agent(env, "other")
    sid = secrets.token_hex(16)
    a, b = _route("a.example.com", first), _route("b.example.com", second)
    assert await _call(env, owner, sid, a) is None
    assert await _call(env, other, sid, a) == "not_found"
    assert await _call(env, other, sid, b) == "not_found"
    assert await _call(env, owner, sid, b) is None


async def test_joined_session_fields_never_read_as_a_fresh_id(
    env: Env,
    stub: pb_grpc.AuthorizationStub,  # noqa: F811
) -> None:
    owner, other = Agent(env, "owner"), Agent(env, "other")
    victim = secrets.token_hex(16)

    async def listing(agent: Agent, *session: tuple[str, str]) -> object:
        headers = [*dpop_headers(agent, agent.token(), path="/mcp"),
                   ("content-type", "application/json"), *session]  # fmt: skip
        return await stub.Check(check(headers, path="/mcp", body=json.dumps(LISTING).encode()))

    assert (await listing(owner, ("mcp-session-id", victim))).status.code == code_pb2.OK
    status, _, body = denied(await listing(other, ("mcp-session-id", victim)))
    assert (status, body["code"]) == (404, "not_found")
    # Envoy joins two fields into "VICTIM,x", of which the server reads VICTIM: refused.
    status, _, body = denied(
        await listing(other, ("mcp-session-id", victim), ("mcp-session-id", "x"))
    )
    assert (status, body["code"]) == (400, "invalid_request")


async def test_an_answer_refused_after_the_decision_names_no_id(env: Env) -> None:
    app = gateway_app(env, [MCP_ROUTE], POLICY)
    answer = json.dumps({"jsonrpc": "2.0", "id": 12, "result": {}}).encode()
    request = json.dumps({"jsonrpc": "2.0", "id": 13, "method": "tools/call",
                          "params": {"name": "search", "arguments": {"query": "x"}}}).encode()  # fmt: skip
    labels = {"tool": "repo", "code": "bad_gateway"}
    failures = REGISTRY.get_sample_value("aegis_gateway_forward_failures_total", labels) or 0
    fields = [("Content-Type", "application/json"),
              ("Accept", "application/json, text/event-stream")]  # fmt: skip
    async with gateway_here(app) as port:  # the upstream is unreachable: 502 after the decision
        [(head, body)] = await exchange(
            port, signed_call(Agent(env, "caller"), "POST", "/mcp", fields, answer)
        )
        [(_, pinged)] = await exchange(
            port, signed_call(Agent(env, "caller2"), "POST", "/mcp", fields, request)
        )
    assert head.startswith(b"HTTP/1.1 502"), head
    assert json.loads(body)["id"] is None  # the server's numbering, not the client's
    assert json.loads(pinged)["id"] == 13
    # Counted under the route's configured tool, not the tool name the request sent.
    assert REGISTRY.get_sample_value("aegis_gateway_forward_failures_total", labels) == failures + 2


#: The owner is allowed, the intruder and "other" need an approval, the auditor is sanitized.
GATED = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: repo-owner-or-approval}
spec:
  rules:
    - {id: owner, action: allow, reason: the owner, match: {tools: [repo], agent: {ids: [owner]}}}
    - {id: others, action: approval_needed, reason: others need a human,
       match: {tools: [repo], agent: {ids: [intruder, other]}},
       approval: {group: finance, channel: slack, expires_in: 600}}
    - {id: redacted, action: sanitize, reason: the auditor's calls are redacted,
       match: {tools: [repo], agent: {ids: [auditor]}},
       obligations: [{kind: redact, target: request, path: params.cursor}]}
"""


async def test_a_call_held_for_approval_holds_no_session(env: Env) -> None:
    activate(env, GATED)
    owner, intruder = Agent(env, "owner"), Agent(env, "intruder")
    sid = secrets.token_hex(16)
    assert await _call(env, intruder, sid) == "approval_needed"
    assert await _call(env, owner, sid) is None
    env.services.replay._claims._max = 3  # type: ignore[attr-defined]  # stands for 1,000,000
    for _ in range(3):
        assert await _call(env, intruder, secrets.token_hex(16)) == "approval_needed"
    assert await _call(env, owner, secrets.token_hex(16)) is None  # the store is not full


async def test_a_sanitize_the_door_cannot_apply_holds_no_session(env: Env) -> None:
    activate(env, GATED)
    owner, auditor = Agent(env, "owner"), Agent(env, "auditor")
    sid = secrets.token_hex(16)

    async def at_ext_authz(agent: Agent) -> str | None:
        token = agent.token()
        proof = mint_proof(agent.key, "POST", "https://gw.example.com/mcp", token=token)
        ctx = make_ctx([("authorization", f"DPoP {token}"), ("dpop", proof),
                        ("mcp-session-id", sid)], body=LISTING, route=_route(), path="/mcp")  # fmt: skip
        ctx = dataclasses.replace(ctx, can_sanitize=False, door="ext_authz")
        result = await env.pipeline.run(ctx)
        return None if result.allowed else result.code

    assert await at_ext_authz(auditor) == "policy_error"  # an ext_authz answer rewrites nothing
    assert await at_ext_authz(owner) is None


SHADOW = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: repo-trial}
spec:
  mode: shadow
  rules:
    - {id: session, action: allow, reason: plumbing, match: {tools: [repo]}}
"""


async def test_callers_cannot_mint_metric_label_sets(env: Env) -> None:
    """The tool an MCP call is decided as comes from the request; metrics name the route's
    configured tool, or every call could add a label set kept for the life of the process."""
    from aegis.gateway.mcp import mcp_call
    from aegis.policy.shadow import SHADOW_WOULD_DENY
    from aegis.telemetry.metrics import REGISTRY

    activate(env, SHADOW)
    agent = Agent(env, "caller")
    children = len(SHADOW_WOULD_DENY._metrics)  # type: ignore[attr-defined]
    for _ in range(20):
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": secrets.token_hex(8), "arguments": {}}}  # fmt: skip
        route, _ = mcp_call(_route(), "POST", (("content-type", "application/json"),),
                            json.dumps(body).encode())  # fmt: skip
        token = agent.token()
        proof = mint_proof(agent.key, "POST", "https://gw.example.com/mcp", token=token)
        ctx = make_ctx([("authorization", f"DPoP {token}"), ("dpop", proof)], body=body,
                       route=route, path="/mcp")  # fmt: skip
        assert (await env.pipeline.run(ctx)).allowed  # shadow mode: counted as would-deny
    assert len(SHADOW_WOULD_DENY._metrics) - children <= 1  # type: ignore[attr-defined]
    labels = {"rule": "<default-deny>", "tool": "repo"}
    assert (REGISTRY.get_sample_value("aegis_shadow_would_deny_total", labels) or 0) >= 20


@pytest.fixture
def gated(env: Env) -> Iterator[tuple[Pipeline, ApprovalService]]:
    """A pipeline whose approval_needed calls are held by the real approval service."""
    activate(env, GATED)
    with approval_gated(env) as both:
        yield both


async def _listing(pipeline: Pipeline, agent: Agent, sid: str, override: str | None = None) -> Any:
    token = agent.token()
    proof = mint_proof(agent.key, "POST", "https://gw.example.com/mcp", token=token)
    fields = [("authorization", f"DPoP {token}"), ("dpop", proof), ("mcp-session-id", sid)]
    fields += [("x-aegis-override", override)] if override else []
    return await pipeline.run(make_ctx(fields, body=LISTING, route=_route(), path="/mcp"))


async def test_no_human_is_asked_and_no_override_spent_for_anothers_session(
    env: Env, gated: tuple[Pipeline, ApprovalService]
) -> None:
    pipeline, service = gated
    owner, other = Agent(env, "owner"), Agent(env, "other")
    held = secrets.token_hex(16)
    assert (await _listing(pipeline, owner, held)).allowed
    # Naming the owner's session: refused before any approval is asked for.
    assert (await _listing(pipeline, other, held)).code == "not_found"
    assert [r for r in await service.list_requests("pending") if r.agent_id == "other"] == []
    # Approved while the session was free, then the owner took it: the override stays unspent.
    free = secrets.token_hex(16)
    asked = await _listing(pipeline, other, free)
    assert asked.code == "approval_needed"
    approval_id = asked.details["approval_id"]
    await service.decide(approval_id, via="cli", credential="carol@example.com", approve=True)
    override = str((await service.status(approval_id, other.id))["override_token"])
    assert (await _listing(pipeline, owner, free)).allowed
    assert (await _listing(pipeline, other, free, override)).code == "not_found"
    assert (await service.get(approval_id)).state == "approved"

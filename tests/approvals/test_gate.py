"""The approval gate inside the decision pipeline (in process, real stores): what an agent gets
back, what is audited, and the edges: deny still wins, an allowed call spends no override, two
override headers, an unbindable streamed body, and a store outage failing closed."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from aegis.approvals import ApprovalService
from aegis.approvals.model import ApprovalRequest
from aegis.approvals.wiring import approvals_for
from aegis.config import ApprovalSettings
from aegis.errors import AegisError, NotFound, Unavailable
from aegis.gateway.approval_gate import ApprovalGate
from aegis.gateway.context import STREAMED_BODY_DIGEST, body_digest
from aegis.gateway.pipeline import Pipeline
from aegis.policy.loader import load_document
from aegis.registry.service import AgentSpec
from aegis.telemetry.metrics import REGISTRY
from aegis.tokens.delegation import mint_grant
from tests.approvals.conftest import FINANCE, held
from tests.gateway.conftest import PAY, Agent, Env, approval_gated, dpop_headers, make_ctx

POLICY = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: gate}
spec:
  rules:
    - id: pay-small
      action: allow
      match: {tools: [payments]}
      when: {path: request.body.amount, lte: 100}
    - id: pay-large
      action: approval_needed
      match: {tools: [payments]}
      when: {path: request.body.amount, gt: 1000}
      approval: {group: finance, channel: slack, expires_in: 600}
    - id: pay-negative
      action: deny
      match: {tools: [payments]}
      when: {path: request.body.amount, lt: 0}
    - id: uploads
      action: approval_needed
      match: {tools: [files], methods: [PUT]}
      approval: {group: finance, expires_in: 600}
"""


@pytest.fixture
def gated(env: Env) -> Iterator[tuple[Env, Pipeline, ApprovalService]]:
    env.policies.activate(
        "acme", "prod", env.policies.put(load_document(POLICY), now=0), actor="t", now=0
    )
    with approval_gated(env) as (pipeline, service):
        yield env, pipeline, service


async def _approved_override(
    env: Env, pipeline: Pipeline, service: ApprovalService, agent: Agent, amount: int
) -> str:
    held = await pipeline.run(make_ctx(dpop_headers(agent, agent.token()), body={"amount": amount}))
    approval_id = held.details["approval_id"]
    await service.decide(approval_id, via="cli", credential="carol@example.com", approve=True)
    return str((await service.status(approval_id, agent.id))["override_token"])


async def test_held_call_answers_with_its_approval_and_is_audited(
    gated: tuple[Env, Pipeline, ApprovalService],
) -> None:
    env, pipeline, service = gated
    agent = Agent(env)
    before = REGISTRY.get_sample_value("aegis_approval_needed_total") or 0.0
    result = await pipeline.run(make_ctx(dpop_headers(agent, agent.token()), body={"amount": 5000}))
    assert (result.status, result.code, result.action) == (
        403,
        "approval_needed",
        "approval_needed",
    )
    approval_id = result.details["approval_id"]
    assert result.details["status_url"] == service.status_url(approval_id)
    assert result.details["approval_state"] == "pending"
    assert REGISTRY.get_sample_value("aegis_approval_needed_total") == before + 1
    record = next(r for r in env.audit.records(kind="gateway.decision")
                  if r["decision_id"] == result.decision_id)  # fmt: skip
    assert record["approval_id"] == approval_id
    req = await service.get(approval_id)
    assert (req.agent_id, req.agent_owner, req.rule_ids) == (agent.id, "owner@example.com",
                                                              ("pay-large",))  # fmt: skip


async def test_deny_wins_and_allowed_calls_spend_no_override(
    gated: tuple[Env, Pipeline, ApprovalService],
) -> None:
    env, pipeline, service = gated
    agent = Agent(env)
    override = await _approved_override(env, pipeline, service, agent, 5000)
    with_override = [*dpop_headers(agent, agent.token()), ("x-aegis-override", override)]
    denied = await pipeline.run(make_ctx(with_override, body={"amount": -5}))
    assert denied.code == "access_denied"
    small = [*dpop_headers(agent, agent.token()), ("x-aegis-override", override)]
    assert (await pipeline.run(make_ctx(small, body={"amount": 5}))).allowed
    # Still unspent: the approved call goes through with it once.
    retry = [*dpop_headers(agent, agent.token()), ("x-aegis-override", override)]
    ok = await pipeline.run(make_ctx(retry, body={"amount": 5000}))
    assert ok.allowed and ok.action == "allow", ok
    again = [*dpop_headers(agent, agent.token()), ("x-aegis-override", override)]
    assert (await pipeline.run(make_ctx(again, body={"amount": 5000}))).code == "override_used"


async def test_two_override_headers_are_refused(
    gated: tuple[Env, Pipeline, ApprovalService],
) -> None:
    env, pipeline, service = gated
    agent = Agent(env)
    override = await _approved_override(env, pipeline, service, agent, 7000)
    headers = [*dpop_headers(agent, agent.token()), ("x-aegis-override", override),
               ("x-aegis-override", override)]  # fmt: skip
    result = await pipeline.run(make_ctx(headers, body={"amount": 7000}))
    assert (result.status, result.code) == (400, "invalid_request")


async def test_streamed_body_cannot_be_bound(gated: tuple[Env, Pipeline, ApprovalService]) -> None:
    env, pipeline, _ = gated
    agent = Agent(env)
    files = dataclasses.replace(PAY, path_prefix="/files", tool="files")
    headers = dpop_headers(agent, agent.token(), method="PUT", path="/files/up")
    ctx = dataclasses.replace(
        make_ctx(headers, method="PUT", route=files, path="/files/up"),
        body_digest=STREAMED_BODY_DIGEST,
        raw_body=None,
    )
    result = await pipeline.run(ctx)
    assert (result.status, result.code) == (403, "approval_unbindable")


class DownStore:
    """An approval store whose database is gone (every method fails like the SQL store does)."""

    def __getattr__(self, name: str) -> object:
        def fail(*args: object, **kwargs: object) -> ApprovalRequest:
            raise Unavailable("the approval store cannot answer", code="approvals_unavailable")

        return fail


async def test_approval_store_outage_fails_closed(
    gated: tuple[Env, Pipeline, ApprovalService],
) -> None:
    env, pipeline, service = gated
    real = service.store
    service.store = DownStore()  # type: ignore[assignment]
    try:
        agent = Agent(env)
        result = await pipeline.run(
            make_ctx(dpop_headers(agent, agent.token()), body={"amount": 5000})
        )
    finally:
        service.store = real
    assert (result.status, result.code) == (503, "approvals_unavailable")
    assert not result.allowed


async def test_the_gate_names_the_owner_of_every_agent_in_the_chain(
    gated: tuple[Env, Pipeline, ApprovalService],
) -> None:
    """Separation of duties is judged on every agent that delegated the call: the gate reads
    their owners from the registry (tested in test_service for the refusal itself)."""
    env, _, service = gated
    env.services.registry.register_agent(
        AgentSpec("orchestrator", "acme", "prod", "Carol@Example.com"), actor="test"
    )
    payer = Agent(env)
    gate = ApprovalGate(service, env.services.cache)
    assert await gate._chain_owners(("orchestrator", payer.id)) == (
        "Carol@Example.com", "owner@example.com"
    )  # fmt: skip
    assert await gate._chain_owners(()) == ()
    with pytest.raises(NotFound):  # an agent the registry does not know: the call fails closed
        await gate._chain_owners(("ghost",))


async def test_the_wired_service_judges_chain_owners_from_the_registry(env: Env) -> None:
    """approvals_for (what the gateway, admin API and CLI use) looks the chain agents' owners
    up in the registry at decision time, even for a request stored without them."""
    settings = ApprovalSettings.model_validate(
        {"approvers": [{"id": "carol@example.com", "groups": ["finance"]}]}
    )
    config = env.services.config.model_copy(update={"approvals": settings})
    services = dataclasses.replace(env.services, config=config, extras={})
    env.services.registry.register_agent(
        AgentSpec("orchestrator", "acme", "prod", "Carol@Example.com"), actor="test"
    )
    service = approvals_for(services, audit=env.audit)
    try:
        call = held(chain=("orchestrator",), agent_owner="someone@example.com")
        req = await service.hold(call, FINANCE)
        with pytest.raises(AegisError) as refused:
            await service.decide(req.id, via="cli", credential="carol@example.com", approve=True)
        assert refused.value.code == "self_approval_forbidden"
    finally:
        service.close()


@pytest.mark.parametrize(
    ("headers", "raw", "shown"),
    [
        ((("content-type", "application/x-www-form-urlencoded"),), b"to=A&amount=1",
         {"form": {"to": "A", "amount": "1"}}),
        # Read as a form, gzip's header comment would show fields the upstream never reads.
        ((("content-type", "application/x-www-form-urlencoded"), ("content-encoding", "gzip")),
         b"\x1f\x8b\x08\x10&to=ALICE&amount=12&\x00...", None),
        ((("content-type", "application/x-www-form-urlencoded; charset=utf-16le"),),
         "to=A".encode("utf-16-le"), None),
    ],
)  # fmt: skip
def test_approvers_see_a_form_only_as_the_upstream_reads_it(
    headers: tuple[tuple[str, str], ...], raw: bytes, shown: object
) -> None:
    from aegis.gateway.approval_gate import shown_body
    from aegis.gateway.context import CallContext, Route, body_digest

    route = Route("/crm", "http://127.0.0.1:9", "crm", "acme", "prod")
    ctx = CallContext(method="PUT", url="https://gw/crm/x", host="gw", path="/crm/x", route=route,
                      headers=headers, body_digest=body_digest(raw), raw_body=raw)  # fmt: skip
    got = shown_body(ctx)
    if shown is None:
        assert isinstance(got, dict) and got["body_not_shown"]["digest"] == body_digest(raw)
    else:
        assert got == shown


async def test_a_call_the_door_cannot_enforce_is_never_held_nor_an_override_spent(
    gated: tuple[Env, Pipeline, ApprovalService],
) -> None:
    """At an ext_authz door (which rewrites nothing) a call whose approval would also bring
    sanitize obligations is refused before it is held: an approval opened for it, or an
    override spent on it, would be burnt on a refusal after the human said yes."""
    env, pipeline, service = gated
    masked = POLICY.replace(
        "  rules:\n",
        """  rules:
    - id: mask-cards
      action: sanitize
      match: {tools: [payments]}
      obligations:
        - {kind: mask, target: response, pattern: card_number}
""",
    )
    env.policies.activate(
        "acme", "prod", env.policies.put(load_document(masked), now=1), actor="t", now=1
    )
    agent = Agent(env)
    ctx = dataclasses.replace(
        make_ctx(dpop_headers(agent, agent.token()), body={"amount": 5000}), can_sanitize=False
    )
    result = await pipeline.run(ctx)
    assert (result.status, result.code) == (403, "policy_error")
    assert await service.list_requests() == []  # nothing for a human to approve in vain


async def test_a_call_let_through_by_an_approval_is_recorded_with_its_id(
    gated: tuple[Env, Pipeline, ApprovalService],
) -> None:
    """The decision record of an approved call names the approval (not only in its reasons)."""
    env, pipeline, service = gated
    agent = Agent(env)
    override = await _approved_override(env, pipeline, service, agent, 5000)
    headers = [*dpop_headers(agent, agent.token()), ("x-aegis-override", override)]
    ok = await pipeline.run(make_ctx(headers, body={"amount": 5000}))
    assert ok.allowed and ok.approved
    record = next(
        r for r in env.audit.records(kind="gateway.decision") if r["decision_id"] == ok.decision_id
    )
    assert record["approval_id"] is not None
    assert record["approval_id"] in " ".join(record["reasons"])


async def test_an_audit_outage_when_the_override_is_presented_leaves_the_approval_unused(
    gated: tuple[Env, Pipeline, ApprovalService],
) -> None:
    """Nothing is spent before the presentation is recorded: refused 503 while the audit log is
    down, the very call the human approved passes once it is back."""
    env, pipeline, service = gated
    agent = Agent(env)
    override = await _approved_override(env, pipeline, service, agent, 5000)
    real = env.audit.append_async

    async def down(kind: str, record: dict[str, Any]) -> tuple[int, str]:
        raise Unavailable("the audit log cannot be written", code="audit_unavailable")

    env.audit.append_async = down  # type: ignore[method-assign]
    try:
        first = await pipeline.run(make_ctx(
            [*dpop_headers(agent, agent.token()), ("x-aegis-override", override)],
            body={"amount": 5000}))  # fmt: skip
    finally:
        env.audit.append_async = real  # type: ignore[method-assign]
    assert (first.status, first.code) == (503, "audit_unavailable")
    retry = await pipeline.run(make_ctx(
        [*dpop_headers(agent, agent.token()), ("x-aegis-override", override)],
        body={"amount": 5000}))  # fmt: skip
    assert retry.allowed, retry


async def test_a_body_approvers_would_read_differently_from_the_upstream_is_never_held(
    gated: tuple[Env, Pipeline, ApprovalService],
) -> None:
    """Approvers read 9007199254740993; an upstream that holds numbers as doubles acts on
    ...992. Such a call is refused, not held, even where no policy condition reads the body."""
    env, pipeline, service = gated
    agent = Agent(env)
    files = dataclasses.replace(PAY, path_prefix="/files", tool="files")
    headers = dpop_headers(agent, agent.token(), method="PUT", path="/files/up")
    ctx = make_ctx(headers, route=files, path="/files/up", method="PUT", body={"to": 2**53 + 1})
    result = await pipeline.run(ctx)
    assert (result.status, result.code) == (400, "invalid_request"), result
    assert await service.list_requests() == []


async def test_a_call_approvers_could_not_be_shown_whole_is_never_held(
    gated: tuple[Env, Pipeline, ApprovalService],
) -> None:
    """More query parameters or bound headers than a request shows approvers (the rest would
    be bound and seen by no one), or a form holding ';' (``memo=june;amount=999999`` is an
    ``amount`` to upstreams that split forms at ';', not to the view approvers get): refused
    with what to change, nothing held. At the limit, and ';' encoded, the call is held."""
    env, pipeline, service = gated
    agent = Agent(env)
    files = dataclasses.replace(PAY, path_prefix="/files", tool="files")

    def put(query: int = 0, headers: int = 0, form: bytes | None = None) -> Any:
        sent = [*dpop_headers(agent, agent.token(), method="PUT", path="/files/up"),
                *((f"x-field-{i}", "v") for i in range(headers))]  # fmt: skip
        ctx = make_ctx(sent, route=files, path="/files/up", method="PUT")
        params = (("amount", "10"), *((f"p{i}", "x") for i in range(query - 1)))
        ctx = dataclasses.replace(ctx, query=params if query else ())
        if form is not None:
            ctx = dataclasses.replace(
                ctx, headers=(*ctx.headers, ("content-type", "application/x-www-form-urlencoded")),
                body_digest=body_digest(form), raw_body=form,
            )  # fmt: skip
        return pipeline.run(ctx)

    refused = [await put(query=65), await put(headers=65),
               await put(form=b"to=ACME&amount=10&memo=june;amount=999999")]  # fmt: skip
    assert [(r.status, r.code) for r in refused] == [(400, "invalid_request")] * 3
    assert "at most 64 query parameters" in refused[0].message
    assert "at most 64 bound headers" in refused[1].message
    assert "%3B" in refused[2].message
    assert await service.list_requests() == []
    held = [await put(query=64), await put(headers=60),
            await put(form=b"to=ACME&amount=10&memo=june%3Bamount=999999")]  # fmt: skip
    assert [r.code for r in held] == ["approval_needed"] * 3
    shown = (await service.get(held[2].details["approval_id"])).parameters
    assert shown == {"form": {"to": "ACME", "amount": "10", "memo": "june;amount=999999"}}


async def test_a_change_not_yet_on_record_is_answered_as_pending(
    gated: tuple[Env, Pipeline, ApprovalService],
) -> None:
    """The status URL shows a request whose approval is being recorded as pending: so does the
    answer to the same call asked again meanwhile."""
    env, pipeline, service = gated
    agent = Agent(env)
    first = await pipeline.run(make_ctx(dpop_headers(agent, agent.token()), body={"amount": 5000}))
    approval_id = first.details["approval_id"]
    req = await service.get(approval_id)
    approving = dataclasses.replace(req, state="approving", decided_at=req.created_at)
    assert service.store.transition(approving, "pending")
    again = await pipeline.run(make_ctx(dpop_headers(agent, agent.token()), body={"amount": 5000}))
    assert again.details["approval_id"] == approval_id
    assert again.details["approval_state"] == "pending", again.details


# -- the origin user and its issuer --------------------------------------------------------


def _user_rooted_token(env: Env, agent: Agent, user: str, user_iss: str) -> str:
    """A token of ``agent`` acting for ``user`` of identity provider ``user_iss``, as the token
    service issues it (root link signed by the service's own key)."""
    services = env.services
    issuer = services.config.issuer
    now = services.clock.now()
    root = mint_grant(
        services.keyring.signing_key(),  # type: ignore[arg-type]
        parent=issuer, child=agent.id, audience=issuer, scopes=("payments:write",),
        tools=("*",), max_depth=3, now=now, lifetime=300,
        alg=services.keyring.settings.signing_alg,
        extra={"origin_user": user, "origin_iss": user_iss, "origin_exp": int(now) + 600},
    )  # fmt: skip
    return agent.token(
        parent_agent=root, act={"sub": agent.id}, delegation_depth=1, origin_user=user,
        origin_iss=user_iss,
    )  # fmt: skip


async def test_an_override_for_one_issuers_user_is_not_spent_on_another_issuers_same_user(
    gated: tuple[Env, Pipeline, ApprovalService],
) -> None:
    """A call made for another user is another call, and the same ``sub`` of two identity
    providers is two users: alice of idp-a's approval is not spent on a call for alice of
    idp-b. Approvers see the issuer, and the request records it."""
    env, pipeline, service = gated
    agent = Agent(env)
    token_a = _user_rooted_token(env, agent, "alice", "https://idp-a.example")
    held = await pipeline.run(make_ctx(dpop_headers(agent, token_a), body={"amount": 5000}))
    assert held.code == "approval_needed", held
    approval_id = held.details["approval_id"]
    await service.decide(approval_id, via="cli", credential="carol@example.com", approve=True)
    override = str((await service.status(approval_id, agent.id))["override_token"])

    token_b = _user_rooted_token(env, agent, "alice", "https://idp-b.example")
    headers = [*dpop_headers(agent, token_b), ("x-aegis-override", override)]
    result = await pipeline.run(make_ctx(headers, body={"amount": 5000}))
    assert result.code == "override_digest_mismatch", (result.status, result.code, result.action)
    request = await service.get(approval_id)
    assert (request.origin_user, request.origin_iss) == ("alice", "https://idp-a.example")
    assert request.state == "approved"  # not spent on the other user's call

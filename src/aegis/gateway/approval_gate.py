"""Enforcing ``approval_needed`` (ARCHITECTURE.md step 9): hold the call for a human, or let exactly
the approved call through once with its override token.

The pipeline calls :class:`ApprovalGate` only when policy answered ``approval_needed`` (a deny
still wins over any override; an allowed call never spends one). Without an ``x-aegis-override``
header the gate opens (or finds) the approval request for this call and refuses with
``approval_needed``, the ``approval_id`` and the ``status_url`` the agent polls. With the header
(exactly once) it redeems the token: it must be valid, this agent's, for this exact call (the
digest of ``aegis.approvals.model.call_digest``: route, host and target as sent, method, path,
query, the headers the upstream acts on, body bytes, delegation chain and the approval policy
requires now), approved, unexpired and unused; then the call proceeds as policy's approved form
(sanitize obligations still apply), and no request field the digest leaves out reaches the
upstream. A call the door could not enforce once approved is refused before it is held.
The header starts with ``x-aegis-``, so the proxy never forwards it upstream.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import parse_qsl

from aegis.approvals.model import MAX_SHOWN_FIELDS, UNRECORDED_STATES, HeldCall, bound_headers
from aegis.approvals.override import OVERRIDE_HEADER
from aegis.approvals.service import ApprovalService
from aegis.crypto.jws import holds_unsafe_integer
from aegis.errors import AegisError, InvalidRequest
from aegis.gateway.context import EMPTY_BODY_DIGEST, STREAMED_BODY_DIGEST, CallContext
from aegis.gateway.evidence import EvidenceFacts
from aegis.gateway.fields import is_encoded, utf8_labelled
from aegis.gateway.overrides import is_form_type
from aegis.gateway.routing import bare_host
from aegis.policy.decision import ApprovalRequirement, Decision
from aegis.policy.input import PolicyCall
from aegis.policy.obligations import apply_to_body
from aegis.registry.cache import RegistryCache
from aegis.telemetry.metrics import APPROVAL_REJECTIONS

__all__ = ["ApprovalGate", "requirement_of", "shown_body"]


def requirement_of(decision: Decision) -> ApprovalRequirement:
    """One requirement for the call: every named group (all must approve through one person in
    each), the first channel, the shortest expiry. No requirement is a policy error (deny)."""
    if not decision.approvals:
        raise AegisError("approval_needed without an approval requirement", code="policy_error")
    groups = sorted({a.group for a in decision.approvals})
    return ApprovalRequirement(
        group=",".join(groups),
        channel=decision.approvals[0].channel,
        expires_in=min(a.expires_in for a in decision.approvals),
    )


def _as_forwarded(body: Any, decision: Decision) -> Any:
    """The body as approvers are shown it and the request is recorded: with the request
    obligations of the rules that matched applied, as it will be forwarded once approved. What
    policy keeps from the upstream stays out of the approval's record and its notifications
    (Slack, Teams, webhooks); the approval is bound to the bytes received all the same."""
    if body is None or not decision.obligations:
        return body
    return apply_to_body(body, decision.obligations, "request")


def shown_body(ctx: CallContext) -> Any:
    """The body as approvers are shown it: the parsed JSON body; a form's fields (as lists when
    repeated); else, for a body policy did not read (not JSON, or over the size policy is shown),
    a marker saying so, with its type and digest: never ``null``, which is what a call without a
    body shows. The approval is bound to the body's bytes either way."""
    if ctx.body is not None or ctx.body_digest == EMPTY_BODY_DIGEST:
        return ctx.body
    content_type = next((v for k, v in ctx.headers if k == "content-type"), "")
    coding = next((v for k, v in ctx.headers if k == "content-encoding"), None)
    # Under a content coding or another charset the bytes read as a form are not what the
    # upstream reads (gzip's header may carry a comment that looks like one).
    readable = not is_encoded(coding) and utf8_labelled(content_type)
    if readable and is_form_type(content_type) and ctx.raw_body is not None:
        fields: dict[str, Any] = {}
        text = ctx.raw_body.decode("utf-8", "replace")
        for name, value in parse_qsl(text, keep_blank_values=True):
            prev = fields.get(name)
            fields[name] = (
                value if prev is None else [*([prev] if isinstance(prev, str) else prev), value]
            )
        return {"form": fields}
    return {"body_not_shown": {"content_type": content_type[:128] or None,
                               "digest": ctx.body_digest}}  # fmt: skip


def _refuse_unshowable(ctx: CallContext, headers: tuple[tuple[str, str], ...]) -> None:
    """Refuse a call approvers could not be shown as its upstream reads it: one whose query
    or bound headers hold more fields than a request keeps for them (the rest would be bound
    and never seen), or a form holding a ``;``, which older Rack, Go before 1.17 and Python
    before 3.9.2 split a form at as at ``&`` (``amount=10&memo=x;amount=999999`` is shown
    ``amount: 10`` and pays 999999 there), as the query already refuses it."""
    for what, fields in (("query parameters", ctx.query), ("bound headers", headers)):
        if len(fields) > MAX_SHOWN_FIELDS:
            raise InvalidRequest(
                f"a call held for approval may carry at most {MAX_SHOWN_FIELDS} {what} (it has "
                f"{len(fields)}), so that approvers see every one; send the rest in the body"
            )
    content_type = next((v for k, v in ctx.headers if k == "content-type"), "")
    coding = next((v for k, v in ctx.headers if k == "content-encoding"), None)
    shown_as_form = is_form_type(content_type) and not is_encoded(coding)
    if shown_as_form and ctx.raw_body is not None and b";" in ctx.raw_body:
        raise InvalidRequest(
            "a form held for approval must encode ';' as %3B: some upstreams split a form at ';' "
            "as at '&', and would read other fields than approvers are shown"
        )


def _target(url: str) -> str:
    """The request target (path and query as sent) of the absolute URL a door recorded."""
    rest = url.partition("://")[2]
    slash = rest.find("/")
    return rest[slash:] if slash >= 0 else "/"


class ApprovalGate:
    def __init__(self, service: ApprovalService, registry: RegistryCache) -> None:
        self.service, self._registry = service, registry

    async def _chain_owners(self, chain: tuple[str, ...]) -> tuple[str, ...]:
        """The owners of the agents that delegated this call (the delegation step has checked
        each is registered and active; a registry that cannot answer fails the call closed)."""
        return tuple([(await self._registry.agent_async(a)).owner or "" for a in chain])

    async def __call__(self, ctx: CallContext, facts: EvidenceFacts, call: PolicyCall) -> Decision:
        decision = facts.decision
        assert decision is not None
        if ctx.body_digest == STREAMED_BODY_DIGEST:
            raise AegisError(
                "a call held for approval must have a buffered body so that the approval can "
                "be bound to it; send it as JSON within gateway.max_body_bytes",
                code="approval_unbindable",
            )
        if holds_unsafe_integer(ctx.body):
            # Approvers read the body; an upstream that holds numbers as doubles would act on
            # another number than the one they approved.
            raise InvalidRequest(
                "a call held for approval must hold no integer beyond +-2**53 in its body "
                "(readers that hold numbers as doubles read it as another); send it as a string"
            )
        headers = bound_headers(ctx.headers)
        _refuse_unshowable(ctx, headers)
        need = requirement_of(decision)
        held = HeldCall(
            decision_id=facts.decision_id, tenant=call.tenant, env=call.env,
            agent_id=call.agent.id, agent_owner=call.agent.owner or "", tool=call.tool,
            method=ctx.method, path=ctx.path, query=ctx.query, body_digest=ctx.body_digest,
            body=_as_forwarded(shown_body(ctx), decision), chain=facts.chain,
            origin_user=call.chain.origin_user, origin_iss=call.chain.origin_iss,
            rule_ids=decision.rule_ids, policy_version=decision.policy_version,
            reasons=decision.reasons, host=bare_host(ctx.host), authority=ctx.host,
            target=_target(ctx.url), upstream=ctx.route.upstream,
            headers=headers, approval=need.group,
            chain_owners=await self._chain_owners(facts.chain),
        )  # fmt: skip
        tokens = ctx.header_values(OVERRIDE_HEADER)
        if len(tokens) > 1:
            raise InvalidRequest(f"send at most one {OVERRIDE_HEADER} header")
        if tokens:
            try:
                req = await self.service.redeem(held, tokens[0].strip())
            except AegisError as exc:
                APPROVAL_REJECTIONS.labels(code=exc.code).inc()
                raise
            facts.approval_id = req.id
            return dataclasses.replace(
                decision,
                action="sanitize" if decision.obligations else "allow",
                code=None,
                reasons=(f"approved by {req.decided_by} (approval {req.id})",),
            )
        req = await self.service.hold(held, need)
        raise AegisError(
            "this call needs a human approval; poll status_url, then retry the same call once "
            f"with the {OVERRIDE_HEADER} header",
            code="approval_needed",
            approval_id=req.id,
            status_url=self.service.status_url(req.id),
            # A change not yet on record has not taken effect (as the status URL shows it).
            approval_state="pending" if req.state in UNRECORDED_STATES else req.state,
            expires_at=int(req.expires_at),
        )

"""The decision pipeline (ARCHITECTURE.md steps 2-10; RFC 9068 tokens, RFC 9449 / RFC 8705 binding).

Every front door calls :meth:`Pipeline.run` with a :class:`CallContext` and gets a :class:`Result`.
The steps run in a fixed order and each one raises a typed error to refuse:

token (signature, claims, gateway audience) → binding (DPoP ``cnf.jkt`` or ``cnf.x5t#S256``) →
replay (one single-use proof per call) → subject state (+ route tenant/env) → delegation chain →
policy → limits → enforcement → evidence (attestation, audit record, span, metrics).

Fail closed: an ``Unavailable`` dependency is a 503 with its ``*_unavailable`` code; any exception
nobody planned for is a 500 ``server_error``; neither ever forwards. A call is answered only after its
audit record is committed; if the record cannot be written the call is refused (``audit_unavailable``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace

from aegis.audit.attest import Attester, request_digest
from aegis.audit.log import AuditLog
from aegis.clock import Clock, new_id
from aegis.errors import REFUSAL_FIELD, AegisError, TokenError, Unavailable, refusal_mark
from aegis.gateway.auth import Credentials, read_credentials
from aegis.gateway.context import CallContext, Route
from aegis.gateway.evidence import (
    EvidenceFacts,
    Result,
    answer_details,
    audit_record,
    count_refusal,
    refusal_headers,
)
from aegis.gateway.hygiene import REQUEST_DROP, forwardable
from aegis.gateway.mcp import (
    SESSION_NAMESPACE,
    TOOL_NAME,
    legacy_session,
    lists_tools,
    session_id,
    session_key,
)
from aegis.gateway.names import name_keys, query_key
from aegis.gateway.overrides import refuse_redirecting_fields
from aegis.gateway.policies import PolicyDirectory
from aegis.gateway.routing import bare_host
from aegis.pki.binding import X5T_S256, check_certificate_binding, check_peer_is_subject
from aegis.pki.middleware import audit_refusal
from aegis.policy.decision import Decision, SanitizeObligation
from aegis.policy.input import AgentInfo, ChainInfo, PolicyCall, build_input
from aegis.policy.obligations import apply_to_body, mask_text
from aegis.policy.shadow import record_shadow
from aegis.registry.cache import RegistryCache
from aegis.stores.base import HoldLimit, ReplayStore, RevocationStore
from aegis.telemetry import names
from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import (
    MTLS_REJECTIONS,
    PIPELINE_STEP_SECONDS,
    PIPELINE_STEPS,
    count_decision,
)
from aegis.telemetry.tracing import get_tracer
from aegis.tokens.chain import ChainRules, prefetch_chain_agents, verify_chain
from aegis.tokens.claims import AccessToken
from aegis.tokens.dpop import DpopProof, DpopVerifier
from aegis.tokens.subject import check_subject, revocation_check
from aegis.tokens.verifier import AccessTokenVerifier

__all__ = ["STEPS", "ApprovalHook", "LimitsHook", "Pipeline", "Result"]

STEPS: Final = PIPELINE_STEPS
_TOKEN, _BINDING, _REPLAY, _SUBJECT, _DELEGATION, _POLICY, _LIMITS, _EVIDENCE = range(len(STEPS))
TOKEN_REPLAY_NAMESPACE: Final = "token"
#: Limits and budgets (step 8) plug in here; raising refuses the call.
LimitsHook = Callable[[CallContext, AccessToken], Awaitable[None]]
#: Enforcement of ``approval_needed`` (``aegis.gateway.approval_gate``): returns the approved
#: decision for a call that carries a valid override, else raises (``approval_needed`` and the id).
ApprovalHook = Callable[[CallContext, EvidenceFacts, PolicyCall], Awaitable[Decision]]


def session_holder(token: AccessToken) -> str:
    """Who holds the MCP sessions a token's calls open or name: its agent, in its tenant and
    environment."""
    return f"{token.tenant}\n{token.env}\n{token.agent_id}"


def _enforceable(ctx: CallContext, decision: Decision) -> list[SanitizeObligation]:
    """The request obligations of ``decision`` that rewrite the body; ``policy_error`` when this
    door cannot apply its obligations to this call: an ext_authz door rewrites nothing, and a
    body that is streamed, not JSON, or carries the data in its path or query cannot be
    redacted (its bytes would be forwarded as they came)."""
    if not decision.obligations:
        return []
    if not ctx.can_sanitize:
        raise AegisError(
            "policy requires sanitizing this call; route the tool through the reverse proxy",
            code="policy_error",
        )
    on_body = [o for o in decision.obligations if o.target == "request" and o.kind != "drop_header"]
    if on_body and ctx.body_hidden:
        raise AegisError(
            "policy requires sanitizing the request body; send it as JSON "
            "(content-type application/json) within gateway.max_body_bytes",
            code="policy_error",
        )
    if on_body and _outside_body(ctx, on_body):
        raise AegisError(
            "policy requires sanitizing data the call carries in its path or query "
            "string; send it in the JSON body",
            code="policy_error",
        )
    return on_body


def _outside_body(ctx: CallContext, obligations: list[SanitizeObligation]) -> bool:
    """Whether request obligations would change something the proxy forwards as sent: a query
    parameter named like a redacted member (the last key of its path), or text in the query,
    the path, the host or a header's name that a mask rewrites."""
    names = {
        query_key(o.path.rsplit(".", 1)[-1]) for o in obligations if o.kind == "redact" and o.path
    }
    patterns = tuple(sorted({o.pattern for o in obligations if o.kind == "mask" and o.pattern}))
    if ctx.query and "*" in names:
        return True
    for name, value in ctx.query:
        if name_keys(name) & names:  # as lenient servers read it (``SSN``, ``ssn[]``)
            return True
        if patterns and (mask_text(name, patterns) != name or mask_text(value, patterns) != value):
            return True
    if not patterns:
        return False
    # Masks rewrite values; a name (a header's, or the host the upstream is told) stays as sent.
    texts = [ctx.path, ctx.host, *(name for name, _ in ctx.headers)]
    return any(mask_text(text, patterns) != text for text in texts)


class Pipeline:
    def __init__(
        self,
        *,
        verifier: AccessTokenVerifier,
        dpop: DpopVerifier,
        replay: ReplayStore,
        cache: RegistryCache,
        revocation: RevocationStore,
        chain_rules: ChainRules,
        policies: PolicyDirectory,
        attester: Attester,
        audit: AuditLog | None,
        clock: Clock,
        public_url: str | None = None,
        limits: LimitsHook | None = None,
        approvals: ApprovalHook | None = None,
        mcp_session_idle: float = 86400.0,
        mcp_sessions_per_agent: int = 1000,
    ) -> None:
        self._verifier, self._dpop, self._replay = verifier, dpop, replay
        self._cache, self._revocation, self._rules = cache, revocation, chain_rules
        self._policies, self._attester, self._audit = policies, attester, audit
        self._clock, self._public_url, self._limits = clock, public_url, limits
        self._approvals, self._mcp_session_idle = approvals, mcp_session_idle
        self._mcp_sessions_per_agent = mcp_sessions_per_agent

    @property
    def audit(self) -> AuditLog | None:
        """Where decisions are recorded; front doors write their own refusals (mTLS) there too."""
        return self._audit

    def now(self) -> float:
        """The pipeline's clock (decision times; front doors' own records use it too)."""
        return self._clock.now()

    def reads_body(self, route: Route, *, enforced: bool = False) -> bool:
        """Whether the policy in force reads request bodies for the route's tool (a front door
        then buffers them); with ``enforced``, whether a rule whose outcome is enforced does (a
        door then refuses bodies policy cannot read alike). An unknown answer is False, and the
        policy step decides."""
        try:
            return self._policies.reads_body(route.tenant, route.env, route.tool, enforced=enforced)
        except AegisError:
            return False

    def _htu(self, ctx: CallContext) -> str:
        # The path as sent (percent-encoded), so that the proof's htu compares like with like.
        if not self._public_url:
            return ctx.url
        path = urlsplit(ctx.url).path
        if ctx.route.host is not None:
            # A route of its own host is addressed there: a proof made for another host's route
            # with the same path is not one for this call.
            public = urlsplit(self._public_url)
            port = f":{public.port}" if public.port else ""
            return f"{public.scheme}://{bare_host(ctx.route.host)}{port}{public.path}{path}"
        return f"{self._public_url}{path}"

    @staticmethod
    def _timed(facts: EvidenceFacts, step: int, started: float) -> float:
        """Note the time ``step`` took; the call's step times are recorded together at its end."""
        now = time.perf_counter()
        facts.step_times.append((step, now - started))
        return now

    async def run(self, ctx: CallContext) -> Result:
        facts = EvidenceFacts(decision_id=new_id(), time=self._clock.now())
        # The span is current while the call is decided and evidenced (the audit record carries
        # its trace id); attached by hand, which costs a fraction of start_as_current_span.
        span = get_tracer().start_span(names.SPAN_GATEWAY_DECIDE)
        attached = otel_context.attach(trace.set_span_in_context(span))
        try:
            try:
                decision = await self._decide(ctx, facts)
                result = self._enforce(ctx, facts, decision)
            except AegisError as exc:
                result = self._refuse(facts, exc)
            except Exception as exc:  # a bug is a refusal, never a forward
                log_event("gateway.internal_error", level=logging.ERROR, error=type(exc).__name__)
                result = self._refuse(facts, AegisError("internal error", code="server_error"))
            started = time.perf_counter()
            try:
                result = await self._evidence(ctx, facts, result)
            except Exception as exc:  # never an answer without its evidence: refuse, logged
                log_event("gateway.evidence_failed", level=logging.ERROR, error=type(exc).__name__)
                failed = self._refuse(facts, AegisError("internal error", code="server_error"))
                result = _sealed(ctx, facts, failed)
            self._timed(facts, _EVIDENCE, started)
            if span.is_recording():  # without a tracing SDK the span records nothing
                span.set_attributes(facts.span_attributes(result))
        finally:
            otel_context.detach(attached)
            span.end()
        PIPELINE_STEP_SECONDS.record(facts.step_times)
        count_decision(result.action, result.code)
        return result

    async def refuse_unrouted(
        self,
        *,
        door: str,
        method: str,
        target: str,
        host: str,
        client: str | None,
        status: int,
        code: str,
        message: str,
        authorization: str | None = None,
    ) -> Result:
        """A front door's refusal before any route was chosen (method not allowed, no route, a
        target or host it cannot read): no tool, so no policy or attestation, but counted and
        audited (``gateway.refused``) like every refusal, before it is answered, and marked for
        the ``authorization`` the request came with. The path is kept without its query; every
        field is bounded."""
        decision_id = new_id()
        count_decision("deny", code)
        if self._audit is not None:
            record = {
                "decision_id": decision_id,
                "time": self._clock.now(),
                "door": door,
                "method": method[:16],
                "path": target.split("?", 1)[0][:512],
                "host": host[:256],
                "client": client,
                "status": status,
                "code": code,
                "reason": message[:256],
            }
            try:
                await self._audit.append_async("gateway.refused", record)
            except AegisError as exc:  # refused either way; the missing record is logged
                log_event("gateway.audit_failed", level=logging.ERROR, code=exc.code)
        headers = {"cache-control": "no-store", "x-aegis-decision-id": decision_id}
        if authorization is not None:
            headers[REFUSAL_FIELD] = refusal_mark(authorization)
        return Result(decision_id, "deny", status, code, message, headers)

    async def refuse(self, ctx: CallContext, exc: AegisError) -> Result:
        """A front door's own refusal (oversized or malformed body): evidenced like any other,
        under its own decision span (the audit record carries its trace id)."""
        facts = EvidenceFacts(decision_id=new_id(), time=self._clock.now())
        span = get_tracer().start_span(names.SPAN_GATEWAY_DECIDE)
        attached = otel_context.attach(trace.set_span_in_context(span))
        try:
            started = time.perf_counter()
            result = await self._evidence(ctx, facts, self._refuse(facts, exc))
            self._timed(facts, _EVIDENCE, started)
            if span.is_recording():
                span.set_attributes(facts.span_attributes(result))
        finally:
            otel_context.detach(attached)
            span.end()
        PIPELINE_STEP_SECONDS.record(facts.step_times)
        count_decision(result.action, result.code)
        return result

    async def _decide(self, ctx: CallContext, facts: EvidenceFacts) -> Decision:
        t = time.perf_counter()
        if ctx.route.require_client_cert and ctx.peer is None:  # step 1, for every front door
            why = "this route requires a client certificate (mTLS)"
            # Counted and recorded as every refused certificate is (routes decide whether one
            # is needed, so the certificate step itself lets the call through).
            MTLS_REJECTIONS.labels(listener=ctx.door, code="cert_required").inc()
            await audit_refusal(self._audit.append_async if self._audit is not None else None, {
                "listener": ctx.door, "stage": "peer_certificate", "code": "cert_required",
                "reason": why, "client": ctx.client, "method": ctx.method[:16],
                "path": ctx.path[:512],
            })  # fmt: skip
            raise AegisError(why, code="cert_required")
        refuse_redirecting_fields(ctx.headers, ctx.query)
        creds: Credentials = read_credentials(ctx)
        facts.scheme = creds.scheme
        token = self._verifier.verify(creds.token)
        facts.token = token
        cnf = token.cnf or {}
        jkt, x5t = cnf.get("jkt"), cnf.get(X5T_S256)
        if creds.scheme == "bearer" and jkt is not None:
            raise TokenError("this token is DPoP-bound; use the DPoP scheme", code="invalid_token")
        if creds.scheme == "dpop" and jkt is None:
            raise TokenError(
                "this token is not DPoP-bound; use the Bearer scheme", code="invalid_token"
            )
        if ctx.route.audience is not None and ctx.route.audience not in token.aud:
            raise TokenError("token audience does not include this route", code="invalid_audience")
        t = self._timed(facts, _TOKEN, t)
        proof = None
        if creds.proof is not None:
            proof = self._dpop.verify(
                creds.proof,
                method=ctx.method,
                url=self._htu(ctx),
                access_token=creds.token,
                jkt=jkt if isinstance(jkt, str) else None,
            )
            facts.proof_jti, facts.auth_method = proof.jti, "dpop"
        if x5t is not None:
            check_certificate_binding(token, ctx.peer)  # fails closed without a verified peer
            facts.auth_method = facts.auth_method or "mtls"
        elif ctx.route.require_client_cert and ctx.peer is not None:
            check_peer_is_subject(token, ctx.peer)
        facts.verified = True
        t = self._timed(facts, _BINDING, t)
        # Exactly one single-use proof per call (both when a single-use token is also DPoP-bound).
        if proof is None and not token.single_use and not ctx.route.allow_bearer:
            raise TokenError(
                "this route needs a DPoP proof or a single-use token", code="invalid_token"
            )
        # A revocation store on the network is asked while the replay store is: two round
        # trips overlap instead of adding up. Its answer is taken where the subject check
        # would ask (a replayed proof is still reported first), and never left unread.
        revoked = (
            asyncio.ensure_future(revocation_check(token, self._revocation))
            if self._revocation.remote
            else None
        )
        try:
            return await self._after_binding(ctx, facts, token, proof, revoked, t)
        finally:
            if revoked is not None:
                # Never cancelled mid-command (the client would drop its pooled connection):
                # a call refused before it needed the answer waits for it, and reads it. One
                # that went through has read it already, and takes no further loop pass here.
                if not revoked.done():
                    await asyncio.wait((revoked,))
                if not revoked.cancelled():
                    revoked.exception()

    async def _after_binding(
        self,
        ctx: CallContext,
        facts: EvidenceFacts,
        token: AccessToken,
        proof: DpopProof | None,
        revoked: asyncio.Future[None] | None,
        t: float,
    ) -> Decision:
        try:
            if proof is not None:
                try:
                    await self._dpop.consume(proof)
                except AegisError as exc:
                    facts.proof_replayed = exc.code == "replay_detected"
                    raise
            if token.single_use:
                # A replica accepts the token until exp + leeway on its own clock, so one whose
                # clock lags the replica that recorded the jti accepts it later than exp + leeway
                # on that replica's clock. The second leeway keeps the record through a clock
                # difference between replicas up to the leeway already allowed for token times.
                expires = token.exp + 2 * self._verifier.rules.leeway
                await self._replay.consume(TOKEN_REPLAY_NAMESPACE, token.jti, expires)
        except AegisError as exc:
            facts.jti_seen = exc.code == "replay_detected"
            raise
        facts.jti_seen = False
        t = self._timed(facts, _REPLAY, t)
        agent = await check_subject(token, self._cache, self._revocation, revoked=revoked)
        route = ctx.route
        if (token.tenant, token.env) != (route.tenant, route.env):
            raise TokenError(
                "the token's tenant or environment is not this route's", code="tenant_mismatch"
            )
        t = self._timed(facts, _SUBJECT, t)
        await prefetch_chain_agents(token, self._cache, self._rules)
        chain = verify_chain(
            token, cache=self._cache, rules=self._rules, now=self._clock.now(), tool=route.tool
        )
        facts.chain_validated, facts.chain = True, chain.agents
        t = self._timed(facts, _DELEGATION, t)
        call = PolicyCall(
            tool=route.tool,
            agent=AgentInfo(
                id=agent.id,
                roles=tuple(agent.roles),
                attributes=dict(agent.attributes),
                version=agent.software_version,
                owner=agent.owner,
            ),
            tenant=route.tenant,
            env=route.env,
            time=facts.time,
            method=ctx.method,
            path=ctx.path,
            scopes=token.scopes,
            client_id=token.client_id,
            jti=token.jti,
            auth_method=facts.auth_method or "bearer",
            chain=ChainInfo(
                agents=chain.agents[:-1],
                origin_user=chain.origin_user,
                origin_iss=chain.origin_issuer,
            ),
            body=ctx.body,
            query=ctx.policy_query(),
            headers=ctx.policy_headers(),
        )
        decision = self._policies.decide(
            route.tenant, route.env, route.tool, agent.id, build_input(call),
            body_hidden=ctx.body_hidden, integers_checked=ctx.integers_checked,
            fields=ctx.headers, fields_joined=ctx.fields_joined,
            body_names=ctx.body_names, wrapper=route.wrap_parameters,
        )  # fmt: skip
        facts.decision = decision
        record_shadow(decision, route.metric_tool)
        t = self._timed(facts, _POLICY, t)
        if self._limits is not None:
            await self._limits(ctx, token)
        self._timed(facts, _LIMITS, t)
        if decision.action == "approval_needed" and self._approvals is not None:
            # A call this door cannot enforce once approved is refused before it is held or an
            # override spent on it: the human's approval would be burnt on a refusal. So is one
            # naming another agent's MCP session (read only: an approval holds nothing).
            _enforceable(ctx, decision)
            if route.mcp:
                await self._hold_session(ctx, token, check_only=True)
            decision = await self._approvals(ctx, facts, call)
            facts.decision = decision
        if route.mcp and decision.action in ("allow", "sanitize"):
            # Only a call that goes through holds its session: one refused (by policy, held for
            # an approval, a sanitize this door cannot apply) could otherwise take ids ahead of
            # their owners, or fill the store.
            _enforceable(ctx, decision)
            await self._hold_session(ctx, token)
            # The answer to a tools/list, and the event stream a GET opens (where a server may
            # deliver that answer, on a resumed stream), name tools: cut to those the agent
            # could call, by a door that rewrites answers.
            if ctx.can_sanitize and (lists_tools(ctx.body) or ctx.method == "GET"):
                facts.listed = self._lister(call, route.base_tool or route.tool)
        return decision

    def _lister(self, call: PolicyCall, route: str) -> Callable[[Any], bool]:
        """Whether an answer on MCP route ``route`` (its own tool, whatever tool the call acts
        on) may name a tool: not one whose ``tools/call`` by this agent would be denied whatever
        it sent (judged on the rules' selectors, never their conditions:
        :meth:`CompiledPolicy.could_allow`), nor one whose name the gateway refuses in a call."""
        tenant, env, agent_id = call.tenant, call.env, call.agent.id
        built: list[dict[str, Any]] = []  # the input, built when an answer names a tool

        def listed(name: Any) -> bool:
            if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
                return False
            if not built:
                built.append(build_input(call))
            tool = f"{route}.{name}"
            doc = {**built[0], "tool": tool}
            return self._policies.could_allow(tenant, env, tool, agent_id, doc)

        return listed

    async def _hold_session(
        self, ctx: CallContext, token: AccessToken, *, check_only: bool = False
    ) -> None:
        """An MCP session serves the agent that first used it only: another agent naming its
        ``Mcp-Session-Id`` (read off a log, a proxy, a shared host) is answered as for a session
        that does not exist, and could neither read its stream, answer its server's requests
        nor end it. Each call extends the hold by ``mcp_session_idle``; ``check_only`` refuses
        a session another agent holds and holds nothing.

        A session of the older HTTP+SSE transport (``?session_id=``) is handed out in an event
        of the server's stream, which no door reads: it is held for the first agent whose call
        names it, as at the ext_authz doors."""
        owner = session_holder(token)
        session = session_id(ctx.headers)
        if session is not None:
            # A door that held each session as its initialize answer passed takes no hold on
            # use: an agent naming ids no server handed out would fill the store for a day each.
            await self._hold_one(session, owner, ctx.sees_answers, check_only)
        legacy = legacy_session(ctx.query)
        if legacy is not None:
            await self._hold_one(legacy, owner, False, check_only)

    async def _hold_one(
        self, session: str, owner: str, opened_here: bool, check_only: bool
    ) -> None:
        if check_only:
            held = await self._replay.held_by(SESSION_NAMESPACE, session_key(session))
            mine = held == owner or (held is None and not opened_here)
        else:
            mine = await self.claim_session(session, owner, held=opened_here)
        if not mine:
            raise AegisError(
                "no such MCP session for this agent: initialize a session of its own",
                code="not_found",
            )

    async def claim_session(self, session: str, holder: str, *, held: bool = False) -> bool:
        """Hold MCP session ``session`` for ``holder`` (:func:`session_holder`) another
        ``mcp_session_idle``: False, and nothing changed, while another agent holds it (or,
        ``held``, while nobody does). Raises ``Unavailable`` when the replay store cannot
        answer."""
        expires = self._clock.now() + self._mcp_session_idle
        key, limit = session_key(session), self._mcp_sessions_per_agent
        try:
            return await self._replay.claim(
                SESSION_NAMESPACE, key, holder, expires, held=held, limit=limit
            )
        except HoldLimit:
            raise AegisError(
                f"this agent holds {limit} MCP sessions, the most gateway.mcp_sessions_per_agent "
                "allows: end one (DELETE) or wait until one has been idle for "
                "gateway.mcp_session_idle",
                code="mcp_session_limit",
            ) from None

    async def release_session(self, session: str, holder: str) -> None:
        """Free ``holder``'s hold of MCP session ``session`` (its server ended it)."""
        await self._replay.release(SESSION_NAMESPACE, session_key(session), holder)

    def _enforce(self, ctx: CallContext, facts: EvidenceFacts, decision: Decision) -> Result:
        if decision.action == "approval_needed":
            raise AegisError("this call needs a human approval", code="approval_needed")
        if decision.action not in ("allow", "sanitize"):
            reason = "; ".join(decision.reasons) or "denied by policy"
            code = decision.code if decision.code in ("policy_error", "access_denied") else None
            raise AegisError(reason, code=code or "access_denied")
        body, changed = ctx.body, False
        if decision.action == "sanitize":
            on_body = _enforceable(ctx, decision)
            if on_body and ctx.body is not None:
                # Forwarded as sanitized and re-encoded, never as the bytes received.
                body, changed = apply_to_body(ctx.body, decision.obligations, "request"), True
        token = facts.token
        assert token is not None
        return Result(
            decision_id=facts.decision_id,
            action=decision.action,
            status=200,
            code=None,
            message="allowed",
            upstream_headers={"x-aegis-agent-id": token.agent_id, "x-aegis-tenant": token.tenant},
            obligations=decision.obligations,
            body=body,
            body_changed=changed,
            approved=facts.approval_id is not None,
            session_holder=session_holder(token) if ctx.route.mcp else None,
            listed=facts.listed,
        )

    def _refuse(self, facts: EvidenceFacts, exc: AegisError) -> Result:
        facts.error = exc
        count_refusal(exc)
        action = "approval_needed" if exc.code == "approval_needed" else "deny"
        headers = refusal_headers(
            exc, facts.scheme, self._dpop, proof_replayed=facts.proof_replayed
        )
        result = Result(facts.decision_id, action, exc.status, exc.code, exc.message, headers)
        result.details.update(answer_details(exc))
        return result

    async def _evidence(self, ctx: CallContext, facts: EvidenceFacts, result: Result) -> Result:
        digest = request_digest(ctx.method, ctx.url, ctx.body_digest, attested_fields(ctx))
        attestation: str | None = None
        try:
            attestation = self._attester.sign(
                decision_id=facts.decision_id,
                agent_id=facts.agent_id,
                tool=ctx.route.tool,
                timestamp=facts.time,
                policy_version=facts.policy_version,
                decision=result.action,
                request_digest=digest,
                jti=facts.proof_jti or (facts.token.jti if facts.token else None),
            )
        except Unavailable as exc:  # no signing key: refuse, but still leave an audit record
            log_event("gateway.attestation_failed", level=logging.ERROR, code=exc.code)
            result = self._refuse(facts, exc)
        except Exception as exc:  # a bug: refuse, and still leave an audit record
            log_event("gateway.attestation_failed", level=logging.ERROR, error=type(exc).__name__)
            result = self._refuse(facts, AegisError("internal error", code="server_error"))
        try:
            if self._audit is not None:
                record = audit_record(ctx, facts, result, digest, attestation)
                await self._audit.append_async("gateway.decision", record)
        except Unavailable as exc:
            log_event("gateway.audit_failed", level=logging.ERROR, code=exc.code)
            return _sealed(ctx, facts, self._refuse(facts, exc))
        _sealed(ctx, facts, result)
        if attestation is not None:
            result.headers["x-aegis-attestation"] = attestation
            if result.allowed:
                result.upstream_headers["x-aegis-decision-id"] = facts.decision_id
                result.upstream_headers["x-aegis-attestation"] = attestation
        return result


def attested_fields(ctx: CallContext) -> list[tuple[str, str]]:
    """The request fields an attestation's digest covers: every one the upstream receives (all
    but the credentials, ``Host``, framing, hop-by-hop and proxy fields, and ``x-aegis-*``; the
    gateway's own ``x-forwarded-*`` included), ordered by name (``_`` read as ``-``), repeats in
    arrival order: a field a policy decides on is always one of them."""
    fields = forwardable(ctx.headers, REQUEST_DROP)
    return sorted(fields, key=lambda pair: pair[0].replace("_", "-"))


def _sealed(ctx: CallContext, facts: EvidenceFacts, result: Result) -> Result:
    """``result`` with its decision id and, for every answer but an allow, the gateway's mark."""
    result.headers["x-aegis-decision-id"] = facts.decision_id
    if not result.allowed:
        mark_refusal(result.headers, ctx)
    return result


def mark_refusal(headers: dict[str, str], ctx: CallContext) -> None:
    """Mark an answer the gateway writes itself as the gateway's (:data:`REFUSAL_FIELD`), for
    the credentials the call came with (none: unmarked)."""
    sent = next((v for k, v in ctx.headers if k == "authorization"), None)
    if sent is not None:
        headers[REFUSAL_FIELD] = refusal_mark(sent)

"""The approval service: open requests for held calls, take decisions, expire, redeem overrides.

Contract, for a security reviewer:

* A decision is taken only by a configured approver, authenticated by its channel
  (:mod:`.directory`), who belongs to the request's group and (with ``separation_of_duties``) is
  neither the agent's owner nor the call's origin user. Anything else is refused with its own
  code, audited as ``approval.rejected``, and leaves the request unchanged.
* Only a ``pending`` request can be decided and only before ``expires_at``; every state change is
  a guarded write, so of two racing decisions exactly one wins.
* Nothing opens a way through unrecorded: a request is stored as ``recording`` (neither listed as
  pending nor decidable) until ``approval.requested`` is written, and an approval as
  ``approving`` (no override handed out or redeemed) until ``approval.decided`` is.
* An approval whose override is not yet used can be withdrawn by whoever may decide it
  (:meth:`ApprovalService.withdraw`): the request becomes ``denied`` and redeeming fails.
* Every change is in the audit log (``approval.requested``, ``approval.decided``,
  ``approval.withdrawn``, ``approval.expired``, ``approval.override_used``) with who, when,
  through which channel and why.
* Redeeming an override (:meth:`ApprovalService.redeem`) checks the token, then that it names this
  agent and this exact call, then the request's state, then spends the ``jti`` in the replay store
  and moves the request to ``used``; a second use fails at either guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import unicodedata
from collections.abc import Callable
from typing import Any, Final, NoReturn

import idna

from aegis.approvals.directory import ApproverDirectory, Via
from aegis.approvals.model import (
    UNRECORDED_STATES,
    ApprovalRequest,
    HeldCall,
    State,
    call_digest,
    redact_fields,
    redact_parameters,
)
from aegis.approvals.notifiers import Notifier
from aegis.approvals.override import OVERRIDE_REPLAY_NAMESPACE, OverrideTokens
from aegis.approvals.store import SqlApprovalStore
from aegis.audit.log import AuditLog
from aegis.clock import Clock, new_id
from aegis.config import ApprovalSettings, Approver
from aegis.errors import AegisError, NotFound, ReplayDetected
from aegis.policy.decision import ApprovalRequirement
from aegis.stores.base import ReplayStore
from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import (
    APPROVAL_DECISION_SECONDS,
    APPROVAL_DECISIONS,
    APPROVAL_NOTIFICATIONS,
    APPROVAL_REJECTIONS,
    APPROVAL_REQUESTS,
    APPROVALS_PENDING,
)

__all__ = ["ApprovalService", "party"]


#: Default-ignorable code points outside the format category (Unicode's
#: Default_Ignorable_Code_Point): drawn as nothing, so ``alice`` with one is ``alice``.
_IGNORABLE: Final = frozenset(
    "\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0"
    + "".join(map(chr, range(0x180B, 0x1810)))
    + "".join(map(chr, range(0xFE00, 0xFE10)))
    + "".join(map(chr, range(0xE0100, 0xE01F0)))
    + "\u2065"
    + "".join(map(chr, range(0xFFF0, 0xFFF9)))
    + "".join(map(chr, range(0xE0000, 0xE1000)))
)


def party(name: str) -> str:
    """A person's id as separation of duties compares them: NFKC-normalised (again once what
    follows is dropped, so a letter and its accent meet), without format or control characters
    (a zero-width space, a BEL) or default-ignorable ones, without surrounding spaces or
    trailing dots of any script (however interleaved), the local part case-folded and the domain
    as its IDNA 2008 A-label (UTS 46); so ``Carol@Example.com``, ``carol@example.com`` in
    fullwidth letters, ``carol@example.com .``, ``carol@bücher.example`` and
    ``carol@xn--bcher-kva.example`` are one person each. (Look-alike letters from other scripts
    are not folded: keep owners and approver ids ASCII.)"""
    text = unicodedata.normalize("NFKC", name)
    text = "".join(
        c for c in text if unicodedata.category(c) not in ("Cf", "Cc") and c not in _IGNORABLE
    )
    text = unicodedata.normalize("NFKC", text).translate(_DOTS)
    local, at, domain = _trimmed(text).rpartition("@")
    if not at:
        return _trimmed(text.casefold())
    return _trimmed(f"{local.casefold()}@{_a_label(domain)}")


#: Full stops of other scripts, read as "." (IDNA maps them to one).
_DOTS: Final = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": ".", "\ufe12": "."})


def _trimmed(text: str) -> str:
    """Without surrounding spaces and trailing dots, however interleaved."""
    before = None
    while text != before:
        before, text = text, text.strip().rstrip(".")
    return text


def _a_label(domain: str) -> str:
    """A domain as its IDNA 2008 A-label (UTS 46, non-transitional: ``straße`` stays itself),
    ``xn--`` labels decoded first so both spellings meet; as its IDNA 2003 A-label when IDNA
    2008 refuses it; case-folded and normalised if neither reads it."""
    try:
        return idna.encode(idna.decode(domain, uts46=True), uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        pass
    # A name IDNA 2008 refuses (an emoji, an underscore label) still has one spelling under
    # IDNA 2003, which browsers long used: i❤.ws and xn--i-7iq.ws are one domain.
    folded = unicodedata.normalize("NFKC", domain.casefold())
    try:
        return folded.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return folded


class ApprovalService:
    def __init__(
        self,
        store: SqlApprovalStore,
        *,
        settings: ApprovalSettings,
        overrides: OverrideTokens,
        replay: ReplayStore,
        audit: AuditLog | None,
        clock: Clock,
        status_base_url: str,
        notifiers: dict[str, Notifier] | None = None,
        owns_audit: bool = False,
        owner_of: Callable[[str], str] | None = None,
    ) -> None:
        self.store, self.settings, self.overrides = store, settings, overrides
        self.directory = ApproverDirectory(settings)
        self._replay, self._audit, self._clock = replay, audit, clock
        self._status_base = status_base_url.rstrip("/")
        self._notifiers = notifiers or {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._owns_audit = owns_audit
        #: The registry's owner of an agent (raises NotFound), for separation of duties.
        self._owner_of = owner_of

    def close(self) -> None:
        self.store.close()
        if self._owns_audit and self._audit is not None:
            self._audit.close()

    def status_url(self, approval_id: str) -> str:
        return f"{self._status_base}/approvals/{approval_id}"

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def _record(self, kind: str, record: dict[str, Any]) -> None:
        # A log line per event (identifiers and codes only); the audit record has the details.
        log_event(kind, approval_id=record.get("id"), code=record.get("code"),
                  channel=record.get("channel"))  # fmt: skip
        if self._audit is not None:
            await self._audit.append_async(kind, {"time": self._clock.now(), **record})

    async def _gauge(self) -> None:
        APPROVALS_PENDING.set(await self._run(self.store.count_pending))

    # -- requests ----------------------------------------------------------------------------

    async def hold(self, call: HeldCall, need: ApprovalRequirement) -> ApprovalRequest:
        """The open request for this call: the existing one for its digest, or a new one
        (stored, audited, announced on ``need.channel``)."""
        await self.expire_due()
        now = self._clock.now()
        fresh = ApprovalRequest(
            id=f"apr_{new_id()}", state="recording", tenant=call.tenant, env=call.env,
            agent_id=call.agent_id, agent_owner=call.agent_owner, tool=call.tool,
            method=call.method, path=call.path, digest=call_digest(call),
            parameters=redact_parameters(call.body), rule_ids=call.rule_ids, group=need.group,
            channel=need.channel, created_at=now, expires_at=now + need.expires_in,
            decision_id=call.decision_id, chain=call.chain, origin_user=call.origin_user,
            origin_iss=call.origin_iss,
            policy_version=call.policy_version, reasons=call.reasons,
            query=redact_fields(call.query), headers=redact_fields(call.headers),
            chain_owners=call.chain_owners,
        )  # fmt: skip
        req, created = await self._run(self.store.insert_or_open, fresh)
        if not created:
            return req  # type: ignore[no-any-return]
        view = req.to_dict()
        try:
            await self._record("approval.requested", {k: view[k] for k in (
                "id", "agent_id", "agent_owner", "tool", "tenant", "env", "method", "path",
                "digest", "parameters", "rule_ids", "group", "channel", "expires_at",
                "decision_id", "chain", "origin_user", "origin_iss", "policy_version", "query", "headers",
                "chain_owners")})  # fmt: skip
        except AegisError:
            # A request the audit log does not hold was never shown to an approver (it was
            # stored as ``recording``); closed, the next attempt opens a new one.
            closed = dataclasses.replace(req, state="expired")
            with contextlib.suppress(AegisError):
                await self._run(self.store.transition, closed, "recording")
            raise
        req = dataclasses.replace(req, state="pending")
        if not await self._run(self.store.transition, req, "recording"):
            raise AegisError(
                f"approval request {req.id} was closed while its record was being written; "
                "retry the call",
                code="approvals_unavailable",
            )
        APPROVAL_REQUESTS.labels(rule=req.rule).inc()
        await self._gauge()
        if req.channel not in self._notifiers:  # nothing to send: record it now
            await self._notify(req)
            return req  # type: ignore[no-any-return]
        task = asyncio.get_running_loop().create_task(self._notify(req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return req  # type: ignore[no-any-return]

    async def _notify(self, req: ApprovalRequest) -> None:
        notifier = self._notifiers.get(req.channel)
        try:
            if notifier is None:
                APPROVAL_NOTIFICATIONS.labels(kind="none", outcome="failed").inc()
                done = dataclasses.replace(
                    req, notify_state="no_channel", notify_error=f"no channel {req.channel!r}"
                )
            else:
                d = await notifier.send(req, self.status_url(req.id))
                done = dataclasses.replace(
                    req, notify_state=d.state, notify_attempts=d.attempts, notify_error=d.error
                )
            await self._run(self.store.set_delivery, done)
            await self._record("approval.notified", {"id": req.id, "channel": req.channel,
                               "state": done.notify_state, "attempts": done.notify_attempts,
                               "error": done.notify_error})  # fmt: skip
        except Exception as exc:  # visible in the log and the metric, never raised into nothing
            APPROVAL_NOTIFICATIONS.labels(kind="internal", outcome="failed").inc()
            log_event("approvals.notify_failed", level=logging.ERROR, error=type(exc).__name__)

    async def drain(self) -> None:
        """Wait for notifications in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def get(self, approval_id: str) -> ApprovalRequest:
        await self.expire_due()
        req = await self._run(self.store.get, approval_id)
        if req is None:
            raise AegisError(f"no approval request {approval_id!r}", code="approval_not_found")
        return req  # type: ignore[no-any-return]

    async def list_requests(self, state: State | None = None) -> list[ApprovalRequest]:
        await self.expire_due()
        return await self._run(lambda: self.store.list_requests(state=state))  # type: ignore[no-any-return]

    # -- decisions ---------------------------------------------------------------------------

    async def _reject(
        self, code: str, message: str, approval_id: str | None, claimed: str, via: str
    ) -> NoReturn:
        APPROVAL_REJECTIONS.labels(code=code).inc()
        # Bounded: the id, the claimed identity and the reason may hold the caller's text.
        await self._record("approval.rejected", {
            "id": approval_id[:128] if approval_id else approval_id, "code": code,
            "claimed": claimed[:256], "channel": via, "reason": message[:512],
        })  # fmt: skip
        raise AegisError(message, code=code)

    async def reject_status(self, exc: AegisError, approval_id: str | None) -> NoReturn:
        """Audit and re-raise a refusal at the status URL (the agent's credential, its proof,
        or the request it names)."""
        await self._reject(exc.code, exc.message, approval_id, "status_url", "status")

    async def reject_callback(self, exc: AegisError, via: Via) -> NoReturn:
        """Audit and re-raise a refused callback (bad signature, stale, malformed)."""
        await self._reject(exc.code, exc.message, None, "unauthenticated", via)

    async def _decider(
        self, approval_id: str, via: Via, credential: str
    ) -> tuple[Approver, ApprovalRequest, str]:
        """The approver behind ``credential`` and the request, once that approver may decide it
        (configured, in its groups, not a party to the call); else an audited refusal."""
        who = self.directory.find(via, credential)
        claimed = who.id if who is not None else f"{via}:{credential}"
        await self.expire_due()
        req: ApprovalRequest | None = await self._run(self.store.get, approval_id)
        if req is None:
            await self._reject("approval_not_found", f"no approval request {approval_id!r}",
                               approval_id, claimed, via)  # fmt: skip
        if who is None:
            await self._reject("approver_unknown", "this identity is not a configured approver",
                               req.id, claimed, via)  # fmt: skip
        if who.tenants is not None and req.tenant not in who.tenants:
            await self._reject("approver_not_in_tenant", f"{who.id} does not decide requests "
                               f"of tenant {req.tenant!r}", req.id, who.id, via)  # fmt: skip
        if not self._in_group(who, req):
            await self._reject("approver_not_in_group", f"{who.id} is not in group {req.group!r}",
                               req.id, who.id, via)  # fmt: skip
        if self.settings.separation_of_duties:
            try:
                parties = await self._run(self._parties, req)
            except NotFound as exc:
                await self._reject("self_approval_forbidden", f"separation of duties cannot be "
                                   f"judged: {exc.message}", req.id, who.id, via)  # fmt: skip
            except AegisError as exc:  # the registry cannot answer: refused, and audited
                await self._reject(exc.code, f"separation of duties cannot be judged now: "
                                   f"{exc.message}", req.id, who.id, via)  # fmt: skip
            if party(who.id) in parties:
                await self._reject("self_approval_forbidden", "the owner of the agent or of an "
                                   "agent in its delegation chain, or the call's origin user, "
                                   "cannot decide its own request", req.id, who.id, via)  # fmt: skip
        return who, req, claimed

    async def decide(
        self, approval_id: str, *, via: Via, credential: str, approve: bool, reason: str = ""
    ) -> ApprovalRequest:
        """Approve or deny ``approval_id`` as the approver behind ``credential``."""
        who, req, claimed = await self._decider(approval_id, via, credential)
        if req.state == "recording":
            await self._reject("approval_not_found", f"{req.id} is not on record yet; it can "
                               "be decided once it is listed as pending", req.id, claimed,
                               via)  # fmt: skip
        if req.state != "pending":
            code = "approval_expired" if req.state == "expired" else "approval_decided"
            await self._reject(code, f"the request is already {req.state}", req.id, claimed, via)
        now = self._clock.now()
        if now >= req.expires_at:
            # Expired while the approver was being judged (a slow registry read): the sweep
            # would have closed it, and an approval now would open a fresh override window.
            await self._reject("approval_expired", "the request expired before it was decided",
                               req.id, claimed, via)  # fmt: skip
        state: State = "approved" if approve else "denied"
        override_until = now + self.settings.override_lifetime if approve else None
        done = dataclasses.replace(
            req, state=state, decided_at=now, decided_by=who.id, decided_via=via,
            decision_reason=reason, override_expires_at=override_until,
        )  # fmt: skip
        # An approval is held as ``approving`` until its record is written: no override is
        # handed out or redeemed for a decision the audit log does not hold.
        taken = dataclasses.replace(done, state="approving") if approve else done
        if not await self._run(self.store.transition, taken, "pending"):
            await self._reject("approval_decided", "another decision was taken first",
                               req.id, claimed, via)  # fmt: skip
        try:
            await self._record("approval.decided", {"id": req.id, "decision": state,
                               "approver": who.id, "channel": via, "reason": reason, "at": now,
                               "agent_id": req.agent_id, "tool": req.tool, "digest": req.digest,
                               "rule_ids": list(req.rule_ids), "group": req.group})  # fmt: skip
        except AegisError as exc:
            raise await self._unrecorded(req, taken, exc) from exc
        if approve and not await self._run(self.store.transition, done, "approving"):
            # Closed meanwhile (left ``approving`` past UNRECORDED_AFTER): it did not take effect.
            await self._reject("approval_expired", "the request was closed while its approval "
                               "was being recorded; it did not take effect", req.id, claimed,
                               via)  # fmt: skip
        APPROVAL_DECISIONS.labels(rule=req.rule, outcome=state).inc()
        APPROVAL_DECISION_SECONDS.labels(outcome=state).observe(max(0.0, now - req.created_at))
        await self._gauge()
        return done

    async def _unrecorded(
        self, before: ApprovalRequest, done: ApprovalRequest, exc: AegisError
    ) -> AegisError:
        """The error for a decision the audit log could not take. An approval does not take
        effect unrecorded: the request goes back from ``approving`` to pending (no override was
        handed out meanwhile). A denial, a withdrawal, stands: closing is the safe way to fail,
        and the log line names it."""
        if done.state == "approving":
            try:
                reverted = await self._run(self.store.transition, before, "approving")
            except AegisError:
                reverted = False
            if reverted:
                return AegisError(
                    f"the approval of {before.id} could not be recorded in the audit log "
                    f"({exc.message}) and did not take effect; the request is still pending: "
                    "decide again once the audit log is back",
                    code=exc.code,
                )
            log_event("approvals.unrecorded_approval", level=logging.ERROR,
                      approval_id=before.id, code=exc.code)  # fmt: skip
            return exc
        log_event("approvals.unrecorded_decision", level=logging.ERROR, approval_id=before.id,
                  state=done.state, code=exc.code)  # fmt: skip
        return AegisError(
            f"{before.id} is now {done.state}, but this could not be recorded in the audit log "
            f"({exc.message}); the log line approvals.unrecorded_decision names it",
            code=exc.code,
        )

    async def withdraw(
        self, approval_id: str, *, via: Via, credential: str, reason: str = ""
    ) -> ApprovalRequest:
        """Take back an approval whose override has not been used: the request becomes
        ``denied`` and every override token minted for it stops working (redemption needs the
        request ``approved``). Whoever may decide the request may withdraw it; a pending request
        is denied instead, a closed one cannot change."""
        who, req, claimed = await self._decider(approval_id, via, credential)
        if req.state != "approved":
            code = "approval_expired" if req.state == "expired" else "approval_decided"
            hint = "; deny it instead" if req.state == "pending" else ""
            await self._reject(code, f"only an approved request can be withdrawn; this one is "
                               f"{req.state}{hint}", req.id, claimed, via)  # fmt: skip
        now = self._clock.now()
        done = dataclasses.replace(
            req, state="denied", decided_at=now, decided_by=who.id, decided_via=via,
            decision_reason=reason, override_expires_at=None,
        )  # fmt: skip
        if not await self._run(self.store.transition, done, "approved"):
            await self._reject("approval_decided", "the request changed first (its override "
                               "was used, or it expired)", req.id, claimed, via)  # fmt: skip
        try:
            await self._record("approval.withdrawn", {"id": req.id, "approver": who.id,
                               "approved_by": req.decided_by, "channel": via, "reason": reason,
                               "at": now, "agent_id": req.agent_id, "tool": req.tool,
                               "digest": req.digest})  # fmt: skip
        except AegisError as exc:
            raise await self._unrecorded(req, done, exc) from exc
        APPROVAL_DECISIONS.labels(rule=req.rule, outcome="withdrawn").inc()
        await self._gauge()
        return done

    @staticmethod
    def _in_group(who: Approver, req: ApprovalRequest) -> bool:
        # Several rules may hold one call: the approver must be in every group they name.
        return set(req.group.split(",")) <= set(who.groups)

    def _parties(self, req: ApprovalRequest) -> frozenset[str]:
        """Who may not decide ``req`` (as :func:`party` compares them): the agent's owner, the
        call's origin user, and the owners of the agents in its delegation chain, both as the
        gateway saw them when it held the call and as the registry names them now (a request
        stored before owners were recorded, or an owner changed since). Raises ``NotFound``
        for a chain agent the registry no longer knows."""
        names = {req.agent_owner, req.origin_user or "", *req.chain_owners}
        if self._owner_of is not None:
            names.update(self._owner_of(agent_id) for agent_id in req.chain)
        return frozenset(party(n) for n in names if n)

    # -- expiry ------------------------------------------------------------------------------

    async def expire_due(self) -> int:
        """Close every open request past its time (audited); return how many."""
        now = self._clock.now()
        closed = 0
        for req in await self._run(self.store.due, now):
            done = dataclasses.replace(req, state="expired")
            if not await self._run(self.store.transition, done, req.state):
                continue
            closed += 1
            APPROVAL_DECISIONS.labels(rule=req.rule, outcome="expired").inc()
            if req.state == "pending":
                APPROVAL_DECISION_SECONDS.labels(outcome="expired").observe(now - req.created_at)
            await self._record("approval.expired", {"id": req.id, "from": req.state,
                               "agent_id": req.agent_id, "tool": req.tool})  # fmt: skip
        if closed:
            await self._gauge()
        return closed

    async def sweep_forever(self) -> None:
        """Close requests past their time every ``approvals.sweep_interval`` seconds (the
        control plane runs this), so expiries are audited even when nobody asks."""
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self.expire_due()
            except Exception as exc:  # keep sweeping; the error is logged and retried
                log_event("approvals.sweep_failed", level=logging.ERROR, error=type(exc).__name__)

    # -- overrides ---------------------------------------------------------------------------

    async def redeem(self, call: HeldCall, token: str) -> ApprovalRequest:
        """Spend the override ``token`` on ``call``; raise its own code for every mismatch."""
        now = self._clock.now()
        ov = self.overrides.verify(token, now=now)
        if ov.agent_id != call.agent_id:
            raise AegisError(
                "the override token is another agent's", code="override_agent_mismatch"
            )
        if ov.request_digest != call_digest(call):
            raise AegisError(
                "the override token was approved for a different call (tool or parameters)",
                code="override_digest_mismatch",
            )
        await self.expire_due()
        req: ApprovalRequest | None = await self._run(self.store.get, ov.approval_id)
        if req is None or req.digest != ov.request_digest or req.agent_id != ov.agent_id:
            raise AegisError("the override token names no such approval", code="override_invalid")
        if req.state != "approved":
            code = {"denied": "approval_denied", "expired": "approval_expired",
                    "used": "override_used"}.get(req.state, "override_invalid")  # fmt: skip
            raise AegisError(f"the approval is {req.state}", code=code)
        # Recorded before anything is spent: an audit log that cannot be written refuses the
        # call (503) with the approval still unused, instead of burning it on a refusal.
        await self._record("approval.override_presented", {"id": req.id,
                           "agent_id": call.agent_id, "decision_id": call.decision_id})  # fmt: skip
        try:
            await self._replay.consume(OVERRIDE_REPLAY_NAMESPACE, ov.jti, ov.exp + 60)
        except ReplayDetected:
            raise AegisError("the override token was already used", code="override_used") from None
        if req.override_expires_at is None or self._clock.now() >= req.override_expires_at:
            # Its window closed while the presentation was recorded or the token spent (the
            # last awaits before the approval is used): the approval stays unused.
            raise AegisError(
                "the override token has expired; ask for a new approval", code="override_expired"
            )
        used = dataclasses.replace(req, state="used")
        if not await self._run(self.store.transition, used, "approved"):
            # Another change came first: a use elsewhere, or the approval was withdrawn.
            now_req: ApprovalRequest | None = await self._run(self.store.get, req.id)
            if now_req is not None and now_req.state == "denied":
                raise AegisError("the approval was withdrawn", code="approval_denied")
            raise AegisError("the override token was already used", code="override_used")
        APPROVAL_DECISIONS.labels(rule=req.rule, outcome="used").inc()
        await self._record("approval.override_used", {"id": req.id, "agent_id": call.agent_id,
                           "decision_id": call.decision_id, "digest": req.digest})  # fmt: skip
        return used

    async def status(self, approval_id: str, agent_id: str) -> dict[str, Any]:
        """What the agent polls: the state, and the override token once approved."""
        req = await self.get(approval_id)
        if req.agent_id != agent_id:  # not the caller's: answered as unknown, leaking nothing
            raise AegisError(f"no approval request {approval_id!r}", code="approval_not_found")
        # A change not yet on record has not taken effect.
        shown = "pending" if req.state in UNRECORDED_STATES else req.state
        out: dict[str, Any] = {"approval_id": req.id, "state": shown,
                               "expires_at": int(req.expires_at), "tool": req.tool}  # fmt: skip
        if req.state == "approved":
            out["override_token"] = self.overrides.mint(req)
            out["override_expires_at"] = int(req.override_expires_at or 0)
        if req.state in ("approved", "denied"):
            out["decision_reason"] = req.decision_reason
        return out

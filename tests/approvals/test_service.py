"""The approval service on a real SQLite database: requests, decisions, expiry and redemption,
with every refusal audited and leaving the request as it was."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest

from aegis.approvals import ApprovalService, build_approval_service
from aegis.approvals.model import (
    UNRECORDED_AFTER,
    bound_headers,
    call_digest,
    is_secret_name,
    redact_fields,
    redact_parameters,
)
from aegis.approvals.service import party
from aegis.errors import AegisError, NotFound, Unavailable
from aegis.telemetry.metrics import REGISTRY
from tests.approvals.conftest import FINANCE, Setup, held, make_setup


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels or None) or 0.0


async def _refused(coro: Any) -> str:
    with pytest.raises(AegisError) as info:
        await coro
    return info.value.code


async def test_same_call_while_open_gets_the_same_id(setup: Setup) -> None:
    before = metric("aegis_approval_requests_total", rule="pay-large")
    first = await setup.service.hold(held(), FINANCE)
    again = await setup.service.hold(held(decision_id="dec-2"), FINANCE)
    assert again.id == first.id and first.state == "pending"
    assert first.expires_at == setup.clock.now() + 600
    # Another amount, another query order of the same query, another agent: the first two are
    # different calls, the query order is not.
    other = await setup.service.hold(held(body_digest="sha256:" + "cd" * 32), FINANCE)
    assert other.id != first.id
    reordered = held(query=(("currency", "eur"),))
    assert call_digest(reordered) == call_digest(held())
    assert call_digest(held(agent_id="thief")) != call_digest(held())
    assert metric("aegis_approval_requests_total", rule="pay-large") == before + 2
    assert metric("aegis_approvals_pending") == 2
    (record, _) = setup.audited("approval.requested")
    assert record["id"] == first.id and record["group"] == "finance"
    assert record["parameters"]["password"] == "[redacted]"
    assert record["parameters"]["amount"] == 12000
    # No slack channel is configured here: recorded on the request, never silently dropped.
    stored = await setup.service.get(first.id)
    assert stored.notify_state == "no_channel"


async def test_approve_records_who_when_channel_and_why(setup: Setup) -> None:
    req = await setup.service.hold(held(), FINANCE)
    setup.clock.advance(42)
    before = metric("aegis_approval_decision_seconds_count", outcome="approved")
    done = await setup.service.decide(
        req.id, via="slack", credential="UCAROL", approve=True, reason="invoice checked"
    )
    assert done.state == "approved" and done.decided_by == "carol@example.com"
    assert done.override_expires_at == setup.clock.now() + 120
    assert metric("aegis_approval_decision_seconds_count", outcome="approved") == before + 1
    assert metric("aegis_approval_decisions_total", rule="pay-large", outcome="approved") >= 1
    (record,) = setup.audited("approval.decided")
    assert record["approver"] == "carol@example.com" and record["channel"] == "slack"
    assert record["reason"] == "invoice checked" and record["at"] == setup.clock.now()
    assert record["decision"] == "approved"


@pytest.mark.parametrize(
    ("via", "credential", "code"),
    [
        ("slack", "UNOBODY", "approver_unknown"),
        ("api", "some-key-id", "approver_unknown"),
        ("slack", "UDAVE", "approver_not_in_group"),  # security, not finance
        ("slack", "UOWNER", "self_approval_forbidden"),  # the agent's owner (case-insensitive)
        ("cli", "owner@example.com", "self_approval_forbidden"),
    ],
)
async def test_refused_deciders_leave_the_request_pending(
    setup: Setup, via: Any, credential: str, code: str
) -> None:
    req = await setup.service.hold(held(), FINANCE)
    got = await _refused(setup.service.decide(req.id, via=via, credential=credential, approve=True))
    assert got == code
    assert (await setup.service.get(req.id)).state == "pending"
    (record,) = setup.audited("approval.rejected")
    assert record["code"] == code and record["id"] == req.id and record["channel"] == via


async def test_origin_user_cannot_approve_the_call_made_for_them(setup: Setup) -> None:
    req = await setup.service.hold(held(origin_user="carol@example.com"), FINANCE)
    got = await _refused(setup.service.decide(req.id, via="slack", credential="UCAROL",
                                              approve=True))  # fmt: skip
    assert got == "self_approval_forbidden"


async def test_separation_of_duties_can_be_turned_off(tmp_path: Any) -> None:
    s = make_setup(tmp_path, "  separation_of_duties: false\n")
    req = await s.service.hold(held(), FINANCE)
    done = await s.service.decide(req.id, via="slack", credential="UOWNER", approve=True)
    assert done.state == "approved"
    s.service.close()


async def test_every_group_of_a_multi_rule_hold_is_required(setup: Setup) -> None:
    both = dataclasses.replace(FINANCE, group="finance,security")
    req = await setup.service.hold(held(), both)
    got = await _refused(setup.service.decide(req.id, via="slack", credential="UCAROL",
                                              approve=True))  # fmt: skip
    assert got == "approver_not_in_group"


async def test_unknown_decided_and_expired_requests(setup: Setup) -> None:
    svc = setup.service
    code = await _refused(svc.decide("apr_nope", via="slack", credential="UCAROL", approve=True))
    assert code == "approval_not_found"
    req = await svc.hold(held(), FINANCE)
    await svc.decide(req.id, via="slack", credential="UCAROL", approve=False, reason="no")
    again = await _refused(svc.decide(req.id, via="slack", credential="UCAROL", approve=True))
    assert again == "approval_decided"
    assert (await svc.get(req.id)).state == "denied"
    late = await svc.hold(held(body_digest="sha256:" + "ee" * 32), FINANCE)
    setup.clock.advance(601)
    code = await _refused(svc.decide(late.id, via="slack", credential="UCAROL", approve=True))
    assert code == "approval_expired"
    assert (await svc.get(late.id)).state == "expired"
    expired = setup.audited("approval.expired")
    assert [r["id"] for r in expired] == [late.id]
    codes = [r["code"] for r in setup.audited("approval.rejected")]
    assert codes == ["approval_not_found", "approval_decided", "approval_expired"]


async def test_redeem_once_then_refused(setup: Setup) -> None:
    svc = setup.service
    req = await svc.hold(held(), FINANCE)
    await svc.decide(req.id, via="cli", credential="carol@example.com", approve=True)
    token = (await svc.status(req.id, "payer"))["override_token"]
    used = await svc.redeem(held(decision_id="dec-retry"), token)
    assert used.state == "used"
    assert await _refused(svc.redeem(held(), token)) == "override_used"
    (record,) = setup.audited("approval.override_used")
    assert record["decision_id"] == "dec-retry"
    # The call is free again: asking anew opens a new request.
    assert (await svc.hold(held(), FINANCE)).id != req.id


async def test_override_is_bound_to_agent_and_call(setup: Setup) -> None:
    svc = setup.service
    req = await svc.hold(held(), FINANCE)
    await svc.decide(req.id, via="cli", credential="carol@example.com", approve=True)
    token = (await svc.status(req.id, "payer"))["override_token"]
    assert await _refused(svc.redeem(held(agent_id="thief"), token)) == "override_agent_mismatch"
    changed = held(body_digest="sha256:" + "99" * 32)  # another amount or account
    assert await _refused(svc.redeem(changed, token)) == "override_digest_mismatch"
    assert await _refused(svc.redeem(held(tool="crm"), token)) == "override_digest_mismatch"
    assert await _refused(svc.redeem(held(), "not.a.token")) == "override_invalid"
    # None of those spent it.
    assert (await svc.redeem(held(), token)).state == "used"


async def test_denied_and_expired_approvals_refuse_their_override(setup: Setup) -> None:
    svc = setup.service
    req = await svc.hold(held(), FINANCE)
    approved = await svc.decide(req.id, via="cli", credential="carol@example.com", approve=True)
    token = svc.overrides.mint(approved)
    # A token minted while approved, presented once the request is denied (e.g. a race): refused.
    denied = dataclasses.replace(approved, state="denied")
    assert svc.store.transition(denied, "approved")
    assert await _refused(svc.redeem(held(), token)) == "approval_denied"
    other = await svc.hold(held(body_digest="sha256:" + "77" * 32), FINANCE)
    ok = await svc.decide(other.id, via="cli", credential="carol@example.com", approve=True)
    late_token = svc.overrides.mint(ok)
    setup.clock.advance(121 + setup.config.tokens.leeway)
    call = held(body_digest="sha256:" + "77" * 32)
    assert await _refused(svc.redeem(call, late_token)) == "override_expired"
    assert (await svc.get(other.id)).state == "expired"


async def test_status_is_only_for_the_agent_and_hides_the_token_until_approved(
    setup: Setup,
) -> None:
    svc = setup.service
    req = await svc.hold(held(), FINANCE)
    pending = await svc.status(req.id, "payer")
    assert pending["state"] == "pending" and "override_token" not in pending
    assert await _refused(svc.status(req.id, "thief")) == "approval_not_found"
    assert await _refused(svc.status("apr_missing", "payer")) == "approval_not_found"


async def test_pending_request_survives_a_restart(tmp_path: Any) -> None:
    first = make_setup(tmp_path)
    req = await first.service.hold(held(), FINANCE)
    first.service.close()
    # A new process on the same database: same id for the same call, and it can be decided and
    # redeemed there.
    second = make_setup(tmp_path)
    assert (await second.service.hold(held(), FINANCE)).id == req.id
    await second.service.decide(req.id, via="slack", credential="UCAROL", approve=True)
    token = (await second.service.status(req.id, "payer"))["override_token"]
    assert (await second.service.redeem(held(), token)).state == "used"
    second.service.close()


async def test_sweeper_closes_and_audits_expired_requests(tmp_path: Any) -> None:
    s = make_setup(tmp_path, "  sweep_interval: 0.01\n")
    req = await s.service.hold(held(), FINANCE)
    s.clock.advance(601)
    task = asyncio.create_task(s.service.sweep_forever())
    try:
        # The sweeper moves the request to expired, then appends its audit record: wait for both
        # (a bounded wait; a loaded machine may take more than one sweep interval).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if s.service.store.get(req.id).state == "expired" and s.audited(  # type: ignore[union-attr]
                "approval.expired"
            ):
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert s.service.store.get(req.id).state == "expired"  # type: ignore[union-attr]
    assert [r["id"] for r in s.audited("approval.expired")] == [req.id]
    s.service.close()


@pytest.mark.postgres
async def test_pending_request_survives_a_restart_on_postgres(
    setup: Setup, fresh_pg_url: str
) -> None:
    config = setup.config.model_copy(
        update={"database": setup.config.database.model_copy(update={"url": fresh_pg_url})}
    )

    def service() -> ApprovalService:
        return build_approval_service(
            config, clock=setup.clock, keyring=setup.services.keyring,
            replay=setup.services.replay,
        )  # fmt: skip

    first = service()
    req = await first.hold(held(), FINANCE)
    first.close()
    second = service()
    assert (await second.hold(held(decision_id="again"), FINANCE)).id == req.id
    done = await second.decide(req.id, via="slack", credential="UCAROL", approve=True)
    assert done.state == "approved"
    token = (await second.status(req.id, "payer"))["override_token"]
    assert (await second.redeem(held(), token)).state == "used"
    second.close()


def test_the_digest_binds_what_the_upstream_acts_on_and_what_the_approval_stood_for() -> None:
    base = held(query=(("to", "alice"), ("to", "mallory")), headers=(("x-account", "DE00"),),
                host="pay.example.com", upstream="http://10.0.0.5", approval="finance")  # fmt: skip
    others = [
        dataclasses.replace(base, query=(("to", "mallory"), ("to", "alice"))),  # first `to` read
        dataclasses.replace(base, headers=(("x-account", "XX99"),)),
        dataclasses.replace(base, headers=(("x-account", "DE00"), ("x-destination", "ext"))),
        dataclasses.replace(base, chain=("orchestrator",)),
        dataclasses.replace(base, origin_user="bob@example.com"),
        dataclasses.replace(base, approval="finance,security"),  # policy now needs security too
        dataclasses.replace(base, host="admin.example.com"),
        dataclasses.replace(base, upstream="http://10.0.0.6"),
    ]
    digests = {call_digest(c) for c in others}
    assert len(digests) == len(others) and call_digest(base) not in digests


def test_fields_that_differ_between_two_sendings_of_one_call_are_not_bound() -> None:
    volatile = (
        ("authorization", "DPoP t2"), ("dpop", "p2"), ("x-aegis-override", "o"),
        ("traceparent", "00-ab-cd-01"), ("user-agent", "sdk/2"), ("x-request-id", "r2"),
        ("x-forwarded-for", "10.0.0.9"), ("X_Forwarded_Proto", "https"), ("content-length", "7"),
    )  # fmt: skip
    kept = (("content-type", "application/json"), ("x-account", "DE00"))
    assert bound_headers((*volatile, *kept)) == kept
    tracing = (("b3", "80f198ee-e457b9a8-1"), ("uber-trace-id", "a:b:c:1"), ("sw8", "1-x"),
               ("uberctx-user", "u"), ("ot-tracer-traceid", "t"), ("newrelic", "n"))  # fmt: skip
    assert bound_headers((*tracing, *kept)) == kept


def test_bound_headers_ignore_the_order_of_different_fields_not_of_repeats() -> None:
    """HTTP/2, proxies and Envoy's header map reorder different fields between two sendings of
    one call; the order of one field's repeated values is what an upstream can read."""
    one = (("x-b", "1"), ("x-a", "1"), ("x-a", "2"))
    assert bound_headers(one) == bound_headers((("x-a", "1"), ("x-b", "1"), ("x-a", "2")))
    assert bound_headers(one) != bound_headers((("x-a", "2"), ("x-b", "1"), ("x-a", "1")))
    # One variable to a CGI or WSGI upstream, however spelled: its values keep their order.
    dashed_first = (("x-foo", "a"), ("x-goo", "1"), ("x_foo", "b"))
    assert bound_headers(dashed_first) != bound_headers((("x_foo", "b"), ("x-goo", "1"),
                                                         ("x-foo", "a")))  # fmt: skip


async def test_approvers_see_the_query_and_headers_the_approval_is_bound_to(setup: Setup) -> None:
    call = held(
        query=(("to", "acct-9"), ("api_key", "s3cr3t"), ("memo", "m" * 300)),
        headers=(("x-api-key", "k-1"), ("x-payment-mode", "instant")),
    )
    req = await setup.service.hold(call, FINANCE)
    view = (await setup.service.get(req.id)).to_dict()  # read back from the database
    assert view["query"] == [["to", "acct-9"], ["api_key", "[redacted]"], ["memo", "m" * 256 + "…"]]
    assert view["headers"] == [["x-api-key", "[redacted]"], ["x-payment-mode", "instant"]]
    (record,) = setup.audited("approval.requested")
    assert record["query"] == view["query"] and record["headers"] == view["headers"]
    # What approvers do not see is still bound: another key is another call.
    assert call_digest(held(query=(("to", "acct-9"), ("api_key", "other"), ("memo", "m" * 300)),
                            headers=call.headers)) != call_digest(call)  # fmt: skip


def test_at_most_64_fields_are_shown_and_the_rest_counted() -> None:
    shown = redact_fields(tuple((f"f{i}", str(i)) for i in range(70)))
    assert len(shown) == 65 and shown[-1] == ("…", "6 more")


async def test_the_owner_of_an_agent_in_the_chain_cannot_decide(setup: Setup) -> None:
    """carol owns the orchestrator that delegated this call: she may not approve it either."""
    call = held(chain=("orchestrator",), chain_owners=("Carol@Example.com",))
    req = await setup.service.hold(call, FINANCE)
    assert (await setup.service.get(req.id)).chain_owners == ("Carol@Example.com",)
    got = await _refused(setup.service.decide(req.id, via="slack", credential="UCAROL",
                                              approve=True))  # fmt: skip
    assert got == "self_approval_forbidden"
    assert (await setup.service.get(req.id)).state == "pending"


async def test_an_unused_approval_can_be_withdrawn_and_its_override_then_fails(
    setup: Setup,
) -> None:
    svc = setup.service
    req = await svc.hold(held(), FINANCE)
    # Only an approved request can be withdrawn; a pending one is denied instead.
    assert await _refused(svc.withdraw(req.id, via="cli", credential="carol@example.com")) == (
        "approval_decided"
    )
    await svc.decide(req.id, via="cli", credential="carol@example.com", approve=True)
    token = (await svc.status(req.id, "payer"))["override_token"]
    # Only who may decide it may withdraw it.
    assert await _refused(svc.withdraw(req.id, via="slack", credential="UDAVE")) == (
        "approver_not_in_group"
    )
    assert await _refused(svc.withdraw(req.id, via="slack", credential="UOWNER")) == (
        "self_approval_forbidden"
    )
    done = await svc.withdraw(req.id, via="slack", credential="UCAROL", reason="wrong account")
    assert (done.state, done.decided_by, done.override_expires_at) == (
        "denied",
        "carol@example.com",
        None,
    )
    assert (await svc.status(req.id, "payer"))["state"] == "denied"
    assert await _refused(svc.redeem(held(decision_id="dec-retry"), token)) == "approval_denied"
    (record,) = setup.audited("approval.withdrawn")
    assert record["approver"] == "carol@example.com" and record["reason"] == "wrong account"
    assert record["approved_by"] == "carol@example.com" and record["id"] == req.id


async def test_a_used_override_cannot_be_withdrawn(setup: Setup) -> None:
    svc = setup.service
    req = await svc.hold(held(), FINANCE)
    await svc.decide(req.id, via="cli", credential="carol@example.com", approve=True)
    await svc.redeem(held(), (await svc.status(req.id, "payer"))["override_token"])
    assert await _refused(svc.withdraw(req.id, via="cli", credential="carol@example.com")) == (
        "approval_decided"
    )
    assert (await svc.get(req.id)).state == "used"


def test_one_person_is_one_party_however_the_id_is_spelled() -> None:
    same = {party(n) for n in ("Carol@Example.com", "\uff43\uff41\uff52\uff4f\uff4c@example.com",
                               "carol@example.com\u200b", " carol@example.com. ",
                               "carol@example.com .", "carol@example.com\ufff0",
                               "carol\u034f@example.com")}  # fmt: skip
    assert same == {"carol@example.com"}
    assert party("carol@example.org") != party("carol@example.com")
    # A domain in its Unicode form and in its xn-- form (owners must use the latter) is one,
    # as IDNA 2008 spells it (straße keeps its ß), and a trailing full stop of any script goes.
    assert party("carol@b\u00fccher.example") == party("carol@xn--bcher-kva.example")
    assert party("carol@stra\u00dfe.example") == party("carol@xn--strae-oqa.example")
    assert party("carol@example.com\u3002") == party("carol@example.com")
    # A domain IDNA 2008 refuses (an emoji, an underscore label) is one under IDNA 2003.
    assert party("carol@i\u2764.ws") == party("carol@xn--i-7iq.ws")
    assert party("carol@mail_x.b\u00fccher.example") == party("carol@mail_x.xn--bcher-kva.example")
    # A letter and its accent split by an ignorable meet again.
    assert party("jose\u200b\u0301@example.com") == party("jos\u00e9@example.com")
    assert party("carol@example.org") != party("carol@example.com")


async def test_chain_owners_are_read_from_the_registry_when_deciding(tmp_path: Any) -> None:
    """A request stored without chain owners (before they were recorded, or the owner changed
    since) is still judged on who owns the chain's agents now; an agent the registry no longer
    knows leaves the question open, so the decision is refused."""
    s = make_setup(tmp_path)
    owners = {"orchestrator": "Carol@Example.com"}

    def owner_of(agent_id: str) -> str:
        if agent_id not in owners:
            raise NotFound(f"no agent {agent_id}")
        return owners[agent_id]

    svc = build_approval_service(s.config, clock=s.clock, keyring=s.services.keyring,
                                 replay=s.services.replay, audit=s.audit, owner_of=owner_of)  # fmt: skip
    try:
        req = await svc.hold(held(chain=("orchestrator",)), FINANCE)
        assert req.chain_owners == ()
        got = await _refused(svc.decide(req.id, via="slack", credential="UCAROL", approve=True))
        assert got == "self_approval_forbidden"
        ghost = await svc.hold(held(chain=("ghost",), body_digest="sha256:" + "ef" * 32), FINANCE)
        got = await _refused(svc.decide(ghost.id, via="slack", credential="UCAROL", approve=True))
        assert got == "self_approval_forbidden"
        assert (await svc.get(ghost.id)).state == "pending"
    finally:
        svc.close()
        s.service.close()


async def test_a_request_that_expires_while_its_approver_is_judged_is_not_approved(
    tmp_path: Any,
) -> None:
    """The request must be pending and not expired when it is decided: a registry read that
    takes past its expiry (separation of duties) ends in approval_expired, not in an approval
    with a fresh override window."""
    s = make_setup(tmp_path)

    def slow_owner_of(agent_id: str) -> str:
        s.clock.advance(5)  # the registry answers 5 s later
        return "owner@example.com"

    svc = build_approval_service(s.config, clock=s.clock, keyring=s.services.keyring,
                                 replay=s.services.replay, audit=s.audit,
                                 owner_of=slow_owner_of)  # fmt: skip
    try:
        req = await svc.hold(held(chain=("payer",)), FINANCE)
        s.clock.advance(req.expires_at - s.clock.now() - 1)  # 1 s before the request expires
        got = await _refused(svc.decide(req.id, via="slack", credential="UCAROL", approve=True))
        assert got == "approval_expired"
        assert (await svc.get(req.id)).state in ("pending", "expired")  # the sweep closes it
        assert (await svc.get(req.id)).decided_by is None
    finally:
        svc.close()
        s.service.close()
        s.audit.close()


@pytest.mark.parametrize("slow", ["audit", "replay"])
async def test_an_override_whose_window_closes_while_it_is_recorded_is_refused(
    setup: Setup, slow: str
) -> None:
    """The override's window is judged again after the last await before the approval is used
    (an audit write, or a replay store's spend, that took past it): the approval stays
    unused."""
    svc, clock = setup.service, setup.clock
    call = held()
    req = await svc.hold(call, FINANCE)
    await svc.decide(req.id, via="slack", credential="UCAROL", approve=True)
    token = (await svc.status(req.id, call.agent_id))["override_token"]
    approved = await svc.get(req.id)
    assert approved.override_expires_at is not None
    until = approved.override_expires_at
    record, consume = svc._record, svc._replay.consume

    async def slow_record(kind: str, data: dict[str, Any]) -> None:
        await record(kind, data)
        if kind == "approval.override_presented":
            clock.advance(until - clock.now() + 0.5)

    async def slow_consume(*args: Any, **kw: Any) -> None:
        await consume(*args, **kw)
        clock.advance(until - clock.now() + 0.5)  # the replay store answers late

    clock.advance(until - clock.now() - 1.5)
    if slow == "audit":
        svc._record = slow_record  # type: ignore[method-assign]
    else:
        svc._replay.consume = slow_consume  # type: ignore[method-assign]
    try:
        assert await _refused(svc.redeem(call, token)) == "override_expired"
    finally:
        svc._record, svc._replay.consume = record, consume  # type: ignore[method-assign]
    assert (await svc.get(req.id)).state == "expired"  # closed by its window, never used


async def test_redeeming_a_withdrawn_approval_says_so(setup: Setup) -> None:
    svc = setup.service
    req = await svc.hold(held(), FINANCE)
    await svc.decide(req.id, via="cli", credential="carol@example.com", approve=True)
    token = (await svc.status(req.id, "payer"))["override_token"]
    await svc.withdraw(req.id, via="cli", credential="carol@example.com")
    assert await _refused(svc.redeem(held(), token)) == "approval_denied"


@pytest.mark.parametrize(
    ("name", "secret"),
    [("sig", True), ("X-Goog-IAP-JWT-Assertion", True), ("client_assertion", True),
     ("X-Shopify-Hmac-Sha256", True), ("pwd", True), ("SAMLResponse", True), ("api_key", True),
     ("sessionId", True), ("X-Api-Key", True), ("card_number", True), ("author", False),
     ("discard", False), ("keyword", False), ("amount", False), ("to", False),
     ("passphrase", True), ("passcode", True), ("pincode", True), ("cvc", True),
     ("accesskey", True), ("X-Authentication", True), ("seed_phrase", True), ("mnemonic", True),
     ("seedPhrase", True), ("author_name", False), ("phrase", False)],
)  # fmt: skip
def test_secret_looking_names_are_redacted_and_others_shown(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret
    shown = redact_parameters({name: "v"})[name]
    assert (shown == "[redacted]") is secret
    assert (redact_fields(((name, "v"),))[0][1] == "[redacted]") is secret


def test_a_long_list_is_shown_with_how_many_items_were_left_out() -> None:
    shown = redact_parameters({"transfers": [1] * 100 + [900_000]})["transfers"]
    assert shown[:100] == [1] * 100 and shown[100] == "… 1 more items not shown"


async def test_a_registry_that_cannot_answer_refuses_the_decision_and_says_so(
    tmp_path: Any,
) -> None:
    s = make_setup(tmp_path)

    def owner_of(agent_id: str) -> str:
        raise Unavailable("the registry store cannot answer", code="registry_unavailable")

    svc = build_approval_service(s.config, clock=s.clock, keyring=s.services.keyring,
                                 replay=s.services.replay, audit=s.audit, owner_of=owner_of)  # fmt: skip
    try:
        req = await svc.hold(held(chain=("orchestrator",)), FINANCE)
        got = await _refused(svc.decide(req.id, via="slack", credential="UCAROL", approve=True))
        assert got == "registry_unavailable"
        assert (await svc.get(req.id)).state == "pending"
        (record,) = s.audited("approval.rejected")
        assert record["code"] == "registry_unavailable" and record["id"] == req.id
    finally:
        svc.close()
        s.service.close()


class _AuditDown:
    """The audit log refusing every append while in use (as a full disk or a lost database)."""

    def __init__(self, setup: Setup) -> None:
        self._audit, self._real = setup.audit, setup.audit.append_async

    def __enter__(self) -> None:
        async def down(kind: str, record: dict[str, Any]) -> tuple[int, str]:
            raise Unavailable("the audit log cannot be written", code="audit_unavailable")

        self._audit.append_async = down  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        self._audit.append_async = self._real  # type: ignore[method-assign]


async def test_an_approval_the_audit_log_cannot_take_does_not_take_effect(setup: Setup) -> None:
    svc = setup.service
    req = await svc.hold(held(), FINANCE)
    with _AuditDown(setup), pytest.raises(AegisError) as info:
        await svc.decide(req.id, via="slack", credential="UCAROL", approve=True)
    assert info.value.code == "audit_unavailable" and "did not take effect" in info.value.message
    assert (await svc.get(req.id)).state == "pending"
    assert "override_token" not in await svc.status(req.id, "payer")
    assert setup.audited("approval.decided") == []
    # Once the log is back the approver decides again, recorded, and only then it counts.
    await svc.decide(req.id, via="slack", credential="UCAROL", approve=True)
    assert [r["decision"] for r in setup.audited("approval.decided")] == ["approved"]
    assert "override_token" in await svc.status(req.id, "payer")


async def test_a_denial_or_withdrawal_the_audit_log_cannot_take_still_closes(setup: Setup) -> None:
    """Closing is the safe way to fail: the state stands and the error says so."""
    svc = setup.service
    denied = await svc.hold(held(), FINANCE)
    with _AuditDown(setup), pytest.raises(AegisError) as info:
        await svc.decide(denied.id, via="slack", credential="UCAROL", approve=False)
    assert info.value.code == "audit_unavailable" and "is now denied" in info.value.message
    assert (await svc.get(denied.id)).state == "denied"
    approved = await svc.hold(held(body_digest="sha256:" + "cd" * 32), FINANCE)
    await svc.decide(approved.id, via="slack", credential="UCAROL", approve=True)
    with _AuditDown(setup), pytest.raises(AegisError):
        await svc.withdraw(approved.id, via="slack", credential="UCAROL")
    assert (await svc.get(approved.id)).state == "denied"


async def test_a_request_the_audit_log_cannot_take_is_not_left_open(setup: Setup) -> None:
    svc = setup.service
    with _AuditDown(setup), pytest.raises(AegisError):
        await svc.hold(held(), FINANCE)
    assert [r.state for r in await svc.list_requests()] == ["expired"]
    again = await svc.hold(held(), FINANCE)  # the retried call opens a new, recorded one
    assert again.state == "pending"
    assert [r["id"] for r in setup.audited("approval.requested")] == [again.id]


async def test_an_approver_scoped_to_tenants_decides_only_theirs(tmp_path: Any) -> None:
    """Group names are one namespace across tenants: ``tenants`` keeps an approver of group
    finance to the tenants they serve; one without it decides every tenant's."""
    s = make_setup(tmp_path, "    - {id: erin@example.com, groups: [finance], "
                             "slack_user: UERIN, tenants: [acme]}\n")  # fmt: skip
    try:
        acme = await s.service.hold(held(tenant="acme"), FINANCE)
        globex = await s.service.hold(held(tenant="globex"), FINANCE)
        got = await _refused(
            s.service.decide(globex.id, via="slack", credential="UERIN", approve=True)
        )
        assert got == "approver_not_in_tenant"
        assert (await s.service.get(globex.id)).state == "pending"
        assert [r["code"] for r in s.audited("approval.rejected")] == ["approver_not_in_tenant"]
        await s.service.decide(acme.id, via="slack", credential="UERIN", approve=True)
        await s.service.decide(globex.id, via="slack", credential="UCAROL", approve=True)
        assert {(await s.service.get(r.id)).state for r in (acme, globex)} == {"approved"}
    finally:
        s.service.close()
        s.audit.close()


class _AuditHangs:
    """The audit log holding the appends of one kind until ``release`` (a batch waiting on a
    slow database), then failing them or (``writes``) writing them; every other kind is
    written at once."""

    def __init__(self, setup: Setup, kind: str, *, writes: bool = False) -> None:
        self._audit, self._real = setup.audit, setup.audit.append_async
        self.kind, self.writes = kind, writes
        self.in_flight, self.release = asyncio.Event(), asyncio.Event()

    def __enter__(self) -> _AuditHangs:
        async def hanging(kind: str, record: dict[str, Any]) -> tuple[int, str]:
            if kind == self.kind:
                self.in_flight.set()
                await self.release.wait()
                if not self.writes:
                    raise Unavailable("the audit log cannot be written", code="audit_unavailable")
            return await self._real(kind, record)

        self._audit.append_async = hanging  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self._audit.append_async = self._real  # type: ignore[method-assign]


@pytest.mark.parametrize("writes", [False, True])
async def test_an_approval_hands_out_no_override_until_it_is_on_record(
    setup: Setup, writes: bool
) -> None:
    svc = setup.service
    req = await svc.hold(held(), FINANCE)
    with _AuditHangs(setup, "approval.decided", writes=writes) as audit:
        deciding = asyncio.create_task(
            svc.decide(req.id, via="slack", credential="UCAROL", approve=True)
        )
        await audit.in_flight.wait()
        # Meanwhile the agent polls its status URL: nothing to redeem yet.
        status = await svc.status(req.id, "payer")
        assert status["state"] == "pending" and "override_token" not in status
        assert (await svc.get(req.id)).state == "approving"
        # Nor can a second approver take another decision.
        assert (
            await _refused(svc.decide(req.id, via="slack", credential="UCAROL", approve=False))
            == "approval_decided"
        )
        audit.release.set()
        if writes:
            await deciding
        else:
            with pytest.raises(AegisError) as info:
                await deciding
            assert "did not take effect" in info.value.message
    if writes:
        token = (await svc.status(req.id, "payer"))["override_token"]
        assert (await svc.redeem(held(decision_id="dec-retry"), token)).state == "used"
        assert [r["decision"] for r in setup.audited("approval.decided")] == ["approved"]
    else:
        assert (await svc.get(req.id)).state == "pending"
        assert setup.audited("approval.decided") == []


@pytest.mark.parametrize("writes", [False, True])
async def test_a_request_is_neither_listed_nor_decided_until_it_is_on_record(
    setup: Setup, writes: bool
) -> None:
    svc = setup.service
    with _AuditHangs(setup, "approval.requested", writes=writes) as audit:
        holding = asyncio.create_task(svc.hold(held(), FINANCE))
        await audit.in_flight.wait()
        assert await svc.list_requests("pending") == []
        [stored] = await svc.list_requests()
        assert stored.state == "recording"
        assert (
            await _refused(
                svc.decide(stored.id, via="cli", credential="carol@example.com", approve=True)
            )
            == "approval_not_found"
        )
        # The same call asked again meanwhile is the same request, not yet decidable.
        assert (await svc.hold(held(), FINANCE)).id == stored.id
        audit.release.set()
        if writes:
            assert (await holding).state == "pending"
        else:
            with pytest.raises(AegisError):
                await holding
    assert (await svc.get(stored.id)).state == ("pending" if writes else "expired")
    assert [r["id"] for r in setup.audited("approval.requested")] == ([stored.id] if writes else [])


@pytest.mark.parametrize("state", ["recording", "approving"])
async def test_a_change_a_stopped_process_left_unrecorded_is_closed(
    setup: Setup, state: str
) -> None:
    svc = setup.service
    req = await svc.hold(held(), FINANCE)
    now = setup.clock.now()
    left = dataclasses.replace(req, state=state, decided_at=now if state == "approving" else None)
    assert svc.store.transition(left, "pending")
    setup.clock.advance(UNRECORDED_AFTER - 1)
    assert await svc.expire_due() == 0
    setup.clock.advance(1)
    assert await svc.expire_due() == 1
    assert (await svc.get(req.id)).state == "expired"
    [closed] = setup.audited("approval.expired")
    assert closed["from"] == state
    assert (await svc.hold(held(), FINANCE)).id != req.id  # the call can be asked again

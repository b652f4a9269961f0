"""The reference scenario (examples/policies/payments.yaml) at its edges, decided by the in-process
evaluator and by regorus on the generated bundle: the 5,000 limit, the account pattern, the
08:00-18:00 Europe/London weekday window (start inclusive, end exclusive, across daylight saving),
CRM responses masked, and finance tools only under an orchestrator parent."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from aegis.policy import apply_to_body, apply_to_headers, compile_policy, load_file
from aegis.policy.decision import Decision
from aegis.policy.input import build_input, call_from_dict
from aegis.policy.obligations import EMAIL_MASK
from tests.policy.conftest import REPO
from tests.policy.regorus_engine import RegoEngine, normalise

POLICY = compile_policy(load_file(REPO / "examples" / "policies" / "payments.yaml"))
ENGINE = RegoEngine(POLICY)
LONDON = ZoneInfo("Europe/London")


def _at(y: int, mo: int, d: int, h: int, mi: int = 0, s: int = 0) -> int:
    return int(datetime(y, mo, d, h, mi, s, tzinfo=LONDON).timestamp())


WED_10 = _at(2025, 1, 15, 10)


def decide(**call: Any) -> Decision:
    """The evaluator's decision, after checking that regorus gives exactly the same one."""
    doc = build_input(call_from_dict({"time": WED_10, **call}))
    ours = POLICY.evaluate(doc)
    assert normalise(ours.to_dict()) == normalise(ENGINE.evaluate(doc)), call
    return ours


def pay(amount: Any, account: Any = "GB1234567890", **call: Any) -> Decision:
    body = {"amount": amount, "account": account}
    return decide(tool="payments.transfer", scopes=["payments:write"], body=body, **call)


@pytest.mark.parametrize(
    ("amount", "action"),
    [(0.01, "allow"), (1, "allow"), (4999.99, "allow"), (5000, "allow"), (5000.0, "allow"),
     (5000.001, "approval_needed"), (5001, "approval_needed"), (10**9, "approval_needed"),
     (0, "deny"), (-1, "deny")],
)  # fmt: skip
def test_the_5000_limit(amount: float, action: str) -> None:
    decision = pay(amount)
    assert decision.action == action
    if action == "approval_needed":
        (approval,) = decision.approvals
        assert (approval.group, approval.channel) == ("finance-approvers", "slack")
        assert approval.expires_in == 3600


@pytest.mark.parametrize("amount", ["10", True, None, [10], {"v": 10}])
def test_an_amount_that_is_not_a_number_never_allows(amount: Any) -> None:
    assert pay(amount).action == "deny"


@pytest.mark.parametrize("account", ["GB1234567890", "DE0000000000", "ZZ9999999999"])
def test_accounts_of_the_expected_form(account: str) -> None:
    assert pay(100, account).action == "allow"


@pytest.mark.parametrize(
    "account",
    ["gb1234567890", "GB123456789", "GB12345678901", "G1234567890", "GBR1234567890",
     "GB1234567890\n", " GB1234567890", "GB 1234567890", "GB123456789O", "\uff27\uff221234567890",
     "GB" + "".join(chr(0x660 + (i + 1) % 10) for i in range(10)), "", None, 1234567890],
)  # fmt: skip
def test_accounts_of_any_other_form_are_denied(account: Any) -> None:
    decision = pay(100, account)
    assert decision.action == "deny"


@pytest.mark.parametrize(
    ("when", "action"),
    [
        (_at(2025, 1, 15, 7, 59, 59), "deny"),  # Wednesday, winter (GMT)
        (_at(2025, 1, 15, 8, 0, 0), "allow"),  # start is inclusive
        (_at(2025, 1, 15, 17, 59, 59), "allow"),
        (_at(2025, 1, 15, 18, 0, 0), "deny"),  # end is exclusive
        (_at(2025, 7, 16, 7, 59, 59), "deny"),  # summer (BST): 06:59:59 UTC
        (_at(2025, 7, 16, 8, 0, 0), "allow"),  # 07:00 UTC
        (_at(2025, 7, 16, 17, 59, 59), "allow"),
        (_at(2025, 7, 16, 18, 0, 0), "deny"),  # 17:00 UTC
        (_at(2025, 1, 13, 9), "allow"),  # Monday
        (_at(2025, 1, 17, 17), "allow"),  # Friday
        (_at(2025, 1, 18, 12), "deny"),  # Saturday
        (_at(2025, 1, 19, 12), "deny"),  # Sunday
        (_at(2025, 3, 31, 8, 30), "allow"),  # the Monday after clocks went forward
        (_at(2025, 10, 27, 17, 30), "allow"),  # the Monday after clocks went back
    ],
)
def test_the_london_weekday_window(when: int, action: str) -> None:
    decision = pay(100, time=when)
    assert decision.action == action
    if action == "deny":
        assert decision.rule_ids == ("payments-deny-outside-hours",)


def test_a_large_payment_outside_hours_is_denied_not_queued_for_approval() -> None:
    decision = pay(9000, time=_at(2025, 1, 18, 12))
    assert decision.action == "deny"  # deny outranks approval_needed


def test_crm_responses_leave_with_emails_and_card_numbers_masked() -> None:
    decision = decide(tool="crm.contacts.get")
    assert decision.action == "sanitize"
    response = {
        "contacts": [
            {"name": "Alice", "email": "alice@example.com", "card": "4111 1111 1111 1111"},
            {
                "name": "Bob",
                "note": "mail bob.smith+x@mail.example.co.uk, card 5500-0000-0000-0004",
            },
        ],
        "count": 2,
    }
    masked = apply_to_body(response, decision.obligations, "response")
    text = repr(masked)
    for secret in ("alice@example.com", "bob.smith+x@mail.example.co.uk", "4111 1111", "5500-0000"):
        assert secret not in text
    assert masked["contacts"][0]["email"] == EMAIL_MASK
    assert masked["contacts"][0]["card"].endswith("1111")
    assert masked["contacts"][1]["name"] == "Bob" and masked["count"] == 2
    # The obligations are for the response only: the request goes through unchanged.
    request = {"query": "alice@example.com"}
    assert apply_to_body(request, decision.obligations, "request") == request
    headers = {"x-contact": "alice@example.com"}
    assert apply_to_headers(headers, decision.obligations, "response") == {"x-contact": EMAIL_MASK}


@pytest.mark.parametrize(
    ("chain", "action"),
    [
        ({"agents": ["orchestrator"]}, "allow"),
        ({"agents": ["planner", "orchestrator"]}, "allow"),  # the parent is the last link
        ({"agents": ["orchestrator", "helper"]}, "deny"),
        ({"agents": ["Orchestrator"]}, "deny"),
        ({"agents": ["orchestrator-2"]}, "deny"),
        ({"agents": []}, "deny"),
        (None, "deny"),
    ],
)
def test_finance_tools_only_under_an_orchestrator_parent(chain: Any, action: str) -> None:
    call: dict[str, Any] = {"tool": "finance.ledger.read"}
    if chain is not None:
        call["chain"] = chain
    assert decide(**call).action == action


def test_tools_outside_the_scenario_are_denied_by_default() -> None:
    for tool in ("shell.exec", "payments", "crm", "finance", "paymentsXtransfer"):
        decision = decide(tool=tool)
        assert decision.action == "deny", tool

"""Dry runs explain every rule and change nothing."""

from __future__ import annotations

import pytest

from aegis.policy.dryrun import dry_run
from aegis.policy.store import MemoryPolicyStore
from tests.policy.conftest import corpus_policy

CALL = {
    "tool": "payments.transfer",
    "scopes": ["payments:write"],
    "body": {"amount": 9000, "account": "bad"},
    "time": 1736935200,
}


def test_trace_says_why_each_rule_matched_or_not() -> None:
    result = dry_run(corpus_policy("payments"), CALL)
    assert result["decision"]["action"] == "deny"
    trace = {t["id"]: t for t in result["trace"]}
    assert trace["payments-deny-bad-account"]["matched"]
    assert trace["payments-approve-large"]["matched"]
    assert trace["payments-allow-small"]["why"] == "condition 'when' is false"
    assert trace["crm-sanitize-responses"]["why"] == "tool selector does not match"
    assert trace["payments-deny-bad-account"]["when"]["children"][0]["result"] == "fail"
    assert result["input"]["request"]["body"]["amount"] == 9000


def test_trace_reports_rule_errors() -> None:
    result = dry_run(corpus_policy("payments"), {**CALL, "body": {"amount": "9000"}})
    trace = {t["id"]: t for t in result["trace"]}
    assert trace["payments-allow-small"]["errors"]
    assert trace["payments-allow-small"]["why"].startswith("rule error: policy_error")
    assert result["decision"]["code"] == "policy_error"


def test_dry_run_by_stored_version_and_nothing_changes() -> None:
    policy = corpus_policy("payments")
    store = MemoryPolicyStore()
    version = store.put(policy.document, now=1.0)
    result = dry_run(version, CALL, store=store)
    assert result["policy_version"] == version == policy.version
    assert store.active("default", "prod") is None
    with pytest.raises(ValueError, match="needs a store"):
        dry_run(version, CALL)


REFUNDS_CLOSED = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: refunds-closed}
spec:
  rules:
    - {id: pay, action: allow, match: {tools: [payments]}}
    - {id: no-refund, action: deny, match: {tools: [payments]},
       when: {path: path_loose, eq: /payments/refund}}
"""


@pytest.mark.parametrize("path", ["/payments/refund.json", "/payments/refund/", "/Payments/Refund"])
def test_a_dry_run_decides_each_reading_of_the_path_as_the_gateway_does(path: str) -> None:
    """Rails serves ``/payments/refund.json`` as ``/payments/refund``: the gateway denies it,
    and the dry run, which promises the gateway's decision, must not answer allow."""
    from aegis.clock import FrozenClock
    from aegis.gateway.policies import PolicyDirectory
    from aegis.policy.input import build_input, call_from_dict
    from aegis.policy.loader import load_document

    store = MemoryPolicyStore()
    version = store.put(load_document(REFUNDS_CLOSED), now=0)
    store.activate("acme", "prod", version, actor="t", now=0)
    call = {"tool": "payments", "method": "POST", "path": path}
    gateway = PolicyDirectory(store, clock=FrozenClock(0), interval=1).decide(
        "acme", "prod", "payments", "a", build_input(call_from_dict(call))
    )
    result = dry_run(version, call, store=store)
    assert result["decision"]["action"] == gateway.action == "deny"
    assert result["decision"]["reasons"] == list(gateway.reasons)
    assert (
        dry_run(version, {**call, "path": "/payments/charge.json"}, store=store)["decision"][
            "action"
        ]
        == "allow"
    )

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

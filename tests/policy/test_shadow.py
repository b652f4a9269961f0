"""Shadow mode: the would-deny counter and the report over a decision log."""

from __future__ import annotations

import json

import pytest

from aegis.errors import InvalidRequest
from aegis.policy.input import build_input, call_from_dict
from aegis.policy.shadow import (
    SHADOW_WOULD_DENY_TOTAL,
    decision_record,
    record_shadow,
    shadow_report,
)
from aegis.telemetry.metrics import REGISTRY
from tests.policy.conftest import corpus_policy


def _sample(rule: str, tool: str) -> float:
    return REGISTRY.get_sample_value(SHADOW_WOULD_DENY_TOTAL, {"rule": rule, "tool": tool}) or 0.0


def _decide(name: str, call: dict[str, object]) -> tuple[dict[str, object], object]:
    doc = build_input(call_from_dict(call))
    return doc, corpus_policy(name).evaluate(doc)


def test_would_deny_is_counted_per_rule_and_tool() -> None:
    before = _sample("shadow-external-recipients", "email.send")
    _, decision = _decide("shadow_rules", {"tool": "email.send", "body": {"to": "x@evil.test"}})
    assert decision.action == "allow"  # type: ignore[attr-defined]
    assert record_shadow(decision, "email.send") == 1  # type: ignore[arg-type]
    assert _sample("shadow-external-recipients", "email.send") == before + 1


def test_agreeing_shadow_is_not_counted() -> None:
    _, decision = _decide("shadow_rules", {"tool": "email.send", "body": {"to": "a@example.com"}})
    assert record_shadow(decision, "email.send") == 0  # type: ignore[arg-type]


def test_report_summarises_by_rule_agent_and_tool_within_the_window() -> None:
    lines = []
    calls = [
        (100, "a1", {"to": "x@evil.test"}),
        (200, "a2", {"to": "y@evil.test", "size": 2_000_000}),
        (300, "a1", {"to": "ok@example.com"}),
        (900, "a1", {"to": "late@evil.test"}),
    ]
    for when, agent, body in calls:
        doc, decision = _decide(
            "shadow_rules",
            {"tool": "email.send", "agent": {"id": agent}, "body": body, "time": when},
        )
        lines.append(json.dumps(decision_record(doc, decision)))  # type: ignore[arg-type]
    report = shadow_report([*lines, ""], since=0, until=500)
    assert report["decisions"] == 3
    assert report["would_deny"] == 2
    assert report["by_rule"] == {"shadow-external-recipients": 2}
    assert report["by_agent"] == {"a1": 1, "a2": 1}
    assert report["by_tool"] == {"email.send": 2}


def test_report_refuses_lines_that_are_not_decisions() -> None:
    with pytest.raises(InvalidRequest, match="line 1"):
        shadow_report(['{"time": 1}'])


@pytest.mark.parametrize(
    "line",
    [
        '{"time": 1, "decision": {"action": "allow", "shadow": "deny"}}',
        '{"time": 1, "decision": {"action": "allow", "shadow": {"action": "deny", "rule_ids": 5}}}',
        '{"time": 1, "decision": {"action": "allow", "shadow": {"action": "deny", '
        '"rule_ids": [{}]}}}',
        '{"time": 1, "decision": {"action": [], "shadow": {"action": "deny"}}}',
        '{"time": 1, "decision": {"action": "allow", "shadow": {"action": 1}}}',
        '{"time": 1, "decision": "allow"}',
        "[1, 2]",
    ],
)
def test_a_record_of_the_wrong_shape_is_named_not_a_traceback(line: str) -> None:
    """``aegis policy shadow-report`` printed a traceback (AttributeError, TypeError) for a
    record whose members had the wrong types, instead of naming the line."""
    good = '{"time": 1, "decision": {"action": "allow"}}'
    with pytest.raises(InvalidRequest, match="line 2 is not a decision record"):
        shadow_report([good, line])

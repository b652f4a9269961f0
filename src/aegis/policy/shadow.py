"""Shadow mode: count would-be denials and summarise them from the decision log.

A rule (or a whole policy) in shadow mode is evaluated on every call but never enforced; the
decision carries the would-be outcome in ``shadow``. :func:`record_shadow` counts would-be denials
in ``aegis_shadow_would_deny_total{rule, tool}``; :func:`shadow_report` reads a JSON Lines file of
decision records (one :func:`decision_record` per line, format in ``docs/policy.md``) and
summarises would-deny events by rule, agent and tool over a time window.
"""

from __future__ import annotations

import json
from collections import Counter as Tally
from collections.abc import Iterable
from typing import Any, Final

from prometheus_client import Counter

from aegis.errors import InvalidRequest
from aegis.policy.decision import Decision
from aegis.telemetry.metrics import REGISTRY

__all__ = [
    "LABEL_RULE",
    "LABEL_TOOL",
    "SHADOW_WOULD_DENY",
    "SHADOW_WOULD_DENY_TOTAL",
    "decision_record",
    "is_would_deny",
    "record_shadow",
    "shadow_report",
]

SHADOW_WOULD_DENY_TOTAL: Final = "aegis_shadow_would_deny_total"
LABEL_RULE: Final = "rule"
LABEL_TOOL: Final = "tool"
_WOULD_DENY: Final = frozenset({"deny", "approval_needed"})

SHADOW_WOULD_DENY: Final = Counter(
    SHADOW_WOULD_DENY_TOTAL.removesuffix("_total"),
    "Calls that shadow rules would have denied (or held for approval) while they were allowed.",
    [LABEL_RULE, LABEL_TOOL],
    registry=REGISTRY,
)


def is_would_deny(enforced_action: str, shadow: dict[str, Any] | None) -> bool:
    """A shadow outcome that would have stopped a call the enforcing decision let through."""
    return (
        shadow is not None
        and shadow.get("action") in _WOULD_DENY
        and enforced_action not in _WOULD_DENY
    )


def record_shadow(decision: Decision, tool: str, counter: Counter = SHADOW_WOULD_DENY) -> int:
    """Count a would-be denial once per deciding rule; return how many samples were added."""
    shadow = decision.shadow
    if shadow is None or not is_would_deny(decision.action, shadow.to_dict()):
        return 0
    rules = shadow.rule_ids or ("<default-deny>",)
    for rule in rules:
        counter.labels(rule, tool).inc()
    return len(rules)


def decision_record(doc: dict[str, Any], decision: Decision) -> dict[str, Any]:
    """One line of the decision log: when, who, which tool, and the full decision."""
    agent = doc.get("agent") or {}
    return {
        "time": (doc.get("time") or {}).get("unix"),
        "tenant": doc.get("tenant"),
        "env": doc.get("env"),
        "tool": doc.get("tool"),
        "agent": agent.get("id"),
        "decision": decision.to_dict(),
    }


def _is_outcome(shadow: object) -> bool:
    """A record's ``shadow``: none, or an object with a string action and a list of rule ids."""
    if shadow is None:
        return True
    if not isinstance(shadow, dict) or not isinstance(shadow.get("action"), str):
        return False
    rules = shadow.get("rule_ids")
    return rules is None or (isinstance(rules, list) and all(isinstance(r, str) for r in rules))


def shadow_report(
    lines: Iterable[str], *, since: float | None = None, until: float | None = None
) -> dict[str, Any]:
    """Summarise would-deny events in ``[since, until)`` by rule, agent and tool."""
    by_rule: Tally[str] = Tally()
    by_agent: Tally[str] = Tally()
    by_tool: Tally[str] = Tally()
    events = total = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            when = float(record["time"])
            decision = record["decision"]
            action = decision["action"]
            shadow = decision.get("shadow")
            if not isinstance(action, str) or not _is_outcome(shadow):
                raise TypeError("not a decision")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise InvalidRequest(
                f"decision log line {number} is not a decision record; see docs/policy.md"
            ) from exc
        if (since is not None and when < since) or (until is not None and when >= until):
            continue
        total += 1
        if not is_would_deny(action, shadow):
            continue
        events += 1
        for rule in shadow.get("rule_ids") or ["<default-deny>"]:
            by_rule[str(rule)] += 1
        by_agent[str(record.get("agent"))] += 1
        by_tool[str(record.get("tool"))] += 1
    return {
        "window": {"since": since, "until": until},
        "decisions": total,
        "would_deny": events,
        "by_rule": dict(by_rule.most_common()),
        "by_agent": dict(by_agent.most_common()),
        "by_tool": dict(by_tool.most_common()),
    }

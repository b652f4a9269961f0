"""``CompiledPolicy.could_allow``, which keeps an MCP ``tools/list`` answer to the tools an
agent could call: never False for a call the policy decides other than deny (a tool hidden
that the agent may call), and False where the rules' selectors alone settle a deny."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from aegis.policy.input import build_input, call_from_dict
from tests.policy.conftest import CORPUS, corpus_policy
from tests.policy.strategies import calls
from tests.policy.test_evaluator import policy

NAMES = [p.stem for p in CORPUS]


@pytest.mark.parametrize("name", NAMES)
def test_a_call_the_policy_may_allow_is_never_judged_impossible(name: str) -> None:
    compiled = corpus_policy(name)
    judged: set[bool] = set()

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(call=calls(compiled))
    def check(call: Any) -> None:
        doc = build_input(call)
        possible = compiled.could_allow(doc)
        judged.add(possible)
        if compiled.evaluate(doc).action != "deny":
            assert possible, f"{name}: {doc} is decided other than deny"

    check()
    assert True in judged, f"{name}: no generated call could be allowed; the property says nothing"


RULES = """\
- {id: read, action: allow, match: {tools: [repo.read]}}
- {id: big, action: deny, match: {tools: [repo.read]}, when: {path: request.body.n, gt: 5}}
- {id: ops, action: allow, match: {tools: [repo.delete], agent: {roles: [ops]}}}
- {id: try, action: allow, shadow: true, match: {tools: [repo.delete, repo.shadowed]}}
- {id: any-write, action: sanitize, match: {tools: ["repo.w*"]},
   obligations: [{kind: mask, target: response, pattern: email}]}
- {id: no-wipe, action: deny, match: {tools: [repo.wipe], agent: {ids: [a]}}}
- {id: pay, action: approval_needed, match: {tools: [repo.pay]}, approval: {group: g}}
- {id: never, action: deny, match: {tools: [repo.pay]}, when: {path: agent.id, eq: a}}
"""


@pytest.mark.parametrize(
    ("tool", "agent", "roles", "expected"),
    [
        ("repo.read", "a", [], True),  # a condition may deny it, not always
        ("repo.delete", "a", [], False),  # only agents with role ops; the shadow rule counts not
        ("repo.delete", "a", ["ops"], True),
        ("repo.shadowed", "a", [], False),
        ("repo.write", "a", [], True),
        ("repo.wipe", "a", [], False),  # sanitize, but denied to agent a with no condition
        ("repo.wipe", "b", [], True),
        ("repo.pay", "a", [], True),  # conditions are never read: errs towards listing
        ("repo.other", "a", [], False),  # default deny
    ],
)
def test_selectors_settle_what_could_be_allowed(
    tool: str, agent: str, roles: list[str], expected: bool
) -> None:
    compiled = policy(RULES)
    doc = build_input(call_from_dict({"tool": tool, "agent": {"id": agent, "roles": roles}}))
    assert compiled.could_allow(doc) is expected


def test_a_policy_in_shadow_mode_could_allow_anything() -> None:
    compiled = policy("- {id: d, action: deny, match: {tools: [x]}}", mode="shadow")
    assert compiled.could_allow(build_input(call_from_dict({"tool": "x"})))

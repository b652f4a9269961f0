"""Evaluator semantics: combining, run-time type rules, indexing and failing closed."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis.policy.decision import DEFAULT_DENY_REASON, SHADOW_POLICY_REASON
from aegis.policy.evaluator import (
    EVALUATION_FAILED,
    MAX_CACHED_TOOLS,
    CompiledPolicy,
    compile_policy,
)
from aegis.policy.input import build_input, call_from_dict
from aegis.policy.loader import load_document

HEAD = "apiVersion: aegis/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  rules:\n"


def policy(rules: str, mode: str = "enforce") -> CompiledPolicy:
    head = HEAD.replace("spec:\n", f"spec:\n  mode: {mode}\n")
    return compile_policy(load_document(head + textwrap.indent(textwrap.dedent(rules), "    ")))


def decide(p: CompiledPolicy, **call: Any) -> dict[str, Any]:
    return p.evaluate(build_input(call_from_dict({"tool": "t", **call}))).to_dict()


ALL_ACTIONS = """\
- {id: allow, action: allow, when: {path: request.body.a, eq: true}}
- {id: sanitize, action: sanitize, when: {path: request.body.s, eq: true}, obligations: [{kind: mask, target: response, pattern: email}]}
- {id: approve, action: approval_needed, when: {path: request.body.p, eq: true}, approval: {group: g}}
- {id: deny, action: deny, when: {path: request.body.d, eq: true}}
"""


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    flags=st.fixed_dictionaries({k: st.booleans() for k in "aspd"}), order=st.permutations(range(4))
)
def test_combining_is_order_independent_and_follows_precedence(
    flags: dict[str, bool], order: list[int]
) -> None:
    lines = ALL_ACTIONS.splitlines()
    shuffled = policy("\n".join(lines[i] for i in order) + "\n")
    got = decide(shuffled, body=flags)
    expected = next(
        (
            a
            for a, k in (("deny", "d"), ("approval_needed", "p"), ("sanitize", "s"), ("allow", "a"))
            if flags[k]
        ),
        "deny",
    )
    assert got["action"] == expected
    reference = decide(policy(ALL_ACTIONS), body=flags)
    assert {**got, "policy_version": ""} == {**reference, "policy_version": ""}
    if expected == "approval_needed" and flags["s"]:
        assert got["obligations"] == [{"kind": "mask", "target": "response", "pattern": "email"}]


@pytest.mark.parametrize(
    "rule",
    [
        "- {id: ro, action: deny, match: {methods: [GET]}}",
        "- {id: ro, action: deny, when: {path: method, eq: GET}}",
        "- {id: ro, action: deny, when: {path: method, in: [GET, PUT]}}",
    ],
)
def test_a_rule_naming_get_holds_for_head(rule: str) -> None:
    """Servers answer HEAD with the GET handler: a GET denied is a HEAD denied."""
    p = policy(rule + "\n- {id: rest, action: allow}\n")
    assert decide(p, method="HEAD")["action"] == "deny"
    assert decide(p, method="GET")["action"] == "deny"
    assert decide(p, method="POST")["action"] == "allow"


@pytest.mark.parametrize(
    "rule",
    [
        "- {id: rw, action: deny, when: {path: method, ne: GET}}",
        "- {id: rw, action: deny, when: {path: method, not_in: [GET]}}",
    ],
)
def test_a_rule_excluding_get_excludes_head(rule: str) -> None:
    p = policy(rule + "\n- {id: rest, action: allow}\n")
    assert decide(p, method="HEAD")["action"] == "allow"
    assert decide(p, method="DELETE")["action"] == "deny"


def test_default_deny_lists_its_reason_and_version() -> None:
    p = policy("- {id: a, action: allow, match: {tools: [other]}}\n")
    got = decide(p)
    assert got["action"] == "deny"
    assert got["reasons"] == [DEFAULT_DENY_REASON]
    assert got["rule_ids"] == []
    assert got["code"] == "access_denied"
    assert got["policy_version"] == p.version
    assert p.version.startswith("sha256:")


@pytest.mark.parametrize("value", ["5", True, None, [1], {"x": 1}])
def test_type_mismatch_is_a_policy_error_deny_even_under_not(value: Any) -> None:
    p = policy("- {id: a, action: allow, when: {not: {path: request.body.n, gt: 5}}}\n")
    got = decide(p, body={"n": value})
    assert got["action"] == "deny"
    assert got["code"] == "policy_error"
    assert got["rule_ids"] == ["a"]
    assert got["reasons"] == ["policy_error: rule a: request.body.n gt 5 needs a number"]


def test_a_missing_value_is_false_not_an_error() -> None:
    p = policy("- {id: a, action: allow, when: {path: request.body.n, lt: 5}}\n")
    assert decide(p, body={})["code"] == "access_denied"
    assert decide(p, body={"n": 1})["action"] == "allow"


def test_errors_are_found_whatever_the_order_of_any() -> None:
    p = policy(
        "- id: a\n  action: allow\n  when:\n    any:\n      - {path: request.body.ok, eq: true}\n"
        "      - {path: request.body.n, lt: 5}\n"
    )
    assert decide(p, body={"ok": True, "n": "x"})["code"] == "policy_error"


def test_equality_does_not_mix_booleans_and_numbers() -> None:
    p = policy("- {id: a, action: allow, when: {path: request.body.n, eq: 1}}\n")
    assert (decide(p, body={"n": True})["action"], decide(p, body={"n": True})["code"]) == (
        "deny",
        "policy_error",
    )
    assert decide(p, body={"n": 1.0})["action"] == "allow"


CONVERTED = """\
- {id: ok, action: allow}
- {id: account, action: deny, when: {path: request.body.toAccount, in: [42]}}
- {id: force, action: deny, when: {path: request.body.force, eq: true}}
- {id: kind, action: deny, when: {path: request.body.kind, eq: wire}}
"""


@pytest.mark.parametrize(
    "body",
    [
        {"toAccount": "42"},  # Jackson binds it to an int field as 42
        {"toAccount": " 42"},
        {"toAccount": True},
        {"force": 1},  # ... and these to a boolean as true
        {"force": "true"},
        {"force": 1.0},
        {"force": "on"},
        {"kind": 7},  # ... and numbers and booleans to a String as text
        {"kind": False},
    ],
)
def test_a_scalar_of_another_type_than_the_literal_is_a_policy_error(body: dict[str, Any]) -> None:
    """Compared strictly, "42" would pass ``deny when toAccount in [42]``; an upstream that
    converts it acts on 42. The rule cannot decide it, so the call is refused."""
    got = decide(policy(CONVERTED), body=body)
    assert (got["action"], got["code"]) == ("deny", "policy_error")
    (rule,) = got["rule_ids"]
    (reason,) = got["reasons"]
    assert reason.startswith(f"policy_error: rule {rule}: request.body.")


@pytest.mark.parametrize(
    ("body", "action"),
    [
        ({"toAccount": 42}, "deny"),
        ({"toAccount": 42.0}, "deny"),
        ({"toAccount": 7}, "allow"),
        ({"force": True}, "deny"),
        ({"force": False}, "allow"),
        ({"kind": "wire"}, "deny"),
        ({"kind": "card"}, "allow"),
        # null, lists and objects are compared as before: never an error
        ({"force": None, "toAccount": None}, "allow"),
        ({"force": [True], "toAccount": [42]}, "allow"),
        ({"toAccount": {"n": 42}}, "allow"),
        ({}, "allow"),
    ],
)
def test_values_of_the_literal_type_null_lists_and_objects_compare_strictly(
    body: dict[str, Any], action: str
) -> None:
    got = decide(policy(CONVERTED), body=body)
    assert got["action"] == action
    assert got["code"] != "policy_error"


@pytest.mark.parametrize(
    "condition",
    [
        "{path: request.body.role, ne: admin}",
        "{path: request.body.role, not_in: [admin, root]}",
        "{path: request.body.role, eq: reader}",
        "{not: {path: request.body.role, eq: admin}}",
        "{not: {path: request.body.role, in: [admin]}}",
        "{any: [{path: request.body.ok, exists: false}, {path: request.body.role, ne: admin}]}",
    ],
)
@pytest.mark.parametrize("value", [1, 0.5, True])
def test_ne_not_in_and_not_never_allow_a_scalar_of_another_type(condition: str, value: Any) -> None:
    p = policy(f"- {{id: a, action: allow, when: {condition}}}\n")
    got = decide(p, body={"role": value})
    assert (got["action"], got["code"], got["rule_ids"]) == ("deny", "policy_error", ["a"])
    assert decide(p, body={"role": "reader"})["action"] == "allow"


def test_the_error_says_what_to_send_and_what_to_write() -> None:
    got = decide(policy(CONVERTED), body={"toAccount": "42"})
    assert got["reasons"] == [
        "policy_error: rule account: request.body.toAccount in [42] needs a whole number; servers"
        ' convert strings, numbers and booleans into one another ("42" to 42, 1 or "true" to'
        " true) and drop the fraction of a number bound to an integer (42.5 to 42), so a value of"
        " another type or a number with a fraction is refused: send a whole number, or write the"
        " rule for the value sent"
    ]
    assert decide(policy(CONVERTED), body={"toAccount": 42.5})["reasons"] == got["reasons"]
    got = decide(policy(CONVERTED), body={"kind": 7})
    assert got["reasons"] == [
        'policy_error: rule kind: request.body.kind eq "wire" needs a string; servers convert'
        ' strings, numbers and booleans into one another ("42" to 42, 1 or "true" to true), so a'
        " value of another type is refused: send a string, or write the rule for the type sent"
    ]
    p = policy("- {id: page, action: deny, when: {path: request.query.page, in: [2, 3]}}\n")
    got = decide(p, query={"page": "2"})
    assert (got["action"], got["code"]) == ("deny", "policy_error")
    assert got["reasons"] == [
        "policy_error: rule page: request.query.page in [2, 3] needs a number; query and header"
        " values are always strings: write the rule's values quoted"
    ]


@pytest.mark.parametrize("amount", [42.5, 42.999, 41.5, -42.5, 0.001])
@pytest.mark.parametrize(
    "condition",
    [
        "{path: request.body.n, in: [42]}",
        "{path: request.body.n, eq: 42.0}",
        "{path: request.body.n, ne: 7}",
        "{path: request.body.n, not_in: [7, 8]}",
        "{not: {path: request.body.n, in: [42, x, true]}}",
    ],
)
def test_a_number_with_a_fraction_against_whole_numbers_is_a_policy_error(
    condition: str, amount: float
) -> None:
    """Jackson binds 42.5 to an int field as 42 (as Rails ``to_i`` and PHP ``(int)`` read it):
    compared by value, it would pass ``deny when toAccount in [42]``."""
    p = policy(f"- {{id: ok, action: allow}}\n- {{id: a, action: deny, when: {condition}}}\n")
    got = decide(p, body={"n": amount})
    assert (got["action"], got["code"], got["rule_ids"]) == ("deny", "policy_error", ["a"])
    assert "a whole number" in got["reasons"][0]
    assert decide(p, body={"n": 42.0})["code"] != "policy_error"  # whole: compared by value


def test_a_literal_with_a_fraction_compares_numbers_by_value() -> None:
    p = policy(
        "- {id: ok, action: allow}\n"
        "- {id: a, action: deny, when: {path: request.body.n, in: [42, 42.5]}}\n"
        "- {id: b, action: deny, when: {path: request.body.m, in: [x, null]}}\n"
    )
    assert decide(p, body={"n": 42.5})["code"] == "access_denied"
    assert decide(p, body={"n": 42.25})["action"] == "allow"
    assert decide(p, body={"m": 1.5})["reasons"][0].endswith("write the rule for the type sent")
    assert p.lowered.rules[1].when.error.startswith(  # type: ignore[union-attr]
        "policy_error: rule a: request.body.n in [42, 42.5] needs a number; servers convert"
    )
    lvl = policy("- {id: lvl, action: deny, match: {agent: {attributes: {level: 3}}}}\n")
    assert decide(lvl, agent={"attributes": {"level": 3.5}})["code"] == "access_denied"


def test_query_and_header_values_compare_with_quoted_literals() -> None:
    p = policy(
        "- {id: ok, action: allow}\n"
        "- {id: page, action: deny, when: {path: request.query.page, eq: '2'}}\n"
        "- {id: limit, action: deny, when: {path: request.headers.x-limit, in: ['100']}}\n"
    )
    assert decide(p, query={"page": "2"})["code"] == "access_denied"
    assert decide(p, headers={"x-limit": "100"})["code"] == "access_denied"
    assert decide(p, query={"page": "1"}, headers={"x-limit": "10"})["action"] == "allow"
    assert decide(p, query={"page": ["1", "2"]})["action"] == "allow"  # a list: no error


def test_a_list_of_mixed_types_checks_only_the_types_it_lacks() -> None:
    p = policy(
        "- {id: ok, action: allow}\n"
        "- {id: a, action: deny, when: {path: request.body.n, in: [42, '42', null]}}\n"
        "- {id: b, action: deny, when: {path: request.body.m, not_in: [1, 'x', true]}}\n"
    )
    assert decide(p, body={"n": True})["code"] == "policy_error"
    assert decide(p, body={"n": "42"})["code"] == "access_denied"
    assert decide(p, body={"n": "042"})["action"] == "allow"  # compared strictly: see the docs
    assert decide(p, body={"m": False})["code"] == "access_denied"  # every type held: no error
    assert decide(p, body={"m": "x"})["action"] == "allow"


def test_selectors_never_error() -> None:
    p = policy(
        "- {id: ok, action: allow}\n"
        "- {id: lvl, action: deny, match: {agent: {attributes: {level: 3}}}}\n"
    )
    assert decide(p, agent={"attributes": {"level": 3}})["code"] == "access_denied"
    got = decide(p, agent={"attributes": {"level": "3"}})
    assert (got["action"], got["code"]) == ("allow", None)
    assert p.lowered.rules[1].match[0].error is None


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_number_is_no_number_to_a_comparison(value: float) -> None:
    p = policy(
        "- {id: ok, action: allow}\n"
        "- {id: five, action: deny, when: {path: request.body.n, ne: 5}}\n"
        "- {id: x, action: deny, when: {path: request.body.s, eq: x}}\n"
    )
    doc = build_input(call_from_dict({"tool": "t", "body": {"n": 5}}))
    doc["request"]["body"] = {"n": value}
    assert p.evaluate(doc).code == "policy_error"
    doc["request"]["body"] = {"s": value}
    assert p.evaluate(doc).code == "policy_error"


def test_regex_subject_over_the_limit_is_an_error() -> None:
    p = policy("- {id: a, action: allow, when: {path: request.body.s, regex: 'x'}}\n")
    assert decide(p, body={"s": "x" * 5000})["code"] == "policy_error"
    assert decide(p, body={"s": "x"})["action"] == "allow"


def test_time_window_needs_a_valid_unix_time() -> None:
    p = policy("- {id: a, action: allow, when: {time: {weekdays: [wed]}}}\n")
    assert decide(p, time=1736935200)["action"] == "allow"  # a Wednesday
    doc = build_input(call_from_dict({"tool": "t"}))
    doc["time"]["unix"] = "soon"
    assert p.evaluate(doc).code == "policy_error"


def test_shadow_rules_never_change_the_enforced_action() -> None:
    p = policy(
        "- {id: allow, action: allow}\n- {id: block, action: deny, shadow: true, reason: would block}\n"
    )
    got = decide(p)
    assert got["action"] == "allow"
    assert got["shadow"]["action"] == "deny"
    assert got["shadow"]["reasons"] == ["would block"]


def test_a_policy_in_shadow_mode_allows_and_records() -> None:
    p = policy("- {id: block, action: deny}\n", mode="shadow")
    got = decide(p)
    assert (got["action"], got["reasons"]) == ("allow", [SHADOW_POLICY_REASON])
    assert got["shadow"]["rule_ids"] == ["block"]


def test_an_unexpected_failure_is_a_deny() -> None:
    p = policy("- {id: a, action: allow}\n")
    got = p.evaluate({"tool": "t", "agent": object()})  # not a document build_input makes
    assert got.action == "allow"  # no selector reads agent, so nothing failed
    broken = p.evaluate(None)  # type: ignore[arg-type]
    assert (broken.action, broken.code, broken.reasons) == (
        "deny",
        "policy_error",
        (EVALUATION_FAILED,),
    )


def test_index_returns_only_rules_for_the_tool() -> None:
    rules = "".join(
        f"- {{id: r{i}, action: allow, match: {{tools: [tool{i}]}}}}\n" for i in range(50)
    )
    rules += "- {id: g, action: deny, match: {tools: ['tool4*']}}\n- {id: any, action: allow}\n"
    p = policy(rules)
    assert [r.id for r in p.candidates("tool4")] == ["r4", "g", "any"]
    assert [r.id for r in p.candidates("tool45")] == ["r45", "g", "any"]
    assert [r.id for r in p.candidates("nope")] == ["any"]
    assert [r.id for r in p.candidates(7)] == ["any"]


def test_candidate_cache_is_bounded() -> None:
    p = policy("- {id: a, action: allow, match: {tools: ['x*']}}\n")
    for i in range(MAX_CACHED_TOOLS + 10):
        p.candidates(f"x{i}")
    assert len(p._cache) <= MAX_CACHED_TOOLS


def test_selectors() -> None:
    p = policy(
        "- id: a\n  action: allow\n  match:\n    methods: [get]\n    tenants: [acme]\n"
        "    agent: {roles: [reader], attributes: {team: x}}\n    scopes: [s1, s2]\n"
        "    auth_methods: [mtls]\n    chain: {parents: [o], max_depth: 1}\n"
    )
    good = {
        "method": "GET",
        "tenant": "acme",
        "agent": {"id": "ag", "roles": ["reader", "z"], "attributes": {"team": "x"}},
        "scopes": ["s2", "s1"],
        "auth_method": "mtls",
        "chain": {"agents": ["o"]},
    }
    assert decide(p, **good)["action"] == "allow"
    for key, bad in [
        ("method", "POST"),
        ("tenant", "other"),
        ("agent", {"id": "ag", "roles": ["z"], "attributes": {"team": "x"}}),
        ("agent", {"id": "ag", "roles": ["reader"], "attributes": {"team": "y"}}),
        ("scopes", ["s1"]),
        ("auth_method", "bearer"),
        ("chain", {"agents": ["o", "p"]}),
        ("chain", {"agents": ["q"]}),
    ]:
        assert decide(p, **{**good, key: bad})["action"] == "deny", key


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_number_is_no_number_to_a_numeric_rule(value: float) -> None:
    """Every comparison with NaN is false: taken as a number, it would slip past
    "deny when amount > 10000". It is a type error, so the call is refused."""
    p = policy(
        "- {id: cap, action: deny, when: {path: request.body.amount, gt: 10000}}\n"
        "- {id: ok, action: allow, when: {path: request.body.amount, gte: 0}}\n"
    )
    got = decide(p, body={"amount": value})
    assert got["action"] == "deny"


def test_a_rule_on_path_loose_holds_for_every_spelling_of_the_path() -> None:
    p = policy("""\
    - {id: tools, action: allow}
    - {id: admin, action: deny, when: {path: path_loose, regex: "^/payments/admin(/|$)"}}
    """)
    for path in (
        "/payments/admin",
        "/Payments/ADMIN/x",
        "/payments/admin;v=2",
        "/payments/admin./x",
    ):
        assert decide(p, path=path)["action"] == "deny", path
    assert decide(p, path="/payments/administrators")["action"] == "allow"
    assert decide(p, path="/payments/charge")["action"] == "allow"

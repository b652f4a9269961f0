"""Differential testing: the generated Rego, run by regorus, decides exactly as the evaluator.

For every corpus policy, hypothesis generates calls seeded with the policy's own literals; the two
engines must agree on the whole decision (action, code, sorted reasons and rule ids, obligations,
approvals, version and the shadow outcome). Any disagreement is a bug in one of the compilers.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegis.policy.input import build_input, call_from_dict
from aegis.policy.testing import discover
from aegis.policy.yamlsource import parse_source
from tests.policy.conftest import CORPUS, REPO, corpus_engine, corpus_policy
from tests.policy.regorus_engine import normalise
from tests.policy.strategies import calls

NAMES = [p.stem for p in CORPUS]
EXAMPLES_PER_POLICY = 150


def test_the_corpus_is_varied_enough() -> None:
    assert len(NAMES) >= 8
    assert "payments" in NAMES


def _agree(name: str, doc: dict[str, Any]) -> dict[str, Any]:
    ours = normalise(corpus_policy(name).evaluate(doc).to_dict())
    theirs = normalise(corpus_engine(name).evaluate(doc))
    assert ours == theirs, f"{name}: engines disagree for input {doc}"
    return ours


@pytest.mark.parametrize("name", NAMES)
def test_engines_agree_on_generated_calls(name: str) -> None:
    seen: set[str] = set()

    @settings(
        max_examples=EXAMPLES_PER_POLICY,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(call=calls(corpus_policy(name)))
    def check(call: Any) -> None:
        decision = _agree(name, build_input(call))
        seen.add(f"{decision['action']}/{(decision['shadow'] or {}).get('action')}")

    check()
    # The generator must reach beyond the default deny, or agreement proves little.
    assert len(seen) >= 2, f"{name}: only {seen} decisions were generated"


def test_engines_agree_on_every_example_case() -> None:
    cases = 0
    for file in discover(REPO / "examples" / "policies"):
        for case in parse_source(file.read_bytes(), str(file)).value["cases"]:
            _agree("payments", build_input(call_from_dict(case["input"])))
            cases += 1
    assert cases >= 10


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    amount=st.one_of(st.integers(-10, 10_000), st.floats(4999, 5001, allow_nan=False)),
    hour=st.integers(0, 23),
    day=st.integers(0, 13),
)
def test_payment_boundaries_agree(amount: float, hour: int, day: int) -> None:
    # 2025-03-24 is a Monday; the range crosses the UK change to summer time (2025-03-30).
    when = 1_742_774_400 + day * 86_400 + hour * 3_600
    call = {
        "tool": "payments.transfer",
        "scopes": ["payments:write"],
        "body": {"amount": amount, "account": "GB1234567890"},
        "time": when,
    }
    _agree("payments", build_input(call_from_dict(call)))


#: comparisons.yaml for tool bank.transfer: each rule's body field and the JSON types of its
#: literal. A string, number or boolean of another type there is a rule error, and so is a number
#: with a fraction where the literal's numbers are all whole (every literal here).
_TRANSFER = {
    "account-in": ("toAccount", {"number"}),
    "force-eq": ("force", {"boolean"}),
    "currency-ne": ("currency", {"string"}),
    "country-not-in": ("country", {"string"}),
    "code-mixed": ("code", {"number", "string"}),
}
_JSON_TYPE = {str: "string", int: "number", float: "number", bool: "boolean"}
_SAMPLES = [
    42, 43, 42.0, "42", " 42", "042", 1, 0, 1.0, True, False, "true", "false", "1", "EUR", "GB",
    "US", 7, "7", None, [42], ["GB"], {"n": 42}, 42.5, 42.999, 41.5, 7.25, -7.5, 0.5, 43.0,
]  # fmt: skip
_FIELD_VALUES = st.one_of(
    st.sampled_from(_SAMPLES),
    st.none(),
    st.booleans(),
    st.integers(-100, 100),
    # Eighths: regorus reads a number to about 15 significant digits (90.99999999999999 equals
    # 91 there, not in OPA or Python), so generated fractions stay short.
    st.integers(-800, 800).map(lambda n: n / 8),
    st.text(max_size=3),
)


def _refused(value: Any, types: set[str]) -> bool:
    """A scalar of a type the literal lacks, or a number with a fraction against whole numbers."""
    kind = _JSON_TYPE.get(type(value))
    if kind is None:
        return False
    return kind not in types or (type(value) is float and not value.is_integer())


@settings(max_examples=200, deadline=None, derandomize=True)
@given(body=st.fixed_dictionaries({}, optional={k: _FIELD_VALUES for k, _ in _TRANSFER.values()}))
def test_a_scalar_of_another_type_is_a_rule_error_in_both_engines(body: dict[str, Any]) -> None:
    """What an upstream would convert ("42" for 42, 1 or "true" for true, 42.5 for 42) is a rule
    error in both engines; null, lists and objects, and values of the literal's type, are not."""
    doc = build_input(call_from_dict({"tool": "bank.transfer", "body": body}))
    decision = _agree("comparisons", doc)
    errored = {
        r
        for r in _TRANSFER
        if any(m.startswith(f"policy_error: rule {r}:") for m in decision["reasons"])
    }
    expected = {
        r for r, (key, types) in _TRANSFER.items() if key in body and _refused(body[key], types)
    }
    assert errored == expected, body
    assert (decision["code"] == "policy_error") == bool(expected)


@pytest.mark.parametrize(
    ("tool", "call", "rule"),
    [
        ("bank.list", {"query": {"page": "2"}}, "page-number"),
        ("bank.list", {"body": {"dry_run": 0}}, "dry-run-under-not"),
        ("bank.transfer", {"body": {"toAccount": "42"}}, "account-in"),
        ("bank.transfer", {"body": {"force": "true"}}, "force-eq"),
        ("bank.transfer", {"body": {"toAccount": 42.5}}, "account-in"),
        ("bank.transfer", {"body": {"code": 7.5}}, "code-mixed"),
    ],
)
def test_the_engines_report_the_same_comparison_error(
    tool: str, call: dict[str, Any], rule: str
) -> None:
    decision = _agree("comparisons", build_input(call_from_dict({"tool": tool, **call})))
    assert (decision["action"], decision["code"]) == ("deny", "policy_error")
    assert rule in decision["rule_ids"]


def test_selectors_never_error_in_either_engine() -> None:
    for level, code in ((3, "access_denied"), ("3", None)):
        call = {
            "tool": "bank.close",
            "body": {"reason": "x"},
            "agent": {"attributes": {"level": level}},
        }
        assert _agree("comparisons", build_input(call_from_dict(call)))["code"] == code


@pytest.mark.parametrize("missing", ["path_loose", "request", "agent"])
def test_the_bundle_denies_an_input_document_aegis_did_not_build(missing: str) -> None:
    """A missing path makes every condition on it false, so a deny rule would not fire on a
    document shaped otherwise (OPA given Envoy's own input): the bundle refuses it whole."""
    doc = build_input(call_from_dict({"tool": "t", "path": "/Payments/Admin"}))
    assert _agree("paths", doc)["rule_ids"] == ["admin"]
    del doc[missing]
    decision = corpus_engine("paths").evaluate(doc)
    assert (decision["action"], decision["code"]) == ("deny", "policy_error")
    assert missing in decision["reasons"][0]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    when=st.one_of(
        st.integers(0, 4_102_444_799),
        st.sampled_from([4_102_444_799, 4_102_444_800, 4_338_207_403, 8_589_934_591]),
    ),
    tool=st.sampled_from(["batch.run", "deploy.app", "report.daily"]),
)
def test_time_windows_agree_over_every_year_they_decide(when: int, tool: str) -> None:
    """The engines' time zone data part after 2099 (the Rust engine's zones stop changing to
    summer time: 2107-06-22T17:36:43Z is 17:36 in London to it, 18:36 to Python), so a window
    decides only times before 2100; a later one is a rule error in both, never an allow."""
    decision = _agree("time_windows", build_input(call_from_dict({"tool": tool, "time": when})))
    if when >= 4_102_444_800:
        assert (decision["action"], decision["code"]) == ("deny", "policy_error"), decision
        assert "before 2100" in " ".join(decision["reasons"])


def test_a_summer_time_window_past_2099_is_a_rule_error_not_a_decision() -> None:
    call = {"tool": "payments.transfer", "scopes": ["payments:write"],
            "body": {"amount": 5, "account": "GB1234567890"}, "time": 4_338_207_403}  # fmt: skip
    decision = _agree("payments", build_input(call_from_dict(call)))
    assert (decision["action"], decision["code"]) == ("deny", "policy_error")

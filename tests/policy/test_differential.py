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

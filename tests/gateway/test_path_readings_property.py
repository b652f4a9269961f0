"""Property: however a policy's rules on ``path_loose`` are drawn, the decision the gateway
takes over a path's readings is at least as strict as each reading that counts, decided alone,
and keeps every approval and obligation such a reading carries.

The readings (``aegis.policy.input.path_variants``, and each reading without a trailing ``/``
with one) are what upstreams serve a path as; a variant reading always counts (nothing allows
the path some upstream serves, the default deny included), a slashed one where a rule matched it
and restricts the call. Drawn rule sets mix allow, deny, approval and sanitize rules on path
literals, regexes and substrings; drawn paths mix the segments those rules name with format
suffixes, scripts and trailing slashes."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegis.clock import FrozenClock
from aegis.errors import InvalidRequest
from aegis.gateway.policies import PolicyDirectory
from aegis.gateway.target import vet_path
from aegis.policy.decision import Decision
from aegis.policy.evaluator import compile_policy
from aegis.policy.input import AgentInfo, PolicyCall, build_input, path_variants
from aegis.policy.loader import load_document
from aegis.policy.store import MemoryPolicyStore

_TESTS = [
    "eq: /admin", "eq: /admin.php", "eq: /payments", "eq: /payments/refund", "eq: /openapi",
    "eq: /openapi.json", "regex: '^/admin/'", "regex: '^/payments/'", "regex: '[.]php$'",
    "contains: /refund", "in: [/status, /status.json]", "regex: '^/payments(/|$)'",
]  # fmt: skip
#: Approval and sanitize rules drawn more often: what they carry is what combining can drop.
_ACTIONS = ["allow", "deny", "approval_needed", "approval_needed", "sanitize", "sanitize"]
_SEGMENTS = ["admin", "payments", "refund", "openapi", "status", "x", "admin.php", "index.php",
             "refund.json", "openapi.json", "status.json", "a.b.c", "Admin", "PAYMENTS"]  # fmt: skip
_STRICT = {"allow": 0, "sanitize": 1, "approval_needed": 2, "deny": 3}


def _rule(i: int, action: str, test: str) -> str:
    extra = ""
    if action == "approval_needed":
        extra = f", approval: {{group: g{i}}}"
    elif action == "sanitize":
        extra = f", obligations: [{{kind: redact, target: request, path: f{i}}}]"
    return f"    - {{id: r{i}, action: {action}, when: {{path: path_loose, {test}}}{extra}}}\n"


@st.composite
def _policies(draw: Any) -> str:
    rules = draw(st.lists(st.tuples(st.sampled_from(_ACTIONS), st.sampled_from(_TESTS)),
                          min_size=1, max_size=5))  # fmt: skip
    text = "".join(_rule(i, action, test) for i, (action, test) in enumerate(rules))
    if draw(st.booleans()):
        text = "    - {id: all, action: allow, match: {tools: [app]}}\n" + text
    return "apiVersion: aegis/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  rules:\n" + text


_BASES = ["/admin", "/admin.php", "/payments", "/payments/refund", "/openapi", "/status"]
_SUFFIXES = ["", "/", ".json", ".json/", "/x", ".php/x", ".a.b", "/refund", "/refund.json"]
_PATHS = st.one_of(
    # The paths the rules name, as upstreams read them other ways ...
    st.builds(
        lambda base, suffix, upper: (base.upper() if upper else base) + suffix,
        st.sampled_from(_BASES),
        st.sampled_from(_SUFFIXES),
        st.booleans(),
    ),
    # ... and any mix of their segments.
    st.builds(
        lambda segs, slash: "/" + "/".join(segs) + ("/" if slash and segs else ""),
        st.lists(st.sampled_from(_SEGMENTS), min_size=0, max_size=3),
        st.booleans(),
    ),
)


def _alone(policy: Any, doc: dict[str, Any], reading: str) -> Decision:
    decision: Decision = policy.evaluate({**doc, "path_loose": reading})
    return decision


@settings(max_examples=1000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(text=_policies(), raw=_PATHS)
def test_readings_combine_no_weaker_than_any_reading_that_counts(text: str, raw: str) -> None:
    document = load_document(text)
    store = MemoryPolicyStore()
    store.activate("t", "e", store.put(document, now=0), actor="x", now=0)
    directory = PolicyDirectory(store, clock=FrozenClock(0), interval=1)
    try:
        path = vet_path(raw)
    except InvalidRequest:
        return
    doc = build_input(PolicyCall(tool="app", agent=AgentInfo(id="a"), tenant="t", env="e",
                                 time=0.0, method="GET", path=path))  # fmt: skip
    decided = directory.decide("t", "e", "app", "a", doc)
    policy = compile_policy(document)
    loose = doc["path_loose"]
    variants = path_variants(loose)
    counted = [_alone(policy, doc, loose)]
    counted += [_alone(policy, doc, r) for r in variants]
    for reading in (loose, *variants):
        if not reading.endswith("/"):
            alone = _alone(policy, doc, reading + "/")
            if alone.rule_ids and alone.action != "allow":
                counted.append(alone)
    strictest = max(_STRICT[d.action] for d in counted)
    assert _STRICT[decided.action] >= strictest, (raw, loose, decided, counted)
    if decided.action != "deny":
        groups = {a.group for d in counted for a in d.approvals}
        assert groups <= {a.group for a in decided.approvals}, (raw, decided, counted)
        obligations = {o.path for d in counted if d.action != "allow" for o in d.obligations}
        assert obligations <= {o.path for o in decided.obligations}, (raw, decided, counted)
    if decided.action == "allow":
        assert all(d.action == "allow" for d in counted), (raw, decided, counted)

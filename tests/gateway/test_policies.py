"""Which policy decides: the active version, the allow-list while none is active, 503 when unknown."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aegis.clock import FrozenClock, SystemClock
from aegis.config import GatewayAllow
from aegis.errors import InvalidRequest, PolicyError, Unavailable
from aegis.gateway.policies import (
    ALLOWLIST_VERSION,
    PolicyDirectory,
    ReadFields,
    allowlist_decision,
    misspelled,
    policy_reads,
    policy_reads_body,
)
from aegis.policy.decision import Decision
from aegis.policy.evaluator import compile_policy
from aegis.policy.loader import load_document
from aegis.policy.store import Activation, MemoryPolicyStore

DENY_ALL = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: deny-all}
spec:
  rules:
    - {id: nope, action: deny, reason: closed, match: {tools: ["*"]}}
"""


def test_allowlist_is_default_deny() -> None:
    allow = (GatewayAllow(tool="pay", agents=("a1",)), GatewayAllow(tool="read"))
    assert allowlist_decision(allow, "pay", "a1").action == "allow"
    assert allowlist_decision(allow, "pay", "a2").action == "deny"
    assert allowlist_decision(allow, "read", "anyone").action == "allow"
    denied = allowlist_decision(allow, "other", "a1")
    assert (denied.action, denied.code, denied.policy_version) == (
        "deny",
        "access_denied",
        ALLOWLIST_VERSION,
    )
    assert allowlist_decision((), "pay", "a1").action == "deny"


def test_active_policy_replaces_the_allowlist_per_tenant_and_env() -> None:
    clock = FrozenClock(0)
    store = MemoryPolicyStore()
    directory = PolicyDirectory(store, clock=clock, interval=1, allow=(GatewayAllow(tool="pay"),))
    assert directory.decide("acme", "prod", "pay", "a", {"tool": "pay"}).action == "allow"
    store.activate("acme", "prod", store.put(load_document(DENY_ALL), now=0), actor="t", now=0)
    clock.advance(2)
    decision = directory.decide("acme", "prod", "pay", "a", {"tool": "pay"})
    assert decision.action == "deny" and decision.policy_version.startswith("sha256:")
    assert directory.decide("acme", "dev", "pay", "a", {"tool": "pay"}).action == "allow"


class DownStore(MemoryPolicyStore):
    def active(self, tenant: str, env: str) -> None:
        raise Unavailable("down", code="policy_unavailable")


def test_unknown_policy_state_is_unavailable_not_allowlist() -> None:
    directory = PolicyDirectory(
        DownStore(), clock=FrozenClock(0), interval=1, allow=(GatewayAllow(tool="pay"),)
    )
    with pytest.raises(Unavailable) as info:
        directory.decide("acme", "prod", "pay", "a", {"tool": "pay"})
    assert info.value.code == "policy_unavailable"


class FlakyStore(MemoryPolicyStore):
    down = True

    def active(self, tenant: str, env: str):  # type: ignore[no-untyped-def]
        if self.down:
            raise Unavailable("down", code="policy_unavailable")
        return super().active(tenant, env)


@pytest.mark.parametrize("activate", [False, True])
def test_store_that_comes_back_is_used_again(activate: bool) -> None:
    clock = FrozenClock(0)
    store = FlakyStore()
    directory = PolicyDirectory(store, clock=clock, interval=1, allow=(GatewayAllow(tool="pay"),))
    with pytest.raises(Unavailable):
        directory.decide("acme", "prod", "pay", "a", {"tool": "pay"})
    store.down = False
    if activate:
        store.activate("acme", "prod", store.put(load_document(DENY_ALL), now=0), actor="t", now=0)
    clock.advance(2)
    decision = directory.decide("acme", "prod", "pay", "a", {"tool": "pay"})
    if activate:
        assert decision.action == "deny" and decision.policy_version.startswith("sha256:")
    else:
        assert (decision.action, decision.policy_version) == ("allow", ALLOWLIST_VERSION)


BODY_RULES = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: body}
spec:
  rules:
    - {id: pay, action: allow, reason: ok, match: {tools: [pay]}}
    - id: pay-cap
      action: deny
      reason: too much
      match: {tools: [pay]}
      when: {path: request.body.amount, gt: 1000}
    - {id: read, action: allow, reason: ok, match: {tools: [read]},
       when: {path: request.headers.x-mode, eq: safe}}
    - {id: whole, action: deny, reason: no, match: {tools: [audit]},
       when: {path: request, exists: false}}
"""


def test_policy_reads_body_follows_conditions_of_the_tools_rules() -> None:
    policy = compile_policy(load_document(BODY_RULES))
    assert policy_reads_body(policy, "pay")
    assert not policy_reads_body(policy, "read")
    assert policy_reads_body(policy, "audit")  # a condition on all of request covers the body
    assert not policy_reads_body(policy, "other")


def test_a_body_hidden_from_a_policy_that_reads_it_is_refused_not_allowed() -> None:
    clock = FrozenClock(0)
    store = MemoryPolicyStore()
    store.activate("acme", "prod", store.put(load_document(BODY_RULES), now=0), actor="t", now=0)
    directory = PolicyDirectory(store, clock=clock, interval=1)
    doc = {"tool": "pay", "request": {"body": None}}
    # The deny rule cannot fire on a body policy never saw; without the check this is an allow.
    assert compile_policy(load_document(BODY_RULES)).evaluate(doc).action == "allow"
    with pytest.raises(InvalidRequest):
        directory.decide("acme", "prod", "pay", "a", doc, body_hidden=True)
    assert directory.reads_body("acme", "prod", "pay")
    assert not directory.reads_body("acme", "prod", "read")
    assert not directory.reads_body("acme", "dev", "pay")  # no policy there: the allow-list
    read = {"tool": "read", "request": {"headers": {"x-mode": "safe"}}}
    assert directory.decide("acme", "prod", "read", "a", read, body_hidden=True).action == "allow"


@pytest.mark.parametrize("mode", ["rule", "policy"])
def test_a_body_read_only_in_shadow_refuses_no_call(mode: str) -> None:
    """Trying a body rule out in shadow changes no outcome: a body policy cannot read (hidden,
    an unsafe integer, a member spelled otherwise) is refused only when an enforced rule reads
    it. The shadow rule still judges the calls whose body was read, and reports them."""
    text = BODY_RULES.replace(
        "      reason: too much\n", "      reason: too much\n      shadow: true\n"
    )
    if mode == "policy":
        text = BODY_RULES.replace("spec:\n", "spec:\n  mode: shadow\n")
    store = MemoryPolicyStore()
    store.activate("acme", "prod", store.put(load_document(text), now=0), actor="t", now=0)
    directory = PolicyDirectory(store, clock=FrozenClock(0), interval=1)
    assert directory.reads_body("acme", "prod", "pay")  # buffered, for the shadow rule to see
    assert not directory.reads_body("acme", "prod", "pay", enforced=True)
    for doc, hidden in (
        ({"tool": "pay", "request": {"body": None}}, True),
        ({"tool": "pay", "request": {"body": {"amount": 2**60}}}, False),
        ({"tool": "pay", "request": {"body": {"Amount": 5000}}}, False),
    ):
        decision = directory.decide(
            "acme", "prod", "pay", "a", doc, body_hidden=hidden, body_names=lambda: NAMES
        )
        assert decision.action == "allow", doc
    big = {"tool": "pay", "request": {"body": {"amount": 5000}}}
    decision = directory.decide("acme", "prod", "pay", "a", big)
    assert decision.action == "allow"
    assert decision.shadow is not None and decision.shadow.action == "deny"
    # Enforced, the same rule refuses each of them.
    enforced = MemoryPolicyStore()
    enforced.activate("acme", "prod", enforced.put(load_document(BODY_RULES), now=0), actor="t",
                      now=0)  # fmt: skip
    strict = PolicyDirectory(enforced, clock=FrozenClock(0), interval=1)
    with pytest.raises(InvalidRequest):
        strict.decide("acme", "prod", "pay", "a", {"tool": "pay", "request": {"body": None}},
                      body_hidden=True)  # fmt: skip
    with pytest.raises(InvalidRequest):
        strict.decide("acme", "prod", "pay", "a",
                      {"tool": "pay", "request": {"body": {"amount": 2**60}}})  # fmt: skip
    with pytest.raises(InvalidRequest, match="Amount"):
        strict.decide("acme", "prod", "pay", "a",
                      {"tool": "pay", "request": {"body": {"Amount": 5000}}},
                      body_names=lambda: NAMES)  # fmt: skip


NAMES = frozenset({"Amount"})


class GatedStore(MemoryPolicyStore):
    """The memory store, whose ``active`` waits while ``gate`` is closed (a stalled database)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def active(self, tenant: str, env: str) -> Activation | None:
        self.gate.wait(2)
        return super().active(tenant, env)


def _background(store: MemoryPolicyStore, interval: float) -> PolicyDirectory:
    """The gateway's kind of directory (polls on its own thread), allow-listing ``pay``."""
    return PolicyDirectory(
        store, clock=SystemClock(), interval=interval, allow=(GatewayAllow(tool="pay"),),
        background=True,
    )  # fmt: skip


def _decides(directory: PolicyDirectory) -> str:
    return directory.decide("acme", "prod", "pay", "a", {"tool": "pay"}).action


def _activate_deny_all(store: MemoryPolicyStore) -> None:
    store.activate("acme", "prod", store.put(load_document(DENY_ALL), now=0), actor="t", now=0)


def _until_denied(directory: PolicyDirectory, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and _decides(directory) != "deny":
        time.sleep(0.01)
    assert _decides(directory) == "deny"


def test_with_background_polls_a_stalled_store_holds_no_decision() -> None:
    """The gateway's directory polls on its own thread: a stalled store holds that thread while
    calls go on with the answer in force, and an activation takes effect within about an
    interval without any call having to wait for the read."""
    store = GatedStore()
    directory = _background(store, 0.05)
    assert _decides(directory) == "allow"
    store.gate.clear()  # the database stops answering
    time.sleep(0.2)  # the poll thread is now stuck in a read
    for _ in range(20):
        started = time.monotonic()
        assert _decides(directory) == "allow"
        assert time.monotonic() - started < 0.1  # no call waits for the store
        time.sleep(0.01)
    _activate_deny_all(store)
    store.gate.set()
    _until_denied(directory)


def test_the_poll_thread_outlives_a_failed_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls read what the poll thread leaves: a round that raises must not end it, or a later
    activation would never be seen."""
    store = MemoryPolicyStore()
    directory = _background(store, 0.02)
    assert _decides(directory) == "allow"
    real, failures = directory.poll_all, [RuntimeError("one bad round")]

    def flaky() -> None:
        if failures:
            raise failures.pop()
        real()

    monkeypatch.setattr(directory, "poll_all", flaky)
    time.sleep(0.1)
    assert not failures  # the bad round happened
    _activate_deny_all(store)
    _until_denied(directory)


_NAMES = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)


@st.composite
def _respelled(draw: st.DrawFn, name: str, kind: str = "query") -> str:
    """Another spelling of ``name`` that lenient readers take for it: letters in another case,
    and for query parameters a ``[...]`` suffix, for headers ``_`` for ``-``."""
    cased = "".join(c.upper() if draw(st.booleans()) else c for c in name)
    if kind == "header":
        cased = cased.replace("-", "_") if "-" in name and draw(st.booleans()) else cased
    elif kind == "query" and draw(st.booleans()):
        cased += draw(st.sampled_from(["[]", "[0]", "[x]"]))
    return cased


@given(data=st.data(), name=_NAMES)
def test_a_read_query_parameter_under_any_other_spelling_is_refused(
    data: st.DataObject, name: str
) -> None:
    reads = ReadFields(query=frozenset({name}))
    assert misspelled(reads, {"request": {"query": {name: "v"}}}) == ""
    other = data.draw(_respelled(name))
    refused = misspelled(reads, {"request": {"query": {other: "v"}}})
    assert bool(refused) is (other != name), (other, refused)
    assert misspelled(reads, {"request": {"query": {name: "v", other: "w"}}}) or other == name


@given(data=st.data(), name=_NAMES)
def test_a_read_header_under_any_other_spelling_or_twice_is_refused(
    data: st.DataObject, name: str
) -> None:
    reads = ReadFields(headers=frozenset({name}))
    assert misspelled(reads, {}, ((name, "v"), ("other", "x"))) == ""
    other = data.draw(_respelled(name, "header")).lower()  # names arrive lowercased
    assert bool(misspelled(reads, {}, ((other, "v"),))) is (other != name)
    assert misspelled(reads, {}, ((name, "v"), (other, "w")))  # twice, however spelled


@given(data=st.data(), path=st.lists(_NAMES, min_size=1, max_size=3), value=st.integers())
def test_a_read_body_member_in_another_case_is_refused_at_any_depth(
    data: st.DataObject, path: list[str], value: int
) -> None:
    reads = ReadFields(body=(tuple(path),))

    def nest(names: list[str]) -> dict[str, object]:
        out: object = value
        for n in reversed(names):
            out = {n: out}
        assert isinstance(out, dict)
        return out

    assert misspelled(reads, {"request": {"body": nest(path)}}) == ""
    depth = data.draw(st.integers(0, len(path) - 1))
    respelled = [*path]
    respelled[depth] = data.draw(_respelled(path[depth], "body"))
    refused = misspelled(reads, {"request": {"body": nest(respelled)}})
    assert bool(refused) is (respelled != path), (respelled, refused)


def test_policy_reads_names_the_fields_a_tools_conditions_read() -> None:
    policy = compile_policy(load_document(BODY_RULES))
    assert policy_reads(policy, "pay") == ReadFields(body=(("amount",),), any_body=True)
    assert policy_reads(policy, "read") == ReadFields(headers=frozenset({"x-mode"}))
    whole = policy_reads(policy, "audit")  # a condition on all of request reads every name
    assert whole.every_query and whole.every_header and whole.any_body
    assert not policy_reads(policy, "other").by_name


@pytest.mark.parametrize("path", ["request.headers.X-Account", "request.headers.x_account"])
def test_a_header_name_policy_input_never_holds_is_refused_at_load(path: str) -> None:
    rule = f'match: {{tools: ["*"]}}, when: {{path: {path}, eq: "1"}}'
    with pytest.raises(PolicyError, match=r"write request\.headers\.x-account"):
        load_document(DENY_ALL.replace('match: {tools: ["*"]}', rule))


def test_a_shadow_policy_reports_what_a_variant_reading_would_refuse() -> None:
    """Tried in shadow mode, a policy denying /payments/refund reports /payments/refund.json as a
    would-be deny, as enforcing it would refuse it."""
    from aegis.policy.evaluator import compile_policy
    from aegis.policy.input import AgentInfo, PolicyCall, build_input
    from aegis.policy.loader import load_document
    from aegis.policy.readings import decide_readings

    policy = compile_policy(
        load_document("""
apiVersion: aegis/v1
kind: Policy
metadata: {name: trial}
spec:
  mode: shadow
  rules:
    - {id: pay, action: allow, match: {tools: ["payments"]}}
    - {id: no-refund, action: deny, match: {tools: ["payments"]},
       when: {path: path_loose, eq: /payments/refund}}
""")
    )
    doc = build_input(PolicyCall(tool="payments", agent=AgentInfo(id="a"), tenant="acme",
                                 env="prod", time=0.0, path="/payments/refund.json"))  # fmt: skip
    decision = decide_readings(policy, doc, policy.evaluate(doc))
    assert decision.action == "allow"
    assert decision.shadow is not None and decision.shadow.action == "deny"


def _decide_path(rules: str, raw_path: str) -> Decision:
    """As the gateway decides a GET to ``raw_path`` for the tool ``app``."""
    from aegis.gateway.target import vet_path
    from aegis.policy.input import AgentInfo, PolicyCall, build_input

    store = MemoryPolicyStore()
    text = "apiVersion: aegis/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  rules:\n" + rules
    store.activate("t", "e", store.put(load_document(text), now=0), actor="x", now=0)
    directory = PolicyDirectory(store, clock=FrozenClock(0), interval=1)
    doc = build_input(PolicyCall(tool="app", agent=AgentInfo(id="a"), tenant="t", env="e",
                                 time=0.0, method="GET", path=vet_path(raw_path)))  # fmt: skip
    return directory.decide("t", "e", "app", "a", doc)


_ALLOW_APP = "    - {id: all, action: allow, match: {tools: [app]}}\n"


@pytest.mark.parametrize("raw", ["/admin.php/x", "/Admin.PHP/anything/else", "/admin.php/"])
def test_a_script_is_denied_whatever_path_follows_it(raw: str) -> None:
    """PHP (and CGI, classic ASP.NET) run ``/admin.php/x`` as ``/admin.php``."""
    rules = _ALLOW_APP + "    - {id: no, action: deny, when: {path: path_loose, eq: /admin.php}}\n"
    decision = _decide_path(rules, raw)
    assert (decision.action, decision.rule_ids) == ("deny", ("no",))
    assert _decide_path(rules, "/admin.html/x").action == "allow"  # not a script


@pytest.mark.parametrize("test", ["regex: '^/admin/'", "contains: /admin/", "regex: '^/admin[/]'"])
def test_a_deny_rule_on_a_subtree_denies_its_index_too(test: str) -> None:
    """Express serves ``/admin`` as ``/admin/``: a deny rule on what follows ``/admin/`` must
    not let ``/admin`` itself through."""
    rules = _ALLOW_APP + f"    - {{id: no, action: deny, when: {{path: path_loose, {test}}}}}\n"
    for raw in ("/admin", "/admin/", "/admin/users"):
        decision = _decide_path(rules, raw)
        assert (decision.action, decision.rule_ids) == ("deny", ("no",)), raw
    assert _decide_path(rules, "/administrator").action == "allow"


def test_an_allow_list_naming_a_path_still_allows_it_without_its_slash() -> None:
    """The reading with a ``/`` added counts only when a deny rule matches it: a path an
    allow-list names exactly is not denied because its slashed form is named nowhere."""
    rules = "    - {id: ok, action: allow, when: {path: path_loose, eq: /status}}\n"
    assert _decide_path(rules, "/status").action == "allow"


def test_a_deny_from_a_variant_names_the_reading_it_came_from() -> None:
    """An allow naming ``/openapi.json`` alone cannot allow it (Rails serves it as
    ``/openapi``, which nothing allows): the deny says which reading and what to write."""
    rules = "    - {id: spec, action: allow, when: {path: path_loose, eq: /openapi.json}}\n"
    decision = _decide_path(rules, "/openapi.json")
    assert decision.action == "deny"
    assert any("'/openapi'" in r and "allow it too" in r for r in decision.reasons)
    both = rules + "    - {id: spec2, action: allow, when: {path: path_loose, eq: /openapi}}\n"
    assert _decide_path(both, "/openapi.json").action == "allow"


def test_the_slashed_reading_holds_for_each_variant_and_every_restricting_rule() -> None:
    """Rails serves /admin.json as /admin/ too; an approval or sanitize rule on a subtree must
    hold the subtree's index as a deny rule does."""
    deny = (
        _ALLOW_APP + "    - {id: no, action: deny, when: {path: path_loose, regex: '^/admin/'}}\n"
    )
    for raw in ("/admin", "/admin.json", "/Admin.JSON", "/admin.html"):
        assert _decide_path(deny, raw).action == "deny", raw
    approve = _ALLOW_APP + (
        "    - {id: pay, action: approval_needed, approval: {group: finance},"
        " when: {path: path_loose, regex: '^/payments/'}}\n"
    )
    for raw in ("/payments", "/payments/", "/payments/x"):
        decision = _decide_path(approve, raw)
        assert decision.action == "approval_needed" and "pay" in decision.rule_ids, raw
    assert _decide_path(approve, "/paymentsx").action == "allow"


def test_readings_combine_their_approvals_and_obligations() -> None:
    """/admin/ is /admin to Express and Rails: the approval groups and redactions that apply to
    either reading all apply, none is dropped, and no call is refused for being read two ways."""
    both = _ALLOW_APP + (
        "    - {id: ops, action: approval_needed, approval: {group: ops},"
        " when: {path: path_loose, regex: '^/admin/'}}\n"
        "    - {id: sec, action: approval_needed, approval: {group: security},"
        " when: {path: path_loose, eq: /admin}}\n"
    )
    for raw in ("/admin", "/admin/"):
        decision = _decide_path(both, raw)
        assert decision.action == "approval_needed", raw
        assert {a.group for a in decision.approvals} == {"ops", "security"}, raw
    redact = _ALLOW_APP + (
        "    - {id: pay, action: approval_needed, approval: {group: finance},"
        " when: {path: path_loose, regex: '^/payments/'}}\n"
        "    - {id: card, action: sanitize, when: {path: path_loose, eq: /payments},"
        " obligations: [{kind: redact, target: request, path: card}]}\n"
    )
    for raw in ("/payments", "/payments/"):
        decision = _decide_path(redact, raw)
        assert decision.action == "approval_needed", raw
        assert [o.path for o in decision.obligations] == ["card"], raw


def test_a_combined_decision_names_the_rules_that_decided_it() -> None:
    """Held because Rails serves /payments/refund.json as /payments/refund: the held call names
    the approval rule, not the allow rule of the path as sent."""
    rules = _ALLOW_APP + (
        "    - {id: refund, action: approval_needed, approval: {group: finance},"
        " when: {path: path_loose, eq: /payments/refund}}\n"
    )
    decision = _decide_path(rules, "/payments/refund.json")
    assert (decision.action, decision.rule_ids) == ("approval_needed", ("refund",))


def test_shadow_mode_reports_what_another_reading_would_hold() -> None:
    """Tried in shadow mode, an approval rule on ^/payments/ reports /payments as held, as
    enforcing it would hold it."""
    rules = _ALLOW_APP + (
        "    - {id: pay, action: approval_needed, approval: {group: finance}, shadow: true,"
        " when: {path: path_loose, regex: '^/payments/'}}\n"
    )
    decision = _decide_path(rules, "/payments")
    assert decision.action == "allow"
    assert decision.shadow is not None and decision.shadow.action == "approval_needed"


def test_a_body_policy_reads_with_an_integer_doubles_round_is_refused_when_decided() -> None:
    """Parsed at the door before a policy reading bodies was in force, the body is still
    refused when that policy decides it."""
    from aegis.policy.input import AgentInfo, PolicyCall, build_input

    store = MemoryPolicyStore()
    text = ("apiVersion: aegis/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  rules:\n" + _ALLOW_APP
            + "    - {id: no, action: deny, when: {path: request.body.to, eq: 9007199254740992}}\n")  # fmt: skip
    store.activate("t", "e", store.put(load_document(text), now=0), actor="x", now=0)
    directory = PolicyDirectory(store, clock=FrozenClock(0), interval=1)
    doc = build_input(PolicyCall(tool="app", agent=AgentInfo(id="a"), tenant="t", env="e",
                                 time=0.0, body={"to": 2**53 + 1}))  # fmt: skip
    with pytest.raises(InvalidRequest, match="send it as a string"):
        directory.decide("t", "e", "app", "a", doc)

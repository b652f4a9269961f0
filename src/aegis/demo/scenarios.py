"""The reference scenarios, run by real agents through the SDK against a :class:`DemoStack`.

The system: an **orchestrator** delegates to a **finance agent** (payments) and a **CRM agent**
(customer lookups), each by a grant signed with its own key and exchanged at the token service.
Each scenario states what must happen and reports what did; a scenario that cannot run in this
build (no approvals) is reported as skipped, never as passed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

import httpx

from aegis.audit.log import AuditLog
from aegis.clock import SystemClock
from aegis.demo.stack import DemoStack
from aegis.demo.tools import CUSTOMER
from aegis.sdk import AegisClientError, AgentClient, ApprovalPolicy, ApprovalRequiredError
from aegis.sdk.approvals import OVERRIDE_HEADER
from aegis.sdk.wire import DECISION_HEADER, error_from_response

__all__ = ["Outcome", "run_scenarios"]

GATEWAY_AUDIENCE: Final = "aegis-gateway"
PAYMENT: Final = {"amount": 120, "account": "GB1234567890"}
LARGE_PAYMENT: Final = {"amount": 12_000, "account": "GB1234567890"}
#: Refusals of the demo's approval that mean "not configured here", not "Aegis got it wrong".
_NOT_AN_APPROVER: Final = frozenset(
    {"approver_unknown", "approver_not_in_group", "approver_not_in_tenant"}
)


@dataclass
class Outcome:
    name: str
    title: str
    expected: str
    actual: str = ""
    ok: bool = False
    skipped: bool = False
    decision_id: str | None = None
    detail: str = ""
    ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Agents:
    orchestrator: AgentClient
    finance: AgentClient
    crm: AgentClient
    ids: dict[str, str]
    #: Grants from the orchestrator, exchanged by the children on first use.
    finance_grant: str
    crm_grant: str


def _capture(http: httpx.Client) -> list[httpx.Request]:
    """Copies of the requests ``http`` sends (a retry re-sends one object with new headers)."""
    sent: list[httpx.Request] = []

    def keep(r: httpx.Request) -> None:
        sent.append(httpx.Request(r.method, r.url, headers=r.headers.copy(), content=r.content))

    http.event_hooks["request"].append(keep)
    return sent


def _refused(exc: AegisClientError) -> str:
    return f"refused: {exc.code}"


def allowed(stack: DemoStack, a: _Agents, out: Outcome) -> None:
    with a.finance.client(stack.gateway, audience=GATEWAY_AUDIENCE, scope="payments:write",
                          on_behalf_of=a.finance_grant) as http:  # fmt: skip
        resp = http.post("/payments/transfer", json=PAYMENT)
    out.decision_id = resp.headers.get(DECISION_HEADER)
    paid = resp.status_code == 200 and resp.json().get("status") == "paid"
    out.actual, out.ok = ("allowed" if paid else f"http {resp.status_code}"), paid
    out.detail = f"finance agent for the orchestrator paid {PAYMENT['amount']}: {resp.json()}"


def denied(stack: DemoStack, a: _Agents, out: Outcome) -> None:
    with a.finance.client(stack.gateway, audience=GATEWAY_AUDIENCE, scope="payments:write") as http:
        try:
            resp = http.post("/payments/transfer", json=PAYMENT)
        except AegisClientError as exc:
            out.actual, out.ok, out.decision_id = (
                _refused(exc),
                exc.code == "access_denied",
                exc.decision_id,
            )
            out.detail = f"the finance agent on its own authority: {exc.message}"
            return
    out.actual = f"http {resp.status_code}"


def replay(stack: DemoStack, a: _Agents, out: Outcome) -> None:
    with a.finance.client(stack.gateway, audience=GATEWAY_AUDIENCE, scope="payments:write",
                          on_behalf_of=a.finance_grant) as http:  # fmt: skip
        sent = _capture(http)
        first = http.post("/payments/transfer", json=PAYMENT)
    if first.status_code != 200:
        out.actual = f"the original call failed: http {first.status_code}"
        return
    copy = sent[-1]
    again = httpx.post(str(copy.url), content=copy.content, headers=dict(copy.headers), timeout=10)
    exc = error_from_response(again) if again.status_code >= 400 else None
    out.decision_id = again.headers.get(DECISION_HEADER)
    out.actual = _refused(exc) if exc else f"http {again.status_code}"
    out.ok = exc is not None and exc.code == "replay_detected"
    out.detail = (
        "the same request, token and DPoP proof sent a second time (an eavesdropper's copy)"
    )


def forged_parent(stack: DemoStack, a: _Agents, out: Outcome) -> None:
    # The CRM agent signs a grant that claims to come from the orchestrator, with its own key.
    forged = a.crm.delegate(a.ids["crm"], scopes=["crm:read"], tools=["crm.customers"],
                            me=a.ids["orchestrator"])  # fmt: skip
    try:
        a.crm.token(GATEWAY_AUDIENCE, "crm:read", on_behalf_of=forged)
    except AegisClientError as exc:
        out.actual, out.ok = _refused(exc), exc.code == "parent_signature_invalid"
        out.detail = "a grant naming the orchestrator but signed by the CRM agent's own key"
        return
    out.actual = "a token was issued"


def pii(stack: DemoStack, a: _Agents, out: Outcome) -> None:
    with a.crm.client(stack.gateway, audience=GATEWAY_AUDIENCE, scope="crm:read",
                      on_behalf_of=a.crm_grant) as http:  # fmt: skip
        resp = http.get("/crm/customers/42")
    out.decision_id = resp.headers.get(DECISION_HEADER)
    body = resp.json() if resp.status_code == 200 else {}
    leaked = [v for v in (CUSTOMER["email"], CUSTOMER["card"]) if str(v) in resp.text]
    out.ok = resp.status_code == 200 and not leaked and body.get("name") == CUSTOMER["name"]
    out.actual = "sanitized" if out.ok else f"http {resp.status_code}, leaked {leaked}"
    out.detail = f"email {body.get('email')!r}, card {body.get('card')!r}"


def approval(stack: DemoStack, a: _Agents, out: Outcome) -> None:
    fin = a.finance
    url = f"{stack.gateway}/payments/transfer"
    auth = {
        "audience": GATEWAY_AUDIENCE,
        "scope": "payments:write",
        "on_behalf_of": a.finance_grant,
    }
    fin.approvals = ApprovalPolicy(enabled=False)
    with fin.client(**auth) as http:
        try:
            http.post(url, json=LARGE_PAYMENT)
            out.actual = "the large payment went through without approval"
            return
        except ApprovalRequiredError as exc:
            approval_id, out.decision_id = exc.approval_id, exc.decision_id
    if approval_id is None:
        out.skipped, out.actual = True, "approval_needed (no approval service in this build)"
        return
    try:
        stack.admin("POST", f"/admin/approvals/{approval_id}/approve", {"reason": "demo approver"})
    except AegisClientError as exc:
        if exc.code not in _NOT_AN_APPROVER:
            raise
        out.skipped = True
        out.actual = f"approval_needed ({approval_id}); this admin key is not an approver here"
        return
    fin.approvals = ApprovalPolicy(timeout=10, poll_initial=0.05, poll_max=0.5)
    with fin.client(**auth) as http:
        sent = _capture(http)
        resp = http.post(url, json=LARGE_PAYMENT)
    override = sent[-1].headers.get(OVERRIDE_HEADER)
    if resp.status_code != 200 or override is None:
        out.actual = f"the approved retry answered http {resp.status_code}"
        return
    token = fin.token(GATEWAY_AUDIENCE, "payments:write", on_behalf_of=a.finance_grant)
    assert fin.signer is not None
    headers = {"Authorization": f"DPoP {token.access_token}", OVERRIDE_HEADER: override,
               "DPoP": fin.signer.proof("POST", url, access_token=token.access_token)}  # fmt: skip
    again = httpx.post(url, json=LARGE_PAYMENT, headers=headers, timeout=10)
    second = error_from_response(again).code if again.status_code >= 400 else "allowed again"
    out.ok = second.startswith("override_") or second == "approval_needed"
    out.actual = f"approval_needed → approved → allowed once; second use {second}"
    out.detail = f"approval {approval_id}, approved by the finance approver over the admin API"


def audit(stack: DemoStack, a: _Agents, out: Outcome, decisions: list[str]) -> None:
    log = AuditLog(stack.config.database_url(), clock=SystemClock())
    try:
        report = log.verify_chain()
        recorded = {r.get("decision_id") for r in log.records(kind="gateway.decision")}
    finally:
        log.close()
    missing = [d for d in decisions if d not in recorded]
    out.ok = report.first_bad is None and not missing
    out.actual = "verified" if out.ok else f"first bad record {report.first_bad}, missing {missing}"
    out.detail = f"{report.records} records hash-chained; every decision above is among them"


SCENARIOS: Final[list[tuple[str, str, str, Callable[..., None]]]] = [
    ("allowed", "Payment for the orchestrator", "allowed", allowed),
    ("denied", "Payment without the orchestrator", "refused: access_denied", denied),
    ("approval", "Large payment, human approval", "approved, then allowed once", approval),
    ("replay", "Replayed request", "refused: replay_detected", replay),
    ("forged_parent", "Forged parent grant", "refused: parent_signature_invalid", forged_parent),
    ("pii", "CRM answer with PII", "sanitized", pii),
]


def _agents(stack: DemoStack) -> _Agents:
    orchestrator = stack.register("orchestrator", ["payments:write", "crm:read"])
    finance = stack.register("finance-agent", ["payments:write"])
    crm = stack.register("crm-agent", ["crm:read"])
    ids = {k: stack.agent_id(n) for k, n in
           (("orchestrator", "orchestrator"), ("finance", "finance-agent"), ("crm", "crm-agent"))}  # fmt: skip
    me = ids["orchestrator"]
    return _Agents(
        orchestrator, finance, crm, ids,
        orchestrator.delegate(ids["finance"], scopes=["payments:write"],
                              tools=["payments.transfer"], me=me, lifetime=300),
        orchestrator.delegate(ids["crm"], scopes=["crm:read"], tools=["crm.customers"], me=me,
                              lifetime=300),
    )  # fmt: skip


def run_scenarios(stack: DemoStack) -> list[Outcome]:
    a = _agents(stack)
    outcomes: list[Outcome] = []
    try:
        for name, title, expected, fn in SCENARIOS:
            outcomes.append(_run(Outcome(name, title, expected), fn, stack, a))
        decisions = [o.decision_id for o in outcomes if o.decision_id]
        check = Outcome("audit", "Audit chain", "verified")
        outcomes.append(_run(check, lambda s, ag, o: audit(s, ag, o, decisions), stack, a))
    finally:
        for agent in (a.orchestrator, a.finance, a.crm):
            agent.close()
    return outcomes


def _run(out: Outcome, fn: Callable[..., None], stack: DemoStack, a: _Agents) -> Outcome:
    started = time.perf_counter()
    try:
        fn(stack, a, out)
    except AegisClientError as exc:
        out.ok, out.actual, out.decision_id = False, _refused(exc), exc.decision_id
        out.detail = exc.message
    except (httpx.HTTPError, OSError, ValueError) as exc:
        out.ok, out.actual = False, f"error: {type(exc).__name__}: {exc}"
    out.ms = round((time.perf_counter() - started) * 1000, 1)
    return out

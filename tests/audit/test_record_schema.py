"""The gateway's audit record: every field is documented in docs/audit.md, and it is minimal."""

from __future__ import annotations

import re
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider

from aegis.gateway.context import CallContext, Route
from aegis.gateway.evidence import EvidenceFacts, Result, audit_record

DOC = Path(__file__).parents[2] / "docs" / "audit.md"


def _documented() -> set[str]:
    text = DOC.read_text()
    table = text.split("## Record schema", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))


def _record(**ctx_kw: object) -> dict[str, object]:
    route = Route("/pay", "http://upstream", "payments", "acme", "prod")
    ctx = CallContext(
        method="POST",
        url="https://gw/pay?account=12345&memo=x",
        host="gw",
        path="/pay",
        route=route,
        query=(("account", "12345"), ("memo", "x")),
        **ctx_kw,  # type: ignore[arg-type]
    )
    facts = EvidenceFacts(decision_id="dec-1", time=1.0)
    result = Result("dec-1", "deny", 401, "invalid_token", "no token")
    return audit_record(ctx, facts, result, "sha256:00", None)


def test_every_field_is_documented_and_every_documented_field_exists() -> None:
    record = {**_record(), "kind": "gateway.decision"}  # the log adds kind
    assert set(record) == _documented()


def test_parameters_are_digests_and_ids_are_vetted() -> None:
    record = _record(headers=(("x-correlation-id", "req-42"),))
    params = record["params"]
    assert isinstance(params, dict) and set(params) == {"account", "memo"}
    assert "12345" not in str(record) and all(str(v).startswith("sha256:") for v in params.values())
    assert record["correlation_id"] == "req-42"
    assert _record(headers=(("x-request-id", "bad id\n<script>"),))["correlation_id"] is None
    assert _record(headers=(("x-request-id", "a" * 129),))["correlation_id"] is None


def test_the_trace_id_of_the_decision_span_is_recorded() -> None:
    assert _record()["trace_id"] is None
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("decide") as span:
        want = f"{span.get_span_context().trace_id:032x}"
        assert _record()["trace_id"] == want


def test_parameters_the_policy_redacts_are_not_even_hashed() -> None:
    from aegis.policy.decision import Decision, SanitizeObligation

    route = Route("/pay", "http://upstream", "payments", "acme", "prod")
    ctx = CallContext(
        method="POST", url="https://gw/pay", host="gw", path="/pay", route=route,
        query=(("account", "12345"), ("memo", "x")),
    )  # fmt: skip
    facts = EvidenceFacts(decision_id="dec-1", time=1.0)
    facts.decision = Decision(
        "sanitize", ("pii",), ("r1",), "v1",
        obligations=(SanitizeObligation("redact", "request", path="customer.account"),),
    )  # fmt: skip
    result = Result("dec-1", "sanitize", 200, None, "allowed")
    params = audit_record(ctx, facts, result, "sha256:00", None)["params"]
    assert params["account"] == "redacted" and params["memo"].startswith("sha256:")

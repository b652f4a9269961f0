"""The gateway end to end over real HTTP on loopback: control plane, gateway and tool server each in
its own uvicorn server. A DPoP agent gets a token and calls the payments tool; then each attack or
outage is refused with its own code, evidenced by an audit record, a span and a counter."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.routing import Mount
from tests.gateway.harness import BIG_ANSWER, AgentClient, Upstream, serve
from tests.support.server import RunningServer, free_port, run_server

from aegis.audit.log import AuditLog
from aegis.clock import FrozenClock
from aegis.config import GatewaySettings
from aegis.crypto.jws import sign_compact
from aegis.crypto.keys import Ed25519SigningKey
from aegis.gateway.app import build_pipeline, create_gateway_app
from aegis.gateway.proxy import ReverseProxy
from aegis.policy.loader import load_document
from aegis.policy.store import MemoryPolicyStore
from aegis.stores import open_replay_store
from aegis.telemetry import names
from aegis.telemetry.metrics import REGISTRY
from aegis.telemetry.tracing import set_tracer_provider
from aegis.tokens.issuer import TokenIssuer
from aegis.types import AgentStatus

pytestmark = pytest.mark.slow


@dataclasses.dataclass
class Stack:
    srv: RunningServer
    gateway: str
    #: The same gateway behind uvicorn's h11 parser (the one the mTLS listener uses).
    h11_gateway: str
    dead_gateway: str
    upstream: Upstream
    audit: AuditLog
    spans: InMemorySpanExporter
    refusals: list[str]
    policies: MemoryPolicyStore
    upstream_url: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    set_tracer_provider(provider)
    upstream = Upstream()
    with run_server(tmp_path_factory.mktemp("gateway")) as srv, serve(upstream.app) as up:
        gw_port = free_port()
        settings = GatewaySettings.model_validate(
            {
                "port": gw_port,
                "routes": [
                    {"path_prefix": "/payments", "upstream": up, "tool": "payments",
                     "tenant": "acme", "env": "prod"},
                    {"path_prefix": "/crm", "upstream": up, "tool": "crm",
                     "tenant": "acme", "env": "prod"},
                ],
                "allow": [{"tool": "payments"}],
                # Every call below goes through this budget; /slow (3 s) must still exceed it.
                "upstream_timeout": 2.0,
                "policy_poll_interval": 0.05,
            }
        )  # fmt: skip
        audit = AuditLog(srv.config.database_url(), clock=srv.services.clock)
        policies = MemoryPolicyStore()
        pipeline = build_pipeline(srv.services, settings, policy_store=policies, audit=audit)
        dead = dataclasses.replace(
            srv.services,
            replay=open_replay_store("redis://127.0.0.1:1", clock=srv.services.clock),
            extras={},
        )
        dead_pipeline = build_pipeline(
            dead, settings, policy_store=MemoryPolicyStore(), audit=audit
        )
        with (
            serve(create_gateway_app(srv.services, settings, pipeline=pipeline), gw_port) as gw,
            serve(
                create_gateway_app(srv.services, settings, pipeline=pipeline), http="h11"
            ) as h11_gw,
            serve(create_gateway_app(dead, settings, pipeline=dead_pipeline)) as dead_gw,
        ):
            yield Stack(srv, gw, h11_gw, dead_gw, upstream, audit, exporter, [], policies, up)
    set_tracer_provider(None)


def call(
    stack: Stack, agent: AgentClient, token: str, base: str | None = None, **kw: Any
) -> httpx.Response:
    url = f"{base or stack.gateway}/payments/charge"
    resp = httpx.post(url, json={"amount": 12}, headers=agent.headers(token, "POST", url, **kw))
    if resp.status_code != 200:
        stack.refusals.append(resp.headers["x-aegis-decision-id"])
    return resp


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels or None) or 0.0


def activate(stack: Stack, policy: str) -> str:
    """Put ``policy`` and activate it for acme/prod; its version, once the gateway has polled."""
    version = stack.policies.put(load_document(policy), now=time.time())
    stack.policies.activate("acme", "prod", version, actor="test", now=time.time())
    time.sleep(0.1)  # one poll interval
    return version


def test_dpop_agent_calls_payments_and_upstream_sees_identity(stack: Stack) -> None:
    agent = AgentClient(stack.srv, "payer")
    token = agent.access_token()
    resp = call(stack, agent, token)
    assert resp.status_code == 200, resp.text
    assert resp.json()["ok"] is True
    seen = stack.upstream.seen[-1]["headers"]
    assert seen["x-aegis-agent-id"] == agent.id
    assert seen["x-aegis-tenant"] == "acme"
    assert seen["x-aegis-decision-id"] == resp.headers["x-aegis-decision-id"]
    assert seen["x-aegis-attestation"] == resp.headers["x-aegis-attestation"]
    assert "authorization" not in seen and "dpop" not in seen


def test_forged_identity_headers_are_stripped(stack: Stack) -> None:
    agent = AgentClient(stack.srv, "forger")
    token = agent.access_token()
    url = f"{stack.gateway}/payments/charge"
    headers = {
        **agent.headers(token, "POST", url),
        "x-aegis-agent-id": "admin",
        "Connection": "x-secret",
        "x-secret": "1",
    }
    resp = httpx.post(url, json={}, headers=headers)
    assert resp.status_code == 200
    seen = stack.upstream.seen[-1]["headers"]
    assert seen["x-aegis-agent-id"] == agent.id
    assert "x-secret" not in seen


def test_client_claims_about_proxies_are_replaced_by_what_the_gateway_saw(stack: Stack) -> None:
    agent = AgentClient(stack.srv, "claimer")
    token = agent.access_token()
    url = f"{stack.gateway}/payments/charge"
    claims = {
        "x-forwarded-for": "10.0.0.1", "x-forwarded-proto": "https",
        "x-forwarded-host": "admin.internal", "x_forwarded_host": "admin.internal",
        "x-forwarded-port": "443", "forwarded": "for=10.0.0.1;proto=https", "x-real-ip": "10.0.0.1",
        # A certificate an upstream would take for one a TLS-terminating proxy checked.
        "client-cert": ":MIIB:", "x-ssl-client-cert": "-----BEGIN", "x_ssl_client_verify": "SUCCESS",
        "x-arr-clientcert": "MIIB", "x-amzn-mtls-clientcert-leaf": "MIIB",
    }  # fmt: skip
    resp = httpx.post(url, json={}, headers={**agent.headers(token, "POST", url), **claims})
    assert resp.status_code == 200, resp.text
    seen = stack.upstream.seen[-1]["headers"]
    host = url.split("/")[2]
    assert (seen["x-forwarded-for"], seen["x-forwarded-proto"]) == ("127.0.0.1", "http")
    assert seen["x-forwarded-host"] == host
    for name in ("x-forwarded-port", "x_forwarded_host", "forwarded", "x-real-ip", "client-cert",
                 "x-ssl-client-cert", "x_ssl_client_verify", "x-arr-clientcert",
                 "x-amzn-mtls-clientcert-leaf"):  # fmt: skip
        assert name not in seen, name


def test_replayed_proof_is_refused(stack: Stack) -> None:
    agent = AgentClient(stack.srv, "replayer")
    token = agent.access_token()
    url = f"{stack.gateway}/payments/charge"
    headers = agent.headers(token, "POST", url)
    before = metric("aegis_replay_attempts_total")
    assert httpx.post(url, json={}, headers=headers).status_code == 200
    again = httpx.post(url, json={}, headers=headers)
    stack.refusals.append(again.headers["x-aegis-decision-id"])
    assert again.status_code == 401
    assert again.json()["code"] == "replay_detected"
    assert again.headers["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"')
    assert metric("aegis_replay_attempts_total") == before + 1


def test_expired_token_is_refused(stack: Stack) -> None:
    agent = AgentClient(stack.srv, "late")
    svc = stack.srv.services
    past = TokenIssuer(
        svc.keyring, issuer=stack.srv.config.issuer, clock=FrozenClock(time.time() - 3600)
    )
    from tests.gateway.helpers import jkt_of

    token = past.issue(
        agent_id=agent.id, client_id=agent.client_id, tenant="acme", env="prod",
        scopes=("payments:write",), audience=("aegis-gateway",), lifetime=300,
        cnf={"jkt": jkt_of(agent.key)},
    ).token  # fmt: skip
    before = metric("aegis_expired_token_rejections_total")
    resp = call(stack, agent, token)
    assert resp.status_code == 401
    assert resp.json()["code"] == "token_expired"
    assert metric("aegis_expired_token_rejections_total") == before + 1


def test_token_signed_by_swapped_key_ring_is_refused_and_traced(stack: Stack) -> None:
    agent = AgentClient(stack.srv, "swapped")
    head, payload, _ = agent.access_token().split(".")
    import json

    from aegis.crypto.keys import b64u_decode

    forged = sign_compact(head, json.loads(b64u_decode(payload)), Ed25519SigningKey.generate().sign)
    before = metric("aegis_failed_signature_verifications_total")
    stack.spans.clear()
    resp = call(stack, agent, forged)
    assert resp.status_code == 401
    assert resp.json()["code"] == "invalid_signature"
    assert metric("aegis_failed_signature_verifications_total") == before + 1
    spans = [s for s in stack.spans.get_finished_spans() if s.name == names.SPAN_GATEWAY_DECIDE]
    assert spans, "no decision span"
    attrs = spans[-1].attributes or {}
    assert attrs[names.VERIFICATION_RESULT] is False
    assert attrs[names.DECISION] == "deny"
    assert attrs[names.DECISION_ID] == resp.headers["x-aegis-decision-id"]


def test_suspended_agent_is_refused_within_one_second(stack: Stack) -> None:
    agent = AgentClient(stack.srv, "suspended")
    token = agent.access_token()
    assert call(stack, agent, token).status_code == 200
    stack.srv.services.registry.set_agent_status(agent.id, AgentStatus.SUSPENDED, actor="test")
    started = time.monotonic()
    # Timed from when each call is sent: no call sent more than 1 s after the suspension may be
    # let through (a loaded runner's slow round trip must not count against the gateway).
    while True:
        sent = time.monotonic() - started
        resp = call(stack, agent, token)
        if resp.status_code != 200:
            break
        assert sent <= 1.0, f"a call sent {sent:.2f}s after the suspension was let through"
        time.sleep(0.05)
    assert resp.status_code in (401, 403)
    assert resp.json()["code"] in ("agent_inactive", "token_revoked")


def test_dead_replay_store_fails_closed(stack: Stack) -> None:
    agent = AgentClient(stack.srv, "outage")
    token = agent.access_token()
    for _ in range(3):
        resp = call(stack, agent, token, base=stack.dead_gateway)
        assert resp.status_code == 503, resp.text
        assert resp.json()["code"] == "replay_store_unavailable"
        assert resp.headers["retry-after"] == "1"


def _forward_failure(stack: Stack, decision_id: str) -> dict[str, object]:
    (record,) = [
        r
        for r in stack.audit.records(kind="gateway.forward_failed")
        if r["decision_id"] == decision_id
    ]
    return record


def test_upstream_timeout_is_504_and_recorded_beside_the_allow(stack: Stack) -> None:
    """The call was allowed (its decision record says so) but not delivered: a second record,
    written before the 504 is answered, says what became of it."""
    agent = AgentClient(stack.srv, "slow")
    token = agent.access_token()
    url = f"{stack.gateway}/payments/slow"
    labels = {"tool": "payments", "code": "upstream_timeout"}
    before = metric("aegis_gateway_forward_failures_total", **labels)
    resp = httpx.post(url, json={}, headers=agent.headers(token, "POST", url), timeout=10)
    assert resp.status_code == 504
    assert resp.json()["error"] == "upstream_timeout"
    decision_id = resp.json()["decision_id"]
    assert resp.headers["x-aegis-decision-id"] == decision_id
    (decided,) = [
        r for r in stack.audit.records(kind="gateway.decision") if r["decision_id"] == decision_id
    ]
    assert decided["action"] == "allow"
    failed = _forward_failure(stack, decision_id)
    assert (failed["status"], failed["code"]) == (504, "upstream_timeout")
    assert (failed["tool"], failed["path"], failed["agent_id"]) == (
        "payments",
        "/payments/slow",
        agent.id,
    )
    assert metric("aegis_gateway_forward_failures_total", **labels) == before + 1


def test_oversized_body_is_413_and_audited(stack: Stack) -> None:
    agent = AgentClient(stack.srv, "big")
    token = agent.access_token()
    url = f"{stack.gateway}/payments/charge"
    stack.spans.clear()
    resp = httpx.post(
        url, content=b"x" * (2 * 1024 * 1024), headers=agent.headers(token, "POST", url)
    )
    assert resp.status_code == 413
    assert resp.json()["code"] == "payload_too_large"
    decision_id = resp.headers["x-aegis-decision-id"]
    stack.refusals.append(decision_id)
    # A refusal the proxy makes before the pipeline runs has its decision span too, and its
    # record names the span's trace.
    [span] = [s for s in stack.spans.get_finished_spans() if s.name == names.SPAN_GATEWAY_DECIDE]
    assert span.attributes is not None
    assert span.attributes[names.DECISION_ID] == decision_id
    record = next(r for r in stack.audit.records() if r.get("decision_id") == decision_id)
    assert record["trace_id"] == f"{span.context.trace_id:032x}"


def test_a_streamed_body_over_the_limit_is_413(stack: Stack) -> None:
    agent = AgentClient(stack.srv, "stream")
    token = agent.access_token()
    url = f"{stack.gateway}/payments/charge"
    chunk = b"x" * (256 * 1024)

    def body() -> Iterator[bytes]:
        for _ in range(8):  # 2 MiB with no content-length: past the 1 MiB limit mid-stream
            yield chunk

    headers = {**agent.headers(token, "POST", url), "content-type": "application/octet-stream"}
    resp = httpx.post(url, content=body(), headers=headers, timeout=10)
    assert resp.status_code == 413, resp.text
    assert resp.json()["code"] == "payload_too_large"
    assert resp.json()["decision_id"] == resp.headers["x-aegis-decision-id"]
    failed = _forward_failure(stack, resp.json()["decision_id"])
    assert (failed["status"], failed["code"]) == (413, "payload_too_large")
    # The part of the body that had gone on to the upstream before the cut is bound to the
    # decision: at most the limit, all of it the bytes the client sent.
    assert 0 < failed["bytes"] <= 1024 * 1024
    assert failed["complete"] is False
    assert failed["body_digest"] == "sha256:" + hashlib.sha256(b"x" * failed["bytes"]).hexdigest()


def test_metrics_and_health(stack: Stack) -> None:
    assert httpx.get(f"{stack.gateway}/healthz").json() == {"status": "ok"}
    not_found = {"action": "deny", "reason": "not_found"}
    before = metric("aegis_decisions_total", **not_found)
    assert httpx.get(f"{stack.gateway}/nowhere").status_code == 404
    assert metric("aegis_decisions_total", **not_found) == before + 1
    text = httpx.get(f"{stack.gateway}/metrics").text
    assert 'aegis_decisions_total{action="allow",reason="ok"}' in text
    assert "aegis_pipeline_step_seconds_bucket" in text
    assert 'aegis_decisions_total{action="deny",reason="not_found"}' in text


def test_methods_the_proxy_does_not_forward_are_405_and_counted(stack: Stack) -> None:
    refused = {"action": "deny", "reason": "method_not_allowed"}
    before, seen = metric("aegis_decisions_total", **refused), len(stack.upstream.seen)
    resp = httpx.request("TRACE", f"{stack.gateway}/payments/x")
    assert resp.status_code == 405
    assert resp.json()["code"] == "method_not_allowed"
    assert "POST" in resp.headers["allow"] and "TRACE" not in resp.headers["allow"]
    assert metric("aegis_decisions_total", **refused) == before + 1
    assert len(stack.upstream.seen) == seen


def test_small_answers_are_sent_whole_and_large_ones_relayed_intact(stack: Stack) -> None:
    agent = AgentClient(stack.srv, "reader")
    token = agent.access_token()
    small = call(stack, agent, token)
    assert small.status_code == 200, small.text
    assert small.headers["content-length"] == str(len(small.content))
    assert "transfer-encoding" not in small.headers
    url = f"{stack.gateway}/payments/big"
    big = httpx.post(
        url,
        content=b"{}",
        headers={
            **agent.headers(agent.access_token(), "POST", url),
            "content-type": "application/json",
        },
    )
    assert big.status_code == 200, big.text
    assert big.content == BIG_ANSWER
    assert big.headers.get("transfer-encoding") == "chunked"  # relayed as it arrived
    assert "x-aegis-attestation" in big.headers


def test_large_binary_body_is_streamed_through_intact(stack: Stack) -> None:
    agent = AgentClient(stack.srv, "uploader")
    token = agent.access_token()
    url = f"{stack.gateway}/payments/upload"
    payload = bytes(range(256)) * 800  # 200 KiB, above policy_body_bytes
    headers = {**agent.headers(token, "POST", url), "content-type": "application/octet-stream"}
    resp = httpx.post(url, content=payload, headers=headers)
    assert resp.status_code == 200, resp.text
    assert stack.upstream.seen[-1]["body"] == payload
    record = next(
        r for r in stack.audit.records(kind="gateway.decision")
        if r["decision_id"] == resp.headers["x-aegis-decision-id"]
    )  # fmt: skip
    assert record["action"] == "allow" and record["request_digest"].startswith("sha256:")
    # Decided (and attested) before the bytes arrived, so a second record binds the bytes that
    # were forwarded to that decision.
    (body,) = [r for r in stack.audit.records(kind="gateway.body")
               if r["decision_id"] == record["decision_id"]]  # fmt: skip
    assert body["body_digest"] == "sha256:" + hashlib.sha256(payload).hexdigest()
    assert (body["bytes"], body["complete"], body["tool"]) == (len(payload), True, "payments")
    assert body["agent_id"] == agent.id


@pytest.mark.parametrize(
    "path",
    [
        "/payments/../crm/lookup",
        "/payments/%2e%2e/crm/lookup",
        "/payments/%2E%2e/crm/lookup",
        "/payments%2F..%2Fcrm/lookup",
        "/payments/./../crm/lookup",
        "/payments/..%5Ccrm/lookup",
        "/payments/%252e%252e/crm/lookup",
    ],
)
def test_dot_segments_cannot_reach_another_route(stack: Stack, path: str) -> None:
    """The route and tool are decided on the path; a path the upstream would read as another
    route's (dot segments, encoded separators) is refused, never forwarded under the wrong tool."""
    agent = AgentClient(stack.srv, "walker")
    token = agent.access_token()
    url = f"{stack.gateway}{path}"
    seen = len(stack.upstream.seen)
    host, port = stack.gateway.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:  # http.client sends the path as written (httpx would remove the dot segments)
        conn.request("POST", path, body=b"{}", headers={
            **agent.headers(token, "POST", url), "content-type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        status, body, decision = (
            resp.status,
            json.loads(resp.read()),
            resp.getheader("x-aegis-decision-id"),
        )
    finally:
        conn.close()
    assert status == 400, body
    assert body["code"] == "invalid_request"
    assert len(stack.upstream.seen) == seen
    assert decision is not None
    stack.refusals.append(decision)


def test_encoded_path_is_forwarded_as_sent(stack: Stack) -> None:
    agent = AgentClient(stack.srv, "encoder")
    token = agent.access_token()
    url = f"{stack.gateway}/payments/a%20b%3Fc?q=1"
    resp = httpx.post(url, json={}, headers=agent.headers(token, "POST", url))
    assert resp.status_code == 200, resp.text
    seen = stack.upstream.seen[-1]
    assert seen["raw_path"] == b"/payments/a%20b%3Fc"  # byte for byte: %3F is not a query
    assert seen["query"] == "q=1"


SANITIZE = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: e2e}
spec:
  rules:
    - {id: pay, action: allow, reason: payments allowed, match: {tools: [payments]}}
    - id: crm-sanitize
      action: sanitize
      reason: crm calls are sanitized
      match: {tools: [crm]}
      obligations:
        - {kind: redact, target: request, path: ssn}
        - {kind: drop_header, target: request, header: x-internal}
        - {kind: mask, target: response, pattern: card_number}
"""


def test_sanitize_policy_rewrites_request_and_response(stack: Stack) -> None:
    version = activate(stack, SANITIZE)
    agent = AgentClient(stack.srv, "crm")
    token = agent.access_token()
    url = f"{stack.gateway}/crm/lookup"
    headers = {**agent.headers(token, "POST", url), "x-internal": "secret"}
    resp = httpx.post(url, json={"name": "ann", "ssn": "123-45-6789"}, headers=headers)
    assert resp.status_code == 200, resp.text
    seen = stack.upstream.seen[-1]
    assert b"123-45-6789" not in seen["body"] and b"ann" in seen["body"]
    # The decision's digest covers the body received; a second record the body forwarded.
    [forwarded] = [r for r in stack.audit.records(kind="gateway.body")
                   if r["decision_id"] == resp.headers["x-aegis-decision-id"]]  # fmt: skip
    assert forwarded["sanitized"] and forwarded["bytes"] == len(seen["body"])
    assert forwarded["body_digest"] == "sha256:" + hashlib.sha256(seen["body"]).hexdigest()
    assert "x-internal" not in seen["headers"]
    assert "4111 1111 1111 1111" not in resp.text
    record = next(
        r for r in stack.audit.records(kind="gateway.decision")
        if r["decision_id"] == resp.headers["x-aegis-decision-id"]
    )  # fmt: skip
    assert record["action"] == "sanitize" and record["policy_version"] == version


DRY_RUN_ONLY = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: dry-run-only}
spec:
  rules:
    - {id: dry, action: allow, reason: dry runs only, match: {tools: [crm]},
       when: {path: request.headers.x-dry-run, eq: "1"}}
    - {id: pay, action: allow, reason: payments allowed, match: {tools: [payments]}}
"""


def test_policy_does_not_decide_on_a_field_the_upstream_never_receives(stack: Stack) -> None:
    activate(stack, DRY_RUN_ONLY)
    agent = AgentClient(stack.srv, "dry-runner")
    token = agent.access_token()
    url = f"{stack.gateway}/crm/export"
    ok = httpx.post(url, json={}, headers={**agent.headers(token, "POST", url), "x-dry-run": "1"})
    assert ok.status_code == 200, ok.text
    assert stack.upstream.seen[-1]["headers"]["x-dry-run"] == "1"
    # Named in Connection, the field is hop-by-hop: dropped before forwarding, so the upstream
    # would run the export for real. Policy must not see it either.
    headers = {**agent.headers(token, "POST", url), "x-dry-run": "1", "connection": "x-dry-run"}
    before = len(stack.upstream.seen)
    resp = httpx.post(url, json={}, headers=headers)
    assert (resp.status_code, resp.json()["code"]) == (403, "access_denied"), resp.text
    # A second spelling CGI and WSGI read as the same field, or the field twice: the upstream
    # may read "0" (or "1,0") and run the export for real, so neither is decided.
    for extra in ([("x-dry-run", "1"), ("x_dry_run", "0")], [("x-dry-run", "1"), ("x-dry-run", "0")],
                  [("X_Dry_Run", "1")]):  # fmt: skip
        resp = httpx.post(
            url, json={}, headers=[*agent.headers(token, "POST", url).items(), *extra]
        )
        assert (resp.status_code, resp.json()["code"]) == (400, "invalid_request"), extra
    assert len(stack.upstream.seen) == before


FROM_THE_OFFICE = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: from-the-office}
spec:
  rules:
    - {id: office, action: allow, reason: office addresses only, match: {tools: [crm]},
       when: {path: request.headers.x-forwarded-for, eq: "10.9.9.9"}}
    - {id: pay, action: allow, reason: payments allowed, match: {tools: [payments]}}
"""


NO_FORWARDING = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: no-forwarding}
spec:
  rules:
    - id: crm-private
      action: sanitize
      reason: the crm is not told where calls come from
      match: {tools: [crm]}
      obligations:
        - {kind: drop_header, target: request, header: x-forwarded-for}
        - {kind: mask, target: request, pattern: card_number}
    - {id: pay, action: allow, reason: payments allowed, match: {tools: [payments]}}
"""


def test_obligations_apply_to_the_gateways_own_fields_and_refuse_what_they_cannot_rewrite(
    stack: Stack,
) -> None:
    activate(stack, NO_FORWARDING)
    agent = AgentClient(stack.srv, "privacy")
    token = agent.access_token()
    url = f"{stack.gateway}/crm/lookup"
    resp = httpx.post(url, json={}, headers=agent.headers(token, "POST", url))
    assert resp.status_code == 200, resp.text
    assert "x-forwarded-for" not in stack.upstream.seen[-1]["headers"]
    # A mask cannot rewrite a header's name: refused rather than forwarded unmasked.
    named = {**agent.headers(token, "POST", url), "x-note-4111-1111-1111-1111": "1"}
    resp = httpx.post(url, json={}, headers=named)
    assert (resp.status_code, resp.json()["code"]) == (403, "policy_error"), resp.text


def test_policy_sees_the_proxy_fields_the_upstream_receives(stack: Stack) -> None:
    """A caller's X-Forwarded-For is replaced by the gateway's own before forwarding, so a rule
    on it must read the gateway's value too, not the claim."""
    activate(stack, FROM_THE_OFFICE)
    agent = AgentClient(stack.srv, "spoofer")
    token = agent.access_token()
    url = f"{stack.gateway}/crm/export"
    before = len(stack.upstream.seen)
    for claim in ("x-forwarded-for", "X_Forwarded_For"):
        headers = {**agent.headers(token, "POST", url), claim: "10.9.9.9"}
        resp = httpx.post(url, json={}, headers=headers)
        assert (resp.status_code, resp.json()["code"]) == (403, "access_denied"), resp.text
    assert len(stack.upstream.seen) == before


STRICT_SANITIZE = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: strict-sanitize}
spec:
  rules:
    - {id: pay, action: allow, reason: payments allowed, match: {tools: [payments]}}
    - id: crm-sanitize
      action: sanitize
      reason: card data never reaches the crm
      match: {tools: [crm]}
      obligations:
        - {kind: redact, target: request, path: card}
        - {kind: mask, target: request, pattern: card_number}
        - {kind: drop_header, target: request, header: x-internal}
        - {kind: redact, target: response, path: card}
"""
CARD = "4111 1111 1111 1111"


def test_sanitize_refuses_what_it_cannot_rewrite(stack: Stack) -> None:
    """A sanitize decision is forwarded only as rewritten: a body, query or path it cannot
    rewrite is refused, never passed on as it came."""
    activate(stack, STRICT_SANITIZE)
    agent = AgentClient(stack.srv, "carder")
    token = agent.access_token()

    def send(path: str, content: bytes, ctype: str, **extra: str) -> httpx.Response:
        url = f"{stack.gateway}/crm/{path}"
        headers = {**agent.headers(token, "POST", url), "content-type": ctype, **extra}
        return httpx.post(url, content=content, headers=headers)

    before = len(stack.upstream.seen)
    refused = [
        # Not JSON: a redaction of "card" finds no member, the mask was never applied.
        (send("lookup", f"card={CARD}".encode(), "application/x-www-form-urlencoded"),
         "policy_error"),
        (send("lookup", json.dumps({"note": CARD}).encode(), "text/plain"), "policy_error"),
        # Policy and the sanitizer read the last "card"; an upstream may read the first.
        (send("lookup", b'{"card": "' + CARD.encode() + b'", "card": "x"}', "application/json"),
         "invalid_request"),
        # Data in the query string or the path is forwarded as sent.
        (send("lookup?card=1", b'{"name": "ann"}', "application/json"), "policy_error"),
        (send("lookup?q=" + CARD.replace(" ", "%20"), b"{}", "application/json"), "policy_error"),
        (send("cards/4111111111111111", b"{}", "application/json"), "policy_error"),
    ]  # fmt: skip
    for resp, code in refused:
        assert resp.json()["code"] == code, resp.text
        assert resp.status_code in (400, 403)
    assert len(stack.upstream.seen) == before  # none of them reached the tool

    resp = send("lookup", json.dumps({"name": "ann", "card": CARD}).encode(), "application/json",
                x_internal="secret")  # fmt: skip
    assert resp.status_code == 200, resp.text
    seen = stack.upstream.seen[-1]
    assert json.loads(seen["body"]) == {"name": "ann", "card": "[REDACTED]"}
    # Dropped however spelled: a CGI or WSGI upstream reads x_internal as x-internal.
    assert not {"x-internal", "x_internal"} & set(seen["headers"])
    assert resp.json()["card"] == "[REDACTED]"
    # JSON the upstream labels as text cannot be redacted by member: refused, not passed on.
    resp = send("text-json", b"{}", "application/json")
    assert (resp.status_code, resp.json()["error"]) == (502, "bad_gateway")
    assert CARD not in resp.text


def test_a_text_answer_hiding_digits_from_the_mask_is_refused(stack: Stack) -> None:
    """The mask reads a text answer as UTF-8; one the client reads otherwise (a UTF-16 label,
    UTF-16 bytes under no label, digits written as JSON escapes or HTML references) is a 502,
    never relayed with the card number in it."""
    activate(stack, SANITIZE)
    agent = AgentClient(stack.srv, "hider")
    token = agent.access_token()
    for form in ("utf16", "nul", "json-escape", "entity"):
        url = f"{stack.gateway}/crm/text-hidden?{form}"
        resp = httpx.post(url, json={}, headers=agent.headers(token, "POST", url))
        assert (resp.status_code, resp.json()["error"]) == (502, "bad_gateway"), (form, resp.text)
        assert "1111" not in resp.text
    url = f"{stack.gateway}/crm/text-hidden?plain"
    resp = httpx.post(url, json={}, headers=agent.headers(token, "POST", url))
    assert resp.status_code == 200 and CARD not in resp.text and "card " in resp.text


def test_an_answer_too_large_to_sanitize_is_refused_not_held(stack: Stack) -> None:
    """An answer to be sanitized is read whole into memory, so only up to max_body_bytes
    (1 MiB here): a 2 MiB one, with or without a content-length, is a 502."""
    activate(stack, SANITIZE)
    agent = AgentClient(stack.srv, "hoarder")
    token = agent.access_token()
    for target in ("huge", "huge?streamed"):
        url = f"{stack.gateway}/crm/{target}"
        resp = httpx.post(url, json={}, headers=agent.headers(token, "POST", url))
        assert (resp.status_code, resp.json()["error"]) == (502, "bad_gateway"), resp.text[:200]
        assert "larger than" in resp.json()["error_description"]
        assert "4111 1111 1111 1111" not in resp.text


BODY_CAP = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: body-cap}
spec:
  rules:
    - {id: pay, action: allow, reason: payments allowed, match: {tools: [payments]}}
    - {id: cap, action: deny, reason: over the cap, match: {tools: [payments]},
       when: {path: request.body.amount, gt: 1000}}
"""


def test_a_body_rule_cannot_be_dodged_by_padding_or_content_type(stack: Stack) -> None:
    """A deny rule on the body does not fire for a body policy never saw, so the gateway shows
    policy every body it reads (whatever its size within the limit) and refuses the rest."""
    activate(stack, BODY_CAP)
    agent = AgentClient(stack.srv, "padder")
    token = agent.access_token()
    url = f"{stack.gateway}/payments/charge"

    def send(content: bytes, ctype: str, extra: dict[str, str] | None = None) -> httpx.Response:
        headers = {**agent.headers(token, "POST", url), "content-type": ctype, **(extra or {})}
        resp = httpx.post(url, content=content, headers=headers)
        if resp.status_code != 200:
            stack.refusals.append(resp.headers["x-aegis-decision-id"])
        return resp

    big = json.dumps({"amount": 5000, "pad": "x" * 200_000}).encode()  # > policy_body_bytes
    assert send(big, "application/json").json()["code"] == "access_denied"
    resp = send(b'{"amount": 5000}', "text/plain")
    assert (resp.status_code, resp.json()["code"]) == (400, "invalid_request")
    assert send(b'{"amount": 5000}', "application/json").json()["code"] == "access_denied"
    assert send(b'{"amount": 5}', "application/json").status_code == 200
    # Under a content coding the upstream acts on what decoding yields, not on these bytes.
    for coding in ("br", "gzip", "identity, br"):
        resp = send(b'{"amount": 5}', "application/json", {"content-encoding": coding})
        assert (resp.status_code, resp.json()["code"]) == (400, "invalid_request"), coding
        assert "content-encoding" in resp.json()["message"]
    assert send(b'{"amount": 5}', "application/json", {"content-encoding": "identity"}).is_success
    # A Connection header naming the coding or the type would drop it on the way, so the
    # upstream would read the body without it while policy read it with it: refused.
    seen = len(stack.upstream.seen)
    for named, extra in (("content-encoding", {"content-encoding": "gzip"}),
                         ("content-type", {}), ("content-length", {})):  # fmt: skip
        resp = send(b'{"amount": 5000}', "application/json", {**extra, "connection": named})
        assert (resp.status_code, resp.json()["code"]) == (400, "invalid_request"), named
        assert named in resp.json()["message"]
    # Go's encoding/json and ASP.NET read "Amount" as the member amount the rule reads.
    for spelled in (b'{"Amount": 5000}', b'{"AMOUNT": 5000, "note": 1}'):
        resp = send(spelled, "application/json")
        assert (resp.status_code, resp.json()["code"]) == (400, "invalid_request"), spelled
        assert "request.body.amount" in resp.json()["message"]
    assert len(stack.upstream.seen) == seen


def test_every_set_cookie_line_of_the_answer_is_relayed(stack: Stack) -> None:
    agent = AgentClient(stack.srv, "cookies")
    token = agent.access_token()
    url = f"{stack.gateway}/payments/cookies"
    resp = httpx.post(url, json={"amount": 1}, headers=agent.headers(token, "POST", url))
    assert resp.status_code == 200, resp.text
    cookies = [v.split(";")[0] for k, v in resp.headers.multi_items() if k == "set-cookie"]
    assert cookies == ["a=1", "b=2"]


def test_a_second_content_type_is_refused_not_read_two_ways(stack: Stack) -> None:
    """Policy reads the body by the first Content-Type; an upstream given both might read it by
    the last (here as a form carrying amount=5000 past the cap). A field that must be single is
    refused when repeated, and nothing reaches the upstream."""
    agent = AgentClient(stack.srv, "twotypes")
    token = agent.access_token()
    url = f"{stack.gateway}/payments/charge"
    seen = len(stack.upstream.seen)
    body = b'{"note":"&amount=5000&x=","amount":1}'
    headers = [
        *agent.headers(token, "POST", url).items(),
        ("content-type", "application/json"),
        ("content-type", "application/x-www-form-urlencoded"),
    ]
    resp = httpx.post(url, content=body, headers=headers)
    assert (resp.status_code, resp.json()["code"]) == (400, "invalid_request"), resp.text
    assert "content-type" in resp.json()["message"]
    assert len(stack.upstream.seen) == seen
    stack.refusals.append(resp.headers["x-aegis-decision-id"])


def test_repeated_fields_reach_the_upstream_as_policy_saw_them(stack: Stack) -> None:
    agent = AgentClient(stack.srv, "repeats")
    token = agent.access_token()
    url = f"{stack.gateway}/payments/charge"
    headers = [*agent.headers(token, "POST", url).items(), ("x-trace", "a"), ("x-trace", "b")]
    resp = httpx.post(url, json={"amount": 1}, headers=headers)
    assert resp.status_code == 200, resp.text
    assert stack.upstream.seen[-1]["headers"]["x-trace"] == "a, b"


def test_identity_headers_cannot_be_spoofed_with_underscores_or_proxy_fields(stack: Stack) -> None:
    """CGI and WSGI upstreams read X_Aegis_Agent_Id as X-Aegis-Agent-Id."""
    agent = AgentClient(stack.srv, "underscore")
    token = agent.access_token()
    url = f"{stack.gateway}/payments/charge"
    forged = {"X_Aegis_Agent_Id": "admin", "x_aegis-tenant": "other", "Proxy-Status": "x"}
    resp = httpx.post(
        url, json={"amount": 1}, headers={**agent.headers(token, "POST", url), **forged}
    )
    assert resp.status_code == 200, resp.text
    seen = stack.upstream.seen[-1]["headers"]
    assert not {k for k in seen if k.replace("_", "-").startswith(("x-aegis-", "proxy-"))} - {
        "x-aegis-agent-id",
        "x-aegis-tenant",
        "x-aegis-decision-id",
        "x-aegis-attestation",
    }
    assert seen["x-aegis-agent-id"] == agent.id and seen["x-aegis-tenant"] == "acme"
    assert "x_aegis_agent_id" not in seen and "proxy-status" not in seen


PAYMENTS_BY_METHOD = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: payments-by-method}
spec:
  rules:
    - {id: pay, action: allow, reason: payments may be posted, match: {tools: [payments], methods: [POST]}}
"""


def test_a_post_body_overriding_the_method_is_refused(stack: Stack) -> None:
    """Rails, Laravel and Symfony serve a POST carrying ``_method=DELETE`` as a DELETE: decided as
    a POST, it never reaches the upstream whole. A multipart form is read as it streams and cut
    off before the part naming the field is passed on."""
    activate(stack, PAYMENTS_BY_METHOD)
    agent = AgentClient(stack.srv, "overrider")
    token = agent.access_token()
    url = f"{stack.gateway}/payments/invoices/42"
    seen = len(stack.upstream.seen)

    def post(content: object, ctype: str) -> httpx.Response:
        headers = {**agent.headers(token, "POST", url), "content-type": ctype}
        return httpx.post(url, content=content, headers=headers, timeout=10)  # type: ignore[arg-type]

    for content, ctype in ((b"_method=DELETE", "application/x-www-form-urlencoded"),
                           (b'{"_method": "DELETE"}', "application/json")):  # fmt: skip
        resp = post(content, ctype)
        assert (resp.status_code, resp.json()["code"]) == (400, "invalid_request"), resp.text
        assert "_method" in resp.json()["message"]

    def multipart() -> Iterator[bytes]:  # chunked, so it streams past the decision
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
        yield b"x" * 300_000
        yield b'\r\n--b\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--b--\r\n'

    resp = post(multipart(), "multipart/form-data; boundary=b")
    assert (resp.status_code, resp.json()["code"]) == (400, "invalid_request"), resp.text
    assert _forward_failure(stack, resp.headers["x-aegis-decision-id"])["code"] == "invalid_request"
    assert all(b"DELETE" not in r["body"] for r in stack.upstream.seen[seen:])
    # A form without the field goes through.
    assert post(b"amount=5", "application/x-www-form-urlencoded").status_code == 200


@pytest.mark.parametrize(
    "target", ["/payments/charge#x", "/payments/charge?account=victim#", "/payments/a#/../crm"]
)
def test_a_fragment_in_the_target_is_refused(stack: Stack, target: str) -> None:
    """h11 keeps ``#...`` in the path or the query; the upstream client would drop it, so policy
    would decide on a target the upstream never receives."""
    agent = AgentClient(stack.srv, "fragment")
    token = agent.access_token()
    base = stack.h11_gateway
    seen = len(stack.upstream.seen)
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
    try:
        headers = agent.headers(token, "POST", f"{base}/payments/charge")
        conn.request(
            "POST", target, body=b"{}", headers={**headers, "content-type": "application/json"}
        )
        resp = conn.getresponse()
        answer = json.loads(resp.read())
    finally:
        conn.close()
    assert (resp.status, answer.get("code", answer.get("error"))) == (400, "invalid_request")
    assert len(stack.upstream.seen) == seen


def test_audit_chain_verifies_and_every_refusal_is_recorded(stack: Stack) -> None:
    report = stack.audit.verify_chain()
    assert report.ok, report
    assert report.records >= len(stack.refusals) > 5
    recorded = {r["decision_id"]: r for r in stack.audit.records(kind="gateway.decision")}
    for decision_id in stack.refusals:
        assert decision_id in recorded
        assert recorded[decision_id]["action"] != "allow"
    dumped = " ".join(str(r) for r in recorded.values())
    assert "Authorization" not in dumped and "DPoP " not in dumped


def test_a_gateway_failure_after_the_allow_is_500_and_recorded(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error of the gateway's own while forwarding an allowed call: the caller gets 500
    ``server_error`` and the log says the allowed call was not delivered."""

    async def broken(self: ReverseProxy, *args: object) -> None:
        raise RuntimeError("a bug while relaying the answer")

    monkeypatch.setattr(ReverseProxy, "_relay", broken)
    agent = AgentClient(stack.srv, "glue")
    token = agent.access_token()
    url = f"{stack.gateway}/payments/charge"
    resp = httpx.post(url, json={"amount": 3}, headers=agent.headers(token, "POST", url))
    assert resp.status_code == 500
    assert resp.json()["code"] == "server_error"
    (failed,) = [
        r for r in stack.audit.records(kind="gateway.forward_failed") if r["agent_id"] == agent.id
    ]
    assert (failed["status"], failed["code"]) == (500, "server_error")
    (decided,) = [
        r
        for r in stack.audit.records(kind="gateway.decision")
        if r["decision_id"] == failed["decision_id"]
    ]
    assert decided["action"] == "allow"


def test_refusals_before_any_route_are_audited_too(stack: Stack) -> None:
    """No route means no tool and no policy, but the refusal is still evidence: one
    gateway.refused record each, committed before the answer, without the query string."""
    answers = [
        httpx.get(f"{stack.gateway}/nowhere?token=SECRET"),
        httpx.request("TRACE", f"{stack.gateway}/payments/x"),
        httpx.get(f"{stack.gateway}/nowhere/%2e%2e/x"),  # unreadable, and no route either way
    ]
    expected = [(404, "not_found"), (405, "method_not_allowed"), (400, "invalid_request")]
    records = {r["decision_id"]: r for r in stack.audit.records(kind="gateway.refused")}
    for resp, (status, code) in zip(answers, expected, strict=True):
        assert (resp.status_code, resp.json()["code"]) == (status, code), resp.text
        record = records[resp.headers["x-aegis-decision-id"]]
        assert (record["status"], record["code"], record["door"]) == (status, code, "proxy")
        assert record["client"] == "127.0.0.1"
    assert all("SECRET" not in json.dumps(r) for r in records.values())


def _stalled_call(
    base: str, headers: dict[str, str], ctype: str, length: int, drip: float | None
) -> bytes:
    """Send a call's head and the first bytes of a ``length``-byte body, then nothing more (or,
    with ``drip``, one more byte every ``drip`` seconds); return what the gateway answers."""
    host, _, port = base.removeprefix("http://").partition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(
            f"POST /payments/charge HTTP/1.1\r\nHost: {host}:{port}\r\n{head}"
            f"content-type: {ctype}\r\ncontent-length: {length}\r\n\r\n".encode()
            + b'{"amount": '
        )
        sock.settimeout(drip)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                sock.sendall(b"1")  # still sending, slowly
                continue
            if not chunk:
                break
            answer += chunk
        return answer


@pytest.mark.parametrize(
    ("ctype", "length"),
    [("application/json", 100), ("application/octet-stream", 200_000)],  # read whole; streamed
)
@pytest.mark.parametrize(
    ("limits", "drip", "why"),
    [({"client_body_timeout": 0.3}, None, "no part of the request body arrived"),
     ({"client_body_timeout": 5, "client_body_deadline": 0.6}, 0.1, "longer than 0.6 s in all")],
)  # fmt: skip
def test_a_client_that_stops_or_drips_its_body_is_408_and_audited(
    stack: Stack, ctype: str, length: int, limits: dict[str, float], drip: float | None, why: str
) -> None:
    settings = GatewaySettings.model_validate(
        {"routes": [{"path_prefix": "/payments", "upstream": stack.upstream_url,
                     "tool": "payments", "tenant": "acme", "env": "prod"}],
         "allow": [{"tool": "payments"}], **limits}
    )  # fmt: skip
    services = stack.srv.services
    pipeline = build_pipeline(
        services, settings, policy_store=MemoryPolicyStore(), audit=stack.audit
    )
    agent = AgentClient(stack.srv, "stall")
    before = len(stack.upstream.seen)
    with serve(create_gateway_app(services, settings, pipeline=pipeline)) as base:
        url = f"{base}/payments/charge"
        started = time.monotonic()
        answer = _stalled_call(
            base, agent.headers(agent.access_token(), "POST", url), ctype, length, drip
        )
        waited = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    refusal = json.loads(body)
    assert refusal["code"] == "request_timeout" and why in refusal["message"]
    assert min(limits.values()) <= waited < 5
    assert len(stack.upstream.seen) == before  # no complete call reached the upstream
    decided = [r for r in stack.audit.records() if r.get("decision_id") == refusal["decision_id"]]
    assert decided and decided[-1]["code"] == "request_timeout"


class _SlowReader:
    """An upstream on a raw socket that reads a request body slowly (TCP backpressure reaches
    the gateway while it streams), then answers 200."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with self.sock, self.sock.accept()[0] as conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            seen = b""
            while b"\r\n\r\n" not in seen:
                seen += conn.recv(4096)
            tail = seen.partition(b"\r\n\r\n")[2]  # the body is streamed chunked
            self.received = len(tail)
            while not tail.endswith(b"0\r\n\r\n"):
                time.sleep(0.02)
                chunk = conn.recv(16384)  # at most 16 KiB a read: 1 MiB takes 64 reads or more
                if not chunk:
                    return
                self.received += len(chunk)
                tail = (tail + chunk)[-16:]
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")


def test_a_slow_upstream_does_not_spend_the_clients_body_deadline(stack: Stack) -> None:
    """The deadline bounds the time the gateway waits for the client; a body the client sent at
    once but the upstream reads slowly is delivered, not refused as the client's 408."""
    upstream = _SlowReader()
    settings = GatewaySettings.model_validate(
        {"routes": [{"path_prefix": "/payments", "upstream": f"http://127.0.0.1:{upstream.port}",
                     "tool": "payments", "tenant": "acme", "env": "prod"}],
         "allow": [{"tool": "payments"}], "client_body_deadline": 0.3,
         "max_body_bytes": 4 * 1024 * 1024}
    )  # fmt: skip
    services = stack.srv.services
    pipeline = build_pipeline(
        services, settings, policy_store=MemoryPolicyStore(), audit=stack.audit
    )
    agent = AgentClient(stack.srv, "bulk")
    body = b"x" * (1024 * 1024)
    with serve(create_gateway_app(services, settings, pipeline=pipeline)) as base:
        url = f"{base}/payments/upload"
        headers = {**agent.headers(agent.access_token(), "POST", url),
                   "content-type": "application/octet-stream"}  # fmt: skip
        started = time.monotonic()
        resp = httpx.post(url, content=body, headers=headers, timeout=30)
        took = time.monotonic() - started
    assert (resp.status_code, resp.text) == (200, "ok"), resp.text
    assert upstream.received > len(body)  # the whole body, in chunked framing
    assert took > 0.6  # the upstream held the body back for longer than the deadline


def test_a_call_that_finds_no_free_upstream_connection_is_told_so(stack: Stack) -> None:
    """Waiting for a pooled connection counts against connect_timeout; the 504 says that no
    connection was free, rather than blaming the upstream for not answering."""
    settings = GatewaySettings.model_validate(
        {"routes": [{"path_prefix": "/payments", "upstream": stack.upstream_url,
                     "tool": "payments", "tenant": "acme", "env": "prod"}],
         "allow": [{"tool": "payments"}], "connect_timeout": 0.5}
    )  # fmt: skip
    pipeline = build_pipeline(
        stack.srv.services, settings, policy_store=MemoryPolicyStore(), audit=stack.audit
    )
    proxy = ReverseProxy(pipeline, settings, pool=1)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await proxy.start()
        yield
        await proxy.close()

    agent = AgentClient(stack.srv, "pool")
    token = agent.access_token()
    with serve(Starlette(routes=[Mount("", app=proxy)], lifespan=lifespan)) as base:

        def call(path: str) -> httpx.Response:
            url = f"{base}/payments/{path}"
            return httpx.post(url, json={"amount": 1}, headers=agent.headers(token, "POST", url),
                              timeout=10)  # fmt: skip

        holder = threading.Thread(target=call, args=("slow",))  # holds the one connection 3 s
        holder.start()
        time.sleep(0.5)
        resp = call("charge")
        holder.join()
    assert resp.status_code == 504, resp.text
    assert "all 1 pooled connections are busy" in resp.json()["error_description"]

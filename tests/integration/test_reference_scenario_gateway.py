"""The reference scenario through the real gateway over HTTP: an orchestrator delegates to a
finance agent (RFC 8693 exchange at the real token endpoint, DPoP-bound), which calls the
payments tool through the gateway. Under the limit it is allowed and the upstream sees the finance
agent; over the limit it is denied; a replayed proof is ``replay_detected``; an expired token is
``token_expired``; a token signed by a swapped key is ``invalid_signature`` with
``aegis.verification_result=false`` on the decision span."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from tests.gateway.harness import Upstream, serve
from tests.gateway.helpers import jkt_of, mint_proof
from tests.integration.test_delegation_e2e import Agent
from tests.support.server import RunningServer, run_server

from aegis.audit.log import AuditLog
from aegis.clock import FrozenClock
from aegis.config import GatewaySettings
from aegis.crypto.jws import sign_compact
from aegis.crypto.keys import Ed25519SigningKey, b64u_decode
from aegis.gateway.app import build_pipeline, create_gateway_app
from aegis.policy.loader import load_document
from aegis.policy.store import MemoryPolicyStore
from aegis.telemetry import names
from aegis.telemetry.tracing import set_tracer_provider
from aegis.tokens.exchange import DELEGATION_GRANT, JWT_TYPE, TOKEN_EXCHANGE
from aegis.tokens.issuer import TokenIssuer

pytestmark = pytest.mark.slow

LIMIT = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: payments-limit}
spec:
  rules:
    - {id: under, action: allow, reason: under the limit, match: {tools: [payments]},
       when: {path: request.body.amount, lte: 1000}}
    - {id: over, action: deny, reason: over the limit, match: {tools: [payments]},
       when: {path: request.body.amount, gt: 1000}}
"""


@dataclasses.dataclass
class Scene:
    srv: RunningServer
    gateway: str
    upstream: Upstream
    spans: InMemorySpanExporter
    finance: Agent
    orchestrator: Agent
    token: str
    audit: AuditLog


def delegated_token(srv: RunningServer, orch: Agent, fin: Agent) -> str:
    """The finance agent exchanges the orchestrator's grant for a DPoP-bound token."""
    url = f"{srv.url}/oauth/token"
    grant = orch.grant(fin, scopes=("payments:write",), tools=("payments",))
    data = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": grant,
        "subject_token_type": DELEGATION_GRANT,
        "actor_token": fin.assertion(),
        "actor_token_type": JWT_TYPE,
        "scope": "payments:write",
    }
    resp = httpx.post(url, data=data, headers={"DPoP": mint_proof(fin.key, "POST", url)})
    assert resp.status_code == 200, resp.text
    assert resp.json()["token_type"] == "DPoP"
    return str(resp.json()["access_token"])


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    set_tracer_provider(provider)
    upstream = Upstream()
    with run_server(tmp_path_factory.mktemp("reference")) as srv, serve(upstream.app) as up:
        settings = GatewaySettings.model_validate(
            {"routes": [{"path_prefix": "/payments", "upstream": up, "tool": "payments",
                         "tenant": "acme", "env": "prod"}]}
        )  # fmt: skip
        policies = MemoryPolicyStore()
        policies.activate(
            "acme", "prod", policies.put(load_document(LIMIT), now=0), actor="test", now=0
        )
        audit = AuditLog(srv.config.database_url(), clock=srv.services.clock)
        pipeline = build_pipeline(srv.services, settings, policy_store=policies, audit=audit)
        with serve(create_gateway_app(srv.services, settings, pipeline=pipeline)) as gw:
            orch, fin = Agent(srv, "orchestrator"), Agent(srv, "finance")
            token = delegated_token(srv, orch, fin)
            yield Scene(srv, gw, upstream, exporter, fin, orch, token, audit)
        audit.close()
    set_tracer_provider(None)


def pay(scene: Scene, amount: int, token: str | None = None, proof: str | None = None) -> Any:
    url = f"{scene.gateway}/payments/charge"
    token = token or scene.token
    proof = proof or mint_proof(scene.finance.key, "POST", url, token=token)
    headers = {"authorization": f"DPoP {token}", "dpop": proof}
    return httpx.post(url, json={"amount": amount}, headers=headers, timeout=10)


def last_span(scene: Scene) -> dict[str, Any]:
    spans = [s for s in scene.spans.get_finished_spans() if s.name == names.SPAN_GATEWAY_DECIDE]
    assert spans, "no decision span"
    return dict(spans[-1].attributes or {})


def test_under_the_limit_is_allowed_through_the_chain(scene: Scene) -> None:
    resp = pay(scene, 500)
    assert resp.status_code == 200, resp.text
    seen = scene.upstream.seen[-1]["headers"]
    assert seen["x-aegis-agent-id"] == scene.finance.id
    attrs = last_span(scene)
    assert attrs[names.VERIFICATION_RESULT] is True
    assert attrs[names.PARENT_CHAIN_VALIDATED] is True
    assert attrs[names.DECISION] == "allow"
    record = next(
        r for r in scene.audit.records(kind="gateway.decision")
        if r["decision_id"] == resp.headers["x-aegis-decision-id"]
    )  # fmt: skip
    assert record["chain"] == [scene.orchestrator.id, scene.finance.id]


def test_over_the_limit_is_denied(scene: Scene) -> None:
    before = len(scene.upstream.seen)
    resp = pay(scene, 5000)
    assert (resp.status_code, resp.json()["code"]) == (403, "access_denied")
    assert resp.json()["message"] == "over the limit"
    assert len(scene.upstream.seen) == before


def test_a_replayed_proof_is_replay_detected(scene: Scene) -> None:
    url = f"{scene.gateway}/payments/charge"
    proof = mint_proof(scene.finance.key, "POST", url, token=scene.token)
    assert pay(scene, 10, proof=proof).status_code == 200
    again = pay(scene, 10, proof=proof)
    assert (again.status_code, again.json()["code"]) == (401, "replay_detected")
    assert last_span(scene)[names.JTI_SEEN] is True


def test_an_expired_token_is_token_expired(scene: Scene) -> None:
    svc = scene.srv.services
    claims = svc.verifier.verify(scene.token).claims
    past = TokenIssuer(
        svc.keyring, issuer=scene.srv.config.issuer, clock=FrozenClock(time.time() - 3600)
    )
    expired = past.issue(
        agent_id=scene.finance.id, client_id=scene.finance.client_id, tenant="acme", env="prod",
        scopes=("payments:write",), audience=("aegis-gateway",), lifetime=300,
        cnf={"jkt": jkt_of(scene.finance.key)},
        extra={k: claims[k] for k in ("act", "parent_agent") if k in claims},
    ).token  # fmt: skip
    resp = pay(scene, 10, token=expired)
    assert (resp.status_code, resp.json()["code"]) == (401, "token_expired")


def test_a_swapped_signing_key_is_invalid_signature_on_the_span(scene: Scene) -> None:
    head, payload, _ = scene.token.split(".")
    forged = sign_compact(head, json.loads(b64u_decode(payload)), Ed25519SigningKey.generate().sign)
    resp = pay(scene, 10, token=forged)
    assert (resp.status_code, resp.json()["code"]) == (401, "invalid_signature")
    attrs = last_span(scene)
    assert attrs[names.VERIFICATION_RESULT] is False
    assert attrs[names.DECISION] == "deny"
    assert attrs[names.DECISION_ID] == resp.headers["x-aegis-decision-id"]

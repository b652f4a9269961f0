"""What the control plane says is live matches what the gateway accepts: a suspended tenant gets
no token by exchange either, introspection checks a delegated token's whole chain and answers
without the replicas' clock leeway, and an auditor key cannot revoke. Over real HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aegis.clock import new_id
from aegis.crypto.jws import encode_segment, sign_compact
from aegis.crypto.keys import Ed25519SigningKey
from aegis.registry.service import AgentSpec
from aegis.tokens.delegation import CHAIN_SEPARATOR, mint_grant
from aegis.tokens.exchange import DELEGATION_GRANT, JWT_TYPE, TOKEN_EXCHANGE
from aegis.types import AdminRole, AgentStatus, ClientAuthMethod, TenantStatus
from tests.support.server import RunningServer, run_server

SCOPES = ("payments:read", "payments:write")
ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class Agent:
    """An agent with a private_key_jwt client, able to sign grants for other agents."""

    def __init__(self, srv: RunningServer, name: str, tenant: str = "acme") -> None:
        self.srv, self.key, self.id = srv, Ed25519SigningKey.generate(), name
        srv.services.registry.register_agent(
            AgentSpec(name, tenant, "prod", "owner@example.com", allowed_scopes=SCOPES,
                      jwks=(self.key.public.to_jwk(),)),
            actor="test",
        )  # fmt: skip
        client, _ = srv.services.registry.create_client(
            name, auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor="test"
        )
        self.client_id = client.client_id

    def assertion(self) -> str:
        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "jti": new_id(),
                  "aud": self.srv.url, "iat": now, "exp": now + 60}  # fmt: skip
        header = encode_segment({"alg": "EdDSA", "typ": "JWT", "kid": self.key.kid})
        return sign_compact(header, claims, self.key.sign)

    def auth(self) -> dict[str, str]:
        return {"client_assertion_type": ASSERTION, "client_assertion": self.assertion()}

    def grant(self, child: Agent) -> str:
        return mint_grant(
            self.key, parent=self.id, child=child.id, audience=self.srv.url, parent_links=[],
            now=time.time(), scopes=SCOPES, tools=("pay_invoice",), max_depth=3,
        )  # fmt: skip

    def token(self, **form: Any) -> httpx.Response:
        data = {"grant_type": "client_credentials", **self.auth(), **form}
        return httpx.post(f"{self.srv.url}/oauth/token", data=data)

    def exchange(self, grant: str) -> httpx.Response:
        data = {"grant_type": TOKEN_EXCHANGE, "subject_token": grant,
                "subject_token_type": DELEGATION_GRANT, "actor_token": self.assertion(),
                "actor_token_type": JWT_TYPE}  # fmt: skip
        return httpx.post(f"{self.srv.url}/oauth/token", data=data)

    def introspect(self, token: str) -> dict[str, Any]:
        resp = httpx.post(f"{self.srv.url}/oauth/introspect", data={"token": token, **self.auth()})
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[RunningServer]:
    with run_server(tmp_path) as running:
        yield running


def test_a_suspended_tenant_gets_no_token_by_exchange_either(srv: RunningServer) -> None:
    parent, child = Agent(srv, "parent"), Agent(srv, "child")
    assert child.exchange(parent.grant(child)).status_code == 200
    srv.services.registry.set_tenant_status("acme", TenantStatus.SUSPENDED, actor="test")
    time.sleep(1.1)  # the registry cache's bound
    assert child.token().status_code in (400, 401)
    # The agents stay active; a grant signed after the suspension must not be exchanged.
    refused = child.exchange(parent.grant(child))
    assert refused.status_code == 400, refused.text
    assert "tenant_inactive" in refused.json()["error_description"]


def test_introspection_ends_a_delegated_token_with_its_parent(srv: RunningServer) -> None:
    parent, child = Agent(srv, "parent"), Agent(srv, "child")
    resp = child.exchange(parent.grant(child))
    assert resp.status_code == 200, resp.text
    token = resp.json()["access_token"]
    assert token.count(".") == 2 and CHAIN_SEPARATOR not in token
    assert child.introspect(token)["active"] is True
    srv.services.registry.set_agent_status(parent.id, AgentStatus.SUSPENDED, actor="test")
    time.sleep(1.1)  # the registry cache's bound
    assert child.introspect(token) == {"active": False}  # as the gateway refuses it


def test_introspection_answers_without_the_clock_leeway(srv: RunningServer) -> None:
    agent = Agent(srv, "brief")
    token = agent.token(expires_in="3").json()["access_token"]  # iat is whole seconds: >= 2 s
    exp = srv.services.verifier.verify(token).exp
    assert agent.introspect(token)["active"] is True
    time.sleep(max(0.0, exp - time.time()) + 0.2)  # expired, inside the 30 s leeway of replicas
    assert agent.introspect(token) == {"active": False}


def test_an_auditor_key_cannot_revoke(srv: RunningServer) -> None:
    victim = Agent(srv, "victim", tenant="other")
    token = victim.token().json()["access_token"]
    _, auditor = srv.services.registry.create_admin_key("aud", AdminRole.AUDITOR, actor="test")
    headers = {"Authorization": f"Bearer {auditor}"}
    refused = httpx.post(f"{srv.url}/oauth/revoke", data={"token": token}, headers=headers)
    assert refused.status_code == 403, refused.text
    assert victim.introspect(token)["active"] is True
    _, admin = srv.services.registry.create_admin_key("ops", AdminRole.ADMIN, actor="test")
    headers = {"Authorization": f"Bearer {admin}"}
    assert httpx.post(f"{srv.url}/oauth/revoke", data={"token": token}, headers=headers).is_success
    assert victim.introspect(token) == {"active": False}


@pytest.mark.parametrize("status", ["suspended", "quarantined", "retired", "tenant suspended"])
def test_an_inactive_agent_cannot_introspect_its_tenants_tokens(
    srv: RunningServer, status: str
) -> None:
    """An agent that may no longer get tokens may not ask which of its tenant's tokens are live,
    and whose, either (a stolen one, say); it may still revoke its own."""
    victim, spy = Agent(srv, "victim", tenant="spies"), Agent(srv, "spy", tenant="spies")
    token = victim.token().json()["access_token"]
    own = spy.token().json()["access_token"]
    before = httpx.post(f"{srv.url}/oauth/introspect", data={"token": token, **spy.auth()})
    assert before.json()["active"] is True
    registry = srv.services.registry
    if status == "tenant suspended":
        registry.set_tenant_status("spies", TenantStatus.SUSPENDED, actor="test")
    else:
        if status == "retired":
            registry.set_agent_status(spy.id, AgentStatus.SUSPENDED, actor="test")
        registry.set_agent_status(spy.id, AgentStatus(status), actor="test")
    refused = httpx.post(f"{srv.url}/oauth/introspect", data={"token": token, **spy.auth()})
    assert (refused.status_code, refused.json()["error"]) == (401, "invalid_client"), refused.text
    assert "cannot introspect" in refused.json()["error_description"]
    revoked = httpx.post(f"{srv.url}/oauth/revoke", data={"token": own, **spy.auth()})
    assert revoked.status_code == 200

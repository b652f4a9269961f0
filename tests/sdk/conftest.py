"""One real stack for the SDK tests: the control plane, a gateway in front of a recording tool
server and two MCP servers (Streamable HTTP on /mcp, the older HTTP+SSE on /legacy), a gateway whose replay store is down, and a policy; all uvicorn servers on loopback."""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import Iterator

import pytest
from mcp.server.mcpserver import MCPServer

from aegis.audit.log import AuditLog
from aegis.clock import new_id
from aegis.config import GatewaySettings
from aegis.crypto.keys import Ed25519SigningKey
from aegis.gateway.app import build_pipeline, create_gateway_app
from aegis.policy.loader import load_document
from aegis.policy.store import MemoryPolicyStore
from aegis.registry.service import AgentSpec
from aegis.sdk import AgentClient, ClientSecret, PrivateKey
from aegis.stores import open_replay_store
from aegis.types import AdminRole, ClientAuthMethod
from tests.gateway.harness import Upstream, serve
from tests.support.server import RunningServer, free_port, run_server

POLICY = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: sdk-tests}
spec:
  rules:
    - id: pay-small
      action: allow
      match: {tools: ["payments.transfer"], scopes: ["payments:write"]}
      when: {path: request.body.amount, lte: 5000}
    - id: pay-large
      action: deny
      reason: payments above 5000 are refused here
      match: {tools: ["payments.transfer"]}
      when: {path: request.body.amount, gt: 5000}
    - id: crm-mask
      action: sanitize
      match: {tools: ["crm.customers"]}
      obligations:
        - {kind: mask, target: response, pattern: email}
        - {kind: mask, target: response, pattern: card_number}
    - id: finance-via-orchestrator
      action: allow
      match: {tools: ["finance.report"], chain: {parents: [orchestrator]}}
    - id: treasury-needs-approval
      action: approval_needed
      match: {tools: ["treasury.transfer"], scopes: ["payments:write"]}
      approval: {group: treasury, expires_in: 600}
    - id: finance-orchestrated-deeper
      action: allow
      match: {tools: ["finance.report"], chain: {min_depth: 2}}
      when: {path: chain.agents, contains: orchestrator}
    - {id: repo-session, action: allow, match: {tools: [repo]}}
    - {id: repo-search, action: allow, match: {tools: [repo.search]}}
    - {id: repo-refund, action: approval_needed, match: {tools: [repo.refund]},
       approval: {group: treasury, expires_in: 600}}
"""
SCOPES = ("payments:write", "crm:read", "finance:read")
APPROVER = "approver@example.com"
APPROVALS_YAML = f"approvals:\n  approvers:\n    - {{id: {APPROVER}, groups: [treasury]}}\n"


@dataclasses.dataclass
class Stack:
    srv: RunningServer
    gateway: str
    dead_gateway: str
    #: A gateway that requires DPoP server nonces (RFC 9449 §9).
    nonce_gateway: str
    upstream: Upstream
    audit: AuditLog
    admin_key: str

    @property
    def url(self) -> str:
        return self.srv.url

    def register(
        self,
        name: str,
        method: ClientAuthMethod = ClientAuthMethod.PRIVATE_KEY_JWT,
        *,
        exact: bool = False,
        dpop_bound: bool = False,
        tls_san_uri: str | None = None,
    ) -> tuple[str, str, Ed25519SigningKey, str | None]:
        """Register an agent and one client: (agent id, client id, agent key, secret)."""
        key = Ed25519SigningKey.generate()
        agent_id = (
            name if exact else f"{name}-{new_id(4).lower().replace('_', 'x').replace('-', 'x')}"
        )
        registry = self.srv.services.registry
        registry.register_agent(
            AgentSpec(agent_id, "acme", "prod", "owner@example.com", allowed_scopes=SCOPES,
                      jwks=(key.public.to_jwk(),)),
            actor="test",
        )  # fmt: skip
        client, secret = registry.create_client(
            agent_id, auth_method=method, dpop_bound=dpop_bound, tls_san_uri=tls_san_uri,
            actor="test",
        )  # fmt: skip
        return agent_id, client.client_id, key, secret

    def key_agent(self, name: str, **kw: object) -> tuple[str, AgentClient]:
        agent_id, client_id, key, _ = self.register(name, **kw)  # type: ignore[arg-type]
        return agent_id, AgentClient(self.url, PrivateKey(client_id, key))

    def secret_agent(self, name: str, method: str = "basic") -> tuple[str, AgentClient]:
        auth = (
            ClientAuthMethod.CLIENT_SECRET_BASIC
            if method == "basic"
            else ClientAuthMethod.CLIENT_SECRET_POST
        )
        agent_id, client_id, _, secret = self.register(name, auth)
        assert secret is not None
        return agent_id, AgentClient(self.url, ClientSecret(client_id, secret, method))  # type: ignore[arg-type]


def mcp_server() -> MCPServer:
    """An MCP server with three tools: ``search`` (allowed), ``refund`` (needs an approval) and
    ``delete_repo`` (no rule allows it; it records every call it runs in ``deleted``)."""
    server = MCPServer("repo")

    @server.tool()
    def search(query: str) -> str:
        return f"found {query}"

    @server.tool()
    def refund(amount: int) -> str:
        return f"refunded {amount}"

    @server.tool()
    def delete_repo(name: str) -> str:
        deleted.append(name)
        return f"deleted {name}"

    return server


#: What the MCP server's delete_repo ran.
deleted: list[str] = []


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    upstream = Upstream()
    with (
        run_server(tmp_path_factory.mktemp("sdk"), APPROVALS_YAML) as srv,
        serve(upstream.app) as up,
        serve(mcp_server().streamable_http_app()) as mcp_up,
        serve(
            mcp_server().sse_app(sse_path="/legacy/sse", message_path="/legacy/messages/")
        ) as legacy_up,
    ):
        gw_port = free_port()
        settings = GatewaySettings.model_validate(
            {
                "port": gw_port,
                "routes": [
                    {"path_prefix": "/payments", "upstream": up, "tool": "payments.transfer",
                     "tenant": "acme", "env": "prod"},
                    {"path_prefix": "/crm", "upstream": up, "tool": "crm.customers",
                     "tenant": "acme", "env": "prod"},
                    {"path_prefix": "/finance", "upstream": up, "tool": "finance.report",
                     "tenant": "acme", "env": "prod"},
                    {"path_prefix": "/treasury", "upstream": up, "tool": "treasury.transfer",
                     "tenant": "acme", "env": "prod"},
                    {"path_prefix": "/mcp", "upstream": mcp_up, "tool": "repo",
                     "tenant": "acme", "env": "prod", "mcp": True},
                    {"path_prefix": "/legacy", "upstream": legacy_up, "tool": "repo",
                     "tenant": "acme", "env": "prod", "mcp": True},
                ],
                "upstream_timeout": 2.0,
                "policy_poll_interval": 0.05,
            }
        )  # fmt: skip
        audit = AuditLog(srv.config.database_url(), clock=srv.services.clock)
        policies = MemoryPolicyStore()
        version = policies.put(load_document(POLICY, file="sdk.yaml"), now=0)
        policies.activate("acme", "prod", version, actor="test", now=0)
        pipeline = build_pipeline(srv.services, settings, policy_store=policies, audit=audit)
        dead = dataclasses.replace(
            srv.services,
            replay=open_replay_store("redis://127.0.0.1:1", clock=srv.services.clock),
            extras={},
        )
        dead_pipeline = build_pipeline(dead, settings, policy_store=policies, audit=audit)
        nonce_settings = settings.model_copy(
            update={"dpop_nonce_key": base64.b64encode(os.urandom(32)).decode()}
        )
        nonce_pipeline = build_pipeline(
            srv.services, nonce_settings, policy_store=policies, audit=audit
        )
        _, admin_key = srv.services.registry.create_admin_key(
            "sdk-tests", AdminRole.OPERATOR, actor="test"
        )
        with (
            serve(create_gateway_app(srv.services, settings, pipeline=pipeline), gw_port) as gw,
            serve(create_gateway_app(dead, settings, pipeline=dead_pipeline)) as dead_gw,
            serve(
                create_gateway_app(srv.services, nonce_settings, pipeline=nonce_pipeline)
            ) as nonce_gw,
        ):
            yield Stack(srv, gw, dead_gw, nonce_gw, upstream, audit, admin_key)
        audit.close()

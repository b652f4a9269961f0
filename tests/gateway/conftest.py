"""In-process gateway fixtures: real services on a temporary SQLite database, a pipeline over them,
agents with Ed25519 keys, and a builder for call contexts."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aegis.audit.log import AuditLog
from aegis.config import GatewaySettings, load_config
from aegis.crypto.keys import Ed25519SigningKey
from aegis.gateway.app import build_pipeline
from aegis.gateway.context import EMPTY_BODY_DIGEST, CallContext, Route, body_digest
from aegis.gateway.pipeline import Pipeline
from aegis.policy.store import MemoryPolicyStore
from aegis.registry.service import AgentSpec
from aegis.server.services import Services, build_services
from aegis.types import ClientAuthMethod
from tests.gateway.helpers import jkt_of, mint_proof
from tests.support.server import write_dev_config

GW = "https://gw.example.com"
PAY = Route("/payments", "http://127.0.0.1:9", "payments", "acme", "prod")
OPEN = dataclasses.replace(PAY, path_prefix="/open", allow_bearer=True)


@dataclasses.dataclass
class Env:
    services: Services
    pipeline: Pipeline
    policies: MemoryPolicyStore
    audit: AuditLog
    settings: GatewaySettings


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    config = load_config(write_dev_config(tmp_path, 8080), environ={})
    services = build_services(config)
    settings = GatewaySettings.model_validate(
        {"public_url": GW, "allow": [{"tool": "payments"}], "policy_poll_interval": 0.001}
    )
    store = MemoryPolicyStore()
    audit = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", clock=services.clock)
    pipeline = build_pipeline(services, settings, policy_store=store, audit=audit)
    yield Env(services, pipeline, store, audit, settings)
    audit.close()


class Agent:
    def __init__(self, env: Env, name: str = "payer", tenant: str = "acme") -> None:
        self.env, self.key, self.id = env, Ed25519SigningKey.generate(), name
        env.services.registry.register_agent(
            AgentSpec(name, tenant, "prod", "owner@example.com", allowed_scopes=("payments:write",),
                      jwks=(self.key.public.to_jwk(),)),
            actor="test",
        )  # fmt: skip
        client, _ = env.services.registry.create_client(
            name, auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor="test"
        )
        self.client_id, self.tenant = client.client_id, tenant

    def token(self, *, cnf: dict[str, Any] | None = None, dpop: bool = True, **extra: Any) -> str:
        if dpop and cnf is None:
            cnf = {"jkt": jkt_of(self.key)}
        return self.env.services.issuer.issue(
            agent_id=self.id, client_id=self.client_id, tenant=self.tenant, env="prod",
            scopes=("payments:write",), audience=(extra.pop("aud", "aegis-gateway"),),
            lifetime=300, cnf=cnf, extra=extra or None,
        ).token  # fmt: skip

    def proof(
        self, token: str, method: str = "POST", path: str = "/payments/charge", **kw: Any
    ) -> str:
        return mint_proof(self.key, method, GW + path, token=token, **kw)


def make_ctx(
    headers: list[tuple[str, str]],
    *,
    body: Any = None,
    route: Route = PAY,
    path: str = "/payments/charge",
    method: str = "POST",
) -> CallContext:
    raw = json.dumps(body).encode() if body is not None else b""
    if body is not None:
        headers = [*headers, ("content-type", "application/json")]
    return CallContext(
        method=method, url=GW + path, host="gw.example.com", path=path, route=route,
        headers=tuple((k.lower(), v) for k, v in headers),
        body_digest=body_digest(raw) if raw else EMPTY_BODY_DIGEST,
        body=body, raw_body=raw, client="127.0.0.1",
    )  # fmt: skip


def dpop_headers(agent: Agent, token: str, **kw: Any) -> list[tuple[str, str]]:
    return [("authorization", f"DPoP {token}"), ("dpop", agent.proof(token, **kw))]


@contextlib.contextmanager
def slow_registry(env: Env, seconds: float = 0.6) -> Iterator[None]:
    """The registry under load: each agent read takes ``seconds`` more (the cache emptied so
    that the next call reads), as long as the block lasts."""
    store: Any = env.services.cache._store
    read = store.get_agent

    def slow_read(agent_id: str) -> Any:
        time.sleep(seconds)
        return read(agent_id)

    store.get_agent = slow_read
    env.services.cache.invalidate()
    try:
        yield
    finally:
        store.get_agent = read


@contextlib.contextmanager
def approval_gated(env: Env) -> Iterator[tuple[Pipeline, Any]]:
    """The env's pipeline with its approval_needed calls held by the real approval service
    (one approver, carol@example.com, in the group ``finance``): (pipeline, service)."""
    from aegis.approvals import build_approval_service
    from aegis.config import ApprovalSettings
    from aegis.gateway.approval_gate import ApprovalGate

    settings = ApprovalSettings.model_validate(
        {"approvers": [{"id": "carol@example.com", "groups": ["finance"]}]}
    )
    config = env.services.config.model_copy(update={"approvals": settings})
    service = build_approval_service(
        config, clock=env.services.clock, keyring=env.services.keyring,
        replay=env.services.replay, audit=env.audit,
    )  # fmt: skip
    pipeline = build_pipeline(
        env.services, env.settings, policy_store=env.policies, audit=env.audit,
        approvals=ApprovalGate(service, env.services.cache),
    )  # fmt: skip
    try:
        yield pipeline, service
    finally:
        service.close()


def activate(env: Env, text: str) -> None:
    """Put the policy ``text`` in force for acme/prod."""
    from aegis.policy.loader import load_document

    env.policies.activate("acme", "prod", env.policies.put(load_document(text), now=0), actor="t",
                          now=0)  # fmt: skip


def gateway_app(env: Env, routes: list[dict[str, Any]], policy: str | None = None,
                **settings: Any) -> Any:  # fmt: skip
    """The gateway application on the env's services, policy store and audit log, serving
    ``routes`` with ``settings`` over the env's own, under ``policy`` when given."""
    from aegis.gateway.app import create_gateway_app

    data = env.settings.model_dump()
    data.update(settings, routes=routes)
    gateway = GatewaySettings.model_validate(data)
    if policy is not None:
        activate(env, policy)
    pipeline = build_pipeline(env.services, gateway, policy_store=env.policies, audit=env.audit)
    return create_gateway_app(env.services, gateway, pipeline=pipeline)

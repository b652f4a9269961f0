"""Two gateway replicas sharing PostgreSQL and Redis, each with its own services and store clients
(as two processes would have), behind one public URL: a DPoP proof spent at one is
``replay_detected`` at the other, and an agent suspended through the control plane is refused by
both within one second. Nothing a replica needs lives in the other replica's memory."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from tests.gateway.harness import Upstream, serve, serve_here
from tests.gateway.helpers import jkt_of, mint_proof
from tests.support.server import write_dev_config

from aegis.audit.log import AuditLog
from aegis.config import GatewaySettings, load_config
from aegis.crypto.keys import Ed25519SigningKey
from aegis.gateway.app import build_pipeline, create_gateway_app
from aegis.policy.store import MemoryPolicyStore
from aegis.registry.service import AgentSpec
from aegis.server.services import Services, build_services
from aegis.types import AgentStatus, ClientAuthMethod

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

PUBLIC = "https://gw.example.com"


@dataclasses.dataclass
class Replicas:
    control: Services
    gateways: list[str]


@pytest.fixture
async def replicas(
    tmp_path: Path, fresh_pg_url: str, redis_url: str, redis_prefix: str
) -> AsyncIterator[Replicas]:
    environ = {
        "AEGIS_DATABASE__URL": fresh_pg_url,
        "AEGIS_STORES__REPLAY": redis_url,
        "AEGIS_STORES__REVOCATION": redis_url,
        "AEGIS_STORES__REDIS_PREFIX": f"'{redis_prefix}'",  # a YAML scalar
        # A patient reply budget: the gateway runs on this test's own event loop, and a stall
        # of the loop under load must not read as an outage (the outage itself is refused at once).
        "AEGIS_STORES__REDIS_TIMEOUT": "2.0",
        "AEGIS_STORES__REDIS_CONNECT_TIMEOUT": "2.0",
    }
    config = load_config(write_dev_config(tmp_path, 8080), environ=environ)
    # Three independent sets of clients: the control plane and one per replica.
    control, one, two = (build_services(config) for _ in range(3))
    upstream = Upstream()
    audits = [AuditLog(fresh_pg_url, clock=s.clock) for s in (one, two)]
    try:
        with serve(upstream.app) as up:
            settings = payments_settings(up)
            apps = [
                create_gateway_app(
                    s, settings,
                    pipeline=build_pipeline(s, settings, policy_store=MemoryPolicyStore(), audit=a),
                )
                for s, a in zip((one, two), audits, strict=True)
            ]  # fmt: skip
            async with serve_here(apps[0]) as gw1, serve_here(apps[1]) as gw2:
                yield Replicas(control, [gw1, gw2])
    finally:
        for a in audits:
            a.close()
        for s in (control, one, two):
            approvals = s.extras.get("approvals")  # opened by build_pipeline, owns an engine
            close = getattr(approvals, "close", None)
            if close is not None:
                close()
            await s.aclose()


def payments_settings(upstream: str) -> GatewaySettings:
    """The gateway of these tests: ``/payments`` to ``upstream`` as tool payments (acme/prod),
    allowed by the allow-list, DPoP proofs addressed to :data:`PUBLIC`."""
    return GatewaySettings.model_validate(
        {
            "public_url": PUBLIC,
            "routes": [{"path_prefix": "/payments", "upstream": upstream, "tool": "payments",
                        "tenant": "acme", "env": "prod"}],
            "allow": [{"tool": "payments"}],
        }
    )  # fmt: skip


def agent_token(services: Services, name: str) -> tuple[Ed25519SigningKey, str]:
    key = Ed25519SigningKey.generate()
    services.registry.register_agent(
        AgentSpec(name, "acme", "prod", "owner@example.com", allowed_scopes=("payments:write",),
                  jwks=(key.public.to_jwk(),)),
        actor="test",
    )  # fmt: skip
    client, _ = services.registry.create_client(
        name, auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor="test"
    )
    token = services.issuer.issue(
        agent_id=name, client_id=client.client_id, tenant="acme", env="prod",
        scopes=("payments:write",), audience=("aegis-gateway",), lifetime=300,
        cnf={"jkt": jkt_of(key)},
    ).token  # fmt: skip
    return key, token


async def call(
    base: str, key: Ed25519SigningKey, token: str, proof: str | None = None
) -> httpx.Response:
    proof = proof or mint_proof(key, "POST", f"{PUBLIC}/payments/charge", token=token)
    headers = {"authorization": f"DPoP {token}", "dpop": proof}
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.post(f"{base}/payments/charge", json={"amount": 1}, headers=headers)


async def test_a_proof_spent_at_one_replica_is_replayed_at_the_other(replicas: Replicas) -> None:
    key, token = agent_token(replicas.control, "replica-payer")
    gw1, gw2 = replicas.gateways
    for first, second in ((gw1, gw2), (gw2, gw1)):
        proof = mint_proof(key, "POST", f"{PUBLIC}/payments/charge", token=token)
        assert (await call(first, key, token, proof)).status_code == 200
        again = await call(second, key, token, proof)
        assert again.status_code == 401, again.text
        assert again.json()["code"] == "replay_detected"


async def test_an_agent_suspended_at_the_control_plane_is_refused_by_both_within_1s(
    replicas: Replicas,
) -> None:
    key, token = agent_token(replicas.control, "replica-suspended")
    for gw in replicas.gateways:
        assert (await call(gw, key, token)).status_code == 200
    replicas.control.registry.set_agent_status(
        "replica-suspended", AgentStatus.SUSPENDED, actor="test"
    )
    started = time.monotonic()
    # Timed from when each call is sent: no call sent more than 1 s after the suspension may be
    # let through by either replica (a slow round trip on a loaded runner is not the gateway's).
    refused: dict[str, float] = {}
    while len(refused) < 2:
        for gw in replicas.gateways:
            if gw not in refused:
                sent = time.monotonic() - started
                resp = await call(gw, key, token)
                if resp.status_code != 200:
                    assert resp.json()["code"] in ("agent_inactive", "token_revoked"), resp.text
                    refused[gw] = sent
                else:
                    assert sent <= 1.0, f"{gw} let a call sent {sent:.2f}s after through"
        await asyncio.sleep(0.02)
    assert set(refused) == set(replicas.gateways), refused

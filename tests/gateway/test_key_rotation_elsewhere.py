"""A standalone gateway follows token-key rotations made by the control plane in another process.

The gateway verifies access tokens and signs attestations with its own copy of the key ring. A
rotation elsewhere publishes the new active key long before it is promoted, so the gateway never
misses a kid and never reloads on its own: unless it re-reads the ring, it keeps signing with the
retired key and keeps accepting it after the control plane dropped it from the JWKS (the case of a
forced rotation over a leaked key).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from aegis.audit.log import AuditLog
from aegis.clock import FrozenClock
from aegis.config import GatewaySettings, load_config
from aegis.crypto.jws import encode_segment, parse_compact, sign_compact
from aegis.gateway.app import build_pipeline
from aegis.policy.store import MemoryPolicyStore
from aegis.server.services import Services, build_services
from tests.gateway.conftest import GW, Agent, Env, dpop_headers, make_ctx
from tests.support.server import write_dev_config

START = 1_800_000_000.0
RELOAD = 0.05


@pytest.fixture
def planes(tmp_path: Path) -> Iterator[tuple[Services, Env]]:
    """The control plane's services and a gateway built on its own services (another process's
    view of the same database), both on one frozen clock."""
    config = load_config(
        write_dev_config(tmp_path, 8080, f"keys:\n  reload_interval: {RELOAD}\n"), environ={}
    )
    clock = FrozenClock(START)
    control = build_services(config, clock=clock)
    gateway = build_services(config, clock=clock)
    settings = GatewaySettings.model_validate({"public_url": GW, "allow": [{"tool": "payments"}]})
    audit = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", clock=clock)
    policies = MemoryPolicyStore()
    pipeline = build_pipeline(gateway, settings, policy_store=policies, audit=audit)
    # Agents and tokens come from the control plane; the gateway reads them from the database.
    yield control, Env(control, pipeline, policies, audit, settings)
    audit.close()


def _attestation_kid(result_headers: dict[str, str]) -> str:
    return str(parse_compact(result_headers["x-aegis-attestation"]).header["kid"])


async def _call(env: Env, agent: Agent) -> tuple[bool, str | None, dict[str, str]]:
    token = agent.token()
    headers = dpop_headers(agent, token, iat=env.services.clock.now())
    result = await env.pipeline.run(make_ctx(headers, body={"amount": 1}))
    return result.allowed, result.code, result.headers


async def test_a_rotation_elsewhere_reaches_the_gateways_signer_and_verifier(
    planes: tuple[Services, Env],
) -> None:
    control, env = planes
    agent = Agent(env)
    old = control.keyring.signing_key()
    allowed, code, headers = await _call(env, agent)
    assert allowed, code
    assert _attestation_kid(headers) == old.kid

    clock = control.clock
    assert isinstance(clock, FrozenClock)
    control.keyring.rotate(force=True)  # an operator rotating over a leaked key
    new_kid = control.keyring.signing_key().kid
    assert new_kid != old.kid
    for _ in range(100):  # the gateway re-reads the ring every RELOAD seconds
        allowed, _, headers = await _call(env, agent)
        assert allowed
        if _attestation_kid(headers) == new_kid:
            break
        await asyncio.sleep(RELOAD)
    assert _attestation_kid(headers) == new_kid

    # Past the retired key's overlap the control plane has dropped it from the JWKS; a token
    # minted with the leaked key is refused at the gateway too.
    overlap = control.keyring.settings.max_token_lifetime + control.keyring.settings.leeway
    clock.advance(overlap + 1)
    assert old.kid not in {k["kid"] for k in control.keyring.jwks()["keys"]}
    token = agent.token()
    claims = parse_compact(token).payload
    forged = sign_compact(
        encode_segment({"alg": "EdDSA", "typ": "at+jwt", "kid": old.kid}),
        {**claims, "jti": "forged-after-rotation"},
        old.sign,
    )
    headers = dpop_headers(agent, forged, iat=clock.now())
    result = await env.pipeline.run(make_ctx(headers, body={"amount": 1}))
    assert not result.allowed
    assert result.status == 401, json.dumps(result.details)
    assert (await _call(env, agent))[0]  # the new key's tokens still pass

"""Two gateway replicas share one replay store; the second one's clock lags the first's.

Each replica judges token and proof times on its own clock, so the lagging one accepts a
credential for a while after the first one stopped. A replay to it in that gap is refused only if
the first replica's record of the spent ``jti`` is still there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from aegis.audit.log import AuditLog
from aegis.clock import FrozenClock
from aegis.config import GatewaySettings, load_config
from aegis.gateway.app import build_pipeline
from aegis.gateway.pipeline import Pipeline
from aegis.policy.store import MemoryPolicyStore
from aegis.server.services import build_services
from aegis.tokens.dpop import DEFAULT_IAT_WINDOW
from tests.gateway.conftest import GW, OPEN, Agent, Env, make_ctx
from tests.support.server import write_dev_config
from tests.tokens.test_dpop_replay_skew import LaggingClock

START = 1_800_000_000.0
TOKEN_LIFETIME = 300  # what Agent.token asks for


@dataclasses.dataclass
class Replicas:
    env: Env
    clock: FrozenClock
    lagging: Pipeline
    leeway: float


@pytest.fixture(params=[2.0, 5.0])
def replicas(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Replicas]:
    lag: float = request.param
    config = load_config(write_dev_config(tmp_path, 8080), environ={})
    clock = FrozenClock(START)
    services = build_services(config, clock=clock)
    settings = GatewaySettings.model_validate({"public_url": GW, "allow": [{"tool": "payments"}]})
    audit = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", clock=clock)
    policies = MemoryPolicyStore()
    first = build_pipeline(services, settings, policy_store=policies, audit=audit)
    # Same replay store (services.replay), its own clock for every time check.
    behind = dataclasses.replace(services, clock=LaggingClock(clock, lag))
    lagging = build_pipeline(behind, settings, policy_store=policies, audit=audit)
    env = Env(services, first, policies, audit, settings)
    yield Replicas(env, clock, lagging, float(config.tokens.leeway))
    audit.close()


async def test_single_use_token_replayed_to_a_lagging_replica_is_refused(
    replicas: Replicas,
) -> None:
    agent = Agent(replicas.env)
    once = [("authorization", f"Bearer {agent.token(dpop=False, single_use=True)}")]
    assert (await replicas.env.pipeline.run(make_ctx(once, body={"amount": 1}))).allowed
    # One second after the old record lifetime (exp + leeway) on the first replica's clock: the
    # first replica no longer accepts the token, the lagging one still does.
    replicas.clock.set(START + TOKEN_LIFETIME + replicas.leeway + 1)
    replay = await replicas.lagging.run(make_ctx(once, body={"amount": 1}))
    assert not replay.allowed
    assert (replay.status, replay.code) == (401, "replay_detected")


async def test_dpop_proof_replayed_to_a_lagging_replica_is_refused(replicas: Replicas) -> None:
    agent = Agent(replicas.env)
    token = agent.token()
    proof = agent.proof(token, iat=START)
    headers = [("authorization", f"DPoP {token}"), ("dpop", proof)]
    replicas.clock.advance(DEFAULT_IAT_WINDOW - 2)
    assert (await replicas.env.pipeline.run(make_ctx(headers, body={"amount": 1}))).allowed
    # One second after the old record lifetime (iat + iat_window + 1).
    replicas.clock.set(START + DEFAULT_IAT_WINDOW + 2)
    replay = await replicas.lagging.run(make_ctx(headers, body={"amount": 1}))
    assert not replay.allowed
    assert (replay.status, replay.code) == (401, "replay_detected")


async def test_revoked_token_sent_to_a_lagging_replica_is_refused(replicas: Replicas) -> None:
    agent = Agent(replicas.env)
    token = agent.token(dpop=False)
    headers = [("authorization", f"Bearer {token}")]
    await replicas.env.services.tokens.revoke(token, client_id=None)
    refused = await replicas.env.pipeline.run(make_ctx(headers, route=OPEN, path="/open/x"))
    assert (refused.status, refused.code) == (401, "token_revoked")
    # One second after the old record lifetime (exp + leeway) on the revoking replica's clock;
    # the lagging replica still accepts the token's times.
    replicas.clock.set(START + TOKEN_LIFETIME + replicas.leeway + 1)
    late = await replicas.lagging.run(make_ctx(headers, route=OPEN, path="/open/x"))
    assert not late.allowed
    assert (late.status, late.code) == (401, "token_revoked")

"""The gateway asks a revocation store on the network (Redis) while the replay store spends the
proof, so the two round trips overlap: its answer still refuses a revoked token, a replayed proof
is still reported first, an outage is still a 503, and no answer is left unread."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from collections.abc import AsyncIterator

import pytest

from aegis.stores.redis import RedisRevocationStore
from tests.gateway.conftest import Agent, Env, dpop_headers, make_ctx

pytestmark = pytest.mark.redis


@pytest.fixture
async def on_redis(env: Env, redis_url: str, redis_prefix: str) -> AsyncIterator[Env]:
    store = RedisRevocationStore.from_url(redis_url, clock=env.services.clock, prefix=redis_prefix)
    env.pipeline._revocation = store
    yield env
    await store.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_revoked_token_is_refused_and_a_replay_reported_first(on_redis: Env) -> None:
    env = on_redis
    assert env.pipeline._revocation.remote
    agent = Agent(env)
    token = agent.token()
    first = make_ctx(dpop_headers(agent, token), body={"amount": 5})
    assert (await env.pipeline.run(first)).allowed
    claims = env.services.verifier.verify(token)
    await env.pipeline._revocation.revoke_jti(claims.jti, claims.exp + 60)
    fresh = await env.pipeline.run(make_ctx(dpop_headers(agent, token), body={"amount": 5}))
    assert fresh.code == "token_revoked"
    # The first call's proof again: spent before the revocation answer is read.
    assert (await env.pipeline.run(first)).code == "replay_detected"


async def test_an_outage_is_a_503_and_leaves_no_answer_unread(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    down = RedisRevocationStore.from_url(
        f"redis://127.0.0.1:{_closed_port()}/0", clock=env.services.clock, timeout=0.5,
        connect_timeout=0.5,
    )  # fmt: skip
    env.pipeline._revocation = down
    agent = Agent(env)
    token = agent.token()
    ctx = make_ctx(dpop_headers(agent, token), body={"amount": 5})
    assert (await env.pipeline.run(ctx)).code == "revocation_store_unavailable"
    # Refused for its replayed proof while the revocation store is down: the replay is what the
    # caller hears, and the store's failure is read, not left to the loop's error log.
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        assert (await env.pipeline.run(ctx)).code == "replay_detected"
        await asyncio.sleep(0)
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    await down.close()

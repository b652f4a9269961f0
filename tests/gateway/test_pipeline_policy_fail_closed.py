"""A policy store whose first read fails with an untranslated exception refuses calls with 503
``policy_unavailable`` until it answers; the gateway allow-list never stands in for it."""

from __future__ import annotations

import asyncio
from typing import Any

from aegis.gateway.app import build_pipeline
from aegis.policy.loader import load_document
from aegis.policy.store import MemoryPolicyStore
from tests.gateway.conftest import Agent, Env, dpop_headers, make_ctx
from tests.policy.test_watcher_fail_closed import DENY_PAYMENTS

INTERVAL = 1.0


class FirstReadFails(MemoryPolicyStore):
    failures = 1

    def active(self, tenant: str, env: str) -> Any:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("unexpected driver error")
        return super().active(tenant, env)


async def test_failed_first_policy_read_is_never_an_allowlist_allow(env: Env) -> None:
    store = FirstReadFails()
    store.activate("acme", "prod", store.put(load_document(DENY_PAYMENTS), now=0), actor="t", now=0)
    settings = env.settings.model_copy(update={"policy_poll_interval": INTERVAL})
    assert [a.tool for a in settings.allow] == ["payments"]  # the allow-list would allow these
    pipeline = build_pipeline(env.services, settings, policy_store=store, audit=env.audit)
    agent = Agent(env)
    token = agent.token()
    for _ in range(3):
        result = await pipeline.run(make_ctx(dpop_headers(agent, token), body={"amount": 1}))
        assert not result.allowed
        assert (result.status, result.code) == (503, "policy_unavailable")
    await asyncio.sleep(INTERVAL + 0.05)
    result = await pipeline.run(make_ctx(dpop_headers(agent, token), body={"amount": 1}))
    assert not result.allowed
    assert (result.status, result.code, result.message) == (403, "access_denied", "payments frozen")

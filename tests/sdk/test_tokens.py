"""Tokens from the real token endpoint over HTTP: each credential kind, DPoP binding, the cache
per (audience, scope, tenant) and refresh before expiry on an injected clock."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from aegis.clock import FrozenClock
from aegis.crypto.keys import Ed25519SigningKey
from aegis.sdk import (
    AccessDeniedError,
    AgentClient,
    ClientAuthenticationError,
    ClientSecret,
    GrantRefusedError,
    PrivateKey,
)
from aegis.sdk.proofs import DpopSigner
from aegis.types import ClientAuthMethod
from tests.sdk.conftest import Stack
from tests.support.server import run_server

pytestmark = pytest.mark.slow


def _count_token_requests(agent: AgentClient) -> list[httpx.Request]:
    seen: list[httpx.Request] = []
    agent.http.event_hooks["request"].append(seen.append)
    return seen


@pytest.mark.parametrize("method", ["basic", "post"])
def test_client_secret_gets_a_dpop_bound_token(stack: Stack, method: str) -> None:
    agent_id, agent = stack.secret_agent("secret", method)
    with agent:
        token = agent.token(scope="payments:write")
    assert token.token_type == "DPoP"
    assert token.claims["agent_id"] == agent_id
    assert token.scope == "payments:write"
    assert agent.signer is not None
    assert token.claims["cnf"] == {"jkt": agent.signer.jkt}
    verified = stack.srv.services.verifier.verify(token.access_token)
    assert verified.agent_id == agent_id


def test_private_key_jwt_binds_to_the_agent_key(stack: Stack) -> None:
    agent_id, client_id, key, _ = stack.register("keyed")
    with AgentClient(stack.url, PrivateKey(client_id, key)) as agent:
        token = agent.token()
    assert token.claims["sub"] == agent_id
    assert token.claims["cnf"] == {"jkt": DpopSigner(key).jkt}


def test_without_dpop_the_token_is_bearer(stack: Stack) -> None:
    _, client_id, key, _ = stack.register("bearer")
    with AgentClient(stack.url, PrivateKey(client_id, key), dpop=False) as agent:
        token = agent.token()
    assert token.token_type == "Bearer"
    assert "cnf" not in token.claims


def test_wrong_secret_is_a_typed_error_without_decision(stack: Stack) -> None:
    _, client_id, _, _ = stack.register("wrong", ClientAuthMethod.CLIENT_SECRET_BASIC)
    agent = AgentClient(stack.url, ClientSecret(client_id, "not-the-secret"))
    with agent, pytest.raises(ClientAuthenticationError) as err:
        agent.token()
    assert err.value.code == "invalid_client"
    assert err.value.status == 401
    assert err.value.decision_id is None
    assert "not-the-secret" not in str(err.value)


def test_key_not_registered_for_the_client_is_refused(stack: Stack) -> None:
    _, client_id, _, _ = stack.register("impostor")
    agent = AgentClient(stack.url, PrivateKey(client_id, Ed25519SigningKey.generate()))
    with agent, pytest.raises(ClientAuthenticationError) as err:
        agent.token()
    assert err.value.code == "invalid_client"


def test_scope_outside_the_agent_is_refused(stack: Stack) -> None:
    _, agent = stack.key_agent("greedy")
    with agent, pytest.raises(GrantRefusedError) as err:
        agent.token(scope="admin:everything")
    assert err.value.code == "invalid_scope"


def test_tokens_are_cached_per_audience_scope_and_tenant(stack: Stack) -> None:
    _, agent = stack.key_agent("cached")
    with agent:
        seen = _count_token_requests(agent)
        first = agent.token("aegis-gateway", "payments:write", "acme")
        again = agent.token("aegis-gateway", ["payments:write"], "acme")
        assert again is first
        assert len(seen) == 1
        other_scope = agent.token("aegis-gateway", "crm:read", "acme")
        no_tenant = agent.token("aegis-gateway", "payments:write")
        assert len(seen) == 3
        assert other_scope.access_token != first.access_token
        assert no_tenant.access_token != first.access_token
        # Each token request carried its own proof (RFC 9449 §4.3: a jti is used once).
        proofs = {r.headers["dpop"] for r in seen}
        assert len(proofs) == 3


def test_a_token_for_another_tenant_is_refused_locally(stack: Stack) -> None:
    _, agent = stack.key_agent("tenanted")
    with agent, pytest.raises(AccessDeniedError) as err:
        agent.token(tenant="globex")
    assert err.value.code == "tenant_mismatch"
    assert len(agent.tokens) == 0


def test_refresh_happens_before_expiry_with_the_margin(stack: Stack) -> None:
    """An 8 s token with a 30 s margin is used for half its life (4 s), then replaced. The clock
    moves only a few seconds, so the new assertion and proof are still acceptable to the server."""
    _, client_id, key, _ = stack.register("refresh")
    clock = FrozenClock(time.time())
    agent = AgentClient(
        stack.url, PrivateKey(client_id, key), clock=clock, refresh_margin=30, token_lifetime=8
    )
    with agent:
        seen = _count_token_requests(agent)
        first = agent.token()
        assert first.expires_at - first.issued_at == 8
        clock.advance(3.9)  # before expiry minus margin: still cached
        assert agent.token() is first
        assert len(seen) == 1
        clock.advance(0.2)  # inside the margin, the token still valid: replaced anyway
        second = agent.token()
        assert len(seen) == 2
        assert second.access_token != first.access_token
        assert agent.token() is second


def test_short_lived_tokens_are_kept_for_half_their_life(stack: Stack) -> None:
    from aegis.sdk.cache import CachedToken

    token = CachedToken("t", "DPoP", issued_at=0, expires_at=40, scope="", claims={})
    assert token.fresh_at(19.9, margin=30)
    assert not token.fresh_at(20.0, margin=30)


def test_a_token_service_outage_is_retried_with_fresh_proofs_then_raised(tmp_path: Path) -> None:
    """The replay store behind the token endpoint is down: every request is 503; the SDK tries
    a bounded number of times, each with a new assertion and proof, then raises."""
    from aegis.registry.service import AgentSpec
    from aegis.sdk import RetryPolicy, ServiceUnavailableError

    with run_server(tmp_path, "stores:\n  replay: redis://127.0.0.1:1\n") as srv:
        key = Ed25519SigningKey.generate()
        srv.services.registry.register_agent(
            AgentSpec("outage", "acme", "prod", "owner@example.com",
                      allowed_scopes=("payments:write",), jwks=(key.public.to_jwk(),)),
            actor="test",
        )  # fmt: skip
        client, _ = srv.services.registry.create_client(
            "outage", auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor="test"
        )
        delays: list[float] = []
        agent = AgentClient(
            srv.url, PrivateKey(client.client_id, key), sleep=delays.append,
            retry=RetryPolicy(unavailable_attempts=2, backoff_base=0.01, backoff_max=0.05),
        )  # fmt: skip
        with agent:
            seen = _count_token_requests(agent)
            with pytest.raises(ServiceUnavailableError) as err:
                agent.token()
    assert err.value.status == 503
    assert len(seen) == 3
    assert len({r.headers["dpop"] for r in seen}) == 3
    assert len({r.content for r in seen}) == 3  # a new client assertion each time
    assert delays == [0.01, 0.02]

"""Calls through the real gateway with the SDK as ``httpx.Auth``: a fresh DPoP proof per request,
typed refusals carrying code and decision id, no retry of a security denial, one refresh for an
expired token, bounded backoff on a dependency outage, and sanitized answers."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from aegis.clock import FrozenClock
from aegis.crypto.jws import parse_compact
from aegis.sdk import (
    AccessDeniedError,
    AegisClientError,
    ReplayDetectedError,
    RetryPolicy,
    ServiceUnavailableError,
    TokenRejectedError,
)
from aegis.sdk.cache import CachedToken
from aegis.sdk.wire import error_from_response
from aegis.telemetry.metrics import REGISTRY
from aegis.tokens.issuer import TokenIssuer
from tests.sdk.conftest import Stack

pytestmark = pytest.mark.slow
GW_AUD = "aegis-gateway"


def _sent(http: httpx.Client | httpx.AsyncClient) -> list[httpx.Request]:
    """Every request the client puts on the wire, retries included, as sent (a retry re-sends the
    same request object with new headers, so each one is copied)."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> None:
        seen.append(
            httpx.Request(
                request.method, request.url, headers=request.headers.copy(), content=request.content
            )
        )

    async def arecord(request: httpx.Request) -> None:
        record(request)

    hook: Any = arecord if isinstance(http, httpx.AsyncClient) else record
    http.event_hooks["request"].append(hook)
    return seen


def _decisions(action: str, reason: str) -> float:
    labels = {"action": action, "reason": reason}
    return REGISTRY.get_sample_value("aegis_decisions_total", labels) or 0.0


def test_every_request_carries_a_fresh_proof(stack: Stack) -> None:
    agent_id, agent = stack.key_agent("payer")
    with agent, agent.client(stack.gateway, audience=GW_AUD, scope="payments:write") as http:
        sent = _sent(http)
        for amount in (10, 20, 30):
            resp = http.post("/payments/transfer", json={"amount": amount})
            assert resp.status_code == 200, resp.text
        assert stack.upstream.seen[-1]["headers"]["x-aegis-agent-id"] == agent_id
    proofs = [parse_compact(r.headers["dpop"]).payload for r in sent]
    assert len({p["jti"] for p in proofs}) == 3
    assert {p["htu"] for p in proofs} == {f"{stack.gateway}/payments/transfer"}
    assert len({r.headers["authorization"] for r in sent}) == 1  # one cached token


def test_a_captured_proof_replayed_is_refused_and_typed(stack: Stack) -> None:
    _, agent = stack.key_agent("replayed")
    with agent, agent.client(stack.gateway, audience=GW_AUD, scope="payments:write") as http:
        sent = _sent(http)
        assert http.post("/payments/transfer", json={"amount": 5}).status_code == 200
    first = sent[0]
    again = httpx.post(str(first.url), content=first.content, headers=dict(first.headers))
    error = error_from_response(again)
    assert isinstance(error, ReplayDetectedError)
    assert error.code == "replay_detected"
    assert error.decision_id == again.headers["x-aegis-decision-id"]


def test_a_policy_denial_is_raised_once_and_never_retried(stack: Stack) -> None:
    _, agent = stack.key_agent("big-spender")
    before = _decisions("deny", "access_denied")
    with agent, agent.client(stack.gateway, audience=GW_AUD, scope="payments:write") as http:
        sent = _sent(http)
        with pytest.raises(AccessDeniedError) as err:
            http.post("/payments/transfer", json={"amount": 9000})
    assert len(sent) == 1
    assert _decisions("deny", "access_denied") == before + 1
    assert err.value.code == "access_denied"
    assert err.value.status == 403
    assert "above 5000" in err.value.message
    record = [r for r in stack.audit.records() if r.get("decision_id") == err.value.decision_id]
    assert len(record) == 1 and record[0]["action"] == "deny"


def test_a_forged_token_is_a_security_denial_not_retried(stack: Stack) -> None:
    from aegis.crypto.jws import sign_compact
    from aegis.crypto.keys import Ed25519SigningKey, b64u_decode

    _, agent = stack.key_agent("forger")
    with agent:
        key = agent.key(GW_AUD, "payments:write")
        real = agent.token_for(key)
        head, payload, _ = real.access_token.split(".")
        import json

        forged = sign_compact(
            head, json.loads(b64u_decode(payload)), Ed25519SigningKey.generate().sign
        )
        agent.tokens.put(key, CachedToken(forged, "DPoP", real.issued_at, real.expires_at, "", {}))
        with agent.client(stack.gateway, audience=GW_AUD, scope="payments:write") as http:
            sent = _sent(http)
            with pytest.raises(TokenRejectedError) as err:
                http.post("/payments/transfer", json={"amount": 1})
    assert len(sent) == 1
    assert err.value.code == "invalid_signature"
    assert err.value.decision_id is not None


def test_an_expired_token_is_refreshed_once_then_the_call_succeeds(stack: Stack) -> None:
    agent_id, agent = stack.key_agent("late")
    svc = stack.srv.services
    past = TokenIssuer(
        svc.keyring, issuer=stack.srv.config.issuer, clock=FrozenClock(time.time() - 3600)
    )
    with agent:
        assert agent.signer is not None
        key = agent.key(GW_AUD, "payments:write")
        client_id = agent.credential.client_id
        stale = past.issue(
            agent_id=agent_id, client_id=client_id, tenant="acme", env="prod",
            scopes=("payments:write",), audience=(GW_AUD,), lifetime=300,
            cnf={"jkt": agent.signer.jkt},
        ).token  # fmt: skip
        # The agent believes the token is good for another minute; the gateway knows better.
        now = time.time()
        agent.tokens.put(key, CachedToken(stale, "DPoP", now, now + 60, "payments:write", {}))
        with agent.client(stack.gateway, audience=GW_AUD, scope="payments:write") as http:
            sent = _sent(http)
            resp = http.post("/payments/transfer", json={"amount": 3})
    assert resp.status_code == 200, resp.text
    assert len(sent) == 2
    assert sent[0].headers["authorization"] == f"DPoP {stale}"
    assert sent[1].headers["authorization"] != sent[0].headers["authorization"]
    assert sent[0].headers["dpop"] != sent[1].headers["dpop"]


def test_an_outage_is_retried_with_bounded_backoff_then_raised(stack: Stack) -> None:
    _, agent = stack.key_agent("outage")
    delays: list[float] = []
    agent.sleep = delays.append
    agent.retry = RetryPolicy(unavailable_attempts=2, backoff_base=0.01, backoff_max=0.5)
    with agent, agent.client(stack.dead_gateway, audience=GW_AUD, scope="payments:write") as http:
        sent = _sent(http)
        with pytest.raises(ServiceUnavailableError) as err:
            http.post("/payments/transfer", json={"amount": 1})
    assert err.value.code == "replay_store_unavailable"
    assert err.value.status == 503
    assert len(sent) == 3  # the call and two retries, each with its own proof
    assert len({r.headers["dpop"] for r in sent}) == 3
    assert delays == [0.5, 0.5]  # Retry-After: 1, capped at backoff_max


def test_a_server_nonce_is_taken_once_then_remembered(stack: Stack) -> None:
    """RFC 9449 §9: the first call is answered use_dpop_nonce with a DPoP-Nonce; the SDK signs
    again with it, once, and uses it for the next calls too."""
    _, agent = stack.key_agent("nonced")
    with agent, agent.client(stack.nonce_gateway, audience=GW_AUD, scope="payments:write") as http:
        sent = _sent(http)
        first = http.post("/payments/transfer", json={"amount": 4})
        second = http.post("/payments/transfer", json={"amount": 5})
    assert (first.status_code, second.status_code) == (200, 200), first.text
    nonces = [parse_compact(r.headers["dpop"]).payload.get("nonce") for r in sent]
    assert len(nonces) == 3  # the first call twice, the second call once
    assert nonces[0] is None and nonces[1] is not None and nonces[2] == nonces[1]


def test_a_wrong_nonce_is_not_retried_twice(stack: Stack) -> None:
    _, agent = stack.key_agent("bad-nonce")
    with agent:
        auth = agent.auth(GW_AUD, "payments:write")
        auth._nonce = "not-a-nonce-the-gateway-made"
        with httpx.Client(auth=auth) as http:
            sent = _sent(http)
            resp = http.post(f"{stack.nonce_gateway}/payments/transfer", json={"amount": 6})
    assert resp.status_code == 200
    assert len(sent) == 2  # the stale nonce, then the one the gateway issued: no third try


def test_sanitized_answer_reaches_the_agent_masked(stack: Stack) -> None:
    _, agent = stack.key_agent("crm")
    with agent, agent.client(stack.gateway, audience=GW_AUD, scope="crm:read") as http:
        resp = http.get("/crm/customers/42")
    assert resp.status_code == 200, resp.text
    assert "4111 1111 1111 1111" not in resp.text
    assert resp.json()["card"].endswith("1111")


def test_the_gateways_own_404_is_a_refusal_with_its_decision(stack: Stack) -> None:
    """An unrouted path is refused by the gateway itself, audited under a decision id: raised as
    an error carrying it; with raise_for_denial off the answer reaches the caller."""
    _, agent = stack.key_agent("nowhere")
    with (
        agent,
        agent.client(stack.gateway, audience=GW_AUD, scope="payments:write") as http,
        pytest.raises(AegisClientError) as err,
    ):
        http.get("/nowhere")
    assert err.value.code == "not_found" and err.value.decision_id
    with (
        agent,
        httpx.Client(auth=agent.auth(GW_AUD, "payments:write", raise_for_denial=False)) as http,
    ):
        resp = http.get(f"{stack.gateway}/nowhere")
    assert resp.status_code == 404
    assert resp.json()["decision_id"] == resp.headers["x-aegis-decision-id"]


@pytest.mark.parametrize("code", ["replay_store_unavailable", "token_expired"])
def test_a_tools_answer_in_the_gateways_name_is_passed_on_never_retried(
    stack: Stack, code: str
) -> None:
    """A tool knows the decision id of a call that reached it, not the agent's credentials: its
    Aegis-shaped 503 (or 401) after it acted carries no gateway mark for them, so it is the
    tool's answer, returned as it came, and the POST is never sent again."""
    _, agent = stack.key_agent("forged")
    before = len(stack.upstream.seen)
    with agent, agent.client(stack.gateway, audience=GW_AUD, scope="payments:write") as http:
        sent = _sent(http)
        answer = http.post(f"/payments/forged-refusal?{code}", json={"amount": 120})
    assert answer.status_code in (401, 503) and answer.json()["code"] == code
    assert len(sent) == 1
    assert len(stack.upstream.seen) == before + 1  # the tool acted once


def test_raise_for_denial_off_returns_the_refusal(stack: Stack) -> None:
    _, agent = stack.key_agent("quiet")
    with (
        agent,
        httpx.Client(auth=agent.auth(GW_AUD, "payments:write", raise_for_denial=False)) as http,
    ):
        resp = http.post(f"{stack.gateway}/payments/transfer", json={"amount": 9000})
    assert resp.status_code == 403
    assert error_from_response(resp).code == "access_denied"


async def test_async_auth_flow_calls_through_the_gateway(stack: Stack) -> None:
    agent_id, agent = stack.key_agent("async")
    async with (
        agent,
        agent.async_client(stack.gateway, audience=GW_AUD, scope="payments:write") as http,
    ):
        sent = _sent(http)
        ok = await http.post("/payments/transfer", json={"amount": 7})
        with pytest.raises(AccessDeniedError) as err:
            await http.post("/payments/transfer", json={"amount": 7000})
    assert ok.status_code == 200, ok.text
    assert len(sent) == 2
    assert err.value.decision_id is not None
    assert stack.upstream.seen[-1]["headers"]["x-aegis-agent-id"] == agent_id


async def test_async_flow_refreshes_an_expired_token_once(stack: Stack) -> None:
    agent_id, agent = stack.key_agent("async-late")
    svc = stack.srv.services
    past = TokenIssuer(
        svc.keyring, issuer=stack.srv.config.issuer, clock=FrozenClock(time.time() - 3600)
    )
    async with agent:
        assert agent.signer is not None
        stale = past.issue(
            agent_id=agent_id, client_id=agent.credential.client_id, tenant="acme", env="prod",
            scopes=("payments:write",), audience=(GW_AUD,), lifetime=300,
            cnf={"jkt": agent.signer.jkt},
        ).token  # fmt: skip
        now = time.time()
        key = agent.key(GW_AUD, "payments:write")
        agent.tokens.put(key, CachedToken(stale, "DPoP", now, now + 60, "payments:write", {}))
        async with agent.async_client(
            stack.gateway, audience=GW_AUD, scope="payments:write"
        ) as http:
            sent = _sent(http)
            resp = await http.post("/payments/transfer", json={"amount": 8})
    assert resp.status_code == 200, resp.text
    assert len(sent) == 2
    assert sent[0].headers["authorization"] == f"DPoP {stale}"
    assert agent.tokens.get(key) is not None
    assert agent.tokens.get(key).access_token != stale  # type: ignore[union-attr]

"""What a ``tokens_not_before`` mark ended stays ended, even for a token issued by a token service
whose registry cache (``stores.registry_cache_ttl``) had not yet seen the change, and every mark
reaches every token issued before it. Token ``iat`` values are whole seconds and never set ahead
of the clock: while a subject's mark lies ahead of the current second, a token service that has
read it issues nothing (503 ``credentials_settling``, ask again in a second or two), since what it
issued would read as issued before the mark."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from aegis.clock import new_id
from aegis.crypto.jws import encode_segment, sign_compact
from aegis.crypto.keys import Ed25519SigningKey
from aegis.errors import TokenError, Unavailable
from aegis.oauth.service import TokenRequest
from aegis.registry.service import AgentSpec
from aegis.tokens.subject import check_subject
from aegis.types import AgentStatus, ClientAuthMethod
from tests.registry.test_service import ACTOR, T0, Env


def _refusal(env: Env, token: str) -> str | None:
    env.services.cache.invalidate()
    verified = env.services.verifier.verify(token)
    try:
        asyncio.run(check_subject(verified, env.services.cache, env.services.revocation))
    except TokenError as exc:
        return exc.code
    return None


def _issue(env: Env, client_id: str) -> str:
    """What a token service issues from what its cache holds (``_read`` refreshes it)."""
    client = env.services.cache.client(client_id)
    return env.services.tokens.client_credentials(client, TokenRequest((), ())).token


def _read(env: Env, agent_id: str, client_id: str) -> None:
    env.services.cache.invalidate()
    env.services.cache.agent(agent_id)
    env.services.cache.client(client_id)
    env.services.cache.tenant("acme")


def _settling(env: Env, client_id: str) -> int:
    """The wait a token service that read the mark asks for, instead of a token."""
    with pytest.raises(Unavailable) as info:
        _issue(env, client_id)
    assert info.value.code == "credentials_settling"
    return int(info.value.details["retry_after"])


def _keyed(env: Env, *keys: Ed25519SigningKey) -> str:
    env.registry.register_agent(
        AgentSpec("kagent", "acme", "prod", "a@example.com", allowed_scopes=("p:w",),
                  jwks=tuple(k.public.to_jwk() for k in keys)),
        actor=ACTOR,
    )  # fmt: skip
    client, _ = env.registry.create_client(
        "kagent", auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor=ACTOR
    )
    return client.client_id


def _with_key(env: Env, cid: str, key: Ed25519SigningKey) -> str:
    """A token got with an assertion ``key`` signs, from what the service has cached."""
    now = int(env.clock.now())
    claims = {"iss": cid, "sub": cid, "aud": env.services.config.issuer, "exp": now + 60,
              "iat": now, "jti": new_id()}  # fmt: skip
    assertion = sign_compact(encode_segment({"alg": "EdDSA", "kid": key.kid}), claims, key.sign)
    form = {"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion}  # fmt: skip
    auth = asyncio.run(env.services.authenticator.authenticate(form, None, "10.0.0.7"))
    return env.services.tokens.client_credentials(auth.client, TokenRequest((), ())).token


def test_a_token_a_stale_service_issued_while_suspended_stays_dead(env: Env) -> None:
    agent = env.agent()
    client, _ = env.client(agent)
    cid = client.client_id
    env.clock.set(T0 + 10.8)
    _read(env, agent, cid)  # this service read the agent: active
    env.clock.set(T0 + 10.9)
    env.registry.set_agent_status(agent, AgentStatus.SUSPENDED, actor=ACTOR, reason="incident")
    env.clock.set(T0 + 11.0)  # inside the cache's lifetime: the service still issues
    stale = _issue(env, cid)
    assert _refusal(env, stale) == "agent_inactive"
    env.clock.set(T0 + 11.5)
    env.registry.set_agent_status(agent, AgentStatus.ACTIVE, actor=ACTOR, reason="cleared")
    assert _refusal(env, stale) == "token_revoked"  # not back with the reactivation
    # In the same second, a service that read the reactivation asks for a moment.
    env.clock.set(T0 + 11.6)
    _read(env, agent, cid)
    assert _settling(env, cid) == 1
    env.clock.set(T0 + 12.0)
    fresh = _issue(env, cid)
    assert _refusal(env, fresh) is None
    assert env.services.verifier.verify(fresh).iat == T0 + 12


def test_a_token_a_stale_service_issued_for_a_disabled_client_stays_dead(env: Env) -> None:
    """The scripted answer to a leak (disable, rotate, enable) within one second, while the
    thief keeps asking a service that has not yet seen the disable."""
    agent = env.agent()
    client, _ = env.client(agent)
    cid = client.client_id
    env.clock.set(T0 + 20.8)
    _read(env, agent, cid)
    env.clock.set(T0 + 20.9)
    env.registry.set_client_active(cid, False, actor=ACTOR)
    env.clock.set(T0 + 21.05)
    thief = _issue(env, cid)
    env.clock.set(T0 + 21.3)
    env.registry.rotate_secret(cid, actor=ACTOR)
    env.clock.set(T0 + 21.6)
    env.registry.set_client_active(cid, True, actor=ACTOR)
    assert _refusal(env, thief) == "token_revoked"
    env.clock.set(T0 + 22.0)
    _read(env, agent, cid)
    assert _refusal(env, _issue(env, cid)) is None


def test_a_token_a_stale_service_issued_with_a_removed_key_is_dead(env: Env) -> None:
    """Removing a key ends the agent's earlier tokens while the agent stays active: a service
    whose cache still holds the old keys takes an assertion signed with the removed one, and
    nothing but the mark refuses the token it issues, so the mark lies a cache lifetime past the
    removal. A service that read the removal issues again once the mark has passed."""
    leaked, kept = Ed25519SigningKey.generate(), Ed25519SigningKey.generate()
    cid = _keyed(env, leaked, kept)
    env.clock.set(T0 + 30.8)
    _read(env, "kagent", cid)
    env.clock.set(T0 + 30.9)
    env.registry.update_agent("kagent", actor=ACTOR, jwks=[kept.public.to_jwk()])
    ttl = env.services.config.stores.registry_cache_ttl
    assert env.services.registry_store.get_agent("kagent").tokens_not_before == T0 + 30.9 + ttl
    env.clock.set(T0 + 31.0)  # the service has not re-read the agent
    stolen = _with_key(env, cid, leaked)
    env.clock.set(T0 + 200)  # minutes on: the agent is active, the key long gone
    assert _refusal(env, stolen) == "token_revoked"
    env.clock.set(T0 + 31.0)
    _read(env, "kagent", cid)
    assert _settling(env, cid) == 1  # the mark (T0 + 31.15) is ahead of the second
    env.clock.set(T0 + 32.0)
    fresh = _with_key(env, cid, kept)
    assert _refusal(env, fresh) is None


def test_every_mark_reaches_every_token_issued_before_it(env: Env) -> None:
    """No token carries an iat past the instant it was issued: a suspension a moment after a
    return, or a second key removal a moment after a first, ends what was issued between."""
    agent = env.agent()
    client, _ = env.client(agent)
    cid = client.client_id
    env.clock.set(T0 + 10.05)
    env.registry.set_agent_status(agent, AgentStatus.SUSPENDED, actor=ACTOR, reason="check")
    env.clock.set(T0 + 10.10)
    env.registry.set_agent_status(agent, AgentStatus.ACTIVE, actor=ACTOR, reason="ok")
    env.clock.set(T0 + 11.2)
    _read(env, agent, cid)
    token = _issue(env, cid)
    env.clock.set(T0 + 11.5)
    env.registry.set_agent_status(agent, AgentStatus.SUSPENDED, actor=ACTOR, reason="incident")
    env.clock.set(T0 + 11.8)
    env.registry.set_agent_status(agent, AgentStatus.ACTIVE, actor=ACTOR, reason="cleared")
    assert _refusal(env, token) == "token_revoked"

    a, b, c = (Ed25519SigningKey.generate() for _ in range(3))
    kid = _keyed(env, a, b, c)
    env.clock.set(T0 + 40.1)
    env.registry.update_agent("kagent", actor=ACTOR, jwks=[b.public.to_jwk(), c.public.to_jwk()])
    env.clock.set(T0 + 42.2)
    _read(env, "kagent", kid)
    stolen = _with_key(env, kid, b)
    env.clock.set(T0 + 42.5)  # key b found leaked too
    env.registry.update_agent("kagent", actor=ACTOR, jwks=[c.public.to_jwk()])
    env.clock.set(T0 + 300)
    assert _refusal(env, stolen) == "token_revoked"


def test_a_mark_far_ahead_asks_for_as_long(env: Env) -> None:
    """A mark set on a replica whose clock runs ahead: nothing is issued that it would end; the
    answer says how long to wait."""
    agent = env.agent()
    client, _ = env.client(agent)
    stored = env.services.registry_store.get_agent(agent)
    env.services.registry_store.update_agent(replace(stored, tokens_not_before=T0 + 30.5))
    _read(env, agent, client.client_id)
    assert _settling(env, client.client_id) == 31

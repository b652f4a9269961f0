"""What ends a client's credentials ends them at once on every token service, whatever its
registry cache (``stores.registry_cache_ttl``) holds: a client is authenticated, and its agent
read, from the store (``ClientAuthenticator``). Token ``iat`` values are whole seconds and never
ahead of the clock, so every ``tokens_not_before`` mark reaches every token issued before it;
while a mark lies ahead of the current second (the rest of the second of a return to active) a
token service issues nothing (503 ``credentials_settling``, ask again in a second)."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import replace

import pytest

from aegis.clock import new_id
from aegis.crypto.jws import encode_segment, sign_compact
from aegis.crypto.keys import Ed25519SigningKey
from aegis.errors import AegisError, ClientAuthError, TokenError, Unavailable
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


def _read(env: Env, agent_id: str, client_id: str) -> None:
    """The token service's cache takes the records as they are now."""
    env.services.cache.invalidate()
    env.services.cache.agent(agent_id)
    env.services.cache.client(client_id)
    env.services.cache.tenant("acme")


def _with_secret(env: Env, cid: str, secret: str) -> str:
    basic = "Basic " + base64.b64encode(f"{cid}:{secret}".encode()).decode()
    auth = asyncio.run(env.services.authenticator.authenticate({}, basic, "10.0.0.7"))
    return env.services.tokens.client_credentials(auth.client, TokenRequest((), ())).token


def _assertion_form(env: Env, cid: str, key: Ed25519SigningKey) -> dict[str, str]:
    """A private_key_jwt client authentication ``key`` signs, for the issuer, now."""
    now = int(env.clock.now())
    claims = {"iss": cid, "sub": cid, "aud": env.services.config.issuer, "exp": now + 60,
              "iat": now, "jti": new_id()}  # fmt: skip
    assertion = sign_compact(encode_segment({"alg": "EdDSA", "kid": key.kid}), claims, key.sign)
    return {"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion}  # fmt: skip


def _with_key(env: Env, cid: str, key: Ed25519SigningKey) -> str:
    form = _assertion_form(env, cid, key)
    auth = asyncio.run(env.services.authenticator.authenticate(form, None, "10.0.0.7"))
    return env.services.tokens.client_credentials(auth.client, TokenRequest((), ())).token


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


def test_a_stopped_secret_authenticates_nothing_however_fresh_the_cache(env: Env) -> None:
    """`rotate_secret(revoke_previous=True)`, or disable-rotate-enable within the cache's
    lifetime: the leaked secret is refused at once, by a service that read the client a moment
    before."""
    agent = env.agent()
    client, leaked = env.client(agent)
    cid = client.client_id
    env.clock.set(T0 + 10.8)
    _read(env, agent, cid)
    env.clock.set(T0 + 10.85)
    _, fresh = env.registry.rotate_secret(cid, actor=ACTOR, revoke_previous=True)
    env.clock.set(T0 + 11.0)
    with pytest.raises(ClientAuthError):
        _with_secret(env, cid, leaked)
    assert _refusal(env, _with_secret(env, cid, fresh)) is None

    env.clock.set(T0 + 20.8)
    _read(env, agent, cid)
    env.registry.set_client_active(cid, False, actor=ACTOR)
    _, newer = env.registry.rotate_secret(cid, actor=ACTOR)
    env.clock.set(T0 + 20.95)
    env.registry.set_client_active(cid, True, actor=ACTOR)
    env.clock.set(T0 + 21.0)
    with pytest.raises(ClientAuthError):
        _with_secret(env, cid, fresh)
    assert _refusal(env, _with_secret(env, cid, newer)) is None


def test_a_removed_key_authenticates_nothing_however_fresh_the_cache(env: Env) -> None:
    leaked, kept = Ed25519SigningKey.generate(), Ed25519SigningKey.generate()
    cid = _keyed(env, leaked, kept)
    env.clock.set(T0 + 30.8)
    _read(env, "kagent", cid)
    env.clock.set(T0 + 30.9)
    env.registry.update_agent("kagent", actor=ACTOR, jwks=[kept.public.to_jwk()])
    env.clock.set(T0 + 31.0)
    with pytest.raises(ClientAuthError):
        _with_key(env, cid, leaked)
    assert _refusal(env, _with_key(env, cid, kept)) is None  # the mark is T0 + 30.9


def test_a_suspended_agent_gets_nothing_however_fresh_the_cache(env: Env) -> None:
    agent = env.agent()
    client, secret = env.client(agent)
    cid = client.client_id
    env.clock.set(T0 + 10.8)
    _read(env, agent, cid)
    env.clock.set(T0 + 10.9)
    env.registry.set_agent_status(agent, AgentStatus.SUSPENDED, actor=ACTOR, reason="incident")
    env.clock.set(T0 + 11.0)
    with pytest.raises(AegisError) as info:
        _with_secret(env, cid, secret)
    assert info.value.code == "unauthorized_client"


def test_every_mark_reaches_every_token_issued_before_it(env: Env) -> None:
    """No token carries an iat past the instant it was issued: a suspension a moment after a
    return ends what was issued between; in the rest of the return's second the token service
    asks for a moment instead of issuing a token that would read as issued before it."""
    agent = env.agent()
    client, secret = env.client(agent)
    cid = client.client_id
    env.clock.set(T0 + 10.05)
    env.registry.set_agent_status(agent, AgentStatus.SUSPENDED, actor=ACTOR, reason="check")
    env.clock.set(T0 + 10.10)
    env.registry.set_agent_status(agent, AgentStatus.ACTIVE, actor=ACTOR, reason="ok")
    env.clock.set(T0 + 10.2)
    with pytest.raises(Unavailable) as info:
        _with_secret(env, cid, secret)
    assert (info.value.code, info.value.details["retry_after"]) == ("credentials_settling", 1)
    env.clock.set(T0 + 11.2)
    token = _with_secret(env, cid, secret)
    assert env.services.verifier.verify(token).iat == T0 + 11
    env.clock.set(T0 + 11.5)
    env.registry.set_agent_status(agent, AgentStatus.SUSPENDED, actor=ACTOR, reason="incident")
    env.clock.set(T0 + 11.8)
    env.registry.set_agent_status(agent, AgentStatus.ACTIVE, actor=ACTOR, reason="cleared")
    assert _refusal(env, token) == "token_revoked"

    a, b = Ed25519SigningKey.generate(), Ed25519SigningKey.generate()
    kid = _keyed(env, a, b)
    env.clock.set(T0 + 42.2)
    stolen = _with_key(env, kid, b)
    env.clock.set(T0 + 42.5)  # key b found leaked
    env.registry.update_agent("kagent", actor=ACTOR, jwks=[a.public.to_jwk()])
    env.clock.set(T0 + 300)
    assert _refusal(env, stolen) == "token_revoked"


def test_a_mark_far_ahead_asks_for_as_long(env: Env) -> None:
    """A mark set on a replica whose clock runs ahead: nothing is issued that it would end; the
    answer says how long to wait."""
    agent = env.agent()
    client, secret = env.client(agent)
    stored = env.services.registry_store.get_agent(agent)
    env.services.registry_store.update_agent(replace(stored, tokens_not_before=T0 + 30.5))
    with pytest.raises(Unavailable) as info:
        _with_secret(env, client.client_id, secret)
    assert info.value.details["retry_after"] == 31


def test_a_key_removed_while_a_request_is_under_way_is_not_issued_on(env: Env) -> None:
    """The key is removed after the request's credentials were checked (against the store) and
    before the token is issued: the token service sees the change and asks again (503), and the
    retry, checked anew, is refused."""
    leaked, kept = Ed25519SigningKey.generate(), Ed25519SigningKey.generate()
    cid = _keyed(env, leaked, kept)
    env.clock.set(T0 + 30.99)
    form = _assertion_form(env, cid, leaked)
    authenticator = env.services.authenticator
    auth = asyncio.run(authenticator.authenticate(form, None, "10.0.0.7", consume=False))
    env.clock.set(T0 + 30.995)
    env.registry.update_agent("kagent", actor=ACTOR, jwks=[kept.public.to_jwk()])
    env.clock.set(T0 + 31.001)
    with pytest.raises(Unavailable) as info:
        env.services.tokens.client_credentials(
            auth.client, TokenRequest((), ()), read_at=auth.read_at
        )
    assert info.value.code == "credentials_settling"
    with pytest.raises(ClientAuthError):
        asyncio.run(authenticator.authenticate(form, None, "10.0.0.7", consume=False))

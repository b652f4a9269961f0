"""The token service over real HTTP: a third-party OAuth client, joserfc against our JWKS, and the
RFC 6749 / 7523 / 7662 / 7009 error paths."""

from __future__ import annotations

import base64
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from authlib.integrations.httpx_client import OAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from joserfc import jwt
from joserfc.jwk import KeySet, OKPKey

from aegis.clock import new_id
from aegis.crypto.jws import encode_segment, sign_compact
from aegis.crypto.keys import Ed25519SigningKey
from aegis.registry.service import AgentSpec
from aegis.types import AdminRole, AgentStatus, ClientAuthMethod
from tests.support.server import RunningServer, run_server

ADMIN = "test-admin"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # Many deliberate failures come from 127.0.0.1 here; the limiter has its own test below.
    with run_server(
        tmp_path_factory.mktemp("oauth"), "oauth:\n  auth_failure_limit: 10000\n"
    ) as srv:
        yield srv


def _agent(
    srv: RunningServer,
    scopes: tuple[str, ...] = ("payments:write", "payments:read"),
    jwks: tuple[dict[str, Any], ...] = (),
) -> str:
    agent_id = f"agent-{new_id(4).lower().replace('_', 'x')}"
    srv.services.registry.register_agent(
        AgentSpec(agent_id, "acme", "prod", "alice@example.com", allowed_scopes=scopes, jwks=jwks),
        actor=ADMIN,
    )
    return agent_id


def _secret_client(
    srv: RunningServer, method: ClientAuthMethod = ClientAuthMethod.CLIENT_SECRET_BASIC
) -> tuple[str, str, str]:
    agent_id = _agent(srv)
    client, secret = srv.services.registry.create_client(agent_id, auth_method=method, actor=ADMIN)
    assert secret is not None
    return agent_id, client.client_id, secret


def _verify_with_joserfc(srv: RunningServer, token: str) -> dict[str, Any]:
    jwks = httpx.get(f"{srv.url}/.well-known/jwks.json").json()
    assert all("d" not in k for k in jwks["keys"])
    with warnings.catch_warnings():
        # joserfc flags the polymorphic EdDSA identifier as deprecated by RFC 9864; that is the
        # identifier deployed verifiers accept today, so the warning is expected here only.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        decoded = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["EdDSA", "Ed25519"])
    assert decoded.header["typ"] == "at+jwt"
    return dict(decoded.claims)


def test_client_secret_basic_with_authlib(server: RunningServer) -> None:
    agent_id, client_id, secret = _secret_client(server)
    with OAuth2Client(client_id, secret, token_endpoint_auth_method="client_secret_basic") as oc:
        token = oc.fetch_token(
            f"{server.url}/oauth/token", grant_type="client_credentials", scope="payments:write"
        )
    assert token["token_type"] == "Bearer"
    assert token["scope"] == "payments:write"
    claims = _verify_with_joserfc(server, token["access_token"])
    assert claims["sub"] == agent_id == claims["agent_id"]
    assert claims["client_id"] == client_id
    assert claims["tenant"] == "acme" and claims["env"] == "prod"
    assert claims["iss"] == server.url and claims["aud"] == "aegis-gateway"
    assert claims["exp"] - claims["iat"] == 300
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16


def test_client_secret_post_with_authlib(server: RunningServer) -> None:
    _, client_id, secret = _secret_client(server, ClientAuthMethod.CLIENT_SECRET_POST)
    with OAuth2Client(client_id, secret, token_endpoint_auth_method="client_secret_post") as oc:
        token = oc.fetch_token(f"{server.url}/oauth/token", grant_type="client_credentials")
    claims = _verify_with_joserfc(server, token["access_token"])
    assert claims["scope"] == "payments:write payments:read"  # no scope asked: all allowed scopes


def test_private_key_jwt_with_authlib(server: RunningServer) -> None:
    key = Ed25519SigningKey.generate()
    agent_id = _agent(server, jwks=(key.public.to_jwk(),))
    client, secret = server.services.registry.create_client(
        agent_id, auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor=ADMIN
    )
    assert secret is None
    token_url = f"{server.url}/oauth/token"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        with OAuth2Client(
            client.client_id,
            OKPKey.import_key(key.private_jwk()),
            # authlib's audience is its first argument: the issuer (rfc7523bis).
            token_endpoint_auth_method=PrivateKeyJWT(
                server.url, alg="EdDSA", claims={"exp": int(time.time()) + 60}
            ),
        ) as oc:
            token = oc.fetch_token(
                token_url, grant_type="client_credentials", scope="payments:read"
            )
    claims = _verify_with_joserfc(server, token["access_token"])
    assert claims["sub"] == agent_id and claims["scope"] == "payments:read"


def _assertion(key: Ed25519SigningKey, client_id: str, aud: str, **over: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": aud,
        "exp": now + 60,
        "iat": now,
        "jti": new_id(),
    }
    claims.update(over)
    return sign_compact(
        encode_segment({"alg": "EdDSA", "typ": "JWT", "kid": key.kid}), claims, key.sign
    )


def test_private_key_jwt_replay_and_bad_assertions(server: RunningServer) -> None:
    key = Ed25519SigningKey.generate()
    other = Ed25519SigningKey.generate()
    agent_id = _agent(server, jwks=(key.public.to_jwk(),))
    client, _ = server.services.registry.create_client(
        agent_id, auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor=ADMIN
    )
    url = f"{server.url}/oauth/token"

    def post(assertion: str) -> httpx.Response:
        return httpx.post(
            url,
            data={
                "grant_type": "client_credentials",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion,
            },
        )

    good = _assertion(key, client.client_id, server.url)
    assert post(good).status_code == 200
    replayed = post(good)
    assert replayed.status_code == 401 and replayed.json()["error"] == "invalid_client"
    assert "replayed" in replayed.json()["error_description"]
    cases = {
        "wrong key": _assertion(other, client.client_id, server.url),
        "wrong audience": _assertion(key, client.client_id, "https://elsewhere.example/token"),
        "token endpoint audience": _assertion(key, client.client_id, url),
        "expired": _assertion(
            key, client.client_id, url, exp=int(time.time()) - 120, iat=int(time.time()) - 200
        ),
        "too long": _assertion(key, client.client_id, server.url, exp=int(time.time()) + 3600),
        "iss differs": _assertion(key, client.client_id, server.url, iss="someone-else"),
        "no jti": _assertion(key, client.client_id, server.url, jti=None),
    }
    for name, assertion in cases.items():
        resp = post(assertion)
        assert resp.status_code == 401, name
        assert resp.json()["error"] == "invalid_client", name


def test_wrong_secret_and_error_bodies(server: RunningServer) -> None:
    _, client_id, secret = _secret_client(server)
    url = f"{server.url}/oauth/token"
    resp = httpx.post(
        url, data={"grant_type": "client_credentials"}, auth=(client_id, secret + "x")
    )
    assert resp.status_code == 401
    assert resp.json()["error"] == "invalid_client"
    assert resp.headers["www-authenticate"].startswith("Basic")
    assert resp.headers["cache-control"] == "no-store"
    assert secret not in resp.text
    assert (
        httpx.post(url, data={"grant_type": "password"}, auth=(client_id, secret)).json()["error"]
        == "unsupported_grant_type"
    )
    assert httpx.post(url, data={}, auth=(client_id, secret)).json()["error"] == "invalid_request"
    bad_scope = httpx.post(
        url,
        data={"grant_type": "client_credentials", "scope": "admin:all"},
        auth=(client_id, secret),
    )
    assert bad_scope.status_code == 400 and bad_scope.json()["error"] == "invalid_scope"
    bad_aud = httpx.post(
        url,
        data={"grant_type": "client_credentials", "resource": "https://evil.example"},
        auth=(client_id, secret),
    )
    assert bad_aud.status_code == 400 and bad_aud.json()["error"] == "invalid_target"
    repeated = httpx.post(
        url,
        content="grant_type=client_credentials&scope=a&scope=b",
        headers={"content-type": "application/x-www-form-urlencoded"},
        auth=(client_id, secret),
    )
    assert repeated.json()["error"] == "invalid_request"
    as_json = httpx.post(url, json={"grant_type": "client_credentials"}, auth=(client_id, secret))
    assert as_json.status_code == 400 and as_json.json()["error"] == "invalid_request"
    two_methods = httpx.post(
        url,
        data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
        auth=(client_id, secret),
    )
    assert two_methods.json()["error"] == "invalid_request"
    huge = httpx.post(
        url, data={"grant_type": "client_credentials", "x": "a" * 70000}, auth=(client_id, secret)
    )
    assert huge.status_code == 413
    # the right method only: a basic client may not use client_secret_post
    post_style = httpx.post(
        url,
        data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
    )
    assert post_style.status_code == 401


def test_failed_authentication_is_rate_limited(tmp_path: Path) -> None:
    with run_server(tmp_path, "oauth:\n  auth_failure_limit: 3\n") as srv:
        _, client_id, secret = _secret_client(srv)
        url = f"{srv.url}/oauth/token"
        codes = [
            httpx.post(
                url, data={"grant_type": "client_credentials"}, auth=(client_id, "nope")
            ).status_code
            for _ in range(4)
        ]
        assert codes == [401, 401, 401, 429]
        # while limited, even the right secret is refused: the limit is not an oracle
        assert (
            httpx.post(
                url, data={"grant_type": "client_credentials"}, auth=(client_id, secret)
            ).status_code
            == 429
        )


def _token(srv: RunningServer, client_id: str, secret: str) -> str:
    resp = httpx.post(
        f"{srv.url}/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=(client_id, secret),
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def test_introspection_and_revocation(server: RunningServer) -> None:
    _, client_id, secret = _secret_client(server)
    token = _token(server, client_id, secret)
    url = f"{server.url}/oauth/introspect"
    live = httpx.post(url, data={"token": token}, auth=(client_id, secret)).json()
    assert live["active"] is True and live["client_id"] == client_id
    # the caller must authenticate
    assert httpx.post(url, data={"token": token}).status_code == 401
    # unknown and garbage tokens: exactly {"active": false}
    assert httpx.post(url, data={"token": "x.y.z"}, auth=(client_id, secret)).json() == {
        "active": False
    }
    # another tenant's caller learns nothing
    other_agent = f"other-{new_id(4).lower().replace('_', 'x')}"
    server.services.registry.register_agent(
        AgentSpec(other_agent, "globex", "prod", "bob@example.com", allowed_scopes=("x",)),
        actor=ADMIN,
    )
    oc, osecret = server.services.registry.create_client(other_agent, actor=ADMIN)
    assert osecret is not None
    assert httpx.post(url, data={"token": token}, auth=(oc.client_id, osecret)).json() == {
        "active": False
    }
    # revocation: unknown tokens get 200; another tenant's client revokes nothing, told nothing
    rurl = f"{server.url}/oauth/revoke"
    assert httpx.post(rurl, data={"token": "garbage"}, auth=(client_id, secret)).status_code == 200
    assert httpx.post(rurl, data={"token": token}, auth=(oc.client_id, osecret)).status_code == 200
    assert httpx.post(url, data={"token": token}, auth=(client_id, secret)).json()["active"] is True
    assert httpx.post(rurl, data={"token": token}, auth=(client_id, secret)).status_code == 200
    assert httpx.post(url, data={"token": token}, auth=(client_id, secret)).json() == {
        "active": False
    }


def test_retired_agent_token_inactive_and_refused(server: RunningServer) -> None:
    agent_id, client_id, secret = _secret_client(server)
    token = _token(server, client_id, secret)
    server.services.registry.set_agent_status(agent_id, AgentStatus.RETIRED, actor=ADMIN)
    time.sleep(server.config.stores.registry_cache_ttl + 0.05)
    _, admin = server.services.registry.create_admin_key("ops", AdminRole.ADMIN, actor=ADMIN)
    intro = httpx.post(f"{server.url}/oauth/introspect", data={"token": token},
                       headers={"Authorization": f"Bearer {admin}"})  # fmt: skip
    assert intro.json() == {"active": False}
    # Its own client may no longer introspect at all (nor get tokens).
    own = httpx.post(
        f"{server.url}/oauth/introspect", data={"token": token}, auth=(client_id, secret)
    )
    assert (own.status_code, own.json()["error"]) == (401, "invalid_client")
    refused = httpx.post(
        f"{server.url}/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=(client_id, secret),
    )
    assert refused.status_code == 400 and refused.json()["error"] == "unauthorized_client"


def test_secret_rotation_overlap(server: RunningServer) -> None:
    _, client_id, old = _secret_client(server)
    _, new = server.services.registry.rotate_secret(client_id, actor=ADMIN)
    server.services.cache.invalidate()
    assert new != old
    _token(server, client_id, old)  # still inside the overlap window
    _token(server, client_id, new)
    _, newer = server.services.registry.rotate_secret(client_id, actor=ADMIN)
    server.services.cache.invalidate()
    # the oldest secret is gone once a second rotation happens
    resp = httpx.post(
        f"{server.url}/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=(client_id, old),
    )
    assert resp.status_code == 401
    _token(server, client_id, newer)


def test_metadata_and_jwks(server: RunningServer) -> None:
    meta = httpx.get(f"{server.url}/.well-known/oauth-authorization-server").json()
    assert meta["issuer"] == server.url
    assert meta["token_endpoint"] == f"{server.url}/oauth/token"
    assert "private_key_jwt" in meta["token_endpoint_auth_methods_supported"]
    jwks = httpx.get(f"{server.url}/.well-known/jwks.json").json()
    states = {r.kid: r.state.value for r in server.services.keyring.records()}
    assert {k["kid"] for k in jwks["keys"]} == set(states)
    assert sorted(states.values()) == ["active", "next"]
    for k in jwks["keys"]:
        assert set(k) == {"kty", "crv", "x", "kid", "use", "alg"}
        assert len(base64.urlsafe_b64decode(k["x"] + "=")) == 32


def test_rejections_are_logged_without_secrets(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    _, client_id, secret = _secret_client(server)
    token = _token(server, client_id, secret)
    caplog.set_level("INFO", logger="aegis")
    httpx.post(
        f"{server.url}/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=(client_id, secret[:-2] + "zz"),
    )
    httpx.post(
        f"{server.url}/oauth/token",
        data={"grant_type": "client_credentials", "scope": "nope:nope"},
        auth=(client_id, secret),
    )
    httpx.post(f"{server.url}/oauth/introspect", data={"token": token})
    records = [r for r in caplog.records if r.getMessage() == "oauth.rejected"]
    assert len(records) >= 3
    codes = {r.aegis_fields["code"] for r in records}  # type: ignore[attr-defined]
    assert {"invalid_client", "invalid_scope"} <= codes
    dump = " ".join(repr(r.__dict__) for r in caplog.records)
    assert secret not in dump and secret[:-2] not in dump
    assert token not in dump and token.split(".")[1] not in dump


def test_revoking_another_clients_token_is_refused(server: RunningServer) -> None:
    """RFC 7009 §2.1: a token issued to another client is refused, not answered 200 (which reads
    as revoked while the token stays live), where the caller could introspect it anyway (its
    tenant, its agent active). A suspended agent's client, which may not introspect, is told
    nothing: 200, as for an invalid token. The token's own client revokes it."""
    agent_id, owner, owner_secret = _secret_client(server)
    sibling, sibling_secret = server.services.registry.create_client(agent_id, actor=ADMIN)
    _, stranger, stranger_secret = _secret_client(server)  # another agent of the tenant
    assert sibling_secret is not None
    token = _token(server, owner, owner_secret)
    revoke, look = f"{server.url}/oauth/revoke", f"{server.url}/oauth/introspect"
    for caller in ((sibling.client_id, sibling_secret), (stranger, stranger_secret)):
        refused = httpx.post(revoke, data={"token": token}, auth=caller)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == "unauthorized_client"
        assert token not in refused.text
    assert httpx.post(look, data={"token": token}, auth=(owner, owner_secret)).json()["active"]
    stranger_agent = server.services.registry.store.get_client(stranger).agent_id
    server.services.registry.set_agent_status(stranger_agent, AgentStatus.SUSPENDED, actor=ADMIN)
    server.services.cache.invalidate()
    quiet = httpx.post(revoke, data={"token": token}, auth=(stranger, stranger_secret))
    assert quiet.status_code == 200
    assert httpx.post(look, data={"token": token}, auth=(owner, owner_secret)).json()["active"]
    assert httpx.post(revoke, data={"token": token}, auth=(owner, owner_secret)).status_code == 200
    assert httpx.post(look, data={"token": token}, auth=(owner, owner_secret)).json() == {
        "active": False
    }


def test_a_token_asked_while_a_mark_lies_ahead_is_answered_with_the_wait(
    server: RunningServer,
) -> None:
    """A return to active or a key removal sets the subject's `tokens_not_before` at or ahead
    of now; a token issued before it passes would be refused for it, so the token endpoint
    answers 503 `temporarily_unavailable` with `Retry-After` (the SDK waits and asks again)
    rather than a token that is dead on arrival."""
    from dataclasses import replace

    agent_id, client_id, secret = _secret_client(server)
    store = server.services.registry_store
    store.update_agent(replace(store.get_agent(agent_id), tokens_not_before=time.time() + 20.5))
    server.services.cache.invalidate()
    url = f"{server.url}/oauth/token"
    answer = httpx.post(url, data={"grant_type": "client_credentials"}, auth=(client_id, secret))
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"] == "temporarily_unavailable"
    assert 20 <= int(answer.headers["retry-after"]) <= 22
    store.update_agent(replace(store.get_agent(agent_id), tokens_not_before=time.time() - 1))
    server.services.cache.invalidate()
    assert _token(server, client_id, secret)

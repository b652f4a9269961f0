"""Every refusal of the OAuth endpoints is counted under its stable code, logged with that code and
no secret, answered with an RFC 6749 §5.2 body (``WWW-Authenticate`` on 401), and writes nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from aegis.clock import new_id
from aegis.crypto.jws import encode_segment, sign_compact
from aegis.crypto.keys import Ed25519SigningKey
from aegis.registry.service import AgentSpec
from aegis.telemetry.metrics import REGISTRY
from aegis.types import AgentStatus, ClientAuthMethod
from tests.support.server import RunningServer, run_server

ADMIN = "test-admin"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with run_server(
        tmp_path_factory.mktemp("rejections"), "oauth:\n  auth_failure_limit: 10000\n"
    ) as srv:
        yield srv


def _rejections(endpoint: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "aegis_oauth_rejections_total", {"endpoint": endpoint, "code": code}
    )
    return value or 0.0


def _client(srv: RunningServer) -> tuple[str, str, str]:
    agent_id = f"agent-{new_id(4).lower().replace('_', 'x')}"
    srv.services.registry.register_agent(
        AgentSpec(agent_id, "acme", "prod", "a@example.com", allowed_scopes=("p:w",)), actor=ADMIN
    )
    client, secret = srv.services.registry.create_client(agent_id, actor=ADMIN)
    assert secret is not None
    return agent_id, client.client_id, secret


def _cases(
    srv: RunningServer,
) -> dict[str, tuple[str, str, int, str, Callable[[], httpx.Response]]]:
    """name -> (endpoint, stable code, status, RFC 6749 error, request)."""
    _, cid, secret = _client(srv)
    retired, rcid, rsecret = _client(srv)
    srv.services.registry.set_agent_status(retired, AgentStatus.RETIRED, actor=ADMIN)
    token, intro, revoke = (f"{srv.url}/oauth/{p}" for p in ("token", "introspect", "revoke"))
    grant = {"grant_type": "client_credentials"}
    return {
        "wrong secret": (
            "token", "invalid_client", 401, "invalid_client",
            lambda: httpx.post(token, data=grant, auth=(cid, secret + "x")),
        ),
        "no grant type": (
            "token", "invalid_request", 400, "invalid_request",
            lambda: httpx.post(token, data={}, auth=(cid, secret)),
        ),
        "password grant": (
            "token", "unsupported_grant_type", 400, "unsupported_grant_type",
            lambda: httpx.post(token, data={"grant_type": "password"}, auth=(cid, secret)),
        ),
        "scope not allowed": (
            "token", "invalid_scope", 400, "invalid_scope",
            lambda: httpx.post(token, data={**grant, "scope": "x:y"}, auth=(cid, secret)),
        ),
        "unknown audience": (
            "token", "invalid_target", 400, "invalid_target",
            lambda: httpx.post(
                token, data={**grant, "resource": "https://e.example"}, auth=(cid, secret)
            ),
        ),
        "retired agent": (
            "token", "unauthorized_client", 400, "unauthorized_client",
            lambda: httpx.post(token, data=grant, auth=(rcid, rsecret)),
        ),
        "introspection without authentication": (
            "introspect", "invalid_client", 401, "invalid_client",
            lambda: httpx.post(intro, data={"token": "a.b.c"}),
        ),
        "revocation with a wrong secret": (
            "revoke", "invalid_client", 401, "invalid_client",
            lambda: httpx.post(revoke, data={"token": "a.b.c"}, auth=(cid, "nope")),
        ),
        "introspection without a token": (
            "introspect", "invalid_request", 400, "invalid_request",
            lambda: httpx.post(intro, data={}, auth=(cid, secret)),
        ),
    }  # fmt: skip


def test_every_rejection_is_counted_logged_and_answered_per_rfc_6749(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="aegis")
    for name, (endpoint, code, status, error, send) in _cases(server).items():
        server.services.cache.invalidate()
        before = _rejections(endpoint, code)
        events = len(server.services.registry_store.list_events(limit=100_000))
        caplog.clear()
        resp = send()
        assert resp.status_code == status, (name, resp.text)
        body = resp.json()
        assert set(body) == {"error", "error_description"}, name
        assert body["error"] == error, name
        assert resp.headers["cache-control"] == "no-store", name
        if status == 401:
            assert resp.headers["www-authenticate"].startswith("Basic"), name
        assert _rejections(endpoint, code) == before + 1, name
        logged = [r for r in caplog.records if r.getMessage() == "oauth.rejected"]
        assert [r.aegis_fields["code"] for r in logged] == [code], name  # type: ignore[attr-defined]
        # A refused request writes nothing.
        assert len(server.services.registry_store.list_events(limit=100_000)) == events, name


def test_a_refused_request_does_not_spend_its_client_assertion(server: RunningServer) -> None:
    key = Ed25519SigningKey.generate()
    agent_id = f"agent-{new_id(4).lower().replace('_', 'x')}"
    server.services.registry.register_agent(
        AgentSpec(
            agent_id, "acme", "prod", "a@example.com", allowed_scopes=("p:w",),
            jwks=(key.public.to_jwk(),),
        ),
        actor=ADMIN,
    )  # fmt: skip
    client, _ = server.services.registry.create_client(
        agent_id, auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor=ADMIN
    )
    url, now = f"{server.url}/oauth/token", int(time.time())
    claims = {"iss": client.client_id, "sub": client.client_id, "aud": server.url}
    claims |= {"exp": now + 60, "iat": now, "jti": new_id()}
    assertion = sign_compact(encode_segment({"alg": "EdDSA", "typ": "JWT"}), claims, key.sign)
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
    }
    refused = httpx.post(url, data={**form, "scope": "not:mine"})
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope"
    # The jti was not recorded by the refused request: the same assertion still works once.
    assert httpx.post(url, data=form).status_code == 200
    assert httpx.post(url, data=form).status_code == 401

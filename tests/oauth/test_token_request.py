"""What a client_credentials request can ask for, over real HTTP: scopes narrowed to the agent's,
the audience from ``resource`` (RFC 8707) or ``audience``, and a lifetime under the configured cap."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from aegis.clock import new_id
from aegis.registry.service import AgentSpec
from tests.support.server import RunningServer, run_server

PAYMENTS = "https://payments.example"
CONFIG = (
    "tokens:\n  default_lifetime: 120\n  max_lifetime: 600\n"
    f"  audiences: [aegis-gateway, '{PAYMENTS}', https://crm.example]\n"
)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str, str]]:
    with run_server(tmp_path_factory.mktemp("token-request"), CONFIG) as srv:
        agent_id = f"agent-{new_id(4).lower().replace('_', 'x')}"
        srv.services.registry.register_agent(
            AgentSpec(agent_id, "acme", "prod", "a@example.com", allowed_scopes=("p:r", "p:w")),
            actor="test",
        )
        created, secret = srv.services.registry.create_client(agent_id, actor="test")
        assert secret is not None
        yield srv, created.client_id, secret


def _grant(c: tuple[RunningServer, str, str], content: str) -> httpx.Response:
    srv, client_id, secret = c
    return httpx.post(
        f"{srv.url}/oauth/token",
        content="&".join(p for p in ("grant_type=client_credentials", content) if p),
        headers={"content-type": "application/x-www-form-urlencoded"},
        auth=(client_id, secret),
    )


def _claims(c: tuple[RunningServer, str, str], content: str) -> dict[str, Any]:
    resp = _grant(c, content)
    assert resp.status_code == 200, resp.text
    claims = c[0].services.verifier.verify(resp.json()["access_token"]).claims
    assert resp.json()["expires_in"] == claims["exp"] - claims["iat"]
    assert resp.json()["scope"] == claims["scope"]
    return dict(claims)


def test_scopes_are_narrowed_to_what_the_agent_may_hold(
    client: tuple[RunningServer, str, str],
) -> None:
    assert _claims(client, "scope=p:r")["scope"] == "p:r"
    assert _claims(client, "scope=p:w+admin:all+p:r")["scope"] == "p:w p:r"
    assert _claims(client, "")["scope"] == "p:r p:w"
    assert _grant(client, "scope=admin:all").json()["error"] == "invalid_scope"


def test_the_audience_comes_from_resource_or_audience(
    client: tuple[RunningServer, str, str],
) -> None:
    assert _claims(client, "")["aud"] == "aegis-gateway"  # the first configured is the default
    assert _claims(client, f"resource={PAYMENTS}")["aud"] == PAYMENTS
    both = _claims(client, f"resource={PAYMENTS}&resource=https://crm.example")
    assert both["aud"] == [PAYMENTS, "https://crm.example"]
    assert _claims(client, f"audience={PAYMENTS}")["aud"] == PAYMENTS
    for bad in (
        "resource=https://evil.example",
        f"resource={PAYMENTS}&resource=https://evil.example",
        f"resource={PAYMENTS}/",
        "audience=https://evil.example",
    ):
        resp = _grant(client, bad)
        assert resp.status_code == 400 and resp.json()["error"] == "invalid_target", bad


def test_the_lifetime_defaults_and_is_capped(client: tuple[RunningServer, str, str]) -> None:
    def life(content: str) -> int:
        claims = _claims(client, content)
        return int(claims["exp"] - claims["iat"])

    assert life("") == 120
    assert life("expires_in=60") == 60
    assert life("expires_in=600") == 600
    assert life("expires_in=86400") == 600  # never above tokens.max_lifetime
    for bad in ("expires_in=0", "expires_in=-5", "expires_in=ten", "expires_in=1.5"):
        resp = _grant(client, bad)
        assert resp.status_code == 400 and resp.json()["error"] == "invalid_request", bad

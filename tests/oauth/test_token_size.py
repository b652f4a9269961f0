"""No access token over 8 KiB is issued (docs/security.md): every verifier, Aegis's own included,
refuses one. The token endpoint signed whatever an agent's scopes made of the payload and
answered 200 with a token that introspected as inactive the moment it was issued; it now refuses
with ``invalid_scope`` and fewer scopes get a token. Real control plane on loopback.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from aegis.registry.service import AgentSpec
from tests.support.server import RunningServer, run_server

MAX = 8 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with run_server(tmp_path_factory.mktemp("size")) as srv:
        yield srv


def test_no_issued_access_token_exceeds_8_kib(server: RunningServer) -> None:
    scopes = tuple(f"records:tenant-region-{i:04d}:read" for i in range(300))
    server.services.registry.register_agent(
        AgentSpec("wide-agent", "acme", "prod", "a@example.com", allowed_scopes=scopes),
        actor="test-admin",
    )
    client, secret = server.services.registry.create_client("wide-agent", actor="test-admin")
    assert secret is not None
    resp = httpx.post(
        f"{server.url}/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=(client.client_id, secret),
        timeout=5,
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "invalid_scope" and "fewer scopes" in resp.text
    fewer = httpx.post(
        f"{server.url}/oauth/token",
        data={"grant_type": "client_credentials", "scope": " ".join(scopes[:20])},
        auth=(client.client_id, secret),
        timeout=5,
    )
    assert fewer.status_code == 200, fewer.text
    assert len(fewer.json()["access_token"]) <= MAX

"""DPoP at the token endpoint (RFC 9449 §5): bound tokens for a valid proof, refusals otherwise."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.gateway.harness import AgentClient
from tests.gateway.helpers import jkt_of, mint_proof
from tests.support.server import RunningServer, run_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with run_server(tmp_path_factory.mktemp("dpop-token")) as srv:
        yield srv


def _post(agent: AgentClient, proof: str | None) -> httpx.Response:
    data = {
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": agent.assertion(),
    }
    headers = {"DPoP": proof} if proof is not None else {}
    return httpx.post(f"{agent.srv.url}/oauth/token", data=data, headers=headers)


def test_valid_proof_binds_the_token_to_its_key(server: RunningServer) -> None:
    agent = AgentClient(server, "bound")
    resp = agent.token()
    assert resp.status_code == 200, resp.text
    assert resp.json()["token_type"] == "DPoP"
    token = server.services.verifier.verify(resp.json()["access_token"])
    assert token.cnf == {"jkt": jkt_of(agent.key)}


def test_dpop_bound_client_must_send_a_proof(server: RunningServer) -> None:
    agent = AgentClient(server, "noproof")
    resp = _post(agent, None)
    assert resp.status_code == 401
    assert resp.json()["error"] == "invalid_dpop_proof"


def test_replayed_or_misdirected_proof_is_refused(server: RunningServer) -> None:
    agent = AgentClient(server, "replay")
    url = f"{server.url}/oauth/token"
    proof = mint_proof(agent.key, "POST", url)
    assert _post(agent, proof).status_code == 200
    again = _post(agent, proof)
    assert (again.status_code, again.json()["error"]) == (401, "invalid_dpop_proof")
    elsewhere = _post(agent, mint_proof(agent.key, "POST", f"{server.url}/oauth/other"))
    assert (elsewhere.status_code, elsewhere.json()["error"]) == (401, "invalid_dpop_proof")
    private = _post(
        agent, mint_proof(agent.key, "POST", url, header={"jwk": agent.key.private_jwk()})
    )
    assert private.json()["error"] == "invalid_dpop_proof"
    assert agent.key.private_jwk()["d"] not in private.text

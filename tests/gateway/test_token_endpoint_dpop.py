"""DPoP at the token endpoint (RFC 9449 §5): bound tokens for a valid proof, refusals otherwise
(400, as RFC 6749 §5.2 answers every error but invalid_client); a proof is spent only once the
whole request is valid, and an exchange refused for its proof is recorded like any other."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from aegis.audit.log import AuditLog
from aegis.clock import FrozenClock
from aegis.crypto.keys import b64u_decode
from aegis.stores.memory import MemoryReplayStore
from aegis.telemetry.metrics import REGISTRY
from aegis.tokens.delegation import mint_grant
from aegis.tokens.dpop import DpopVerifier, NonceSource, token_endpoint_hook
from aegis.tokens.exchange import DELEGATION_GRANT, EXCHANGE_AUDIT_KIND, JWT_TYPE, TOKEN_EXCHANGE
from tests.gateway.harness import AgentClient
from tests.gateway.helpers import jkt_of, mint_proof
from tests.support.server import RunningServer, run_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # Many refusals from one address: none of them may be taken for a credential guesser.
    with run_server(
        tmp_path_factory.mktemp("dpop-token"), "oauth:\n  auth_failure_limit: 10000\n"
    ) as srv:
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
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_dpop_proof"
    assert "www-authenticate" not in resp.headers


def test_replayed_or_misdirected_proof_is_refused(server: RunningServer) -> None:
    agent = AgentClient(server, "replay")
    url = f"{server.url}/oauth/token"
    proof = mint_proof(agent.key, "POST", url)
    assert _post(agent, proof).status_code == 200
    replays = REGISTRY.get_sample_value("aegis_replay_attempts_total") or 0.0
    again = _post(agent, proof)
    assert REGISTRY.get_sample_value("aegis_replay_attempts_total") == replays + 1
    assert (again.status_code, again.json()["error"]) == (400, "invalid_dpop_proof")
    elsewhere = _post(agent, mint_proof(agent.key, "POST", f"{server.url}/oauth/other"))
    assert (elsewhere.status_code, elsewhere.json()["error"]) == (400, "invalid_dpop_proof")
    # Not the Basic challenge of a client authentication failure: the client did authenticate.
    assert "basic" not in elsewhere.headers.get("www-authenticate", "").lower()
    private = _post(
        agent, mint_proof(agent.key, "POST", url, header={"jwk": agent.key.private_jwk()})
    )
    assert private.json()["error"] == "invalid_dpop_proof"
    assert agent.key.private_jwk()["d"] not in private.text


ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _cc(agent: AgentClient, proof: str | None, **form: str) -> httpx.Response:
    data = {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION,
        "client_assertion": agent.assertion(),
        "scope": "payments:write",
        **form,
    }
    headers = {"DPoP": proof} if proof is not None else {}
    return httpx.post(f"{agent.srv.url}/oauth/token", data=data, headers=headers)


def _grant(parent: AgentClient, child: AgentClient) -> tuple[str, str]:
    """A one-link delegation grant from parent to child and its jti."""
    grant = mint_grant(
        parent.key,
        parent=parent.id,
        child=child.id,
        audience=parent.srv.url,
        scopes=("payments:write",),
        tools=("pay_invoice",),
        max_depth=1,
        now=time.time(),
    )
    jti = json.loads(b64u_decode(grant.split(".")[1]))["jti"]
    return grant, jti


def _exchange(child: AgentClient, subject: str, proof: str | None, **form: str) -> httpx.Response:
    data: dict[str, Any] = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject,
        "subject_token_type": DELEGATION_GRANT,
        "actor_token": child.assertion(),
        "actor_token_type": JWT_TYPE,
        **form,
    }
    headers = {"DPoP": proof} if proof is not None else {}
    return httpx.post(f"{child.srv.url}/oauth/token", data=data, headers=headers)


def test_invalid_dpop_proof_at_the_token_endpoint_is_a_400(server: RunningServer) -> None:
    """RFC 9449 §5: "If the DPoP proof is invalid, the authorization server issues an error
    response per Section 5.2 of [RFC6749] with invalid_dpop_proof" -- RFC 6749 §5.2: HTTP 400
    unless specified otherwise (only invalid_client may be 401). Not a 401 with
    ``WWW-Authenticate: Basic``, which would tell the client its authentication failed."""
    agent = AgentClient(server, "status")
    wrong_htu = mint_proof(agent.key, "POST", f"{server.url}/oauth/other")
    resp = _cc(agent, wrong_htu)
    assert resp.json()["error"] == "invalid_dpop_proof"
    assert resp.status_code == 400, (resp.status_code, resp.headers.get("www-authenticate"))
    assert "basic" not in resp.headers.get("www-authenticate", "").lower()


def test_dpop_bound_client_without_a_proof_is_a_400(server: RunningServer) -> None:
    agent = AgentClient(server, "noproof")
    resp = _cc(agent, None)
    assert resp.json()["error"] == "invalid_dpop_proof"
    assert resp.status_code == 400, (resp.status_code, resp.headers.get("www-authenticate"))


def test_client_credentials_refused_for_its_audience_does_not_spend_the_proof(
    server: RunningServer,
) -> None:
    """A request refused for its audience leaves its proof unspent, as it leaves the client
    assertion: the corrected retry may send the same proof."""
    agent = AgentClient(server, "retry-cc")
    proof = mint_proof(agent.key, "POST", f"{server.url}/oauth/token")
    refused = _cc(agent, proof, resource="https://unknown.example")
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_target")
    retried = _cc(agent, proof)
    assert retried.status_code == 200, retried.text


def test_token_exchange_refused_for_its_scope_does_not_spend_the_proof(
    server: RunningServer,
) -> None:
    """An exchange refused for its scope leaves its proof unspent, with the grant and the actor's
    assertion: the corrected retry is issued a token bound to the same key."""
    parent, child = AgentClient(server, "parent"), AgentClient(server, "child")
    grant, _ = _grant(parent, child)
    proof = mint_proof(child.key, "POST", f"{server.url}/oauth/token")
    refused = _exchange(child, grant, proof, scope="admin:all")
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"] == "invalid_scope"
    retried = _exchange(child, grant, proof)
    assert retried.status_code == 200, retried.text
    assert retried.json()["token_type"] == "DPoP"
    token = server.services.verifier.verify(retried.json()["access_token"])
    assert token.cnf == {"jkt": jkt_of(child.key)}


def test_exchange_refused_for_its_dpop_proof_is_audited(server: RunningServer) -> None:
    """Every exchange, issued or refused, is recorded with the presented chain: one refused for
    its DPoP proof too, as one refused for sending none."""
    parent, child = AgentClient(server, "aparent"), AgentClient(server, "achild")
    grant, grant_jti = _grant(parent, child)
    bad = mint_proof(child.key, "POST", f"{server.url}/oauth/elsewhere")
    resp = _exchange(child, grant, bad)
    assert resp.json()["error"] == "invalid_dpop_proof"

    audit = server.services.extras["exchange_audit"]
    assert isinstance(audit, AuditLog)

    def refusals_for(jti: str) -> list[dict[str, Any]]:
        return [
            r
            for r in audit.records(kind=EXCHANGE_AUDIT_KIND)
            if r["action"] == "refused"
            and any(link.get("jti") == jti for link in r.get("chain_presented") or [])
        ]

    # Control: the same kind of refusal raised inside the exchanger is recorded.
    grant2, grant2_jti = _grant(parent, child)
    assert _exchange(child, grant2, None).json()["error"] == "invalid_dpop_proof"
    assert [r["code"] for r in refusals_for(grant2_jti)] == ["invalid_dpop_proof"]

    assert [r["code"] for r in refusals_for(grant_jti)] == ["invalid_dpop_proof"]


def test_the_token_endpoint_asks_no_nonce() -> None:
    """RFC 9449 §8 nonces are the gateway's (§9) only: a token endpoint verifier that would ask
    one, and so answer use_dpop_nonce without a nonce to retry with, is refused at start."""
    clock = FrozenClock(1_000_000.0)
    nonces = NonceSource(b"k" * 32, clock, lifetime=300)
    verifier = DpopVerifier(MemoryReplayStore(clock), clock=clock, nonces=nonces)
    with pytest.raises(ValueError, match="nonce"):
        token_endpoint_hook(verifier, "https://as.example/oauth/token")

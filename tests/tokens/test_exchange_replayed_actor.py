"""A replayed ``actor_token`` (the child's client assertion in a token exchange) counts as a failed
client authentication, as a replayed assertion does at the client-credentials grant
(docs/security.md); it was refused without being counted, so the failure limit never cut in.
Real control plane on loopback (tests/support/server.run_server).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from aegis.tokens.exchange import DELEGATION_GRANT, JWT_TYPE, TOKEN_EXCHANGE
from tests.integration.test_delegation_e2e import Agent
from tests.support.server import RunningServer, run_server

LIMIT = 2


def _exchange(srv: RunningServer, grant: str, assertion: str) -> httpx.Response:
    data: dict[str, Any] = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": grant,
        "subject_token_type": DELEGATION_GRANT,
        "actor_token": assertion,
        "actor_token_type": JWT_TYPE,
    }
    return httpx.post(f"{srv.url}/oauth/token", data=data, timeout=5)


def test_a_replayed_actor_token_counts_as_a_failed_authentication(tmp_path: Path) -> None:
    with run_server(tmp_path, f"oauth:\n  auth_failure_limit: {LIMIT}\n") as srv:
        orch, fin = Agent(srv, "orchestrator"), Agent(srv, "finance")
        captured = fin.assertion()
        assert _exchange(srv, orch.grant(fin), captured).status_code == 200
        for _ in range(LIMIT):  # the captured assertion, replayed with fresh grants
            replay = _exchange(srv, orch.grant(fin), captured)
            assert replay.status_code == 400, replay.text
            assert "already used" in replay.json()["error_description"], replay.text
        # As for client_credentials (tests/oauth/test_client_auth.py::
        # test_replayed_assertions_count_against_the_client): past the limit, even a fresh,
        # valid assertion is rate_limited.
        fresh = _exchange(srv, orch.grant(fin), fin.assertion())
        assert fresh.status_code == 429, (fresh.status_code, fresh.text)

"""A token exchange refused for its ``expires_in`` spends nothing: the request is read whole
before the client assertion's jti and the single-use grant's jti are spent. Before, a mistyped
``expires_in`` burnt the grant (the corrected retry was ``grant_replayed``), left no refusal
record, and over 4300 digits ended in an uncounted plain-text 500.

Real control plane on loopback (tests/support/server.run_server).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aegis.audit.log import AuditLog
from aegis.tokens.exchange import EXCHANGE_AUDIT_KIND
from tests.integration.test_delegation_e2e import Agent
from tests.support.server import RunningServer, run_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with run_server(tmp_path_factory.mktemp("xchg")) as srv:
        yield srv


def test_bad_expires_in_does_not_spend_the_single_use_grant(server: RunningServer) -> None:
    orch, fin = Agent(server, "orchestrator"), Agent(server, "finance")
    grant = orch.grant(fin)
    bad = fin.exchange(grant, expires_in="soon")
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"] == "invalid_request"
    # A refused request spends nothing: the same grant, with a valid expires_in, still works.
    retry = fin.exchange(grant, expires_in="60")
    assert retry.status_code == 200, retry.text


def test_bad_expires_in_refusal_is_audited_like_every_other_exchange_refusal(
    server: RunningServer,
) -> None:
    orch, fin = Agent(server, "orchestrator"), Agent(server, "finance")
    assert fin.exchange(orch.grant(fin), expires_in="-5").status_code == 400
    audit = server.services.extras["exchange_audit"]
    assert isinstance(audit, AuditLog)
    refused = [
        r for r in audit.records(kind=EXCHANGE_AUDIT_KIND)
        if r["action"] == "refused" and r["agent_id"] == fin.id
    ]  # fmt: skip
    assert [r["code"] for r in refused] == ["invalid_request"]


def test_overlong_expires_in_is_a_typed_400_not_a_500(server: RunningServer) -> None:
    orch, fin = Agent(server, "orchestrator"), Agent(server, "finance")
    resp = fin.exchange(orch.grant(fin), expires_in="9" * 5000)
    assert resp.status_code == 400, (resp.status_code, resp.text[:200])
    assert resp.headers["content-type"].startswith("application/json")

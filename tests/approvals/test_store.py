"""The SQL store on SQLite and PostgreSQL: pending requests survive a restart (a new store on the
same database), one open request per digest, guarded transitions, and outages fail closed."""

from __future__ import annotations

import dataclasses

import pytest

from aegis.approvals.model import ApprovalRequest
from aegis.approvals.store import SqlApprovalStore
from aegis.errors import Unavailable


def _request(i: int = 1, digest: str = "sha256:" + "aa" * 32) -> ApprovalRequest:
    return ApprovalRequest(
        id=f"apr_{i}", state="pending", tenant="acme", env="prod", agent_id="payer",
        agent_owner="o@example.com", tool="payments", method="POST", path="/payments/charge",
        digest=digest, parameters={"amount": 12000}, rule_ids=("pay-large",), group="finance",
        channel="slack", created_at=100.0, expires_at=700.0, decision_id="d1",
        chain=("orchestrator",), origin_user="u@example.com", reasons=("large",),
        query=(("to", "acct-9"), ("to", "acct-10")), headers=(("x-mode", "instant"),),
        chain_owners=("carol@example.com",),
    )  # fmt: skip


def _contract(url: str) -> None:
    store = SqlApprovalStore(url)
    req, created = store.insert_or_open(_request())
    assert created
    store.close()
    # "Restart": a new store on the same database sees the pending request, and the same call
    # asked again maps onto it.
    store = SqlApprovalStore(url)
    found = store.get("apr_1")
    assert found == req
    again, created = store.insert_or_open(_request(2))
    assert (again.id, created) == ("apr_1", False)
    assert store.count_pending() == 1
    # Guarded transitions: exactly one of two racing decisions wins.
    approved = dataclasses.replace(req, state="approved", decided_by="carol", decided_at=150.0,
                                   override_expires_at=270.0)  # fmt: skip
    assert store.transition(approved, "pending")
    assert not store.transition(dataclasses.replace(req, state="denied"), "pending")
    assert store.get("apr_1") == approved
    assert store.open_for(req.digest) == approved  # approved is still open
    assert [r.id for r in store.due(300.0)] == ["apr_1"]  # past its override window
    used = dataclasses.replace(approved, state="used")
    assert store.transition(used, "approved")
    assert store.open_for(req.digest) is None  # closed: the digest is free again
    third, created = store.insert_or_open(_request(3))
    assert created and third.id == "apr_3"
    assert [r.id for r in store.list_requests(state="used")] == ["apr_1"]
    # An id of another shape is unknown, not an outage (PostgreSQL refuses a NUL in a query).
    for odd in ("apr_\x00", "apr_1\x00", "apr_1'", "1", ""):
        assert store.get(odd) is None
    store.close()


def test_sqlite_store(sqlite_url: str) -> None:
    _contract(sqlite_url)


@pytest.mark.postgres
def test_postgres_store(empty_pg_url: str) -> None:
    _contract(empty_pg_url)


def test_unreachable_database_is_unavailable() -> None:
    with pytest.raises(Unavailable) as info:
        SqlApprovalStore("postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert info.value.code == "approvals_unavailable"

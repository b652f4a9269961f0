"""Stores that create their own tables (policy, audit, approvals, certificates) on a shared
PostgreSQL database: replicas starting together all start. Two ``CREATE TABLE`` of one name race
on PostgreSQL's catalogue (the later one fails on ``pg_type``'s unique index even after checking
that the table did not exist), so each store creates its tables under the advisory lock that
migrations take; the later replicas find them and create nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import inspect

from aegis.stores.sql.engine import make_engine

pytestmark = pytest.mark.postgres

OPEN_ALL = """
import sys
from aegis.approvals.store import SqlApprovalStore
from aegis.audit.log import AuditLog
from aegis.clock import SystemClock
from aegis.pki.store import CertificateStore
from aegis.policy.store import SqlPolicyStore
url = sys.argv[1]
sys.stdin.read()  # released together
for store in (SqlPolicyStore(url), AuditLog(url, clock=SystemClock()), SqlApprovalStore(url),
              CertificateStore(url, clock=SystemClock())):
    store.close()
"""


def _stderr(p: subprocess.Popen[bytes]) -> str:
    assert p.stderr is not None
    with p.stderr:
        return p.stderr.read().decode()[-600:]


def test_replicas_opening_the_stores_together_all_start(empty_pg_url: str) -> None:
    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_ALL, empty_pg_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    for p in replicas:  # every replica has imported everything; now start them at once
        assert p.stdin is not None
        p.stdin.close()
    outcomes = [(p.wait(120), _stderr(p)) for p in replicas]
    assert outcomes == [(0, "")] * 4
    engine = make_engine(empty_pg_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"policy_versions", "audit_records", "audit_checkpoints"} <= tables

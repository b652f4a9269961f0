"""Processes opening one new database together all start: the migrations and the stores that
create their own tables (policy, audit, approvals, certificates) change the schema one after
another. Unlocked, two ``CREATE TABLE`` of one name race: on PostgreSQL the later one fails on
``pg_type``'s unique index even after checking that the table did not exist; on SQLite the driver
runs DDL outside any transaction, so both find the table missing and the later one fails with
"table already exists". Each schema change holds the schema lock; the later processes find the
tables made and create nothing."""

from __future__ import annotations

import subprocess
import sys

from sqlalchemy import inspect

from aegis.stores.sql.engine import make_engine

OPEN_ALL = """
import sys
from aegis.approvals.store import SqlApprovalStore
from aegis.audit.log import AuditLog
from aegis.clock import SystemClock
from aegis.pki.store import CertificateStore
from aegis.policy.store import SqlPolicyStore
from aegis.stores import open_key_store, open_registry_store
url = sys.argv[1]
sys.stdin.read()  # released together
for store in (open_registry_store(url), open_key_store(url), SqlPolicyStore(url),
              AuditLog(url, clock=SystemClock()), SqlApprovalStore(url),
              CertificateStore(url, clock=SystemClock())):
    store.close()
"""


def _stderr(p: subprocess.Popen[bytes]) -> str:
    assert p.stderr is not None
    with p.stderr:
        return p.stderr.read().decode()[-600:]


def test_replicas_opening_the_stores_together_all_start(sql_url: str) -> None:
    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_ALL, sql_url],
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
    engine = make_engine(sql_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"agents", "signing_keys", "policy_versions", "audit_records"} <= tables

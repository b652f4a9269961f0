"""The hash-chained audit log: linear appends, idempotent tables, tamper detection by position."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import text

from aegis.audit.log import GENESIS_HASH, AuditLog, canonical_json, record_hash
from aegis.clock import FrozenClock


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    return AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", clock=FrozenClock(1_800_000_000))


def test_chain_links_and_verifies(log: AuditLog) -> None:
    seq1, h1 = log.append("gateway.decision", {"n": 1, "who": "é"})
    seq2, h2 = log.append("gateway.decision", {"n": 2})
    assert (seq1, seq2) == (1, 2)
    assert h1 == record_hash(
        GENESIS_HASH, canonical_json({"n": 1, "who": "é", "kind": "gateway.decision"})
    )
    assert h2 == record_hash(h1, canonical_json({"kind": "gateway.decision", "n": 2}))
    report = log.verify_chain()
    assert report.ok and report.records == 2


def test_tables_are_created_idempotently(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    AuditLog(url, clock=FrozenClock(0)).append("k", {"a": 1})
    again = AuditLog(url, clock=FrozenClock(0))
    assert again.count() == 1 and again.verify_chain().ok


@pytest.mark.parametrize(
    ("statement", "first_bad", "reason"),
    [
        ("UPDATE audit_records SET record = :forged WHERE seq = 3", 3, "hash"),
        ("DELETE FROM audit_records WHERE seq = 2", 2, "missing"),
        ("UPDATE audit_records SET prev_hash = :z WHERE seq = 4", 4, "prev_hash"),
    ],
)
def test_tampering_is_found_at_its_position(
    log: AuditLog, statement: str, first_bad: int, reason: str
) -> None:
    for n in range(5):
        log.append("k", {"n": n})
    with log._engine.begin() as conn:
        params = {"z": "0" * 64, "forged": '{"kind":"k","n":99}'}
        conn.execute(text(statement), {k: v for k, v in params.items() if f":{k}" in statement})
    report = log.verify_chain()
    assert report.first_bad == first_bad
    assert report.reason is not None and reason in report.reason


def test_concurrent_appends_stay_linear(log: AuditLog) -> None:
    def worker(i: int) -> None:
        for j in range(10):
            log.append("k", {"t": i, "j": j})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = log.verify_chain()
    assert report.ok and report.records == 40


def test_nan_is_refused(log: AuditLog) -> None:
    with pytest.raises(ValueError, match="JSON compliant"):
        log.append("k", {"x": float("nan")})


async def test_group_commit_keeps_order_and_each_caller_gets_its_own_position(
    log: AuditLog,
) -> None:
    import asyncio

    results = await asyncio.gather(*(log.append_async("k", {"n": n}) for n in range(50)))
    assert sorted(seq for seq, _ in results) == list(range(1, 51))
    assert len({h for _, h in results}) == 50
    by_seq = {seq: n for n, (seq, _) in enumerate(results)}
    records = list(log.records())
    assert [r["n"] for r in records] == [by_seq[s] for s in range(1, 51)]
    assert log.verify_chain().ok


async def test_group_commit_failure_fails_every_waiter(log: AuditLog) -> None:
    import asyncio

    from aegis.errors import Unavailable

    with log._engine.begin() as conn:
        conn.execute(text("DROP TABLE audit_records"))
    outcomes = await asyncio.gather(
        *(log.append_async("k", {"n": n}) for n in range(5)), return_exceptions=True
    )
    assert all(isinstance(o, Unavailable) and o.code == "audit_unavailable" for o in outcomes)

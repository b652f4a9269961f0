"""The Merkle tree kept in SQL agrees with the RFC 9162 definition at every size it passes through."""

from __future__ import annotations

import pytest

from aegis.audit.log import AuditLog
from aegis.audit.merkle import (
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    list_hash_range,
    root_of,
)
from aegis.audit.tree import MerkleStore, blocks
from aegis.errors import EvidenceError
from tests.audit.conftest import fill


def test_blocks_split_a_range_into_aligned_perfect_subtrees() -> None:
    assert blocks(0, 7) == [(2, 0), (1, 2), (0, 6)]
    assert blocks(4, 6) == [(1, 2)]
    assert blocks(8, 13) == [(2, 2), (0, 12)]
    assert blocks(0, 0) == []


def test_incremental_syncs_match_the_definition(log: AuditLog) -> None:
    store = MerkleStore(log.engine)
    leaves: list[bytes] = []
    for batch in (1, 2, 4, 1, 5, 9):
        fill(log, batch, start=len(leaves))
        head = store.sync()
        leaves = [leaf_hash(r.encode()) for r in _texts(log)]
        assert head.size == len(leaves) == store.size()
        assert head.root == root_of(leaves) == store.root(head.size)
    n = len(leaves)
    ref = list_hash_range(leaves)
    for index in range(n):
        assert store.inclusion(index, n) == inclusion_proof(index, n, ref)
    for first in range(1, n + 1):
        assert store.consistency(first, n) == consistency_proof(first, n, ref)
    assert store.sync().size == n  # nothing new: idempotent


def _texts(log: AuditLog) -> list[str]:
    from sqlalchemy import select

    from aegis.audit.sql_tables import AUDIT_RECORDS

    with log.engine.connect() as conn:
        return [t for (t,) in conn.execute(select(AUDIT_RECORDS.c.record).order_by("seq"))]


def test_a_gap_in_the_records_stops_the_tree(log: AuditLog) -> None:
    from sqlalchemy import text

    fill(log, 3)
    with log.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_records WHERE seq = 2"))
    with pytest.raises(EvidenceError, match="record 2 is missing"):
        MerkleStore(log.engine).sync()

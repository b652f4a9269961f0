"""RFC 9162 Merkle hashing and proofs against the CT reference vectors, plus property tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis.audit.merkle import (
    EMPTY_ROOT,
    CompactRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    list_hash_range,
    node_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)
from aegis.errors import EvidenceError

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "vectors" / "rfc9162_merkle.json").read_text()
)
LEAVES = [leaf_hash(bytes.fromhex(x)) for x in VECTORS["leaves"]]


def _hex(items: list[bytes]) -> list[str]:
    return [x.hex() for x in items]


def test_leaf_hashes_and_roots_match_the_reference() -> None:
    assert _hex(LEAVES) == VECTORS["leaf_hashes"]
    assert EMPTY_ROOT.hex() == VECTORS["roots"][0]
    for size, want in enumerate(VECTORS["roots"]):
        assert root_of(LEAVES[:size]).hex() == want


@pytest.mark.parametrize("case", VECTORS["inclusion"], ids=lambda c: f"{c['index']}:{c['size']}")
def test_inclusion_proofs_match_the_reference(case: dict[str, Any]) -> None:
    index, size = case["index"], case["size"]
    path = inclusion_proof(index, size, list_hash_range(LEAVES[:size]))
    assert _hex(path) == case["path"]
    root = bytes.fromhex(VECTORS["roots"][size])
    verify_inclusion(LEAVES[index], index, size, path, root)


@pytest.mark.parametrize(
    "case", VECTORS["consistency"], ids=lambda c: f"{c['first']}:{c['second']}"
)
def test_consistency_proofs_match_the_reference(case: dict[str, Any]) -> None:
    first, second = case["first"], case["second"]
    proof = consistency_proof(first, second, list_hash_range(LEAVES[:second]))
    assert _hex(proof) == case["path"]
    roots = VECTORS["roots"]
    verify_consistency(
        first, second, bytes.fromhex(roots[first]), bytes.fromhex(roots[second]), proof
    )


def test_compact_range_reports_the_completed_subtrees() -> None:
    tree = CompactRange()
    done = [tree.append(leaf) for leaf in LEAVES[:4]]
    assert done[3] == [
        (0, 3, LEAVES[3]),
        (1, 1, node_hash(LEAVES[2], LEAVES[3])),
        (2, 0, bytes.fromhex(VECTORS["roots"][4])),
    ]
    assert tree.sizes() == [4]
    with pytest.raises(ValueError, match="set bit"):
        CompactRange(3, [LEAVES[0]])


def _tree(n: int) -> list[bytes]:
    return [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_every_inclusion_proof_verifies_and_any_change_breaks_it(data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 70))
    index = data.draw(st.integers(0, size - 1))
    leaves = _tree(size)
    root = root_of(leaves)
    path = inclusion_proof(index, size, list_hash_range(leaves))
    verify_inclusion(leaves[index], index, size, path, root)
    # Another index, another size, another leaf, a flipped bit, a dropped or extra element.
    other = data.draw(st.integers(0, size).filter(lambda i: i != index))
    with pytest.raises(EvidenceError):
        verify_inclusion(leaves[index], other, size, path, root)
    with pytest.raises(EvidenceError):
        verify_inclusion(leaf_hash(b"forged"), index, size, path, root)
    with pytest.raises(EvidenceError):
        verify_inclusion(leaves[index], index, size + 1, path, root_of(_tree(size + 1)))
    if path:
        at = data.draw(st.integers(0, len(path) - 1))
        flipped = [*path]
        flipped[at] = bytes([flipped[at][0] ^ 1]) + flipped[at][1:]
        with pytest.raises(EvidenceError):
            verify_inclusion(leaves[index], index, size, flipped, root)
        with pytest.raises(EvidenceError):
            verify_inclusion(leaves[index], index, size, path[:-1], root)
    with pytest.raises(EvidenceError):
        verify_inclusion(leaves[index], index, size, [*path, root], root)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_every_consistency_proof_verifies_and_a_forked_tree_fails(data: st.DataObject) -> None:
    second = data.draw(st.integers(1, 70))
    first = data.draw(st.integers(1, second))
    leaves = _tree(second)
    r1, r2 = root_of(leaves[:first]), root_of(leaves)
    proof = consistency_proof(first, second, list_hash_range(leaves))
    verify_consistency(first, second, r1, r2, proof)
    # A log that rewrote one of the first `first` leaves cannot prove consistency.
    at = data.draw(st.integers(0, first - 1))
    forked = [*leaves]
    forked[at] = leaf_hash(b"rewritten")
    forked_proof = consistency_proof(first, second, list_hash_range(forked))
    with pytest.raises(EvidenceError):
        verify_consistency(first, second, r1, root_of(forked), forked_proof)
    if first < second:
        with pytest.raises(EvidenceError):
            verify_consistency(first, second, r1, root_of(forked), proof)
        with pytest.raises(EvidenceError):
            verify_consistency(first, second, r1, r2, proof[:-1])
        with pytest.raises(EvidenceError):
            verify_consistency(second, first, r2, r1, proof)


def test_degenerate_consistency_cases() -> None:
    r = root_of(LEAVES[:3])
    verify_consistency(0, 3, EMPTY_ROOT, r, [])
    verify_consistency(3, 3, r, r, [])
    with pytest.raises(EvidenceError, match="equal tree sizes"):
        verify_consistency(3, 3, r, EMPTY_ROOT, [])
    with pytest.raises(EvidenceError, match="empty"):
        verify_consistency(2, 3, root_of(LEAVES[:2]), r, [])
    with pytest.raises(EvidenceError, match="32-byte"):
        verify_inclusion(LEAVES[0], 0, 2, [b"short"], r)
    with pytest.raises(EvidenceError, match="outside"):
        inclusion_proof(3, 3, list_hash_range(LEAVES[:3]))

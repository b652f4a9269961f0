"""Merkle tree hashing, inclusion and consistency proofs, RFC 9162 §2.1 (Certificate Transparency v2).

The tree over ``n`` leaves is the Merkle Tree Hash of RFC 9162 §2.1.1 with SHA-256::

    MTH({})    = SHA-256()
    MTH({d0})  = SHA-256(0x00 || d0)                         leaf hash
    MTH(D[n])  = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))  node hash, k the largest power of
                                                              two smaller than n

The 0x00 / 0x01 prefixes keep a leaf from ever being read as an inner node (second-preimage
resistance). Proof *generation* (§2.1.3.1 ``PATH``, §2.1.4.1 ``PROOF``) is written against a
``hash_range(start, end)`` callback, so the same code serves an in-memory list and the SQL node
store. Proof *verification* (§2.1.3.2, §2.1.4.2) follows the RFC's algorithms step by step and
raises :class:`~aegis.errors.EvidenceError` (``invalid_proof``); it never returns a bool.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Final

from aegis.errors import EvidenceError

__all__ = [
    "EMPTY_ROOT",
    "CompactRange",
    "HashRange",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "list_hash_range",
    "node_hash",
    "root_of",
    "verify_consistency",
    "verify_inclusion",
]

#: MTH of the empty tree: SHA-256 of the empty string.
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
_LEAF: Final = b"\x00"
_NODE: Final = b"\x01"
#: Proofs longer than this cannot belong to a tree of fewer than 2**64 leaves.
MAX_PROOF_LENGTH: Final = 128

#: ``hash_range(start, end)`` returns MTH(D[start:end]) for ``start < end``.
HashRange = Callable[[int, int], bytes]


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(_LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _bad(message: str) -> EvidenceError:
    return EvidenceError(message, code="invalid_proof")


class CompactRange:
    """The right edge of a tree: the roots of its perfect subtrees, largest first.

    Appending a leaf is O(1) amortised (O(log n) worst case) and the root is O(log n), so a tree
    of any size is extended without reading its old leaves. ``hashes[i]`` covers ``sizes[i]``
    leaves; the sizes are the set bits of the tree size, in decreasing order.
    """

    __slots__ = ("hashes", "size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if len(hashes) != size.bit_count():
            raise ValueError("a compact range holds one hash per set bit of its size")
        self.size = size
        self.hashes = list(hashes)

    def sizes(self) -> list[int]:
        return [1 << b for b in range(self.size.bit_length() - 1, -1, -1) if self.size >> b & 1]

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add one leaf hash; return the perfect subtrees it completed as ``(level, index, hash)``
        (the leaf itself first, at level 0)."""
        index, level, digest = self.size, 0, leaf
        done = [(0, index, leaf)]
        while index >> level & 1:  # the subtree to the left is as big as this one: merge
            digest = node_hash(self.hashes.pop(), digest)
            level += 1
            done.append((level, index >> level, digest))
        self.hashes.append(digest)
        self.size += 1
        return done

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        digest = self.hashes[-1]
        for left in reversed(self.hashes[:-1]):
            digest = node_hash(left, digest)
        return digest


def root_of(leaves: Sequence[bytes]) -> bytes:
    """MTH over leaf *hashes* (already ``leaf_hash``-ed)."""
    tree = CompactRange()
    for leaf in leaves:
        tree.append(leaf)
    return tree.root()


def inclusion_proof(index: int, size: int, hash_range: HashRange) -> list[bytes]:
    """RFC 9162 §2.1.3.1 ``PATH(m, D[n])``, iteratively: the audit path, leaf side first."""
    if not 0 <= index < size:
        raise _bad("leaf index is outside the tree")
    path: list[bytes] = []
    start, end, m = 0, size, index
    while end - start > 1:
        k = _split(end - start)
        if m < k:
            path.append(hash_range(start + k, end))
            end = start + k
        else:
            path.append(hash_range(start, start + k))
            start, m = start + k, m - k
    path.reverse()
    return path


def consistency_proof(first: int, second: int, hash_range: HashRange) -> list[bytes]:
    """RFC 9162 §2.1.4.1 ``PROOF(m, D[n]) = SUBPROOF(m, D[n], true)``, iteratively."""
    if not 0 <= first <= second:
        raise _bad("the first tree size must not exceed the second")
    if first in (0, second):
        return []
    proof: list[bytes] = []
    start, end, m, whole = 0, second, first, True
    while m != end - start:
        n = end - start
        k = _split(n)
        if m <= k:
            proof.append(hash_range(start + k, end))
            end = start + k
        else:
            proof.append(hash_range(start, start + k))
            start, m, whole = start + k, m - k, False
    if not whole:
        proof.append(hash_range(start, end))
    proof.reverse()
    return proof


def _check_path(path: Sequence[bytes]) -> None:
    if len(path) > MAX_PROOF_LENGTH or any(len(p) != 32 for p in path):
        raise _bad("a proof element is not a 32-byte hash, or the proof is too long")


def verify_inclusion(
    leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 §2.1.3.2: check that ``leaf`` (a leaf hash) is at ``index`` of the tree of
    ``size`` leaves whose root is ``root``. Raises ``invalid_proof``."""
    _check_path(path)
    if not 0 <= index < size:  # step 1
        raise _bad("leaf index is outside the tree")
    fn, sn, r = index, size - 1, leaf  # steps 2-3
    for p in path:  # step 4
        if sn == 0:
            raise _bad("the inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:  # step 5
        raise _bad("the inclusion proof is shorter than the tree is deep")
    if r != root:
        raise _bad("the inclusion proof does not lead to the root hash")


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, path: Sequence[bytes]
) -> None:
    """RFC 9162 §2.1.4.2: check that the tree of ``first`` leaves is a prefix of the tree of
    ``second`` leaves. Raises ``invalid_proof``."""
    _check_path(path)
    if not 0 <= first <= second:
        raise _bad("the first tree size must not exceed the second")
    if first == second:
        if path or first_root != second_root:
            raise _bad("equal tree sizes need equal roots and an empty proof")
        return
    if first == 0:  # every tree extends the empty one
        if path:
            raise _bad("a proof from the empty tree must be empty")
        return
    if not path:  # step 1
        raise _bad("the consistency proof is empty")
    items = list(path)
    if first & (first - 1) == 0:  # step 2: first is an exact power of two
        items.insert(0, first_root)
    fn, sn = first - 1, second - 1  # step 3
    while fn & 1:  # step 4
        fn, sn = fn >> 1, sn >> 1
    fr = sr = items[0]  # step 5
    for c in items[1:]:  # step 6
        if sn == 0:
            raise _bad("the consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:  # step 7
        raise _bad("the consistency proof is shorter than the tree is deep")
    if fr != first_root:
        raise _bad("the consistency proof does not lead to the first root hash")
    if sr != second_root:
        raise _bad("the consistency proof does not lead to the second root hash")


def list_hash_range(leaves: Sequence[bytes]) -> HashRange:
    """``hash_range`` over an in-memory list of leaf hashes (tests, small exports)."""

    def hash_range(start: int, end: int) -> bytes:
        return root_of(leaves[start:end])

    return hash_range

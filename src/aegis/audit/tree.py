"""The RFC 9162 Merkle tree over the audit records, kept in SQL (``audit_tree_nodes``).

Leaf ``i`` is ``leaf_hash(record)`` of the record with ``seq = i + 1``, where ``record`` is the
UTF-8 canonical JSON the hash chain also covers. The tree is extended *off* the decision path:
:meth:`MerkleStore.sync` reads the records appended since the last sync and stores the hash of every
perfect subtree they complete (about two rows per record), from the compact range of the old size
(O(log n) rows). A proof then reads O(log n) stored hashes; nothing is recomputed from records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sqlalchemy import Connection, Engine, bindparam, func, insert, select
from sqlalchemy.exc import IntegrityError

from aegis.audit.log import GENESIS_HASH
from aegis.audit.merkle import (
    EMPTY_ROOT,
    CompactRange,
    HashRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
)
from aegis.audit.sql_tables import AUDIT_CHECKPOINTS, AUDIT_RECORDS, AUDIT_TREE_NODES
from aegis.errors import EvidenceError, Unavailable

__all__ = ["MerkleStore", "TreeHead", "blocks"]

_SYNC_BATCH: Final = 5000
#: Nodes covering at least 2**_CACHED_LEVEL leaves are cached (at most _CACHE_MAX of them).
_CACHED_LEVEL: Final = 8
_CACHE_MAX: Final = 65536
_NODE_QUERY: Final = select(AUDIT_TREE_NODES.c.hash).where(
    AUDIT_TREE_NODES.c.level == bindparam("lv"), AUDIT_TREE_NODES.c.idx == bindparam("ix")
)
_RETRIES: Final = 5


@dataclass(frozen=True, slots=True)
class TreeHead:
    """What a checkpoint signs: the tree size, its root and the hash-chain head at that size."""

    size: int
    root: bytes
    chain_hash: str


def blocks(start: int, end: int) -> list[tuple[int, int]]:
    """``[start, end)`` as maximal aligned perfect subtrees ``(level, index)``, left to right."""
    out: list[tuple[int, int]] = []
    while start < end:
        level = (start & -start).bit_length() - 1 if start else (end - start).bit_length() - 1
        while start + (1 << level) > end:
            level -= 1
        out.append((level, start >> level))
        start += 1 << level
    return out


class MerkleStore:
    """Reads and extends the stored tree. Every method opens its own short transaction."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        # A stored node is the hash of a perfect subtree: it never changes (the tables are
        # append-only), so the upper levels, shared by most proofs, are kept in memory.
        self._cache: dict[tuple[int, int], bytes] = {}

    def size(self) -> int:
        with self._engine.connect() as conn:
            return self._size(conn)

    @staticmethod
    def _size(conn: Connection) -> int:
        top = conn.execute(
            select(func.max(AUDIT_TREE_NODES.c.idx)).where(AUDIT_TREE_NODES.c.level == 0)
        ).scalar()
        return 0 if top is None else int(top) + 1

    def _nodes(
        self, conn: Connection, wanted: list[tuple[int, int]]
    ) -> dict[tuple[int, int], bytes]:
        # One primary-key lookup per node with a statement compiled once: a proof needs a few dozen
        # nodes, and building a fresh OR-ed or row-value query each time costs more than the reads
        # (and a row-value IN list makes SQLite scan the whole table).
        found: dict[tuple[int, int], bytes] = {}
        for lv, ix in wanted:
            h = self._cache.get((lv, ix))
            if h is not None:
                found[(lv, ix)] = h
                continue
            h = conn.execute(_NODE_QUERY, {"lv": lv, "ix": ix}).scalar()
            if h is None:
                raise EvidenceError(
                    f"the Merkle tree is missing node {(lv, ix)}; run `aegis audit checkpoint`",
                    code="evidence_invalid",
                )
            found[(lv, ix)] = bytes(h)
            if lv >= _CACHED_LEVEL:
                if len(self._cache) >= _CACHE_MAX:
                    self._cache.clear()
                self._cache[(lv, ix)] = bytes(h)
        return found

    def compact_range(self, size: int) -> CompactRange:
        with self._engine.connect() as conn:
            return self._compact(conn, size)

    def _compact(self, conn: Connection, size: int) -> CompactRange:
        wanted = blocks(0, size)
        found = self._nodes(conn, wanted)
        return CompactRange(size, [found[w] for w in wanted])

    def hash_range(self, conn: Connection) -> HashRange:
        """MTH(D[start:end]) from stored perfect subtrees (ranges as RFC 9162 proofs ask them)."""

        def hash_range(start: int, end: int) -> bytes:
            wanted = blocks(start, end)
            found = self._nodes(conn, wanted)
            digest = found[wanted[-1]]
            for w in reversed(wanted[:-1]):
                digest = node_hash(found[w], digest)
            return digest

        return hash_range

    def root(self, size: int) -> bytes:
        if size == 0:
            return EMPTY_ROOT
        with self._engine.connect() as conn:
            return self.hash_range(conn)(0, size)

    def inclusion(self, index: int, size: int) -> list[bytes]:
        with self._engine.connect() as conn:
            return inclusion_proof(index, size, self.hash_range(conn))

    def consistency(self, first: int, second: int) -> list[bytes]:
        with self._engine.connect() as conn:
            return consistency_proof(first, second, self.hash_range(conn))

    def sync(self, *, trusted: int | None = None) -> TreeHead:
        """Add every record appended since the last sync; return the new head.

        ``trusted``: the size up to which the stored tree is known good (that of the newest
        checkpoint this log signed). The nodes stored past it are recomputed from the records
        and compared first, and any difference refuses the sync (``evidence_invalid``): the
        tree's size is read from what is stored, so a leaf someone else inserted for the next
        position (an INSERT grant suffices) would otherwise stand in for the real record in the
        next signed root, with an inclusion proof to show for it."""
        if trusted is not None:
            with self._engine.connect() as conn:
                self._verify_stored(conn, trusted, self._size(conn))
        for _ in range(_RETRIES):
            try:
                while True:
                    head, more = self._sync_batch()
                    if not more:
                        return head
            except IntegrityError:
                continue  # another process extended the tree at the same time: re-read
        raise Unavailable("the audit tree is contended; try again", code="audit_unavailable")

    def _verify_stored(self, conn: Connection, start: int, size: int) -> None:
        """Recompute the stored nodes whose subtrees reach past ``start`` (up to ``size`` leaves)
        from the records, over the trusted nodes before ``start``; raise on any difference."""
        if size <= start:
            return
        expected: dict[tuple[int, int], bytes] = {}
        seq_expected = start + 1
        for seq, body in conn.execute(
            select(AUDIT_RECORDS.c.seq, AUDIT_RECORDS.c.record)
            .where(AUDIT_RECORDS.c.seq > start, AUDIT_RECORDS.c.seq <= size)
            .order_by(AUDIT_RECORDS.c.seq)
        ):
            if seq != seq_expected:
                break
            expected[(0, seq - 1)] = leaf_hash(body.encode("utf-8"))
            seq_expected += 1
        if seq_expected != size + 1:
            raise EvidenceError(
                f"the Merkle tree holds {size} leaves but audit record {seq_expected} is missing: "
                "nodes were written by something other than Aegis's checkpointer; refusing to "
                "sign over them",
                code="evidence_invalid",
            )
        level = 0
        while True:
            parents: dict[tuple[int, int], bytes] = {}
            for idx in range(start >> (level + 1), size >> (level + 1)):
                children = [(level, 2 * idx), (level, 2 * idx + 1)]
                trusted = [c for c in children if c not in expected]
                known = {**self._nodes(conn, trusted), **expected} if trusted else expected
                parents[(level + 1, idx)] = node_hash(known[children[0]], known[children[1]])
            if not parents:
                break
            expected.update(parents)
            level += 1
        for lv in range(level + 1):
            lo = min(ix for (l2, ix) in expected if l2 == lv)
            stored = dict(conn.execute(
                select(AUDIT_TREE_NODES.c.idx, AUDIT_TREE_NODES.c.hash)
                .where(AUDIT_TREE_NODES.c.level == lv, AUDIT_TREE_NODES.c.idx >= lo)
            ).all())  # fmt: skip
            for (l2, ix), digest in expected.items():
                if l2 == lv and bytes(stored.get(ix, b"")) != digest:
                    raise EvidenceError(
                        f"the stored Merkle tree disagrees with the audit records at node "
                        f"{(lv, ix)}: it was written by something other than Aegis's "
                        "checkpointer; refusing to sign over it",
                        code="evidence_invalid",
                    )

    def _sync_batch(self) -> tuple[TreeHead, bool]:
        with self._engine.begin() as conn:
            size = self._size(conn)
            rows = conn.execute(
                select(AUDIT_RECORDS.c.seq, AUDIT_RECORDS.c.record, AUDIT_RECORDS.c.hash)
                .where(AUDIT_RECORDS.c.seq > size)
                .order_by(AUDIT_RECORDS.c.seq)
                .limit(_SYNC_BATCH)
            ).all()
            tree = self._compact(conn, size)
            chain = self._chain_head(conn, size)
            new: list[dict[str, object]] = []
            for seq, body, digest in rows:
                if seq != tree.size + 1:
                    raise EvidenceError(
                        f"audit record {tree.size + 1} is missing; the tree cannot grow past it",
                        code="evidence_invalid",
                    )
                for level, idx, h in tree.append(leaf_hash(body.encode("utf-8"))):
                    new.append({"level": level, "idx": idx, "hash": h})
                chain = digest
            if new:
                conn.execute(insert(AUDIT_TREE_NODES), new)
            return TreeHead(tree.size, tree.root(), chain), len(rows) == _SYNC_BATCH

    @staticmethod
    def _chain_head(conn: Connection, size: int) -> str:
        if size == 0:
            return GENESIS_HASH
        head = conn.execute(
            select(AUDIT_RECORDS.c.hash).where(AUDIT_RECORDS.c.seq == size)
        ).scalar()
        if head is None:  # pruned: the checkpoint at the prune point recorded it
            head = conn.execute(
                select(AUDIT_CHECKPOINTS.c.chain_hash).where(AUDIT_CHECKPOINTS.c.tree_size == size)
            ).scalar()
        if head is None:
            raise EvidenceError(
                f"the chain head at {size} is unknown (records pruned without a checkpoint)",
                code="evidence_invalid",
            )
        return str(head)

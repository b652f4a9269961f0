"""Proof documents a third party checks with only the JWKS: inclusion and consistency (RFC 9162).

An inclusion proof (``aegis audit prove``) carries the record's exact canonical text, its position,
the audit path and the signed checkpoint it leads to::

    {"type": "aegis-inclusion-proof", "seq": n, "leaf_index": n - 1, "record": "<canonical JSON>",
     "tree_size": s, "inclusion_path": [hex, ...], "checkpoint": JWS}

A consistency proof carries two signed checkpoints and the RFC 9162 §2.1.4 path between them::

    {"type": "aegis-consistency-proof", "first": JWS, "second": JWS, "consistency_path": [hex]}

:func:`check_proof` verifies either and raises ``EvidenceError`` / ``invalid_proof``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from aegis.audit.checkpoint import Checkpoint, Checkpointer, verify_checkpoint
from aegis.audit.merkle import leaf_hash, verify_consistency, verify_inclusion
from aegis.audit.sql_tables import AUDIT_RECORDS
from aegis.crypto.keys import PublicKey
from aegis.errors import EvidenceError, NotFound

__all__ = ["check_proof", "consistency_document", "find_record", "inclusion_document"]

INCLUSION: str = "aegis-inclusion-proof"
#: The kind of the record a decision id names first (the gateway's own decision record).
DECISION_KIND: str = "gateway.decision"
CONSISTENCY: str = "aegis-consistency-proof"


def find_record(checkpointer: Checkpointer, record_id: str) -> tuple[int, str]:
    """A record by ``seq`` (digits) or by ``decision_id``; returns ``(seq, canonical text)``."""
    query = select(AUDIT_RECORDS.c.seq, AUDIT_RECORDS.c.record)
    if record_id.isascii() and record_id.isdigit():
        query = query.where(AUDIT_RECORDS.c.seq == int(record_id))
    else:
        # decision ids are inside the canonical JSON; the quoted form cannot match a substring.
        # Other records carry a decision's id too (approval.requested is written before the
        # decision it holds, gateway.forward_failed after it): the decision record comes first,
        # judged by the kind inside the hashed record, not the unhashed kind column.
        # The text match only narrows the search: a caller's body held for approval may hold
        # '"kind":"gateway.decision"' and this id too. The record's own top-level members, read
        # from the hashed text, decide.
        needle = f'"decision_id":"{record_id}"'
        query = query.where(AUDIT_RECORDS.c.record.contains(needle, autoescape=True))
        with checkpointer.log.engine.connect() as conn:
            rows = conn.execute(query.order_by(AUDIT_RECORDS.c.seq).limit(_CANDIDATES)).all()
        named = [(int(seq), str(text)) for seq, text in rows if _names(str(text), record_id)]
        for seq, text in named:
            if json.loads(text).get("kind") == DECISION_KIND:
                return seq, text
        if named:
            return named[0]
        raise NotFound(f"no audit record {record_id!r} (pruned, or never written)")
    with checkpointer.log.engine.connect() as conn:
        row = conn.execute(query.limit(1)).first()
    if row is None:
        raise NotFound(f"no audit record {record_id!r} (pruned, or never written)")
    return int(row[0]), str(row[1])


#: Records of one decision looked at, at most (its decision, body, approval and failure records).
_CANDIDATES = 64


def _names(text: str, decision_id: str) -> bool:
    """Whether the record's own top-level ``decision_id`` (not one inside its members) is it."""
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("decision_id") == decision_id


def inclusion_document(checkpointer: Checkpointer, record_id: str) -> dict[str, Any]:
    seq, text = find_record(checkpointer, record_id)
    cp = checkpointer.latest(at_least=seq) or checkpointer.checkpoint()
    path = checkpointer.tree.inclusion(seq - 1, cp.tree_size)
    return {
        "type": INCLUSION,
        "seq": seq,
        "leaf_index": seq - 1,
        "record": text,
        "tree_size": cp.tree_size,
        "inclusion_path": [p.hex() for p in path],
        "checkpoint": cp.token,
    }


def consistency_document(checkpointer: Checkpointer, first: int, second: int) -> dict[str, Any]:
    by_size = {c.tree_size: c for c in checkpointer.all()}
    for size in (first, second):
        if size not in by_size:
            raise NotFound(f"no stored checkpoint of tree size {size}")
    path = checkpointer.tree.consistency(first, second)
    return {
        "type": CONSISTENCY,
        "first": by_size[first].token,
        "second": by_size[second].token,
        "consistency_path": [p.hex() for p in path],
    }


def _hashes(value: Any) -> list[bytes]:
    if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
        raise EvidenceError("the proof path must be a list of hex strings", code="invalid_proof")
    try:
        return [bytes.fromhex(h) for h in value]
    except ValueError:
        raise EvidenceError("the proof path is not hex", code="invalid_proof") from None


def check_proof(
    doc: Any, resolve: Callable[[str], PublicKey | None], *, issuer: str | None = None
) -> tuple[Checkpoint, ...]:
    """Verify a proof document; return the checkpoint(s) it was checked against."""
    if not isinstance(doc, dict):
        raise EvidenceError("a proof is a JSON object", code="invalid_proof")
    if doc.get("type") == INCLUSION:
        cp = verify_checkpoint(str(doc.get("checkpoint")), resolve, issuer=issuer)
        record, seq = doc.get("record"), doc.get("seq")
        if not isinstance(record, str) or type(seq) is not int or doc.get("leaf_index") != seq - 1:
            raise EvidenceError("the proof's record or position is malformed", code="invalid_proof")
        if doc.get("tree_size") != cp.tree_size:
            raise EvidenceError(
                "the proof's tree size is not the checkpoint's", code="invalid_proof"
            )
        path = _hashes(doc.get("inclusion_path"))
        verify_inclusion(
            leaf_hash(record.encode("utf-8")), seq - 1, cp.tree_size, path, cp.root_hash
        )
        return (cp,)
    if doc.get("type") == CONSISTENCY:
        a = verify_checkpoint(str(doc.get("first")), resolve, issuer=issuer)
        b = verify_checkpoint(str(doc.get("second")), resolve, issuer=issuer)
        path = _hashes(doc.get("consistency_path"))
        verify_consistency(a.tree_size, b.tree_size, a.root_hash, b.root_hash, path)
        return (a, b)
    raise EvidenceError("unknown proof type", code="invalid_proof")

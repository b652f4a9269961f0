"""Verifiable audit exports: one JSON Lines file an auditor checks offline with only the JWKS.

Line by line (every line one JSON object with a ``type``)::

    {"type": "header", "format": "aegis-audit-export", "version": 1, "issuer": ..., "exported_at": ...}
    {"type": "base", "tree_size": p, "compact_range": [hex, ...]}   only after a prune (p > 0)
    {"type": "checkpoint", "token": JWS}                          the stored checkpoint at p, and
                                                                  every later one, placed right
                                                                  after the record it ends at
    {"type": "record", "seq": n, "time": t, "kind": k, "record": "<canonical JSON>",
     "prev_hash": hex, "hash": hex}
    {"type": "end", "records": count, "token": JWS}               an ``export`` checkpoint of the
                                                                  whole log, signed at export time

``record`` is the exact text the hash chain and the Merkle leaf cover; ``time`` is the row's append
time, informational (the record carries its own ``time``). :mod:`aegis.audit.verify` checks it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import IO, Any, Final

from sqlalchemy import select

from aegis.audit.checkpoint import Checkpoint, Checkpointer
from aegis.audit.sql_tables import AUDIT_RECORDS
from aegis.errors import EvidenceError

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "export_lines", "write_export"]

EXPORT_FORMAT: Final = "aegis-audit-export"
EXPORT_VERSION: Final = 1
#: How often an export starts over when a prune keeps moving the prune point under it.
_ATTEMPTS: Final = 5


def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def export_lines(checkpointer: Checkpointer, *, issuer: str, now: float) -> Iterator[str]:
    """The export of everything the log still holds, as lines without newlines.

    The records are read in one statement, which sees one snapshot of the table; a prune that
    committed after the head and the prune point were read (another process's retention) is
    found at the first record read, before anything is written, and the export starts over from
    the new prune point. A prune after that cannot change what the statement reads."""
    for _ in range(_ATTEMPTS):
        # base: the prune point (every record pruned: the head, and the export is a base and its
        # checkpoint), signed in the end checkpoint.
        head, end_token, base = checkpointer.head_for_export()
        checkpoints = [c for c in checkpointer.all() if base <= c.tree_size <= head.size]
        query = (
            select(
                AUDIT_RECORDS.c.seq,
                AUDIT_RECORDS.c.time,
                AUDIT_RECORDS.c.kind,
                AUDIT_RECORDS.c.record,
                AUDIT_RECORDS.c.prev_hash,
                AUDIT_RECORDS.c.hash,
            )
            .where(AUDIT_RECORDS.c.seq > base, AUDIT_RECORDS.c.seq <= head.size)
            .order_by(AUDIT_RECORDS.c.seq)
        )
        with checkpointer.log.engine.connect() as conn:
            result = conn.execution_options(yield_per=2000).execute(query)
            rows = iter(result)
            first = next(rows, None)
            if (first is None) != (head.size == base) or (
                first is not None and first[0] != base + 1
            ):
                result.close()
                continue  # pruned meanwhile: from the new prune point
            yield from _lines(checkpointer, issuer, now, base, checkpoints, end_token, first, rows)
            return
    raise EvidenceError("the log was pruned again and again while it was exported; retry")


def _lines(
    checkpointer: Checkpointer,
    issuer: str,
    now: float,
    base: int,
    checkpoints: list[Checkpoint],
    end_token: str,
    first: Any,
    rows: Iterator[Any],
) -> Iterator[str]:
    yield _line(
        {
            "type": "header",
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "issuer": issuer,
            "exported_at": now,
        }
    )
    pending = iter(checkpoints)
    nxt = next(pending, None)
    if base:
        if nxt is None or nxt.tree_size != base:
            raise EvidenceError(f"no signed checkpoint at the prune point {base}; cannot export")
        frontier = checkpointer.tree.compact_range(base)
        yield _line(
            {"type": "base", "tree_size": base, "compact_range": [h.hex() for h in frontier.hashes]}
        )
    while nxt is not None and nxt.tree_size <= base:
        yield _line({"type": "checkpoint", "token": nxt.token})
        nxt = next(pending, None)
    count = 0
    for seq, time, kind, body, prev, digest in itertools.chain((first,) if first else (), rows):
        count += 1
        yield _line(
            {
                "type": "record",
                "seq": seq,
                "time": time,
                "kind": kind,
                "record": body,
                "prev_hash": prev,
                "hash": digest,
            }
        )
        while nxt is not None and nxt.tree_size == seq:
            yield _line({"type": "checkpoint", "token": nxt.token})
            nxt = next(pending, None)
    yield _line({"type": "end", "records": count, "token": end_token})


def write_export(checkpointer: Checkpointer, out: IO[str], *, issuer: str, now: float) -> int:
    """Write the export to ``out``; return the number of records written."""
    count = 0
    for line in export_lines(checkpointer, issuer=issuer, now=now):
        out.write(line + "\n")
        count += line.startswith('{"hash"')  # records sort their keys: "hash" comes first
    return count

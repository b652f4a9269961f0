"""Retention: prune old audit records so that what remains still verifies.

Records are removed only as a prefix that ends exactly at a signed checkpoint: the newest stored
checkpoint whose last record is older than the cut-off. What stays behind is enough for every
remaining record and every later checkpoint to verify: the checkpoint at the prune point (its root
and chain head), the Merkle node hashes (32 bytes each, no record content), and every checkpoint.
An export after a prune starts with a ``base`` line holding the compact range at the prune point,
which the verifier checks against that checkpoint's signed root.

On PostgreSQL the delete goes through ``aegis_audit_prune(upto)`` (:mod:`aegis.audit.pg`), the one
path past the append-only trigger; on SQLite it is a plain ``DELETE``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, func, select, text

from aegis.audit.log import AuditLog
from aegis.audit.pg import PRUNE_FUNCTION
from aegis.audit.sql_tables import AUDIT_CHECKPOINTS, AUDIT_RECORDS
from aegis.telemetry.logging import log_event

__all__ = ["PruneResult", "prune", "prune_point"]


@dataclass(frozen=True, slots=True)
class PruneResult:
    #: Records now gone are ``seq <= upto`` (0: nothing pruned).
    upto: int
    deleted: int


def prune_point(log: AuditLog, *, before: float, at_most: int | None = None) -> int:
    """The largest checkpoint size whose last record was appended before ``before`` and which is
    not above ``at_most`` (records a sink has not received yet), or 0."""
    query = (
        select(func.max(AUDIT_CHECKPOINTS.c.tree_size))
        .select_from(
            AUDIT_CHECKPOINTS.join(
                AUDIT_RECORDS, AUDIT_RECORDS.c.seq == AUDIT_CHECKPOINTS.c.tree_size
            )
        )
        .where(AUDIT_RECORDS.c.time < before)
    )
    if at_most is not None:
        query = query.where(AUDIT_CHECKPOINTS.c.tree_size <= at_most)
    with log.engine.connect() as conn:
        upto = conn.execute(query).scalar()
    return int(upto or 0)


#: Checks that the checkpoint row at a prune point is one this log signed: ``(size, token, chain
#: head at size)``, raising ``EvidenceError`` if not (:meth:`Checkpointer.verify_stored`).
CheckpointCheck = Callable[[int, str, str], object]


def prune(
    log: AuditLog,
    *,
    before: float,
    at_most: int | None = None,
    verify: CheckpointCheck | None = None,
) -> PruneResult:
    """Delete records up to :func:`prune_point`; idempotent. With ``verify`` (every Aegis caller
    passes it), the checkpoint row there must be one this log signed for the chain as it stands:
    the database only knows that a row of that size exists, and a role that may insert into the
    checkpoint table could write one to have records no signature ever covered deleted."""
    upto = prune_point(log, before=before, at_most=at_most)
    if upto == 0:
        return PruneResult(0, 0)
    if verify is not None:
        with log.engine.connect() as conn:
            token = conn.execute(
                select(AUDIT_CHECKPOINTS.c.token).where(AUDIT_CHECKPOINTS.c.tree_size == upto)
            ).scalar()
            head = conn.execute(
                select(AUDIT_RECORDS.c.hash).where(AUDIT_RECORDS.c.seq == upto)
            ).scalar()
        verify(upto, str(token), str(head))
    with log.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            deleted = conn.execute(
                text(f"SELECT {PRUNE_FUNCTION}(:upto)"), {"upto": upto}
            ).scalar_one()
        else:
            deleted = conn.execute(
                delete(AUDIT_RECORDS).where(AUDIT_RECORDS.c.seq <= upto)
            ).rowcount
    log_event("audit.pruned", level=logging.INFO, upto=upto, deleted=int(deleted))
    return PruneResult(upto, int(deleted))

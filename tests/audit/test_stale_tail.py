"""A writer whose remembered tail predates a prune continues the chain at its real tail.

Each ``AuditLog`` remembers the last record it committed and relies on the ``seq`` primary key to
turn a stale memory into a collision. Once retention pruned past that tail, its next position was
free again: the record was acknowledged inside the pruned range, linked to a pruned predecessor,
outside every tree and checkpoint, and ``aegis audit export`` refused the log from then on. Two
instances stand for two gateway replicas (each remembers its own tail), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import io

from aegis.audit.checkpoint import Checkpointer, jwks_resolver
from aegis.audit.export import write_export
from aegis.audit.log import AuditLog
from aegis.audit.retention import prune
from aegis.audit.verify import verify_export
from aegis.clock import SystemClock, random_bytes
from aegis.crypto.keyring import KeyRing
from tests.audit.conftest import ISSUER
from tests.crypto.fakes import MemoryKeyStore


def test_an_idle_replica_appends_after_the_prune_at_the_real_tail(either_url: str) -> None:
    clock = SystemClock()
    idle, busy = AuditLog(either_url, clock=clock), AuditLog(either_url, clock=clock)
    try:
        assert idle.append("gateway.decision", {"decision_id": "a-1"})[0] == 1
        for i in range(10):  # the other replica carries the log on
            busy.append("gateway.decision", {"decision_id": f"b-{i}"})
        ring = KeyRing(MemoryKeyStore(), random_bytes(32), clock)
        ring.ensure_initialized()
        checkpointer = Checkpointer(busy, ring, issuer=ISSUER, clock=clock)
        assert checkpointer.checkpoint().tree_size == 11
        assert prune(busy, before=clock.now() + 60, verify=checkpointer.verify_stored).upto == 11
        seq, _ = idle.append("gateway.decision", {"decision_id": "a-2"})  # its next call
        assert seq == 12, f"acknowledged at {seq}, inside the pruned range: the chain forked"
        assert busy.verify_chain().ok
        busy.append("gateway.decision", {"decision_id": "b-10"})
        checkpointer.checkpoint()
        out = io.StringIO()
        write_export(checkpointer, out, issuer=ISSUER, now=clock.now())
        summary = verify_export(out.getvalue().splitlines(), jwks_resolver(ring.jwks()))
        assert (summary.first_seq, summary.last_seq) == (12, 13)
    finally:
        idle.close()
        busy.close()

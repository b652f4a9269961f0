"""An export made while another process prunes the log verifies. The head, the prune point and
the checkpoints were read apart from the records: a prune committed in between removed records
the export's start did not account for, and the file, written without an error, then failed its
own verification (``record_missing``), a false tamper alarm. On SQLite and PostgreSQL, with the
prune by another engine (the control plane's) at each point of the export."""

from __future__ import annotations

import time

import pytest

from aegis.audit.checkpoint import Checkpoint, Checkpointer, jwks_resolver
from aegis.audit.export import export_lines
from aegis.audit.log import AuditLog
from aegis.audit.retention import prune
from aegis.audit.verify import verify_export
from aegis.clock import SystemClock, random_bytes
from aegis.crypto.keyring import KeyRing
from tests.audit.conftest import ISSUER
from tests.crypto.fakes import MemoryKeyStore


class PrunedWhileReading(Checkpointer):
    """An exporter whose log another process prunes right after the checkpoints were read."""

    prune: object = None

    def all(self) -> list[Checkpoint]:
        found = super().all()
        if callable(self.prune):
            self.prune()
            self.prune = None
        return found


@pytest.mark.parametrize("when", ["before the records are read", "while they are written"])
def test_an_export_racing_a_prune_verifies(either_url: str, when: str) -> None:
    clock = SystemClock()
    log, control = AuditLog(either_url, clock=clock), AuditLog(either_url, clock=clock)
    ring = KeyRing(MemoryKeyStore(), random_bytes(32), clock)
    ring.ensure_initialized()
    try:
        for i in range(10):
            log.append("gateway.decision", {"decision_id": f"d-{i}"})
        maintainer = Checkpointer(control, ring, issuer=ISSUER, clock=clock)
        maintainer.checkpoint()  # at 10
        for i in range(10, 13):
            log.append("gateway.decision", {"decision_id": f"d-{i}"})
        exporter = PrunedWhileReading(log, ring, issuer=ISSUER, clock=clock)

        def retention() -> None:
            assert (
                prune(control, before=time.time() + 60, verify=maintainer.verify_stored).upto == 10
            )

        if when == "before the records are read":
            exporter.prune = retention
            out = list(export_lines(exporter, issuer=ISSUER, now=clock.now()))
        else:
            lines = export_lines(exporter, issuer=ISSUER, now=clock.now())
            out = [next(lines)]
            retention()
            out.extend(lines)
        summary = verify_export(out, jwks_resolver(ring.jwks()))
        assert summary.last_seq == 13
    finally:
        log.close()
        control.close()

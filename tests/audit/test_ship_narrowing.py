"""The shipper narrowing a refused batch down to the records refused, against a real OTLP/HTTP
collector on loopback: a partial success (whose kept records would reach the collector twice) is
never sent again, and one refusal does not leave every later batch small."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from aegis.audit.log import AuditLog
from aegis.audit.ship import Shipper
from aegis.audit.sinks import OtlpSink
from aegis.clock import FrozenClock
from tests.audit.conftest import fill
from tests.audit.receivers import OtlpCollector


def test_records_an_otlp_collector_accepted_are_not_sent_again(
    log: AuditLog, tmp_path: Path, clock: FrozenClock, collector: OtlpCollector
) -> None:
    """A partial success is a refusal the collector applied in part: the batch is dead-lettered
    whole, never halved and sent again (a SIEM counting denials would count them twice)."""
    collector.poison = "poison"
    sink = OtlpSink(collector.url, timeout=5)
    shipper = Shipper(log, sink, state_dir=tmp_path / "state", clock=clock, batch_size=8)
    fill(log, 7)
    log.append("gateway.decision", {"decision_id": "poison", "n": 7})
    shipper.run_once()
    sink.close()
    dup = {s: n for s, n in Counter(collector.seqs()).items() if n > 1}
    assert dup == {}, f"records delivered more than once: {dup}"
    assert sorted(collector.seqs()) == list(range(1, 8)) and shipper.cursor == 8
    dead = [json.loads(x) for x in shipper.dead_letter_file.read_text().splitlines()]
    assert [d["entry"]["seq"] for d in dead] == list(range(1, 9))


def test_one_refusal_does_not_narrow_the_shipper_for_good(
    log: AuditLog, tmp_path: Path, clock: FrozenClock, collector: OtlpCollector
) -> None:
    """A refused batch that turns out to hold no record refused alone (a passing 400) is
    narrowed only until its records are delivered: later batches are whole again, or a shipper
    falling behind its log would lose records to retention."""
    collector.refuse_next = 1
    sink = OtlpSink(collector.url, timeout=5)
    shipper = Shipper(log, sink, state_dir=tmp_path / "state", clock=clock, batch_size=8)
    fill(log, 8)
    shipper.run_once()
    fill(log, 16, start=8)
    shipper.run_once()
    sink.close()
    assert shipper._narrow is None and shipper.cursor == 24
    assert collector.seqs() == list(range(1, 25))  # nothing dead-lettered, nothing twice
    assert collector.sizes[0] == 8 and collector.sizes[-2:] == [8, 8], collector.sizes

"""The JSON Lines sink writes each record once after a write that failed partway (a full disk, a
quota): the shipper resumes after what the sink holds, as it does after a crash. It retried the
batch from its unmoved cursor, and every line written before the failure was written twice.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections import Counter
from pathlib import Path

import pytest

from aegis.audit.log import AuditLog
from aegis.clock import SystemClock
from tests.audit import ship_workers

pytestmark = [pytest.mark.postgres]


def test_the_jsonl_sink_holds_each_record_once_after_a_partial_write(
    fresh_pg_url: str, tmp_path: Path
) -> None:
    log = AuditLog(fresh_pg_url, clock=SystemClock())
    try:
        for i in range(40):
            log.append("gateway.decision", {"decision_id": f"d-{i}", "pad": "x" * 150})
    finally:
        log.close()
    out = tmp_path / "audit.jsonl"
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(
        target=ship_workers.jsonl_partial_write,
        args=(fresh_pg_url, str(out), str(tmp_path / "state"), 3000, results),
    )
    child.start()
    first_down, first_sent, second_down, second_sent, cursor = results.get(timeout=25)
    child.join(10)
    assert first_down and first_sent == 0  # the limit hit midway: SinkDown, retried later
    # The retry resumes after the lines the sink holds: it sends the rest only.
    assert not second_down and 0 < second_sent < 40 and cursor == 40
    seqs = []
    for raw in out.read_bytes().splitlines():
        try:
            seqs.append(json.loads(raw)["seq"])
        except ValueError:
            pass  # the fragment torn by the failed write (ended, and skipped by readers)
    dupes = sorted(s for s, n in Counter(seqs).items() if n > 1)
    assert sorted(set(seqs)) == list(range(1, 41))
    assert not dupes, f"records written twice to the JSON Lines sink: {dupes}"

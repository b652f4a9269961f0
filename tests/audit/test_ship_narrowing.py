"""The shipper narrowing a refused batch down to the records refused: a partial success (whose
kept records would reach the collector twice) is never sent again, and one refusal does not
leave every later batch small."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from aegis.audit.log import AuditLog
from aegis.audit.ship import ShippedRecord, Shipper, SinkRejected
from aegis.audit.sinks import OtlpSink
from aegis.clock import FrozenClock
from tests.audit.conftest import fill


class PartialCollector:
    """An OTLP/HTTP collector that stores every record but those whose body says ``poison`` and
    answers a 200 with ``partialSuccess.rejectedLogRecords`` for those (OTLP's partial success:
    the others are accepted, and kept)."""

    def __init__(self) -> None:
        self.stored: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                rejected = 0
                for rl in body["resourceLogs"]:
                    for sl in rl["scopeLogs"]:
                        for lr in sl["logRecords"]:
                            attrs = {a["key"]: a["value"] for a in lr["attributes"]}
                            seq = int(attrs["aegis.audit.seq"]["intValue"])
                            if "poison" in lr["body"]["stringValue"]:
                                rejected += 1
                            else:
                                outer.stored.append(seq)
                answer = json.dumps(
                    {"partialSuccess": {"rejectedLogRecords": str(rejected)}} if rejected else {}
                ).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/logs"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)


@pytest.fixture
def partial() -> Iterator[PartialCollector]:
    c = PartialCollector()
    yield c
    c.close()


def test_records_an_otlp_collector_accepted_are_not_sent_again(
    log: AuditLog,
    tmp_path: Path,
    clock: FrozenClock,
    partial: PartialCollector,
) -> None:
    """A partial success is a refusal the collector applied in part: the batch is dead-lettered
    whole, never halved and sent again (a SIEM counting denials would count them twice)."""
    sink = OtlpSink(partial.url, timeout=5)
    shipper = Shipper(log, sink, state_dir=tmp_path / "state", clock=clock, batch_size=8)
    fill(log, 7)
    log.append("gateway.decision", {"decision_id": "poison", "n": 7})
    shipper.run_once()
    dup = {s: n for s, n in Counter(partial.stored).items() if n > 1}
    sink.close()
    assert dup == {}, f"records delivered more than once: {dup}"
    assert sorted(partial.stored) == list(range(1, 8)) and shipper.cursor == 8
    dead = [json.loads(x) for x in shipper.dead_letter_file.read_text().splitlines()]
    assert [d["entry"]["seq"] for d in dead] == list(range(1, 9))


class FlakySink:
    """Refuses the first batch it is sent (a receiver's passing 400), then takes everything."""

    name = "flaky"

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self._refused = False

    def send(self, records: list[ShippedRecord]) -> None:
        if not self._refused:
            self._refused = True
            raise SinkRejected("400")
        self.sizes.append(len(records))

    def delivered(self) -> int:
        return 0


def test_one_refusal_does_not_narrow_the_shipper_for_good(
    log: AuditLog,
    tmp_path: Path,
    clock: FrozenClock,
) -> None:
    """A refused batch that turns out to hold no record refused alone (a passing 400) is
    narrowed only until its records are delivered: later batches are whole again, or a shipper
    falling behind its log would lose records to retention."""
    sink = FlakySink()
    shipper = Shipper(log, sink, state_dir=tmp_path / "state", clock=clock, batch_size=8)  # type: ignore[arg-type]
    fill(log, 8)
    shipper.run_once()
    fill(log, 16, start=8)
    shipper.run_once()
    assert shipper._narrow is None
    assert sink.sizes[-2:] == [8, 8], sink.sizes

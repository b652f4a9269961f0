"""Export sinks against real local receivers: JSON Lines, syslog over TLS, OTLP/HTTP.

Every sink must receive every record exactly once across a receiver outage; a down sink never
holds up appends; refused batches land in the dead-letter file, nothing is dropped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aegis.audit.log import AuditLog
from aegis.audit.ship import ShippedRecord, Shipper
from aegis.audit.sinks import JsonlSink, OtlpSink, SyslogSink, format_5424
from aegis.clock import FrozenClock
from aegis.errors import ConfigError
from aegis.telemetry.metrics import REGISTRY
from tests.audit.conftest import fill
from tests.audit.receivers import OtlpCollector, SyslogTlsReceiver, make_ca


def _shipper(log: AuditLog, sink: object, tmp_path: Path, clock: FrozenClock, **kw: int) -> Shipper:
    return Shipper(log, sink, state_dir=tmp_path / "state", clock=clock, batch_size=3, **kw)  # type: ignore[arg-type]


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _jsonl_seqs(paths: list[Path]) -> list[int]:
    return [json.loads(line)["seq"] for p in paths for line in p.read_text().splitlines()]


def test_jsonl_rotates_and_resumes_without_gaps_or_duplicates(
    log: AuditLog, tmp_path: Path, clock: FrozenClock
) -> None:
    sink = JsonlSink(tmp_path / "out" / "audit.jsonl", max_bytes=4096)
    (tmp_path / "out" / "audit.notes-x.jsonl").write_text("not ours\n")
    fill(log, 40)
    shipper = _shipper(log, sink, tmp_path, clock)
    assert shipper.run_once().sent == 40
    files = [*sink.rotated(), sink.path]
    assert len(files) > 1
    assert _jsonl_seqs(files) == list(range(1, 41))
    # A crash after the file write but before the cursor: the file itself says where to resume.
    shipper.cursor_file.unlink()
    fill(log, 5, start=40)
    again = _shipper(log, JsonlSink(sink.path, max_bytes=4096), tmp_path, clock)
    assert again.cursor == 40
    assert again.run_once().sent == 5
    assert _jsonl_seqs([*sink.rotated(), sink.path]) == list(range(1, 46))
    line = json.loads(sink.path.read_text().splitlines()[-1])
    assert line["record"]["decision_id"] == "d-44" and len(line["hash"]) == 64


def test_a_record_after_a_line_torn_by_a_crash_is_a_line_of_its_own(
    log: AuditLog, tmp_path: Path, clock: FrozenClock
) -> None:
    """Power lost while writing a batch: the file ends in part of a line and the cursor did not
    move. The resumed sink ends the torn line first, so the records resent after it are readable
    lines, not glued onto the fragment."""
    sink = JsonlSink(tmp_path / "out" / "audit.jsonl")
    fill(log, 3)
    shipper = _shipper(log, sink, tmp_path, clock)
    shipper.run_once()
    lines = sink.path.read_text().splitlines()
    sink.path.write_text(f"{lines[0]}\n{lines[1]}\n{lines[2][:25]}")  # record 3 torn
    shipper.cursor_file.write_text(json.dumps({"version": 1, "seq": 2}))
    again = _shipper(log, JsonlSink(sink.path), tmp_path, clock)
    assert again.cursor == 2 and again.run_once().sent == 1
    readable = []
    for raw in sink.path.read_text().splitlines():
        try:
            readable.append(json.loads(raw)["seq"])
        except ValueError:
            readable.append("torn")
    assert readable == [1, 2, "torn", 3]


def _readable(paths: list[Path]) -> list[object]:
    seqs: list[object] = []
    for raw in (line for path in paths for line in path.read_text().splitlines()):
        try:
            seqs.append(json.loads(raw)["seq"])
        except ValueError:
            seqs.append("torn")
    return seqs


def test_a_file_whose_first_line_a_crash_tore_still_rotates(
    log: AuditLog, tmp_path: Path, clock: FrozenClock
) -> None:
    """Power lost during the first write to a fresh file: the rotation that names the file by
    its first record reads past the fragment, and shipping goes on."""
    sink = JsonlSink(tmp_path / "out" / "audit.jsonl", max_bytes=2048)
    fill(log, 1)
    shipper = _shipper(log, sink, tmp_path, clock)
    shipper.run_once()
    sink.path.write_text(sink.path.read_text()[:30])  # record 1 torn
    shipper.cursor_file.write_text(json.dumps({"version": 1, "seq": 0}))
    fill(log, 40, start=1)
    again = _shipper(log, JsonlSink(sink.path, max_bytes=2048), tmp_path, clock)
    assert again.run_once().sent == 41 and again.cursor == 41
    files = [*sink.rotated(), sink.path]
    assert len(files) > 2
    assert _readable(files) == ["torn", *range(1, 42)]


def test_a_record_holding_a_lone_surrogate_is_shipped_as_stored(
    log: AuditLog, tmp_path: Path, clock: FrozenClock
) -> None:
    """The log keeps such a record ASCII-escaped (it has no UTF-8 form); the line carries that
    text as is, where re-encoding it failed the batch on every try and stalled the sink."""
    fill(log, 2)
    log.append("approval.requested", {"decision_id": "d-x", "parameters": {"note": "\ud800"}})
    fill(log, 2, start=2)
    sink = JsonlSink(tmp_path / "out" / "audit.jsonl")
    shipper = _shipper(log, sink, tmp_path, clock)
    assert shipper.run_once().sent == 5 and shipper.cursor == 5
    lines = sink.path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [1, 2, 3, 4, 5]
    assert json.loads(lines[2])["record"]["parameters"]["note"] == "\ud800"
    # Every other line reads as it did: members sorted, the record as its canonical text.
    first = json.loads(lines[0])
    assert lines[0] == json.dumps(first, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, Path, Path]:
    return make_ca(tmp_path)


@pytest.fixture
def receiver(tls: tuple[Path, Path, Path]) -> Iterator[SyslogTlsReceiver]:
    r = SyslogTlsReceiver(tls[1], tls[2])
    r.start()
    yield r
    r.stop()


def _wait_for(receiver: SyslogTlsReceiver, n: int) -> list[int]:
    deadline = time.monotonic() + 5
    while len(receiver.seqs()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return receiver.seqs()


def _syslog(receiver: SyslogTlsReceiver, tls: tuple[Path, Path, Path]) -> SyslogSink:
    """A syslog sink to the loopback receiver, trusting the test CA, naming it as its
    certificate does."""
    return SyslogSink(
        "127.0.0.1", receiver.port, context=SyslogSink.context(str(tls[0])), server_name="localhost"
    )


def test_syslog_over_tls_survives_a_receiver_restart(
    log: AuditLog,
    tmp_path: Path,
    clock: FrozenClock,
    tls: tuple[Path, Path, Path],
    receiver: SyslogTlsReceiver,
) -> None:
    sink = _syslog(receiver, tls)
    shipper = _shipper(log, sink, tmp_path, clock)
    fill(log, 7)
    assert shipper.run_once().sent == 7
    assert _wait_for(receiver, 7) == list(range(1, 8))
    receiver.stop()
    time.sleep(0.05)
    started = time.perf_counter()
    fill(log, 4, start=7)  # decisions go on while the receiver is away
    assert time.perf_counter() - started < 2
    stats = shipper.run_once()
    assert stats.down and stats.sent == 0 and shipper.cursor == 7
    assert shipper.run_once().sent == 0  # backing off: not even tried
    receiver.start()
    clock.advance(60)
    assert shipper.run_once().sent == 4
    assert _wait_for(receiver, 11) == list(range(1, 12))
    message = receiver.messages[0].decode("utf-8")
    assert (
        message.startswith("<110>1 ")
        and ' aegis - gateway.decision [aegis@32473 seq="1"' in message
    )
    assert message.split("] ", 1)[1].startswith("\ufeff{")
    sink.close()


def test_one_record_a_sink_refuses_keeps_none_of_its_batch_from_the_sink(
    log: AuditLog,
    tmp_path: Path,
    clock: FrozenClock,
    tls: tuple[Path, Path, Path],
    receiver: SyslogTlsReceiver,
) -> None:
    """A record over syslog's 64 KiB makes the sink refuse its whole batch: the shipper halves
    the batch until that record is alone, dead-letters it, and delivers its neighbours."""
    sink = _syslog(receiver, tls)
    shipper = Shipper(log, sink, state_dir=tmp_path / "state", clock=clock, batch_size=8)
    fill(log, 5)
    log.append("gateway.decision", {"decision_id": "d-big", "n": 5, "blob": "x" * 70_000})
    fill(log, 6, start=6)
    stats = shipper.run_once()
    assert (stats.sent, stats.dead_lettered, shipper.cursor) == (11, 1, 12)
    assert _wait_for(receiver, 11) == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]
    dead = [json.loads(x) for x in shipper.dead_letter_file.read_text().splitlines()]
    assert [d["entry"]["seq"] for d in dead] == [6] and "larger than" in dead[0]["reason"]
    fill(log, 2, start=12)  # back to whole batches
    assert shipper.run_once().sent == 2 and shipper._narrow is None
    sink.close()


def test_syslog_refuses_a_receiver_it_cannot_authenticate(
    log: AuditLog, tmp_path: Path, clock: FrozenClock, receiver: SyslogTlsReceiver
) -> None:
    (tmp_path / "other").mkdir()
    other_ca = make_ca(tmp_path / "other")[0]
    sink = SyslogSink("127.0.0.1", receiver.port, context=SyslogSink.context(str(other_ca)))
    fill(log, 2)
    shipper = _shipper(log, sink, tmp_path, clock)
    assert shipper.run_once().down and shipper.cursor == 0
    assert receiver.seqs() == []


def test_syslog_format_escapes_structured_data() -> None:
    record = ShippedRecord(3, 0.0, "gateway.decision", '{"a":"b"}', 'x"]\\')
    text = format_5424(record, hostname="h", app_name="aegis").decode()
    assert text == (
        "<110>1 1970-01-01T00:00:00.000Z h aegis - gateway.decision "
        '[aegis@32473 seq="3" hash="x\\"\\]\\\\"] \ufeff{"a":"b"}'
    )


def test_otlp_retries_a_down_collector_and_dead_letters_a_refused_batch(
    log: AuditLog, tmp_path: Path, clock: FrozenClock, collector: OtlpCollector
) -> None:
    sink = OtlpSink(collector.url, timeout=5)
    shipper = _shipper(log, sink, tmp_path, clock)
    fill(log, 5)
    collector.status = 503
    down_before = _metric("aegis_audit_sink_down_total", sink="otlp")
    assert shipper.run_once().down and shipper.cursor == 0
    assert _metric("aegis_audit_sink_down_total", sink="otlp") == down_before + 1
    collector.status = 200
    clock.advance(60)
    assert shipper.run_once().sent == 5
    assert collector.seqs() == [1, 2, 3, 4, 5]
    body = collector.requests[0]["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]["body"][
        "stringValue"
    ]
    assert json.loads(body)["decision_id"] == "d-0"
    collector.status = 400  # the collector refuses the batch itself
    fill(log, 2, start=5)
    stats = shipper.run_once()
    assert stats.dead_lettered == 2 and shipper.cursor == 7
    dead = [json.loads(x) for x in shipper.dead_letter_file.read_text().splitlines()]
    assert [d["entry"]["seq"] for d in dead] == [6, 7] and "400" in dead[0]["reason"]
    assert _metric("aegis_audit_exported_total", sink="otlp", outcome="dead_lettered") >= 2
    # A 200 that says part of the batch was refused is a refusal too, not a delivery.
    collector.status = 200
    collector.answer = json.dumps({"partialSuccess": {"rejectedLogRecords": "2",
                                                      "errorMessage": "too old"}}).encode()  # fmt: skip
    fill(log, 3, start=7)
    stats = shipper.run_once()
    assert stats.dead_lettered == 3 and shipper.cursor == 10
    dead = [json.loads(x) for x in shipper.dead_letter_file.read_text().splitlines()]
    assert [d["entry"]["seq"] for d in dead[-3:]] == [8, 9, 10]
    assert "rejected 2 of 3" in dead[-1]["reason"] and "too old" in dead[-1]["reason"]
    collector.answer = json.dumps({"partialSuccess": {}}).encode()  # nothing rejected
    fill(log, 1, start=10)
    assert shipper.run_once().sent == 1
    sink.close()


def test_a_collector_that_never_answers_is_dead_lettered_after_max_attempts(
    log: AuditLog, tmp_path: Path, clock: FrozenClock
) -> None:
    sink = OtlpSink("http://127.0.0.1:9/v1/logs", timeout=1)  # discard port: refused
    shipper = _shipper(log, sink, tmp_path, clock, max_attempts=3)
    fill(log, 2)
    for _ in range(2):
        assert shipper.run_once().down
        clock.advance(60)
    assert shipper.run_once().dead_lettered == 2
    assert len(shipper.dead_letter_file.read_text().splitlines()) == 2
    sink.close()


def test_a_damaged_cursor_is_an_error_not_a_silent_restart(
    log: AuditLog, tmp_path: Path, clock: FrozenClock
) -> None:
    sink = JsonlSink(tmp_path / "a.jsonl")
    shipper = _shipper(log, sink, tmp_path, clock)
    for damaged in ('{"seq": -4}', "{not json", '{"seq": "7"}'):
        shipper.cursor_file.write_text(damaged)
        with pytest.raises(ConfigError, match="damaged"):
            _shipper(log, sink, tmp_path, clock)

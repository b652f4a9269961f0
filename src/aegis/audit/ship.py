"""Shipping audit records to outside sinks (SIEM): cursor, retries, dead letters, resumption.

The audit table is the queue. A :class:`Shipper` reads records after its cursor, hands a batch to
its :class:`Sink`, and moves the cursor (a small file written atomically) only once the sink has
taken the batch. Decisions never wait for a sink: the gateway commits to the table and answers; a
sink that is down only makes its shipper fall behind, and it catches up from the cursor when the
sink is back, so nothing is lost and, for the file sink, nothing is sent twice.

Failures are of two kinds. :class:`SinkDown` (connection refused, timeout, 5xx, 429) is retried with
exponential backoff, forever unless ``max_attempts`` is set; :class:`SinkRejected` (the receiver
refuses the batch itself, e.g. HTTP 400) halves the batch until the records refused alone are
found: those go to the dead-letter file ``<state_dir>/<sink>.dead.jsonl``, the rest are
delivered, so one poison record can neither stall the trail nor keep its neighbours from it.
A batch dead-lettered after ``max_attempts`` is kept there the same way; nothing is dropped.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from sqlalchemy import select

from aegis.audit.log import AuditLog
from aegis.audit.sql_tables import AUDIT_RECORDS
from aegis.clock import Clock
from aegis.errors import ConfigError
from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import AUDIT_EXPORTED, AUDIT_SINK_DOWN

__all__ = [
    "ShipStats",
    "ShippedRecord",
    "Shipper",
    "Sink",
    "SinkDown",
    "SinkPartlyRejected",
    "SinkRejected",
]

_CURSOR_VERSION: Final = 1


class SinkDown(Exception):
    """The sink cannot take records now; try the same batch again later."""


class SinkRejected(Exception):
    """The sink refuses this batch for good, all of it: the shipper narrows it down to the
    records refused alone, which go to the dead-letter file."""


class SinkPartlyRejected(SinkRejected):
    """The sink kept part of this batch and refused the rest without saying which: sent again,
    the kept records would reach it twice, so the batch goes to the dead-letter file whole."""


@dataclass(frozen=True, slots=True)
class ShippedRecord:
    seq: int
    time: float
    kind: str
    #: The canonical JSON text the hash chain covers.
    record: str
    hash: str

    def line(self) -> str:
        """One JSON object, its members sorted, with the record as the chain holds it: its
        canonical text is put in as is, never decoded and encoded again (a record holding a
        lone surrogate is stored ASCII-escaped, and would have no UTF-8 form re-encoded)."""
        head = json.dumps({"hash": self.hash, "kind": self.kind}, sort_keys=True,
                          separators=(",", ":"), ensure_ascii=False)  # fmt: skip
        tail = json.dumps({"seq": self.seq, "time": self.time}, separators=(",", ":"))
        return f'{head[:-1]},"record":{self.record},{tail[1:]}'


class Sink(Protocol):
    name: str

    def send(self, records: list[ShippedRecord]) -> None:
        """Deliver every record or raise :class:`SinkDown` / :class:`SinkRejected`."""

    def delivered(self) -> int:
        """The last ``seq`` the sink itself knows it holds (0 if it cannot tell)."""

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ShipStats:
    sent: int = 0
    dead_lettered: int = 0
    down: bool = False


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Shipper:
    """Moves records from the log to one sink. Not thread-safe: one shipper per sink and cursor."""

    def __init__(
        self,
        log: AuditLog,
        sink: Sink,
        *,
        state_dir: Path,
        clock: Clock,
        batch_size: int = 500,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        max_attempts: int = 0,
    ) -> None:
        self.log, self.sink, self._clock = log, sink, clock
        self._batch, self._initial, self._max = batch_size, retry_initial, retry_max
        self._max_attempts = max_attempts
        state_dir.mkdir(parents=True, exist_ok=True)
        self.cursor_file = state_dir / f"{sink.name}.cursor"
        self.dead_letter_file = state_dir / f"{sink.name}.dead.jsonl"
        self.attempts = 0
        self.retry_at = 0.0
        #: The batch size while a refused batch is narrowed down to its refused records, and
        #: the last record of that batch (past it, whole batches again).
        self._narrow: int | None = None
        self._narrow_until = 0
        # Resume from whichever is further: our cursor, or what the sink shows it already holds
        # (a crash between the sink's write and the cursor's leaves the sink ahead).
        self.cursor = max(self._read_cursor(), sink.delivered())

    def _read_cursor(self) -> int:
        try:
            data = json.loads(self.cursor_file.read_text())
        except FileNotFoundError:
            return 0
        except ValueError:
            data = None
        seq = data.get("seq") if isinstance(data, dict) else None
        if type(seq) is not int or seq < 0:
            # Never guess: restarting from 0 would send everything again, skipping would lose.
            raise ConfigError(
                f"{self.cursor_file} is damaged; fix it, or remove it to export everything again",
                key="audit.state_dir",
            )
        return seq

    def _advance(self, seq: int) -> None:
        _write_atomic(self.cursor_file, json.dumps({"version": _CURSOR_VERSION, "seq": seq}))
        self.cursor = seq
        if seq >= self._narrow_until:
            self._narrow = None

    def pending(self) -> list[ShippedRecord]:
        query = (
            select(
                AUDIT_RECORDS.c.seq,
                AUDIT_RECORDS.c.time,
                AUDIT_RECORDS.c.kind,
                AUDIT_RECORDS.c.record,
                AUDIT_RECORDS.c.hash,
            )
            .where(AUDIT_RECORDS.c.seq > self.cursor)
            .order_by(AUDIT_RECORDS.c.seq)
            .limit(self._narrow or self._batch)
        )
        with self.log.engine.connect() as conn:
            return [
                ShippedRecord(int(s), float(t), k, r, h) for s, t, k, r, h in conn.execute(query)
            ]

    def run_once(self) -> ShipStats:
        """Ship batches until caught up, the sink is down, or a retry is not yet due."""
        sent = dead = 0
        while True:
            if self.attempts and self._clock.now() < self.retry_at:
                return ShipStats(sent, dead, down=True)
            if self.attempts:
                # A send that failed partway (a disk filling up) may have left part of the batch
                # with the sink: resume after what it holds, not from the unmoved cursor.
                held = self.sink.delivered()
                if held > self.cursor:
                    self._advance(held)
            batch = self.pending()
            if not batch:
                return ShipStats(sent, dead)
            if batch[0].seq != self.cursor + 1:
                # Retention removed records this sink never received (an outage longer than
                # audit.retention_days, with pruning in another process): say so, loudly. A
                # sink starting afresh (a new one, or its cursor file removed to ship again)
                # starts where the log now starts: said as a warning, so its history is known.
                log_event(
                    "audit.export_gap",
                    level=logging.ERROR if self.cursor else logging.WARNING,
                    sink=self.sink.name,
                    first_missing=self.cursor + 1,
                    resumed_at=batch[0].seq,
                )
            try:
                self.sink.send(batch)
            except SinkRejected as exc:
                if len(batch) > 1 and not isinstance(exc, SinkPartlyRejected):
                    # Which of them does the sink refuse? Halve until each refused one is alone.
                    self._narrow = len(batch) // 2
                    self._narrow_until = max(self._narrow_until, batch[-1].seq)
                    continue
                self._dead_letter(batch, f"rejected: {exc}")
                dead += len(batch)
                continue
            except SinkDown as exc:
                AUDIT_SINK_DOWN.labels(sink=self.sink.name).inc()
                self.attempts += 1
                if self._max_attempts and self.attempts >= self._max_attempts:
                    self._dead_letter(batch, f"gave up after {self.attempts} attempts: {exc}")
                    dead += len(batch)
                    continue
                delay = min(self._max, self._initial * 2 ** (self.attempts - 1))
                self.retry_at = self._clock.now() + delay
                log_event(
                    "audit.sink_down",
                    level=logging.WARNING,
                    sink=self.sink.name,
                    attempts=self.attempts,
                    retry_in=delay,
                    error=str(exc)[:200],
                )
                return ShipStats(sent, dead, down=True)
            self.attempts = 0
            self._advance(batch[-1].seq)
            AUDIT_EXPORTED.labels(sink=self.sink.name, outcome="sent").inc(len(batch))
            sent += len(batch)

    def _dead_letter(self, batch: list[ShippedRecord], reason: str) -> None:
        with self.dead_letter_file.open("a", encoding="utf-8") as f:
            for r in batch:
                f.write(json.dumps({"reason": reason, "entry": json.loads(r.line())}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log_event(
            "audit.dead_lettered",
            level=logging.ERROR,
            sink=self.sink.name,
            first=batch[0].seq,
            last=batch[-1].seq,
            reason=reason[:200],
        )
        AUDIT_EXPORTED.labels(sink=self.sink.name, outcome="dead_lettered").inc(len(batch))
        self.attempts = 0
        self._advance(batch[-1].seq)

"""Audit fixtures: a log on SQLite, a key ring, a checkpointer, and helpers to make exports."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aegis.audit.checkpoint import Checkpointer
from aegis.audit.export import write_export
from aegis.audit.log import AuditLog
from aegis.clock import FrozenClock, random_bytes
from aegis.crypto.keyring import KeyRing
from tests.audit.receivers import OtlpCollector
from tests.crypto.fakes import MemoryKeyStore

ISSUER = "https://aegis.test"


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(1_800_000_000.0)


@pytest.fixture
def keyring(clock: FrozenClock) -> KeyRing:
    ring = KeyRing(MemoryKeyStore(), random_bytes(32), clock)
    ring.ensure_initialized()
    return ring


@pytest.fixture
def log(tmp_path: Path, clock: FrozenClock) -> Iterator[AuditLog]:
    audit = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", clock=clock)
    yield audit
    audit.close()


@pytest.fixture
def checkpointer(log: AuditLog, keyring: KeyRing, clock: FrozenClock) -> Checkpointer:
    return Checkpointer(log, keyring, issuer=ISSUER, clock=clock)


def fill(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.append("gateway.decision", {"decision_id": f"d-{i}", "n": i, "action": "allow"})


def export_text(checkpointer: Checkpointer) -> list[str]:
    out = io.StringIO()
    write_export(checkpointer, out, issuer=ISSUER, now=checkpointer._clock.now())
    return out.getvalue().splitlines()


def loads(line: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(line)
    return value


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def either_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty audit database on SQLite, then on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.db'}"
    else:
        yield request.getfixturevalue("fresh_pg_url")


@pytest.fixture
def collector() -> Iterator[OtlpCollector]:
    """A real OTLP/HTTP collector on loopback (:class:`tests.audit.receivers.OtlpCollector`)."""
    c = OtlpCollector()
    yield c
    c.close()

"""Property: no damage to what an export covers ever verifies as ok."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegis.audit.checkpoint import Checkpointer, jwks_resolver
from aegis.audit.export import write_export
from aegis.audit.log import AuditLog
from aegis.audit.verify import DAMAGE_KINDS, verify_export
from aegis.clock import FrozenClock, random_bytes
from aegis.crypto.keyring import KeyRing
from aegis.errors import EvidenceError
from tests.audit.conftest import ISSUER, dumps, fill, loads
from tests.crypto.fakes import MemoryKeyStore


@pytest.fixture(scope="module")
def export() -> tuple[list[str], dict[str, object]]:
    clock = FrozenClock(1_800_000_000.0)
    ring = KeyRing(MemoryKeyStore(), random_bytes(32), clock)
    ring.ensure_initialized()
    with tempfile.TemporaryDirectory() as tmp:
        log = AuditLog(f"sqlite:///{Path(tmp) / 'a.db'}", clock=clock)
        cp = Checkpointer(log, ring, issuer=ISSUER, clock=clock)
        for chunk in (3, 4, 2):
            fill(log, chunk, start=log.count())
            cp.checkpoint()
        fill(log, 3, start=log.count())
        out = io.StringIO()
        write_export(cp, out, issuer=ISSUER, now=clock.now())
        log.close()
    return out.getvalue().splitlines(), ring.jwks()


def _flip(text: str, at: int) -> str:
    at %= len(text)
    c = text[at]
    return text[:at] + ("x" if c != "x" else "y") + text[at + 1 :]


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_every_covered_change_is_reported(
    export: tuple[list[str], dict[str, object]], data: st.DataObject
) -> None:
    lines, jwks = export
    lines = list(lines)
    covered = [i for i, x in enumerate(lines) if loads(x)["type"] in ("record", "end")]
    i = data.draw(st.sampled_from(covered))
    obj = loads(lines[i])
    how = data.draw(st.sampled_from(["field", "drop", "duplicate", "swap", "truncate"]))
    if how == "field":
        name = (
            "token"
            if obj["type"] == "end"
            else data.draw(st.sampled_from(["record", "hash", "prev_hash", "seq", "kind"]))
        )
        if name == "seq":
            obj["seq"] += data.draw(st.sampled_from([-1, 1, 7]))
        else:
            obj[name] = _flip(obj[name], data.draw(st.integers(0, 10_000)))
        lines[i] = dumps(obj)
    elif how == "drop":
        del lines[i]
    elif how == "duplicate":
        lines.insert(i, lines[i])
    elif how == "swap":
        records = [j for j in covered if loads(lines[j])["type"] == "record"]
        j = data.draw(st.sampled_from(records))
        if lines[i] == lines[j]:
            return
        lines[i], lines[j] = lines[j], lines[i]
    else:
        lines = lines[:i]
    with pytest.raises(EvidenceError) as info:
        verify_export(lines, jwks_resolver(jwks))
    assert info.value.details["damage"] in DAMAGE_KINDS

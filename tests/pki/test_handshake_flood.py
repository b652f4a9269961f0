"""A flood of refused TLS handshakes over real sockets: every one is counted, a bounded number are
written to the (real, hash-chained) audit log one by one, and the rest as one summary per window.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest

from aegis.audit.log import AuditLog
from aegis.pki import refusals
from aegis.pki.middleware import MTLS_AUDIT_KIND
from aegis.pki.refusals import SUMMARY_KIND
from tests.pki.conftest import Pki, build_pki
from tests.pki.harness import gateway_app, gateway_server_context, rejections, serve


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return build_pki(tmp_path)


async def _garbage_handshake(port: int) -> None:
    """A client that sends no ClientHello but bytes that are not TLS, and reads the close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.read(), 5)
    writer.close()


@contextmanager
def _audited(pki: Pki) -> Iterator[tuple[str, AuditLog]]:
    """A listener name of its own and a real audit log for it: (name, log)."""
    audit = AuditLog(f"sqlite:///{pki.directory / 'audit.db'}", clock=pki.clock)
    try:
        yield f"flood-{uuid.uuid4().hex[:8]}", audit
    finally:
        audit.close()


@asynccontextmanager
async def _serving(pki: Pki, name: str, audit: AuditLog) -> AsyncIterator[int]:
    """The mTLS listener ``name``, auditing to ``audit``, while in use: its port."""
    app = gateway_app(pki, name=name, audit=audit.append_async)
    async with serve(app, gateway_server_context(pki), name=name, audit=audit.append_async) as gw:
        yield gw.port


async def _until(check: object, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.02)


async def test_a_flood_is_counted_whole_and_audited_within_bounds(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(refusals, "PER_CLIENT", 3)
    monkeypatch.setattr(refusals, "WINDOW", 2.0)
    with _audited(pki) as (name, audit):
        async with _serving(pki, name, audit) as port:
            started = time.monotonic()
            for _ in range(25):
                await _garbage_handshake(port)
            await _until(lambda: rejections(name, "tls_handshake_failed") >= 25)
            assert rejections(name, "tls_handshake_failed") == 25  # every one counted
            assert time.monotonic() - started < 2.0, "the flood must fit in one window"

            def mine(kind: str) -> list[dict[str, object]]:
                return [r for r in audit.records(kind=kind) if r["listener"] == name]

            assert len(mine(MTLS_AUDIT_KIND)) == 3  # the first few, one record each
            assert mine(SUMMARY_KIND) == []  # the rest waits for the window to close
            await _until(lambda: mine(SUMMARY_KIND), 5.0)
            [summary] = mine(SUMMARY_KIND)
            assert summary["suppressed"] == 22
            assert summary["by_code"] == {"tls_handshake_failed": 22}
            assert summary["by_client"] == {"127.0.0.1": 22}
            assert summary["clients"] == 1
            # A new window: the same client is written one by one again.
            await _garbage_handshake(port)
            await _until(lambda: len(mine(MTLS_AUDIT_KIND)) == 4)
            assert len(mine(MTLS_AUDIT_KIND)) == 4
        assert len(mine(SUMMARY_KIND)) == 1  # nothing was only counted in the last window
        assert audit.verify_chain().ok


async def test_the_listener_wide_bound_holds_and_stop_writes_the_open_window(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Addresses spread over many clients are bounded by the listener's own limit, and what the
    window only counted is written when the listener stops, not lost."""
    monkeypatch.setattr(refusals, "PER_LISTENER", 2)
    with _audited(pki) as (name, audit):
        async with _serving(pki, name, audit) as port:
            for _ in range(6):
                await _garbage_handshake(port)
            await _until(lambda: rejections(name, "tls_handshake_failed") >= 6)
        records = [r for r in audit.records() if r.get("listener") == name]
        assert [r["kind"] for r in records] == [MTLS_AUDIT_KIND] * 2 + [SUMMARY_KIND]
        assert records[-1]["suppressed"] == 4

"""The peer check on an event loop (the gateway's mTLS middleware and ext_authz): the certificate
record and the agent, when not cached, are read off the loop, and the answer and its refusals are
those of the synchronous check."""

from __future__ import annotations

import asyncio
import threading

import pytest
from cryptography.hazmat.primitives import serialization

from aegis.clock import Clock
from aegis.errors import AegisError
from aegis.pki.profile import serial_hex
from aegis.pki.store import CertificateRecord, CertificateStore
from aegis.types import AgentStatus
from tests.pki.conftest import Pki

DER = serialization.Encoding.DER


async def test_the_records_are_read_off_the_event_loop_and_the_answer_is_the_same(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, cert = pki.key_and_cert("alpha")
    der = cert.public_bytes(DER)
    readers: list[str] = []
    real_get, real_agent = pki.store.get, pki.cache._store.get_agent

    def get(serial: str) -> object:
        readers.append(threading.current_thread().name)
        return real_get(serial)

    def get_agent(agent_id: str) -> object:
        readers.append(threading.current_thread().name)
        return real_agent(agent_id)

    monkeypatch.setattr(pki.store, "get", get)
    monkeypatch.setattr(pki.cache._store, "get_agent", get_agent)
    found = await pki.validator.validate_async(der, source="forwarded")
    assert found == pki.validator.validate(der, source="forwarded")
    assert (found.agent_id, found.tenant, found.source) == ("alpha", "t1", "forwarded")
    on_loop = threading.current_thread().name
    asynced = readers[:2]  # the record, then the agent (both uncached: ttl 0 here)
    assert len(asynced) == 2 and on_loop not in asynced


async def test_refusals_keep_their_codes_and_order(pki: Pki) -> None:
    _, cert = pki.key_and_cert("alpha")
    der = cert.public_bytes(DER)
    pki.registry.set_agent_status("alpha", AgentStatus.SUSPENDED, actor="test")
    with pytest.raises(AegisError) as suspended:
        await pki.validator.validate_async(der)
    assert suspended.value.code == "cert_revoked"
    with pytest.raises(AegisError) as garbage:
        await pki.validator.validate_async(b"not a certificate")
    assert garbage.value.code == "cert_invalid"


class _LateStore(CertificateStore):
    """The real certificate store, whose reads are delivered only when ``gate`` opens (a read
    that was taken before a revocation and lands after it)."""

    def __init__(self, url: str, clock: Clock) -> None:
        super().__init__(url, clock=clock, ttl=60.0)
        self.gate = threading.Event()

    def get(self, serial: str) -> CertificateRecord | None:
        record = super().get(serial)
        self.gate.wait(5)
        return record


async def test_a_record_read_before_a_revocation_is_not_cached_after_it(pki: Pki) -> None:
    _, cert = pki.key_and_cert("alpha")
    serial = serial_hex(cert)
    store = _LateStore(f"sqlite:///{pki.directory / 'pki.db'}", pki.clock)
    try:
        late = asyncio.ensure_future(store.lookup_async(serial))
        await asyncio.sleep(0.05)  # read (live), not yet delivered
        assert store.revoke_serial(serial, "keyCompromise")
        store.gate.set()
        before = await late
        assert before is not None and before.revoked_at is None  # the caller that asked before
        after = store.lookup(serial)
        assert after is not None and after.revoked_at is not None  # everyone after sees it
    finally:
        store.gate.set()
        store.close()

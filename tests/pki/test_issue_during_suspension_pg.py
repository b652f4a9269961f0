"""A certificate issued while its agent or tenant is being suspended: the status was checked
before the suspension committed, the record written after the suspension's listener had revoked
the agent's certificates. Such a certificate stayed unrevoked, off the CRL for its whole life,
which mTLS peers that check only the chain and the CRL (nginx, Envoy) would keep accepting. The
issuer now reads both statuses again once its record is written, revokes the certificate and
refuses. Real PostgreSQL; the interleaving is fixed by running the suspension in the record
write."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from aegis.clock import SystemClock
from aegis.config import AegisConfig
from aegis.errors import Conflict
from aegis.pki.ca import CaFiles, CertificateAuthority
from aegis.pki.service import PkiService
from aegis.pki.store import CertificateRecord, CertificateStore
from aegis.registry.cache import RegistryCache
from aegis.registry.service import AgentSpec, RegistryService
from aegis.stores import open_registry_store
from aegis.types import AgentStatus, TenantStatus


def _pki(tmp_path: Path, url: str) -> tuple[RegistryService, PkiService, CertificateStore]:
    clock = SystemClock()
    config = AegisConfig.model_validate(
        {"base_dir": str(tmp_path), "pki": {"trust_domain": "example.org"}}
    )
    kek, pepper = os.urandom(32), os.urandom(32)
    store = open_registry_store(url)
    registry = RegistryService(store, clock=clock, pepper=pepper)
    registry.register_agent(
        AgentSpec("alpha", "t1", "prod", owner="o@example.org", allowed_scopes=("s",)), actor="t"
    )
    cache = RegistryCache(store, clock=clock, ttl=0.0)  # no staleness at all: a pure race
    ca = CertificateAuthority.init(CaFiles.from_config(config), kek, clock, "example.org")
    certs = CertificateStore(url, clock=clock, ttl=0.0)
    service = PkiService(ca, certs, cache, settings=config.pki, clock=clock, pepper=pepper)
    service.listen(registry)
    return registry, service, certs


def _crl_serials(service: PkiService) -> set[int]:
    crl = x509.load_der_x509_crl(service.crl_der())
    return {r.serial_number for r in crl}


def _issue_racing(
    service: PkiService, certs: CertificateStore, change: Callable[[], object]
) -> str:
    """Issue while ``change`` commits (and its listener revokes) just before the record is
    written; the serial of the certificate issued."""
    real_record = certs.record
    made: list[CertificateRecord] = []

    def record_after_change(rec: CertificateRecord) -> None:
        change()
        real_record(rec)
        made.append(rec)

    certs.record = record_after_change  # type: ignore[method-assign]
    try:
        with pytest.raises(Conflict, match="became suspended while its certificate was issued"):
            service.issue("alpha", ec.generate_private_key(ec.SECP256R1()).public_key())
    finally:
        certs.record = real_record  # type: ignore[method-assign]
    return made[0].serial


@pytest.mark.parametrize("what", ["agent", "tenant"])
def test_a_certificate_issued_during_a_suspension_is_revoked_and_refused(
    tmp_path: Path, fresh_pg_url: str, what: str
) -> None:
    registry, service, certs = _pki(tmp_path, fresh_pg_url)
    try:
        if what == "agent":
            serial = _issue_racing(service, certs, lambda: registry.set_agent_status(
                "alpha", AgentStatus.SUSPENDED, actor="admin"))  # fmt: skip
        else:
            serial = _issue_racing(service, certs, lambda: registry.set_tenant_status(
                "t1", TenantStatus.SUSPENDED, actor="admin"))  # fmt: skip
        record = certs.get(serial)
        assert record is not None and record.revoked_at is not None
        assert int(serial, 16) in _crl_serials(service)
    finally:
        certs.close()
        registry.store.close()  # type: ignore[attr-defined]

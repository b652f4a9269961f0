"""A certificate that passed checks 1-4 (parsing, validity, X509-SVID rules, path to an Aegis root)
is not validated again on every request, but only while the answer is the same: the same trust
bundle and a time inside the validity of every certificate on its path. Revocation and the agent's
state are checked on every call."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from aegis.clock import FrozenClock, SystemClock
from aegis.errors import AegisError
from aegis.pki.profile import serial_hex
from aegis.pki.store import CertificateRecord, CertificateStore
from aegis.types import AgentStatus
from tests.pki.conftest import Pki, build_pki
from tests.pki.forge import forge_ca, forge_leaf

T0 = 1_800_000_000
PEM = serialization.Encoding.PEM


def der_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def refusal(pki: Pki, der: bytes) -> AegisError:
    with pytest.raises(AegisError) as info:
        pki.validator.validate(der)
    return info.value


@pytest.fixture
def frozen(tmp_path: Path) -> tuple[Pki, FrozenClock]:
    clock = FrozenClock(T0)
    pki = build_pki(tmp_path, clock)
    yield pki, clock
    pki.store.close()


def test_the_leaf_validity_is_judged_at_every_call(frozen: tuple[Pki, FrozenClock]) -> None:
    pki, clock = frozen
    _, cert = pki.key_and_cert("alpha", lifetime=600)
    der = der_of(cert)
    assert pki.validator.validate(der).agent_id == "alpha"
    clock.set(cert.not_valid_after_utc.timestamp() + 1)
    assert refusal(pki, der).code == "cert_expired"
    clock.set(cert.not_valid_before_utc.timestamp() - 1)
    assert refusal(pki, der).code == "cert_not_yet_valid"
    clock.set(T0)
    assert pki.validator.validate(der).agent_id == "alpha"


def test_an_issuer_that_expires_first_ends_the_pass(frozen: tuple[Pki, FrozenClock]) -> None:
    pki, clock = frozen
    root = forge_ca("short-lived root", not_before=T0 - 60, not_after=T0 + 100)
    _, cert = forge_leaf(pki, issuer=root, not_after=T0 + 1000)
    pki.bundle.replace(root[0].public_bytes(PEM))
    der = der_of(cert)
    assert pki.validator.validate(der).agent_id == "alpha"
    clock.set(T0 + 100)  # the root's last second: the pass still holds
    assert pki.validator.validate(der).agent_id == "alpha"
    clock.set(T0 + 150)  # the leaf is still valid, its root is not
    refused = refusal(pki, der)
    assert refused.code == "cert_untrusted"
    assert "does not chain to an aegis root" in refused.message


def test_a_replaced_trust_bundle_is_a_fresh_path_validation(pki: Pki) -> None:
    _, cert = pki.key_and_cert("alpha")
    der = der_of(cert)
    ours = pki.bundle.pem
    assert pki.validator.validate(der).agent_id == "alpha"
    other_root, _ = forge_ca("another root")
    pki.bundle.replace(other_root.public_bytes(PEM))
    refused = refusal(pki, der)
    assert refused.code == "cert_untrusted"
    assert "does not chain to an aegis root" in refused.message
    pki.bundle.replace(ours)
    assert pki.validator.validate(der).agent_id == "alpha"


def test_revocation_and_agent_state_are_checked_at_every_call(pki: Pki) -> None:
    _, cert = pki.key_and_cert("alpha")
    _, other = pki.key_and_cert("gamma")
    der, other_der = der_of(cert), der_of(other)
    assert pki.validator.validate(der).agent_id == "alpha"
    assert pki.validator.validate(other_der).agent_id == "gamma"
    assert pki.store.revoke_serial(serial_hex(cert), "keyCompromise")
    assert refusal(pki, der).code == "cert_revoked"
    pki.registry.set_agent_status("gamma", AgentStatus.SUSPENDED, actor="test")
    assert refusal(pki, other_der).code == "cert_revoked"


async def test_the_async_check_shares_the_pass_and_its_limits(
    frozen: tuple[Pki, FrozenClock],
) -> None:
    pki, clock = frozen
    _, cert = pki.key_and_cert("alpha", lifetime=600)
    der = der_of(cert)
    assert (await pki.validator.validate_async(der)).agent_id == "alpha"
    assert pki.validator.validate(der).agent_id == "alpha"
    clock.set(cert.not_valid_after_utc.timestamp() + 1)
    with pytest.raises(AegisError) as info:
        await pki.validator.validate_async(der)
    assert info.value.code == "cert_expired"


class _RacingCache(dict):  # type: ignore[type-arg]
    """A cache whose store lands just after another thread's forget(): the race a lookup on a
    worker thread can lose, since its generation check and its store are two steps."""

    def __init__(self, store: CertificateStore) -> None:
        super().__init__()
        self.store = store

    def __setitem__(self, key: object, value: object) -> None:
        self.store.forget()
        super().__setitem__(key, value)


def test_a_record_stored_after_a_forget_is_not_served(tmp_path: Path) -> None:
    """The record cache is dropped when a revocation made elsewhere is noticed; a read that was
    under way then, and stores its unrevoked record afterwards, must not be served from it."""
    url = f"sqlite:///{tmp_path / 'certs.db'}"
    store = CertificateStore(url, clock=SystemClock(), ttl=60.0)
    elsewhere = CertificateStore(url, clock=SystemClock())
    store.record(CertificateRecord("ab01", "tool", "acme", "prod", "spiffe://x/tool", "ski",
                                   "t", 0.0, 4e9, 0.0))  # fmt: skip
    before = store.get("ab01")  # a read that began before the revocation ...
    assert elsewhere.revoke_serial("ab01", "key_compromise")
    fresh_get, store.get = store.get, lambda serial: before  # type: ignore[method-assign]
    store._cache = _RacingCache(store)  # ... and stores its record just after forget() ran
    assert store.lookup("ab01").revoked_at is None  # that read's own answer
    store.get = fresh_get  # type: ignore[method-assign]
    assert store.lookup("ab01").revoked_at is not None  # the stale entry is not served

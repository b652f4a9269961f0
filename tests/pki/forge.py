"""Deliberately wrong certificates for the rejection tests, built with the real CA keys.

Each helper changes one thing from what the CA would issue, so a test shows that exactly that
thing is refused. ``record`` stores the serial as if the CA had issued it, so later checks (chain,
revocation, registry) are reached.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aegis.pki.profile import serial_hex, x5t_s256
from aegis.pki.spiffe import agent_spiffe_id
from aegis.pki.store import CertificateRecord
from tests.pki.conftest import TRUST_DOMAIN, Pki


def _t(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(t), dt.UTC)


def forge_ca(
    name: str,
    signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    *,
    ca: bool = True,
    not_before: float | None = None,
    not_after: float | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA certificate (self-signed, or signed by ``signer``), valid from five minutes ago for
    30 days unless ``not_before`` / ``not_after`` (unix seconds) say otherwise."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = signer if signer else (None, key)
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(minutes=5) if not_before is None else _t(not_before)
    end = now + dt.timedelta(days=30) if not_after is None else _t(not_after)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=None if not ca else 1), critical=True
        )
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer_cert.public_key() if issuer_cert else key.public_key()  # type: ignore[arg-type]
            ),
            critical=False,
        )
    )
    return b.sign(issuer_key, hashes.SHA256()), key


def forge_leaf(
    pki: Pki,
    *,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    agent: str = "alpha",
    tenant: str = "t1",
    uris: list[str] | None = None,
    ca: bool = False,
    eku: list[x509.ObjectIdentifier] | None = None,
    not_before: float | None = None,
    not_after: float | None = None,
    record: bool = True,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    issuer_cert, issuer_key = issuer or (pki.ca.current.cert, pki.ca.current.key)
    sid = agent_spiffe_id(TRUST_DOMAIN, tenant, "prod", agent)
    now = pki.clock.now()
    b: Any = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent)]))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_t(now - 60 if not_before is None else not_before))
        .not_valid_after(_t(now + 600 if not_after is None else not_after))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, ca, ca, False, False), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage(eku or [ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    names = [sid] if uris is None else uris
    if names:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in names]),
            critical=False,
        )
    cert = b.sign(issuer_key, hashes.SHA256())
    if record:
        pki.store.record(
            CertificateRecord(
                serial=serial_hex(cert),
                agent_id=agent,
                tenant_id=tenant,
                env="prod",
                spiffe_id=names[0] if len(names) == 1 else sid,
                issuer_ski=pki.ca.current.ski,
                x5t_s256=x5t_s256(cert),
                not_before=cert.not_valid_before_utc.timestamp(),
                not_after=cert.not_valid_after_utc.timestamp(),
                issued_at=now,
            )
        )
    return key, cert

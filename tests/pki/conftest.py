"""Shared PKI fixtures: a fresh CA on disk, a registry with two tenants, the PKI service."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from aegis.clock import Clock, SystemClock
from aegis.config import AegisConfig
from aegis.oauth.client_auth import ClientAuthenticator, FailureLimiter
from aegis.pki.ca import CaFiles, CertificateAuthority
from aegis.pki.peer import PeerValidator, TrustBundle
from aegis.pki.service import PkiService
from aegis.pki.store import CertificateStore
from aegis.registry.cache import RegistryCache
from aegis.registry.service import AgentSpec, RegistryService
from aegis.types import ClientAuthMethod
from tests.pki.fakes import MemoryRegistryStore, MemoryReplayStore

TRUST_DOMAIN = "example.org"


def self_signed_der(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    """A self-signed certificate of ``key`` (DER), valid for the hour: what an agent using
    ``self_signed_tls_client_auth`` presents."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def make_csr(
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


@dataclass
class Pki:
    directory: Path
    config: AegisConfig
    clock: Clock
    kek: bytes
    registry: RegistryService
    cache: RegistryCache
    ca: CertificateAuthority
    store: CertificateStore
    service: PkiService
    bundle: TrustBundle
    validator: PeerValidator
    secrets: dict[str, tuple[str, str]]

    def key_and_cert(
        self, agent: str = "alpha", lifetime: int | None = None
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        issued = self.service.issue(agent, key.public_key(), lifetime=lifetime)
        return key, issued.certificate

    def write_pair(
        self, name: str, key: ec.EllipticCurvePrivateKey, *certs: x509.Certificate
    ) -> tuple[Path, Path]:
        cert_path = self.directory / f"{name}.pem"
        key_path = self.directory / f"{name}.key"
        cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path


def build_pki(directory: Path, clock: Clock | None = None) -> Pki:
    clock = clock or SystemClock()
    config = AegisConfig.model_validate(
        {
            "base_dir": str(directory),
            "pki": {"trust_domain": TRUST_DOMAIN, "leaf_default_lifetime": 3600},
        }
    )
    kek, pepper = os.urandom(32), os.urandom(32)
    store = MemoryRegistryStore()
    registry = RegistryService(store, clock=clock, pepper=pepper)
    cache = RegistryCache(store, clock=clock, ttl=0.0)
    secrets: dict[str, tuple[str, str]] = {}
    for agent, tenant in (("alpha", "t1"), ("beta", "t2"), ("gamma", "t1"), ("gw", "t1")):
        spec = AgentSpec(
            agent, tenant, "prod", owner="owner@example.org", allowed_scopes=("tools",)
        )
        if agent == "gw":  # the gateway itself: a serving agent (serverAuth as well)
            spec = AgentSpec(agent, tenant, "prod", owner="owner@example.org", roles=("server",))
        registry.register_agent(spec, actor="test")
        client, secret = registry.create_client(
            agent, auth_method=ClientAuthMethod.CLIENT_SECRET_BASIC, actor="test"
        )
        assert secret is not None
        secrets[agent] = (client.client_id, secret)
    ca = CertificateAuthority.init(CaFiles.from_config(config), kek, clock, TRUST_DOMAIN)
    cert_store = CertificateStore(f"sqlite:///{directory / 'pki.db'}", clock=clock, ttl=0.0)
    authenticator = ClientAuthenticator(
        registry,
        cache,
        MemoryReplayStore(),
        clock=clock,
        audiences=frozenset({"http://127.0.0.1"}),
        assertion_max_lifetime=300,
        leeway=30,
        limiter=FailureLimiter(clock, limit=1000, window=60),
    )
    service = PkiService(
        ca,
        cert_store,
        cache,
        settings=config.pki,
        clock=clock,
        pepper=pepper,
        authenticator=authenticator,
    )
    service.listen(registry)
    bundle = TrustBundle(ca.bundle_pem())
    validator = PeerValidator(bundle, cert_store, cache, trust_domain=TRUST_DOMAIN, clock=clock)
    return Pki(
        directory,
        config,
        clock,
        kek,
        registry,
        cache,
        ca,
        cert_store,
        service,
        bundle,
        validator,
        secrets,
    )


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Pki]:
    p = build_pki(tmp_path)
    yield p
    p.store.close()

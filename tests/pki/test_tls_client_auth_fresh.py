"""`tls_client_auth` at the token endpoint: the peer validator reads cached records (the
certificate's, the registry's), so the client's certificate is checked again as the store holds it
now. A certificate revoked on another replica a moment ago (here by a key removal there)
authenticates nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aegis.clock import FrozenClock
from aegis.config import load_config
from aegis.crypto.keys import Ed25519SigningKey
from aegis.errors import ClientAuthError
from aegis.oauth.service import TokenRequest
from aegis.pki.ca import CaFiles, CertificateAuthority
from aegis.pki.service import PkiService
from aegis.registry.service import AgentSpec
from aegis.server.services import build_services
from aegis.types import ClientAuthMethod
from tests.support.server import write_dev_config

T0 = 1_800_000_000.0


def test_a_certificate_revoked_on_another_replica_authenticates_nothing(tmp_path: Path) -> None:
    clock = FrozenClock(T0)
    config = load_config(write_dev_config(tmp_path, 8080), environ={})
    CertificateAuthority.init(
        CaFiles.from_config(config), config.kek(), clock, config.pki.trust_domain
    )
    a = build_services(config, clock=clock)  # the replica the operator's change lands on
    b = build_services(config, clock=clock)  # the token service the client asks
    try:
        pki_a, pki_b = a.extras["pki"], b.extras["pki"]
        assert isinstance(pki_a, PkiService) and isinstance(pki_b, PkiService)
        k1, k2 = Ed25519SigningKey.generate(), Ed25519SigningKey.generate()
        a.registry.register_agent(
            AgentSpec("kagent", "acme", "prod", "o@example.com", allowed_scopes=("p:w",),
                      jwks=(k1.public.to_jwk(), k2.public.to_jwk())),
            actor="t",
        )  # fmt: skip
        clock.set(T0 + 10.0)
        issued = pki_a.issue("kagent", ec.generate_private_key(ec.SECP256R1()).public_key())
        der = issued.certificate.public_bytes(serialization.Encoding.DER)
        client, _ = a.registry.create_client(
            "kagent", auth_method=ClientAuthMethod.TLS_CLIENT_AUTH,
            tls_san_uri=issued.record.spiffe_id, actor="t",
        )  # fmt: skip
        validator_b = pki_b.validator()

        def token() -> str:
            peer = asyncio.run(validator_b.validate_async(der))
            auth = asyncio.run(
                b.authenticator.authenticate(
                    {"client_id": client.client_id}, None, "10.0.0.9", peer=peer, client_cert=der
                )
            )
            return b.tokens.client_credentials(auth.client, TokenRequest((), ())).token

        clock.set(T0 + 20.8)
        assert token()  # b's caches now hold the certificate as good
        clock.set(T0 + 20.85)
        a.registry.update_agent("kagent", actor="t", jwks=[k1.public.to_jwk()])
        assert pki_a.store.get(issued.record.serial).revoked_at is not None
        clock.set(T0 + 21.0)  # within b's cache lifetime
        with pytest.raises(ClientAuthError):
            token()
    finally:
        asyncio.run(a.aclose())
        asyncio.run(b.aclose())

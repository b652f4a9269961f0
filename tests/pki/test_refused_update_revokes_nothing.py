"""An agent update the store refuses (a value it cannot hold) is not made and ends nothing: the
certificates a withdrawn serving role or a removed key would end stay good (the CA's listener
runs on the planned change before it commits, and only once the store would take it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.testclient import TestClient

from aegis.clock import SystemClock
from aegis.config import load_config
from aegis.crypto.keys import Ed25519SigningKey
from aegis.pki.ca import CaFiles, CertificateAuthority
from aegis.pki.service import PkiService
from aegis.registry.service import AgentSpec
from aegis.server.app import create_app
from aegis.server.services import build_services
from aegis.types import AdminRole
from tests.support.server import write_dev_config


@pytest.mark.parametrize("change", ["role", "key"])
def test_a_refused_update_revokes_nothing(tmp_path: Path, change: str) -> None:
    config = load_config(write_dev_config(tmp_path, 8080), environ={})
    CertificateAuthority.init(CaFiles.from_config(config), config.kek(), SystemClock(), "ex.org")
    services = build_services(config)
    pki = services.extras["pki"]
    assert isinstance(pki, PkiService)
    k1, k2 = Ed25519SigningKey.generate(), Ed25519SigningKey.generate()
    services.registry.register_agent(
        AgentSpec("tool", "acme", "prod", "o@example.com", roles=("server",),
                  jwks=(k1.public.to_jwk(), k2.public.to_jwk())),
        actor="t",
    )  # fmt: skip
    cert = pki.issue("tool", ec.generate_private_key(ec.SECP256R1()).public_key()).certificate
    _, admin = services.registry.create_admin_key("ops", AdminRole.ADMIN, actor="t")
    patch = {"roles": []} if change == "role" else {"jwks": [k2.public.to_jwk()]}
    before = services.registry_store.get_agent("tool")
    with TestClient(create_app(services)) as http:
        answer = http.patch(
            "/v1/admin/agents/tool", content=json.dumps({**patch, "display_name": "tool\0"}),
            headers={"authorization": f"Bearer {admin}", "content-type": "application/json"},
        )  # fmt: skip
        assert answer.status_code == 400, answer.text
        assert services.registry_store.get_agent("tool") == before
        assert cert.serial_number not in {
            r.serial_number for r in x509.load_der_x509_crl(pki.crl_der())
        }
        # Sent right, it is made, and ends the certificate.
        made = http.patch(
            "/v1/admin/agents/tool", json=patch, headers={"authorization": f"Bearer {admin}"}
        )
        assert made.status_code == 200, made.text
    assert cert.serial_number in {r.serial_number for r in x509.load_der_x509_crl(pki.crl_der())}

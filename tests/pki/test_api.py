"""The PKI HTTP endpoints over real TLS: trust bundle and CRLs (RFC 5280 §5), revocation at once."""

from __future__ import annotations

import ssl

import httpx
from cryptography import x509
from starlette.applications import Starlette

from aegis.pki.api import PEM_CHAIN, PkiEndpoints
from aegis.types import AgentStatus
from tests.pki.conftest import Pki
from tests.pki.harness import gateway_server_context, serve


def _client(pki: Pki, port: int) -> httpx.AsyncClient:
    verify = ssl.create_default_context(cadata=pki.ca.bundle_pem().decode())
    verify.check_hostname = False  # the server certificate names a SPIFFE ID, not a host
    return httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}", verify=verify, timeout=5)


async def test_crl_lists_a_quarantined_agents_certificates_at_once(pki: Pki) -> None:
    app = Starlette(routes=PkiEndpoints(pki.service, max_body_bytes=65536).routes())
    _, kept = pki.key_and_cert("beta")
    _, first = pki.key_and_cert("alpha")
    _, second = pki.key_and_cert("alpha")
    ctx = gateway_server_context(pki, require_client_cert=False)
    async with serve(app, ctx, name="crl") as srv, _client(pki, srv.port) as http:
        before = await http.get("/pki/v1/crl")
        pki.registry.set_agent_status("alpha", AgentStatus.QUARANTINED, actor="test")
        after = await http.get("/pki/v1/crl")
        as_pem = await http.get("/pki/v1/crl.pem")
    assert before.status_code == after.status_code == 200
    assert after.headers["content-type"] == "application/pkix-crl"
    assert x509.load_der_x509_crl(before.content).get_revoked_certificate_by_serial_number(
        first.serial_number
    ) is None  # fmt: skip
    crl = x509.load_der_x509_crl(after.content)
    assert crl.is_signature_valid(pki.ca.current.cert.public_key())  # type: ignore[arg-type]
    assert {r.serial_number for r in crl} == {first.serial_number, second.serial_number}
    assert crl.get_revoked_certificate_by_serial_number(kept.serial_number) is None
    pem_crl = x509.load_pem_x509_crl(as_pem.content)
    assert {r.serial_number for r in pem_crl} == {first.serial_number, second.serial_number}


async def test_bundle_overlaps_during_a_rotation(pki: Pki) -> None:
    old = pki.ca.current.cert
    new = pki.ca.rotate_intermediate(overlap=600).cert
    app = Starlette(routes=PkiEndpoints(pki.service, max_body_bytes=65536).routes())
    ctx = gateway_server_context(pki, require_client_cert=False)
    async with serve(app, ctx, name="bundle") as srv, _client(pki, srv.port) as http:
        bundle = await http.get("/pki/v1/bundle")
        crls = await http.get("/pki/v1/crl.pem")
    assert bundle.headers["content-type"].startswith(PEM_CHAIN)
    assert x509.load_pem_x509_certificates(bundle.content) == [pki.ca.root, new, old]
    marker = b"-----BEGIN X509 CRL-----"
    parsed = [x509.load_pem_x509_crl(marker + part) for part in crls.content.split(marker)[1:]]
    signed_by = {
        ca.serial_number for crl in parsed for ca in (new, old)
        if crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    }  # fmt: skip
    assert signed_by == {new.serial_number, old.serial_number}  # each intermediate's own CRL

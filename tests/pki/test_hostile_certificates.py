"""Certificates built to break the reader: each is a typed, counted, audited refusal, and a
refusal never names an identity no CA signature vouches for."""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aegis.errors import AegisError
from aegis.telemetry.metrics import REGISTRY
from aegis.types import ClientAuthMethod
from tests.gateway.test_ext_authz_forwarded import Pki as DoorPki
from tests.gateway.test_ext_authz_forwarded import cert_call, mtls  # noqa: F401
from tests.pki.conftest import Pki, pki, self_signed_der  # noqa: F401
from tests.pki.forge import forge_leaf
from tests.pki.harness import control_plane, gateway_app
from tests.pki.hostile import duplicate_extension_cert, x400_san_cert


def _pem(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()


def _rejections() -> float:
    return sum(s.value for m in REGISTRY.collect() if m.name == "aegis_mtls_rejections"
               for s in m.samples if s.name == "aegis_mtls_rejections_total")  # fmt: skip


def test_a_repeated_extension_or_an_unreadable_name_is_cert_invalid(pki: Pki) -> None:  # noqa: F811
    """cryptography raises DuplicateExtension and UnsupportedGeneralNameType, which are not
    ValueErrors: both must be the typed refusal, never an error that escapes as a 500."""
    der, _ = duplicate_extension_cert()
    with pytest.raises(AegisError) as info:
        pki.validator.validate(der)
    assert info.value.code == "cert_invalid"
    _, leaf = forge_leaf(pki, record=False)
    with pytest.raises(AegisError) as info:
        pki.validator.validate(x400_san_cert(leaf, pki.ca.current.key))
    assert info.value.code == "cert_invalid"


def test_a_hostile_certificate_at_an_ext_authz_door_is_a_typed_refusal(mtls: DoorPki) -> None:  # noqa: F811
    der, _ = duplicate_extension_cert()
    for url in mtls.door("nginx"):
        resp = cert_call(url, mtls, **{"x-ssl-client-cert": quote(_pem(der))})
        assert (resp.status_code, resp.json()["code"]) == (401, "cert_invalid")


def test_a_certificate_refused_at_an_ext_authz_door_is_counted_and_recorded(mtls: DoorPki) -> None:  # noqa: F811
    serial = format(x509.load_pem_x509_certificate(mtls.pem.encode()).serial_number, "x")
    mtls.pki.store.revoke_serial(serial, "key_compromise")
    before = _rejections()
    for url in mtls.door("nginx"):
        resp = cert_call(url, mtls, **{"x-ssl-client-cert": quote(mtls.pem)})
        assert (resp.status_code, resp.json()["code"]) == (401, "cert_revoked")
    assert _rejections() == before + 1
    log = mtls.services.extras["exchange_audit"]  # the pipeline's audit database
    [record] = log.records(kind="mtls.rejected")
    assert (record["code"], record["serial"]) == ("cert_revoked", serial)


async def test_a_refusal_never_names_an_identity_no_ca_signed(pki: Pki) -> None:  # noqa: F811
    """Mallory's self-signed, expired copy of alpha's serial and SPIFFE ID is refused, and the
    record does not read as alpha presenting its own expired certificate."""
    _, real = pki.key_and_cert("alpha")
    sid = real.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)[0]
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alpha")]))
        .issuer_name(real.issuer).public_key(key.public_key())
        .serial_number(real.serial_number)
        .not_valid_before(now - dt.timedelta(days=2)).not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid)]), False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    audited: list[tuple[str, dict[str, Any]]] = []

    async def audit(kind: str, record: dict[str, Any]) -> None:
        audited.append((kind, record))

    app = gateway_app(pki, name="forged", trusted_proxies=["10.0.0.7"], mode="nginx", audit=audit)
    pem = forged.public_bytes(serialization.Encoding.PEM).decode()
    transport = httpx.ASGITransport(app=app, client=("10.0.0.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="https://gw") as http:
        resp = await http.get("/whoami", headers={"x-ssl-client-cert": quote(pem, safe="")})
    assert (resp.status_code, resp.json()["code"]) == (401, "cert_expired")
    [(kind, record)] = audited
    assert kind == "mtls.rejected"
    assert not record.get("serial") and not record.get("spiffe_id")
    # Alpha's own certificate, expired, would be named: the CA signed what it says.
    past = dt.datetime.now(dt.UTC).timestamp()
    _, expired = forge_leaf(pki, not_before=past - 7200, not_after=past - 3600)
    audited.clear()
    pem = expired.public_bytes(serialization.Encoding.PEM).decode()
    async with httpx.AsyncClient(transport=transport, base_url="https://gw") as http:
        await http.get("/whoami", headers={"x-ssl-client-cert": quote(pem, safe="")})
    [(_, record)] = audited
    assert record["spiffe_id"] == sid


async def test_a_self_signed_key_of_an_unknown_algorithm_is_invalid_client(pki: Pki) -> None:  # noqa: F811
    client, _ = pki.registry.create_client(
        "alpha", auth_method=ClientAuthMethod.SELF_SIGNED_TLS_CLIENT_AUTH, actor="t"
    )
    der = self_signed_der(ec.generate_private_key(ec.SECP256R1()))
    der = der.replace(bytes.fromhex("06072a8648ce3d0201"), bytes.fromhex("06072a8648ce3d0209"))
    cp = control_plane(pki, name="unknown-key", trusted_proxies=["10.0.0.7"], mode="nginx")
    transport = httpx.ASGITransport(app=cp.app, client=("10.0.0.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="https://aegis.example.org") as http:
        resp = await http.post(
            "/oauth/token",
            data={"grant_type": "client_credentials", "client_id": client.client_id},
            headers={"x-ssl-client-cert": quote(_pem(der), safe="")},
        )
    assert (resp.status_code, resp.json()["error"]) == (401, "invalid_client")

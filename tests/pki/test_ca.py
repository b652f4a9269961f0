"""The internal CA: key storage, the agent certificate profile, enrolment, revocation, rotation."""

from __future__ import annotations

import base64
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from starlette.applications import Starlette

from aegis.clock import FrozenClock
from aegis.errors import AegisError, ClientAuthError, Conflict
from aegis.pki.api import PkiEndpoints
from aegis.pki.ca import CaFiles, CertificateAuthority
from aegis.pki.peer import TrustBundle
from aegis.pki.profile import x5t_s256
from aegis.pki.service import PkiService
from aegis.pki.spiffe import check_leaf_svid
from aegis.pki.tls import client_context, server_context
from aegis.sdk.revocation import ServerRevocations, guard_server
from aegis.types import AgentStatus, TenantStatus
from tests.pki.conftest import TRUST_DOMAIN, Pki, build_pki, make_csr


def test_init_writes_encrypted_keys_and_refuses_to_overwrite(pki: Pki) -> None:
    files = pki.ca.files
    for path in (files.root_key, files.key):
        pem = path.read_bytes()
        assert b"BEGIN ENCRYPTED PRIVATE KEY" in pem
        assert path.stat().st_mode & 0o077 == 0
        with pytest.raises(TypeError):
            serialization.load_pem_private_key(pem, password=None)
    with pytest.raises(Conflict, match="already exists"):
        CertificateAuthority.init(files, pki.kek, pki.clock, TRUST_DOMAIN)
    with pytest.raises(AegisError, match="cannot be decrypted"):
        CertificateAuthority(files, b"\x01" * 32, pki.clock, TRUST_DOMAIN)


def test_ca_certificates_are_p256_cas_with_path_limits(pki: Pki) -> None:
    root, inter = pki.ca.root, pki.ca.current.cert
    for cert, path_len in ((root, 1), (inter, 0)):
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical
        assert bc.value.ca
        assert bc.value.path_length == path_len
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert ku.key_cert_sign
        assert ku.crl_sign
    assert inter.issuer == root.subject
    assert inter.not_valid_after_utc <= root.not_valid_after_utc


def test_root_key_can_be_kept_offline(pki: Pki, tmp_path: Path) -> None:
    offline = tmp_path / "offline-root.key.pem"
    pki.ca.files.root_key.rename(offline)
    ca = CertificateAuthority(pki.ca.files, pki.kek, pki.clock, TRUST_DOMAIN)
    key = ec.generate_private_key(ec.SECP256R1())
    assert (
        pki.service.issue("alpha", key.public_key()).certificate.issuer == ca.current.cert.subject
    )
    with pytest.raises(AegisError, match="does not exist"):
        ca.rotate_intermediate(overlap=3600)


def test_agent_certificate_profile(pki: Pki) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = pki.service.issue("alpha", key.public_key())
    cert = issued.certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/tenant/t1/env/prod/agent/alpha"
    ]
    assert len(list(san)) == 1
    assert check_leaf_svid(cert, TRUST_DOMAIN, eku=ExtendedKeyUsageOID.CLIENT_AUTH).agent == "alpha"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature
    assert not ku.key_cert_sign
    assert not ku.crl_sign
    life = cert.not_valid_after_utc.timestamp() - cert.not_valid_before_utc.timestamp()
    assert 3600 <= life <= 3600 + 11  # default 1 h, backdated by at most 10 s
    assert issued.record.x5t_s256 == x5t_s256(cert)
    assert pki.store.get(issued.record.serial) == issued.record


def test_serving_agents_also_get_server_auth(pki: Pki) -> None:
    pki.registry.update_agent("gamma", actor="test", roles=("server",))
    cert = pki.key_and_cert("gamma")[1]
    ekus = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert ekus == [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]


def test_lifetime_is_capped_and_never_beyond_the_issuer(tmp_path: Path) -> None:
    clock = FrozenClock(1_800_000_000)
    pki = build_pki(tmp_path, clock)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = pki.service.issue("alpha", key.public_key(), lifetime=10**9).certificate
    assert cert.not_valid_after_utc.timestamp() == clock.now() + pki.config.pki.leaf_max_lifetime
    clock.set(pki.ca.not_after_cap() - 100)
    cert = pki.service.issue("alpha", key.public_key()).certificate
    assert cert.not_valid_after_utc == pki.ca.current.cert.not_valid_after_utc
    clock.set(pki.ca.not_after_cap() + 1)
    with pytest.raises(AegisError, match="expired"):
        pki.service.issue("alpha", key.public_key())


def test_inactive_agents_get_nothing(pki: Pki) -> None:
    pki.registry.set_agent_status("alpha", AgentStatus.SUSPENDED, actor="test")
    with pytest.raises(Conflict, match="suspended"):
        pki.key_and_cert("alpha")
    with pytest.raises(ClientAuthError, match="not registered"):
        pki.key_and_cert("nobody")


@pytest.mark.parametrize(
    ("csr", "words"),
    [
        (b"", "csr is empty"),
        (b"hello", "exactly one PEM block"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "not a valid DER",
        ),
        ("two", "exactly one PEM block"),
        ("tampered", "signature does not verify"),
        ("rsa1024", "at least 2048 bits"),
        ("p521", "not allowed"),
        (b"x" * 20000, "larger than"),
    ],
)
def test_malformed_csrs_say_what_is_wrong_and_issue_nothing(
    pki: Pki, csr: bytes | str, words: str
) -> None:
    if csr == "two":
        csr = make_csr()[1] + make_csr()[1]
    elif csr == "tampered":
        der = bytearray(
            x509.load_pem_x509_csr(make_csr()[1]).public_bytes(serialization.Encoding.DER)
        )
        der[-5] ^= 0x01  # inside the signature
        csr = (
            b"-----BEGIN CERTIFICATE REQUEST-----\n"
            + base64.encodebytes(bytes(der))
            + b"-----END CERTIFICATE REQUEST-----\n"
        )
    elif csr == "rsa1024":
        csr = _csr_for(rsa.generate_private_key(65537, 1024))
    elif csr == "p521":
        csr = _csr_for(ec.generate_private_key(ec.SECP521R1()))
    client_id, secret = pki.secrets["alpha"]
    status, body = _post_sign(
        pki, {"csr": csr.decode() if isinstance(csr, bytes) else csr}, (client_id, secret)
    )
    assert status == 400
    assert body["code"] == "csr_invalid"
    assert words in body["error_description"]
    assert pki.store.for_agent("alpha") == []


def _csr_for(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
) -> bytes:
    from cryptography.hazmat.primitives import hashes

    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, algo)
    return csr.public_bytes(serialization.Encoding.PEM)


def _post_sign(
    pki: Pki, form: dict[str, str], basic: tuple[str, str] | None = None
) -> tuple[int, dict[str, str]]:
    import asyncio

    app = Starlette(routes=PkiEndpoints(pki.service, max_body_bytes=64 * 1024).routes())

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.post("/pki/v1/sign", data=form, auth=basic)

    response = asyncio.run(go())
    return response.status_code, response.json()


def test_sign_with_client_credentials(pki: Pki) -> None:
    key, csr = make_csr()
    # The CSR asks for another identity; the certificate names the authenticated agent anyway.
    status, body = _post_sign(pki, {"csr": csr.decode()}, pki.secrets["alpha"])
    assert status == 201, body
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    assert body["spiffe_id"] == "spiffe://example.org/tenant/t1/env/prod/agent/alpha"
    assert cert.public_key() == key.public_key()
    assert x509.load_pem_x509_certificate(body["chain"].encode()) == pki.ca.current.cert
    assert body["x5t#S256"] == x5t_s256(cert)


def test_sign_refuses_wrong_credentials_and_writes_nothing(pki: Pki) -> None:
    client_id, _ = pki.secrets["alpha"]
    status, body = _post_sign(pki, {"csr": make_csr()[1].decode()}, (client_id, "aegis_cs_wrong"))
    assert (status, body["code"]) == (401, "invalid_client")
    status, body = _post_sign(pki, {"csr": make_csr()[1].decode()})
    assert (status, body["code"]) == (401, "invalid_client")
    assert pki.store.for_agent("alpha") == []


def test_bootstrap_token_is_single_use_and_expires(tmp_path: Path) -> None:
    clock = FrozenClock(1_800_000_000)
    pki = build_pki(tmp_path, clock)
    token = pki.service.new_bootstrap_token("beta", lifetime=60)
    assert token.startswith("aegis_bt_")
    status, body = _post_sign(pki, {"csr": make_csr()[1].decode(), "bootstrap_token": token})
    assert status == 201
    assert body["spiffe_id"].endswith("/tenant/t2/env/prod/agent/beta")
    status, body = _post_sign(pki, {"csr": make_csr()[1].decode(), "bootstrap_token": token})
    assert (status, body["code"]) == (401, "invalid_client")
    late = pki.service.new_bootstrap_token("beta", lifetime=60)
    clock.advance(61)
    status, body = _post_sign(pki, {"csr": make_csr()[1].decode(), "bootstrap_token": late})
    assert (status, body["code"]) == (401, "invalid_client")
    # A malformed CSR does not spend the token.
    fresh = pki.service.new_bootstrap_token("beta", lifetime=60)
    assert _post_sign(pki, {"csr": "junk", "bootstrap_token": fresh})[0] == 400
    assert _post_sign(pki, {"csr": make_csr()[1].decode(), "bootstrap_token": fresh})[0] == 201
    assert token not in (tmp_path / "pki.db").read_bytes().decode("latin-1")


def test_a_suspension_ends_earlier_bootstrap_tokens_and_certificates(tmp_path: Path) -> None:
    """As with tokens: what ended the agent's credentials ends the enrolment tokens and the
    certificates made before it, even once the agent (or its tenant) is active again."""
    clock = FrozenClock(1_800_000_000)
    pki = build_pki(tmp_path, clock)
    token = pki.service.new_bootstrap_token("beta", lifetime=600)
    _, cert = pki.key_and_cert("beta")
    der = cert.public_bytes(serialization.Encoding.DER)
    clock.advance(1)
    pki.registry.set_agent_status("beta", AgentStatus.QUARANTINED, actor="admin")
    clock.advance(1)
    pki.registry.set_agent_status("beta", AgentStatus.ACTIVE, actor="admin")
    status, body = _post_sign(pki, {"csr": make_csr()[1].decode(), "bootstrap_token": token})
    assert (status, body["code"]) == (401, "invalid_client")
    with pytest.raises(AegisError) as refused:
        pki.validator.validate(der)
    assert refused.value.code == "cert_revoked"
    # The tenant's suspension ends them too, and reactivating the tenant does not revive them.
    _, fresh = pki.key_and_cert("alpha")
    fresh_der = fresh.public_bytes(serialization.Encoding.DER)
    assert pki.validator.validate(fresh_der).agent_id == "alpha"
    clock.advance(1)
    pki.registry.set_tenant_status("t1", TenantStatus.SUSPENDED, actor="admin")
    pki.registry.set_tenant_status("t1", TenantStatus.ACTIVE, actor="admin")
    with pytest.raises(AegisError) as refused:
        pki.validator.validate(fresh_der)
    assert refused.value.code == "cert_revoked"


def test_leaving_active_revokes_every_certificate_in_the_crl(pki: Pki) -> None:
    serials = {
        x509.load_der_x509_certificate(
            pki.key_and_cert("alpha")[1].public_bytes(serialization.Encoding.DER)
        ).serial_number
        for _ in range(2)
    }
    other = pki.key_and_cert("beta")[1].serial_number
    pki.registry.set_agent_status("alpha", AgentStatus.QUARANTINED, actor="test")
    crl = x509.load_der_x509_crl(pki.service.crl_der())
    assert crl.is_signature_valid(pki.ca.current.cert.public_key())  # type: ignore[arg-type]
    assert {r.serial_number for r in crl} == serials
    assert other not in {r.serial_number for r in crl}
    assert crl.next_update_utc is not None
    assert crl.last_update_utc is not None
    assert (crl.next_update_utc - crl.last_update_utc).total_seconds() <= 301
    reasons = {r.extensions.get_extension_for_class(x509.CRLReason).value.reason for r in crl}
    assert reasons == {x509.ReasonFlags.privilege_withdrawn}


def test_a_tenant_leaving_active_revokes_its_agents_certificates(tmp_path: Path) -> None:
    """Every live certificate of every agent of the tenant is revoked (listed in the CRL, the
    revocation mark moved, so gateways renew pooled upstream connections); another tenant's
    certificates stay live."""
    pki = build_pki(tmp_path, FrozenClock(1_800_000_000))
    serial = lambda agent: pki.key_and_cert(agent)[1].serial_number  # noqa: E731
    ours, theirs = {serial("alpha"), serial("gamma")}, serial("beta")
    pki.clock.advance(1)  # type: ignore[attr-defined]
    before = pki.store.revocation_mark()
    pki.registry.set_tenant_status("t1", TenantStatus.SUSPENDED, actor="test")
    assert pki.store.revocation_mark() != before
    crl = x509.load_der_x509_crl(pki.service.crl_der())
    assert {r.serial_number for r in crl} == ours
    reasons = {r.extensions.get_extension_for_class(x509.CRLReason).value.reason for r in crl}
    assert reasons == {x509.ReasonFlags.privilege_withdrawn}
    record = pki.store.lookup(format(theirs, "x"))
    assert record is not None and record.revoked_at is None
    # Reactivating the tenant revokes nothing more and revives nothing.
    pki.registry.set_tenant_status("t1", TenantStatus.ACTIVE, actor="test")
    assert {r.serial_number for r in x509.load_der_x509_crl(pki.service.crl_der())} == ours


def _listed(pki: Pki) -> set[int]:
    return {r.serial_number for r in x509.load_der_x509_crl(pki.service.crl_der())}


def test_withdrawing_the_serving_role_revokes_the_agents_certificates(tmp_path: Path) -> None:
    """The gateway's own agent `gw` serves; its certificates carry serverAuth. Withdrawing the
    role (role `server`, or attribute `serving: true`) revokes them in the store: listed in the
    CRL that nginx, Envoy and the SDK's server checks read, and the revocation mark moves, so
    gateway connections pooled to the tool renew. A change that keeps the role revokes nothing."""
    pki = build_pki(tmp_path, FrozenClock(1_800_000_000))
    served, kept = pki.key_and_cert("gw")[1], pki.key_and_cert("alpha")[1]
    assert (
        ExtendedKeyUsageOID.SERVER_AUTH
        in served.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    mark = pki.store.revocation_mark()
    pki.registry.update_agent("gw", actor="t", display_name="the gateway", roles=("server", "x"))
    assert pki.store.revocation_mark() == mark and _listed(pki) == set()
    pki.clock.advance(1)  # type: ignore[attr-defined]
    pki.registry.update_agent("gw", actor="t", roles=("x",))
    assert pki.store.revocation_mark() != mark
    assert _listed(pki) == {served.serial_number}
    assert pki.store.get(format(served.serial_number, "x")).revocation_reason == (
        "privilege_withdrawn"
    )
    record = pki.store.get(format(kept.serial_number, "x"))
    assert record is not None and record.revoked_at is None
    # Enrolled again, it gets a client certificate only; the attribute serves as the role does.
    again = pki.key_and_cert("gw")[1]
    usage = again.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH not in usage
    pki.registry.update_agent("gw", actor="t", attributes={"serving": True})
    serving = pki.key_and_cert("gw")[1]
    pki.registry.update_agent("gw", actor="t", attributes={})
    assert _listed(pki) == {served.serial_number, again.serial_number, serving.serial_number}


def test_removing_an_agents_key_revokes_its_certificates(tmp_path: Path) -> None:
    """Removing a key (one that signs client assertions) ends every earlier token of the agent;
    which key enrolled a certificate is not recorded, so its certificates end too, in the store
    and the CRL, not only in Aegis's own validator. Adding a key ends nothing."""
    from aegis.crypto.keys import Ed25519SigningKey

    pki = build_pki(tmp_path, FrozenClock(1_800_000_000))
    first, second = (Ed25519SigningKey.generate().public.to_jwk() for _ in range(2))
    pki.registry.update_agent("alpha", actor="t", jwks=(first,))
    cert = pki.key_and_cert("alpha")[1]
    pki.registry.update_agent("alpha", actor="t", jwks=(first, second))
    assert _listed(pki) == set()
    pki.clock.advance(1)  # type: ignore[attr-defined]
    mark = pki.store.revocation_mark()
    pki.registry.update_agent("alpha", actor="t", jwks=(second,))
    assert pki.store.revocation_mark() != mark
    assert _listed(pki) == {cert.serial_number}
    pki.cache.invalidate()
    with pytest.raises(AegisError) as info:
        pki.validator.validate(cert.public_bytes(serialization.Encoding.DER))
    assert info.value.code == "cert_revoked"
    pki.clock.advance(1)  # type: ignore[attr-defined]
    fresh = pki.key_and_cert("alpha")[1]  # enrolled again: good
    assert pki.validator.validate(fresh.public_bytes(serialization.Encoding.DER)).agent_id == (
        "alpha"
    )


@pytest.mark.parametrize("change", ["role", "key"])
def test_an_update_whose_revocation_fails_is_not_made_and_its_retry_revokes(
    tmp_path: Path, change: str
) -> None:
    """The certificate store cannot answer when a serving role is withdrawn or a key removed:
    the update is refused and not made (made, its retry would change nothing and so revoke
    nothing); the retry revokes, and the CRL lists the certificate."""
    from aegis.crypto.keys import Ed25519SigningKey
    from aegis.errors import Unavailable

    pki = build_pki(tmp_path, FrozenClock(1_800_000_000))
    fields: dict[str, Any] = {"roles": ()}
    if change == "key":
        pki.registry.update_agent(
            "gw", actor="t", jwks=(Ed25519SigningKey.generate().public.to_jwk(),)
        )
        fields = {"jwks": ()}
    served = pki.key_and_cert("gw")[1]
    pki.clock.advance(1)  # type: ignore[attr-defined]
    real = pki.store.revoke_agent
    calls: list[str] = []

    def failing_once(agent_id: str, reason: str) -> Any:
        calls.append(agent_id)
        if len(calls) == 1:
            raise Unavailable("the certificate store cannot answer", code="registry_unavailable")
        return real(agent_id, reason)

    pki.store.revoke_agent = failing_once  # type: ignore[method-assign]
    before = pki.registry.store.get_agent("gw")
    with pytest.raises(Unavailable):
        pki.registry.update_agent("gw", actor="admin", **fields)
    assert pki.registry.store.get_agent("gw") == before  # not made
    assert served.serial_number not in _listed(pki)
    pki.registry.update_agent("gw", actor="admin", **fields)
    assert served.serial_number in _listed(pki)


def test_enrolment_after_a_key_removal_and_while_a_mark_lies_ahead(tmp_path: Path) -> None:
    """A bootstrap token made just after a key removal enrols (the mark is the removal's
    instant). While a mark lies ahead (set on a replica whose clock runs ahead) nothing is
    enrolled that it would end: 503 `credentials_settling`, nothing single-use spent."""
    from dataclasses import replace

    from aegis.crypto.keys import Ed25519SigningKey

    clock = FrozenClock(1_800_000_000)
    pki = build_pki(tmp_path, clock)
    old, new = Ed25519SigningKey.generate(), Ed25519SigningKey.generate()
    pki.registry.update_agent("beta", actor="op", jwks=[old.public.to_jwk(), new.public.to_jwk()])
    clock.advance(10)
    pki.registry.update_agent("beta", actor="op", jwks=[new.public.to_jwk()])
    clock.advance(0.1)
    token = pki.service.new_bootstrap_token("beta", lifetime=600)
    clock.advance(30)
    status, body = _post_sign(pki, {"csr": make_csr()[1].decode(), "bootstrap_token": token})
    assert status == 201, body
    stored = pki.registry.store.get_agent("beta")
    pki.registry.store.update_agent(replace(stored, tokens_not_before=clock.now() + 2.5))
    with pytest.raises(AegisError) as info:
        pki.service.new_bootstrap_token("beta", lifetime=600)
    assert (info.value.code, info.value.details["retry_after"]) == ("credentials_settling", 3)
    status, body = _post_sign(pki, {"csr": make_csr()[1].decode()}, pki.secrets["beta"])
    assert (status, body["code"]) == (503, "credentials_settling"), body
    clock.advance(3)
    status, body = _post_sign(pki, {"csr": make_csr()[1].decode()}, pki.secrets["beta"])
    assert status == 201, body


@pytest.mark.parametrize("change", [{"roles": ()}, "key"])
def test_a_certificate_issued_while_its_agent_changes_is_revoked(
    tmp_path: Path, change: Any
) -> None:
    """The agent was read before the update committed, the record written after the update's
    listener revoked the agent's certificates: the issuer reads the agent again once the record
    is there, revokes the certificate and refuses."""
    from aegis.crypto.keys import Ed25519SigningKey

    pki = build_pki(tmp_path, FrozenClock(1_800_000_000))
    key = Ed25519SigningKey.generate().public.to_jwk()
    pki.registry.update_agent("gw", actor="t", jwks=(key,))
    pki.clock.advance(1)  # type: ignore[attr-defined]
    fields = {"jwks": ()} if change == "key" else change
    real_record = pki.store.record
    made: list[Any] = []

    def record_after_update(rec: Any) -> None:
        pki.clock.advance(1)  # type: ignore[attr-defined]
        pki.registry.update_agent("gw", actor="admin", **fields)  # its listener runs now
        real_record(rec)
        made.append(rec)

    pki.store.record = record_after_update  # type: ignore[method-assign]
    try:
        with pytest.raises(Conflict, match="was changed while its certificate was issued"):
            pki.service.issue("gw", ec.generate_private_key(ec.SECP256R1()).public_key())
    finally:
        pki.store.record = real_record  # type: ignore[method-assign]
    [rec] = made
    assert pki.store.get(rec.serial).revocation_reason == "privilege_withdrawn"
    assert int(rec.serial, 16) in _listed(pki)


def test_rotation_keeps_both_intermediates_in_the_bundle_during_overlap(tmp_path: Path) -> None:
    clock = FrozenClock(1_800_000_000)
    pki = build_pki(tmp_path, clock)
    old = pki.ca.current.cert
    old_leaf = pki.key_and_cert("alpha")[1]
    new = pki.ca.rotate_intermediate(overlap=3600).cert
    bundle = x509.load_pem_x509_certificates(pki.ca.bundle_pem())
    assert bundle == [pki.ca.root, new, old]
    assert pki.key_and_cert("alpha")[1].issuer == new.subject
    pki.bundle.replace(pki.ca.bundle_pem())
    der = old_leaf.public_bytes(serialization.Encoding.DER)
    assert pki.validator.validate(der).agent_id == "alpha"  # old leaves still verify
    assert pki.service.crl_pem().count(b"-----BEGIN X509 CRL-----") == 2
    clock.advance(3601)
    reloaded = CertificateAuthority(CaFiles.from_config(pki.config), pki.kek, clock, TRUST_DOMAIN)
    assert x509.load_pem_x509_certificates(reloaded.bundle_pem()) == [pki.ca.root, new]
    pki.bundle.replace(reloaded.bundle_pem())
    with pytest.raises(AegisError) as info:
        pki.validator.validate(der)
    assert info.value.code in ("cert_untrusted", "cert_expired")


def test_bundle_must_have_a_root(pki: Pki) -> None:
    with pytest.raises(AegisError, match="not pem"):
        TrustBundle(b"")
    with pytest.raises(AegisError, match="no root"):
        TrustBundle(pki.ca.current.cert.public_bytes(serialization.Encoding.PEM))


def test_a_running_service_follows_a_rotation_made_by_another_process(tmp_path: Path) -> None:
    """`aegis ca rotate` runs in its own process: the running control plane and gateway must
    start signing with the new intermediate, trust both during the overlap, then only the new."""
    clock = FrozenClock(1_800_000_000)
    pki = build_pki(tmp_path, clock)
    validator = pki.service.validator()
    old = pki.ca.current.cert
    old_leaf = pki.key_and_cert("alpha")[1]
    elsewhere = CertificateAuthority(CaFiles.from_config(pki.config), pki.kek, clock, TRUST_DOMAIN)
    new = elsewhere.rotate_intermediate(overlap=600).cert
    clock.advance(PkiService.REFRESH_INTERVAL)
    new_leaf = pki.key_and_cert("alpha")[1]
    new_leaf.verify_directly_issued_by(new)  # signed by the new intermediate, not the old one
    assert x509.load_pem_x509_certificates(pki.service.bundle_pem()) == [pki.ca.root, new, old]
    der = serialization.Encoding.DER
    for leaf in (old_leaf, new_leaf):
        assert validator.validate(leaf.public_bytes(der)).agent_id == "alpha"
    assert pki.service.crl_pem().count(b"-----BEGIN X509 CRL-----") == 2
    clock.advance(600)  # the overlap ends: the old intermediate is no longer trusted anywhere
    with pytest.raises(AegisError) as info:
        validator.validate(old_leaf.public_bytes(der))
    assert info.value.code == "cert_untrusted"
    assert validator.validate(new_leaf.public_bytes(der)).agent_id == "alpha"
    assert pki.service.crl_pem().count(b"-----BEGIN X509 CRL-----") == 1


def test_disabling_the_enrolling_client_ends_its_certificates(pki: Pki) -> None:
    """A leaked secret enrolled a certificate; disabling its client (the answer to the leak)
    ends that certificate as it ends the client's tokens (the validator refuses it, so it
    authenticates no tls_client_auth client either), and for good: enabling the client again
    does not revive it. A certificate another client enrolled stays good."""
    leaked, secret = pki.secrets["alpha"]
    other, other_secret = pki.registry.create_client("alpha", actor="t")
    assert other_secret is not None
    status, body = _post_sign(pki, {"csr": make_csr()[1].decode()}, (leaked, secret))
    assert status == 201, body
    stolen, stolen_serial = (
        x509.load_pem_x509_certificate(body["certificate"].encode()),
        body["serial"],
    )
    status, body = _post_sign(pki, {"csr": make_csr()[1].decode()}, (other.client_id, other_secret))
    kept = x509.load_pem_x509_certificate(body["certificate"].encode())
    der, kept_der = (c.public_bytes(serialization.Encoding.DER) for c in (stolen, kept))
    assert pki.store.get(body["serial"]).enrolled_by == other.client_id
    pki.validator.validate(der)
    mark = pki.store.revocation_mark()
    pki.registry.set_client_active(leaked, False, actor="t")
    pki.cache.invalidate()
    with pytest.raises(AegisError) as info:
        pki.validator.validate(der)
    assert info.value.code == "cert_revoked"
    # Revoked in the store, so in the CRL every peer that checks only the chain and the CRL
    # (nginx, Envoy, the SDK's server checks) reads, and the mark pooled connections follow.
    assert pki.store.get(stolen_serial).revocation_reason == "privilege_withdrawn"
    listed = {r.serial_number for r in x509.load_der_x509_crl(pki.service.crl_der())}
    assert stolen.serial_number in listed and kept.serial_number not in listed
    assert pki.store.revocation_mark() != mark
    pki.registry.set_client_active(leaked, True, actor="t")
    pki.cache.invalidate()
    with pytest.raises(AegisError):
        pki.validator.validate(der)
    assert pki.validator.validate(kept_der).agent_id == "alpha"


def test_a_certificate_enrolled_while_its_client_is_disabled_is_revoked(pki: Pki) -> None:
    """The client was checked before the disable committed, the record written after the
    disable's listener revoked what the client had enrolled: the issuer reads the client again
    once the record is there, revokes the certificate and refuses."""
    client_id, _ = pki.secrets["alpha"]
    real_record = pki.store.record
    made: list[Any] = []

    def record_after_disable(rec: Any) -> None:
        pki.registry.set_client_active(client_id, False, actor="admin")  # its listener runs now
        real_record(rec)
        made.append(rec)

    pki.store.record = record_after_disable  # type: ignore[method-assign]
    try:
        with pytest.raises(Conflict, match="disabled while its certificate was issued"):
            pki.service.issue(
                "alpha", ec.generate_private_key(ec.SECP256R1()).public_key(),
                via="client_secret", client_id=client_id,
            )  # fmt: skip
    finally:
        pki.store.record = real_record  # type: ignore[method-assign]
    [rec] = made
    assert pki.store.get(rec.serial).revocation_reason == "privilege_withdrawn"
    listed = {r.serial_number for r in x509.load_der_x509_crl(pki.service.crl_der())}
    assert int(rec.serial, 16) in listed


def test_a_server_certificate_enrolled_with_a_disabled_client_fails_the_sdks_checks(
    pki: Pki,
) -> None:
    """Over real TLS: a serving agent's secret leaked, the thief enrolled a serving certificate,
    and the operator disabled the client. An agent pinning the server's SPIFFE ID and checking
    the CA's CRL refuses the handshake before it sends a credential."""
    client_id, secret = pki.secrets["gw"]
    key, csr = make_csr()
    status, body = _post_sign(pki, {"csr": csr.decode()}, (client_id, secret))
    assert status == 201, body
    stolen = x509.load_pem_x509_certificate(body["certificate"].encode())
    pki.registry.set_client_active(client_id, False, actor="t")
    bundle = pki.ca.bundle_pem()
    revocations = ServerRevocations("https://control-plane.invalid", bundle)
    revocations.load(pki.service.crl_pem())
    pem = serialization.Encoding.PEM
    chain = stolen.public_bytes(pem) + pki.ca.current.cert.public_bytes(pem)
    server = server_context(chain, key, bundle, require_client_cert=False)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    agent = guard_server(client_context(None, None, bundle), (body["spiffe_id"],), revocations)
    try:
        with (
            pytest.raises(ssl.SSLCertVerificationError),
            socket.create_connection(listener.getsockname(), timeout=5) as raw,
            agent.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"a client secret would go here")
    finally:
        listener.close()
        thread.join(5)


def test_an_agent_no_longer_serving_does_not_pass_as_a_server(pki: Pki) -> None:
    """The usage is in the certificate, the role in the registry: an agent whose server role is
    withdrawn is refused as a server (an upstream) on the certificate it got before, by the
    registry check alone (here without the revocation the CA's listener makes, as where the
    update is made by a process that has not opened the CA), and passes as a client still."""
    _, cert = pki.key_and_cert("gw")  # registered with role server: serverAuth and clientAuth
    der = cert.public_bytes(serialization.Encoding.DER)
    upstream = pki.service.validator(eku=ExtendedKeyUsageOID.SERVER_AUTH)
    assert upstream.validate(der).agent_id == "gw"
    pki.registry.update_listeners.clear()
    pki.registry.update_agent("gw", actor="test", roles=())
    pki.cache.invalidate()
    with pytest.raises(AegisError) as info:
        upstream.validate(der)
    assert info.value.code == "cert_wrong_usage" and "no longer registered as serving" in str(
        info.value.message
    )
    assert pki.validator.validate(der).agent_id == "gw"
    pki.registry.update_agent("gw", actor="test", attributes={"serving": True})
    pki.cache.invalidate()
    assert upstream.validate(der).agent_id == "gw"

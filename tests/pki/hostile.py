"""Certificates built to break the reader: a repeated extension, a general name of an
unsupported type."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _len(len(body)) + body


def resign(tbs: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A Certificate SEQUENCE around ``tbs`` signed with ecdsa-with-SHA256."""
    alg = _tlv(0x30, _tlv(0x06, bytes.fromhex("2a8648ce3d040302")))
    sig = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _tlv(0x30, tbs + alg + _tlv(0x03, b"\x00" + sig))


def duplicate_extension_cert(
    uri: str = "spiffe://example.org/tenant/t1/env/prod/agent/alpha",
) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A self-signed certificate carrying the same extension OID twice (RFC 5280 §4.2 forbids it).
    Built with two private OIDs of equal length, then one is patched to equal the other."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostile")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4.5.6.7"), b"\x05\x00"),
            critical=False,
        )
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4.5.6.8"), b"\x05\x00"),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    tbs = cert.tbs_certificate_bytes
    enc_a = bytes.fromhex("2a0304050607")
    enc_b = bytes.fromhex("2a0304050608")
    assert tbs.count(enc_b) == 1
    tbs = tbs.replace(enc_b, enc_a)
    return resign(tbs, key), key


def x400_san_cert(leaf: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> bytes:
    """``leaf`` re-signed by the CA key with its URI SAN retagged as x400Address ([3]):
    cryptography raises UnsupportedGeneralNameType (an Exception, not a ValueError)."""
    tbs = leaf.tbs_certificate_bytes
    uri = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    raw = uri.get_values_for_type(x509.UniformResourceIdentifier)[0].encode()
    i = tbs.find(b"\x86" + bytes([len(raw)]) + raw)
    assert i > 0
    return resign(tbs[:i] + b"\xa3" + tbs[i + 1 :], ca_key)

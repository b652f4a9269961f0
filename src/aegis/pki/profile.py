"""The agent certificate profile (RFC 5280 §4.2, X509-SVID spec), CRLs (RFC 5280 §5), CSR checks
(RFC 2986).

Everything about an agent certificate is decided here, by the CA, from the registry: the CSR
contributes its public key and nothing else. Subjects and SANs asked for in a CSR are ignored.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aegis.errors import AegisError, InvalidRequest
from aegis.types import Agent

__all__ = [
    "MAX_CSR_BYTES",
    "OPERATOR_REASONS",
    "LeafRequest",
    "build_crl",
    "build_leaf",
    "is_serving",
    "parse_csr",
    "revocation_reason",
    "serial_hex",
    "x5t_s256",
]

#: A PEM CSR for a P-256, P-384, Ed25519 or RSA-4096 key fits well within this.
MAX_CSR_BYTES: Final = 16 * 1024
_PEM_CSR: Final = re.compile(
    rb"\A\s*-----BEGIN CERTIFICATE REQUEST-----\r?\n[A-Za-z0-9+/=\r\n]+"
    rb"-----END CERTIFICATE REQUEST-----\s*\Z"
)
#: Keys TLS stacks (OpenSSL, BoringSSL, rustls, Go) accept for client certificates.
_CURVES: Final = (ec.SECP256R1, ec.SECP384R1)
_MIN_RSA_BITS: Final = 2048
AgentKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


def _csr_error(message: str) -> AegisError:
    return AegisError(message, code="csr_invalid")


def parse_csr(pem: bytes | str) -> AgentKey:
    """Check a PEM CSR and return its public key; raise ``csr_invalid`` saying what is wrong."""
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    if not data.strip():
        raise _csr_error("csr is empty; send one PEM certificate request")
    if len(data) > MAX_CSR_BYTES:
        raise _csr_error(f"csr is larger than {MAX_CSR_BYTES} bytes")
    if not _PEM_CSR.match(data):
        raise _csr_error(
            "csr must be exactly one PEM block between -----BEGIN CERTIFICATE REQUEST----- "
            "and -----END CERTIFICATE REQUEST-----"
        )
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise _csr_error("csr is not a valid DER certificate request inside its PEM") from exc
    try:
        key = csr.public_key()
    except (ValueError, x509.UnsupportedGeneralNameType) as exc:
        raise _csr_error("csr public key cannot be read") from exc
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _CURVES):
            raise _csr_error(f"csr key curve {key.curve.name} is not allowed; use P-256 or P-384")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise _csr_error(f"csr rsa key must have at least {_MIN_RSA_BITS} bits")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise _csr_error("csr key type is not allowed; use P-256 (recommended), P-384 or Ed25519")
    if not csr.is_signature_valid:
        raise _csr_error("csr signature does not verify; sign it with the key it carries")
    return key


@dataclass(frozen=True, slots=True)
class LeafRequest:
    """One agent certificate to sign. Every field comes from the registry or the CA's rules."""

    public_key: AgentKey
    spiffe_id: str
    agent_id: str
    tenant_id: str
    #: Validity window, already capped to the issuer's own ``not_after``.
    not_before: float
    not_after: float
    #: Add serverAuth to clientAuth (agents registered as serving).
    server: bool = False
    #: Test fixtures only build deliberately broken certificates; the CA never sets these.
    serial: int | None = None


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(int(t), tz=UTC)


def build_leaf(
    req: LeafRequest, issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    ekus = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] * req.server)
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, req.tenant_id),
            x509.NameAttribute(NameOID.COMMON_NAME, req.agent_id),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(req.public_key)
        .serial_number(req.serial or x509.random_serial_number())
        .not_valid_before(_dt(req.not_before))
        .not_valid_after(_dt(req.not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(req.public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(req.spiffe_id)]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(req.public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    return builder.sign(issuer_key, hashes.SHA256())


def x5t_s256(cert: x509.Certificate | bytes) -> str:
    """RFC 8705 §3.1: base64url (no padding) SHA-256 of the DER certificate."""
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


#: Registry statuses and operator reasons as CRL reason codes (RFC 5280 §5.3.1).
_REASONS: Final = {
    "suspended": x509.ReasonFlags.privilege_withdrawn,
    "quarantined": x509.ReasonFlags.privilege_withdrawn,
    "retired": x509.ReasonFlags.cessation_of_operation,
    "key_compromise": x509.ReasonFlags.key_compromise,
    "ca_compromise": x509.ReasonFlags.ca_compromise,
    "affiliation_changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
    "privilege_withdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aa_compromise": x509.ReasonFlags.aa_compromise,
}
#: The reasons an operator may give (RFC 5280 §5.3.1, without certificateHold and
#: removeFromCRL, which this CA's revocations never are); ``unspecified`` puts no reason code
#: in the CRL entry, as §5.3.1 asks.
OPERATOR_REASONS: Final = (
    *("unspecified", "key_compromise", "ca_compromise", "affiliation_changed", "superseded"),
    *("cessation_of_operation", "privilege_withdrawn", "aa_compromise"),
)
_SPELLINGS: Final = {r.replace("_", ""): r for r in OPERATOR_REASONS}


def revocation_reason(given: str) -> str:
    """An operator's revocation reason in Aegis's spelling (``key_compromise``), from it or from
    RFC 5280's (``keyCompromise``, ``aACompromise``); ``InvalidRequest`` for any other, which
    would otherwise revoke with no reason code in the CRL."""
    name = _SPELLINGS.get(given.strip().lower().replace("_", "").replace("-", ""))
    if name is None:
        raise InvalidRequest(
            f"revocation reason {given[:64]!r} is not one of {', '.join(OPERATOR_REASONS)}",
            field="reason",
        )
    return name


def build_crl(
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    revoked: list[tuple[str, float, str | None]],
    *,
    now: float,
    lifetime: float,
) -> x509.CertificateRevocationList:
    """A CRL signed by ``issuer``; ``revoked`` holds (hex serial, revoked at, reason)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(_dt(now - 1))
        .next_update(_dt(now + lifetime))
        .add_extension(x509.CRLNumber(int(now * 1000)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    for serial, at, reason in revoked:
        entry = (
            x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(_dt(at))
        )
        if reason in _REASONS:
            entry = entry.add_extension(x509.CRLReason(_REASONS[reason]), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(issuer_key, hashes.SHA256())


def is_serving(agent: Agent) -> bool:
    """Agents registered as serving (role ``server`` or attribute ``serving: true``) also get
    serverAuth, so they can terminate mTLS themselves; a certificate passes as a server's only
    while its agent still is one (:class:`aegis.pki.peer.PeerValidator`)."""
    return "server" in agent.roles or agent.attributes.get("serving") is True

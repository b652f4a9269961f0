"""TLS contexts for mutual TLS (RFC 8446, RFC 5246 with RFC 9325's recommendations).

* TLS 1.2 and 1.3 only: ``minimum_version = TLSv1_2``; 1.0 and 1.1 are refused (RFC 8996).
* TLS 1.2 suites: ECDHE with AEAD only (AES-GCM, ChaCha20-Poly1305), RFC 9325 §4.2; TLS 1.3 suites
  are all AEAD already. No compression, no renegotiation, server cipher preference.
* Server contexts trust only the Aegis bundle and, by default, require a client certificate.
  OpenSSL checks the chain, validity and clientAuth purpose during the handshake; the Aegis rules
  (SPIFFE ID, revocation, registry) follow in :mod:`aegis.pki.peer` before any request is served.
* Client contexts (outbound to upstreams) present the gateway's own certificate and verify the
  upstream against the bundle; upstream identity is a SPIFFE ID, checked with
  :class:`~aegis.pki.peer.PeerValidator` (``eku=serverAuth``), not a DNS host name.

Private keys never touch the disk in clear: they are handed to OpenSSL through a file encrypted
under a one-time passphrase, in a private temporary directory removed at once.
"""

from __future__ import annotations

import os
import secrets
import ssl
import tempfile
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

__all__ = [
    "MIN_TLS_VERSION",
    "TLS12_CIPHERS",
    "classify_handshake_error",
    "client_context",
    "server_context",
]

MIN_TLS_VERSION: Final = ssl.TLSVersion.TLSv1_2
TLS12_CIPHERS: Final = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
#: OpenSSL X509_V_ERR_* codes and the stable Aegis code each becomes.
_VERIFY_CODES: Final = {
    9: "cert_not_yet_valid",
    10: "cert_expired",
    23: "cert_revoked",
    24: "cert_untrusted",  # an issuer without the CA bit
    26: "cert_wrong_usage",  # unsupported certificate purpose (EKU)
}


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = MIN_TLS_VERSION
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE


def _load_chain(
    ctx: ssl.SSLContext, chain_pem: bytes, key: CertificateIssuerPrivateKeyTypes
) -> None:
    password = secrets.token_urlsafe(32).encode()
    enc = serialization.BestAvailableEncryption(password)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    with tempfile.TemporaryDirectory(prefix="aegis-tls-") as tmp:
        os.chmod(tmp, 0o700)
        cert_path, key_path = Path(tmp) / "chain.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(chain_pem)
        key_path.write_bytes(key_pem)
        ctx.load_cert_chain(cert_path, key_path, password=password)


def server_context(
    chain_pem: bytes,
    key: CertificateIssuerPrivateKeyTypes,
    trust_pem: bytes,
    *,
    require_client_cert: bool = True,
) -> ssl.SSLContext:
    """A listener context: our certificate chain, the Aegis bundle as the only trust anchors."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    _load_chain(ctx, chain_pem, key)
    ctx.load_verify_locations(cadata=trust_pem.decode("ascii"))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def client_context(
    chain_pem: bytes | None,
    key: CertificateIssuerPrivateKeyTypes | None,
    trust_pem: bytes,
    *,
    server_hostname_check: bool = False,
) -> ssl.SSLContext:
    """An outbound context presenting ``chain_pem`` (if given) and trusting only the bundle."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.check_hostname = server_hostname_check
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=trust_pem.decode("ascii"))
    if chain_pem is not None and key is not None:
        _load_chain(ctx, chain_pem, key)
    return ctx


def classify_handshake_error(exc: BaseException) -> str:
    """The stable code of a failed server-side handshake (for the rejection counter)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_CODES.get(exc.verify_code, "cert_untrusted")
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "CERTIFICATE_REQUIRED" in reason or "DID_NOT_RETURN_A_CERTIFICATE" in reason:
            return "cert_required"
        if "CERTIFICATE" in reason:
            return "cert_untrusted"
    return "tls_handshake_failed"

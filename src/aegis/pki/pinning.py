"""Pin the TLS server's SPIFFE ID on a client context (SPIFFE X509-SVID §5, "SVID Validation").

Aegis certificates name SPIFFE IDs, not host names, so a client that talks to an Aegis-certified
server (an agent enrolling at the control plane, say) cannot lean on host-name checking. Trusting the
Aegis bundle alone would accept every certificate the CA issued with ``serverAuth``. A pinned context
also requires the server's leaf to carry exactly one URI SAN, equal to the expected SPIFFE ID.

The check runs inside the TLS handshake call, after OpenSSL has verified the chain against the bundle
and before the client sends a byte of application data (credentials included): the context's
``sslobject_class`` (asyncio, anyio, httpx's async client) and ``sslsocket_class`` (blocking sockets,
httpx's sync client) are subclasses whose ``do_handshake`` refuses a mismatch with
``ssl.SSLCertVerificationError``.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from cryptography import x509

from aegis.pki.spiffe import parse_spiffe_id

__all__ = [
    "ServerCheck",
    "check_server",
    "pin_server_spiffe_id",
    "pin_server_spiffe_ids",
    "server_spiffe_id",
]


def server_spiffe_id(der: bytes | None) -> str:
    """The one URI SAN of a DER leaf; raises ``ssl.SSLCertVerificationError`` otherwise."""
    if not der:
        raise ssl.SSLCertVerificationError("the server presented no certificate")
    try:
        leaf = x509.load_der_x509_certificate(der)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound, x509.DuplicateExtension,
            x509.UnsupportedGeneralNameType):  # fmt: skip
        raise ssl.SSLCertVerificationError("the server's certificate has no SPIFFE ID") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise ssl.SSLCertVerificationError(
            f"the server's certificate must carry exactly one URI SAN, not {len(uris)}"
        )
    return str(uris[0])


ServerCheck = Callable[[bytes | None], None]


def check_server(ctx: ssl.SSLContext, check: ServerCheck) -> ssl.SSLContext:
    """Make ``ctx`` run ``check`` on the server's DER leaf inside every handshake, after the
    chain was verified and before any application data is sent; ``check`` refuses with
    ``ssl.SSLCertVerificationError``. Returns ``ctx``."""
    if ctx.verify_mode != ssl.CERT_REQUIRED:
        raise ValueError("a checked context must verify the server's certificate chain")

    class CheckedObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            check(self.getpeercert(binary_form=True))

    class CheckedSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            check(self.getpeercert(binary_form=True))

    ctx.sslobject_class = CheckedObject
    ctx.sslsocket_class = CheckedSocket
    return ctx


def pin_server_spiffe_ids(
    ctx: ssl.SSLContext, expected: tuple[str, ...], *, also: ServerCheck | None = None
) -> ssl.SSLContext:
    """Make ``ctx`` accept only a server whose certificate names one of ``expected`` (valid
    SPIFFE IDs, else ``AegisError(spiffe_id_invalid)``; an agent talks to its control plane and
    its gateway), then pass ``also`` when given. Host-name checking is replaced by this check
    (Aegis certificates name SPIFFE IDs, not hosts); the chain is still verified against the
    context's trust bundle. Returns ``ctx``."""
    for spiffe_id in expected:
        parse_spiffe_id(spiffe_id)
    allowed = frozenset(expected)
    shown = expected[0] if len(expected) == 1 else sorted(allowed)

    def pinned(der: bytes | None) -> None:
        found = server_spiffe_id(der)
        if found not in allowed:
            raise ssl.SSLCertVerificationError(
                f"the server is {found!r}, not the pinned {shown!r}; check --server-id"
            )
        if also is not None:
            also(der)

    ctx.check_hostname = False
    return check_server(ctx, pinned)


def pin_server_spiffe_id(
    ctx: ssl.SSLContext, expected: str, *, also: ServerCheck | None = None
) -> ssl.SSLContext:
    """:func:`pin_server_spiffe_ids` for one server."""
    return pin_server_spiffe_ids(ctx, (expected,), also=also)

"""Client certificates forwarded by a TLS-terminating proxy: Envoy's ``x-forwarded-client-cert``
(XFCC, ``Cert="<URL-encoded PEM>"``) and nginx's ``$ssl_client_escaped_cert``.

These headers are only as good as the proxy that set them: the caller must first check that the
immediate peer is a configured trusted proxy (:mod:`aegis.pki.middleware` does), and strip them
from everyone else. Parsing is strict: an XFCC header must hold exactly one element (configure
Envoy with ``forward_client_cert_details: SANITIZE_SET``), and exactly one PEM certificate.
"""

from __future__ import annotations

import ssl
from typing import Final
from urllib.parse import unquote

from aegis.errors import AegisError

__all__ = ["ENVOY_HEADER", "MAX_HEADER_BYTES", "NGINX_HEADER", "parse_nginx", "parse_xfcc"]

ENVOY_HEADER: Final = "x-forwarded-client-cert"
NGINX_HEADER: Final = "x-ssl-client-cert"
#: A URL-encoded P-256 leaf is ~1.3 KB; RSA-4096 with a long SAN stays well under this.
MAX_HEADER_BYTES: Final = 16 * 1024
_BEGIN: Final = "-----BEGIN CERTIFICATE-----"


def _bad(message: str) -> AegisError:
    return AegisError(message, code="cert_invalid")


def _split(value: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes (XFCC values such as Subject contain commas)."""
    parts, current, quoted, escaped = [], [], False, False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            current.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quoted:
        raise _bad("forwarded client certificate header has an unterminated quote")
    parts.append("".join(current))
    return parts


def _pem_to_der(pem: str) -> bytes:
    if pem.count(_BEGIN) != 1:
        raise _bad("forwarded client certificate must hold exactly one pem certificate")
    try:
        return ssl.PEM_cert_to_DER_cert(pem.strip())
    except ValueError:
        raise _bad("forwarded client certificate is not a valid pem certificate") from None


def parse_xfcc(value: str) -> bytes:
    """The DER certificate in an Envoy XFCC header's only element (its ``Cert`` key)."""
    if len(value) > MAX_HEADER_BYTES:
        raise _bad(f"x-forwarded-client-cert is larger than {MAX_HEADER_BYTES} bytes")
    elements = _split(value, ",")
    if len(elements) != 1:
        raise _bad("x-forwarded-client-cert must carry exactly one element; use SANITIZE_SET")
    certs = []
    for pair in _split(elements[0], ";"):
        key, eq, raw = pair.strip().partition("=")
        if not eq:
            raise _bad("x-forwarded-client-cert has a malformed key=value pair")
        if key.lower() == "cert":
            if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                raw = raw[1:-1]
            certs.append(unquote(raw))
    if len(certs) != 1:
        raise _bad("x-forwarded-client-cert must have exactly one Cert key")
    return _pem_to_der(certs[0])


def parse_nginx(value: str) -> bytes | None:
    """The DER certificate in nginx's ``$ssl_client_escaped_cert``; None if nginx sent none."""
    if len(value) > MAX_HEADER_BYTES:
        raise _bad(f"{NGINX_HEADER} is larger than {MAX_HEADER_BYTES} bytes")
    if not value.strip():
        return None
    return _pem_to_der(unquote(value))

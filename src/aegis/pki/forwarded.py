"""Client certificates forwarded by a TLS-terminating proxy: Envoy's ``x-forwarded-client-cert``
(XFCC, ``Cert="<URL-encoded PEM>"``) and nginx's ``$ssl_client_escaped_cert``.

These headers are only as good as the proxy that set them: the caller must first check that the
immediate peer is a configured trusted proxy (:mod:`aegis.pki.middleware` does), and strip them
from everyone else. Parsing is strict: an XFCC header must hold exactly one element (configure
Envoy with ``forward_client_cert_details: SANITIZE_SET``), and exactly one PEM certificate.
"""

from __future__ import annotations

import re
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


def _field(sep: str) -> re.Pattern[str]:
    # A field is a run of quoted strings (in which a backslash escapes the next character, a
    # quote or a separator included) and characters that are neither a quote nor ``sep``. Every
    # quantifier is possessive (nothing is given back), so matching is linear in the header's
    # length whatever it holds; a character-by-character loop cost ~100 us per header.
    return re.compile(r'(?:"(?:[^"\\]++|\\.)*+"|[^"' + re.escape(sep) + "]++)*+", re.DOTALL)


_FIELDS: Final = {sep: _field(sep) for sep in ",;"}


def _split(value: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes (XFCC values such as Subject contain commas); each
    part is kept exactly as written, quotes and escapes included."""
    field = _FIELDS[sep]
    parts, pos, end = [], 0, len(value)
    while True:
        stop = field.match(value, pos).end()  # type: ignore[union-attr]  # matches "" at least
        parts.append(value[pos:stop])
        if stop == end:
            return parts
        if value[stop] != sep:  # a quote the field could not close
            raise _bad("forwarded client certificate header has an unterminated quote")
        pos = stop + 1


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

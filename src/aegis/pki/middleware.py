"""Transport identity for ASGI apps: step 1 of the decision pipeline (RFC 8705 §2, X509-SVID).

:class:`PeerCertificateMiddleware` finds the peer certificate and validates it before the wrapped
app sees the request; a failure is answered here (401 with the stable code, the serial and the
SPIFFE ID when known), counted in ``aegis_mtls_rejections_total`` and never reaches policy.

Where the certificate comes from, in order:

1. If the immediate peer address is a configured trusted proxy and a forwarded-certificate mode is
   set, the certificate is the one the proxy forwarded (Envoy XFCC or nginx
   ``$ssl_client_escaped_cert``). The proxy's own TLS certificate is the proxy's, not the caller's.
2. Otherwise the certificate of this TLS connection, from the ASGI TLS extension that
   :class:`~aegis.pki.listener.MTLSListener` sets from the handshake.

Forwarded-certificate headers are removed from every request before the app runs: from an
untrusted peer they are ignored, never believed, and nothing downstream can read them.

With an ``audit`` sink (the gateway passes its audit log's ``append_async``) every refusal is also
written as an ``mtls.rejected`` record: the stable code, the reason, where the certificate came
from, the caller's address, the method and path, and the certificate serial and SPIFFE ID when
they are known. A sink that cannot write changes nothing about the answer: the call is refused.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

from cryptography import x509
from starlette.responses import JSONResponse

from aegis.clock import new_id
from aegis.errors import REFUSAL_FIELD, AegisError, refusal_mark
from aegis.pki.forwarded import ENVOY_HEADER, NGINX_HEADER, parse_nginx, parse_xfcc
from aegis.pki.peer import PeerIdentity, PeerValidator
from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import MTLS_REJECTIONS

__all__ = [
    "CERT_SCOPE_KEY",
    "MTLS_AUDIT_KIND",
    "PEER_SCOPE_KEY",
    "AuditSink",
    "PeerCertificateMiddleware",
    "audit_refusal",
    "client_cert_from_scope",
    "peer_from_scope",
]

#: Where the verified peer lives in the ASGI scope; only this middleware writes it.
PEER_SCOPE_KEY: Final = "aegis.peer"
_FORWARD_HEADERS: Final = (ENVOY_HEADER.encode(), NGINX_HEADER.encode())


#: The raw DER client certificate (validated or, on self-signed-tolerant paths, not).
CERT_SCOPE_KEY: Final = "aegis.client_cert"
#: The audit record kind of a refused peer certificate (here and in the TLS listener).
MTLS_AUDIT_KIND: Final = "mtls.rejected"
#: ``AuditLog.append_async``: (kind, record) -> committed.
AuditSink = Callable[[str, dict[str, Any]], Awaitable[object]]


async def audit_refusal(audit: AuditSink | None, record: dict[str, Any]) -> None:
    """Write one ``mtls.rejected`` record; a failure is logged, never raised (already refused)."""
    if audit is None:
        return
    try:
        await audit(MTLS_AUDIT_KIND, record)
    except Exception as exc:  # the refusal stands whatever the sink does
        log_event("mtls.audit_failed", level=logging.ERROR, error=type(exc).__name__)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer address, normalised (an IPv4-mapped IPv6 address is its IPv4 address)."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None  # a unix socket or a name: never a trusted proxy
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _self_issued(der: bytes) -> bool:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return False
    return cert.subject == cert.issuer


def peer_from_scope(scope: Mapping[str, Any]) -> PeerIdentity | None:
    peer = scope.get(PEER_SCOPE_KEY)
    return peer if isinstance(peer, PeerIdentity) else None


def client_cert_from_scope(scope: Mapping[str, Any]) -> bytes | None:
    der = scope.get(CERT_SCOPE_KEY)
    return der if isinstance(der, bytes) else None


class PeerCertificateMiddleware:
    def __init__(
        self,
        app: Any,
        validator: PeerValidator,
        *,
        trusted_proxies: Iterable[str] = (),
        mode: str = "none",
        header: str = "",
        required: Callable[[str], bool] = lambda path: True,
        self_signed_ok: Callable[[str], bool] = lambda path: False,
        listener: str = "gateway",
        audit: AuditSink | None = None,
    ) -> None:
        if mode not in ("none", "envoy", "nginx"):
            raise ValueError("mode must be none, envoy or nginx")
        self.app = app
        self._validator = validator
        self._trusted = frozenset(ipaddress.ip_address(a) for a in trusted_proxies)
        self._mode = mode
        default = ENVOY_HEADER if mode == "envoy" else NGINX_HEADER
        self._header = (header or default).lower().encode("latin-1")
        self._strip = frozenset((*_FORWARD_HEADERS, self._header))
        self._required = required
        self._self_signed_ok = self_signed_ok
        self._listener = listener
        self._audit = audit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        forwarded = [v for k, v in scope["headers"] if k == self._header]
        # However spelled: a CGI or WSGI upstream (or Envoy, which passes underscores by
        # default) reads X_SSL_Client_Cert as X-SSL-Client-Cert.
        scope["headers"] = [
            (k, v) for k, v in scope["headers"] if k.replace(b"_", b"-") not in self._strip
        ]
        scope.pop(PEER_SCOPE_KEY, None)
        scope.pop(CERT_SCOPE_KEY, None)
        source = "tls"
        try:
            der, source = self._certificate(scope, forwarded)
            if der is None:
                if self._required(scope["path"]):
                    raise AegisError("a client certificate is required", code="cert_required")
            else:
                scope[CERT_SCOPE_KEY] = der
                # RFC 8705 §2.2: a self-signed certificate is not the CA's to validate; where the
                # route allows it (the token endpoint), its key is checked against the client's
                # registered JWKs instead. The CA never issues self-issued agent certificates.
                if not (self._self_signed_ok(scope["path"]) and _self_issued(der)):
                    scope[PEER_SCOPE_KEY] = await self._validator.validate_async(der, source=source)
        except AegisError as exc:
            await self._reject(exc, scope, receive, send, source)
            return
        await self.app(scope, receive, send)

    def _certificate(
        self, scope: dict[str, Any], forwarded: list[bytes]
    ) -> tuple[bytes | None, str]:
        client = scope.get("client")
        if self._mode != "none" and client is not None and _address(client[0]) in self._trusted:
            if len(forwarded) > 1:
                raise AegisError(
                    "forwarded client certificate header is repeated", code="cert_invalid"
                )
            if not forwarded:
                return None, "forwarded"
            value = forwarded[0].decode("latin-1")
            der = parse_xfcc(value) if self._mode == "envoy" else parse_nginx(value)
            return der, "forwarded"
        tls = (scope.get("extensions") or {}).get("tls") or {}
        chain = tls.get("client_cert_chain") or []
        if not chain:
            return None, "tls"
        try:
            return ssl.PEM_cert_to_DER_cert(chain[0]), "tls"
        except ValueError:
            raise AegisError(
                "tls client certificate is not valid pem", code="cert_invalid"
            ) from None

    async def _reject(
        self, exc: AegisError, scope: dict[str, Any], receive: Any, send: Any, source: str
    ) -> None:
        MTLS_REJECTIONS.labels(listener=self._listener, code=exc.code).inc()
        client = scope.get("client")
        decision_id = new_id()
        cert = {k: exc.details.get(k) for k in ("serial", "spiffe_id")}
        log_event(
            "mtls.peer_refused",
            level=logging.WARNING,
            listener=self._listener,
            code=exc.code,
            reason=exc.message,
            source=client[0] if client else "unknown",
            **{k: v for k, v in cert.items() if v},
        )
        await audit_refusal(
            self._audit,
            {
                "decision_id": decision_id,
                "listener": self._listener,
                "stage": "peer_certificate",
                "code": exc.code,
                "reason": exc.message,
                "certificate_source": source,
                "client": client[0] if client else None,
                "method": scope.get("method"),
                "path": str(scope.get("path", ""))[:512],  # the caller's; bounded
                **cert,
            },
        )
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = {"error": exc.spec.oauth_error, **exc.to_dict(), "decision_id": decision_id}
        # The gateway's own answer, marked as every one is (docs/gateway.md), so an SDK reads it
        # as the refusal it is, never as a tool's.
        headers = {"cache-control": "no-store", "x-aegis-decision-id": decision_id}
        sent = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), None)
        if sent is not None:
            headers[REFUSAL_FIELD] = refusal_mark(sent.decode("latin-1"))
        await JSONResponse(body, status_code=exc.status, headers=headers)(scope, receive, send)

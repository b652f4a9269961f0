"""A gateway-like mTLS server on loopback and real TLS clients, for the mTLS tests and benchmarks.

The server is the production stack: :class:`MTLSListener` (handshake, TLS extension) in front of
:class:`PeerCertificateMiddleware` (transport identity) in front of a small Starlette app whose
``/call`` route does what the gateway pipeline does with a certificate-bound token.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aegis.errors import AegisError
from aegis.pki.binding import check_certificate_binding
from aegis.pki.listener import MTLSListener
from aegis.pki.middleware import AuditSink, PeerCertificateMiddleware, peer_from_scope
from aegis.pki.tls import client_context, server_context
from aegis.telemetry.metrics import REGISTRY
from aegis.tokens.verifier import AccessTokenVerifier
from tests.pki.conftest import Pki


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def rejections(listener: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "aegis_mtls_rejections_total", {"listener": listener, "code": code}
    )
    return value or 0.0


def gateway_app(
    pki: Pki,
    *,
    name: str,
    verifier: AccessTokenVerifier | None = None,
    trusted_proxies: Iterable[str] = (),
    mode: str = "none",
    required: bool = True,
    audit: AuditSink | None = None,
) -> Any:
    async def whoami(request: Request) -> Response:
        peer = peer_from_scope(request.scope)
        leaked = {
            k.decode(): v.decode() for k, v in request.scope["headers"] if b"client-cert" in k
        }
        body = {
            "peer": None
            if peer is None
            else {
                "spiffe_id": peer.spiffe_id,
                "agent": peer.agent_id,
                "tenant": peer.tenant,
                "env": peer.env,
                "serial": peer.serial,
                "x5t#S256": peer.x5t_s256,
                "source": peer.source,
            },
            "forwarded_headers_seen": leaked,
        }
        return JSONResponse(body)

    async def call(request: Request) -> Response:
        assert verifier is not None
        try:
            token = verifier.verify(request.headers.get("authorization", "")[len("Bearer ") :])
            check_certificate_binding(token, peer_from_scope(request.scope))
        except AegisError as exc:
            return JSONResponse(exc.to_dict(), status_code=exc.status)
        return JSONResponse({"ok": True, "agent": token.agent_id})

    async def slow(request: Request) -> Response:
        await asyncio.sleep(0.5)  # an in-flight call that outlives a certificate swap
        return await whoami(request)

    app = Starlette(
        routes=[
            Route("/whoami", whoami),
            Route("/slow", slow),
            Route("/call", call, methods=["POST", "GET"]),
        ]
    )
    return PeerCertificateMiddleware(
        app,
        pki.validator,
        trusted_proxies=trusted_proxies,
        mode=mode,
        listener=name,
        required=lambda path: required,
        audit=audit,
    )


def gateway_server_context(pki: Pki, *, require_client_cert: bool = True) -> ssl.SSLContext:
    key, cert = pki.key_and_cert("gw")
    return server_context(
        pem(cert, pki.ca.current.cert),
        key,
        pki.ca.bundle_pem(),
        require_client_cert=require_client_cert,
    )


@asynccontextmanager
async def serve(
    app: Any, ctx: ssl.SSLContext | Any, *, name: str, audit: AuditSink | None = None
) -> AsyncIterator[MTLSListener]:
    context = ctx if callable(ctx) else (lambda: ctx)
    listener = MTLSListener(app, context=context, name=name, audit=audit)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.stop()


def client_ctx(
    pki: Pki, key: ec.EllipticCurvePrivateKey | None, *certs: x509.Certificate
) -> ssl.SSLContext:
    if key is None:
        return client_context(None, None, pki.ca.bundle_pem())
    return client_context(pem(*certs), key, pki.ca.bundle_pem())


@dataclass
class Result:
    status: int | None
    body: dict[str, Any] | None
    error: str | None


async def fetch(
    port: int,
    ctx: ssl.SSLContext,
    path: str = "/whoami",
    *,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: str = "",
    timeout: float = 5.0,
) -> Result:
    """One HTTP/1.1 request on a new TLS connection; a refused handshake is an ``error``."""
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway", "Connection: close"]
    if not any(k.lower() == "content-length" for k in headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="gateway"), timeout
        )
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        return Result(None, None, f"{type(exc).__name__}: {exc}")
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n" + body).encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        return Result(None, None, f"{type(exc).__name__}: {exc}")
    finally:
        # A refused client certificate surfaces on the first read (TLS 1.3): close the transport
        # on every path, or it is left for the garbage collector to warn about in a later test.
        await close_writer(writer)
    if not raw:
        return Result(None, None, "connection closed without a response")
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        payload = _dechunk(payload)
    try:
        return Result(status, json.loads(payload) if payload else None, None)
    except ValueError:
        return Result(status, None, payload[:200].decode(errors="replace"))


async def close_writer(writer: asyncio.StreamWriter, timeout: float = 5.0) -> None:
    """Close a client connection and wait until its socket is really closed.

    ``close()`` on TLS only starts the close_notify exchange; the socket underneath stays open
    until it ends. If it has not ended within ``timeout`` (a starved event loop), or failed, the
    transport is aborted, so no socket outlives the call to be reported by the garbage collector
    as unclosed in whichever later test happens to run the collection.
    """
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout)
    except (ssl.SSLError, ConnectionError, OSError):  # TimeoutError is an OSError
        writer.transport.abort()
        await asyncio.sleep(0)  # the abort closes the socket on the next loop iteration


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


@dataclass
class ControlPlane:
    app: Any
    verifier: AccessTokenVerifier


def control_plane(
    pki: Pki, *, name: str, trusted_proxies: Iterable[str] = (), mode: str = "none"
) -> ControlPlane:
    """The real token endpoint (OAuth endpoints, token service, key ring) behind the middleware."""
    from aegis.crypto.keyring import KeyRing, KeyRingSettings
    from aegis.oauth.endpoints import OAuthEndpoints
    from aegis.oauth.service import TokenService
    from aegis.tokens.issuer import TokenIssuer
    from tests.crypto.fakes import MemoryKeyStore
    from tests.pki.fakes import MemoryRevocationStore

    issuer_url = "https://aegis.example.org"
    keyring = KeyRing(MemoryKeyStore(), pki.kek, pki.clock, KeyRingSettings())
    keyring.ensure_initialized()
    verifier = AccessTokenVerifier(
        keyring.public_key, issuer=issuer_url, audience=None, clock=pki.clock
    )
    tokens = TokenService(
        issuer=TokenIssuer(keyring, issuer=issuer_url, clock=pki.clock),
        verifier=verifier,
        cache=pki.cache,
        revocation=MemoryRevocationStore(),
        clock=pki.clock,
        audiences=("aegis-gateway",),
        default_lifetime=300,
        max_lifetime=3600,
    )
    assert pki.service._auth is not None
    oauth = OAuthEndpoints(
        issuer_url=issuer_url,
        tokens=tokens,
        authenticator=pki.service._auth,
        registry=pki.registry,
        jwks=keyring.jwks,
        max_body_bytes=65536,
    )
    app = PeerCertificateMiddleware(
        Starlette(routes=oauth.routes()),
        pki.validator,
        trusted_proxies=trusted_proxies,
        mode=mode,
        required=lambda path: False,
        self_signed_ok=lambda path: path == "/oauth/token",
        listener=name,
    )
    return ControlPlane(app, verifier)

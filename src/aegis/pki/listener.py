"""A TLS listener for ASGI apps that exposes the verified peer certificate (ASGI TLS extension).

The handshake is run here (``loop.start_tls``), not inside the HTTP server, so that every refused
handshake is seen and counted by its reason (``aegis_mtls_rejections_total``) before any request
exists. A completed handshake hands the connection to uvicorn's HTTP/1.1 protocol, with
``scope["extensions"]["tls"]`` set from the TLS session itself (ASGI TLS extension:
``client_cert_chain`` as PEM, ``tls_version``, ``cipher_suite``), never from anything the client
sent. :class:`~aegis.pki.middleware.PeerCertificateMiddleware` turns it into a ``PeerIdentity``.

The SSL context is fetched per connection from ``context()``: renewing the listener's own
certificate swaps the context for new handshakes while open connections carry on untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any, cast

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from aegis.pki.middleware import AuditSink, audit_refusal
from aegis.pki.tls import classify_handshake_error
from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import MTLS_REJECTIONS

__all__ = ["MTLSListener"]

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class _Pending(asyncio.Protocol):
    """Holds a fresh TCP connection, reading nothing, until the TLS handshake takes it over."""

    def __init__(self, listener: MTLSListener) -> None:
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (asyncio's or uvloop's, which does not subclass asyncio.Transport).
        stream = cast(asyncio.Transport, transport)
        stream.pause_reading()  # the ClientHello waits for start_tls
        self._listener._spawn(stream)


class _Buffer(asyncio.Protocol):
    """Takes what arrives between the end of the handshake and the HTTP protocol's start (a TLS 1.3
    client sends its request at once); replayed in order once the HTTP protocol is attached."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.eof = False
        self.lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)

    def attach(self, transport: asyncio.Transport, protocol: asyncio.Protocol) -> None:
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        for chunk in self.chunks:
            protocol.data_received(chunk)
        if self.eof:
            protocol.eof_received()
        if self.lost is not None:
            protocol.connection_lost(self.lost[0])


def _with_tls(app: Any, ext: dict[str, Any]) -> Any:
    async def connection_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["extensions"] = {**(scope.get("extensions") or {}), "tls": ext}
        await app(scope, receive, send)

    return connection_app


class MTLSListener:
    def __init__(
        self,
        app: Any,
        *,
        context: Callable[[], ssl.SSLContext],
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "gateway",
        handshake_timeout: float = 10.0,
        audit: AuditSink | None = None,
    ) -> None:
        self._context = context
        self._host, self._port = host, port
        self.name = name
        self._timeout = handshake_timeout
        # OpenSSL refuses a bad certificate inside the handshake without showing it, so these
        # records carry the code and the peer address but no serial or SPIFFE ID.
        self._audit = audit
        # proxy_headers=False: X-Forwarded-For is never believed here (see PeerCertificateMiddleware).
        self._config = Config(
            app, http="h11", lifespan="off", proxy_headers=False, log_level="warning"
        )
        self._config.load()
        self._state = ServerState()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the listener first"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Pending(self), self._host, self._port)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, close idle connections."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._state.connections):
            conn.shutdown()
        for _ in range(100):
            if not self._state.connections and not self._state.tasks:
                break
            await asyncio.sleep(0.05)
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _spawn(self, transport: asyncio.Transport) -> None:
        task = asyncio.get_running_loop().create_task(self._handshake(transport))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        buffer = _Buffer()
        peer = transport.get_extra_info("peername")
        try:
            tls = await loop.start_tls(
                transport,
                buffer,
                self._context(),
                server_side=True,
                ssl_handshake_timeout=self._timeout,
            )
        except Exception as exc:  # any failed handshake closes the connection, counted
            code = classify_handshake_error(exc)
            MTLS_REJECTIONS.labels(listener=self.name, code=code).inc()
            log_event(
                "mtls.handshake_refused",
                listener=self.name,
                code=code,
                peer=str(peer),
                detail=str(exc)[:200],
            )
            transport.abort()
            await audit_refusal(
                self._audit,
                {
                    "listener": self.name,
                    "stage": "tls_handshake",
                    "code": code,
                    "reason": str(exc)[:200],
                    "client": peer[0] if isinstance(peer, tuple) else None,
                },
            )
            return
        if tls is None:  # the peer went away during the handshake
            transport.abort()
            return
        sslobj: ssl.SSLObject | None = tls.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        cipher = sslobj.cipher() if sslobj is not None else None
        version = sslobj.version() if sslobj is not None else None
        ext = {
            "server_cert": None,
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
            "client_cert_name": None,
            "client_cert_error": None,
            "tls_version": _TLS_VERSIONS.get(version or ""),
            "cipher_suite": None,
            "aegis_cipher": cipher[0] if cipher else None,
        }
        http = H11Protocol(config=self._config, server_state=self._state, app_state={})
        http.app = _with_tls(self._config.loaded_app, ext)
        buffer.attach(tls, http)

"""A TLS listener for ASGI apps that exposes the verified peer certificate (ASGI TLS extension).

Connections are accepted here and their TLS handshake awaited here
(``loop.connect_accepted_socket`` with the SSL context), not inside the HTTP server, so that every
refused handshake is seen and counted by its reason (``aegis_mtls_rejections_total``) before any
request exists. A completed handshake hands the connection to uvicorn's HTTP/1.1 protocol, with
``scope["extensions"]["tls"]`` set from the TLS session itself (ASGI TLS extension:
``client_cert_chain`` as PEM, ``tls_version``, ``cipher_suite``), never from anything the client
sent. :class:`~aegis.pki.middleware.PeerCertificateMiddleware` turns it into a ``PeerIdentity``.

The TLS layer owns the socket from its first byte: there is no plain-TCP protocol that could read
the ClientHello before TLS takes over (uvloop starts reading a new transport as soon as its
protocol's ``connection_made`` returns, so a pause requested there does not hold).

The SSL context is fetched per connection from ``context()``: renewing the listener's own
certificate swaps the context for new handshakes while open connections carry on untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from aegis.pki.middleware import AuditSink
from aegis.pki.refusals import HandshakeRefusals
from aegis.pki.tls import classify_handshake_error
from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import MTLS_REJECTIONS

__all__ = ["MTLSListener"]

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class _Handover(asyncio.Protocol):
    """The protocol of a connection whose handshake completed: on ``connection_made`` (which the
    loop calls only after the handshake) it hands the TLS transport to ``make_http``, which builds
    the HTTP protocol with the session's facts; nothing can arrive before that."""

    def __init__(
        self, make_http: Callable[[asyncio.Transport], asyncio.Protocol], first_request: float
    ) -> None:
        self._make_http = make_http
        self._first_request = first_request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (asyncio's or uvloop's, which does not subclass asyncio.Transport).
        stream = cast(asyncio.Transport, transport)
        http = self._make_http(stream)
        stream.set_protocol(http)
        http.connection_made(stream)
        # uvicorn starts no timer until it has answered a request: a client that completes the
        # handshake (no certificate needed where one is only asked for) and sends nothing, or
        # a request head a byte at a time, would hold the connection for good.
        asyncio.get_running_loop().call_later(self._first_request, _close_if_idle, http, stream)


def _close_if_idle(http: asyncio.Protocol, stream: asyncio.Transport) -> None:
    """Close a connection on which no request has begun (its head not yet whole). Once one has
    (uvicorn keeps its cycle), the connection is uvicorn's: its keep-alive timeout closes it
    between requests."""
    conn = getattr(http, "conn", None)
    started = getattr(http, "cycle", None) is not None or (
        conn is not None and conn.their_state is not h11.IDLE
    )
    if not started and not stream.is_closing():
        stream.close()


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
        # records carry the code and the peer address but no serial or SPIFFE ID; how many are
        # written is bounded (aegis.pki.refusals), every one is counted.
        self._refusals = HandshakeRefusals(audit, listener=name)
        # proxy_headers=False: X-Forwarded-For is never believed here (see PeerCertificateMiddleware).
        self._config = Config(
            app, http="h11", lifespan="off", proxy_headers=False, log_level="warning"
        )
        self._config.load()
        self._state = ServerState()
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._sock is not None, "start() the listener first"
        return int(self._sock.getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.create_server((self._host, self._port), family=family, backlog=512)
        sock.setblocking(False)
        self._sock = sock
        self._accepting = loop.create_task(self._accept(sock))

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, close idle connections."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._sock is not None:
            self._sock.close()
        for conn in list(self._state.connections):
            conn.shutdown()
        for _ in range(100):
            if not self._state.connections and not self._state.tasks:
                break
            await asyncio.sleep(0.05)
        for task in list(self._tasks):
            task.cancel()
        await self._refusals.close()

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # e.g. out of file descriptors: back off, keep serving
                log_event("mtls.accept_failed", listener=self.name, error=str(exc)[:200])
                await asyncio.sleep(0.1)
                continue
            # Small writes go out at once (as asyncio's own servers set it; a socket from
            # socket.create_server has proto 0, for which asyncio leaves Nagle on, and a response
            # whose head and body are two writes then waits ~40 ms for the peer's delayed ACK).
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._handshake(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            peer = conn.getpeername()
        except OSError:  # already gone
            conn.close()
            return
        try:
            await loop.connect_accepted_socket(
                lambda: _Handover(self._http, self._timeout),
                conn,
                ssl=self._context(),
                ssl_handshake_timeout=self._timeout,
            )
        except Exception as exc:  # any failed handshake closes the connection, counted
            conn.close()
            code = classify_handshake_error(exc)
            MTLS_REJECTIONS.labels(listener=self.name, code=code).inc()
            await self._refusals.refused({
                "listener": self.name,
                "stage": "tls_handshake",
                "code": code,
                "reason": str(exc)[:200],
                "client": peer[0] if isinstance(peer, tuple) else None,
            })  # fmt: skip

    def _http(self, tls: asyncio.Transport) -> asyncio.Protocol:
        """uvicorn's HTTP/1.1 protocol for one handshaken connection, its app seeing the session's
        facts as the ASGI TLS extension."""
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
        return http

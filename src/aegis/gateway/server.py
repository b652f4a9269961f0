"""Running the data plane: the reverse proxy and, when configured, the ext_authz front doors, in one
process sharing one decision pipeline (``aegis gateway run``).

Every listener decides with the same :class:`~aegis.gateway.pipeline.Pipeline` instance: one
policy watcher, one registry cache, one audit log. The process holds nothing another replica
needs: replay, revocation and the registry live in the configured shared stores. When any listener
stops (a signal, or a port that cannot be bound) the others are stopped too, so the process never
keeps running with a front door silently missing.

With ``pki.gateway_agent`` set, the proxy is served behind :class:`~aegis.pki.listener.MTLSListener`
with the gateway's own (renewed) certificate: TLS 1.2+ only, client certificates validated in the
handshake and again by the PKI layer, required where a route says so; without it, plain HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc
import uvicorn
from starlette.applications import Starlette

from aegis.config import GatewaySettings
from aegis.gateway.app import build_pipeline, create_gateway_app
from aegis.gateway.ext_authz import ExtAuthz, TrustedPeers
from aegis.gateway.ext_authz_grpc import AuthorizationService, start_grpc_server
from aegis.gateway.ext_authz_http import create_ext_authz_http_app
from aegis.gateway.pipeline import Pipeline
from aegis.pki.listener import MTLSListener
from aegis.pki.middleware import AuditSink
from aegis.pki.peer import PeerValidator
from aegis.pki.renewal import CertificateManager
from aegis.pki.service import PkiService
from aegis.server.services import Services
from aegis.telemetry.logging import hide_access_log_queries, log_event

__all__ = [
    "build_ext_authz",
    "freeze_startup_heap",
    "gateway_server",
    "run_event_loop",
    "serve_gateway",
    "serve_mtls",
]

T = TypeVar("T")


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run the data plane's event loop to completion: uvloop (libuv) where it is installed, as
    uvicorn itself prefers, else asyncio's own loop. Every front door (uvicorn, grpc.aio, the
    aiohttp client) runs on it; uvloop takes a tenth or more off the per-call cost of each."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency wherever it builds
        return asyncio.run(main)
    return uvloop.run(main)


def freeze_startup_heap() -> None:
    """Collect once, then move every object that survived start-up (configuration, services,
    compiled policies, imported modules, protobuf descriptors) out of the garbage collector's
    view (``gc.freeze``). A full collection otherwise walks all of them and holds the event loop
    meanwhile: measured here at about 80 ms, once every few seconds under load, which is every
    in-flight call's p99. Objects made while serving are collected as before."""
    gc.collect()
    gc.freeze()


def _target_as_sent() -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol, with the request target read as h11's protocol reads it.

    httptools parses the target as a URL and uvicorn keeps its path only, so an absolute-form
    target (``GET http://other.example/payments/x``) was decided and forwarded as
    ``/payments/x`` of the Host field, though it names another authority, which a server must
    take instead of the Host field (RFC 9112 §3.2.2). Here any target not in origin form keeps
    its whole text before ``?`` as the path, as under h11, and the doors refuse it as a path
    that does not start with ``/``. Without httptools, h11 itself."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is part of uvicorn[standard]
        return "h11"

    class TargetAsSent(HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            super().on_headers_complete()  # the call's task is created, not yet run
            if not self.url.startswith(b"/") and "raw_path" in self.scope:
                raw = self.url.partition(b"?")[0]
                self.scope["raw_path"] = raw
                self.scope["path"] = raw.decode("latin-1")

    return TargetAsSent


def gateway_server(
    app: Any, host: str, port: int, *, log_level: str = "info", http: str = "httptools"
) -> uvicorn.Server:
    """A uvicorn server for a gateway door. ``proxy_headers=False``: uvicorn's default believes
    ``X-Forwarded-For`` and ``X-Forwarded-Proto`` from 127.0.0.1 and rewrites the client address
    before any Aegis code sees it, so a local caller could claim a trusted proxy's address (and
    with it forwarded certificates). Which peers are proxies is Aegis configuration
    (``trusted_proxies``), judged on the connection's own address. ``http``: ``httptools`` (the
    faster parser, its request target read as sent, see :func:`_target_as_sent`) or ``h11``."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        proxy_headers=False,
        server_header=False,
        http=_target_as_sent() if http == "httptools" else http,
    )
    # uvicorn configured its loggers just now; its access log keeps no query string (a caller's
    # ?access_token=... or ?password=... would otherwise be written out verbatim).
    hide_access_log_queries()
    return uvicorn.Server(config)


async def serve_mtls(
    app: Starlette,
    certificates: CertificateManager,
    host: str,
    port: int,
    stop: asyncio.Event,
    *,
    audit: AuditSink | None = None,
    started: Callable[[int], None] | None = None,
) -> None:
    """The proxy app behind the mTLS listener until ``stop`` is set (runs the app's lifespan,
    which obtains the first certificate; refused handshakes go to ``audit``)."""
    async with app.router.lifespan_context(app):
        listener = MTLSListener(
            app, context=certificates.server_context, host=host, port=port, audit=audit
        )
        await listener.start()
        log_event("gateway.mtls_listening", host=host, port=listener.port)
        if started is not None:
            started(listener.port)
        try:
            await stop.wait()
        finally:
            await listener.stop()


def build_ext_authz(services: Services, settings: GatewaySettings, pipeline: Pipeline) -> ExtAuthz:
    """The ext_authz core over ``pipeline``; forwarded client certificates are validated against
    the internal CA when it exists (without it none is believed), and read only from the header
    of the proxy ``pki.xfcc_mode`` names (a header the proxy does not set is the client's)."""
    pki = services.extras.get("pki")
    validator: PeerValidator | None = pki.validator() if isinstance(pki, PkiService) else None
    p = services.config.pki
    return ExtAuthz(
        pipeline, settings, validator=validator, xfcc_mode=p.xfcc_mode, xfcc_header=p.xfcc_header
    )


async def serve_gateway(
    services: Services,
    settings: GatewaySettings,
    *,
    host: str,
    port: int,
    log_level: str = "info",
) -> None:
    """Serve until interrupted: the proxy on ``host:port``, plus each configured ext_authz door."""
    pipeline = build_pipeline(services, settings)
    app = create_gateway_app(services, settings, pipeline=pipeline)

    def server(asgi: Starlette, h: str, p: int) -> uvicorn.Server:
        return gateway_server(asgi, h, p, log_level=log_level)

    certificates = app.state.certificates
    servers = [server(app, host, port)] if certificates is None else []
    ea = settings.ext_authz
    ext = build_ext_authz(services, settings, pipeline)
    if ea.http_port is not None:
        servers.append(server(create_ext_authz_http_app(ext, ea), ea.http_host, ea.http_port))
    grpc_server: grpc.aio.Server | None = None
    if ea.grpc_port is not None:
        service = AuthorizationService(
            ext, TrustedPeers(ea.trusted_proxies), buffered=ea.envoy_buffers_body
        )
        grpc_server, bound = await start_grpc_server(
            service, ea.grpc_host, ea.grpc_port, max_body_bytes=settings.max_body_bytes
        )
        log_event("gateway.ext_authz_grpc_listening", host=ea.grpc_host, port=bound)
    freeze_startup_heap()  # everything the doors need exists; requests are yet to come
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    stop = asyncio.Event()
    if certificates is not None:
        audit = pipeline.audit.append_async if pipeline.audit is not None else None
        tasks.append(
            asyncio.create_task(serve_mtls(app, certificates, host, port, stop, audit=audit))
        )
        if not servers:  # no uvicorn server to catch the signals
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        for s in servers:
            s.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
        if grpc_server is not None:
            await grpc_server.stop(grace=1.0)
        await services.aclose()

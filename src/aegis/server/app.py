"""The all-in-one ASGI application: OAuth endpoints, admin API, metrics and health.

``create_app(services)`` composes the pieces; ``aegis up`` serves it with uvicorn. Background work
(key store reloads, scheduled rotation) runs in the app's lifespan and stops with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from aegis.approvals.wiring import approvals_for
from aegis.audit.maintain import AuditMaintainer
from aegis.oauth.endpoints import OAuthEndpoints
from aegis.pki.api import PkiEndpoints
from aegis.pki.middleware import PeerCertificateMiddleware
from aegis.pki.service import PkiService

try:  # TEMP until the admin API lands
    from aegis.server.admin_api import create_admin_app
except ImportError:
    create_admin_app = None  # type: ignore[assignment]
from aegis.errors import spec_for
from aegis.server.approvals_public import approval_routes
from aegis.server.services import Services
from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import count_rejection
from aegis.telemetry.scrape import metrics_endpoint

__all__ = ["app_from_config", "create_app"]


async def _maintenance(services: Services) -> None:
    """Reload keys rotated elsewhere and rotate on schedule; never lets an error kill the loop."""
    interval = services.config.keys.reload_interval
    while True:
        await asyncio.sleep(interval)
        try:
            services.keyring.refresh_if_stale(interval)
            if services.keyring.rotate_if_due():
                log_event("keys.rotated", kid=services.keyring.signing_key().kid, reason="schedule")
        except Exception as exc:  # keep serving with the current keys; the error is logged
            log_event("keys.maintenance_failed", error=type(exc).__name__)


def create_app(services: Services) -> Starlette:
    cfg = services.config
    oauth = OAuthEndpoints(
        issuer_url=cfg.issuer,
        tokens=services.tokens,
        authenticator=services.authenticator,
        registry=services.registry,
        jwks=services.keyring.jwks,
        max_body_bytes=cfg.server.max_body_bytes,
        dpop=services.extras.get("dpop_hook"),  # type: ignore[arg-type]
    )

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            services.registry_store.list_tenants()
            services.keyring.signing_key()
        except Exception as exc:
            return JSONResponse(
                {"status": "unavailable", "reason": type(exc).__name__}, status_code=503
            )
        return JSONResponse({"status": "ready"})

    async def evidence_jwks(request: Request) -> Response:
        # Archived keys too: for checking old attestations and checkpoints, never tokens.
        return JSONResponse(
            services.keyring.evidence_jwks(), headers={"Cache-Control": "public, max-age=60"}
        )

    routes: list[Any] = [
        *oauth.routes(),
        Route("/.well-known/aegis-evidence-jwks.json", evidence_jwks, methods=["GET"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route(
            "/metrics",
            metrics_endpoint(
                cfg.server.metrics_clients,
                "server.metrics_clients",
                proxies=(*cfg.pki.trusted_proxies, *cfg.gateway.ext_authz.trusted_proxies),
            ),
        ),
        *approval_routes(services),  # status URL and signed Slack/Teams callbacks
    ]
    if create_admin_app is not None:
        routes.append(Mount("/v1", app=create_admin_app(services)))
    pki = services.extras.get("pki")
    if isinstance(pki, PkiService):
        routes.extend(PkiEndpoints(pki, max_body_bytes=cfg.server.max_body_bytes).routes())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(_maintenance(services))
        approvals = approvals_for(services)
        sweeper = asyncio.create_task(approvals.sweep_forever())  # expiries, docs/approvals.md
        # Signed audit checkpoints and retention (docs/audit.md); shipping is `aegis audit run`.
        audit = AuditMaintainer.for_control_plane(cfg, services.keyring, clock=services.clock)
        upkeep = asyncio.create_task(audit.forever())
        try:
            yield
        finally:
            task.cancel()
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upkeep
            audit.close()
            approvals.close()
            await services.aclose()

    middleware: list[Middleware] = []
    if isinstance(pki, PkiService):
        # Transport identity (docs/pki.md): the client certificate of this connection, or one a
        # trusted proxy forwarded, is validated before any route; the token endpoint binds to it.
        p = cfg.pki
        middleware.append(
            Middleware(
                PeerCertificateMiddleware,
                validator=pki.validator(),
                trusted_proxies=p.trusted_proxies,
                mode=p.xfcc_mode,
                header=p.xfcc_header,
                required=lambda path: False,
                self_signed_ok=lambda path: path == "/oauth/token",
                listener="control_plane",
            )
        )
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={HTTPException: _router_refusal},
    )
    app.state.services = services
    return app


#: The OAuth endpoints' names in ``aegis_oauth_rejections_total``; any other path counts as
#: ``other`` (a bounded label, whatever paths callers try).
_ENDPOINTS = {"/oauth/token": "token", "/oauth/introspect": "introspect", "/oauth/revoke": "revoke"}
_ROUTER_CODES = {404: "not_found", 405: "method_not_allowed"}


async def _router_refusal(request: Request, exc: Exception) -> Response:
    """What the router refuses (an unknown path, a method a route does not take), typed and
    counted as every other refusal: Starlette's default is plain text, uncounted."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = _ROUTER_CODES.get(status, "invalid_request")
    spec = spec_for(code)
    message = (
        "no such path on the control plane" if status == 404
        else f"method {request.method[:16]} is not allowed here" if status == 405
        else "the request cannot be served"
    )  # fmt: skip
    count_rejection(_ENDPOINTS.get(request.url.path, "other"), code)
    log_event("control_plane.refused", status=status, code=code)
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
    body = {"code": code, "message": message, "error": spec.oauth_error,
            "error_description": message}  # fmt: skip
    return JSONResponse(body, status_code=status, headers=headers)


def app_from_config() -> Starlette:
    """ASGI factory for ``uvicorn --factory --no-proxy-headers aegis.server.app:app_from_config``
    (reads ``$AEGIS_CONFIG`` or ``./aegis.yaml``), for running the control plane under any ASGI
    server. Turn the server's own forwarded-header handling off, as ``aegis up`` does: uvicorn
    otherwise rewrites the client address from ``X-Forwarded-For`` sent from 127.0.0.1, and the
    trusted-proxy checks (forwarded client certificates) judge by that address."""
    from aegis.config import load_config
    from aegis.server.services import build_services

    return create_app(build_services(load_config()))

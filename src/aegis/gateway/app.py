"""The gateway ASGI application (RFC 9110 reverse proxy): the proxy front door, ``/metrics`` and
``/healthz``, built from the control-plane services and the ``gateway:`` settings.

:func:`build_pipeline` is the one place the data plane is wired: the access-token verifier for the
gateway's audience, the DPoP verifier (window and nonces from ``gateway:``, replay store shared with
the token endpoint), the registry cache and revocation store, delegation rules, the active policies
per tenant/environment (with the allow-list fallback), the attester (the key ring's active key) and
the audit log. When the internal CA exists, client certificates are validated before any route
(``aegis.pki.middleware``) and the verified peer reaches the pipeline; without it no
certificate-bound token can pass (fail closed).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, cast

from cryptography.x509.oid import ExtendedKeyUsageOID
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount
from starlette.routing import Route as StarletteRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aegis.approvals.wiring import approvals_for
from aegis.audit.attest import Attester
from aegis.audit.log import AuditLog
from aegis.config import GatewaySettings
from aegis.errors import AegisError
from aegis.gateway.approval_gate import ApprovalGate
from aegis.gateway.context import METHODS
from aegis.gateway.pipeline import ApprovalHook, LimitsHook, Pipeline
from aegis.gateway.policies import PolicyDirectory
from aegis.gateway.proxy import ReverseProxy
from aegis.pki.middleware import PeerCertificateMiddleware
from aegis.pki.renewal import CertificateManager
from aegis.pki.service import PkiService
from aegis.policy.store import PolicyStore, SqlPolicyStore
from aegis.server.services import Services
from aegis.telemetry.metrics import count_decision
from aegis.telemetry.scrape import metrics_endpoint
from aegis.tokens.chain import ChainRules
from aegis.tokens.dpop import DpopVerifier, NonceSource
from aegis.tokens.verifier import AccessTokenVerifier

__all__ = ["METHODS", "OWN_PATHS", "GatewayApp", "build_pipeline", "create_gateway_app"]


def build_pipeline(
    services: Services,
    settings: GatewaySettings,
    *,
    policy_store: PolicyStore | None = None,
    audit: AuditLog | None = None,
    limits: LimitsHook | None = None,
    approvals: ApprovalHook | None = None,
) -> Pipeline:
    cfg, clock = services.config, services.clock
    # Keys rotated by the control plane (another process, or this one) reach the gateway's
    # verifier and attester within keys.reload_interval.
    services.keyring.refresh_in_background(cfg.keys.reload_interval)
    key = settings.nonce_key(cfg.base_dir)
    dpop = DpopVerifier(
        services.replay,
        clock=clock,
        iat_window=settings.dpop_iat_window,
        future_skew=settings.dpop_future_skew,
        nonces=None
        if key is None
        else NonceSource(
            key, clock, lifetime=settings.dpop_nonce_lifetime, skew=settings.dpop_future_skew
        ),
    )
    tok = cfg.tokens
    verifier = AccessTokenVerifier(
        services.keyring.public_key,
        issuer=cfg.issuer,
        audience=settings.audience,
        clock=clock,
        leeway=float(tok.leeway),
        max_lifetime=float(tok.max_lifetime),
    )
    exchanger = services.tokens.exchanger
    rules = (
        exchanger.rules
        if exchanger is not None
        else ChainRules(issuer=cfg.issuer, service_keys=services.keyring.public_key)
    )
    store = policy_store if policy_store is not None else SqlPolicyStore(cfg.database_url())
    audit = audit if audit is not None else AuditLog(cfg.database_url(), clock=clock)
    # approval_needed holds the call in the approval service (docs/approvals.md).
    gate = (
        approvals
        if approvals is not None
        else ApprovalGate(approvals_for(services, audit=audit), services.cache)
    )
    return Pipeline(
        verifier=verifier,
        dpop=dpop,
        replay=services.replay,
        cache=services.cache,
        revocation=services.revocation,
        chain_rules=rules,
        policies=PolicyDirectory(
            store,
            clock=clock,
            interval=settings.policy_poll_interval,
            allow=settings.allow,
            background=True,  # polls on the directory's thread, not the event loop
        ),
        attester=Attester(services.keyring, issuer=cfg.issuer),
        audit=audit,
        clock=clock,
        public_url=settings.public_url,
        limits=limits,
        approvals=gate,
        mcp_session_idle=settings.mcp_session_idle,
        mcp_sessions_per_agent=settings.mcp_sessions_per_agent,
    )


def create_gateway_app(
    services: Services, gateway_config: GatewaySettings, *, pipeline: Pipeline | None = None
) -> Starlette:
    pipeline = pipeline or build_pipeline(services, gateway_config)
    pki = services.extras.get("pki")
    certificates = _gateway_certificates(services, pki)
    proxy = ReverseProxy(
        pipeline,
        gateway_config,
        upstream_tls=certificates.client_context if certificates is not None else None,
        upstream_check=_upstream_check(cast(PkiService, pki)) if certificates else None,
        pinned_tls=certificates.pinned_client_context if certificates is not None else None,
    )

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes: list[Any] = [
        StarletteRoute("/healthz", healthz, methods=["GET"]),
        StarletteRoute(
            "/metrics",
            metrics_endpoint(
                gateway_config.metrics_clients,
                "gateway.metrics_clients",
                proxies=(
                    *services.config.pki.trusted_proxies,
                    *gateway_config.ext_authz.trusted_proxies,
                ),
            ),
            methods=["GET"],
        ),
        # Everything else is the proxy, a plain ASGI app (it answers 405 to other methods).
        Mount("", app=proxy),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if certificates is not None:
            await certificates.start()  # the first certificate before any connection
        await proxy.start()
        try:
            yield
        finally:
            await proxy.close()
            if certificates is not None:
                await certificates.stop()

    middleware: list[Middleware] = []
    front: ASGIApp = proxy
    if isinstance(pki, PkiService):
        p = services.config.pki
        peer_check: dict[str, Any] = {
            "validator": pki.validator(),
            "trusted_proxies": p.trusted_proxies,
            "mode": p.xfcc_mode,
            "header": p.xfcc_header,
            "required": lambda path: False,
            "listener": "gateway",
            # Refused certificates are audited with their serial and SPIFFE ID.
            "audit": pipeline.audit.append_async if pipeline.audit is not None else None,
        }
        middleware.append(Middleware(PeerCertificateMiddleware, **peer_check))
        front = cast(ASGIApp, PeerCertificateMiddleware(proxy, **peer_check))
    app = GatewayApp(
        front, routes=routes, lifespan=lifespan, middleware=middleware, pipeline=pipeline
    )
    app.state.proxy = proxy
    # Set when pki.gateway_agent is: the listener serves mTLS with certificates.server_context.
    app.state.certificates = certificates
    return app


#: Paths the gateway answers itself; every other HTTP request is a call for the proxy.
OWN_PATHS: Final = frozenset({"/healthz", "/metrics"})


class GatewayApp(Starlette):
    """The gateway application. ``/healthz``, ``/metrics`` and the lifespan go through Starlette;
    every other HTTP request goes straight to ``front`` (the proxy, behind the peer-certificate
    check when there is a CA), without Starlette's exception layers and router on a path that
    gains nothing from them and is paid on every proxied call. An unexpected error there is
    answered ``500 server_error`` (JSON) if nothing was sent yet, then raised to the server,
    which logs it, as Starlette's own error layer would. That 500 is the gateway's own answer:
    audited (``gateway.refused``), with a decision id and the gateway's mark."""

    def __init__(self, front: ASGIApp, *, pipeline: Pipeline | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._front = front
        self._pipeline = pipeline

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OWN_PATHS:
            return await super().__call__(scope, receive, send)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._front(scope, receive, tracked)
        except Exception:
            if not started:
                await self._failed(scope, receive, send)
            raise

    async def _failed(self, scope: Scope, receive: Receive, send: Send) -> None:
        why = "the gateway failed to handle this call"
        detail = {"error": "server_error", "code": "server_error", "error_description": why}
        headers: dict[str, str] = {"cache-control": "no-store"}
        try:
            assert self._pipeline is not None
            fields = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            client = scope.get("client")
            result = await self._pipeline.refuse_unrouted(
                door="gateway", method=str(scope.get("method", "")),
                target=(scope.get("raw_path") or b"").decode("latin-1"),
                host=fields.get("host", ""), client=client[0] if client else None,
                status=500, code="server_error", message=why,
                authorization=fields.get("authorization"),
            )  # fmt: skip
            headers = result.headers
            detail["decision_id"] = result.decision_id
        except Exception:  # the answer goes out all the same, unrecorded; the error is raised on
            count_decision("deny", "server_error")
        await JSONResponse(detail, status_code=500, headers=headers)(scope, receive, send)


def _gateway_certificates(services: Services, pki: object) -> CertificateManager | None:
    """The gateway's own certificate (``pki.gateway_agent``), issued by the CA this process
    holds and renewed at two thirds of its lifetime; None without a CA or without the setting."""
    agent = services.config.pki.gateway_agent
    if not isinstance(pki, PkiService) or agent is None:
        return None
    return CertificateManager(
        "",
        None,
        clock=services.clock,
        trust_pem=pki.ca.bundle_pem(),
        serving=True,
        require_client_cert=False,  # routes decide (GatewayRoute.require_client_cert)
        enrol=pki.local_enrolment(agent),
        outbound_epoch=_revocations(pki),
    )


def _revocations(pki: PkiService) -> Callable[[], object]:
    """The certificate store's revocation mark, read about once a second on a worker thread.
    When it moved (a revocation by this process or any other), the store's cached records are
    dropped first, so the checks of the new connections read the revocation itself."""
    seen: list[object] = [None]

    def mark() -> object:
        now = pki.store.revocation_mark()
        if now != seen[0]:
            seen[0] = now
            pki.store.forget()
        return now

    return mark


def _upstream_check(pki: PkiService) -> Callable[[bytes | None], Awaitable[None]]:
    """What an https upstream's certificate must pass on each new connection, after the
    handshake and before the request is sent: beyond the chain OpenSSL verified (and the pinned
    SPIFFE ID), issued by this CA and on record, not revoked, serverAuth, and its agent and
    tenant active (``PeerValidator``). A revoked or quarantined tool no longer receives calls.
    Records not cached are read on a worker thread, never on the event loop."""
    validator = pki.validator(eku=ExtendedKeyUsageOID.SERVER_AUTH)

    async def check(der: bytes | None) -> None:
        if not der:
            raise ssl.SSLCertVerificationError("the upstream presented no certificate")
        try:
            await validator.validate_async(der, source="upstream")
        except AegisError as exc:
            raise ssl.SSLCertVerificationError(
                f"the upstream's certificate is refused: {exc.message} ({exc.code})"
            ) from None

    return check

"""HTTP face of the authorization server: token (RFC 6749), introspection (RFC 7662), revocation
(RFC 7009), JWKS (RFC 7517) and metadata (RFC 8414), as plain Starlette routes.

Protocol rules enforced here, at the boundary: form-encoded bodies only, bounded in size; no
parameter repeated (RFC 6749 §3.2), except ``resource`` (RFC 8707 §2); error bodies per RFC 6749
§5.2 with ``WWW-Authenticate`` on 401s; ``Cache-Control: no-store`` on every token response. Every
rejection is counted by its stable code and logged without the token or secret.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aegis.errors import AccessDenied, AegisError, ClientAuthError, InvalidRequest
from aegis.oauth.client_auth import AuthenticatedClient, ClientAuthenticator
from aegis.oauth.service import CLIENT_CREDENTIALS, TokenService
from aegis.pki.binding import X5T_S256, certificate_to_bind
from aegis.pki.middleware import client_cert_from_scope, peer_from_scope
from aegis.registry.service import RegistryService
from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import TOKEN_ENDPOINT_SECONDS, TOKENS_ISSUED, count_rejection
from aegis.tokens.dpop import CheckedProof
from aegis.tokens.exchange import ACCESS_TOKEN_TYPE, TOKEN_EXCHANGE
from aegis.types import AdminKey, AdminRole, Agent, AgentStatus, TenantStatus

__all__ = ["DpopHook", "OAuthEndpoints", "read_form"]

_NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_FORM: Final = "application/x-www-form-urlencoded"
#: A hook that checks a DPoP proof sent to the token endpoint (None: no proof), to be spent once
#: the whole request is valid.
DpopHook = Callable[[Request], Awaitable[CheckedProof | None]]
#: A proof refusal at the token endpoint: 400 (RFC 9449 §5, after RFC 6749 §5.2, where only
#: invalid_client is a 401), never the Basic challenge of a client authentication failure.
_PROOF_REFUSED: Final = "invalid_dpop_proof"


async def read_form(request: Request, max_bytes: int) -> tuple[dict[str, str], list[str]]:
    """Parse a bounded urlencoded body. Returns the single-valued parameters and all ``resource``s."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != _FORM:
        raise InvalidRequest(f"content type must be {_FORM}")
    declared = request.headers.get("content-length")
    if declared is not None and (
        not (declared.isascii() and declared.isdigit()) or int(declared) > max_bytes
    ):
        raise AegisError(f"request body larger than {max_bytes} bytes", code="payload_too_large")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise AegisError(
                f"request body larger than {max_bytes} bytes", code="payload_too_large"
            )
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest("request body is not valid form encoding") from exc
    form: dict[str, str] = {}
    resources: list[str] = []
    for name, value in pairs:
        if name == "resource":
            resources.append(value)
        elif name in form:
            raise InvalidRequest(f"parameter {name!r} is repeated")
        else:
            form[name] = value
    return form, resources


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class OAuthEndpoints:
    def __init__(
        self,
        *,
        issuer_url: str,
        tokens: TokenService,
        authenticator: ClientAuthenticator,
        registry: RegistryService,
        jwks: Callable[[], dict[str, Any]],
        max_body_bytes: int,
        dpop: DpopHook | None = None,
    ) -> None:
        self.issuer_url = issuer_url
        self._tokens = tokens
        self._auth = authenticator
        self._registry = registry
        self._jwks = jwks
        self._max = max_body_bytes
        self.dpop = dpop

    def routes(self) -> list[Route]:
        return [
            Route("/oauth/token", self.token, methods=["POST"]),
            Route("/oauth/introspect", self.introspect, methods=["POST"]),
            Route("/oauth/revoke", self.revoke, methods=["POST"]),
            Route("/.well-known/jwks.json", self.jwks, methods=["GET"]),
            Route("/.well-known/oauth-authorization-server", self.metadata, methods=["GET"]),
        ]

    # -- errors ----------------------------------------------------------------------------

    def _error(self, endpoint: str, exc: AegisError, request: Request) -> JSONResponse:
        spec = exc.spec
        count_rejection(endpoint, exc.code)
        log_event(
            "oauth.rejected",
            level=logging.WARNING,
            endpoint=endpoint,
            code=exc.code,
            reason=exc.details.get("detail", exc.message),
            source=_client_ip(request),
        )
        headers = dict(_NO_STORE)
        status = 400 if exc.code == _PROOF_REFUSED else spec.status
        if status == 401:
            # RFC 6749 §5.2: a 401 carries a WWW-Authenticate challenge for the schemes we accept.
            headers["WWW-Authenticate"] = 'Basic realm="aegis", charset="UTF-8"'
        if exc.code == "rate_limited":
            headers["Retry-After"] = "60"
        elif exc.code == "credentials_settling":
            headers["Retry-After"] = str(exc.details.get("retry_after", 1))
        if spec.status >= 500 and exc.code == "server_error":
            message = "internal error"
        else:
            message = exc.message
        body = {"error": spec.oauth_error, "error_description": message}
        return JSONResponse(body, status_code=status, headers=headers)

    # -- token -----------------------------------------------------------------------------

    async def _proof(self, request: Request) -> CheckedProof | None:
        """The request's checked DPoP proof (not yet spent), or None if it sent none."""
        proof = await self.dpop(request) if self.dpop is not None else None
        if proof is None and "dpop" in request.headers:
            raise AegisError("DPoP is not enabled on this server", code="invalid_dpop_proof")
        return proof

    async def token(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            form, resources = await read_form(request, self._max)
            grant = form.get("grant_type")
            if not grant:
                raise InvalidRequest("grant_type is required")
            if grant == TOKEN_EXCHANGE and self._tokens.exchanger is not None:
                return await self._token_exchange(request, form, resources, started)
            if grant != CLIENT_CREDENTIALS:
                raise AegisError(
                    f"grant_type {grant!r} is not supported", code="unsupported_grant_type"
                )
            peer, cert = peer_from_scope(request.scope), client_cert_from_scope(request.scope)
            auth = await self._auth.authenticate(
                form,
                request.headers.get("authorization"),
                _client_ip(request),
                peer=peer,
                client_cert=cert,
                consume=False,
            )
            req = self._tokens.parse_request(form, resources)
            proof = await self._proof(request)
            jkt = proof.jkt if proof is not None else None
            if auth.client.dpop_bound and jkt is None:
                raise InvalidRequest(
                    "this client must send a DPoP proof", code="invalid_dpop_proof"
                )
            if jkt is not None:
                req = type(req)(req.scopes, req.audiences, req.lifetime, {"jkt": jkt})
            elif (bound := certificate_to_bind(auth.client, auth.method, peer, cert)) is not None:
                # RFC 8705 §3: bind the token to the certificate of this mutual-TLS connection.
                req = type(req)(req.scopes, req.audiences, req.lifetime, {X5T_S256: bound})
            issued = self._tokens.client_credentials(auth.client, req, read_at=auth.read_at)
            # Only now, with the request fully validated, are the proof's and the assertion's
            # jtis spent; a replayed assertion counts against the address and the client.
            if proof is not None:
                await proof.spend()
            await self._auth.consume(auth, _client_ip(request))
        except AegisError as exc:
            return self._error("token", exc, request)
        TOKENS_ISSUED.labels(grant_type=CLIENT_CREDENTIALS, auth_method=auth.method.value).inc()
        TOKEN_ENDPOINT_SECONDS.observe(time.perf_counter() - started)
        body = {
            "access_token": issued.token,
            "token_type": "DPoP" if jkt else "Bearer",
            "expires_in": issued.expires_in,
            "scope": issued.claims["scope"],
        }
        return JSONResponse(body, headers=_NO_STORE)

    async def _token_exchange(
        self, request: Request, form: dict[str, str], resources: list[str], started: float
    ) -> Response:
        """RFC 8693 token exchange: delegation grants and on-behalf-of (aegis.tokens.exchange)."""
        assert self._tokens.exchanger is not None
        peer, cert = peer_from_scope(request.scope), client_cert_from_scope(request.scope)
        proofs: list[CheckedProof] = []

        async def confirm(auth: AuthenticatedClient) -> dict[str, Any] | None:
            # Inside the exchange, so that a refused proof is recorded as every refusal is.
            proof = await self._proof(request)
            if proof is not None:
                proofs.append(proof)
                return {"jkt": proof.jkt}
            if auth.client.dpop_bound:
                raise InvalidRequest(
                    "this client must send a DPoP proof", code="invalid_dpop_proof"
                )
            bound = certificate_to_bind(auth.client, auth.method, peer, cert)
            return {X5T_S256: bound} if bound is not None else None

        async def spend() -> None:
            for proof in proofs:
                await proof.spend()

        issued, auth = await self._tokens.exchanger.exchange(
            form,
            resources,
            authorization=request.headers.get("authorization"),
            source=_client_ip(request),
            confirm=confirm,
            spend=spend,
        )
        jkt = proofs[0].jkt if proofs else None
        TOKENS_ISSUED.labels(grant_type=TOKEN_EXCHANGE, auth_method=auth.method.value).inc()
        TOKEN_ENDPOINT_SECONDS.observe(time.perf_counter() - started)
        body = {
            "access_token": issued.token,
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "DPoP" if jkt else "Bearer",
            "expires_in": issued.expires_in,
            "scope": issued.claims["scope"],
        }
        return JSONResponse(body, headers=_NO_STORE)

    # -- introspection and revocation ------------------------------------------------------

    async def _caller(
        self, request: Request, form: dict[str, str], *, active: bool = False
    ) -> tuple[str | None, str | None, AdminKey | None]:
        """(tenant, client_id, admin key) of the caller. Admins present an admin API key.
        ``active``: a client's agent and tenant must be active (:meth:`_active_caller`)."""
        authz = request.headers.get("authorization", "")
        if authz[:7].lower() == "bearer " and authz[7:].strip().startswith("aegis_ak_"):
            key = self._registry.authenticate_admin(authz[7:].strip())
            return None, None, key
        auth = await self._auth.authenticate(form, authz or None, _client_ip(request))
        agent = self._registry.store.get_agent(auth.client.agent_id)
        if active:
            self._active_caller(agent)
        return agent.tenant_id, auth.client.client_id, None

    def _active_caller(self, agent: Agent) -> None:
        """A client may introspect its tenant's tokens only while its agent and tenant are
        active, as it may get tokens: a suspended, quarantined or retired agent must not keep
        an oracle telling which of its tenant's tokens (a stolen one, say) are live, and whose.
        (Revoking stays open to it: it can only end its own tokens.)"""
        if agent.status is not AgentStatus.ACTIVE:
            raise ClientAuthError(
                f"agent {agent.id} is {agent.status.value}; its clients cannot introspect tokens"
            )
        if self._registry.store.get_tenant(agent.tenant_id).status is not TenantStatus.ACTIVE:
            raise ClientAuthError("the agent's tenant is suspended; its clients cannot introspect")

    def _introspecting(self, tenant: str | None, client_id: str | None) -> str | None:
        """``tenant`` while the client ``client_id`` may introspect its tokens (its agent and
        tenant active), else None."""
        if tenant is None or client_id is None:
            return None
        try:
            client = self._registry.store.get_client(client_id)
            self._active_caller(self._registry.store.get_agent(client.agent_id))
        except ClientAuthError:
            return None
        return tenant

    async def introspect(self, request: Request) -> Response:
        try:
            form, _ = await read_form(request, self._max)
            tenant, _, _ = await self._caller(request, form, active=True)
            if "token" not in form:
                raise InvalidRequest("token is required")
            result = await self._tokens.introspect(form["token"], tenant=tenant)
        except ClientAuthError as exc:
            if exc.code == "unauthenticated":
                exc = ClientAuthError(exc.message)
            return self._error("introspect", exc, request)
        except AegisError as exc:
            return self._error("introspect", exc, request)
        return JSONResponse(result, headers=_NO_STORE)

    async def revoke(self, request: Request) -> Response:
        try:
            form, _ = await read_form(request, self._max)
            tenant, client_id, admin = await self._caller(request, form)
            who = f"admin_key:{admin.key_id}" if admin is not None else f"client:{client_id}"
            if admin is not None and admin.role is AdminRole.AUDITOR:
                # As on the admin API: an auditor key reads, it never changes anything.
                raise AccessDenied(
                    "an auditor key may only read; it cannot revoke tokens", code="forbidden"
                )
            if "token" not in form:
                raise InvalidRequest("token is required")
            # Told that another client's token is live only where introspection would tell it.
            revoked = await self._tokens.revoke(
                form["token"], client_id=client_id, tenant=self._introspecting(tenant, client_id)
            )
            if revoked is not None:  # who ended which token, as every admin change is recorded
                self._registry.record(
                    "token.revoked", who, f"agent:{revoked.agent_id}", revoked.tenant,
                    jti=revoked.jti, client=revoked.client_id, exp=revoked.exp,
                )  # fmt: skip
        except ClientAuthError as exc:
            if exc.code == "unauthenticated":
                exc = ClientAuthError(exc.message)
            return self._error("revoke", exc, request)
        except AegisError as exc:
            return self._error("revoke", exc, request)
        return Response(status_code=200, headers=_NO_STORE)

    # -- discovery -------------------------------------------------------------------------

    async def jwks(self, request: Request) -> Response:
        # Short max-age: the key ring publishes a next key well before it signs (publish_lead).
        return JSONResponse(self._jwks(), headers={"Cache-Control": "public, max-age=60"})

    async def metadata(self, request: Request) -> Response:
        base = self.issuer_url
        return JSONResponse(
            {
                "issuer": base,
                "token_endpoint": f"{base}/oauth/token",
                "jwks_uri": f"{base}/.well-known/jwks.json",
                "introspection_endpoint": f"{base}/oauth/introspect",
                "revocation_endpoint": f"{base}/oauth/revoke",
                "grant_types_supported": [CLIENT_CREDENTIALS]
                + ([TOKEN_EXCHANGE] if self._tokens.exchanger is not None else []),
                "response_types_supported": [],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                    "private_key_jwt",
                    "tls_client_auth",
                    "self_signed_tls_client_auth",
                ],
                "tls_client_certificate_bound_access_tokens": True,
                "token_endpoint_auth_signing_alg_values_supported": ["EdDSA", "Ed25519", "ES256"],
                "introspection_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                    "private_key_jwt",
                ],
                "revocation_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                    "private_key_jwt",
                ],
                "dpop_signing_alg_values_supported": ["EdDSA", "ES256"],
                "authorization_response_iss_parameter_supported": False,
            },
            headers={"Cache-Control": "public, max-age=300"},
        )

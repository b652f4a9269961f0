"""HTTP external authorization: Envoy's ext_authz HTTP service mode and nginx ``auth_request``.

The answer is the status alone, plus headers a proxy copies: **200** allows, with the identity for
the upstream as ``x-aegis-agent-id``, ``x-aegis-tenant``, ``x-aegis-decision-id`` and
``x-aegis-attestation`` (nginx: ``auth_request_set $aegis_agent $upstream_http_x_aegis_agent_id``;
Envoy: ``allowed_upstream_headers``), and in Envoy mode ``x-envoy-auth-headers-to-remove`` naming
the credentials, every other incoming ``x-aegis-*`` field and every forwarding claim Envoy does not
set itself (``Forwarded``, ``X-Real-IP``, ``X-Forwarded-Host`` ...); a refusal answers its own status (401 with
``WWW-Authenticate``, 403, 503 with ``Retry-After`` ...) and the JSON body
``{code, message, decision_id, ...}``. nginx turns a subrequest status other than 2xx, 401 and 403
into a 500: still a denial.

Where the original request comes from (``gateway.ext_authz.http_mode``):

* ``envoy`` -- the check request *is* the original one: its method, its path (after Envoy's
  ``path_prefix``, configured here as ``path_prefix``), its headers, and its body when Envoy is
  configured ``with_request_body``.
* ``nginx`` -- the check is a subrequest; the original method and URI arrive in
  ``original_method_header`` / ``original_uri_header`` (``proxy_set_header X-Original-URI
  $request_uri``). They are believed only from ``trusted_proxies``; any other peer is refused. nginx
  never passes the body, so it is ``streamed`` (unseen) and a policy that reads it refuses.

From a trusted proxy only: ``x-forwarded-proto``, the rightmost ``x-forwarded-for`` entry, in
nginx mode ``x-forwarded-host``, and the client certificate (Envoy ``x-forwarded-client-cert``,
nginx ``x-ssl-client-cert`` from ``$ssl_client_escaped_cert``). From anyone else they are ignored.
The certificate header is read only when ``pki.xfcc_mode`` names the same proxy as ``http_mode``:
an ``auth_request`` subrequest carries every header the client sent, so unless nginx is known to
overwrite ``x-ssl-client-cert`` the value is the caller's choice of (public) certificate. In Envoy
mode the check request's ``Host`` already is the original ``:authority``; Envoy never sets
``x-forwarded-host``, so any such value came from the client and is ignored. Policy sees the door's
own ``x-forwarded-for``, ``-proto`` and ``-host`` from these, never the fields as received.

Envoy sends the body it buffered (``with_request_body``) in the check request. With
``pack_as_bytes: false`` (Envoy's default) it is the UTF-8-sanitised text of the body (an invalid
byte becomes ``!``), not the forwarded bytes, and nothing here can tell the two apart: configure
``pack_as_bytes: true`` when a policy reads bodies.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute
from starlette.routing import WebSocketRoute, request_response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from aegis.config import ExtAuthzSettings
from aegis.gateway.evidence import Result
from aegis.gateway.ext_authz import (
    CREDENTIAL_HEADERS,
    Asked,
    CheckedRequest,
    ExtAuthz,
    TrustedPeers,
    refusal_body,
    removed_upstream,
)
from aegis.gateway.fields import UPGRADE_REFUSED
from aegis.pki.forwarded import ENVOY_HEADER, NGINX_HEADER
from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import count_decision

__all__ = ["HttpExtAuthz", "create_ext_authz_http_app"]

_PARTIAL_BODY: Final = "x-envoy-auth-partial-body"
#: Envoy's HTTP ext_authz response header naming request headers to remove before the upstream.
_HEADERS_TO_REMOVE: Final = "x-envoy-auth-headers-to-remove"
#: Fields that describe the check request itself, or certificates read separately: never handed
#: to the pipeline as the original request's headers. (Forwarding claims are replaced by the
#: door's own values for policy: ExtAuthz.check.)
_CHECK_ONLY: Final = frozenset(
    {"content-length", "transfer-encoding", "connection", _PARTIAL_BODY, ENVOY_HEADER, NGINX_HEADER}
)


def _one(request: Request, name: str) -> str | None:
    values = request.headers.getlist(name)
    return values[0] if len(values) == 1 else None


#: The statuses nginx's ``auth_request`` passes on; it answers any other with its own 500 page.
_NGINX_PASSES: Final = frozenset({401, 403})


def _for_nginx(body: dict[str, Any], result: Result) -> Response:
    """A refusal as nginx's ``auth_request`` can pass it on: 401 or 403 (any other status would
    become nginx's 500), with the real status in ``X-Aegis-Status`` and the JSON body in
    ``X-Aegis-Error`` (ASCII), for the configuration's ``error_page`` to answer with
    (docs/gateway.md): a 503 stays a 503 a client retries, a 413 a 413."""
    status = result.status if result.status in _NGINX_PASSES else 403
    headers = {
        **result.headers,
        "x-aegis-status": str(result.status),
        "x-aegis-error": json.dumps(body, separators=(",", ":"), ensure_ascii=True),
    }
    return JSONResponse(body, status, headers)


class HttpExtAuthz:
    def __init__(self, ext: ExtAuthz, settings: ExtAuthzSettings) -> None:
        self._ext, self._settings = ext, settings
        self._trusted = TrustedPeers(settings.trusted_proxies)
        self._facts = frozenset(
            {settings.original_uri_header, settings.original_method_header}
            if settings.http_mode == "nginx"
            else ()
        )

    async def handle(self, request: Request) -> Response:
        checked: list[CheckedRequest] = []
        try:
            result = await self._check(request, checked)
        except Exception as exc:  # a bug is a denial, never an allow
            log_event("ext_authz.http_error", level=logging.ERROR, error=type(exc).__name__)
            result = await self._failed(request)
        if checked and await request.is_disconnected():
            # The proxy stopped waiting (its ext_authz timeout) and applied its own failure
            # mode: as at the gRPC door, a second record says the answer was never delivered.
            await self._ext.undelivered(checked[0], result)
        if result.allowed:
            headers = {**result.headers, **result.upstream_headers}
            if self._settings.http_mode == "envoy":
                # Envoy removes these from the upstream request: the credentials were for the
                # gateway, and x-aegis-* identity fields must come only from this answer.
                drop = removed_upstream(request.headers.keys(), result)
                if drop:
                    headers[_HEADERS_TO_REMOVE] = ",".join(drop)
            return Response(status_code=200, headers=headers)
        body = refusal_body(result)
        if self._settings.http_mode == "nginx":
            return _for_nginx(body, result)
        return JSONResponse(body, result.status, result.headers)

    async def _failed(self, request: Request) -> Result:
        """The door's own 500: audited (``gateway.refused``) and marked like every refusal; if
        even that fails, answered all the same, counted."""
        try:
            return await self._ext.undecided(500, "server_error", "internal error", _asked(request))
        except Exception:
            count_decision("deny", "server_error")
            return Result("", "deny", 500, "server_error", "internal error")

    async def _check(self, request: Request, checked: list[CheckedRequest]) -> Result:
        s = self._settings
        peer = request.client.host if request.client else ""
        trusted = peer in self._trusted
        seen = _asked(request)
        if s.http_mode == "nginx":
            if not trusted:
                return await self._ext.undecided(
                    403, "access_denied", "this endpoint answers trusted proxies only", seen
                )
            method = _one(request, s.original_method_header)
            target = _one(request, s.original_uri_header)
            if not method or not target:
                return await self._ext.undecided(
                    400, "invalid_request", "send one original method and one URI", seen
                )
            body: bytes | None = None
        else:
            method = request.method
            raw = (request.scope.get("raw_path") or b"").decode("latin-1")
            query = request.scope.get("query_string", b"").decode("latin-1")
            target = raw[len(s.path_prefix) :] if raw.startswith(s.path_prefix) else ""
            if not target.startswith("/"):
                return await self._ext.undecided(404, "not_found", "no route for this path", seen)
            target += f"?{query}" if query else ""
            body = await self._body(request)
        envoy = s.http_mode == "envoy"
        headers = tuple(
            (k, part)
            for k, v in ((k.lower(), v) for k, v in request.headers.items())
            if k not in _CHECK_ONLY and k not in self._facts and k != self._ext.xfcc_header
            # Envoy's check request joins a repeated field with ',': two credentials are two.
            for part in (
                [p.strip() for p in v.split(",")] if envoy and k in CREDENTIAL_HEADERS else [v]
            )
        )
        host = request.headers.get("host", "")
        scheme, client, cert = request.url.scheme, peer or None, None
        if trusted:
            if s.http_mode == "nginx":
                # Envoy's check request keeps the original :authority as its Host; only nginx's
                # subrequest needs the original host forwarded.
                host = _one(request, "x-forwarded-host") or host
            scheme = _one(request, "x-forwarded-proto") or scheme
            forwarded = request.headers.get("x-forwarded-for")
            client = forwarded.split(",")[-1].strip() if forwarded else client
            if self._ext.xfcc_mode == s.http_mode:
                default = NGINX_HEADER if s.http_mode == "nginx" else ENVOY_HEADER
                cert = _one(request, self._ext.xfcc_header or default)
        checked.append(
            CheckedRequest(
                method=method,
                target=target,
                host=host,
                scheme=scheme,
                headers=headers,
                body=body,
                certificate=cert,
                certificate_format="pem" if s.http_mode == "nginx" else "xfcc",
                client=client,
                # Envoy's HTTP check joins a repeated field into one value with ',' (nginx's
                # subrequest keeps each line): policy cannot tell "666,1" from two values.
                fields_joined=envoy,
            )
        )
        return await self._ext.check(checked[0])

    async def upgrade(self, websocket: WebSocket) -> None:
        """A check the server took for a WebSocket handshake (``Connection: upgrade``): refused
        as any request carrying ``Upgrade`` is, with the same status and JSON body where the
        server can answer a handshake with them (else closed before accepting: a 403)."""
        peer = websocket.client.host if websocket.client else None
        raw = (websocket.scope.get("raw_path") or b"").decode("latin-1")
        asked = Asked("GET", raw, websocket.headers.get("host", ""), peer)
        result = await self._ext.undecided(400, "invalid_request", UPGRADE_REFUSED, asked)
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            body = refusal_body(result)
            answer = (
                _for_nginx(body, result)
                if self._settings.http_mode == "nginx"
                else JSONResponse(body, result.status, result.headers)
            )
            return await websocket.send_denial_response(answer)
        await websocket.close(1008)

    async def _body(self, request: Request) -> bytes | None:
        """Envoy's body when it sent it whole; an empty check body says nothing (Envoy without
        ``with_request_body`` sends none), so it is unseen too."""
        if request.headers.get(_PARTIAL_BODY, "").lower() == "true":
            return None
        limit, data = self._ext.max_body_bytes, bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                break  # over the limit: refused (413) like the reverse proxy would
        return bytes(data) or None


class _EveryMethod:
    """An endpoint as an ASGI application: Starlette gives a function endpoint its GET/HEAD
    default, an application every method."""

    def __init__(self, handle: Callable[[Request], Awaitable[Response]]) -> None:
        self._app = request_response(handle)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def create_ext_authz_http_app(ext: ExtAuthz, settings: ExtAuthzSettings) -> Starlette:
    door = HttpExtAuthz(ext, settings)
    routes: list[Any] = [
        # Every method reaches the door (Envoy checks with the call's own): one outside the list
        # is refused there, counted and audited (405), not by the router's plain-text 405.
        StarletteRoute("/{path:path}", _EveryMethod(door.handle)),
        WebSocketRoute("/{path:path}", door.upgrade),
    ]
    app = Starlette(routes=routes)
    app.state.ext_authz = door
    return app


def _asked(request: Request) -> Asked:
    """What this door was asked, for the record of a refusal before any route was chosen."""
    return Asked(
        request.method,
        (request.scope.get("raw_path") or b"").decode("latin-1"),
        request.headers.get("host", ""),
        request.client.host if request.client and request.client.host else None,
        request.headers.get("authorization"),
    )

"""Envoy external authorization, gRPC (``envoy.service.auth.v3.Authorization/Check``).

Built on Envoy's own API protos (the ``xds-protos`` package) and ``grpc.aio``. A ``CheckRequest``'s
``attributes.request.http`` (method, path with query, host, scheme, headers, body) becomes a
:class:`~aegis.gateway.ext_authz.CheckedRequest`, decided by the one pipeline, and the answer is:

* **OK** (``google.rpc.Code.OK``) with ``ok_response.headers`` for the upstream (verified agent id,
  tenant, decision id, attestation; each overwriting whatever the client sent), the credentials,
  every incoming ``x-aegis-*`` field and every forwarding claim Envoy does not set itself
  (``Forwarded``, ``X-Real-IP``, ``X-Forwarded-Host`` ...) in ``headers_to_remove``, and the
  decision id and attestation in ``response_headers_to_add`` for the caller;
* **Denied** (``UNAUTHENTICATED`` for a 401, ``UNAVAILABLE`` for a 503, else
  ``PERMISSION_DENIED``) with ``denied_response``: the HTTP status, ``WWW-Authenticate`` and the
  other refusal headers, and a JSON body ``{code, message, decision_id, ...}``.

Repeated headers: with ``encode_raw_headers`` Envoy sends each occurrence (``header_map``); without
it, Envoy joins repeats with ``,``. A JWS never contains ``,``, so a joined ``Authorization`` or
``DPoP`` value is split back and two credentials are refused as two. The peer certificate
(``source.certificate``, sent with ``include_peer_certificate``), the client address and Envoy's
own ``x-forwarded-proto`` are believed only when the gRPC peer is in
``gateway.ext_authz.trusted_proxies``. Policy is shown that ``x-forwarded-proto`` (one value,
``http`` or ``https``) rather than ``http.scheme``: for HTTP/2 and HTTP/3 Envoy takes the scheme
from the client's ``:scheme``, which an h2c client on a plaintext listener sets to ``https``,
while its ``x-forwarded-proto`` names the connection, as the upstream is told.

Body (``with_request_body``): the call is decided on the body only when Envoy sent it whole (not
``x-envoy-auth-partial-body: true``, length equal to ``content-length``) as bytes in ``raw_body``
(``pack_as_bytes: true``); otherwise, and whenever only the UTF-8-sanitised string ``body`` came,
it is marked ``streamed`` and a policy that reads bodies refuses it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from functools import partial
from typing import Final
from urllib.parse import unquote

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

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
from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import count_decision

__all__ = ["AuthorizationService", "check_to_request", "start_grpc_server"]

_OVERWRITE: Final = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_PARTIAL_BODY: Final = "x-envoy-auth-partial-body"
#: The values of an ``x-forwarded-proto`` Envoy sets from the downstream connection.
_PROTOS: Final = frozenset({"http", "https"})
#: Caller-facing headers copied from the decision onto an allowed answer.
_RESPONSE_HEADERS: Final = ("x-aegis-decision-id", "x-aegis-attestation")


def peer_host(peer: str) -> str:
    """The address in a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``, ``unix:...``);
    gRPC writes the brackets of an IPv6 peer percent-encoded (``ipv6:%5B::1%5D:5``)."""
    kind, _, rest = peer.partition(":")
    rest = unquote(rest)
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return ""


def _headers(
    http: external_auth_pb2.attribute__context__pb2.AttributeContext.HttpRequest,
) -> tuple[tuple[str, str], ...]:
    if http.HasField("header_map"):
        raw = [
            (h.key.lower(), h.raw_value.decode("latin-1") if h.raw_value else h.value)
            for h in http.header_map.headers
        ]
    else:
        raw = [(k.lower(), v) for k, v in http.headers.items()]
    out: list[tuple[str, str]] = []
    for name, value in raw:
        if name.startswith(":"):
            continue  # pseudo-headers are given as method, path, host and scheme
        if name in CREDENTIAL_HEADERS and "," in value:
            out.extend((name, part.strip()) for part in value.split(","))
        else:
            out.append((name, value))
    return tuple(out)


def _body(
    http: external_auth_pb2.attribute__context__pb2.AttributeContext.HttpRequest,
    headers: tuple[tuple[str, str], ...],
    *,
    buffered: bool = False,
) -> bytes | None:
    """The body when Envoy sent all of it, else None (a body policy must not decide without).

    Envoy removes ``Transfer-Encoding`` before any filter runs, so a chunked HTTP/1.1 body it did
    not buffer arrives as a request with no ``content-length`` and no body, as an HTTP/2 one may:
    nothing seen is proof of no body only when Envoy buffers every body (``buffered``: its
    ``with_request_body`` on every route, ``gateway.ext_authz.envoy_buffers_body``).

    Only ``raw_body`` (``pack_as_bytes: true``) holds the bytes Envoy forwards. The string ``body``
    is UTF-8-sanitised (each invalid byte becomes ``!``, the length unchanged), so deciding,
    digesting or attesting on it would vouch for bytes the upstream never receives: a body sent
    only as a string is treated as unseen.
    """
    if http.body and not http.raw_body:
        return None
    seen: bytes = http.raw_body
    values = dict(headers)
    if values.get(_PARTIAL_BODY, "").lower() == "true":
        return None
    declared = values.get("content-length")
    if declared is not None:
        whole = declared.isascii() and declared.isdigit()  # "²".isdigit(), but int("²") fails
        return seen if whole and int(declared) == len(seen) else None
    if "transfer-encoding" in values:
        return seen or None
    return seen if seen or buffered else None


def _envoy_proto(headers: tuple[tuple[str, str], ...]) -> str | None:
    """Envoy's ``x-forwarded-proto`` when it is one value, ``http`` or ``https``, else None."""
    values = [v for k, v in headers if k == "x-forwarded-proto"]
    return values[0] if len(values) == 1 and values[0] in _PROTOS else None


def _two_hosts(authority: str, headers: tuple[tuple[str, str], ...]) -> str | None:
    """Why a request naming a ``host`` field beside its ``:authority`` is refused, or None.

    Envoy carries an HTTP/1.1 Host as ``:authority``; an HTTP/2 or HTTP/3 client may send a
    ``host`` field as well (RFC 9113 §8.3.1), which Envoy passes on. The decision is made on
    ``:authority``, while an upstream may read the other (a Host an HTTP/1.1 upstream is sent
    from it, or the field itself): two hosts that differ are refused, not guessed between."""
    named = [v for k, v in headers if k == "host"]
    if not named or all(v.lower() == authority.lower() for v in named):
        return None
    return (
        "the request names a host field other than its :authority; send one host (the "
        ":authority alone, or a host field equal to it)"
    )


def check_to_request(
    request: external_auth_pb2.CheckRequest, *, trusted: bool, buffered: bool = False
) -> CheckedRequest:
    """The original request described by a ``CheckRequest``; forwarded facts (certificate,
    client address, the connection's scheme) are read only when the sender is a trusted proxy;
    ``buffered`` says Envoy buffers every body (see :func:`_body`)."""
    attrs = request.attributes
    http = attrs.request.http
    headers = _headers(http)
    certificate: str | None = None
    client: str | None = None
    proto: str | None = None
    if trusted:
        certificate = attrs.source.certificate or None  # URL-encoded PEM
        client = attrs.source.address.socket_address.address or None
        proto = _envoy_proto(headers)
    return CheckedRequest(
        refused=_two_hosts(http.host, headers),
        fields_joined=not http.HasField("header_map"),
        method=http.method,
        target=http.path,
        host=http.host,
        scheme=http.scheme or "http",
        headers=headers,
        body=_body(http, headers, buffered=buffered),
        certificate=certificate,
        client=client,
        forwarded_proto=proto,
    )


def _option(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE
    )


#: Options for header values that repeat call after call (an agent's id and tenant), built once:
#: a message placed in a repeated field is copied there, so one instance serves every answer.
_SHARED_OPTIONS: dict[tuple[str, str], base_pb2.HeaderValueOption] = {}
_REPEATING: Final = frozenset({"x-aegis-agent-id", "x-aegis-tenant"})
_MAX_SHARED_OPTIONS: Final = 4096


def _upstream_option(name: str, value: str) -> base_pb2.HeaderValueOption:
    if name not in _REPEATING:
        return _option(name, value)
    option = _SHARED_OPTIONS.get((name, value))
    if option is None:
        if len(_SHARED_OPTIONS) >= _MAX_SHARED_OPTIONS:
            _SHARED_OPTIONS.clear()
        option = _SHARED_OPTIONS[(name, value)] = _option(name, value)
    return option


def _grpc_code(status: int) -> int:
    if status == 401:
        return int(code_pb2.UNAUTHENTICATED)
    if status == 503:
        return int(code_pb2.UNAVAILABLE)
    return int(code_pb2.PERMISSION_DENIED)


def to_response(result: Result, req: CheckedRequest) -> external_auth_pb2.CheckResponse:
    if result.allowed:
        remove = removed_upstream({name for name, _ in req.headers}, result)
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[_upstream_option(k, v) for k, v in result.upstream_headers.items()],
                headers_to_remove=remove,
                response_headers_to_add=[
                    _option(k, result.headers[k]) for k in _RESPONSE_HEADERS if k in result.headers
                ],
            ),
        )
    return _denied(result)


def _denied(result: Result) -> external_auth_pb2.CheckResponse:
    """A refusal as Envoy passes it to the client: status, fields and the JSON body."""
    headers = {**result.headers, "content-type": "application/json"}
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=_grpc_code(result.status), message=result.code or ""),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=result.status),
            headers=[_option(k, v) for k, v in headers.items()],
            body=json.dumps(refusal_body(result), separators=(",", ":")),
        ),
    )


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """The ``Authorization`` service: every ``Check`` decided by the pipeline."""

    def __init__(self, ext: ExtAuthz, trusted: TrustedPeers, *, buffered: bool = False) -> None:
        self._ext, self._trusted, self._buffered = ext, trusted, buffered
        self._pending: set[asyncio.Future[None]] = set()

    async def Check(  # the name is the gRPC method's
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        # Any failure is answered as a Denied response: a gRPC error would be Envoy's "error",
        # which its failure_mode_allow turns into an allow.
        try:
            trusted = peer_host(context.peer()) in self._trusted
            req = check_to_request(request, trusted=trusted, buffered=self._buffered)
            # Envoy's timeout cancels this handler; the decision is made and recorded all the
            # same (its replay record, its evidence), and a second record says the answer was
            # never delivered: half a decision, unrecorded or uncounted, is never left behind.
            decided = asyncio.ensure_future(self._ext.check(req))
            try:
                result = await asyncio.shield(decided)
            except asyncio.CancelledError:
                decided.add_done_callback(partial(self._undelivered, req))
                raise
            return to_response(result, req)
        except Exception as exc:  # the pipeline refuses its own errors; this is a bug: deny
            log_event("ext_authz.grpc_error", level=logging.ERROR, error=type(exc).__name__)
            return await self._failed(request)

    async def _failed(
        self, request: external_auth_pb2.CheckRequest
    ) -> external_auth_pb2.CheckResponse:
        """The door's own 500: audited (``gateway.refused``) and marked like every refusal; if
        even that fails, the answer built at import, counted."""
        try:
            http = request.attributes.request.http
            auth = next((v for k, v in _headers(http) if k == "authorization"), None)
            asked = Asked(http.method, http.path, http.host, None, auth)
            return _denied(await self._ext.undecided(500, "server_error", "internal error", asked))
        except Exception:
            count_decision("deny", "server_error")
            return _INTERNAL_ERROR

    def _undelivered(self, req: CheckedRequest, decided: asyncio.Future[Result]) -> None:
        if decided.cancelled() or decided.exception() is not None:
            return
        pending = asyncio.ensure_future(self._ext.undelivered(req, decided.result()))
        self._pending.add(pending)
        pending.add_done_callback(self._pending.discard)


#: The answer to a Check that failed in a way nobody planned for (built once, at import).
_INTERNAL_ERROR: Final = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message="server_error"),
    denied_response=external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=500),
        headers=[_option("content-type", "application/json")],
        body=json.dumps({"error": "server_error", "code": "server_error",
                         "message": "internal error"}),
    ),
)  # fmt: skip


#: Room in a CheckRequest for everything but the body (attributes, headers).
MESSAGE_OVERHEAD: Final = 1024 * 1024
#: Bodies up to this size are received whatever ``max_body_bytes`` is, so that one Envoy sends
#: over the limit (its ``max_request_bytes`` set higher) is answered 413, not a gRPC error.
MIN_RECEIVED_BODY: Final = 16 * 1024 * 1024


async def start_grpc_server(
    service: AuthorizationService, host: str, port: int, *, max_body_bytes: int = 1024 * 1024
) -> tuple[grpc.aio.Server, int]:
    """Serve ``service`` on ``host:port`` (0: any free port); returns the server and its port.

    A CheckRequest carrying a body up to ``max_body_bytes`` (at least :data:`MIN_RECEIVED_BODY`)
    is received; over grpc's default limit (4 MiB) a Check fails as RESOURCE_EXHAUSTED, an error
    Envoy's failure_mode_allow would let through, instead of the 413 the door answers."""
    limit = max(max_body_bytes, MIN_RECEIVED_BODY) + MESSAGE_OVERHEAD
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen for gRPC ext_authz on {host}:{port}")
    await server.start()
    return server, bound

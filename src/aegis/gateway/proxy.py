"""The reverse-proxy front door (RFC 9110 §7.6 intermediaries): decide, then forward or refuse.

Per request: match a configured route (longest ``path_prefix``, optional exact host), read the body
within ``max_body_bytes`` (413 ``payload_too_large``), run the one decision pipeline, and forward an
allowed call over one pooled ``aiohttp`` session. JSON bodies are buffered (policy and sanitization
read them); other bodies are streamed through, still bounded, with the digest ``streamed``.

Header hygiene, both directions: hop-by-hop fields (RFC 9110 §7.6.1: ``Connection`` and every field
it names, ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``) are
dropped; the caller's ``Authorization``, ``DPoP``, ``Cookie`` is kept but credentials are not, and
every incoming ``x-aegis-*`` field is removed so that identity headers upstream come only from the
gateway. A request carrying ``Upgrade`` (a WebSocket, h2c) is refused, as is a ``Host`` that is not
one RFC 3986 authority (it chooses the route and is passed on as ``X-Forwarded-Host``). An
upstream timeout is a 504, an unreachable upstream a 502.

A call that was allowed but not delivered whole (upstream timeout or unreachable, an answer that
cannot be sanitized, a streamed body over the limit, an error of the gateway's own while
forwarding) leaves a second audit record, ``gateway.forward_failed``, naming the decision, before
the caller gets its error, and is counted in ``aegis_gateway_forward_failures_total``: the
decision record alone would read as a delivered call.

The proxy is a plain ASGI application (:meth:`ReverseProxy.__call__`): it reads the request from
the scope and ``receive`` and answers with ``send`` itself, with no framework request or response
objects on the per-call path. An upstream answer whose ``content-length`` is at most
:data:`WHOLE_ANSWER_BYTES` is read and sent in one message; anything larger or of unknown length
is relayed chunk by chunk as it arrives.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final
from urllib.parse import quote

import aiohttp
from starlette.datastructures import URL as RequestURL
from starlette.types import Message, Receive, Scope, Send
from yarl import URL

from aegis.approvals.model import is_bound
from aegis.config import GatewaySettings
from aegis.errors import AegisError, ConfigError, InvalidRequest, spec_for
from aegis.gateway.answers import (
    EVENT_STREAM,
    SANITIZE_INLINE,
    SANITIZED_REQUEST_DROP,
    SANITIZED_REQUEST_REFUSE,
    EventCut,
    answer_obligations,
    hidden_from_request_masks,
    mask_patterns,
    maskable_field,
    media_type,
    response_rules,
    sanitized_body,
    sanitized_fields,
    vet_answer,
)
from aegis.gateway.context import (
    EMPTY_BODY_DIGEST,
    METHODS,
    STREAMED_BODY_DIGEST,
    CallContext,
    Route,
    body_digest,
)
from aegis.gateway.ext_authz import vet_authority
from aegis.gateway.fields import (
    UPGRADE_REFUSED,
    is_json_type,
    parse_json_body,
    proxy_claim,
    utf8_labelled,
    vet_fields,
)
from aegis.gateway.hygiene import (
    CONTROL_BYTE,
    REQUEST_DROP,
    RESPONSE_DROP,
    forwardable,
    joined,
    marked_private,
    steers_cache,
)
from aegis.gateway.mcp import (
    MCP_METHODS,
    REFUSED,
    SESSION_FIELD,
    McpInvalid,
    McpMessage,
    mcp_call,
    opens_session,
    request_id,
    rpc_error,
    session_id,
)
from aegis.gateway.overrides import (
    MethodOverrideWatch,
    overrides_method,
    read_whole_for_override,
    refuse_coded_override,
    refuse_method_override,
)
from aegis.gateway.pipeline import Pipeline, Result, mark_refusal
from aegis.gateway.routing import RouteTable
from aegis.gateway.target import vet_path, vet_query
from aegis.pki.middleware import peer_from_scope
from aegis.policy.obligations import (
    apply_to_headers,
    mask_text,
)
from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import count_forward_failure

__all__ = ["WHOLE_ANSWER_BYTES", "ReverseProxy"]

#: Upstream answers of at most this many bytes (by their ``content-length``) are sent in one piece.
WHOLE_ANSWER_BYTES: Final = 64 * 1024
_CHUNK: Final = 64 * 1024
_MAX_REMEMBERED_HOSTS: Final = 1024


#: Request fields a DELETE ending a refused session does not carry (it has no body).
_NOT_ON_DELETE: Final = frozenset({"content-type", "content-length", "transfer-encoding", "expect"})


async def _read_capped(upstream: aiohttp.ClientResponse, limit: int) -> bytearray:
    """The answer's body, read until it is whole or one chunk past ``limit`` bytes."""
    raw = bytearray()
    async for chunk in upstream.content.iter_chunked(_CHUNK):
        raw += chunk
        if len(raw) > limit:
            break
    return raw


def _event_stream(upstream: aiohttp.ClientResponse) -> bool:
    """Whether the upstream answers with one ``Content-Type``, ``text/event-stream``."""
    types = upstream.headers.getall("content-type", ())
    return len(types) == 1 and media_type(types[0]) == EVENT_STREAM


async def _answer(
    send: Send, status: int, headers: dict[str, str] | list[tuple[str, str]], body: bytes
) -> None:
    """One whole answer: status, headers (with ``content-length``) and body in two messages."""
    items = headers.items() if isinstance(headers, dict) else headers
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in items]
    raw.append((b"content-length", str(len(body)).encode("ascii")))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _bodiless(send: Send, status: int, headers: list[tuple[str, str]]) -> None:
    """An answer that has no body (1xx, 204, 304, to HEAD): the headers as given, with no
    ``content-length`` of the gateway's own, and no body."""
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": b""})


def _has_no_body(method: str, status: int) -> bool:
    """Whether an answer has no body whatever its fields say (RFC 9112 §6.3)."""
    return method == "HEAD" or status < 200 or status in (204, 304)


async def _json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    data = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    await _answer(send, status, [*headers.items(), ("content-type", "application/json")], data)


def _denial(send: Send) -> Send:
    """``send`` for answering a WebSocket handshake as plain HTTP (the ASGI WebSocket Denial
    Response extension): the refusal reaches the client with its status and JSON body."""

    async def deny(message: Message) -> None:
        await send({**message, "type": "websocket." + message["type"]})

    return deny


#: The answer field that ends the connection after the answer (RFC 9112 §9.6).
_CLOSE: Final = {"connection": "close"}


async def _error(
    send: Send,
    result: Result,
    extra: dict[str, str] | None = None,
    rpc: tuple[str | int | None, int] | None = None,
) -> None:
    """A refusal's answer; on an MCP route (``rpc``: the message's id and the JSON-RPC error
    code) the body is a JSON-RPC error whose ``data`` is the usual body."""
    body: dict[str, Any] = {
        "error": spec_for(result.code or "server_error").oauth_error,
        "error_description": result.message,
        "code": result.code,
        "message": result.message,
        "decision_id": result.decision_id,
        **result.details,
    }
    if rpc is not None:
        body = rpc_error(body, *rpc)
    await _json(send, result.status, body, {**result.headers, **(extra or {})})


#: Why an answer the upstream broke off is not delivered whole.
_BROKEN_ANSWER: Final = "the upstream broke off its answer (cut short, or not HTTP)"
#: Upstream connections the proxy keeps open at most, all upstreams together.
_POOL: Final = 256

UpstreamCheck = Callable[[bytes | None], Awaitable[None]]


class _CheckedConnector(aiohttp.TCPConnector):
    """aiohttp's connector, with ``check`` awaited on the server certificate of every new TLS
    connection before it carries a request. The check may read the certificate store; done here
    rather than inside the handshake it runs on a worker thread, never stalling the event loop.
    A refused connection is closed and never pooled (aiohttp drops a connection whose creation
    raised). A pooled connection that holds bytes nobody asked for is never reused either."""

    def __init__(self, check: UpstreamCheck | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._check = check

    async def _get(self, key: Any, traces: Any) -> Any:
        """A pooled connection to reuse, skipping (and closing) any on which the upstream wrote
        after its answer, while the connection sat idle: aiohttp would read those bytes as the
        answer to the next call, another agent's perhaps, whose request was never sent."""
        while (conn := await super()._get(key, traces)) is not None:
            if conn.protocol is not None and not conn.protocol.should_close:
                return conn
            conn.close()
        return None

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        proto = await super()._create_connection(req, traces, timeout)
        if self._check is None or not req.is_ssl():
            return proto
        transport = proto.transport
        tls = transport.get_extra_info("ssl_object") if transport is not None else None
        try:
            if tls is None:  # https without a TLS object: nothing can be checked, so refused
                raise ssl.SSLError("the upstream connection has no TLS session to check")
            await self._check(tls.getpeercert(binary_form=True))
        except Exception as exc:  # every refusal is the upstream's: 502, never a 500
            proto.close()
            raise aiohttp.ClientConnectionError(str(exc)[:300]) from exc
        except BaseException:  # cancelled (a timeout): the half-made connection goes too
            proto.close()
            raise
        return proto


class _Streamed:
    """What has passed of a streamed request body: its SHA-256 so far, its size, and whether
    it ended."""

    __slots__ = ("hash", "recorded", "size", "whole")

    def __init__(self) -> None:
        self.hash = hashlib.sha256()  # of the bytes passed on to the upstream
        self.size = 0
        self.whole = False
        self.recorded = False


class ReverseProxy:
    """The proxy front door as an ASGI application (``http`` scopes only)."""

    def __init__(
        self,
        pipeline: Pipeline,
        settings: GatewaySettings,
        *,
        upstream_tls: Callable[[], ssl.SSLContext] | None = None,
        pinned_tls: Callable[[str], ssl.SSLContext] | None = None,
        upstream_check: UpstreamCheck | None = None,
        pool: int = _POOL,
    ) -> None:
        self._pipeline, self._settings = pipeline, settings
        # Outbound mTLS to https upstreams: the gateway's own certificate, the Aegis bundle as the
        # only trust (aegis.pki.tls.client_context), fetched per request so renewal takes effect;
        # for a route with upstream_spiffe_id, a context that accepts only that server.
        self._upstream_tls, self._pinned_tls = upstream_tls, pinned_tls
        #: Run on the certificate of every new https upstream connection before it carries a
        #: request (issued here, unrevoked, its agent active); a refusal is a 502.
        self._upstream_check = upstream_check
        #: Upstream connections kept open at most, all upstreams together.
        self._pool = pool
        pinned = [r.path_prefix for r in settings.routes if r.upstream_spiffe_id is not None]
        if pinned and pinned_tls is None:
            raise ConfigError(
                f"gateway.routes {pinned[0]!r}: upstream_spiffe_id needs the gateway's own "
                "certificate from the Aegis CA; set pki.gateway_agent",
                key="gateway.routes",
            )
        self._routes = RouteTable(settings.routes)
        self._session: aiohttp.ClientSession | None = None
        self._netlocs: dict[tuple[str, str | None, Any], str] = {}

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self._settings.connect_timeout,
            sock_read=self._settings.upstream_timeout,
        )
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            connector=_CheckedConnector(
                self._upstream_check, limit=self._pool, keepalive_timeout=30
            ),
            auto_decompress=False,
            # One session serves every agent: a cookie an upstream set in its answer to one
            # must never be sent with another's calls (nor with any call: it is a Cookie field
            # no caller sent and policy never saw). Answers pass Set-Cookie on to the caller.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Nothing the caller did not send and policy did not see: no Accept: */* or
            # Content-Type: application/octet-stream of aiohttp's own.
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def match(self, host: str, path: str) -> Route | None:
        return self._routes.match(host, path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = tuple(
            (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]
        )
        if scope["type"] != "http" or any(k == "upgrade" for k, _ in headers):
            # No WebSocket or other protocol is proxied: after a switch, every message would
            # reach the upstream without a decision. As the ext_authz doors answer it.
            refused = await self._unrouted(scope, 400, "invalid_request", UPGRADE_REFUSED)
            if scope["type"] == "http":
                return await _error(send, refused)
            if "websocket.http.response" in scope.get("extensions", {}):
                return await _error(_denial(send), refused)
            return await send({"type": "websocket.close", "code": 1008})
        if scope["method"] not in METHODS:
            refused = await self._unrouted(
                scope,
                405,
                "method_not_allowed",
                f"method not allowed; use one of {', '.join(METHODS)}",
            )
            return await _error(send, refused, {"allow": ", ".join(METHODS)})
        # Fields the Connection header names are hop-by-hop (RFC 9110 §7.6.1) and never
        # forwarded, so policy must not decide on them either: "x-dry-run: 1" with
        # "Connection: x-dry-run" would pass a rule on it while the upstream never sees it. The
        # checks below read the first value of each field as it is forwarded (``values``).
        try:
            headers, values = vet_fields(headers)
            bad_fields, close = None, None
        except InvalidRequest as exc:
            # A refusal for how the request is framed or its fields are spelled ends the
            # connection (RFC 9112 §6.3 asks it after both Content-Length and Transfer-Encoding):
            # what the server reads after it may not be the request the client meant.
            values, bad_fields, close = dict(reversed(headers)), exc, _CLOSE
        raw_path = scope.get("raw_path") or quote(scope["path"]).encode()
        target = raw_path.decode("latin-1")
        host = values.get("host", "")
        scheme = scope.get("scheme", "http")
        # The Host chooses the route and is passed on as X-Forwarded-Host, so it must be one
        # authority, as at the ext_authz doors: "admin.example.com:x" or "admin.example.com,x"
        # would choose the host-less routes here, and Express reads either as admin.example.com.
        try:
            vet_authority(host, scheme)
        except InvalidRequest as exc:
            refused = await self._unrouted(scope, 400, "invalid_request", exc.message)
            return await _error(send, refused, close)
        try:
            path, bad_path = vet_path(target), None
        except InvalidRequest as exc:
            path, bad_path = scope["path"], exc
        route = self.match(host, path)
        if route is None:  # no tool, so no policy: the refusal is still counted and audited
            if bad_path is not None:
                refused = await self._unrouted(scope, 400, "invalid_request", bad_path.message)
            else:
                refused = await self._unrouted(scope, 404, "not_found", "no route for this path")
            return await _error(send, refused, close)
        if bad_path is None and (other := self._routes.read_as_another(host, path, route)):
            bad_path = InvalidRequest(other)
        query = scope.get("query_string", b"").decode("latin-1")
        params: tuple[tuple[str, str], ...] = ()
        try:
            params = vet_query(query)
        except InvalidRequest as exc:
            bad_path = bad_path or exc
        client = scope.get("client")
        # The target as the client sent it (still percent-encoded): DPoP htu and the request
        # digest cover it, and it is what the upstream receives.
        sent = f"{target}?{query}" if query else target
        # Policy sees the proxy fields the upstream will receive: the gateway's own, never the
        # caller's claims, which are dropped on the way (a rule on x-forwarded-for must not pass
        # on an address the upstream never sees).
        own = [("x-forwarded-for", client[0])] if client else []
        own += [("x-forwarded-proto", scheme), ("x-forwarded-host", host)]
        facts: dict[str, Any] = {
            "method": scope["method"].upper(),
            "url": f"{scheme}://{self._netloc(scope, values)}{sent}",
            "host": host,
            "path": path,
            "route": route,
            "headers": tuple(pair for pair in headers if not proxy_claim(pair[0])) + tuple(own),
            "query": params,
            "peer": peer_from_scope(scope),
            "client": client[0] if client else None,
            "sees_answers": True,
        }
        limit = self._settings.max_body_bytes
        overflow: list[AegisError] = []  # set when a streamed body goes over the limit
        raw: bytes | None = None
        stream: AsyncIterator[bytes] | None = None
        streamed: _Streamed | None = None
        bodiless = False
        message: McpMessage | None = None
        method = facts["method"]
        try:
            if bad_path is not None:
                raise bad_path
            if bad_fields is not None:
                raise bad_fields
            declared = values.get("content-length")
            if declared is not None and not (declared.isascii() and declared.isdigit()):
                raise InvalidRequest("content-length must be a whole number")
            if declared is not None and int(declared) > limit:
                raise AegisError(
                    f"request body larger than {limit} bytes", code="payload_too_large"
                )
            if route.mcp:  # decided under the tool its one JSON-RPC message acts on
                if method == "POST":
                    raw = await self._read(receive, limit)
                framed = declared not in (None, "0") or "transfer-encoding" in values
                # Other methods: the framing says whether a body follows (b"": none).
                seen_body = raw if method == "POST" else (None if framed else b"")
                route, message = mcp_call(route, method, headers, seen_body, params)
                facts["route"] = route
            content_type = values.get("content-type")
            # A policy that reads this tool's bodies sees them whole, up to the body limit; only
            # the rules it enforces refuse a body they would read unlike some upstream.
            reads = self._pipeline.reads_body(route)
            strict = reads and self._pipeline.reads_body(route, enforced=True)
            # An MCP message is always shown: a refusal names its id.
            shown = limit if reads or route.mcp else self._settings.policy_body_bytes
            small_declared = declared is not None and int(declared) <= shown
            # A POST form (or untyped or JSON-ish body) is read whole too: it may carry a
            # _method override (checked below).
            form = read_whole_for_override(method, content_type)
            if is_json_type(content_type) or form or small_declared:
                if raw is None:
                    raw = await self._read(receive, limit)
                refuse_method_override(method, content_type, raw, values.get("content-encoding"))
                # Policy sees (and sanitization rewrites) only bodies it can hold whole.
                small = len(raw) <= shown
                facts["body"] = (
                    message.body  # parsed alike once (a strict read checks integers too)
                    if message is not None and not strict
                    else parse_json_body(
                        raw, content_type, values.get("content-encoding"), safe_integers=strict
                    )
                    if small
                    else None
                )
                facts["body_digest"] = body_digest(raw) if raw else EMPTY_BODY_DIGEST
                facts["raw_body"] = raw if small else None
                facts["integers_checked"] = strict
            elif declared is None and "transfer-encoding" not in values:
                raw, bodiless = b"", True  # forwarded without a body or a Content-Length: 0
            else:
                watch = None
                if overrides_method(method, content_type):  # a multipart form, read as it passes
                    refuse_coded_override(values.get("content-encoding"))
                    watch = MethodOverrideWatch(content_type)
                streamed = _Streamed()
                stream = self._bounded(receive, limit, overflow, streamed, watch)
                facts["body_digest"], facts["raw_body"] = STREAMED_BODY_DIGEST, None
        except AegisError as exc:
            if "body_digest" not in facts:
                # Refused after the body was read (a repeated member, a _method override, an
                # MCP message it cannot decide), or before one the request declares: the
                # evidence names that body, or says it was not seen, never an empty one.
                framed = values.get("content-length", "0") != "0" or "transfer-encoding" in values
                if raw is not None:
                    facts["body_digest"] = body_digest(raw) if raw else EMPTY_BODY_DIGEST
                elif framed:
                    facts["body_digest"] = STREAMED_BODY_DIGEST
            refused = await self._pipeline.refuse(CallContext(**facts), exc)
            rpc = None
            if route.mcp:
                rpc = (message.id if message is not None else None, REFUSED)
                if isinstance(exc, McpInvalid):
                    rpc = (exc.rpc_id, exc.rpc_code)
                if exc.code == "method_not_allowed":
                    close = {**(close or {}), "allow": ", ".join(MCP_METHODS)}
            return await _error(send, refused, close, rpc)
        ctx = CallContext(**facts)
        result = await self._pipeline.run(ctx)
        if not result.allowed:
            rpc = (message.id if message is not None else None, REFUSED) if route.mcp else None
            return await _error(send, result, rpc=rpc)
        data: Any = None if bodiless else raw if stream is None else stream
        if result.body_changed:
            data = json.dumps(result.body, separators=(",", ":")).encode()
        try:
            await self._forward(send, ctx, sent, result, data, overflow, streamed)
        except Exception as exc:  # the gateway's own failure after the decision: 500, recorded
            if "forward_failed" not in result.details:  # once per call
                code = exc.code if isinstance(exc, AegisError) else "server_error"
                await self._forward_failed(
                    ctx, result, 500, code, "the gateway failed to forward", streamed
                )
            raise
        if streamed is not None and data is stream and not streamed.recorded:
            # The upstream answered early, or the call failed after part of the body had gone.
            await self._body_forwarded(ctx, result, streamed)

    async def _unrouted(self, scope: Scope, status: int, code: str, message: str) -> Result:
        host = next((v for k, v in scope["headers"] if k.lower() == b"host"), b"")
        sent = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), None)
        client = scope.get("client")
        return await self._pipeline.refuse_unrouted(
            door="proxy",
            method=str(scope.get("method", scope["type"])),
            target=(scope.get("raw_path") or quote(scope["path"]).encode()).decode("latin-1"),
            host=host.decode("latin-1"),
            client=client[0] if client else None,
            status=status,
            code=code,
            message=message,
            authorization=None if sent is None else sent.decode("latin-1"),
        )

    def _netloc(self, scope: Scope, values: dict[str, str]) -> str:
        """The authority the client addressed, as Starlette reads it from the Host header (or the
        server address); remembered per (scheme, Host, server), a pure function of the three."""
        key = (scope.get("scheme", "http"), values.get("host"), scope.get("server"))
        netloc = self._netlocs.get(key)
        if netloc is None:
            if len(self._netlocs) >= _MAX_REMEMBERED_HOSTS:
                self._netlocs.clear()
            netloc = self._netlocs[key] = RequestURL(scope=scope).netloc
        return netloc

    async def _chunks(self, receive: Receive) -> AsyncIterator[bytes]:
        """The body's chunks as the client sends them. A client that sends nothing for
        ``client_body_timeout``, or has kept the gateway waiting for ``client_body_deadline`` in
        all, is refused (408): it would otherwise hold its call, and a pooled connection to the
        upstream once streaming, for as long as it likes. Only the time spent waiting for the
        client counts: a slow upstream holding back a streamed body is not the client's doing."""
        gap, budget = self._settings.client_body_timeout, self._settings.client_body_deadline
        loop = asyncio.get_running_loop()
        while True:
            wait = min(gap, budget)
            started = loop.time()
            try:
                async with asyncio.timeout(wait):
                    message = await receive()
            except TimeoutError:
                why = (
                    f"no part of the request body arrived for {gap:g} s"
                    if wait == gap
                    else "the client took longer than "
                    f"{self._settings.client_body_deadline:g} s in all to send the request body"
                )
                raise AegisError(why, code="request_timeout") from None
            budget -= loop.time() - started
            if message["type"] == "http.disconnect":
                raise InvalidRequest("the client went away before sending its whole body")
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    async def _read(self, receive: Receive, limit: int) -> bytes:
        body = bytearray()
        async for chunk in self._chunks(receive):
            body += chunk
            if len(body) > limit:
                raise AegisError(
                    f"request body larger than {limit} bytes", code="payload_too_large"
                )
        return bytes(body)

    async def _bounded(
        self,
        receive: Receive,
        limit: int,
        overflow: list[AegisError],
        streamed: _Streamed,
        watch: MethodOverrideWatch | None = None,
    ) -> AsyncIterator[bytes]:
        """The body as it streams, cut off past ``limit``, when the client stalls, or (``watch``)
        before a multipart part naming ``_method`` is passed on, hashed into ``streamed`` as it
        goes. The client library wraps what this raises in its own error, so the refusal is also
        left in ``overflow`` for the caller."""
        try:
            async for chunk in self._chunks(receive):
                if streamed.size + len(chunk) > limit:
                    raise AegisError(
                        f"request body larger than {limit} bytes", code="payload_too_large"
                    )
                if watch is not None:
                    watch.feed(chunk)
                streamed.size += len(chunk)  # what is passed on, not what was received
                streamed.hash.update(chunk)
                yield chunk
        except AegisError as exc:
            overflow.append(exc)
            raise
        streamed.whole = True

    async def _body_forwarded(self, ctx: CallContext, result: Result, streamed: _Streamed) -> None:
        """Record what a streamed body turned out to be once it has passed: the decision and
        its attestation were made before its bytes arrived (``body: streamed``), so this second
        record (``gateway.body``) binds the bytes forwarded to the decision id. ``complete`` is
        false when the upstream answered before reading the whole body."""
        streamed.recorded = True
        await self._after_decision("gateway.body", ctx, result, {
            "body_digest": "sha256:" + streamed.hash.hexdigest(), "bytes": streamed.size,
            "complete": streamed.whole,
        })  # fmt: skip

    async def _after_decision(
        self, kind: str, ctx: CallContext, result: Result, fields: dict[str, Any]
    ) -> None:
        """Append a second record about an allowed call: its decision id, time, tool and agent,
        and ``fields``. One that cannot be written is logged; the call's outcome stands."""
        audit = self._pipeline.audit
        if audit is None:
            return
        record = {
            "decision_id": result.decision_id,
            "time": self._pipeline.now(),
            "tool": ctx.route.tool,
            "agent_id": result.upstream_headers.get("x-aegis-agent-id"),
            **fields,
        }
        try:
            await audit.append_async(kind, record)
        except AegisError as exc:
            log_event(
                "gateway.audit_failed", level=logging.ERROR, code=exc.code,
                decision_id=result.decision_id,
            )  # fmt: skip

    async def _forward(
        self,
        send: Send,
        ctx: CallContext,
        sent: str,
        result: Result,
        data: Any,
        overflow: list[AegisError],
        streamed: _Streamed | None = None,
    ) -> None:
        """Forward the allowed call; ``sent`` is the request target exactly as received."""
        assert self._session is not None, "the proxy was not started"
        if response_rules(result) and any(
            k.replace("_", "-") in SANITIZED_REQUEST_REFUSE for k, _ in ctx.headers
        ):
            return await self._gateway_error(
                send, ctx, 400, "invalid_request",
                "If-Match and If-Unmodified-Since cannot be sent on a call whose answer is "
                "sanitized (its status would confirm a guess of the unsanitized body's entity "
                "tag); send the call without them",
                result,
            )  # fmt: skip
        headers = joined(
            (k, v)
            for k, v in forwardable(ctx.headers, REQUEST_DROP)
            if not proxy_claim(k) and (not result.approved or is_bound(k))
        )
        # What the gateway itself saw, replacing any client claim (dropped above); obligations
        # then apply to these too (a policy may drop x-forwarded-for or mask the host).
        if ctx.client:
            headers["x-forwarded-for"] = ctx.client
        headers["x-forwarded-proto"] = ctx.url.partition(":")[0]
        headers["x-forwarded-host"] = ctx.host  # the vetted Host the route was chosen by
        if result.obligations:
            headers = apply_to_headers(headers, result.obligations, "request")
            # Masks rewrite what they see as written; what an upstream decodes they do not see.
            forwarded = result.body if result.body_changed else None
            if why := hidden_from_request_masks(result, headers.items(), forwarded):
                return await self._gateway_error(
                    send, ctx, 403, "policy_error",
                    f"policy masks this request, which cannot be masked as the upstream reads "
                    f"it: {why}; send the data as plain text",
                    result,
                )  # fmt: skip
        headers.update(result.upstream_headers)
        if response_rules(result):
            headers.pop("accept-encoding", None)  # the answer must be readable to be sanitized
            # Whole and unconditional; "If_Range" is If-Range to a CGI or WSGI upstream.
            headers = {
                k: v
                for k, v in headers.items()
                if k.replace("_", "-") not in SANITIZED_REQUEST_DROP
            }
        # Forward the vetted target byte for byte (``encoded=True``): re-encoding or normalising it
        # here could make the upstream read a path other than the one that was decided.
        url = URL(ctx.route.upstream.rstrip("/") + sent, encoded=True)
        tls: dict[str, Any] = {}
        pin = ctx.route.upstream_spiffe_id
        if pin is not None:  # never an unpinned fallback (the constructor checked pinned_tls)
            if self._pinned_tls is None:
                raise ConfigError("upstream_spiffe_id needs pki.gateway_agent", key="gateway")
            tls["ssl"] = self._pinned_tls(pin)
        elif self._upstream_tls is not None and url.scheme == "https":
            tls["ssl"] = self._upstream_tls()
        # aiohttp's read timeout starts once the request is written: an upstream that does not
        # read a streamed body (or never answers at all) must not hold the call, and one of the
        # pooled connections every tool shares, for longer than the client and upstream budgets.
        deadline = self._settings.connect_timeout + self._settings.upstream_timeout
        if streamed is not None:
            deadline += self._settings.client_body_deadline
        ctx.extras["sent"] = True  # from here the upstream may receive the body
        try:
            async with asyncio.timeout(deadline):
                upstream = await self._session.request(
                    ctx.method, url, headers=headers, data=data, allow_redirects=False, **tls
                )
        except (TimeoutError, AegisError, aiohttp.ClientError) as exc:
            # The streamed body went over the limit or stalled (whatever wraps the error).
            if overflow:
                too_big = overflow[0]
                await self._forward_failed(
                    ctx, result, too_big.status, too_big.code, too_big.message, streamed
                )
                body = {"error": spec_for(too_big.code).oauth_error, "code": too_big.code,
                        "message": too_big.message, "decision_id": result.decision_id}  # fmt: skip
                headers = dict(result.headers)
                mark_refusal(headers, ctx)
                return await _json(send, too_big.status, body, headers)
            if isinstance(exc, aiohttp.ConnectionTimeoutError):
                # Waiting for a free pooled connection counts against connect_timeout too.
                why = (
                    f"no connection to the upstream within {self._settings.connect_timeout:g} s "
                    f"(it is unreachable, or all {self._pool} pooled connections are busy)"
                )
                return await self._gateway_error(send, ctx, 504, "upstream_timeout", why, result)
            if isinstance(exc, TimeoutError):
                return await self._gateway_error(
                    send, ctx, 504, "upstream_timeout", "the upstream did not answer in time",
                    result,
                )  # fmt: skip
            if isinstance(exc, AegisError):
                raise
            return await self._gateway_error(
                send, ctx, 502, "bad_gateway", "the upstream cannot be reached", result
            )
        try:
            if not 200 <= upstream.status <= 599:
                # No 1xx reaches the answer path but one the caller did not ask for: a 101
                # switches to a protocol no decision covers (no Upgrade is forwarded), and the
                # ASGI servers either relay it or fail on it; nor does a status past 599, which
                # they cannot send at all. The connection is not reused.
                upstream.close()
                return await self._gateway_error(
                    send, ctx, 502, "bad_gateway",
                    f"the upstream answered {upstream.status}, not a final HTTP status "
                    "(200 to 599); it must send one",
                    result,
                )  # fmt: skip
            if ctx.route.mcp and opens_session(ctx.method, ctx.body):
                status, code = 502, "bad_gateway"
                ended = False
                try:
                    why = await self._hold_opened(upstream, result)
                except AegisError as exc:
                    # The share is full (429), or the replay store cannot answer: the session
                    # is the agent's own, ended at the server. Answered 502 when the store is
                    # down: after the server acted, nothing the gateway says may invite the
                    # client to send the request again as if it had not been forwarded.
                    ended = True
                    status, code = (429, exc.code) if exc.code == "mcp_session_limit" else (
                        502, "bad_gateway")  # fmt: skip
                    why = exc.message
                if why is not None:
                    upstream.close()  # the id is never passed on
                    if ended:
                        handed = upstream.headers.get(SESSION_FIELD)
                        await self._end_refused(url, headers, tls, handed)
                    return await self._gateway_error(send, ctx, status, code, why, result)
            if ctx.route.mcp and ctx.method == "DELETE" and 200 <= upstream.status < 300:
                await self._release_ended(ctx, result)
            if streamed is not None and streamed.whole:
                # The body has passed whole: its record is written before the caller is answered.
                await self._body_forwarded(ctx, result, streamed)
            elif result.body_changed and isinstance(data, bytes):
                # Sanitized: the decision's digest covers the body received, this record the
                # body forwarded in its place.
                await self._after_decision("gateway.body", ctx, result, {
                    "body_digest": body_digest(data), "bytes": len(data), "complete": True,
                    "sanitized": True,
                })  # fmt: skip
            # The field bytes as received, each byte one character (Latin-1), so that they are
            # sent on as they came: aiohttp decodes values as UTF-8, and "X-Name: \u20ac" would
            # not encode again (a 500 after the call was allowed). Masks and drops read the
            # ASCII they look for the same either way. A value holding a control character,
            # which aiohttp accepts and the ASGI server refuses to send, is left out.
            received = [
                (k.decode("latin-1"), v.decode("latin-1"))
                for k, v in upstream.raw_headers
                if not CONTROL_BYTE.search(v)
            ]
            out_headers = [
                (k, v) for k, v in forwardable(received, RESPONSE_DROP) if not steers_cache(k)
            ]
            if patterns := mask_patterns(result):
                # A field the masks cannot read as the client does is left out, as one holding
                # a control character is: a Location or Set-Cookie rarely carries what is masked.
                # So is a field whose name the masks would change (X-4111111111111111): a name
                # cannot be masked and stay the field it was.
                out_headers = [
                    (k, v)
                    for k, v in out_headers
                    if maskable_field(v, patterns)
                    and maskable_field(k, patterns)
                    and mask_text(k, patterns) == k
                ]
            if result.obligations:
                out_headers = [
                    pair
                    for k, v in out_headers
                    for pair in apply_to_headers({k: v}, result.obligations, "response").items()
                ]
            # Each field the gateway sets replaces the upstream's; repeated upstream fields
            # (several Set-Cookie) stay separate lines.
            out_headers = [(k, v) for k, v in out_headers if k not in result.headers]
            out_headers += result.headers.items()
            out_headers = marked_private(out_headers)
            # A tool list is cut from an answer that holds one; an event stream event by event
            # as it passes, unless masks or redactions need the whole answer. Every answer
            # below 400: an MCP client reads any 2xx but 202, and a 3xx it cannot follow (a 300
            # without Location), as the answer.
            cut = result.listed is not None and 200 <= upstream.status < 400
            if cut and upstream.status == 202 and not answer_obligations(result):
                # Accepted: the answer comes on the event stream (the older HTTP+SSE transport
                # says "Accepted" here), where it is cut. An MCP client reads no answer off a
                # 202, so its body, which could list tools uncut, is left behind.
                kept = [(k, v) for k, v in sanitized_fields(out_headers) if k != "content-type"]
                return await _answer(send, 202, kept, b"")
            whole = upstream.status != 206 and "content-range" not in upstream.headers
            if cut and whole and not answer_obligations(result) and _event_stream(upstream):
                return await self._relay_events(send, ctx, upstream, out_headers, result)
            if cut or answer_obligations(result):
                return await self._sanitized(send, ctx, upstream, out_headers, result)
            await self._relay(send, ctx, upstream, out_headers, result)
        finally:
            upstream.release()

    async def _end_refused(
        self, url: Any, headers: dict[str, str], tls: dict[str, Any], session: str | None
    ) -> None:
        """Best effort: end at the server the session an ``initialize`` opened that the agent's
        share refused (never passed on, it would stay open there until its idle time ran out).
        Sent as the initialize was, with its identity fields; a failure is logged."""
        if session is None:
            return
        ending = {k: v for k, v in headers.items() if k.lower() not in _NOT_ON_DELETE}
        ending[SESSION_FIELD] = session
        assert self._session is not None
        try:
            budget = self._settings.connect_timeout + self._settings.upstream_timeout
            async with asyncio.timeout(budget):
                answer = await self._session.request(
                    "DELETE", url, headers=ending, allow_redirects=False, **tls
                )
                answer.release()
        except (TimeoutError, aiohttp.ClientError) as exc:
            log_event("gateway.session_not_ended", level=logging.WARNING, error=type(exc).__name__)

    async def _release_ended(self, ctx: CallContext, result: Result) -> None:
        """The server ended the session the DELETE named: its agent's hold goes, and with it
        its place among ``mcp_sessions_per_agent``. Not freed (the store cannot answer), it
        lapses after ``mcp_session_idle``."""
        session = session_id(ctx.headers)
        if session is None or result.session_holder is None:
            return
        try:
            await self._pipeline.release_session(session, result.session_holder)
        except AegisError as exc:
            log_event("gateway.session_not_freed", level=logging.WARNING, code=exc.code)

    async def _hold_opened(self, upstream: aiohttp.ClientResponse, result: Result) -> str | None:
        """Hold the session an MCP server hands out on ``initialize`` for the agent that asked,
        before the agent learns its id: until then another agent naming the id (learnt from
        the server's logs, say) would be the first to hold it. Returns why the answer cannot be
        passed on (None: it can): an id another agent already holds, or one that could not be
        held as it is read. Raises ``Unavailable`` when the replay store cannot answer."""
        handed = upstream.headers.getall(SESSION_FIELD, ())
        if not handed:
            return None
        assert result.session_holder is not None, "an allowed call of an MCP route"
        try:
            session = session_id((SESSION_FIELD, value) for value in handed)
        except McpInvalid as exc:
            return f"the MCP server handed out a session this gateway cannot hold: {exc.message}"
        if session is not None and not await self._pipeline.claim_session(
            session, result.session_holder
        ):
            return (
                "the MCP server handed out the id of a session another agent holds; it must "
                "draw each session id at random"
            )
        return None

    async def _relay(
        self,
        send: Send,
        ctx: CallContext,
        upstream: aiohttp.ClientResponse,
        headers: list[tuple[str, str]],
        result: Result,
    ) -> None:
        """The upstream's answer to the caller: whole when it is small and of known length, else
        chunk by chunk. Once the status is sent, a broken upstream can only cut the answer short."""
        length = upstream.content_length
        if _has_no_body(ctx.method, upstream.status):
            # A HEAD answer's content-length describes a body that is not sent: relay it as is.
            if ctx.method == "HEAD" and length is not None:
                headers = [*headers, ("content-length", str(length))]
            return await _bodiless(send, upstream.status, headers)
        if length is not None and length <= WHOLE_ANSWER_BYTES:
            try:
                data = await upstream.read()
            except TimeoutError:
                return await self._gateway_error(
                    send, ctx, 504, "upstream_timeout", "the upstream did not answer in time",
                    result,
                )  # fmt: skip
            except aiohttp.ClientError:
                return await self._gateway_error(
                    send, ctx, 502, "bad_gateway", _BROKEN_ANSWER, result
                )
            return await _answer(send, upstream.status, headers, data)
        await self._stream(send, ctx, upstream, headers, result)

    async def _relay_events(
        self,
        send: Send,
        ctx: CallContext,
        upstream: aiohttp.ClientResponse,
        headers: list[tuple[str, str]],
        result: Result,
    ) -> None:
        """An event stream with the tools each answer lists cut to those the agent could call
        (:class:`EventCut`), sent on event by event. Once the status is sent, an event that
        cannot be cut ends the stream: it is never passed whole."""
        assert result.listed is not None
        encoding = upstream.headers.get("content-encoding", "identity").lower()
        if encoding != "identity" or not utf8_labelled(upstream.headers.get("content-type")):
            return await self._gateway_error(
                send, ctx, 502, "bad_gateway",
                "the upstream's event stream is content-coded or not UTF-8, so the tools it lists "
                "cannot be cut to those this agent may call",
                result,
            )  # fmt: skip
        cut = EventCut(result.listed, self._settings.max_body_bytes)
        await self._stream(send, ctx, upstream, sanitized_fields(headers), result, cut)

    async def _stream(
        self,
        send: Send,
        ctx: CallContext,
        upstream: aiohttp.ClientResponse,
        headers: list[tuple[str, str]],
        result: Result,
        cut: EventCut | None = None,
    ) -> None:
        """The answer chunk by chunk as it arrives (through ``cut``, an event stream's tool
        lists cut event by event). Once the status is sent, a broken upstream, or an event that
        cannot be cut, can only end the answer short: never passed on whole."""
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        await send({"type": "http.response.start", "status": upstream.status, "headers": raw})
        try:
            async for chunk in upstream.content.iter_chunked(_CHUNK):
                data = chunk if cut is None else cut.feed(chunk).encode()
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            rest = b"" if cut is None else cut.feed(b"", final=True).encode()
        except (
            TimeoutError, aiohttp.ClientError, InvalidRequest, UnicodeDecodeError, RecursionError
        ) as exc:  # fmt: skip
            # The caller learns of it only as a connection that ends before the answer does
            # (raised on, the server drops it).
            if isinstance(exc, TimeoutError):
                why, status, code = (
                    "the upstream stalled in the middle of its answer",
                    504,
                    ("upstream_timeout"),
                )
            elif isinstance(exc, aiohttp.ClientError):
                why, status, code = _BROKEN_ANSWER, 502, "bad_gateway"
            else:
                reason = exc.message if isinstance(exc, InvalidRequest) else "it is not UTF-8"
                why, status, code = f"the event stream cannot be cut: {reason}", 502, "bad_gateway"
            await self._forward_failed(ctx, result, status, code, why)
            raise
        await send({"type": "http.response.body", "body": rest})

    async def _sanitized(
        self,
        send: Send,
        ctx: CallContext,
        upstream: aiohttp.ClientResponse,
        headers: list[tuple[str, str]],
        result: Result,
    ) -> None:
        """Apply response obligations to a whole answer; anything that cannot be read and
        rewritten (over ``max_body_bytes`` included: it is held in memory) is refused (502)
        rather than passed through unsanitized. So is a part of an answer (a 206, a
        ``Content-Range``, ``multipart/byteranges``), though none was asked for: a part is
        sanitized on its own, without what redactions and masks look for around it."""
        if (
            upstream.status == 206
            or "content-range" in upstream.headers
            or any(
                media_type(v) == "multipart/byteranges"
                for v in upstream.headers.getall("content-type", ())
            )
        ):
            return await self._gateway_error(
                send, ctx, 502, "bad_gateway",
                "the upstream answered with a part of its content (a range), which cannot be "
                "sanitized on its own; it must answer the whole",
                result,
            )  # fmt: skip
        headers = sanitized_fields(headers)
        if _has_no_body(ctx.method, upstream.status):
            # Nothing to sanitize and nothing to send: JSON null here, with content-length 4,
            # would be read by a keep-alive client as the start of its next answer. HEAD gets no
            # content-length: the upstream's is the length of the unsanitized body, which tells
            # the caller how long a redacted value is, and the sanitized length is not known.
            return await _bodiless(send, upstream.status, headers)
        limit = self._settings.max_body_bytes
        raw = bytearray()
        try:
            if (upstream.content_length or 0) <= limit:
                raw = await _read_capped(upstream, limit)
        except (TimeoutError, aiohttp.ClientError):
            return await self._gateway_error(
                send, ctx, 504, "upstream_timeout", "the upstream did not answer in time", result
            )
        if (upstream.content_length or 0) > limit or len(raw) > limit:
            return await self._gateway_error(
                send, ctx, 502, "bad_gateway",
                f"the upstream answer is larger than {limit} bytes and cannot be sanitized",
                result,
            )  # fmt: skip
        if not raw:  # an empty body stays empty (JSON null is not nothing)
            return await _answer(send, upstream.status, headers, b"")
        ctype = upstream.headers.get("content-type")
        encoding = upstream.headers.get("content-encoding", "identity").lower()
        as_json = is_json_type(ctype)
        try:
            vet_answer(upstream.headers.getall("content-type", ()), encoding, result)
            if len(raw) > SANITIZE_INLINE:
                # Masks and the decoding check cost tens of milliseconds on a large answer:
                # done on a worker thread, so the event loop keeps serving other calls.
                clean = await asyncio.to_thread(sanitized_body, bytes(raw), ctype, as_json, result)
            else:
                clean = sanitized_body(bytes(raw), ctype, as_json, result)
        except RecursionError:
            # Redaction and masks walk the JSON recursively: a few hundred levels of nesting
            # must be a 502 like any other answer that cannot be sanitized, not a 500.
            return await self._gateway_error(
                send, ctx, 502, "bad_gateway",
                "the upstream answer cannot be sanitized: it is JSON nested too deeply", result,
            )  # fmt: skip
        except (InvalidRequest, UnicodeDecodeError) as exc:
            why = exc.message if isinstance(exc, InvalidRequest) else "it is not UTF-8"
            return await self._gateway_error(
                send, ctx, 502, "bad_gateway",
                f"the upstream answer cannot be sanitized: {why}", result,
            )  # fmt: skip
        data = json.dumps(clean).encode() if as_json else str(clean).encode("utf-8")
        await _answer(send, upstream.status, headers, data)

    async def _gateway_error(
        self, send: Send, ctx: CallContext, status: int, error: str, message: str, result: Result
    ) -> None:
        await self._forward_failed(ctx, result, status, error, message)
        # The fields of every other refusal's body (code and message besides the OAuth pair),
        # so that a client reads one shape whatever refused the call.
        body: dict[str, Any] = {"error": error, "error_description": message, "code": error,
                                "message": message, "decision_id": result.decision_id}  # fmt: skip
        if ctx.route.mcp:
            body = rpc_error(body, request_id(ctx.body), REFUSED)
        headers = dict(result.headers)
        mark_refusal(headers, ctx)
        await _json(send, status, body, headers)

    async def _forward_failed(
        self,
        ctx: CallContext,
        result: Result,
        status: int,
        code: str,
        message: str,
        streamed: _Streamed | None = None,
    ) -> None:
        """Count, and record in the audit log before the caller is answered, that an allowed
        call was not delivered whole. A record that cannot be written is logged: the caller gets
        its error either way, and the decision record stands. For a streamed body the record
        also binds what part of it had been passed on to the upstream (a body cut off over the
        limit or stalled has reached it in part): its size and SHA-256."""
        result.details["forward_failed"] = code
        count_forward_failure(ctx.route.metric_tool, code)
        fields: dict[str, Any] = {
            "tenant": ctx.route.tenant, "env": ctx.route.env, "method": ctx.method,
            "path": ctx.path, "status": status, "code": code, "reason": message,
        }  # fmt: skip
        if streamed is not None:
            streamed.recorded = True
            fields.update({
                "body_digest": "sha256:" + streamed.hash.hexdigest(), "bytes": streamed.size,
                "complete": streamed.whole,
            })  # fmt: skip
        elif result.body_changed and ctx.extras.get("sent"):
            # Sanitized: the upstream may have received the rewritten body before it failed
            # (the decision's digest covers the body received); this record binds what went.
            sent = json.dumps(result.body, separators=(",", ":")).encode()
            fields.update({"body_digest": body_digest(sent), "bytes": len(sent),
                           "sanitized": True})  # fmt: skip
        await self._after_decision("gateway.forward_failed", ctx, result, fields)

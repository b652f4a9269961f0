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
import html
import json
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from typing import Any, Final
from urllib.parse import quote, unquote

import aiohttp
from starlette.datastructures import URL as RequestURL
from starlette.types import Message, Receive, Scope, Send
from yarl import URL

from aegis.config import GatewaySettings
from aegis.errors import AegisError, ConfigError, InvalidRequest, spec_for
from aegis.gateway.context import (
    EMPTY_BODY_DIGEST,
    METHODS,
    STREAMED_BODY_DIGEST,
    UPGRADE_REFUSED,
    CallContext,
    MethodOverrideWatch,
    Route,
    body_digest,
    is_json_type,
    overrides_method,
    parse_json_body,
    proxy_claim,
    read_whole_for_override,
    refuse_coded_override,
    refuse_method_override,
    utf8_labelled,
    vet_fields,
    vet_path,
    vet_query,
)
from aegis.gateway.ext_authz import vet_authority
from aegis.gateway.pipeline import Pipeline, Result
from aegis.gateway.routing import RouteTable
from aegis.pki.middleware import peer_from_scope
from aegis.policy.obligations import (
    apply_to_body,
    apply_to_headers,
    as_read,
    exponent_number_digits,
    hidden_from_masks,
    mask_text,
)
from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import count_forward_failure

__all__ = [
    "HOP_BY_HOP",
    "METHODS",
    "WHOLE_ANSWER_BYTES",
    "ReverseProxy",
    "forwardable",
    "joined",
    "proxy_claim",
]

HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection"}
    | {"te", "trailer", "transfer-encoding", "upgrade"}
)
#: Request fields never forwarded: credentials for the gateway, and fields the proxy sets itself.
_REQUEST_DROP: Final = frozenset({"authorization", "dpop", "host", "content-length"})
_RESPONSE_DROP: Final = frozenset({"content-length", "server", "date"})
#: Answer fields that steer a cache or proxy in front of the gateway past ``Cache-Control:
#: private``: nginx's ``X-Accel-Expires`` overrides it (and ``X-Accel-Redirect`` makes nginx serve
#: another location), CDNs obey ``Surrogate-Control`` and ``CDN-Cache-Control`` or a CDN's own
#: ``*-CDN-Cache-Control`` (RFC 9213). None is meant for the caller; all are dropped.
_SHARED_CACHE_DROP: Final = frozenset({"surrogate-control", "cdn-cache-control"})
_SHARED_CACHE_PREFIX: Final = "x-accel-"
_SHARED_CACHE_SUFFIX: Final = "-cdn-cache-control"
#: Request fields dropped when the answer is to be sanitized. Those that ask for a part of the
#: answer (``Request-Range`` is Range to older servers): a part holds no ``customer.ssn`` to
#: redact, and a card number split over two parts is never masked. And ``If-None-Match``: the
#: caller never sees the upstream's entity tag, and a 304 or a 200 would tell it whether a
#: guessed one, computed over a guess of the unsanitized body, is right.
_SANITIZED_REQUEST_DROP: Final = frozenset({"range", "if-range", "request-range", "if-none-match"})
#: Request preconditions refused when the answer is to be sanitized: a 412 or a 2xx would tell
#: the caller whether a guessed entity tag (or date) of the unsanitized body is right, as
#: ``If-None-Match`` would. Unlike it they guard writes: dropped, a conditional write would be
#: made unconditionally, so the call is refused instead.
_SANITIZED_REQUEST_REFUSE: Final = frozenset({"if-match", "if-unmodified-since"})
#: Fields of the upstream's answer that no sanitized answer keeps: it is sent whole, in no
#: content coding, and the gateway serves no ranges of it. Nor does it keep a validator or a
#: digest computed over the unsanitized body (Express's ETag is a SHA-1 of it): the caller knows
#: all of it but what was redacted or masked, and could try every ssn until one matches.
_SANITIZED_DROP: Final = frozenset(
    {"content-encoding", "accept-ranges", "etag", "content-md5", "digest", "repr-digest"}
    | {"content-digest", "x-goog-hash", "x-ms-content-md5", "x-ms-content-crc64"}
)
#: Object stores name a body's checksum in their own ways (``x-amz-checksum-sha256``,
#: ``x-bz-content-sha1``, ``x-oss-hash-crc64ecma``, ``x-ms-blob-content-md5`` …): any field whose
#: name holds one of these words is taken for one and dropped too.
_SANITIZED_DROP_WORDS: Final = (
    *("md5", "sha1", "sha-1", "sha256", "sha-256", "sha512", "crc"),
    *("hash", "digest", "checksum"),
)
#: A control character other than HTAB, which no field value may hold (RFC 9110 §5.5).
_CONTROL_BYTE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: Upstream answers of at most this many bytes (by their ``content-length``) are sent in one piece.
WHOLE_ANSWER_BYTES: Final = 64 * 1024
_CHUNK: Final = 64 * 1024
_MAX_REMEMBERED_HOSTS: Final = 1024


def forwardable(pairs: Collection[tuple[str, str]], drop: frozenset[str]) -> list[tuple[str, str]]:
    """Headers safe to pass on: no hop-by-hop field, none named in ``Connection``, no ``proxy-*``,
    and no ``x-aegis-*`` however spelled: CGI and WSGI servers read ``X_Aegis_Agent_Id`` as the
    same variable as ``X-Aegis-Agent-Id``, so a client's underscored copy would reach the
    upstream beside (and before) the identity the gateway sets."""
    named = {t.strip().lower() for k, v in pairs if k.lower() == "connection" for t in v.split(",")}
    out = []
    for k, v in pairs:
        name = k.lower()
        if name in HOP_BY_HOP or name in named or name in drop:
            continue
        if name.startswith("proxy-") or name.replace("_", "-").startswith("x-aegis-"):
            continue
        out.append((name, v))
    return out


def joined(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """One value per field, repeats joined as RFC 9110 §5.3 reads them (``Cookie`` with ``; ``,
    RFC 9113 §8.2.3): the upstream receives every value the policy saw, not only the last."""
    values: dict[str, list[str]] = {}
    for k, v in pairs:
        values.setdefault(k, []).append(v)
    return {
        k: v[0] if len(v) == 1 else ("; " if k == "cookie" else ", ").join(v)
        for k, v in values.items()
    }


def _response_rules(result: Result) -> bool:
    return any(o.target == "response" and o.kind != "drop_header" for o in result.obligations)


def _mask_patterns(result: Result) -> tuple[str, ...]:
    """The patterns the decision masks in the answer."""
    return tuple(
        o.pattern
        for o in result.obligations
        if o.target == "response" and o.kind == "mask"
        if o.pattern
    )


#: Why text masked as written is refused when its Unicode forms hide what the masks look for.
_HIDDEN_FROM_MASKS: Final = (
    "a text answer to mask must write what the masks look for in ASCII (it holds a card "
    "number, address or key in fullwidth, circled or other Unicode forms a client reads as ASCII)"
)


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


async def _error(send: Send, result: Result, extra: dict[str, str] | None = None) -> None:
    body = {
        "error": spec_for(result.code or "server_error").oauth_error,
        "error_description": result.message,
        "code": result.code,
        "message": result.message,
        "decision_id": result.decision_id,
        **result.details,
    }
    await _json(send, result.status, body, {**result.headers, **(extra or {})})


#: Upstream connections the proxy keeps open at most, all upstreams together.
_POOL: Final = 256

UpstreamCheck = Callable[[bytes | None], Awaitable[None]]


class _CheckedConnector(aiohttp.TCPConnector):
    """aiohttp's connector, with ``check`` awaited on the server certificate of every new TLS
    connection before it carries a request. The check may read the certificate store; done here
    rather than inside the handshake it runs on a worker thread, never stalling the event loop.
    A refused connection is closed and never pooled (aiohttp drops a connection whose creation
    raised)."""

    def __init__(self, check: UpstreamCheck | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._check = check

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
        self.hash = hashlib.sha256()
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
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
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
        }
        limit = self._settings.max_body_bytes
        overflow: list[AegisError] = []  # set when a streamed body goes over the limit
        raw: bytes | None = None
        stream: AsyncIterator[bytes] | None = None
        streamed: _Streamed | None = None
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
            content_type = values.get("content-type")
            # A policy that reads this tool's bodies sees them whole, up to the body limit.
            shown = limit if self._pipeline.reads_body(route) else self._settings.policy_body_bytes
            small_declared = declared is not None and int(declared) <= shown
            # A POST form (or untyped or JSON-ish body) is read whole too: it may carry a
            # _method override (checked below).
            method = facts["method"]
            form = read_whole_for_override(method, content_type)
            if is_json_type(content_type) or form or small_declared:
                raw = await self._read(receive, limit)
                refuse_method_override(method, content_type, raw, values.get("content-encoding"))
                # Policy sees (and sanitization rewrites) only bodies it can hold whole.
                small = len(raw) <= shown
                facts["body"] = (
                    parse_json_body(raw, content_type, values.get("content-encoding"))
                    if small
                    else None
                )
                facts["body_digest"] = body_digest(raw) if raw else EMPTY_BODY_DIGEST
                facts["raw_body"] = raw if small else None
            elif declared is None and "transfer-encoding" not in values:
                raw = b""
            else:
                watch = None
                if overrides_method(method, content_type):  # a multipart form, read as it passes
                    refuse_coded_override(values.get("content-encoding"))
                    watch = MethodOverrideWatch(content_type)
                streamed = _Streamed()
                stream = self._bounded(receive, limit, overflow, streamed, watch)
                facts["body_digest"], facts["raw_body"] = STREAMED_BODY_DIGEST, None
        except AegisError as exc:
            return await _error(send, await self._pipeline.refuse(CallContext(**facts), exc), close)
        ctx = CallContext(**facts)
        result = await self._pipeline.run(ctx)
        if not result.allowed:
            return await _error(send, result)
        data: Any = raw if stream is None else stream
        if result.body_changed:
            data = json.dumps(result.body, separators=(",", ":")).encode()
        try:
            await self._forward(send, ctx, sent, result, data, overflow, streamed)
        except Exception as exc:  # the gateway's own failure after the decision: 500, recorded
            if "forward_failed" not in result.details:  # once per call
                code = exc.code if isinstance(exc, AegisError) else "server_error"
                await self._forward_failed(ctx, result, 500, code, "the gateway failed to forward")
            raise
        if (
            streamed is not None
            and data is stream
            and not streamed.recorded
            and "forward_failed" not in result.details
        ):
            await self._body_forwarded(ctx, result, streamed)  # the upstream answered early

    async def _unrouted(self, scope: Scope, status: int, code: str, message: str) -> Result:
        host = next((v for k, v in scope["headers"] if k.lower() == b"host"), b"")
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
                streamed.size += len(chunk)
                if streamed.size > limit:
                    raise AegisError(
                        f"request body larger than {limit} bytes", code="payload_too_large"
                    )
                if watch is not None:
                    watch.feed(chunk)
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
        if _response_rules(result) and any(
            k.replace("_", "-") in _SANITIZED_REQUEST_REFUSE for k, _ in ctx.headers
        ):
            return await self._gateway_error(
                send, ctx, 400, "invalid_request",
                "If-Match and If-Unmodified-Since cannot be sent on a call whose answer is "
                "sanitized (its status would confirm a guess of the unsanitized body's entity "
                "tag); send the call without them",
                result,
            )  # fmt: skip
        headers = joined(
            (k, v) for k, v in forwardable(ctx.headers, _REQUEST_DROP) if not proxy_claim(k)
        )
        # What the gateway itself saw, replacing any client claim (dropped above); obligations
        # then apply to these too (a policy may drop x-forwarded-for or mask the host).
        if ctx.client:
            headers["x-forwarded-for"] = ctx.client
        headers["x-forwarded-proto"] = ctx.url.partition(":")[0]
        headers["x-forwarded-host"] = ctx.host  # the vetted Host the route was chosen by
        if result.obligations:
            headers = apply_to_headers(headers, result.obligations, "request")
        headers.update(result.upstream_headers)
        if _response_rules(result):
            headers.pop("accept-encoding", None)  # the answer must be readable to be sanitized
            # Whole and unconditional; "If_Range" is If-Range to a CGI or WSGI upstream.
            headers = {
                k: v
                for k, v in headers.items()
                if k.replace("_", "-") not in _SANITIZED_REQUEST_DROP
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
        try:
            upstream = await self._session.request(
                ctx.method, url, headers=headers, data=data, allow_redirects=False, **tls
            )
        except (TimeoutError, AegisError, aiohttp.ClientError) as exc:
            # The streamed body went over the limit or stalled (whatever wraps the error).
            if overflow:
                too_big = overflow[0]
                await self._forward_failed(
                    ctx, result, too_big.status, too_big.code, too_big.message
                )
                body = {"error": spec_for(too_big.code).oauth_error, "code": too_big.code,
                        "message": too_big.message, "decision_id": result.decision_id}  # fmt: skip
                return await _json(send, too_big.status, body, result.headers)
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
            if upstream.status < 200:
                # No 1xx reaches the answer path but one the caller did not ask for: a 101
                # switches to a protocol no decision covers (no Upgrade is forwarded), and the
                # ASGI servers either relay it or fail on it. The connection is not reused.
                upstream.close()
                return await self._gateway_error(
                    send, ctx, 502, "bad_gateway",
                    f"the upstream answered {upstream.status}, an interim status no request "
                    "through the gateway asks for; it must send a final answer",
                    result,
                )  # fmt: skip
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
                if not _CONTROL_BYTE.search(v)
            ]
            out_headers = [
                (k, v) for k, v in forwardable(received, _RESPONSE_DROP) if not _steers_cache(k)
            ]
            if patterns := _mask_patterns(result):
                # A field the masks cannot read as the client does is left out, as one holding
                # a control character is: a Location or Set-Cookie rarely carries what is masked.
                # So is a field whose name the masks would change (X-4111111111111111): a name
                # cannot be masked and stay the field it was.
                out_headers = [
                    (k, v)
                    for k, v in out_headers
                    if _maskable_field(v, patterns)
                    and _maskable_field(k, patterns)
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
            out_headers = _private(out_headers)
            if _response_rules(result):
                return await self._sanitized(send, ctx, upstream, out_headers, result)
            await self._relay(send, ctx, upstream, out_headers, result)
        finally:
            upstream.release()

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
            except (TimeoutError, aiohttp.ClientError):
                return await self._gateway_error(
                    send,
                    ctx,
                    504,
                    "upstream_timeout",
                    "the upstream did not answer in time",
                    result,
                )
            return await _answer(send, upstream.status, headers, data)
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        await send({"type": "http.response.start", "status": upstream.status, "headers": raw})
        async for chunk in upstream.content.iter_chunked(_CHUNK):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

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
                _media_type(v) == "multipart/byteranges"
                for v in upstream.headers.getall("content-type", ())
            )
        ):
            return await self._gateway_error(
                send, ctx, 502, "bad_gateway",
                "the upstream answered with a part of its content (a range), which cannot be "
                "sanitized on its own; it must answer the whole",
                result,
            )  # fmt: skip
        headers = [
            (k, v)
            for k, v in headers
            if k not in _SANITIZED_DROP and not any(word in k for word in _SANITIZED_DROP_WORDS)
        ]
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
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    raw += chunk
                    if len(raw) > limit:
                        break
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
            if len(upstream.headers.getall("content-type", ())) > 1:
                # Read here by the first; a client may join them and take the last charset.
                raise InvalidRequest("it has more than one Content-Type field")
            if encoding != "identity":
                raise InvalidRequest(
                    "it is content-coded, though the gateway asked the upstream for an uncoded "
                    "answer (it sends no Accept-Encoding when the answer is sanitized)"
                )
            media = _media_type(ctype or "")
            if media and not as_json and not _is_text(media):
                raise InvalidRequest(
                    f"a {media[:64]} answer cannot be sanitized, only JSON and text: leave this "
                    "path out of the sanitize rule (match it by path or method)"
                )
            if not as_json and any(
                o.target == "response" and o.kind == "redact" for o in result.obligations
            ):
                # A redaction names JSON members; in text (JSON labelled text/plain included)
                # it would find nothing and pass the answer on whole.
                raise InvalidRequest("a redaction applies only to a JSON answer")
            if len(raw) > _SANITIZE_INLINE:
                # Masks and the decoding check cost tens of milliseconds on a large answer:
                # done on a worker thread, so the event loop keeps serving other calls.
                clean = await asyncio.to_thread(_sanitized_body, bytes(raw), ctype, as_json, result)
            else:
                clean = _sanitized_body(bytes(raw), ctype, as_json, result)
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
        body = {"error": error, "error_description": message, "code": error, "message": message,
                "decision_id": result.decision_id}  # fmt: skip
        await _json(send, status, body, result.headers)

    async def _forward_failed(
        self, ctx: CallContext, result: Result, status: int, code: str, message: str
    ) -> None:
        """Count, and record in the audit log before the caller is answered, that an allowed
        call was not delivered whole. A record that cannot be written is logged: the caller gets
        its error either way, and the decision record stands."""
        result.details["forward_failed"] = code
        count_forward_failure(ctx.route.tool, code)
        await self._after_decision("gateway.forward_failed", ctx, result, {
            "tenant": ctx.route.tenant, "env": ctx.route.env, "method": ctx.method,
            "path": ctx.path, "status": status, "code": code, "reason": message,
        })  # fmt: skip


def _steers_cache(name: str) -> bool:
    """Whether an answer field (lowercased name) is meant for a cache or proxy in front of the
    gateway (:data:`_SHARED_CACHE_DROP`), however spelled (``X_Accel_Expires`` too)."""
    name = name.replace("_", "-")
    return (
        name in _SHARED_CACHE_DROP
        or name.startswith(_SHARED_CACHE_PREFIX)
        or name.endswith(_SHARED_CACHE_SUFFIX)
    )


def _private(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` with ``Cache-Control: private`` added unless a field already says
    ``private`` or ``no-store`` unqualified. Every answer is the outcome of one caller's
    decision; a shared cache in front of the gateway that stored it (RFC 9111 §3.5 lets it when
    the upstream says ``public``, even for a request with ``Authorization``) would serve it to
    another agent whose call is never decided. ``private="set-cookie"`` lets a shared cache
    store the rest, and a field with a quoted string is not read here: added then too (a second
    ``private`` is harmless, a missing one is not)."""
    said = {
        directive.strip().lower()
        for name, value in headers
        if name == "cache-control" and '"' not in value
        for directive in value.split(",")
    }
    return headers if said & {"private", "no-store"} else [*headers, ("cache-control", "private")]


def _media_type(content_type: str) -> str:
    """``type/subtype`` of a ``Content-Type`` value, lowercased, without parameters."""
    return content_type.partition(";")[0].strip().lower()


#: An escape the client may decode and a mask over the text does not: ``\u0034``, ``\u{34}``,
#: ``\U00000034``, ``\x34``, octal ``\064`` (JSON, JavaScript, Python, C); ``%34``, ``%u0034``
#: (URL encoding); an HTML character reference, numeric (``&#52;``, ``&#x34``: the ``;`` is
#: optional) or named (``&commat;`` is ``@``; HTML reads the legacy ``&sup1``, ``&frac12`` …
#: without the ``;`` too). Not only digits: ``ann\u0040example.com`` hides an address,
#: ``AKIA\u0049…`` a key.
_ESCAPE: Final = re.compile(
    r"\\(?:[uUxX][0-9A-Fa-f{]|[0-7])|%(?:[0-9A-Fa-f]{2}|[uU][0-9A-Fa-f]{4})"
    r"|&(?:#[0-9xX]|[A-Za-z][A-Za-z0-9]*;|sup[123]|frac[0-9]{2})"
)
_NON_ASCII: Final = re.compile(r"[^\x00-\x7f]")
#: Backslash escapes a client may decode (JSON, JavaScript, Python, C) and ``%uXXXX``.
_BACKSLASH_ESCAPE: Final = re.compile(
    r"\\u\{0*([0-9A-Fa-f]{1,6})\}|\\u([0-9A-Fa-f]{4})|\\U([0-9A-Fa-f]{8})"
    r"|\\[xX]([0-9A-Fa-f]{2})|\\([0-7]{1,3})|%[uU]([0-9A-Fa-f]{4})"
)
#: A CSS escape: one to six hex digits, then one optional white space (``\\34 111`` is ``4111``).
_CSS_ESCAPE: Final = re.compile(r"\\([0-9A-Fa-f]{1,6})[ \t\n\r\f]?")
#: Most readings of one text the decoding check masks, all layers together (each is one pass of
#: the masks over text as long as the answer); past it the text is refused.
_MAX_READINGS: Final = 12


def _code_point(digits: str, base: int, written: str) -> str:
    code = int(digits, base)
    return chr(code) if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else written


def _readings(text: str) -> set[str]:
    """The texts a client may read ``text`` as once it decodes one layer of escapes: backslash
    escapes as JSON, JavaScript and C read them or as CSS does (``\\34 `` is ``4``, not octal),
    then HTML references as browsers read them (legacy names without ``;`` too), then
    percent-encoding as UTF-8 or as Latin-1 bytes, each with ``+`` kept or read as a space (a
    query string or cookie value is form-decoded). ``text`` itself is left out."""

    def backslash(m: re.Match[str]) -> str:
        digits, base = next((g, 8 if i == 4 else 16) for i, g in enumerate(m.groups()) if g)
        return _code_point(digits, base, m.group(0))

    out: set[str] = set()
    for form in {text, text.replace("+", " ")}:
        for unescaped in {
            _BACKSLASH_ESCAPE.sub(backslash, form),
            _CSS_ESCAPE.sub(lambda m: _code_point(m.group(1), 16, m.group(0)), form),
        }:
            referenced = html.unescape(unescaped)
            out.add(unquote(referenced, errors="replace"))
            out.add(unquote(referenced, encoding="latin-1"))
    out.discard(text)
    return out


def _revealed_by_decoding(text: str, patterns: tuple[str, ...]) -> bool:
    """Whether decoding the escapes in ``text`` (every reading of :func:`_readings`, up to three
    layers: ``%2534`` is ``%34`` is ``4``) shows the masks something they do not find in it as
    written. What they find as written is masked first, so an ordinary ``%20`` in a URL or
    ``&amp;`` in HTML next to a masked card does not count: only what the escapes hid. An
    escape no reading decodes, more than three layers, or more than :data:`_MAX_READINGS`
    readings in all, refuse it: the client may know a decoding the check does not, and the
    check's cost stays a bounded number of passes over the text."""
    if not any(c in text for c in "\\%&+"):
        return False
    current = {mask_text(text, patterns)}
    masked = 0
    for _ in range(3):
        following: set[str] = set()
        for seen in current:
            for reading in _readings(seen) - following:
                masked += 1
                if masked > _MAX_READINGS or mask_text(reading, patterns) != reading:
                    return True
                following.add(reading)
        if not following:
            return any(_ESCAPE.search(seen) for seen in current)
        current = following
    return any(_ESCAPE.search(seen) for seen in current)  # still escaped after three layers


#: A number with an exponent, not inside a word: JSON labelled text/plain or NDJSON, read by the
#: client as JSON, holds ``4.111111111111111E15`` as a card number the masks over text miss.
_EXPONENT_TOKEN: Final = re.compile(
    r"(?<![0-9A-Za-z_.])(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][+-]?[0-9]+"
)
#: A C0 control character other than TAB, LF and CR (ESC among them).
_C0_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
#: A charset declared in an HTML or XML body (``<meta charset="iso-2022-jp">``, ``<meta
#: http-equiv … content="text/html; charset=…">``, ``<?xml … encoding="…"?>``): an unlabelled
#: answer is decoded by it.
_DECLARED_CHARSET: Final = re.compile(
    r"""(?i)<meta\b[^>]*?charset\s*=\s*["']?\s*([^\s"'>;/]*)"""
    r"""|<\?xml\b[^>]*?encoding\s*=\s*["']?\s*([^\s"'>?]*)"""
)
#: A form answer reads ``+`` as a space: ``4111+1111+1111+1111`` is a card number to the client.
_FORM: Final = "application/x-www-form-urlencoded"


#: Answers to sanitize larger than this are sanitized on a worker thread.
_SANITIZE_INLINE: Final = 16 * 1024


def _sanitized_body(raw: bytes, ctype: str | None, as_json: bool, result: Result) -> Any:
    """The answer's body with the decision's response obligations applied; ``InvalidRequest``
    (or ``RecursionError``, ``UnicodeDecodeError``) when it cannot be sanitized."""
    if as_json:
        try:
            body: Any = parse_json_body(raw, ctype, fold_case=False)
        except InvalidRequest:
            raise InvalidRequest(
                "it is not JSON that reads one way (UTF-8, no member repeated)"
            ) from None
    else:
        body = _maskable_text(raw, ctype, _mask_patterns(result))
    clean = apply_to_body(body, result.obligations, "response")
    patterns = _mask_patterns(result)
    if as_json and patterns and (hidden := _hidden_in_json(clean, patterns)) is not None:
        raise InvalidRequest(hidden)
    return clean


#: Media types read as text besides ``text/*`` and the JSON types.
_TEXT_TYPES: Final = frozenset(
    {"application/xml", "application/javascript", "application/ecmascript", "application/yaml",
     "application/x-yaml", "application/csv", "application/x-ndjson", "application/jsonl",
     "application/json-seq", "application/graphql", "application/sql", "application/x-sh"}
)  # fmt: skip


def _is_text(media: str) -> bool:
    """Whether a media type (``type/subtype``, lowercase) holds text a mask can read; other
    answers (PDF, images, archives) are refused under sanitize with a message naming the type.
    A form, a multipart or a message answer counts as text here and is refused by
    :func:`_maskable_text` with its own reason."""
    top, _, sub = media.partition("/")
    return (
        top in ("text", "multipart", "message")
        or media in _TEXT_TYPES
        or media == _FORM
        or sub.endswith(("+xml", "+json", "+yaml"))
        or "json" in sub
    )


def _maskable_text(raw: bytes, content_type: str | None, patterns: tuple[str, ...]) -> str:
    """A text answer as the client will read it, for masks to rewrite; ``InvalidRequest`` when
    the masks could not see what the client reads: a charset other than UTF-8 (UTF-16 text of
    ASCII is valid UTF-8 holding NULs), text :func:`_hidden_from_masks` refuses, or a form
    (``application/x-www-form-urlencoded``). Under masks, so is a ``multipart/*`` or
    ``message/*`` answer: each part names its own transfer encoding and charset. Only JSON
    answers are parsed, their escapes decoded before masking; any other text is masked as it is
    written."""
    media = _media_type(content_type or "")
    if media == _FORM:
        raise InvalidRequest("a form answer cannot be masked: its '+' and '%XX' decode")
    if patterns and media.partition("/")[0] in ("multipart", "message"):
        # Each part names its own charset and Content-Transfer-Encoding: as quoted-printable,
        # base64 or UTF-7 a part hides a card number the masks over the whole never see.
        raise InvalidRequest(
            "a multipart or message answer cannot be masked: its parts decode on their own"
        )
    if not utf8_labelled(content_type):
        raise InvalidRequest("a text answer to mask must be UTF-8")
    text = raw.decode("utf-8")
    if patterns and _C0_CONTROL.search(text):
        # ESC switches an ISO-2022 reader to another character set (fullwidth digits in bytes
        # the masks read as ASCII punctuation); no text the masks read holds other controls.
        raise InvalidRequest(
            "a text answer to mask must hold no control character but TAB, CR and LF"
        )
    if patterns and any(
        (m.group(1) or m.group(2) or "").lower() not in ("utf-8", "utf8", "us-ascii", "ascii")
        for m in _DECLARED_CHARSET.finditer(text)
    ):
        raise InvalidRequest(
            "a text answer to mask must declare no charset but UTF-8 in its body "
            "(<meta charset>, <?xml encoding>): a client decodes by it"
        )
    if (why := _hidden_from_masks(text, patterns)) is not None:
        raise InvalidRequest(why)
    return text


def _hidden_from_masks(text: str, patterns: tuple[str, ...]) -> str | None:
    """Why masks over ``text`` as written could miss what a client reads in it, or ``None``: a
    NUL, an escape (:data:`_ESCAPE`), a digit other than ASCII 0-9 (fullwidth, Arabic-Indic,
    superscript: the client may read it as one), a number of card size written with an exponent
    (``4.111111111111111E15`` in JSON not labelled JSON: the client reads it as JSON, the masks
    see no card number), or anything the masks find only in its NFKC form (a fullwidth at
    sign, circled numbers)."""
    if "\x00" in text:
        return "a text answer to mask must hold no NUL"
    if _revealed_by_decoding(text, patterns):
        return (
            "a text answer to mask holds an escape (\\u, \\x, %XX, &#, &name;) that decodes "
            "to what the masks look for"
        )
    if not text.isascii() and any(ch.isdigit() for ch in _NON_ASCII.findall(text)):
        return "a text answer to mask must write its digits as ASCII 0-9"
    if any(exponent_number_digits(m.group(0)) for m in _EXPONENT_TOKEN.finditer(text)):
        return "a text answer to mask must write no number of 13 to 19 digits with an exponent"
    if hidden_from_masks(text, patterns):
        return _HIDDEN_FROM_MASKS
    return None


def _maskable_field(value: str, patterns: tuple[str, ...]) -> bool:
    """Whether masks over an answer field's value (its bytes as Latin-1) see what the client
    reads: the text tests of :func:`_hidden_from_masks`, over the bytes read as Latin-1 and as
    UTF-8 both (a fullwidth digit is three bytes); a ``Location`` query or a cookie value
    decodes ``%34`` and ``+`` (:func:`_readings`) as the masks do not."""
    readings = [value, value.encode("latin-1").decode("utf-8", "replace")]
    return all(_hidden_from_masks(text, patterns) is None for text in readings)


def _hidden_in_json(clean: Any, patterns: tuple[str, ...]) -> str | None:
    """Why masks over a JSON answer's strings (``clean``, already masked) could miss what a
    client reads in one, or ``None``. The parser decodes JSON's own escapes only; a client may
    decode more in a string or member name: an HTML reference (``"<p>&#52;111 …</p>"``), ``%34``,
    a doubled ``\\u0034``, a form's ``+`` (``4111+1111+1111+1111``), or read a number with an
    exponent inside longer text (``"card 4.111111111111111e15"``, fullwidth digits too)."""
    stack = [clean]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str) and (why := _hidden_in_string(value, patterns)) is not None:
            return why
    return None


def _hidden_in_string(text: str, patterns: tuple[str, ...]) -> str | None:
    """The tests of :func:`_hidden_from_masks` for one masked JSON string: escapes and NULs
    refuse it; a card-size number with an exponent, or digits joined by ``+`` read as spaces,
    refuse it only where the masks would change what it reads as (JSON strings are read in
    their NFKC form, so other Unicode digits are masked, not refused)."""
    if "\x00" in text:
        return "a JSON answer to mask must hold no NUL in a string"
    if _revealed_by_decoding(text, patterns):
        return (
            "a JSON answer to mask holds a string with an escape (\\u, \\x, %XX, &#, "
            "&name;) that decodes to what the masks look for"
        )
    for token in _EXPONENT_TOKEN.finditer(as_read(text)):
        if any(mask_text(d, patterns) != d for d in exponent_number_digits(token.group(0))):
            return "a JSON answer to mask must write no card number with an exponent in a string"
    return None

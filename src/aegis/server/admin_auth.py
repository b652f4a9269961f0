"""Admin API authentication (before routing) and role checks (per route).

:class:`AdminAuthMiddleware` wraps the whole admin app, so no request reaches a route, the OpenAPI
document or even a 404 without a valid, unrevoked admin API key. It also caps request bodies,
refuses JSON bodies some reader would read otherwise (a repeated member), turns an unexpected
exception into a JSON ``server_error`` and counts every request by outcome.
As a second line behind the per-route dependencies, an ``auditor`` key never gets past it with a
method other than GET or HEAD.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aegis.crypto.jws import StrictJSONError, strict_json
from aegis.errors import AccessDenied, AegisError, ClientAuthError, InvalidRequest
from aegis.server.services import Services
from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import ADMIN_REQUESTS
from aegis.types import AdminKey, AdminRole

__all__ = [
    "SCOPE_KEY",
    "Admin",
    "AdminAuthMiddleware",
    "Operator",
    "Reader",
    "actor",
    "set_outcome",
]

#: ASGI scope key holding the authenticated :class:`AdminKey`; set only by the middleware.
SCOPE_KEY: Final = "aegis.admin_key"
_OUTCOME: Final = "aegis.admin_outcome"
_READ_METHODS: Final = frozenset({"GET", "HEAD"})


def set_outcome(scope: Scope, code: str) -> None:
    """Record the error code a response carries, for the request counter."""
    scope[_OUTCOME] = code


def actor(key: AdminKey) -> str:
    """How events name the caller."""
    return f"admin_key:{key.key_id}"


def _check_json(body: bytes) -> None:
    """Refuse a body that is JSON some reader would read otherwise: a repeated member (Python
    keeps the last, so {"action": "deny", ..., "action": "allow"} stored an allow a reviewer
    reads as a deny, and {"role": "auditor", "role": "admin"} made an admin key), NaN or
    Infinity, a lone surrogate. A body that is not JSON at all is the route's to refuse."""
    if not body.strip():
        return
    # JSON is UTF-8 without a byte-order mark (RFC 8259 §8.1); the routes' readers also take
    # UTF-16, UTF-32 and a BOM, which this check would not read: refused, not passed on unread.
    # UTF-16 and UTF-32 text in ASCII is valid UTF-8 (its NULs too): a body holding a NUL byte
    # is none that JSON in UTF-8 or a form can be (both escape it), so it is refused as well.
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the request body must be UTF-8 (send JSON in UTF-8)") from None
    if "\x00" in text:
        raise InvalidRequest("the request body must be UTF-8 (it holds a NUL byte)")
    if text.startswith("\ufeff"):
        raise InvalidRequest("the request body must not start with a byte-order mark")
    try:
        strict_json(text)
    except StrictJSONError as exc:
        raise InvalidRequest(f"the request body {exc}") from None
    except RecursionError:
        raise InvalidRequest("the request body is JSON nested too deeply") from None
    except ValueError:  # not JSON: the route's own reading refuses it
        return


def _unauthenticated() -> ClientAuthError:
    return ClientAuthError(
        "a valid admin API key is required: send Authorization: Bearer aegis_ak_...",
        code="unauthenticated",
    )


class AdminAuthMiddleware:
    def __init__(self, app: ASGIApp, *, services: Services, max_body_bytes: int) -> None:
        self.app = app
        self._services = services
        self._max = max_body_bytes

    async def _authenticate(self, scope: Scope) -> AdminKey:
        values = [v for k, v in scope.get("headers", ()) if k == b"authorization"]
        if len(values) != 1:
            raise _unauthenticated()
        scheme, _, presented = values[0].decode("latin-1").partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented.startswith("aegis_ak_"):
            raise _unauthenticated()
        # A lookup in the synchronous registry store; Unavailable propagates (503, fail closed).
        key: AdminKey = await run_in_threadpool(
            self._services.registry.authenticate_admin, presented
        )
        if key.role is AdminRole.AUDITOR and scope.get("method") not in _READ_METHODS:
            raise AccessDenied("an auditor key may only read (GET)", code="forbidden")
        return key

    def _check_length(self, scope: Scope) -> None:
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                if not v.isdigit():
                    raise InvalidRequest("content-length must be a whole number of bytes")
                if int(v) > self._max:
                    raise _too_large(self._max)

    async def _whole_body(self, receive: Receive) -> Receive:
        """Read the body here, whole and capped (413 whatever its framing: an error raised
        inside the framework's own body read would turn into its 400), check that it is JSON
        every reader reads alike, then hand it to the app as received."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidRequest("the client went away before sending its whole body")
            body += message.get("body", b"")
            if len(body) > self._max:
                raise _too_large(self._max)
            if not message.get("more_body", False):
                break
        _check_json(bytes(body))
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # then only the client's disconnect

        return replay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websocket routes exist; refuse the handshake
            await send({"type": "websocket.close", "code": 1008})
            return
        status = 0

        async def tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                # Answers carry client secrets, admin keys, access tokens and registry state: no
                # cache between the API and its caller keeps any of them.
                headers = [(k, v) for k, v in message.get("headers", ()) if k != b"cache-control"]
                message = {**message, "headers": [*headers, (b"cache-control", b"no-store")]}
            await send(message)

        try:
            scope[SCOPE_KEY] = await self._authenticate(scope)
            self._check_length(scope)
            await self.app(scope, await self._whole_body(receive), tracked)
        except AegisError as exc:
            await _reply(scope, tracked, exc, status)
        except Exception as exc:  # answered as JSON and logged; the server keeps running
            log_event(
                "admin.unhandled_error",
                level=logging.ERROR,
                error=type(exc).__name__,
                path=str(scope.get("path", "")),
            )
            await _reply(scope, tracked, AegisError("internal error; see the server log"), status)
        finally:
            outcome = "ok" if 0 < status < 400 else str(scope.get(_OUTCOME, "error"))
            ADMIN_REQUESTS.labels(outcome=outcome).inc()


def _too_large(limit: int) -> AegisError:
    return AegisError(
        f"request body is larger than {limit} bytes (server.max_body_bytes)",
        code="payload_too_large",
    )


async def _reply(scope: Scope, send: Send, exc: AegisError, status: int) -> None:
    if status:  # a response already started: nothing more can be said
        return
    set_outcome(scope, exc.code)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    response = JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)

    async def no_body() -> Message:
        return {"type": "http.disconnect"}

    await response(scope, no_body, send)


def _requires(*roles: AdminRole, what: str) -> Callable[[Request], Awaitable[AdminKey]]:
    allowed = frozenset(roles)
    names = " or ".join(r.value for r in roles)

    async def check(request: Request) -> AdminKey:
        key: Any = request.scope.get(SCOPE_KEY)
        if not isinstance(key, AdminKey):  # the middleware did not run: refuse, never assume
            raise _unauthenticated()
        if key.role not in allowed:
            raise AccessDenied(
                f"an {key.role.value} key cannot {what}; use a key with role {names}",
                code="forbidden",
            )
        return key

    return check


#: Any valid key: read-only routes.
Reader = Annotated[AdminKey, Depends(_requires(*AdminRole, what="read"))]
#: Registry, clients, keys and tokens.
Operator = Annotated[
    AdminKey,
    Depends(_requires(AdminRole.ADMIN, AdminRole.OPERATOR, what="change registry, keys or tokens")),
]
#: Admin-key management.
Admin = Annotated[AdminKey, Depends(_requires(AdminRole.ADMIN, what="manage admin keys"))]

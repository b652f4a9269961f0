"""The admin API: JSON REST under ``/v1/admin/...`` (registry, keys, events, admin keys) and
``/v1/policy/dry-run``.

Security contract:

* Every request is authenticated before routing by :class:`AdminAuthMiddleware` with an admin API
  key (``Authorization: Bearer aegis_ak_...``). There is no unauthenticated path, not even the
  OpenAPI document or a 404; a store that cannot answer is a 503, never a pass.
* Roles are checked per route by a dependency: ``admin`` may do everything, ``operator`` the
  registry, clients, keys and tokens, ``auditor`` only reads (``GET``).
* Errors are ``{"code", "message", ...details}`` with the status of :data:`aegis.errors.CODES`;
  FastAPI's validation errors become ``invalid_request`` naming the field.
* Events record the actor as ``admin_key:<key_id>``. Endpoints are plain ``def`` (the thread pool)
  because the registry and key stores are synchronous; every registry write drops the cache.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aegis.errors import AegisError, InvalidRequest
from aegis.server.admin_approvals import router as approvals_router
from aegis.server.admin_auth import AdminAuthMiddleware, Reader, set_outcome
from aegis.server.admin_policy import router as policy_router
from aegis.server.admin_routes import router
from aegis.server.services import Services

__all__ = ["create_admin_app"]


def _error_response(request: Request, exc: AegisError) -> JSONResponse:
    set_outcome(request.scope, exc.code)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


async def _aegis_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AegisError)
    return _error_response(request, exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    reason = str(first.get("msg", "is not valid")).lower()
    if first.get("type") == "json_invalid":  # its loc is a character position, not a field
        field, reason = "body", f"not valid JSON ({reason})"
    else:
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        field = ".".join(loc) or "body"
    return _error_response(
        request, InvalidRequest(f"{field}: {reason}; fix the field and retry", field=field)
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        err = AegisError("no admin endpoint at this path; see /v1/openapi.json", code="not_found")
    else:
        err = InvalidRequest(f"{request.method} is not supported here ({exc.detail})".lower())
    return _error_response(request, err)


def _query_names(dependant: Dependant) -> set[str]:
    """The query parameters a route reads, its dependencies' included."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def _known_query(request: Request) -> None:
    """Refuse a query parameter the route does not read: a misspelt filter
    (``?tenat=globex``) would otherwise answer with every tenant's records."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    known = _query_names(dependant) if isinstance(dependant, Dependant) else set()
    unknown = sorted(name for name in request.query_params if name not in known)
    if unknown:
        accepted = ", ".join(sorted(known)) or "none"
        raise InvalidRequest(
            f"unknown query parameter {unknown[0][:64]!r}; this endpoint reads {accepted}",
            field=unknown[0][:64],
        )


def create_admin_app(services: Services) -> FastAPI:
    """The admin API as an ASGI app, mounted at ``/v1`` by :func:`aegis.server.app.create_app`."""
    app = FastAPI(
        title="Aegis admin API",
        version="1",
        # Paths in the document are relative to where create_app mounts this app.
        servers=[{"url": "/v1"}],
        # The document is served below, behind the same authentication as everything else.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(_known_query)],
    )
    app.state.services = services
    app.include_router(router)
    app.include_router(policy_router)
    app.include_router(approvals_router)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(key: Reader) -> dict[str, Any]:
        return app.openapi()

    app.add_exception_handler(AegisError, _aegis_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(
        AdminAuthMiddleware, services=services, max_body_bytes=services.config.server.max_body_bytes
    )
    return app

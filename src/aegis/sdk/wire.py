r"""Reading Aegis answers: which responses are refusals, and the typed error each one becomes.

Token endpoint answers become :class:`~aegis.sdk.cache.CachedToken`\s. Three error bodies reach an
agent. The gateway refuses with ``{error, error_description, code,
decision_id}`` (and the ``x-aegis-decision-id`` header); the admin API with ``{code, message,
...details}``; the token endpoint with RFC 6749 §5.2 ``{error, error_description}``, where a refused
token exchange (RFC 8693 §2.2.2, always ``invalid_request``) ends its description with the stable
Aegis code in parentheses. This module is the one place that translates them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

import httpx

from aegis.crypto.jws import parse_compact
from aegis.errors import CODES, REFUSAL_FIELD, AegisError, refusal_mark
from aegis.sdk.cache import CachedToken
from aegis.sdk.errors import AccessDeniedError, AegisClientError, error_class

__all__ = [
    "DECISION_HEADER",
    "error_from_response",
    "is_gateway_refusal",
    "parse_body",
    "token_from_response",
]

DECISION_HEADER: Final = "x-aegis-decision-id"
_TRAILING_CODE: Final = re.compile(r"\(([a-z0-9_]{1,64})\)\s*$")
#: Error bodies larger than this are not parsed (a refusal is a few hundred bytes).
_MAX_ERROR_BODY: Final = 64 * 1024


def parse_body(response: httpx.Response) -> dict[str, Any]:
    """The JSON object of an (already read) error response, or ``{}``. A refusal on an MCP
    route is a JSON-RPC error whose ``data`` is the gateway's body: that body is returned."""
    content = response.content
    if not content or len(content) > _MAX_ERROR_BODY:
        return {}
    try:
        body = json.loads(content)
    except ValueError:
        return {}
    if not isinstance(body, dict):
        return {}
    error = body.get("error")
    if body.get("jsonrpc") == "2.0" and isinstance(error, dict):
        data = error.get("data")
        return data if isinstance(data, dict) else {}
    return body


def is_gateway_refusal(response: httpx.Response, body: Mapping[str, Any]) -> bool:
    """A refusal the gateway itself made (not an upstream's own 4xx): an error status, a known
    Aegis ``code``, the decision id both in the body and in the header, and the gateway's mark
    for the credentials this request was sent with (:data:`~aegis.errors.REFUSAL_FIELD`). A tool
    knows the decision id of a call that reached it, never the credentials: without the mark,
    its Aegis-shaped 503 would have the agent send a POST the tool had acted on again."""
    if not (
        response.status_code >= 400
        and isinstance(body.get("code"), str)
        and body.get("code") in CODES
        and body.get("decision_id") is not None
        and body.get("decision_id") == response.headers.get(DECISION_HEADER)
    ):
        return False
    try:
        sent = response.request.headers.get("authorization")
    except RuntimeError:  # a response built without its request
        return False
    return sent is not None and response.headers.get_list(REFUSAL_FIELD) == [refusal_mark(sent)]


def _code_of(body: Mapping[str, Any], status: int) -> str:
    code = body.get("code")
    if isinstance(code, str) and code:
        return code
    description = body.get("error_description")
    if isinstance(description, str):
        found = _TRAILING_CODE.search(description)
        if found and found.group(1) in CODES:
            return found.group(1)
    error = body.get("error")
    if isinstance(error, str) and error:
        return error
    return "server_error" if status >= 500 else "invalid_request"


def error_from_response(response: httpx.Response) -> AegisClientError:
    """The typed error for an Aegis error response (the body must have been read)."""
    body = parse_body(response)
    status = response.status_code
    code = _code_of(body, status)
    message = body.get("error_description") or body.get("message") or f"http status {status}"
    decision = body.get("decision_id") or response.headers.get(DECISION_HEADER)
    details = {
        k: v
        for k, v in body.items()
        if k not in ("code", "message", "error", "error_description", "decision_id")
    }
    cls = error_class(code, status)
    return cls(
        str(message)[:500],
        code=code,
        status=status,
        decision_id=str(decision) if decision is not None else None,
        details=details,
    )


def token_from_response(
    response: httpx.Response, *, now: float, tenant: str | None = None
) -> CachedToken:
    """A token endpoint answer (RFC 6749 §5.1) as a :class:`CachedToken`; a refusal raises its
    typed error. ``tenant``, when given, must be the issued token's tenant (``tenant_mismatch``)."""
    if response.status_code != 200:
        raise error_from_response(response)
    body = response.json()
    access_token, expires_in = body.get("access_token"), body.get("expires_in")
    if not isinstance(access_token, str) or not isinstance(expires_in, int | float):
        raise AegisClientError(
            "the token endpoint answered without a token", code="server_error", status=200
        )
    try:
        claims = parse_compact(access_token).payload
    except AegisError as exc:
        raise AegisClientError(
            "the token endpoint answered with a malformed token", code="malformed_token"
        ) from exc
    if tenant is not None and claims.get("tenant") != tenant:
        raise AccessDeniedError(
            f"the token is for tenant {claims.get('tenant')!r}, not {tenant!r}",
            code="tenant_mismatch",
        )
    return CachedToken(
        access_token=access_token,
        token_type=str(body.get("token_type", "Bearer")),
        issued_at=now,
        expires_at=now + float(expires_in),
        scope=str(body.get("scope", "")),
        claims=claims,
    )

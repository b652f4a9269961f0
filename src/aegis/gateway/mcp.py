"""MCP routes: the Model Context Protocol's Streamable HTTP transport (MCP 2025-06-18 and later)
decided message by message at the reverse proxy and the ext_authz doors.

A route with ``mcp: true`` fronts an MCP server's endpoint. Each POST carries one JSON-RPC 2.0
message, and the call is decided under the tool that message acts on, so that one policy governs
each MCP tool as it governs an HTTP tool:

* ``tools/call`` is decided as the tool ``<route tool>.<params.name>`` (``github.create_issue``),
  with the whole message as the request body policy reads (``request.body.params.arguments``);
* every other message (``initialize``, ``tools/list``, ``ping``, notifications, the client's
  answers to the server), the GET that opens the server's event stream and the DELETE that ends a
  session are decided as the route's own tool (``github``).

What the gateway cannot decide alike is refused, never passed under the route's own tool: a
batch (a JSON array; MCP 2025-06-18 removed batching, and each message would need its own
decision), a body that is not one JSON-RPC message, a ``tools/call`` whose name is not a plain
tool name (1 to 128 letters, digits, ``_``, ``-``, ``.``: the characters MCP asks tool names to
keep to, none of which a policy glob reads specially), an ``Mcp-Method`` or ``Mcp-Name`` field
that does not say what the body says (a server or router that reads those instead would act on
another call than the one decided), a GET or DELETE with a body, and a POST whose body the door
was not shown. At the reverse proxy, refusals on an MCP route carry a JSON-RPC error
(``jsonrpc``, ``id``, ``error.code``, ``error.message``), its ``data`` the gateway's usual
refusal body, so that an MCP client reports the refusal on the call that was refused (the
ext_authz doors answer the usual body: the proxy in front writes the answer).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import functools
import hashlib
import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from aegis.errors import AegisError, InvalidRequest
from aegis.gateway.context import Route
from aegis.gateway.fields import is_encoded, is_json_type, parse_json_body
from aegis.gateway.names import name_keys, query_key

__all__ = [
    "HEADER_MISMATCH",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "MCP_METHODS",
    "PARSE_ERROR",
    "REFUSED",
    "SESSION_FIELD",
    "SESSION_NAMESPACE",
    "TOOL_NAME",
    "McpInvalid",
    "McpMessage",
    "legacy_session",
    "lists_tools",
    "mcp_call",
    "opens_session",
    "read_message",
    "request_id",
    "rpc_error",
    "session_id",
    "session_key",
]

#: The HTTP methods of the Streamable HTTP transport: POST (a message), GET (the server's event
#: stream), DELETE (the end of a session). Anything else on an MCP route is 405.
MCP_METHODS: Final = ("POST", "GET", "DELETE")
#: JSON-RPC 2.0's own error codes, and MCP's for routing fields that disagree with the body.
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
INVALID_PARAMS: Final = -32602
HEADER_MISMATCH: Final = -32020
#: Every other refusal (token, proof, policy, approval, a dependency down): an
#: implementation-defined code of JSON-RPC's server-error band, outside the codes MCP and its
#: SDKs use; ``error.data.code`` names the refusal.
REFUSED: Final = -32003
#: A tool name MCP asks servers to keep to (1 to 128 of these characters, case-sensitive).
TOOL_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
#: The routing fields a client may send beside the body (MCP 2026-07-28), and the member of
#: ``params`` the ``Mcp-Name`` field repeats for each method that has one.
_METHOD_FIELD: Final = "mcp-method"
_NAME_FIELD: Final = "mcp-name"
_NAMED_BY: Final = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
#: The session an MCP server handed out on ``initialize``, sent back on every later request; the
#: pipeline holds it for the agent whose allowed call first named it (``session_key``, the
#: replay store's ``claim``).
SESSION_FIELD: Final = "mcp-session-id"
SESSION_NAMESPACE: Final = "mcp-session"
#: MCP: "only visible ASCII characters (ranging from 0x21 to 0x7E)"; never a comma, which is how
#: a proxy joins two fields (Envoy's check request: "VICTIM,x", of which a server reads VICTIM).
_SESSION_ID: Final = re.compile(r"[\x21-\x2b\x2d-\x7e]{1,256}")
#: The query parameter the older HTTP+SSE transport (MCP 2024-11-05) names its session by on
#: each POST: ``session_id`` (the Python SDK) or ``sessionId`` (the TypeScript SDK), as a
#: lenient server may file either.
_LEGACY_SESSION_KEYS: Final = frozenset({query_key("session_id"), query_key("sessionId")})
#: A field value carried in base64 because it is not printable ASCII (``=?base64?...?=``).
_BASE64_VALUE: Final = re.compile(r"=\?base64\?([A-Za-z0-9+/]*={0,2})\?=")


class McpInvalid(InvalidRequest):
    """A POST on an MCP route that is not one JSON-RPC message the gateway can decide alike;
    ``rpc_code`` is the JSON-RPC error code it is answered with, ``rpc_id`` the message's id
    where it could be read."""

    def __init__(
        self, message: str, rpc_code: int = INVALID_REQUEST, rpc_id: str | int | None = None
    ) -> None:
        super().__init__(message)
        self.rpc_code, self.rpc_id = rpc_code, rpc_id


@dataclass(frozen=True, slots=True)
class McpMessage:
    """What the decision needs of one JSON-RPC message."""

    #: The request's id (None for a notification or a message whose id could not be read).
    id: str | int | None
    #: The method; None for the client's answer (``result`` or ``error``) to a server request.
    method: str | None
    #: The tool a ``tools/call`` names.
    tool: str | None = None
    #: The message as parsed (without the check of unsafe integers), for a door to show policy
    #: instead of parsing the same bytes again.
    body: Any = dataclasses.field(default=None, compare=False, repr=False)


def _is_id(value: Any) -> bool:
    # MCP: "a string or integer", never null (JSON-RPC's fractional ids are not MCP's either).
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def request_id(body: Any) -> str | int | None:
    """The id a refusal of ``body`` names: a request's, when it can be read. None for a
    notification, and for the client's answer to a server request, whose id is the server's
    numbering, not the client's (MCP: the error for an answer or a notification has no id)."""
    if not isinstance(body, dict) or "method" not in body:
        return None
    rid = body.get("id")
    return rid if _is_id(rid) else None


def read_message(body: Any, *, json_text_arguments: bool = False) -> McpMessage:
    """The message a POST carries, or :class:`McpInvalid` naming what to send instead.

    A ``tools/call`` argument whose value is a string holding JSON text of an object, an array
    or null is refused unless ``json_text_arguments``: MCP servers such as the Python SDK's
    parse such a string before the tool runs (``FuncMetadata.pre_parse_json``), so the tool
    would get an object where policy read a string (and ``pr\u006fd`` where policy read no
    ``prod``)."""
    if isinstance(body, list):
        raise McpInvalid(
            "a JSON-RPC batch is not accepted on an MCP route: send one message per request "
            "(MCP 2025-06-18 has no batches), so that each is decided on its own"
        )
    if not isinstance(body, dict):
        raise McpInvalid("the body must be one JSON-RPC 2.0 message (a JSON object)")
    rid = body.get("id")
    known = request_id(body)
    if body.get("jsonrpc") != "2.0":
        raise McpInvalid('a JSON-RPC message needs "jsonrpc": "2.0"', rpc_id=known)
    if "id" in body and not _is_id(rid):
        raise McpInvalid("a JSON-RPC id on an MCP route is a string or an integer")
    if "method" not in body:
        if "id" not in body or ("result" in body) == ("error" in body):
            raise McpInvalid(
                "a JSON-RPC message without a method is an answer: an id and exactly one of "
                "result or error"
            )
        # The id of an answer is the server's numbering, not the client's: a refusal of it
        # names none (MCP: the error for an answer or a notification has no id).
        return McpMessage(None, None)
    method = body["method"]
    if not isinstance(method, str) or not method:
        raise McpInvalid("a JSON-RPC method is a non-empty string", rpc_id=known)
    if "result" in body or "error" in body:
        raise McpInvalid("a JSON-RPC request carries no result or error", rpc_id=known)
    params = body.get("params")
    if "params" in body and not isinstance(params, dict):
        raise McpInvalid("MCP params are a JSON object", rpc_id=known)
    tool = None
    if method == "tools/call":
        tool = (params or {}).get("name")
        if not isinstance(tool, str) or not TOOL_NAME.fullmatch(tool):
            raise McpInvalid(
                "tools/call needs params.name, a tool name of 1 to 128 letters, digits, '_', "
                "'-' or '.'",
                rpc_id=known,
            )
        arguments = (params or {}).get("arguments")
        if arguments is not None and not isinstance(arguments, dict):
            raise McpInvalid("tools/call arguments are a JSON object", INVALID_PARAMS, known)
        if not json_text_arguments:
            for name, value in (arguments or {}).items():
                if _holds_json(value):
                    raise McpInvalid(
                        f"the argument {name[:64]!r} is a string holding JSON (an object, array "
                        "or null), which the MCP server may parse before the tool runs, so the "
                        "tool would get another value than policy read: send the value itself, "
                        "not a string of it (or set the route's mcp_json_text_arguments)",
                        INVALID_PARAMS,
                        known,
                    )
    return McpMessage(known, method, tool)


def _holds_json(value: Any) -> bool:
    """Whether a string argument is what the Python MCP SDK replaces with its parse: JSON text
    of an object, an array or null, as ``json.loads`` (the SDK's reader) reads it."""
    if not isinstance(value, str):
        return False
    start = value.lstrip(" \t\n\r")[:1]  # the whitespace json.loads skips
    if start not in ("{", "[", "n"):  # no object, array or null can begin otherwise
        return False
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        return False  # left as the string by the server too
    return parsed is None or isinstance(parsed, dict | list)


def _field_value(value: str) -> str | None:
    """A routing field's value as the client meant it (base64-carried values decoded), or None
    when it cannot be read."""
    carried = _BASE64_VALUE.fullmatch(value.strip())
    if carried is None:
        return value.strip()
    try:
        return base64.b64decode(carried.group(1), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def _check_routing_fields(
    message: McpMessage, body: dict[str, Any], fields: Iterable[tuple[str, str]]
) -> None:
    """Refuse ``Mcp-Method`` / ``Mcp-Name`` fields that repeat or differ from the body."""
    seen: dict[str, str] = {}
    for spelled, value in fields:
        # A CGI or WSGI reader takes Mcp_Name for Mcp-Name: either spelling is the field.
        name = spelled.replace("_", "-")
        if name in (_METHOD_FIELD, _NAME_FIELD):
            if name in seen:
                raise McpInvalid(
                    f"the {name} field appears more than once", HEADER_MISMATCH, message.id
                )
            seen[name] = value
    if _METHOD_FIELD in seen and _field_value(seen[_METHOD_FIELD]) != message.method:
        raise McpInvalid(
            "the Mcp-Method field does not name the body's method; send the same method in both",
            HEADER_MISMATCH,
            message.id,
        )
    if _NAME_FIELD in seen:
        key = _NAMED_BY.get(message.method or "")
        named = (body.get("params") or {}).get(key) if key else None
        if not isinstance(named, str) or _field_value(seen[_NAME_FIELD]) != named:
            raise McpInvalid(
                "the Mcp-Name field does not name what the body's params name; send the same "
                "name in both, or leave the field out",
                HEADER_MISMATCH,
                message.id,
            )


def session_id(fields: Iterable[tuple[str, str]]) -> str | None:
    """The ``Mcp-Session-Id`` a request names (however spelled: a CGI or WSGI reader takes
    ``Mcp_Session_Id`` for it), or None; :class:`McpInvalid` for two, or one MCP would not
    issue."""
    values = [v for k, v in fields if k.replace("_", "-") == SESSION_FIELD]
    if not values:
        return None
    if len(values) > 1:
        raise McpInvalid("the Mcp-Session-Id field appears more than once")
    if not _SESSION_ID.fullmatch(values[0]):
        raise McpInvalid(
            "an Mcp-Session-Id is 1 to 256 visible ASCII characters and no comma (two fields "
            "joined by a proxy read as one)"
        )
    return values[0]


def legacy_session(query: Iterable[tuple[str, str]]) -> str | None:
    """The session the older HTTP+SSE transport's ``?session_id=`` (or ``?sessionId=``) names,
    or None; :class:`McpInvalid` for two different ones (a server reads one of them), or one
    MCP would not issue."""
    values = {v for k, v in query if name_keys(k) & _LEGACY_SESSION_KEYS}
    if not values:
        return None
    if len(values) > 1:
        raise McpInvalid("the query names more than one session (session_id, sessionId)")
    (value,) = values
    if not _SESSION_ID.fullmatch(value):
        raise McpInvalid(
            "a session_id is 1 to 256 visible ASCII characters and no comma, as an Mcp-Session-Id"
        )
    return value


def opens_session(method: str, body: Any) -> bool:
    """Whether a call carries the ``initialize`` request whose answer hands out a session."""
    return method == "POST" and isinstance(body, dict) and body.get("method") == "initialize"


def lists_tools(body: Any) -> bool:
    """Whether a call carries a ``tools/list`` request, whose answer names the server's tools."""
    return isinstance(body, dict) and body.get("method") == "tools/list" and "id" in body


def session_key(session: str) -> str:
    """Where a session is held: by its id alone, a secret its server drew at random (whatever
    route or spelling of the upstream the call came by), hashed to a bounded key. An id that
    reads as a UUID is held as that UUID, however spelled: the Python SDK's HTTP+SSE server
    reads ``?session_id=`` with ``UUID(hex=...)``, which takes upper case, hyphens, braces and a
    ``urn:uuid:`` prefix for the same session."""
    with contextlib.suppress(ValueError):
        session = uuid.UUID(session).hex
    return hashlib.sha256(session.encode()).hexdigest()


def mcp_call(
    route: Route,
    method: str,
    fields: Iterable[tuple[str, str]],
    raw: bytes | None,
    query: Iterable[tuple[str, str]] = (),
) -> tuple[Route, McpMessage | None]:
    """The route a call on an MCP route is decided under, and the message a POST carries.

    ``fields`` are the request's ``(lowercase name, value)`` pairs and ``raw`` its whole body
    (None when the door was not shown it whole). Raises :class:`McpInvalid` (400), or
    ``method_not_allowed`` (405) for a method the transport does not use."""
    if method not in MCP_METHODS:
        raise AegisError(
            f"an MCP route takes {', '.join(MCP_METHODS)} only", code="method_not_allowed"
        )
    fields = tuple(fields)
    if method != "POST":
        session_id(fields)
        legacy_session(query)
        # The server's event stream and the end of a session carry no message: a body would be
        # forwarded, and read by some server, without having been decided as one. The door must
        # have seen that there is none (raw == b""); None is a body it was not shown, or could
        # not tell apart from none.
        framing = {k: v for k, v in fields if k in ("content-length", "transfer-encoding")}
        if (
            raw != b""
            or "transfer-encoding" in framing
            or framing.get("content-length", "0") != "0"
        ):
            raise McpInvalid(
                f"a {method} on an MCP route carries no body, and this door must see that it "
                "does not (Envoy: with_request_body on every route, and "
                "gateway.ext_authz.envoy_buffers_body)"
            )
        return route, None
    if raw is None:
        raise McpInvalid(
            "the message of a POST on an MCP route must be shown whole to be decided (Envoy: "
            "with_request_body, sized to the gateway's max_body_bytes; nginx auth_request "
            "cannot send it: use the reverse proxy)"
        )
    content_type = next((v for k, v in fields if k == "content-type"), None)
    coding = next((v for k, v in fields if k == "content-encoding"), None)
    if not is_json_type(content_type) or is_encoded(coding):
        raise McpInvalid(
            "a POST on an MCP route carries one JSON-RPC message as application/json, "
            "without a content coding"
        )
    try:
        body = parse_json_body(raw, content_type, coding)
    except InvalidRequest as exc:
        raise McpInvalid(exc.message, PARSE_ERROR) from None
    message = read_message(body, json_text_arguments=route.mcp_json_text_arguments)
    try:
        session_id(fields)
        legacy_session(query)
    except McpInvalid as exc:
        raise McpInvalid(exc.message, exc.rpc_code, message.id) from None
    _check_routing_fields(message, body, fields)
    if message.tool is not None:
        route = _tool_route(route, message.tool)
    return route, dataclasses.replace(message, body=body)


@functools.lru_cache(maxsize=4096)
def _tool_route(route: Route, tool: str) -> Route:
    """``route`` decided as its tool ``tool`` (routes are frozen: one per tool is kept)."""
    return dataclasses.replace(route, tool=f"{route.tool}.{tool}", base_tool=route.tool)


def rpc_error(body: dict[str, Any], rpc_id: str | int | None, rpc_code: int) -> dict[str, Any]:
    """A refusal body as a JSON-RPC error answering the message ``rpc_id``: the gateway's own
    body (``code``, ``message``, ``decision_id`` …) is its ``data``."""
    message = str(body.get("message") or "refused")
    return {
        "jsonrpc": "2.0",
        "id": rpc_id,
        "error": {"code": rpc_code, "message": message, "data": body},
    }

"""The JSON-RPC reading of an MCP route's messages: what is decided under which tool, and that
any JSON value is either read or refused with a JSON-RPC error code, never let through unread."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from aegis.config import GatewaySettings
from aegis.errors import AegisError
from aegis.gateway.context import Route, route_from_settings
from aegis.gateway.mcp import (
    HEADER_MISMATCH,
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    TOOL_NAME,
    McpInvalid,
    McpMessage,
    mcp_call,
    read_message,
    rpc_error,
)

ROUTE = Route("/mcp", "http://127.0.0.1:9", "repo", "acme", "prod", mcp=True)
JSON = [("content-type", "application/json")]


def test_a_tool_call_is_decided_under_its_tool_and_the_rest_under_the_routes() -> None:
    call = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "a.b-c_D"}}'
    route, message = mcp_call(ROUTE, "POST", JSON, call)
    assert (route.tool, message) == ("repo.a.b-c_D", McpMessage(1, "tools/call", "a.b-c_D"))
    for body in (
        b'{"jsonrpc": "2.0", "id": "x", "method": "tools/list"}',
        b'{"jsonrpc": "2.0", "method": "notifications/initialized"}',
        b'{"jsonrpc": "2.0", "id": 5, "result": {}}',
        b'{"jsonrpc": "2.0", "id": 5, "error": {"code": 1, "message": "no"}}',
    ):
        assert mcp_call(ROUTE, "POST", JSON, body)[0].tool == "repo"
    assert mcp_call(ROUTE, "GET", [], b"") == (ROUTE, None)  # seen to carry no body
    assert mcp_call(ROUTE, "DELETE", [], b"") == (ROUTE, None)


@pytest.mark.parametrize("method", ["PUT", "PATCH", "HEAD", "OPTIONS"])
def test_methods_outside_the_transport_are_405(method: str) -> None:
    with pytest.raises(AegisError) as refused:
        mcp_call(ROUTE, method, [], None)
    assert refused.value.code == "method_not_allowed"


@pytest.mark.parametrize(
    "body",
    [
        [],
        [{"jsonrpc": "2.0", "id": 1, "method": "ping"}],
        "ping",
        None,
        {"id": 1, "method": "ping"},
        {"jsonrpc": "2.0", "id": None, "method": "ping"},
        {"jsonrpc": "2.0", "id": 1.5, "method": "ping"},
        {"jsonrpc": "2.0", "id": False, "method": "ping"},
        {"jsonrpc": "2.0", "id": 1, "method": ""},
        {"jsonrpc": "2.0", "id": 1, "method": ["tools/call"]},
        {"jsonrpc": "2.0", "id": 1, "method": "ping", "result": {}},
        {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": []},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": ""}},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "a*"}},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "a b"}},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x" * 129}},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "é"}},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "a\n"}},
        {"jsonrpc": "2.0", "id": 1},
        {"jsonrpc": "2.0", "result": {}},
        {"jsonrpc": "2.0", "id": 1, "result": {}, "error": {}},
    ],
)
def test_what_is_not_one_message_is_invalid(body: Any) -> None:
    with pytest.raises(McpInvalid) as refused:
        read_message(body)
    assert refused.value.rpc_code == INVALID_REQUEST
    assert refused.value.code == "invalid_request"


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}', [("content-type", "text/plain")]),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}', []),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}', [*JSON, ("content-encoding", "gzip")]),
        (None, JSON),
    ],
)
def test_a_message_must_be_shown_as_plain_json(body: bytes | None, fields: Any) -> None:
    with pytest.raises(McpInvalid):
        mcp_call(ROUTE, "POST", fields, body)


def test_json_the_upstream_may_read_otherwise_is_a_parse_error() -> None:
    for body in (
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "a", "name": "b"}}',
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "a", "NAME": "b"}}',
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "a"}',
        b"\xff",
    ):
        with pytest.raises(McpInvalid) as refused:
            mcp_call(ROUTE, "POST", JSON, body)
        assert refused.value.rpc_code == PARSE_ERROR


@pytest.mark.parametrize(
    ("fields", "ok"),
    [
        ([("mcp-method", "tools/call")], True),
        ([("mcp-method", "tools/call"), ("mcp-name", "search")], True),
        ([("mcp-name", "=?base64?c2VhcmNo?=")], True),
        ([("mcp-method", "tools/list")], False),
        ([("mcp-name", "delete")], False),
        ([("mcp-name", "=?base64?ZGVsZXRl?=")], False),
        ([("mcp-name", "=?base64?!!?=")], False),
        ([("mcp-method", "tools/call"), ("mcp-method", "tools/call")], False),
        ([("mcp-name", "search"), ("mcp-name", "search")], False),
        # A CGI or WSGI reader takes the underscored spelling for the field.
        ([("mcp_name", "delete")], False),
        ([("mcp_method", "tools/list")], False),
        ([("mcp-name", "search"), ("mcp_name", "delete")], False),
    ],
)
def test_routing_fields_agree_with_the_body(fields: list[tuple[str, str]], ok: bool) -> None:
    body = b'{"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "search"}}'
    if ok:
        assert mcp_call(ROUTE, "POST", [*JSON, *fields], body)[0].tool == "repo.search"
        return
    with pytest.raises(McpInvalid) as refused:
        mcp_call(ROUTE, "POST", [*JSON, *fields], body)
    assert (refused.value.rpc_code, refused.value.rpc_id) == (HEADER_MISMATCH, 3)


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        ('{"amount": 1000}', True),
        ('["prod"]', True),
        ("null", True),
        (" \n[1]", True),
        ("true", False),  # the server leaves numbers and booleans as the string they came as
        ("12", False),
        ('"quoted"', False),
        ("NaN", False),
        ("[1", False),
        ("hello", False),
        ("[" * 100_000, False),  # too deep for the server's reader too: left a string
    ],
)
def test_a_string_argument_of_json_text_is_refused(value: str, refused: bool) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "t", "arguments": {"a": 1, "b": value}}}  # fmt: skip
    if not refused:
        assert read_message(body).tool == "t"
        return
    with pytest.raises(McpInvalid) as refusal:
        read_message(body)
    assert (refusal.value.rpc_code, refusal.value.rpc_id) == (INVALID_PARAMS, 1)
    assert "'b'" in refusal.value.message
    assert read_message(body, json_text_arguments=True).tool == "t"  # the route's opt-in


def test_arguments_are_an_object() -> None:
    for arguments in ([1], "x", 5):
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "t", "arguments": arguments}}  # fmt: skip
        with pytest.raises(McpInvalid) as refusal:
            read_message(body)
        assert refusal.value.rpc_code == INVALID_PARAMS


def test_an_answer_is_refused_under_no_id() -> None:
    assert read_message({"jsonrpc": "2.0", "id": 5, "result": {}}) == McpMessage(None, None)
    with pytest.raises(McpInvalid) as refused:  # refused for its missing "jsonrpc"
        read_message({"id": 12, "result": {}})
    assert refused.value.rpc_id is None


def test_a_bad_session_field_on_a_readable_request_names_its_id() -> None:
    call = b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "search"}}'
    for session in (
        [("mcp-session-id", "a"), ("mcp-session-id", "b")],
        [("mcp-session-id", "a,b")],
    ):
        with pytest.raises(McpInvalid) as refused:
            mcp_call(ROUTE, "POST", [*JSON, *session], call)
        assert refused.value.rpc_id == 7


@pytest.mark.parametrize(
    "fields",
    [[("content-length", "5")], [("transfer-encoding", "chunked")], [("content-length", "0")]],
)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_get_or_delete_carries_no_body(method: str, fields: list[tuple[str, str]]) -> None:
    if fields == [("content-length", "0")]:
        assert mcp_call(ROUTE, method, fields, b"") == (ROUTE, None)
    else:
        with pytest.raises(McpInvalid, match="carries no body"):
            mcp_call(ROUTE, method, fields, b"")
    with pytest.raises(McpInvalid, match="carries no body"):
        mcp_call(ROUTE, method, [], b"{}")
    # A door not shown whether there is a body (None) cannot vouch that there is none.
    with pytest.raises(McpInvalid, match="must see that it does not"):
        mcp_call(ROUTE, method, [], None)


def test_a_name_field_on_a_method_that_names_nothing_is_refused() -> None:
    body = b'{"jsonrpc": "2.0", "id": 3, "method": "tools/list"}'
    with pytest.raises(McpInvalid):
        mcp_call(ROUTE, "POST", [*JSON, ("mcp-name", "search")], body)


def test_a_refusal_is_a_json_rpc_error_carrying_the_gateways_body() -> None:
    body = {"code": "access_denied", "message": "no", "decision_id": "d"}
    assert rpc_error(body, 7, -32003) == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {"code": -32003, "message": "no", "data": body},
    }


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "1.0"])},
    optional={
        "id": st.one_of(st.integers(), st.text(max_size=4), st.none(), st.booleans()),
        "method": st.one_of(st.sampled_from(["tools/call", "ping", "tools/list"]), _json),
        "params": st.one_of(
            st.fixed_dictionaries({}, optional={"name": st.one_of(st.text(max_size=10), _json)}),
            _json,
        ),
        "result": _json,
        "error": _json,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_message, _json))
def test_any_json_is_read_or_refused_never_passed_unread(body: Any) -> None:
    refused: McpInvalid | None = None
    try:
        message = read_message(body)
    except McpInvalid as exc:
        refused = exc
    if refused is not None:
        assert refused.rpc_code == INVALID_REQUEST
        return
    assert isinstance(body, dict) and body["jsonrpc"] == "2.0"
    if body.get("method") == "tools/call":
        # A tool call is always decided under a name policy reads literally.
        assert message.tool is not None and TOOL_NAME.fullmatch(message.tool)
        assert message.tool == body["params"]["name"]
    else:
        assert message.tool is None


def _route(tool: str, **extra: Any) -> dict[str, Any]:
    return {"path_prefix": f"/{tool}", "upstream": "http://127.0.0.1:9", "tool": tool,
            "tenant": "acme", "env": "prod", **extra}  # fmt: skip


@pytest.mark.parametrize(
    "routes",
    [
        [_route("repo", mcp=True), _route("repo.admin")],
        [_route("repo.admin"), _route("repo", mcp=True)],
        [_route("repo", mcp=True), _route("repo.admin", mcp=True)],
    ],
)
def test_no_route_tool_lies_under_an_mcp_routes_tool_calls(routes: list[dict[str, Any]]) -> None:
    with pytest.raises(ValidationError, match="lies under the MCP route tool 'repo'"):
        GatewaySettings.model_validate({"routes": routes})


def test_an_mcp_routes_tool_names_no_other_kind_of_route() -> None:
    with pytest.raises(ValidationError, match="names an MCP route and a route that is not one"):
        GatewaySettings.model_validate(
            {"routes": [_route("repo", mcp=True), {**_route("repo"), "path_prefix": "/plain"}]}
        )
    two = [_route("repo", mcp=True), {**_route("repo", mcp=True), "path_prefix": "/repo2"}]
    assert len(GatewaySettings.model_validate({"routes": two}).routes) == 2


def test_tools_beside_an_mcp_route_are_fine() -> None:
    routes = [_route("repo", mcp=True), _route("repository"), _route("repo2", mcp=True)]
    assert len(GatewaySettings.model_validate({"routes": routes}).routes) == 3


def test_json_text_arguments_are_an_mcp_routes_setting() -> None:
    with pytest.raises(ValidationError, match="MCP route"):
        GatewaySettings.model_validate({"routes": [_route("repo", mcp_json_text_arguments=True)]})
    route = route_from_settings(
        GatewaySettings.model_validate(
            {"routes": [_route("repo", mcp=True, mcp_json_text_arguments=True)]}
        ).routes[0]
    )
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", "arguments": {"a": "[1]"}}}'
    assert mcp_call(route, "POST", JSON, body)[0].tool == "repo.t"
    with pytest.raises(McpInvalid):
        mcp_call(ROUTE, "POST", JSON, body)


def _server_parses(value: str) -> bool:
    """What the Python MCP SDK's ``pre_parse_json`` replaces with its parse."""
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        return False
    return not isinstance(parsed, str | int | float)


_json_text = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
).map(json.dumps)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(max_size=24),
        _json_text,
        st.tuples(st.sampled_from(["", " ", "\n\t", "\r ", "\x0b", "\ufeff"]), _json_text).map(
            "".join
        ),
    )
)
def test_a_string_argument_is_refused_exactly_when_the_server_would_parse_it(value: str) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "t", "arguments": {"a": value}}}  # fmt: skip
    refused = False
    try:
        read_message(body)
    except McpInvalid:
        refused = True
    assert refused == _server_parses(value)

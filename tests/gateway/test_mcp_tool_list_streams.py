"""Tool lists on event streams, cut event by event as they pass (``EventCut``): a server may ask
the client something on the tools/list answer's stream before it answers (the question reaches the
client at once), or deliver the answer on the stream the client resumes with GET and
``Last-Event-ID`` (cut there too)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from tests.gateway.conftest import Agent, Env, gateway_app
from tests.gateway.harness import gateway_here, serve_here
from tests.gateway.test_mcp import LISTED_POLICY, MCP_ROUTE, Mcp, _initialize

TOOLS = [{"name": n, "inputSchema": {"type": "object"}} for n in ("search", "delete_repo")]
SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
Send = Callable[[dict[str, Any]], Awaitable[None]]
#: What the server does with a request that is not initialize: (scope, message or None, send).
Handler = Callable[[dict[str, Any], Any, Send], Awaitable[None]]


async def _plain(send: Send, status: int, body: bytes = b"", headers: Any = ()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})


def _event(message: Any, *, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: message\ndata: {json.dumps(message)}\n\n".encode()


def _server(handle: Handler) -> Any:
    """An MCP server over Streamable HTTP: it opens a session on initialize and leaves every
    other request to ``handle`` (the message None for GET and DELETE)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        body, more = b"", True
        while more:
            part = await receive()
            body, more = body + part.get("body", b""), part.get("more_body", False)
        message = json.loads(body) if scope["method"] == "POST" else None
        if message is not None and message.get("method") == "initialize":
            answer = {"jsonrpc": "2.0", "id": message["id"], "result": {
                "protocolVersion": message["params"]["protocolVersion"],
                "capabilities": {"tools": {}}, "serverInfo": {"name": "s", "version": "1"}}}  # fmt: skip
            session = secrets.token_hex(16).encode()
            fields = [(b"content-type", b"application/json"), (b"mcp-session-id", session)]
            return await _plain(send, 200, json.dumps(answer).encode(), fields)
        await handle(scope, message, send)

    return app


def _asking_first() -> Any:
    """Asks the client for its roots on the tools/list answer's stream, then answers."""
    answered = asyncio.Event()

    async def handle(scope: Any, message: Any, send: Send) -> None:
        if message is None:
            return await _plain(send, 405 if scope["method"] == "GET" else 200)
        if "method" not in message or "id" not in message:  # an answer, a notification
            if message.get("id") == "r1":
                answered.set()
            return await _plain(send, 202)
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        ask = {"jsonrpc": "2.0", "id": "r1", "method": "roots/list"}
        await send({"type": "http.response.body", "body": _event(ask), "more_body": True})
        await asyncio.wait_for(answered.wait(), 10)
        answer = {"jsonrpc": "2.0", "id": message["id"], "result": {"tools": TOOLS}}
        await send({"type": "http.response.body", "body": _event(answer)})

    return _server(handle)


def _resuming() -> Any:
    """Answers tools/list on the stream the client resumes with GET and Last-Event-ID."""

    async def handle(scope: Any, message: Any, send: Send) -> None:
        if scope["method"] == "GET":
            if b"last-event-id" not in dict(scope["headers"]):
                return await _plain(send, 405)
            answer = {"jsonrpc": "2.0", "id": 1, "result": {"tools": TOOLS}}
            return await _plain(send, 200, _event(answer, event_id="ev2"), SSE)
        if message is None or "id" not in message:  # DELETE, a notification
            return await _plain(send, 200 if message is None else 202)
        # tools/list: a priming event, then the stream closes; the answer follows on resumption.
        await _plain(send, 200, b"id: ev1\nretry: 10\ndata: \n\n", SSE)

    return _server(handle)


async def test_a_server_may_ask_the_client_before_it_lists_its_tools(env: Env) -> None:
    async with serve_here(_asking_first()) as url:
        app = gateway_app(env, [{**MCP_ROUTE, "upstream": url}], LISTED_POLICY,
                          upstream_timeout=2)  # fmt: skip
        async with gateway_here(app) as port, Mcp(port, Agent(env, "caller"), env).session() as s:
            listed = await s.list_tools()
            assert [t.name for t in listed.tools] == ["search"]  # delete_repo: ops only


async def test_a_tool_list_on_a_resumed_stream_is_cut_too(env: Env) -> None:
    async with serve_here(_resuming()) as url:
        app = gateway_app(env, [{**MCP_ROUTE, "upstream": url}], LISTED_POLICY)
        async with gateway_here(app) as port, Mcp(port, Agent(env, "caller"), env).session() as s:
            listed = await s.list_tools()
            assert [t.name for t in listed.tools] == ["search"]


@pytest.mark.parametrize("status", [201, 203, 206, 300])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "event-stream"])
async def test_a_tool_list_under_any_2xx_is_cut_or_refused(
    env: Env, status: int, stream: bool
) -> None:
    """An MCP client reads the body of any 2xx but 202, and of a 3xx it cannot follow (a 300
    without Location), as the answer: each is cut (a part, 206, cannot be cut on its own and is
    refused), never passed whole."""

    async def handle(scope: Any, message: Any, send: Send) -> None:
        if message is None or "id" not in message:
            return await _plain(send, 405 if message is None else 202)
        answer = {"jsonrpc": "2.0", "id": message["id"], "result": {"tools": TOOLS}}
        body = _event(answer) if stream else json.dumps(answer).encode()
        ctype = [SSE[0]] if stream else [(b"content-type", b"application/json")]
        await _plain(send, status, body, ctype)

    async with serve_here(_server(handle)) as url:
        app = gateway_app(env, [{**MCP_ROUTE, "upstream": url}], LISTED_POLICY)
        async with gateway_here(app) as port, Mcp(port, Agent(env, "caller"), env).session() as s:
            if status == 206:
                with pytest.raises(MCPError):
                    await s.list_tools()
            else:
                assert [t.name for t in (await s.list_tools()).tools] == ["search"]


async def test_a_session_refused_for_the_agents_share_is_ended_at_the_server(env: Env) -> None:
    """The agent's share is full: the session its initialize opened is never passed on, and the
    gateway ends it at the server (a DELETE naming it, sent as the initialize was) rather than
    leave it open there until its idle time runs out."""
    ended: list[tuple[bytes | None, bytes | None]] = []

    async def handle(scope: Any, message: Any, send: Send) -> None:
        if scope["method"] == "DELETE":
            fields = dict(scope["headers"])
            ended.append((fields.get(b"mcp-session-id"), fields.get(b"x-aegis-agent-id")))
        await _plain(send, 200 if message is None else 202)

    async with serve_here(_server(handle)) as url:
        app = gateway_app(env, [{**MCP_ROUTE, "upstream": url}], LISTED_POLICY,
                          mcp_sessions_per_agent=1)  # fmt: skip
        async with gateway_here(app) as port:
            caller = Agent(env, "caller")
            codes = [(await _initialize(port, caller)).status_code for _ in range(3)]
    assert codes == [200, 429, 429]
    assert len(ended) == 2 and all(sid and agent == b"caller" for sid, agent in ended)

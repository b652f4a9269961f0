"""Tool lists on event streams, cut event by event as they pass (``EventCut``): a server may ask
the client something on the tools/list answer's stream before it answers (the question reaches the
client at once), or deliver the answer on the stream the client resumes with GET and
``Last-Event-ID`` (cut there too)."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

from tests.gateway.conftest import Agent, Env, gateway_app
from tests.gateway.harness import gateway_here, serve_here
from tests.gateway.test_mcp import LISTED_POLICY, MCP_ROUTE, Mcp

TOOLS = [{"name": n, "inputSchema": {"type": "object"}} for n in ("search", "delete_repo")]


def _asking_first() -> Any:
    """Asks the client for its roots on the tools/list answer's stream, then answers."""
    answered = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                m = await receive()
                if m["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        if scope["method"] != "POST":
            await send(
                {
                    "type": "http.response.start",
                    "status": 405 if scope["method"] == "GET" else 200,
                    "headers": [],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        message = json.loads(body)
        if message.get("method") == "initialize":
            answer: Any = {
                "jsonrpc": "2.0",
                "id": message["id"],
                "result": {
                    "protocolVersion": message["params"]["protocolVersion"],
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "s", "version": "1"},
                },
            }
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"mcp-session-id", secrets.token_hex(16).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": json.dumps(answer).encode()})
            return
        if "method" not in message or "id" not in message:  # the client's answer, a notification
            if message.get("id") == "r1":
                answered.set()
            await send({"type": "http.response.start", "status": 202, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        # tools/list: ask the client for its roots first, as the stream of this request.
        ask = {"jsonrpc": "2.0", "id": "r1", "method": "roots/list"}
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send(
            {
                "type": "http.response.body",
                "more_body": True,
                "body": f"event: message\ndata: {json.dumps(ask)}\n\n".encode(),
            }
        )
        await asyncio.wait_for(answered.wait(), 10)
        answer = {"jsonrpc": "2.0", "id": message["id"], "result": {"tools": TOOLS}}
        await send(
            {
                "type": "http.response.body",
                "body": f"event: message\ndata: {json.dumps(answer)}\n\n".encode(),
            }
        )

    return app


def _resuming() -> Any:
    """Answers tools/list on the stream the client resumes with GET and Last-Event-ID."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                m = await receive()
                if m["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        headers = dict(scope["headers"])
        sse = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        if scope["method"] == "GET":
            last = headers.get(b"last-event-id")
            if last is None:
                await send({"type": "http.response.start", "status": 405, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            answer = {"jsonrpc": "2.0", "id": 1, "result": {"tools": TOOLS}}
            text = f"id: ev2\nevent: message\ndata: {json.dumps(answer)}\n\n"
            await send({"type": "http.response.start", "status": 200, "headers": sse})
            await send({"type": "http.response.body", "body": text.encode()})
            return
        if scope["method"] == "DELETE":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        message = json.loads(body)
        method = message.get("method")
        if method == "initialize":
            answer = {
                "jsonrpc": "2.0",
                "id": message["id"],
                "result": {
                    "protocolVersion": message["params"]["protocolVersion"],
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "s", "version": "1"},
                },
            }
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"mcp-session-id", secrets.token_hex(16).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": json.dumps(answer).encode()})
            return
        if "id" not in message:  # a notification
            await send({"type": "http.response.start", "status": 202, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        # tools/list: a priming event, then the stream closes; the answer follows on resumption.
        await send({"type": "http.response.start", "status": 200, "headers": sse})
        await send({"type": "http.response.body", "body": b"id: ev1\nretry: 10\ndata: \n\n"})

    return app


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

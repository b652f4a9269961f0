"""MCP routes end to end: a real MCP server (the ``mcp`` SDK's Streamable HTTP app) behind the
gateway, driven by the SDK's own client, whose requests carry a DPoP-bound token and a fresh proof
each. Each ``tools/call`` is decided as ``<route tool>.<tool name>``; refusals reach the client as
JSON-RPC errors on the call refused, and what the gateway cannot decide alike is refused."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Generator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import httpx2
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from google.rpc import code_pb2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel

from aegis.audit.attest import attestation_rules
from aegis.config import GatewaySettings
from aegis.errors import Unavailable
from aegis.gateway.ext_authz import ExtAuthz
from aegis.gateway.ext_authz_http import create_ext_authz_http_app
from aegis.gateway.mcp import (
    HEADER_MISMATCH,
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    REFUSED,
    SESSION_NAMESPACE,
    session_key,
)
from aegis.tokens.verifier import verify_jwt
from tests.gateway.conftest import Agent, Env, activate, dpop_headers, gateway_app
from tests.gateway.harness import exchange, gateway_here, serve, serve_here, signed_call
from tests.gateway.helpers import door_status
from tests.gateway.test_ext_authz_grpc import check, denied, grpc_stub

POLICY = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: repo-tools}
spec:
  rules:
    - {id: session, action: allow, reason: MCP session plumbing, match: {tools: [repo]}}
    - {id: search, action: allow, reason: search allowed, match: {tools: [repo.search]}}
    - {id: pay, action: allow, reason: small payments, match: {tools: [repo.pay]}}
    - {id: pay-limit, action: deny, reason: payment over the limit, match: {tools: [repo.pay]},
       when: {path: request.body.params.arguments.amount, gt: 100}}
    - {id: transfer, action: allow, reason: transfers, match: {tools: [repo.transfer]}}
    - {id: transfer-limit, action: deny, reason: transfer over the limit,
       match: {tools: [repo.transfer]},
       when: {path: request.body.params.arguments.payment.amount, gt: 100}}
    - {id: wipe, action: allow, reason: scratch files, match: {tools: [repo.wipe]}}
    - {id: wipe-prod, action: deny, reason: never prod, match: {tools: [repo.wipe]},
       when: {path: request.body.params.arguments.targets, contains: prod}}
"""


MCP_ROUTE: Any = {"path_prefix": "/mcp", "upstream": "http://127.0.0.1:9", "tool": "repo",
                  "tenant": "acme", "env": "prod", "mcp": True}  # fmt: skip


class Payment(BaseModel):
    amount: int
    to: str


def _server() -> MCPServer:
    server = MCPServer("repo")

    @server.tool()
    def search(query: str) -> str:
        """Search the repository."""
        return f"found {query}"

    @server.tool()
    def pay(amount: int) -> str:
        """Pay an amount."""
        return f"paid {amount}"

    @server.tool()
    def delete_repo(name: str) -> str:
        """Delete a repository."""
        calls.append(name)
        return f"deleted {name}"

    @server.tool()
    def transfer(payment: Payment) -> str:
        """Transfer an amount."""
        calls.append(f"transfer {payment.amount}")
        return f"sent {payment.amount}"

    @server.tool()
    def wipe(targets: list[str]) -> str:
        """Wipe files."""
        calls.append(f"wipe {targets}")
        return f"wiped {targets}"

    return server


#: What the server's delete_repo, transfer and wipe did: a refused call must never reach them.
calls: list[str] = []


class DpopAuth(httpx2.Auth):
    """The agent's credentials on every request: a fresh token and a DPoP proof naming the
    gateway's public URL."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def auth_flow(
        self, request: httpx2.Request
    ) -> Generator[httpx2.Request, httpx2.Response, None]:
        token = self.agent.token()
        request.headers["Authorization"] = f"DPoP {token}"
        request.headers["DPoP"] = self.agent.proof(token, request.method, request.url.path)
        yield request


@dataclass
class Mcp:
    port: int
    agent: Agent
    env: Env

    #: The Mcp-Session-Id the server gave the last session opened.
    session_id: str | None = None

    @asynccontextmanager
    async def session(self) -> AsyncIterator[ClientSession]:
        async def keep(response: httpx2.Response) -> None:
            self.session_id = response.headers.get("mcp-session-id", self.session_id)

        client = httpx2.AsyncClient(
            auth=DpopAuth(self.agent), timeout=10, event_hooks={"response": [keep]}
        )
        async with (
            client,
            streamable_http_client(f"http://127.0.0.1:{self.port}/mcp", http_client=client) as (
                read,
                write,
            ),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield session

    async def post(
        self,
        body: bytes,
        fields: list[tuple[str, str]] | None = None,
        *,
        method: str = "POST",
        agent: Agent | None = None,
    ) -> tuple[bytes, Any]:
        fields = fields or [
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
        ]
        [(head, answer)] = await exchange(
            self.port, signed_call(agent or self.agent, method, "/mcp", fields, body)
        )
        return head, json.loads(answer) if answer else None


@pytest.fixture
async def mcp(env: Env) -> AsyncIterator[Mcp]:
    calls.clear()
    async with serve_here(_server().streamable_http_app()) as url:
        app = gateway_app(env, [{**MCP_ROUTE, "upstream": url}], POLICY)
        async with gateway_here(app) as port:
            yield Mcp(port, Agent(env, "caller"), env)


def _leaves(group: BaseExceptionGroup[Any]) -> list[Any]:
    return [leaf for e in group.exceptions
            for leaf in (_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])]  # fmt: skip


def _decisions(env: Env) -> list[dict[str, Any]]:
    return list(env.audit.records(kind="gateway.decision"))


async def test_each_tool_call_is_decided_as_its_own_tool(mcp: Mcp) -> None:
    async with mcp.session() as session:
        listed = await session.list_tools()
        # delete_repo is denied whatever the call sends: not listed (and refused when called).
        assert {t.name for t in listed.tools} == {"search", "pay", "transfer", "wipe"}
        found = await session.call_tool("search", {"query": "aegis"})
        assert found.content[0].text == "found aegis"
        paid = await session.call_tool("pay", {"amount": 100})
        assert paid.content[0].text == "paid 100"
        with pytest.raises(MCPError) as over:
            await session.call_tool("pay", {"amount": 101})
        with pytest.raises(MCPError) as unlisted:
            await session.call_tool("delete_repo", {"name": "main"})
        # The session survives its refusals.
        assert (await session.call_tool("search", {"query": "again"})).content[
            0
        ].text == "found again"
    assert over.value.code == REFUSED
    assert over.value.data["code"] == "access_denied"
    assert over.value.message == "payment over the limit"
    assert unlisted.value.data["code"] == "access_denied"
    assert calls == []  # the refused call never reached the server
    tools = [(d["tool"], d["action"]) for d in _decisions(mcp.env)]
    assert ("repo.search", "allow") in tools
    assert ("repo.pay", "allow") in tools
    assert ("repo.pay", "deny") in tools
    assert ("repo.delete_repo", "deny") in tools
    assert ("repo", "allow") in tools  # initialize, tools/list, notifications


async def test_arguments_are_decided_as_the_tool_gets_them(mcp: Mcp) -> None:
    async with mcp.session() as session:
        sent = await session.call_tool("transfer", {"payment": {"amount": 100, "to": "bob"}})
        assert sent.content[0].text == "sent 100"
        with pytest.raises(MCPError) as over:
            await session.call_tool("transfer", {"payment": {"amount": 1000, "to": "eve"}})
        assert over.value.data["code"] == "access_denied"
        # The server would parse these strings into an object and a list before the tool runs
        # (where policy read a string, and "pr\u006fd" holds no "prod"): refused, not decided.
        for tool, arguments in (
            ("transfer", {"payment": json.dumps({"amount": 1000, "to": "eve"})}),
            ("wipe", {"targets": '["pr\\u006fd"]'}),
            ("wipe", {"targets": " null"}),
        ):
            with pytest.raises(MCPError) as smuggled:
                await session.call_tool(tool, arguments)
            assert (smuggled.value.code, smuggled.value.data["code"]) == (
                INVALID_PARAMS,
                "invalid_request",
            )
        with pytest.raises(MCPError) as wiped:
            await session.call_tool("wipe", {"targets": ["prod"]})
        assert wiped.value.data["code"] == "access_denied"
        # A string that is not JSON of an object, array or null is an ordinary string.
        assert (await session.call_tool("wipe", {"targets": ["12", "true"]})).content
    assert calls == ["transfer 100", "wipe ['12', 'true']"]


async def test_a_token_refusal_reaches_the_client_on_the_call_refused(mcp: Mcp) -> None:
    other = Agent(mcp.env, "stranger", tenant="globex")  # its tenant is not the route's
    mcp.agent = other
    refused: list[MCPError] = []
    try:
        async with mcp.session():
            pass
    except* MCPError as group:  # raised in the client's task group
        refused.extend(_leaves(group))
    assert [(e.code, e.data["code"]) for e in refused] == [(REFUSED, "tenant_mismatch")]


async def test_a_batch_is_refused_whole(mcp: Mcp) -> None:
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
         "params": {"name": "search", "arguments": {"query": "x"}}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
         "params": {"name": "delete_repo", "arguments": {"name": "main"}}},
    ]  # fmt: skip
    head, answer = await mcp.post(json.dumps(batch).encode())
    assert head.startswith(b"HTTP/1.1 400")
    assert answer["jsonrpc"] == "2.0"
    assert answer["id"] is None
    assert answer["error"]["code"] == INVALID_REQUEST
    assert answer["error"]["data"]["code"] == "invalid_request"
    assert "batch" in answer["error"]["message"]
    assert calls == []


@pytest.mark.parametrize(
    ("body", "code", "rpc_id"),
    [
        (b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "del/ete"}}',
         INVALID_REQUEST, 7),
        (b'{"jsonrpc": "2.0", "id": "a", "method": "tools/call", "params": {"name": 5}}',
         INVALID_REQUEST, "a"),
        (b'{"jsonrpc": "2.0", "id": 3, "method": "tools/call"}', INVALID_REQUEST, 3),
        (b'{"jsonrpc": "1.0", "id": 3, "method": "ping"}', INVALID_REQUEST, 3),
        (b'{"jsonrpc": "2.0", "id": true, "method": "ping"}', INVALID_REQUEST, None),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search",'
         b' "name": "delete_repo"}}', PARSE_ERROR, None),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search",'
         b' "Name": "delete_repo"}}', PARSE_ERROR, None),
        (b'{"jsonrpc": "2.0", "id": 1, "method": ', PARSE_ERROR, None),
        (b"", INVALID_REQUEST, None),
    ],
)  # fmt: skip
async def test_a_message_the_gateway_cannot_read_alike_is_refused(
    mcp: Mcp, body: bytes, code: int, rpc_id: Any
) -> None:
    head, answer = await mcp.post(body)
    assert head.startswith(b"HTTP/1.1 400"), head
    assert answer["error"]["code"] == code
    assert answer["id"] == rpc_id
    assert answer["error"]["data"]["decision_id"]
    assert calls == []


async def test_routing_fields_must_say_what_the_body_says(mcp: Mcp) -> None:
    call = {"jsonrpc": "2.0", "id": 9, "method": "tools/call",
            "params": {"name": "delete_repo", "arguments": {"name": "main"}}}  # fmt: skip
    base = [("Content-Type", "application/json"), ("Accept", "application/json, text/event-stream")]
    for extra in (
        [("Mcp-Method", "tools/list")],
        [("Mcp-Name", "search")],
        [("Mcp-Method", "tools/call"), ("Mcp-Method", "tools/call")],
        [("Mcp-Name", "=?base64?c2VhcmNo?=")],  # "search"
    ):
        head, answer = await mcp.post(json.dumps(call).encode(), base + extra)
        assert head.startswith(b"HTTP/1.1 400"), (extra, head)
        assert answer["error"]["code"] == HEADER_MISMATCH
        assert answer["id"] == 9
    # Fields that agree are no reason to refuse: the call is decided (and denied) by policy.
    agreeing = [("Mcp-Method", "tools/call"), ("Mcp-Name", "=?base64?ZGVsZXRlX3JlcG8=?=")]
    head, answer = await mcp.post(json.dumps(call).encode(), base + agreeing)
    assert head.startswith(b"HTTP/1.1 403"), head
    assert answer["error"]["data"]["code"] == "access_denied"
    assert calls == []


async def test_methods_the_transport_does_not_use_are_refused(mcp: Mcp) -> None:
    [(head, answer)] = await exchange(mcp.port, signed_call(mcp.agent, "PUT", "/mcp"))
    assert head.startswith(b"HTTP/1.1 405")
    assert b"\r\nallow: POST, GET, DELETE\r\n" in head
    assert json.loads(answer)["error"]["data"]["code"] == "method_not_allowed"


async def test_a_session_serves_the_agent_that_opened_it_only(mcp: Mcp) -> None:
    other = Agent(mcp.env, "other")  # the same tenant and environment, another agent
    listing = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()
    async with mcp.session() as session:
        sid = mcp.session_id
        assert sid
        stolen = [("Mcp-Session-Id", sid), ("MCP-Protocol-Version", "2025-06-18")]
        for method, body in (("DELETE", b""), ("POST", listing), ("GET", b"")):
            fields = stolen if method != "POST" else [*stolen, ("Content-Type", "application/json")]
            head, answer = await mcp.post(body, fields, method=method, agent=other)
            assert head.startswith(b"HTTP/1.1 404"), (method, head)
            assert answer["error"]["data"]["code"] == "not_found"
        # However spelled, the field names the session.
        head, _ = await mcp.post(b"", [("Mcp_Session_Id", sid)], method="DELETE", agent=other)
        assert head.startswith(b"HTTP/1.1 404"), head
        head, _ = await mcp.post(b"", [*stolen, ("Mcp_Session_Id", "x")], method="DELETE")
        assert head.startswith(b"HTTP/1.1 400"), head
        # The session is whole: its agent goes on using it.
        found = await session.call_tool("search", {"query": "still mine"})
        assert found.content[0].text == "found still mine"
    refusals = [d for d in _decisions(mcp.env) if d["agent_id"] == "other"]
    assert {d["code"] for d in refusals} == {"not_found"}
    assert len(refusals) == 4


async def test_a_refused_answer_names_no_id(mcp: Mcp) -> None:
    # The client's answer to a server request: its id is the server's numbering, not the
    # client's, so the refusal names none. Refused here for its tenant.
    mcp.agent = Agent(mcp.env, "stranger", tenant="globex")
    head, answer = await mcp.post(b'{"jsonrpc": "2.0", "id": 12, "result": {}}')
    assert head.startswith(b"HTTP/1.1 403"), head
    assert answer["id"] is None
    assert answer["error"]["data"]["code"] == "tenant_mismatch"


async def test_a_message_not_json_is_refused(mcp: Mcp) -> None:
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "delete_repo"}}'
    head, answer = await mcp.post(body, [("Content-Type", "text/plain")])
    assert head.startswith(b"HTTP/1.1 400")
    assert answer["error"]["code"] == INVALID_REQUEST
    assert calls == []


# The ext_authz doors decide an MCP route's calls as the proxy does, from the body the proxy in
# front shows them (Envoy's with_request_body).


@pytest.fixture
async def stub(env: Env) -> AsyncIterator[pb_grpc.AuthorizationStub]:
    data = env.settings.model_dump()
    data["routes"] = [{"path_prefix": "/mcp", "upstream": "http://127.0.0.1:9", "tool": "repo",
                       "tenant": "acme", "env": "prod", "mcp": True}]  # fmt: skip
    activate(env, POLICY)
    async with grpc_stub(ExtAuthz(env.pipeline, GatewaySettings.model_validate(data))) as client:
        yield client


async def test_ext_authz_decides_each_tool_call_as_its_own_tool(
    env: Env, stub: pb_grpc.AuthorizationStub
) -> None:
    agent = Agent(env)

    async def call(tool: str, *, shown: bool = True, **arguments: Any) -> pb.CheckResponse:
        body = json.dumps({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                           "params": {"name": tool, "arguments": arguments}}).encode()  # fmt: skip
        headers = [*dpop_headers(agent, agent.token(), path="/mcp"),
                   ("content-type", "application/json")]  # fmt: skip
        if not shown:  # the proxy in front did not send the body
            return await stub.Check(
                check([*headers, ("content-length", str(len(body)))], path="/mcp")
            )  # type: ignore[no-any-return]
        return await stub.Check(check(headers, path="/mcp", body=body))  # type: ignore[no-any-return]

    ok = await call("search", query="x")
    assert ok.status.code == code_pb2.OK, ok
    attestation = {h.header.key: h.header.value for h in ok.ok_response.response_headers_to_add}
    claims = verify_jwt(
        attestation["x-aegis-attestation"], env.services.keyring.public_key,
        attestation_rules(env.services.config.issuer), env.services.clock.now(),
    ).payload  # fmt: skip
    assert claims["tool"] == "repo.search"
    status, _, body = denied(await call("delete_repo", name="main"))
    assert (status, body["code"]) == (403, "access_denied")
    status, _, body = denied(await call("pay", amount=101))
    assert (status, body["code"]) == (403, "access_denied")
    # A message the door was not shown cannot be decided: refused, never decided as "repo".
    status, _, body = denied(await call("delete_repo", shown=False, name="main"))
    assert (status, body["code"]) == (400, "invalid_request")
    assert "shown whole" in body["message"]


def _call_headers(agent: Agent) -> dict[str, str]:
    token = agent.token()
    return {"authorization": f"DPoP {token}", "dpop": agent.proof(token, "POST", "/mcp"),
            "content-type": "application/json"}  # fmt: skip


def test_the_http_door_decides_what_envoy_shows_and_refuses_what_nginx_cannot(env: Env) -> None:
    activate(env, POLICY)
    agent = Agent(env)

    def call(url: str, tool: str) -> httpx.Response:
        body = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                           "params": {"name": tool, "arguments": {"query": "x"}}})  # fmt: skip
        return httpx.post(url, headers=_call_headers(agent), content=body)

    for mode in ({"http_mode": "envoy", "path_prefix": "/check"},
                 {"http_mode": "nginx", "trusted_proxies": ["127.0.0.1"]}):  # fmt: skip
        data = env.settings.model_dump()
        data.update(routes=[MCP_ROUTE], ext_authz=mode)
        settings = GatewaySettings.model_validate(data)
        app = create_ext_authz_http_app(ExtAuthz(env.pipeline, settings), settings.ext_authz)
        with serve(app) as url:
            if mode["http_mode"] == "envoy":  # Envoy's http_service sends the body it buffered
                allowed = call(f"{url}/check/mcp", "search")
                assert allowed.status_code == 200, allowed.text
                refused = call(f"{url}/check/mcp", "delete_repo")
                assert (door_status(refused), refused.json()["code"]) == (403, "access_denied")
                record = next(r for r in env.audit.records()
                              if r["decision_id"] == refused.json()["decision_id"])  # fmt: skip
                assert record["tool"] == "repo.delete_repo"
                # An empty check body says nothing (Envoy without with_request_body sends
                # none): a GET cannot be shown to carry no body here, so it is refused.
                token = agent.token()
                get = httpx.get(
                    f"{url}/check/mcp",
                    headers={
                        "authorization": f"DPoP {token}",
                        "dpop": agent.proof(token, "GET", "/mcp"),
                    },
                )
                assert (door_status(get), get.json()["code"]) == (400, "invalid_request")
            else:  # auth_request sends no body: the message cannot be decided
                nginx = {"x-original-uri": "/mcp", "x-original-method": "POST"}
                refused = httpx.get(f"{url}/auth", headers={**_call_headers(agent), **nginx})
                assert (door_status(refused), refused.json()["code"]) == (400, "invalid_request")
                assert "shown whole" in refused.json()["message"]


async def test_a_get_or_delete_with_a_body_is_refused(mcp: Mcp) -> None:
    call = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "delete_repo", "arguments": {"name": "main"}}}).encode()  # fmt: skip
    for method in ("GET", "DELETE"):
        head, answer = await mcp.post(call, [("Content-Type", "application/json")], method=method)
        assert head.startswith(b"HTTP/1.1 400"), (method, head)
        assert answer["error"]["data"]["code"] == "invalid_request"
        assert "carries no body" in answer["error"]["message"]


async def test_ext_authz_refuses_what_the_transport_does_not_carry(
    env: Env, stub: pb_grpc.AuthorizationStub
) -> None:
    agent = Agent(env)
    put = [*dpop_headers(agent, agent.token(), method="PUT", path="/mcp")]
    status, headers, body = denied(await stub.Check(check(put, path="/mcp", method="PUT")))
    assert (status, body["code"], headers.get("allow")) == (
        405,
        "method_not_allowed",
        "POST, GET, DELETE",
    )
    call = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "delete_repo", "arguments": {}}}).encode()  # fmt: skip
    get = [*dpop_headers(agent, agent.token(), method="GET", path="/mcp"),
           ("content-type", "application/json")]  # fmt: skip
    status, _, body = denied(await stub.Check(check(get, path="/mcp", method="GET", body=call)))
    assert (status, body["code"]) == (400, "invalid_request")


def _bare(agent: Agent, method: str, **http: Any) -> pb.CheckRequest:
    """A check of ``method /mcp`` as Envoy builds it, with ``http`` fields set."""
    from envoy.service.auth.v3 import attribute_context_pb2 as ac

    token = agent.token()
    req = ac.AttributeContext.HttpRequest(
        method=method, path="/mcp", host="gw.example.com", scheme="https", protocol="HTTP/1.1",
        **http,
    )  # fmt: skip
    req.headers["authorization"] = f"DPoP {token}"
    req.headers["dpop"] = agent.proof(token, method, "/mcp")
    return pb.CheckRequest(
        attributes=ac.AttributeContext(request=ac.AttributeContext.Request(http=req))
    )


async def test_a_get_passes_ext_authz_only_where_envoy_shows_it_carries_no_body(env: Env) -> None:
    activate(env, POLICY)
    data = env.settings.model_dump()
    data["routes"] = [MCP_ROUTE]
    ext = ExtAuthz(env.pipeline, GatewaySettings.model_validate(data))
    agent = Agent(env)
    call = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "delete_repo", "arguments": {}}}).encode()  # fmt: skip
    for method in ("GET", "DELETE"):
        # Envoy sends every body: a check showing none is a request without one.
        async with grpc_stub(ext, buffered=True) as buffered:
            assert (await buffered.Check(_bare(agent, method))).status.code == code_pb2.OK
            for unseen in ({"raw_body": call[:40]}, {"body": call.decode()}):
                answer = await buffered.Check(_bare(agent, method, **unseen))
                status, _, body = denied(answer)
                assert (status, body["code"]) == (400, "invalid_request"), unseen
        # Without it, a chunked body Envoy did not send looks like none: refused.
        async with grpc_stub(ext) as unbuffered:
            status, _, body = denied(await unbuffered.Check(_bare(agent, method)))
            assert (status, body["code"]) == (400, "invalid_request")
            assert "envoy_buffers_body" in body["message"]


INITIALIZE = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "probe", "version": "1"}}}  # fmt: skip
LISTING = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
ACCEPT = {"accept": "application/json, text/event-stream"}


async def _initialize(port: int, agent: Agent) -> httpx2.Response:
    async with httpx2.AsyncClient(auth=DpopAuth(agent), timeout=10) as client:
        return await client.post(f"http://127.0.0.1:{port}/mcp", json=INITIALIZE, headers=ACCEPT)


async def test_a_session_is_held_from_the_answer_that_hands_it_out(mcp: Mcp) -> None:
    opened = await _initialize(mcp.port, mcp.agent)
    sid = opened.headers["mcp-session-id"]
    # Before its agent has named it once, the id is already that agent's.
    fields = [("Mcp-Session-Id", sid), ("Content-Type", "application/json"),
              ("Accept", ACCEPT["accept"])]  # fmt: skip
    head, answer = await mcp.post(json.dumps(LISTING).encode(), fields, agent=Agent(mcp.env, "x"))
    assert head.startswith(b"HTTP/1.1 404"), head
    assert answer["error"]["data"]["code"] == "not_found"
    holder = await mcp.env.services.replay.held_by(SESSION_NAMESPACE, session_key(sid))
    assert holder == "acme\nprod\ncaller"


async def test_the_proxy_serves_only_sessions_it_saw_handed_out(mcp: Mcp) -> None:
    """An allowed agent naming ids no server handed out (to fill the store: each hold lasts
    `mcp_session_idle`) is answered 404, as for a session that does not exist, and holds
    nothing; an MCP client then opens a session of its own. The session its own initialize
    opened serves it, however many ids were named before."""
    replay = mcp.env.services.replay
    replay._claims._max = 3  # type: ignore[attr-defined]  # stands for the 1,000,000 default
    for made_up in (secrets.token_hex(16) for _ in range(4)):
        fields = [("Mcp-Session-Id", made_up), ("Content-Type", "application/json"),
                  ("Accept", ACCEPT["accept"])]  # fmt: skip
        head, answer = await mcp.post(json.dumps(LISTING).encode(), fields)
        assert head.startswith(b"HTTP/1.1 404"), head
        assert answer["error"]["data"]["code"] == "not_found"
        assert await replay.held_by(SESSION_NAMESPACE, session_key(made_up)) is None
    async with mcp.session() as session:
        assert (await session.call_tool("search", {"query": "x"})).content[0].text == "found x"
        assert mcp.session_id is not None
        assert await replay.held_by(SESSION_NAMESPACE, session_key(mcp.session_id)) == (
            "acme\nprod\ncaller"
        )
    # Ended by its client (DELETE): no longer held.
    assert await replay.held_by(SESSION_NAMESPACE, session_key(mcp.session_id)) is None


async def test_an_agent_holds_at_most_its_share_of_sessions(env: Env) -> None:
    """`gateway.mcp_sessions_per_agent`: an initialize past it is 429 `mcp_session_limit`, and
    its session never passed on; a session its client ends (DELETE) frees its place. Another
    agent is not held to this one's count."""
    async with serve_here(_server().streamable_http_app()) as url:
        app = gateway_app(env, [{**MCP_ROUTE, "upstream": url}], POLICY, mcp_sessions_per_agent=2)
        async with gateway_here(app) as port:
            caller = Mcp(port, Agent(env, "caller"), env)
            async with caller.session(), caller.session():
                refused = await _initialize(port, caller.agent)
                assert refused.status_code == 429, refused.text
                assert refused.json()["error"]["data"]["code"] == "mcp_session_limit"
                assert "mcp-session-id" not in refused.headers
                assert (await _initialize(port, Agent(env, "other"))).status_code == 200
            # Both ended (the SDK client sends DELETE on leaving): places free again.
            assert (await _initialize(port, caller.agent)).status_code == 200


@pytest.fixture
async def handing_out(env: Env) -> AsyncIterator[tuple[int, list[tuple[bytes, bytes]]]]:
    """A gateway in front of a server that answers every message with the session fields
    the test puts in the list it yields."""
    fields: list[tuple[bytes, bytes]] = []

    async def server(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        head = [(b"content-type", b"application/json"), *fields]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": b'{"jsonrpc": "2.0", "id": 0, '
                    b'"result": {}}'})  # fmt: skip

    async with serve_here(server) as url:
        app = gateway_app(env, [{**MCP_ROUTE, "upstream": url}], POLICY)
        async with gateway_here(app) as port:
            yield port, fields


@pytest.mark.parametrize(
    "handed",
    [
        [b"taken"],  # held by another agent
        [b"a,b"],  # two fields joined, or an id this gateway reads otherwise
        [b"one", b"two"],
        [b"caf\xc3\xa9"],
    ],
)
async def test_a_session_id_that_cannot_be_held_is_never_passed_on(
    env: Env, handing_out: tuple[int, list[tuple[bytes, bytes]]], handed: list[bytes]
) -> None:
    port, fields = handing_out
    await env.pipeline.claim_session("taken", "acme\nprod\nother")
    fields += [(b"mcp-session-id", value) for value in handed]
    opened = await _initialize(port, Agent(env, "caller"))
    assert opened.status_code == 502
    assert "mcp-session-id" not in opened.headers
    assert opened.json()["id"] == 0
    assert opened.json()["error"]["data"]["code"] == "bad_gateway"
    assert await env.services.replay.held_by(SESSION_NAMESPACE, session_key("taken")) == (
        "acme\nprod\nother"
    )
    failed = list(env.audit.records(kind="gateway.forward_failed"))
    assert [r["code"] for r in failed] == ["bad_gateway"]


async def test_an_opened_session_not_held_for_want_of_a_store_is_refused(
    env: Env,
    handing_out: tuple[int, list[tuple[bytes, bytes]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port, fields = handing_out
    fields.append((b"mcp-session-id", b"fresh"))

    async def unavailable(*args: object, **kwargs: object) -> bool:
        raise Unavailable("the replay store is down", code="replay_store_unavailable")

    monkeypatch.setattr(env.services.replay, "claim", unavailable)
    opened = await _initialize(port, Agent(env, "caller"))
    # The server acted (it opened the session, then ended by the gateway): the answer never
    # invites the client to send the initialize again as if it had not been forwarded (a 503
    # *_unavailable is what an SDK retries).
    assert opened.status_code == 502
    assert "mcp-session-id" not in opened.headers
    data = opened.json()["error"]["data"]
    assert data["code"] == "bad_gateway" and "replay store" in data["message"]


async def test_only_the_initialize_answer_opens_a_session(
    env: Env, handing_out: tuple[int, list[tuple[bytes, bytes]]]
) -> None:
    # Servers send the session's id on every answer; on any other message the id the request
    # named was held (or none was named), and an answer naming another is not the gateway's to
    # hold.
    port, fields = handing_out
    fields.append((b"mcp-session-id", b"echoed"))
    async with httpx2.AsyncClient(auth=DpopAuth(Agent(env, "caller")), timeout=10) as client:
        listed = await client.post(f"http://127.0.0.1:{port}/mcp", json=LISTING, headers=ACCEPT)
    assert listed.status_code == 200
    assert await env.services.replay.held_by(SESSION_NAMESPACE, session_key("echoed")) is None


LISTED_POLICY = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: repo-listing}
spec:
  rules:
    - {id: session, action: allow, match: {tools: [repo]}}
    - {id: search, action: allow, match: {tools: [repo.search]}}
    - {id: pay, action: approval_needed, match: {tools: [repo.pay]},
       approval: {group: finance}}
    - {id: pay-limit, action: deny, match: {tools: [repo.pay]},
       when: {path: request.body.params.arguments.amount, gt: 100}}
    - {id: ops-delete, action: allow, match: {tools: [repo.delete_repo], agent: {ids: [ops]}}}
    - {id: try-delete, action: allow, shadow: true, match: {tools: [repo.delete_repo]}}
    - {id: wipe, action: sanitize, match: {tools: ["repo.w*"]},
       obligations: [{kind: redact, target: response, path: secret}]}
    - {id: no-wipe, action: deny, match: {tools: [repo.wipe], agent: {ids: [caller]}}}
    - {id: transfer, action: allow, match: {tools: [repo.transfer], scopes: [payments:write]}}
    - {id: transfer-scope, action: deny, match: {tools: [repo.transfer], scopes: [admin]}}
"""


@pytest.mark.parametrize("json_response", [False, True], ids=["event-stream", "json"])
async def test_a_tool_list_names_only_tools_the_agent_could_call(
    env: Env, json_response: bool
) -> None:
    """A tool the agent's call of would be denied whatever it sends is left out of the
    `tools/list` answer, as an event stream or as JSON: one only another agent may call
    (delete_repo), one denied to this agent by a rule without conditions (wipe), one allowed
    only by a rule in shadow. One a condition may deny (pay: approval under the limit), one to
    sanitize (write), one denied for a scope the agent lacks (transfer) stays. Calls are
    decided as before; the agent allowed to delete sees delete_repo."""
    server = _server()

    @server.tool()
    def write(text: str) -> str:
        """Write a file."""
        return text

    async with serve_here(server.streamable_http_app(json_response=json_response)) as url:
        app = gateway_app(env, [{**MCP_ROUTE, "upstream": url}], LISTED_POLICY)
        async with gateway_here(app) as port:
            caller, ops = Mcp(port, Agent(env, "caller"), env), Mcp(port, Agent(env, "ops"), env)
            async with caller.session() as session:
                listed = await session.list_tools()
                assert [t.name for t in listed.tools] == ["search", "pay", "transfer", "write"]
                assert listed.tools[0].description == "Search the repository."
                with pytest.raises(MCPError) as refused:
                    await session.call_tool("delete_repo", {"name": "main"})
                assert refused.value.data["code"] == "access_denied"
            async with ops.session() as session:
                listed = await session.list_tools()
                assert [t.name for t in listed.tools] == [
                    "search", "pay", "delete_repo", "transfer", "wipe", "write"
                ]  # fmt: skip
    assert calls == []


async def test_a_tool_list_under_the_allow_list_names_the_tools_it_allows(env: Env) -> None:
    """While no policy is active the allow-list decides, and lists, by exact tool name."""
    allow = [{"tool": "repo"}, {"tool": "repo.search", "agents": ["caller"]},
             {"tool": "repo.pay", "agents": ["ops"]}]  # fmt: skip
    async with serve_here(_server().streamable_http_app()) as url:
        app = gateway_app(env, [{**MCP_ROUTE, "upstream": url}], allow=allow)
        async with gateway_here(app) as port, Mcp(port, Agent(env, "caller"), env).session() as s:
            assert [t.name for t in (await s.list_tools()).tools] == ["search"]

"""An MCP server on the older HTTP+SSE transport (MCP 2024-11-05) through the gateway: the
session its event stream hands out (``/messages/?session_id=...``) serves the agent whose call
first named it; another agent naming it, however spelled, is answered as for no session."""

from __future__ import annotations

import json
import secrets
import uuid

import pytest
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client

from aegis.sdk.mcp import McpAuth
from tests.sdk.conftest import Stack

pytestmark = pytest.mark.slow

GW_AUD = "aegis-gateway"
CALL = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "search", "arguments": {"query": "stolen"}}}  # fmt: skip


async def test_a_legacy_session_serves_the_agent_that_opened_it_only(stack: Stack) -> None:
    _, owner = stack.key_agent("legacy-owner")
    intruder_id, intruder = stack.key_agent("legacy-intruder")
    opened: list[str] = []
    auth = McpAuth(owner, owner.key(GW_AUD, None, None, None), origins=(stack.gateway,))
    with owner, intruder:
        async with (
            sse_client(
                f"{stack.gateway}/legacy/sse", auth=auth, on_session_created=opened.append
            ) as (read, write),  # fmt: skip
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            found = await session.call_tool("search", {"query": "aegis"})
            assert found.content[0].text == "found aegis"
            (sid,) = opened
            # The intruder learnt the id (a log, a shared host): every spelling is refused.
            async with intruder.async_client(
                stack.gateway, audience=GW_AUD, raise_for_denial=False
            ) as http:
                # The Python SDK's server reads the id as a UUID: each spelling is the session.
                spellings = (sid.upper(), str(uuid.UUID(sid)), f"{{{sid}}}", f"urn:uuid:{sid}")
                for query in ({"session_id": sid}, {"sessionId": sid}, {"Session.Id": sid},
                              *({"session_id": other} for other in spellings)):  # fmt: skip
                    got = await http.post("/legacy/messages/", params=query, json=CALL)
                    assert got.status_code == 404, (query, got.text)
                    assert got.json()["error"]["data"]["code"] == "not_found"
                two = {"session_id": sid, "sessionId": secrets.token_hex(16)}
                got = await http.post("/legacy/messages/", params=two, json=CALL)
                assert got.status_code == 400 and "more than one session" in got.text
            # The owner's session is untouched and still serves it.
            again = await session.call_tool("search", {"query": "again"})
            assert again.content[0].text == "found again"
    records = list(stack.audit.records(kind="gateway.decision"))
    refused = [r for r in records if r["agent_id"] == intruder_id]
    assert [(r["action"], r["code"]) for r in refused] == [("deny", "not_found")] * 7
    # Two sessions named: refused as the message is read, before its token is (no agent yet).
    assert any(r["code"] == "invalid_request" and "more than one session" in str(r)
               for r in records)  # fmt: skip
    assert "stolen" not in json.dumps(refused)

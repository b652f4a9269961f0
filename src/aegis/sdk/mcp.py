"""MCP sessions through the gateway's MCP routes (docs/gateway.md): the ``mcp`` SDK's own client,
with the agent's credentials on every request. Needs the ``mcp`` extra
(``pip install 'aegis-mesh[mcp]'``).

    async with mcp_session(agent, "https://gw.example.com/mcp", scope="repo:read") as session:
        found = await session.call_tool("search", {"query": "aegis"})

Every request the MCP client sends (each message's POST, the GET of the server's event stream,
the DELETE that ends the session) carries the agent's DPoP-bound token and a fresh proof for that
request, and is refreshed and retried as :class:`~aegis.sdk.auth.AegisAuth` retries: an expired
token, a DPoP nonce, a dependency the gateway found down, a human approval (the call waits for
the decision, then is sent once more with its override). A refusal is never raised inside the MCP
transport, where it would end the session: it reaches the MCP client as the JSON-RPC error the
gateway answered, and the call raises ``mcp.shared.exceptions.MCPError`` whose ``data`` is the
gateway's body (``code``, ``message``, ``decision_id``); an approval denied or not decided in
time fails its call with the gateway's ``approval_needed`` answer. A token that cannot be
obtained at all ends the session with the SDK's error.

Credentials go over ``https`` only (or to loopback). A client holding a renewing certificate
(:class:`~aegis.sdk.renewing.RenewingCertificate`) is refused: the session's connections would
outlive the certificate they were opened with.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

import httpx
import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from aegis.sdk.auth import AegisAuth, refuse_cleartext
from aegis.sdk.errors import AegisClientError

if TYPE_CHECKING:
    from aegis.sdk.client import AgentClient

__all__ = ["McpAuth", "mcp_session"]


class McpAuth(httpx2.Auth):
    """:class:`AegisAuth`'s flow for the ``httpx2`` client the ``mcp`` SDK uses (async only); a
    refusal is returned to the MCP client, never raised."""

    def __init__(
        self,
        client: AgentClient,
        key: Any,
        *,
        subject_token: str | None = None,
        origins: Sequence[str] | None = None,
    ) -> None:
        self._inner = AegisAuth(
            client, key, subject_token=subject_token, raise_for_denial=False, origins=origins
        )

    def auth_flow(
        self, request: httpx2.Request
    ) -> Generator[httpx2.Request, httpx2.Response, None]:
        # A synchronous client would otherwise send the request without credentials.
        raise TypeError("McpAuth works with an async client only (the mcp SDK's)")

    async def async_auth_flow(
        self, request: httpx2.Request
    ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        # The flow reads only what both clients' requests and responses share (method, URL,
        # headers, status, body).
        flow = self._inner.async_auth_flow(cast(Any, request))
        sent = await flow.__anext__()
        while True:
            response = yield cast(httpx2.Request, sent)
            try:
                sent = await flow.asend(cast(Any, response))
            except StopAsyncIteration:
                return
            except (AegisClientError, httpx.HTTPError):
                # An approval denied or not decided in time, or its status unreadable: raised
                # here it would end the session. The gateway's last answer (its JSON-RPC
                # approval_needed error) reaches the MCP client instead, failing this call only.
                return


@asynccontextmanager
async def mcp_session(
    agent: AgentClient,
    url: str,
    *,
    audience: str | None = None,
    scope: str | Sequence[str] | None = None,
    tenant: str | None = None,
    on_behalf_of: str | None = None,
    timeout: float = 30.0,
) -> AsyncIterator[ClientSession]:
    """An initialized MCP client session with the MCP server behind ``url`` (a gateway MCP
    route), as ``agent``, with a token for ``audience``/``scope``/``tenant`` (acting for a
    parent with ``on_behalf_of``, as :meth:`AgentClient.auth`)."""
    refuse_cleartext(url)
    if agent.renews_certificate:
        raise ValueError(
            "mcp_session does not follow certificate renewal: give the agent a fixed certificate "
            "(Certificate) or none (DPoP alone)"
        )
    auth = McpAuth(
        agent,
        agent.key(audience, scope, tenant, on_behalf_of),
        subject_token=on_behalf_of,
        origins=(url,),
    )
    verify = agent.ssl_context or True
    async with (
        httpx2.AsyncClient(auth=auth, timeout=timeout, verify=verify) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session

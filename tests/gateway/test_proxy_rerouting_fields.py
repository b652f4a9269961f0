"""Request fields that make an upstream serve another path or host than the one decided on are
refused at the reverse proxy: gunicorn's SCRIPT_NAME and PATH_INFO forwarder headers (trusted
from loopback by default) and Flask's X-Script-Name cut a prefix off the path, so
/payments/x/admin/users, decided as allowed, would be served as /admin/users; a percent-encoded
Host is another host to host rules and routes, and the same one to a URL parser. Over real
sockets, before a scripted upstream."""

from __future__ import annotations

import asyncio

import pytest

from tests.gateway.conftest import Agent
from tests.gateway.harness import signed_call
from tests.gateway.test_proxy_upstream import Gateway, ScriptedUpstream, gateway  # noqa: F401

Proxy = tuple[int, ScriptedUpstream, Agent]


@pytest.fixture
def proxy(gateway: Gateway) -> Proxy:  # noqa: F811  (the upstream tests' gateway and policy)
    return gateway.port, gateway.upstream, gateway.agent


async def _status(port: int, raw: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()


@pytest.mark.parametrize(
    "field",
    [
        "SCRIPT_NAME",
        "PATH_INFO",
        "X-Script-Name",
        "Script-Name",
        "X-Original-URI",
        "X-Envoy-Original-Path",
    ],
)
async def test_a_field_that_moves_the_served_path_is_refused(proxy: Proxy, field: str) -> None:
    port, upstream, agent = proxy
    assert await _status(port, signed_call(agent, "GET", "/payments/admin/users")) == 403
    call = signed_call(agent, "GET", "/payments/x/admin/users", [(field, "/payments/x")])
    assert await _status(port, call) == 400
    assert upstream.heads == []


async def test_a_percent_encoded_host_is_refused(proxy: Proxy) -> None:
    port, upstream, agent = proxy
    for host, status in ((b"admin.example.com", 403), (b"%61dmin.example.com", 400)):
        call = signed_call(agent, "GET", "/payments/list")
        assert (
            await _status(port, call.replace(b"Host: gw.example.com", b"Host: " + host)) == status
        )
    assert upstream.heads == []
    assert await _status(port, signed_call(agent, "GET", "/payments/list")) == 200

"""A sanitized request body forwarded to an upstream that then fails to answer in time: the
upstream received the rewritten bytes, which the decision's digest (of the body received) does
not cover, so the gateway.forward_failed record binds them, as it binds a streamed body's."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from tests.gateway.conftest import Agent, Env, gateway_app
from tests.gateway.harness import exchange, gateway_here, signed_call

_RULE = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: hide}
spec:
  rules:
    - {id: hide, action: sanitize, reason: hidden, match: {tools: [payments]},
       obligations: [{kind: redact, target: request, path: ssn}%s]}
"""
POLICY = _RULE % ""
#: The answer is rewritten too (a call with If-Match is then refused before it is sent).
BOTH_WAYS = _RULE % ",\n                     {kind: redact, target: response, path: ssn}"


async def test_forwarded_sanitized_body_is_bound_even_when_the_upstream_times_out(
    env: Env,
) -> None:
    received: list[bytes] = []

    gone = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:"))  # fmt: skip
            received.append(await reader.readexactly(length))
            await reader.read()  # never answers: until the gateway gives up and hangs up
        finally:
            writer.close()
            gone.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    route = {"path_prefix": "/payments", "upstream": url, "tool": "payments",
             "tenant": "acme", "env": "prod"}  # fmt: skip
    app = gateway_app(env, [route], POLICY, connect_timeout=1, upstream_timeout=1)
    body = b'{"amount":5,"ssn":"078-05-1120"}'
    agent = Agent(env, "caller")
    try:
        async with gateway_here(app) as port:
            [(head, _)] = await exchange(
                port,
                signed_call(
                    agent, "POST", "/payments/charge", [("Content-Type", "application/json")], body
                ),
            )
        await asyncio.wait_for(gone.wait(), 5)
    finally:
        server.close()
        await server.wait_closed()
    assert head.startswith(b"HTTP/1.1 504"), head
    assert received and b"078-05-1120" not in received[0]  # the sanitized body reached it
    forwarded = "sha256:" + hashlib.sha256(received[0]).hexdigest()
    records: list[dict[str, Any]] = list(env.audit.records())
    decision = next(r for r in records if r.get("kind") == "gateway.decision")
    later = [r for r in records if r.get("decision_id") == decision["decision_id"]
             and r.get("kind") != "gateway.decision"]  # fmt: skip
    (failed,) = [r for r in later if r.get("kind") == "gateway.forward_failed"]
    assert (failed["body_digest"], failed["sanitized"]) == (forwarded, True), failed
    assert failed["bytes"] == len(received[0])


async def test_no_forwarded_body_is_bound_when_nothing_was_forwarded(env: Env) -> None:
    """A sanitized call refused before anything is sent (If-Match on a call whose answer is
    rewritten) binds no forwarded body: the upstream received none."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    route = {"path_prefix": "/payments", "upstream": url, "tool": "payments",
             "tenant": "acme", "env": "prod"}  # fmt: skip
    app = gateway_app(env, [route], BOTH_WAYS)
    body = b'{"amount":5,"ssn":"078-05-1120"}'
    agent = Agent(env, "caller")
    try:
        async with gateway_here(app) as port:
            [(head, _)] = await exchange(
                port,
                signed_call(agent, "POST", "/payments/charge",
                            [("Content-Type", "application/json"), ("If-Match", '"x"')], body),
            )  # fmt: skip
    finally:
        server.close()
        await server.wait_closed()
    assert head.startswith(b"HTTP/1.1 400"), head
    assert not connections  # nothing reached the upstream
    records: list[dict[str, Any]] = list(env.audit.records())
    (failed,) = [r for r in records if r.get("kind") == "gateway.forward_failed"]
    assert "body_digest" not in failed and "sanitized" not in failed, failed

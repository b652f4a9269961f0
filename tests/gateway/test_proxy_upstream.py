"""The reverse proxy against upstreams that misbehave, over real sockets: one that never answers
or stops reading, one that writes an answer nobody asked for on an idle pooled connection, a
status past 599, an answer cut short; and what reaches an upstream for a call without a body."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from aegis.policy.loader import load_document
from tests.gateway.conftest import Agent, Env, gateway_app
from tests.gateway.harness import exchange, gateway_here, raw_answer, signed_call

POLICY = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: upstreams}
spec:
  rules:
    - {id: pay, action: allow, reason: payments allowed, match: {tools: [payments]}}
    - {id: no-admin-host, action: deny, reason: admin host denied,
       match: {tools: [payments]}, when: {path: request.headers.host, eq: admin.example.com}}
    - {id: no-admin-path, action: deny, reason: admin path denied,
       match: {tools: [payments]}, when: {path: path_loose, regex: '^/payments/admin(/|$)'}}
"""

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, dict[str, str]], Awaitable[None]]


@dataclass
class ScriptedUpstream:
    """Reads each request head (and a Content-Length body) and answers by ``script[path]``, else
    with a small JSON answer; records every request head (names lowercased)."""

    script: dict[str, Handler] = field(default_factory=dict)
    heads: list[dict[str, str]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    #: Set at teardown: a handler that holds a call waits for it.
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                head = {"": line}
                for text in filter(None, lines):
                    name, _, value = text.partition(":")
                    head[name.strip().lower()] = value.strip()
                self.heads.append(head)
                handler = self.script.get(line.split(" ")[1])
                if handler is not None:
                    await handler(reader, writer, head)
                    continue
                await reader.readexactly(int(head.get("content-length", "0")))
                writer.write(raw_answer(b'{"ok":true}', "application/json"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        finally:
            self.done.set()
            for writer in self.writers:
                writer.close()
            server.close()
            await server.wait_closed()


@dataclass
class Gateway:
    port: int
    upstream: ScriptedUpstream
    agent: Agent
    env: Env

    def request(self, method: str, path: str, fields: list[tuple[str, str]] | None = None,
                body: bytes = b"") -> bytes:  # fmt: skip
        """A call with a fresh DPoP proof, as bytes."""
        return signed_call(self.agent, method, path, fields, body)


@pytest.fixture
async def gateway(env: Env, request: pytest.FixtureRequest) -> AsyncIterator[Gateway]:
    """The gateway before a scripted upstream, served by uvicorn's ``request.param`` protocol
    if given (``h11``), else the default one."""
    upstream = ScriptedUpstream()
    async with upstream.running() as url:
        route = {"path_prefix": "/payments", "upstream": url, "tool": "payments",
                 "tenant": "acme", "env": "prod"}  # fmt: skip
        app = gateway_app(env, [route], POLICY, connect_timeout=1, upstream_timeout=1,
                          client_body_deadline=1, max_body_bytes=64 * 1024 * 1024)  # fmt: skip
        async with gateway_here(app, http=getattr(request, "param", "auto")) as port:
            yield Gateway(port, upstream, Agent(env, "caller"), env)


async def _answer(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, bytes]:
    """One answer as a client frames it by its Content-Length (else up to the end)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    if head.startswith(b"HTTP/1.1 1"):  # an interim answer has no body
        return head, b""
    length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                   if line.startswith(b"content-length:")), None)  # fmt: skip
    body = await (reader.readexactly(length) if length is not None else reader.read())
    return head, body


async def _closed(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 2)


def _never(upstream: ScriptedUpstream) -> Handler:
    """A handler that reads nothing more and never answers (until the test ends)."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: object) -> None:
        await upstream.done.wait()

    return hold


async def test_expect_is_not_forwarded_so_a_silent_upstream_is_a_504(gateway: Gateway) -> None:
    """An upstream that waits for the body without sending 100 (Continue): aiohttp, asked to
    expect one, would wait without end, outside upstream_timeout."""
    gateway.upstream.script["/payments/x"] = _never(gateway.upstream)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    started = time.monotonic()
    writer.write(gateway.request("POST", "/payments/x", [("Expect", "100-continue"),
                                 ("Content-Type", "application/json")], b'{"a":1}'))  # fmt: skip
    head, _ = await _answer(reader, 10)
    if b" 100 " in head.split(b"\r\n")[0]:
        head, _ = await _answer(reader, 10)
    writer.close()
    await _closed(writer)
    assert head.startswith(b"HTTP/1.1 504"), head
    assert time.monotonic() - started < 5
    assert "expect" not in gateway.upstream.heads[-1]


async def test_an_upstream_that_stops_reading_a_streamed_body_is_a_504(gateway: Gateway) -> None:
    """aiohttp's read timeout starts once the request is written: an upstream that stops
    reading holds the call, and a pooled connection, until the call's deadline."""
    gateway.upstream.script["/payments/upload"] = _never(gateway.upstream)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(gateway.request("PUT", "/payments/upload", [
        ("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")]))  # fmt: skip
    started = time.monotonic()
    chunk = b"10000\r\n" + b"A" * 0x10000 + b"\r\n"
    held = False
    for _ in range(1024):  # the upstream reads nothing: the client is held back
        writer.write(chunk)
        try:
            await asyncio.wait_for(writer.drain(), 1)
        except TimeoutError:
            held = True
            break
    assert held
    head, _ = await _answer(reader, 10)
    writer.close()
    await _closed(writer)
    assert head.startswith(b"HTTP/1.1 504"), head
    assert time.monotonic() - started < 8


async def test_a_stray_answer_on_an_idle_pooled_connection_is_no_ones_answer(
    gateway: Gateway,
) -> None:
    """The upstream answers one call, then writes another answer on the idle keep-alive
    connection: the next call must get its own answer, from a request actually sent."""

    async def then_stray(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: object) -> None:  # fmt: skip
        writer.write(raw_answer(b'{"for":"A"}', "application/json"))
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(raw_answer(b'{"stray":true}', "application/json"))
        await writer.drain()

    async def own(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: object) -> None:
        writer.write(raw_answer(b'{"for":"B"}', "application/json"))
        await writer.drain()

    gateway.upstream.script.update({"/payments/a": then_stray, "/payments/b": own})
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(gateway.request("GET", "/payments/a"))
    assert json.loads((await _answer(reader, 5))[1]) == {"for": "A"}
    await asyncio.sleep(0.6)
    writer.write(gateway.request("GET", "/payments/b"))
    assert json.loads((await _answer(reader, 5))[1]) == {"for": "B"}
    writer.close()
    await _closed(writer)
    assert [h[""].split(" ")[1] for h in gateway.upstream.heads] == ["/payments/a", "/payments/b"]


async def test_a_status_past_599_is_a_502(gateway: Gateway) -> None:
    """No ASGI server can send status 600: answered 502, never a dropped connection."""

    async def odd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: object) -> None:
        writer.write(b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    gateway.upstream.script["/payments/odd"] = odd
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(gateway.request("GET", "/payments/odd"))
    head, body = await _answer(reader, 5)
    writer.close()
    await _closed(writer)
    assert head.startswith(b"HTTP/1.1 502"), head
    assert json.loads(body)["code"] == "bad_gateway"


async def test_a_call_without_a_body_reaches_the_upstream_without_fields_nobody_sent(
    gateway: Gateway,
) -> None:
    """No Content-Type, Accept or Content-Length of the client library's own: the upstream gets
    the fields policy saw (and the gateway's identity and forwarding fields)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(gateway.request("GET", "/payments/list"))
    head, _ = await _answer(reader, 5)
    writer.close()
    await _closed(writer)
    assert head.startswith(b"HTTP/1.1 200"), head
    sent = gateway.upstream.heads[-1]
    assert not {"content-type", "accept", "content-length"} & set(sent), sent


async def test_an_answer_cut_short_is_recorded_as_the_upstreams_failure(gateway: Gateway) -> None:
    """The status is sent when the upstream breaks off: the caller's connection ends before the
    answer does, and the record names the upstream (502 bad_gateway), not the gateway."""

    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: object) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000"
                     b"\r\n\r\n" + b"x" * 10)  # fmt: skip
        await writer.drain()
        writer.close()

    gateway.upstream.script["/payments/short"] = short
    assert await _cut_off(gateway, "/payments/short") == [(502, "bad_gateway")]


async def test_an_answer_that_stalls_is_recorded_as_the_upstreams_timeout(gateway: Gateway) -> None:
    """An upstream that stops in the middle of its answer: the caller's connection ends, and the
    record says the upstream stalled (504), not that it broke off."""

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: object) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000"
                     b"\r\n\r\n" + b"x" * 10)  # fmt: skip
        await writer.drain()
        await gateway.upstream.done.wait()

    gateway.upstream.script["/payments/stall"] = stall
    assert await _cut_off(gateway, "/payments/stall") == [(504, "upstream_timeout")]


async def _cut_off(gateway: Gateway, path: str) -> list[tuple[int, str]]:
    """GET ``path``, whose answer starts (200) and ends early; the forward_failed records."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(gateway.request("GET", path))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    rest = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await _closed(writer)
    assert head.startswith(b"HTTP/1.1 200") and len(rest) < 100000
    for _ in range(50):
        failed = list(gateway.env.audit.records(kind="gateway.forward_failed"))
        if failed:
            break
        await asyncio.sleep(0.05)
    return [(r["status"], r["code"]) for r in failed]


async def test_an_int64_id_passes_where_policy_does_not_read_the_body(gateway: Gateway) -> None:
    """Integers beyond 2**53 are refused only in bodies policy reads: a typed upstream reads a
    snowflake id exactly, and this tool's policy decides nothing on it."""
    body = b'{"order_id": 9223372036854775807}'
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(gateway.request("POST", "/payments/orders",
                                 [("Content-Type", "application/json")], body))  # fmt: skip
    head, _ = await _answer(reader, 5)
    writer.close()
    await _closed(writer)
    assert head.startswith(b"HTTP/1.1 200"), head


async def test_a_body_rule_tried_in_shadow_refuses_no_call(gateway: Gateway) -> None:
    """A body rule rolled out in shadow mode must not change outcomes: a snowflake id, a member
    spelled ``Amount``, a body that is not JSON, each passed before the rule and passes with
    it; the rule judges the bodies it can read, and its would-be deny is audited."""
    shadow = (
        POLICY
        + """    - {id: cap, action: deny, reason: too much, shadow: true,
       match: {tools: [payments]}, when: {path: request.body.amount, gt: 1000}}
"""
    )
    policies = gateway.env.policies
    policies.activate("acme", "prod", policies.put(load_document(shadow), now=1), actor="test",
                      now=1)  # fmt: skip
    await asyncio.sleep(0.05)  # the gateway polls every millisecond
    calls = [(b'{"order_id": 9223372036854775807}', "application/json"),
             (b'{"Amount": 5000}', "application/json"), (b"amount=5000", "text/plain"),
             (b'{"amount": 5000}', "application/json")]  # fmt: skip
    for body, ctype in calls:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(gateway.request("POST", "/payments/orders", [("Content-Type", ctype)], body))
        head, answer = await _answer(reader, 5)
        writer.close()
        await _closed(writer)
        assert head.startswith(b"HTTP/1.1 200"), (body, head, answer)
    decisions = list(gateway.env.audit.records(kind="gateway.decision"))[-len(calls) :]
    assert [d["action"] for d in decisions] == ["allow"] * 4
    assert [(d["shadow"] or {}).get("action") for d in decisions] == ["allow"] * 3 + ["deny"]


@pytest.mark.parametrize("gateway", ["auto", "h11"], indirect=True)
async def test_an_absolute_form_target_is_refused_under_either_parser(gateway: Gateway) -> None:
    """``GET http://other.example/payments/x`` names another authority than the Host field, and
    a server must take the target's (RFC 9112 §3.2.2). httptools kept only its path, so the call
    was decided and forwarded as ``/payments/x`` of the Host; under h11 it was refused. Both
    refuse it now, before the upstream sees anything."""
    call = gateway.request("GET", "/payments/x")
    absolute = call.replace(b"GET /payments/x ", b"GET http://other.example/payments/x ", 1)
    results = []
    for raw in (absolute, gateway.request("GET", "/payments/x?a=1")):  # origin form passes
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(raw)
        results.append(await _answer(reader, 10))
        writer.close()
        await _closed(writer)
    (head, body), (ok_head, _) = results
    assert head.startswith(b"HTTP/1.1 400"), head
    assert json.loads(body)["code"] == "invalid_request"
    assert ok_head.startswith(b"HTTP/1.1 200"), ok_head
    assert [h[""] for h in gateway.upstream.heads] == ["GET /payments/x?a=1 HTTP/1.1"]


async def test_a_cookie_an_upstream_sets_is_never_sent_with_another_call(env: Env) -> None:
    """The proxy's pooled session serves every agent: a Set-Cookie in the answer to alice goes
    to alice only, and mallory's call (or alice's next one) reaches the upstream with no Cookie
    it did not send. The upstream is named by host name: cookies from an IP address host are
    never stored anyway."""
    upstream = ScriptedUpstream()

    async def sets_cookie(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          head: dict[str, str]) -> None:  # fmt: skip
        agent = head.get("x-aegis-agent-id", "?")
        writer.write(raw_answer(b"{}", "application/json",
                                fields=f"Set-Cookie: sid=of-{agent}; Path=/\r\n".encode()))  # fmt: skip
        await writer.drain()

    upstream.script["/payments/login"] = sets_cookie
    async with upstream.running() as url:
        route = {"path_prefix": "/payments", "upstream": url.replace("127.0.0.1", "localhost"),
                 "tool": "payments", "tenant": "acme", "env": "prod"}  # fmt: skip
        alice, mallory = Agent(env, "alice"), Agent(env, "mallory")
        async with gateway_here(gateway_app(env, [route], POLICY)) as port:
            [(head, _)] = await exchange(port, signed_call(alice, "GET", "/payments/login"))
            assert b"set-cookie: sid=of-alice" in head.lower(), head  # passed on to alice
            answers = await exchange(
                port,
                signed_call(mallory, "GET", "/payments/list"),
                signed_call(alice, "GET", "/payments/list", [("Cookie", "mine=1")]),
            )
    assert [h[:12] for h, _ in answers] == [b"HTTP/1.1 200"] * 2
    mallorys, alices = upstream.heads[-2:]
    assert mallorys["x-aegis-agent-id"] == "mallory" and "cookie" not in mallorys
    assert alices["cookie"] == "mine=1"  # what the caller sent, and nothing of the gateway's

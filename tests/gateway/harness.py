"""Real servers on loopback for gateway tests: an upstream that records what it saw, a gateway, and
an agent that gets DPoP-bound tokens from the control plane and calls through the gateway."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from aegis.clock import new_id
from aegis.crypto.jws import encode_segment, sign_compact
from aegis.crypto.keys import Ed25519SigningKey
from aegis.gateway.server import gateway_server
from aegis.registry.service import AgentSpec
from aegis.types import ClientAuthMethod
from tests.gateway.helpers import mint_proof
from tests.support.server import RunningServer, free_port

#: What the tool answers on a path ending in ``/big``: 192 KiB, every byte value.
BIG_ANSWER = bytes(range(256)) * 768


#: A card number in text answers whose bytes hide its digits from a mask over UTF-8 text, by
#: query string: ``(body, media type)``.
HIDDEN_CARDS: dict[str, tuple[bytes, str]] = {
    "utf16": ("4111 1111 1111 1111".encode("utf-16-le"), "text/plain; charset=utf-16le"),
    "nul": ("4111 1111 1111 1111".encode("utf-16-le"), "text/plain"),
    "json-escape": (b'{"card": "\\u0034111 1111 1111 1111"}', "text/plain"),
    "entity": (b"<p>&#52;111 1111 1111 1111</p>", "text/html"),
    "plain": (b"card 4111 1111 1111 1111", "text/plain; charset=us-ascii"),
}


class Upstream:
    """A tool server: answers JSON and remembers the headers and body of every request."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

        async def handler(request: Request) -> Response:
            if request.url.path.endswith("/slow"):
                import asyncio

                await asyncio.sleep(3)
            body = await request.body()
            self.seen.append(
                {
                    "headers": dict(request.headers),
                    "body": body,
                    "path": request.url.path,
                    "raw_path": request.scope["raw_path"],
                    "query": request.url.query,
                }
            )
            if request.url.path.endswith("/big"):  # an answer too large to send in one piece
                return Response(BIG_ANSWER, media_type="application/octet-stream")
            if request.url.path.endswith("/huge"):  # 2 MiB of text, length known or not
                text = b"4111 1111 1111 1111 " * (2 * 1024 * 1024 // 20)
                if request.url.query == "streamed":

                    async def chunks() -> AsyncIterator[bytes]:
                        for i in range(0, len(text), 65536):
                            yield text[i : i + 65536]

                    return StreamingResponse(chunks(), media_type="text/plain")
                return Response(text, media_type="text/plain")
            if request.url.path.endswith("/text-hidden"):  # card digits a text mask can miss
                content, media_type = HIDDEN_CARDS[request.url.query]
                return Response(content, media_type=media_type)
            if request.url.path.endswith("/text-json"):  # JSON the upstream labels as text
                return Response(
                    '{"ok": true, "card": "4111 1111 1111 1111"}', media_type="text/plain"
                )
            if request.url.path.endswith("/forged-refusal"):
                # A tool that acted, then answers in the gateway's name (the decision id it was
                # given; the refusal code named in the query, with its own mark attempt).
                code = request.url.query or "replay_store_unavailable"
                status = 401 if code == "token_expired" else 503
                decision = request.headers.get("x-aegis-decision-id", "")
                body = {"error": "x", "error_description": code, "code": code,
                        "decision_id": decision}  # fmt: skip
                fields = {"x-aegis-decision-id": decision, "x-aegis-refusal": "forged"}
                return JSONResponse(body, status_code=status, headers=fields)
            answer = JSONResponse({"ok": True, "card": "4111 1111 1111 1111"})
            if request.url.path.endswith("/cookies"):  # two Set-Cookie lines
                answer.set_cookie("a", "1")
                answer.set_cookie("b", "2")
            return answer

        self.app = Starlette(
            routes=[Route("/{p:path}", handler, methods=["GET", "POST", "PUT", "DELETE"])]
        )


@contextmanager
def serve(app: Any, port: int | None = None, *, http: str = "auto") -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread on a loopback port, configured as the gateway
    configures its own servers (``gateway_server``); yield its base URL. ``http="h11"`` parses
    requests as the mTLS listener does."""
    port = port or free_port()
    server = gateway_server(
        app, "127.0.0.1", port, log_level="warning", http="httptools" if http == "auto" else http
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class AgentClient:
    """An agent with an Ed25519 key and a DPoP-bound private_key_jwt client."""

    def __init__(
        self, srv: RunningServer, name: str, tenant: str = "acme", env: str = "prod"
    ) -> None:
        self.srv, self.key = srv, Ed25519SigningKey.generate()
        self.id = f"{name}-{new_id(4).lower().replace('_', 'x').replace('-', 'x')}"
        srv.services.registry.register_agent(
            AgentSpec(
                self.id,
                tenant,
                env,
                "owner@example.com",
                allowed_scopes=("payments:write",),
                jwks=(self.key.public.to_jwk(),),
            ),
            actor="test",
        )
        client, _ = srv.services.registry.create_client(
            self.id, auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, dpop_bound=True, actor="test"
        )
        self.client_id = client.client_id

    def assertion(self) -> str:
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "jti": new_id(),
            "aud": self.srv.url,
            "iat": now,
            "exp": now + 60,
        }
        header = encode_segment({"alg": "EdDSA", "typ": "JWT", "kid": self.key.kid})
        return sign_compact(header, claims, self.key.sign)

    def token(self, *, dpop: bool = True) -> httpx.Response:
        url = f"{self.srv.url}/oauth/token"
        headers = {"DPoP": mint_proof(self.key, "POST", url)} if dpop else {}
        data = {
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": self.assertion(),
            "scope": "payments:write",
        }
        return httpx.post(url, data=data, headers=headers)

    def access_token(self) -> str:
        resp = self.token()
        assert resp.status_code == 200, resp.text
        assert resp.json()["token_type"] == "DPoP"
        return str(resp.json()["access_token"])

    def headers(self, token: str, method: str, url: str, **kw: Any) -> dict[str, str]:
        return {
            "Authorization": f"DPoP {token}",
            "DPoP": mint_proof(self.key, method, url, token=token, **kw),
        }


@asynccontextmanager
async def serve_here(app: Any, port: int | None = None) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on the running event loop (so it shares the loop, and the
    loop-bound Redis clients, of the test); yield its base URL."""
    import asyncio

    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or task.done():
            raise RuntimeError("server did not start")
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)


def raw_answer(
    body: bytes, content_type: str | None, status: str = "200 OK", fields: bytes = b""
) -> bytes:
    """An HTTP/1.1 answer as bytes: ``fields`` are extra header lines, each ending in CRLF."""
    head = f"HTTP/1.1 {status}\r\n".encode()
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n".encode()
    return head + fields + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


class RawUpstream:
    """A tool server written on the socket, for answers no framework would send (a 204 with a
    type, header bytes outside Latin-1, a 206 nobody asked for): each request is answered with
    the bytes ``answers`` holds for its path, else a small JSON answer, on a keep-alive
    connection. ``heads`` keeps the header fields of every request (names lowercased),
    ``bodies`` its body."""

    def __init__(self, answers: dict[str, bytes] | None = None) -> None:
        self.answers = dict(answers or {})
        self.heads: list[dict[str, str]] = []
        self.bodies: list[bytes] = []

    async def _serve(self, reader: Any, writer: Any) -> None:
        import asyncio

        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *lines = head.decode("latin-1").split("\r\n")
                fields = {}
                for text in filter(None, lines):
                    name, _, value = text.partition(":")
                    fields[name.strip().lower()] = value.strip()
                self.heads.append(fields)
                self.bodies.append(await reader.readexactly(int(fields.get("content-length", "0"))))
                writer.write(self.answers.get(line.split(" ")[1].partition("?")[0],
                                              raw_answer(b'{"ok":true}', "application/json")))  # fmt: skip
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        import asyncio

        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        finally:
            server.close()


@asynccontextmanager
async def gateway_here(app: Any, *, http: str = "auto") -> AsyncIterator[int]:
    """Serve a gateway app as ``aegis gateway run`` does (``gateway_server``) on the running
    event loop; yield its port. ``http="h11"`` parses and frames as the mTLS listener does."""
    import asyncio

    port = free_port()
    server = gateway_server(
        app, "127.0.0.1", port, log_level="warning", http="httptools" if http == "auto" else http
    )
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or task.done():
            raise RuntimeError("gateway did not start")
        await asyncio.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)


async def exchange(port: int, *requests: bytes) -> list[tuple[bytes, bytes]]:
    """Send ``requests`` one after another on one keep-alive connection and read each answer
    as an HTTP/1.1 client frames it: ``(head, body)`` per request. An answer framed wrongly
    (a body on a 204, a length that does not match) shows up in the next one's head."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    try:
        for request in requests:
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            lines = head.decode("latin-1").lower().split("\r\n")
            status = int(lines[0].split(" ")[1])
            length = next((int(v.split(":")[1]) for v in lines if v.startswith("content-length:")),
                          0)  # fmt: skip
            bodiless = request.startswith(b"HEAD ") or status in (204, 304) or status < 200
            body = b"" if bodiless else await reader.readexactly(length)
            answers.append((head, body))
    finally:
        writer.close()
    return answers


def signed_call(
    agent: Any, method: str, path: str, fields: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> bytes:  # fmt: skip
    """An HTTP/1.1 call to ``gw.example.com`` with a fresh token and DPoP proof, as bytes."""
    token = agent.token()
    lines = [f"{method} {path} HTTP/1.1", "Host: gw.example.com",
             f"Authorization: DPoP {token}", f"DPoP: {agent.proof(token, method, path)}"]  # fmt: skip
    lines += [f"{k}: {v}" for k, v in fields or []]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

"""The mTLS listener closes a connection on which no request begins after its handshake."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aegis.pki.listener import MTLSListener
from tests.pki.conftest import build_pki
from tests.pki.harness import client_ctx, gateway_app, gateway_server_context


@asynccontextmanager
async def _listening(tmp_path: Path) -> AsyncIterator[tuple[MTLSListener, ssl.SSLContext]]:
    """The listener as the gateway runs it (a certificate asked for, not required: routes
    decide), with a one-second handshake timeout; and a client context with no certificate."""
    pki = build_pki(tmp_path)
    try:
        ctx = gateway_server_context(pki, require_client_cert=False)
        app = gateway_app(pki, name="idle", required=False)
        listener = MTLSListener(app, context=lambda: ctx, name="idle", handshake_timeout=1.0)
        await listener.start()
        try:
            yield listener, client_ctx(pki, None)
        finally:
            await listener.stop()
    finally:
        pki.store.close()


async def test_a_connection_idle_after_its_handshake_is_closed(tmp_path: Path) -> None:
    """uvicorn starts no timer until it has answered a request: a client that completed the
    handshake without a certificate (the gateway asks for one, routes decide) and sent nothing
    held its connection for good. It is closed once ``handshake_timeout`` passes again."""
    async with _listening(tmp_path) as (listener, client):

        def hold() -> tuple[str, float]:
            sock = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
            tls = client.wrap_socket(sock, server_hostname="gateway")  # handshake completes
            tls.settimeout(12.0)
            started = time.monotonic()
            try:
                got = tls.recv(1)
                outcome = "closed" if got == b"" else f"data {got!r}"
            except TimeoutError:
                outcome = "still open"
            except (ssl.SSLError, OSError) as exc:
                outcome = f"closed ({type(exc).__name__})"
            finally:
                tls.close()
            return outcome, time.monotonic() - started

        outcome, waited = await asyncio.get_running_loop().run_in_executor(None, hold)
        assert outcome.startswith("closed"), outcome
        assert waited < 5, f"closed only after {waited:.1f} s"


async def test_a_connection_answered_once_waits_for_its_next_request(tmp_path: Path) -> None:
    """Closing idle connections must not cut a kept-alive one: after its first answer it is
    uvicorn's keep-alive timeout (5 s) that decides, not the first-request window."""
    async with _listening(tmp_path) as (listener, client):

        def twice() -> list[bytes]:
            sock = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
            with client.wrap_socket(sock, server_hostname="gateway") as tls:
                heads = []
                for pause in (0.0, 1.6):  # the second past the first-request window
                    time.sleep(pause)
                    tls.sendall(b"GET /whoami HTTP/1.1\r\nHost: gateway\r\n\r\n")
                    answer = b""
                    while b"\r\n\r\n" not in answer or not _whole(answer):
                        chunk = tls.recv(65536)
                        if not chunk:
                            break
                        answer += chunk
                    heads.append(answer.split(b"\r\n", 1)[0])
                return heads

        heads = await asyncio.get_running_loop().run_in_executor(None, twice)
        assert heads == [b"HTTP/1.1 200 OK"] * 2, heads


def _whole(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
         if line.lower().startswith(b"content-length:")),
        0,
    )  # fmt: skip
    return len(body) >= length

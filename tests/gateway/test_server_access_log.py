"""The gateway doors' access log keeps no query string: a caller's ``?access_token=`` or
``?password=`` must not be written out, whatever Aegis itself reads from it."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

import httpx

from aegis.gateway.server import gateway_server
from tests.support.server import free_port


async def _app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def test_the_access_log_keeps_the_path_without_the_query() -> None:
    port = free_port()
    server = gateway_server(_app, "127.0.0.1", port, log_level="info")
    gateway_server(_app, "127.0.0.1", free_port(), log_level="info")  # a second door: one filter
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    access = logging.getLogger("uvicorn.access")
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.02)
        access.addHandler(handler)
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{port}/payments/x?access_token=SECRET&password=pw")
    finally:
        access.removeHandler(handler)
        server.should_exit = True
        await task
    line = written.getvalue()
    assert '"GET /payments/x HTTP/1.1" 404' in line
    assert "SECRET" not in line and "password" not in line
    assert sum(type(f).__name__ == "QueryStringFilter" for f in access.filters) == 1

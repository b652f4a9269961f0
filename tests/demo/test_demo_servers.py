"""The demo's servers believe no caller's forwarding fields: uvicorn's default would rewrite the
client address and scheme from a loopback caller's X-Forwarded-For and -Proto before any Aegis
code saw the call."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from aegis.demo.stack import Served


async def _echo(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        return await send({"type": "lifespan.shutdown.complete"})
    seen = {"client": scope["client"][0], "scheme": scope["scheme"],
            "target": scope["raw_path"].decode("latin-1")}  # fmt: skip
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(seen).encode()})


@pytest.mark.parametrize("door", [False, True])
def test_a_callers_forwarding_fields_change_nothing(door: bool) -> None:
    served = Served("probe", _echo, door=door).start()
    try:
        claims = {"X-Forwarded-For": "10.9.8.7", "X-Forwarded-Proto": "https"}
        seen = httpx.get(f"{served.url}/a/%7Eb", headers=claims).json()
    finally:
        served.stop()
    assert (seen["client"], seen["scheme"]) == ("127.0.0.1", "http")
    assert seen["target"] == "/a/%7Eb"

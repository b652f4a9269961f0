"""The gateway application's two paths, over a real uvicorn socket: ``/healthz``, ``/metrics`` and
the lifespan through Starlette; every other request straight to the proxy front, where an
unexpected error still gets a typed JSON answer and is counted, never a bare 500 page."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.responses import JSONResponse
from starlette.routing import Route

from aegis.gateway.app import GatewayApp
from aegis.telemetry.metrics import REGISTRY
from tests.gateway.harness import Upstream, serve

SERVER_ERROR = {"action": "deny", "reason": "server_error"}


def _count() -> float:
    return REGISTRY.get_sample_value("aegis_decisions_total", SERVER_ERROR) or 0.0


def _app(front: Callable[..., Any]) -> GatewayApp:
    async def healthz(request: Any) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return GatewayApp(front, routes=[Route("/healthz", healthz), Route("/metrics", healthz)])


async def _fails_before_answering(scope: Any, receive: Any, send: Any) -> None:
    raise RuntimeError("a bug in the front door")


async def _fails_mid_answer(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"10")]})  # fmt: skip
    await send({"type": "http.response.body", "body": b"12345", "more_body": True})
    raise RuntimeError("a bug after the status went out")


def test_own_paths_go_through_starlette_and_the_rest_to_the_front() -> None:
    upstream = Upstream()
    with serve(_app(upstream.app)) as base:
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{base}/metrics").json() == {"status": "ok"}
        assert upstream.seen == []
        answer = httpx.post(f"{base}/payments/charge", json={"amount": 1})
    assert answer.status_code == 200
    assert [r["path"] for r in upstream.seen] == ["/payments/charge"]


def test_an_error_before_the_answer_is_a_json_500_and_counted() -> None:
    before = _count()
    with serve(_app(_fails_before_answering)) as base:
        answer = httpx.get(f"{base}/payments/charge")
        assert httpx.get(f"{base}/healthz").status_code == 200  # the server carries on
    assert answer.status_code == 500
    assert answer.json()["code"] == "server_error"
    assert "bug" not in answer.text  # the exception's text stays in the server's log
    assert _count() == before + 1


def test_an_error_after_the_status_cuts_the_answer_short() -> None:
    before = _count()
    with serve(_app(_fails_mid_answer)) as base, pytest.raises(httpx.HTTPError):
        httpx.get(f"{base}/payments/charge").read()
    assert _count() == before  # the call was answered (if not whole): no second status

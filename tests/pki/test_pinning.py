"""A pinned client context talks only to the server whose certificate names the pinned SPIFFE ID,
and refuses any other before a byte of the request (credentials included) leaves the client."""

from __future__ import annotations

import asyncio
import ssl

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aegis.errors import AegisError
from aegis.pki.pinning import pin_server_spiffe_id, server_spiffe_id
from tests.pki.conftest import Pki
from tests.pki.harness import gateway_server_context, serve

SERVER_ID = "spiffe://example.org/tenant/t1/env/prod/agent/gw"  # the "gw" serving agent
OTHER_ID = "spiffe://example.org/tenant/t1/env/prod/agent/control-plane"


def _recording_app(seen: list[str]) -> Starlette:
    async def secret(request: Request) -> JSONResponse:
        seen.append(request.headers.get("authorization", ""))
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/secret", secret, methods=["POST"])])


def _chain(exc: BaseException | None) -> list[BaseException]:
    out = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _pinned(pki: Pki, expected: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=pki.ca.bundle_pem().decode())
    return pin_server_spiffe_id(ctx, expected)


async def test_async_client_reaches_the_pinned_server_and_refuses_any_other(pki: Pki) -> None:
    seen: list[str] = []
    ctx = gateway_server_context(pki, require_client_cert=False)
    async with serve(_recording_app(seen), ctx, name="pin") as srv:
        url = f"https://127.0.0.1:{srv.port}/secret"
        async with httpx.AsyncClient(verify=_pinned(pki, SERVER_ID)) as good:
            assert (await good.post(url, headers={"authorization": "Basic good"})).json() == {
                "ok": True
            }
        async with httpx.AsyncClient(verify=_pinned(pki, OTHER_ID)) as wrong:
            with pytest.raises(httpx.ConnectError) as info:
                await wrong.post(url, headers={"authorization": "Basic stolen"})
        assert any(isinstance(e, ssl.SSLCertVerificationError) for e in _chain(info.value))
        assert "not the pinned" in str(info.value)
    assert seen == ["Basic good"]  # the refused client never sent its credentials


async def test_blocking_client_is_pinned_too(pki: Pki) -> None:
    seen: list[str] = []
    ctx = gateway_server_context(pki, require_client_cert=False)
    async with serve(_recording_app(seen), ctx, name="pin-sync") as srv:
        url = f"https://127.0.0.1:{srv.port}/secret"

        def call(expected: str) -> int:
            with httpx.Client(verify=_pinned(pki, expected)) as client:
                return client.post(url, headers={"authorization": f"Basic {expected}"}).status_code

        assert await asyncio.to_thread(call, SERVER_ID) == 200
        with pytest.raises(httpx.ConnectError, match="not the pinned"):
            await asyncio.to_thread(call, OTHER_ID)
    assert seen == [f"Basic {SERVER_ID}"]


def test_a_pin_must_be_a_valid_spiffe_id_on_a_verifying_context(pki: Pki) -> None:
    with pytest.raises(AegisError) as info:
        _pinned(pki, "https://example.org/agent/gw")
    assert info.value.code == "spiffe_id_invalid"
    lax = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    lax.check_hostname = False
    lax.verify_mode = ssl.CERT_NONE
    with pytest.raises(ValueError, match="verify"):
        pin_server_spiffe_id(lax, SERVER_ID)


def test_a_server_without_a_certificate_or_spiffe_id_is_refused(pki: Pki) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="no certificate"):
        server_spiffe_id(None)
    with pytest.raises(ssl.SSLCertVerificationError, match="no SPIFFE ID"):
        server_spiffe_id(b"not a certificate")
    from cryptography.hazmat.primitives import serialization

    _, leaf = pki.key_and_cert("gw")
    assert server_spiffe_id(leaf.public_bytes(serialization.Encoding.DER)) == SERVER_ID

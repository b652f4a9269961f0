"""Forwarded client certificates: believed only from a trusted proxy, stripped from everyone."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from aegis.errors import REFUSAL_FIELD, AegisError, refusal_mark
from aegis.pki.forwarded import parse_nginx, parse_xfcc
from aegis.pki.middleware import PeerCertificateMiddleware
from aegis.sdk.wire import is_gateway_refusal, parse_body
from aegis.types import AgentStatus
from tests.pki.conftest import Pki
from tests.pki.harness import gateway_app, rejections

PROXY = "10.0.0.7"


def _pem(pki: Pki, agent: str = "alpha") -> str:
    return pki.key_and_cert(agent)[1].public_bytes(serialization.Encoding.PEM).decode()


def _xfcc(pem: str, extra: str = "") -> str:
    return f'By=spiffe://example.org/gw;Hash=abc;Cert="{quote(pem, safe="")}";Subject="CN=a,O=b"{extra}'


def test_xfcc_single_element_with_quoted_commas(pki: Pki) -> None:
    pem = _pem(pki)
    der = parse_xfcc(_xfcc(pem))
    assert der == x509.load_pem_x509_certificate(pem.encode()).public_bytes(
        serialization.Encoding.DER
    )


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("By=x;Hash=y", "exactly one Cert"),
        ('Cert="%2D%2D%2D"', "exactly one pem"),
        ('Cert="abc', "unterminated quote"),
        ("Cert", "malformed key=value"),
    ],
)
def test_xfcc_malformed(value: str, words: str) -> None:
    with pytest.raises(AegisError, match=words):
        parse_xfcc(value)


def test_xfcc_with_two_elements_is_refused(pki: Pki) -> None:
    pem = _pem(pki)
    with pytest.raises(AegisError, match="exactly one element"):
        parse_xfcc(_xfcc(pem) + "," + _xfcc(pem))


def test_nginx_escaped_cert(pki: Pki) -> None:
    pem = _pem(pki)
    assert parse_nginx(quote(pem, safe="")) is not None
    assert parse_nginx("") is None
    with pytest.raises(AegisError, match="exactly one pem"):
        parse_nginx(quote(pem + pem, safe=""))


async def _get(app: object, client_ip: str, headers: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(client_ip, 40000))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        return await client.get("/whoami", headers=headers)


@pytest.mark.parametrize(
    ("mode", "header"), [("envoy", "x-forwarded-client-cert"), ("nginx", "x-ssl-client-cert")]
)
async def test_trusted_proxy_is_believed_and_everyone_else_ignored(
    pki: Pki, mode: str, header: str
) -> None:
    pem = _pem(pki)
    value = _xfcc(pem) if mode == "envoy" else quote(pem, safe="")
    app = gateway_app(pki, name=f"fwd-{mode}", trusted_proxies=[PROXY], mode=mode)
    trusted = await _get(app, PROXY, {header: value})
    assert trusted.status_code == 200, trusted.text
    body = trusted.json()
    assert body["peer"]["agent"] == "alpha"
    assert body["peer"]["source"] == "forwarded"
    assert body["forwarded_headers_seen"] == {}
    # The same header from anyone else is not believed: no certificate, so refused.
    untrusted = await _get(app, "10.0.0.8", {header: value})
    assert untrusted.status_code == 401
    assert untrusted.json()["code"] == "cert_required"
    # Not required on this route: served, without a peer, and the header never reaches the app.
    lenient = gateway_app(
        pki, name=f"fwd-{mode}-l", trusted_proxies=[PROXY], mode=mode, required=False
    )
    seen = (
        await _get(lenient, "10.0.0.8", {header: value, "x-forwarded-client-cert": value})
    ).json()
    assert seen == {"peer": None, "forwarded_headers_seen": {}}


async def test_forwarded_failures_are_refused_with_reason(pki: Pki) -> None:
    app = gateway_app(pki, name="fwd-bad", trusted_proxies=[PROXY], mode="nginx")
    before = rejections("fwd-bad", "cert_invalid")
    bad = await _get(app, PROXY, {"x-ssl-client-cert": "junk"})
    assert (bad.status_code, bad.json()["code"]) == (401, "cert_invalid")
    assert rejections("fwd-bad", "cert_invalid") == before + 1
    pem = _pem(pki, "beta")
    pki.registry.set_agent_status("beta", AgentStatus.RETIRED, actor="test")
    revoked = await _get(app, PROXY, {"x-ssl-client-cert": quote(pem, safe="")})
    assert revoked.json()["code"] == "cert_revoked"
    assert revoked.json()["spiffe_id"].endswith("/agent/beta")


async def test_trusted_proxy_addresses_are_compared_as_addresses(pki: Pki) -> None:
    pem = _pem(pki)
    app = gateway_app(pki, name="fwd-v6", trusted_proxies=["10.0.0.7", "fd00::7"], mode="nginx")
    header = {"x-ssl-client-cert": quote(pem, safe="")}
    for peer in ("::ffff:10.0.0.7", "fd00:0::7"):
        assert (await _get(app, peer, header)).status_code == 200, peer
    for peer in ("10.0.0.70", "fd00::8", "unix-socket"):
        assert (await _get(app, peer, header)).json()["code"] == "cert_required", peer


async def test_an_mtls_listener_refusal_is_the_gateways_own_marked_answer() -> None:
    """A peer-certificate refusal is answered by the listener itself: with a decision id (in
    the body, the header and its mtls.rejected record) and the gateway's mark, so an SDK reads
    it as the refusal it is, never as a tool's 403."""
    reached: list[Any] = []

    async def proxy(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope)

    app = PeerCertificateMiddleware(
        proxy, validator=None,  # type: ignore[arg-type]  # never reached: refused first
        trusted_proxies=["127.0.0.1"], mode="envoy", listener="gateway",
    )  # fmt: skip
    auth = "DPoP header.payload.sig"
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 4711))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        answer = await client.post(
            "/payments/charge",
            headers=[
                ("authorization", auth),
                ("x-forwarded-client-cert", "a"),
                ("x-forwarded-client-cert", "b"),
            ],
            json={"amount": 1},
        )
    assert not reached
    assert answer.status_code >= 400 and answer.json()["code"] == "cert_invalid"
    # Written by the gateway itself: marked (and decided), so the SDK raises it as a refusal.
    assert answer.headers.get(REFUSAL_FIELD) == refusal_mark(auth)
    assert is_gateway_refusal(answer, parse_body(answer))

"""A ``RenewingCertificate`` agent keeps calling through certificate renewals: new connections (the
token endpoint's ``tls_client_auth`` and the gateway's mTLS) present the new certificate, calls in
flight finish on the old one, and tokens bound to the old certificate are dropped."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from aegis.pki.api import PkiEndpoints
from aegis.pki.renewal import CertificateManager, basic_credentials
from aegis.sdk import AgentClient, CachedToken, RenewingCertificate, TokenCache, TokenKey
from aegis.sdk.renewing import RotatingAsyncTransport
from aegis.types import ClientAuthMethod
from tests.pki.conftest import TRUST_DOMAIN, Pki, build_pki
from tests.pki.harness import control_plane, gateway_app, gateway_server_context, serve

# Whole seconds, so a certificate lives 5 to 6 s: renewals at ~3.5 s and ~7 s (as in
# tests/pki/test_renewal.py, which explains why a shorter life is flaky on a loaded machine).
LIFETIME = 6
#: The loop stops once calls were made with tokens bound to three certificates; this bounds it.
RUN_FOR = 10.0


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Pki]:
    p = build_pki(tmp_path)
    yield p
    p.store.close()


@dataclass
class Stack:
    agent: AgentClient
    manager: CertificateManager
    gateway: str
    #: The thumbprint of every certificate the manager obtained, in order.
    issued: list[str]


@asynccontextmanager
async def stack(pki: Pki, lifetime: int | None) -> AsyncIterator[Stack]:
    """CA, control plane and gateway on loopback mTLS listeners, a started manager and an
    ``AgentClient`` on it; everything is stopped on every path."""
    spiffe = f"spiffe://{TRUST_DOMAIN}/tenant/t1/env/prod/agent/alpha"
    client, _ = pki.registry.create_client(
        "alpha", auth_method=ClientAuthMethod.TLS_CLIENT_AUTH, tls_san_uri=spiffe, actor="test"
    )
    ca_app = Starlette(routes=PkiEndpoints(pki.service, max_body_bytes=65536).routes())
    cp = control_plane(pki, name="sdk-renew-cp")
    open_ctx = gateway_server_context(pki, require_client_cert=False)
    trust = pki.ca.bundle_pem()
    verify = ssl.create_default_context(cadata=trust.decode())
    verify.check_hostname = False  # the control plane's certificate names a SPIFFE ID
    gw_app = gateway_app(pki, name="sdk-renew-gw", verifier=cp.verifier)
    async with (
        serve(ca_app, open_ctx, name="sdk-renew-ca") as ca,
        serve(cp.app, open_ctx, name="sdk-renew-cp") as cps,
        serve(gw_app, gateway_server_context(pki), name="sdk-renew-gw") as gw,
    ):
        issued: list[str] = []
        manager = CertificateManager(
            f"https://127.0.0.1:{ca.port}",
            basic_credentials(*pki.secrets["alpha"]),
            clock=pki.clock,
            trust_pem=trust,
            verify=verify,
            lifetime=lifetime,
            on_renew=[lambda cred: issued.append(cred.x5t_s256)],
        )
        await manager.start()
        try:
            credential = RenewingCertificate(client.client_id, manager)
            async with AgentClient(f"https://127.0.0.1:{cps.port}", credential, dpop=False) as a:
                yield Stack(a, manager, f"https://127.0.0.1:{gw.port}", issued)
        finally:
            await manager.stop()


def bound_to(response: httpx.Response) -> str:
    """The ``cnf.x5t#S256`` of the token a request carried."""
    token = response.request.headers["authorization"].split(" ", 1)[1]
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["cnf"]["x5t#S256"])


def rotating(http: httpx.AsyncClient) -> RotatingAsyncTransport:
    transport = http._transport
    assert isinstance(transport, RotatingAsyncTransport)
    return transport


async def test_calls_through_two_renewals_never_fail_and_follow_the_new_certificate(
    pki: Pki,
) -> None:
    async with stack(pki, LIFETIME) as s, s.agent.async_client(s.gateway) as http:
        statuses: list[int] = []

        async def record(response: httpx.Response) -> None:
            statuses.append(response.status_code)  # every answer, retries inside auth included

        http.event_hooks["response"].append(record)
        bound: list[str] = []
        peers: set[str] = set()
        tokens: set[str] = set()
        failures: list[str] = []
        deadline = time.monotonic() + RUN_FOR

        async def worker(path: str) -> None:
            while not failures and len(set(bound)) < 3 and time.monotonic() < deadline:
                try:
                    response = await http.get(path)
                except Exception as exc:  # recorded, not raised: every worker stops cleanly
                    failures.append(f"{path}: {type(exc).__name__}: {exc}")
                    break
                if response.status_code != 200:
                    failures.append(f"{path}: {response.status_code} {response.text[:200]}")
                elif path == "/call":
                    bound.append(bound_to(response))
                    tokens.add(response.request.headers["authorization"])
                else:
                    peers.add(response.json()["peer"]["x5t#S256"])

        await asyncio.gather(*(worker(p) for p in ("/call", "/call", "/call", "/slow")))
        transport = rotating(http)
        assert failures == []
        assert set(statuses) == {200}  # no refused call was hidden by a token refresh
        assert s.manager.renewals >= 3  # the first certificate and at least two renewals
        assert len(set(bound)) >= 3
        # Every token was bound to a certificate the manager obtained, in the order obtained.
        order = [s.issued.index(x) for x in dict.fromkeys(bound)]
        assert order == sorted(order)
        assert peers <= set(s.issued)
        # New tokens only at renewals (at most one per concurrent worker and certificate).
        assert len(tokens) <= 4 * len(set(bound))
        assert transport.rotations >= 2
        assert transport.retired_open == 0  # each old transport was closed once it was idle
        assert rotating(s.agent.ahttp).rotations == transport.rotations


async def test_a_call_in_flight_finishes_on_the_old_certificate(pki: Pki) -> None:
    async with stack(pki, None) as s, s.agent.async_client(s.gateway) as http:
        first = (await http.get("/whoami")).json()["peer"]["x5t#S256"]
        slow = asyncio.create_task(http.get("/slow"))
        try:
            await asyncio.sleep(0.2)  # the slow call is on the wire, on the first certificate
            renewed = await s.manager.obtain()
            assert rotating(http).retired_open == 1  # kept open for the call in flight
            # The sync token client rotated too: the token it fetches is bound to the new one.
            token = await asyncio.to_thread(s.agent.token)
            assert token.claims["cnf"] == {"x5t#S256": renewed.x5t_s256}
            after = await http.get("/call")
            assert after.status_code == 200, after.text
            assert bound_to(after) == renewed.x5t_s256 != first
            assert (await slow).json()["peer"]["x5t#S256"] == first
        finally:
            if not slow.done():
                slow.cancel()
            await asyncio.gather(slow, return_exceptions=True)
        await asyncio.sleep(0)  # let the old transport's close run
        assert rotating(http).retired_open == 0
        peer = (await http.get("/whoami")).json()["peer"]["x5t#S256"]
        assert peer == renewed.x5t_s256


async def test_closing_the_client_unhooks_it_from_the_manager(pki: Pki) -> None:
    async with stack(pki, None) as s:
        hooks = len(s.manager.on_renew)
        http = s.agent.async_client(s.gateway)
        assert len(s.manager.on_renew) == hooks + 1
        await http.aclose()
        assert len(s.manager.on_renew) == hooks
        await s.agent.aclose()
        assert len(s.manager.on_renew) == 1  # only the test's own hook is left


def _token(cnf: dict[str, Any]) -> CachedToken:
    return CachedToken("t", "Bearer", 0.0, 1e12, "", {"cnf": cnf})


def test_a_renewal_drops_only_tokens_bound_to_another_certificate(pki: Pki) -> None:
    cache = TokenCache(pki.clock)
    old, new, jkt = TokenKey("a", None, None), TokenKey("b", None, None), TokenKey("c", None, None)
    cache.put(old, _token({"x5t#S256": "old"}))
    cache.put(new, _token({"x5t#S256": "new"}))
    cache.put(jkt, _token({"jkt": "k"}))
    assert cache.keep_bound_to("new") == 1
    assert cache.get(old) is None
    assert cache.get(new) is not None and cache.get(jkt) is not None

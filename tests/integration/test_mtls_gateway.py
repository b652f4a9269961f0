"""RFC 8705 end to end through the real gateway: the control plane and the gateway app, each behind
the mTLS listener, the internal CA from ``aegis ca init``'s code, a real upstream.

An agent gets a token at ``/oauth/token`` with ``tls_client_auth`` over certificate A; the gateway
forwards it with A, refuses it with B (another valid certificate of the same agent) and with C (a
valid certificate of another agent), and refuses a revoked certificate before any policy runs.
Every refusal is in the gateway's audit log with the certificate's serial and SPIFFE ID.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tests.gateway.harness import Upstream
from tests.gateway.harness import serve as serve_http
from tests.pki.harness import fetch, pem, rejections, serve
from tests.support.server import free_port, write_dev_config

from aegis.clock import SystemClock
from aegis.config import GatewaySettings, load_config
from aegis.gateway.app import _revocations, build_pipeline, create_gateway_app
from aegis.gateway.proxy import _CheckedConnector
from aegis.gateway.server import serve_mtls
from aegis.pki.binding import BINDING_LISTENER
from aegis.pki.ca import CaFiles, CertificateAuthority
from aegis.pki.middleware import MTLS_AUDIT_KIND, PeerCertificateMiddleware, peer_from_scope
from aegis.pki.profile import serial_hex, x5t_s256
from aegis.pki.service import PkiService
from aegis.pki.store import CertificateStore
from aegis.pki.tls import client_context, server_context
from aegis.registry.service import AgentSpec
from aegis.server.app import create_app
from aegis.server.services import Services, build_services
from aegis.types import ClientAuthMethod

pytestmark = pytest.mark.slow
TD = "mtls.example"


@dataclass
class World:
    services: Services
    pki: PkiService
    tmp: Path

    def cert(self, agent: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        return key, self.pki.issue(agent, key.public_key()).certificate

    def ctx(self, key: ec.EllipticCurvePrivateKey | None, cert: x509.Certificate | None) -> Any:
        bundle = self.pki.ca.bundle_pem()
        if key is None or cert is None:
            return client_context(None, None, bundle)
        return client_context(pem(cert, self.pki.ca.current.cert), key, bundle)

    def server_ctx(self, *, require: bool) -> Any:
        key, cert = self.cert("gw")
        return server_context(
            pem(cert, self.pki.ca.current.cert),
            key,
            self.pki.ca.bundle_pem(),
            require_client_cert=require,
        )


@asynccontextmanager
async def world(tmp: Path, pki_yaml: str = "") -> AsyncIterator[World]:
    config = load_config(
        write_dev_config(tmp, free_port(), f"pki:\n  trust_domain: {TD}\n{pki_yaml}"), environ={}
    )
    CertificateAuthority.init(CaFiles.from_config(config), config.kek(), SystemClock(), TD)
    services = build_services(config)
    pki = services.extras["pki"]
    assert isinstance(pki, PkiService)
    serving = ("server",)
    for agent, roles in (("alpha", ()), ("beta", ()), ("gw", serving), ("tool", serving),
                         ("ledger", serving)):  # fmt: skip
        services.registry.register_agent(
            AgentSpec(agent, "acme", "prod", "owner@example.com",
                      allowed_scopes=("payments:write",), roles=roles),
            actor="test",
        )  # fmt: skip
    try:
        yield World(services, pki, tmp)
    finally:
        await services.aclose()


async def test_a_certificate_bound_token_works_only_over_its_own_certificate(
    tmp_path: Path,
) -> None:
    async with world(tmp_path) as w:
        client, _ = w.services.registry.create_client(
            "alpha",
            auth_method=ClientAuthMethod.TLS_CLIENT_AUTH,
            tls_san_uri=f"spiffe://{TD}/tenant/acme/env/prod/agent/alpha",
            actor="test",
        )
        key_a, cert_a = w.cert("alpha")
        key_b, cert_b = w.cert("alpha")
        key_c, cert_c = w.cert("beta")
        body = f"grant_type=client_credentials&client_id={client.client_id}&scope=payments:write"
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        async with serve(create_app(w.services), w.server_ctx(require=False), name="cp") as cp:
            issued = await fetch(
                cp.port, w.ctx(key_a, cert_a), "/oauth/token", method="POST", headers=form,
                body=body,
            )  # fmt: skip
        assert issued.status == 200, issued
        assert issued.body is not None
        token = issued.body["access_token"]
        claims = w.services.verifier.verify(token)
        assert claims.cnf == {"x5t#S256": x5t_s256(cert_a)}

        upstream = Upstream()
        with serve_http(upstream.app) as up:
            settings = GatewaySettings.model_validate(
                {
                    "routes": [{"path_prefix": "/pay", "upstream": up, "tool": "pay_invoice",
                                "tenant": "acme", "env": "prod", "allow_bearer": True}],
                    "allow": [{"tool": "pay_invoice"}],
                }
            )  # fmt: skip
            pipeline = build_pipeline(w.services, settings)
            gateway = create_gateway_app(w.services, settings, pipeline=pipeline)
            bearer = {"Authorization": f"Bearer {token}"}
            mismatches = rejections(BINDING_LISTENER, "cert_token_mismatch")
            async with (
                gateway.router.lifespan_context(gateway),
                serve(gateway, w.server_ctx(require=True), name="gw-mtls") as gw,
            ):
                with_a = await fetch(gw.port, w.ctx(key_a, cert_a), "/pay/x", headers=bearer)
                with_b = await fetch(gw.port, w.ctx(key_b, cert_b), "/pay/x", headers=bearer)
                with_c = await fetch(gw.port, w.ctx(key_c, cert_c), "/pay/x", headers=bearer)
                w.pki.store.revoke_serial(format(cert_a.serial_number, "x"), "key_compromise")
                await asyncio.sleep(w.services.config.stores.registry_cache_ttl + 0.05)
                revoked = await fetch(gw.port, w.ctx(key_a, cert_a), "/pay/x", headers=bearer)
                no_cert = await fetch(gw.port, w.ctx(None, None), "/pay/x", headers=bearer)
        assert (with_a.status, with_a.body) == (200, {"ok": True, "card": "4111 1111 1111 1111"})
        assert len(upstream.seen) == 1  # nothing refused ever reached the tool
        for refused in (with_b, with_c):
            assert refused.status == 401, refused
            assert refused.body is not None
            assert refused.body["error"] == "invalid_token"
        # Counted by their own reason as well as by the wire code.
        assert rejections(BINDING_LISTENER, "cert_token_mismatch") == mismatches + 2
        assert (revoked.status, (revoked.body or {}).get("code")) == (401, "cert_revoked")
        assert no_cert.status is None  # the handshake itself requires a certificate

        log = pipeline.audit  # the gateway's own log: decisions and certificate refusals
        assert log is not None
        decisions = list(log.records(kind="gateway.decision"))
        refusals = [d for d in decisions if d["code"] == "invalid_token"]
        assert sorted(d["peer_serial"] for d in refusals) == sorted(
            format(c.serial_number, "x") for c in (cert_b, cert_c)
        )
        [rejected] = [r for r in log.records(kind=MTLS_AUDIT_KIND) if r["code"] == "cert_revoked"]
        assert rejected["serial"] == format(cert_a.serial_number, "x")
        assert rejected["spiffe_id"] == f"spiffe://{TD}/tenant/acme/env/prod/agent/alpha"
        assert rejected["path"] == "/pay/x"


async def test_client_certificates_are_required_per_route(tmp_path: Path) -> None:
    """One listener (certificate optional in the handshake); the route decides. A route that
    requires mTLS refuses a call without a verified certificate before the token is looked at."""
    async with world(tmp_path) as w:
        key, cert = w.cert("alpha")
        client, _ = w.services.registry.create_client(
            "alpha", auth_method=ClientAuthMethod.CLIENT_SECRET_BASIC, actor="test"
        )
        token = w.services.issuer.issue(
            agent_id="alpha", client_id=client.client_id, tenant="acme", env="prod",
            scopes=("payments:write",), audience=("aegis-gateway",), lifetime=60,
        ).token  # fmt: skip
        bearer = {"Authorization": f"Bearer {token}"}
        upstream = Upstream()
        with serve_http(upstream.app) as up:
            route = {"upstream": up, "tenant": "acme", "env": "prod", "allow_bearer": True}
            settings = GatewaySettings.model_validate(
                {
                    "routes": [
                        {**route, "path_prefix": "/pay", "tool": "pay_invoice",
                         "require_client_cert": True},
                        {**route, "path_prefix": "/docs", "tool": "read_docs"},
                    ],
                    "allow": [{"tool": "pay_invoice"}, {"tool": "read_docs"}],
                }
            )  # fmt: skip
            pipeline = build_pipeline(w.services, settings)
            gateway = create_gateway_app(w.services, settings, pipeline=pipeline)
            async with (
                gateway.router.lifespan_context(gateway),
                serve(gateway, w.server_ctx(require=False), name="gw-routes") as gw,
            ):
                bare = w.ctx(None, None)
                secure_bare = await fetch(gw.port, bare, "/pay/x", headers=bearer)
                secure_mtls = await fetch(gw.port, w.ctx(key, cert), "/pay/x", headers=bearer)
                open_bare = await fetch(gw.port, bare, "/docs/x", headers=bearer)
        assert (secure_bare.status, (secure_bare.body or {}).get("code")) == (401, "cert_required")
        assert secure_mtls.status == 200, secure_mtls
        assert open_bare.status == 200, open_bare
        assert len(upstream.seen) == 2  # the refused call never reached the tool
        log = pipeline.audit
        assert log is not None
        [refused] = [
            r for r in log.records(kind="gateway.decision") if r["code"] == "cert_required"
        ]
        assert (refused["tool"], refused["verified"], refused["peer"]) == (
            "pay_invoice",
            False,
            None,
        )


async def test_the_gateway_serves_mtls_and_calls_upstreams_with_its_own_certificate(
    tmp_path: Path,
) -> None:
    """pki.gateway_agent: the gateway issues itself a certificate from the CA, presents it to
    callers (serve_mtls, what `aegis gateway run` uses) and to an upstream that requires mTLS."""

    served: list[str] = []

    async def whoami(request: Request) -> Response:
        peer = peer_from_scope(request.scope)
        served.append(request.url.path)
        return JSONResponse({"peer": peer.spiffe_id if peer else None})

    async with world(tmp_path, "  gateway_agent: gw\n") as w:
        key, cert = w.cert("alpha")
        client, _ = w.services.registry.create_client(
            "alpha", auth_method=ClientAuthMethod.CLIENT_SECRET_BASIC, actor="test"
        )
        token = w.services.issuer.issue(
            agent_id="alpha", client_id=client.client_id, tenant="acme", env="prod",
            scopes=("payments:write",), audience=("aegis-gateway",), lifetime=60,
            cnf={"x5t#S256": x5t_s256(cert)},
        ).token  # fmt: skip
        tool_key, tool_cert = w.cert("tool")
        tool = PeerCertificateMiddleware(
            Starlette(routes=[Route("/{p:path}", whoami)]),
            w.pki.validator(),
            listener="tool",
        )
        tool_ctx = server_context(
            pem(tool_cert, w.pki.ca.current.cert), tool_key, w.pki.ca.bundle_pem()
        )  # require_client_cert: the gateway must present its own certificate
        # A second tool whose certificate is revoked (its key leaked, say).
        ledger_key, ledger_cert = w.cert("ledger")
        assert w.pki.store.revoke_serial(serial_hex(ledger_cert), "key_compromise")
        ledger_ctx = server_context(
            pem(ledger_cert, w.pki.ca.current.cert), ledger_key, w.pki.ca.bundle_pem()
        )
        async with (
            serve(tool, tool_ctx, name="tool") as up,
            serve(tool, ledger_ctx, name="ledger") as revoked,
        ):
            settings = GatewaySettings.model_validate(
                {
                    "routes": [{"path_prefix": "/tool", "upstream": f"https://127.0.0.1:{up.port}",
                                "tool": "pay_invoice", "tenant": "acme", "env": "prod",
                                "allow_bearer": True, "require_client_cert": True},
                               # The same upstream with its SPIFFE ID pinned, rightly and not.
                               {"path_prefix": "/pinned", "upstream": f"https://127.0.0.1:{up.port}",
                                "tool": "pay_invoice", "tenant": "acme", "env": "prod",
                                "allow_bearer": True,
                                "upstream_spiffe_id": f"spiffe://{TD}/tenant/acme/env/prod/agent/tool"},
                               {"path_prefix": "/impostor", "upstream": f"https://127.0.0.1:{up.port}",
                                "tool": "pay_invoice", "tenant": "acme", "env": "prod",
                                "allow_bearer": True,
                                "upstream_spiffe_id": f"spiffe://{TD}/tenant/acme/env/prod/agent/ledger"},
                               {"path_prefix": "/ledger", "upstream": f"https://127.0.0.1:{revoked.port}",
                                "tool": "pay_invoice", "tenant": "acme", "env": "prod",
                                "allow_bearer": True},
                               {"path_prefix": "/ledger-pinned",
                                "upstream": f"https://127.0.0.1:{revoked.port}",
                                "tool": "pay_invoice", "tenant": "acme", "env": "prod",
                                "allow_bearer": True,
                                "upstream_spiffe_id": f"spiffe://{TD}/tenant/acme/env/prod/agent/ledger"}],
                    "allow": [{"tool": "pay_invoice"}],
                }
            )  # fmt: skip
            pipeline = build_pipeline(w.services, settings)
            app = create_gateway_app(w.services, settings, pipeline=pipeline)
            assert app.state.certificates is not None
            stop, ports = asyncio.Event(), asyncio.Queue[int]()
            task = asyncio.create_task(
                serve_mtls(app, app.state.certificates, "127.0.0.1", 0, stop,
                           started=ports.put_nowait)
            )  # fmt: skip
            try:
                port = await asyncio.wait_for(ports.get(), 10)
                bearer = {"Authorization": f"Bearer {token}"}
                called = await fetch(port, w.ctx(key, cert), "/tool/x", headers=bearer)
                pinned = await fetch(port, w.ctx(key, cert), "/pinned/x", headers=bearer)
                impostor = await fetch(port, w.ctx(key, cert), "/impostor/x", headers=bearer)
                ledger = [
                    await fetch(port, w.ctx(key, cert), f"{path}/x", headers=bearer)
                    for path in ("/ledger", "/ledger-pinned")
                ]
                # The tool's certificate is revoked now: within about a second the gateway stops
                # reusing its pooled connections, and a new one fails the handshake check.
                assert w.pki.store.revoke_serial(serial_hex(tool_cert), "key_compromise")
                after_revocation: list[int | None] = []
                for _ in range(40):
                    again = await fetch(port, w.ctx(key, cert), "/tool/again", headers=bearer)
                    after_revocation.append(again.status)
                    if again.status == 502:
                        break
                    await asyncio.sleep(0.1)
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=w.ctx(key, cert), server_hostname="gw"
                )
                served_by = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
                writer.close()
                await writer.wait_closed()
            finally:
                stop.set()
                await asyncio.wait_for(task, 10)
    assert called.status == 200, called
    assert called.body == {"peer": f"spiffe://{TD}/tenant/acme/env/prod/agent/gw"}
    assert pinned.status == 200, pinned
    # A server the CA certified, but not the one pinned: refused in the handshake, before the
    # request (and the gateway's credentials) reach it.
    assert (impostor.status, impostor.body["error"]) == (502, "bad_gateway"), impostor
    # A revoked upstream certificate is refused too, pinned or not.
    assert [(r.status, r.body["error"]) for r in ledger] == [(502, "bad_gateway")] * 2, ledger
    assert after_revocation[-1] == 502, after_revocation
    assert served == ["/tool/x", "/pinned/x"] + ["/tool/again"] * (len(after_revocation) - 1)
    sans = x509.load_der_x509_certificate(served_by).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )  # fmt: skip
    assert sans.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TD}/tenant/acme/env/prod/agent/gw"
    ]


async def test_a_revocation_made_in_another_process_reaches_the_gateways_next_handshake(
    tmp_path: Path,
) -> None:
    """The gateway's store caches certificate records for a moment; a revocation made by another
    process (the control plane, another replica, `aegis ca revoke`) does not clear that cache.
    When the revocation mark moves, the cache is dropped before the outbound contexts are
    renewed, so the first new handshake reads the revocation itself."""
    async with world(tmp_path) as w:
        _, cert = w.cert("tool")
        serial = serial_hex(cert)
        mark = _revocations(w.pki)
        mark()  # as the gateway reads it at start
        elsewhere = CertificateStore(w.services.config.database_url(), clock=SystemClock())
        assert w.pki.store.lookup(serial).revoked_at is None  # cached now, for 0.25 s
        assert elsewhere.revoke_serial(serial, "key_compromise")
        assert w.pki.store.lookup(serial).revoked_at is None  # still the cached record
        before = mark()
        assert w.pki.store.lookup(serial).revoked_at is not None
        assert mark() == before  # unchanged mark: the cache is kept


async def test_any_failure_of_the_upstream_check_refuses_the_connection(tmp_path: Path) -> None:
    """The proxy turns a refused connection into 502; an unexpected error in the check (a bug,
    a store error of another kind) must be such a refusal too, not a 500 after which someone
    might retry around it, and the connection must not be kept."""

    async def hello(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async with world(tmp_path) as w:
        tool_key, tool_cert = w.cert("tool")
        gw_key, gw_cert = w.cert("gw")
        tool_ctx = server_context(
            pem(tool_cert, w.pki.ca.current.cert), tool_key, w.pki.ca.bundle_pem()
        )
        checked: list[bytes | None] = []

        async def broken(der: bytes | None) -> None:
            checked.append(der)
            raise RuntimeError("a bug in the check")

        async with serve(Starlette(routes=[Route("/x", hello)]), tool_ctx, name="tool") as up:
            connector = _CheckedConnector(broken)
            async with aiohttp.ClientSession(connector=connector) as session:
                for _ in range(2):  # refused each time: nothing was pooled
                    with pytest.raises(aiohttp.ClientConnectionError, match="a bug"):
                        await session.get(
                            f"https://127.0.0.1:{up.port}/x", ssl=w.ctx(gw_key, gw_cert)
                        )
    assert len(checked) == 2 and all(checked)

"""The certificate credential (RFC 8705 ``tls_client_auth``) against the real control plane behind
the Aegis mTLS listener: the agent's X.509-SVID authenticates it; the token is DPoP-bound, or bound
to the certificate (``cnf.x5t#S256``) with DPoP off."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aegis.clock import SystemClock
from aegis.config import load_config
from aegis.pki.ca import CaFiles, CertificateAuthority
from aegis.pki.listener import MTLSListener
from aegis.pki.profile import x5t_s256
from aegis.pki.service import PkiService
from aegis.pki.tls import server_context
from aegis.registry.service import AgentSpec
from aegis.sdk import AgentClient, Certificate, ClientAuthenticationError
from aegis.server.app import create_app
from aegis.server.services import Services, build_services
from aegis.types import ClientAuthMethod
from tests.support.server import free_port, write_dev_config

pytestmark = pytest.mark.slow


@dataclass
class TlsStack:
    url: str
    services: Services
    pki: PkiService
    directory: Path

    def enrol(self, agent: str, *, register_client: bool = True) -> Certificate:
        """Register ``agent``, issue its certificate, write the PEM files the SDK reads."""
        self.services.registry.register_agent(
            AgentSpec(
                agent, "acme", "prod", "owner@example.com", allowed_scopes=("payments:write",)
            ),
            actor="test",
        )
        client_id = "none"
        if register_client:
            spiffe = f"spiffe://{self.pki.ca.trust_domain}/tenant/acme/env/prod/agent/{agent}"
            client, _ = self.services.registry.create_client(
                agent, auth_method=ClientAuthMethod.TLS_CLIENT_AUTH, tls_san_uri=spiffe, actor="t"
            )
            client_id = client.client_id
        key = ec.generate_private_key(ec.SECP256R1())
        issued = self.pki.issue(agent, key.public_key())
        pem = serialization.Encoding.PEM
        cert_file, key_file = self.directory / f"{agent}.pem", self.directory / f"{agent}.key"
        cert_file.write_bytes(
            b"".join(c.public_bytes(pem) for c in (issued.certificate, *issued.chain))
        )
        key_file.write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        ca_file = self.directory / "bundle.pem"
        ca_file.write_bytes(self.pki.ca.bundle_pem())
        return Certificate(client_id, cert_file, key_file, ca_file)


@pytest.fixture
async def tls(tmp_path: Path) -> AsyncIterator[TlsStack]:
    port = free_port()
    path = write_dev_config(tmp_path, port)
    path.write_text(path.read_text().replace("issuer: http://", "issuer: https://"))
    config = load_config(path, environ={})
    CertificateAuthority.init(
        CaFiles.from_config(config), config.kek(), SystemClock(), config.pki.trust_domain
    )
    services = build_services(config)
    pki = services.extras["pki"]
    assert isinstance(pki, PkiService)
    services.registry.register_agent(
        AgentSpec("control-plane", "acme", "prod", "owner@example.com", roles=("server",)),
        actor="test",
    )
    key = ec.generate_private_key(ec.SECP256R1())
    issued = pki.issue("control-plane", key.public_key())
    pem = serialization.Encoding.PEM
    chain = b"".join(c.public_bytes(pem) for c in (issued.certificate, *issued.chain))
    ctx = server_context(chain, key, pki.ca.bundle_pem(), require_client_cert=False)
    listener = MTLSListener(create_app(services), context=lambda: ctx, port=port, name="sdk-cp")
    await listener.start()
    try:
        yield TlsStack(f"https://127.0.0.1:{port}", services, pki, tmp_path)
    finally:
        await listener.stop()
        await services.aclose()


async def test_a_certificate_gets_a_dpop_bound_token(tls: TlsStack) -> None:
    credential = tls.enrol("cert-agent")
    async with AgentClient(tls.url, credential) as agent:
        token = await agent.atoken(scope="payments:write")
        assert agent.signer is not None
        assert token.token_type == "DPoP"
        assert token.claims["cnf"] == {"jkt": agent.signer.jkt}
        assert token.claims["agent_id"] == "cert-agent"
        assert await agent.atoken(scope="payments:write") is token


async def test_without_dpop_the_token_is_bound_to_the_certificate(tls: TlsStack) -> None:
    credential = tls.enrol("cert-bound")
    from cryptography import x509

    leaf = x509.load_pem_x509_certificate(credential.cert_file.read_bytes())
    async with AgentClient(tls.url, credential, dpop=False) as agent:
        token = await agent.atoken()
    assert token.token_type == "Bearer"
    assert token.claims["cnf"] == {"x5t#S256": x5t_s256(leaf)}


async def test_a_certificate_of_another_agent_is_refused(tls: TlsStack) -> None:
    mine = tls.enrol("cert-owner")
    other = tls.enrol("cert-other", register_client=False)
    stolen = Certificate(mine.client_id, other.cert_file, other.key_file, other.ca_file)
    async with AgentClient(tls.url, stolen) as agent:
        with pytest.raises(ClientAuthenticationError) as err:
            await agent.atoken()
    assert err.value.code == "invalid_client"


async def test_an_agent_pinned_to_its_servers_refuses_another_serving_certificate(
    tls: TlsStack,
) -> None:
    """Any agent registered as serving holds a serverAuth certificate of the same CA: pointed at
    one (a hijacked route, a poisoned config), an agent pinned to its control plane and gateway
    refuses it in the handshake, before a token, a proof or a body is sent."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import httpx

    tls.services.registry.register_agent(
        AgentSpec("some-tool", "other", "prod", "o@example.com", roles=("server",)), actor="test"
    )
    key = ec.generate_private_key(ec.SECP256R1())
    issued = tls.pki.issue("some-tool", key.public_key())
    pem = serialization.Encoding.PEM
    chain = b"".join(c.public_bytes(pem) for c in (issued.certificate, *issued.chain))
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.headers.get("authorization", ""))
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = server_context(chain, key, tls.pki.ca.bundle_pem(), require_client_cert=False)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    impostor = f"https://127.0.0.1:{server.server_address[1]}"
    domain = tls.pki.ca.trust_domain
    control_plane = f"spiffe://{domain}/tenant/acme/env/prod/agent/control-plane"
    gateway = f"spiffe://{domain}/tenant/acme/env/prod/agent/gateway"
    try:
        plain = tls.enrol("pinned-payer")
        pinned = Certificate(plain.client_id, plain.cert_file, plain.key_file, plain.ca_file,
                             servers=(control_plane, gateway))  # fmt: skip
        async with AgentClient(tls.url, pinned) as agent:
            await agent.atoken(audience="aegis-gateway", scope="payments:write")  # its own: fine
            async with agent.async_client(
                impostor, audience="aegis-gateway", scope="payments:write"
            ) as http:
                with pytest.raises(httpx.ConnectError, match="pinned"):
                    await http.post("/payments/transfer", json={"amount": 120})
        assert seen == []
        async with (  # unpinned: what pinning prevents
            AgentClient(tls.url, plain) as agent,
            agent.async_client(impostor, audience="aegis-gateway", scope="payments:write") as http,
        ):
            await http.post("/payments/transfer", json={"amount": 120})
        assert len(seen) == 1 and seen[0].startswith("DPoP ")
        assert isinstance(pinned.ssl_context(), ssl.SSLContext)
    finally:
        server.shutdown()
        server.server_close()

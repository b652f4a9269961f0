"""An agent refuses a server certificate the Aegis CA revoked: the CRLs come from the real control
plane behind the Aegis mTLS listener, the server is a real TLS server on loopback."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aegis.pki.profile import build_crl
from aegis.pki.tls import server_context
from aegis.registry.service import AgentSpec
from aegis.sdk import AgentClient, Certificate, InvalidCrl, ServerRevocations
from tests.sdk.test_mtls import TlsStack, tls  # noqa: F401

pytestmark = pytest.mark.slow


class Tool:
    """A serving agent's HTTPS server (a tool the agent calls), recording what reaches it."""

    def __init__(self, stack: TlsStack, name: str) -> None:
        stack.services.registry.register_agent(
            AgentSpec(name, "acme", "prod", "o@example.com", roles=("server",)), actor="test"
        )
        key = ec.generate_private_key(ec.SECP256R1())
        issued = stack.pki.issue(name, key.public_key())
        self.serial = format(issued.certificate.serial_number, "x")
        self.spiffe_id = f"spiffe://{stack.pki.ca.trust_domain}/tenant/acme/env/prod/agent/{name}"
        pem = serialization.Encoding.PEM
        chain = b"".join(c.public_bytes(pem) for c in (issued.certificate, *issued.chain))
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                seen.append(self.headers.get("authorization", ""))
                self.rfile.read(int(self.headers.get("content-length", "0")))
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = server_context(chain, key, stack.pki.ca.bundle_pem(), require_client_cert=False)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tool(tls: TlsStack) -> Iterator[Tool]:  # noqa: F811
    served = Tool(tls, "ledger")
    yield served
    served.close()


async def _post(ctx: ssl.SSLContext, url: str) -> int:
    async with httpx.AsyncClient(verify=ctx) as http:
        return (await http.post(f"{url}/x", json={"amount": 1})).status_code


async def test_a_revoked_server_certificate_is_refused_in_the_handshake(
    tls: TlsStack,  # noqa: F811
    tool: Tool,
) -> None:
    """Before: the agent's context took a revoked serving certificate until it expired. Now the
    CRLs read from the control plane refuse it, before a byte (a token) is sent; and with no
    current CRL held, every server certificate is refused (fail closed)."""
    revocations = ServerRevocations(tls.url, tls.pki.ca.bundle_pem())
    plain = tls.enrol("crl-payer")
    guarded = Certificate(plain.client_id, plain.cert_file, plain.key_file, plain.ca_file,
                          servers=(tool.spiffe_id,), revocations=revocations)  # fmt: skip
    with pytest.raises(httpx.ConnectError, match="no current CRL"):
        await _post(guarded.ssl_context(), tool.url)
    await asyncio.to_thread(revocations.refresh)  # the control plane runs on this loop
    assert await _post(guarded.ssl_context(), tool.url) == 200
    tls.pki.store.revoke_serial(tool.serial, "key_compromise")
    await asyncio.to_thread(revocations.refresh)
    with pytest.raises(httpx.ConnectError, match=f"serial {tool.serial}.* is revoked"):
        await _post(guarded.ssl_context(), tool.url)
    assert len(tool.seen) == 1
    # Without the revocations, what they prevent: the revoked server is still taken.
    unchecked = Certificate(plain.client_id, plain.cert_file, plain.key_file, plain.ca_file,
                            servers=(tool.spiffe_id,))  # fmt: skip
    assert await _post(unchecked.ssl_context(), tool.url) == 200


async def test_an_agent_client_with_revocations_gets_its_token_and_calls_a_server(
    tls: TlsStack,  # noqa: F811
    tool: Tool,
) -> None:
    """The control plane's own certificate is judged by the same CRLs: the token is fetched,
    then the call is made, each over a checked handshake; revoked, the server gets no token."""
    revocations = ServerRevocations(tls.url, tls.pki.ca.bundle_pem(), every=0.2)
    await asyncio.to_thread(revocations.start)
    try:
        plain = tls.enrol("crl-agent")
        guarded = Certificate(plain.client_id, plain.cert_file, plain.key_file, plain.ca_file,
                              revocations=revocations)  # fmt: skip
        async with AgentClient(tls.url, guarded) as agent:
            async with agent.async_client(tool.url, audience="aegis-gateway") as http:
                assert (await http.post("/x", json={})).status_code == 200
            tls.pki.store.revoke_serial(tool.serial, "key_compromise")
            deadline = time.monotonic() + 5
            refused: list[str] = []
            while not refused:  # the background refresh picks the revocation up
                try:
                    async with agent.async_client(tool.url, audience="aegis-gateway") as http:
                        await http.post("/x", json={})
                except httpx.ConnectError as exc:
                    refused.append(str(exc))
                assert time.monotonic() < deadline, "the revocation was not picked up in 5 s"
                await asyncio.sleep(0.1)
            assert "revoked" in refused[0]
        assert all(s.startswith("DPoP ") for s in tool.seen) and tool.seen
    finally:
        await asyncio.to_thread(revocations.stop)


async def test_only_current_crls_the_bundle_vouches_for_are_installed(
    tls: TlsStack,  # noqa: F811
    tool: Tool,
) -> None:
    """A CRL signed by another key under the intermediate's name, an expired CRL and an older
    CRL than the one held are each refused or ignored; a CRL past its nextUpdate stops vouching
    (fail closed); a failed refresh keeps what was held and says why."""
    now = [time.time()]
    bundle = tls.pki.ca.bundle_pem()
    revocations = ServerRevocations(tls.url, bundle, clock=lambda: now[0])
    current = tls.pki.ca.current
    pem = serialization.Encoding.PEM
    leaf = _leaf_der(tool)

    def crl(key: ec.EllipticCurvePrivateKey, revoked: list[str], at: float) -> bytes:
        made = build_crl(current.cert, key, [(s, at, "key_compromise") for s in revoked],
                         now=at, lifetime=300)  # fmt: skip
        return made.public_bytes(pem)

    forged = crl(ec.generate_private_key(ec.SECP256R1()), [], now[0])
    with pytest.raises(InvalidCrl, match="not signed by an intermediate"):
        revocations.load(forged)
    with pytest.raises(InvalidCrl, match="nextUpdate"):
        revocations.load(crl(current.key, [], now[0] - 400))
    with pytest.raises(InvalidCrl, match="1 to 8 PEM CRLs"):
        revocations.load(b"not a CRL")
    revocations.load(crl(current.key, [tool.serial], now[0]))
    with pytest.raises(ssl.SSLCertVerificationError, match="revoked"):
        revocations.check(leaf)
    revocations.load(crl(current.key, [], now[0] - 100))  # older: a replayed answer, ignored
    with pytest.raises(ssl.SSLCertVerificationError, match="revoked"):
        revocations.check(leaf)
    revocations.load(crl(current.key, [], now[0] + 1))  # newer: lists it no more
    revocations.check(leaf)
    now[0] += 400  # past its nextUpdate
    with pytest.raises(ssl.SSLCertVerificationError, match="no current CRL"):
        revocations.check(leaf)
    down = ServerRevocations("https://127.0.0.1:9", bundle, timeout=1)
    with pytest.raises(httpx.ConnectError):
        await asyncio.to_thread(down.refresh)
    with pytest.raises(ssl.SSLCertVerificationError, match="last refresh: ConnectError"):
        down.check(leaf)
    with pytest.raises(ValueError, match="https only"):
        ServerRevocations("http://aegis.example.com", bundle)


def _leaf_der(tool: Tool) -> bytes:
    with ssl.create_connection(("127.0.0.1", tool.server.server_address[1]), timeout=5) as raw:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with ctx.wrap_socket(raw) as tls_socket:
            der = tls_socket.getpeercert(binary_form=True)
    assert der is not None
    assert format(x509.load_der_x509_certificate(der).serial_number, "x") == tool.serial
    return der

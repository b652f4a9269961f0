"""An agent refuses a server certificate the Aegis CA revoked: the CRLs come from the real control
plane behind the Aegis mTLS listener, the server is a real TLS server on loopback."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aegis.pki.profile import build_crl
from aegis.pki.tls import server_context
from aegis.registry.service import AgentSpec
from aegis.sdk import AgentClient, Certificate, InvalidCrl, ServerRevocations
from tests.pki.conftest import build_pki
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


def test_the_crls_of_both_intermediates_of_a_rotation_overlap_are_installed(
    tmp_path: Path,
) -> None:
    """After ``aegis ca rotate`` the current and the previous intermediate share one subject.
    Keyed by subject, only one of them was kept: the other's CRL failed its signature check,
    the whole document was refused, and (failing closed) every server was refused for the
    overlap."""
    pki = build_pki(tmp_path)
    pki.ca.rotate_intermediate(overlap=3600)
    bundle = pki.ca.bundle_pem()
    crls = pki.service.crl_pem()  # what GET /pki/v1/crl.pem answers: current, then previous
    assert crls.count(b"BEGIN X509 CRL") == 2
    revocations = ServerRevocations("https://127.0.0.1:9", bundle)
    revocations.load(crls, bundle)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = pki.service.issue("alpha", key.public_key()).certificate
    revocations.check(leaf.public_bytes(serialization.Encoding.DER))  # current: held, unlisted


def test_one_intermediates_crl_never_vouches_for_the_others_certificates(
    tmp_path: Path,
) -> None:
    """CRLs were held and looked up by issuer name, which both intermediates of a rotation
    share: the previous one's genuine CRL vouched for the new one's leaves, which it cannot
    list, and a revoked server certificate was taken. They are held by signing key now."""
    pki = build_pki(tmp_path)
    old = pki.ca.current
    pki.ca.rotate_intermediate(overlap=3600)
    new = pki.ca.current
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = pki.service.issue("gw", key.public_key()).certificate
    assert leaf.issuer == new.cert.subject == old.cert.subject
    pki.store.revoke_serial(format(leaf.serial_number, "x"), "key_compromise")
    blocks = re.findall(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----",
                        pki.service.crl_pem(), re.DOTALL)  # fmt: skip
    old_crl = next(b for b in blocks
                   if x509.load_pem_x509_crl(b).is_signature_valid(old.cert.public_key()))  # fmt: skip
    bundle = pki.ca.bundle_pem()  # root, new, previous: what the control plane serves
    revocations = ServerRevocations("https://127.0.0.1:9", bundle)
    revocations.load(old_crl, bundle)  # genuine and current: installed, for the old key only
    with pytest.raises(ssl.SSLCertVerificationError, match="no current CRL"):
        revocations.check(leaf.public_bytes(serialization.Encoding.DER))


def _serving(tmp_path: Path) -> tuple[Any, ssl.SSLContext]:
    """A CA and the TLS server context of one of its serving certificates."""
    pki = build_pki(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    issued = pki.service.issue("gw", key.public_key())
    pem = serialization.Encoding.PEM
    chain = b"".join(c.public_bytes(pem) for c in (issued.certificate, *issued.chain))
    return pki, server_context(chain, key, pki.ca.bundle_pem(), require_client_cert=False)


def test_a_refresh_is_bounded_by_its_timeout_against_a_trickling_server(
    tmp_path: Path,
) -> None:
    """httpx's timeout bounds each read, not the whole fetch: a server trickling a byte every
    0.3 s held refresh() (and start()) far past ``timeout``, up to the 4 MiB cap."""
    pki, ctx = _serving(tmp_path)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls_conn:
            tls_conn.recv(65536)
            tls_conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/x-pem-file\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            while not done.is_set():
                try:
                    tls_conn.sendall(b"1\r\nA\r\n")
                except OSError:
                    return
                time.sleep(0.3)

    threading.Thread(target=serve, daemon=True).start()
    revocations = ServerRevocations(f"https://127.0.0.1:{port}", pki.ca.bundle_pem(), timeout=1)
    finished = threading.Event()

    failed: list[BaseException] = []

    def fetch() -> None:
        try:
            revocations.refresh()
        except Exception as exc:  # the refusal, told below
            failed.append(exc)
        finished.set()

    threading.Thread(target=fetch, daemon=True).start()
    try:
        assert finished.wait(5), "refresh() with timeout=1 still running after 5 s"
        assert isinstance(failed[0], TimeoutError)
    finally:
        done.set()
        listener.close()


def test_a_refresh_holds_no_more_than_the_cap_against_a_compressed_answer(
    tmp_path: Path,
) -> None:
    """The cap was compared with chunks httpx had already decoded: ``content-encoding: gzip,
    gzip`` turned under 100 KB into one 64 MiB chunk. A content coding is refused now."""
    import gzip
    import tracemalloc

    pki, ctx = _serving(tmp_path)
    body = gzip.compress(gzip.compress(b"\0" * (64 * 1024 * 1024), 9), 9)
    assert len(body) < 100_000
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls_conn:
                tls_conn.recv(65536)
                tls_conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip, gzip\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
                                 + body)  # fmt: skip
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    revocations = ServerRevocations(f"https://127.0.0.1:{port}", pki.ca.bundle_pem(), timeout=5)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidCrl, match="content-coded"):
            revocations.refresh()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        listener.close()
    assert peak < 16 * 1024 * 1024, f"refresh() held {peak // 2**20} MiB at its peak"


async def test_the_crls_may_be_read_from_a_pinned_control_plane_only(
    tls: TlsStack,  # noqa: F811
    tool: Tool,
) -> None:
    """Any serving certificate of the bundle could answer the CRL fetch (and serve an older,
    still current CRL); ``server_id`` pins the control plane's SPIFFE ID on that connection."""
    bundle = tls.pki.ca.bundle_pem()
    domain = tls.pki.ca.trust_domain
    control_plane = f"spiffe://{domain}/tenant/acme/env/prod/agent/control-plane"
    pinned = ServerRevocations(tls.url, bundle, server_id=control_plane)
    await asyncio.to_thread(pinned.refresh)
    impostor = ServerRevocations(tool.url, bundle, server_id=control_plane)
    with pytest.raises(httpx.ConnectError, match="pinned"):
        await asyncio.to_thread(impostor.refresh)


def test_a_refresh_is_bounded_by_its_timeout_while_headers_trickle(tmp_path: Path) -> None:
    """The deadline was checked between body chunks only: a server trickling its status line
    and headers a byte at a time, each within httpx's per-read timeout, held a refresh far past
    ``timeout``. The whole read is waited for until the deadline now, and a second refresh does
    not start another read while the first still hangs."""
    pki = build_pki(tmp_path)
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 100:  # a byte every 0.1 s
                if stop.is_set():
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.1)

    threading.Thread(target=serve, daemon=True).start()
    revocations = ServerRevocations(f"http://127.0.0.1:{server.getsockname()[1]}",
                                    pki.ca.bundle_pem(), timeout=0.5)  # fmt: skip
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"within 0\.5 s"):
            revocations.refresh()
        assert time.monotonic() - started < 2.0
        with pytest.raises(TimeoutError, match="still not ended"):
            revocations.refresh()
        assert revocations.last_error is not None and "still not ended" in revocations.last_error
    finally:
        stop.set()
        server.close()

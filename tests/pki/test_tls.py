"""TLS contexts: TLS 1.2+ only with AEAD suites, checked from outside with ``openssl s_client``."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import time
import uuid

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from aegis.errors import AegisError
from aegis.pki.tls import TLS12_CIPHERS, classify_handshake_error, client_context, server_context
from tests.pki.conftest import Pki
from tests.pki.harness import (
    close_writer,
    gateway_app,
    gateway_server_context,
    pem,
    rejections,
    serve,
)

OPENSSL = shutil.which("openssl")


def test_server_context_refuses_old_protocols_and_weak_suites(pki: Pki) -> None:
    ctx = gateway_server_context(pki)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    names = {c["name"] for c in ctx.get_ciphers()}
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == set(TLS12_CIPHERS.split(":"))
    assert all(("GCM" in n or "CHACHA20" in n) for n in names)
    assert ctx.options & ssl.OP_NO_COMPRESSION


def test_handshake_errors_map_to_stable_codes() -> None:
    def verify_error(code: int) -> ssl.SSLCertVerificationError:
        exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
        exc.verify_code = code
        return exc

    assert classify_handshake_error(verify_error(10)) == "cert_expired"
    assert classify_handshake_error(verify_error(9)) == "cert_not_yet_valid"
    assert classify_handshake_error(verify_error(26)) == "cert_wrong_usage"
    assert classify_handshake_error(verify_error(20)) == "cert_untrusted"
    assert classify_handshake_error(TimeoutError()) == "tls_handshake_failed"


async def _s_client(port: int, *args: str) -> tuple[int, str]:
    assert OPENSSL is not None, "openssl is not installed; install the openssl package"
    proc = await asyncio.create_subprocess_exec(
        OPENSSL,
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-brief",
        "-ign_eof",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(
        proc.communicate(b"GET /whoami HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"), 15
    )
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.parametrize("old", ["-tls1", "-tls1_1"])
async def test_openssl_cannot_negotiate_tls_1_0_or_1_1(pki: Pki, old: str) -> None:
    name = f"tls-{uuid.uuid4().hex[:6]}"
    key, cert = pki.key_and_cert("alpha")
    cert_path, key_path = pki.write_pair("alpha", key, cert, pki.ca.current.cert)
    bundle = pki.directory / "bundle.pem"
    bundle.write_bytes(pki.ca.bundle_pem())
    async with serve(gateway_app(pki, name=name), gateway_server_context(pki), name=name) as gw:
        # SECLEVEL=0 lets this client offer the old protocol at all: the refusal must be the server's.
        code, out = await _s_client(
            gw.port,
            old,
            "-cipher",
            "DEFAULT@SECLEVEL=0",
            "-cert",
            str(cert_path),
            "-key",
            str(key_path),
        )
        assert code != 0, out
        assert "CONNECTION ESTABLISHED" not in out, out
        # The listener refused the handshake and counted it (OpenSSL: unsupported protocol).
        deadline = time.monotonic() + 5  # the listener counts it on its own loop turn
        while not rejections(name, "tls_handshake_failed") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert rejections(name, "tls_handshake_failed") == 1
        for good in ("-tls1_2", "-tls1_3"):
            code, out = await _s_client(
                gw.port,
                good,
                "-cert",
                str(cert_path),
                "-key",
                str(key_path),
                "-CAfile",
                str(bundle),
            )
            assert code == 0, out
            assert "Verification: OK" in out, out
            assert "spiffe://example.org/tenant/t1/env/prod/agent/alpha" in out, out


def test_pem_helper_round_trips(pki: Pki) -> None:
    assert ssl.PEM_cert_to_DER_cert(pem(pki.ca.root).decode())


async def test_outbound_context_verifies_the_upstream_and_its_spiffe_id(pki: Pki) -> None:
    """The gateway's client context presents its own certificate and trusts only the bundle; the
    upstream's identity is its SPIFFE ID, checked with serverAuth."""
    name = f"up-{uuid.uuid4().hex[:6]}"
    gw_key, gw_cert = pki.key_and_cert("gw")
    outbound = client_context(pem(gw_cert, pki.ca.current.cert), gw_key, pki.ca.bundle_pem())
    upstream_validator = pki.service.validator(eku=ExtendedKeyUsageOID.SERVER_AUTH)
    # A serving agent as the upstream: verified, and its SPIFFE ID read from the chain.
    up_key, up_cert = pki.key_and_cert("gw")
    up_ctx = server_context(pem(up_cert, pki.ca.current.cert), up_key, pki.ca.bundle_pem())
    async with serve(gateway_app(pki, name=name), up_ctx, name=name) as upstream:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", upstream.port, ssl=outbound, server_hostname="up"
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        await close_writer(writer)  # before the listener stops, or its socket outlives the test
    assert upstream_validator.validate(der).spiffe_id.endswith("/agent/gw")
    # An agent certificate without serverAuth cannot serve: the client refuses the handshake.
    bad_key, bad_cert = pki.key_and_cert("alpha")
    bad_ctx = server_context(pem(bad_cert, pki.ca.current.cert), bad_key, pki.ca.bundle_pem())
    async with serve(gateway_app(pki, name=name), bad_ctx, name=name) as upstream:
        with pytest.raises(ssl.SSLCertVerificationError, match="unsuitable certificate purpose"):
            await asyncio.open_connection(
                "127.0.0.1", upstream.port, ssl=outbound, server_hostname="up"
            )
    with pytest.raises(AegisError) as info:
        upstream_validator.validate(bad_cert.public_bytes(serialization.Encoding.DER))
    assert info.value.code == "cert_wrong_usage"

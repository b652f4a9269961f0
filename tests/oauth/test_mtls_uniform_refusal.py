"""Until a caller has proved it holds the client's credential, every mutual-TLS refusal at the
token endpoint reads the same, ``invalid_client`` / ``client authentication failed``, as for a
client that does not exist (docs/security.md). The RFC 8705 methods answered a caller holding
another agent's certificate, or an unregistered self-signed one, with reasons of their own, so a
client id that exists, and its method, could be told from an unknown one. Real token endpoint
behind the certificate middleware, served by uvicorn on loopback; the certificate arrives as
nginx forwards it (trusted proxy 127.0.0.1).
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from aegis.crypto.keys import b64u_encode
from aegis.types import ClientAuthMethod
from tests.pki.conftest import Pki, build_pki, self_signed_der
from tests.pki.harness import control_plane
from tests.support.server import free_port

UNIFORM = ("invalid_client", "client authentication failed")


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Pki]:
    p = build_pki(tmp_path)
    yield p
    p.store.close()


@contextmanager
def _serve(app: object) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _self_signed_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return ssl.DER_cert_to_PEM_cert(self_signed_der(key))


def _answer(url: str, client_id: str, cert_pem: str) -> tuple[int, str, str]:
    resp = httpx.post(
        f"{url}/oauth/token",
        data={"grant_type": "client_credentials", "client_id": client_id},
        headers={"x-ssl-client-cert": quote(cert_pem, safe="")},
        timeout=5,
    )
    body = resp.json()
    return resp.status_code, body.get("error", ""), body.get("error_description", "")


def test_mtls_refusals_of_an_unproven_caller_all_read_the_same(pki: Pki) -> None:
    alpha_spiffe = "spiffe://example.org/tenant/t1/env/prod/agent/alpha"
    tls_client, _ = pki.registry.create_client(
        "alpha", auth_method=ClientAuthMethod.TLS_CLIENT_AUTH, tls_san_uri=alpha_spiffe, actor="t"
    )
    registered = ed25519.Ed25519PrivateKey.generate()
    jwk = {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64u_encode(registered.public_key().public_bytes_raw()),
    }
    pki.registry.update_agent("alpha", actor="t", jwks=[jwk])
    ss_client, _ = pki.registry.create_client(
        "alpha", auth_method=ClientAuthMethod.SELF_SIGNED_TLS_CLIENT_AUTH, actor="t"
    )
    # The caller's own credentials: a valid Aegis certificate of another agent (gamma), and
    # self-signed certificates whose keys alpha never registered.
    gamma_pem = pki.key_and_cert("gamma")[1].public_bytes(serialization.Encoding.PEM).decode()
    p256_pem = _self_signed_pem(ec.generate_private_key(ec.SECP256R1()))
    p384_pem = _self_signed_pem(ec.generate_private_key(ec.SECP384R1()))

    cp = control_plane(pki, name="review-uniform", trusted_proxies=["127.0.0.1"], mode="nginx")
    with _serve(cp.app) as url:
        cases = {
            "unknown id, gamma's CA cert": ("nobody.c1", gamma_pem),
            "unknown id, self-signed P-384": ("nobody.c1", p384_pem),
            "tls_client_auth client, gamma's CA cert": (tls_client.client_id, gamma_pem),
            "tls_client_auth client, self-signed P-256": (tls_client.client_id, p256_pem),
            "self_signed client, unregistered P-256 key": (ss_client.client_id, p256_pem),
            "self_signed client, unregistered P-384 key": (ss_client.client_id, p384_pem),
        }
        answers = {name: _answer(url, cid, pem) for name, (cid, pem) in cases.items()}
    differing = {name: a for name, a in answers.items() if (a[0], a[1], a[2]) != (401, *UNIFORM)}
    assert not differing, differing

"""RFC 8705: mutual-TLS client authentication and certificate-bound access tokens."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from aegis.crypto.keys import b64u_encode
from aegis.errors import ClientAuthError, TokenError
from aegis.pki.binding import check_certificate_binding, check_self_signed_client, check_tls_client
from aegis.pki.peer import PeerIdentity
from aegis.pki.profile import x5t_s256
from aegis.tokens.claims import AccessToken
from aegis.types import ClientAuthMethod
from tests.pki.conftest import Pki, self_signed_der
from tests.pki.harness import control_plane


def _token(
    cnf: dict[str, Any] | None, agent: str = "alpha", tenant: str = "t1", env: str = "prod"
) -> AccessToken:
    claims = {
        "sub": agent,
        "agent_id": agent,
        "client_id": f"{agent}.c",
        "tenant": tenant,
        "env": env,
        "jti": "j",
        "iat": 0,
        "exp": 1,
        "aud": "aegis-gateway",
        "scope": "tools",
    }
    if cnf is not None:
        claims["cnf"] = cnf
    return AccessToken.from_claims(claims)


def _peer(pki: Pki, agent: str = "alpha") -> PeerIdentity:
    cert = pki.key_and_cert(agent)[1]
    return pki.validator.validate(cert.public_bytes(serialization.Encoding.DER))


def test_binding_holds_only_for_the_same_certificate_and_identity(pki: Pki) -> None:
    a, b = _peer(pki), _peer(pki)
    check_certificate_binding(_token({"x5t#S256": a.x5t_s256}), a)
    cases = {
        "unbound token": (_token(None), a),
        "dpop-bound token": (_token({"jkt": "abc"}), a),
        "no certificate": (_token({"x5t#S256": a.x5t_s256}), None),
        "certificate b": (_token({"x5t#S256": a.x5t_s256}), b),
        "another agent": (_token({"x5t#S256": a.x5t_s256}, agent="gamma"), a),
        "another tenant": (_token({"x5t#S256": a.x5t_s256}, tenant="t2"), a),
        "another env": (_token({"x5t#S256": a.x5t_s256}, env="dev"), a),
    }
    for case, (token, peer) in cases.items():
        with pytest.raises(TokenError) as info:
            check_certificate_binding(token, peer)
        assert info.value.code == "invalid_token", case
        assert info.value.details["reason"] == "cert_token_mismatch", case


def test_tls_client_auth_matches_the_registered_san_uri(pki: Pki) -> None:
    peer = _peer(pki)
    client, _ = pki.registry.create_client(
        "alpha", auth_method=ClientAuthMethod.TLS_CLIENT_AUTH, tls_san_uri=peer.spiffe_id, actor="t"
    )
    agent = pki.cache.agent("alpha")
    check_tls_client(client, agent, peer)
    with pytest.raises(ClientAuthError, match="not the one registered"):
        check_tls_client(client, agent, _peer(pki, "gamma"))
    with pytest.raises(ClientAuthError, match="needs a client certificate"):
        check_tls_client(client, agent, None)


def test_self_signed_tls_client_auth_matches_a_registered_jwk(pki: Pki) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64u_encode(key.public_key().public_bytes_raw())}
    pki.registry.update_agent("alpha", actor="t", jwks=[jwk])
    client, _ = pki.registry.create_client(
        "alpha", auth_method=ClientAuthMethod.SELF_SIGNED_TLS_CLIENT_AUTH, actor="t"
    )
    agent = pki.cache.agent("alpha")
    check_self_signed_client(client, agent, self_signed_der(key))
    with pytest.raises(ClientAuthError, match=r"^client authentication failed$") as info:
        check_self_signed_client(
            client, agent, self_signed_der(ed25519.Ed25519PrivateKey.generate())
        )
    assert "not registered" in info.value.details["detail"]  # logged, not answered
    with pytest.raises(ClientAuthError, match="Ed25519 or P-256"):
        check_self_signed_client(
            client, agent, self_signed_der(ec.generate_private_key(ec.SECP384R1()))
        )


async def test_self_signed_client_gets_a_token_bound_to_its_certificate_through_a_proxy(
    pki: Pki,
) -> None:
    from urllib.parse import quote

    key = ec.generate_private_key(ec.SECP256R1())
    nums = key.public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64u_encode(nums.x.to_bytes(32, "big")),
        "y": b64u_encode(nums.y.to_bytes(32, "big")),
    }
    pki.registry.update_agent("alpha", actor="t", jwks=[jwk])
    client, _ = pki.registry.create_client(
        "alpha", auth_method=ClientAuthMethod.SELF_SIGNED_TLS_CLIENT_AUTH, actor="t"
    )
    der = self_signed_der(key)
    cert_pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()
    cp = control_plane(pki, name="bind-ss", trusted_proxies=["10.0.0.7"], mode="nginx")
    transport = httpx.ASGITransport(app=cp.app, client=("10.0.0.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="https://aegis.example.org") as http:
        response = await http.post(
            "/oauth/token",
            data={"grant_type": "client_credentials", "client_id": client.client_id},
            headers={"x-ssl-client-cert": quote(cert_pem, safe="")},
        )
        assert response.status_code == 200, response.text
        token = cp.verifier.verify(response.json()["access_token"])
        assert token.cnf == {"x5t#S256": x5t_s256(der)}
        # The same request from an untrusted address carries no certificate: refused.
        transport = httpx.ASGITransport(app=cp.app, client=("10.0.0.9", 40000))
        async with httpx.AsyncClient(
            transport=transport, base_url="https://aegis.example.org"
        ) as other:
            refused = await other.post(
                "/oauth/token",
                data={"grant_type": "client_credentials", "client_id": client.client_id},
                headers={"x-ssl-client-cert": quote(cert_pem, safe="")},
            )
    assert refused.status_code in (400, 401)
    assert refused.json()["error"] in ("invalid_client", "invalid_request")

"""An agent's credentials at the token endpoint: the three kinds Aegis accepts.

* :class:`ClientSecret` — ``client_secret_basic`` (RFC 6749 §2.3.1) or ``client_secret_post``;
* :class:`PrivateKey` — ``private_key_jwt`` (RFC 7523 §2.2): a fresh, single-use client assertion
  signed with the agent's registered Ed25519 key for every token request. The same key signs DPoP
  proofs and the parent-agent grants this agent hands to others;
* :class:`Certificate` — ``tls_client_auth`` (RFC 8705 §2.1): the agent's X.509-SVID from the Aegis
  CA presented on the TLS connection; the request carries only ``client_id``;
* :class:`~aegis.sdk.renewing.RenewingCertificate` — the same, with a certificate that a
  ``CertificateManager`` renews at two thirds of its lifetime.

Each kind adds what it needs to one token request and nothing else (RFC 6749 §2.3: "The client
MUST NOT use more than one authentication method in each request").
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal
from urllib.parse import quote_plus

from cryptography.hazmat.primitives import serialization

from aegis.clock import new_id
from aegis.crypto.jws import encode_segment, sign_compact
from aegis.crypto.keys import Ed25519SigningKey
from aegis.pki.tls import client_context
from aegis.sdk.renewing import RenewingCertificate
from aegis.sdk.revocation import ServerRevocations, guard_server

__all__ = [
    "ASSERTION_LIFETIME",
    "JWT_BEARER",
    "Certificate",
    "ClientSecret",
    "Credential",
    "PrivateKey",
    "client_assertion",
]

JWT_BEARER: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Seconds a client assertion is valid; the server refuses long-lived ones.
ASSERTION_LIFETIME: Final = 60


def client_assertion(key: Ed25519SigningKey, client_id: str, audience: str, now: float) -> str:
    """RFC 7523 §3 as draft-ietf-oauth-rfc7523bis updates it: ``iss = sub = client_id``, ``aud``
    = the authorization server's issuer identifier (a string, nothing else), short ``exp``,
    fresh ``jti`` (the server spends it once)."""
    iat = int(now)
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": iat,
        "exp": iat + ASSERTION_LIFETIME,
        "jti": new_id(),
    }
    header = encode_segment({"alg": "EdDSA", "typ": "JWT", "kid": key.kid})
    return sign_compact(header, claims, key.sign)


@dataclass(frozen=True)
class ClientSecret:
    """A client id and secret, sent with HTTP Basic (default) or in the form body."""

    client_id: str
    secret: str = field(repr=False)
    method: Literal["basic", "post"] = "basic"

    def apply(self, form: dict[str, str], headers: dict[str, str], issuer: str, now: float) -> None:
        if self.method == "post":
            form["client_id"], form["client_secret"] = self.client_id, self.secret
            return
        # RFC 6749 §2.3.1: both parts form-urlencoded before they are joined and encoded.
        raw = f"{quote_plus(self.client_id)}:{quote_plus(self.secret)}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(raw).decode("ascii")

    def ssl_context(self) -> ssl.SSLContext | None:
        return None


@dataclass(frozen=True)
class PrivateKey:
    """``private_key_jwt`` with the agent's registered Ed25519 key."""

    client_id: str
    key: Ed25519SigningKey = field(repr=False)

    @classmethod
    def from_jwk(cls, client_id: str, jwk: dict[str, str]) -> PrivateKey:
        return cls(client_id, Ed25519SigningKey.from_jwk(jwk))

    def apply(self, form: dict[str, str], headers: dict[str, str], issuer: str, now: float) -> None:
        form["client_assertion_type"] = JWT_BEARER
        form["client_assertion"] = client_assertion(self.key, self.client_id, issuer, now)

    def assertion(self, issuer: str, now: float) -> str:
        """An assertion on its own (the ``actor_token`` of a token exchange), for the
        authorization server ``issuer`` names."""
        return client_assertion(self.key, self.client_id, issuer, now)

    def ssl_context(self) -> ssl.SSLContext | None:
        return None


@dataclass(frozen=True)
class Certificate:
    """``tls_client_auth``: the agent's certificate chain and key (PEM files) and the Aegis CA
    bundle that is the only trust anchor for the servers it talks to."""

    client_id: str
    cert_file: Path
    key_file: Path
    ca_file: Path
    #: Passphrase of an encrypted key file, if any.
    key_password: bytes | None = field(default=None, repr=False)
    #: The SPIFFE IDs of the servers this agent talks to (the control plane, the gateway): a
    #: server whose certificate names another is refused in the handshake, before a token or a
    #: proof is sent. Empty, any server certificate the Aegis CA issued is taken for them (an
    #: agent registered as serving, in any tenant, could pose as the gateway): set it.
    servers: tuple[str, ...] = ()
    #: Refuse a server certificate the Aegis CA revoked (:class:`~aegis.sdk.ServerRevocations`,
    #: kept current by its owner); None, a revoked server certificate is taken until it expires.
    revocations: ServerRevocations | None = None

    def apply(self, form: dict[str, str], headers: dict[str, str], issuer: str, now: float) -> None:
        form["client_id"] = self.client_id  # RFC 8705 §2: the certificate authenticates it

    def ssl_context(self) -> ssl.SSLContext:
        """A hardened client context (TLS 1.2+, AEAD suites) presenting the agent's chain and
        trusting only the Aegis bundle. Server identity is the Aegis CA, not a DNS name."""
        key = serialization.load_pem_private_key(
            Path(self.key_file).read_bytes(), password=self.key_password
        )
        ctx = client_context(
            Path(self.cert_file).read_bytes(),
            key,  # type: ignore[arg-type]
            Path(self.ca_file).read_bytes(),
        )
        return guard_server(ctx, self.servers, self.revocations)


Credential = ClientSecret | PrivateKey | Certificate | RenewingCertificate

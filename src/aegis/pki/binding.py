"""Mutual-TLS client authentication and certificate-bound access tokens (RFC 8705 §2, §3).

* ``tls_client_auth`` (§2.1): the client's certificate chains to the Aegis CA (checked by
  :class:`~aegis.pki.peer.PeerValidator`) and its one URI SAN equals the ``tls_client_auth_san_uri``
  registered for the client (``Client.tls_san_uri``) — "the expected subject ... MUST match".
* ``self_signed_tls_client_auth`` (§2.2): the certificate is not chain-validated; its public key
  must equal one of the agent's registered JWKs (compared by RFC 7638 thumbprint).
* Binding (§3): the token carries ``cnf.x5t#S256`` and "the protected resource MUST ... verify
  that the certificate matches the certificate-bound access token" — :func:`check_certificate_binding`.
"""

from __future__ import annotations

import hmac
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from aegis.crypto.keys import b64u_encode, jwk_thumbprint
from aegis.errors import ClientAuthError, TokenError
from aegis.pki.peer import PeerIdentity
from aegis.pki.profile import x5t_s256
from aegis.telemetry.metrics import MTLS_REJECTIONS
from aegis.tokens.claims import AccessToken
from aegis.types import Agent, Client, ClientAuthMethod

__all__ = [
    "BINDING_LISTENER",
    "X5T_S256",
    "certificate_to_bind",
    "check_certificate_binding",
    "check_peer_is_subject",
    "check_self_signed_client",
    "check_tls_client",
]

X5T_S256: Final = "x5t#S256"
#: The ``listener`` label under which binding failures are counted in ``aegis_mtls_rejections_total``
#: (code ``cert_token_mismatch``); on the wire they are ``invalid_token`` (RFC 6750 §3.1).
BINDING_LISTENER: Final = "token_binding"


def _mismatch(message: str) -> TokenError:
    MTLS_REJECTIONS.labels(listener=BINDING_LISTENER, code="cert_token_mismatch").inc()
    return TokenError(message, code="invalid_token", reason="cert_token_mismatch")


def check_certificate_binding(token: AccessToken, peer: PeerIdentity | None) -> None:
    """Raise ``TokenError(code="invalid_token")`` unless ``token`` is bound to ``peer``'s certificate
    and that certificate names the token's agent, tenant and environment."""
    bound = (token.cnf or {}).get(X5T_S256)
    if not isinstance(bound, str) or not bound:
        raise _mismatch("token is not bound to a client certificate (no cnf.x5t#S256)")
    if peer is None:
        raise _mismatch("token is certificate-bound but the connection has no client certificate")
    if not hmac.compare_digest(bound.encode("ascii", "replace"), peer.x5t_s256.encode("ascii")):
        raise _mismatch("token is bound to a different client certificate")
    if (peer.agent_id, peer.tenant, peer.env) != (token.agent_id, token.tenant, token.env):
        raise _mismatch(
            "the client certificate names another agent, tenant or environment than the token"
        )


def check_peer_is_subject(token: AccessToken, peer: PeerIdentity) -> None:
    """On a route that requires a client certificate, the certificate must name the agent,
    tenant and environment of the token, bound to it or not: any valid certificate of another
    agent (or tenant) beside a stolen unbound token would otherwise pass."""
    if (peer.agent_id, peer.tenant, peer.env) != (token.agent_id, token.tenant, token.env):
        raise _mismatch(
            "the client certificate names another agent, tenant or environment than the token"
        )


def unproven_client(detail: str) -> ClientAuthError:
    """A refusal of a caller that has not proved it holds the client's credential: the wire
    says only ``client authentication failed``, as for a client that does not exist, so that
    nobody learns which client ids exist and how each authenticates; ``detail`` is logged."""
    return ClientAuthError("client authentication failed", detail=detail)


def check_tls_client(client: Client, agent: Agent, peer: PeerIdentity | None) -> None:
    """RFC 8705 §2.1.2 with ``tls_client_auth_san_uri``: exact match of the one URI SAN."""
    if client.auth_method is not ClientAuthMethod.TLS_CLIENT_AUTH:
        raise unproven_client(f"client is registered for {client.auth_method.value}")
    if peer is None:
        raise ClientAuthError("tls_client_auth needs a client certificate from the aegis ca")
    if not client.tls_san_uri or client.tls_san_uri != peer.spiffe_id:
        raise ClientAuthError(
            "client certificate uri san is not the one registered for this client"
        )
    if peer.agent_id != agent.id:
        raise ClientAuthError("client certificate names another agent than this client's")


def _cert_jwk(der: bytes) -> dict[str, str]:
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise ClientAuthError("client certificate cannot be parsed") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes_raw()
        return {"kty": "OKP", "crv": "Ed25519", "x": b64u_encode(raw)}
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        nums = key.public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": b64u_encode(nums.x.to_bytes(32, "big")),
            "y": b64u_encode(nums.y.to_bytes(32, "big")),
        }
    raise ClientAuthError("self-signed client certificates must use an Ed25519 or P-256 key")


def check_self_signed_client(client: Client, agent: Agent, der: bytes | None) -> None:
    """RFC 8705 §2.2: the certificate's public key is one the agent registered."""
    if client.auth_method is not ClientAuthMethod.SELF_SIGNED_TLS_CLIENT_AUTH:
        raise unproven_client(f"client is registered for {client.auth_method.value}")
    if der is None:
        raise ClientAuthError("self_signed_tls_client_auth needs a client certificate")
    presented = jwk_thumbprint(_cert_jwk(der))
    registered = {jwk_thumbprint(j) for j in agent.jwks if j.get("kty") in ("OKP", "EC")}
    if presented not in registered:
        raise unproven_client("client certificate key is not registered for this agent")


def certificate_to_bind(
    client: Client, method: ClientAuthMethod, peer: PeerIdentity | None, der: bytes | None
) -> str | None:
    """The ``x5t#S256`` to put in a new token's ``cnf``, or None for an unbound token.

    A token is bound to a certificate the CA validated for the client's own agent, or, with
    ``self_signed_tls_client_auth``, to the certificate whose key just authenticated the client.
    A valid certificate of another agent is refused rather than silently ignored.
    """
    if der is None:
        return None
    if method is ClientAuthMethod.SELF_SIGNED_TLS_CLIENT_AUTH:
        return x5t_s256(der)
    if peer is None:
        return None  # an unvalidated certificate binds nothing
    if peer.agent_id != client.agent_id:
        raise ClientAuthError("the client certificate names another agent than this client's")
    return peer.x5t_s256

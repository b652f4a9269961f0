"""What an agent does on the wire: sign DPoP proofs (Ed25519 or ES256) for tests."""

from __future__ import annotations

import json
import time
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from aegis.clock import new_id
from aegis.crypto.jws import encode_segment, sign_compact
from aegis.crypto.keys import Ed25519SigningKey, b64u_encode, jwk_thumbprint
from aegis.tokens.dpop import access_token_hash


class P256Key:
    """An ES256 signer with a public JWK, like Ed25519SigningKey's surface."""

    def __init__(self) -> None:
        self._sk = ec.generate_private_key(ec.SECP256R1())
        nums = self._sk.public_key().public_numbers()
        self.jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": b64u_encode(nums.x.to_bytes(32, "big")),
            "y": b64u_encode(nums.y.to_bytes(32, "big")),
        }

    def sign(self, message: bytes) -> bytes:
        r, s = decode_dss_signature(self._sk.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


Key = Ed25519SigningKey | P256Key


def public_jwk(key: Key) -> dict[str, Any]:
    return key.jwk if isinstance(key, P256Key) else key.public.to_jwk()


def jkt_of(key: Key) -> str:
    return jwk_thumbprint(public_jwk(key))


def mint_proof(
    key: Key,
    method: str,
    url: str,
    *,
    token: str | None = None,
    iat: float | None = None,
    jti: str | None = None,
    header: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    **claims: Any,
) -> str:
    """A DPoP proof; ``header`` overrides header members, ``claims`` payload members (None drops)."""
    alg = "ES256" if isinstance(key, P256Key) else "EdDSA"
    head: dict[str, Any] = {"typ": "dpop+jwt", "alg": alg, "jwk": public_jwk(key)}
    head.update(header or {})
    body: dict[str, Any] = {
        "jti": new_id() if jti is None else jti,
        "htm": method,
        "htu": url,
        "iat": int(time.time()) if iat is None else iat,
    }
    if token is not None:
        body["ath"] = access_token_hash(token)
    body.update(claims)
    for name in drop:
        body.pop(name, None)
        head.pop(name, None)
    return sign_compact(encode_segment(head), body, key.sign)


def door_status(resp: Any) -> int:
    """The status a client gets from an ext_authz HTTP door's answer (an ``httpx.Response``):
    the door's own, or in nginx mode the one the documented error_page answers with
    (``X-Aegis-Status``: ``auth_request`` passes only 401 and 403 on, so the door answers 403
    for any other, with the JSON body in ``X-Aegis-Error`` too)."""
    real = resp.headers.get("x-aegis-status")
    if real is None:
        return int(resp.status_code)
    assert resp.status_code == (int(real) if real in ("401", "403") else 403)
    assert json.loads(resp.headers["x-aegis-error"]) == resp.json()
    return int(real)

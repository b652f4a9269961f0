"""DPoP proofs, RFC 9449 §4.2, signed by the agent: a fresh one for every request.

The gateway (``aegis.tokens.dpop``) checks ``typ dpop+jwt``, ``alg``, the public ``jwk`` header,
``htm``, ``htu`` (without query and fragment), ``iat`` within a minute, a ``jti`` it has never seen,
``ath`` = base64url(SHA-256(access token)) and that the key's thumbprint is the token's ``cnf.jkt``.
So a proof is never reused, not even for a retry of the same call: every send signs a new one.

The header is the same for every proof of one key and is encoded once; ``ath`` and the JSON form of
``htu`` are remembered for the last token and URL. What is left per request is one small JSON
payload, assembled directly, and one Ed25519 signature.
"""

from __future__ import annotations

import json
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from aegis.clock import Clock, SystemClock, new_id
from aegis.crypto.jws import encode_segment
from aegis.crypto.keys import Ed25519SigningKey, b64u_encode, jwk_thumbprint
from aegis.tokens.dpop import DPOP_TYP, access_token_hash

__all__ = ["DPOP_ALG", "DpopSigner", "htu_of"]

DPOP_ALG: Final = "EdDSA"


def htu_of(url: str) -> str:
    """RFC 9449 §4.2 ``htu``: "The HTTP target URI ... without query and fragment parts", and
    without userinfo (RFC 9110 §4.2.4: a sender must not generate it in a target URI; it would
    carry a password in every proof)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path or "/", "", ""))


class DpopSigner:
    """Signs proofs with one Ed25519 key; ``jkt`` is the key's RFC 7638 thumbprint."""

    __slots__ = ("_ath", "_clock", "_header", "_htu", "_key", "jkt")

    def __init__(self, key: Ed25519SigningKey, *, clock: Clock | None = None) -> None:
        self._key = key
        self._clock = clock or SystemClock()
        jwk = key.public.to_jwk()
        self.jkt = jwk_thumbprint(jwk)
        self._header = encode_segment({"typ": DPOP_TYP, "alg": DPOP_ALG, "jwk": jwk})
        self._ath: tuple[str, str] = ("", "")
        self._htu: tuple[str, str] = ("", "")

    def proof(
        self, method: str, url: str, *, access_token: str | None = None, nonce: str | None = None
    ) -> str:
        """A new proof for one request (``access_token`` adds ``ath``; ``nonce`` a server nonce)."""
        last_url, htu_json = self._htu
        if last_url != url:
            htu_json = json.dumps(htu_of(url), ensure_ascii=False)
            self._htu = (url, htu_json)
        htm = method.upper()
        # The payload is assembled from parts that need no JSON escaping (a base64url jti and
        # ath, an integer iat, an alphabetic method) and parts escaped by json (htu, nonce).
        htm_json = f'"{htm}"' if htm.isascii() and htm.isalpha() else json.dumps(htm)
        payload = (
            f'{{"jti":"{new_id()}","htm":{htm_json},"htu":{htu_json},"iat":{int(self._clock.now())}'
        )
        if access_token is not None:
            last_token, ath = self._ath
            if last_token != access_token:
                ath = access_token_hash(access_token)
                self._ath = (access_token, ath)
            payload += f',"ath":"{ath}"'
        if nonce is not None:
            payload += f',"nonce":{json.dumps(nonce)}'
        signing_input = f"{self._header}.{b64u_encode((payload + '}').encode('utf-8'))}"
        signature = self._key.sign(signing_input.encode("ascii"))
        return f"{signing_input}.{b64u_encode(signature)}"

"""DPoP proofs, RFC 9449: proof verification, ``ath`` and ``htu`` rules, and server nonces.

A proof is checked in the order of RFC 9449 §4.3 and every check raises
``TokenError(code="invalid_dpop_proof")`` (or ``use_dpop_nonce``); nothing here returns a bool.
:meth:`DpopVerifier.verify` never touches the replay store, so a proof that fails validation never
spends its ``jti``; :meth:`DpopVerifier.consume` records it once everything else has passed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from aegis.clock import Clock
from aegis.crypto.jws import (
    KEY_CARRYING_HEADERS,
    parse_compact,
    parse_with_header,
    split_compact,
)
from aegis.crypto.keys import (
    PublicKey,
    b64u_decode,
    b64u_encode,
    jwk_thumbprint,
    public_key_from_jwk,
)
from aegis.errors import AegisError, InvalidRequest, TokenError
from aegis.stores.base import ReplayStore
from aegis.telemetry.metrics import REPLAY_ATTEMPTS

__all__ = [
    "DEFAULT_FUTURE_SKEW",
    "DEFAULT_IAT_WINDOW",
    "DPOP_ALGS",
    "DPOP_TYP",
    "MAX_PROOF_BYTES",
    "REPLAY_MARGIN",
    "CheckedProof",
    "DpopProof",
    "DpopVerifier",
    "NonceSource",
    "access_token_hash",
    "normalize_htu",
    "token_endpoint_hook",
]

DPOP_TYP: Final = "dpop+jwt"
#: Asymmetric algorithms accepted for proofs (RFC 9449 §4.3 "acceptable per local policy").
DPOP_ALGS: Final = frozenset({"EdDSA", "Ed25519", "ES256"})
#: How far back a proof's ``iat`` may lie (seconds); RFC 9449 §11.1 leaves the window to servers.
DEFAULT_IAT_WINDOW: Final = 60.0
#: How far ahead a proof's ``iat`` may lie (client clock skew, seconds).
DEFAULT_FUTURE_SKEW: Final = 5.0
MAX_PROOF_BYTES: Final = 4096
#: Extra time a spent proof ``jti`` is remembered past the last moment any replica can accept the
#: proof (seconds), for replicas whose clocks differ; see :attr:`DpopProof.expires_at`.
REPLAY_MARGIN: Final = 5.0
#: Distinct proof keys remembered (parsed key and thumbprint); the cache is cleared when full.
MAX_CACHED_KEYS: Final = 4096
REPLAY_NAMESPACE: Final = "dpop"
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_PCT: Final = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)


def _bad(message: str) -> TokenError:
    return TokenError(f"dpop proof refused: {message}", code="invalid_dpop_proof")


@functools.lru_cache(maxsize=1024)
def access_token_hash(token: str) -> str:
    """RFC 9449 §4.2 ``ath``: "The value MUST be the result of a base64url encoding ... the SHA-256
    hash of the ASCII encoding of the associated access token's value"."""
    return b64u_encode(hashlib.sha256(token.encode("ascii")).digest())


def _pct_normal(m: re.Match[str]) -> str:
    # RFC 3986 §6.2.2.1 uppercase hex digits; §6.2.2.2 decode percent-encoded unreserved octets.
    octet = int(m.group(0)[1:], 16)
    return chr(octet) if octet in _UNRESERVED else m.group(0).upper()


@functools.lru_cache(maxsize=1024)
def normalize_htu(url: str) -> str:
    """RFC 3986 §6 syntax-based normalisation of an HTTP URI, without query and fragment.

    Scheme and host are lowercased, the scheme's default port is dropped, an empty path becomes
    ``/`` and percent-encodings are normalised. Anything that is not an absolute http(s) URI
    without userinfo raises ``ValueError``.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
        raise ValueError("not an absolute http(s) uri without userinfo")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port  # ValueError on a bad port
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path = _PCT.sub(_pct_normal, parts.path or "/")
    return f"{scheme}://{netloc}{path}"


class NonceSource:
    """Server nonces (RFC 9449 §8, §9) any replica can check: ``window || HMAC(key, window)``.

    A nonce is valid in the window it was made for and the one after, so it lives between
    ``lifetime`` and twice that. Replicas sharing ``key`` accept each other's nonces without state;
    one whose clock is up to ``skew`` seconds behind the replica that issued a nonce accepts it
    too when the issuer's window has already begun (its own is about to).
    """

    def __init__(
        self, key: bytes, clock: Clock, *, lifetime: float = 300.0, skew: float = 5.0
    ) -> None:
        if len(key) < 32:
            raise ValueError("a nonce key is at least 32 bytes")
        self._key, self._clock, self._lifetime, self._skew = key, clock, lifetime, skew

    def _mac(self, window: int) -> bytes:
        return hmac.new(self._key, struct.pack(">Q", window), hashlib.sha256).digest()[:16]

    def issue(self) -> str:
        window = int(self._clock.now() // self._lifetime)
        return b64u_encode(struct.pack(">Q", window) + self._mac(window))

    def check(self, nonce: Any) -> None:
        """Raise ``use_dpop_nonce`` unless ``nonce`` is one of ours and still fresh."""
        now = self._clock.now()
        current = int(now // self._lifetime)
        ahead = int((now + self._skew) // self._lifetime)  # current, or the next one near its start
        try:
            raw = b64u_decode(nonce) if isinstance(nonce, str) else b""
        except ValueError:
            raw = b""
        if len(raw) == 24:
            (window,) = struct.unpack(">Q", raw[:8])
            fresh = current - 1 <= window <= ahead
            if fresh and hmac.compare_digest(raw[8:], self._mac(window)):
                return
        raise TokenError(
            "a fresh server nonce is required in the dpop proof", code="use_dpop_nonce"
        )


@dataclass(frozen=True, slots=True)
class DpopProof:
    """A verified proof. ``expires_at`` is how long its ``jti`` stays in the replay store."""

    jkt: str
    jti: str
    iat: float
    htm: str
    htu: str
    expires_at: float


class DpopVerifier:
    """Checks proofs for one server; build once and share."""

    def __init__(
        self,
        replay: ReplayStore,
        *,
        clock: Clock,
        iat_window: float = DEFAULT_IAT_WINDOW,
        future_skew: float = DEFAULT_FUTURE_SKEW,
        algs: frozenset[str] = DPOP_ALGS,
        nonces: NonceSource | None = None,
    ) -> None:
        self._replay, self._clock = replay, clock
        self.iat_window, self.future_skew, self.algs = iat_window, future_skew, algs
        self.nonces = nonces
        self._keys: dict[tuple[tuple[str, str], ...], tuple[PublicKey, str]] = {}
        #: Header segments that passed :meth:`_judge`, by their exact text: the parsed header,
        #: its key and thumbprint. Bounded like ``_keys``; never handed to callers.
        self._judged: dict[str, tuple[dict[str, Any], PublicKey, str]] = {}

    def _proof_key(self, jwk: Any) -> tuple[PublicKey, str]:
        """The ``jwk`` header as a key and its RFC 7638 thumbprint. An agent signs every proof
        with the same key, so accepted keys are remembered by their exact members (bounded);
        a refused JWK is never remembered and is refused again on every proof."""
        members = (
            tuple(sorted(jwk.items()))
            if isinstance(jwk, dict) and all(type(v) is str for v in jwk.values())
            else None
        )
        found = self._keys.get(members) if members is not None else None
        if found is not None:
            return found
        try:
            key = public_key_from_jwk(jwk)
        except InvalidRequest as exc:
            raise _bad(f"jwk header: {exc.message}") from None
        found = (key, jwk_thumbprint(key.to_jwk()))
        if members is not None:
            if len(self._keys) >= MAX_CACHED_KEYS:
                self._keys.clear()
            self._keys[members] = found
        return found

    def _judge(self, header: dict[str, Any]) -> tuple[dict[str, Any], PublicKey, str]:
        """RFC 9449 §4.3 checks 3-6 on the header: a pure function of the header segment, so an
        agent's proofs (one key, one header) are judged once; a refused header is never stored
        and is refused again on every proof."""
        # "the typ JOSE Header Parameter has the value dpop+jwt" (exact: no application/ prefix)
        if header.get("typ") != DPOP_TYP:
            raise _bad("typ must be dpop+jwt")
        # "the alg JOSE Header Parameter indicates a registered asymmetric digital signature
        # algorithm ..., is not none, is supported by the application, and is acceptable per
        # local policy"
        if header["alg"] not in self.algs:
            raise _bad("alg is not one of " + " ".join(sorted(self.algs)))
        if KEY_CARRYING_HEADERS.intersection(header) - {"jwk"}:
            raise _bad("only the jwk header may carry the key")
        # "the jwk JOSE Header Parameter does not contain a private key"
        key, thumbprint = self._proof_key(header.get("jwk"))
        if header["alg"] not in key.algs:
            raise _bad("alg does not fit the jwk key type")
        return header, key, thumbprint

    def verify(
        self,
        proof: str,
        *,
        method: str,
        url: str,
        access_token: str | None = None,
        jkt: str | None = None,
    ) -> DpopProof:
        """RFC 9449 §4.3 checks 2-12 (the caller has already checked there is one header)."""
        # "the DPoP HTTP request header field value is a single and well-formed JWT"
        try:
            h, p, s = split_compact(proof, max_bytes=MAX_PROOF_BYTES)
            judged = self._judged.get(h)
            if judged is None:
                jws = parse_compact(proof, max_bytes=MAX_PROOF_BYTES)
            else:
                jws = parse_with_header(h, p, s, judged[0])
        except TokenError as exc:
            raise _bad(exc.message) from None
        if judged is None:
            judged = self._judge(jws.header)
            if len(self._judged) >= MAX_CACHED_KEYS:
                self._judged.clear()
            self._judged[h] = judged
        header, key, thumbprint = judged
        if header["alg"] not in self.algs:  # the allowlist is read on every proof
            raise _bad("alg is not one of " + " ".join(sorted(self.algs)))
        claims = jws.payload
        # "the JWT signature verifies with the public key contained in the jwk JOSE Header"
        try:
            key.verify(jws.signing_input, jws.signature)
        except TokenError:
            raise _bad("signature does not verify with the jwk header key") from None
        # "all required claims per Section 4.2 are contained in the JWT"
        jti, htm, htu, iat = (claims.get(k) for k in ("jti", "htm", "htu", "iat"))
        if not isinstance(jti, str) or not 0 < len(jti) <= 256:
            raise _bad("jti must be a non-empty string")
        if not isinstance(htm, str) or not isinstance(htu, str):
            raise _bad("htm and htu are required strings")
        if not isinstance(iat, int | float) or isinstance(iat, bool):
            raise _bad("iat is a required number")
        # "the htm claim matches the HTTP method of the current request"
        if htm != method.upper():
            raise _bad("htm does not match the request method")
        # "the htu claim matches the HTTP URI value for the HTTP request in which the JWT was
        # received, ignoring any query and fragment parts"
        try:
            same = normalize_htu(htu) == normalize_htu(url)
        except ValueError:
            same = False
        if not same:
            raise _bad("htu does not match the request uri")
        # "the creation time of the JWT ... is within an acceptable window (see Section 11.1)"
        now = self._clock.now()
        if iat < now - self.iat_window:
            raise _bad("iat is too old; sign a fresh proof")
        if iat > now + self.future_skew:
            raise _bad("iat is in the future; check the client clock")
        # "if the server provided a nonce value to the client, the nonce claim matches"
        if self.nonces is not None:
            self.nonces.check(claims.get("nonce"))
        if access_token is not None:
            # §4.3: "ensure that the value of the ath claim equals the hash of that access token"
            ath = claims.get("ath")
            if not isinstance(ath, str) or not hmac.compare_digest(
                ath.encode("ascii", "replace"), access_token_hash(access_token).encode("ascii")
            ):
                raise _bad("ath does not match the access token")
            # "... and confirm that the public key to which the access token is bound matches the
            # public key from the DPoP proof" (RFC 7638 thumbprint against cnf.jkt, §6.1)
            if jkt is None or not hmac.compare_digest(jkt.encode(), thumbprint.encode()):
                raise _bad("the proof key is not the key the access token is bound to")
        # The replay record must outlive acceptance on every replica that shares the store, not
        # only on this one. A replica whose clock lags this one by d seconds accepts the proof
        # until iat + iat_window + d on this clock, and a record kept only until iat + iat_window
        # would let it accept a replay for those d seconds. Replica clocks are trusted to agree
        # within the skew already allowed for clients (future_skew) plus REPLAY_MARGIN.
        keep_until = float(iat) + self.iat_window + self.future_skew + REPLAY_MARGIN
        return DpopProof(thumbprint, jti, float(iat), htm, htu, keep_until)

    async def consume(self, proof: DpopProof) -> None:
        """Spend the proof's ``jti`` (RFC 9449 §11.1); ``ReplayDetected`` on a second sighting,
        ``Unavailable`` when the store cannot answer."""
        await self._replay.consume(REPLAY_NAMESPACE, f"{proof.jkt}:{proof.jti}", proof.expires_at)


@dataclass(frozen=True, slots=True)
class CheckedProof:
    """A token endpoint proof that passed every check but its ``jti``'s: spent (:meth:`spend`)
    only once the whole request is valid, so that a request refused for something else leaves
    the proof unspent, as it leaves the client assertion."""

    proof: DpopProof
    verifier: DpopVerifier

    @property
    def jkt(self) -> str:
        return self.proof.jkt

    async def spend(self) -> None:
        """Record the ``jti``; a replay is ``invalid_dpop_proof`` (RFC 9449 §5), a replay store
        outage stays ``replay_store_unavailable`` (fail closed)."""
        try:
            await self.verifier.consume(self.proof)
        except AegisError as exc:
            if exc.code == "replay_detected":
                REPLAY_ATTEMPTS.inc()  # told apart from a malformed proof, as at the gateway
                raise _bad("this proof was already used; sign a new one") from None
            raise


def token_endpoint_hook(
    verifier: DpopVerifier, token_url: str
) -> Callable[[Any], Awaitable[CheckedProof | None]]:
    """The token endpoint's DPoP hook: the checked proof, or None when none was sent.

    At the token endpoint every proof failure is ``invalid_dpop_proof`` (RFC 9449 §5), answered
    400. The endpoint asks no server nonce (§8): a verifier that would is refused here.
    """
    if verifier.nonces is not None:
        raise ValueError("the token endpoint asks no DPoP nonces; give it a verifier without")

    async def hook(request: Any) -> CheckedProof | None:
        values = request.headers.getlist("dpop")
        if not values:
            return None
        # §4.3: "there is not more than one DPoP HTTP request header field"
        if len(values) != 1:
            raise _bad("send exactly one DPoP header")
        return CheckedProof(
            verifier.verify(values[0], method=request.method, url=token_url), verifier
        )

    return hook

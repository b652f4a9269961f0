"""Ed25519 and P-256 keys, JWK import/export (RFC 7517, RFC 8037) and thumbprints (RFC 7638).

Ed25519 signing and verification go through libsodium (PyNaCl): measured here it verifies about
twice as fast as OpenSSL and agrees with all Wycheproof Ed25519 cases. P-256 (ES256) is accepted only
for agent-held keys (client assertions, DPoP proofs) and goes through ``cryptography``.

Public keys are imported from JWKs strictly: the exact members for the key type, canonical
base64url, the right lengths, and never a private member where a public key is expected.
"""

from __future__ import annotations

import binascii
import hashlib
import json
from typing import Any, Protocol

import nacl.exceptions
import nacl.signing
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from nacl.bindings import crypto_sign_open as _crypto_sign_open

from aegis.errors import InvalidRequest, TokenError

__all__ = [
    "PRIVATE_JWK_MEMBERS",
    "Ed25519PublicKey",
    "Ed25519SigningKey",
    "P256PublicKey",
    "PublicKey",
    "b64u_decode",
    "b64u_encode",
    "jwk_thumbprint",
    "public_key_from_jwk",
]

#: Members that make a JWK private (RFC 7518 §6, RFC 8037 §2). A public JWK carrying any is refused.
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

_B64U_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64U_VALUE = {c: i for i, c in enumerate(_B64U_ALPHABET)}
_B64U_SWAP = bytes.maketrans(b"-_+/", b"+/-_")


def b64u_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2); binascii directly, as ``base64`` would through
    two more calls (every decision encodes its attestation's two segments)."""
    return binascii.b2a_base64(data, newline=False).translate(_B64U_SWAP).rstrip(b"=").decode()


def b64u_decode(text: str) -> bytes:
    """Strict base64url decoding: no padding, no other characters, canonical trailing bits.

    Raises ``ValueError``; callers translate it into their own typed error.
    """
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError as exc:
        raise ValueError("not canonical base64url") from exc
    rem = len(data) % 4
    if rem == 1 or b"=" in data:
        raise ValueError("not canonical base64url")
    if rem:
        # Two encodings of the same bytes (non-zero unused bits) would let a token be altered
        # without changing what it decodes to; accept only the canonical one.
        last = _B64U_VALUE.get(data[-1])
        if last is None or last & (0xF if rem == 2 else 0x3):
            raise ValueError("not canonical base64url")
        data += b"==" if rem == 2 else b"="
    try:
        # Swapping the alphabets both maps base64url onto standard base64 and turns any stray
        # '+' or '/' into characters that strict mode refuses.
        return binascii.a2b_base64(data.translate(_B64U_SWAP), strict_mode=True)
    except binascii.Error as exc:
        raise ValueError("not canonical base64url") from exc


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url) over the required members only."""
    kty = jwk.get("kty")
    if kty == "OKP":
        names: tuple[str, ...] = ("crv", "x")
    elif kty == "EC":
        names = ("crv", "x", "y")
    else:
        raise InvalidRequest(f"cannot compute a thumbprint for key type {kty!r}; use OKP or EC")
    members = {"kty": kty}
    for name in names:
        value = jwk.get(name)
        # RFC 7638 §3.2: the required members, each a string, or there is no thumbprint.
        if not isinstance(value, str):
            raise InvalidRequest(f"the JWK member {name!r} must be a string")
        members[name] = value
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return b64u_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


class PublicKey(Protocol):
    """A verification key. ``verify`` raises ``TokenError(code="invalid_signature")``."""

    kid: str
    #: The JWS ``alg`` values this key verifies.
    algs: frozenset[str]

    def verify(self, message: bytes, signature: bytes) -> None: ...

    def to_jwk(self) -> dict[str, Any]: ...


class Ed25519PublicKey:
    """An Ed25519 verification key (libsodium)."""

    __slots__ = ("_vk", "kid", "raw")

    algs = frozenset({"EdDSA", "Ed25519"})

    def __init__(self, raw: bytes, kid: str | None = None) -> None:
        if len(raw) != 32:
            raise InvalidRequest("an Ed25519 public key is 32 bytes")
        self.raw = raw
        self._vk = nacl.signing.VerifyKey(raw)
        self.kid = kid or jwk_thumbprint(self.to_jwk())

    def verify(self, message: bytes, signature: bytes) -> None:
        if len(signature) != 64:
            raise TokenError("the signature is not 64 bytes", code="invalid_signature")
        try:
            # VerifyKey.verify minus its encoder and type plumbing: the same libsodium call
            # (crypto_sign_open over signature || message) on bytes we have already checked.
            _crypto_sign_open(signature + message, self.raw)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as exc:
            raise TokenError("the signature does not verify", code="invalid_signature") from exc

    def to_jwk(self) -> dict[str, Any]:
        return {"kty": "OKP", "crv": "Ed25519", "x": b64u_encode(self.raw)}


class P256PublicKey:
    """A P-256 (ES256) verification key; signatures are raw ``r || s`` (RFC 7518 §3.4)."""

    __slots__ = ("_key", "kid", "x", "y")

    algs = frozenset({"ES256"})

    def __init__(self, x: bytes, y: bytes, kid: str | None = None) -> None:
        if len(x) != 32 or len(y) != 32:
            raise InvalidRequest("a P-256 public key has 32-byte x and y coordinates")
        try:
            nums = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            )
            self._key = nums.public_key()
        except ValueError as exc:
            raise InvalidRequest("the P-256 point is not on the curve") from exc
        self.x, self.y = x, y
        self.kid = kid or jwk_thumbprint(self.to_jwk())

    def verify(self, message: bytes, signature: bytes) -> None:
        if len(signature) != 64:
            raise TokenError("an ES256 signature is 64 bytes (r || s)", code="invalid_signature")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            self._key.verify(der, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise TokenError("the signature does not verify", code="invalid_signature") from exc

    def to_jwk(self) -> dict[str, Any]:
        return {"kty": "EC", "crv": "P-256", "x": b64u_encode(self.x), "y": b64u_encode(self.y)}


class Ed25519SigningKey:
    """An Ed25519 private key used to sign tokens, attestations and (in tests and the SDK) proofs."""

    __slots__ = ("_sk", "kid", "public")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise InvalidRequest("an Ed25519 private key seed is 32 bytes")
        self._sk = nacl.signing.SigningKey(seed)
        self.public = Ed25519PublicKey(bytes(self._sk.verify_key))
        self.kid = self.public.kid

    @classmethod
    def generate(cls) -> Ed25519SigningKey:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @classmethod
    def from_jwk(cls, jwk: dict[str, Any]) -> Ed25519SigningKey:
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or "d" not in jwk:
            raise InvalidRequest("expected a private Ed25519 JWK (kty OKP, crv Ed25519, d)")
        key = cls(_decode_member(jwk, "d"))
        if "x" in jwk and jwk["x"] != key.public.to_jwk()["x"]:
            raise InvalidRequest("the JWK's public member x does not match its private member d")
        return key

    def seed(self) -> bytes:
        """The 32-byte private seed. Handle with care: encrypt before storing."""
        return bytes(self._sk)

    def sign(self, message: bytes) -> bytes:
        return self._sk.sign(message).signature

    def private_jwk(self) -> dict[str, Any]:
        return {**self.public.to_jwk(), "d": b64u_encode(self.seed())}


def _decode_member(jwk: dict[str, Any], name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"the JWK member {name!r} must be a base64url string")
    try:
        return b64u_decode(value)
    except ValueError as exc:
        raise InvalidRequest(f"the JWK member {name!r} is not canonical base64url") from exc


def public_key_from_jwk(
    jwk: Any, *, allowed_kty: frozenset[str] = frozenset({"OKP", "EC"})
) -> PublicKey:
    """Import a public JWK strictly; raises ``InvalidRequest`` saying what is wrong."""
    if not isinstance(jwk, dict):
        raise InvalidRequest("a JWK must be a JSON object")
    private = PRIVATE_JWK_MEMBERS.intersection(jwk)
    if private:
        raise InvalidRequest(
            f"the JWK carries private members {sorted(private)}; register the public key only"
        )
    kty = jwk.get("kty")
    # Membership is tested only on strings: a list or object here must be refused, not raise
    # TypeError from the hash lookup.
    if not isinstance(kty, str) or kty not in allowed_kty:
        raise InvalidRequest(f"JWK kty {kty!r} is not allowed; use one of {sorted(allowed_kty)}")
    # RFC 7517 §4.2/§4.3: a key published for encryption, or whose key_ops do not include
    # "verify", must not verify signatures.
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise InvalidRequest("JWK use must be 'sig' for a verification key")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (
        not isinstance(key_ops, list)
        or not all(isinstance(op, str) for op in key_ops)
        or "verify" not in key_ops
    ):
        raise InvalidRequest("JWK key_ops must be a list of strings that includes 'verify'")
    if kty == "OKP":
        if jwk.get("crv") != "Ed25519":
            raise InvalidRequest("an OKP JWK must use crv Ed25519")
        key: PublicKey = Ed25519PublicKey(_decode_member(jwk, "x"))
    else:
        if jwk.get("crv") != "P-256":
            raise InvalidRequest("an EC JWK must use crv P-256")
        key = P256PublicKey(_decode_member(jwk, "x"), _decode_member(jwk, "y"))
    alg = jwk.get("alg")
    if alg is not None and (not isinstance(alg, str) or alg not in key.algs):
        raise InvalidRequest(f"JWK alg {alg!r} does not fit a {kty} key")
    return key

"""Client secrets and admin API keys: generated with 256 bits, stored only as a keyed hash.

A secret is shown once, at creation. What is stored is HMAC-SHA256 under the server's pepper
(``secrets.pepper``), so a stolen database alone cannot be used to check guesses offline; with
256-bit secrets a slow password hash adds nothing but latency. Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = ["SECRET_BYTES", "hash_secret", "new_secret", "secret_matches"]

#: Entropy of every generated secret (bytes).
SECRET_BYTES = 32


def new_secret(prefix: str) -> str:
    """A new secret like ``aegis_cs_<43 base64url chars>``; the prefix helps secret scanners."""
    return f"{prefix}{secrets.token_urlsafe(SECRET_BYTES)}"


def hash_secret(pepper: bytes, secret: str) -> str:
    return "hmac-sha256:" + hmac.new(pepper, secret.encode("utf-8"), hashlib.sha256).hexdigest()


def secret_matches(pepper: bytes, presented: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented secret with one stored hash."""
    return hmac.compare_digest(hash_secret(pepper, presented), stored_hash)

"""Time and randomness, injected.

This is the only module that reads the system clock. Everything else takes a :class:`Clock` so that
tests can freeze or move time and verification windows can be checked to the second.
"""

from __future__ import annotations

import secrets
import time
from typing import Protocol

__all__ = ["Clock", "FrozenClock", "SystemClock", "new_id", "random_bytes"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the Unix epoch (UTC)."""
        ...

    def monotonic(self) -> float:
        """A monotonic reading for measuring intervals."""
        ...


class SystemClock:
    """The real clock."""

    __slots__ = ()

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class FrozenClock:
    """A clock that moves only when told to (tests, vectors with fixed ``iat``)."""

    __slots__ = ("_t",)

    def __init__(self, t: float) -> None:
        self._t = float(t)

    def now(self) -> float:
        return self._t

    def monotonic(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        self._t += seconds

    def set(self, t: float) -> None:
        self._t = float(t)


def random_bytes(n: int) -> bytes:
    """Cryptographically secure random bytes."""
    return secrets.token_bytes(n)


def new_id(nbytes: int = 16) -> str:
    """A URL-safe random identifier with ``8 * nbytes`` bits of entropy (jti, decision ids)."""
    return secrets.token_urlsafe(nbytes)

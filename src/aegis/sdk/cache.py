"""Access tokens an agent holds, one per (audience, scope, tenant, delegation), refreshed early.

A token is used until ``expires_at - margin``, where the margin is
``min(refresh_margin, lifetime / 2)``: a call never leaves with a token that could expire on the
way, and a very short-lived token is still used for half its life. Times come from the injected
clock. The cache is bounded; it never holds refresh tokens (Aegis issues none) or secrets.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, Final

from aegis.clock import Clock

__all__ = ["DEFAULT_REFRESH_MARGIN", "CachedToken", "TokenCache", "TokenKey"]

#: Seconds before expiry at which a token is replaced.
DEFAULT_REFRESH_MARGIN: Final = 30.0
_MAX_ENTRIES: Final = 1024


@dataclass(frozen=True, slots=True)
class TokenKey:
    audience: str | None
    #: Space-separated, sorted; None asks for the client's default scopes.
    scope: str | None
    tenant: str | None
    #: Digest of the delegation chain the token acts under, None for the agent's own authority.
    delegation: str | None = None


@dataclass(frozen=True, slots=True)
class CachedToken:
    #: Kept out of the repr: a token printed in a debug line or a traceback is a live credential.
    access_token: str = field(repr=False)
    #: ``DPoP`` or ``Bearer`` (RFC 9449 §5).
    token_type: str
    issued_at: float
    expires_at: float
    scope: str
    #: The token's claims as issued (decoded without verification: the gateway verifies them).
    claims: dict[str, Any] = field(repr=False)

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.issued_at

    def fresh_at(self, now: float, margin: float) -> bool:
        return now < self.expires_at - min(margin, self.lifetime / 2)


class TokenCache:
    def __init__(self, clock: Clock, *, margin: float = DEFAULT_REFRESH_MARGIN) -> None:
        self._clock = clock
        self.margin = margin
        self._tokens: dict[TokenKey, CachedToken] = {}
        self._lock = threading.Lock()
        self._fetching: dict[TokenKey, threading.Lock] = {}
        self._afetching: dict[tuple[int, TokenKey], asyncio.Lock] = {}

    def fetch_lock(self, key: TokenKey) -> threading.Lock:
        """The lock one thread holds while it fetches the token for ``key``: a second caller
        waits and takes the token fetched, where fetching too would spend a single-use
        delegation grant twice (``grant_replayed``: the second call fails)."""
        with self._lock:
            if len(self._fetching) >= _MAX_ENTRIES:  # drop the idle ones (bounded memory)
                self._fetching = {k: v for k, v in self._fetching.items() if v.locked()}
            return self._fetching.setdefault(key, threading.Lock())

    def afetch_lock(self, key: TokenKey) -> asyncio.Lock:
        """:meth:`fetch_lock` for the running event loop's tasks."""
        slot = (id(asyncio.get_running_loop()), key)
        with self._lock:
            if len(self._afetching) >= _MAX_ENTRIES:
                self._afetching = {k: v for k, v in self._afetching.items() if v.locked()}
            return self._afetching.setdefault(slot, asyncio.Lock())

    def get(self, key: TokenKey) -> CachedToken | None:
        """The token for ``key`` if it is still fresh; a stale one is dropped."""
        with self._lock:
            token = self._tokens.get(key)
            if token is None:
                return None
            if token.fresh_at(self._clock.now(), self.margin):
                return token
            del self._tokens[key]
            return None

    def put(self, key: TokenKey, token: CachedToken) -> None:
        with self._lock:
            if len(self._tokens) >= _MAX_ENTRIES and key not in self._tokens:
                self._tokens.clear()
            self._tokens[key] = token

    def discard(self, key: TokenKey, access_token: str | None = None) -> None:
        """Forget ``key`` (only if it still holds ``access_token``, when given)."""
        with self._lock:
            held = self._tokens.get(key)
            if held is not None and (access_token is None or held.access_token == access_token):
                del self._tokens[key]

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()

    def keep_bound_to(self, x5t_s256: str) -> int:
        """Drop every token bound (``cnf.x5t#S256``) to another certificate than ``x5t_s256``
        (after a renewal); tokens bound otherwise (DPoP ``jkt``) stay. Returns how many went."""
        with self._lock:
            stale = [
                key
                for key, token in self._tokens.items()
                if isinstance(cnf := token.claims.get("cnf"), dict)
                and "x5t#S256" in cnf
                and cnf["x5t#S256"] != x5t_s256
            ]
            for key in stale:
                del self._tokens[key]
            return len(stale)

    def __len__(self) -> int:
        return len(self._tokens)

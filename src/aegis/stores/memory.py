"""In-process replay and revocation stores: the embedded default for one process.

They keep nothing across restarts and are not shared between processes; production replicas use
the Redis backends. Memory is bounded: expired entries are purged as new ones arrive (cheaply, in
expiry order), and a full store refuses new entries with ``Unavailable`` (fail closed) rather
than forgetting live ones or growing without bound.

Every method runs to completion without awaiting, so on one event loop each call is atomic; a
thread lock (never held across an ``await``) keeps it so when several threads, each with its own
event loop, share one store. Two concurrent ``consume`` calls of one jti never both pass.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections.abc import Sequence

from aegis.clock import Clock
from aegis.errors import ReplayDetected, TokenError, Unavailable
from aegis.stores.base import HoldLimit, check_time, replay_key

__all__ = ["DEFAULT_MAX_ENTRIES", "MARK_TTL", "MemoryReplayStore", "MemoryRevocationStore"]

#: Live entries one store holds at most (per kind: jtis and not-before marks count separately).
DEFAULT_MAX_ENTRIES = 1_000_000

#: A not-before mark is kept this long past its instant: longer than any token it could concern
#: lives (the hard 24 h lifetime cap), the same rule as the Redis store's.
MARK_TTL = 2 * 86400.0

#: Every entry is kept at least this long, so an expiry already in the past (clock skew, leeway)
#: never makes a jti reusable at once. Redis keys get the same one-second floor.
MIN_TTL = 1.0


class _ExpiringMap:
    """Keys with an expiry instant; expired keys read as absent and are purged in expiry order.

    A heap of ``(expiry, key)`` finds the next expiring entry in O(log n), so a purge costs only
    what it removes: a full store under a flood of new entries never rescans every live one.
    An entry whose expiry was later raised leaves a stale heap item behind; it is recognised (the
    map holds a different expiry) and dropped when it surfaces.
    """

    def __init__(self, clock: Clock, max_entries: int, code: str, what: str) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self._max = max_entries
        self._code = code
        self._what = what
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        #: What a key holds, for the keys put with a value.
        self._values: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def _purge(self, now: float) -> None:
        heap, expiry = self._heap, self._expiry
        while heap and heap[0][0] <= now:
            exp, key = heapq.heappop(heap)
            if expiry.get(key) == exp:
                del expiry[key]
                self._values.pop(key, None)
        if len(heap) > 2 * len(expiry) + 1024:  # too many stale items: rebuild, O(n) and rare
            self._heap = [(exp, key) for key, exp in expiry.items()]
            heapq.heapify(self._heap)

    def get(self, key: str) -> float | None:
        """The expiry of ``key`` if it is live, else None."""
        exp = self._expiry.get(key)
        if exp is None or exp <= self._clock.now():
            return None
        return exp

    def drop(self, key: str) -> None:
        """Forget ``key`` now (its heap item goes stale, and is dropped when it surfaces)."""
        self._expiry.pop(key, None)
        self._values.pop(key, None)

    def value(self, key: str) -> str | None:
        """What a live ``key`` holds (None: not live, or put without a value)."""
        return self._values.get(key) if self.get(key) is not None else None

    def put(
        self, key: str, expires_at: float, *, only_new: bool = False, value: str | None = None
    ) -> bool:
        """Keep ``key`` (holding ``value``) until at least ``expires_at`` (never shortening a
        live entry).

        With ``only_new``, a live ``key`` is left as it is and False returned. Raises
        ``Unavailable`` when the store is full of live entries: refusing is safe, forgetting is not.
        """
        now = self._clock.now()
        self._purge(now)
        current = self._expiry.get(key)
        if current is not None and only_new:
            return False
        if current is None and len(self._expiry) >= self._max:
            raise Unavailable(
                f"the in-memory {self._what} store is full; configure Redis for it",
                code=self._code,
            )
        exp = max(expires_at, now + MIN_TTL, current if current is not None else -math.inf)
        if exp != current:
            self._expiry[key] = exp
            heapq.heappush(self._heap, (exp, key))
        if value is not None:
            self._values[key] = value
        return True


class MemoryReplayStore:
    """Single-use identifiers of one process, each remembered until its expiry."""

    def __init__(self, clock: Clock, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._seen = _ExpiringMap(clock, max_entries, "replay_store_unavailable", "replay")
        self._claims = _ExpiringMap(clock, max_entries, "replay_store_unavailable", "replay")
        #: Per (namespace, owner), the keys held under a limit and their expiry (``claim``).
        self._holds: dict[tuple[str, str], dict[str, float]] = {}
        self._clock = clock
        self._lock = threading.Lock()

    async def consume(self, namespace: str, jti: str, expires_at: float) -> None:
        check_time(expires_at, "expires_at")
        with self._lock:
            fresh = self._seen.put(replay_key(namespace, jti), expires_at, only_new=True)
        if not fresh:
            raise ReplayDetected("this single-use proof was already used; create a fresh one")

    async def claim(
        self,
        namespace: str,
        key: str,
        owner: str,
        expires_at: float,
        *,
        held: bool = False,
        limit: int | None = None,
    ) -> bool:
        check_time(expires_at, "expires_at")
        entry = replay_key(namespace, key)
        with self._lock:
            holder = self._claims.value(entry)
            if holder != owner and (holder is not None or held):
                return False
            if limit is None:
                return self._claims.put(entry, expires_at, value=owner)
            holds = self._holds.setdefault((namespace, owner), {})
            if holder is None:  # a new hold: count the owner's live ones (an extension does not)
                now = self._clock.now()
                for gone in [k for k, exp in holds.items() if exp <= now]:
                    del holds[gone]
                if len(holds) >= limit:
                    raise HoldLimit(f"the owner holds {limit} keys of {namespace!r} already")
            self._claims.put(entry, expires_at, value=owner)
            holds[entry] = max(holds.get(entry, 0.0), expires_at)
            return True

    async def release(self, namespace: str, key: str, owner: str) -> None:
        entry = replay_key(namespace, key)
        with self._lock:
            if self._claims.value(entry) == owner:
                self._claims.drop(entry)
            self._holds.get((namespace, owner), {}).pop(entry, None)

    async def held_by(self, namespace: str, key: str) -> str | None:
        with self._lock:
            return self._claims.value(replay_key(namespace, key))

    async def close(self) -> None:
        return None


class MemoryRevocationStore:
    """Revoked jtis (until the token's expiry) and subject not-before marks (see MARK_TTL)."""

    remote = False

    def __init__(self, clock: Clock, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._clock = clock
        code = "revocation_store_unavailable"
        self._jtis = _ExpiringMap(clock, max_entries, code, "revocation")
        self._marks = _ExpiringMap(clock, max_entries, code, "revocation")
        #: The mark of each subject; its entry in ``_marks`` bounds how long it is kept.
        self._mark_at: dict[str, float] = {}
        self._lock = threading.Lock()

    async def revoke_jti(self, jti: str, expires_at: float) -> None:
        check_time(expires_at, "expires_at")
        with self._lock:
            self._jtis.put(jti, expires_at)

    async def set_not_before(self, subject: str, at: float) -> None:
        check_time(at, "at")
        with self._lock:
            self._set_mark(subject, at)

    def _set_mark(self, subject: str, at: float) -> None:
        live = self._marks.get(subject) is not None
        mark = max(at, self._mark_at[subject]) if live else at
        # Raises when full, before anything changed: a mark is never half set.
        self._marks.put(subject, max(mark, self._clock.now()) + MARK_TTL)
        self._mark_at[subject] = mark
        if len(self._mark_at) > 2 * len(self._marks) + 1024:  # drop marks that have lapsed
            self._mark_at = {
                s: m for s, m in self._mark_at.items() if self._marks.get(s) is not None
            }

    async def check(self, jti: str, subjects: Sequence[str], issued_at: float) -> None:
        check_time(issued_at, "issued_at")
        with self._lock:
            jti_revoked = self._jtis.get(jti) is not None
            marks = [self._mark_at[s] for s in subjects if self._marks.get(s) is not None]
        if jti_revoked:
            raise TokenError("token was revoked", code="token_revoked")
        if any(issued_at < mark for mark in marks):
            raise TokenError(
                "token was revoked with its subject's earlier tokens", code="token_revoked"
            )

    async def close(self) -> None:
        return None

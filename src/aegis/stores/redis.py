"""Redis replay and revocation stores, shared by every gateway and control-plane replica.

Replay uses ``SET key 1 NX PX ttl``: atomic across processes, so a proof accepted by one replica is
``replay_detected`` at every other. Every Redis error is translated here, at this one boundary, into
``Unavailable`` with the store's code: callers fail closed.

Recovery needs no action. After Redis restarts, pooled connections are dead but may not look it
(a reset socket reads as empty until it is used), so a command that fails with a connection error
is sent once more on a fresh connection, at once; a timeout is never retried, so the latency bound
holds. Every command here is safe to repeat: the revocation writes keep the larger value, and a
repeated ``SET NX`` whose first attempt did reach Redis answers "already used", a denial.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from aegis.clock import Clock
from aegis.errors import ReplayDetected, TokenError, Unavailable
from aegis.stores.base import HoldLimit, check_time, replay_key

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "MAX_CONNECTIONS",
    "RedisReplayStore",
    "RedisRevocationStore",
    "redis_client",
]

#: Lua: keep the larger of the stored and the new not-before mark, with a TTL.
_MAX_SET = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or tonumber(cur) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
return 1
"""

#: Lua: mark a jti revoked for at least ARGV[1] ms; a later, shorter revocation never shortens it.
_REVOKE = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl ~= -1 and ttl < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 1
"""


#: Connections one store keeps to Redis. A burst of requests waits (up to the timeout) for one of
#: these instead of opening a connection each: a hundred simultaneous connects from one event loop
#: miss a 0.25 s deadline and would turn a burst into spurious ``*_unavailable`` refusals.
MAX_CONNECTIONS = 16


#: Seconds to wait for a reply (and for a free pooled connection), and to connect. A store that
#: cannot answer within these is unavailable: the request is denied rather than held.
DEFAULT_TIMEOUT = 0.25
DEFAULT_CONNECT_TIMEOUT = 0.25


def redis_client(
    url: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> aioredis.Redis:
    """A client with a bounded pool. ``timeout`` bounds each reply and the wait for a free
    connection, ``connect_timeout`` each new connection. A connection error is retried once on
    a fresh connection (see the module docstring). Closing the client (``aclose``) closes its
    pool."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_connect_timeout=connect_timeout,
        socket_timeout=timeout,
        retry_on_timeout=False,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=0,
    )
    return aioredis.Redis.from_pool(pool)


def _key(*parts: str) -> bytes:
    """A Redis key from text that may hold lone surrogates (JSON can carry them in a jti).

    ``surrogatepass`` keeps every str distinct as bytes, as the memory stores keep it distinct as
    a str; the default codec would raise UnicodeEncodeError past the error translation.
    """
    return "".join(parts).encode("utf-8", "surrogatepass")


def _ttl_ms(expires_at: float, now: float) -> int:
    return max(1000, math.ceil((expires_at - now) * 1000))


class RedisReplayStore:
    def __init__(self, client: aioredis.Redis, *, clock: Clock, prefix: str = "aegis:") -> None:
        self._r = client
        self._clock = clock
        self._prefix = f"{prefix}replay:"
        #: Claims live apart from single-use ids: no namespace of one can reach a key of the other.
        self._claim_prefix = f"{prefix}claim:"
        #: Per (namespace, owner), a sorted set of the keys held under a limit, by expiry.
        self._holds_prefix = f"{prefix}holds:"

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        clock: Clock,
        prefix: str = "aegis:",
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> RedisReplayStore:
        client = redis_client(url, timeout=timeout, connect_timeout=connect_timeout)
        return cls(client, clock=clock, prefix=prefix)

    async def consume(self, namespace: str, jti: str, expires_at: float) -> None:
        check_time(expires_at, "expires_at")
        key = _key(self._prefix, replay_key(namespace, jti))
        try:
            fresh = await self._r.set(key, b"1", nx=True, px=_ttl_ms(expires_at, self._clock.now()))
        except (RedisError, OSError) as exc:
            raise Unavailable(
                "the replay store (redis) is unreachable", code="replay_store_unavailable"
            ) from exc
        if not fresh:
            raise ReplayDetected("this single-use proof was already used; create a fresh one")

    def _holds(self, namespace: str, owner: str) -> bytes:
        digest = hashlib.sha256(_key(namespace, "\n", owner)).hexdigest()
        return _key(self._holds_prefix, digest)

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
        name = _key(self._claim_prefix, replay_key(namespace, key))
        now = self._clock.now()
        try:
            answer = await self._r.eval(
                _CLAIM, 2, name, self._holds(namespace, owner), _key(owner),
                _ttl_ms(expires_at, now), "1" if held else "0", str(limit or 0),
                str(int(now * 1000)),
            )  # fmt: skip
        except (RedisError, OSError) as exc:
            raise Unavailable(
                "the replay store (redis) is unreachable", code="replay_store_unavailable"
            ) from exc
        if answer == -1:
            raise HoldLimit(f"the owner holds {limit} keys of {namespace!r} already")
        return bool(answer == 1)

    async def release(self, namespace: str, key: str, owner: str) -> None:
        name = _key(self._claim_prefix, replay_key(namespace, key))
        try:
            await self._r.eval(_RELEASE, 2, name, self._holds(namespace, owner), _key(owner))
        except (RedisError, OSError) as exc:
            raise Unavailable(
                "the replay store (redis) is unreachable", code="replay_store_unavailable"
            ) from exc

    async def held_by(self, namespace: str, key: str) -> str | None:
        name = _key(self._claim_prefix, replay_key(namespace, key))
        try:
            held = await self._r.get(name)
        except (RedisError, OSError) as exc:
            raise Unavailable(
                "the replay store (redis) is unreachable", code="replay_store_unavailable"
            ) from exc
        if held is None:
            return None
        return held.decode("utf-8", "surrogatepass") if isinstance(held, bytes) else held

    async def close(self) -> None:
        await self._r.aclose()


#: ``claim`` in one step: refuse while another owner holds the key (or, with ARGV[3] = "1",
#: while nobody does), else hold it for the owner and extend (never shorten) its time to live.
#: With a limit (ARGV[4] > 0), KEYS[2] holds the owner's keys by expiry (ms, ARGV[5] is now):
#: a new hold is refused (-1) while the owner holds that many live ones.
_CLAIM: Final = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
if not held and ARGV[3] == '1' then return 0 end
local ttl, limit, now = tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[5])
if limit > 0 and not held then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= limit then return -1 end
end
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
  if limit > 0 then
    redis.call('ZADD', KEYS[2], now + ttl, KEYS[1])
    if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
  end
end
return 1
"""
#: ``release``: drop the owner's hold of KEYS[1] (another owner's is left) and its place in
#: the owner's set KEYS[2].
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('ZREM', KEYS[2], KEYS[1])
return 1
"""


class RedisRevocationStore:
    #: Not-before marks outlive every token they could concern (the hard 24 h lifetime cap).
    MARK_TTL = 2 * 86400
    remote = True

    def __init__(self, client: aioredis.Redis, *, clock: Clock, prefix: str = "aegis:") -> None:
        self._r = client
        self._clock = clock
        self._jti = f"{prefix}revoked:"
        self._mark = f"{prefix}nbf:"
        self._max_set = self._r.register_script(_MAX_SET)
        self._revoke = self._r.register_script(_REVOKE)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        clock: Clock,
        prefix: str = "aegis:",
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> RedisRevocationStore:
        client = redis_client(url, timeout=timeout, connect_timeout=connect_timeout)
        return cls(client, clock=clock, prefix=prefix)

    def _down(self, exc: BaseException) -> Unavailable:
        return Unavailable(
            "the revocation store (redis) is unreachable", code="revocation_store_unavailable"
        )

    async def revoke_jti(self, jti: str, expires_at: float) -> None:
        check_time(expires_at, "expires_at")
        try:
            await self._revoke(
                keys=[_key(self._jti, jti)], args=[_ttl_ms(expires_at, self._clock.now())]
            )
        except (RedisError, OSError) as exc:
            raise self._down(exc) from exc

    async def set_not_before(self, subject: str, at: float) -> None:
        check_time(at, "at")
        try:
            # The mark outlives every token issued before it: those expire by at + 24 h.
            ttl = self.MARK_TTL + max(0, math.ceil(at - self._clock.now()))
            await self._max_set(keys=[_key(self._mark, subject)], args=[repr(at), ttl])
        except (RedisError, OSError) as exc:
            raise self._down(exc) from exc

    async def check(self, jti: str, subjects: Sequence[str], issued_at: float) -> None:
        check_time(issued_at, "issued_at")
        keys = [_key(self._jti, jti), *(_key(self._mark, s) for s in subjects)]
        try:
            values = await self._r.mget(keys)
        except (RedisError, OSError) as exc:
            raise self._down(exc) from exc
        if values[0] is not None:
            raise TokenError("token was revoked", code="token_revoked")
        for raw in values[1:]:
            if raw is not None and issued_at < float(raw):
                raise TokenError(
                    "token was revoked with its subject's earlier tokens", code="token_revoked"
                )

    async def close(self) -> None:
        await self._r.aclose()

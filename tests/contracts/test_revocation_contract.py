"""RevocationStore contract: every backend (memory, Redis) must pass each test here.

The not-before boundary: a token is revoked by a subject's mark when it was issued strictly before
the mark (``issued_at < mark``). A token issued at the very instant of the mark, or later, lives.
Setting the mark to "now" therefore kills every earlier token but not one issued in the same second
afterwards, which is what suspending and then re-activating an agent needs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio

from aegis.clock import FrozenClock
from aegis.errors import TokenError, Unavailable
from aegis.stores import RevocationStore, open_revocation_store
from aegis.stores.redis import RedisRevocationStore
from tests.contracts.conftest import Fast

DEAD_REDIS = "redis://127.0.0.1:1/0"


async def _revoked(store: RevocationStore, jti: str, subjects: list[str], iat: float) -> bool:
    try:
        await store.check(jti, subjects, iat)
    except TokenError as exc:
        code = exc.code
    else:
        return False
    assert code == "token_revoked"
    return True


async def test_nothing_is_revoked_at_first(revocation: RevocationStore, fast: Fast) -> None:
    assert not await _revoked(revocation, "t1", ["agent:a", "client:c"], fast.clock.now())
    assert not await _revoked(revocation, "t1", [], fast.clock.now())


async def test_a_revoked_jti_is_refused_until_it_expires(
    revocation: RevocationStore, fast: Fast
) -> None:
    now = fast.clock.now()
    await revocation.revoke_jti("t1", now + 1.0)
    assert await _revoked(revocation, "t1", ["agent:a"], now)
    assert await _revoked(revocation, "t1", [], now)
    assert not await _revoked(revocation, "t2", ["agent:a"], now)
    await fast.pass_time(0.5)
    assert await _revoked(revocation, "t1", [], now)
    await fast.pass_time(0.7)
    # The token itself has expired by now, so forgetting its jti loses nothing.
    assert not await _revoked(revocation, "t1", [], now)


async def test_revoking_again_never_shortens_the_revocation(
    revocation: RevocationStore, fast: Fast
) -> None:
    now = fast.clock.now()
    await revocation.revoke_jti("t1", now + 60)
    await revocation.revoke_jti("t1", now + 1.0)
    await fast.pass_time(1.2)
    assert await _revoked(revocation, "t1", [], now)


async def test_not_before_boundary(revocation: RevocationStore, fast: Fast) -> None:
    mark = fast.clock.now()
    await revocation.set_not_before("agent:a", mark)
    assert await _revoked(revocation, "t", ["agent:a"], mark - 1)
    assert await _revoked(revocation, "t", ["agent:a"], mark - 0.001)
    assert not await _revoked(revocation, "t", ["agent:a"], mark)
    assert not await _revoked(revocation, "t", ["agent:a"], mark + 0.001)
    # Other subjects are untouched; any one revoked subject among several is enough.
    assert not await _revoked(revocation, "t", ["agent:b"], mark - 1)
    assert await _revoked(revocation, "t", ["client:c", "agent:a"], mark - 1)


async def test_fractional_marks_are_kept_exactly(revocation: RevocationStore, fast: Fast) -> None:
    mark = fast.clock.now() + 0.123456789
    await revocation.set_not_before("client:c", mark)
    assert await _revoked(revocation, "t", ["client:c"], mark - 1e-6)
    assert not await _revoked(revocation, "t", ["client:c"], mark)


async def test_marks_keep_the_latest(revocation: RevocationStore, fast: Fast) -> None:
    now = fast.clock.now()
    await revocation.set_not_before("agent:a", now + 100)
    await revocation.set_not_before("agent:a", now + 10)  # an older mark arriving late
    assert await _revoked(revocation, "t", ["agent:a"], now + 50)
    await revocation.set_not_before("agent:a", now + 200)
    assert await _revoked(revocation, "t", ["agent:a"], now + 150)
    assert not await _revoked(revocation, "t", ["agent:a"], now + 200)


async def test_any_text_can_be_revoked(revocation: RevocationStore, fast: Fast) -> None:
    """Lone surrogates (what json.loads makes of "\ud800") are ids like any other."""
    now = fast.clock.now()
    await revocation.revoke_jti("\ud800", now + 60)
    await revocation.set_not_before("agent:\udc00", now)
    assert await _revoked(revocation, "\ud800", [], now)
    assert not await _revoked(revocation, "\udc00", [], now)
    assert await _revoked(revocation, "t", ["agent:\udc00"], now - 1)
    assert not await _revoked(revocation, "t", ["agent:\ud800"], now - 1)


async def test_subject_and_jti_keys_do_not_mix(revocation: RevocationStore, fast: Fast) -> None:
    now = fast.clock.now()
    await revocation.revoke_jti("agent:a", now + 60)
    assert not await _revoked(revocation, "t", ["agent:a"], now - 10)
    await revocation.set_not_before("t2", now)
    assert not await _revoked(revocation, "t2", [], now - 10)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
async def test_non_finite_times_are_refused(
    revocation: RevocationStore, fast: Fast, bad: float
) -> None:
    """NaN compares false with everything: a NaN ``issued_at`` would pass every mark."""
    now = fast.clock.now()
    await revocation.set_not_before("agent:a", now)
    await revocation.revoke_jti("t1", now + 60)
    calls: list[Callable[[], Awaitable[None]]] = [
        lambda: revocation.check("t2", ["agent:a"], bad),
        lambda: revocation.check("t1", [], bad),
        lambda: revocation.revoke_jti("t3", bad),
        lambda: revocation.set_not_before("agent:b", bad),
    ]
    for call in calls:
        with pytest.raises(TokenError) as info:
            await call()
        assert info.value.code == "invalid_claim"
    assert await _revoked(revocation, "t2", ["agent:a"], now - 1)
    assert not await _revoked(revocation, "t3", ["agent:b"], now - 1)


async def test_a_redis_mark_outlives_the_tokens_it_concerns(
    redis_url: str, redis_prefix: str, frozen_clock: FrozenClock
) -> None:
    """A mark is kept for the longest token lifetime past its own instant, even a future one."""
    store = RedisRevocationStore.from_url(redis_url, clock=frozen_clock, prefix=redis_prefix)
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        ahead = 5 * 86400
        await store.set_not_before("agent:a", frozen_clock.now() + ahead)
        await store.set_not_before("agent:b", frozen_clock.now() - 60)
        ttl_a = await raw.ttl(f"{redis_prefix}nbf:agent:a")
        ttl_b = await raw.ttl(f"{redis_prefix}nbf:agent:b")
    finally:
        await store.close()
        await raw.aclose()
    assert ttl_a >= ahead + RedisRevocationStore.MARK_TTL - 5
    assert RedisRevocationStore.MARK_TTL - 5 <= ttl_b <= RedisRevocationStore.MARK_TTL


@pytest.mark.parametrize("operation", ["revoke_jti", "set_not_before", "check"])
async def test_a_dead_redis_is_unavailable_quickly(
    frozen_clock: FrozenClock, operation: str
) -> None:
    store = open_revocation_store(DEAD_REDIS, clock=frozen_clock, prefix="aegis-test:")
    now = frozen_clock.now()
    calls = {
        "revoke_jti": lambda: store.revoke_jti("t", now + 60),
        "set_not_before": lambda: store.set_not_before("agent:a", now),
        "check": lambda: store.check("t", ["agent:a"], now),
    }
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await calls[operation]()
        elapsed = time.monotonic() - started
    finally:
        await store.close()
    assert info.value.code == "revocation_store_unavailable"
    assert elapsed < 1.0, f"took {elapsed:.2f}s to report the dead store"

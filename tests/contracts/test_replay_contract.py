"""ReplayStore contract: every backend (memory, Redis) must pass each test here."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from aegis.clock import FrozenClock
from aegis.errors import ReplayDetected, TokenError, Unavailable
from aegis.stores import ReplayStore, open_replay_store
from aegis.stores.base import HoldLimit
from aegis.stores.memory import MemoryReplayStore
from aegis.stores.redis import RedisReplayStore
from tests.contracts.conftest import PATIENT_TIMEOUT, Fast

DEAD_REDIS = "redis://127.0.0.1:1/0"


async def test_first_use_passes_second_is_a_replay(replay: ReplayStore, fast: Fast) -> None:
    exp = fast.clock.now() + 60
    await replay.consume("dpop", "jti-1", exp)
    with pytest.raises(ReplayDetected) as info:
        await replay.consume("dpop", "jti-1", exp)
    assert info.value.code == "replay_detected"
    # A third attempt is still a replay: refusing does not reset anything.
    with pytest.raises(ReplayDetected):
        await replay.consume("dpop", "jti-1", exp + 600)


async def test_different_jtis_are_independent(replay: ReplayStore, fast: Fast) -> None:
    exp = fast.clock.now() + 60
    # A lone surrogate is what json.loads makes of "\ud800"; it is still an identifier.
    for jti in ("a", "b", "A", "a ", "ä", "a\x00", "\ud800", "\udc00", "\ud800\udc00", "𐀀"):
        await replay.consume("dpop", jti, exp)


async def test_any_text_is_single_use(replay: ReplayStore, fast: Fast) -> None:
    for jti in ("\ud800", "x\udfffy", "\x00", "é" * 500):
        await replay.consume("dpop", jti, fast.clock.now() + 60)
        with pytest.raises(ReplayDetected):
            await replay.consume("dpop", jti, fast.clock.now() + 60)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("dpop", "x"), ("client_assertion", "x")),
        # Namespace and jti joined naively ("a" + ":" + "b:c" == "a:b" + ":" + "c") must not collide.
        (("a", "b:c"), ("a:b", "c")),
        (("a:", "b"), ("a", ":b")),
        (("a", "\x00b"), ("a\x00", "b")),
    ],
)
async def test_namespaces_are_independent(
    replay: ReplayStore, fast: Fast, first: tuple[str, str], second: tuple[str, str]
) -> None:
    exp = fast.clock.now() + 60
    await replay.consume(*first, exp)
    await replay.consume(*second, exp)
    with pytest.raises(ReplayDetected):
        await replay.consume(*first, exp)
    with pytest.raises(ReplayDetected):
        await replay.consume(*second, exp)


async def test_concurrent_consumes_of_one_jti_let_exactly_one_through(
    patient_replay: ReplayStore, fast: Fast
) -> None:
    exp = fast.clock.now() + 60
    results = await asyncio.gather(
        *(patient_replay.consume("dpop", "contended", exp) for _ in range(100)),
        return_exceptions=True,
    )
    others = [r for r in results if not isinstance(r, ReplayDetected | None)]
    assert others == []
    assert results.count(None) == 1


async def test_a_burst_of_distinct_consumes_all_pass(
    patient_replay: ReplayStore, fast: Fast
) -> None:
    """Three hundred requests at once, each with its own jti: all are recorded, none refused."""
    exp = fast.clock.now() + 60
    results = await asyncio.gather(
        *(patient_replay.consume("dpop", f"burst-{i}", exp) for i in range(300)),
        return_exceptions=True,
    )
    assert [r for r in results if r is not None] == []


async def test_two_redis_clients_share_one_spend(
    redis_url: str, redis_prefix: str, frozen_clock: FrozenClock
) -> None:
    """Two replicas (two clients, two connection pools) racing on one jti: one wins."""
    stores = [
        RedisReplayStore.from_url(
            redis_url,
            clock=frozen_clock,
            prefix=redis_prefix,
            timeout=PATIENT_TIMEOUT,
            connect_timeout=PATIENT_TIMEOUT,
        )
        for _ in "ab"
    ]
    try:
        exp = frozen_clock.now() + 60
        results = await asyncio.gather(
            *(stores[i % 2].consume("dpop", "contended", exp) for i in range(100)),
            return_exceptions=True,
        )
    finally:
        for store in stores:
            await store.close()
    others = [r for r in results if not isinstance(r, ReplayDetected | None)]
    assert others == []
    assert results.count(None) == 1


async def test_a_jti_is_remembered_until_it_expires(replay: ReplayStore, fast: Fast) -> None:
    exp = fast.clock.now() + 1.0
    await replay.consume("dpop", "short", exp)
    await fast.pass_time(0.5)
    with pytest.raises(ReplayDetected):
        await replay.consume("dpop", "short", exp)
    await fast.pass_time(0.7)
    # Past its expiry the jti may be forgotten: whatever carried it is expired too.
    await replay.consume("dpop", "short", fast.clock.now() + 60)
    with pytest.raises(ReplayDetected):
        await replay.consume("dpop", "short", fast.clock.now() + 60)


async def test_an_already_expired_jti_is_still_recorded_briefly(
    replay: ReplayStore, fast: Fast
) -> None:
    """An expiry in the past (clock skew, leeway) must not make the jti reusable at once."""
    await replay.consume("dpop", "stale", fast.clock.now() - 30)
    with pytest.raises(ReplayDetected):
        await replay.consume("dpop", "stale", fast.clock.now() + 60)


async def test_a_dead_redis_is_unavailable_quickly(frozen_clock: FrozenClock) -> None:
    store = open_replay_store(DEAD_REDIS, clock=frozen_clock, prefix="aegis-test:")
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await store.consume("dpop", "jti", frozen_clock.now() + 60)
        elapsed = time.monotonic() - started
    finally:
        await store.close()
    assert info.value.code == "replay_store_unavailable"
    assert info.value.status == 503
    assert elapsed < 1.0, f"took {elapsed:.2f}s to report the dead store"


async def test_a_full_memory_store_refuses_rather_than_forgets(frozen_clock: FrozenClock) -> None:
    store = MemoryReplayStore(frozen_clock, max_entries=3)
    for jti in "abc":
        await store.consume("dpop", jti, frozen_clock.now() + 60)
    with pytest.raises(Unavailable) as info:
        await store.consume("dpop", "d", frozen_clock.now() + 60)
    assert info.value.code == "replay_store_unavailable"
    with pytest.raises(ReplayDetected):
        await store.consume("dpop", "a", frozen_clock.now() + 60)
    frozen_clock.advance(61)
    await store.consume("dpop", "d", frozen_clock.now() + 60)


@pytest.mark.parametrize("expires_at", [math.nan, math.inf, -math.inf])
async def test_a_non_finite_expiry_is_refused(
    replay: ReplayStore, fast: Fast, expires_at: float
) -> None:
    """A NaN expiry compares false with everything; stored, it would never be "seen" again."""
    with pytest.raises(TokenError) as info:
        await replay.consume("dpop", "weird", expires_at)
    assert info.value.code == "invalid_claim"
    # Nothing was recorded, and nothing was let through twice.
    await replay.consume("dpop", "weird", fast.clock.now() + 60)
    with pytest.raises(ReplayDetected):
        await replay.consume("dpop", "weird", fast.clock.now() + 60)


async def test_a_redis_that_never_answers_is_unavailable_quickly(frozen_clock: FrozenClock) -> None:
    """A server that accepts connections and then hangs (stopped, overloaded) is an outage
    within the store's timeout, not a request that waits for ever."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1024):
            pass
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = open_replay_store(f"redis://127.0.0.1:{port}/0", clock=frozen_clock)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await store.consume("dpop", "jti", frozen_clock.now() + 60)
        elapsed = time.monotonic() - started
    finally:
        await store.close()
        server.close()
        await server.wait_closed()
    assert info.value.code == "replay_store_unavailable"
    assert elapsed < 1.0, f"took {elapsed:.2f}s to give up on a silent server"


# claim: a key held for one owner (an MCP session for the agent that opened it).


async def test_a_claim_is_held_for_its_owner_only(replay: ReplayStore, fast: Fast) -> None:
    exp = fast.clock.now() + 60
    assert await replay.claim("mcp-session", "s1", "acme/prod/alice", exp)
    assert await replay.claim("mcp-session", "s1", "acme/prod/alice", exp)  # its holder again
    assert not await replay.claim("mcp-session", "s1", "acme/prod/mallory", exp)
    assert not await replay.claim("mcp-session", "s1", "acme/prod/alice ", exp)
    # Refusing changed nothing: the holder still holds it.
    assert await replay.claim("mcp-session", "s1", "acme/prod/alice", exp)
    # Other keys, namespaces and single-use ids of the same name are apart.
    assert await replay.claim("mcp-session", "s2", "acme/prod/mallory", exp)
    assert await replay.claim("other", "s1", "acme/prod/mallory", exp)
    await replay.consume("mcp-session", "s1", exp)
    await replay.consume("claim", "mcp-session:s1", exp)


async def test_a_claim_that_only_extends_takes_no_key_nobody_holds(
    replay: ReplayStore, fast: Fast
) -> None:
    """``held=True`` extends its owner's hold and takes nothing: a key nobody holds stays free
    (an MCP session no initialize answer handed out is named by no one's hold)."""
    exp = fast.clock.now() + 1.0
    assert not await replay.claim("mcp-session", "s", "alice", exp, held=True)
    assert await replay.held_by("mcp-session", "s") is None
    assert await replay.claim("mcp-session", "s", "alice", exp)
    await fast.pass_time(0.6)
    assert await replay.claim("mcp-session", "s", "alice", fast.clock.now() + 1.0, held=True)
    assert not await replay.claim("mcp-session", "s", "mallory", fast.clock.now() + 1.0, held=True)
    await fast.pass_time(0.6)
    assert await replay.held_by("mcp-session", "s") == "alice"  # extended from the second claim
    await fast.pass_time(0.6)
    assert await replay.held_by("mcp-session", "s") is None
    assert not await replay.claim("mcp-session", "s", "alice", fast.clock.now() + 1.0, held=True)


async def test_an_owner_holds_at_most_its_limit_of_keys(replay: ReplayStore, fast: Fast) -> None:
    """With a limit, a new hold past it is refused (``HoldLimit``), changing nothing; extending a
    key held already, another owner's claims, a released key and a lapsed one are not held
    against it."""
    now = fast.clock.now
    ns = "mcp-session"
    assert await replay.claim(ns, "a", "alice", now() + 1.0, limit=2)
    assert await replay.claim(ns, "b", "alice", now() + 60, limit=2)
    with pytest.raises(HoldLimit):
        await replay.claim(ns, "c", "alice", now() + 60, limit=2)
    assert await replay.held_by(ns, "c") is None
    assert await replay.claim(ns, "b", "alice", now() + 60, limit=2)  # its own: extended
    assert await replay.claim(ns, "c", "bob", now() + 60, limit=2)  # another owner's count
    assert not await replay.claim(ns, "c", "alice", now() + 60, limit=2)  # bob's
    await replay.release(ns, "b", "alice")
    assert await replay.held_by(ns, "b") is None
    assert await replay.claim(ns, "d", "alice", now() + 60, limit=2)
    await replay.release(ns, "c", "alice")  # not alice's: left to bob
    assert await replay.held_by(ns, "c") == "bob"
    await fast.pass_time(1.2)  # "a" lapses, and with it its place
    assert await replay.claim(ns, "e", "alice", now() + 60, limit=2)
    with pytest.raises(HoldLimit):
        await replay.claim(ns, "f", "alice", now() + 60, limit=2)


async def test_a_claim_lasts_while_its_holder_uses_it(replay: ReplayStore, fast: Fast) -> None:
    assert await replay.claim("mcp-session", "s", "alice", fast.clock.now() + 1.0)
    await fast.pass_time(0.6)
    # Used again: held one second from now, not from the first claim.
    assert await replay.claim("mcp-session", "s", "alice", fast.clock.now() + 1.0)
    await fast.pass_time(0.6)
    assert not await replay.claim("mcp-session", "s", "mallory", fast.clock.now() + 1.0)
    # A claim with an earlier expiry never shortens it.
    assert await replay.claim("mcp-session", "s", "alice", fast.clock.now() - 30)
    assert not await replay.claim("mcp-session", "s", "mallory", fast.clock.now() + 1.0)
    await fast.pass_time(1.2)
    # Past its time unused, the key is free.
    assert await replay.claim("mcp-session", "s", "mallory", fast.clock.now() + 60)
    assert not await replay.claim("mcp-session", "s", "alice", fast.clock.now() + 60)


async def test_concurrent_claims_of_one_key_have_one_winner(
    redis_url: str, redis_prefix: str, frozen_clock: FrozenClock
) -> None:
    """Two replicas racing for one key with different owners: every answer names one owner."""
    stores = [
        RedisReplayStore.from_url(
            redis_url, clock=frozen_clock, prefix=redis_prefix,
            timeout=PATIENT_TIMEOUT, connect_timeout=PATIENT_TIMEOUT,
        )
        for _ in "ab"
    ]  # fmt: skip
    try:
        exp = frozen_clock.now() + 60
        owners = [f"owner-{i % 5}" for i in range(50)]
        won = await asyncio.gather(
            *(
                stores[i % 2].claim("mcp-session", "raced", owner, exp)
                for i, owner in enumerate(owners)
            )
        )
    finally:
        for store in stores:
            await store.close()
    assert len({owner for owner, ok in zip(owners, won, strict=True) if ok}) == 1


async def test_a_claim_on_a_dead_redis_is_unavailable(frozen_clock: FrozenClock) -> None:
    store = open_replay_store(DEAD_REDIS, clock=frozen_clock, prefix="aegis-test:")
    try:
        with pytest.raises(Unavailable) as info:
            await store.claim("mcp-session", "s", "alice", frozen_clock.now() + 60)
    finally:
        await store.close()
    assert info.value.code == "replay_store_unavailable"


async def test_a_full_memory_store_refuses_a_new_claim(frozen_clock: FrozenClock) -> None:
    store = MemoryReplayStore(frozen_clock, max_entries=2)
    for key in "ab":
        assert await store.claim("mcp-session", key, "alice", frozen_clock.now() + 60)
    with pytest.raises(Unavailable):
        await store.claim("mcp-session", "c", "alice", frozen_clock.now() + 60)
    assert await store.claim("mcp-session", "a", "alice", frozen_clock.now() + 60)  # still held


async def test_held_by_names_the_holder_and_changes_nothing(
    replay: ReplayStore, fast: Fast
) -> None:
    assert await replay.held_by("mcp-session", "h") is None
    assert await replay.held_by("mcp-session", "h") is None  # asking holds nothing
    assert await replay.claim("mcp-session", "h", "mallory", fast.clock.now() + 60)
    assert await replay.held_by("mcp-session", "h") == "mallory"
    odd = "acme\nprod\n\ud800a\x00"  # owners are compared exactly, whatever they hold
    assert await replay.claim("mcp-session", "o", odd, fast.clock.now() + 1.0)
    assert await replay.held_by("mcp-session", "o") == odd
    assert await replay.held_by("other", "o") is None
    await fast.pass_time(1.2)
    assert await replay.held_by("mcp-session", "o") is None


async def test_held_by_on_a_dead_redis_is_unavailable(frozen_clock: FrozenClock) -> None:
    store = open_replay_store(DEAD_REDIS, clock=frozen_clock, prefix="aegis-test:")
    try:
        with pytest.raises(Unavailable) as info:
            await store.held_by("mcp-session", "s")
    finally:
        await store.close()
    assert info.value.code == "replay_store_unavailable"

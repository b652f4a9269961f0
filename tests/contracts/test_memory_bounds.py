"""The in-memory stores stay bounded (they purge what expired and refuse, never forget, when
full) and stay single-use when several threads, each with its own event loop, share one."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import pytest

from aegis.clock import FrozenClock
from aegis.errors import ReplayDetected, TokenError, Unavailable
from aegis.stores.memory import MARK_TTL, MemoryReplayStore, MemoryRevocationStore


async def test_expired_entries_make_room_as_time_passes(frozen_clock: FrozenClock) -> None:
    """A steady stream of short-lived proofs never fills a small store."""
    store = MemoryReplayStore(frozen_clock, max_entries=10)
    for i in range(1000):
        await store.consume("dpop", f"jti-{i}", frozen_clock.now() + 1.0)
        frozen_clock.advance(0.5)
    # The latest proofs are still remembered.
    with pytest.raises(ReplayDetected):
        await store.consume("dpop", "jti-999", frozen_clock.now() + 1.0)


async def test_a_flood_against_a_full_store_is_refused_cheaply(frozen_clock: FrozenClock) -> None:
    """Refusing must not rescan every live entry: that would let a flood stall the event loop."""
    store = MemoryReplayStore(frozen_clock, max_entries=50_000)
    exp = frozen_clock.now() + 60
    started = time.monotonic()
    for i in range(50_000):
        await store.consume("dpop", f"live-{i}", exp)
    # What 50,000 constant-time inserts cost on this machine right now: the bound below grows
    # with it on a slow or loaded runner. A rescan per refusal costs thousands of times more.
    filled = time.monotonic() - started
    started = time.monotonic()
    codes = []
    for i in range(20_000):
        try:
            await store.consume("dpop", f"flood-{i}", exp)
        except Unavailable as exc:
            codes.append(exc.code)
    elapsed = time.monotonic() - started
    assert codes == ["replay_store_unavailable"] * 20_000
    assert elapsed < 1.0 + 5 * filled, (
        f"refusing 20,000 entries took {elapsed:.2f}s (filling 50,000 took {filled:.2f}s)"
    )


async def test_a_full_revocation_store_refuses_and_keeps_what_it_has(
    frozen_clock: FrozenClock,
) -> None:
    store = MemoryRevocationStore(frozen_clock, max_entries=2)
    now = frozen_clock.now()
    await store.revoke_jti("t1", now + 60)
    await store.revoke_jti("t2", now + 60)
    await store.set_not_before("agent:a", now)
    await store.set_not_before("agent:b", now)
    writes: list[Callable[[], Awaitable[None]]] = [
        lambda: store.revoke_jti("t3", now + 60),
        lambda: store.set_not_before("agent:c", now),
    ]
    for write in writes:
        with pytest.raises(Unavailable) as info:
            await write()
        assert info.value.code == "revocation_store_unavailable"
    # What is stored still counts, and raising an existing entry needs no room.
    await store.revoke_jti("t1", now + 120)
    await store.set_not_before("agent:a", now + 10)
    for jti, subjects, iat in (("t1", [], now), ("t2", [], now), ("x", ["agent:a"], now + 5)):
        with pytest.raises(TokenError) as revoked:
            await store.check(jti, subjects, iat)
        assert revoked.value.code == "token_revoked"
    await store.check("t3", ["agent:c"], now - 1)


async def test_not_before_marks_lapse_after_the_tokens_they_concern(
    frozen_clock: FrozenClock,
) -> None:
    """A mark is kept for MARK_TTL past its instant (tokens live at most 24 h), then makes room."""
    store = MemoryRevocationStore(frozen_clock, max_entries=1)
    mark = frozen_clock.now()
    await store.set_not_before("agent:a", mark)
    frozen_clock.advance(MARK_TTL - 1)
    with pytest.raises(TokenError):
        await store.check("t", ["agent:a"], mark - 1)
    with pytest.raises(Unavailable):
        await store.set_not_before("agent:b", frozen_clock.now())
    frozen_clock.advance(2)
    await store.set_not_before("agent:b", frozen_clock.now())
    with pytest.raises(TokenError):
        await store.check("t", ["agent:b"], frozen_clock.now() - 1)


def test_a_store_needs_room_for_one_entry(frozen_clock: FrozenClock) -> None:
    with pytest.raises(ValueError, match="max_entries"):
        MemoryReplayStore(frozen_clock, max_entries=0)


@pytest.fixture
def eager_thread_switching() -> Iterator[None]:
    """Switch threads as often as the interpreter can, to expose check-then-set races."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _spent(coro: Coroutine[Any, Any, None]) -> bool:
    """Run a memory-store call that never awaits; True if it passed, False if a replay."""
    try:
        coro.send(None)
    except StopIteration:
        return True
    except ReplayDetected:
        return False
    raise AssertionError("a memory store call awaited")


@pytest.mark.usefixtures("eager_thread_switching")
def test_threads_sharing_a_store_spend_each_jti_once(frozen_clock: FrozenClock) -> None:
    store = MemoryReplayStore(frozen_clock)
    n, threads = 50_000, 4
    won: list[int] = []  # list.append is atomic; a double spend shows as a duplicate
    barrier = threading.Barrier(threads)

    def spend_all() -> None:
        barrier.wait()
        for i in range(n):
            if _spent(store.consume("dpop", f"j{i}", frozen_clock.now() + 60)):
                won.append(i)

    workers = [threading.Thread(target=spend_all) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert sorted(won) == list(range(n))

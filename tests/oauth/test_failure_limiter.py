"""The failed-authentication limit cannot be lifted by flooding its table: requests that never
fail hold no entry, and a full table frees expired and under-limit counts, never a refusal."""

from __future__ import annotations

import pytest

from aegis.clock import FrozenClock
from aegis.errors import AegisError
from aegis.oauth.client_auth import FailureLimiter

LIMIT, WINDOW = 3, 600.0


def _limiter(clock: FrozenClock, max_keys: int = 10) -> FailureLimiter:
    return FailureLimiter(clock, limit=LIMIT, window=WINDOW, max_keys=max_keys)


def _refused(limiter: FailureLimiter, *keys: str) -> bool:
    try:
        limiter.check(*keys)
    except AegisError as exc:
        return exc.code == "rate_limited"
    return False


def _over_the_limit(limiter: FailureLimiter, *keys: str) -> None:
    for _ in range(LIMIT):
        limiter.record_failure(*keys)


def test_checks_that_never_fail_leave_the_counts_as_they_were() -> None:
    limiter = _limiter(FrozenClock(1000.0))
    _over_the_limit(limiter, "client:victim", "source:10.0.0.1")
    for i in range(1000):  # requests refused for another reason (invalid_request), never counted
        assert not _refused(limiter, f"client:junk-{i}", "source:10.0.0.2")
    assert _refused(limiter, "client:victim")
    assert _refused(limiter, "source:10.0.0.1")


def test_a_full_table_frees_old_and_under_limit_counts_never_a_refusal() -> None:
    clock = FrozenClock(1000.0)
    limiter = _limiter(clock)
    _over_the_limit(limiter, "client:victim")
    limiter.record_failure("client:stale")
    clock.advance(WINDOW)  # the stale failure leaves the window; the victim's count is renewed
    _over_the_limit(limiter, "client:victim")
    for i in range(100):  # one failure each: a flood of new keys
        limiter.record_failure(f"client:guess-{i}")
    assert _refused(limiter, "client:victim")
    assert not _refused(limiter, "client:stale")
    assert not _refused(limiter, "client:guess-0")


def test_when_every_count_refuses_a_new_key_goes_uncounted() -> None:
    limiter = _limiter(FrozenClock(1000.0), max_keys=3)
    _over_the_limit(limiter, "a", "b", "c")
    _over_the_limit(limiter, "d")
    assert not _refused(limiter, "d")
    assert all(_refused(limiter, key) for key in "abc")


@pytest.mark.parametrize("failures", [LIMIT - 1, LIMIT])
def test_the_limit_counts_failures_within_the_window(failures: int) -> None:
    clock = FrozenClock(1000.0)
    limiter = _limiter(clock)
    for _ in range(failures):
        limiter.record_failure("k")
    assert _refused(limiter, "k") == (failures >= LIMIT)
    clock.advance(WINDOW)
    assert not _refused(limiter, "k")

"""A spent DPoP ``jti`` outlives acceptance on every replica sharing the replay store.

Each replica judges ``iat`` on its own clock, so one that lags the replica that spent a proof
still accepts it after ``iat + iat_window`` on the spender's clock. The record must still be
there then, or the lagging replica takes the replay.
"""

from __future__ import annotations

import pytest

from aegis.clock import FrozenClock
from aegis.errors import ReplayDetected
from aegis.stores.memory import MemoryReplayStore
from aegis.tokens.dpop import DEFAULT_FUTURE_SKEW, DEFAULT_IAT_WINDOW, REPLAY_MARGIN, DpopVerifier
from tests.gateway.helpers import jkt_of, mint_proof
from tests.tokens.test_dpop import KEY, NOW, TOKEN, URL


class LaggingClock:
    """Another replica's clock: ``lag`` seconds behind ``base``."""

    def __init__(self, base: FrozenClock, lag: float) -> None:
        self._base, self._lag = base, lag

    def now(self) -> float:
        return self._base.now() - self._lag

    def monotonic(self) -> float:
        return self._base.monotonic()


@pytest.mark.parametrize("lag", [2.0, 4.0, DEFAULT_FUTURE_SKEW + REPLAY_MARGIN - 0.5])
async def test_replica_with_a_lagging_clock_refuses_a_replay_after_the_first_window(
    lag: float,
) -> None:
    clock = FrozenClock(NOW)
    shared = MemoryReplayStore(clock)  # one store, as Redis is for every replica
    first = DpopVerifier(shared, clock=clock)
    lagging = DpopVerifier(shared, clock=LaggingClock(clock, lag))
    proof = mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW)
    args = {"method": "POST", "url": URL, "access_token": TOKEN, "jkt": jkt_of(KEY)}

    clock.advance(DEFAULT_IAT_WINDOW - 2)  # the proof is 58 s old when first used
    await first.consume(first.verify(proof, **args))
    # Past the old record lifetime (iat + iat_window + 1) but still inside the lagging
    # replica's window: it accepts the proof, so only the record can stop the replay.
    clock.set(NOW + DEFAULT_IAT_WINDOW + lag - 0.5)
    assert clock.now() > NOW + DEFAULT_IAT_WINDOW + 1
    spent = lagging.verify(proof, **args)
    with pytest.raises(ReplayDetected):
        await lagging.consume(spent)


def test_record_lifetime_covers_the_window_the_future_skew_and_the_margin() -> None:
    clock = FrozenClock(NOW)
    verifier = DpopVerifier(MemoryReplayStore(clock), clock=clock, iat_window=30, future_skew=3)
    proof = mint_proof(KEY, "POST", URL, token=TOKEN, iat=NOW)
    got = verifier.verify(proof, method="POST", url=URL, access_token=TOKEN, jkt=jkt_of(KEY))
    assert got.expires_at == NOW + 30 + 3 + REPLAY_MARGIN

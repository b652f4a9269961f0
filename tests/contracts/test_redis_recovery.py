"""Redis stores fail closed while Redis is gone and work again, unaided, once it returns.

A relay on a local port stands between the store and the real Redis; stopping it cuts every
connection (as a Redis restart or a network partition would) and starting it again on the same
port brings "Redis" back. Nobody reconnects the store by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.connection import parse_url

from aegis.clock import FrozenClock
from aegis.errors import ReplayDetected, TokenError, Unavailable
from aegis.stores.redis import RedisReplayStore, RedisRevocationStore
from tests.contracts.conftest import PATIENT_TIMEOUT


class Relay:
    """A TCP relay from a local port to Redis that can be cut and restored."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._cut = False  # between stop() and start(): a connection that arrives is closed
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self._cut = False
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        self._cut = True
        # A connection the listener accepted just before close() becomes a transport, and then a
        # _serve task, a loop iteration or two later (and Python 3.11's wait_closed() does not
        # wait for that): let those arrive, so that they are cut too rather than relayed through
        # the "outage" or left open past the test.
        for _ in range(3):
            await asyncio.sleep(0)
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None
        await asyncio.sleep(0)  # an aborted socket is closed on the next loop iteration

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Known to stop() from the start: a cut while the upstream connection is still being made
        # must close this one too, or it stays open past the test.
        if self._cut:
            writer.transport.abort()
            return
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
            self._writers.add(up_writer)
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.transport.abort()


@pytest.fixture
async def relay(redis_url: str) -> AsyncIterator[Relay]:
    target = parse_url(redis_url)
    relay = Relay(str(target.get("host", "127.0.0.1")), int(target.get("port", 6379)))
    await relay.start()
    try:
        yield relay
    finally:
        with contextlib.suppress(AssertionError):
            await relay.stop()


async def test_replay_store_recovers_when_redis_returns(
    relay: Relay, redis_prefix: str, frozen_clock: FrozenClock
) -> None:
    store = RedisReplayStore.from_url(
        f"redis://127.0.0.1:{relay.port}/0",
        clock=frozen_clock,
        prefix=redis_prefix,
        timeout=PATIENT_TIMEOUT,
        connect_timeout=PATIENT_TIMEOUT,
    )
    exp = frozen_clock.now() + 60
    try:
        # Several pooled connections are open when Redis goes away.
        await asyncio.gather(*(store.consume("dpop", f"before-{i}", exp) for i in range(8)))
        await relay.stop()
        for _ in range(3):
            with pytest.raises(Unavailable) as info:
                await store.consume("dpop", "during", exp)
            assert info.value.code == "replay_store_unavailable"
        await relay.start()
        # Back at once: the first calls after the return succeed, none fails on a stale socket.
        await asyncio.gather(*(store.consume("dpop", f"after-{i}", exp) for i in range(8)))
        for i in range(8):
            with pytest.raises(ReplayDetected):
                await store.consume("dpop", f"before-{i}", exp)
    finally:
        await store.close()


async def test_revocation_store_recovers_when_redis_returns(
    relay: Relay, redis_prefix: str, frozen_clock: FrozenClock
) -> None:
    store = RedisRevocationStore.from_url(
        f"redis://127.0.0.1:{relay.port}/0",
        clock=frozen_clock,
        prefix=redis_prefix,
        timeout=PATIENT_TIMEOUT,
        connect_timeout=PATIENT_TIMEOUT,
    )
    now = frozen_clock.now()
    try:
        await store.revoke_jti("t1", now + 60)
        await store.set_not_before("agent:a", now)
        await relay.stop()
        with pytest.raises(Unavailable) as info:
            await store.check("t2", ["agent:b"], now)
        assert info.value.code == "revocation_store_unavailable"
        await relay.start()
        await store.check("t2", ["agent:b"], now)
        with pytest.raises(TokenError) as revoked:
            await store.check("t1", [], now)
        assert revoked.value.code == "token_revoked"
        with pytest.raises(TokenError):
            await store.check("t3", ["agent:a"], now - 1)
    finally:
        await store.close()

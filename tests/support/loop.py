"""A witness that the event loop keeps running: a task counting its 10 ms sleeps."""

from __future__ import annotations

import asyncio
from types import TracebackType


class Ticker:
    """``async with Ticker() as t:`` counts in ``t.ticks`` the passes of a task that sleeps 10 ms
    at a time; about 100 a second while nothing holds the loop."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task: asyncio.Future[None] | None = None

    async def _run(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()

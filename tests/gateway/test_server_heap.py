"""``freeze_startup_heap``: start-up garbage is collected first, then what survived is kept out
of every later collection (so a full collection no longer walks it while calls wait)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from aegis.gateway.server import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture
def thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # give the test process its heap back


def test_collects_start_up_garbage_then_freezes_the_survivors(thawed: None) -> None:
    garbage = _Node()
    gone = weakref.ref(garbage)
    kept = _Node()
    del garbage
    gc.disable()  # no collection but the one under test
    try:
        freeze_startup_heap()
        assert gone() is None  # collected before the freeze, not frozen for good
        assert gc.get_freeze_count() > 0
        assert not gc.is_tracked(kept) or kept not in gc.get_objects(generation=2)
    finally:
        gc.enable()

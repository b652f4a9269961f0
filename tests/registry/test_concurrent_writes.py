"""Registry writes that overlap, on SQLite and PostgreSQL: each change reads the record it
rewrites, so an edit that read an agent just before a quarantine committed must not write it
back active. The second writer's read is held for a moment after it happened; the real stores
and databases do the rest."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aegis.clock import SystemClock
from aegis.registry.service import AgentSpec, RegistryService
from aegis.stores import open_registry_store
from aegis.stores.sql.registry import SqlRegistryStore
from aegis.types import AgentStatus

HOLD = 0.3  # how long the first writer waits after its read, well inside the lock timeouts


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryService]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        url = request.getfixturevalue("fresh_pg_url")
    store = open_registry_store(url)
    assert isinstance(store, SqlRegistryStore)
    service = RegistryService(store, clock=SystemClock(), pepper=b"p" * 32)
    service.register_agent(
        AgentSpec("a1", "acme", "prod", "o@example.com", allowed_scopes=("s",)), actor="t"
    )
    yield service
    store.close()


def _held_after_read(
    registry: RegistryService, reader: str, thread: str, write: Callable[[], Any]
) -> tuple[threading.Thread, threading.Event]:
    """Run ``write`` on its own thread, holding it for HOLD seconds right after the store's
    ``reader`` returned; returns the thread and an event set once that read happened."""
    store, read = registry.store, threading.Event()
    real = getattr(store, reader)

    def held(key: str) -> Any:
        value = real(key)
        if threading.current_thread().name == thread:
            read.set()
            time.sleep(HOLD)
        return value

    setattr(store, reader, held)
    worker = threading.Thread(target=write, name=thread)
    worker.start()
    assert read.wait(5)
    return worker, read


def test_an_edit_overlapping_a_quarantine_does_not_undo_it(registry: RegistryService) -> None:
    edit = lambda: registry.update_agent("a1", actor="operator", display_name="renamed")  # noqa: E731
    worker, _ = _held_after_read(registry, "get_agent", "edit", edit)
    quarantined = registry.set_agent_status("a1", AgentStatus.QUARANTINED, actor="admin")
    worker.join(10)
    agent = registry.store.get_agent("a1")
    assert agent.status is AgentStatus.QUARANTINED
    assert agent.tokens_not_before == quarantined.tokens_not_before > 0
    assert agent.display_name == "renamed"  # both changes stand, one after the other


def test_a_secret_rotation_overlapping_a_disable_does_not_undo_it(
    registry: RegistryService,
) -> None:
    client, _ = registry.create_client("a1", actor="t")
    rotate = lambda: registry.rotate_secret(client.client_id, actor="operator")  # noqa: E731
    worker, _ = _held_after_read(registry, "get_client", "rotate", rotate)
    disabled = registry.set_client_active(client.client_id, False, actor="admin")
    worker.join(10)
    stored = registry.store.get_client(client.client_id)
    assert not stored.active
    assert stored.tokens_not_before == disabled.tokens_not_before > 0


def test_the_revocation_mark_never_moves_back(registry: RegistryService) -> None:
    """A status change on a replica whose clock lags must not lower the mark an earlier one set
    (the tokens it ended would pass again)."""
    first = registry.set_agent_status("a1", AgentStatus.SUSPENDED, actor="admin")
    # The return moves the mark to the start of its own second: later than the suspension's
    # when the two straddle a second boundary, never earlier.
    back = registry.set_agent_status("a1", AgentStatus.ACTIVE, actor="admin")
    assert back.tokens_not_before >= first.tokens_not_before
    lagging = RegistryService(registry.store, clock=_Behind(SystemClock(), 60.0), pepper=b"p" * 32)
    again = lagging.set_agent_status("a1", AgentStatus.SUSPENDED, actor="admin")
    assert again.tokens_not_before == back.tokens_not_before


class _Behind:
    def __init__(self, clock: SystemClock, seconds: float) -> None:
        self._clock, self._seconds = clock, seconds

    def now(self) -> float:
        return self._clock.now() - self._seconds

    def monotonic(self) -> float:
        return self._clock.monotonic()

"""Activations on PostgreSQL, as scaled-out control planes make them: serialised, and committed
with their event in the registry's log or not at all."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event

from aegis.clock import SystemClock
from aegis.errors import Unavailable
from aegis.policy.service import EVENT_ACTIVATED, PolicyService, registry_event_hook
from aegis.policy.store import SqlPolicyStore
from aegis.stores import open_registry_store
from aegis.stores.sql.registry import SqlRegistryStore
from tests.support.pg import run_sql

DOC = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: NAME}
spec:
  rules:
    - {id: r, action: ACTION, match: {tools: ["*"]}}
"""


@pytest.fixture
def pg(fresh_pg_url: str) -> Iterator[tuple[PolicyService, SqlPolicyStore, SqlRegistryStore]]:
    registry = open_registry_store(fresh_pg_url)
    store = SqlPolicyStore(fresh_pg_url)
    service = PolicyService(store, clock=SystemClock(), emit=registry_event_hook(registry))
    try:
        yield service, store, registry
    finally:
        store.close()
        registry.engine.dispose()


def _activations(registry: SqlRegistryStore) -> list[Any]:
    return [e for e in registry.list_events(limit=1000) if e.type == EVENT_ACTIVATED]


def test_two_activations_at_once_are_serialised_and_the_log_names_the_one_in_force(
    pg: tuple[PolicyService, SqlPolicyStore, SqlRegistryStore],
) -> None:
    """A inserts its activation and pauses before committing; B starts meanwhile. Unserialised,
    B commits first, A's row (the lower id) commits last, and the log's last event names A while
    B is in force, both claiming the same ``previous``. Serialised, B waits for A."""
    service, store, registry = pg
    v_a = service.store(DOC.replace("NAME", "a").replace("ACTION", "allow"), actor="t")
    v_b = service.store(DOC.replace("NAME", "b").replace("ACTION", "deny"), actor="t")
    a_inserted, b_started = threading.Event(), threading.Event()
    engine = store._engine

    @event.listens_for(engine, "after_cursor_execute")
    def pause(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.current_thread().name == "a" and statement.startswith(
            "INSERT INTO policy_activations"
        ):
            a_inserted.set()
            assert b_started.wait(timeout=10)
            time.sleep(0.3)  # B runs now: to its end unserialised, to the lock serialised

    errors: list[BaseException] = []

    def run(version: str, actor: str) -> None:
        try:
            service.activate("acme", "prod", version, actor=actor)
        except BaseException as exc:  # reported below
            errors.append(exc)

    a = threading.Thread(target=run, args=(v_a, "admin-a"), name="a")
    a.start()
    try:
        assert a_inserted.wait(timeout=10)
        b = threading.Thread(target=run, args=(v_b, "admin-b"), name="b")
        b.start()
        b_started.set()
        b.join(timeout=15)
    finally:
        b_started.set()
        a.join(timeout=15)
        event.remove(engine, "after_cursor_execute", pause)
    assert not errors, errors
    active = store.active("acme", "prod")
    assert active is not None and (active.version, active.actor) == (v_b, "admin-b")
    logged = _activations(registry)
    assert [(e.actor, e.data["version"], e.data["previous"]) for e in logged] == [
        ("admin-a", v_a, None),
        ("admin-b", v_b, v_a),
    ]


def test_an_activation_whose_event_cannot_be_written_does_not_take_effect(
    pg: tuple[PolicyService, SqlPolicyStore, SqlRegistryStore], fresh_pg_url: str
) -> None:
    """The event is written in the activation's transaction: when the event log refuses it, the
    caller gets 503 and no gateway ever sees the version in force unrecorded."""
    service, store, registry = pg
    first = service.publish(
        DOC.replace("NAME", "a").replace("ACTION", "deny"), tenant="acme", env="prod", actor="t"
    )
    other = service.store(DOC.replace("NAME", "b").replace("ACTION", "allow"), actor="t")
    run_sql(fresh_pg_url, """
        CREATE FUNCTION refuse_activation_events() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.type = 'policy.activated' THEN RAISE EXCEPTION 'event log refuses'; END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_activation_events BEFORE INSERT ON events
          FOR EACH ROW EXECUTE FUNCTION refuse_activation_events();
    """)  # fmt: skip
    try:
        with pytest.raises(Unavailable) as err:
            service.activate("acme", "prod", other, actor="mallory")
        assert err.value.code == "policy_unavailable" and err.value.status == 503
    finally:
        run_sql(fresh_pg_url, "DROP TRIGGER refuse_activation_events ON events; "
                            "DROP FUNCTION refuse_activation_events();")  # fmt: skip
    active = store.active("acme", "prod")
    assert active is not None and active.version == first.version
    assert [e.actor for e in _activations(registry)] == ["t"]
    assert [a.version for a in store.history("acme", "prod")] == [first.version]

"""Policy store contract (memory and SQLite), the publishing service, and hot reload."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text, update

from aegis.clock import FrozenClock
from aegis.errors import InvalidRequest, NotFound, PolicyError
from aegis.policy.input import build_input, call_from_dict
from aegis.policy.loader import load_document
from aegis.policy.service import EVENT_ACTIVATED, EVENT_REJECTED, PolicyService
from aegis.policy.sql_tables import POLICY_VERSIONS
from aegis.policy.store import MemoryPolicyStore, PolicyStore, SqlPolicyStore
from aegis.policy.version import policy_version
from aegis.policy.watcher import NO_POLICY_REASON, PolicyWatcher

V1 = "apiVersion: aegis/v1\nkind: Policy\nmetadata: {name: p}\nspec:\n  rules:\n    - {id: a, action: allow}\n"
V2 = V1.replace("action: allow", "action: deny")


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PolicyStore]:
    if request.param == "memory":
        yield MemoryPolicyStore()
        return
    sql = SqlPolicyStore(f"sqlite:///{tmp_path / 'policies.db'}")
    yield sql
    sql.close()


def test_versions_are_content_addressed_and_idempotent(store: PolicyStore) -> None:
    doc = load_document(V1)
    version = store.put(doc, now=1.0)
    assert version == policy_version(doc)
    assert len(version) == len("sha256:") + 64
    assert store.put(load_document(V1 + "\n# a comment changes nothing\n"), now=2.0) == version
    assert [v.version for v in store.versions()] == [version]
    assert store.get(version) == doc


def test_spelled_out_defaults_do_not_make_a_new_version() -> None:
    explicit = V1.replace("spec:\n", "spec:\n  mode: enforce\n")
    assert policy_version(load_document(explicit)) == policy_version(load_document(V1))
    assert policy_version(load_document(V2)) != policy_version(load_document(V1))


def test_activation_is_per_scope_with_history(store: PolicyStore) -> None:
    v1 = store.put(load_document(V1), now=1.0)
    v2 = store.put(load_document(V2), now=2.0)
    assert store.active("acme", "prod") is None
    store.activate("acme", "prod", v1, actor="alice", now=3.0)
    store.activate("acme", "dev", v2, actor="bob", now=4.0)
    store.activate("acme", "prod", v2, actor="alice", now=5.0)
    active = store.active("acme", "prod")
    assert active is not None
    assert (active.version, active.actor) == (v2, "alice")
    assert [a.version for a in store.history("acme", "prod")] == [v1, v2]
    assert store.active("globex", "prod") is None


def test_unknown_versions_cannot_be_read_or_activated(store: PolicyStore) -> None:
    with pytest.raises(NotFound):
        store.get("sha256:" + "0" * 64)
    with pytest.raises(NotFound):
        store.activate("acme", "prod", "sha256:" + "0" * 64, actor="x", now=1.0)


def test_a_tampered_row_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    sql = SqlPolicyStore(url)
    version = sql.put(load_document(V1), now=1.0)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            update(POLICY_VERSIONS).values(document=text("replace(document, 'allow', 'deny')"))
        )
    engine.dispose()
    with pytest.raises(PolicyError, match="does not hash"):
        sql.get(version)
    # As the refusal asks, storing the source again restores the row.
    assert sql.put(load_document(V1 + "# again\n"), now=2.0) == version
    assert sql.get(version) == load_document(V1)
    sql.close()


def test_activation_refuses_a_tenant_or_env_the_registry_would_not_accept(
    store: PolicyStore,
) -> None:
    """``Acme`` can never match a route (ids are lowercase), and a 65-character one does not fit
    the activation's column: both are the caller's mistake (400), not the store's (503)."""
    service = PolicyService(store, clock=FrozenClock(100.0))
    version = service.store(V1, actor="alice")
    for tenant, env in (("Acme", "prod"), ("t" * 65, "prod"), ("acme", "e" * 65), ("acme", "")):
        with pytest.raises(InvalidRequest) as err:
            service.activate(tenant, env, version, actor="alice")
        assert err.value.status == 400
    assert store.active("acme", "prod") is None


def test_a_rejected_document_never_replaces_the_active_one(store: PolicyStore) -> None:
    events: list[dict[str, Any]] = []
    service = PolicyService(store, clock=FrozenClock(100.0), emit=events.append)
    good = service.publish(V1, tenant="acme", env="prod", actor="alice")
    with pytest.raises(PolicyError):
        service.publish(V1.replace("allow", "alow"), tenant="acme", env="prod", actor="mallory")
    active = store.active("acme", "prod")
    assert active is not None
    assert active.version == good.version
    kinds = [e["event"] for e in events]
    assert kinds == ["policy.stored", EVENT_ACTIVATED, EVENT_REJECTED]
    assert (
        events[1] | {"version": good.version, "previous": None, "tenant": "acme", "time": 100.0}
        == events[1]
    )
    assert events[2]["code"] == "policy_invalid"
    assert events[2]["actor"] == "mallory"


def test_watcher_picks_up_a_new_activation_after_its_interval(store: PolicyStore) -> None:
    clock = FrozenClock(0.0)
    service = PolicyService(store, clock=clock)
    watcher = PolicyWatcher(store, tenant="acme", env="prod", clock=clock, interval=5.0)
    doc = build_input(call_from_dict({"tool": "t", "tenant": "acme"}))
    first = watcher.evaluate(doc)
    assert (first.action, first.code, first.reasons) == (
        "deny",
        "policy_unavailable",
        (NO_POLICY_REASON,),
    )

    v1 = service.publish(V1, tenant="acme", env="prod", actor="a").version
    clock.advance(5.0)
    assert watcher.evaluate(doc).action == "allow"
    v2 = service.publish(V2, tenant="acme", env="prod", actor="a").version
    clock.advance(1.0)
    assert watcher.evaluate(doc).policy_version == v1  # not yet polled
    clock.advance(4.0)
    decision = watcher.evaluate(doc)
    assert (decision.action, decision.policy_version) == ("deny", v2)


class _Broken:
    def active(self, tenant: str, env: str) -> Any:
        from aegis.errors import Unavailable

        raise Unavailable("down", code="policy_unavailable")


def test_watcher_keeps_the_last_good_policy_when_the_store_fails() -> None:
    clock = FrozenClock(0.0)
    store = MemoryPolicyStore()
    PolicyService(store, clock=clock).publish(V1, tenant="t", env="e", actor="a")
    watcher = PolicyWatcher(store, tenant="t", env="e", clock=clock, interval=1.0)
    assert watcher.current() is not None
    watcher._store = _Broken()  # type: ignore[assignment]
    clock.advance(2.0)
    assert watcher.current() is not None
    assert watcher.last_error is not None


def test_a_stored_policy_a_newer_check_would_refuse_still_loads(tmp_path: Path) -> None:
    """A version stored before a load-time check was added (a rule that can never match) keeps
    loading: refusing it now would make every call of its tenant a 503. A new put refuses it."""
    from aegis.policy.model import STORED, PolicyDocument
    from aegis.policy.yamlsource import parse_source

    text = V1 + (
        "    - {id: dead, action: deny, when: {path: request.headers.cookie, contains: admin}}\n"
        "    - {id: big, action: deny, when: {path: request.body.to, eq: 18446744073709551615}}\n"
    )
    with pytest.raises(PolicyError):
        load_document(text)
    doc = PolicyDocument.model_validate(parse_source(text, "<old>").value, context=STORED)
    sql = SqlPolicyStore(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        version = sql.put(doc, now=1.0)
        assert sql.get(version) == doc  # read back from its row, checks of its day only
    finally:
        sql.close()


def test_a_stored_version_a_newer_check_refuses_is_not_activated_anew(
    store: PolicyStore,
) -> None:
    """A version stored before a check was added keeps loading while it is active, but making it
    active again (a rollback) applies today's checks: a deny on a field policy input never holds
    would silently never deny. The active version stays, and the refusal is an event."""
    from aegis.policy.model import STORED, PolicyDocument
    from aegis.policy.yamlsource import parse_source

    events: list[dict[str, Any]] = []
    service = PolicyService(store, clock=FrozenClock(100.0), emit=events.append)
    good = service.publish(V1, tenant="acme", env="prod", actor="alice")
    dead = V2 + (
        "    - {id: dead, action: deny, when: {path: request.headers.cookie, contains: admin}}\n"
    )
    old = store.put(
        PolicyDocument.model_validate(parse_source(dead, "<old>").value, context=STORED), now=1.0
    )
    with pytest.raises(PolicyError) as err:
        service.activate("acme", "prod", old, actor="bob")
    assert err.value.code == "policy_invalid"
    assert err.value.status == 400
    assert old in err.value.message and "publish a corrected version" in err.value.message
    assert "cookie" in err.value.message
    assert err.value.details["errors"]
    active = store.active("acme", "prod")
    assert active is not None and active.version == good.version
    assert events[-1]["event"] == EVENT_REJECTED
    assert events[-1] | {"actor": "bob", "version": old, "tenant": "acme"} == events[-1]
    assert store.get(old) is not None  # still readable: only activating it anew is refused
    fine = store.put(load_document(V2), now=2.0)
    assert service.activate("acme", "prod", fine, actor="bob").version == fine

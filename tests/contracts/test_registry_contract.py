"""RegistryStore contract: every SQL backend (SQLite, PostgreSQL) must pass each test here."""

from __future__ import annotations

import itertools
import math
import secrets
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from aegis.errors import Conflict, InvalidRequest, NotFound, Unavailable
from aegis.stores import open_registry_store
from aegis.stores.sql.registry import SqlRegistryStore
from aegis.stores.sql.schema import EVENTS
from aegis.types import (
    AdminKey,
    AdminRole,
    Agent,
    AgentStatus,
    Client,
    ClientAuthMethod,
    ClientSecret,
    Environment,
    Event,
    Tenant,
    TenantStatus,
)

T0 = 1_700_000_000.0


def tenant(tid: str = "acme", **kw: object) -> Tenant:
    return replace(Tenant(tid, f"{tid} corp", TenantStatus.ACTIVE, T0), **kw)  # type: ignore[arg-type]


def agent(aid: str = "agent-1", tenant_id: str = "acme", **kw: object) -> Agent:
    base = Agent(
        id=aid,
        tenant_id=tenant_id,
        env="prod",
        display_name=f"Agent {aid}",
        owner="owner@example.org",
        status=AgentStatus.ACTIVE,
        created_at=T0,
        updated_at=T0,
        roles=("reader", "payer"),
        allowed_scopes=("payments:read", "payments:write"),
        software_version="1.2.3",
        model="model-x",
        attributes={"team": "finance", "limits": {"daily": 1000, "currency": "EUR"}},
        jwks=(
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
        ),
        tokens_not_before=T0 - 0.5,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def client(cid: str = "client-1", agent_id: str = "agent-1", **kw: object) -> Client:
    base = Client(
        client_id=cid,
        agent_id=agent_id,
        auth_method=ClientAuthMethod.CLIENT_SECRET_BASIC,
        created_at=T0,
        active=True,
        secrets=(
            ClientSecret("hmac-sha256:old", T0 - 100, T0 + 3600),
            ClientSecret("hmac-sha256:new", T0, None),
        ),
        dpop_bound=True,
        tls_san_uri=None,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def admin_key(kid: str = "ak-1", **kw: object) -> AdminKey:
    return replace(AdminKey(kid, "ops laptop", AdminRole.OPERATOR, "h" * 64, T0), **kw)  # type: ignore[arg-type]


def event(eid: str, at: float, **kw: object) -> Event:
    base = Event(eid, at, "agent.suspended", "admin:ak-1", "agent:agent-1", "acme", {"why": "x"})
    return replace(base, **kw)  # type: ignore[arg-type]


def seed(store: SqlRegistryStore) -> None:
    store.create_tenant(tenant())
    store.create_environment(Environment("acme", "prod", T0))
    store.create_agent(agent())


# -- tenants and environments -------------------------------------------------------------


def test_tenants_create_get_list_update(registry: SqlRegistryStore) -> None:
    assert registry.list_tenants() == []
    registry.create_tenant(tenant("zeta"))
    registry.create_tenant(tenant("acme"))
    assert registry.get_tenant("acme") == tenant("acme")
    assert registry.list_tenants() == [tenant("acme"), tenant("zeta")]
    changed = tenant("acme", display_name="Acme Ltd", status=TenantStatus.SUSPENDED)
    registry.update_tenant(changed)
    assert registry.get_tenant("acme") == changed
    assert registry.get_tenant("zeta") == tenant("zeta")


def test_tenant_errors(registry: SqlRegistryStore) -> None:
    registry.create_tenant(tenant())
    with pytest.raises(Conflict) as info:
        registry.create_tenant(tenant(display_name="another"))
    assert info.value.code == "conflict"
    assert registry.get_tenant("acme") == tenant()
    with pytest.raises(NotFound) as missing:
        registry.get_tenant("nope")
    assert missing.value.code == "not_found"
    with pytest.raises(NotFound):
        registry.update_tenant(tenant("nope"))
    assert registry.list_tenants() == [tenant()]


def test_environments(registry: SqlRegistryStore) -> None:
    registry.create_tenant(tenant("acme"))
    registry.create_tenant(tenant("other"))
    registry.create_environment(Environment("acme", "staging", T0 + 1))
    registry.create_environment(Environment("acme", "prod", T0))
    registry.create_environment(Environment("other", "prod", T0))
    assert registry.list_environments("acme") == [
        Environment("acme", "prod", T0),
        Environment("acme", "staging", T0 + 1),
    ]
    assert registry.list_environments("other") == [Environment("other", "prod", T0)]
    assert registry.list_environments("nope") == []
    with pytest.raises(Conflict):
        registry.create_environment(Environment("acme", "prod", T0 + 5))


def test_an_environment_needs_its_tenant(registry: SqlRegistryStore) -> None:
    with pytest.raises(Conflict):
        registry.create_environment(Environment("ghost", "prod", T0))
    assert registry.list_environments("ghost") == []


# -- agents -------------------------------------------------------------------------------


def test_agents_create_get_update(registry: SqlRegistryStore) -> None:
    seed(registry)
    assert registry.get_agent("agent-1") == agent()
    changed = agent(
        status=AgentStatus.SUSPENDED,
        display_name="renamed",
        roles=(),
        allowed_scopes=("payments:read",),
        software_version=None,
        model=None,
        attributes={},
        jwks=(),
        updated_at=T0 + 10,
        tokens_not_before=T0 + 10,
    )
    registry.update_agent(changed)
    assert registry.get_agent("agent-1") == changed
    with pytest.raises(NotFound):
        registry.get_agent("agent-2")
    with pytest.raises(NotFound):
        registry.update_agent(agent("agent-2"))
    with pytest.raises(Conflict):
        registry.create_agent(agent())
    assert registry.get_agent("agent-1") == changed


def test_an_agent_needs_its_tenant(registry: SqlRegistryStore) -> None:
    with pytest.raises(Conflict):
        registry.create_agent(agent(tenant_id="ghost"))
    assert registry.list_agents() == []


def test_list_agents_filters(registry: SqlRegistryStore) -> None:
    registry.create_tenant(tenant("acme"))
    registry.create_tenant(tenant("beta"))
    agents = [
        agent("a1", "acme", env="prod"),
        agent("a2", "acme", env="dev", status=AgentStatus.SUSPENDED),
        agent("a3", "beta", env="prod", status=AgentStatus.SUSPENDED),
        agent("a0", "beta", env="dev", status=AgentStatus.RETIRED),
    ]
    for a in agents:
        registry.create_agent(a)
    by_id = {a.id: a for a in agents}

    def ids(**filters: object) -> list[str]:
        found = registry.list_agents(**filters)  # type: ignore[arg-type]
        assert found == [by_id[a.id] for a in found]
        return [a.id for a in found]

    assert ids() == ["a0", "a1", "a2", "a3"]
    assert ids(tenant_id="acme") == ["a1", "a2"]
    assert ids(env="prod") == ["a1", "a3"]
    assert ids(status=AgentStatus.SUSPENDED) == ["a2", "a3"]
    assert ids(tenant_id="beta", env="prod") == ["a3"]
    assert ids(tenant_id="beta", env="dev", status=AgentStatus.SUSPENDED) == []
    assert ids(tenant_id="nope") == []
    assert ids(status=AgentStatus.QUARANTINED) == []


# -- clients --------------------------------------------------------------------------------


def test_clients_with_secrets_round_trip(registry: SqlRegistryStore) -> None:
    seed(registry)
    registry.create_agent(agent("agent-2"))
    mtls = client(
        "client-0",
        auth_method=ClientAuthMethod.TLS_CLIENT_AUTH,
        secrets=(),
        dpop_bound=False,
        tls_san_uri="spiffe://example.org/acme/prod/agent-1",
        created_at=T0 + 1,
    )
    registry.create_client(client())
    registry.create_client(mtls)
    registry.create_client(client("client-9", "agent-2"))
    assert registry.get_client("client-1") == client()
    assert registry.get_client("client-0") == mtls
    # Ordered by creation time, then id.
    assert registry.list_clients("agent-1") == [client(), mtls]
    assert registry.list_clients("agent-2") == [client("client-9", "agent-2")]
    assert registry.list_clients("nobody") == []

    rotated = client(
        active=False,
        secrets=(ClientSecret("hmac-sha256:newest", T0 + 50, None),),
        dpop_bound=False,
    )
    registry.update_client(rotated)
    assert registry.get_client("client-1") == rotated


def test_client_errors(registry: SqlRegistryStore) -> None:
    seed(registry)
    registry.create_client(client())
    with pytest.raises(Conflict):
        registry.create_client(client(active=False))
    with pytest.raises(Conflict):
        registry.create_client(client("client-2", agent_id="ghost"))
    with pytest.raises(NotFound):
        registry.get_client("client-2")
    with pytest.raises(NotFound):
        registry.update_client(client("client-2"))
    assert registry.get_client("client-1") == client()


def test_secret_hashes_do_not_reach_error_messages(registry: SqlRegistryStore) -> None:
    """Driver errors carry the statement's parameters; stored hashes must not be among them."""
    seed(registry)
    registry.create_client(client())
    marker = f"hmac-sha256:{secrets.token_hex(16)}"
    with pytest.raises(Conflict) as info:
        registry.create_client(client(secrets=(ClientSecret(marker, T0),)))
    chain: list[str] = []
    exc: BaseException | None = info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert len(chain) > 1
    assert marker not in "\n".join(chain)


# -- admin keys -----------------------------------------------------------------------------


def test_admin_keys(registry: SqlRegistryStore) -> None:
    registry.create_admin_key(admin_key("ak-2", created_at=T0 + 1, role=AdminRole.AUDITOR))
    registry.create_admin_key(admin_key("ak-1"))
    assert registry.get_admin_key("ak-1") == admin_key("ak-1")
    assert registry.list_admin_keys() == [
        admin_key("ak-1"),
        admin_key("ak-2", created_at=T0 + 1, role=AdminRole.AUDITOR),
    ]
    revoked = admin_key("ak-1", revoked=True, name="lost laptop", role=AdminRole.ADMIN)
    registry.update_admin_key(revoked)
    assert registry.get_admin_key("ak-1") == revoked
    with pytest.raises(Conflict):
        registry.create_admin_key(admin_key("ak-1"))
    with pytest.raises(NotFound):
        registry.get_admin_key("ak-3")
    with pytest.raises(NotFound):
        registry.update_admin_key(admin_key("ak-3"))


def test_admin_keys_created_together_list_by_id(registry: SqlRegistryStore) -> None:
    """Every list has a total order, so both backends return the same sequence."""
    for kid in ("ak-c", "ak-a", "ak-d", "ak-b"):
        registry.create_admin_key(admin_key(kid))
    assert [k.key_id for k in registry.list_admin_keys()] == ["ak-a", "ak-b", "ak-c", "ak-d"]


@pytest.mark.parametrize("bad", ["nul\x00", "\ud800", "agent-1\x00"])
def test_lookups_by_unstorable_ids_find_nothing(registry: SqlRegistryStore, bad: str) -> None:
    """Ids come from requests; one that could never be stored names no record, on every backend,
    instead of a driver error (PostgreSQL refuses NUL; no driver encodes a lone surrogate)."""
    seed(registry)
    registry.create_client(client())
    registry.create_admin_key(admin_key())
    for lookup in (
        registry.get_tenant,
        registry.get_agent,
        registry.get_client,
        registry.get_admin_key,
    ):
        with pytest.raises(NotFound):
            lookup(bad)
    with pytest.raises(NotFound):
        registry.update_tenant(tenant(bad, display_name="fine"))
    assert registry.list_environments(bad) == []
    assert registry.list_clients(bad) == []
    assert registry.list_agents(tenant_id=bad) == []
    assert registry.list_agents(env=bad) == []


def test_updates_keep_creation_facts(registry: SqlRegistryStore) -> None:
    """``created_at`` is kept on every record, and an admin key's hash, whatever an update says."""
    seed(registry)
    registry.create_client(client())
    registry.create_admin_key(admin_key())
    later = T0 + 999
    registry.update_tenant(tenant(created_at=later, display_name="x"))
    registry.update_agent(agent(created_at=later, display_name="x"))
    registry.update_client(client(created_at=later, active=False))
    registry.update_admin_key(admin_key(created_at=later, hash="f" * 64, name="x"))
    assert registry.get_tenant("acme") == tenant(display_name="x")
    assert registry.get_agent("agent-1") == agent(display_name="x")
    assert registry.get_client("client-1") == client(active=False)
    assert registry.get_admin_key("ak-1") == admin_key(name="x")


# -- events ---------------------------------------------------------------------------------


def test_events_are_listed_in_time_order_from_since(registry: SqlRegistryStore) -> None:
    evs = [
        event("e3", T0 + 3, tenant_id=None, data={}),
        event("e1", T0 + 1, data={"nested": {"list": [1, 2.5, None, True]}, "ü": "ß"}),
        event("e2b", T0 + 2),
        event("e2a", T0 + 2),
    ]
    for e in evs:
        registry.append_event(e)
    assert [e.id for e in registry.list_events()] == ["e1", "e2a", "e2b", "e3"]
    assert registry.list_events()[0] == evs[1]
    assert registry.list_events()[3] == evs[0]
    assert [e.id for e in registry.list_events(since=T0 + 2)] == ["e2a", "e2b", "e3"]
    assert [e.id for e in registry.list_events(since=T0 + 2.5)] == ["e3"]
    assert [e.id for e in registry.list_events(limit=2)] == ["e1", "e2a"]
    assert registry.list_events(since=T0 + 4) == []
    with pytest.raises(Conflict):
        registry.append_event(event("e1", T0 + 9))
    assert registry.list_events(since=T0 + 9) == []


@pytest.mark.parametrize(
    "statement",
    ["UPDATE events SET type = 'forged'", "DELETE FROM events", "DELETE FROM events WHERE id='e1'"],
)
def test_events_are_append_only_even_for_raw_sql(
    registry: SqlRegistryStore, statement: str
) -> None:
    registry.append_event(event("e1", T0 + 1))
    with pytest.raises(DBAPIError, match="append-only"), registry.engine.begin() as conn:
        conn.execute(text(statement))
    with registry.engine.connect() as conn:
        rows = conn.execute(select(EVENTS.c.id, EVENTS.c.type)).all()
    assert [tuple(r) for r in rows] == [("e1", "agent.suspended")]


def test_events_cannot_be_truncated_on_postgresql(fresh_pg_url: str) -> None:
    """TRUNCATE fires no row triggers; a statement trigger refuses it (SQLite has no TRUNCATE)."""
    registry = open_registry_store(fresh_pg_url)
    try:
        registry.append_event(event("e1", T0 + 1))
        with pytest.raises(DBAPIError, match="append-only"), registry.engine.begin() as conn:
            conn.execute(text("TRUNCATE events"))
        assert [e.id for e in registry.list_events()] == ["e1"]
    finally:
        registry.close()


# -- atomic() -------------------------------------------------------------------------------


class Boom(Exception):
    pass


def test_atomic_rolls_back_everything_on_error(registry: SqlRegistryStore) -> None:
    def write_then_fail() -> None:
        with registry.atomic():
            registry.create_tenant(tenant())
            registry.create_agent(agent())
            registry.append_event(event("e1", T0))
            raise Boom

    with pytest.raises(Boom):
        write_then_fail()
    assert registry.list_tenants() == []
    assert registry.list_agents() == []
    assert registry.list_events() == []


def test_atomic_rolls_back_when_a_write_conflicts(registry: SqlRegistryStore) -> None:
    registry.create_tenant(tenant())

    def write_then_conflict() -> None:
        with registry.atomic():
            registry.create_tenant(tenant("beta"))
            registry.update_tenant(tenant(display_name="changed"))
            registry.create_tenant(tenant())  # duplicate: the whole block fails

    with pytest.raises(Conflict):
        write_then_conflict()
    assert registry.list_tenants() == [tenant()]


def test_atomic_rolls_back_when_an_update_misses(registry: SqlRegistryStore) -> None:
    def write_then_miss() -> None:
        with registry.atomic():
            registry.create_tenant(tenant())
            registry.update_agent(agent("ghost"))

    with pytest.raises(NotFound):
        write_then_miss()
    assert registry.list_tenants() == []


def test_atomic_commits_together(registry: SqlRegistryStore) -> None:
    with registry.atomic():
        registry.create_tenant(tenant())
        registry.create_agent(agent())
        # Reads inside the block see its own writes.
        assert registry.get_agent("agent-1") == agent()
    assert registry.get_agent("agent-1") == agent()


def test_nested_atomic_joins_the_outer_transaction(registry: SqlRegistryStore) -> None:
    def inner_done_outer_fails() -> None:
        with registry.atomic():
            registry.create_tenant(tenant())
            with registry.atomic():
                registry.create_agent(agent())
            # The inner block has ended, but nothing commits until the outer one does.
            raise Boom

    with pytest.raises(Boom):
        inner_done_outer_fails()
    assert registry.list_tenants() == []
    assert registry.list_agents() == []


def test_nested_atomic_is_not_a_savepoint(registry: SqlRegistryStore) -> None:
    """An exception leaving an inner block and caught in the outer one does not undo the inner
    writes on its own: the inner block is part of the outer transaction, which commits them."""

    def inner_fails() -> None:
        with registry.atomic():
            registry.create_agent(agent())
            raise Boom

    with registry.atomic():
        registry.create_tenant(tenant())
        with pytest.raises(Boom):
            inner_fails()
    assert registry.get_agent("agent-1") == agent()


def test_a_failed_write_dooms_its_atomic_block_even_if_caught(registry: SqlRegistryStore) -> None:
    """After a write inside ``atomic()`` fails, the block can only roll back, on every backend.

    PostgreSQL aborts the transaction at the first error; SQLite would carry on and commit the
    rest. The contract is the stricter one: later statements in the block raise ``Conflict``
    (never a driver error), and leaving the block raises even if the caller swallowed the error,
    so a half-done change is never committed.
    """
    registry.create_tenant(tenant())
    outcomes: list[str] = []

    def swallow_and_continue() -> None:
        with registry.atomic():
            registry.create_tenant(tenant("beta"))
            try:
                registry.create_tenant(tenant())
            except Conflict:
                outcomes.append("conflict")
            try:
                registry.create_tenant(tenant("gamma"))
            except Conflict:
                outcomes.append("doomed")

    with pytest.raises(Conflict):
        swallow_and_continue()
    assert outcomes == ["conflict", "doomed"]
    assert registry.list_tenants() == [tenant()]
    # The store is usable afterwards.
    registry.create_tenant(tenant("beta"))
    assert [t.id for t in registry.list_tenants()] == ["acme", "beta"]


def test_uncommitted_writes_are_invisible_to_other_threads(registry: SqlRegistryStore) -> None:
    seen: list[list[Tenant]] = []
    with registry.atomic():
        registry.create_tenant(tenant())
        reader = threading.Thread(target=lambda: seen.append(registry.list_tenants()))
        reader.start()
        reader.join(10)
    assert seen == [[]]
    assert registry.list_tenants() == [tenant()]


def test_threads_writing_in_atomic_blocks(registry: SqlRegistryStore) -> None:
    registry.create_tenant(tenant())
    errors: list[BaseException] = []
    threads, per_thread = 6, 8

    def work(n: int) -> None:
        try:
            for i in range(per_thread):
                with registry.atomic():
                    aid = f"t{n}-a{i}"
                    registry.create_agent(agent(aid))
                    registry.append_event(event(f"t{n}-e{i}", T0 + i, subject=f"agent:{aid}"))
                    registry.get_agent(aid)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert errors == []
    assert len(registry.list_agents()) == threads * per_thread
    assert len(registry.list_events()) == threads * per_thread


# -- values the stores must keep exactly ----------------------------------------------------

_ids = itertools.count()


def _json_containers(inner: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    _json_containers,
    max_leaves=12,
)
# Every code point except NUL, which PostgreSQL text cannot hold, and lone surrogates, which are
# not text at all (both are refused; see the tests below).
names = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=256)


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_registry(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SqlRegistryStore]:
    """One registry per backend for a whole property test: its examples write disjoint ids, so
    they share the store (and the session's PostgreSQL database) instead of one per example."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('hyp') / 'aegis.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    store = open_registry_store(url)
    try:
        store.create_tenant(tenant(f"hyp-{secrets.token_hex(4)}"))
        yield store
    finally:
        store.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    display_name=names,
    owner=names,
    attributes=st.dictionaries(st.text(max_size=20), json_values, max_size=6),
    roles=st.lists(st.text(max_size=30), max_size=4),
)
def test_agents_round_trip_exactly(
    shared_registry: SqlRegistryStore,
    display_name: str,
    owner: str,
    attributes: dict[str, object],
    roles: list[str],
) -> None:
    a = agent(
        f"h{next(_ids)}-{secrets.token_hex(4)}",
        tenant_id=shared_registry.list_tenants()[0].id,
        display_name=display_name,
        owner=owner,
        attributes=attributes,
        roles=tuple(roles),
        model=display_name[:128],
    )
    shared_registry.create_agent(a)
    assert shared_registry.get_agent(a.id) == a
    updated = replace(a, display_name=display_name[::-1], attributes={"v": attributes})
    shared_registry.update_agent(updated)
    assert shared_registry.get_agent(a.id) == updated


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("display_name", "nul\x00inside"),
        ("display_name", "x" * 257),
        ("env", "e" * 65),
        ("owner", "lone \ud800 surrogate"),
        ("attributes", {"k": ["fine", "lone \udfff"]}),
        ("attributes", {"\ud800": 1}),
    ],
)
def test_unstorable_text_is_an_invalid_request_on_every_backend(
    registry: SqlRegistryStore, field: str, value: str
) -> None:
    """Text a backend cannot keep exactly is refused the same way everywhere, as bad input.

    PostgreSQL text cannot hold NUL and enforces column lengths; SQLite would store either. A lone
    surrogate cannot be encoded at all (the driver raised UnicodeEncodeError, past every
    translation). All are refused with ``invalid_request`` naming the field.
    """
    registry.create_tenant(tenant())
    with pytest.raises(InvalidRequest) as info:
        registry.create_agent(agent(**{field: value}))
    assert info.value.code == "invalid_request"
    assert field in info.value.message
    assert registry.list_agents() == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tokens_not_before", math.nan),
        ("updated_at", math.inf),
        ("attributes", {"limits": [1.0, math.nan]}),
    ],
)
def test_non_finite_numbers_are_an_invalid_request_on_every_backend(
    registry: SqlRegistryStore, field: str, value: object
) -> None:
    """SQLite turns NaN into NULL and PostgreSQL keeps it; a NaN ``tokens_not_before`` would
    never be later than a token's ``iat``, silently disabling the mark. Both refuse it."""
    seed(registry)
    with pytest.raises(InvalidRequest) as info:
        registry.update_agent(agent("agent-1", "acme", **{field: value}))
    assert field in info.value.message
    with pytest.raises(InvalidRequest):
        registry.create_agent(agent("agent-2", "acme", **{field: value}))
    assert registry.list_agents() == [agent()]


def test_a_negative_event_limit_is_refused(registry: SqlRegistryStore) -> None:
    registry.append_event(event("e1", T0))
    assert registry.list_events(limit=0) == []
    with pytest.raises(InvalidRequest):
        registry.list_events(limit=-1)


def test_an_unreachable_database_is_registry_unavailable() -> None:
    store = SqlRegistryStore("postgresql+psycopg://postgres@127.0.0.1:1/none")
    try:
        with pytest.raises(Unavailable) as info:
            store.get_tenant("acme")
        assert info.value.code == "registry_unavailable"
        assert info.value.status == 503
        with pytest.raises(Unavailable):
            store.create_tenant(tenant())
        with pytest.raises(Unavailable), store.atomic():
            pass
    finally:
        store.close()

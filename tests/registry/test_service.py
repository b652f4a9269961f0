"""The registry service on a real SQLite store with a frozen clock: client secrets (256 bits, shown
once, keyed hash, constant-time comparison, rotation overlap), lifecycle events, failed operations
that write nothing, and leaving ``active`` killing every live token at once."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aegis.clock import FrozenClock
from aegis.config import load_config
from aegis.crypto.keys import b64u_decode
from aegis.errors import AegisError, ClientAuthError, Conflict, InvalidRequest, TokenError
from aegis.oauth.service import TokenRequest
from aegis.registry import secrets as secrets_mod
from aegis.registry.service import AgentSpec, RegistryService
from aegis.server.services import Services, build_services
from aegis.tokens.subject import check_subject
from aegis.types import AgentStatus, Client
from tests.support.server import write_dev_config

T0 = 1_800_000_000.0
OVERLAP = 3600
ACTOR = "test"


@dataclass
class Env:
    services: Services
    clock: FrozenClock

    @property
    def registry(self) -> RegistryService:
        return self.services.registry

    def agent(self, agent_id: str = "finance-agent", tenant: str = "acme") -> str:
        self.registry.register_agent(
            AgentSpec(agent_id, tenant, "prod", "alice@example.com", allowed_scopes=("p:w",)),
            actor=ACTOR,
        )
        return agent_id

    def client(self, agent_id: str) -> tuple[Client, str]:
        client, secret = self.registry.create_client(agent_id, actor=ACTOR)
        assert secret is not None
        return client, secret

    def stored(self, client_id: str) -> Client:
        return self.services.registry_store.get_client(client_id)

    def token(self, client_id: str) -> str:
        self.services.cache.invalidate()
        issued = self.services.tokens.client_credentials(
            self.services.cache.client(client_id), TokenRequest((), ())
        )
        return issued.token

    def introspect(self, token: str) -> dict[str, Any]:
        self.services.cache.invalidate()
        return asyncio.run(self.services.tokens.introspect(token, tenant="acme"))

    def events(self) -> list[str]:
        return [e.type for e in self.services.registry_store.list_events(limit=10_000)]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    path = write_dev_config(tmp_path, 8080, f"secrets:\n  rotation_overlap: {OVERLAP}\n")
    clock = FrozenClock(T0)
    services = build_services(load_config(path, environ={}), clock=clock)
    try:
        yield Env(services, clock)
    finally:
        asyncio.run(services.aclose())


# -- client secrets -----------------------------------------------------------------------------


def test_secrets_carry_256_bits_and_only_their_keyed_hash_is_stored(env: Env) -> None:
    agent = env.agent()
    seen = set()
    for _ in range(20):
        client, secret = env.client(agent)
        assert secret.startswith("aegis_cs_")
        assert len(b64u_decode(secret.removeprefix("aegis_cs_"))) * 8 >= 256
        seen.add(secret)
        (stored,) = env.stored(client.client_id).secrets
        assert stored.hash == secrets_mod.hash_secret(env.services.config.pepper(), secret)
        assert stored.hash.startswith("hmac-sha256:") and len(stored.hash) == 12 + 64
        # An unkeyed digest of the secret is not what is stored.
        assert hashlib.sha256(secret.encode()).hexdigest() not in stored.hash
        assert secret not in repr(env.stored(client.client_id))
    assert len(seen) == 20


def test_secrets_are_shown_once(env: Env) -> None:
    client, secret = env.client(env.agent())
    assert secret not in repr(env.registry.store.get_client(client.client_id))
    assert secret not in repr(env.registry.store.list_clients("finance-agent"))
    assert all(secret not in repr(e) for e in env.services.registry_store.list_events(limit=100))


def test_the_hash_is_keyed_by_the_pepper(env: Env) -> None:
    client, secret = env.client(env.agent())
    env.registry.check_secret(env.stored(client.client_id), secret)
    other = RegistryService(env.services.registry_store, clock=env.clock, pepper=b"x" * 32)
    # The same database with another pepper cannot confirm the right secret.
    with pytest.raises(ClientAuthError):
        other.check_secret(env.stored(client.client_id), secret)
    assert secrets_mod.hash_secret(b"a" * 32, secret) != secrets_mod.hash_secret(b"b" * 32, secret)


def test_every_stored_secret_is_compared_in_constant_time(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, first = env.client(env.agent())
    _, second = env.registry.rotate_secret(client.client_id, actor=ACTOR)
    stored = env.stored(client.client_id)
    assert len(stored.secrets) == 2
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)  # the module secrets uses
    for presented, ok in ((first, True), (second, True), ("aegis_cs_wrong", False)):
        calls.clear()
        if ok:
            env.registry.check_secret(stored, presented)
        else:
            with pytest.raises(ClientAuthError):
                env.registry.check_secret(stored, presented)
        # Both stored hashes are compared, whichever matched, through hmac.compare_digest.
        assert sorted(b for _, b in calls) == sorted(s.hash for s in stored.secrets)


def test_rotation_keeps_the_previous_secret_for_the_overlap_only(env: Env) -> None:
    client, old = env.client(env.agent())
    env.clock.advance(100)
    _, new = env.registry.rotate_secret(client.client_id, actor=ACTOR)
    rotated_at = env.clock.now()
    env.clock.set(rotated_at + OVERLAP - 1)
    for secret in (old, new):
        env.registry.check_secret(env.stored(client.client_id), secret)
    env.clock.set(rotated_at + OVERLAP)
    with pytest.raises(ClientAuthError):
        env.registry.check_secret(env.stored(client.client_id), old)
    env.registry.check_secret(env.stored(client.client_id), new)
    # A second rotation: the secret it replaces gets the overlap, the expired one is dropped.
    _, newer = env.registry.rotate_secret(client.client_id, actor=ACTOR)
    assert len(env.stored(client.client_id).secrets) == 2
    env.registry.check_secret(env.stored(client.client_id), new)
    env.registry.check_secret(env.stored(client.client_id), newer)


@pytest.mark.parametrize("how", ["revoke_previous", "while_disabled"])
def test_a_leaked_secret_stops_at_its_rotation(env: Env, how: str) -> None:
    """The answer to a leak: rotating with ``revoke_previous``, or rotating while the client is
    disabled (disable, rotate, enable), stops the previous secret now, not after the overlap;
    the event says so. An ordinary rotation keeps the overlap (above)."""
    client, leaked = env.client(env.agent())
    if how == "while_disabled":
        env.registry.set_client_active(client.client_id, False, actor=ACTOR)
        _, fresh = env.registry.rotate_secret(client.client_id, actor=ACTOR)
        env.registry.set_client_active(client.client_id, True, actor=ACTOR)
    else:
        _, fresh = env.registry.rotate_secret(client.client_id, actor=ACTOR, revoke_previous=True)
    stored = env.stored(client.client_id)
    assert len(stored.secrets) == 1
    with pytest.raises(ClientAuthError):
        env.registry.check_secret(stored, leaked)
    env.registry.check_secret(stored, fresh)
    [event] = [e for e in env.services.registry_store.list_events(limit=100)
               if e.type == "client.secret_rotated"]  # fmt: skip
    assert event.data["previous_revoked"] is True


def test_a_client_without_a_secret_method_cannot_rotate(env: Env) -> None:
    from aegis.crypto.keys import Ed25519SigningKey
    from aegis.types import ClientAuthMethod

    key = Ed25519SigningKey.generate()
    env.registry.register_agent(
        AgentSpec("keyed", "acme", "prod", "a@example.com", jwks=(key.public.to_jwk(),)),
        actor=ACTOR,
    )
    client, secret = env.registry.create_client(
        "keyed", auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor=ACTOR
    )
    assert secret is None and client.secrets == ()
    with pytest.raises(Conflict):
        env.registry.rotate_secret(client.client_id, actor=ACTOR)


# -- lifecycle events and failed operations ------------------------------------------------------


def test_lifecycle_operations_emit_events_with_their_actor(env: Env) -> None:
    agent = env.agent()
    assert sorted(env.events()) == ["agent.registered", "environment.created", "tenant.created"]
    steps: list[Callable[[], object]] = [
        lambda: env.client(agent),
        lambda: env.registry.rotate_secret(
            env.registry.store.list_clients(agent)[0].client_id, actor="bob"
        ),
        lambda: env.registry.set_agent_status(
            agent, AgentStatus.SUSPENDED, actor="bob", reason="review"
        ),
        lambda: env.registry.set_agent_status(agent, AgentStatus.ACTIVE, actor="bob"),
        lambda: env.registry.set_agent_status(agent, AgentStatus.QUARANTINED, actor="bob"),
        lambda: env.registry.set_agent_status(agent, AgentStatus.RETIRED, actor="bob"),
    ]
    for step in steps:  # one second apart, so the event order is the time order
        env.clock.advance(1)
        step()
    assert env.events()[3:] == [
        "client.created",
        "client.secret_rotated",
        "agent.suspended",
        "agent.active",
        "agent.quarantined",
        "agent.retired",
    ]
    events = env.services.registry_store.list_events(limit=100)
    suspended = next(e for e in events if e.type == "agent.suspended")
    assert (suspended.actor, suspended.subject, suspended.tenant_id) == (
        "bob",
        f"agent:{agent}",
        "acme",
    )
    assert suspended.data["reason"] == "review"


@pytest.mark.parametrize(
    "operation",
    [
        "duplicate agent",
        "bad owner",
        "bad scope",
        "retired to active",
        "client of a suspended agent",
    ],
)
def test_a_failed_operation_writes_nothing(env: Env, operation: str) -> None:
    env.agent()
    env.agent("retired-agent")
    env.registry.set_agent_status("retired-agent", AgentStatus.RETIRED, actor=ACTOR)
    env.agent("paused-agent")
    env.registry.set_agent_status("paused-agent", AgentStatus.SUSPENDED, actor=ACTOR)
    before = env.events()
    store = env.services.registry_store
    tenants = [t.id for t in store.list_tenants()]
    attempts: dict[str, Callable[[], object]] = {
        "duplicate agent": lambda: env.agent(),
        "bad owner": lambda: env.registry.register_agent(
            AgentSpec("new-agent", "newco", "prod", "not-an-email"), actor=ACTOR
        ),
        "bad scope": lambda: env.registry.register_agent(
            AgentSpec("new-agent", "newco", "prod", "a@example.com", allowed_scopes=("a b",)),
            actor=ACTOR,
        ),
        "retired to active": lambda: env.registry.set_agent_status(
            "retired-agent", AgentStatus.ACTIVE, actor=ACTOR
        ),
        "client of a suspended agent": lambda: env.registry.create_client(
            "paused-agent", actor=ACTOR
        ),
    }
    with pytest.raises((Conflict, InvalidRequest)):
        attempts[operation]()
    assert env.events() == before
    assert [t.id for t in store.list_tenants()] == tenants
    assert store.list_clients("paused-agent") == []
    assert store.get_agent("retired-agent").status is AgentStatus.RETIRED


# -- leaving active kills every live token ---------------------------------------------------------


@pytest.mark.parametrize(
    "status", [AgentStatus.SUSPENDED, AgentStatus.QUARANTINED, AgentStatus.RETIRED]
)
def test_leaving_active_kills_every_live_token_at_once(env: Env, status: AgentStatus) -> None:
    agent = env.agent()
    client, _ = env.client(agent)
    tokens = [env.token(client.client_id) for _ in range(3)]
    assert all(env.introspect(t)["active"] is True for t in tokens)
    env.clock.advance(0.5)
    env.registry.set_agent_status(agent, status, actor=ACTOR)
    for token in tokens:
        assert env.introspect(token) == {"active": False}
        verified = env.services.verifier.verify(token)  # the signature is still fine...
        with pytest.raises(TokenError) as err:  # ...but the subject is not
            asyncio.run(check_subject(verified, env.services.cache, env.services.revocation))
        assert err.value.code == "agent_inactive"
    if status is AgentStatus.RETIRED:
        return
    # Reactivation does not revive the tokens issued before the agent left active.
    env.clock.advance(1)
    env.registry.set_agent_status(agent, AgentStatus.ACTIVE, actor=ACTOR)
    for token in tokens:
        assert env.introspect(token) == {"active": False}
        with pytest.raises(TokenError) as err:
            asyncio.run(
                check_subject(
                    env.services.verifier.verify(token),
                    env.services.cache,
                    env.services.revocation,
                )
            )
        assert err.value.code == "token_revoked"
    env.clock.advance(1)
    assert env.introspect(env.token(client.client_id))["active"] is True


def test_introspection_of_an_expired_token_is_exactly_inactive(env: Env) -> None:
    client, _ = env.client(env.agent())
    token = env.token(client.client_id)
    exp = env.services.verifier.verify(token).exp
    # RFC 7662 §2.2: active only before its expiration time; the verifier's leeway is for other
    # replicas' clocks, not for the authorization server's own answer.
    env.clock.set(exp - 1)
    assert env.introspect(token)["active"] is True
    env.clock.set(exp)
    assert env.introspect(token) == {"active": False}


def test_a_retired_agent_gets_no_new_token(env: Env) -> None:
    agent = env.agent()
    client, _ = env.client(agent)
    env.registry.set_agent_status(agent, AgentStatus.RETIRED, actor=ACTOR)
    env.services.cache.invalidate()
    with pytest.raises(AegisError) as err:
        env.token(client.client_id)
    assert err.value.code == "unauthorized_client"


@pytest.mark.parametrize("status", [AgentStatus.SUSPENDED, AgentStatus.QUARANTINED])
def test_what_follows_a_status_change_can_be_retried(env: Env, status: AgentStatus) -> None:
    """The listeners (the CA revoking the agent's certificates) run once the status committed;
    one that failed could never be run again, since suspending a suspended agent was a conflict.
    Asking again now runs them again, and is recorded; nothing else changes."""
    agent_id = env.agent()
    calls: list[AgentStatus] = []

    def flaky(agent: Any) -> None:
        calls.append(agent.status)
        if len(calls) == 1:
            raise AegisError("the certificate store timed out", code="ca_unavailable")

    env.registry.status_listeners.append(flaky)
    with pytest.raises(AegisError, match="timed out"):
        env.registry.set_agent_status(agent_id, status, actor=ACTOR, reason="first")
    before = env.services.registry_store.get_agent(agent_id)
    again = env.registry.set_agent_status(agent_id, status, actor=ACTOR, reason="retry")
    assert calls == [status, status]
    assert again == before  # the same record: no new mark, no new update time
    recorded = [(e.type, e.data) for e in env.services.registry_store.list_events(limit=10_000)
                if e.type == f"agent.{status.value}"]  # fmt: skip
    assert sorted(recorded, key=str) == [
        (f"agent.{status.value}", {"reason": "first"}),
        (f"agent.{status.value}", {"reason": "retry", "reapplied": True}),
    ]
    env.registry.status_listeners.remove(flaky)
    env.registry.set_agent_status(agent_id, AgentStatus.RETIRED, actor=ACTOR)
    with pytest.raises(Conflict):  # retired stays retired
        env.registry.set_agent_status(agent_id, AgentStatus.ACTIVE, actor=ACTOR)


@pytest.mark.parametrize(
    "owner",
    [
        "alice\x07@example.com",
        "alice@example.com\x7f",
        "alice\u200b@example.com",  # zero-width space (format)
        "alice\u034f@example.com",  # combining grapheme joiner (a mark)
        "alice\ufe0f@example.com",  # variation selector
        "alice\u3164@example.com",  # Hangul filler (a letter)
    ],
)
def test_an_owner_with_an_invisible_character_is_refused(env: Env, owner: str) -> None:
    """An owner shown as alice@example.com must be her for separation of duties: one holding a
    control or format character is refused, on registration and on update, and the approvals'
    comparison drops such characters in any case."""
    from aegis.approvals.service import party

    assert party(owner) == party("alice@example.com")
    with pytest.raises(InvalidRequest) as info:
        env.registry.register_agent(AgentSpec("a1", "acme", "prod", owner), actor=ACTOR)
    assert info.value.details.get("field") == "owner"
    env.registry.register_agent(AgentSpec("a2", "acme", "prod", "bob@example.com"), actor=ACTOR)
    with pytest.raises(InvalidRequest):
        env.registry.update_agent("a2", actor=ACTOR, owner=owner)
    assert env.registry.store.get_agent("a2").owner == "bob@example.com"


def test_disabling_a_client_stops_the_secret_in_its_overlap(env: Env) -> None:
    """Disabling is the answer to a leak: the secret rotated away, still in its overlap, does
    not work again once the client is enabled; the current one does."""
    client, leaked = env.client(env.agent())
    env.clock.advance(10)
    _, fresh = env.registry.rotate_secret(client.client_id, actor=ACTOR)
    env.registry.check_secret(env.stored(client.client_id), leaked)  # the overlap, so far
    env.registry.set_client_active(client.client_id, False, actor=ACTOR)
    env.clock.advance(10)
    env.registry.set_client_active(client.client_id, True, actor=ACTOR)
    stored = env.stored(client.client_id)
    env.registry.check_secret(stored, fresh)
    with pytest.raises(ClientAuthError):
        env.registry.check_secret(stored, leaked)


@pytest.mark.parametrize("text", ["ok\nforged log line", "\x1b[2Jcleared", "fin\u200bance"])
def test_free_text_with_a_control_or_format_character_is_refused(env: Env, text: str) -> None:
    """A name written into a log line or a terminal forges what follows it (a line break, an
    escape sequence), and a role with an invisible character matches no rule: display names,
    versions, models, roles and admin-key names hold none, on registration and on update."""
    from aegis.types import AdminRole

    for field, spec in (
        ("display_name", AgentSpec("a1", "acme", "prod", "bob@example.com", display_name=text)),
        ("roles", AgentSpec("a1", "acme", "prod", "bob@example.com", roles=("ops", text))),
        ("model", AgentSpec("a1", "acme", "prod", "bob@example.com", model=text)),
    ):
        with pytest.raises(InvalidRequest) as info:
            env.registry.register_agent(spec, actor=ACTOR)
        assert info.value.details.get("field") == field
    env.registry.register_agent(AgentSpec("a2", "acme", "prod", "bob@example.com"), actor=ACTOR)
    with pytest.raises(InvalidRequest):
        env.registry.update_agent("a2", actor=ACTOR, display_name=text)
    with pytest.raises(InvalidRequest):
        env.registry.create_admin_key(text, AdminRole.AUDITOR, actor=ACTOR)
    assert env.registry.store.get_agent("a2").display_name == "a2"

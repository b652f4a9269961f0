"""Disabling a client or suspending a tenant ends the tokens issued before it for good: enabling
the client or reactivating the tenant again does not bring them back (the "disable the client,
rotate the leaked secret, re-enable" case)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from aegis.clock import FrozenClock
from aegis.config import load_config
from aegis.errors import TokenError, Unavailable
from aegis.server.services import build_services
from aegis.tokens.subject import check_subject
from aegis.types import AgentStatus, TenantStatus
from tests.registry.test_service import ACTOR, T0, Env
from tests.support.server import write_dev_config


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Env]:
    clock = FrozenClock(T0)
    services = build_services(
        load_config(write_dev_config(tmp_path, 8080), environ={}), clock=clock
    )
    try:
        yield Env(services, clock)
    finally:
        asyncio.run(services.aclose())


def _refusal(reg: Env, token: str) -> str | None:
    """The subject check's code for ``token`` (None: accepted), read past the registry cache."""
    reg.services.cache.invalidate()
    verified = reg.services.verifier.verify(token)  # the signature and claims are still fine
    try:
        asyncio.run(check_subject(verified, reg.services.cache, reg.services.revocation))
    except TokenError as exc:
        return exc.code
    return None


def test_a_re_enabled_client_does_not_bring_back_its_earlier_tokens(reg: Env) -> None:
    client, _ = reg.client(reg.agent())
    old = reg.token(client.client_id)
    assert _refusal(reg, old) is None
    reg.clock.advance(1)
    reg.registry.set_client_active(client.client_id, False, actor=ACTOR)
    assert _refusal(reg, old) == "client_inactive"
    reg.registry.rotate_secret(client.client_id, actor=ACTOR)
    reg.clock.advance(1)
    reg.registry.set_client_active(client.client_id, True, actor=ACTOR)
    assert _refusal(reg, old) == "token_revoked"
    assert reg.introspect(old) == {"active": False}
    reg.clock.advance(1)
    fresh = reg.token(client.client_id)
    assert _refusal(reg, fresh) is None
    assert reg.introspect(fresh)["active"] is True


def test_disabling_a_client_twice_never_moves_the_mark_back(reg: Env) -> None:
    agent = reg.agent()
    client, _ = reg.client(agent)
    reg.clock.advance(10)
    reg.registry.set_client_active(client.client_id, False, actor=ACTOR)
    mark = reg.stored(client.client_id).tokens_not_before
    assert mark == T0 + 10
    reg.clock.set(T0 + 5)  # a clock stepped back
    reg.registry.set_client_active(client.client_id, False, actor=ACTOR)
    assert reg.stored(client.client_id).tokens_not_before == mark
    reg.registry.set_client_active(client.client_id, True, actor=ACTOR)
    assert reg.stored(client.client_id).tokens_not_before == mark  # enabling keeps it


def test_disabling_one_client_leaves_the_agents_other_clients_tokens(reg: Env) -> None:
    """The mark is the client's own: an operator disabling a leaked client does not cut off the
    same agent's other credentials, and the agent's own mark does not move."""
    agent = reg.agent()
    leaked, _ = reg.client(agent)
    other, _ = reg.client(agent)
    old_leaked, old_other = reg.token(leaked.client_id), reg.token(other.client_id)
    reg.clock.advance(1)
    reg.registry.set_client_active(leaked.client_id, False, actor=ACTOR)
    reg.clock.advance(1)
    reg.registry.set_client_active(leaked.client_id, True, actor=ACTOR)
    assert _refusal(reg, old_leaked) == "token_revoked"
    assert _refusal(reg, old_other) is None
    assert reg.services.registry_store.get_agent(agent).tokens_not_before == 0.0


def test_a_reactivated_tenant_does_not_bring_back_its_earlier_tokens(reg: Env) -> None:
    first, _ = reg.client(reg.agent("finance-agent"))
    second, _ = reg.client(reg.agent("ops-agent"))
    outsider, _ = reg.client(reg.agent("globex-agent", tenant="globex"))
    old = [reg.token(c.client_id) for c in (first, second)]
    untouched = reg.token(outsider.client_id)
    reg.clock.advance(1)
    reg.registry.set_tenant_status("acme", TenantStatus.SUSPENDED, actor=ACTOR)
    assert [_refusal(reg, t) for t in old] == ["token_revoked", "token_revoked"]
    reg.clock.advance(1)
    reg.registry.set_tenant_status("acme", TenantStatus.ACTIVE, actor=ACTOR)
    assert [_refusal(reg, t) for t in old] == ["token_revoked", "token_revoked"]
    assert _refusal(reg, untouched) is None  # another tenant's tokens are not affected
    reg.clock.advance(1)
    assert [_refusal(reg, reg.token(c.client_id)) for c in (first, second)] == [None, None]


def _minted_by_a_stale_replica(reg: Env, client_id: str) -> str:
    """A token issued now by a token service whose registry cache has not yet seen the latest
    status change (or whose clock runs ahead): signed and well-formed, ``iat`` now."""
    client = reg.stored(client_id)
    agent = reg.services.registry_store.get_agent(client.agent_id)
    return reg.services.issuer.issue(
        agent_id=agent.id, client_id=client_id, tenant=agent.tenant_id, env=agent.env,
        scopes=("p:w",), audience=("aegis-gateway",), lifetime=3600,
    ).token  # fmt: skip


@pytest.mark.parametrize("what", ["agent", "tenant", "client"])
def test_tokens_issued_while_inactive_stay_dead_after_reactivation(reg: Env, what: str) -> None:
    """Refused while the agent, its tenant or its client is inactive, a token minted in that time
    (a replica that had not seen the change yet) is not revived by the return to active. In the
    rest of the reactivation's second a token service asks for a moment (a whole-second iat would
    read as before the return); from the next second its tokens are good."""
    agent = reg.agent()
    client, _ = reg.client(agent)
    change = {
        "agent": lambda active: reg.registry.set_agent_status(
            agent, AgentStatus.ACTIVE if active else AgentStatus.SUSPENDED, actor=ACTOR),
        "tenant": lambda active: reg.registry.set_tenant_status(
            "acme", TenantStatus.ACTIVE if active else TenantStatus.SUSPENDED, actor=ACTOR),
        "client": lambda active: reg.registry.set_client_active(
            client.client_id, active, actor=ACTOR),
    }[what]  # fmt: skip
    reg.clock.advance(100.9)
    change(False)
    reg.clock.advance(0.1)  # a whole second now: iat is past the mark (100.9)
    stale = _minted_by_a_stale_replica(reg, client.client_id)
    assert _refusal(reg, stale) in ("agent_inactive", "tenant_inactive", "client_inactive")
    reg.clock.advance(60.5)
    change(True)
    assert _refusal(reg, stale) == "token_revoked"
    reg.clock.advance(0.2)  # the same second as the reactivation (iat rounds down)
    with pytest.raises(Unavailable) as info:
        reg.token(client.client_id)
    assert (info.value.code, info.value.details["retry_after"]) == ("credentials_settling", 1)
    reg.clock.advance(0.3)
    assert _refusal(reg, reg.token(client.client_id)) is None


def test_activating_what_is_already_active_ends_no_token(reg: Env) -> None:
    """Only a return to active moves the mark: re-activating an active tenant or enabling an
    enabled client (an operator's retry, a script run twice) leaves every live token alone."""
    client, _ = reg.client(reg.agent())
    token = reg.token(client.client_id)
    reg.clock.advance(5)
    reg.registry.set_tenant_status("acme", TenantStatus.ACTIVE, actor=ACTOR)
    reg.registry.set_client_active(client.client_id, True, actor=ACTOR)
    assert _refusal(reg, token) is None

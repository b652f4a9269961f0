"""Operator actions shared by the admin API and the CLI, free of HTTP: JSON views and operations.

The views are the one JSON shape of each record, so ``aegis ... --json`` prints exactly what the
admin API answers. They never contain secret material: client secrets and admin keys appear only
as creation dates (their hashes stay in the store), signing keys only as kid, state and dates.

Operations that touch more than the registry (minting a token, rotating keys, releasing a
quarantined agent) live here so both front ends apply the same checks and write the same events.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from aegis.clock import new_id
from aegis.errors import AccessDenied, Conflict
from aegis.oauth.service import TokenRequest
from aegis.server.services import Services
from aegis.types import (
    AdminKey,
    Agent,
    AgentStatus,
    Client,
    ClientAuthMethod,
    Event,
    SigningKeyRecord,
    Tenant,
)

__all__ = [
    "MINTABLE_METHODS",
    "STATUS_VERBS",
    "admin_key_view",
    "agent_view",
    "client_view",
    "event_view",
    "key_view",
    "mint_token",
    "rotate_keys",
    "set_agent_status",
    "tenant_view",
]

#: Clients whose tokens an operator may mint directly. Tokens of DPoP-bound and certificate-bound
#: clients must carry a proof of possession (cnf); minting one without it would hand out a bearer
#: token the client itself could never obtain, so those clients are never picked.
MINTABLE_METHODS = frozenset(
    {
        ClientAuthMethod.CLIENT_SECRET_BASIC,
        ClientAuthMethod.CLIENT_SECRET_POST,
        ClientAuthMethod.PRIVATE_KEY_JWT,
    }
)

#: The verb that moves an agent into each status (admin API paths and CLI commands).
STATUS_VERBS: dict[AgentStatus, str] = {
    AgentStatus.SUSPENDED: "suspend",
    AgentStatus.QUARANTINED: "quarantine",
    AgentStatus.RETIRED: "retire",
    AgentStatus.ACTIVE: "activate",
}


def tenant_view(t: Tenant) -> dict[str, Any]:
    return {
        "id": t.id,
        "display_name": t.display_name,
        "status": t.status.value,
        "created_at": t.created_at,
    }


def agent_view(a: Agent) -> dict[str, Any]:
    return {
        "id": a.id,
        "tenant": a.tenant_id,
        "env": a.env,
        "display_name": a.display_name,
        "owner": a.owner,
        "status": a.status.value,
        "roles": list(a.roles),
        "scopes": list(a.allowed_scopes),
        "software_version": a.software_version,
        "model": a.model,
        "attributes": a.attributes,
        "jwks": list(a.jwks),
        "created_at": a.created_at,
        "updated_at": a.updated_at,
        "tokens_not_before": a.tokens_not_before,
    }


def client_view(c: Client) -> dict[str, Any]:
    return {
        "client_id": c.client_id,
        "agent_id": c.agent_id,
        "auth_method": c.auth_method.value,
        "active": c.active,
        "dpop_bound": c.dpop_bound,
        "tls_san_uri": c.tls_san_uri,
        "created_at": c.created_at,
        # Dates only: the keyed hashes never leave the store.
        "secrets": [{"created_at": s.created_at, "expires_at": s.expires_at} for s in c.secrets],
    }


def key_view(r: SigningKeyRecord) -> dict[str, Any]:
    """A signing key by kid, state and dates; never the encrypted private blob."""
    return {
        "kid": r.kid,
        "alg": r.alg,
        "state": r.state.value,
        "created_at": r.created_at,
        "activated_at": r.activated_at,
        "retired_at": r.retired_at,
        "remove_after": r.remove_after,
    }


def event_view(e: Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": e.at,
        "type": e.type,
        "actor": e.actor,
        "subject": e.subject,
        "tenant": e.tenant_id,
        "data": e.data,
    }


def admin_key_view(k: AdminKey) -> dict[str, Any]:
    return {
        "key_id": k.key_id,
        "name": k.name,
        "role": k.role.value,
        "created_at": k.created_at,
        "revoked": k.revoked,
    }


def _record(
    services: Services,
    type_: str,
    actor: str,
    subject: str,
    tenant: str | None = None,
    **data: Any,
) -> None:
    event = Event(new_id(), services.clock.now(), type_, actor, subject, tenant, data)
    services.registry_store.append_event(event)


def set_agent_status(
    services: Services,
    agent_id: str,
    status: AgentStatus,
    *,
    reason: str,
    actor: str,
    may_release_quarantine: bool,
) -> Agent:
    """Change an agent's status. Leaving quarantine needs ``may_release_quarantine`` (admins only):
    a quarantined agent is under investigation.

    Activation checks and changes in one transaction, so an agent quarantined meanwhile is not
    released by a key that may not. Other changes run the registry's status listeners (the CA
    revokes certificates, writing to the same database), which must not wait on an open write
    transaction of ours, so they go straight to the registry."""
    if status is not AgentStatus.ACTIVE:
        agent = services.registry.set_agent_status(agent_id, status, actor=actor, reason=reason)
        services.cache.invalidate()
        return agent
    store = services.registry_store
    with store.atomic():
        if (
            store.get_agent(agent_id).status is AgentStatus.QUARANTINED
            and not may_release_quarantine
        ):
            raise AccessDenied(
                f"agent {agent_id} is quarantined; only an admin key may release it",
                code="forbidden",
            )
        agent = services.registry.set_agent_status(agent_id, status, actor=actor, reason=reason)
    services.cache.invalidate()
    return agent


def _pick_client(services: Services, agent_id: str, client_id: str | None) -> Client:
    store = services.registry_store
    if client_id is not None:
        client = store.get_client(client_id)
        if client.agent_id != agent_id:
            raise Conflict(f"client {client_id} does not belong to agent {agent_id}")
        if not client.active:
            raise Conflict(f"client {client_id} is disabled; enable it first")
        if client.dpop_bound or client.auth_method not in MINTABLE_METHODS:
            raise Conflict(
                f"client {client_id} needs proof-of-possession tokens; use the token endpoint"
            )
        return client
    for client in store.list_clients(agent_id):
        if client.active and not client.dpop_bound and client.auth_method in MINTABLE_METHODS:
            return client
    store.get_agent(agent_id)  # an unknown agent is not_found, not a missing client
    raise Conflict(
        f"agent {agent_id} has no active client without proof-of-possession; "
        f"create one with `aegis clients create {agent_id}`"
    )


def mint_token(
    services: Services,
    agent_id: str,
    *,
    actor: str,
    client_id: str | None = None,
    scopes: tuple[str, ...] = (),
    audiences: tuple[str, ...] = (),
    lifetime: int | None = None,
) -> dict[str, Any]:
    """Issue an access token for an agent exactly as the token endpoint would (same scope
    narrowing, audience and lifetime caps, agent and tenant checks), and record who asked."""
    client = _pick_client(services, agent_id, client_id)
    issued = services.tokens.client_credentials(
        client, TokenRequest(scopes=scopes, audiences=audiences, lifetime=lifetime)
    )
    claims = issued.claims
    _record(
        services,
        "token.minted",
        actor,
        f"agent:{agent_id}",
        claims["tenant"],
        client=client.client_id,
        jti=claims["jti"],
        scope=claims["scope"],
        exp=claims["exp"],
    )
    return {
        "access_token": issued.token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
        "scope": claims["scope"],
        "jti": claims["jti"],
        "agent_id": agent_id,
        "client_id": client.client_id,
    }


def rotate_keys(services: Services, *, force: bool, actor: str) -> dict[str, Any]:
    """Rotate the signing keys (see KeyRing.rotate) and record it. Where the key store keeps its
    table in the registry's database, the event is written in the rotation's own transaction: a
    rotation never commits unrecorded (an operator retrying it would rotate twice)."""

    def event(active: SigningKeyRecord) -> Event:
        return Event(new_id(), services.clock.now(), "keys.rotated", actor, f"key:{active.kid}",
                     None, {"force": force})  # fmt: skip

    if _same_database(services.key_store, services.registry_store):
        active = services.keyring.rotate(force=force, event=event)
    else:
        active = services.keyring.rotate(force=force)
        services.registry_store.append_event(event(active))
    return {"active": active.kid, "keys": [key_view(r) for r in services.keyring.records()]}


def _same_database(one: object, other: object) -> bool:
    """Whether two SQL stores keep their tables in one database."""
    a, b = getattr(one, "engine", None), getattr(other, "engine", None)
    return isinstance(a, Engine) and isinstance(b, Engine) and a.url == b.url

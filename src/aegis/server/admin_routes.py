"""The admin API routes: tenants, agents, clients, keys, events, tokens and admin keys.

Every route names its role with one of the ``Reader``/``Operator``/``Admin`` dependencies (a test
checks each route against each role). Routes are ``def``: they run in the thread pool because the
stores are synchronous. After every registry write the in-process cache is dropped, so this
process never serves a stale record; other processes see the change within the cache lifetime.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from aegis.errors import Conflict, InvalidRequest
from aegis.registry.service import AgentSpec
from aegis.server.admin_auth import Admin, Operator, Reader, actor
from aegis.server.admin_models import (
    AdminKeyIn,
    AgentIn,
    AgentPatch,
    ClientIn,
    ReasonIn,
    RotateIn,
    SecretRotateIn,
    TokenIn,
)
from aegis.server.admin_ops import (
    STATUS_VERBS,
    admin_key_view,
    agent_view,
    client_view,
    event_view,
    key_view,
    mint_token,
    rotate_keys,
    set_agent_status,
    tenant_view,
)
from aegis.server.services import Services
from aegis.types import AdminRole, AgentStatus, TenantStatus

__all__ = ["router"]

router = APIRouter(prefix="/admin")


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


Svc = Annotated[Services, Depends(_services)]


# -- tenants -------------------------------------------------------------------------------


@router.get("/tenants")
def list_tenants(key: Reader, s: Svc) -> dict[str, Any]:
    return {"items": [tenant_view(t) for t in s.registry_store.list_tenants()]}


@router.post("/tenants/{tenant_id}/suspend")
def suspend_tenant(tenant_id: str, key: Operator, s: Svc) -> dict[str, Any]:
    tenant = s.registry.set_tenant_status(tenant_id, TenantStatus.SUSPENDED, actor=actor(key))
    s.cache.invalidate()
    return tenant_view(tenant)


@router.post("/tenants/{tenant_id}/activate")
def activate_tenant(tenant_id: str, key: Operator, s: Svc) -> dict[str, Any]:
    tenant = s.registry.set_tenant_status(tenant_id, TenantStatus.ACTIVE, actor=actor(key))
    s.cache.invalidate()
    return tenant_view(tenant)


# -- agents --------------------------------------------------------------------------------


@router.post("/agents", status_code=201)
def register_agent(body: AgentIn, key: Operator, s: Svc) -> dict[str, Any]:
    spec = AgentSpec(
        id=body.id,
        tenant_id=body.tenant,
        env=body.env,
        owner=body.owner,
        display_name=body.display_name,
        roles=tuple(body.roles),
        allowed_scopes=tuple(body.scopes),
        software_version=body.software_version,
        model=body.model,
        attributes=body.attributes,
        jwks=tuple(body.jwks),
    )
    agent = s.registry.register_agent(spec, actor=actor(key))
    s.cache.invalidate()
    return agent_view(agent)


@router.get("/agents")
def list_agents(
    key: Reader,
    s: Svc,
    tenant: str | None = None,
    env: str | None = None,
    status: AgentStatus | None = None,
) -> dict[str, Any]:
    agents = s.registry_store.list_agents(tenant_id=tenant, env=env, status=status)
    return {"items": [agent_view(a) for a in agents]}


@router.get("/agents/{agent_id}")
def get_agent(agent_id: str, key: Reader, s: Svc) -> dict[str, Any]:
    return agent_view(s.registry_store.get_agent(agent_id))


_NOT_NULL = ("display_name", "owner", "roles", "scopes", "attributes", "jwks")


@router.patch("/agents/{agent_id}")
def update_agent(agent_id: str, body: AgentPatch, key: Operator, s: Svc) -> dict[str, Any]:
    fields = body.model_dump(exclude_unset=True)
    if not fields:
        raise InvalidRequest("nothing to update: send at least one field")
    for name in _NOT_NULL:
        if name in fields and fields[name] is None:
            raise InvalidRequest(f"{name} cannot be null", field=name)
    if "scopes" in fields:
        fields["allowed_scopes"] = tuple(fields.pop("scopes"))
    agent = s.registry.update_agent(
        agent_id, actor=actor(key), may_change_quarantined=key.role is AdminRole.ADMIN, **fields
    )
    s.cache.invalidate()
    return agent_view(agent)


def _status_route(status: AgentStatus) -> None:
    def change(agent_id: str, body: ReasonIn, key: Operator, s: Svc) -> dict[str, Any]:
        agent = set_agent_status(
            s,
            agent_id,
            status,
            reason=body.reason,
            actor=actor(key),
            may_release_quarantine=key.role is AdminRole.ADMIN,
        )
        return agent_view(agent)

    verb = STATUS_VERBS[status]
    change.__name__ = f"{verb}_agent"
    router.post(f"/agents/{{agent_id}}/{verb}", name=change.__name__)(change)


for _status in STATUS_VERBS:
    _status_route(_status)


# -- clients -------------------------------------------------------------------------------


@router.post("/clients", status_code=201)
def create_client(body: ClientIn, key: Operator, s: Svc) -> dict[str, Any]:
    client, secret = s.registry.create_client(
        body.agent_id,
        auth_method=body.auth_method,
        dpop_bound=body.dpop_bound,
        tls_san_uri=body.tls_san_uri,
        actor=actor(key),
    )
    s.cache.invalidate()
    # The secret in clear is answered this once; only its keyed hash is stored.
    return {**client_view(client), "client_secret": secret}


@router.get("/clients")
def list_clients(key: Reader, s: Svc, agent_id: Annotated[str, Query()]) -> dict[str, Any]:
    s.registry_store.get_agent(agent_id)  # an unknown agent is not_found, not an empty list
    return {"items": [client_view(c) for c in s.registry_store.list_clients(agent_id)]}


@router.get("/clients/{client_id}")
def get_client(client_id: str, key: Reader, s: Svc) -> dict[str, Any]:
    return client_view(s.registry_store.get_client(client_id))


@router.post("/clients/{client_id}/rotate-secret")
def rotate_secret(
    client_id: str, key: Operator, s: Svc, body: SecretRotateIn | None = None
) -> dict[str, Any]:
    client, secret = s.registry.rotate_secret(
        client_id,
        actor=actor(key),
        may_change_quarantined=key.role is AdminRole.ADMIN,
        revoke_previous=body is not None and body.revoke_previous,
    )
    s.cache.invalidate()
    return {**client_view(client), "client_secret": secret}


@router.post("/clients/{client_id}/disable")
def disable_client(client_id: str, key: Operator, s: Svc) -> dict[str, Any]:
    client = s.registry.set_client_active(client_id, False, actor=actor(key))
    s.cache.invalidate()
    return client_view(client)


@router.post("/clients/{client_id}/enable")
def enable_client(client_id: str, key: Operator, s: Svc) -> dict[str, Any]:
    client = s.registry.set_client_active(
        client_id, True, actor=actor(key), may_change_quarantined=key.role is AdminRole.ADMIN
    )
    s.cache.invalidate()
    return client_view(client)


# -- signing keys, events, tokens ----------------------------------------------------------


@router.get("/keys")
def list_keys(key: Reader, s: Svc) -> dict[str, Any]:
    s.keyring.load()  # rotations by other processes show at once
    return {"items": [key_view(r) for r in s.keyring.records()]}


@router.post("/keys/rotate")
def rotate(key: Operator, s: Svc, body: RotateIn | None = None) -> dict[str, Any]:
    return rotate_keys(s, force=bool(body and body.force), actor=actor(key))


@router.get("/events")
def list_events(
    key: Reader,
    s: Svc,
    since: Annotated[float, Query(ge=0)] = 0.0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    return {
        "items": [event_view(e) for e in s.registry_store.list_events(since=since, limit=limit)]
    }


@router.post("/tokens", status_code=201)
def mint(body: TokenIn, key: Operator, s: Svc) -> dict[str, Any]:
    return mint_token(
        s,
        body.agent_id,
        actor=actor(key),
        client_id=body.client_id,
        scopes=tuple(body.scopes),
        audiences=tuple(body.audience),
        lifetime=body.lifetime,
    )


# -- admin keys ----------------------------------------------------------------------------


@router.get("/admin-keys")
def list_admin_keys(key: Admin, s: Svc) -> dict[str, Any]:
    return {"items": [admin_key_view(k) for k in s.registry_store.list_admin_keys()]}


@router.post("/admin-keys", status_code=201)
def create_admin_key(body: AdminKeyIn, key: Admin, s: Svc) -> dict[str, Any]:
    created, secret = s.registry.create_admin_key(body.name, body.role, actor=actor(key))
    # The key in clear is answered this once; only its keyed hash is stored.
    return {**admin_key_view(created), "secret": secret}


@router.post("/admin-keys/{key_id}/revoke")
def revoke_admin_key(key_id: str, key: Admin, s: Svc) -> dict[str, Any]:
    store = s.registry_store
    with store.atomic():
        target = store.get_admin_key(key_id)
        live_admins = [
            k for k in store.list_admin_keys() if k.role is AdminRole.ADMIN and not k.revoked
        ]
        if target.role is AdminRole.ADMIN and not target.revoked and len(live_admins) <= 1:
            raise Conflict("this is the last active admin key; create another admin key first")
        revoked = s.registry.revoke_admin_key(key_id, actor=actor(key))
    return admin_key_view(revoked)

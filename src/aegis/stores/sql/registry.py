"""The registry store on SQL (SQLite or PostgreSQL), SQLAlchemy 2 Core.

Records map to rows here; transactions, value checks and error translation are in
:mod:`aegis.stores.sql.connection`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, select

from aegis.errors import InvalidRequest
from aegis.stores.sql.connection import SqlBase, check_values, storable
from aegis.stores.sql.engine import HOT_PATH_STATEMENT_TIMEOUT
from aegis.stores.sql.schema import ADMIN_KEYS, AGENTS, CLIENTS, ENVIRONMENTS, EVENTS, TENANTS
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

__all__ = ["SqlBase", "SqlRegistryStore"]


def _agent_row(a: Agent) -> dict[str, Any]:
    return {
        "id": a.id,
        "tenant_id": a.tenant_id,
        "env": a.env,
        "display_name": a.display_name,
        "owner": a.owner,
        "status": a.status.value,
        "created_at": a.created_at,
        "updated_at": a.updated_at,
        "roles": list(a.roles),
        "allowed_scopes": list(a.allowed_scopes),
        "software_version": a.software_version,
        "model": a.model,
        "attributes": a.attributes,
        "jwks": list(a.jwks),
        "tokens_not_before": a.tokens_not_before,
    }


def _agent(r: Row[Any]) -> Agent:
    return Agent(
        id=r.id,
        tenant_id=r.tenant_id,
        env=r.env,
        display_name=r.display_name,
        owner=r.owner,
        status=AgentStatus(r.status),
        created_at=r.created_at,
        updated_at=r.updated_at,
        roles=tuple(r.roles),
        allowed_scopes=tuple(r.allowed_scopes),
        software_version=r.software_version,
        model=r.model,
        attributes=dict(r.attributes),
        jwks=tuple(r.jwks),
        tokens_not_before=r.tokens_not_before,
    )


def _client_row(c: Client) -> dict[str, Any]:
    return {
        "client_id": c.client_id,
        "agent_id": c.agent_id,
        "auth_method": c.auth_method.value,
        "created_at": c.created_at,
        "active": c.active,
        "dpop_bound": c.dpop_bound,
        "tls_san_uri": c.tls_san_uri,
        "tokens_not_before": c.tokens_not_before,
        "secrets": [
            {"hash": s.hash, "created_at": s.created_at, "expires_at": s.expires_at}
            for s in c.secrets
        ],
    }


def _client(r: Row[Any]) -> Client:
    return Client(
        client_id=r.client_id,
        agent_id=r.agent_id,
        auth_method=ClientAuthMethod(r.auth_method),
        created_at=r.created_at,
        active=bool(r.active),
        dpop_bound=bool(r.dpop_bound),
        tls_san_uri=r.tls_san_uri,
        tokens_not_before=float(r.tokens_not_before),
        secrets=tuple(ClientSecret(s["hash"], s["created_at"], s["expires_at"]) for s in r.secrets),
    )


class SqlRegistryStore(SqlBase):
    #: The gateway reads agents, clients and tenants on its calls' path: a database that stalls
    #: (a lock held, a server that stopped answering) must turn into ``registry_unavailable``
    #: within a bounded time, not hold the call, and every call behind it, indefinitely.
    statement_timeout = HOT_PATH_STATEMENT_TIMEOUT

    # -- tenants ---------------------------------------------------------------------------
    def create_tenant(self, tenant: Tenant) -> None:
        self._insert(
            TENANTS,
            {
                "id": tenant.id,
                "display_name": tenant.display_name,
                "status": tenant.status.value,
                "created_at": tenant.created_at,
            },
            "tenant",
        )

    def get_tenant(self, tenant_id: str) -> Tenant:
        r = self._one(TENANTS, tenant_id, "id", "tenant")
        return Tenant(r.id, r.display_name, TenantStatus(r.status), r.created_at)

    def list_tenants(self) -> list[Tenant]:
        with self._connection() as conn:
            rows = conn.execute(select(TENANTS).order_by(TENANTS.c.id)).all()
        return [Tenant(r.id, r.display_name, TenantStatus(r.status), r.created_at) for r in rows]

    def update_tenant(self, tenant: Tenant) -> None:
        self._update(
            TENANTS,
            "id",
            tenant.id,
            {"display_name": tenant.display_name, "status": tenant.status.value},
            "tenant",
        )

    # -- environments ----------------------------------------------------------------------
    def create_environment(self, env: Environment) -> None:
        self._insert(
            ENVIRONMENTS,
            {"tenant_id": env.tenant_id, "name": env.name, "created_at": env.created_at},
            "environment",
        )

    def list_environments(self, tenant_id: str) -> list[Environment]:
        if not storable(tenant_id):
            return []
        with self._connection() as conn:
            rows = conn.execute(
                select(ENVIRONMENTS)
                .where(ENVIRONMENTS.c.tenant_id == tenant_id)
                .order_by(ENVIRONMENTS.c.name)
            ).all()
        return [Environment(r.tenant_id, r.name, r.created_at) for r in rows]

    # -- agents ----------------------------------------------------------------------------
    def create_agent(self, agent: Agent) -> None:
        self._insert(AGENTS, _agent_row(agent), "agent")

    def get_agent(self, agent_id: str) -> Agent:
        return _agent(self._one(AGENTS, agent_id, "id", "agent"))

    def list_agents(
        self,
        *,
        tenant_id: str | None = None,
        env: str | None = None,
        status: AgentStatus | None = None,
    ) -> list[Agent]:
        if not all(storable(f) for f in (tenant_id, env) if f is not None):
            return []
        q = select(AGENTS).order_by(AGENTS.c.id)
        if tenant_id is not None:
            q = q.where(AGENTS.c.tenant_id == tenant_id)
        if env is not None:
            q = q.where(AGENTS.c.env == env)
        if status is not None:
            q = q.where(AGENTS.c.status == status.value)
        with self._connection() as conn:
            return [_agent(r) for r in conn.execute(q).all()]

    def check_agent(self, agent: Agent) -> None:
        check_values(AGENTS, _agent_row(agent), "agent")

    def update_agent(self, agent: Agent) -> None:
        row = _agent_row(agent)
        del row["id"], row["created_at"]
        self._update(AGENTS, "id", agent.id, row, "agent")

    # -- clients ---------------------------------------------------------------------------
    def create_client(self, client: Client) -> None:
        self._insert(CLIENTS, _client_row(client), "client")

    def get_client(self, client_id: str) -> Client:
        return _client(self._one(CLIENTS, client_id, "client_id", "client"))

    def list_clients(self, agent_id: str) -> list[Client]:
        if not storable(agent_id):
            return []
        with self._connection() as conn:
            rows = conn.execute(
                select(CLIENTS)
                .where(CLIENTS.c.agent_id == agent_id)
                .order_by(CLIENTS.c.created_at, CLIENTS.c.client_id)
            ).all()
        return [_client(r) for r in rows]

    def update_client(self, client: Client) -> None:
        row = _client_row(client)
        del row["client_id"], row["created_at"]
        self._update(CLIENTS, "client_id", client.client_id, row, "client")

    # -- admin keys ------------------------------------------------------------------------
    def create_admin_key(self, key: AdminKey) -> None:
        self._insert(
            ADMIN_KEYS,
            {
                "key_id": key.key_id,
                "name": key.name,
                "role": key.role.value,
                "hash": key.hash,
                "created_at": key.created_at,
                "revoked": key.revoked,
            },
            "admin key",
        )

    def get_admin_key(self, key_id: str) -> AdminKey:
        r = self._one(ADMIN_KEYS, key_id, "key_id", "admin key")
        return AdminKey(r.key_id, r.name, AdminRole(r.role), r.hash, r.created_at, bool(r.revoked))

    def list_admin_keys(self) -> list[AdminKey]:
        with self._connection() as conn:
            rows = conn.execute(
                select(ADMIN_KEYS).order_by(ADMIN_KEYS.c.created_at, ADMIN_KEYS.c.key_id)
            ).all()
        return [
            AdminKey(r.key_id, r.name, AdminRole(r.role), r.hash, r.created_at, bool(r.revoked))
            for r in rows
        ]

    def update_admin_key(self, key: AdminKey) -> None:
        self._update(
            ADMIN_KEYS,
            "key_id",
            key.key_id,
            {"name": key.name, "role": key.role.value, "revoked": key.revoked},
            "admin key",
        )

    # -- events ----------------------------------------------------------------------------
    def append_event(self, event: Event) -> None:
        self._insert(
            EVENTS,
            {
                "id": event.id,
                "at": event.at,
                "type": event.type,
                "actor": event.actor,
                "subject": event.subject,
                "tenant_id": event.tenant_id,
                "data": event.data,
            },
            "event",
        )

    def list_events(self, *, since: float = 0.0, limit: int = 1000) -> list[Event]:
        if limit < 0:  # SQLite reads a negative LIMIT as "no limit", PostgreSQL refuses it
            raise InvalidRequest("limit must not be negative", field="limit")
        with self._connection() as conn:
            rows = conn.execute(
                select(EVENTS)
                .where(EVENTS.c.at >= since)
                .order_by(EVENTS.c.at, EVENTS.c.id)
                .limit(limit)
            ).all()
        return [
            Event(r.id, r.at, r.type, r.actor, r.subject, r.tenant_id, dict(r.data)) for r in rows
        ]

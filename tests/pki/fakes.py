"""An in-memory RegistryStore for the PKI tests: a fake with the contract's behaviour, not a mock.

The SQL and Redis stores are contract-tested elsewhere; the PKI needs only a registry that keeps
records, raises NotFound/Conflict like the contract says and commits ``atomic()`` blocks whole.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from aegis.errors import Conflict, NotFound
from aegis.types import (
    AdminKey,
    Agent,
    AgentStatus,
    Client,
    Environment,
    Event,
    Tenant,
)


class MemoryRegistryStore:
    def __init__(self) -> None:
        self._t: dict[str, Any] = {
            "tenants": {}, "envs": {}, "agents": {}, "clients": {}, "admin": {}, "events": []
        }  # fmt: skip

    @contextmanager
    def atomic(self) -> Iterator[None]:
        saved = copy.deepcopy(self._t)
        try:
            yield
        except BaseException:
            self._t = saved
            raise

    def _create(self, table: str, key: str, value: object) -> None:
        if key in self._t[table]:
            raise Conflict(f"{key} exists")
        self._t[table][key] = value

    def _get(self, table: str, key: str) -> Any:
        try:
            return self._t[table][key]
        except KeyError:
            raise NotFound(f"{key} not found") from None

    def _update(self, table: str, key: str, value: object) -> None:
        self._get(table, key)
        self._t[table][key] = value

    def create_tenant(self, tenant: Tenant) -> None:
        self._create("tenants", tenant.id, tenant)

    def get_tenant(self, tenant_id: str) -> Tenant:
        return self._get("tenants", tenant_id)  # type: ignore[no-any-return]

    def list_tenants(self) -> list[Tenant]:
        return list(self._t["tenants"].values())

    def update_tenant(self, tenant: Tenant) -> None:
        self._update("tenants", tenant.id, tenant)

    def create_environment(self, env: Environment) -> None:
        self._create("envs", f"{env.tenant_id}/{env.name}", env)

    def list_environments(self, tenant_id: str) -> list[Environment]:
        return [e for e in self._t["envs"].values() if e.tenant_id == tenant_id]

    def create_agent(self, agent: Agent) -> None:
        self._create("agents", agent.id, agent)

    def get_agent(self, agent_id: str) -> Agent:
        return self._get("agents", agent_id)  # type: ignore[no-any-return]

    def list_agents(
        self,
        *,
        tenant_id: str | None = None,
        env: str | None = None,
        status: AgentStatus | None = None,
    ) -> list[Agent]:
        return [
            a
            for a in self._t["agents"].values()
            if (tenant_id is None or a.tenant_id == tenant_id)
            and (env is None or a.env == env)
            and (status is None or a.status is status)
        ]

    def update_agent(self, agent: Agent) -> None:
        self._update("agents", agent.id, agent)

    def check_agent(self, agent: Agent) -> None:
        return None

    def create_client(self, client: Client) -> None:
        self._create("clients", client.client_id, client)

    def get_client(self, client_id: str) -> Client:
        return self._get("clients", client_id)  # type: ignore[no-any-return]

    def list_clients(self, agent_id: str) -> list[Client]:
        return [c for c in self._t["clients"].values() if c.agent_id == agent_id]

    def update_client(self, client: Client) -> None:
        self._update("clients", client.client_id, client)

    def create_admin_key(self, key: AdminKey) -> None:
        self._create("admin", key.key_id, key)

    def get_admin_key(self, key_id: str) -> AdminKey:
        return self._get("admin", key_id)  # type: ignore[no-any-return]

    def list_admin_keys(self) -> list[AdminKey]:
        return list(self._t["admin"].values())

    def update_admin_key(self, key: AdminKey) -> None:
        self._update("admin", key.key_id, key)

    def append_event(self, event: Event) -> None:
        self._t["events"].append(event)

    def list_events(self, *, since: float = 0.0, limit: int = 1000) -> list[Event]:
        return [e for e in self._t["events"] if e.at >= since][:limit]


class MemoryReplayStore:
    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], float] = {}
        self.claims: dict[tuple[str, str], str] = {}

    async def consume(self, namespace: str, jti: str, expires_at: float) -> None:
        from aegis.errors import ReplayDetected

        if (namespace, jti) in self.seen:
            raise ReplayDetected("jti was already used")
        self.seen[(namespace, jti)] = expires_at

    async def claim(
        self,
        namespace: str,
        key: str,
        owner: str,
        expires_at: float,
        *,
        held: bool = False,
        limit: int | None = None,
    ) -> bool:
        if held and (namespace, key) not in self.claims:
            return False
        return self.claims.setdefault((namespace, key), owner) == owner

    async def release(self, namespace: str, key: str, owner: str) -> None:
        if self.claims.get((namespace, key)) == owner:
            del self.claims[(namespace, key)]

    async def held_by(self, namespace: str, key: str) -> str | None:
        return self.claims.get((namespace, key))

    async def close(self) -> None:
        return None


class MemoryRevocationStore:
    remote = False

    def __init__(self) -> None:
        self.jtis: set[str] = set()
        self.not_before: dict[str, float] = {}

    async def revoke_jti(self, jti: str, expires_at: float) -> None:
        self.jtis.add(jti)

    async def set_not_before(self, subject: str, at: float) -> None:
        self.not_before[subject] = at

    async def check(self, jti: str, subjects: Sequence[str], issued_at: float) -> None:
        from aegis.errors import TokenError

        if jti in self.jtis or any(self.not_before.get(s, 0) > issued_at for s in subjects):
            raise TokenError("token revoked", code="token_revoked")

    async def close(self) -> None:
        return None

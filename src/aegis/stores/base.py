"""The storage interfaces: one Protocol per store, each with one contract test suite.

Registry and key stores are synchronous (SQLAlchemy; they sit behind in-process caches and are
written rarely). Replay and revocation stores are asynchronous and on the hot path (memory or Redis).

Every backend translates its own failures into :class:`aegis.errors.Unavailable` with the store's
``*_unavailable`` code at its boundary, so callers fail closed without knowing the backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from aegis.errors import AegisError, TokenError
from aegis.types import (
    AdminKey,
    Agent,
    AgentStatus,
    Client,
    Environment,
    Event,
    KeyState,
    SigningKeyRecord,
    Tenant,
)

__all__ = [
    "HoldLimit",
    "KeyStore",
    "RegistryStore",
    "ReplayStore",
    "RevocationStore",
    "check_time",
    "replay_key",
]


class RegistryStore(Protocol):
    """Tenants, environments, agents, OAuth clients, admin keys and lifecycle events.

    ``create_*`` raises :class:`aegis.errors.Conflict` if the id exists; ``get_*`` raises
    :class:`aegis.errors.NotFound`; ``update_*`` replaces the whole record and raises ``NotFound``
    if it does not exist, except what records its origin: ``created_at`` is kept as created, and
    so is an admin key's ``hash`` (a new secret is a new key). Writes made inside ``atomic()``
    commit together or not at all.
    """

    def atomic(self) -> AbstractContextManager[None]: ...

    def create_tenant(self, tenant: Tenant) -> None: ...
    def get_tenant(self, tenant_id: str) -> Tenant: ...
    def list_tenants(self) -> list[Tenant]: ...
    def update_tenant(self, tenant: Tenant) -> None: ...

    def create_environment(self, env: Environment) -> None: ...
    def list_environments(self, tenant_id: str) -> list[Environment]: ...

    def create_agent(self, agent: Agent) -> None: ...
    def get_agent(self, agent_id: str) -> Agent: ...
    def list_agents(
        self,
        *,
        tenant_id: str | None = None,
        env: str | None = None,
        status: AgentStatus | None = None,
    ) -> list[Agent]: ...
    def update_agent(self, agent: Agent) -> None: ...
    def check_agent(self, agent: Agent) -> None:
        """Raise ``InvalidRequest`` for a record ``update_agent`` would refuse (a value the
        store cannot hold), writing nothing."""
        ...

    def create_client(self, client: Client) -> None: ...
    def get_client(self, client_id: str) -> Client: ...
    def list_clients(self, agent_id: str) -> list[Client]: ...
    def update_client(self, client: Client) -> None: ...

    def create_admin_key(self, key: AdminKey) -> None: ...
    def get_admin_key(self, key_id: str) -> AdminKey: ...
    def list_admin_keys(self) -> list[AdminKey]: ...
    def update_admin_key(self, key: AdminKey) -> None: ...

    def append_event(self, event: Event) -> None: ...
    def list_events(self, *, since: float = 0.0, limit: int = 1000) -> list[Event]: ...


class KeyStore(Protocol):
    """Token-signing key records (private keys only as encrypted blobs)."""

    def list_keys(self) -> list[SigningKeyRecord]: ...
    def put_key(self, record: SigningKeyRecord) -> None: ...
    def set_state(
        self,
        kid: str,
        state: KeyState,
        *,
        activated_at: float | None = None,
        retired_at: float | None = None,
        remove_after: float | None = None,
    ) -> None: ...
    def delete_key(self, kid: str) -> None: ...
    def replace_all(self, records: Sequence[SigningKeyRecord]) -> None:
        """Write a whole rotation (several state changes) in one transaction."""
        ...

    def update(
        self,
        change: Callable[[list[SigningKeyRecord]], Sequence[SigningKeyRecord] | None],
        *,
        events: Callable[[Sequence[SigningKeyRecord]], Sequence[Event]] | None = None,
    ) -> list[SigningKeyRecord]:
        """Read, ``change`` and write the ring as one step no other process interleaves with
        (``change`` returning ``None`` writes nothing); returns the ring after it. ``events``,
        given the ring written, names the lifecycle events to write in the same transaction (to
        the registry's event log in the store's own database), so the change and its record
        commit together."""
        ...


class ReplayStore(Protocol):
    """Single-use identifiers (DPoP proof jti, client assertion jti, grant jti, override jti)."""

    async def consume(self, namespace: str, jti: str, expires_at: float) -> None:
        """Record ``jti`` until ``expires_at``; raise ``ReplayDetected`` if it was seen before.

        Atomic across processes (``SET NX`` with a TTL in Redis). Raises ``Unavailable`` with
        code ``replay_store_unavailable`` when the store cannot answer.
        """
        ...

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
        """Hold ``key`` for ``owner`` until at least ``expires_at`` (a claim by its holder
        extends it, never shortens it); False, and nothing changed, while another owner holds
        it, or (``held``: only extend a hold ``owner`` has) while nobody does. With ``limit``,
        a new hold is refused (``HoldLimit``) while ``owner`` holds ``limit`` keys of the
        namespace (every claim of the namespace must then pass one). Atomic across processes.
        Raises ``Unavailable`` (``replay_store_unavailable``) when the store cannot answer."""
        ...

    async def release(self, namespace: str, key: str, owner: str) -> None:
        """Drop ``owner``'s hold of ``key`` (another owner's, or none, is left as it is)."""
        ...

    async def held_by(self, namespace: str, key: str) -> str | None:
        """The owner holding ``key`` now (None: nobody), changing nothing. Raises
        ``Unavailable`` (``replay_store_unavailable``) when the store cannot answer."""
        ...

    async def close(self) -> None: ...


class HoldLimit(AegisError):
    """An owner holds as many keys of a namespace as its claims allow (``claim(limit=)``)."""

    default_code = "mcp_session_limit"


class RevocationStore(Protocol):
    """Revoked token ids (with a TTL: the token's own expiry) and per-subject not-before marks."""

    #: Whether :meth:`check` waits on the network (Redis): the gateway then starts it beside the
    #: replay step's own round trip instead of after it.
    remote: bool

    async def revoke_jti(self, jti: str, expires_at: float) -> None: ...

    async def set_not_before(self, subject: str, at: float) -> None:
        """Tokens of ``subject`` (``agent:<id>``, ``client:<id>``) issued before ``at`` are dead."""
        ...

    async def check(self, jti: str, subjects: Sequence[str], issued_at: float) -> None:
        """Raise ``TokenError(code="token_revoked")`` if the jti is revoked or any subject's
        not-before mark is later than ``issued_at``. One round trip. Raises ``Unavailable`` with
        code ``revocation_store_unavailable`` when the store cannot answer."""
        ...

    async def close(self) -> None: ...


def replay_key(namespace: str, jti: str) -> str:
    """``namespace:jti`` with every ``%`` and ``:`` of the namespace percent-encoded.

    The namespace then never holds a ``:``, so the first one separates it from the jti and two
    different pairs never share a key (joined naively, ``("a", "b:c")`` and ``("a:b", "c")`` would
    spend each other). Namespaces without either character, all of Aegis's own, are unchanged.
    """
    return f"{namespace.replace('%', '%25').replace(':', '%3A')}:{jti}"


def check_time(value: float, what: str) -> None:
    """Refuse a NaN or infinite instant before any store compares or stores it.

    Every comparison with NaN is false, so a NaN expiry would never count as "still remembered"
    and a NaN ``issued_at`` would never be "before the mark": the store would fail open. Token
    parsing already refuses such numbers; this keeps the stores safe on their own.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TokenError(f"{what} must be a finite number of seconds", code="invalid_claim")

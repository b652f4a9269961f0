"""Build the approval service from the validated configuration (one place, like
``aegis.server.services.build_services``): the SQL store in the configured database, notifiers
for every configured channel (their secrets read now, so a missing one fails at start-up with the
key named), override tokens from the key ring, the shared replay store and an audit log."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from aegis.approvals.notifiers import Notifier, Sleep
from aegis.approvals.override import OverrideTokens
from aegis.approvals.service import ApprovalService
from aegis.approvals.store import SqlApprovalStore
from aegis.audit.log import AuditLog
from aegis.clock import Clock
from aegis.config import AegisConfig
from aegis.crypto.keyring import KeyRing
from aegis.registry.cache import RegistryCache
from aegis.stores.base import ReplayStore

__all__ = ["approvals_for", "build_approval_service"]


def build_approval_service(
    config: AegisConfig,
    *,
    clock: Clock,
    keyring: KeyRing,
    replay: ReplayStore,
    audit: AuditLog | None = None,
    sleep: Sleep | None = None,
    owner_of: Callable[[str], str] | None = None,
) -> ApprovalService:
    settings = config.approvals
    notifiers: dict[str, Notifier] = {}
    for name, channel in settings.channels.items():
        secret = channel.secret_bytes(str(config.path(".")), name)
        extra = {"sleep": sleep} if sleep is not None else {}
        notifiers[name] = Notifier(
            channel,
            secret,
            clock=clock,
            attempts=settings.delivery_attempts,
            backoff=settings.delivery_backoff,
            timeout=settings.delivery_timeout,
            **extra,
        )
    return ApprovalService(
        SqlApprovalStore(config.database_url()),
        settings=settings,
        overrides=OverrideTokens(keyring, issuer=config.issuer, leeway=float(config.tokens.leeway)),
        replay=replay,
        audit=audit if audit is not None else AuditLog(config.database_url(), clock=clock),
        clock=clock,
        status_base_url=settings.status_base_url or config.issuer,
        notifiers=notifiers,
        owns_audit=audit is None,
        owner_of=owner_of,
    )


class _Services(Protocol):
    """What :func:`approvals_for` needs of ``aegis.server.services.Services``."""

    config: AegisConfig
    clock: Clock
    keyring: KeyRing
    replay: ReplayStore
    cache: RegistryCache
    extras: dict[str, object]


def approvals_for(services: _Services, *, audit: AuditLog | None = None) -> ApprovalService:
    """The one approval service of this process (kept in ``services.extras["approvals"]``), so
    the gateway, the admin API and the callbacks share one store and one notifier set."""
    found = services.extras.get("approvals")
    if isinstance(found, ApprovalService):
        return found
    service = build_approval_service(
        services.config,
        clock=services.clock,
        keyring=services.keyring,
        replay=services.replay,
        audit=audit,
        # Separation of duties reads the chain agents' owners from the registry at decision time.
        owner_of=lambda agent_id: services.cache.agent(agent_id).owner or "",
    )
    services.extras["approvals"] = service
    return service

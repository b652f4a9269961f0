"""Subject state: is the verified token's agent, client and tenant still allowed to act?

Checked after the signature and claims, on every use (introspection, the gateway): the agent is
active and the token was issued after the agent's ``tokens_not_before`` mark; the client is
active, still belongs to that agent, and the token was issued after the client's own mark; the
tenant is active and is the agent's tenant; every scope the token carries is one the agent still
holds; the token's jti is not revoked and no subject-wide revocation mark is later than its ``iat``. Any store failure propagates as ``Unavailable``: the
caller denies.
"""

from __future__ import annotations

from collections.abc import Awaitable

from aegis.errors import NotFound, TokenError
from aegis.registry.cache import RegistryCache
from aegis.stores.base import RevocationStore
from aegis.tokens.claims import AccessToken
from aegis.types import Agent, AgentStatus, TenantStatus

__all__ = ["check_subject"]


def revocation_check(token: AccessToken, revocation: RevocationStore) -> Awaitable[None]:
    """The revocation store's check of ``token``: its jti, and the not-before marks of its agent
    and client (named by the verified token, so it can start before the registry is read)."""
    return revocation.check(
        token.jti, (f"agent:{token.agent_id}", f"client:{token.client_id}"), token.iat
    )


async def check_subject(
    token: AccessToken,
    cache: RegistryCache,
    revocation: RevocationStore,
    *,
    revoked: Awaitable[None] | None = None,
) -> Agent:
    """Return the token's agent if every subject check passes; raise a typed error otherwise.
    ``revoked`` is :func:`revocation_check` already started (its outcome is taken where the
    check would run)."""
    try:
        agent = await cache.agent_async(token.agent_id)
        client = await cache.client_async(token.client_id)
        tenant = await cache.tenant_async(agent.tenant_id)
    except NotFound:
        raise TokenError(
            "the token's agent or client no longer exists", code="token_revoked"
        ) from None
    if agent.status is not AgentStatus.ACTIVE:
        raise TokenError(f"agent is {agent.status.value}", code="agent_inactive")
    if token.iat < agent.tokens_not_before:
        raise TokenError("token was revoked with the agent's earlier tokens", code="token_revoked")
    if not client.active or client.agent_id != agent.id:
        raise TokenError("client is disabled or not this agent's", code="client_inactive")
    if token.iat < client.tokens_not_before:
        raise TokenError("token was revoked with the client's earlier tokens", code="token_revoked")
    if tenant.status is not TenantStatus.ACTIVE:
        raise TokenError("tenant is suspended", code="tenant_inactive")
    if token.tenant != agent.tenant_id or token.env != agent.env:
        raise TokenError(
            "token tenant or environment differs from the agent's", code="tenant_mismatch"
        )
    allowed = agent.allowed_scopes
    if any(s not in allowed for s in token.scopes):
        # Narrowing an agent's scopes (an incident's first move) ends what its tokens carry at
        # once, not when they expire.
        raise TokenError(
            "token carries a scope its agent no longer holds; get a new token",
            code="token_revoked",
        )
    await (revoked if revoked is not None else revocation_check(token, revocation))
    return agent

"""Delegation chain validation: parent-agent grants and the RFC 8693 §4.1 ``act`` claim.

One function, :func:`verify_links`, checks a presented chain for both the token service (at token
exchange) and the gateway (:func:`verify_chain`, on every call). Every link is re-verified with its
signer's *current* registered keys, so rotating or removing a parent's key, or retiring, suspending
or quarantining any agent in the chain, ends every token that depends on it. The rules:

* each link is signed by the agent it names as ``iss`` (a user-rooted first link by the token
  service) and names the next signer as ``sub``; ``parent_chain`` binds it to its exact prefix;
* depth: at most ``max_depth`` links, and each link's ``max_depth`` is below its parent's;
* no cycles: an agent appears once; tenant and environment never change;
* scopes and tools only narrow, and no link grants more than its signer may hold today;
* every agent is active and no link predates its signer's ``tokens_not_before`` mark.

Authorization uses only the token's subject (the current actor) and what these verified links say.
Nested ``act`` entries are informational: they are never read to build a :class:`Chain`, so a forged
nested entry can change no decision.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from math import inf
from typing import Any, Final, Protocol

from aegis.crypto.jws import parse_compact
from aegis.crypto.keys import PublicKey
from aegis.errors import AegisError, NotFound, TokenError
from aegis.registry.cache import RegistryCache
from aegis.telemetry.logging import log_event
from aegis.tokens.claims import AccessToken
from aegis.tokens.delegation import (
    ANY_TOOL,
    MAX_GRANT_LIFETIME,
    Grant,
    PrefixDigest,
    split_chain,
    verify_agent_grant,
    verify_grant,
)
from aegis.types import Agent, AgentStatus

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "Chain",
    "ChainRules",
    "ServiceKeys",
    "audit_rejection",
    "prefetch_chain_agents",
    "presented_chain",
    "root_link_horizon",
    "verify_chain",
    "verify_links",
]

#: Longest delegation chain accepted unless configured otherwise (links, not agents).
DEFAULT_MAX_DEPTH: Final = 4


class ServiceKeys(Protocol):
    """The key ring's lookup (:meth:`aegis.crypto.keyring.KeyRing.public_key`)."""

    def __call__(
        self, kid: str, /, *, retired_within: float = ..., signed_at: float | None = ...
    ) -> PublicKey | None: ...


def root_link_horizon(rules: ChainRules) -> float:
    """How long after the token service signs a chain's first link a token carrying it may
    still be presented: each of up to ``max_depth`` links may be signed until the grant before
    it (:data:`MAX_GRANT_LIFETIME`) and the token exchanged from it have both run out, and the
    last token lives as long again. A key the service retired must keep verifying first links
    that long, far past the overlap that covers the access tokens it signed."""
    return rules.max_depth * (MAX_GRANT_LIFETIME + rules.max_token_lifetime + rules.leeway)


@dataclass(frozen=True, slots=True)
class ChainRules:
    """Settings shared by the token service and the gateway. Build once."""

    #: The token service URL: every grant's ``aud``, and the ``iss`` of user-rooted first links.
    issuer: str
    #: The token service's own keys (the key ring), for user-rooted first links only.
    service_keys: ServiceKeys
    max_depth: int = DEFAULT_MAX_DEPTH
    leeway: float = 30.0
    #: The longest access-token lifetime: how long after a link expires its child's token may live.
    max_token_lifetime: float = 3600.0


@dataclass(frozen=True, slots=True)
class Chain:
    """A verified delegation chain, shaped for the policy input (``chain`` member)."""

    #: Agents in order: the root first, the current actor last.
    agents: tuple[str, ...]
    #: The agent that delegated to the current actor (None when not delegated).
    parent: str | None
    #: Number of links (0 when not delegated).
    depth: int
    origin_user: str | None = None
    origin_issuer: str | None = None
    #: When the user's token a user-rooted chain acts for expires (None: agent-rooted).
    origin_exp: float | None = None
    #: Tools the last link allows (None when not delegated: delegation restricts nothing).
    tools: tuple[str, ...] | None = None
    grants: tuple[Grant, ...] = field(default=(), repr=False)

    def allows_tool(self, tool: str) -> bool:
        return self.tools is None or ANY_TOOL in self.tools or tool in self.tools

    def policy_input(self) -> dict[str, Any]:
        return {
            "agents": list(self.agents),
            "parent": self.parent,
            "depth": self.depth,
            "origin_user": self.origin_user,
        }


def presented_chain(links: Sequence[str]) -> list[dict[str, Any]]:
    """What was presented, for audit: issuer, subject, jti and scope of each link, unverified."""
    out: list[dict[str, Any]] = []
    for link in links[:16]:
        try:
            payload = parse_compact(link).payload
        except AegisError:
            out.append({"malformed": True})
            continue
        out.append(
            {k: str(payload[k])[:128] for k in ("iss", "sub", "jti", "scope") if k in payload}
        )
    return out


def _fail(message: str, code: str) -> TokenError:
    return TokenError(message, code=code)


def verify_links(
    links: Sequence[str],
    *,
    cache: RegistryCache,
    rules: ChainRules,
    tenant: str,
    env: str,
    at: float,
) -> Chain:
    """Verify a whole chain. ``at`` is the instant the last link must be valid at (now for an
    exchange; the token's ``iat`` at the gateway). Raises a typed error; registry outages propagate
    as ``Unavailable`` (deny)."""
    if not links:
        raise _fail("the delegation chain is empty", "malformed_token")
    if len(links) > rules.max_depth:
        raise _fail(
            f"delegation depth {len(links)} exceeds {rules.max_depth}", "delegation_too_deep"
        )
    grants: list[Grant] = []
    agents: list[str] = []
    signers: dict[str, Agent] = {}
    prefix = PrefixDigest()
    for i, link in enumerate(links):
        # Each link must be signed by the previous link's subject, so only the root's issuer is
        # read before verification, and only to select its keys (verify_grant checks it).
        claimed = parse_compact(link).payload if i == 0 else {}
        iss = grants[-1].sub if i else claimed.get("iss")
        if not isinstance(iss, str) or not iss:
            raise _fail("a grant has no issuer", "parent_signature_invalid")
        allowed: Sequence[str] | None = None
        if iss == rules.issuer and i == 0:
            # A retired service key verifies a first link only if the link says it was signed
            # while the key was active (read before the signature is checked, it only narrows
            # which keys may verify it; a number out of range narrows it to none).
            iat = claimed.get("iat")
            signed_at = None
            if isinstance(iat, int | float) and not isinstance(iat, bool) and 0 <= iat < 2**40:
                signed_at = float(iat)
            keys = partial(
                rules.service_keys, retired_within=root_link_horizon(rules), signed_at=signed_at
            )
            grant = verify_grant(
                link,
                keys,
                issuer=iss,
                audience=rules.issuer,
                now=at,
                leeway=inf,
            )
        else:
            try:
                signer = cache.agent(iss)
            except NotFound:
                raise _fail(
                    "a grant's issuer is not a registered agent", "parent_signature_invalid"
                ) from None
            allowed = signer.allowed_scopes
            signers[iss] = signer
            if i == 0:
                agents.append(iss)  # an agent-rooted chain starts with the root agent
            grant = verify_agent_grant(link, signer, audience=rules.issuer)
        if grant.parent_chain != prefix.value():
            raise _fail("a grant was made for a different chain", "parent_signature_invalid")
        prefix.add(link)
        if allowed is not None and not set(grant.scopes) <= set(allowed):
            raise _fail(f"{iss} granted scopes it may not hold", "scope_widened")
        if i:
            prev = grants[-1]
            if not set(grant.scopes) <= set(prev.scopes):
                raise _fail(f"{iss} granted scopes beyond its own delegation", "scope_widened")
            if ANY_TOOL not in prev.tools and not set(grant.tools) <= set(prev.tools):
                raise _fail(f"{iss} granted tools beyond its own delegation", "scope_widened")
            if prev.max_depth < 1 or grant.max_depth > prev.max_depth - 1:
                raise _fail(f"{iss} may not delegate further", "delegation_too_deep")
            # The parent signed this link while holding a token exchanged from the previous one.
            if grant.iat + rules.leeway < prev.iat or (
                grant.iat >= prev.exp + rules.max_token_lifetime + rules.leeway
            ):
                raise _fail("a link outlived the grant before it", "parent_expired")
        elif grant.origin_user is not None and iss != rules.issuer:
            raise _fail(
                "only the token service may root a chain in a user", "parent_signature_invalid"
            )
        grants.append(grant)
        agents.append(grant.sub)
    last = grants[-1]
    # Grants carry milliseconds, tokens whole seconds: a token issued in the second its grant
    # was signed reads as issued before it.
    if not math.floor(last.iat) - rules.leeway <= at < last.exp + rules.leeway:
        raise _fail("the parent grant has expired; ask the parent for a new one", "parent_expired")
    origin_exp = grants[0].origin_exp
    if origin_exp is not None and (
        at >= origin_exp + rules.leeway
        or any(g.iat >= origin_exp + rules.leeway for g in grants[1:])
    ):
        # Nothing acts for a user past their token: no link signed after it, no token
        # exchanged after it (and none, below and at exchange, that lives past it).
        raise _fail(
            "the user's token this chain acts for has expired; the user must sign in again",
            "parent_expired",
        )
    if len(set(agents)) != len(agents):
        raise _fail("an agent appears twice in the delegation chain", "delegation_cycle")
    _check_agents(agents, grants, signers, cache, tenant, env)
    return Chain(
        agents=tuple(agents),
        parent=agents[-2] if len(agents) > 1 else None,
        depth=len(grants),
        origin_user=grants[0].origin_user,
        origin_issuer=grants[0].origin_issuer,
        origin_exp=origin_exp,
        tools=last.tools,
        grants=tuple(grants),
    )


def _check_agents(
    agents: list[str],
    grants: list[Grant],
    signers: dict[str, Agent],
    cache: RegistryCache,
    tenant: str,
    env: str,
) -> None:
    """Every agent's state, judged on the same record its link's signature was checked with
    (``signers``); the others are read from the cache."""
    signed_at = {g.iss: g.iat for g in grants}
    received_at = {g.sub: g.iat for g in grants}
    for n, agent_id in enumerate(agents):
        agent = signers.get(agent_id)
        if agent is None:
            try:
                agent = cache.agent(agent_id)
            except NotFound:
                raise _fail("an agent in the chain no longer exists", "parent_inactive") from None
        if agent.tenant_id != tenant or agent.env != env:
            raise _fail("the delegation chain crosses tenants or environments", "tenant_mismatch")
        current = n == len(agents) - 1
        if agent.status is not AgentStatus.ACTIVE:
            raise _fail(
                f"agent {agent_id} in the chain is {agent.status.value}",
                "agent_inactive" if current else "parent_inactive",
            )
        if agent_id in signed_at and signed_at[agent_id] < agent.tokens_not_before:
            raise _fail(f"{agent_id} signed its grant before it was suspended", "parent_inactive")
        # A grant it holds is one of its credentials, ended with the others by a suspension (or
        # a tenant's): reactivated, it must be granted anew.
        if agent_id in received_at and received_at[agent_id] < agent.tokens_not_before:
            raise _fail(
                f"{agent_id} was granted this delegation before it was suspended; ask for a new "
                "grant",
                "token_revoked" if current else "parent_inactive",
            )


async def prefetch_chain_agents(
    token: AccessToken, cache: RegistryCache, rules: ChainRules
) -> None:
    """Bring the registry records :func:`verify_chain` will read (every agent its links name)
    into ``cache`` through its readers for event loops, so that the synchronous verification
    finds them there instead of reading the database on the event loop. The names are read from
    the links unverified, and only to fetch: :func:`verify_chain` checks everything. A chain it
    would refuse as malformed is left to it; an agent that does not exist is its to report; a
    registry that cannot answer fails the call here, as it would there."""
    raw = token.claims.get("parent_agent")
    if raw is None:
        return
    try:
        links = split_chain(raw, max_links=rules.max_depth)
        named = {parse_compact(link).payload.get(k) for link in links for k in ("iss", "sub")}
    except AegisError:
        return
    for agent_id in sorted(a for a in named if isinstance(a, str) and a and a != rules.issuer):
        try:
            await cache.agent_async(agent_id)
        except NotFound:
            continue


def verify_chain(
    token: AccessToken,
    *,
    cache: RegistryCache,
    rules: ChainRules,
    now: float,
    tool: str | None = None,
) -> Chain:
    """Gateway step 6: re-verify the delegation chain of an already verified access token.

    A token without ``parent_agent`` is not delegated: its chain is just its subject. Any failure
    is logged (``delegation.rejected``) with the presented chain and raised with it in ``details``.
    """
    claims = token.claims
    raw = claims.get("parent_agent")
    links: list[str] = []
    try:
        if raw is None:
            if any(k in claims for k in ("act", "delegation_depth", "origin_user")):
                raise _fail("delegation claims without parent_agent", "invalid_claim")
            chain = Chain(agents=(token.sub,), parent=None, depth=0)
        else:
            links = split_chain(raw, max_links=rules.max_depth)
            chain = verify_links(
                links, cache=cache, rules=rules, tenant=token.tenant, env=token.env, at=token.iat
            )
            act = claims.get("act")
            if (
                chain.agents[-1] != token.sub
                or not isinstance(act, dict)
                or act.get("sub") != token.sub
            ):
                raise _fail("the chain's current actor is not the token's subject", "invalid_claim")
            if (
                claims.get("delegation_depth") != chain.depth
                or claims.get("origin_user") != chain.origin_user
            ):
                raise _fail("delegation claims disagree with the verified chain", "invalid_claim")
            if not set(token.scopes) <= set(chain.grants[-1].scopes):
                raise _fail("the token holds scopes its grant does not", "scope_widened")
            if now >= chain.grants[-1].exp + rules.max_token_lifetime + rules.leeway:
                raise _fail("the token outlived its delegation", "parent_expired")
            if chain.origin_exp is not None and now >= chain.origin_exp + rules.leeway:
                raise _fail(
                    "the user's token this chain acts for has expired; the user must sign in again",
                    "parent_expired",
                )
        if tool is not None and not chain.allows_tool(tool):
            raise TokenError(
                f"tool {tool!r} was not delegated to this agent", code="insufficient_scope"
            )
    except AegisError as exc:
        audit_rejection(exc, stage="gateway", agent=token.sub, links=links)
        raise
    return chain


def audit_rejection(
    exc: AegisError, *, stage: str, agent: str | None, links: Sequence[str]
) -> None:
    """Record a refused chain (structured event; the audit log consumes the same fields)."""
    presented = presented_chain(links)
    exc.details.setdefault("chain", presented)
    log_event(
        "delegation.rejected",
        level=logging.WARNING,
        stage=stage,
        code=exc.code,
        reason=exc.message,
        agent=agent,
        chain=presented,
    )

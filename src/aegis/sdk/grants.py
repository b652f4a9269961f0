"""Delegation from the agent's side (docs/delegation.md): the grants it signs for the agents it
calls, and the RFC 8693 token-exchange request with which a child spends one.

A grant is a compact JWS signed with the parent's *own* registered key
(:func:`aegis.tokens.delegation.mint_grant`). A parent acting under a chain itself extends that
chain: the new link's ``parent_chain`` is the digest of the links before it, so the token service
and every gateway can check the whole chain, link by link, and that nothing was spliced in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from aegis.crypto.jws import parse_compact
from aegis.crypto.keys import Ed25519SigningKey
from aegis.tokens.delegation import CHAIN_SEPARATOR, mint_grant

__all__ = [
    "DELEGATION_GRANT",
    "JWT_TYPE",
    "TOKEN_EXCHANGE",
    "chain_subject",
    "exchange_form",
    "extend_chain",
]

TOKEN_EXCHANGE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"
DELEGATION_GRANT: Final = "urn:aegis:params:oauth:token-type:delegation-grant"
JWT_TYPE: Final = "urn:ietf:params:oauth:token-type:jwt"


def exchange_form(subject_token: str, actor_token: str) -> dict[str, str]:
    """RFC 8693 §2.1: the parent's chain is the subject; the child authenticates with its own
    client assertion as the actor token, and with nothing else (the server refuses other
    client credentials in the same request)."""
    return {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": DELEGATION_GRANT,
        "actor_token": actor_token,
        "actor_token_type": JWT_TYPE,
    }


def chain_subject(chain: str) -> str | None:
    """The agent the chain's last link was made for (unverified: for naming only)."""
    sub = parse_compact(chain.split(CHAIN_SEPARATOR)[-1]).payload.get("sub")
    return sub if isinstance(sub, str) else None


def extend_chain(
    key: Ed25519SigningKey,
    *,
    parent: str,
    child: str,
    audience: str,
    scopes: Sequence[str],
    tools: Sequence[str],
    max_depth: int,
    lifetime: int,
    now: float,
    under: str | None = None,
) -> str:
    """``under`` (the chain ``parent`` acts under, or None) plus a new link to ``child``: the
    ``~``-joined subject token the child presents."""
    links = under.split(CHAIN_SEPARATOR) if under else []
    link = mint_grant(
        key,
        parent=parent,
        child=child,
        audience=audience,
        scopes=scopes,
        tools=tools,
        max_depth=max_depth,
        parent_links=links,
        now=now,
        lifetime=lifetime,
    )
    return CHAIN_SEPARATOR.join([*links, link])

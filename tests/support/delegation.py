"""A token service with delegation chains, in memory, on a frozen clock: the unit-test world.

Real registry, key ring, issuer, client authenticator and token exchanger over the in-memory fakes
(tests/pki/fakes.py); only the clock is frozen so that expiry is tested to the second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from aegis.clock import FrozenClock, new_id
from aegis.crypto.jws import encode_segment, sign_compact
from aegis.crypto.keyring import KeyRing
from aegis.crypto.keys import Ed25519SigningKey
from aegis.oauth.client_auth import ClientAuthenticator, FailureLimiter
from aegis.registry.cache import RegistryCache
from aegis.registry.service import AgentSpec, RegistryService
from aegis.tokens.chain import ChainRules
from aegis.tokens.claims import AccessToken
from aegis.tokens.delegation import CHAIN_SEPARATOR, mint_grant
from aegis.tokens.exchange import DELEGATION_GRANT, JWT_TYPE, AuditSink, TokenExchanger
from aegis.tokens.external import ExternalTrust
from aegis.tokens.issuer import IssuedToken, TokenIssuer
from aegis.tokens.verifier import AccessTokenVerifier
from aegis.types import ClientAuthMethod
from tests.crypto.fakes import MemoryKeyStore
from tests.pki.fakes import MemoryRegistryStore, MemoryReplayStore

ISSUER = "https://aegis.example"
T0 = 1_800_000_000.0


@dataclass
class Handle:
    """A registered agent with its private key and private_key_jwt client."""

    id: str
    key: Ed25519SigningKey
    client_id: str
    #: The chain this agent holds (its token's ``parent_agent``, split), empty for a root.
    links: list[str] = field(default_factory=list)
    token: AccessToken | None = None


def client_assertion(agent: Handle, now: float, audience: str = ISSUER) -> str:
    claims = {
        "iss": agent.client_id,
        "sub": agent.client_id,
        "aud": audience,
        "iat": int(now),
        "exp": int(now) + 60,
        "jti": new_id(),
    }
    header = encode_segment({"alg": "EdDSA", "typ": "JWT", "kid": agent.key.kid})
    return sign_compact(header, claims, agent.key.sign)


class World:
    def __init__(
        self,
        *,
        max_depth: int = 4,
        external: tuple[ExternalTrust, ...] = (),
        audit: AuditSink | None = None,
    ) -> None:
        self.clock = FrozenClock(T0)
        self.store = MemoryRegistryStore()
        self.registry = RegistryService(self.store, clock=self.clock, pepper=os.urandom(32))
        self.cache = RegistryCache(self.store, clock=self.clock, ttl=0.0)
        self.keyring = KeyRing(MemoryKeyStore(), os.urandom(32), self.clock)
        self.keyring.ensure_initialized()
        self.replay = MemoryReplayStore()
        self.issuer = TokenIssuer(self.keyring, issuer=ISSUER, clock=self.clock)
        self.verifier = AccessTokenVerifier(
            self.keyring.public_key, issuer=ISSUER, audience=None, clock=self.clock
        )
        self.rules = ChainRules(
            issuer=ISSUER, service_keys=self.keyring.public_key, max_depth=max_depth
        )
        authenticator = ClientAuthenticator(
            self.registry,
            self.cache,
            self.replay,
            clock=self.clock,
            audiences=frozenset({ISSUER}),
            assertion_max_lifetime=300.0,
            leeway=30.0,
            limiter=FailureLimiter(self.clock, limit=10_000, window=60.0),
        )
        self.exchanger = TokenExchanger(
            issuer=self.issuer,
            keyring=self.keyring,
            cache=self.cache,
            replay=self.replay,
            authenticator=authenticator,
            clock=self.clock,
            rules=self.rules,
            audiences=("aegis-gateway", "payments-api"),
            default_lifetime=300,
            max_lifetime=3600,
            external=external,
            audit=audit,
        )

    def agent(
        self,
        name: str,
        scopes: tuple[str, ...] = ("payments:read", "payments:write", "ledger:read"),
        *,
        tenant: str = "acme",
    ) -> Handle:
        key = Ed25519SigningKey.generate()
        self.registry.register_agent(
            AgentSpec(
                name,
                tenant,
                "prod",
                "owner@example.com",
                allowed_scopes=scopes,
                jwks=(key.public.to_jwk(),),
            ),
            actor="test",
        )
        client, _ = self.registry.create_client(
            name, auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor="test"
        )
        return Handle(name, key, client.client_id)

    def grant(
        self,
        parent: Handle,
        child: Handle,
        *,
        scopes: tuple[str, ...] = ("payments:read", "payments:write"),
        tools: tuple[str, ...] = ("pay_invoice", "read_ledger"),
        max_depth: int = 3,
        key: Ed25519SigningKey | None = None,
        lifetime: int = 120,
        **extra: Any,
    ) -> str:
        """The subject token ``parent`` hands to ``child``: its own chain plus one new link."""
        link = mint_grant(
            key or parent.key,
            parent=parent.id,
            child=child.id,
            audience=ISSUER,
            scopes=scopes,
            tools=tools,
            max_depth=max_depth,
            parent_links=parent.links,
            now=self.clock.now(),
            lifetime=lifetime,
            extra=extra or None,
        )
        return CHAIN_SEPARATOR.join([*parent.links, link])

    async def exchange(
        self,
        child: Handle,
        subject_token: str,
        *,
        subject_type: str = DELEGATION_GRANT,
        **form: str,
    ) -> IssuedToken:
        """Exchange ``subject_token`` for ``child``; on success ``child`` now holds the chain."""
        body = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": subject_token,
            "subject_token_type": subject_type,
            "actor_token": client_assertion(child, self.clock.now()),
            "actor_token_type": JWT_TYPE,
            **form,
        }
        issued, _ = await self.exchanger.exchange(body, [], authorization=None, source="test")
        child.token = self.verifier.verify(issued.token)
        child.links = issued.claims["parent_agent"].split(CHAIN_SEPARATOR)
        return issued

"""Wiring: build every control-plane service from one validated configuration.

The CLI, the all-in-one server and the tests all call :func:`build_services`, so there is exactly one
place where stores, key ring, registry, issuer and verifier are put together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aegis.audit.log import AuditLog
from aegis.clock import Clock, SystemClock
from aegis.config import AegisConfig
from aegis.crypto.keyring import KeyRing, KeyRingSettings
from aegis.oauth.client_auth import ClientAuthenticator, FailureLimiter
from aegis.oauth.service import TokenService
from aegis.pki.service import open_pki
from aegis.registry.cache import RegistryCache
from aegis.registry.service import RegistryService
from aegis.stores import (
    open_key_store,
    open_registry_store,
    open_replay_store,
    open_revocation_store,
)
from aegis.stores.base import KeyStore, RegistryStore, ReplayStore, RevocationStore
from aegis.tokens.chain import ChainRules
from aegis.tokens.dpop import DpopVerifier, token_endpoint_hook
from aegis.tokens.exchange import TokenExchanger
from aegis.tokens.external import load_trust
from aegis.tokens.issuer import TokenIssuer
from aegis.tokens.verifier import ED25519_ALGS, AccessTokenVerifier

__all__ = ["Services", "build_services"]


@dataclass
class Services:
    config: AegisConfig
    clock: Clock
    registry_store: RegistryStore
    key_store: KeyStore
    replay: ReplayStore
    revocation: RevocationStore
    registry: RegistryService
    cache: RegistryCache
    keyring: KeyRing
    issuer: TokenIssuer
    verifier: AccessTokenVerifier
    tokens: TokenService
    authenticator: ClientAuthenticator
    extras: dict[str, object] = field(default_factory=dict)

    async def aclose(self) -> None:
        pki = self.extras.get("pki")
        if pki is not None:
            pki.store.close()  # type: ignore[attr-defined]
        exchange_audit = self.extras.get("exchange_audit")
        if isinstance(exchange_audit, AuditLog):
            exchange_audit.close()
        # The one approval service of the process (aegis.approvals.wiring.approvals_for) holds its
        # own SQL engine; closing twice is harmless (engine disposal is idempotent).
        approvals = self.extras.pop("approvals", None)
        close_approvals = getattr(approvals, "close", None)
        if close_approvals is not None:
            close_approvals()
        await self.replay.close()
        await self.revocation.close()
        self.cache.close()
        self.keyring.close()
        for store in (self.registry_store, self.key_store):
            close = getattr(store, "close", None)
            if close is not None:
                close()


def build_services(config: AegisConfig, *, clock: Clock | None = None) -> Services:
    clock = clock or SystemClock()
    db_url = config.database_url()
    registry_store = open_registry_store(db_url)
    key_store = open_key_store(db_url)
    prefix = config.stores.redis_prefix
    budget = {
        "timeout": config.stores.redis_timeout,
        "connect_timeout": config.stores.redis_connect_timeout,
    }
    replay = open_replay_store(config.stores.replay, clock=clock, prefix=prefix, **budget)
    revocation = open_revocation_store(
        config.stores.revocation, clock=clock, prefix=prefix, **budget
    )
    tok = config.tokens
    keyring = KeyRing(
        key_store,
        config.kek(),
        clock,
        KeyRingSettings(
            max_token_lifetime=float(tok.max_lifetime),
            leeway=float(tok.leeway),
            publish_lead=float(config.keys.publish_lead),
            rotation_interval=float(config.keys.rotation_interval),
            signing_alg=tok.signing_alg,
        ),
    )
    keyring.ensure_initialized()
    registry = RegistryService(
        registry_store,
        clock=clock,
        pepper=config.pepper(),
        secret_overlap=float(config.secrets.rotation_overlap),
    )
    cache = RegistryCache(registry_store, clock=clock, ttl=config.stores.registry_cache_ttl)
    issuer = TokenIssuer(keyring, issuer=config.issuer, clock=clock)
    verifier = AccessTokenVerifier(
        keyring.public_key,
        issuer=config.issuer,
        audience=None,
        clock=clock,
        leeway=float(tok.leeway),
        max_lifetime=float(tok.max_lifetime),
        algs=ED25519_ALGS,
    )
    tokens = TokenService(
        issuer=issuer,
        verifier=verifier,
        cache=cache,
        revocation=revocation,
        clock=clock,
        audiences=tok.audiences,
        default_lifetime=tok.default_lifetime,
        max_lifetime=tok.max_lifetime,
    )
    authenticator = ClientAuthenticator(
        registry,
        cache,
        replay,
        clock=clock,
        audiences=frozenset({config.issuer}),
        assertion_max_lifetime=float(config.oauth.assertion_max_lifetime),
        leeway=float(tok.leeway),
        limiter=FailureLimiter(
            clock,
            limit=config.oauth.auth_failure_limit,
            window=float(config.oauth.auth_failure_window),
        ),
    )
    # Delegation chains (RFC 8693 token exchange); `delegation:` in aegis.yaml when present.
    dlg = config.delegation
    exchange_audit = AuditLog(db_url, clock=clock)
    tokens.exchanger = TokenExchanger(
        issuer=issuer,
        keyring=keyring,
        cache=cache,
        replay=replay,
        authenticator=authenticator,
        clock=clock,
        rules=ChainRules(
            issuer=config.issuer,
            service_keys=keyring.public_key,
            max_depth=dlg.max_depth,
            leeway=float(tok.leeway),
            max_token_lifetime=float(tok.max_lifetime),
        ),
        audiences=tok.audiences,
        default_lifetime=tok.default_lifetime,
        max_lifetime=tok.max_lifetime,
        external=[
            load_trust(t, base_dir=config.path("."), default_audience=config.issuer)
            for t in dlg.external_issuers
        ],
        # Every exchange, issued or refused (with the presented chain), is audited.
        audit=exchange_audit.append_async,
    )
    services = Services(
        config=config,
        clock=clock,
        registry_store=registry_store,
        key_store=key_store,
        replay=replay,
        revocation=revocation,
        registry=registry,
        cache=cache,
        keyring=keyring,
        issuer=issuer,
        verifier=verifier,
        tokens=tokens,
        authenticator=authenticator,
    )
    # DPoP (RFC 9449) at the token endpoint: a valid proof binds the token to its key (cnf.jkt).
    services.extras["exchange_audit"] = exchange_audit
    services.extras["dpop_verifier"] = dpop = DpopVerifier(replay, clock=clock)
    services.extras["dpop_hook"] = token_endpoint_hook(dpop, f"{config.issuer}/oauth/token")
    # The internal CA, when `aegis ca init` has created one (docs/pki.md).
    pki = open_pki(config, clock=clock, cache=cache, registry=registry, authenticator=authenticator)
    if pki is not None:
        services.extras["pki"] = pki
    return services
